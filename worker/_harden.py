"""OS-level confinement the worker applies to itself, under the WebAssembly sandbox.

This module is the only place that touches prctl, rlimits, seccomp, namespaces,
Landlock and cgroups. The worker applies the layers in three steps:

``harden_before_connect`` (in ``run``, before the ZeroMQ context exists, so the
process is still single-threaded and everything applies to every later thread):

    hygiene      parent-death signal, not dumpable, umask 077, stray descriptors
                 closed, empty environment, empty private working directory,
                 own session
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
allowlist in ``ALLOWLIST`` on every thread (TSYNC), everything else killing the
process.

A fork-server prepares what depends only on the home and the machine once, with
``prepare_for_workers`` and ``enter_next_cgroup``: the Landlock ruleset (its
read grants walk the directory tree, tens of milliseconds) and the worker's
cgroups (a process born in a cgroup needs no move, and the first move into a v1
cgroup waits for an RCU grace period). Its workers inherit both at the fork; a
worker started any other way computes them itself.

The worker reports what it applied in its hello; a layer reported "applied"
whose second stage then fails stops the worker (:class:`HardeningFailed`), so
the report is true of every call the agent ever runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import resource
import signal
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from theater.spec import HARDENING_LAYERS, Hardening, Limits

from ._errors import HardeningFailed

__all__ = [
    "APPLIED", "HardeningFailed", "enter_next_cgroup", "harden_before_connect", "inherited_fds", "landlock_abi",
    "leave_cgroups", "lock_down", "prepare_for_workers", "prepare_lock_down", "require", "sweep_cgroups",
]

APPLIED = "applied"
SKIPPED = "skipped"
EXIT_PARENT_GONE = 70

# Ceilings every worker gets, whatever its policy (see docs/hardening.md).
MAX_OPEN_FILES = 64  # std streams, the ZeroMQ socket and its signalling fds, wasmtime's memfd
CPU_SECONDS = 3600  # a worker that used an hour of CPU is killed and restarted from its last state
THREADS_BEFORE_LOCK = 16  # ZeroMQ I/O and reaper threads, the deadline timer, headroom
LOG_ALLOWANCE = 1024 * 1024  # bytes a worker may still append to its log after lock-down
HOST_HEADROOM = 256 * 1024 * 1024  # address space beyond what was mapped at lock-down
# Not the memory controller: RLIMIT_AS bounds a worker's memory, and where each command of an
# environment runs in a transient memory group of its own (as here), a child group would stop
# that group from being removed.
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_CONTROLLERS = ("pids", "cpu")
CGROUP_PIDS_BEFORE_LOCK = 32
CGROUP_CPU_QUOTA_US = 100_000  # one CPU per worker (quota over a 100 ms period)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38


def _unavailable(why: str) -> str:
    return f"unavailable: {why}"


def _why(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    text = exc.strerror or str(exc)
    return f"{text} ({name})" if name else text


def _prctl(option: int, arg: int) -> None:
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _syscall(nr: int, *args: object) -> int:
    result = _libc.syscall(nr, *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(result)


# --- state shared by the three steps (one agent per process) -------------------------


@dataclass
class _State:
    report: dict[str, str] = field(default_factory=dict)
    pid: int = 0
    userns: bool = False
    cgroup_files: dict[str, int] = field(default_factory=dict)  # "pids.max" -> fd
    proc_status: int = -1  # /proc/self/status and /proc/self/task, opened before Landlock hides /proc
    proc_tasks: int = -1
    allowlist: list[tuple[int, int, int, int]] | None = None  # compiled ahead by a spare worker


_state = _State()


@dataclass
class _Prepared:
    """What a fork-server computed once for the workers it forks (see ``prepare_for_workers``)."""

    endpoint: str = ""
    ruleset: int = -1  # a Landlock ruleset fd with the read grants for ``endpoint``'s home
    cgroup_base: dict[str, Path] = field(default_factory=dict)  # controller -> the fork-server's own group
    born_in: dict[str, Path] = field(default_factory=dict)  # the group a worker forked now is born in
    cgroups_made: int = 0


_prepared = _Prepared()


def _status(layer: str) -> str:
    return _state.report.get(layer, SKIPPED)


# --- step 1: before the ZeroMQ context exists ------------------------------------------


# The layers a worker attempts. Narrowed only by measurements and tests that run the worker
# from Python (scripts/bench_hardening.py); no policy, manifest or guest can reach it.
ATTEMPTED_LAYERS: frozenset[str] = frozenset(HARDENING_LAYERS)


def harden_before_connect(parent_pid: int, endpoint: str, layers: frozenset[str] | None = None,
                          keep: frozenset[int] = frozenset()) -> dict[str, str]:
    """Apply every layer that this machine allows; return the report for the hello.

    The report maps ``hygiene`` and each layer of ``HARDENING_LAYERS`` to
    "applied", "unavailable: <why>" or "skipped" (not attempted), plus a few
    ``<layer>.<detail>`` entries. ``keep``: descriptors the hygiene step leaves open (a spare
    worker's line to its fork-server).
    """
    global _state
    layers = ATTEMPTED_LAYERS if layers is None else layers
    _state = _State(pid=os.getpid())
    report = _state.report
    report["hygiene"] = _hygiene(parent_pid, report, keep)
    _state.proc_status = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
    _state.proc_tasks = os.open("/proc/self/task", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    steps = (
        ("cgroups", _cgroups),
        ("namespaces", _namespaces),
        ("rlimits", _rlimits),
        ("no_new_privs", _no_new_privs),
        ("landlock", lambda r: _landlock(r, endpoint)),
        ("seccomp", _seccomp_stage1),
    )
    for layer, step in steps:
        if layer not in layers:
            report[layer] = SKIPPED
            continue
        try:
            report[layer] = step(report)
        except OSError as exc:
            report[layer] = _unavailable(_why(exc))
        except Exception as exc:  # an unexpected kernel interface: the layer is not in force
            report[layer] = _unavailable(f"{type(exc).__name__}: {exc}")
    if _prepared.ruleset >= 0:  # not used (Landlock skipped or unavailable): a ruleset must not outlive this
        os.close(_prepared.ruleset)
        _prepared.ruleset = -1
    return dict(report)


def _hygiene(parent_pid: int, report: dict[str, str], keep: frozenset[int]) -> str:
    """Die with the supervisor, no core dumps or ptrace by peers, private umask, nothing inherited."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(EXIT_PARENT_GONE)
    _prctl(PR_SET_DUMPABLE, 0)
    os.umask(0o077)
    os.environ.clear()
    closed = _close_strays(keep)
    report["hygiene.fds"] = f"kept 0-2, closed {closed} stray"
    if os.getsid(0) != os.getpid():
        with contextlib.suppress(OSError):
            os.setsid()
    problems = []
    if os.getsid(0) != os.getpid():
        problems.append("not a session leader")
    try:
        st = os.stat(".")
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            problems.append(f"working directory is not private (mode {stat.S_IMODE(st.st_mode):o}, uid {st.st_uid})")
        elif os.listdir("."):
            problems.append("working directory is not empty")
    except OSError as exc:
        problems.append(f"working directory: {_why(exc)}")
    return _unavailable("; ".join(problems)) if problems else APPLIED


def _close_strays(keep: frozenset[int]) -> int:
    """Close every descriptor but the standard three (and, in a forked worker, wasmtime's memfds
    and the Landlock ruleset the fork-server prepared)."""
    closed = 0
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2 or fd == _prepared.ruleset or fd in keep:
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


# --- cgroups (v1 controllers) ------------------------------------------------------------


def _cgroups(report: dict[str, str]) -> str:
    """Be alone in a group under ``theater/`` in the pids and cpu v1 hierarchies, with start-up ceilings.

    A worker forked by a fork-server was born in a group made for it alone
    (``enter_next_cgroup``); any other worker makes ``theater/w-<pid>`` and
    moves itself in. ``lock_down`` tightens the pids limit.
    """
    own = _own_cgroups()
    for controller in CGROUP_CONTROLLERS:
        if controller not in own:
            return _unavailable(f"no cgroup v1 {controller} hierarchy (cgroup v2 per-worker groups are not supported)")
    here = {c: CGROUP_ROOT / c / own[c].lstrip("/") for c in CGROUP_CONTROLLERS}
    if _prepared.born_in and here == _prepared.born_in:
        dirs = here
    else:
        dirs = _make_groups({c: d / "theater" for c, d in here.items()}, f"w-{os.getpid()}")
        for d in dirs.values():
            _write(d / "cgroup.procs", 0)
    _state.cgroup_files["pids.max"] = os.open(dirs["pids"] / "pids.max", os.O_WRONLY | os.O_CLOEXEC)
    report["cgroups.path"] = str(dirs["pids"].relative_to(CGROUP_ROOT / "pids"))
    return APPLIED


def _make_groups(parents: dict[str, Path], name: str) -> dict[str, Path]:
    """``<parent>/<name>`` in each controller with a worker's start-up ceilings; empty groups of
    workers that have ended are removed on the way (a worker cannot remove its own)."""
    dirs = {}
    for controller, parent in parents.items():
        parent.mkdir(mode=0o755, exist_ok=True)
        for entry in os.listdir(parent):
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


def enter_next_cgroup() -> str:
    """In a fork-server, between spawns: move into a fresh group, so the next worker is born in it.

    Returns "" or why the next worker must make its own group. The fork-server
    is single-threaded and idle here, so the move's wait is nobody's spawn time.
    """
    _prepared.born_in = {}
    if not _prepared.cgroup_base:
        return "no cgroup v1 pids and cpu hierarchies"
    _prepared.cgroups_made += 1
    name = f"w-{os.getpid()}-{_prepared.cgroups_made}"
    try:
        dirs = _make_groups({c: d / "theater" for c, d in _prepared.cgroup_base.items()}, name)
        for d in dirs.values():
            _write(d / "cgroup.procs", 0)
    except OSError as exc:
        return leave_cgroups() or _why(exc)
    _prepared.born_in = dirs
    return ""


def leave_cgroups() -> str:
    """In a fork-server: back to its own groups (before forking anything that is not a worker)."""
    _prepared.born_in = {}
    try:
        for d in _prepared.cgroup_base.values():
            _write(d / "cgroup.procs", 0)
    except OSError as exc:
        return _why(exc)
    return ""


def sweep_cgroups() -> list[str]:
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


# --- namespaces ------------------------------------------------------------------------------

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
NAMESPACES = (
    ("user", CLONE_NEWUSER), ("mnt", CLONE_NEWNS), ("net", CLONE_NEWNET),
    ("ipc", CLONE_NEWIPC), ("uts", CLONE_NEWUTS), ("cgroup", CLONE_NEWCGROUP),
)
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _namespaces(report: dict[str, str]) -> str:
    """Unshare user, mount, network, IPC, UTS and cgroup namespaces; make every mount read-only.

    Without a user namespace (refused to unprivileged users on some systems)
    root still gets the others. No PID namespace: a process that unshares one
    can no longer create threads (the kernel refuses CLONE_THREAD across PID
    namespaces), and the worker needs its ZeroMQ threads.
    """
    uid, gid = os.geteuid(), os.getegid()
    kinds = [name for name, _ in NAMESPACES]
    flags = 0
    for _, flag in NAMESPACES:
        flags |= flag
    try:
        _unshare(flags)
    except OSError as exc:
        if os.geteuid() != 0:
            raise
        kinds.remove("user")
        report["namespaces.user"] = _unavailable(_why(exc))
        _unshare(flags & ~CLONE_NEWUSER)
    _state.userns = "user" in kinds
    if _state.userns:
        report["namespaces.ids"] = _map_ids(uid, gid)
    report["namespaces.kinds"] = " ".join(kinds)
    report["namespaces.pid"] = _unavailable("a PID namespace forbids the worker's threads")
    # Private propagation, then every mount read-only, no setuid, no devices, no exec.
    if _libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount --make-rprivate /: {os.strerror(err)}")
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC, 0, 0, 0)
    _syscall(_NR["mount_setattr"], AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr))
    report["namespaces.mounts"] = "all read-only, nosuid, nodev, noexec"
    return APPLIED


