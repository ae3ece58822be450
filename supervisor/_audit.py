"""Offline verification of a home's event store: what ``theater verify`` runs.

It reads the SQLite file read-only and needs only the supervisor's public key:
no supervisor has to be running.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from theater.chain import verify_chain
from theater.checkpoint import Checkpoint, fingerprint
from theater.errors import RecordError
from theater.home import Home
from theater.records import Kind, Record, sha256

from ._errors import NotFound, StoreError
from ._store import find_chain, open_readonly, read_chain, read_chain_rows

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


def verify_home(home: Home, agent: str | None = None, *, pinned: bytes | None = None,
                checkpoint: Checkpoint | None = None) -> list[ChainReport]:
    """Every chain of the home (or the one of ``agent``), as ``theater verify`` reports them.

    ``pinned``: the supervisor's public key as the auditor holds it (otherwise the home's own
    ``supervisor.pub`` is trusted). ``checkpoint``: a checkpoint (signed by that key) whose every head the
    store must still hold."""
    try:
        raw = pinned if pinned is not None else home.public_key.read_bytes()
        key = Ed25519PublicKey.from_public_bytes(raw)
    except FileNotFoundError:
        raise StoreError(f"{home.public_key}: the supervisor's public key is missing") from None
    except ValueError:
        raise StoreError("the public key is not 32 bytes of an Ed25519 key") from None
    if checkpoint is not None and checkpoint.public_key != raw:
        raise StoreError(f"the checkpoint was signed by key {fingerprint(checkpoint.public_key)}, not by "
                         f"{fingerprint(raw)}")
    try:
        db = open_readonly(home.store)
        try:
            db.execute("BEGIN")  # one snapshot: a live supervisor may commit while we read
            reports = _verify_store(db, key, agent, home)
            if checkpoint is not None:
                reports += _against(db, checkpoint, {r.agent_id: r.name for r in reports})
            return reports
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{home.store}: not a readable event store: {exc}") from None


def _verify_store(db: sqlite3.Connection, key: Ed25519PublicKey, agent: str | None, home: Home) -> list[ChainReport]:
    rows = db.execute("SELECT id, name, head_seq, head_hash, state_hash, state, config FROM agents "
                      "ORDER BY created_ns").fetchall()
    nodes = db.execute("SELECT id, name, head_seq, head_hash FROM nodes ORDER BY created_ns").fetchall()
    if agent is not None:
        rows = [r for r in rows if agent in (r[1], str(uuid.UUID(bytes=r[0])))]
        nodes = [r for r in nodes if agent in (r[1], str(uuid.UUID(bytes=r[0])))]
        if not rows and not nodes:
            raise NotFound(f"no agent or supervisor node named or with id {agent!r} in {home.store}")
    reports = [_verify_one(db, key, agent_id, name, head_seq, head_hash, state_hash, state, json.loads(config))
               for agent_id, name, head_seq, head_hash, state_hash, state, config in rows]
    empty = sha256(b"")  # a node's chain has no state: every record states the empty state's hash
    reports += [_verify_one(db, key, node_id, name, head_seq, head_hash, empty, b"", None)
                for node_id, name, head_seq, head_hash in nodes]
    if agent is None:  # chains no row accounts for: a deleted agent, or records slipped in
        known = {r[0] for r in rows} | {n[0] for n in nodes}
        for (chain_id, count) in db.execute("SELECT agent_id, count(*) FROM records GROUP BY agent_id"):
            if chain_id not in known:
                ident = str(uuid.UUID(bytes=chain_id)) if len(chain_id) == 16 else chain_id.hex()
                reports.append(ChainReport(ident, "?", count, False,
                                           "records of a chain that no agents or nodes row names"))
    return reports


def _against(db: sqlite3.Connection, point: Checkpoint, names: dict[str, str]) -> list[ChainReport]:
    """What the store lost since ``point``: each head it pinned must still be in its chain, unchanged."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(point.time_ns / 1e9))
    out = []
    for head in point.heads:
        ident = str(uuid.UUID(bytes=head.chain)) if len(head.chain) == 16 else head.chain.hex()
        found = db.execute("SELECT hash FROM records WHERE agent_id=? AND seq=?", (head.chain, head.seq)).fetchone()
        last = db.execute("SELECT max(seq), count(*) FROM records WHERE agent_id=?", (head.chain,)).fetchone()
        if found is not None and found[0] == head.hash:
            continue
        if last[1] == 0:
            problem = f"deleted: the checkpoint of {when} UTC holds this chain at record {head.seq}; the store has none of it"
        elif found is None:
            problem = (f"truncated or transactions lost: the checkpoint of {when} UTC holds record {head.seq}; "
                       f"the chain ends at {last[0]}")
        else:
            problem = f"rolled back or rewritten: record {head.seq} is not the one the checkpoint of {when} UTC holds"
        out.append(ChainReport(ident, names.get(ident, "?"), int(last[1]), False, problem))
    return out


def _verify_one(db: sqlite3.Connection, key: Ed25519PublicKey, agent_id: bytes, name: str, head_seq: int,
                head_hash: bytes, state_hash: bytes, state: bytes, row_config: dict[str, Any] | None) -> ChainReport:
    rows = list(read_chain_rows(db, agent_id))
    raws = [row[-1] for row in rows]
    ident = str(uuid.UUID(bytes=agent_id))
    try:
        verifier = verify_chain(raws, key)
        if verifier.agent_id != agent_id:
            raise RecordError("the chain belongs to another agent")
        if verifier.next_seq - 1 != head_seq or verifier.head_hash != head_hash:
            raise RecordError(f"the stored head (record {head_seq}) is not the chain's last record ({verifier.next_seq - 1})")
        if verifier.state_hash != state_hash or sha256(state) != state_hash:
            raise RecordError("the stored state does not match the chain's state hash")
        records = [Record.parse(raw) for raw in raws]
        for (seq, kind, time_ns, hash_, _), record in zip(rows, records, strict=True):
            if (seq, kind, time_ns, hash_) != (record.seq, int(record.kind), record.time_ns, record.hash):
                raise RecordError(f"record {record.seq}: the store's columns (seq, kind, time, hash) differ from "
                                  "the signed record")
        genesis = records[0].fields()
        if genesis.get("name", name) != name:
            raise RecordError(f"the agents row names {name!r}, its genesis {genesis['name']!r}")
        if row_config is not None and json.loads(genesis["config"]) != row_config:
            raise RecordError("the agents row's configuration differs from the one its genesis signed")
        for record in records:
            if record.kind is Kind.CHILD_EXIT:
                f = record.fields()
                found = db.execute("SELECT kind FROM records WHERE agent_id=? AND hash=?",
                                   (f["child"], f["exit_hash"])).fetchone()
                if found is None or found[0] not in (Kind.EXIT, Kind.VIOLATION):
                    raise RecordError(f"record {record.seq} (child-exit) names exit record {f['exit_hash'].hex()[:16]}… "
                                      f"of child {uuid.UUID(bytes=f['child'])}, which is not in that child's chain")
    except RecordError as exc:
        return ChainReport(ident, name, len(raws), False, str(exc))
    return ChainReport(ident, name, len(raws), True, "")
