"""``python -m worker.probe ENDPOINT LIMITS_JSON``: harden a throw-away process as a worker, then report.

``theater doctor`` runs it. It applies every layer exactly as a worker does
(``worker._harden``), connects to ENDPOINT (a ZeroMQ PAIR socket the doctor
binds, over the same ``ipc://`` path transport), locks down with LIMITS_JSON,
then tries what a compromised worker would try, and sends the hardening report
and each attempt's outcome back as one JSON message.

``python -m worker.probe --sweep`` removes the empty per-worker cgroups of
workers (and probes) that have ended.
"""

from __future__ import annotations

import json
import mmap
import os
import socket
import sys
from collections.abc import Callable

import zmq

from theater.spec import Limits

from . import _harden

REPLY_TIMEOUT_MS = 10_000


def _attempt(fn: Callable[[], object]) -> str:
    try:
        fn()
    except OSError as exc:
        return f"denied: {exc.strerror or exc}"
    except Exception as exc:  # e.g. RuntimeError from a thread that cannot start
        return f"denied: {type(exc).__name__}: {exc}"
    return "allowed"


def _fork() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def _write() -> None:
    with open("probe-escape.txt", "w") as f:
        f.write("x")


ATTEMPTS: dict[str, Callable[[], object]] = {
    "open /etc/passwd": lambda: open("/etc/passwd", "rb").close(),
    "create a TCP socket": lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close(),
    "create a Unix socket": lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close(),
    "fork": _fork,
    "write a file": _write,
    "map executable memory": lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC).close(),
}


def probe(endpoint: str, limits: Limits) -> dict[str, object]:
    report = _harden.harden_before_connect(os.getppid(), endpoint)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.linger = 1000
    sock.connect(endpoint)
    sock.send(b"{}")  # the doctor answers: the connection is up and ZeroMQ's threads have settled
    if not sock.poll(REPLY_TIMEOUT_MS):
        raise SystemExit(3)
    sock.recv()
    try:
        _harden.lock_down(limits)
        lock = "completed"
    except _harden.HardeningFailed as exc:
        lock = f"failed: {exc}"
    result: dict[str, object] = {"report": report, "lock_down": lock,
                                 "attempts": {name: _attempt(fn) for name, fn in ATTEMPTS.items()}}
    sock.send(json.dumps(result).encode())
    sock.close()
    ctx.term()
    return result


def main() -> int:
    if sys.argv[1:] == ["--sweep"]:
        _harden.sweep_cgroups()
        return 0
    if len(sys.argv) != 3:
        print("usage: python -m worker.probe ENDPOINT LIMITS_JSON | --sweep (run by theater doctor)", file=sys.stderr)
        return 2
    probe(sys.argv[1], Limits.from_dict(json.loads(sys.argv[2])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
