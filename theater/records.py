"""Event records: the canonical, versioned, signed unit of an agent's history.

The byte layout is specified in ``docs/event-records.md``; this module is the
reference implementation and ``tests/vectors/`` holds golden records. An
auditor needs nothing but this module (or the document) and the supervisor's
public key to check a chain.

Layout of a record (integers big-endian)::

    body      = version:u8 kind:u8 signer:u8 agent_id:16 seq:u64 time_ns:u64
                prev_hash:32 state_hash:32 payload_len:u32 payload
    signature = Ed25519(signer key, DOMAIN || body)          64 bytes
    record    = body || signature        (a covered record: body alone)
    hash      = SHA-256(record)

Version 2 adds the covered record: a worker's log or host-call record written
during a call carries no signature of its own (signer 2); the worker's signed
record that ends the call names its hash, directly or through other covered
records, so its one signature covers them all. Version-1 records (each one
signed) are still read and verified.

Bytes that have not passed :func:`verify_record` are ``unverified`` and are
only ever handled as such.
"""

from __future__ import annotations

import enum
import hashlib
import struct
import uuid
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from . import ed25519
from .ed25519 import key_weakness
from .errors import RecordError

__all__ = [
    "COVERABLE",
    "DOMAIN",
    "FIELDS",
    "HEADER",
    "HELLO_DOMAIN",
    "MAX_RECORD_BYTES",
    "STATUSES",
    "VERSION",
    "VERSIONS",
    "ZERO_HASH",
    "Kind",
    "Record",
    "Signer",
    "decode_payload",
    "encode_payload",
    "sha256",
    "sign_hello",
    "sign_record",
    "signature_valid",
    "verify_hello",
    "verify_record",
]

VERSION = 2
VERSIONS = (1, 2)  # read and verified; new records are written as VERSION
DOMAIN = b"theater/event-record/v1\x00"
HEADER = struct.Struct(">BBB16sQQ32s32sI")
SIGNATURE_BYTES = 64
ZERO_HASH = bytes(32)
# A handle record carries a message and a reply, each at most 64 MiB (the
# widest max_message_bytes a policy may set), plus small fields.
MAX_RECORD_BYTES = 129 * 1024 * 1024


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


class Signer(enum.IntEnum):
    """Whose key signs a record: the supervisor's long-term key or the worker's."""

    SUPERVISOR = 0
    WORKER = 1
    COVERED = 2  # version 2: no signature of its own; the worker's next signed record covers it


class Kind(enum.IntEnum):
    """Record kinds. Values are part of the format and never reused."""

    GENESIS = 1  # supervisor: the agent exists; its first worker's key
    WORKER_KEY = 2  # supervisor: a new worker (restart) and its key
    INIT = 3  # worker: the init call and its outcome
    HANDLE = 4  # worker: one message and its outcome
    HOST_CALL = 5  # worker: a nondeterministic value handed to the guest
    LOG = 6  # worker: a log line from the guest
    EXIT = 7  # supervisor: the worker ended, and why
    VIOLATION = 8  # supervisor: the worker broke the protocol and was killed
    CHILD_EXIT = 9  # worker: the agent was told one of its children exited
    STATE_RESET = 10  # supervisor: the agent starts again from its initial state
    NODE_GENESIS = 11  # supervisor: a supervisor node of a tree exists (a node chain's first record)
    NODE_START = 12  # supervisor: the node starts its children
    NODE_RESTART = 13  # supervisor: the node restarts children after one exited
    NODE_GIVE_UP = 14  # supervisor: the node restarted too often and gives up
    NODE_TERMINATE = 15  # supervisor: the node's children have stopped; the node is down
    MESSAGE = 16  # worker: one message from another agent or a timer, and its outcome
    REMOVED = 17  # supervisor: the agent is removed (theater rm); the chain ends here, its name is free


# The worker kinds a version-2 record may carry covered (written during a call, before the record that ends it).
COVERABLE = frozenset({Kind.HOST_CALL, Kind.LOG})

# The kinds of a supervisor node's chain; every other kind belongs to agents' chains.
NODE_KINDS = frozenset({Kind.NODE_GENESIS, Kind.NODE_START, Kind.NODE_RESTART, Kind.NODE_GIVE_UP,
                        Kind.NODE_TERMINATE})
GENESES = frozenset({Kind.GENESIS, Kind.NODE_GENESIS})


