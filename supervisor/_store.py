"""The event store: one SQLite file in WAL mode, append-only records, latest state per agent.

A record and the state it commits land in one transaction, so a crash at any
point leaves either both or neither. ``synchronous=FULL``: a commit that
returned is on disk. Triggers refuse any UPDATE or DELETE of a record.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from theater.records import Kind, Record

from ._errors import StoreError

__all__ = ["AgentRow", "EventStore", "compaction_of", "find_chain", "open_readonly", "read_chain", "read_chain_columns", "rotations_of"]

SCHEMA_VERSION = 1
# What `usage` counts per agent (docs/tenancy.md section 6).
USAGE_COUNTS = ("calls", "messages", "fuel", "records", "record_bytes", "workers", "cpu_ns", "peak_rss")
MAX_QUEUED_USAGE = 10_000  # ended workers' figures waiting for the next transaction (add_worker_usage)
KEEP_SNAPSHOTS = 8  # per agent: the newest state snapshots (compaction's cut points); older ones go

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS agents (
    id          BLOB PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    config      TEXT NOT NULL,
    desired     TEXT NOT NULL,
    created_ns  INTEGER NOT NULL,
    head_seq    INTEGER NOT NULL,
    head_hash   BLOB NOT NULL,
    state_hash  BLOB NOT NULL,
    state       BLOB NOT NULL,
    initialized INTEGER NOT NULL,
    incarnation INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    agent_id BLOB NOT NULL,
    seq      INTEGER NOT NULL,
    kind     INTEGER NOT NULL,
    time_ns  INTEGER NOT NULL,
    hash     BLOB NOT NULL,
    raw      BLOB NOT NULL,
    PRIMARY KEY (agent_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS trees (
    id         BLOB PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    config     TEXT NOT NULL,
    desired    TEXT NOT NULL,
    created_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    id         BLOB PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    created_ns INTEGER NOT NULL,
    head_seq   INTEGER NOT NULL,
    head_hash  BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS removed (
    id         BLOB PRIMARY KEY,
    name       TEXT NOT NULL,
    config     TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    removed_ns INTEGER NOT NULL,
    head_seq   INTEGER NOT NULL,
    head_hash  BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (
    agent_id BLOB NOT NULL,
    key      TEXT NOT NULL,
    value    BLOB NOT NULL,
    PRIMARY KEY (agent_id, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS timers (
    id       INTEGER PRIMARY KEY,
    agent_id BLOB NOT NULL,
    due_ns   INTEGER NOT NULL,
    message  BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS timers_by_agent ON timers (agent_id);
CREATE TABLE IF NOT EXISTS sends (
    seq        INTEGER PRIMARY KEY,
    message_id BLOB NOT NULL UNIQUE,
    target_id  BLOB NOT NULL,
    sender_id  BLOB NOT NULL,
    message    BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS sends_by_target ON sends (target_id);
CREATE TABLE IF NOT EXISTS compactions (
    agent_id  BLOB PRIMARY KEY,
    cut_seq   INTEGER NOT NULL,
    statement TEXT NOT NULL,
    state     BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS key_rotations (
    n         INTEGER PRIMARY KEY,
    statement TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    agent_id BLOB NOT NULL,
    seq      INTEGER NOT NULL,
    hash     BLOB NOT NULL,
    state    BLOB NOT NULL,
    made_ns  INTEGER NOT NULL,
    PRIMARY KEY (agent_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tenants (
    name       TEXT PRIMARY KEY,
    public_key TEXT NOT NULL UNIQUE,
    settings   TEXT NOT NULL,
    created_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS denials (
    n       INTEGER PRIMARY KEY,
    time_ns INTEGER NOT NULL,
    tenant  TEXT NOT NULL,
    what    TEXT NOT NULL,
    detail  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS worker_usage (
    agent_id BLOB NOT NULL,
    tenant   TEXT NOT NULL,
    ended_ns INTEGER NOT NULL,
    cpu_ns   INTEGER NOT NULL,
    peak_rss INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS records_no_update BEFORE UPDATE ON records
    BEGIN SELECT RAISE(ABORT, 'event records are append-only'); END;
DROP TRIGGER IF EXISTS records_no_delete;
CREATE TRIGGER records_no_delete BEFORE DELETE ON records
    WHEN OLD.seq = 0 OR NOT EXISTS (SELECT 1 FROM compactions c WHERE c.agent_id = OLD.agent_id AND OLD.seq < c.cut_seq)
    BEGIN SELECT RAISE(ABORT, 'event records are append-only: only records a compaction statement covers may go'); END;
"""


