"""x86_64 system call numbers, by name.

The seccomp filters name calls, the BPF program tests numbers; namespaces and
Landlock also call by number what libc does not wrap. One table, from
asm/unistd_64.h, for all of them. Only x86_64 is known: the seccomp layer
reports any other machine as unavailable.
"""

from __future__ import annotations

# x86_64 system call numbers of every name the filters use (asm/unistd_64.h).
NR_X86_64: dict[str, int] = {
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
    "futex": 202, "sched_setparam": 142, "sched_getparam": 143, "sched_setscheduler": 144, "sched_getscheduler": 145,
    "sched_setaffinity": 203, "sched_getaffinity": 204, "lookup_dcookie": 212,
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
    # The older forms of calls above (glibc picks either), and the other ways to reach a file's data or
    # attributes: refused with EPERM like their siblings, not left to the allowlist's default kill.
    "pipe": 22, "rmdir": 84, "lchown": 94, "umask": 95, "getdents": 78, "mknod": 133, "mknodat": 259,
    "epoll_create": 213, "inotify_init": 253, "inotify_add_watch": 254, "signalfd": 282, "eventfd": 284,
    "utime": 132, "utimes": 235, "futimesat": 261, "utimensat": 280, "fsync": 74, "fdatasync": 75, "flock": 73,
    "fallocate": 285, "getxattr": 191, "lgetxattr": 192, "fgetxattr": 193, "listxattr": 194, "llistxattr": 195,
    "flistxattr": 196, "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190, "removexattr": 197,
    "lremovexattr": 198, "fremovexattr": 199, "sendfile": 40, "splice": 275, "tee": 276, "copy_file_range": 326,
    "timerfd_settime": 286, "timerfd_gettime": 287, "sync": 162, "syncfs": 306, "preadv": 295, "pwritev": 296,
    "preadv2": 327, "pwritev2": 328, "fadvise64": 221, "readahead": 187, "sync_file_range": 277, "vmsplice": 278,
    "inotify_rm_watch": 255, "fchmodat2": 452, "setxattrat": 463, "getxattrat": 464, "listxattrat": 465,
    "removexattrat": 466,
}
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
NR = NR_X86_64  # this package knows x86_64 only; seccomp reports other machines as unavailable
