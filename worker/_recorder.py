"""The worker's half of the chain: it numbers, links and signs its records.

The worker's Ed25519 key is made at start and never leaves the process; the
supervisor learns the public half in the hello frame and signs it into the
chain, so every record below can be traced to this process. Logs and host
calls are written covered (unsigned): the record that ends the call is signed,
and through the hash chain its one signature covers them (docs/event-records.md).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from theater.records import COVERABLE, Kind, Record, sha256, sign_record

__all__ = ["Recorder"]


class Recorder:
    def __init__(self, key: Ed25519PrivateKey, agent_id: str, head_seq: int, head_hash: bytes, state_hash: bytes) -> None:
        self._key = key
        self.agent_id = uuid.UUID(agent_id).bytes
        self.next_seq = head_seq + 1
        self.head_hash = head_hash
        self.state_hash = state_hash
        self.pending: list[Record] = []

    def append(self, kind: Kind, fields: dict[str, Any], *, new_state: bytes | None = None) -> Record:
        """Sign a record as the next link; ``new_state`` is the state after it, if it changed."""
        state_hash = sha256(new_state) if new_state is not None else self.state_hash
        record = sign_record(
            self._key,
            kind=kind,
            agent_id=self.agent_id,
            seq=self.next_seq,
            time_ns=time.time_ns(),
            prev_hash=self.head_hash,
            state_hash=state_hash,
            fields=fields,
            covered=kind in COVERABLE,
        )
        self.next_seq += 1
        self.head_hash = record.hash
        self.state_hash = state_hash
        self.pending.append(record)
        return record

    def take(self) -> list[bytes]:
        records, self.pending = self.pending, []
        return [r.raw for r in records]