# Which key may sign each kind.
SIGNER_OF: dict[Kind, Signer] = {
    Kind.GENESIS: Signer.SUPERVISOR,
    Kind.WORKER_KEY: Signer.SUPERVISOR,
    Kind.INIT: Signer.WORKER,
    Kind.HANDLE: Signer.WORKER,
    Kind.HOST_CALL: Signer.WORKER,
    Kind.LOG: Signer.WORKER,
    Kind.EXIT: Signer.SUPERVISOR,
    Kind.VIOLATION: Signer.SUPERVISOR,
    Kind.CHILD_EXIT: Signer.WORKER,
    Kind.MESSAGE: Signer.WORKER,
    Kind.REMOVED: Signer.SUPERVISOR,
    Kind.STATE_RESET: Signer.SUPERVISOR,
    Kind.NODE_GENESIS: Signer.SUPERVISOR,
    Kind.NODE_START: Signer.SUPERVISOR,
    Kind.NODE_RESTART: Signer.SUPERVISOR,
    Kind.NODE_GIVE_UP: Signer.SUPERVISOR,
    Kind.NODE_TERMINATE: Signer.SUPERVISOR,
}

# Payload schema of each kind: fields in order, each (name, type). Types:
#   u8 / u32 / u64   big-endian unsigned integer
#   bytes            u32 length, then the bytes
#   str              u32 length, then UTF-8
#   opt-bytes        u8 0 (absent) or u8 1 then bytes
FIELDS: dict[Kind, tuple[tuple[str, str], ...]] = {
    Kind.GENESIS: (
        ("name", "str"),
        ("component_sha256", "bytes"),
        ("config", "str"),
        ("worker_key", "bytes"),
        ("confinement", "str"),
    ),
    Kind.WORKER_KEY: (
        ("incarnation", "u32"),
        ("worker_key", "bytes"),
        ("confinement", "str"),
        ("reason", "str"),
        ("component_sha256", "bytes"),
    ),
    Kind.INIT: (
        ("args", "bytes"),
        ("status", "str"),
        ("error", "str"),
        ("fuel", "u64"),
    ),
    Kind.HANDLE: (
        ("message", "bytes"),
        ("reply", "opt-bytes"),
        ("status", "str"),
        ("error", "str"),
        ("fuel", "u64"),
    ),
    Kind.HOST_CALL: (
        ("interface", "str"),
        ("function", "str"),
        ("input", "bytes"),
        ("output", "bytes"),
    ),
    Kind.LOG: (
        ("level", "str"),
        ("message", "str"),
        ("truncated", "u8"),
    ),
    Kind.EXIT: (
        ("incarnation", "u32"),
        ("reason", "str"),
        ("detail", "str"),
    ),
    Kind.VIOLATION: (
        ("incarnation", "u32"),
        ("reason", "str"),
        ("evidence", "bytes"),
    ),
    Kind.CHILD_EXIT: (
        ("child", "bytes"),
        ("exit_hash", "bytes"),
        ("reason", "str"),
        ("status", "str"),
        ("error", "str"),
        ("fuel", "u64"),
    ),
    Kind.STATE_RESET: (
        ("reason", "str"),
    ),
    Kind.REMOVED: (
        ("reason", "str"),
    ),
    Kind.MESSAGE: (
        ("origin", "str"),
        ("sender", "bytes"),
        ("message_id", "bytes"),
        ("message", "bytes"),
        ("reply", "opt-bytes"),
        ("status", "str"),
        ("error", "str"),
        ("fuel", "u64"),
    ),
    Kind.NODE_GENESIS: (
        ("name", "str"),
        ("config", "str"),
        ("parent", "str"),
    ),
    Kind.NODE_START: (
        ("reason", "str"),
    ),
    Kind.NODE_RESTART: (
        ("child", "str"),
        ("reason", "str"),
        ("strategy", "str"),
        ("stop", "str"),
        ("start", "str"),
        ("retry", "str"),
    ),
    Kind.NODE_GIVE_UP: (
        ("child", "str"),
        ("reason", "str"),
        ("detail", "str"),
    ),
    Kind.NODE_TERMINATE: (
        ("reason", "str"),
        ("detail", "str"),
    ),
}

# The `status` of an init or handle record: "ok" or one failure class.
STATUSES = (
    "ok", "guest-error", "out-of-fuel", "deadline", "memory", "stack-overflow", "trap",
    "host-limit", "malformed-result", "too-large",
)

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_KIND_OF = {k.value: k for k in Kind}  # dict lookups: an enum call costs more than the rest of a small parse
_SIGNER_OF_VALUE = {s.value: s for s in Signer}
_NAMES = {kind: frozenset(name for name, _ in schema) for kind, schema in FIELDS.items()}


