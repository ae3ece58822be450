"""Retention: snapshots of agents' committed state, and compaction of chains past their policy's limits.

Each run (``theater gc``, and with every periodic checkpoint) first keeps a
snapshot of each agent's state at its committed head: the points a chain can
later be cut at, since a cut needs the state it leaves off with (for replay).
Then a chain over its ``[retention]`` limits is cut at its oldest snapshot
that brings it within them. The records dropped are verified first, and a
compaction statement signed by the supervisor (``theater.compaction``) takes
their place, in one transaction with their deletion.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from theater.chain import ChainVerifier
from theater.compaction import Compaction, dropped_root
from theater.errors import RecordError
from theater.records import Record, sha256

from ._config import AgentConfig
from ._errors import NotFound, StoreError
from ._record_path import RecordPath
from ._store import AgentRow, EventStore

__all__ = ["Retention"]


class Retention:
    def __init__(self, store: EventStore, records: RecordPath, log: Callable[[str], None]) -> None:
        self.store = store
        self.records = records
        self.log = log

    def run(self, refs: list[str] | None = None) -> list[dict[str, Any]]:
        """Snapshot, then compact what is over its limits; one entry per agent looked at."""
        self.records.flush()
        rows = self.store.agents()
        if refs:
            wanted = []
            for ref in refs:
                match = [r for r in rows if ref in (r.name, str(uuid.UUID(bytes=r.id)))]
                if not match:
                    raise NotFound(f"no agent named or with id {ref!r}")
                wanted += match
            rows = wanted
        return [self._one(row) for row in rows]

    def _one(self, row: AgentRow) -> dict[str, Any]:
        # The limits the genesis signed, never the row's copy: an edited row must not make the supervisor
        # sign away history.
        genesis = Record.parse(next(self.store.records(row.id, -1, 1)))
        limits = AgentConfig.from_dict(json.loads(genesis.fields()["config"])).retention
        self.store.snapshot(row.id)
        records, size = self.store.chain_size(row.id)
        entry: dict[str, Any] = {"agent": row.name, "records": records, "bytes": size, "dropped": 0,
                                 "limits": limits.as_dict()}
        if not limits.limited or ((not limits.max_records or records <= limits.max_records)
                                  and (not limits.max_bytes or size <= limits.max_bytes)):
            return entry
        cut = self._cut_point(row, limits.max_records, limits.max_bytes)
        if cut is None:
            entry["note"] = "over its limits, with no snapshot to cut at yet"
            return entry
        try:
            dropped, dropped_bytes = self._compact(row, genesis, cut)
        except (RecordError, StoreError) as exc:
            self.log(f"gc {row.name}: not compacted: {exc}")
            entry["note"] = f"not compacted: {exc}"
            return entry
        entry.update(dropped=dropped, records=records - dropped, bytes=size - dropped_bytes)
        return entry

    def _cut_point(self, row: AgentRow, max_records: int, max_bytes: int) -> int | None:
        """The oldest snapshot seq ``s`` whose cut (keeping the genesis and the records after ``s``) is within
        the limits and drops something; the head's own snapshot always is within them."""
        db = self.store.db
        first = db.execute("SELECT min(seq) FROM records WHERE agent_id=? AND seq>0", (row.id,)).fetchone()[0]
        genesis = db.execute("SELECT length(raw) FROM records WHERE agent_id=? AND seq=0", (row.id,)).fetchone()[0]
        for seq, _ in self.store.snapshots(row.id):
            if first is None or seq < first or seq > row.head_seq:
                continue
            count, size = db.execute("SELECT count(*), coalesce(sum(length(raw)), 0) FROM records "
                                     "WHERE agent_id=? AND seq>?", (row.id, seq)).fetchone()
            if (not max_records or count + 1 <= max_records) and (not max_bytes or size + genesis <= max_bytes):
                return int(seq)
        return None

    def _compact(self, row: AgentRow, genesis: Record, cut: int) -> tuple[int, int]:
        """Verify records up to ``cut`` (from the genesis, past an earlier compaction), sign the statement for
        a chain cut after ``cut``, and drop them. (records dropped, their bytes)"""
        earlier_json = self.store.compaction(row.id)
        public = self.records.public_key
        schedule = self.records.schedule
        earlier = Compaction.parse(earlier_json, schedule.keys) if earlier_json else None
        verifier = ChainVerifier(public, schedule)
        dropped: list[tuple[int, bytes]] = []
        dropped_bytes = 0
        for raw in self.store.records(row.id, -1, cut + 1):
            record = Record.parse(raw)
            if record.seq > cut:
                break
            verifier.advance(record)
            if record.seq == 0:
                if earlier is not None:
                    verifier.skip(earlier)
                continue
            dropped.append((record.seq, record.hash))
            dropped_bytes += len(raw)
        if verifier.next_seq != cut + 1 or not dropped:
            raise RecordError(f"the chain does not reach record {cut} from its genesis as stored")
        state = self.store.snapshot_state(row.id, cut)
        if state is None or dict(self.store.snapshots(row.id)).get(cut) != verifier.head_hash \
                or sha256(state) != verifier.state_hash:
            raise StoreError(f"the snapshot at record {cut} does not match the chain")
        statement = Compaction(
            agent_id=row.id, genesis_hash=genesis.hash, cut_seq=cut + 1, prev_hash=verifier.head_hash,
            state_hash=verifier.state_hash or b"", incarnation=max(verifier.incarnation, 0),
            worker_key=verifier.worker_key.public_bytes_raw() if verifier.worker_key is not None else b"",
            dropped_from=dropped[0][0], dropped_bytes=dropped_bytes, root=dropped_root(dropped),
            previous=earlier.digest() if earlier is not None else b"", time_ns=time.time_ns(), public_key=b"",
        ).signed(self.records.key)
        self.store.compact(row.id, cut + 1, statement.to_json(), state)
        self.log(f"gc {row.name}: dropped records {dropped[0][0]}..{cut} ({len(dropped)} records, {dropped_bytes} "
                 "bytes) behind a signed compaction statement")
        return len(dropped), dropped_bytes

