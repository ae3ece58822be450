"""The cgroups layer: each worker alone in a group of the v1 pids and cpu controllers.

A fork bomb or a thread bomb stops at ``pids.max`` (also for root, whom
RLIMIT_NPROC ignores) and a worker gets at most one CPU. The first move of a
process into a v1 group waits for an RCU grace period, so a fork-server moves
itself into the next worker's group between spawns and the worker is born
there (``enter_next``); a worker started any other way makes its own group.
Not the memory controller: RLIMIT_AS bounds a worker's memory, and where each
command of an environment runs in a transient memory group of its own (as
here), a child group would stop that group from being removed.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from ._sys import APPLIED, unavailable, why
from .confinement import Confinement, Prepared

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_CONTROLLERS = ("pids", "cpu")
CGROUP_PIDS_BEFORE_LOCK = 32
CGROUP_CPU_QUOTA_US = 100_000  # one CPU per worker (quota over a 100 ms period)
# How often a fork-server removes the empty groups of ended workers as it makes the next one. Each removal
# is tried on every group (a live worker's fails), so sweeping at every spawn cost a spawn time in
# proportion to the workers running: 1.7 ms of the fork-server's time per spawn with a tree of 100.
SWEEP_EVERY_S = 5.0


def apply(confinement: Confinement, prepared: Prepared) -> str:
    """Be alone in a group under ``theater/`` in the pids and cpu v1 hierarchies, with start-up ceilings.

    A worker forked by a fork-server was born in a group made for it alone
    (``enter_next``); any other worker makes ``theater/w-<pid>`` and
    moves itself in. ``lock`` tightens the pids limit.
    """
    own = _own_cgroups()
    for controller in CGROUP_CONTROLLERS:
        if controller not in own:
            return unavailable(f"no cgroup v1 {controller} hierarchy (cgroup v2 per-worker groups are not supported)")
    here = {c: CGROUP_ROOT / c / own[c].lstrip("/") for c in CGROUP_CONTROLLERS}
    if prepared.born_in and here == prepared.born_in:
        dirs = here
    else:
        dirs = _make_groups({c: d / "theater" for c, d in here.items()}, f"w-{os.getpid()}")
        for d in dirs.values():
            _write(d / "cgroup.procs", 0)
    confinement.cgroup_files["pids.max"] = os.open(dirs["pids"] / "pids.max", os.O_WRONLY | os.O_CLOEXEC)
    confinement.report["cgroups.path"] = str(dirs["pids"].relative_to(CGROUP_ROOT / "pids"))
    return APPLIED


def lock(confinement: Confinement) -> None:
    """At lock-down: ``pids.max`` down to the threads that run now, so none can be added."""
    os.write(confinement.cgroup_files["pids.max"], str(confinement.tasks()).encode())
    for fd in confinement.cgroup_files.values():
        os.close(fd)
    confinement.cgroup_files.clear()


def _make_groups(parents: dict[str, Path], name: str, sweep: bool = True) -> dict[str, Path]:
    """``<parent>/<name>`` in each controller with a worker's start-up ceilings; with ``sweep``, empty
    groups of workers that have ended are removed on the way (a worker cannot remove its own)."""
    dirs = {}
    for controller, parent in parents.items():
        parent.mkdir(mode=0o755, exist_ok=True)
        for entry in os.listdir(parent) if sweep else ():
            if entry.startswith("w-"):
                with contextlib.suppress(OSError):
                    os.rmdir(parent / entry)  # EBUSY while its worker lives
        mine = dirs[controller] = parent / name
        with contextlib.suppress(FileExistsError):
            mine.mkdir(mode=0o755)
    _write(dirs["pids"] / "pids.max", CGROUP_PIDS_BEFORE_LOCK)
    _write(dirs["cpu"] / "cpu.cfs_period_us", 100_000)
    _write(dirs["cpu"] / "cpu.cfs_quota_us", CGROUP_CPU_QUOTA_US)
    return dirs


def prepare(prepared: Prepared) -> str:
    """In a fork-server: note its own groups, then enter the first worker's. Returns "" or why not."""
    problem = ""
    try:
        own = _own_cgroups()
        prepared.cgroup_base = {c: CGROUP_ROOT / c / own[c].lstrip("/") for c in CGROUP_CONTROLLERS}
    except (OSError, KeyError) as exc:
        problem = f"no v1 {exc} hierarchy" if isinstance(exc, KeyError) else why(exc)
    return enter_next(prepared) or problem


def enter_next(prepared: Prepared) -> str:
    """In a fork-server, between spawns: move into a fresh group, so the next worker is born in it.

    Returns "" or why the next worker must make its own group. The fork-server
    is single-threaded and idle here, so the move's wait is nobody's spawn time.
    """
    prepared.born_in = {}
    if not prepared.cgroup_base:
        return "no cgroup v1 pids and cpu hierarchies"
    prepared.cgroups_made += 1
    name = f"w-{os.getpid()}-{prepared.cgroups_made}"
    now = time.monotonic()
    sweep = now - prepared.cgroups_swept >= SWEEP_EVERY_S
    if sweep:
        prepared.cgroups_swept = now
    try:
        dirs = _make_groups({c: d / "theater" for c, d in prepared.cgroup_base.items()}, name, sweep)
        for d in dirs.values():
            _write(d / "cgroup.procs", 0)
    except OSError as exc:
        return leave(prepared) or why(exc)
    prepared.born_in = dirs
    return ""


def leave(prepared: Prepared) -> str:
    """In a fork-server: back to its own groups (before forking anything that is not a worker)."""
    prepared.born_in = {}
    try:
        for d in prepared.cgroup_base.values():
            _write(d / "cgroup.procs", 0)
    except OSError as exc:
        return why(exc)
    return ""


def sweep() -> list[str]:
    """Remove the empty per-worker groups (and then the empty ``theater`` groups) under this
    process's own cgroups; return what was removed. Groups whose worker lives are busy and stay."""
    removed = []
    own = _own_cgroups()
    for controller in CGROUP_CONTROLLERS:
        if controller not in own:
            continue
        parent = CGROUP_ROOT / controller / own[controller].lstrip("/") / "theater"
        if not parent.is_dir():
            continue
        for entry in sorted(os.listdir(parent)):
            if entry.startswith("w-"):
                with contextlib.suppress(OSError):
                    os.rmdir(parent / entry)
                    removed.append(str(parent / entry))
        with contextlib.suppress(OSError):
            os.rmdir(parent)
            removed.append(str(parent))
    return removed


def _own_cgroups() -> dict[str, str]:
    own = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(","):
                if c:
                    own[c] = path
    return own


def _write(path: Path, value: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)
