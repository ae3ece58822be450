"""Layout of a Theater home (the state directory), shared by supervisor and clients.

    $THEATER_HOME/              0700
      supervisor.key            0600  Ed25519 seed of the supervisor's long-term key
      supervisor.pub                  its public key (raw 32 bytes), what auditors need
      events.sqlite3                  the event store (WAL)
      policies/                       optional site policies, looked up before built-ins
      logs/                           supervisor and worker logs
      cache/                    0700  compiled components (<key>.cwasm, HMAC-tagged; secret 0600)
      control.key               0600  the control API's CurveZMQ key pair (theater up --listen)
      cache/uploads/            0700  components tenants sent with their spawns, named by SHA-256
      run/                      0700  sockets and the control token, live only while up
        control.sock  workers.sock  control.token (0600)  supervisor.pid
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

__all__ = ["LOG_DATEFMT", "LOG_FORMAT", "Home", "default_home", "log_line", "write_private"]

# Every line the supervisor and the fork-server log: time to the millisecond, level, who, what.
LOG_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s"
LOG_DATEFMT = "%Y-%m-%d %H:%M:%S"

MAX_IPC_PATH = 107  # sun_path minus the terminating NUL


def default_home() -> Path:
    env = os.environ.get("THEATER_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "theater"


class Home:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().absolute()
        self.run = self.root / "run"
        self.logs = self.root / "logs"
        self.key = self.root / "supervisor.key"
        self.public_key = self.root / "supervisor.pub"
        self.store = self.root / "events.sqlite3"
        self.policies = self.root / "policies"
        self.checkpoints = self.root / "checkpoints"  # signed statements of every chain's head (theater checkpoint)
        self.secrets = self.root / "secrets"  # one file per secret (theater secret set), 0600 in a 0700 directory
        self.control_key = self.root / "control.key"  # CurveZMQ key pair of the TCP control API
        # Components sent by tenants' spawns, by SHA-256: the one place in the home a worker may read (landlock.py).
        self.uploads = self.root / "cache" / "uploads"
        self.control_sock = self.run / "control.sock"
        self.workers_sock = self.run / "workers.sock"
        self.token = self.run / "control.token"
        self.pid_file = self.run / "supervisor.pid"
        # Every worker's working directory: private (0700) and empty, shared (made afresh at each start).
        self.workdir = self.run / "workers"

    def endpoint(self, path: Path) -> str:
        text = str(path)
        if len(text.encode()) > MAX_IPC_PATH:
            raise OSError(f"socket path {text} is longer than {MAX_IPC_PATH} bytes; choose a shorter THEATER_HOME")
        return f"ipc://{text}"

    @property
    def control_endpoint(self) -> str:
        return self.endpoint(self.control_sock)

    @property
    def workers_endpoint(self) -> str:
        return self.endpoint(self.workers_sock)


def write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner can read, whole or not at all: a temporary file beside it (0600, never
    through a link), made durable, then renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk: what was written of it must not keep the space
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def log_line(who: str, level: str, message: str) -> str:
    """One log line in LOG_FORMAT, for a process that logs without the logging module (the fork-server)."""
    now = time.time()
    return f"{time.strftime(LOG_DATEFMT, time.localtime(now))}.{int(now * 1000) % 1000:03d} {level} {who}: {message}"
