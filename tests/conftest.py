"""Shared fixtures: a real supervisor process on a private home, and manifests for test components.

Every wait here is on an event with a deadline (a reply, a socket, a pidfd
through the supervisor), never a bare sleep.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor._audit import chain_records, verify_home
from theater.client import Client, ClientError, NotRunning
from theater.home import Home
from theater.records import Kind, Record

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = ROOT / "tests" / "components"
START_TIMEOUT_S = 30.0
# JavaScript agents build only where Node.js and npm are on PATH; elsewhere their tests are skipped, saying why.
needs_node = pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None,
                                reason="JavaScript agents need Node.js and npm on PATH to build")
LAB_POLICY = "lab"  # a site policy whose ceilings allow a huge fuel budget and a long deadline


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
    """A supervisor subprocess on its own home, plus helpers to write manifests and talk to it.

    With ``artifacts`` (an ``ArtifactPool``), the home's compiled-artifact cache starts with what the session's
    earlier homes compiled, and gives back what this one compiles when it stops.
    """

    def __init__(self, root: Path, artifacts: ArtifactPool | None = None) -> None:
        self.home = Home(root / "h")
        self.dir = root
        self.proc: subprocess.Popen[bytes] | None = None
        self.artifacts = artifacts

    def start(self, extra: list[str] | None = None) -> None:
        argv = extra or [sys.executable, "-m", "supervisor", "--home", str(self.home.root), "up"]
        self.home.logs.mkdir(parents=True, exist_ok=True)
        if self.artifacts is not None:
            self.artifacts.lend(self.home.root / "cache")
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
        """Write a manifest for tests/components/<component>; ``extra`` become TOML lines/tables.

        A dict value becomes a ``[table]``; the dicts and lists inside it are written
        inline, so ``supervision={"templates": [{...}]}`` is a table with an array of tables.
        """
        lines = [f'name = "{name}"', f'component = "{COMPONENTS / component}"']
        tables: list[str] = []
        for key, value in extra.items():
            if isinstance(value, dict):
                tables.append(f"[{key}]")
                tables.extend(f"{k} = {toml(v)}" for k, v in value.items())
            else:
                lines.append(f"{key} = {toml(value)}")
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
        if self.artifacts is not None:
            self.artifacts.take_back(self.home.root / "cache")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


class ArtifactPool:
    """Compiled artifacts shared by the homes of the tests marked ``shared_artifacts``.

    A Python or JavaScript guest's component takes 5-10 s to compile, once per home; the guest and example
    tests spawn the same few components in a fresh home each. Their homes share one cache secret, so an
    artifact one compiled carries a tag the others' supervisors accept (``supervisor/_artifacts.py``). Every
    other test compiles in its own home, as a user's supervisor does, so the compile path stays tested.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        (root / "secret").write_bytes(os.urandom(32))
        os.chmod(root / "secret", 0o600)

    def lend(self, cache: Path) -> None:
        if cache.exists():  # a restarted home keeps its own cache
            return
        cache.mkdir(mode=0o700, parents=True)
        for entry in self.root.iterdir():
            os.link(entry, cache / entry.name)

    def take_back(self, cache: Path) -> None:
        """Keep what the home compiled: a ``.cwasm`` with its tag (the tag is written after the artifact)."""
        for tag in cache.glob("*.tag"):
            artifact = tag.with_suffix(".cwasm")
            if artifact.exists() and not (self.root / tag.name).exists():
                os.link(artifact, self.root / artifact.name)
                os.link(tag, self.root / tag.name)


def toml(value: object) -> str:
    """One TOML value; a dict becomes an inline table."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_lab_policy(t: Theater) -> None:
    """Write the site policy ``LAB_POLICY``: the default one with a 60 s call and a huge fuel budget."""
    text = (ROOT / "policies" / "default.toml").read_text()
    text = text.replace("fuel_per_call = 500000000", "fuel_per_call = 1000000000000")
    text = text.replace("wall_time_ms = 2000 ", "wall_time_ms = 60000 ")
    assert "1000000000000" in text and "60000 " in text
    t.home.policies.mkdir(exist_ok=True)
    (t.home.policies / f"{LAB_POLICY}.toml").write_text(text)


def start_after_crash(t: Theater) -> None:
    """``t.start()`` after a SIGKILLed supervisor, tolerating a readiness ping refused for a stale token."""
    # The ping may carry the dead supervisor's control token and be refused although the new
    # supervisor is up (see test_up_detach_after_supervisor_crash_reports_success): wait for a fresh client.
    try:
        t.start()
    except ClientError as exc:
        if exc.code != "refused":
            raise
        wait_until(lambda: answers(t), 30, "the restarted supervisor to answer a fresh client")


def answers(t: Theater) -> dict[str, Any] | None:
    """The supervisor's ping reply to a fresh client, or None while it does not answer."""
    try:
        with t.client(timeout=1.0) as c:
            return c.ping()
    except (NotRunning, ClientError):
        return None


def supervisor_log(t: Theater) -> str:
    """What the supervisor process wrote to its stdout and stderr so far."""
    return (t.dir / "supervisor.out").read_text(errors="replace")


# --- observing agents --------------------------------------------------------------


def ps(c: Client, name: str) -> dict[str, Any]:
    """The ``ps`` row of the agent called ``name`` (there must be exactly one)."""
    [info] = [a for a in c.ps() if a["name"] == name]
    return info


