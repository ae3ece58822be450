"""The C library through ctypes, and the words every layer reports in.

Each layer calls prctl, raw system calls or libc wrappers Python does not
have, and each reports "applied" or "unavailable: <why>" for the hello; this
is the one place those are defined, so the layers cannot drift apart.
"""

from __future__ import annotations

import ctypes
import errno
import os

APPLIED = "applied"
SKIPPED = "skipped"

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def unavailable(why: str) -> str:
    return f"unavailable: {why}"


def why(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    text = exc.strerror or str(exc)
    return f"{text} ({name})" if name else text


PR_SET_DUMPABLE = 4


def prctl(option: int, arg: int) -> None:
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def syscall(nr: int, *args: object) -> int:
    result = libc.syscall(nr, *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(result)
