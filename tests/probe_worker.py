"""The real worker, with a test-only hook that runs escape probes inside it once it is hardened.

Launched through ``tests/run_probe_supervisor.py`` as
``python tests/probe_worker.py LAYERS --bootstrap-fd N``. It is ``worker.__main__.main``
(same bootstrap, hardening, hello, spec, load and lock-down), except that a
handle call whose message is ``probe:NAME[:ARG]`` first runs probe NAME in the
worker's own process, on the thread that runs guest code, and records the
outcome as a signed log record ``probe NAME: <outcome>`` before the call goes
on to the component as usual. A probe that gets the worker killed leaves no
record: the supervisor's exit record says why.

LAYERS is ``all`` or a comma-separated list of hardening layers to attempt
(``rlimits,namespaces,...``), so a test can show what one layer stops alone;
the layers left out are then not required either, unless LAYERS starts with
``strict:``.
Nothing here is reachable from a policy, a manifest or a guest.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

from theater import wire
from theater.records import Kind
from theater.spec import Hardening


def _outcome(fn: Callable[[], object]) -> str:
    try:
        result = fn()
    except BaseException as exc:  # the point is to report any failure, whatever it is
        return f"denied: {type(exc).__name__}: {exc}"
    return f"allowed: {result!r}"[:300]


def _fork() -> object:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def _thread() -> object:
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()
    return "started"


def _ptrace(arg: str) -> object:
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.ptrace(16, int(arg or os.getppid()), 0, 0)  # PTRACE_ATTACH
    return f"ptrace returned {result}, errno {ctypes.get_errno()}"


def _rseq() -> object:
    """rseq with no area: the kernel answers EINVAL if the call reaches it, seccomp EPERM if it does not."""
    import errno

    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.syscall(334, None, 0, 0, 0)  # SYS_rseq on x86_64
    return f"rseq returned {result}, errno {errno.errorcode.get(ctypes.get_errno(), '?')}"


def _syscall(name: str) -> object:
    """A raw call by name, every argument 0: its errno says whether seccomp refused it (EPERM) or the
    kernel saw it; a call the filter kills leaves no outcome."""
    import errno

    from worker._harden.syscalls import NR

    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.syscall(NR[name], 0, 0, 0, 0, 0, 0)
    return f"{name} returned {result}, errno {errno.errorcode.get(ctypes.get_errno(), '?')}"


def _sched() -> object:
    """What ZeroMQ's I/O thread does as it starts: read its scheduling policy and set it again."""
    policy = os.sched_getscheduler(0)
    param = os.sched_getparam(0)
    os.sched_setscheduler(0, policy, param)
    return f"policy {policy}, priority {param.sched_priority}"


def _read(path: str) -> object:
    with open(path, "rb") as f:
        return f.read(64)


def _write_file() -> object:
    with open("escape.txt", "w") as f:
        f.write("written")
    return "written"


def _connect_inet() -> object:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(2)
        s.connect(("127.0.0.1", 9))
    finally:
        s.close()
    return "connected"


def _alloc(arg: str) -> object:
    block = bytearray(int(arg or 1 << 30))
    return f"allocated {len(block)} bytes"


def _flood_log() -> object:
    chunk = b"x" * 65536
    for _ in range(64):  # 4 MiB, past the log allowance
        os.write(2, chunk)
    return "wrote 4 MiB to the log"


def _exec_mmap() -> object:
    m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC)
    m.close()
    return "mapped executable memory"


PROBES: dict[str, Callable[[str], object]] = {
    "open": lambda arg: _read(arg or "/etc/passwd"),
    "proc-mem": lambda arg: _read(f"/proc/{arg}/mem"),
    "inet": lambda arg: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close(),
    "connect": lambda arg: _connect_inet(),
    "unix": lambda arg: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close(),
    "exec": lambda arg: os.execv("/bin/true", ["true"]),
    "fork": lambda arg: _fork(),
    "thread": lambda arg: _thread(),
    "ptrace": _ptrace,
    "write": lambda arg: _write_file(),
    "kill": lambda arg: os.kill(int(arg), 0),
    "alloc": _alloc,
    "flood-log": lambda arg: _flood_log(),
    "exec-mmap": lambda arg: _exec_mmap(),
    "rseq": lambda arg: _rseq(),
    "sched": lambda arg: _sched(),
    "syscall": _syscall,
}


def main() -> int:
    """``probe_worker.py LAYERS --bootstrap-fd N``: a worker; ``probe_worker.py LAYERS --socket-fd N ...``:
    a fork-server whose workers carry the same hooks."""
    layers = sys.argv.pop(1) if len(sys.argv) > 1 else ""
    _install(layers)
    if len(sys.argv) > 1 and sys.argv[1] == "--socket-fd":
        from worker import _zygote

        return _zygote.main(sys.argv[1:])
    import worker.__main__ as entry

    return entry.main()


def _install(layers: str) -> None:
    from worker import _harden, _loop

    strict = layers.startswith("strict:")  # leave out layers, but keep the policy's requirements
    layers = layers.removeprefix("strict:")
    if layers != "all":
        _harden.ATTEMPTED_LAYERS = frozenset(layers.split(","))
    if layers != "all" and not strict:
        real_require = _harden.require

        def require(hardening: Hardening) -> None:  # what the layers left out would have required
            kept = tuple(layer for layer in hardening.required if layer in _harden.ATTEMPTED_LAYERS)
            real_require(Hardening(kept, hardening.preferred))

        _loop.require = require  # type: ignore[assignment]
    real_run = _loop.Agent.run

    def run(self: _loop.Agent, call: wire.Call) -> Any:
        if call.kind is wire.CallKind.HANDLE and call.data.startswith(b"probe:"):
            name, _, arg = call.data.decode()[len("probe:"):].partition(":")
            outcome = _outcome(lambda: PROBES[name](arg))
            self.recorder.append(Kind.LOG, {"level": "info", "message": f"probe {name}: {outcome}", "truncated": 0})
        return real_run(self, call)

    _loop.Agent.run = run  # type: ignore[method-assign]


if __name__ == "__main__":
    sys.exit(main())
