"""Wire frames between supervisor, workers and clients (ZeroMQ multipart).

Every message starts with a two-byte header frame ``version:u8 type:u8``.
The frames of each type are specified in ``docs/wire-protocol.md``. Parsing is
strict: an unknown version or type, a missing or extra frame, or a frame of the
wrong size raises :class:`ProtocolError`.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

import orjson
import zmq

from .errors import ProtocolError
from .records import HELLO_DOMAIN  # the hello's proof is signed and checked in records, with every signature

__all__ = [
    "HELLO_DOMAIN",
    "HOST_INTERFACE_KEY",
    "MAX_JSON_BYTES",
    "MAX_REPLY_JSON_BYTES",
    "VERSION",
    "Call",
    "CallKind",
    "ClientType",
    "Hello",
    "HostRequest",
    "Origin",
    "Result",
    "SupervisorType",
    "WorkerType",
    "decode_child_exit",
    "decode_json",
    "decode_message",
    "decode_reply",
    "encode_child_exit",
    "encode_json",
    "encode_message",
    "encode_reply",
    "encode_request",
    "header",
    "host_call_bytes",
    "parse_header",
    "readable",
    "recv_frames",
    "send_frames",
]

VERSION = 1
_HEADER = struct.Struct(">BB")


class WorkerType(enum.IntEnum):
    """Frames a worker sends to the supervisor."""

    HELLO = 1
    RESULT = 2
    FAULT = 3
    HOST_REQUEST = 4


class SupervisorType(enum.IntEnum):
    """Frames the supervisor sends to a worker."""

    SPEC = 1
    CALL = 2
    STOP = 3
    HOST_REPLY = 4


class ClientType(enum.IntEnum):
    """Frames on the control socket."""

    REQUEST = 1
    REPLY = 2


class CallKind(enum.IntEnum):
    INIT = 0
    HANDLE = 1
    CHILD_EXIT = 2
    MESSAGE = 3


class Origin(enum.IntEnum):
    """Where a MESSAGE call's message comes from."""

    SEND = 0  # another agent's messaging.send
    CALL = 1  # another agent's messaging.call, waiting for the reply
    TIMER = 2  # the agent's own timer

    @property
    def label(self) -> str:
        return self.name.lower()


_MESSAGE = struct.Struct(">B16s16s")


def encode_message(origin: Origin, sender: bytes, message_id: bytes, message: bytes) -> bytes:
    """The data of a MESSAGE call: origin (1), sender id (16), message id (16), then the message."""
    return _MESSAGE.pack(origin, sender, message_id) + message


def decode_message(data: bytes) -> tuple[Origin, bytes, bytes, bytes]:
    if len(data) < _MESSAGE.size:
        raise ProtocolError(f"message call data shorter than {_MESSAGE.size} bytes")
    origin, sender, message_id = _MESSAGE.unpack_from(data)
    try:
        return Origin(origin), sender, message_id, data[_MESSAGE.size:]
    except ValueError:
        raise ProtocolError(f"unknown message origin {origin}") from None


_CHILD_EXIT = struct.Struct(">16s32s")


def encode_child_exit(child: bytes, exit_hash: bytes, reason: str) -> bytes:
    """The data of a CHILD_EXIT call: child id (16), the child's exit record hash (32), reason (UTF-8)."""
    return _CHILD_EXIT.pack(child, exit_hash) + reason.encode("utf-8")


def decode_child_exit(data: bytes) -> tuple[bytes, bytes, str]:
    if len(data) < _CHILD_EXIT.size:
        raise ProtocolError("child-exit data shorter than 48 bytes")
    child, exit_hash = _CHILD_EXIT.unpack_from(data)
    try:
        return child, exit_hash, data[_CHILD_EXIT.size :].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("child-exit reason is not UTF-8") from None


_REQUEST_META = struct.Struct(">Q")


HOST_INTERFACE_KEY = "interface"


