"""The namespaces layer: new user, mount, network, IPC, UTS and cgroup namespaces.

Inside them the worker has no network (loopback, down), no capability that
counts outside, no SysV IPC with other processes, and every mount it sees is
read-only, nosuid, nodev and noexec. Unsharing needs a single-threaded
process, so this runs before the ZeroMQ context exists. No PID namespace:
it would forbid the worker's threads.
"""

from __future__ import annotations

import ctypes
import os

from ._sys import APPLIED, PR_SET_DUMPABLE, libc, prctl, syscall, unavailable, why
from .confinement import Confinement
from .syscalls import NR

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


def apply(confinement: Confinement) -> str:
    """Unshare user, mount, network, IPC, UTS and cgroup namespaces; make every mount read-only.

    Without a user namespace (refused to unprivileged users on some systems)
    root still gets the others. No PID namespace: a process that unshares one
    can no longer create threads (the kernel refuses CLONE_THREAD across PID
    namespaces), and the worker needs its ZeroMQ threads.
    """
    report = confinement.report
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
        report["namespaces.user"] = unavailable(why(exc))
        _unshare(flags & ~CLONE_NEWUSER)
    confinement.userns = "user" in kinds
    if confinement.userns:
        report["namespaces.ids"] = _map_ids(uid, gid)
    report["namespaces.kinds"] = " ".join(kinds)
    report["namespaces.pid"] = unavailable("a PID namespace forbids the worker's threads")
    # Private propagation, then every mount read-only, no setuid, no devices, no exec.
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount --make-rprivate /: {os.strerror(err)}")
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC, 0, 0, 0)
    syscall(NR["mount_setattr"], AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr))
    report["namespaces.mounts"] = "all read-only, nosuid, nodev, noexec"
    return APPLIED


def _unshare(flags: int) -> None:
    if libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare: {os.strerror(err)}")


def _map_ids(uid: int, gid: int) -> str:
    """Map the worker's own uid and gid into its user namespace. Hygiene has made the process non-dumpable,
    which gives its /proc files to root: a worker that is not root may write its own maps only while it is
    dumpable again, for these three writes (it is still single-threaded, and runs no guest code yet)."""
    prctl(PR_SET_DUMPABLE, 1)
    try:
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1")
        return f"uid {uid} and gid {gid} mapped to themselves"
    except OSError as exc:
        return f"unmapped (uid {os.getuid()} inside): {why(exc)}"
    finally:
        prctl(PR_SET_DUMPABLE, 0)
