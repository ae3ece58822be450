"""Offline verification of a home's event store: what ``theater verify`` runs.

It reads the SQLite file read-only and needs only the supervisor's public key:
no supervisor has to be running.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from theater.chain import ChainVerifier, verify_chain, walk_chain
from theater.checkpoint import Checkpoint, Head, fingerprint
from theater.compaction import Compaction
from theater.ed25519 import key_weakness
from theater.errors import RecordError
from theater.home import Home
from theater.records import Kind, Record, sha256
from theater.rotation import KeySchedule, Rotation

from ._errors import SHUTTING_DOWN, NotFound, Refused, StoreError
from ._store import compaction_of, find_chain, open_readonly, read_chain, read_chain_columns, rotations_of

__all__ = ["ChainReport", "chain_records", "open_readonly", "verify_home"]

T = TypeVar("T")
PROGRESS_STEPS = 10_000  # SQLite instructions between two looks at a verify's stop event


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


def replay_start(home: Home, ref: str, from_seq: int | None = None) -> tuple[list[Record], int, bytes | None]:
    """What a replay of ``ref`` runs: the genesis and the records after the point it starts from, that
    point's record number, and the state there (None: the genesis, with no state yet).

    It starts at the genesis, or where a compaction cut the chain (nothing before is stored), or with
    ``from_seq`` at the newest state snapshot before record ``from_seq``, so that record is replayed."""
    db = open_readonly(home.store)
    try:
        found = find_chain(db, ref)
        if found is None:
            raise NotFound(f"no agent or supervisor node named or with id {ref!r} in {home.store}")
        chain_id = found[0]
        points: dict[int, bytes] = {}
        cut = db.execute("SELECT cut_seq, state FROM compactions WHERE agent_id=?", (chain_id,)).fetchone()
        if cut is not None:
            points[cut[0] - 1] = bytes(cut[1])
        if from_seq is not None:
            points.update((seq, bytes(state)) for seq, state in db.execute(
                "SELECT seq, state FROM snapshots WHERE agent_id=? AND seq<?", (chain_id, from_seq)))
        floor = cut[0] - 1 if cut is not None else 0
        usable = [seq for seq in points if seq >= floor and (from_seq is None or seq < from_seq)]
        start = max(usable, default=floor)
        raws = read_chain(db, chain_id)
        genesis = next(raws, None)
        records = [Record.parse(genesis)] if genesis is not None else []
        records += [Record.parse(raw) for raw in read_chain(db, chain_id, start)]
        state = points.get(start)
        if state is not None:  # a stored state is a copy: it must hash to what the chain says it was there
            at = db.execute("SELECT raw FROM records WHERE agent_id=? AND seq=?", (chain_id, start)).fetchone()
            statement = compaction_of(db, chain_id)
            expected = Record.parse(at[0]).state_hash if at is not None else \
                bytes.fromhex(json.loads(statement)["state_hash"]) if statement is not None else None
            if expected != sha256(state):
                raise StoreError(f"the state kept at record {start} does not hash to the chain's state hash there")
        return records, start, state
    finally:
        db.close()


def verify_home(home: Home, agent: str | None = None, *, pinned: bytes | None = None,
                checkpoint: Checkpoint | None = None, stop: threading.Event | None = None) -> list[ChainReport]:
    """Every chain of the home (or the one of ``agent``), as ``theater verify`` reports them.

    ``pinned``: a public key of the supervisor as the auditor holds it (otherwise the home's own
    ``supervisor.pub`` is trusted); after key rotations, any key of the sequence. ``checkpoint``: a
    checkpoint (signed by one of those keys) whose every head the store must still hold. ``stop``: set when
    the supervisor running this verify goes down; the verify then ends at its next record or SQLite step, with
    Refused, rather than keep the process alive for the minutes a large home takes."""
    try:
        current = home.public_key.read_bytes()
    except FileNotFoundError:
        if pinned is None:
            raise StoreError(f"{home.public_key}: the supervisor's public key is missing") from None
        current = pinned
    try:
        db = open_readonly(home.store)
        if stop is not None:  # a query that is long (a home's every record) stops too: it ends "interrupted"
            db.set_progress_handler(stop.is_set, PROGRESS_STEPS)
        try:
            db.execute("BEGIN")  # one snapshot: a live supervisor may commit while we read
            schedule = key_schedule(current, rotations_of(db), pinned)
            if checkpoint is not None and checkpoint.public_key not in schedule.keys:
                raise StoreError(f"the checkpoint was signed by key {fingerprint(checkpoint.public_key)}, not by "
                                 f"{_keys_named(schedule)}")
            reports = _verify_store(db, schedule, agent, home, stop)
            names = {r.agent_id: r.name for r in reports}
            if checkpoint is not None:
                reports += _against(db, schedule, checkpoint.heads, checkpoint.time_ns, names, "checkpoint")
            if agent is None:
                for rotation in schedule.rotations:
                    reports += _against(db, schedule, rotation.heads, rotation.time_ns, names, "key rotation")
            if stop is not None and stop.is_set():  # an interrupted query looks like a table an older store lacks
                raise Refused(SHUTTING_DOWN)
            return reports
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        if stop is not None and stop.is_set():
            raise Refused(SHUTTING_DOWN) from None
        raise StoreError(f"{home.store}: not a readable event store: {exc}") from None


def _until(stop: threading.Event | None, items: Iterable[T]) -> Iterator[T]:
    """``items``, ending the verify with Refused once ``stop`` is set: what a verify spends its time on
    (checking each record) looks at it for every record."""
    for item in items:
        if stop is not None and stop.is_set():
            raise Refused(SHUTTING_DOWN)
        yield item


def known_keys(home: Home, bundle: Path | None = None) -> list[bytes]:
    """The supervisor's keys, oldest first, as the home's store (or a bundle) records its rotations; unchecked
    here (verify checks them): for matching a fingerprint an auditor holds."""
    try:
        if bundle is not None:
            doc = json.loads(bundle.read_bytes())
            current, statements = bytes.fromhex(doc["supervisor_public_key"]), doc.get("key_rotations") or []
        else:
            current = home.public_key.read_bytes()
            db = open_readonly(home.store) if home.store.exists() else None
            statements = rotations_of(db) if db is not None else []
            if db is not None:
                db.close()
        rotations = [Rotation.parse(s) for s in statements]
        return [rotations[0].old_key, *(r.new_key for r in rotations)] if rotations else [current]
    except (OSError, ValueError, KeyError, TypeError, RecursionError, RecordError, sqlite3.DatabaseError) as exc:
        raise StoreError(f"cannot read the supervisor's keys from {bundle or home.store}: {exc}") from None


def key_schedule(current: bytes, statements: list[str], pinned: bytes | None) -> KeySchedule:
    """The supervisor's keys, oldest first, from its rotation statements, through ``current`` (the home's or the
    bundle's key: ``KeySchedule.anchored``). The pinned key must be one of them; if it is not, the pinned key
    alone is the schedule (and what it did not sign fails)."""
    supervisor_key(current)
    try:
        schedule = KeySchedule.anchored(current, [Rotation.parse(s) for s in statements])
    except RecordError as exc:
        raise StoreError(f"the supervisor's key rotations do not verify: {exc}") from None
    if pinned is not None and pinned not in schedule.keys:
        supervisor_key(pinned)
        return KeySchedule.build(pinned, [])
    return schedule


def _keys_named(schedule: KeySchedule) -> str:
    return " or ".join(fingerprint(k) for k in schedule.keys)


def _compaction(statement: str | None, schedule: KeySchedule) -> Compaction | None:
    """A chain's compaction statement, checked under the supervisor's keys (RecordError if it is not sound)."""
    return Compaction.parse(statement, schedule.keys) if statement is not None else None


def supervisor_key(raw: bytes) -> Ed25519PublicKey:
    """The supervisor's public key, held to the strict key rule (``docs/event-records.md`` 2.1)."""
    weakness = key_weakness(raw)
    if weakness is not None:
        raise StoreError(f"the supervisor's public key {weakness}")
    return Ed25519PublicKey.from_public_bytes(raw)