def _unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare: {os.strerror(err)}")


def _map_ids(uid: int, gid: int) -> str:
    """Map the worker's own uid and gid into its user namespace (allowed unless it is root)."""
    try:
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1")
        return f"uid {uid} and gid {gid} mapped to themselves"
    except OSError as exc:
        return f"unmapped (uid {os.getuid()} inside): {_why(exc)}"


# --- rlimits -----------------------------------------------------------------------------------


def _rlimits(report: dict[str, str]) -> str:
    """Start-up ceilings; ``lock_down`` adds the address space and file size once they are known."""
    _lower(resource.RLIMIT_CORE, 0)
    _lower(resource.RLIMIT_NOFILE, MAX_OPEN_FILES)
    _lower(resource.RLIMIT_CPU, CPU_SECONDS)
    if _state.userns and os.geteuid() != 0:
        # Counted per user *in this namespace*: only this worker's own threads.
        _lower(resource.RLIMIT_NPROC, THREADS_BEFORE_LOCK)
        report["rlimits.nproc"] = str(THREADS_BEFORE_LOCK)
    elif os.geteuid() == 0:
        report["rlimits.nproc"] = "not enforced for uid 0 (the pids cgroup and seccomp bound threads)"
    else:
        report["rlimits.nproc"] = "not set: without a user namespace it counts every process of this user"
    return APPLIED