def encode_payload(kind: Kind, fields: dict[str, Any]) -> bytes:
    """Encode ``fields`` (exactly the kind's schema, no more, no less) canonically."""
    schema = FIELDS[kind]
    if fields.keys() != _NAMES[kind]:
        names = [name for name, _ in schema]
        raise RecordError(f"{kind.name.lower()} payload needs fields {names}, got {sorted(fields)}")
    out: list[bytes] = []
    for name, typ in schema:
        value = fields[name]
        if typ == "str":
            raw = value.encode("utf-8")
            out += (_U32.pack(len(raw)), raw)
        elif typ == "bytes":
            out += (_U32.pack(len(value)), value)
        elif typ == "u64":
            out.append(_U64.pack(value))
        elif typ == "u32":
            out.append(_U32.pack(value))
        elif typ == "u8":
            out.append(bytes((int(value),)))
        elif typ == "opt-bytes":
            out += (b"\x00",) if value is None else (b"\x01", _U32.pack(len(value)), value)
        else:  # pragma: no cover - schema is static
            raise AssertionError(typ)
    return b"".join(out)


def decode_payload(kind: Kind, payload: bytes) -> dict[str, Any]:
    """Decode a payload; anything but an exact, canonical encoding is an error.

    Read in place with ``unpack_from`` and one slice per variable-length field: every record a worker sends
    is decoded once on the supervisor's loop."""
    if not isinstance(payload, bytes):
        payload = bytes(payload)
    fields: dict[str, Any] = {}
    size = len(payload)
    pos = 0
    name = ""
    try:
        for name, typ in FIELDS[kind]:
            if typ == "u64":
                fields[name] = _U64.unpack_from(payload, pos)[0]
                pos += 8
            elif typ == "u32":
                fields[name] = _U32.unpack_from(payload, pos)[0]
                pos += 4
            elif typ == "u8":
                fields[name] = payload[pos]
                pos += 1
            else:  # str, bytes, opt-bytes
                if typ == "opt-bytes":
                    flag = payload[pos]
                    pos += 1
                    if flag == 0:
                        fields[name] = None
                        continue
                    if flag != 1:
                        raise RecordError(f"field {name!r}: option flag must be 0 or 1, got {flag}")
                length = _U32.unpack_from(payload, pos)[0]
                pos += 4
                if pos + length > size:
                    raise IndexError
                raw = payload[pos : pos + length]
                pos += length
                if typ == "str":
                    try:
                        fields[name] = raw.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise RecordError(f"field {name!r} is not valid UTF-8") from exc
                else:
                    fields[name] = raw
    except (struct.error, IndexError):
        raise RecordError(f"{kind.name.lower()} payload truncated in field {name!r}") from None
    if pos != size:
        raise RecordError(f"{kind.name.lower()} payload has {size - pos} trailing bytes")
    return fields


@dataclass(frozen=True, slots=True)
class Record:
    """A decoded record. ``raw`` is the exact signed encoding; ``hash`` links the chain."""

    kind: Kind
    signer: Signer
    agent_id: bytes
    seq: int
    time_ns: int
    prev_hash: bytes
    state_hash: bytes
    payload: bytes
    signature: bytes
    raw: bytes
    hash: bytes
    # The payload decoded once (by parse, or on first use); not part of the record's identity.
    _decoded: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def agent_uuid(self) -> str:
        return str(uuid.UUID(bytes=self.agent_id))

    def fields(self) -> dict[str, Any]:
        """The decoded payload (a fresh dict; the payload is decoded only once per record)."""
        if self._decoded is None:
            object.__setattr__(self, "_decoded", decode_payload(self.kind, self.payload))
        assert self._decoded is not None
        return dict(self._decoded)

    @classmethod
    def parse(cls, unverified: bytes) -> Record:
        """Parse the structure only. The signature is NOT checked: see :func:`verify_record`."""
        if len(unverified) > MAX_RECORD_BYTES:
            raise RecordError(f"record of {len(unverified)} bytes exceeds {MAX_RECORD_BYTES}")
        if len(unverified) < HEADER.size:
            raise RecordError(f"record of {len(unverified)} bytes is shorter than the fixed header")
        (version, kind, signer, agent_id, seq, time_ns, prev_hash, state_hash, plen) = (
            HEADER.unpack_from(unverified)
        )
        if version not in VERSIONS:
            raise RecordError(f"unsupported record version {version}")
        kind_ = _KIND_OF.get(kind)
        signer_ = _SIGNER_OF_VALUE.get(signer)
        if kind_ is None or signer_ is None:
            raise RecordError(f"unknown record kind {kind} or signer {signer}")
        if signer_ is Signer.COVERED:
            if version < 2 or kind_ not in COVERABLE:
                raise RecordError(f"a version-{version} {kind_.name.lower()} record cannot be covered")
        elif SIGNER_OF[kind_] is not signer_:
            raise RecordError(f"{kind_.name.lower()} records are signed by the {SIGNER_OF[kind_].name.lower()}")
        end = HEADER.size + plen
        if end + (0 if signer_ is Signer.COVERED else SIGNATURE_BYTES) != len(unverified):
            raise RecordError("record length does not match its payload length")
        payload = unverified[HEADER.size : end]
        decoded = decode_payload(kind_, payload)  # structure must be canonical
        return cls(
            kind=kind_,
            signer=signer_,
            agent_id=agent_id,
            seq=seq,
            time_ns=time_ns,
            prev_hash=prev_hash,
            state_hash=state_hash,
            payload=payload,
            signature=unverified[end:],
            raw=unverified,
            hash=sha256(unverified),
            _decoded=decoded,
        )