def _verify_store(db: sqlite3.Connection, key: KeySchedule, agent: str | None, home: Home,
                  stop: threading.Event | None) -> list[ChainReport]:
    rows = db.execute("SELECT id, name, head_seq, head_hash, state_hash, state, config FROM agents "
                      "ORDER BY created_ns").fetchall()
    nodes = db.execute("SELECT id, name, head_seq, head_hash FROM nodes ORDER BY created_ns").fetchall()
    removed = db.execute("SELECT id, name, head_seq, head_hash, config FROM removed ORDER BY removed_ns").fetchall()
    if agent is not None:
        rows = [r for r in rows if agent in (r[1], str(uuid.UUID(bytes=r[0])))]
        nodes = [r for r in nodes if agent in (r[1], str(uuid.UUID(bytes=r[0])))]
        removed = [r for r in removed if agent in (r[1], str(uuid.UUID(bytes=r[0])))]
        if not rows and not nodes and not removed:
            raise NotFound(f"no agent or supervisor node named or with id {agent!r} in {home.store}")
    reports = [_verify_one(db, key, agent_id, name, head_seq, head_hash, state_hash, state, json.loads(config), stop)
               for agent_id, name, head_seq, head_hash, state_hash, state, config in rows]
    empty = sha256(b"")  # a node's chain has no state: every record states the empty state's hash
    reports += [_verify_one(db, key, node_id, name, head_seq, head_hash, empty, b"", None, stop)
                for node_id, name, head_seq, head_hash in nodes]
    for removed_id, name, head_seq, head_hash, config in removed:
        report = _verify_one(db, key, removed_id, name, head_seq, head_hash, None, None, json.loads(config), stop)
        if report.ok and Record.parse(next(read_chain(db, removed_id, head_seq - 1))).kind is not Kind.REMOVED:
            report = ChainReport(report.agent_id, name, report.records, False,
                                 "a removed agent's chain does not end with its removed record")
        reports.append(dataclasses.replace(report, name=f"{name} (removed)"))
    if agent is None:  # chains no row accounts for: a deleted agent, or records slipped in
        known = {r[0] for r in rows} | {n[0] for n in nodes} | {r[0] for r in removed}
        for (chain_id, count) in db.execute("SELECT agent_id, count(*) FROM records GROUP BY agent_id"):
            if chain_id not in known:
                ident = str(uuid.UUID(bytes=chain_id)) if len(chain_id) == 16 else chain_id.hex()
                reports.append(ChainReport(ident, "?", count, False,
                                           "records of a chain that no agents or nodes row names"))
    return reports