def _lower(which: int, value: int) -> None:
    _, hard = resource.getrlimit(which)
    new = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(which, (new, new))


PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _capabilities_held() -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("CapPrm:", "CapEff:", "CapAmb:")) and int(line.split()[1], 16):
                return True
    return False


def _no_new_privs(report: dict[str, str]) -> str:
    """No privilege gain through exec, and no capability left (root's, or a user namespace's)."""
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    held = _capabilities_held()
    for cap in range(last + 1):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            if err == errno.EPERM and not held:
                break  # no CAP_SETPCAP, and no capability to lose: no_new_privs keeps it that way
            if err != errno.EINVAL:
                raise OSError(err, f"dropping capability {cap} from the bounding set: {os.strerror(err)}")
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header, data = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
    if _libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
    report["no_new_privs.capabilities"] = (
        "none (effective, permitted, inheritable, ambient, bounding)" if held else "none held"
    )
    return APPLIED


# --- Landlock ------------------------------------------------------------------------------------

LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
LL_EXECUTE, LL_WRITE_FILE, LL_READ_FILE, LL_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
LL_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
LL_NET_BIND_TCP, LL_NET_CONNECT_TCP = 1, 2
LL_SCOPE_ABSTRACT_UNIX_SOCKET, LL_SCOPE_SIGNAL = 1, 2


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version (raises OSError if Landlock is absent or disabled)."""
    return _syscall(_NR["landlock_create_ruleset"], None, 0, LANDLOCK_CREATE_RULESET_VERSION)


READABLE_IN_HOME = ("cache",)  # compiled artifacts the supervisor vouched for


def home_of(endpoint: str) -> Path:
    """The supervisor's home, from its worker socket ``<home>/run/workers.sock``."""
    sock = Path(endpoint.removeprefix("ipc://"))
    return Path(os.path.realpath(sock.parent.parent if sock.parent.name == "run" else sock.parent))


