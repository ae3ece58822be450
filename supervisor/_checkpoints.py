"""Checkpoints: the supervisor signs every chain's head, keeps the statement, and hands it to a witness.

On demand (``theater checkpoint``) and every ``INTERVAL_S`` while chains grow
(after retention's snapshots and compaction, ``_gc``), the results already
checked are committed first, then every agent's and
node's committed head goes into one signed statement (``theater.checkpoint``)
written to ``<home>/checkpoints/<time_ns>.json`` and, if the supervisor was
started with a witness directory, copied there too: somewhere the home's
writer cannot rewrite is where a checkpoint earns its keep.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from theater.checkpoint import Checkpoint, Head
from theater.errors import RecordError
from theater.home import Home, write_private
from theater.rotation import Rotation

from ._errors import StoreError
from ._record_path import RecordPath
from ._store import EventStore
from ._timers import Timers

__all__ = ["Checkpoints", "keep_statement", "settle_statements"]

INTERVAL_S = 600.0


def keep_statement(home: Home, witness: Path | None, name: str, data: bytes, log: Callable[[str], None]) -> list[str]:
    """Write a signed statement (a checkpoint, a key rotation) to ``<home>/checkpoints/NAME`` and copy it to the
    witness directory, if any; the files it is in. A witness that does not take it is logged, not fatal."""
    home.checkpoints.mkdir(mode=0o700, exist_ok=True)
    path = home.checkpoints / name
    write_private(path, data)
    copies = [str(path)]
    if witness is not None:
        try:
            witness.mkdir(mode=0o700, parents=True, exist_ok=True)
            shutil.copyfile(path, witness / name)
            copies.append(str(witness / name))
        except OSError as exc:
            log(f"{path}: the witness {witness} did not take it: {exc}")
    return copies


def settle_statements(home: Home, store: EventStore, witness: Path | None, log: Callable[[str], None]) -> None:
    """At start, what a supervisor killed while keeping a statement left: the temporary of a file cut short
    (deleted), and a key rotation committed to the store whose file was never written (written now, and copied to
    the witness, as the rotation would have)."""
    if home.checkpoints.is_dir():
        for tmp in home.checkpoints.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
    for text in store.rotations():
        try:
            rotation = Rotation.parse(text)
        except RecordError as exc:  # verify reports it; a file of it would be no statement
            log(f"a key rotation in the store does not verify, so no file is written for it: {exc}")
            continue
        path = home.checkpoints / f"rotation-{rotation.time_ns}.json"
        if path.exists():
            continue
        try:
            keep_statement(home, witness, path.name, rotation.to_json().encode() + b"\n", log)
        except OSError as exc:  # the store keeps the statement: a start is not refused for its file
            log(f"{path}: cannot write this key rotation's file: {exc}")
            continue
        log(f"{path}: written at start (the rotation was committed, then the supervisor stopped before writing it)")


class Checkpoints:
    def __init__(self, home: Home, records: RecordPath, store: EventStore, timers: Timers, log: Callable[[str], None],
                 witness: Path | None = None, before: Callable[[], object] = lambda: None) -> None:
        self.home = home
        self.records = records
        self.store = store
        self.timers = timers
        self.log = log
        self.witness = witness
        self.before = before  # run before each periodic checkpoint: retention (snapshots, compaction)
        self._last: tuple[Head, ...] | None = None
        timers.after(INTERVAL_S, self._periodic)

    def make(self) -> dict[str, Any]:
        """Sign and keep a checkpoint of every committed head; what it is and where it went."""
        self.records.flush()
        heads = [Head(chain, seq, head) for chain, seq, head in self.store.heads()]
        point = Checkpoint.make(heads, self.records.key, time.time_ns())
        copies = keep_statement(self.home, self.witness, f"{point.time_ns}.json", point.to_json(), self.log)
        self._last = point.heads
        return {"time_ns": point.time_ns, "chains": len(point.heads), "root": point.body()["root"], "files": copies}

    def _periodic(self) -> None:
        self.timers.after(INTERVAL_S, self._periodic)
        heads = tuple(sorted((Head(c, s, h) for c, s, h in self.store.heads()), key=lambda h: h.chain))
        if heads == self._last or self.store.problem is not None:
            return
        try:
            self.before()
            self.make()
        except (OSError, StoreError) as exc:
            self.log(f"periodic checkpoint failed: {exc}")

