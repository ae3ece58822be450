"""A worker's bootstrap and the fork-server's messages: defined once, for the supervisor and the worker side.

The bootstrap is one JSON object the supervisor writes into a pipe the worker
reads before anything else (the endpoint to connect to, the spawn token its
hello must carry, the supervisor's pid). The fork-server and the supervisor
exchange JSON datagrams on a SOCK_SEQPACKET socketpair, descriptors passed as
SCM_RIGHTS (``docs/wire-protocol.md`` section 3a). Every ``decode`` checks each
field's type and raises :class:`ProtocolError` naming the one that is wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import ProtocolError
from .spec import LoadProfile, field_values

__all__ = [
    "LOG_SIZE_BYTES",
    "MAX_MESSAGE",
    "TAKEN",
    "TOKEN_BYTES",
    "ArtifactOffer",
    "Boot",
    "CompileRequest",
    "Compiled",
    "FromForkServer",
    "Ready",
    "SpareBorn",
    "SpareEnded",
    "Spawn",
    "SpawnRefused",
    "Spawned",
    "Took",
    "decode_from_fork_server",
    "decode_to_fork_server",
]

MAX_MESSAGE = 1 << 20  # one datagram, either way, and the bootstrap
TOKEN_BYTES = 32
# Over a loaded spare's line, with its agent's log file: a spawn took it. Followed by the spare's token and the
# log's size in bytes (8, big-endian), which the spare's lock-down limits the log by.
TAKEN = b"agent"
LOG_SIZE_BYTES = 8


def _load(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"{what}: {len(data)} bytes, more than {MAX_MESSAGE}")
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise ProtocolError(f"{what}: not JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what}: not a JSON object")
    return obj


def _get(obj: dict[str, Any], key: str, typ: type | tuple[type, ...], what: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
        raise ProtocolError(f"{what}: {key!r} is missing or of the wrong type")
    return value


def _token(obj: dict[str, Any], what: str) -> bytes:
    try:
        token = bytes.fromhex(_get(obj, "token", str, what))
    except ValueError as exc:
        raise ProtocolError(f"{what}: 'token' is not hex") from exc
    if len(token) != TOKEN_BYTES:
        raise ProtocolError(f"{what}: 'token' is not {TOKEN_BYTES} bytes")
    return token


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


# --- the bootstrap ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Boot:
    """What a worker reads from its bootstrap pipe before anything else."""

    endpoint: str  # the supervisor's worker socket
    token: bytes  # 32 bytes; the worker's hello carries it
    parent_pid: int  # the supervisor: the worker dies with it

    def encode(self) -> bytes:
        return _dumps({"endpoint": self.endpoint, "token": self.token.hex(), "parent_pid": self.parent_pid})

    @classmethod
    def decode(cls, data: bytes) -> Boot:
        obj = _load(data, "bootstrap")
        endpoint = _get(obj, "endpoint", str, "bootstrap")
        if not endpoint.startswith("ipc://"):
            raise ProtocolError("bootstrap: 'endpoint' is not an ipc:// endpoint")
        token = _token(obj, "bootstrap")
        parent_pid = _get(obj, "parent_pid", int, "bootstrap")
        if parent_pid <= 0:
            raise ProtocolError("bootstrap: 'parent_pid' is not a pid")
        return cls(endpoint, token, parent_pid)


# --- supervisor -> fork-server ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ArtifactOffer:
    """A compiled artifact in the cache the supervisor vouches for: the worker maps it instead of compiling."""

    key: str
    path: str
    sha256: str


@dataclass(frozen=True, slots=True)
class CompileRequest:
    """No artifact yet: the fork-server compiles the component in a confined job and caches it under ``key``."""

    key: str
    path: str
    component_path: str
    component_sha256: str
    limits: dict[str, Any]
    label: str


@dataclass(frozen=True, slots=True)
class Spawn:
    """Start a worker (a spare, or a fresh fork); descriptors: [bootstrap pipe's read end, log file]."""

    id: int
    workdir: str
    artifact: ArtifactOffer | None
    compile: CompileRequest | None
    profile: LoadProfile | None = None  # what the agent loads, so a spare can load it ahead for the next one

    def encode(self) -> bytes:
        obj = {"op": "spawn", "id": self.id, "workdir": self.workdir,
               "artifact": None if self.artifact is None else field_values(self.artifact),
               "compile": None if self.compile is None else field_values(self.compile)}
        if self.profile is not None:
            obj["profile"] = self.profile.to_json()
        return _dumps(obj)

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> Spawn:
        """From the request's JSON object (``decode_to_fork_server`` reads the datagram and its op)."""
        artifact = obj.get("artifact")
        compile_ = obj.get("compile")
        if artifact is not None:
            if not isinstance(artifact, dict):
                raise ProtocolError("spawn request: 'artifact' is not an object")
            what = "spawn request artifact"
            artifact = ArtifactOffer(_get(artifact, "key", str, what), _get(artifact, "path", str, what),
                                     _get(artifact, "sha256", str, what))
        if compile_ is not None:
            if not isinstance(compile_, dict):
                raise ProtocolError("spawn request: 'compile' is not an object")
            what = "spawn request compile"
            compile_ = CompileRequest(
                _get(compile_, "key", str, what), _get(compile_, "path", str, what),
                _get(compile_, "component_path", str, what), _get(compile_, "component_sha256", str, what),
                _get(compile_, "limits", dict, what), _get(compile_, "label", str, what),
            )
        profile = obj.get("profile")
        if profile is not None:
            if artifact is None and compile_ is None:
                raise ProtocolError("spawn request: a 'profile' comes only with an 'artifact' or a 'compile'")
            profile = LoadProfile.from_json(profile)  # the spare checks the artifact's key against it as it loads
        return cls(_get(obj, "id", int, "spawn request"), _get(obj, "workdir", str, "spawn request"), artifact,
                   compile_, profile)


@dataclass(frozen=True, slots=True)
class Took:
    """The supervisor gave the loaded spare ``pid`` (announced with its line) to an agent: the fork-server
    counts it as a spawn of that spare's profile and no longer watches it."""

    pid: int

    def encode(self) -> bytes:
        return _dumps({"op": "took", "pid": self.pid})


def decode_to_fork_server(data: bytes) -> Spawn | Took:
    """One datagram from the supervisor, typed."""
    obj = _load(data, "request")
    op = obj.get("op")
    if op == "spawn":
        return Spawn.from_obj(obj)
    if op == "took":
        return Took(_get(obj, "pid", int, "took"))
    raise ProtocolError(f"request: unknown op {str(op)[:32]!r}")


# --- fork-server -> supervisor -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    """Once, at start: the fork-server imported everything; it forks only with one thread and CLONE_PARENT."""

    pid: int
    threads: int
    clone_parent: bool

    def encode(self) -> bytes:
        return _dumps({"ready": self.pid, "threads": self.threads, "clone_parent": self.clone_parent})


@dataclass(frozen=True, slots=True)
class Spawned:
    id: int
    pid: int

    def encode(self) -> bytes:
        return _dumps({"id": self.id, "pid": self.pid})


@dataclass(frozen=True, slots=True)
class SpawnRefused:
    id: int
    error: str

    def encode(self) -> bytes:
        return _dumps({"id": self.id, "error": self.error[:4096]})


@dataclass(frozen=True, slots=True)
class Compiled:
    """A compile job ended: the artifact's digest, size and file signature, or why it failed."""

    key: str
    ok: bool
    seconds: float
    sha256: str = ""
    size: int = 0
    signature: tuple[int, ...] = ()
    error: str = ""

    def encode(self) -> bytes:
        body: dict[str, Any] = {"note": "compiled", "key": self.key, "ok": self.ok, "seconds": self.seconds}
        if self.ok:
            body.update(sha256=self.sha256, size=self.size, signature=list(self.signature))
        else:
            body["error"] = self.error[:4096]
        return _dumps(body)


@dataclass(frozen=True, slots=True)
class SpareBorn:
    """A spare worker was forked (the supervisor is its parent: it ends and reaps it if unused).

    A loaded spare comes with its ``profile``, the ``token`` its hello carries and, as the datagram's one
    descriptor, its line: the supervisor hands it its agent's log file over that line when a spawn of the
    profile takes it. A plain spare has neither (the fork-server hands it its agent)."""

    pid: int
    token: bytes | None = None
    profile: LoadProfile | None = None

    def encode(self) -> bytes:
        obj: dict[str, Any] = {"note": "spare", "pid": self.pid}
        if self.token is not None and self.profile is not None:
            obj.update(token=self.token.hex(), profile=self.profile.to_json())
        return _dumps(obj)


@dataclass(frozen=True, slots=True)
class SpareEnded:
    pid: int

    def encode(self) -> bytes:
        return _dumps({"note": "spare-ended", "pid": self.pid})


FromForkServer = Ready | Spawned | SpawnRefused | Compiled | SpareBorn | SpareEnded


def decode_from_fork_server(data: bytes) -> FromForkServer:
    """One datagram from the fork-server, typed."""
    what = "fork-server message"
    obj = _load(data, what)
    if "ready" in obj:
        return Ready(_get(obj, "ready", int, what), _get(obj, "threads", int, what),
                     _get(obj, "clone_parent", bool, what))
    note = obj.get("note")
    if note == "compiled":
        if _get(obj, "ok", bool, what):
            signature = _get(obj, "signature", list, what)
            if not all(isinstance(v, int) for v in signature):
                raise ProtocolError(f"{what}: 'signature' is not a list of integers")
            return Compiled(_get(obj, "key", str, what), True, float(_get(obj, "seconds", (int, float), what)),
                            _get(obj, "sha256", str, what), _get(obj, "size", int, what), tuple(signature))
        return Compiled(_get(obj, "key", str, what), False, float(_get(obj, "seconds", (int, float), what)),
                        error=str(obj.get("error", "")))
    if note == "spare":
        if "profile" not in obj and "token" not in obj:
            return SpareBorn(_get(obj, "pid", int, what))
        return SpareBorn(_get(obj, "pid", int, what), _token(obj, what),
                         LoadProfile.from_json(_get(obj, "profile", dict, what)))
    if note == "spare-ended":
        return SpareEnded(_get(obj, "pid", int, what))
    if note is not None:
        raise ProtocolError(f"{what}: unknown note {str(note)[:32]!r}")
    if "pid" in obj:
        return Spawned(_get(obj, "id", int, what), _get(obj, "pid", int, what))
    if "error" in obj:
        return SpawnRefused(_get(obj, "id", int, what), str(obj["error"]))
    raise ProtocolError(f"{what}: neither a note, a reply nor ready")