@dataclass(frozen=True, slots=True)
class AgentRow:
    id: bytes
    name: str
    config: dict[str, Any]
    desired: str
    created_ns: int
    head_seq: int
    head_hash: bytes
    state_hash: bytes
    state: bytes
    initialized: bool
    incarnation: int


@dataclass(slots=True)
class Commit:
    """What one transaction appends for one agent: records, and maybe a new state."""

    agent_id: bytes
    records: list[Record]
    state: bytes | None = None
    initialized: bool | None = None
    incarnation: int | None = None
    desired: str | None = None
    kv: dict[str, bytes | None] | None = None  # the call's key-value writes (None: a delete)
    timers_added: list[tuple[int, int, bytes]] | None = None  # (id, due ns, message)
    timers_removed: list[int] | None = None  # cancelled, or delivered by this commit's call
    sends_added: list[tuple[bytes, bytes, bytes]] | None = None  # (message id, target id, message): not delivered
    sends_removed: list[bytes] | None = None  # message ids: delivered by this commit's call
    remove: bool = False  # the agent is removed: its row moves to `removed`; its kv data, timers and sends to it go
    snapshot: bool = False  # also keep the state at the new head (a cut point for compaction)
    create: tuple[str, dict[str, Any], bytes] | None = None  # a new agent's row first: name, stored config, state


class EventStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.problem: str | None = None  # why the last write failed, until one succeeds (a full disk…)
        self.commits = 0  # durable transactions, and the time they took (the metrics' commit latency)
        self.commit_ns = 0
        self._usage: list[tuple[bytes, str, int, int, int]] = []  # worker_usage rows not yet written
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
            row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise StoreError(f"{path}: schema version {row[0]}, this build reads {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path}: cannot open the event store: {exc}") from exc

    def close(self) -> None:
        if self._usage:
            with contextlib.suppress(StoreError), self._tx():
                pass  # writes the queued worker_usage rows
        self.db.close()

    def name_taken(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM agents WHERE name=?", (name,)).fetchone() is not None

    def commit(self, commits: list[Commit]) -> None:
        """Append every commit in one durable transaction (group commit)."""
        with self._tx():
            for c in commits:
                if c.create is not None:  # its genesis record is the first of c.records
                    name, config, state = c.create
                    self.db.execute(
                        "INSERT INTO agents VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        (c.agent_id, name, json.dumps(config, sort_keys=True), "running", time.time_ns(),
                         c.records[0].seq, c.records[0].hash, c.records[0].state_hash, state, 0, 0),
                    )
                for record in c.records:
                    self._insert(record)
                head = c.records[-1] if c.records else None
                sets, args = [], []
                if head is not None:
                    sets += ["head_seq=?", "head_hash=?", "state_hash=?"]
                    args += [head.seq, head.hash, head.state_hash]
                for column, value in (("state", c.state), ("initialized", c.initialized),
                                      ("incarnation", c.incarnation), ("desired", c.desired)):
                    if value is not None:
                        sets.append(f"{column}=?")
                        args.append(value)
                if sets:
                    self.db.execute(f"UPDATE agents SET {', '.join(sets)} WHERE id=?", (*args, c.agent_id))
                if c.snapshot:
                    self._snapshot(c.agent_id)
                for key, value in (c.kv or {}).items():
                    if value is None:
                        self.db.execute("DELETE FROM kv WHERE agent_id=? AND key=?", (c.agent_id, key))
                    else:
                        self.db.execute("INSERT OR REPLACE INTO kv VALUES (?,?,?)", (c.agent_id, key, value))
                for timer_id, due_ns, message in c.timers_added or ():
                    self.db.execute("INSERT INTO timers VALUES (?,?,?,?)", (timer_id, c.agent_id, due_ns, message))
                for timer_id in c.timers_removed or ():
                    self.db.execute("DELETE FROM timers WHERE id=? AND agent_id=?", (timer_id, c.agent_id))
                for message_id, target_id, message in c.sends_added or ():
                    self.db.execute("INSERT INTO sends (message_id, target_id, sender_id, message) VALUES (?,?,?,?)",
                                    (message_id, target_id, c.agent_id, message))
                for message_id in c.sends_removed or ():
                    self.db.execute("DELETE FROM sends WHERE message_id=? AND target_id=?", (message_id, c.agent_id))
                if c.remove:
                    self.db.execute("INSERT INTO removed SELECT id, name, config, created_ns, ?, head_seq, head_hash "
                                    "FROM agents WHERE id=?", (time.time_ns(), c.agent_id))
                    self.db.execute("DELETE FROM agents WHERE id=?", (c.agent_id,))
                    self.db.execute("DELETE FROM kv WHERE agent_id=?", (c.agent_id,))
                    self.db.execute("DELETE FROM timers WHERE agent_id=?", (c.agent_id,))
                    self.db.execute("DELETE FROM sends WHERE target_id=?", (c.agent_id,))
                    self.db.execute("DELETE FROM snapshots WHERE agent_id=?", (c.agent_id,))

    # --- key-value stores and timers (the kv and timers capabilities) ------------------------

    def kv_get(self, agent_id: bytes, key: str) -> bytes | None:
        row = self.db.execute("SELECT value FROM kv WHERE agent_id=? AND key=?", (agent_id, key)).fetchone()
        return None if row is None else bytes(row[0])

    def kv_size(self, agent_id: bytes, key: str) -> int | None:
        """What the key and its value take, in bytes (None: no such key)."""
        row = self.db.execute("SELECT length(CAST(key AS BLOB)) + length(value) FROM kv WHERE agent_id=? AND key=?",
                              (agent_id, key)).fetchone()
        return None if row is None else int(row[0])

    def kv_usage(self, agent_id: bytes) -> tuple[int, int]:
        """(keys, bytes of keys and values) of an agent's store."""
        row = self.db.execute("SELECT count(*), coalesce(sum(length(CAST(key AS BLOB)) + length(value)), 0) "
                              "FROM kv WHERE agent_id=?", (agent_id,)).fetchone()
        return int(row[0]), int(row[1])

    def kv_bytes(self, agent_ids: list[bytes]) -> int:
        """Bytes of keys and values the agents hold in all (a tenant's kv_bytes)."""
        total = 0
        for i in range(0, len(agent_ids), 500):
            part = agent_ids[i:i + 500]
            row = self.db.execute("SELECT coalesce(sum(length(CAST(key AS BLOB)) + length(value)), 0) FROM kv "
                                  f"WHERE agent_id IN ({','.join('?' * len(part))})", part).fetchone()
            total += int(row[0])
        return total

    def kv_keys(self, agent_id: bytes, prefix: str) -> list[str]:
        """The keys that start with ``prefix`` (compared as text, never as a LIKE or GLOB pattern)."""
        rows = self.db.execute("SELECT key FROM kv WHERE agent_id=? AND substr(key, 1, ?)=? ORDER BY key",
                               (agent_id, len(prefix), prefix))
        return [r[0] for r in rows]

    def timers(self) -> list[tuple[int, bytes, int, bytes]]:
        """Every pending timer: (id, agent id, due ns, message), soonest first."""
        rows = self.db.execute("SELECT id, agent_id, due_ns, message FROM timers ORDER BY due_ns, id").fetchall()
        return [(r[0], r[1], r[2], bytes(r[3])) for r in rows]

    def sends(self) -> list[tuple[bytes, bytes, bytes, bytes]]:
        """Every message sent by a committed call and not yet delivered: (message id, target id, sender id,
        message), in the order they were committed."""
        rows = self.db.execute("SELECT message_id, target_id, sender_id, message FROM sends ORDER BY seq").fetchall()
        return [(r[0], r[1], r[2], bytes(r[3])) for r in rows]

    def remove_sends(self, message_ids: list[bytes]) -> None:
        """Forget messages that will not be delivered (their target stopped, or crashed running them)."""
        with self._tx():
            self.db.executemany("DELETE FROM sends WHERE message_id=?", [(m,) for m in message_ids])

    def remove_timers(self, agent_id: bytes) -> None:
        """Cancel every timer of an agent (it stopped)."""
        with self._tx():
            self.db.execute("DELETE FROM timers WHERE agent_id=?", (agent_id,))

    def save_tree(self, tree_id: bytes, name: str, config: dict[str, Any], desired: str) -> None:
        """Insert or update a supervision tree's root: its whole config and desired state."""
        with self._tx():
            self.db.execute(
                "INSERT INTO trees VALUES (?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET desired=excluded.desired",
                (tree_id, name, json.dumps(config, sort_keys=True), desired, time.time_ns()),
            )

    def append_node(self, node_id: bytes, name: str, record: Record) -> None:
        """Append one record to a supervisor node's chain (its genesis creates the node's row)."""
        with self._tx():
            self._insert(record)
            if record.seq == 0:
                self.db.execute("INSERT INTO nodes VALUES (?,?,?,?,?)",
                                (node_id, name, time.time_ns(), record.seq, record.hash))
            else:
                self.db.execute("UPDATE nodes SET head_seq=?, head_hash=? WHERE id=?", (record.seq, record.hash, node_id))

    def node_head(self, node_id: bytes) -> tuple[int, bytes] | None:
        row = self.db.execute("SELECT head_seq, head_hash FROM nodes WHERE id=?", (node_id,)).fetchone()
        return (row[0], row[1]) if row else None

    def trees(self) -> list[tuple[bytes, str, dict[str, Any], str]]:
        rows = self.db.execute("SELECT id, name, config, desired FROM trees ORDER BY created_ns").fetchall()
        return [(r[0], r[1], json.loads(r[2]), r[3]) for r in rows]

    # --- retention: snapshots of committed state, and compaction ----------------------------

    def snapshot(self, agent_id: bytes, keep: int = KEEP_SNAPSHOTS) -> int | None:
        """Keep the agent's committed state at its head (the cut points of a later compaction), and only
        the newest ``keep`` snapshots; the head's seq, or None if there is no such agent."""
        row = self.db.execute("SELECT head_seq FROM agents WHERE id=?", (agent_id,)).fetchone()
        if row is None:
            return None
        with self._tx():
            self._snapshot(agent_id, keep)
        return int(row[0])

    def _snapshot(self, agent_id: bytes, keep: int = KEEP_SNAPSHOTS) -> None:
        self.db.execute("INSERT OR IGNORE INTO snapshots SELECT id, head_seq, head_hash, state, ? FROM agents "
                        "WHERE id=?", (time.time_ns(), agent_id))
        self.db.execute("DELETE FROM snapshots WHERE agent_id=? AND seq NOT IN (SELECT seq FROM snapshots "
                        "WHERE agent_id=? ORDER BY seq DESC LIMIT ?)", (agent_id, agent_id, keep))

    def snapshots(self, agent_id: bytes) -> list[tuple[int, bytes]]:
        """(seq, hash) of every snapshot of the agent, oldest first."""
        return [(r[0], r[1]) for r in self.db.execute(
            "SELECT seq, hash FROM snapshots WHERE agent_id=? ORDER BY seq", (agent_id,))]

    def snapshot_state(self, agent_id: bytes, seq: int) -> bytes | None:
        row = self.db.execute("SELECT state FROM snapshots WHERE agent_id=? AND seq=?", (agent_id, seq)).fetchone()
        return None if row is None else bytes(row[0])

    def chain_size(self, agent_id: bytes) -> tuple[int, int]:
        """(records, bytes) the store holds of a chain."""
        row = self.db.execute("SELECT count(*), coalesce(sum(length(raw)), 0) FROM records WHERE agent_id=?",
                              (agent_id,)).fetchone()
        return int(row[0]), int(row[1])

    def compaction(self, agent_id: bytes) -> str | None:
        return compaction_of(self.db, agent_id)

    def compact(self, agent_id: bytes, cut_seq: int, statement: str, state: bytes) -> None:
        """Drop records 1 .. cut_seq - 1 behind a signed statement, in one transaction (the store's
        trigger lets no other record go)."""
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO compactions VALUES (?,?,?,?)", (agent_id, cut_seq, statement, state))
            self.db.execute("DELETE FROM records WHERE agent_id=? AND seq>0 AND seq<?", (agent_id, cut_seq))
            self.db.execute("DELETE FROM snapshots WHERE agent_id=? AND seq<?", (agent_id, cut_seq - 1))

    # --- the supervisor's key ------------------------------------------------------------------

    def chain_heads(self) -> list[tuple[bytes, int, bytes]]:
        """Every chain's last stored record, (id, seq, hash): agents', nodes' and removed agents'."""
        return [(r[0], r[1], r[2]) for r in self.db.execute(
            "SELECT r.agent_id, r.seq, r.hash FROM records r JOIN (SELECT agent_id, max(seq) AS top FROM records "
            "GROUP BY agent_id) t ON r.agent_id = t.agent_id AND r.seq = t.top")]

    def add_rotation(self, statement: str) -> None:
        with self._tx():
            self.db.execute("INSERT INTO key_rotations (statement) VALUES (?)", (statement,))

    def rotations(self) -> list[str]:
        return rotations_of(self.db)

    # --- tenants and what they used ------------------------------------------------------------

    def tenants(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT name, public_key, settings, created_ns FROM tenants ORDER BY name").fetchall()
        return [{"name": n, "public_key": k, "created_ns": c, **json.loads(s)} for n, k, s, c in rows]

    def add_tenant(self, tenant: dict[str, Any]) -> None:
        settings = {k: tenant[k] for k in ("policies", "routes", "quotas")}
        with self._tx():
            self.db.execute("INSERT INTO tenants VALUES (?,?,?,?)", (tenant["name"], tenant["public_key"],
                                                                     json.dumps(settings, sort_keys=True),
                                                                     tenant["created_ns"]))

    def remove_tenant(self, name: str) -> None:
        with self._tx():
            self.db.execute("DELETE FROM tenants WHERE name=?", (name,))

    def add_denial(self, time_ns: int, tenant: str, what: str, detail: str) -> None:
        with self._tx():
            self.db.execute("INSERT INTO denials (time_ns, tenant, what, detail) VALUES (?,?,?,?)",
                            (time_ns, tenant, what, detail))

    def denials(self, tenant: str, since_ns: int = 0, limit: int = 1000) -> list[tuple[int, str, str]]:
        return self.db.execute("SELECT time_ns, what, detail FROM denials WHERE tenant=? AND time_ns>=? "
                               "ORDER BY n DESC LIMIT ?", (tenant, since_ns, limit)).fetchall()

    def add_worker_usage(self, agent_id: bytes, tenant: str, cpu_ns: int, peak_rss: int) -> None:
        """Queued, and written by the next transaction: the ended worker's exit record follows at once, and a
        restart must not wait for a durable commit of its own. Past MAX_QUEUED_USAGE rows (a store that
        cannot be written), the oldest are dropped: the figures are lost, the supervisor is not."""
        self._usage.append((agent_id, tenant, time.time_ns(), cpu_ns, peak_rss))
        del self._usage[:-MAX_QUEUED_USAGE]

    # Every agent the store knows, live or removed: its id, name and tenant (the operator's configurations
    # have no tenant key).
    _OWNERS = ("SELECT id, name, coalesce(json_extract(config, '$.tenant'), 'operator') AS tenant FROM agents "
               "UNION ALL SELECT id, name, coalesce(json_extract(config, '$.tenant'), 'operator') FROM removed")

    def owners(self) -> dict[bytes, tuple[str, str]]:
        """(name, tenant) of every agent, live or removed."""
        return {agent_id: (name, tenant) for agent_id, name, tenant in self.db.execute(self._OWNERS)}

    def record_bytes_by_hour(self, since_ns: int) -> list[tuple[str, int, int]]:
        """(tenant, hour since the epoch, bytes of records written) from ``since_ns`` on."""
        return self.db.execute(
            f"SELECT o.tenant, r.time_ns / 3600000000000, sum(length(r.raw)) FROM records r "
            f"JOIN ({self._OWNERS}) o ON o.id = r.agent_id WHERE r.time_ns >= ? GROUP BY 1, 2", (since_ns,)).fetchall()

    def usage(self, tenant: str | None, since_ns: int) -> dict[bytes, dict[str, int]]:
        """Per agent (of ``tenant``, or every one): what its chain and its workers show from ``since_ns`` on."""
        out: dict[bytes, dict[str, int]] = {}
        where, args = ("WHERE o.tenant = ?", [tenant]) if tenant is not None else ("", [])
        kinds = (int(Kind.HANDLE), int(Kind.MESSAGE), int(Kind.INIT), int(Kind.GENESIS), int(Kind.WORKER_KEY))
        for agent_id, kind, raw in self.db.execute(
                f"SELECT r.agent_id, r.kind, r.raw FROM records r JOIN ({self._OWNERS}) o ON o.id = r.agent_id "
                f"{where} {'AND' if where else 'WHERE'} r.time_ns >= ?", (*args, since_ns)):
            u = out.setdefault(agent_id, dict.fromkeys(USAGE_COUNTS, 0))
            u["records"] += 1
            u["record_bytes"] += len(raw)
            if kind in kinds:
                record = Record.parse(raw)
                if kind in (Kind.GENESIS, Kind.WORKER_KEY):  # each names a worker that started
                    u["workers"] += 1
                else:
                    u["calls" if kind != Kind.MESSAGE else "messages"] += kind != Kind.INIT
                    u["fuel"] += int(record.fields()["fuel"])
        for agent_id, (cpu_ns, peak) in self.ended_workers(tenant, since_ns).items():
            u = out.setdefault(agent_id, dict.fromkeys(USAGE_COUNTS, 0))
            u["cpu_ns"] += cpu_ns
            u["peak_rss"] = max(u["peak_rss"], peak)
        return out

    def ended_workers(self, tenant: str | None, since_ns: int) -> dict[bytes, tuple[int, int]]:
        """Per agent (of ``tenant``, or every one): the CPU ns and the peak resident bytes of its workers that
        ended from ``since_ns`` on."""
        where, args = ("WHERE tenant = ? AND", [tenant]) if tenant is not None else ("WHERE", [])
        return {agent_id: (int(cpu_ns), int(peak)) for agent_id, cpu_ns, peak in self.db.execute(
            f"SELECT agent_id, sum(cpu_ns), max(peak_rss) FROM worker_usage {where} ended_ns >= ? GROUP BY 1",
            (*args, since_ns))}

    def _insert(self, r: Record) -> None:
        self.db.execute(
            "INSERT INTO records VALUES (?,?,?,?,?,?)", (r.agent_id, r.seq, int(r.kind), r.time_ns, r.hash, r.raw)
        )

    def _tx(self) -> _Transaction:
        return _Transaction(self)

    def probe(self) -> bool:
        """Whether the store can be written again (after a full disk, say): one small durable write."""
        try:
            with self._tx():
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('probed_ns', ?)", (str(time.time_ns()),))
        except StoreError:
            return False
        return True

    def heads(self) -> list[tuple[bytes, int, bytes]]:
        """Every chain's committed head: (id, seq, hash), agents' and supervisor nodes'."""
        rows = self.db.execute("SELECT id, head_seq, head_hash FROM agents UNION ALL "
                               "SELECT id, head_seq, head_hash FROM nodes").fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def removed_head(self, ref: str) -> tuple[bytes, int] | None:
        """A removed agent's chain id and head, by its old name (the latest so named) or its id."""
        try:
            wanted = uuid.UUID(ref).bytes
        except ValueError:
            wanted = None
        row = self.db.execute("SELECT id, head_seq FROM removed WHERE id=? OR name=? ORDER BY removed_ns DESC",
                              (wanted, ref)).fetchone()
        return (row[0], row[1]) if row else None

    def agents(self) -> list[AgentRow]:
        rows = self.db.execute("SELECT * FROM agents ORDER BY created_ns").fetchall()
        return [_agent_row(r) for r in rows]

    def agent(self, agent_id: bytes) -> AgentRow | None:
        row = self.db.execute("SELECT * FROM agents WHERE id=?", (agent_id,)).fetchone()
        return _agent_row(row) if row else None

    def records(self, agent_id: bytes, after: int = -1, limit: int = 1_000_000) -> Iterator[bytes]:
        return read_chain(self.db, agent_id, after, limit)

    def find_chain(self, ref: str) -> tuple[bytes, str] | None:
        return find_chain(self.db, ref)


def open_readonly(path: Path) -> sqlite3.Connection:
    """The store, read-only (a live supervisor may be writing it): for verify, events and audits."""
    if not path.exists():
        raise StoreError(f"{path}: no event store here")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def read_chain(db: sqlite3.Connection, chain_id: bytes, after: int = -1, limit: int = 1_000_000) -> Iterator[bytes]:
    """The raw records of one chain (an agent's or a tree node's) after ``after``, in order.
    Every reader of chains goes through here."""
    cur = db.execute("SELECT raw FROM records WHERE agent_id=? AND seq>? ORDER BY seq LIMIT ?", (chain_id, after, limit))
    for (raw,) in cur:
        yield raw


def read_chain_columns(db: sqlite3.Connection, chain_id: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """A chain's copy columns as stored, (seq, kind, time_ns, hash), in order: read beside ``read_chain`` to
    check them against the records themselves."""
    yield from db.execute("SELECT seq, kind, time_ns, hash FROM records WHERE agent_id=? ORDER BY seq", (chain_id,))


def rotations_of(db: sqlite3.Connection) -> list[str]:
    """The supervisor's key rotation statements (JSON), oldest first."""
    try:
        return [str(r[0]) for r in db.execute("SELECT statement FROM key_rotations ORDER BY n")]
    except sqlite3.OperationalError:  # a store from before rotations: none
        return []


def compaction_of(db: sqlite3.Connection, chain_id: bytes) -> str | None:
    """The chain's compaction statement (JSON), if records of it were dropped."""
    try:
        row = db.execute("SELECT statement FROM compactions WHERE agent_id=?", (chain_id,)).fetchone()
    except sqlite3.OperationalError:  # a store from before compaction: none
        return None
    return None if row is None else str(row[0])


def find_chain(db: sqlite3.Connection, ref: str) -> tuple[bytes, str] | None:
    """The id and name of the agent or tree node named ``ref``, or with id ``ref``."""
    try:
        wanted = uuid.UUID(ref).bytes
    except ValueError:
        wanted = None
    for table in ("agents", "nodes", "removed"):  # a live name first; a removed agent's by its old name or id
        row = db.execute(f"SELECT id, name FROM {table} WHERE name=? OR id=?", (ref, wanted)).fetchone()
        if row is not None:
            return row[0], row[1]
    return None


class _Transaction:
    """One write transaction; its outcome is the store's ``problem`` (None once a write succeeds)."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.db, self.path = store.db, store.path

    def __enter__(self) -> None:
        self.began = time.perf_counter_ns()
        self.usage = len(self.store._usage)
        try:
            self.db.execute("BEGIN IMMEDIATE")
            if self.usage:  # ended workers' figures ride along (add_worker_usage)
                self.db.executemany("INSERT INTO worker_usage VALUES (?,?,?,?,?)", self.store._usage[:self.usage])
        except sqlite3.Error as err:
            self._rollback()
            self.store.problem = str(err)
            raise StoreError(f"{self.path}: cannot begin a write: {err}") from err

    def __exit__(self, typ: Any, exc: Any, tb: Any) -> None:
        if typ is None:
            try:
                self.db.execute("COMMIT")
                del self.store._usage[:self.usage]
                self.store.problem = None
                self.store.commits += 1
                self.store.commit_ns += time.perf_counter_ns() - self.began
                return
            except sqlite3.Error as err:
                self._rollback()
                self.store.problem = str(err)
                raise StoreError(f"{self.path}: commit failed: {err}") from err
        self._rollback()
        if issubclass(typ, sqlite3.Error):
            self.store.problem = str(exc)
            raise StoreError(f"{self.path}: write failed: {exc}") from exc

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):  # a full disk may refuse even that; nothing was committed
            self.db.execute("ROLLBACK")


def _agent_row(r: tuple[Any, ...]) -> AgentRow:
    return AgentRow(
        id=r[0], name=r[1], config=json.loads(r[2]), desired=r[3], created_ns=r[4], head_seq=r[5],
        head_hash=r[6], state_hash=r[7], state=r[8], initialized=bool(r[9]), incarnation=r[10],
    )
