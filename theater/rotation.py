"""Key rotation: the supervisor's key changes under a statement both keys sign, pinned to every chain's head.

A rotation statement names the old and the new public key and, like a
checkpoint, every chain's head at the moment of the change; the old key and
the new key both sign it. Supervisor-signed records up to a chain's head in
the statement are the old key's; records after it, and every record of a chain
the statement does not list (made later), are the new key's. So a key leaked
after it was retired cannot sign anything that verifies after its rotation's
heads, and an auditor who pinned any one key of the sequence can follow it to
all the others. ``docs/event-records.md`` section 14 specifies the format.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .checkpoint import Head, fingerprint, heads_from_json, merkle_root, u64
from .ed25519 import key_weakness
from .errors import RecordError

__all__ = ["ROTATION_DOMAIN", "KeySchedule", "Rotation"]

ROTATION_DOMAIN = b"theater-key-rotation-v1\x00"
VERSION = 1


@dataclass(frozen=True, slots=True)
class Rotation:
    old_key: bytes
    new_key: bytes
    time_ns: int
    heads: tuple[Head, ...]  # every chain's head when the key changed, in chain-id order
    old_signature: bytes = b""
    new_signature: bytes = b""

    def body(self) -> dict[str, Any]:
        return {"version": VERSION, "old_key": self.old_key.hex(), "new_key": self.new_key.hex(),
                "time_ns": self.time_ns, "root": merkle_root(list(self.heads)).hex(),
                "chains": [{"id": h.chain.hex(), "seq": h.seq, "hash": h.hash.hex()} for h in self.heads]}

    def signed_bytes(self) -> bytes:
        return ROTATION_DOMAIN + json.dumps(self.body(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def make(cls, old: Ed25519PrivateKey, new: Ed25519PrivateKey, heads: list[Head], time_ns: int) -> Rotation:
        unsigned = cls(old.public_key().public_bytes_raw(), new.public_key().public_bytes_raw(), time_ns,
                       tuple(sorted(heads, key=lambda h: h.chain)))
        data = unsigned.signed_bytes()
        return cls(unsigned.old_key, unsigned.new_key, time_ns, unsigned.heads, old.sign(data), new.sign(data))

    def to_json(self) -> str:
        return json.dumps({**self.body(), "old_signature": self.old_signature.hex(),
                           "new_signature": self.new_signature.hex()}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def parse(cls, data: str | bytes) -> Rotation:
        """Parse a statement and check it is whole and signed by both its keys; RecordError otherwise."""
        try:
            doc = json.loads(data)
            if doc["version"] != VERSION:
                raise RecordError(f"key rotation version {doc['version']}, this build reads {VERSION}")
            heads = heads_from_json(doc, "key rotation")
            point = cls(bytes.fromhex(doc["old_key"]), bytes.fromhex(doc["new_key"]),
                        u64(doc["time_ns"], "the key rotation's time_ns"), heads,
                        bytes.fromhex(doc["old_signature"]), bytes.fromhex(doc["new_signature"]))
        except (ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: JSON nested too deep
            raise RecordError(f"not a key rotation statement: {type(exc).__name__}: {exc}") from None
        for which, key, signature in (("old", point.old_key, point.old_signature),
                                      ("new", point.new_key, point.new_signature)):
            weakness = key_weakness(key)
            if weakness is not None:
                raise RecordError(f"key rotation: the {which} key {weakness}")
            try:
                Ed25519PublicKey.from_public_bytes(key).verify(signature, point.signed_bytes())
            except InvalidSignature:
                raise RecordError(f"key rotation to {fingerprint(point.new_key)}: the {which} key's signature does "
                                  "not verify") from None
        return point


@dataclass(slots=True)
class KeySchedule:
    """Which supervisor key signed which record: the first key, then each rotation's new key."""

    keys: list[bytes]
    rotations: list[Rotation] = field(default_factory=list)
    _heads: list[dict[bytes, int]] = field(default_factory=list)
    _public: dict[bytes, Ed25519PublicKey] = field(default_factory=dict)

    @classmethod
    def build(cls, current: bytes, rotations: Sequence[Rotation]) -> KeySchedule:
        """The sequence ending at ``current`` (the key the supervisor signs with now); RecordError if the
        rotations do not link up (each one's old key is the previous one's new key) or do not end there."""
        schedule = cls._linked(current, rotations)
        if schedule.keys[-1] != current:
            raise RecordError(f"the key rotations end at {fingerprint(schedule.keys[-1])}, not at the supervisor's "
                              f"key {fingerprint(current)}")
        return schedule

    @classmethod
    def anchored(cls, anchor: bytes, rotations: Sequence[Rotation]) -> KeySchedule:
        """The sequence as a reader of a home or a bundle trusts it: from ``anchor`` (``supervisor.pub``, or the
        bundle's key), which must be one of its keys. It is the last, except after a supervisor died between
        committing a rotation and writing the new public key (its next start writes it): each later key is
        vouched for by a statement the key before it signed. RecordError if the rotations do not link up or
        never pass through ``anchor``."""
        schedule = cls._linked(anchor, rotations)
        if anchor not in schedule.keys:
            raise RecordError(f"the key rotations go from {fingerprint(schedule.keys[0])} to "
                              f"{fingerprint(schedule.keys[-1])} and never through the supervisor's key "
                              f"{fingerprint(anchor)}")
        return schedule

    @classmethod
    def _linked(cls, current: bytes, rotations: Sequence[Rotation]) -> KeySchedule:
        first = rotations[0].old_key if rotations else current
        schedule = cls([first])
        for n, rotation in enumerate(rotations, 1):
            if rotation.old_key != schedule.keys[-1]:
                raise RecordError(f"key rotation {n} starts from key {fingerprint(rotation.old_key)}, but the key "
                                  f"then in force was {fingerprint(schedule.keys[-1])}")
            if rotation.new_key in schedule.keys:
                raise RecordError(f"key rotation {n} goes back to a key used before")
            schedule.keys.append(rotation.new_key)
            schedule.rotations.append(rotation)
            schedule._heads.append({h.chain: h.seq for h in rotation.heads})
        return schedule

    def key_for(self, chain: bytes, seq: int) -> Ed25519PublicKey:
        """The key in force for a supervisor-signed record: the rotations it came after move it on."""
        index = 0
        for heads in self._heads:
            head = heads.get(chain)
            if head is not None and seq <= head:
                break
            index += 1
        raw = self.keys[index]
        if raw not in self._public:
            self._public[raw] = Ed25519PublicKey.from_public_bytes(raw)
        return self._public[raw]

    @property
    def current(self) -> bytes:
        return self.keys[-1]
