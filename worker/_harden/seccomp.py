"""The seccomp layer: which system calls the worker may make, in two stages.

Stage 1, before the hello, on the one thread that exists (every later thread
inherits it): default allow, kill on the calls that are evidence of
compromise, EPERM on new processes and non-Unix sockets. Stage 2, at
lock-down, on every thread (TSYNC): the reviewed allowlist, everything else
killing the process. The tables here are the policy; ``bpf`` compiles them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

from ._sys import APPLIED, syscall, unavailable
from .bpf import ALLOW, KILL, SELF_PID, ArgRule, SockFilter, SockFprog, compile_filter
from .confinement import Confinement
from .syscalls import NR

PROT_EXEC = 0x4
CLONE_THREAD = 0x00010000
AF_UNIX = 1
EPERM, ENOSYS = errno.EPERM, errno.ENOSYS

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1

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
    # glibc registers each new thread's restartable-sequence area as the thread starts, and aborts the
    # whole process ("rseq registration failed") if that fails. A thread cloned just before lock-down
    # can start after it on a loaded machine, so rseq must pass; it only names memory of the calling
    # thread to the kernel. (New threads after lock-down stay impossible: clone fails below.)
    "rseq": ALLOW,
    # Likewise ZeroMQ's I/O thread, as it starts, reads its scheduling policy and sets it again
    # unchanged (pthread_getschedparam, pthread_setschedparam) and aborts if either fails. Without
    # privileges these can only move a thread between the normal policies.
    **dict.fromkeys(("sched_getparam", "sched_getscheduler", "sched_setscheduler"), ALLOW),
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
        "get_robust_list", "futex_waitv", "membarrier", "mlock", "munlock", "msync", "mincore",
        "pkey_mprotect", "uname", "sysinfo", "getuid", "geteuid", "getgid", "getegid", "getrusage", "times",
        "clock_getres", "sched_getaffinity", "sched_setaffinity", "setsid", "setpgid", "prctl", "getrlimit",
        "prlimit64", "setrlimit", "seccomp", "landlock_create_ruleset", "landlock_add_rule",
        "landlock_restrict_self",
        # Older forms of the above, and the rest of the ways to a file's data or attributes.
        "pipe", "rmdir", "lchown", "umask", "getdents", "mknod", "mknodat", "epoll_create", "inotify_init",
        "inotify_add_watch", "signalfd", "eventfd", "utime", "utimes", "futimesat", "utimensat", "fsync",
        "fdatasync", "flock", "fallocate", "getxattr", "lgetxattr", "fgetxattr", "listxattr", "llistxattr",
        "flistxattr", "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr",
        "sendfile", "splice", "tee", "copy_file_range", "timerfd_settime", "timerfd_gettime", "sync",
        "syncfs", "preadv", "pwritev", "preadv2", "pwritev2", "fadvise64", "readahead", "sync_file_range",
        "vmsplice", "inotify_rm_watch", "fchmodat2", "setxattrat", "getxattrat", "listxattrat",
        "removexattrat"), EPERM),
    "clone3": ENOSYS,  # glibc then tries clone, which fails
    # Evidence of compromise: killed outright (also the default, listed to be explicit).
    **{name: KILL for name, action in DENYLIST.items() if action == KILL},
}


# What a loaded spare still does after it locked down ahead of its agent (``lock_ahead``) and before
# ``close_handover``: read its token and its agent's log file from its line (recvmsg), put the log on its
# standard streams (dup2), set the limit of its log's size (setrlimit, prlimit64) and install the filter
# that ends the hand-over (seccomp). Each is EPERM in ALLOWLIST, so the two filters together are exactly
# ALLOWLIST. No guest call runs meanwhile.
HANDOVER = ("recvmsg", "dup2", "dup3", "setrlimit", "prlimit64", "seccomp")


def _install(prog: list[tuple[int, int, int, int]]) -> None:
    array = (SockFilter * len(prog))(*[SockFilter(*insn) for insn in prog])
    fprog = SockFprog(len(prog), array)
    tid = syscall(NR["seccomp"], SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, ctypes.byref(fprog))
    if tid != 0:
        raise OSError(errno.EBUSY, f"thread {tid} could not be synchronised to the filter")


def apply(confinement: Confinement) -> str:
    """Stage 1: the denylist, for this thread and every thread created later."""
    if platform.machine() != "x86_64":
        return unavailable(f"no system call table for {platform.machine()} in worker/_harden/syscalls.py")
    if confinement.status("no_new_privs") != APPLIED and os.geteuid() != 0:
        return unavailable("needs no_new_privs")
    _install(compile_filter(DENYLIST, ALLOW, os.getpid()))
    confinement.report["seccomp.stages"] = "denylist before the hello; allowlist (default kill) before the first call"
    return APPLIED


def compile_allowlist(pid: int) -> list[tuple[int, int, int, int]]:
    """The stage-2 program for the worker whose pid is ``pid`` (it depends on nothing else)."""
    return compile_filter(ALLOWLIST, KILL, pid)


def lock(confinement: Confinement) -> None:
    """Stage 2, at lock-down: the allowlist on every thread (compiled now unless it was ahead)."""
    _install(confinement.allowlist or compile_allowlist(confinement.pid))


def lock_ahead(confinement: Confinement) -> None:
    """Stage 2 in a loaded spare, before it has an agent: the allowlist with the HANDOVER calls allowed."""
    _install(compile_filter({**ALLOWLIST, **dict.fromkeys(HANDOVER, ALLOW)}, KILL, confinement.pid))
    confinement.handover_closer = compile_filter(dict.fromkeys(HANDOVER, EPERM), ALLOW, confinement.pid)


def close_handover(confinement: Confinement) -> None:
    """At the agent's lock-down after ``lock_ahead``: the HANDOVER calls fail again, as in ALLOWLIST."""
    assert confinement.handover_closer is not None
    _install(confinement.handover_closer)
