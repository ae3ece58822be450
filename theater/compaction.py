"""Compaction statements: how a chain stays verifiable after its old records are dropped.

``theater gc`` (and a policy's ``[retention]``) drop an agent's records
``1 .. cut_seq - 1``; the genesis stays. In their place the supervisor signs a
statement of what the verifier would have known at the cut: the hash of
record ``cut_seq - 1``, the state hash, the worker key in force, and a
Merkle root over the dropped records. A verifier checks the genesis, then the
statement (under the supervisor's key), then carries on from ``cut_seq`` as if
it had read every dropped record. Without the key nobody can drop records and
write such a statement; ``docs/event-records.md`` section 13 specifies it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .checkpoint import merkle, u64
from .errors import RecordError

__all__ = ["COMPACTION_DOMAIN", "Compaction", "dropped_root"]

COMPACTION_DOMAIN = b"theater-compaction-v1\x00"
VERSION = 1


def dropped_root(records: list[tuple[int, bytes]]) -> bytes:
    """Merkle root over the dropped records, in sequence order: leaf = SHA-256(0x00 || seq u64 || hash)."""
    return merkle([hashlib.sha256(b"\x00" + seq.to_bytes(8, "big") + h).digest() for seq, h in records])


@dataclass(frozen=True, slots=True)
class Compaction:
    agent_id: bytes
    genesis_hash: bytes
    cut_seq: int  # the first record kept after the genesis
    prev_hash: bytes  # hash of record cut_seq - 1
    state_hash: bytes  # the state hash after record cut_seq - 1
    worker_key: bytes  # the worker key in force after record cut_seq - 1; empty for none
    incarnation: int
    dropped_from: int  # the first record this compaction dropped (an earlier one dropped those before it)
    dropped_bytes: int  # the size of records dropped_from .. cut_seq - 1
    root: bytes  # dropped_root of them
    previous: bytes  # SHA-256 of the earlier compaction statement's signed bytes; empty if none
    time_ns: int
    public_key: bytes
    signature: bytes = b""

    def body(self) -> dict[str, Any]:
        return {"version": VERSION, "agent_id": self.agent_id.hex(), "genesis_hash": self.genesis_hash.hex(),
                "cut_seq": self.cut_seq, "prev_hash": self.prev_hash.hex(), "state_hash": self.state_hash.hex(),
                "worker_key": self.worker_key.hex(), "incarnation": self.incarnation,
                "dropped": {"from": self.dropped_from, "records": self.cut_seq - self.dropped_from, "bytes": self.dropped_bytes,
                            "root": self.root.hex()},
                "previous": self.previous.hex(),
                "time_ns": self.time_ns, "public_key": self.public_key.hex()}

    def signed_bytes(self) -> bytes:
        return COMPACTION_DOMAIN + json.dumps(self.body(), sort_keys=True, separators=(",", ":")).encode()

    def signed(self, key: Ed25519PrivateKey) -> Compaction:
        unsigned = dataclasses.replace(self, public_key=key.public_key().public_bytes_raw(), signature=b"")
        return dataclasses.replace(unsigned, signature=key.sign(unsigned.signed_bytes()))

    def digest(self) -> bytes:
        """What a later statement names as ``previous``."""
        return hashlib.sha256(self.signed_bytes()).digest()

    def to_json(self) -> str:
        return json.dumps({**self.body(), "signature": self.signature.hex()}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def parse(cls, data: str | bytes, trusted: Collection[bytes]) -> Compaction:
        """Parse a statement and check it is whole and signed by one of the supervisor's keys ``trusted``
        (there is more than one after a key rotation); RecordError otherwise."""
        try:
            doc = json.loads(data)
            if doc["version"] != VERSION:
                raise RecordError(f"compaction statement version {doc['version']}, this build reads {VERSION}")
            dropped = doc["dropped"]
            point = cls(bytes.fromhex(doc["agent_id"]), bytes.fromhex(doc["genesis_hash"]),
                        u64(doc["cut_seq"], "the compaction statement's cut_seq"),
                        bytes.fromhex(doc["prev_hash"]), bytes.fromhex(doc["state_hash"]),
                        bytes.fromhex(doc["worker_key"]), u64(doc["incarnation"], "the compaction statement's incarnation"),
                        u64(dropped["from"], "the compaction statement's dropped from"),
                        u64(dropped["bytes"], "the compaction statement's dropped bytes"),
                        bytes.fromhex(dropped["root"]), bytes.fromhex(doc["previous"]),
                        u64(doc["time_ns"], "the compaction statement's time_ns"), bytes.fromhex(doc["public_key"]),
                        bytes.fromhex(doc["signature"]))
        except (ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: JSON nested too deep
            raise RecordError(f"not a compaction statement: {type(exc).__name__}: {exc}") from None
        if point.public_key not in trusted:
            raise RecordError("the compaction statement is signed by another key than the supervisor's")
        if not 1 <= point.dropped_from < point.cut_seq or dropped["records"] != point.cut_seq - point.dropped_from:
            raise RecordError(f"the compaction statement's cut ({point.cut_seq}) and what it says it dropped "
                              f"(from {point.dropped_from}, {dropped['records']} records) do not agree")
        try:
            Ed25519PublicKey.from_public_bytes(point.public_key).verify(point.signature, point.signed_bytes())
        except (InvalidSignature, ValueError):
            raise RecordError("the compaction statement's signature does not verify") from None
        return point