@dataclass(frozen=True, slots=True)
class HostRequest:
    """HOST_REQUEST and HOST_REPLY: an 8-byte id frame and a JSON body.

    A request names the interface it is for, a capability's name
    (``theater.capabilities``), in its body's ``interface`` key. Decoded,
    :attr:`interface` holds that name and :attr:`body` the rest: the interface's
    operation ``op`` and its arguments. A reply names no interface (None).
    """

    request_id: int
    body: dict[str, Any]
    interface: str | None = None
    data: bytes | None = None  # bytes that travel beside the JSON (a message, a value, a body), never inside it

    def encode(self, typ: int) -> list[bytes]:
        body = self.body if self.interface is None else {**self.body, HOST_INTERFACE_KEY: self.interface}
        frames = [header(typ), _REQUEST_META.pack(self.request_id), encode_json(body)]
        if self.data is not None:
            frames.append(self.data)
        return frames

    @classmethod
    def decode(cls, frames: list[bytes], what: str) -> HostRequest:
        if len(frames) not in (2, 3) or len(frames[0]) != _REQUEST_META.size:
            raise ProtocolError(f"{what} must be an 8-byte id frame, a JSON frame and an optional data frame")
        body = decode_json(frames[1], what)
        interface = body.pop(HOST_INTERFACE_KEY, None)
        if interface is not None and not isinstance(interface, str):
            raise ProtocolError(f"{what}: {HOST_INTERFACE_KEY} must be a string")
        data = frames[2] if len(frames) == 3 else None
        return cls(_REQUEST_META.unpack(frames[0])[0], body, interface, data)


def host_call_bytes(obj: dict[str, Any], data: bytes | None) -> bytes:
    """A served host call's input or output as recorded: the canonical JSON, then NUL and the data, if any
    (canonical JSON never holds a NUL byte, so the split is unambiguous)."""
    return encode_json(obj) if data is None else encode_json(obj) + b"\0" + data


def header(typ: int) -> bytes:
    return _HEADER.pack(VERSION, typ)


def parse_header(frame: bytes | memoryview, enum_type: type[enum.IntEnum]) -> Any:
    if len(frame) != _HEADER.size:
        raise ProtocolError(f"header frame must be {_HEADER.size} bytes, got {len(frame)}")
    version, typ = _HEADER.unpack(frame)
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version}")
    member = enum_type._value2member_map_.get(typ)  # the enum's own table, without the cost of a call
    if member is None:
        raise ProtocolError(f"unknown {enum_type.__name__} frame type {typ}")
    return member


# pyzmq's send_multipart and recv_multipart check every frame and combine flags as enums: about 3 µs of
# a message's way, and each call's result crosses four sockets. These do the same through the socket's
# own send and recv, with plain integer flags.
_SEND: Any = zmq.backend.Socket.send
_RECV: Any = zmq.backend.Socket.recv
_GET: Any = zmq.backend.Socket.get
_SNDMORE, _EVENTS, _POLLIN = int(zmq.SNDMORE), int(zmq.EVENTS), int(zmq.POLLIN)


def send_frames(sock: zmq.Socket, frames: list[bytes], flags: int = 0, copy: bool = True) -> None:
    """Send ``frames`` as one multipart message (``flags``: zmq.NOBLOCK, or 0)."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        _SEND(sock, frame, flags | _SNDMORE if i < last else flags, copy=copy)


def recv_frames(sock: zmq.Socket, flags: int = 0) -> list[bytes]:
    """Receive one multipart message (``flags``: zmq.NOBLOCK raises zmq.Again when none is waiting)."""
    frame = _RECV(sock, flags, copy=False)  # a Frame knows whether more follow (the socket option is an enum call)
    frames = [frame.bytes]
    while frame.more:
        frame = _RECV(sock, flags, copy=False)
        frames.append(frame.bytes)
    return frames


def readable(sock: zmq.Socket) -> bool:
    """Whether a message is waiting (ZeroMQ's own event state: no system call)."""
    return bool(_GET(sock, _EVENTS) & _POLLIN)


# --- worker -> supervisor ---------------------------------------------------

_HELLO = struct.Struct(">32s32s64sI")


@dataclass(frozen=True, slots=True)
class Hello:
    """First frame of a worker: its spawn token, its fresh public key, proof it holds the key."""

    token: bytes
    worker_key: bytes
    proof: bytes
    pid: int
    confinement: dict[str, str]

    def encode(self) -> list[bytes]:
        return [
            header(WorkerType.HELLO),
            _HELLO.pack(self.token, self.worker_key, self.proof, self.pid),
            encode_json(self.confinement),
        ]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Hello:
        if len(frames) != 2 or len(frames[0]) != _HELLO.size:
            raise ProtocolError("hello must be a 132-byte frame and a confinement frame")
        confinement = decode_json(frames[1], "hello confinement")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in confinement.items()):
            raise ProtocolError("hello confinement must map strings to strings")
        token, worker_key, proof, pid = _HELLO.unpack(frames[0])
        return cls(token, worker_key, proof, pid, confinement)


