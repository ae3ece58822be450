"""What a policy grants with a capability beyond the capability itself: its settings table.

A policy that grants ``messaging``, ``kv``, ``timers`` or ``http`` may carry a
table of that name (``[kv]``, ...) with the capability's settings; a manifest
may carry the same table to narrow them, never to widen them. A table for a
capability that is not granted is an error. Settings a policy leaves out take
the defaults below; the defaults deny what is not named (no messaging peers,
no HTTP hosts).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from .._errors import ConfigError

if TYPE_CHECKING:
    from .._config import _Table

__all__ = ["GRANTS", "Grant", "KvGrant", "MessagingGrant", "TimersGrant", "grant_from_dict", "parse_grant"]

KIB = 1024
MIB = 1024 * KIB
RELATIONS = ("@parent", "@children", "@siblings")  # peers by their place in the supervision tree


class Grant(Protocol):
    def as_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class _Numbers:
    """A grant of integer settings, each with bounds and a default; a manifest may only lower them."""

    BOUNDS: ClassVar[dict[str, tuple[int, int, int, str]]]  # name -> (min, max, default, what)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, table: _Table, ceiling: _Numbers | None) -> _Numbers:
        values = {}
        for name, (low, high, default, what) in cls.BOUNDS.items():
            top = getattr(ceiling, name) if ceiling is not None else default
            value = table.get(name, int, top)
            if not low <= value <= high:
                raise table.err(name, f"{value} is out of range {low}..{high} ({what})")
            if ceiling is not None and value > top:
                raise table.err(name, f"{value} exceeds the policy's {top}; a manifest may only narrow its policy")
            values[name] = value
        table.finish()
        return cls(**values)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> _Numbers:
        return cls(**{f.name: int(data[f.name]) for f in fields(cls)})


@dataclass(frozen=True, slots=True)
class KvGrant(_Numbers):
    max_key_bytes: int
    max_value_bytes: int
    max_keys: int
    max_total_bytes: int

    BOUNDS: ClassVar[dict[str, tuple[int, int, int, str]]] = {
        "max_key_bytes": (1, 1024, 256, "one key, UTF-8 bytes"),
        "max_value_bytes": (0, 16 * MIB, 64 * KIB, "one value, bytes"),
        "max_keys": (0, 10_000, 1000, "keys per agent"),
        "max_total_bytes": (0, 1024 * MIB, 16 * MIB, "all keys and values of an agent, bytes"),
    }


@dataclass(frozen=True, slots=True)
class TimersGrant(_Numbers):
    max_pending: int
    max_delay_ms: int

    BOUNDS: ClassVar[dict[str, tuple[int, int, int, str]]] = {
        "max_pending": (0, 10_000, 100, "timers an agent has pending at once"),
        "max_delay_ms": (1, 366 * 86_400_000, 86_400_000, "longest delay, ms"),
    }


@dataclass(frozen=True, slots=True)
class MessagingGrant:
    """Whom the agent may message (``to``) and hear from (``from``): agent-name patterns (``*`` and ``?``)
    or a relation in the supervision tree (``@parent``, ``@children``, ``@siblings``). Both sides must
    agree: A may message B when B is in A's ``to`` and A is in B's ``from``. Empty: nobody."""

    to: tuple[str, ...] = ()
    from_: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"to": list(self.to), "from": list(self.from_)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MessagingGrant:
        return cls(tuple(data["to"]), tuple(data["from"]))

    @classmethod
    def parse(cls, table: _Table, ceiling: MessagingGrant | None) -> MessagingGrant:
        lists = []
        for key, attr in (("to", "to"), ("from", "from_")):
            default = list(getattr(ceiling, attr)) if ceiling is not None else []
            patterns = table.get(key, list, default)
            for p in patterns:
                if not isinstance(p, str) or not _valid_pattern(p):
                    raise table.err(key, f"{p!r} is not an agent-name pattern (a-z, 0-9, '-', '_', '*', '?') "
                                         f"or one of {', '.join(RELATIONS)}")
                if ceiling is not None and not _within(p, getattr(ceiling, attr)):
                    raise table.err(key, f"{p!r} is not within the policy's {list(getattr(ceiling, attr))}; "
                                         "a manifest may only narrow its policy")
            lists.append(tuple(dict.fromkeys(patterns)))
        table.finish()
        return cls(*lists)


def _valid_pattern(p: str) -> bool:
    if p in RELATIONS:
        return True
    return 0 < len(p) <= 63 and all(c.isascii() and ((c.isalnum() and not c.isupper()) or c in "-_*?") for c in p)


def _within(p: str, ceiling: tuple[str, ...]) -> bool:
    """Whether pattern ``p`` names nothing the ceiling's patterns do not."""
    if p in ceiling or "*" in ceiling:
        return True
    plain = p not in RELATIONS and "*" not in p and "?" not in p
    return plain and any(c not in RELATIONS and fnmatch.fnmatchcase(p, c) for c in ceiling)


def matches(patterns: tuple[str, ...], name: str, relations: set[str]) -> bool:
    """Whether an agent called ``name``, standing in ``relations`` to the other side, is named by ``patterns``."""
    return any(p in relations if p in RELATIONS else fnmatch.fnmatchcase(name, p) for p in patterns)


# capability -> its settings' type; capabilities without settings have no entry.
GRANTS: dict[str, Any] = {"messaging": MessagingGrant, "kv": KvGrant, "timers": TimersGrant}


def parse_grant(capability: str, table: _Table, ceiling: Grant | None) -> Grant:
    grant: Grant = GRANTS[capability].parse(table, ceiling)
    return grant


def grant_from_dict(capability: str, data: Mapping[str, Any]) -> Grant:
    if capability not in GRANTS:
        raise ConfigError(f"stored settings for {capability!r}, which has none")
    grant: Grant = GRANTS[capability].from_dict(data)
    return grant
