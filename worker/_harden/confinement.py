"""The objects the hardening steps share, instead of module-level state.

A worker's three steps (before connecting, when the SPEC arrives, at
lock-down) are separate calls from different modules, and lock-down needs
what step 1 found and opened: the report, whether a user namespace exists,
descriptors opened before Landlock hid ``/proc`` and the cgroup files. That is
a :class:`Confinement`, made afresh by each ``harden_before_connect``. A
fork-server computes once what its workers would otherwise each compute, and
they inherit it at the fork: that is a :class:`Prepared`. The package holds
one of each per process and passes them to the layers explicitly.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

from ._sys import SKIPPED


@dataclass
class Confinement:
    """One worker's hardening: what step 1 applied, and what lock-down needs from it."""

    report: dict[str, str] = field(default_factory=dict)
    pid: int = 0
    userns: bool = False
    cgroup_files: dict[str, int] = field(default_factory=dict)  # "pids.max" -> fd
    proc_status: int = -1  # /proc/self/status and /proc/self/task, opened before Landlock hides /proc
    proc_tasks: int = -1
    allowlist: list[tuple[int, int, int, int]] | None = None  # compiled ahead by a spare worker
    handover_closer: list[tuple[int, int, int, int]] | None = None  # seccomp.lock_ahead's second filter
    locked_ahead: bool = False  # a loaded spare locked down before its agent: lock_down only finishes
    log_size: int | None = None  # a loaded spare's log, as the supervisor sent it (it may not fstat by then)

    def status(self, layer: str) -> str:
        return self.report.get(layer, SKIPPED)

    def vm(self, key: str) -> int:
        """Bytes of ``VmSize`` (address space mapped) or ``VmRSS`` (resident) from /proc/self/status."""
        for line in os.pread(self.proc_status, 16384, 0).decode().splitlines():  # read afresh at offset 0
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
        raise OSError(errno.ENOENT, f"no {key} in /proc/self/status")

    def tasks(self) -> int:
        """This process's threads, from the /proc/self/task directory opened before Landlock."""
        return len(os.listdir(self.proc_tasks))


@dataclass
class Prepared:
    """What a fork-server computed once for the workers it forks (see ``prepare_for_workers``)."""

    endpoint: str = ""
    ruleset: int = -1  # a Landlock ruleset fd with the read grants for ``endpoint``'s home
    cgroup_base: dict[str, Path] = field(default_factory=dict)  # controller -> the fork-server's own group
    born_in: dict[str, Path] = field(default_factory=dict)  # the group a worker forked now is born in
    cgroups_made: int = 0
    cgroups_swept: float = float("-inf")  # when the empty groups of ended workers were last removed (monotonic)

    def inherited_fds(self) -> set[int]:
        """Descriptors a forked worker keeps from its fork-server (closed again before guest code runs)."""
        return {self.ruleset} if self.ruleset >= 0 else set()
