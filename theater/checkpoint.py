"""Signed checkpoints: the supervisor's statement of every chain's head, for keeping outside the home.

A chain verifies by itself, but nothing inside a home shows that a chain was
cut at its end, rolled back, or removed whole with its row: what is left is
consistent. A checkpoint, copied somewhere the home's writer cannot reach (a
witness), pins each chain's head (sequence and hash) at one moment under the
supervisor's signature; a later store must still hold each of those records.
``docs/event-records.md`` section 12 specifies the format for an independent
verifier.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import RecordError

__all__ = ["CHECKPOINT_DOMAIN", "Checkpoint", "Head", "fingerprint", "heads_from_json", "merkle", "merkle_root",
           "u64"]

CHECKPOINT_DOMAIN = b"theater-checkpoint-v1\x00"
VERSION = 1


def fingerprint(public_key: bytes) -> str:
    """A key's fingerprint: SHA-256 of its 32 raw bytes, hex, in groups of four for reading aloud."""
    digest = hashlib.sha256(public_key).hexdigest()
    return ":".join(digest[i:i + 4] for i in range(0, len(digest), 4))


@dataclass(frozen=True, slots=True)
class Head:
    chain: bytes  # the chain's id: an agent's or a supervisor node's (16 bytes)
    seq: int
    hash: bytes

    def leaf(self) -> bytes:
        return hashlib.sha256(b"\x00" + self.chain + self.seq.to_bytes(8, "big") + self.hash).digest()


def u64(value: object, what: str) -> int:
    """A number of a signed statement (a record number, a time in ns): a JSON integer in 0 .. 2^64 - 1, as the
    u64 fields it stands for (a Merkle leaf's seq, a record's time); RecordError otherwise, never an int()
    that overflows or quietly takes a float or a string."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**64:
        raise RecordError(f"{what} is not an integer in 0 .. 2^64 - 1")
    return value


def heads_from_json(doc: dict[str, Any], what: str) -> tuple[Head, ...]:
    """A signed statement's ``chains`` (a checkpoint's, a key rotation's), checked to be in id order, each
    once, and to have the ``root`` the statement states; RecordError (or KeyError, ValueError) otherwise."""
    heads = tuple(Head(bytes.fromhex(c["id"]), u64(c["seq"], f"a {what} chain's seq"), bytes.fromhex(c["hash"]))
                  for c in doc["chains"])
    if list(heads) != sorted(heads, key=lambda h: h.chain) or len({h.chain for h in heads}) != len(heads):
        raise RecordError(f"{what} chains are not in id order, or repeat")
    if merkle_root(list(heads)).hex() != doc["root"]:
        raise RecordError(f"{what} root does not match its chains")
    return heads


def merkle_root(heads: list[Head]) -> bytes:
    """Leaves in chain-id order; a parent is SHA-256(0x01 || left || right); an odd node moves up as is;
    no heads: SHA-256 of nothing."""
    return merkle([h.leaf() for h in sorted(heads, key=lambda h: h.chain)])


def merkle(leaves: list[bytes]) -> bytes:
    """The root over leaf hashes already made (``0x00 || ...``), as ``merkle_root`` builds it."""
    level = list(leaves)
    if not level:
        return hashlib.sha256(b"").digest()
    while len(level) > 1:
        level = [hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest() if i + 1 < len(level) else level[i]
                 for i in range(0, len(level), 2)]
    return level[0]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    time_ns: int
    heads: tuple[Head, ...]  # in chain-id order
    public_key: bytes
    signature: bytes = b""

    def body(self) -> dict[str, Any]:
        """Everything but the signature, as JSON values."""
        return {"version": VERSION, "time_ns": self.time_ns, "public_key": self.public_key.hex(),
                "root": merkle_root(list(self.heads)).hex(),
                "chains": [{"id": h.chain.hex(), "seq": h.seq, "hash": h.hash.hex()} for h in self.heads]}

    def signed_bytes(self) -> bytes:
        """What the signature covers: the domain, then the body as canonical JSON."""
        return CHECKPOINT_DOMAIN + json.dumps(self.body(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def make(cls, heads: list[Head], key: Ed25519PrivateKey, time_ns: int) -> Checkpoint:
        public = key.public_key().public_bytes_raw()
        unsigned = cls(time_ns, tuple(sorted(heads, key=lambda h: h.chain)), public)
        return cls(unsigned.time_ns, unsigned.heads, public, key.sign(unsigned.signed_bytes()))

    def to_json(self) -> bytes:
        return json.dumps({**self.body(), "signature": self.signature.hex()}, sort_keys=True, indent=1).encode() + b"\n"

    @classmethod
    def parse(cls, data: bytes) -> Checkpoint:
        """Parse and check a checkpoint file's own consistency (root, order, signature under its own key);
        raise RecordError naming what is wrong. Whether the key is the right one is the caller's question."""
        try:
            doc = json.loads(data)
            if doc["version"] != VERSION:
                raise RecordError(f"checkpoint version {doc['version']}, this build reads {VERSION}")
            heads = heads_from_json(doc, "checkpoint")
            point = cls(u64(doc["time_ns"], "the checkpoint's time_ns"), heads, bytes.fromhex(doc["public_key"]),
                        bytes.fromhex(doc["signature"]))
        except (ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: JSON nested too deep
            raise RecordError(f"not a checkpoint: {type(exc).__name__}: {exc}") from None
        try:
            Ed25519PublicKey.from_public_bytes(point.public_key).verify(point.signature, point.signed_bytes())
        except (InvalidSignature, ValueError):
            raise RecordError("checkpoint signature does not verify") from None
        return point
