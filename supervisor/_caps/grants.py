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
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from .._errors import ConfigError

if TYPE_CHECKING:
    from .._config import _Table

__all__ = ["GRANTS", "Grant", "HttpGrant", "KvGrant", "MessagingGrant", "Origin", "SecretRule", "TimersGrant",
           "grant_from_dict", "parse_grant"]

KIB = 1024
MIB = 1024 * KIB
RELATIONS = ("@parent", "@children", "@siblings")  # peers by their place in the supervision tree


class Grant(Protocol):
    def as_dict(self) -> dict[str, Any]: ...


def _numbers(table: _Table, bounds: dict[str, tuple[int, int, int, str]], ceiling: object | None) -> dict[str, int]:
    """The integer settings ``bounds`` names (name -> (min, max, default, what)): each within its range and, for
    a manifest (``ceiling``: its policy's grant), at most the policy's value, which is also its default."""
    values = {}
    for name, (low, high, default, what) in bounds.items():
        top = getattr(ceiling, name) if ceiling is not None else default
        value = table.get(name, int, top)
        if not low <= value <= high:
            raise table.err(name, f"{value} is out of range {low}..{high} ({what})")
        if ceiling is not None and value > top:
            raise table.err(name, f"{value} exceeds the policy's {top}; a manifest may only narrow its policy")
        values[name] = value
    return values


@dataclass(frozen=True, slots=True)
class _Numbers:
    """A grant of integer settings, each with bounds and a default; a manifest may only lower them."""

    BOUNDS: ClassVar[dict[str, tuple[int, int, int, str]]]  # name -> (min, max, default, what)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, table: _Table, ceiling: _Numbers | None) -> _Numbers:
        values = _numbers(table, cls.BOUNDS, ceiling)
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


# --- http ---------------------------------------------------------------------------------------

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
_HOST_RE = re.compile(r"(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
SECRET_NAME_RE = re.compile(r"[a-z0-9_-]{1,63}")
_SECRET_REF_RE = re.compile(r"\{secret:([^}]*)\}")
HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}")


@dataclass(frozen=True, slots=True)
class Origin:
    """``scheme://host[:port]``: a host, or ``*.`` and a domain for every name under it."""

    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Origin:
        """Raise ValueError naming what is wrong."""
        scheme, sep, rest = text.partition("://")
        if not sep or scheme not in ("http", "https"):
            raise ValueError("must start with http:// or https://")
        if "/" in rest or "@" in rest or "?" in rest or "#" in rest:
            raise ValueError("must be scheme://host[:port], with no user, path or query")
        host, colon, port_text = rest.rpartition(":") if rest.count(":") == 1 else (rest, "", "")
        if not colon:
            host, port_text = rest, ""
        host = host.lower()
        if not _HOST_RE.fullmatch(host) or len(host) > 253:
            raise ValueError(f"{host!r} is not a host name, an IPv4 address or *.domain")
        port = int(port_text) if port_text.isdigit() else (443 if scheme == "https" else 80) if not port_text else -1
        if not 0 < port < 65536:
            raise ValueError(f"port {port_text!r} is not a port number")
        return cls(scheme, host, port)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def admits(self, scheme: str, host: str, port: int) -> bool:
        """Whether a request to ``scheme://host:port`` is within this origin."""
        if (scheme, port) != (self.scheme, self.port):
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and len(host) > len(self.host) - 1
        return host == self.host

    def within(self, others: tuple[Origin, ...]) -> bool:
        """Whether this origin admits nothing that none of ``others`` admits."""
        return any(self == o or (not self.host.startswith("*.") and o.admits(self.scheme, self.host, self.port))
                   or (self.host.startswith("*.") and o.host.startswith("*.") and o.scheme == self.scheme
                       and o.port == self.port and self.host.endswith(o.host[1:]))
                   for o in others)


@dataclass(frozen=True, slots=True)
class SecretRule:
    """For requests to ``origin``, the supervisor sets ``header`` to ``value`` with each ``{secret:NAME}``
    replaced by that secret, read from the home at the time of the request."""

    origin: Origin
    header: str
    value: str

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(_SECRET_REF_RE.findall(self.value))

    def as_dict(self) -> dict[str, str]:
        return {"origin": str(self.origin), "header": self.header, "value": self.value}


