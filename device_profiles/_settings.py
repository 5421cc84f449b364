"""One settings mechanism for every fleetlearn command: flags > environment > file > defaults.

A *section* (``aggregator``, ``agent``, ``simulate``) is made of typed frozen
dataclasses. Each field is a setting; its type, default and metadata (``setting(...)``:
help, choices, secret, flag name...) give, with no table kept anywhere else:

- the command-line flag ``--name-with-dashes`` (or the ``flag`` override);
- the environment variable ``FLEETLEARN_<SECTION>_<NAME>`` (plus ``env`` aliases, and
  ``FLEETLEARN_<NAME>`` for a section with a ``legacy_env_prefix``: the agent's old names);
- the key ``name`` in the section's table of the TOML file (``[aggregator]`` ...), or
  ``key`` in the sub-table ``table`` (``[agent.tls] ca``); the flat name is accepted too.

A field whose type is itself a dataclass is a *group* (``group(...)``): its fields are
settings of the section, in the sub-table named by the group. A ``Mapping`` field made
with ``overrides(...)`` holds settings of another dataclass given one by one
(``[simulate.aggregator]``, ``FLEETLEARN_SIMULATE_AGGREGATOR_<NAME>``, ``--aggregator
NAME=VALUE``). The file is ``--config FILE`` or ``$FLEETLEARN_CONFIG``: either one table
per section, or (older files) one section's settings at the top level.

Every value is converted and checked once; a bad one is a ``ConfigError`` naming the
setting and its source (``FLEETLEARN_AGGREGATOR_ROUNDS='x' (environment): not an
integer``), and so is a dataclass's own check (its message gets the sources of the
settings it names). Unknown keys in a file are errors; unknown ``FLEETLEARN_*``
variables are warned about.

This module declares settings (``setting``, ``group``, ``overrides``, ``Meta``) and
converts values; ``_settings_section`` resolves a ``Section`` from the sources;
``_settings_cli`` turns a section into argparse flags and prints a resolved
configuration (``fleetlearn config show``).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import stat
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from device_profiles._errors import ConfigError

log = logging.getLogger(__name__)

CONFIG_ENV = "FLEETLEARN_CONFIG"
SECTION_NAMES = ("aggregator", "agent", "simulate", "edge")
"""The tables of a fleetlearn configuration file, one per command."""
OTHER_ENV: dict[str, str] = {
    CONFIG_ENV: "the configuration file of every command (like --config)",
    "FLEETLEARN_CACHE_DIR": "datasets and reference artifacts cache",
    "FLEETLEARN_ARM64_TOOL": "tests: the aarch64 emulation script",
    "FLEETLEARN_ARM64_VENV": "tests: where the emulated aarch64 venv is kept",
    "FLEETLEARN_REQUIRE_ARM64": "tests: fail instead of skipping the aarch64 tests",
    "FLEETLEARN_ORT_TRAINING_PYTHON": "tests: the interpreter with onnxruntime-training",
    "FLEETLEARN_REQUIRE_ORT_TRAINING": "tests: fail instead of skipping those tests",
}
"""``FLEETLEARN_*`` variables that are not settings of a section, and what reads them."""

SETTING = "fleetlearn.setting"
"""The ``dataclasses.field`` metadata key holding a field's ``Meta``."""