def _against(db: sqlite3.Connection, schedule: KeySchedule, heads: tuple[Head, ...], time_ns: int,
             names: dict[str, str], what: str) -> list[ChainReport]:
    """What the store lost since a signed statement of heads (a checkpoint, a key rotation): each head it
    pinned must still be in its chain, unchanged."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time_ns / 1e9))
    out = []
    for head in heads:
        ident = str(uuid.UUID(bytes=head.chain)) if len(head.chain) == 16 else head.chain.hex()
        found = db.execute("SELECT hash FROM records WHERE agent_id=? AND seq=?", (head.chain, head.seq)).fetchone()
        last = db.execute("SELECT max(seq), count(*) FROM records WHERE agent_id=?", (head.chain,)).fetchone()
        if found is not None and found[0] == head.hash:
            continue
        if found is None and _compacted_away(db, schedule, head):
            continue
        if last[1] == 0:
            problem = f"deleted: the {what} of {when} UTC holds this chain at record {head.seq}; the store has none of it"
        elif found is None:
            problem = (f"truncated or transactions lost: the {what} of {when} UTC holds record {head.seq}; "
                       f"the chain ends at {last[0]}")
        else:
            problem = f"rolled back or rewritten: record {head.seq} is not the one the {what} of {when} UTC holds"
        out.append(ChainReport(ident, names.get(ident, "?"), int(last[1]), False, problem))
    return out


def _compacted_away(db: sqlite3.Connection, schedule: KeySchedule, head: Head) -> bool:
    """Whether a head the store no longer holds was dropped by a compaction (docs/event-records.md 13). Only a
    statement that verifies under the supervisor's keys, of this chain, whose genesis is still stored, vouches
    for it: a compactions row left behind by a chain deleted whole, or one forged, vouches for nothing."""
    genesis = db.execute("SELECT hash FROM records WHERE agent_id=? AND seq=0", (head.chain,)).fetchone()
    try:
        cut = _compaction(compaction_of(db, head.chain), schedule)
    except RecordError:
        return False
    if cut is None or genesis is None or cut.agent_id != head.chain or cut.genesis_hash != genesis[0]:
        return False
    return head.seq < cut.cut_seq - 1 or (head.seq == cut.cut_seq - 1 and cut.prev_hash == head.hash)


def _verify_one(db: sqlite3.Connection, key: KeySchedule, agent_id: bytes, name: str, head_seq: int,
                head_hash: bytes, state_hash: bytes | None, state: bytes | None,
                row_config: dict[str, Any] | None, stop: threading.Event | None) -> ChainReport:
    """One chain against its row. ``state_hash`` and ``state`` None: a removed agent's, which keeps no state.

    The chain is read one record at a time (and each record parsed once), however long it is: a verify in
    the supervisor, or of a home whose chains have no retention limit, holds one record, not the chain."""
    ident = str(uuid.UUID(bytes=agent_id))
    count = db.execute("SELECT count(*) FROM records WHERE agent_id=?", (agent_id,)).fetchone()[0]
    stored = read_chain_columns(db, agent_id)
    raws = _until(stop, read_chain(db, agent_id, limit=-1))
    try:
        verifier = ChainVerifier(key.key_for(agent_id, 0), key)
        walk = walk_chain(raws, verifier, _compaction(compaction_of(db, agent_id), key))
        besides: RecordError | None = None  # the first problem beside the chain's own, told if the chain holds
        for position, (columns, record) in enumerate(zip(stored, walk, strict=True)):
            try:
                if tuple(columns) != (record.seq, int(record.kind), record.time_ns, record.hash):
                    raise RecordError(f"record {record.seq}: the store's columns (seq, kind, time, hash) differ "
                                      "from the signed record")
                if position == 0:
                    _check_genesis(record, agent_id, name, row_config)
                elif record.kind is Kind.CHILD_EXIT:
                    _check_child_exit(db, record)
            except RecordError as exc:
                besides = besides or exc
        if besides is not None:
            raise besides
        if verifier.next_seq - 1 != head_seq or verifier.head_hash != head_hash:
            raise RecordError(f"the stored head (record {head_seq}) is not the chain's last record ({verifier.next_seq - 1})")
        if state is not None and (verifier.state_hash != state_hash or sha256(state) != state_hash):
            raise RecordError("the stored state does not match the chain's state hash")
    except RecordError as exc:
        return ChainReport(ident, name, count, False, str(exc))
    return ChainReport(ident, name, count, True, "")


def _check_genesis(genesis: Record, agent_id: bytes, name: str, row_config: dict[str, Any] | None) -> None:
    """The genesis against the store's row: the same agent, name and configuration."""
    if genesis.agent_id != agent_id:
        raise RecordError("the chain belongs to another agent")
    fields = genesis.fields()
    if fields.get("name", name) != name:
        raise RecordError(f"the agents row names {name!r}, its genesis {fields['name']!r}")
    if row_config is not None and json.loads(fields["config"]) != row_config:
        raise RecordError("the agents row's configuration differs from the one its genesis signed")


