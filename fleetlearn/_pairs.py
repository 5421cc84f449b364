"""``NAME:VALUE,NAME:VALUE`` settings (tier models, link bandwidths), parsed one way."""

from __future__ import annotations

from collections.abc import Sequence

from device_profiles import ConfigError


def named_pairs(text: str, *, what: str, names: Sequence[str], form: str,
                example: str) -> dict[str, str]:
    """``text`` as {name: value}, each name one of ``names`` and given once; ``form``
    (``TIER:MODEL``) and ``example`` go into the errors, which say how to write it."""
    key = form.partition(":")[0]
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition(":")
        name, value = name.strip(), value.strip()
        if not sep or not value:
            raise ConfigError(f"{what}: {part!r} is not {form} (e.g. {example})")
        if name not in names:
            raise ConfigError(f"{what}: unknown {key.lower()} {name!r}: write {form} pairs, "
                              f"{key} one of {', '.join(names)} (e.g. {example})")
        if name in out:
            raise ConfigError(f"{what}: {key.lower()} {name!r} given twice")
        out[name] = value
    if not out:
        raise ConfigError(f"{what}: empty (e.g. {example})")
    return out