_RESULT_META = struct.Struct(">QB")
_HAS_STATE = 0x01


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one call: its signed records and, if it changed, the new state."""

    call_id: int
    state: bytes | None
    records: list[bytes]

    def encode(self) -> list[bytes]:
        flags = _HAS_STATE if self.state is not None else 0
        frames = [header(WorkerType.RESULT), _RESULT_META.pack(self.call_id, flags)]
        if self.state is not None:
            frames.append(self.state)
        frames.extend(self.records)
        return frames

    @classmethod
    def decode(cls, frames: list[bytes], *, max_records: int) -> Result:
        if not frames or len(frames[0]) != _RESULT_META.size:
            raise ProtocolError("result must start with a 9-byte meta frame")
        call_id, flags = _RESULT_META.unpack(frames[0])
        if flags & ~_HAS_STATE:
            raise ProtocolError(f"result has unknown flags {flags:#x}")
        rest = frames[1:]
        state = None
        if flags & _HAS_STATE:
            if not rest:
                raise ProtocolError("result announces a state frame but has none")
            state, rest = rest[0], rest[1:]
        if not rest:
            raise ProtocolError("result carries no record")
        if len(rest) > max_records:
            raise ProtocolError(f"result carries {len(rest)} records, more than {max_records}")
        return cls(call_id=call_id, state=state, records=rest)


# --- supervisor -> worker ---------------------------------------------------

_CALL = struct.Struct(">QB")


@dataclass(frozen=True, slots=True)
class Call:
    call_id: int
    kind: CallKind
    data: bytes

    def encode(self) -> list[bytes]:
        return [header(SupervisorType.CALL), _CALL.pack(self.call_id, self.kind), self.data]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Call:
        if len(frames) != 2 or len(frames[0]) != _CALL.size:
            raise ProtocolError("call must be a 9-byte meta frame and a data frame")
        call_id, kind = _CALL.unpack(frames[0])
        try:
            return cls(call_id, CallKind(kind), frames[1])
        except ValueError:
            raise ProtocolError(f"unknown call kind {kind}") from None


# --- JSON frames (spec, fault, control) ---------------------------------------

MAX_JSON_BYTES = 1024 * 1024  # every JSON frame a process reads from a peer it does not trust
MAX_REPLY_JSON_BYTES = 256 * 1024 * 1024  # a control reply, read by a client from its own supervisor


def encode_json(obj: Any) -> bytes:
    """Keys sorted, no spaces, non-ASCII text escaped: the canonical form, which records sign (a genesis's
    ``config``, a worker key's ``confinement``) and every frame to a worker uses."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8")


def encode_reply(obj: Any) -> bytes:
    """A control reply: keys sorted and no spaces as ``encode_json``, text as UTF-8. Written by orjson,
    about ten times faster than ``json``: the longest replies list every agent of a home."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # an integer past 64 bits or a lone surrogate: only json writes those
        return encode_json(obj)


def encode_request(obj: Any) -> bytes:
    """A control request: JSON with text as UTF-8, in any key order (the supervisor reads it as JSON and
    checks each field). Written by orjson: a client sends one with every call."""
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError:  # an integer past 64 bits or a lone surrogate: only json writes those
        return encode_json(obj)


def decode_reply(frame: bytes, limit: int = MAX_REPLY_JSON_BYTES) -> dict[str, Any]:
    """A control reply, at most ``limit`` bytes (a client trusts its supervisor, but not without bound)."""
    if len(frame) > limit:
        raise ProtocolError(f"the supervisor's reply of {len(frame)} bytes exceeds this client's limit of {limit} "
                            "bytes (max_reply_bytes)")
    try:
        obj = orjson.loads(frame)
    except orjson.JSONDecodeError:  # a reply json wrote and orjson refuses (an integer past 64 bits)
        obj = decode_json(frame, "reply", limit)
    if not isinstance(obj, dict):
        raise ProtocolError("reply must be a JSON object")
    return obj


def decode_json(frame: bytes, what: str, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    if len(frame) > limit:
        raise ProtocolError(f"{what} of {len(frame)} bytes exceeds {limit}")
    try:
        obj = json.loads(frame)
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, absurd integers, deep nesting
        raise ProtocolError(f"{what} is not valid JSON: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    return obj