@dataclass(frozen=True, slots=True)
class HttpGrant:
    """Where an agent may send HTTP requests, how big and how long, and what the supervisor adds."""

    allow: tuple[Origin, ...] = ()
    methods: tuple[str, ...] = ("GET",)
    private: tuple[Origin, ...] = ()
    secrets: tuple[SecretRule, ...] = ()
    max_request_bytes: int = MIB
    max_response_bytes: int = MIB
    timeout_ms: int = 10_000

    NUMBERS: ClassVar[dict[str, tuple[int, int, int, str]]] = {
        "max_request_bytes": (0, 16 * MIB, MIB, "a request's body, bytes"),
        "max_response_bytes": (0, 16 * MIB, MIB, "a response's body, bytes"),
        "timeout_ms": (1, 60_000, 10_000, "a whole request, ms"),
    }

    def as_dict(self) -> dict[str, Any]:
        return {"allow": [str(o) for o in self.allow], "methods": list(self.methods),
                "private": [str(o) for o in self.private], "secrets": [r.as_dict() for r in self.secrets],
                "max_request_bytes": self.max_request_bytes, "max_response_bytes": self.max_response_bytes,
                "timeout_ms": self.timeout_ms}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HttpGrant:
        return cls(allow=tuple(Origin.parse(o) for o in data["allow"]), methods=tuple(data["methods"]),
                   private=tuple(Origin.parse(o) for o in data["private"]),
                   secrets=tuple(SecretRule(Origin.parse(r["origin"]), r["header"], r["value"])
                                 for r in data["secrets"]),
                   **{k: int(data[k]) for k in cls.NUMBERS})

    @classmethod
    def parse(cls, table: _Table, ceiling: HttpGrant | None) -> HttpGrant:
        top = ceiling or cls()
        allow = _origins(table, "allow", top.allow if ceiling else None)
        private = _origins(table, "private", top.private if ceiling else None) if "private" in table.data \
            else (top.private if ceiling else ())
        if ceiling is not None and "allow" not in table.data:
            allow = top.allow
        outside = [str(o) for o in private if not o.within(allow)]
        if outside:
            raise table.err("private", f"{', '.join(outside)} not in allow; private names origins of allow")
        methods = table.get("methods", list, list(top.methods))
        for m in methods:
            if m not in METHODS:
                raise table.err("methods", f"{m!r} is not one of {', '.join(METHODS)}")
            if ceiling is not None and m not in ceiling.methods:
                raise table.err("methods", f"{m!r} is not allowed by the policy; a manifest may only narrow it")
        secrets = _secret_rules(table)
        if ceiling is not None:
            if "secrets" not in table.data:
                secrets = top.secrets
            else:  # exactly the policy's rules: a rule left out would let the guest set that header itself
                _same_rules(table, secrets, top.secrets)
        numbers = _numbers(table, cls.NUMBERS, ceiling)
        table.finish()
        return cls(allow=allow, methods=tuple(dict.fromkeys(methods)), private=private, secrets=secrets, **numbers)


def _origins(table: _Table, key: str, ceiling: tuple[Origin, ...] | None) -> tuple[Origin, ...]:
    out = []
    for text in table.get(key, list, []):
        if not isinstance(text, str):
            raise table.err(key, f"{text!r} is not an origin string")
        try:
            origin = Origin.parse(text)
        except ValueError as exc:
            raise table.err(key, f"{text!r} {exc}") from None
        if ceiling is not None and not origin.within(ceiling):
            raise table.err(key, f"{text!r} is not within the policy's; a manifest may only narrow its policy")
        out.append(origin)
    return tuple(dict.fromkeys(out))


def _secret_rules(table: _Table) -> tuple[SecretRule, ...]:
    rules = []
    for i, entry in enumerate(table.get("secrets", list, [])):
        where = f"secrets[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"origin", "header", "value"} \
                or not all(isinstance(v, str) for v in entry.values()):
            raise table.err(where, "must be a table of exactly origin, header and value (strings)")
        try:
            origin = Origin.parse(entry["origin"])
        except ValueError as exc:
            raise table.err(where, f"origin {entry['origin']!r} {exc}") from None
        if not HEADER_NAME_RE.fullmatch(entry["header"]):
            raise table.err(where, f"header {entry['header']!r} is not a header name")
        if any(c in entry["value"] for c in "\r\n\0"):
            raise table.err(where, "value holds a line break or NUL")
        rule = SecretRule(origin, entry["header"].lower(), entry["value"])
        if not rule.names:
            raise table.err(where, "value names no {secret:NAME}")
        bad = [n for n in rule.names if not SECRET_NAME_RE.fullmatch(n)]
        if bad:
            raise table.err(where, f"secret name {bad[0]!r} is not 1-63 of a-z, 0-9, '-', '_'")
        rules.append(rule)
    return tuple(rules)


def _same_rules(table: _Table, rules: tuple[SecretRule, ...], policy: tuple[SecretRule, ...]) -> None:
    """A manifest's ``secrets``, if it gives them, must be exactly its policy's rules (order aside)."""
    missing = [r for r in policy if r not in rules]
    extra = [r for r in rules if r not in policy]
    if not missing and not extra:
        return
    parts = []
    if missing:
        parts.append(f"it leaves out {_rules_text(missing)}")
    if extra:
        parts.append(f"the policy has no rule {_rules_text(extra)}")
    raise table.err("secrets", "must be exactly the policy's secrets rules (order aside), or be left out: "
                               + "; ".join(parts))


def _rules_text(rules: list[SecretRule]) -> str:
    return ", ".join(f"{{ origin = {str(r.origin)!r}, header = {r.header!r}, value = {r.value!r} }}" for r in rules)


# capability -> its settings' type; capabilities without settings have no entry.
GRANTS: dict[str, Any] = {"messaging": MessagingGrant, "kv": KvGrant, "timers": TimersGrant, "http": HttpGrant}


def parse_grant(capability: str, table: _Table, ceiling: Grant | None) -> Grant:
    grant: Grant = GRANTS[capability].parse(table, ceiling)
    return grant


def grant_from_dict(capability: str, data: Mapping[str, Any]) -> Grant:
    if capability not in GRANTS:
        raise ConfigError(f"stored settings for {capability!r}, which has none")
    grant: Grant = GRANTS[capability].from_dict(data)
    return grant