def _check_child_exit(db: sqlite3.Connection, record: Record) -> None:
    """A child-exit record names an exit record that its child's chain holds."""
    f = record.fields()
    found = db.execute("SELECT kind FROM records WHERE agent_id=? AND hash=?", (f["child"], f["exit_hash"])).fetchone()
    if found is None or found[0] not in (Kind.EXIT, Kind.VIOLATION):
        raise RecordError(f"record {record.seq} (child-exit) names exit record {f['exit_hash'].hex()[:16]}… "
                          f"of child {uuid.UUID(bytes=f['child'])}, which is not in that child's chain")


# --- bundles: chains carried to another machine ------------------------------------------------------

BUNDLE_FORMAT = "theater-bundle"


def export_bundle(home: Home, refs: list[str], checkpoint: Checkpoint | None = None) -> bytes:
    """A self-contained JSON file: the named chains' records, the supervisor's public key and, if given, a
    checkpoint. ``verify_bundle`` (or anyone with ``docs/event-records.md``) checks it anywhere."""
    # Read before the store's snapshot: a rotation committed in between is then in the snapshot, after the key
    # read (which the bundle's reader accepts), never the other way round (a key no statement leads to).
    public_key = home.public_key.read_bytes()
    try:
        db = open_readonly(home.store)
        try:
            db.execute("BEGIN")
            chains = []
            for ref in refs:
                found = find_chain(db, ref)
                if found is None:
                    raise NotFound(f"no agent or supervisor node named or with id {ref!r} in {home.store}")
                chains.append({"id": str(uuid.UUID(bytes=found[0])), "name": found[1],
                               "records": [raw.hex() for raw in read_chain(db, found[0])],
                               "compaction": compaction_of(db, found[0])})
            rotations = rotations_of(db)
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{home.store}: not a readable event store: {exc}") from None
    doc = {"format": BUNDLE_FORMAT, "version": 1, "supervisor_public_key": public_key.hex(),
           "key_rotations": rotations, "chains": chains,
           "checkpoint": json.loads(checkpoint.to_json()) if checkpoint is not None else None}
    return json.dumps(doc, indent=1).encode() + b"\n"


