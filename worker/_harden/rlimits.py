"""The rlimits layer: ceilings the kernel enforces on the worker's host side.

The wasm limits bound the guest; these bound what the worker's own code and
libraries may use: no core files, 64 descriptors, an hour of CPU, a thread
count, and at lock-down the address space and the log's size, once what the
loaded agent needs is known.
"""

from __future__ import annotations

import os
import resource
import stat

from theater.spec import Limits

from ._sys import APPLIED
from .confinement import Confinement

# Ceilings every worker gets, whatever its policy (see docs/hardening.md).
MAX_OPEN_FILES = 64  # std streams, the ZeroMQ socket and its signalling fds, wasmtime's memfd
CPU_SECONDS = 3600  # a worker that used an hour of CPU is killed and restarted from its last state
THREADS_BEFORE_LOCK = 16  # ZeroMQ I/O and reaper threads, the deadline timer, headroom
LOG_ALLOWANCE = 1024 * 1024  # bytes a worker may still append to its log after lock-down
HOST_HEADROOM = 256 * 1024 * 1024  # address space beyond what was mapped at lock-down


def apply(confinement: Confinement) -> str:
    """Start-up ceilings; ``lock`` adds the address space and file size once they are known."""
    report = confinement.report
    _lower(resource.RLIMIT_CORE, 0)
    _lower(resource.RLIMIT_NOFILE, MAX_OPEN_FILES)
    _lower(resource.RLIMIT_CPU, CPU_SECONDS)
    if confinement.userns and os.geteuid() != 0:
        # Counted per user *in this namespace*: only this worker's own threads.
        _lower(resource.RLIMIT_NPROC, THREADS_BEFORE_LOCK)
        report["rlimits.nproc"] = str(THREADS_BEFORE_LOCK)
    elif os.geteuid() == 0:
        report["rlimits.nproc"] = "not enforced for uid 0 (the pids cgroup and seccomp bound threads)"
    else:
        report["rlimits.nproc"] = "not set: without a user namespace it counts every process of this user"
    return APPLIED


def address_space_limit(limits: Limits, mapped: int) -> int:
    """RLIMIT_AS at lock-down: what is mapped now (the instance's linear memories are reserved
    whole, so their growth is already counted) plus room for a fresh instance's growth after a
    trap, message and state copies, and the host's own allocations."""
    copies = 4 * (limits.max_message_bytes + limits.max_state_bytes)
    return mapped + 2 * limits.memory_bytes + copies + HOST_HEADROOM


def lock(confinement: Confinement, limits: Limits) -> None:
    """At lock-down: the address space, the log's size and the thread count."""
    lock_all_but_log(confinement, limits)
    lock_log()


def lock_all_but_log(confinement: Confinement, limits: Limits) -> None:
    """The address space and the thread count (a loaded spare sets them before it knows its log)."""
    _lower(resource.RLIMIT_AS, address_space_limit(limits, confinement.vm("VmSize")))
    if confinement.userns and os.geteuid() != 0:
        _lower(resource.RLIMIT_NPROC, confinement.tasks())


def lock_log(size: int | None = None) -> None:
    """wasmtime wrote its memory image to a memfd while instantiating; from now on the only file a worker
    writes is its log (standard error), and only a little more of it. ``size``: the log's size as the
    supervisor sent it to a loaded spare, whose allowlist refuses ``fstat`` by then; else it is read here,
    and a log that cannot be read fails the lock-down rather than leave a limit of 1 MiB past nothing."""
    if size is None:
        st = os.fstat(2)
        size = st.st_size if stat.S_ISREG(st.st_mode) else 0
    _lower(resource.RLIMIT_FSIZE, size + LOG_ALLOWANCE)


def _lower(which: int, value: int) -> None:
    _, hard = resource.getrlimit(which)
    new = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(which, (new, new))
