"""OS-level confinement the worker applies to itself, under the WebAssembly sandbox.

This package is the only place that touches prctl, rlimits, seccomp, namespaces,
Landlock and cgroups: one module per layer (``hygiene``, ``cgroups``,
``namespaces``, ``rlimits``, ``privileges`` for no_new_privs, ``landlock``,
``seccomp``), the seccomp BPF compiler (``bpf``) and the system call table
(``syscalls``) in modules of their own, the objects the steps share in
``confinement``, and here the entry points the rest of the worker calls. The
worker applies the layers in three steps:

``harden_before_connect`` (in ``run``, before the ZeroMQ context exists, so the
process is still single-threaded and everything applies to every later thread):

    hygiene      parent-death signal, not dumpable, umask 077, stray descriptors
                 closed, empty environment, empty private working directory,
                 own session, first in line for the OOM killer
    cgroups      a per-worker group in the v1 pids and cpu controllers
    namespaces   new user, mount (everything read-only), network, IPC, UTS and
                 cgroup namespaces
    rlimits      no core files, 64 descriptors, CPU seconds, threads (with a
                 user namespace)
    no_new_privs no privilege gain through exec, ever; every capability dropped
    landlock     no writing, creating, removing or executing any file; no TCP;
                 no signals or abstract sockets outside; reading allowed except
                 the supervisor's home (but its cache/), /proc and /sys
                 (the worker's own status and task list are opened before)
    seccomp      stage 1: a denylist (exec, ptrace, mount, module and kernel
                 interfaces, new namespaces, fork, non-Unix sockets)

``require`` (when the SPEC arrives, before any guest byte is read): every layer
the policy requires must have been applied, else :class:`HardeningFailed`.

``lock_down`` (after the component is compiled and instantiated, before the
first guest call): the address-space, file-size and thread limits tightened to
what was measured, no thread may be created, Landlock stage 2 (the main thread,
where guest code runs, may read no file at all), and seccomp stage 2: the
allowlist in ``seccomp.ALLOWLIST`` on every thread (TSYNC), everything else
killing the process.

A fork-server prepares what depends only on the home and the machine once, with
``prepare_for_workers`` and ``enter_next_cgroup``: the Landlock ruleset (its
read grants walk the directory tree, tens of milliseconds) and the worker's
cgroups (a process born in a cgroup needs no move, and the first move into a v1
cgroup waits for an RCU grace period). Its workers inherit both at the fork; a
worker started any other way computes them itself.

The worker reports what it applied in its hello; a layer reported "applied"
whose second stage then fails stops the worker (:class:`HardeningFailed`), so
the report is true of every call the agent ever runs.

The steps share one :class:`~.confinement.Confinement` (made afresh by
``harden_before_connect``) and one :class:`~.confinement.Prepared` (filled in
by a fork-server, inherited by its workers), held for this process by
``_this`` and passed to each layer explicitly.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from theater.exits import WorkerExit
from theater.spec import HARDENING_LAYERS, Hardening, Limits

from .._errors import HardeningFailed
from . import cgroups, hygiene, landlock, namespaces, privileges, rlimits, seccomp
from ._sys import APPLIED, SKIPPED, unavailable, why
from .cgroups import sweep as sweep_cgroups
from .confinement import Confinement, Prepared
from .hygiene import first_out_of_memory
from .landlock import home_of, landlock_abi

__all__ = [
    "APPLIED", "ATTEMPTED_LAYERS", "EXIT_PARENT_GONE", "SKIPPED", "HardeningFailed", "enter_next_cgroup",
    "first_out_of_memory", "harden_before_connect", "home_of", "inherited_fds", "landlock_abi", "leave_cgroups",
    "lock_down", "lock_down_ahead", "prepare_for_workers", "prepare_lock_down", "require", "sweep_cgroups",
]

EXIT_PARENT_GONE = WorkerExit.PARENT_GONE

# The layers a worker attempts. Narrowed only by measurements and tests that run the worker
# from Python (scripts/bench_hardening.py); no policy, manifest or guest can reach it.
ATTEMPTED_LAYERS: frozenset[str] = frozenset(HARDENING_LAYERS)


@dataclass
class _Process:
    """This process's hardening: what a fork-server prepared (a forked worker inherits it with
    the rest of memory) and the worker's confinement, replaced by each ``harden_before_connect``."""

    prepared: Prepared = field(default_factory=Prepared)
    confinement: Confinement = field(default_factory=Confinement)


_this = _Process()  # one per process, made at import; its fields change, the name is never rebound


# --- step 1: before the ZeroMQ context exists ------------------------------------------


