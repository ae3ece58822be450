"""Starting worker processes and learning at once when one ends.

Each worker is a fresh ``python -m worker`` with an empty environment, a
private working directory, its own session, no inherited descriptors but its
bootstrap pipe. Its end is noticed through a pidfd in the supervisor's poller,
not by polling.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["WORKER_COMMAND", "WorkerProcess", "exit_reason", "spawn_worker"]


@dataclass(eq=False)
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    pidfd: int
    token: bytes
    incarnation: int
    identity: bytes | None = None
    kill_reason: str | None = None
    fault: str | None = None
    exited: bool = field(default=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self, reason: str) -> None:
        """SIGKILL the worker (idempotent); ``reason`` is what the chain will say."""
        if self.kill_reason is None:
            self.kill_reason = reason
        if not self.exited:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def reap(self) -> int:
        """Collect the exit status once the pidfd is readable."""
        self.exited = True
        code = self.proc.wait()
        os.close(self.pidfd)
        return code


WORKER_COMMAND = (sys.executable, "-m", "worker")


def spawn_worker(
    endpoint: str, incarnation: int, log_path: Path, workdir: Path, command: Sequence[str] = WORKER_COMMAND
) -> WorkerProcess:
    token = secrets.token_bytes(32)
    read_end, write_end = os.pipe()
    workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [*command, "--bootstrap-fd", str(read_end)],
                pass_fds=(read_end,),
                env={"PYTHONDONTWRITEBYTECODE": "1", "PYTHONSAFEPATH": "1"},
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                umask=0o077,
            )
        os.close(read_end)
        boot = {"endpoint": endpoint, "token": token.hex(), "parent_pid": os.getpid()}
        os.write(write_end, json.dumps(boot).encode())
    finally:
        os.close(write_end)
    pidfd = os.pidfd_open(proc.pid)
    return WorkerProcess(proc=proc, pidfd=pidfd, token=token, incarnation=incarnation)


def exit_reason(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown"
        return f"killed by signal {-code} ({name})"
    return f"exited with status {code}"