def _protected_paths(endpoint: str) -> list[Path]:
    """What a worker must not read: the supervisor's home (its key, token, store, logs), /proc, /sys."""
    return [home_of(endpoint), Path("/proc"), Path("/sys")]


def _read_roots(protected: list[Path]) -> list[str]:
    """Paths under which reading stays allowed: the whole tree minus ``protected``.

    Landlock only grants, so the tree is split along the way to each protected
    path: every sibling on that way is granted whole, symbolic links are not
    followed, and the protected paths themselves are left out. The cost grows
    with the number of entries in the directories on that way (docs/hardening.md).
    """
    hidden = {str(p) for p in protected}
    on_the_way = {str(a) for p in protected for a in p.parents}
    roots: list[str] = []
    todo = ["/"]
    while todo:
        d = todo.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for entry in entries:
            path = entry.path
            if path in hidden or entry.is_symlink():
                continue
            if path in on_the_way:
                todo.append(path)
            else:
                roots.append(path)
    return roots


def _ruleset(abi: int, grants: list[tuple[str, int]]) -> int:
    attr = _RulesetAttr(LL_FS_BY_ABI.get(abi, (1 << 16) - 1), 0, 0)
    if abi >= 4:
        attr.handled_access_net = LL_NET_BIND_TCP | LL_NET_CONNECT_TCP
    if abi >= 6:
        attr.scoped = LL_SCOPE_ABSTRACT_UNIX_SOCKET | LL_SCOPE_SIGNAL
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _syscall(_NR["landlock_create_ruleset"], ctypes.byref(attr), size, 0)
    try:
        add_rule, rule, file_rights = _NR["landlock_add_rule"], _PathBeneath(), LL_READ_FILE | LL_EXECUTE | LL_WRITE_FILE
        for path, access in grants:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue  # vanished, or cannot be opened: not granted
            try:
                rule.allowed_access = access if stat.S_ISDIR(os.fstat(fd).st_mode) else access & file_rights
                rule.parent_fd = fd
                if _libc.syscall(add_rule, ruleset, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"landlock_add_rule {path}: {os.strerror(err)}")
            finally:
                os.close(fd)
    except BaseException:
        os.close(ruleset)
        raise
    return ruleset


def _restrict(ruleset: int) -> None:
    try:
        _syscall(_NR["landlock_restrict_self"], ruleset, 0)
    finally:
        os.close(ruleset)


def _read_ruleset(endpoint: str) -> int:
    """A ruleset that grants reading everywhere but the supervisor's home (its cache/ excepted), /proc and /sys."""
    home = home_of(endpoint)
    protected = _protected_paths(endpoint)
    readable = [*_read_roots(protected), *(str(home / d) for d in READABLE_IN_HOME if (home / d).is_dir())]
    return _ruleset(landlock_abi(), [(root, LL_READ_FILE | LL_READ_DIR) for root in readable])


def _landlock(report: dict[str, str], endpoint: str) -> str:
    """Stage 1: read-only access outside the protected paths, nothing else, for every future thread."""
    abi = landlock_abi()
    if _status("no_new_privs") != APPLIED and os.geteuid() != 0:
        return _unavailable("needs no_new_privs")
    prepared, _prepared.ruleset = _prepared.ruleset, -1
    if prepared >= 0 and _prepared.endpoint != endpoint:
        os.close(prepared)
        prepared = -1
    _restrict(prepared if prepared >= 0 else _read_ruleset(endpoint))
    report["landlock.abi"] = str(abi)
    report["landlock.unreadable"] = " ".join(map(str, _protected_paths(endpoint)))
    return APPLIED


