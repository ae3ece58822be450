"""The no_new_privs layer: no privilege gain, and no capability left.

``PR_SET_NO_NEW_PRIVS`` makes setuid programs and file capabilities powerless
for the worker and everything it could ever run; then every capability is
dropped (bounding set, ambient, effective, permitted, inheritable), so a root
worker keeps uid 0 but none of root's powers. Landlock and seccomp need this
layer when the worker is not root.
"""

from __future__ import annotations

import ctypes
import errno
import os

from ._sys import APPLIED, libc, prctl

PR_SET_NO_NEW_PRIVS = 38
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


def apply(report: dict[str, str]) -> str:
    """No privilege gain through exec, and no capability left (root's, or a user namespace's)."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    held = _capabilities_held()
    for cap in range(last + 1):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            if err == errno.EPERM and not held:
                break  # no CAP_SETPCAP, and no capability to lose: no_new_privs keeps it that way
            if err != errno.EINVAL:
                raise OSError(err, f"dropping capability {cap} from the bounding set: {os.strerror(err)}")
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header, data = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
    if libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
    report["no_new_privs.capabilities"] = (
        "none (effective, permitted, inheritable, ambient, bounding)" if held else "none held"
    )
    return APPLIED