def harden_before_connect(parent_pid: int, endpoint: str, layers: frozenset[str] | None = None,
                          keep: frozenset[int] = frozenset()) -> dict[str, str]:
    """Apply every layer that this machine allows; return the report for the hello.

    The report maps ``hygiene`` and each layer of ``HARDENING_LAYERS`` to
    "applied", "unavailable: <why>" or "skipped" (not attempted), plus a few
    ``<layer>.<detail>`` entries. ``keep``: descriptors the hygiene step leaves open (a spare
    worker's line to its fork-server).
    """
    layers = ATTEMPTED_LAYERS if layers is None else layers
    prepared = _this.prepared
    confinement = _this.confinement = Confinement(pid=os.getpid())
    report = confinement.report
    if not hygiene.die_with(parent_pid):  # the parent died before the signal was armed
        os._exit(EXIT_PARENT_GONE)
    report["hygiene"] = hygiene.apply(report, keep | prepared.inherited_fds())
    confinement.proc_status = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
    confinement.proc_tasks = os.open("/proc/self/task", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    steps = (
        ("cgroups", lambda: cgroups.apply(confinement, prepared)),
        ("namespaces", lambda: namespaces.apply(confinement)),
        ("rlimits", lambda: rlimits.apply(confinement)),
        ("no_new_privs", lambda: privileges.apply(report)),
        ("landlock", lambda: landlock.apply(confinement, prepared, endpoint)),
        ("seccomp", lambda: seccomp.apply(confinement)),
    )
    for layer, step in steps:
        if layer not in layers:
            report[layer] = SKIPPED
            continue
        try:
            report[layer] = step()
        except OSError as exc:
            report[layer] = unavailable(why(exc))
        except Exception as exc:  # an unexpected kernel interface: the layer is not in force
            report[layer] = unavailable(f"{type(exc).__name__}: {exc}")
    if prepared.ruleset >= 0:  # not used (Landlock skipped or unavailable): a ruleset must not outlive this
        os.close(prepared.ruleset)
        prepared.ruleset = -1
    return dict(report)


# --- step 2: the SPEC names the policy's requirements ---------------------------------------------


def require(hardening: Hardening) -> None:
    """Raise :class:`HardeningFailed` unless hygiene and every required layer were applied."""
    confinement = _this.confinement
    for layer in ("hygiene", *hardening.required):
        status = confinement.status(layer)
        if status != APPLIED:
            raise HardeningFailed(f"hardening-failed: {layer} is required by the agent's policy, but {status}")
    for layer in hardening.preferred:
        status = confinement.status(layer)
        if status != APPLIED:
            print(f"worker: preferred hardening layer {layer} is {status}", file=sys.stderr, flush=True)


# --- step 3: after instantiation, before the first guest call -------------------------------------


def lock_down(limits: Limits) -> None:
    """Tighten to what the loaded agent needs, then allow only the system calls it uses."""
    c = _this.confinement
    if c.locked_ahead:
        _lock([("rlimits", lambda: rlimits.lock_log(c.log_size)), ("seccomp", lambda: seccomp.close_handover(c))],
              "lock-down after the hand-over")
        return
    _lock([("rlimits", lambda: rlimits.lock(c, limits)), ("cgroups", lambda: cgroups.lock(c)),
           ("landlock", landlock.lock), ("seccomp", lambda: seccomp.lock(c))],
          "lock-down after the hello reported it applied")


def lock_down_ahead(limits: Limits) -> None:
    """In a loaded spare, once its component is instantiated and before it has an agent: every lock-down
    step but the log's size, the seccomp allowlist letting the hand-over's few calls through
    (``seccomp.HANDOVER``). ``lock_down`` then finishes, so the result is the same as a lock-down at once."""
    c = _this.confinement
    _lock([("rlimits", lambda: rlimits.lock_all_but_log(c, limits)), ("cgroups", lambda: cgroups.lock(c)),
           ("landlock", landlock.lock), ("seccomp", lambda: seccomp.lock_ahead(c))],
          "lock-down ahead of the agent")
    c.locked_ahead = True


def log_handed_over(size: int) -> None:
    """A loaded spare was given its agent's log, of ``size`` bytes: its lock-down limits the log to a little
    more (it may no longer ``fstat`` the log itself)."""
    _this.confinement.log_size = size


def _lock(steps: list[tuple[str, Callable[[], None]]], when: str) -> None:
    """Each step of a layer that was applied, in order; a layer reported applied that cannot be completed
    stops the worker."""
    confinement = _this.confinement
    try:
        for layer, step in steps:
            if confinement.status(layer) == APPLIED:
                step()
    except OSError as exc:
        raise HardeningFailed(f"hardening-failed: {when}: {why(exc)}") from None


def prepare_lock_down() -> None:
    """Compile the seccomp allowlist now (it depends only on this process), so ``lock_down``
    only installs it: a spare worker does this while it waits for an agent."""
    confinement = _this.confinement
    if confinement.status("seccomp") == APPLIED:
        confinement.allowlist = seccomp.compile_allowlist(confinement.pid)


# --- in a fork-server: prepared once, inherited by the workers it forks -----------------------------


def prepare_for_workers(endpoint: str) -> dict[str, str]:
    """In a fork-server: build once what each forked worker's hardening would otherwise compute.

    The Landlock read ruleset depends only on the home and the file tree, and
    the worker restricts itself with the inherited descriptor, which it closes
    before any guest code runs. Entries created after this call are not
    granted to workers (deny by default). The fork-server then enters the first
    worker's cgroups. Returns what could not be prepared.
    """
    problems = {}
    why_not = landlock.prepare(_this.prepared, endpoint)
    if why_not:
        problems["landlock"] = why_not
    why_not = cgroups.prepare(_this.prepared)
    if why_not:
        problems["cgroups"] = why_not
    return problems


def inherited_fds() -> set[int]:
    """Descriptors a forked worker keeps from its fork-server (closed again before guest code runs)."""
    return _this.prepared.inherited_fds()


def enter_next_cgroup() -> str:
    """In a fork-server, between spawns: move into a fresh group, so the next worker is born in it.

    Returns "" or why the next worker must make its own group.
    """
    return cgroups.enter_next(_this.prepared)


def leave_cgroups() -> str:
    """In a fork-server: back to its own groups (before forking anything that is not a worker)."""
    return cgroups.leave(_this.prepared)