def inherited_fds() -> set[int]:
    """Descriptors a forked worker keeps from its fork-server (closed again before guest code runs)."""
    return {_prepared.ruleset} if _prepared.ruleset >= 0 else set()


def prepare_for_workers(endpoint: str) -> dict[str, str]:
    """In a fork-server: build once what each forked worker's hardening would otherwise compute.

    The Landlock read ruleset depends only on the home and the file tree, and
    the worker restricts itself with the inherited descriptor, which it closes
    before any guest code runs. Entries created after this call are not
    granted to workers (deny by default). Returns what could not be prepared.
    """
    problems = {}
    _prepared.endpoint = endpoint
    try:
        _prepared.ruleset = _read_ruleset(endpoint)
    except OSError as exc:
        problems["landlock"] = _why(exc)
    try:
        own = _own_cgroups()
        _prepared.cgroup_base = {c: CGROUP_ROOT / c / own[c].lstrip("/") for c in CGROUP_CONTROLLERS}
    except (OSError, KeyError) as exc:
        problems["cgroups"] = f"no v1 {exc} hierarchy" if isinstance(exc, KeyError) else _why(exc)
    why = enter_next_cgroup()
    if why:
        problems["cgroups"] = why
    return problems


# --- seccomp -------------------------------------------------------------------------------------

# Action of a rule: ALLOW, KILL, or an errno the call fails with.
ALLOW, KILL = "allow", "kill"


@dataclass(frozen=True)
class ArgRule:
    """``action`` when the low 32 bits of argument ``arg`` match, else ``otherwise``.

    ``mask``: match when (value & mask) != 0. ``equals``: match when value == equals
    (``equals=SELF_PID`` stands for the worker's pid).
    """

    arg: int
    action: str | int
    otherwise: str | int
    mask: int | None = None
    equals: int | None = None


SELF_PID = -1
PROT_EXEC = 0x4
CLONE_THREAD = 0x00010000
AF_UNIX = 1
AT_EMPTY_PATH = 0x1000
EPERM, ENOSYS = errno.EPERM, errno.ENOSYS

# Stage 1, before the hello: default allow, except what an honest worker never does.
DENYLIST: dict[str, str | int | ArgRule] = {
    # Running other programs and inspecting other processes: evidence of compromise.
    **dict.fromkeys(("execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev",
                     "kcmp", "pidfd_getfd", "process_madvise"), KILL),
    # Mounts, modules, kernel-wide state, keyrings, BPF, perf, io_uring, userfaultfd.
    **dict.fromkeys(("mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
                     "fsconfig", "fsmount", "fspick", "mount_setattr", "init_module", "finit_module",
                     "delete_module", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "acct",
                     "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key", "iopl",
                     "ioperm", "syslog", "quotactl", "quotactl_fd", "lookup_dcookie", "fanotify_init",
                     "open_by_handle_at", "name_to_handle_at", "vhangup", "settimeofday", "clock_settime",
                     "clock_adjtime", "adjtimex", "sethostname", "setdomainname", "io_uring_setup",
                     "io_uring_enter", "io_uring_register", "uselib", "personality", "setns", "unshare"), KILL),
    # New processes fail (threads stay allowed until stage 2); glibc falls back from clone3 to clone.
    "clone": ArgRule(0, ALLOW, EPERM, mask=CLONE_THREAD),
    "clone3": ENOSYS,
    "fork": EPERM,
    "vfork": EPERM,
    # Only Unix sockets (ZeroMQ's ipc:// transport).
    "socket": ArgRule(0, ALLOW, EPERM, equals=AF_UNIX),
    "socketpair": ArgRule(0, ALLOW, EPERM, equals=AF_UNIX),
}

