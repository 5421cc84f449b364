# Sourced by the quick-start scripts: creates .venv and installs fleetlearn with the
# development extras when pyproject.toml changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "fleetlearn needs Python 3.11 or newer (found: $("$PY" --version 2>&1))." >&2
    echo "Set PYTHON=/path/to/python3.11 and run again." >&2
    exit 2
fi
if [ ! -x .venv/bin/python ]; then
    echo "==> creating virtual environment in .venv"
    if ! "$PY" -m venv .venv; then
        rm -rf .venv
        if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
            echo "==> installing python3-venv"
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
            "$PY" -m venv .venv
        else
            echo "Could not create a virtual environment: install your Python's venv module" >&2
            echo "(Debian/Ubuntu: sudo apt-get install python3-venv) and run again." >&2
            exit 2
        fi
    fi
fi
STAMP=.venv/.fleetlearn-installed
WANT="$(cat pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "==> installing fleetlearn[dev] into .venv (first run takes a few minutes)"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[dev]"
    echo "$WANT" > "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
