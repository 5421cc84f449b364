#!/usr/bin/env bash
# Sets everything up and runs the whole test suite, slow scenarios included.
# Extra arguments go to pytest (e.g. scripts/test.sh -k codec).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"

# The wire tests start their own brokers on free ports (never the machine's services):
# Mosquitto, RabbitMQ's MQTT plugin and NATS' MQTT gateway; the TLS and deployment tests
# make certificates with openssl. Debian packages: install what is missing.
missing=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "$2" ]; }
have mosquitto /usr/sbin/mosquitto || missing+=(mosquitto)
have rabbitmq-server /usr/lib/rabbitmq/bin/rabbitmq-server || missing+=(rabbitmq-server)
have nats-server /usr/sbin/nats-server || missing+=(nats-server)
have openssl /usr/bin/openssl || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
        echo "==> installing ${missing[*]} (the wire tests run over real brokers)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "The wire tests need: ${missing[*]}. Install them with" >&2
        echo "  sudo apt-get install ${missing[*]}     (Debian/Ubuntu)" >&2
        echo "  brew install ${missing[*]}             (macOS; rabbitmq, nats-server)" >&2
        exit 2
    fi
fi

# The optional onnxruntime-training backend in its own venv, to compare against.
source "$(dirname "${BASH_SOURCE[0]}")/_ort_training_env.sh"

# The emulated aarch64 board (tests/edge_runtime/test_arm64.py): required wherever its tool is found.
for tool in "${FLEETLEARN_ARM64_TOOL:-}" "$ROOT/../shared/tools/arm64-python.sh" /work/shared/tools/arm64-python.sh; do
    if [ -n "$tool" ] && [ -f "$tool" ]; then
        export FLEETLEARN_ARM64_TOOL="$tool" FLEETLEARN_REQUIRE_ARM64=1
        break
    fi
done
if [ "${FLEETLEARN_REQUIRE_ARM64:-0}" != 1 ]; then
    echo "NOTE: no arm64-python.sh found: the emulated aarch64 tests will be skipped" >&2
fi

echo "==> ruff"
ruff check .
echo "==> mypy"
mypy
echo "==> pytest (fast and slow)"
exec python -m pytest -m "slow or not slow" "$@"