# Stage 2, before the first guest call, on every thread: everything not listed kills the
# process (SIGSYS). The allowed calls are those seen when tracing workers after lock-down
# through the whole test suite (strace -f; see docs/hardening.md), each group with its reason.
ALLOWLIST: dict[str, str | int | ArgRule] = {
    # I/O on descriptors the worker already holds: its log, the ZeroMQ socket and eventfds, epoll.
    **dict.fromkeys(("read", "write", "writev", "close", "poll", "ppoll", "epoll_wait", "epoll_pwait",
                     "epoll_ctl", "recvfrom", "sendto"), ALLOW),
    # Memory: Python's allocator, glibc's arenas, wasmtime's linear memories; never executable pages.
    **dict.fromkeys(("brk", "munmap", "mremap", "madvise"), ALLOW),
    "mmap": ArgRule(2, EPERM, ALLOW, mask=PROT_EXEC),
    "mprotect": ArgRule(2, EPERM, ALLOW, mask=PROT_EXEC),
    # Threads that already run: locks, yields, sleeps, clocks, randomness, identity.
    **dict.fromkeys(("futex", "sched_yield", "nanosleep", "clock_nanosleep", "clock_gettime", "gettimeofday",
                     "time", "getrandom", "getpid", "gettid", "getppid"), ALLOW),
    # Signals: wasmtime turns traps into signals on the faulting thread; abort() signals itself.
    **dict.fromkeys(("rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "restart_syscall"), ALLOW),
    "kill": ArgRule(0, ALLOW, EPERM, equals=SELF_PID),
    "tgkill": ArgRule(0, ALLOW, EPERM, equals=SELF_PID),
    # Ending a thread or the process.
    **dict.fromkeys(("exit", "exit_group"), ALLOW),
    # Not seen in traces but plausible from glibc, Python or libzmq on a rare path: fail instead of
    # killing, so such a path reports an error. This covers every way to open, create or inspect a
    # file, a new descriptor, socket, process or thread, and the process's own limits and state.
    **dict.fromkeys((
        "open", "openat", "openat2", "creat", "stat", "lstat", "newfstatat", "statx", "fstat", "access",
        "faccessat", "faccessat2", "readlink", "readlinkat", "getdents64", "mkdir", "mkdirat", "unlink",
        "unlinkat", "rename", "renameat", "renameat2", "link", "linkat", "symlink", "symlinkat", "chmod",
        "fchmod", "fchmodat", "chown", "fchown", "fchownat", "truncate", "ftruncate", "chdir", "fchdir",
        "getcwd", "statfs", "fstatfs", "lseek", "pread64", "pwrite64", "readv", "fcntl", "ioctl", "dup",
        "dup2", "dup3", "memfd_create", "eventfd2", "epoll_create1", "epoll_pwait2", "pipe2",
        "inotify_init1", "timerfd_create", "signalfd4", "pidfd_open", "select", "pselect6",
        "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4", "recvmsg", "sendmsg",
        "getsockopt", "setsockopt", "getsockname", "getpeername", "shutdown",
        "clone", "fork", "vfork", "tkill", "rt_sigpending", "rt_sigtimedwait", "set_robust_list",
        "get_robust_list", "rseq", "futex_waitv", "membarrier", "mlock", "munlock", "msync", "mincore",
        "pkey_mprotect", "uname", "sysinfo", "getuid", "geteuid", "getgid", "getegid", "getrusage", "times",
        "clock_getres", "sched_getaffinity", "sched_setaffinity", "setsid", "setpgid", "prctl", "getrlimit",
        "prlimit64", "setrlimit", "seccomp", "landlock_create_ruleset", "landlock_add_rule",
        "landlock_restrict_self"), EPERM),
    "clone3": ENOSYS,  # glibc then tries clone, which fails
    # Evidence of compromise: killed outright (also the default, listed to be explicit).
    **{name: KILL for name, action in DENYLIST.items() if action == KILL},
}

# x86_64 system call numbers of every name above (asm/unistd_64.h).
_NR_X86_64: dict[str, int] = {
    "read": 0, "write": 1, "open": 2, "close": 3, "stat": 4, "fstat": 5, "lstat": 6, "poll": 7, "lseek": 8,
    "mmap": 9, "mprotect": 10, "munmap": 11, "brk": 12, "rt_sigaction": 13, "rt_sigprocmask": 14,
    "rt_sigreturn": 15, "ioctl": 16, "pread64": 17, "pwrite64": 18, "readv": 19, "writev": 20, "access": 21,
    "select": 23, "sched_yield": 24, "mremap": 25, "msync": 26, "mincore": 27, "madvise": 28, "dup": 32,
    "dup2": 33, "nanosleep": 35, "getpid": 39, "socket": 41, "connect": 42, "accept": 43, "sendto": 44,
    "recvfrom": 45, "sendmsg": 46, "recvmsg": 47, "shutdown": 48, "bind": 49, "listen": 50, "getsockname": 51,
    "getpeername": 52, "socketpair": 53, "setsockopt": 54, "getsockopt": 55, "clone": 56, "fork": 57,
    "vfork": 58, "execve": 59, "exit": 60, "kill": 62, "uname": 63, "fcntl": 72, "truncate": 76,
    "ftruncate": 77, "getcwd": 79, "chdir": 80, "fchdir": 81, "rename": 82, "mkdir": 83, "creat": 85,
    "link": 86, "unlink": 87, "symlink": 88, "readlink": 89, "chmod": 90, "fchmod": 91, "chown": 92,
    "fchown": 93, "gettimeofday": 96, "getrlimit": 97, "getrusage": 98, "sysinfo": 99, "times": 100,
    "ptrace": 101, "getuid": 102, "syslog": 103, "getgid": 104, "geteuid": 107, "getegid": 108,
    "setpgid": 109, "getppid": 110, "setsid": 112, "rt_sigpending": 127, "rt_sigtimedwait": 128,
    "sigaltstack": 131, "uselib": 134, "personality": 135, "statfs": 137, "fstatfs": 138, "mlock": 149,
    "munlock": 150, "vhangup": 153, "pivot_root": 155, "prctl": 157, "adjtimex": 159, "setrlimit": 160,
    "chroot": 161, "acct": 163, "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167,
    "swapoff": 168, "reboot": 169, "sethostname": 170, "setdomainname": 171, "iopl": 172, "ioperm": 173,
    "init_module": 175, "delete_module": 176, "quotactl": 179, "gettid": 186, "tkill": 200, "time": 201,
    "futex": 202, "sched_setaffinity": 203, "sched_getaffinity": 204, "lookup_dcookie": 212,
    "getdents64": 217, "clock_settime": 227, "clock_gettime": 228, "clock_getres": 229,
    "clock_nanosleep": 230, "exit_group": 231, "epoll_wait": 232, "epoll_ctl": 233, "tgkill": 234,
    "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250, "inotify_init1": 294,
    "mkdirat": 258, "fchownat": 260, "newfstatat": 262, "unlinkat": 263, "renameat": 264, "linkat": 265,
    "symlinkat": 266, "readlinkat": 267, "fchmodat": 268, "faccessat": 269, "pselect6": 270, "ppoll": 271,
    "unshare": 272, "set_robust_list": 273, "get_robust_list": 274, "epoll_pwait": 281,
    "signalfd4": 289, "timerfd_create": 283, "eventfd2": 290, "epoll_create1": 291, "dup3": 292,
    "pipe2": 293, "openat": 257, "accept4": 288, "perf_event_open": 298, "fanotify_init": 300,
    "name_to_handle_at": 303, "open_by_handle_at": 304, "clock_adjtime": 305, "setns": 308,
    "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "finit_module": 313, "renameat2": 316,
    "seccomp": 317, "getrandom": 318, "memfd_create": 319, "kexec_file_load": 320, "bpf": 321,
    "execveat": 322, "userfaultfd": 323, "membarrier": 324, "pkey_mprotect": 329, "statx": 332,
    "rseq": 334, "restart_syscall": 219, "pidfd_open": 434, "clone3": 435, "prlimit64": 302, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "pidfd_getfd": 438, "openat2": 437, "faccessat2": 439,
    "process_madvise": 440, "epoll_pwait2": 441, "mount_setattr": 442, "quotactl_fd": 443,
    "landlock_create_ruleset": 444, "landlock_add_rule": 445, "landlock_restrict_self": 446,
    "futex_waitv": 449,
}
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
_NR = _NR_X86_64  # this module knows x86_64 only; _seccomp_* report other machines as unavailable

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000
# Classic BPF opcodes.
LD_W_ABS = 0x20  # A <- 32-bit word at offset k of struct seccomp_data
JEQ_K, JGE_K, JSET_K = 0x15, 0x35, 0x45
RET_K = 0x06
SECCOMP_NR, SECCOMP_ARCH, SECCOMP_ARGS = 0, 4, 16


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def _ret(action: str | int) -> tuple[int, int, int, int]:
    if action == ALLOW:
        return (RET_K, 0, 0, RET_ALLOW)
    if action == KILL:
        return (RET_K, 0, 0, RET_KILL_PROCESS)
    assert isinstance(action, int)
    return (RET_K, 0, 0, RET_ERRNO | action)


def compile_filter(rules: dict[str, str | int | ArgRule], default: str | int, pid: int) -> list[tuple[int, int, int, int]]:
    """A classic BPF program: check the architecture, then one test per system call, then ``default``."""
    prog = [
        (LD_W_ABS, 0, 0, SECCOMP_ARCH),
        (JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        _ret(KILL),
        (LD_W_ABS, 0, 0, SECCOMP_NR),
        (JGE_K, 0, 1, X32_SYSCALL_BIT),
        _ret(KILL),
    ]
    for name, rule in rules.items():
        nr = _NR[name]
        if isinstance(rule, ArgRule):
            block = [(LD_W_ABS, 0, 0, SECCOMP_ARGS + 8 * rule.arg)]
            if rule.mask is not None:
                block.append((JSET_K, 0, 1, rule.mask))
            else:
                value = pid if rule.equals == SELF_PID else rule.equals
                assert value is not None
                block.append((JEQ_K, 0, 1, value & 0xFFFFFFFF))
            block += [_ret(rule.action), _ret(rule.otherwise)]
        else:
            block = [_ret(rule)]
        prog.append((JEQ_K, 0, len(block), nr))
        prog += block
    prog.append(_ret(default))
    return prog


def _install(prog: list[tuple[int, int, int, int]]) -> None:
    array = (_SockFilter * len(prog))(*[_SockFilter(*insn) for insn in prog])
    fprog = _SockFprog(len(prog), array)
    tid = _syscall(_NR["seccomp"], SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, ctypes.byref(fprog))
    if tid != 0:
        raise OSError(errno.EBUSY, f"thread {tid} could not be synchronised to the filter")


def _seccomp_stage1(report: dict[str, str]) -> str:
    if platform.machine() != "x86_64":
        return _unavailable(f"no system call table for {platform.machine()} in worker/_harden.py")
    if _status("no_new_privs") != APPLIED and os.geteuid() != 0:
        return _unavailable("needs no_new_privs")
    _install(compile_filter(DENYLIST, ALLOW, os.getpid()))
    report["seccomp.stages"] = "denylist before the hello; allowlist (default kill) before the first call"
    return APPLIED


# --- step 2: the SPEC names the policy's requirements ---------------------------------------------


def require(hardening: Hardening) -> None:
    """Raise :class:`HardeningFailed` unless hygiene and every required layer were applied."""
    for layer in ("hygiene", *hardening.required):
        status = _status(layer)
        if status != APPLIED:
            raise HardeningFailed(f"hardening-failed: {layer} is required by the agent's policy, but {status}")
    for layer in hardening.preferred:
        status = _status(layer)
        if status != APPLIED:
            print(f"worker: preferred hardening layer {layer} is {status}", file=sys.stderr, flush=True)


# --- step 3: after instantiation, before the first guest call -------------------------------------


def lock_down(limits: Limits) -> None:
    """Tighten to what the loaded agent needs, then allow only the system calls it uses."""
    try:
        if _status("rlimits") == APPLIED:
            _lock_rlimits(limits)
        if _status("cgroups") == APPLIED:
            _lock_cgroups()
        if _status("landlock") == APPLIED:
            _restrict(_ruleset(landlock_abi(), []))  # this (the guest's) thread may open nothing
        if _status("seccomp") == APPLIED:
            _install(_state.allowlist or compile_filter(ALLOWLIST, KILL, _state.pid))
    except OSError as exc:
        raise HardeningFailed(f"hardening-failed: lock-down after the hello reported it applied: {_why(exc)}") from None


def prepare_lock_down() -> None:
    """Compile the seccomp allowlist now (it depends only on this process), so ``lock_down``
    only installs it: a spare worker does this while it waits for an agent."""
    if _status("seccomp") == APPLIED:
        _state.allowlist = compile_filter(ALLOWLIST, KILL, _state.pid)


def address_space_limit(limits: Limits, mapped: int) -> int:
    """RLIMIT_AS at lock-down: what is mapped now (the instance's linear memories are reserved
    whole, so their growth is already counted) plus room for a fresh instance's growth after a
    trap, message and state copies, and the host's own allocations."""
    copies = 4 * (limits.max_message_bytes + limits.max_state_bytes)
    return mapped + 2 * limits.memory_bytes + copies + HOST_HEADROOM


def _vm(field: str) -> int:
    """Bytes of ``VmSize`` (address space mapped) or ``VmRSS`` (resident) from /proc/self/status."""
    for line in os.pread(_state.proc_status, 16384, 0).decode().splitlines():  # read afresh at offset 0
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise OSError(errno.ENOENT, f"no {field} in /proc/self/status")


def _tasks() -> int:
    """This process's threads, from the /proc/self/task directory opened before Landlock."""
    return len(os.listdir(_state.proc_tasks))


def _lock_rlimits(limits: Limits) -> None:
    _lower(resource.RLIMIT_AS, address_space_limit(limits, _vm("VmSize")))
    # wasmtime wrote its memory image to a memfd while instantiating; from now on the only
    # file a worker writes is its log, and only a little more of it.
    size = 0
    with contextlib.suppress(OSError):
        st = os.fstat(2)
        if stat.S_ISREG(st.st_mode):
            size = st.st_size
    _lower(resource.RLIMIT_FSIZE, size + LOG_ALLOWANCE)
    if _state.userns and os.geteuid() != 0:
        _lower(resource.RLIMIT_NPROC, _tasks())


def _lock_cgroups() -> None:
    os.write(_state.cgroup_files["pids.max"], str(_tasks()).encode())
    for fd in _state.cgroup_files.values():
        os.close(fd)
    _state.cgroup_files.clear()
