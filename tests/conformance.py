"""The protocol's reference files: docs/schemas/ and docs/vectors/, made by the code.

``python tests/conformance.py --write`` rewrites both folders from the implementation;
``--check`` (and tests/broker_bridge/test_schemas.py,
tests/broker_bridge/test_vectors.py) says whether they are still what the implementation
makes. The files are for agents in other languages:
docs/PROTOCOL.md section 10 says how to use them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_DIR = ROOT / "docs" / "schemas"
VECTOR_DIR = ROOT / "docs" / "vectors"

sys.path.insert(0, str(ROOT))


def dump_json(data: object) -> bytes:
    """How every reference JSON file is written (stable, diff-friendly)."""
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def schema_files() -> dict[str, bytes]:
    from broker_bridge import message_schemas

    return {f"{name}.schema.json": dump_json(schema)
            for name, schema in message_schemas().items()}


def vector_files() -> dict[str, bytes]:
    from vectors import make_vectors

    return make_vectors()


def differences(folder: Path, files: dict[str, bytes]) -> list[str]:
    """What differs between ``folder`` and ``files`` (missing, changed, extra)."""
    out = []
    for name, data in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            out.append(f"{name}: missing")
        elif path.read_bytes() != data:
            out.append(f"{name}: differs")
    if folder.is_dir():
        extra = sorted(p.name for p in folder.iterdir() if p.name not in files)
        out.extend(f"{name}: not made by the implementation" for name in extra)
    return out


def write(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():
        if stale.name not in files:
            stale.unlink()
    for name, data in files.items():
        (folder / name).write_bytes(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the files")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sets = [(SCHEMA_DIR, schema_files()), (VECTOR_DIR, vector_files())]
    if args.write:
        for folder, files in sets:
            write(folder, files)
            print(f"wrote {len(files)} files in {folder.relative_to(ROOT)}")
        return 0
    problems = [f"{folder.relative_to(ROOT)}/{p}" for folder, files in sets
                for p in differences(folder, files)]
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
