"""Process-level confinement the worker applies to itself before it reads guest bytes.

This module is the only place that touches prctl and rlimits.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal

__all__ = ["basic_hygiene"]

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg: int) -> None:
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}) failed: {os.strerror(err)}")


def basic_hygiene(parent_pid: int) -> dict[str, str]:
    """Die with the supervisor, no core dumps, no privilege gain, private umask.

    Returns what was applied, for the agent's genesis record.
    """
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the supervisor died before the signal was armed
        os._exit(70)
    _prctl(PR_SET_DUMPABLE, 0)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.umask(0o077)
    return {
        "parent_death_signal": "applied",
        "not_dumpable": "applied",
        "no_new_privs": "applied",
        "rlimit_core": "applied",
        "umask": "applied",
    }