def wait_running(c: Client, name: str, old_pid: int | None = None, timeout: float = 20.0, *,
                 restarts: int | None = None) -> dict[str, Any]:
    """Wait until ``name`` runs on a worker other than ``old_pid`` (after ``restarts`` restarts); return its ps row."""

    def ready() -> dict[str, Any] | None:
        info = ps(c, name)
        ok = info["status"] == "running" and info["pid"] not in (None, old_pid)
        return info if ok and (restarts is None or info["restarts"] == restarts) else None

    what = f"{name} running on a new worker" + ("" if restarts is None else f" after {restarts} restarts")
    return wait_until(ready, timeout, what)  # type: ignore[return-value]


def wait_status(c: Client, name: str, *statuses: str, timeout: float = 20.0) -> dict[str, Any]:
    """Wait until ``name``'s ps status is one of ``statuses``; return its row."""

    def reached() -> dict[str, Any] | None:
        info = ps(c, name)
        return info if info["status"] in statuses else None

    return wait_until(reached, timeout, f"{name} {'/'.join(statuses)}")  # type: ignore[return-value]


def records(t: Theater, name: str, *, check_seq: bool = True) -> list[Record]:
    """The stored chain of an agent or a tree node, read-only from SQLite; with ``check_seq`` its seqs must
    run 0, 1, 2..."""
    chain = chain_records(t.home, name)
    if check_seq:
        assert [r.seq for r in chain] == list(range(len(chain))), name
    return chain


def of(chain: list[Record], kind: Kind) -> list[Record]:
    """The records of ``chain`` of the given kind, in order."""
    return [r for r in chain if r.kind is kind]


def assert_verified(t: Theater) -> None:
    """Offline verification of every chain in the home: there is one, and each verifies."""
    reports = verify_home(t.home)
    assert reports, "no chain to verify"
    broken = [f"{r.name}: {r.problem}" for r in reports if not r.ok]
    assert not broken, "; ".join(broken)


def gone(pid: int) -> bool:
    """The process no longer runs (absent, or a zombie nobody has reaped yet)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def spare_workers(t: Theater, c: Client) -> list[psutil.Process]:
    """The fork-server's spare workers: forked workers of the supervisor's that no agent has (yet)."""
    assert t.proc is not None
    taken = {a["pid"] for a in c.ps()}
    out = []
    try:
        children = psutil.Process(t.proc.pid).children()
    except psutil.NoSuchProcess:
        return []
    for p in children:
        try:
            if p.name() == "theater-worker" and p.pid not in taken and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:  # it ended while we looked
            continue
    return out


def holds_an_artifact(p: psutil.Process) -> bool:
    """Whether the worker holds a compiled component, open or mapped: a loaded spare does from its fork on, a
    plain spare not until it is given an agent."""
    artifact = "memfd:theater-artifact-"
    try:
        if any(artifact in os.readlink(f"/proc/{p.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{p.pid}/fd")):
            return True
        return any(artifact in m.path for m in p.memory_maps(grouped=True))
    except (psutil.Error, OSError):  # it ended, or closed a descriptor, while we looked
        return False


@pytest.fixture(scope="session", autouse=True)
def _sweep_worker_cgroups() -> Iterator[None]:
    """Workers cannot remove their own per-worker cgroups: remove the empty ones once the session is over."""
    yield
    subprocess.run([sys.executable, "-m", "worker.probe", "--sweep"], cwd="/", capture_output=True, check=False)


@pytest.fixture
def short_root() -> Iterator[Callable[[str], Path]]:
    """``short_root(tag)``: a fresh directory with a short path (ipc:// socket paths must fit in
    107 bytes, which pytest's own temporary paths may not); removed after the test."""
    made: list[Path] = []

    def make(tag: str) -> Path:
        root = Path(os.environ.get("THEATER_TEST_TMP", "/tmp")) / f"th-{tag}-{os.getpid()}-{time.monotonic_ns() % 10**9}"
        root.mkdir(parents=True)
        made.append(root)
        return root

    yield make
    for root in made:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def small_disk(short_root: Callable[[str], Path]) -> Iterator[Path]:
    """A fresh directory whose ``h`` is a 3 MiB tmpfs of its own, for filling up (skipped where no tmpfs can be
    mounted: it needs root)."""
    root = short_root("disk")
    (root / "h").mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M,mode=0700", "tmpfs", str(root / "h")],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}); the test needs root")
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root / "h")], capture_output=True)


def fill_disk(path: Path) -> Path:
    """Take every byte left on the filesystem ``path`` is on, with the file ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return path


@pytest.fixture(scope="session")
def artifact_pool() -> Iterator[ArtifactPool]:
    root = Path(os.environ.get("THEATER_TEST_TMP", "/tmp")) / f"th-artifacts-{os.getpid()}"
    pool = ArtifactPool(root)
    yield pool
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def theater(short_root: Callable[[str], Path], request: pytest.FixtureRequest) -> Iterator[Theater]:
    root = short_root("t")
    shared = request.node.get_closest_marker("shared_artifacts") is not None
    t = Theater(root, request.getfixturevalue("artifact_pool") if shared else None)
    t.start()
    try:
        yield t
    finally:
        t.stop()