@dataclass(frozen=True, kw_only=True)
class Meta:
    """What the mechanism needs to know about one setting beyond its type and default."""

    help: str = ""
    choices: tuple[str, ...] | None = None
    secret: bool = False
    """Never printed (``config show`` says ``<secret>``), never in ``repr``."""
    flag: str | None = None
    """Flag override (``--holdout``); default ``--`` + the name with dashes."""
    no_flag: bool = False
    """No command-line flag (a secret that ``ps`` would show to every user)."""
    const_flags: tuple[tuple[str, Any], ...] = ()
    """Extra flags that set a constant (``("--quiet", False)`` for ``progress``)."""
    env: tuple[str, ...] = ()
    """Extra environment variable names (aliases) read after the canonical one."""
    table: str | None = None
    """TOML sub-table of the section (``tls`` for ``[agent.tls]``)."""
    key: str | None = None
    """TOML key in ``table`` (``ca`` for ``tls_ca``); default the setting's name."""
    metavar: str | None = None
    group: str | None = None
    """Heading the flag is listed under in ``--help``."""
    example: Any = None
    """A valid value other than the default (documentation and tests)."""
    parse: Callable[[Any], Any] | None = None
    """Custom conversion of a raw value (string or TOML value); raises ValueError."""
    show: Callable[[Any], Any] | None = None
    """The value as TOML data (for ``config show``), when it is not a plain scalar."""
    alternative_to: str | None = None
    """Another setting giving the same thing (``password`` / ``password_file``): when both
    are set the stronger source wins; from the same source it is an error."""
    internal: bool = False
    """Not a setting (a derived value)."""
    fields: Mapping[str, Meta] = dataclasses.field(default_factory=dict)
    """For a group: the metadata of the group dataclass's fields, when that class does not
    carry its own (it belongs to another module)."""
    overrides: type | None = None
    """For an ``overrides`` mapping: the dataclass whose settings it holds."""
    shortcuts: tuple[str, ...] = ()
    """For an ``overrides`` mapping: those of its settings that get a flag of their own."""
    exclude: tuple[str, ...] = ()
    """For an ``overrides`` mapping: settings it may not hold (the section owns them)."""


def setting(default: Any = dataclasses.MISSING, *,
            default_factory: Any = dataclasses.MISSING, **meta: Any) -> Any:
    """A dataclass field that is a setting (see ``Meta`` for the keywords)."""
    m = Meta(**meta)
    return field(default=default, default_factory=default_factory,
                 metadata={SETTING: m}, repr=not m.secret)


def internal(default: Any = dataclasses.MISSING, *,
             default_factory: Any = dataclasses.MISSING, repr: bool = True) -> Any:
    """A dataclass field that no source sets (derived values)."""
    return field(default=default, default_factory=default_factory, repr=repr,
                 metadata={SETTING: Meta(internal=True)})


def group(default_factory: Callable[[], Any], *, table: str, group: str | None = None,
          fields: Mapping[str, Meta | str] | None = None) -> Any:
    """A field holding a dataclass whose fields are settings in the sub-table ``table``.
    ``fields`` gives their metadata (a string is the help text) when the class has none."""
    metas = {k: (v if isinstance(v, Meta) else Meta(help=v)) for k, v in (fields or {}).items()}
    return field(default_factory=default_factory,
                 metadata={SETTING: Meta(table=table, group=group, fields=metas)})


def overrides(of: type, *, help: str, shortcuts: tuple[str, ...] = (),
              exclude: tuple[str, ...] = (), group: str | None = None) -> Any:
    """A ``dict`` field of settings of the dataclass ``of``, each given one by one."""
    return field(default_factory=dict, metadata={SETTING: Meta(
        help=help, overrides=of, shortcuts=shortcuts, exclude=exclude, group=group)})


# --------------------------------------------------------------------------- types


@dataclass(frozen=True)
class Kind:
    """A setting's value type: ``str``, ``int``, ``float``, ``bool``, ``path``, ``custom``."""

    base: str
    optional: bool = False
    choices: tuple[str, ...] | None = None


