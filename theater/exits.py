"""How a worker process (or the fork-server) ends: exit statuses both sides read the same way.

The supervisor decides an agent's exit reason from these (``supervision.md``
section 2): a status the worker chose, a signal, or a kill the supervisor
itself sent.
"""

from __future__ import annotations

import enum

from .wire import CallKind

__all__ = ["WorkerExit", "crash_reason", "exit_text"]


def exit_text(reason: str, detail: str) -> str:
    """An exit as one line, ``<reason>: <detail>``, without saying the reason twice when the detail starts
    with it (a crash whose failure class is ``trap``: ``trap: wasm trap: …``, not ``trap: trap: wasm trap: …``)."""
    if not detail:
        return reason
    return detail if detail == reason or detail.startswith(f"{reason}: ") else f"{reason}: {detail}"


def crash_reason(kind: CallKind, status: str) -> str | None:
    """The exit reason a failed call means, or None if the agent carries on.

    A guest ``err`` from handle is an answer, not a crash; from init it means
    the agent could not start. Every other failure is a crash (OTP: the process
    died). The worker reads it the same way: after a result that ends it, it
    runs no other call.
    """
    if status == "ok":
        return None
    if status == "guest-error":
        return "guest-error" if kind is CallKind.INIT else None
    return "trap"


class WorkerExit(enum.IntEnum):
    OK = 0  # asked to stop and stopped (STOP, or the agent ended itself)
    USAGE = 2  # started by hand, not by a supervisor
    LOAD_FAILED = 3  # the component cannot run as an agent; its FAULT frame said why (reason load-failed)
    PROTOCOL = 4  # the supervisor's frames or bootstrap made no sense to it
    PARENT_GONE = 70  # the supervisor ended before the worker could arm its parent-death signal
