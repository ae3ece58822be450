"""Control requests, typed: what a client may ask of a supervisor, each checked once where it is decoded.

A request on the wire is a JSON object (``op``, ``id``, ``token`` and the
operation's arguments, ``docs/wire-protocol.md`` section 8) and an optional
data frame. :func:`decode_request` turns it into one of the classes below or
raises :class:`BadRequest` naming the argument that is wrong; the supervisor
dispatches on the class, never on a string.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .errors import BadRequest

__all__ = [
    "MAX_UPLOAD_BYTES",
    "OPERATOR_ONLY_OPS",
    "BadRequest",
    "Call",
    "Checkpoint",
    "Down",
    "Events",
    "Gc",
    "Ping",
    "Ps",
    "Remove",
    "Request",
    "Restart",
    "RotateKey",
    "Send",
    "Spawn",
    "Stop",
    "TenantAdd",
    "TenantList",
    "TenantRemove",
    "Top",
    "Tree",
    "Upload",
    "Usage",
    "Verify",
    "Wait",
    "decode_request",
    "pack_records",
    "unpack_records",
]

MAX_CALL_TIMEOUT_MS = 3_600_000
DEFAULT_CALL_TIMEOUT_MS = 10_000
MAX_WAIT_MS = 600_000


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Spawn:
    manifest: str  # an absolute path the supervisor can read (the operator's spawns)
    replace: bool = False  # a stopped or failed agent of the same name is removed first (theater rm)
    tenant: str | None = None  # the operator spawns for this tenant


@dataclass(frozen=True, slots=True)
class Upload:
    """A spawn that carries its agent manifest's text and its component's bytes (a tenant's spawn:
    a tenant names no path on the supervisor's machine)."""

    manifest_text: str
    component: bytes
    kind: str  # "wasm" or "wat": what the component's bytes are
    replace: bool = False


# A message's bytes: a large one from the TCP socket is a view of ZeroMQ's frame, copied only once it is queued.
Data = bytes | memoryview


@dataclass(frozen=True, slots=True)
class Send:
    agent: str
    data: Data


@dataclass(frozen=True, slots=True)
class Call:
    agent: str
    data: Data
    timeout_ms: int = DEFAULT_CALL_TIMEOUT_MS


@dataclass(frozen=True, slots=True)
class Ps:
    pass


@dataclass(frozen=True, slots=True)
class Tree:
    pass


@dataclass(frozen=True, slots=True)
class Stop:
    agent: str  # an agent, or a supervisor node


@dataclass(frozen=True, slots=True)
class Restart:
    agent: str  # an agent, or a supervisor node


@dataclass(frozen=True, slots=True)
class Wait:
    agent: str  # an agent, or a supervisor node: whose chain
    after: int = -1
    wait_ms: int = 0


@dataclass(frozen=True, slots=True)
class Events:
    agent: str  # an agent, or a supervisor node: whose chain
    after: int = -1


@dataclass(frozen=True, slots=True)
class Verify:
    agent: str | None = None  # one chain, or every chain of the home


@dataclass(frozen=True, slots=True)
class Down:
    pass


@dataclass(frozen=True, slots=True)
class Checkpoint:
    pass


@dataclass(frozen=True, slots=True)
class Remove:
    agent: str  # a stopped or failed agent


@dataclass(frozen=True, slots=True)
class RotateKey:
    pass


@dataclass(frozen=True, slots=True)
class Gc:
    agents: tuple[str, ...]  # names or ids; empty: every agent


@dataclass(frozen=True, slots=True)
class TenantAdd:
    name: str
    public_key: str
    policies: tuple[str, ...]
    routes: tuple[str, ...]
    quotas: dict[str, Any]


@dataclass(frozen=True, slots=True)
class TenantList:
    pass


@dataclass(frozen=True, slots=True)
class TenantRemove:
    name: str


@dataclass(frozen=True, slots=True)
class Top:
    pass


@dataclass(frozen=True, slots=True)
class Usage:
    tenant: str | None  # None: the asking tenant (the operator: every tenant)
    since_ns: int


Request = (Ping | Spawn | Upload | Send | Call | Ps | Tree | Stop | Restart | Wait | Events | Verify | Down | Checkpoint
           | Remove | Gc | RotateKey | TenantAdd | TenantList | TenantRemove | Top | Usage)
# What only the operator (the local socket) may ask; a tenant asking is refused.
# The operations only the operator may ask for (Down, Checkpoint, Gc, RotateKey, TenantAdd, TenantList,
# TenantRemove), by name: a tenant asking for one is refused before its arguments are read.
OPERATOR_ONLY_OPS = frozenset({"down", "checkpoint", "gc", "rotate-key", "tenant-add", "tenant-list", "tenant-rm"})
MAX_MANIFEST_TEXT = 1024 * 1024
MAX_UPLOAD_BYTES = 64 * 1024 * 1024  # a tenant's component, sent with its manifest's text

# An `events` reply carries records in its data frame, each as u32 big-endian length + raw record, up to
# this many bytes (and always at least one record); `more` says whether the chain goes on.
EVENTS_REPLY_BYTES = 8 * 1024 * 1024


def pack_records(raws: list[bytes]) -> bytes:
    return b"".join(len(raw).to_bytes(4, "big") + raw for raw in raws)


def unpack_records(data: bytes) -> list[bytes]:
    out, off = [], 0
    while off < len(data):
        if off + 4 > len(data):
            raise BadRequest("events data frame: truncated length")
        n = int.from_bytes(data[off:off + 4], "big")
        if off + 4 + n > len(data):
            raise BadRequest("events data frame: truncated record")
        out.append(data[off + 4:off + 4 + n])
        off += 4 + n
    return out


def _name(body: dict[str, Any]) -> str:
    ref = body.get("agent")
    if not isinstance(ref, str):
        raise BadRequest("agent must be a name or an id")
    return ref


def _int(body: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = body.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BadRequest(f"{key} must be an integer in {low}..{high}")
    return value


def decode_request(op: object, body: dict[str, Any], data: Data | None) -> Request:
    """The typed request for ``op`` with ``body``'s arguments and the optional data frame."""
    if op == "ping":
        return Ping()
    if op == "spawn":
        replace = body.get("replace", False)
        if not isinstance(replace, bool):
            raise BadRequest("replace must be true or false")
        if "manifest_text" in body:
            text, kind = body.get("manifest_text"), body.get("component_kind")
            if not isinstance(text, str) or len(text) > MAX_MANIFEST_TEXT:
                raise BadRequest(f"manifest_text must be a manifest's text of at most {MAX_MANIFEST_TEXT} characters")
            if kind not in ("wasm", "wat") or not data:
                raise BadRequest("a spawn with manifest_text carries the component in its data frame and "
                                 "component_kind \"wasm\" or \"wat\"")
            if len(data) > MAX_UPLOAD_BYTES:
                raise BadRequest(f"a component of {len(data)} bytes is more than {MAX_UPLOAD_BYTES} (64 MiB)")
            if "tenant" in body:  # an uploaded agent is its requester's: a tenant's, or the operator's
                raise BadRequest("a spawn with manifest_text takes no tenant: the agent is the requester's")
            return Upload(text, bytes(data), kind, replace)
        manifest = body.get("manifest")
        if not isinstance(manifest, str) or not os.path.isabs(manifest):
            raise BadRequest("spawn needs the manifest's absolute path (or its manifest_text and component)")
        tenant = body.get("tenant")
        if tenant is not None and not isinstance(tenant, str):
            raise BadRequest("tenant must be a tenant's name")
        return Spawn(manifest, replace, tenant)
    if op == "send":
        return Send(_name(body), data or b"")
    if op == "call":
        return Call(_name(body), data or b"", _int(body, "timeout_ms", DEFAULT_CALL_TIMEOUT_MS, 1, MAX_CALL_TIMEOUT_MS))
    if op == "ps":
        return Ps()
    if op == "tree":
        return Tree()
    if op == "stop":
        return Stop(_name(body))
    if op == "restart":
        return Restart(_name(body))
    if op == "wait":
        after = body.get("after", -1)
        if not isinstance(after, int) or isinstance(after, bool):
            raise BadRequest("wait needs integer after and wait_ms in 0..600000")
        wait_ms = body.get("wait_ms", 0)
        if not isinstance(wait_ms, int) or isinstance(wait_ms, bool) or not 0 <= wait_ms <= MAX_WAIT_MS:
            raise BadRequest("wait needs integer after and wait_ms in 0..600000")
        return Wait(_name(body), after, wait_ms)
    if op == "events":
        after = body.get("after", -1)
        if not isinstance(after, int) or isinstance(after, bool) or not -1 <= after < 2**63:
            raise BadRequest("events needs an integer after in -1..2^63-1")
        return Events(_name(body), after)
    if op == "verify":
        ref = body.get("agent")
        if ref is not None and not isinstance(ref, str):
            raise BadRequest("agent must be a name or an id")
        return Verify(ref)
    if op == "down":
        return Down()
    if op == "checkpoint":
        return Checkpoint()
    if op == "rm":
        return Remove(_name(body))
    if op == "rotate-key":
        return RotateKey()
    if op == "gc":
        agents = body.get("agents", [])
        if not isinstance(agents, list) or len(agents) > 1000 or not all(isinstance(a, str) and 0 < len(a) <= 256
                                                                         for a in agents):
            raise BadRequest("gc needs agents: a list of at most 1000 names or ids")
        return Gc(tuple(agents))
    if op == "tenant-add":
        name, key, quotas = body.get("name"), body.get("public_key"), body.get("quotas", {})
        lists = {k: body.get(k, []) for k in ("policies", "routes")}
        if not isinstance(name, str) or not isinstance(key, str) or not isinstance(quotas, dict):
            raise BadRequest("tenant-add needs name, public_key, policies, routes and quotas")
        for k, v in lists.items():
            if not isinstance(v, list) or len(v) > 256 or not all(isinstance(i, str) for i in v):
                raise BadRequest(f"{k} must be a list of at most 256 names")
        return TenantAdd(name, key, tuple(lists["policies"]), tuple(lists["routes"]), quotas)
    if op == "tenant-list":
        return TenantList()
    if op == "tenant-rm":
        name = body.get("name")
        if not isinstance(name, str):
            raise BadRequest("tenant-rm needs the tenant's name")
        return TenantRemove(name)
    if op == "top":
        return Top()
    if op == "usage":
        tenant = body.get("tenant")
        if tenant is not None and not isinstance(tenant, str):
            raise BadRequest("tenant must be a tenant's name")
        return Usage(tenant, _int(body, "since_ns", 0, 0, 2**63 - 1))
    raise BadRequest(f"unknown operation {str(op)[:64]!r}")
