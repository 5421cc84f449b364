#!/usr/bin/env bash
# Build the ONNX Runtime 1.19.2 Python wheel with the on-device training API
# (--enable_training_apis) for Linux aarch64 (Raspberry Pi OS / Ubuntu arm64, Jetson).
#
# There is no onnxruntime-training wheel for Linux aarch64 on PyPI; fleetlearn's device
# agent needs ORT's CheckpointState/Module/Optimizer, so a board builds it from source.
#
#   scripts/build_ort_training_aarch64.sh native   # on the aarch64 board itself
#   scripts/build_ort_training_aarch64.sh docker   # on any Linux host: arm64 container
#                                                  # under qemu (slow: many hours)
#
# Environment: ORT_VERSION (1.19.2), WORK (build/ort-aarch64), OUT (dist/aarch64),
#              JOBS (parallel compile jobs; 2 on a 4 GB board), PYTHON (python3),
#              ORT_REPO (https://github.com/microsoft/onnxruntime.git).
# See docs/aarch64.md. NOTE: written for, but not yet run on, real aarch64 hardware.
set -euo pipefail

ORT_VERSION="${ORT_VERSION:-1.19.2}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${WORK:-$ROOT/build/ort-aarch64}"
OUT="${OUT:-$ROOT/dist/aarch64}"
PYTHON="${PYTHON:-python3}"
ORT_REPO="${ORT_REPO:-https://github.com/microsoft/onnxruntime.git}"
DEFAULT_JOBS="$(nproc 2>/dev/null || echo 2)"
JOBS="${JOBS:-$DEFAULT_JOBS}"

log() { printf '[build-ort] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

check_tools() {
    local missing=()
    for tool in git g++ make "$PYTHON"; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    if ((${#missing[@]})); then
        die "missing tools: ${missing[*]} (Debian/Ubuntu: sudo apt-get install -y git build-essential python3-dev python3-venv)"
    fi
}

python_deps() {
    # ORT 1.19 needs CMake >= 3.26; CMake 4 drops policies some bundled dependencies use.
    "$PYTHON" -m pip install --upgrade "cmake>=3.28,<4" "numpy>=1.26" packaging wheel setuptools
    export PATH="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
    cmake --version | head -1 >&2
}

fetch_source() {
    local src="$WORK/onnxruntime"
    if [[ -d "$src/.git" ]]; then
        log "reusing source in $src"
    else
        mkdir -p "$WORK"
        log "cloning onnxruntime v$ORT_VERSION (with submodules)"
        git clone --depth 1 --branch "v$ORT_VERSION" --recursive --shallow-submodules \
            "$ORT_REPO" "$src" >&2  # stdout carries only the path
    fi
    echo "$src"
}

# A wheel built with --enable_training_apis alone may lack the Python side of the
# training API: setup.py and the CMake copy step add onnxruntime/training/api only for
# the full --enable_training build (microsoft/onnxruntime#20985, "No module named
# onnxruntime.training"). The compiled bindings are there either way, so put the pure
# Python files of training/api into the wheel when they are missing.
complete_wheel() {
    local src="$1" wheel="$2"
    if "$PYTHON" -m zipfile -l "$wheel" | grep -q 'onnxruntime/training/api/module.py'; then
        log "wheel already contains onnxruntime/training/api"
        return
    fi
    log "adding onnxruntime/training/api to the wheel"
    local tmp
    tmp="$(mktemp -d)"
    "$PYTHON" -m wheel unpack --dest "$tmp" "$wheel"
    local pkg
    pkg="$(find "$tmp" -maxdepth 2 -type d -name onnxruntime | head -1)"
    [[ -n "$pkg" ]] || die "cannot find the onnxruntime package inside $wheel"
    mkdir -p "$pkg/training/api"
    cp "$src"/orttraining/orttraining/python/training/api/*.py "$pkg/training/api/"
    # fleetlearn imports the submodules with the package __init__ stubbed out
    # (edge_runtime/_ort.py), so an empty __init__ is enough when there is none.
    [[ -f "$pkg/training/__init__.py" ]] || : > "$pkg/training/__init__.py"
    rm -f "$wheel"
    "$PYTHON" -m wheel pack --dest-dir "$(dirname "$wheel")" "$(dirname "$pkg")"
    rm -rf "$tmp"
}

build_native() {
    local machine
    machine="$(uname -m)"
    if [[ "$machine" != "aarch64" && "$machine" != "arm64" && -z "${FORCE:-}" ]]; then
        die "this is $machine, not aarch64: use '$0 docker', or FORCE=1 to build for this machine"
    fi
    check_tools
    python_deps
    local src
    src="$(fetch_source)"
    log "building with $JOBS jobs (a 4 GB board needs JOBS=2 and some swap)"
    (
        cd "$src"
        ./build.sh \
            --config Release \
            --update --build \
            --build_wheel \
            --enable_training_apis \
            --skip_tests \
            --parallel "$JOBS" \
            --compile_no_warning_as_error \
            --allow_running_as_root \
            --skip_submodule_sync
    )
    local wheel
    wheel="$(ls -t "$src"/build/Linux/Release/dist/*.whl | head -1)"
    [[ -f "$wheel" ]] || die "no wheel produced under $src/build/Linux/Release/dist"
    complete_wheel "$src" "$wheel"
    wheel="$(ls -t "$src"/build/Linux/Release/dist/*.whl | head -1)"
    mkdir -p "$OUT"
    cp "$wheel" "$OUT/"
    log "wheel: $OUT/$(basename "$wheel")"
    log "install it on the device: pip install '$OUT/$(basename "$wheel")'"
    log "then check: python -c 'from edge_runtime._ort import load_training_api; print(load_training_api())'"
}

build_docker() {
    command -v docker >/dev/null 2>&1 || die "docker is not installed"
    if [[ "$(uname -m)" != "aarch64" ]]; then
        # Register qemu for arm64 binaries once per boot (needs a privileged container).
        if ! docker run --rm --platform linux/arm64 arm64v8/debian:bookworm-slim true 2>/dev/null; then
            log "registering qemu-user-static for arm64"
            docker run --privileged --rm tonistiigi/binfmt --install arm64
        fi
    fi
    mkdir -p "$WORK" "$OUT"
    log "building inside an arm64 python:3.11 container (emulated: expect many hours)"
    docker run --rm --platform linux/arm64 \
        -v "$ROOT/scripts:/fleetlearn/scripts:ro" \
        -v "$WORK:/work" \
        -v "$OUT:/out" \
        -e ORT_VERSION="$ORT_VERSION" -e JOBS="$JOBS" -e WORK=/work -e OUT=/out \
        -e ORT_REPO="$ORT_REPO" \
        python:3.11-bookworm \
        bash -c 'apt-get update && apt-get install -y --no-install-recommends git build-essential \
                 && bash /fleetlearn/scripts/build_ort_training_aarch64.sh native'
    log "wheel(s) in $OUT (python 3.11, manylinux-less linux_aarch64 tag: install on a"
    log "board with the same Python minor version and glibc >= the container's, Debian 12)"
}

case "${1:-}" in
    native) build_native ;;
    docker) build_docker ;;
    -h | --help | help) usage 0 ;;
    *) usage 2 ;;
esac