def sign_record(
    key: Ed25519PrivateKey,
    *,
    kind: Kind,
    agent_id: bytes,
    seq: int,
    time_ns: int,
    prev_hash: bytes,
    state_hash: bytes,
    fields: dict[str, Any],
    covered: bool = False,
) -> Record:
    """Build, encode and sign a record; ``covered``: leave it unsigned, for the worker's next signed record
    to cover (a log or host-call record only)."""
    if len(agent_id) != 16 or len(prev_hash) != 32 or len(state_hash) != 32:
        raise RecordError("agent id must be 16 bytes and hashes 32 bytes")
    if covered and kind not in COVERABLE:
        raise RecordError(f"a {kind.name.lower()} record cannot be covered")
    signer = Signer.COVERED if covered else SIGNER_OF[kind]
    payload = encode_payload(kind, fields)
    body = HEADER.pack(
        VERSION, kind, signer, agent_id, seq, time_ns, prev_hash, state_hash, len(payload)
    ) + payload
    signature = b"" if covered else ed25519.sign(key, DOMAIN + body)
    raw = body + signature
    return Record(
        kind=kind,
        signer=signer,
        agent_id=agent_id,
        seq=seq,
        time_ns=time_ns,
        prev_hash=prev_hash,
        state_hash=state_hash,
        payload=payload,
        signature=signature,
        raw=raw,
        hash=sha256(raw),
    )


def signature_valid(record: Record, public_key: Ed25519PublicKey) -> bool:
    """Whether the record's own signature verifies under ``public_key`` (the ledger's batch check); a
    covered record has none, and is checked through the record that covers it."""
    if record.signer is Signer.COVERED:
        return False
    return ed25519.valid(public_key, record.signature, DOMAIN + record.raw[: -SIGNATURE_BYTES])


HELLO_DOMAIN = b"theater/hello/v1\x00"


def sign_hello(key: Ed25519PrivateKey, token: bytes) -> bytes:
    """A worker's proof that it holds the key it announces, bound to its spawn token."""
    return ed25519.sign(key, HELLO_DOMAIN + token)


def verify_hello(worker_key: bytes, token: bytes, proof: bytes) -> Ed25519PublicKey:
    """The worker's announced key, if it is a strict key (``ed25519.key_weakness``) and ``proof`` is its
    signature of ``token``; RecordError otherwise."""
    weakness = key_weakness(worker_key)
    if weakness is not None:
        raise RecordError(f"the hello's key {weakness}")
    try:
        key = Ed25519PublicKey.from_public_bytes(worker_key)
    except ValueError:
        raise RecordError("the hello's proof does not verify under the key it announces") from None
    if not ed25519.valid(key, proof, HELLO_DOMAIN + token):
        raise RecordError("the hello's proof does not verify under the key it announces")
    return key


def verify_record(record: Record, public_key: Ed25519PublicKey) -> None:
    """Check the record's signature; raise :class:`RecordError` if it does not verify."""
    if not signature_valid(record, public_key):
        raise RecordError(
            f"signature of record {record.seq} ({record.kind.name.lower()}) does not verify"
        )
