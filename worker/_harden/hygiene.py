"""Process hygiene, the layer every worker must apply whatever its policy.

Before any other layer: die with the supervisor, first in line for the
kernel's OOM killer, no core dumps and no ptrace by same-user peers, a private
umask, nothing inherited (environment, descriptors), its own session, and a
check that the working directory is private and empty. It is applied in two
parts because a worker whose parent is already gone exits with a status the
package defines.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat

from ._sys import APPLIED, PR_SET_DUMPABLE, prctl, unavailable, why

PR_SET_PDEATHSIG = 1
# The kernel's OOM killer takes the process with the highest score; at the maximum adjustment a worker's
# score is above any unadjusted process's, so a machine out of memory loses agents before the supervisor
# (whose death would end them all). Raising one's own adjustment needs no privilege.
OOM_SCORE_ADJ_FIRST = 1000


def first_out_of_memory() -> None:
    """Put this process first in line for the OOM killer (children inherit it)."""
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write(str(OOM_SCORE_ADJ_FIRST))


def die_with(parent_pid: int) -> bool:
    """Arm the parent-death SIGKILL; False if the parent died before the signal was armed."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    return os.getppid() == parent_pid


def apply(report: dict[str, str], keep: set[int] | frozenset[int]) -> str:
    """No core dumps or ptrace by peers, private umask, nothing inherited but ``keep``, first to go when
    memory runs out."""
    problems = []
    try:  # while still dumpable: a process that is not has its /proc files owned by root
        first_out_of_memory()
    except OSError as exc:
        problems.append(f"oom_score_adj: {why(exc)}")
    prctl(PR_SET_DUMPABLE, 0)
    os.umask(0o077)
    os.environ.clear()
    closed = _close_strays(keep)
    report["hygiene.fds"] = f"kept 0-2, closed {closed} stray"
    if os.getsid(0) != os.getpid():
        with contextlib.suppress(OSError):
            os.setsid()
    if os.getsid(0) != os.getpid():
        problems.append("not a session leader")
    try:
        st = os.stat(".")
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            problems.append(f"working directory is not private (mode {stat.S_IMODE(st.st_mode):o}, uid {st.st_uid})")
        elif os.listdir("."):
            problems.append("working directory is not empty")
    except OSError as exc:
        problems.append(f"working directory: {why(exc)}")
    return unavailable("; ".join(problems)) if problems else APPLIED


def _close_strays(keep: set[int] | frozenset[int]) -> int:
    """Close every descriptor but the standard three, ``keep`` (in a forked worker, the Landlock
    ruleset the fork-server prepared; in a spare, its line to the fork-server) and wasmtime's memfds."""
    closed = 0
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2 or fd in keep:
            continue
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the listing's own descriptor, already closed
        if target.startswith("/memfd:"):
            continue
        with contextlib.suppress(OSError):
            os.close(fd)
            closed += 1
    return closed
