"""The Landlock layer: the file system and TCP as the kernel lets the worker see them.

Stage 1, for every future thread: reading allowed everywhere but the
supervisor's home (its ``cache/uploads/`` excepted), ``/proc`` and ``/sys``; no
writing, creating, removing or executing any file; no TCP; signals and
abstract Unix sockets scoped to the worker. Stage 2, at lock-down, on the
main thread where guest code runs: no file access at all. Building the read
ruleset walks the tree on the way to the home, so a fork-server builds it
once (``prepare``) and its workers restrict themselves with the inherited
descriptor.
"""

from __future__ import annotations

import ctypes
import os
import stat
from pathlib import Path

from ._sys import APPLIED, libc, syscall, unavailable, why
from .confinement import Confinement, Prepared
from .syscalls import NR

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
    return syscall(NR["landlock_create_ruleset"], None, 0, LANDLOCK_CREATE_RULESET_VERSION)


READABLE_IN_HOME = ("cache/uploads",)  # tenants' components; never the compiled artifacts or their secret


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
    ruleset = syscall(NR["landlock_create_ruleset"], ctypes.byref(attr), size, 0)
    try:
        add_rule, rule, file_rights = NR["landlock_add_rule"], _PathBeneath(), LL_READ_FILE | LL_EXECUTE | LL_WRITE_FILE
        for path, access in grants:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue  # vanished, or cannot be opened: not granted
            try:
                rule.allowed_access = access if stat.S_ISDIR(os.fstat(fd).st_mode) else access & file_rights
                rule.parent_fd = fd
                if libc.syscall(add_rule, ruleset, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0) != 0:
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
        syscall(NR["landlock_restrict_self"], ruleset, 0)
    finally:
        os.close(ruleset)


def _read_ruleset(endpoint: str) -> int:
    """A ruleset that grants reading everywhere but the supervisor's home (its cache/uploads/ excepted), /proc
    and /sys."""
    home = home_of(endpoint)
    protected = _protected_paths(endpoint)
    readable = [*_read_roots(protected), *(str(home / d) for d in READABLE_IN_HOME if (home / d).is_dir())]
    return _ruleset(landlock_abi(), [(root, LL_READ_FILE | LL_READ_DIR) for root in readable])


def apply(confinement: Confinement, prepared: Prepared, endpoint: str) -> str:
    """Stage 1: read-only access outside the protected paths, nothing else, for every future thread.

    Restricts with (and closes) ``prepared``'s ruleset when it was built for ``endpoint``."""
    abi = landlock_abi()
    if confinement.status("no_new_privs") != APPLIED and os.geteuid() != 0:
        return unavailable("needs no_new_privs")
    ruleset, prepared.ruleset = prepared.ruleset, -1
    if ruleset >= 0 and prepared.endpoint != endpoint:
        os.close(ruleset)
        ruleset = -1
    _restrict(ruleset if ruleset >= 0 else _read_ruleset(endpoint))
    confinement.report["landlock.abi"] = str(abi)
    confinement.report["landlock.unreadable"] = " ".join(map(str, _protected_paths(endpoint)))
    return APPLIED


def lock() -> None:
    """Stage 2, at lock-down: this (the guest's) thread may open nothing."""
    _restrict(_ruleset(landlock_abi(), []))


def prepare(prepared: Prepared, endpoint: str) -> str:
    """In a fork-server: build the read ruleset for ``endpoint``'s home once. Returns "" or why not."""
    prepared.endpoint = endpoint
    try:
        prepared.ruleset = _read_ruleset(endpoint)
    except OSError as exc:
        return why(exc)
    return ""