def kind_of(hint: Any, meta: Meta, where: str) -> Kind:
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    optional = False
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        if len(rest) != 1 and meta.parse is None:
            raise TypeError(f"{where}: the settings mechanism cannot parse {hint}")
        hint = rest[0]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if meta.parse is not None:
        return Kind("custom", optional, meta.choices)
    if origin is Literal:
        return Kind("str", optional, tuple(str(a) for a in args))
    for base, name in ((bool, "bool"), (int, "int"), (float, "float"), (str, "str"),
                       (Path, "path")):
        if hint is base:
            return Kind(name, optional, meta.choices)
    raise TypeError(f"{where}: the settings mechanism cannot parse {hint}")


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def convert(kind: Kind, raw: Any, parse: Callable[[Any], Any] | None = None) -> Any:
    """``raw`` (a string from a flag or the environment, or a TOML value) as ``kind``;
    ValueError says what is wrong with it."""
    if kind.optional and (raw is None or (isinstance(raw, str)
                                          and raw.strip().lower() == "none")):
        return None
    if raw is None:
        raise ValueError("a value is required")
    if kind.base == "custom":
        assert parse is not None
        try:
            return parse(raw)
        except (TypeError, ConfigError) as exc:
            raise ValueError(str(exc)) from exc
    if kind.base == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower() if isinstance(raw, str) else None
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError("expected true or false")
    if kind.base == "int":
        if isinstance(raw, bool) or not isinstance(raw, int | str):
            raise ValueError("not an integer")
        try:
            return int(raw)
        except ValueError:
            raise ValueError("not an integer") from None
    if kind.base == "float":
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise ValueError("not a number")
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("not a number") from None
        if not math.isfinite(value):
            raise ValueError("not a finite number")
        return value
    if kind.base == "path":
        if not isinstance(raw, str | os.PathLike) or not str(raw):
            raise ValueError("expected a path")
        return Path(os.path.expanduser(str(raw)))
    if not isinstance(raw, str):
        raise ValueError("expected a string")
    if kind.choices is not None and raw not in kind.choices:
        raise ValueError(f"not one of {', '.join(kind.choices)}")
    return raw


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class Spec:
    """One setting of a section, with every name it goes by."""

    name: str
    """Unique in the section: the field name, or ``field.sub`` inside an overrides map."""
    owner: type
    path: tuple[str, ...]
    """Attribute path in ``owner``: ``("rounds",)``, ``("faults", "crash_fraction")``."""
    kind: Kind
    meta: Meta
    default: Any
    """The default value, or ``REQUIRED``, or ``UNSET`` (an overrides entry)."""
    env: tuple[str, ...]
    flag: str | None
    table: str | None
    key: str
    fallback: Any = None
    """An overrides entry: the default of the setting it overrides (for ``--help``)."""

    @property
    def location(self) -> str:
        return f"[{self.table}] {self.key}" if self.table else self.key


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


REQUIRED = _Marker("REQUIRED")
UNSET = _Marker("UNSET")


@dataclass(frozen=True)
class Source:
    """Where a value came from: ``default``, ``file``, ``env`` or ``flag``."""

    kind: Literal["default", "file", "env", "flag"]
    detail: str = ""

    def __str__(self) -> str:
        if self.kind == "default":
            return self.detail or "default"
        label = {"file": "file", "env": "env", "flag": "flag"}[self.kind]
        return f"{label} {self.detail}"


# --------------------------------------------------------------------------- files, env


_SECTIONS: dict[str, Any] = {}
"""Section name -> ``_settings_section.Section`` (each registers itself when made)."""


def registered_sections() -> dict[str, Any]:
    """The sections created so far (each package creates its own on import)."""
    return dict(_SECTIONS)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


_warned: set[str] = set()


def warn_unknown_environment(env: Mapping[str, str]) -> list[str]:
    """Warn (once per name) about ``FLEETLEARN_*`` variables no setting reads; returns
    the names found. A variable of a section not loaded in this process is left alone."""
    sections = registered_sections()
    known = set(OTHER_ENV)
    for sec in sections.values():
        known |= sec.env_names()
    unknown = []
    for name in env:
        if not name.startswith("FLEETLEARN_") or name in known:
            continue
        owner = next((n for n in SECTION_NAMES if name.startswith(f"FLEETLEARN_{n.upper()}_")),
                     None)
        if (owner is None and len(sections) < len(SECTION_NAMES)) or (
                owner is not None and owner not in sections):
            continue  # it may belong to a section this process did not load
        unknown.append(name)
        if name not in _warned:
            _warned.add(name)
            close = difflib.get_close_matches(name, sorted(known), n=1)
            log.warning("environment variable %s is not a fleetlearn setting: ignored%s", name,
                        f" (did you mean {close[0]}?)" if close else "")
    return unknown


def warn_if_readable(path: Path, name: str) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("%s holds the secret %s but other users may read it (chmod 600 %s)",
                    path, name, path)


def unknown_key(what: str, path: Path, known: Iterable[str], key: str) -> str:
    """The message for a key no setting has, with the closest one."""
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{path}: unknown setting {what}{hint}"
