"""A compiler from a table of system call rules to a classic BPF seccomp program.

The filters in ``seccomp`` say what happens to each call by name; this module
turns such a table into instructions the kernel runs on every system call,
with no library between the policy and the kernel. The program checks the
architecture (x86_64, and kills x32 calls), then tests each listed call in
turn, then returns the default action.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from .syscalls import AUDIT_ARCH_X86_64, NR, X32_SYSCALL_BIT

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

RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000
# Classic BPF opcodes.
LD_W_ABS = 0x20  # A <- 32-bit word at offset k of struct seccomp_data
JEQ_K, JGE_K, JSET_K = 0x15, 0x35, 0x45
RET_K = 0x06
SECCOMP_NR, SECCOMP_ARCH, SECCOMP_ARGS = 0, 4, 16


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]


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
        nr = NR[name]
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
