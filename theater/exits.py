"""How a worker process (or the fork-server) ends: exit statuses both sides read the same way.

The supervisor decides an agent's exit reason from these (``supervision.md``
section 2): a status the worker chose, a signal, or a kill the supervisor
itself sent.
"""

from __future__ import annotations

import enum

__all__ = ["WorkerExit", "exit_text"]


def exit_text(reason: str, detail: str) -> str:
    """An exit as one line, ``<reason>: <detail>``, without saying the reason twice when the detail starts
    with it (a crash whose failure class is ``trap``: ``trap: wasm trap: …``, not ``trap: trap: wasm trap: …``)."""
    if not detail:
        return reason
    return detail if detail == reason or detail.startswith(f"{reason}: ") else f"{reason}: {detail}"


class WorkerExit(enum.IntEnum):
    OK = 0  # asked to stop and stopped (STOP, or the agent ended itself)
    USAGE = 2  # started by hand, not by a supervisor
    LOAD_FAILED = 3  # the component cannot run as an agent; its FAULT frame said why (reason load-failed)
    PROTOCOL = 4  # the supervisor's frames or bootstrap made no sense to it
    PARENT_GONE = 70  # the supervisor ended before the worker could arm its parent-death signal
