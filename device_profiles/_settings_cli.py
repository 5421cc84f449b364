"""The command-line side of the settings mechanism (``_settings``).

- ``add_section_flags``: one flag per setting of a section, under the headings its
  metadata gives, defaults and choices in the help; ``flag_values`` reads back only the
  flags given (and which spelling gave each, for ``config show``).
- ``show_text`` / ``show_toml``: a resolved configuration as an aligned table with the
  source of every value, or as a TOML file that reproduces it. Secrets are never written.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from device_profiles._errors import ConfigError
from device_profiles._profile import _toml_key, _toml_string, _toml_value
from device_profiles._settings import CONFIG_ENV, REQUIRED, UNSET, Spec
from device_profiles._settings_section import Resolved, Section

_PREFIX = "setting:"


def _dest(name: str) -> str:
    return _PREFIX + name


class _Given(argparse.Action):
    """Store ``(value, the flag as typed)``: ``config show`` names the flag used."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        value = self.const if self.nargs == 0 else values
        setattr(namespace, self.dest, (value, option_string or self.dest))


class _GivenBool(argparse.BooleanOptionalAction):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        assert option_string is not None
        setattr(namespace, self.dest, (not option_string.startswith("--no-"), option_string))


class _GivenPairs(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        items = list(getattr(namespace, self.dest, None) or [])
        items.append((values, option_string))
        setattr(namespace, self.dest, items)


def add_config_flag(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """``--config FILE`` (the value goes to ``args.config_file``)."""
    parser.add_argument(
        "--config", dest="config_file", metavar="FILE",
        default=argparse.SUPPRESS if suppress else None,
        help=f"configuration file (TOML; default ${CONFIG_ENV})")


def display(value: Any) -> str:
    """A value as ``config show`` and ``--help`` write it (TOML-like; None is ``none``)."""
    if value is None:
        return "none"
    if isinstance(value, Path):
        return _toml_string(str(value))
    if isinstance(value, bool | int | float | str):
        return _toml_value(value)
    return str(value)


class _Paragraphs(argparse.HelpFormatter):
    """Wraps description and epilog paragraph by paragraph (blank lines kept)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(textwrap.fill(" ".join(p.split()), width, initial_indent=indent,
                                          subsequent_indent=indent)
                            for p in text.split("\n\n"))


def _help(spec: Spec) -> str:
    text = spec.meta.help.rstrip(".")
    if spec.default is REQUIRED:
        text += " (required)"
    elif spec.default is UNSET:
        text += f" ({spec.table} setting; default: {display(spec.fallback)})"
    elif (spec.default is not None and not spec.meta.secret and "default" not in text):
        text += f" (default: {display(spec.default)})"
    return text.replace("%", "%%")


def _metavar(spec: Spec) -> str:
    if spec.meta.metavar:
        return spec.meta.metavar
    if spec.kind.choices:
        return "{" + ",".join(spec.kind.choices) + "}"
    return {"int": "N", "float": "X", "path": "PATH", "bool": "{true,false,none}"}.get(
        spec.kind.base, "VALUE")


def add_section_flags(parser: argparse.ArgumentParser, section: Section, *,
                      skip: Iterable[str] = ()) -> None:
    """A flag for every setting of ``section`` that has one (all but ``no_flag`` ones)."""
    skipped = set(skip)
    headings: dict[str, Any] = {}
    parser.formatter_class = _Paragraphs
    # No abbreviations: "--password x" must not be taken for "--password-file x" (whose
    # error would print the password as a path), nor a typo for some other flag.
    parser.allow_abbrev = False
    if parser.usage is None:
        parser.usage = "%(prog)s [--config FILE] [options]"

    def target(title: str | None) -> Any:
        if title is None:
            return parser
        if title not in headings:
            headings[title] = parser.add_argument_group(title)
        return headings[title]

    for spec in section.specs:
        if spec.name in skipped:
            continue
        where = target(spec.meta.group)
        if spec.flag is not None:
            if spec.kind.base == "bool" and not spec.kind.optional:
                where.add_argument(spec.flag, dest=_dest(spec.name), action=_GivenBool,
                                   default=argparse.SUPPRESS, help=_help(spec))
            else:
                where.add_argument(spec.flag, dest=_dest(spec.name), action=_Given,
                                   metavar=_metavar(spec), default=argparse.SUPPRESS,
                                   help=_help(spec))
        for flag, const in spec.meta.const_flags:
            same = (f"--no-{spec.flag[2:]}" if const is False and spec.flag else
                    f"{spec.flag} {display(const)}")
            where.add_argument(flag, dest=_dest(spec.name), action=_Given, nargs=0,
                               const=const, default=argparse.SUPPRESS, help=f"same as {same}")
    for name, meta in section.override_fields().items():
        target(meta.group).add_argument(
            f"--{name.replace('_', '-')}", dest=_dest(name), action=_GivenPairs,
            metavar="NAME=VALUE", default=argparse.SUPPRESS,
            help=meta.help.replace("%", "%%") + " (repeatable)")


def flag_values(args: argparse.Namespace, section: Section
                ) -> tuple[dict[str, Any], dict[str, str]]:
    """The flags given on the command line: setting -> raw value, setting -> flag text."""
    ns = vars(args)
    values: dict[str, Any] = {}
    names: dict[str, str] = {}
    for spec in section.specs:
        given = ns.get(_dest(spec.name))
        if given is not None:
            values[spec.name], names[spec.name] = given
    for name, meta in section.override_fields().items():
        for pair, flag in ns.get(_dest(name)) or ():
            key, sep, raw = str(pair).partition("=")
            key = key.strip().replace("-", "_")
            if not sep or not key:
                raise ConfigError(f"{flag} {pair!r}: expected NAME=VALUE")
            if key in meta.exclude:
                raise ConfigError(f"{flag} {pair!r}: {section.name} sets {key} itself "
                                  f"(use its own setting {key})")
            full = f"{name}.{key}"
            try:
                section.spec(full)
            except ConfigError:
                raise ConfigError(f"{flag} {pair!r}: unknown setting {key!r}") from None
            values[full], names[full] = raw, f"{flag} {key}="
    return values, names


def epilog(section: Section) -> str:
    """How the other sources name the flags above (for ``--help``)."""
    no_flag = [s for s in section.specs if s.flag is None and s.default is not UNSET]
    lines = [
        f"Every flag --NAME is also the environment variable {section.env_prefix}NAME "
        f"(upper case, dashes as _) and the key NAME in the [{section.name}] table of the "
        f"--config file (${CONFIG_ENV}). Precedence: flags > environment > file > defaults. "
        "'none' unsets an optional value. "
        f"`fleetlearn config show {section.name}` prints the result and the source of "
        "every value.",
    ]
    tables: dict[str, list[str]] = {}
    for spec in section.specs:
        if spec.table is not None and spec.default is not UNSET:
            tables.setdefault(spec.table, []).append(
                spec.key if spec.key == spec.name else f"{spec.key} ({spec.flag})")
    if tables:
        lines.append("Sub-tables of the file: " + "; ".join(
            f"[{section.name}.{t}] holds {', '.join(keys)}" for t, keys in tables.items())
            + " (the flat NAME works too).")
    for name, meta in section.override_fields().items():
        flag = f"--{name.replace('_', '-')}"
        lines.append(
            f"{flag} NAME=VALUE is also {section.env_prefix}{name.upper()}_NAME and the key "
            f"NAME of [{section.name}.{name}]"
            + (f"; {section.name} sets {', '.join(meta.exclude)} itself." if meta.exclude
               else "."))
    if section.legacy_env_prefix:
        lines.append(f"The older names {section.legacy_env_prefix}NAME are read too.")
    for spec in no_flag:
        lines.append(f"{spec.name} ({spec.meta.help.rstrip('.')}) has no flag, since `ps` "
                     f"shows every process's arguments to every user: use "
                     f"{' or '.join(spec.env)}, or the key {spec.key} of the file.")
    return "\n\n".join(lines).replace("%", "%%")


# --------------------------------------------------------------------------- config show


def _toml(value: Any) -> str:
    """A TOML value; a table inside a table is written inline."""
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(str(k))} = {_toml(v)}"
                               for k, v in value.items()) + "}"
    return _toml_value(value)


def _value_for_toml(spec: Spec, value: Any) -> Any:
    if spec.meta.show is not None:
        return spec.meta.show(value)
    if isinstance(value, Path):
        return str(value)
    return value


def show_text(resolved: Sequence[Resolved]) -> str:
    """Each section's settings: value and source (secrets as ``<secret>``)."""
    out: list[str] = []
    for res in resolved:
        head = f"[{res.section.name}]"
        if res.file is not None:
            head += f"  config file from {res.file}"
        out.append(head)
        rows: list[tuple[str, str, str]] = []
        for spec in res.section.specs:
            if spec.default is UNSET and not res.given(spec.name):
                continue
            name = spec.name if spec.key in (spec.name, spec.name.split(".")[-1]) else (
                f"{spec.name} ({spec.table}.{spec.key})")
            if spec.name not in res.values:
                value = "(required, not set)"
            elif spec.meta.secret and res.values[spec.name] is not None:
                value = "<secret>"
            else:
                value = display(_value_for_toml(spec, res.values[spec.name]))
            rows.append((name, value, str(res.sources[spec.name])))
        width = max(len(r[0]) for r in rows)
        vwidth = min(max(len(r[1]) for r in rows), 40)
        out.extend(f"  {n.ljust(width)}  {v.ljust(vwidth)}  {s}" for n, v, s in rows)
        out.append("")
    return "\n".join(out)


def show_toml(resolved: Sequence[Resolved]) -> str:
    """A configuration file that gives the same values (secrets left out, as comments)."""
    out = ["# fleetlearn configuration (fleetlearn config show --format toml)"]
    for res in resolved:
        top: list[str] = []
        tables: dict[str, list[str]] = {}
        for spec in res.section.specs:
            lines = top if spec.table is None else tables.setdefault(spec.table, [])
            key = spec.key if spec.table is not None else spec.name
            if spec.default is UNSET and not res.given(spec.name):
                continue
            if spec.name not in res.values:
                lines.append(f"# {_toml_key(key)}: required, not set")
                continue
            value = res.values[spec.name]
            if spec.meta.secret and value is not None:
                lines.append(f"# {_toml_key(key)}: set from {res.sources[spec.name]}, "
                             "not written (a secret)")
                continue
            if value is None:
                if spec.default is not None:
                    lines.append(f'{_toml_key(key)} = "none"')
                continue
            data = _value_for_toml(spec, value)
            if isinstance(data, Mapping):
                tables.setdefault(spec.name, []).extend(
                    f"{_toml_key(k)} = {_toml(v)}" for k, v in data.items())
                continue
            lines.append(f"{_toml_key(key)} = {_toml(data)}")
        out += ["", f"[{res.section.name}]", *top]
        for table, lines in tables.items():
            if lines:
                out += ["", f"[{res.section.name}.{table}]", *lines]
    return "\n".join(out) + "\n"


def show_config(resolved: Sequence[Resolved], *, format: str = "text") -> str:
    """``config show``: ``text`` (values and their sources) or ``toml`` (a file)."""
    if format == "toml":
        return show_toml(resolved)
    if format != "text":
        raise ConfigError(f"unknown format {format!r}: text or toml")
    return show_text(resolved)
