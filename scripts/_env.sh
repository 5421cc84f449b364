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
    "$PY" -m venv .venv
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
