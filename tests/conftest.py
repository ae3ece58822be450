"""Shared fixtures: a real supervisor process on a private home, and manifests for test components.

Every wait here is on an event with a deadline (a reply, a socket, a pidfd
through the supervisor), never a bare sleep.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from theater.client import Client, ClientError, NotRunning
from theater.home import Home

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = ROOT / "tests" / "components"
START_TIMEOUT_S = 30.0


def wait_until(predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> object:
    """Poll a cheap predicate until it holds or the deadline passes (for process-level facts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Theater:
    """A supervisor subprocess on its own home, plus helpers to write manifests and talk to it."""

    def __init__(self, root: Path) -> None:
        self.home = Home(root / "h")
        self.dir = root
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, extra: list[str] | None = None) -> None:
        argv = extra or [sys.executable, "-m", "supervisor", "--home", str(self.home.root), "up"]
        self.home.logs.mkdir(parents=True, exist_ok=True)
        self.log = open(self.dir / "supervisor.out", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=self.log, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"supervisor exited with {self.proc.returncode}: {(self.dir / 'supervisor.out').read_text()}")
            try:
                with Client(self.home, timeout=1.0) as c:
                    c.ping()
                return
            except (NotRunning, ClientError):  # not bound yet, or a stale token from a crashed run
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def client(self, timeout: float = 30.0) -> Client:
        return Client(self.home, timeout=timeout)

    def manifest(self, name: str, component: str, **extra: object) -> Path:
        """Write a manifest for tests/components/<component>; ``extra`` become TOML lines/tables."""
        lines = [f'name = "{name}"', f'component = "{COMPONENTS / component}"']
        tables: list[str] = []
        for key, value in extra.items():
            if isinstance(value, dict):
                tables.append(f"[{key}]")
                tables.extend(f"{k} = {_toml(v)}" for k, v in value.items())
            else:
                lines.append(f"{key} = {_toml(value)}")
        path = self.dir / f"{name}.toml"
        path.write_text("\n".join(lines + tables) + "\n")
        return path

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            with self.client(timeout=20) as c:
                c.down()
        except Exception:
            self.proc.kill()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@pytest.fixture(scope="session", autouse=True)
def _sweep_worker_cgroups() -> Iterator[None]:
    """Workers cannot remove their own per-worker cgroups: remove the empty ones once the session is over."""
    yield
    subprocess.run([sys.executable, "-m", "worker.probe", "--sweep"], cwd="/", capture_output=True, check=False)


@pytest.fixture
def theater(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Theater]:
    # Short paths: ipc:// socket paths must fit in 107 bytes.
    root = Path(os.environ.get("THEATER_TEST_TMP", "/tmp")) / f"th-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    root.mkdir(parents=True)
    t = Theater(root)
    t.start()
    try:
        yield t
    finally:
        t.stop()
