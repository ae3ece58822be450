"""Tenants' components in the home: ``<home>/cache/uploads/<sha256>.<wasm|wat>``.

A tenant's spawn carries its component, up to 64 MiB. Hashing it and writing it
durably takes a few hundred milliseconds at that size, during which the loop
would serve no one, so it is done on a thread of its own, one upload per
requester at a time. A component is kept while an agent of the home uses it
(``unused``): a tenant cannot fill the disk by sending components.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from theater.artifacts import file_signature
from theater.home import write_private

from ._errors import Refused
from ._timers import Timers

__all__ = ["Stored", "Uploads"]

POLL_S = 0.002  # how often the loop looks whether an upload is stored


@dataclass(frozen=True, slots=True)
class Stored:
    path: Path  # resolved, as agents hold their component's path
    sha256: str
    signature: list[int]  # the file's, just after it was hashed and written (component_digest's cache)


class Uploads:
    def __init__(self, root: Path, timers: Timers) -> None:
        self.root = root
        self.timers = timers
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload")  # one write at a time
        self._storing: set[str] = set()  # requesters with an upload on the thread
        self._lock = threading.Lock()
        self._pending: set[str] = set()  # file names stored or being stored whose spawn has not used them yet

    def store(self, requester: str, component: bytes, kind: str, then: Callable[[Future[Stored]], None]) -> None:
        """Hash and write ``component`` off the loop; ``then`` runs in the loop with the outcome, and must
        call ``settled`` with its name once an agent holds it (or the spawn failed)."""
        if requester in self._storing:
            raise Refused("an earlier spawn's component is still being stored: send the next one after its answer")
        self._storing.add(requester)
        job = self._pool.submit(self._write, component, kind)

        def done() -> None:
            if not job.done():
                self.timers.after(POLL_S, done)
                return
            self._storing.discard(requester)
            then(job)

        self.timers.after(POLL_S, done)

    def _write(self, component: bytes, kind: str) -> Stored:
        name = f"{hashlib.sha256(component).hexdigest()}.{kind}"
        with self._lock:  # before the file exists: a sweep that lists it also sees it pending
            self._pending.add(name)
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = Path(os.path.realpath(self.root)) / name
            if not path.exists():
                write_private(path, component)
            return Stored(path, name.split(".")[0], file_signature(os.stat(path)))
        except BaseException:
            self.settled(name)
            raise

    def settled(self, name: str) -> None:
        with self._lock:
            self._pending.discard(name)

    def unused(self, used: Iterable[str], *, starting: bool = False) -> list[str]:
        """Delete every upload no agent uses (``used``: the resolved component paths of the home's agents) and
        is not on its way to one; return the names deleted. ``starting``: nothing is being stored, so a
        write a crash interrupted (a dot-file) goes too."""
        where = os.path.realpath(self.root)
        try:
            names = os.listdir(where)
        except FileNotFoundError:
            return []
        with self._lock:  # after the listing (see _write)
            pending = set(self._pending)
        kept = {os.path.basename(p) for p in used if os.path.dirname(p) == where} | pending
        deleted = []
        for name in names:
            if name in kept or (name.startswith(".") and not starting):
                continue
            try:
                os.unlink(os.path.join(where, name))
            except FileNotFoundError:
                continue
            deleted.append(name)
        return deleted

    def close(self) -> None:
        self._pool.shutdown(wait=True)
