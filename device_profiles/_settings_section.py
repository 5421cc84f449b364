"""Sections and their resolution: flags > environment > file > defaults (see ``_settings``).

``Section`` collects the settings of a command's dataclasses and resolves them from the
four sources into a ``Resolved`` (every value with its ``Source``), which builds the
dataclasses; a file is read by ``_from_file`` (one table per section, or an older file
with one section's settings at the top level), and ``warn_unknown_environment`` names the
``FLEETLEARN_*`` variables no setting reads.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_profiles._errors import ConfigError
from device_profiles._settings import (
    _SECTIONS,
    CONFIG_ENV,
    REQUIRED,
    SECTION_NAMES,
    SETTING,
    UNSET,
    Meta,
    Source,
    Spec,
    convert,
    kind_of,
    read_toml,
    unknown_key,
    warn_if_readable,
    warn_unknown_environment,
)

_RANK = {"default": 0, "file": 1, "env": 2, "flag": 3}


class Section:
    """The settings of one command, from one or more dataclasses (see the module doc)."""

    def __init__(self, name: str, *classes: type, legacy_env_prefix: str | None = None,
                 title: str = "") -> None:
        self.name = name
        self.title = title or name
        self.classes = classes
        self.env_prefix = f"FLEETLEARN_{name.upper()}_"
        self.legacy_env_prefix = legacy_env_prefix
        specs: list[Spec] = []
        for cls in classes:
            specs.extend(self._specs_of(cls))
        self.specs: tuple[Spec, ...] = tuple(specs)
        self._by_name = {s.name: s for s in specs}
        if len(self._by_name) != len(specs):
            raise TypeError(f"section {name}: two settings share a name")
        self._by_location: dict[tuple[str | None, str], Spec] = {}
        for s in specs:
            for loc in {(s.table, s.key), (None, s.name)}:
                if loc in self._by_location:
                    raise TypeError(f"section {name}: two settings at {loc}")
                self._by_location[loc] = s
        self.tables = {s.table for s in specs if s.table}
        self._excluded = {name: meta.exclude for name, meta in self.override_fields().items()}
        _SECTIONS[name] = self

    # -- building the specs

    def _env_names(self, name: str, meta: Meta, *, legacy: bool = True) -> tuple[str, ...]:
        upper = re.sub(r"[^A-Z0-9]", "_", name.upper())
        names = [self.env_prefix + upper, *meta.env]
        if legacy and self.legacy_env_prefix is not None:
            names.append(self.legacy_env_prefix + upper)
        return tuple(dict.fromkeys(names))

    def _specs_of(self, cls: type, prefix: tuple[str, ...] = (),
                  group_meta: Meta | None = None, owner: type | None = None) -> list[Spec]:
        hints = typing.get_type_hints(cls)
        out: list[Spec] = []
        for f in dataclasses.fields(cls):
            meta = f.metadata.get(SETTING)
            if meta is None and group_meta is not None:
                meta = group_meta.fields.get(f.name)
            if meta is None:
                meta = Meta()
            if meta.internal:
                continue
            where = f"{cls.__name__}.{f.name}"
            if meta.overrides is not None:
                out.extend(self._override_specs(cls, f.name, meta))
                continue
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint) and meta.parse is None:
                if meta.table is None:
                    raise TypeError(f"{where}: a group needs a table (use group(...))")
                out.extend(self._specs_of(hint, (*prefix, f.name), meta,  # type: ignore[arg-type]
                                          owner or cls))
                continue
            if group_meta is not None:
                meta = dataclasses.replace(meta, table=meta.table or group_meta.table,
                                           group=meta.group or group_meta.group)
            default = _default_of(f)
            out.append(Spec(
                name=f.name, owner=owner or cls, path=(*prefix, f.name),
                kind=kind_of(hint, meta, where),
                meta=meta, default=default, env=self._env_names(f.name, meta),
                flag=None if meta.no_flag else (meta.flag or "--" + f.name.replace("_", "-")),
                table=meta.table, key=meta.key or f.name,
            ))
        return out

    def _override_specs(self, cls: type, name: str, meta: Meta) -> list[Spec]:
        target = meta.overrides
        assert target is not None
        hints = typing.get_type_hints(target)
        out = []
        for f in dataclasses.fields(target):
            sub = f.metadata.get(SETTING) or Meta()
            if sub.internal or f.name in meta.exclude:
                continue
            full = f"{name}.{f.name}"
            flag = "--" + f.name.replace("_", "-") if f.name in meta.shortcuts else None
            out.append(Spec(
                name=full, owner=cls, path=(name, f.name),
                kind=kind_of(hints[f.name], sub, f"{target.__name__}.{f.name}"),
                meta=dataclasses.replace(sub, table=name, key=f.name,
                                         group=meta.group, no_flag=flag is None, flag=flag,
                                         const_flags=(), env=()),
                default=UNSET, env=self._env_names(full, Meta(), legacy=False), flag=flag,
                table=name, key=f.name, fallback=_default_of(f),
            ))
        return out

    # -- lookups

    def spec(self, name: str) -> Spec:
        try:
            return self._by_name[name]
        except KeyError:
            raise ConfigError(f"unknown {self.name} setting {name!r}") from None

    def override_fields(self) -> dict[str, Meta]:
        """Overrides mappings of this section: field name -> its metadata."""
        out = {}
        for cls in self.classes:
            for f in dataclasses.fields(cls):
                meta = f.metadata.get(SETTING)
                if meta is not None and meta.overrides is not None:
                    out[f.name] = meta
        return out

    def env_names(self) -> set[str]:
        return {name for s in self.specs for name in s.env}

    # -- the command line (``_settings_cli``)

    def add_flags(self, parser: Any, *, skip: Iterable[str] = (), config: bool = True) -> None:
        """Add ``--config FILE`` and a flag per setting to an argparse parser."""
        from device_profiles._settings_cli import add_config_flag, add_section_flags

        if config:
            add_config_flag(parser)
        add_section_flags(parser, self, skip=skip)

    def flag_values(self, args: Any) -> tuple[dict[str, Any], dict[str, str]]:
        """The flags given: setting -> raw value, setting -> the flag as typed."""
        from device_profiles._settings_cli import flag_values

        return flag_values(args, self)

    def epilog(self) -> str:
        """For ``--help``: how the environment and the file name the same settings."""
        from device_profiles._settings_cli import epilog

        return epilog(self)

    def from_args(self, args: Any, *, env: Mapping[str, str] | None = None) -> Resolved:
        """Resolve with the flags parsed into ``args`` (and its ``--config``)."""
        flags, names = self.flag_values(args)
        return self.resolve(flags=flags, flag_names=names, env=env,
                            config_file=getattr(args, "config_file", None))

    # -- resolving

    def resolve(self, *, flags: Mapping[str, Any] | None = None,
                env: Mapping[str, str] | None = None,
                config_file: str | os.PathLike[str] | None = None,
                flag_names: Mapping[str, str] | None = None) -> Resolved:
        """Merge flags > environment > file > defaults, converting every value.

        ``flags`` maps setting names to raw values (None: not given); ``flag_names`` says
        which flag gave each (default: the setting's own). ``config_file`` (else
        ``$FLEETLEARN_CONFIG``) is the TOML file.
        """
        env = os.environ if env is None else env
        warn_unknown_environment(env)
        values: dict[str, Any] = {}
        sources: dict[str, Source] = {}
        for s in self.specs:
            if s.default is not REQUIRED and s.default is not UNSET:
                values[s.name] = s.default
            sources[s.name] = Source("default")
        file_source: Source | None = None
        path = config_file if config_file is not None else (env.get(CONFIG_ENV) or None)
        if path is not None:
            file_source = (Source("flag", f"--config {path}") if config_file is not None
                           else Source("env", f"{CONFIG_ENV}={path}"))
            for spec, raw, where in self._from_file(Path(path)):
                values[spec.name] = self._convert(spec, raw, f"{spec.location} = "
                                                             f"{_shown(spec, raw)} in {where}")
                sources[spec.name] = Source("file", where)
        for s in self.specs:
            for var in s.env:
                raw = env.get(var)
                if raw is None or raw == "":
                    continue
                values[s.name] = self._convert(s, raw, f"{var}={_shown(s, raw)} (environment)")
                sources[s.name] = Source("env", var)
                break
        for name, raw in (flags or {}).items():
            if raw is None:
                continue
            s = self.spec(name)
            flag = (flag_names or {}).get(name) or s.flag or f"--{name}"
            sep = "" if flag.endswith("=") else " "  # --aggregator lr='x'
            values[name] = self._convert(s, raw, f"{flag}{sep}{_shown(s, raw)} (flag)")
            sources[name] = Source("flag", flag.rstrip("="))
        self._settle_alternatives(values, sources)
        return Resolved(section=self, values=values, sources=sources, file=file_source)

    def _convert(self, spec: Spec, raw: Any, where: str) -> Any:
        try:
            return convert(spec.kind, raw, spec.meta.parse)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from exc

    def _settle_alternatives(self, values: dict[str, Any], sources: dict[str, Source]) -> None:
        for s in self.specs:
            other = s.meta.alternative_to
            if other is None or sources[s.name].kind == "default":
                continue
            mine, theirs = sources[s.name], sources[other]
            if theirs.kind == "default":
                continue
            if _RANK[mine.kind] == _RANK[theirs.kind]:
                raise ConfigError(f"{s.name} ({mine}) and {other} ({theirs}) are both given: "
                                  "give one of them")
            loser = other if _RANK[mine.kind] > _RANK[theirs.kind] else s.name
            winner = s.name if loser == other else other
            values.pop(loser, None)
            sources[loser] = Source("default", f"unused: {winner} from {sources[winner]} "
                                               f"wins over {sources[loser]}")
            spec = self._by_name[loser]
            if spec.default is not REQUIRED and spec.default is not UNSET:
                values[loser] = spec.default

    def _from_file(self, path: Path) -> list[tuple[Spec, Any, str]]:
        data = read_toml(path)
        unified = any(k in SECTION_NAMES and isinstance(v, dict) for k, v in data.items())
        if unified:
            for key, value in data.items():
                if key not in SECTION_NAMES or not isinstance(value, dict):
                    raise ConfigError(
                        f"{path}: unknown top-level key {key!r}: a fleetlearn configuration "
                        f"file holds the tables {', '.join(f'[{n}]' for n in SECTION_NAMES)}")
            table = data.get(self.name, {})
            label = f"{path} [{self.name}]"
            prefix = f"{self.name}."
        else:
            table, label, prefix = data, str(path), ""
        out: list[tuple[Spec, Any, str]] = []
        seen: dict[str, str] = {}

        def take(spec: Spec, raw: Any, where: str, written: str) -> None:
            if spec.name in seen:
                raise ConfigError(f"{path}: {spec.name} is given twice ({seen[spec.name]} "
                                  f"and {written})")
            seen[spec.name] = written
            out.append((spec, raw, where))

        for raw_key, value in table.items():
            key = raw_key.replace("-", "_")
            flat = self._by_location.get((None, key))
            if flat is not None and (flat.table is None or not isinstance(value, dict)
                                     or flat.kind.base == "custom"):
                take(flat, value, label, f"{prefix}{raw_key}")
            elif key in self.tables and isinstance(value, dict):
                for raw_sub, subvalue in value.items():
                    sub = raw_sub.replace("-", "_")
                    spec = self._by_location.get((key, sub))
                    if spec is None and sub in self._excluded.get(key, ()):
                        raise ConfigError(f"{path}: [{prefix}{raw_key}] {raw_sub}: the "
                                          f"{self.name} section sets {sub} itself (use its "
                                          f"own setting {sub})")
                    if spec is None:
                        raise ConfigError(unknown_key(f"[{prefix}{raw_key}] {raw_sub}", path,
                                                   [s.key for s in self.specs
                                                    if s.table == key], sub))
                    take(spec, subvalue, f"{path} [{prefix}{raw_key}]",
                         f"[{prefix}{raw_key}] {raw_sub}")
            else:
                raise ConfigError(unknown_key(f"{raw_key!r}" + (f" in [{self.name}]" if unified
                                                             else ""),
                                           path, [s.name for s in self.specs], key))
        secrets = [spec.name for spec, _raw, _where in out if spec.meta.secret]
        if secrets:
            warn_if_readable(path, secrets[0])
        return out


def _shown(spec: Spec, raw: Any) -> str:
    return "<secret>" if spec.meta.secret else repr(raw)


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return REQUIRED


# --------------------------------------------------------------------------- resolved


@dataclass
class Resolved:
    """A section's values after merging, each with its source."""

    section: Section
    values: dict[str, Any]
    """Setting name -> value (required settings and overrides entries only when set)."""
    sources: dict[str, Source]
    file: Source | None = None
    """Where the configuration file was named (flag or environment), if any."""

    def missing(self, cls: type | None = None) -> list[Spec]:
        """Required settings (of ``cls``, else of every class) no source gave."""
        return [s for s in self.section.specs if s.default is REQUIRED
                and (cls is None or s.owner is cls) and s.name not in self.values]

    def given(self, name: str) -> bool:
        return self.sources[name].kind != "default"

    def build(self, cls: type[Any]) -> Any:
        """An instance of ``cls`` (one of the section's classes) from the values; its own
        checks' ConfigError gets the sources of the settings it names."""
        missing = self.missing(cls)
        if missing:
            s = missing[0]
            ways = [w for w in (s.flag, s.env[0], f"{s.location} in [{self.section.name}] "
                                                   "of the config file") if w]
            raise ConfigError(f"no {s.name} given: use {', '.join(ways)}")
        kwargs: dict[str, Any] = {}
        groups: dict[str, dict[str, Any]] = {}
        for s in self.section.specs:
            if s.owner is not cls or s.name not in self.values:
                continue
            if len(s.path) == 1:
                if self.given(s.name) or s.default is REQUIRED:
                    kwargs[s.name] = self.values[s.name]
            elif self.given(s.name):
                groups.setdefault(s.path[0], {})[s.path[1]] = self.values[s.name]
        hints = typing.get_type_hints(cls)
        overrides = self.section.override_fields()
        for name, sub in groups.items():
            if name in overrides:
                kwargs[name] = sub
                continue
            try:
                kwargs[name] = hints[name](**sub)
            except ConfigError as exc:
                raise self.explain(exc) from exc
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise self.explain(exc) from exc
        except TypeError as exc:
            raise ConfigError(f"bad {self.section.name} settings: {exc}") from exc

    def explain(self, exc: ConfigError) -> ConfigError:
        """``exc`` with the sources of the (non-default) settings its message names."""
        text = str(exc)
        named = []
        for s in self.section.specs:
            if self.given(s.name) and re.search(rf"(?<![\w.]){re.escape(s.name)}(?![\w])",
                                                text):
                named.append(f"{s.name} from {self.sources[s.name]}")
        return ConfigError(f"{text} ({'; '.join(named)})" if named else text)
