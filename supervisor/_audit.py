"""Offline verification of a home's event store: what ``theater verify`` runs.

It reads the SQLite file read-only and needs only the supervisor's public key:
no supervisor has to be running.
"""

from __future__ import annotations

import sqlite3
import uuid
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from theater.chain import verify_chain
from theater.errors import RecordError
from theater.home import Home
from theater.records import Record, sha256

from ._errors import NotFound, StoreError
from ._store import find_chain, open_readonly, read_chain

__all__ = ["ChainReport", "chain_records", "open_readonly", "verify_home"]


@dataclass(frozen=True, slots=True)
class ChainReport:
    agent_id: str
    name: str
    records: int
    ok: bool
    problem: str

    def as_dict(self) -> dict[str, object]:
        return {"id": self.agent_id, "name": self.name, "records": self.records, "ok": self.ok, "problem": self.problem}


def chain_records(home: Home, ref: str, after: int = -1) -> list[Record]:
    """One chain's records after ``after``, read from the store itself (no supervisor needed)."""
    db = open_readonly(home.store)
    try:
        found = find_chain(db, ref)
        if found is None:
            raise NotFound(f"no agent or supervisor node named or with id {ref!r} in {home.store}")
        return [Record.parse(raw) for raw in read_chain(db, found[0], after)]
    finally:
        db.close()


def verify_home(home: Home, agent: str | None = None) -> list[ChainReport]:
    try:
        key = Ed25519PublicKey.from_public_bytes(home.public_key.read_bytes())
    except FileNotFoundError:
        raise StoreError(f"{home.public_key}: the supervisor's public key is missing") from None
    db = open_readonly(home.store)
    try:
        db.execute("BEGIN")  # one snapshot: a live supervisor may commit while we read
        rows = db.execute("SELECT id, name, head_seq, head_hash, state_hash, state FROM agents ORDER BY created_ns").fetchall()
        if agent is not None:
            rows = [r for r in rows if agent in (r[1], str(uuid.UUID(bytes=r[0])))]
            if not rows and not db.execute("SELECT 1 FROM nodes WHERE name=? OR hex(id)=?",
                                            (agent, agent.replace("-", "").upper())).fetchone():
                raise NotFound(f"no agent or supervisor node named or with id {agent!r} in {home.store}")
        reports = [_verify_one(db, key, *row) for row in rows]
        nodes = db.execute("SELECT id, name, head_seq, head_hash FROM nodes ORDER BY created_ns").fetchall()
        if agent is not None:
            nodes = [r for r in nodes if agent in (r[1], str(uuid.UUID(bytes=r[0])))]
        empty = sha256(b"")  # a node's chain has no state: every record states the empty state's hash
        return reports + [_verify_one(db, key, node_id, name, head_seq, head_hash, empty, b"")
                          for node_id, name, head_seq, head_hash in nodes]
    finally:
        db.close()


def _verify_one(db: sqlite3.Connection, key: Ed25519PublicKey, agent_id: bytes, name: str, head_seq: int,
                head_hash: bytes, state_hash: bytes, state: bytes) -> ChainReport:
    raws = list(read_chain(db, agent_id))
    ident = str(uuid.UUID(bytes=agent_id))
    try:
        verifier = verify_chain(raws, key)
        if verifier.agent_id != agent_id:
            raise RecordError("the chain belongs to another agent")
        if verifier.next_seq - 1 != head_seq or verifier.head_hash != head_hash:
            raise RecordError(f"the stored head (record {head_seq}) is not the chain's last record ({verifier.next_seq - 1})")
        if verifier.state_hash != state_hash or sha256(state) != state_hash:
            raise RecordError("the stored state does not match the chain's state hash")
    except RecordError as exc:
        return ChainReport(ident, name, len(raws), False, str(exc))
    return ChainReport(ident, name, len(raws), True, "")
