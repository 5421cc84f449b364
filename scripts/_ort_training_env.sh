# Sourced by scripts/test.sh: a second virtual environment, .venv-ort-training, with the
# optional onnxruntime-training backend, so the tests can compare the portable backend
# with it in one run. onnxruntime-training-cpu and onnxruntime both own the
# `onnxruntime` package, so they cannot share a venv; this one gets the training wheel
# *instead of* onnxruntime and fleetlearn itself without dependencies.
# Only where that wheel exists (x86_64, Python <= 3.12); elsewhere the comparison
# tests skip, and say why.
ORT_TRAINING_VENV="$ROOT/.venv-ort-training"
if [ "$(uname -m)" = "x86_64" ] && "$PY" -c 'import sys; sys.exit(sys.version_info >= (3, 13))'; then
    WANT_OT="$(cat pyproject.toml | sha256sum | cut -d' ' -f1)"
    STAMP_OT="$ORT_TRAINING_VENV/.fleetlearn-installed"
    if [ ! -f "$STAMP_OT" ] || [ "$(cat "$STAMP_OT")" != "$WANT_OT" ]; then
        echo "==> installing the onnxruntime-training backend into .venv-ort-training (for comparisons)"
        rm -rf "$ORT_TRAINING_VENV"
        "$PY" -m venv "$ORT_TRAINING_VENV"
        # Every dependency of fleetlearn[sim] except onnxruntime, read from pyproject.toml.
        DEPS="$("$PY" - <<'PYEOF'
import re, tomllib
meta = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = meta["optional-dependencies"]
deps = list(meta["dependencies"]) + extras["sim"]
out = []
for dep in deps:
    name = re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0]
    if name == "fleetlearn":
        out += [d for extra in re.findall(r"\[(.*)\]", dep)[0].split(",") for d in extras[extra]]
    elif name != "onnxruntime":
        out.append(dep)
print("\n".join(out))
PYEOF
)"
        mapfile -t DEP_LIST <<< "$DEPS"
        "$ORT_TRAINING_VENV/bin/python" -m pip install --quiet --upgrade pip
        "$ORT_TRAINING_VENV/bin/python" -m pip install --quiet "onnxruntime-training-cpu==1.19.2" "${DEP_LIST[@]}"
        "$ORT_TRAINING_VENV/bin/python" -m pip install --quiet --no-deps -e .
        echo "$WANT_OT" > "$STAMP_OT"
    fi
    export FLEETLEARN_ORT_TRAINING_PYTHON="$ORT_TRAINING_VENV/bin/python"
    export FLEETLEARN_REQUIRE_ORT_TRAINING=1
fi
