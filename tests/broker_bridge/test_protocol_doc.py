"""docs/PROTOCOL.md says what the code does: its field tables are the JSON Schemas in
words, its ack-code table is ``broker_bridge._acks``, its links lead to files that exist.

Each field table follows a ``<!-- fields: NAME -->`` marker (NAME = a schema of
docs/schemas/), the code table a ``<!-- codes -->`` marker.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from broker_bridge import IDENTITY, AckCode, may_retry, message_schemas

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "PROTOCOL.md").read_text()
SCHEMAS = message_schemas()
U32 = 2**32 - 1


def table_after(marker: str) -> list[list[str]]:
    """The rows (cells, stripped) of the markdown table right after ``marker``."""
    start = DOC.index(marker) + len(marker)
    rows = []
    for line in DOC[start:].lstrip("\n").splitlines():
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        rows.append([c.replace("\\|", "|") for c in cells])
    assert len(rows) > 2, f"no table after {marker}"
    return rows[2:]  # without the header and its rule


def doc_type(prop: dict[str, Any]) -> str:
    types = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
    base = types[0]
    if base == "array":
        base = f"array of {prop['items']['type']}"
    return " | ".join([base, *types[1:]])


def doc_default(value: Any) -> str:
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, dict | list):
        return f"`{json.dumps(value)}`"
    return str(value)


def bound_words(prop: dict[str, Any]) -> list[str]:
    """Words the bounds cell must contain."""
    words = [f"`{v}`" for v in prop.get("enum", [])]
    lo, hi = prop.get("minimum"), prop.get("maximum")
    if (lo, hi) == (0, U32):
        words.append("u32")
    elif hi is not None and hi < 2**53 - 1:
        words.append(f"{lo}-{hi}")
    elif lo is not None and lo > -(2**53 - 1):
        words.append(f">= {lo}")
    if "exclusiveMinimum" in prop:
        words.append(f"> {prop['exclusiveMinimum']}")
    if prop.get("pattern") == "^[0-9a-f]{64}$":
        words.append("sha256 hex")
    elif "pattern" in prop and "\\u007f" not in prop["pattern"]:
        words.append(prop["pattern"])
    if "maxLength" in prop:
        words.append(str(prop["maxLength"]))
    items = prop.get("items", {})
    if (items.get("minimum"), items.get("maximum")) == (0, U32):
        words.append("items u32")
    return words


def test_every_schema_has_a_field_table_that_matches_it() -> None:
    for name, schema in SCHEMAS.items():
        rows = table_after(f"<!-- fields: {name} -->")
        props = schema["properties"]
        assert [r[0] for r in rows] == [f"`{p}`" for p in props], name
        for row in rows:
            field, typ, required, default, bounds = row[:5]
            prop = props[field.strip("`")]
            assert typ == doc_type(prop), (name, field, typ)
            assert required == ("yes" if field.strip("`") in schema["required"] else "no")
            if required == "no":
                assert default == doc_default(prop["default"]), (name, field, default)
            for word in bound_words(prop):
                assert word in bounds, (name, field, word, bounds)


def test_the_ack_code_table_is_the_code() -> None:
    rows = table_after("<!-- codes -->")
    codes = {r[0].strip("`"): r for r in rows if r[0].startswith("`")}
    assert set(codes) == {c.value for c in AckCode}
    for code, row in codes.items():
        if code == AckCode.ALREADY_COUNTED:
            assert row[1:3] == ["duplicate", "-"]
        elif code in IDENTITY:  # not judged: nothing of the device's round changes
            assert row[1:3] == ["rejected", "not judged"], code
            assert not may_retry(code)
        else:
            assert row[1:3] == ["rejected", "yes" if may_retry(code) else "no"], code


def test_links_into_docs_lead_to_files() -> None:
    for target in re.findall(r"\]\(((?:schemas|vectors)/[^)#]*)\)", DOC):
        assert (ROOT / "docs" / target).exists(), target
    for name in SCHEMAS:
        assert f"schemas/{name}.schema.json" in DOC, name


def test_section_8_names_every_key_of_a_portable_manifest() -> None:
    manifest = json.loads((ROOT / "docs" / "vectors" / "tiny_artifacts.json").read_text())
    section = DOC[DOC.index("## 8. Models and artifacts"):DOC.index("## 9. Exchanges")]
    for key in manifest:
        assert f"`{key}`" in section, key
    for key in [*manifest["train"], *manifest["eval"]]:
        assert f"`{key}" in section, key  # `state[j].in` names `state`