def verify_bundle(data: bytes, pinned: bytes | None = None) -> list[ChainReport]:
    """Every chain of a bundle, verified from its records alone, under the pinned key if one is given
    (else the bundle's own); and the bundle's checkpoint, if any, against them."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != BUNDLE_FORMAT or doc.get("version") != 1:
            raise ValueError("not a version-1 theater bundle")
        current = bytes.fromhex(doc["supervisor_public_key"])
        statements = doc.get("key_rotations", [])
        if not isinstance(statements, list) or not all(isinstance(x, str) for x in statements):
            raise ValueError("key_rotations is not a list of statements")
        chains = [(c["id"], c["name"], [bytes.fromhex(r) for r in c["records"]], c.get("compaction"))
                  for c in doc["chains"]]
        point = Checkpoint.parse(json.dumps(doc["checkpoint"]).encode()) if doc.get("checkpoint") else None
    except (ValueError, KeyError, TypeError, RecursionError, RecordError) as exc:  # RecursionError: nested too deep
        raise StoreError(f"not a readable bundle: {type(exc).__name__}: {exc}") from None
    schedule = key_schedule(current, statements, pinned)
    if point is not None and point.public_key not in schedule.keys:
        raise StoreError(f"the bundle's checkpoint was signed by key {fingerprint(point.public_key)}, not by "
                         f"{_keys_named(schedule)}")
    reports = []
    heads: dict[bytes, dict[int, bytes]] = {}
    cuts: dict[bytes, Compaction] = {}
    for ident, name, raws, statement in chains:
        try:
            if statement is not None and not isinstance(statement, str):
                raise RecordError("the chain's compaction statement is not a string of JSON")
            chain_id = uuid.UUID(ident).bytes
            cut = _compaction(statement, schedule)
            verifier = verify_chain(raws, schedule.key_for(chain_id, 0), cut, schedule)
            if verifier.agent_id != chain_id:
                raise RecordError("the records are of another chain than the bundle says")
            first = Record.parse(raws[0]).fields()
            if first.get("name", name) != name:
                raise RecordError(f"the bundle names the chain {name!r}, its genesis {first['name']!r}")
            heads[chain_id] = {Record.parse(r).seq: hashlib.sha256(r).digest() for r in raws}
            if cut is not None:
                cuts[chain_id] = cut
                heads[chain_id][cut.cut_seq - 1] = cut.prev_hash
            reports.append(ChainReport(ident, name, len(raws), True, ""))
        except (RecordError, ValueError) as exc:
            reports.append(ChainReport(ident, name, len(raws), False, str(exc)))
    if point is not None:
        for head in point.heads:
            held = heads.get(head.chain)
            if held is None:
                continue  # a chain the checkpoint covers but the bundle does not carry
            if head.chain in cuts and head.seq < cuts[head.chain].cut_seq - 1:
                continue  # compacted away: its compaction statement vouches for it
            ident = str(uuid.UUID(bytes=head.chain))
            if held.get(head.seq) != head.hash:
                problem = ("truncated: the bundle's checkpoint holds record " if head.seq not in held
                           else "rewritten: the bundle's checkpoint holds another record ") + str(head.seq)
                reports = [ChainReport(r.agent_id, r.name, r.records, False, problem) if r.agent_id == ident else r
                           for r in reports]
    return reports


# --- following a message across agents ----------------------------------------------------------------


def trace(home: Home, message_id: str) -> list[tuple[str, Record]]:
    """Every record of every chain that names ``message_id`` (hex): the sender's host-call record of the
    send or call that made it, and the receiver's message record of its delivery; in time order."""
    wanted = message_id.strip().lower()
    try:
        raw_id = bytes.fromhex(wanted)
    except ValueError:
        raise NotFound(f"{message_id!r} is not a message id (32 hex digits)") from None
    db = open_readonly(home.store)
    try:
        names = {row[0]: row[1] for row in db.execute("SELECT id, name FROM agents")}
        found = []
        kinds = (int(Kind.MESSAGE), int(Kind.HOST_CALL))
        for agent_id, raw in db.execute("SELECT agent_id, raw FROM records WHERE kind IN (?, ?)", kinds):
            record = Record.parse(raw)
            f = record.fields()
            if (record.kind is Kind.MESSAGE and f["message_id"] == raw_id) or (record.kind is Kind.HOST_CALL and f["interface"].startswith("theater:agent/messaging@") \
                    and f'"message_id":"{wanted}"'.encode() in f["output"].partition(b"\0")[0]):
                found.append((names.get(agent_id, "?"), record))
    finally:
        db.close()
    return sorted(found, key=lambda item: item[1].time_ns)
