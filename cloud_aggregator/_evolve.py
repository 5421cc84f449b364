"""``evolve``: ``dataclasses.replace`` for the aggregator's plain frozen records.

``dataclasses.replace`` looks every field up and calls ``__init__`` again: about 15 us
on a slow core, and a round changes each device's history record four times and each
journal entry once, for thousands of devices. A record with no ``__post_init__`` (no
check to run again) and no ``init=False`` field can be copied with the changed fields
set directly, which gives the same object for a fraction of that.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, TypeVar

T = TypeVar("T")


@functools.cache
def _fields(cls: type) -> frozenset[str]:
    if not dataclasses.is_dataclass(cls) or hasattr(cls, "__post_init__"):
        raise TypeError(f"evolve needs a dataclass without __post_init__, not {cls!r}")
    fields = dataclasses.fields(cls)
    if any(not f.init for f in fields) or hasattr(cls, "__slots__"):
        raise TypeError(f"evolve cannot copy {cls.__name__} (init=False fields or slots)")
    return frozenset(f.name for f in fields)


def evolve(obj: T, /, **changes: Any) -> T:
    """``obj`` with ``changes``, as ``dataclasses.replace`` would make it."""
    cls: type = type(obj)
    unknown = changes.keys() - _fields(cls)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {sorted(unknown)[0]!r}")
    new: T = object.__new__(cls)
    new.__dict__.update(obj.__dict__)
    new.__dict__.update(changes)
    return new
