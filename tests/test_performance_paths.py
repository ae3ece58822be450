"""The fast paths, tested for what they must keep: the fork-server, the artifact cache, the call fast path.

Real processes (a supervisor, its fork-server, forked workers), real wasmtime,
real files. Nothing here measures time: the figures are in ``scripts/bench``.
Waits are on replies, pidfds or process facts with a deadline.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import shutil
import signal
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq
from conftest import (
    COMPONENTS,
    ROOT,
    Theater,
    assert_verified,
    gone,
    holds_an_artifact,
    ps,
    records,
    spare_workers,
    supervisor_log,
    wait_running,
    wait_until,
)

from supervisor._artifacts import ArtifactCache
from supervisor._config import load_manifest, policy_dirs
from supervisor._spawner import Spawner, exit_reason
from theater import wire
from theater.artifacts import artifact_key, file_signature
from theater.client import Client, ClientError
from theater.forkserver import ArtifactOffer, Compiled
from theater.home import Home
from theater.records import Kind
from theater.spec import HARDENING_LAYERS, Limits
from worker._boundary import from_guest, from_guest_utf8, to_guest
from worker._engine import Sandbox, compile_component, lifted_from_generic, load_artifact, make_engine
from worker._errors import CallFailed, LoadError
from worker._zygote import seal_artifact

LIMITS = Limits(**tomllib.loads((ROOT / "policies" / "default.toml").read_text())["limits"])


# --- helpers -------------------------------------------------------------------------------


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []


def _zygote_of(t: Theater, not_pid: int | None = None) -> psutil.Process:
    """The supervisor's fork-server (one other than ``not_pid``), once it is there."""
    assert t.proc is not None

    def zygote() -> psutil.Process | None:
        for p in _children(t.proc.pid):  # type: ignore[union-attr]
            try:
                if p.name() == "theater-zygote" and p.pid != not_pid:
                    return p
            except psutil.Error:  # it ended while we looked
                continue
        return None

    return wait_until(zygote, 20, "the fork-server")  # type: ignore[return-value]


def _restart(t: Theater, name: str) -> int:
    """SIGKILL the agent's worker and wait for its replacement; return the new pid."""
    with t.client() as c:
        old = ps(c, name)["pid"]
        os.kill(old, signal.SIGKILL)
        return wait_running(c, name, old)["pid"]


# --- the fork-server, inside a real supervisor ------------------------------------------------


def test_forked_workers_harden_themselves_make_own_keys_and_are_the_supervisors_children(theater: Theater) -> None:
    """Each worker is forked by the single-threaded fork-server, is the supervisor's child, applies its own
    hardening and signs with a key of its own; its death is recorded with its exact signal."""
    with theater.client() as c:
        c.spawn(theater.manifest("a", "counter.wat"))
        c.spawn(theater.manifest("b", "counter.wat"))
        assert c.call("a", b"x") == b"1"
    zygote = _zygote_of(theater)
    assert len(os.listdir(f"/proc/{zygote.pid}/task")) == 1
    with theater.client() as c:
        pids = {ps(c, "a")["pid"], ps(c, "b")["pid"]}
    pids.add(_restart(theater, "a"))
    pids.add(_restart(theater, "a"))
    assert len(os.listdir(f"/proc/{zygote.pid}/task")) == 1  # still one thread after four forks
    assert theater.proc is not None
    for pid in pids - {p for p in pids if gone(p)}:
        proc = psutil.Process(pid)
        assert proc.name() == "theater-worker"  # forked by the fork-server, not a fresh interpreter
        assert proc.ppid() == theater.proc.pid  # CLONE_PARENT: the supervisor's own child
    keys = []
    for name in ("a", "b"):
        for record in records(theater, name, check_seq=False):
            if record.kind in (Kind.GENESIS, Kind.WORKER_KEY):
                fields = record.fields()
                keys.append(fields["worker_key"])
                confinement = json.loads(fields["confinement"])
                assert confinement["hygiene"] == "applied", confinement
    assert len(keys) == 4 and len(set(keys)) == 4  # a, a after two restarts, b: every worker its own key
    exits = [r.fields() for r in records(theater, "a", check_seq=False) if r.kind is Kind.EXIT]
    assert [e["reason"] for e in exits] == ["worker-died", "worker-died"]
    assert all("killed by signal 9 (SIGKILL)" in e["detail"] for e in exits)
    with theater.client() as c:
        assert c.call("a", b"y") == b"2"


def _spare_of(t: Theater, c: Client, not_pid: int | None = None, *, loaded: bool | None = None) -> psutil.Process:
    """A spare worker of the fork-server (other than ``not_pid``): one that has loaded a component ahead
    (``loaded=True``), a plain one (``False``), or either (None)."""

    def spare() -> psutil.Process | None:
        for p in spare_workers(t, c):
            if p.pid != not_pid and (loaded is None or holds_an_artifact(p) == loaded):
                return p
        return None

    what = {None: "spare", True: "loaded spare", False: "plain spare"}[loaded]
    return wait_until(spare, 20, f"the fork-server's {what} worker")  # type: ignore[return-value]


def test_a_spawn_takes_the_spare_worker_hardened_before_it_was_needed(theater: Theater) -> None:
    """Between spawns the fork-server keeps a plain worker forked, hardened and connected; a spawn of a
    component whose artifact is ready gives it its agent (so the agent's worker is that very process), and
    a new spare follows."""
    with theater.client() as c:
        c.spawn(theater.manifest("a", "echo.wat"))  # the artifact is compiled and cached
        spare = _spare_of(theater, c, loaded=False)
        # Its ZeroMQ threads: it connects before it has an agent.
        wait_until(lambda: len(spare.threads()) > 1, 20, "the spare to connect")
        # The same component under other limits: no spare has loaded it, the plain one takes it.
        c.spawn(theater.manifest("b", "echo.wat", limits={"max_logs_per_call": 50}))
        assert ps(c, "b")["pid"] == spare.pid
        assert c.call("b", b"x") == b"x"
        following = _spare_of(theater, c, not_pid=spare.pid, loaded=False)
        assert following.pid != spare.pid
    [genesis] = [r for r in records(theater, "b") if r.kind is Kind.GENESIS]
    confinement = json.loads(genesis.fields()["confinement"])
    assert {k: v for k, v in confinement.items() if "." not in k} == {
        layer: "applied" for layer in ("hygiene", *HARDENING_LAYERS)}


def test_a_spare_loads_the_component_of_the_last_spawn_and_takes_the_next_agent_or_restart(theater: Theater) -> None:
    """After a spawn, a spare loads and instantiates that component under the same profile (capabilities,
    limits, hardening) before any agent is known; the next spawn of it, and the restart of a crashed
    worker, are given that spare, whose records are the agent's own and whose state is the agent's."""
    with theater.client() as c:
        c.spawn(theater.manifest("a", "counter.wat"))
        loaded = _spare_of(theater, c, loaded=True)
        wait_until(lambda: len(loaded.threads()) > 1, 20, "the loaded spare to connect")
        c.spawn(theater.manifest("b", "counter.wat"))
        assert ps(c, "b")["pid"] == loaded.pid
        assert [c.call("b", b"x") for _ in range(2)] == [b"1", b"2"]
        # Locked down ahead, then the hand-over closed: three seccomp filters (denylist, allowlist, closer).
        status = dict(line.split(":\t", 1) for line in Path(f"/proc/{loaded.pid}/status").read_text().splitlines())
        assert (status["Seccomp"], status["Seccomp_filters"], status["NoNewPrivs"]) == ("2", "3", "1")
        assert c.call("a", b"x") == b"1"
        replacement = _spare_of(theater, c, not_pid=loaded.pid, loaded=True)
        crashed = ps(c, "a")["pid"]
        os.kill(crashed, signal.SIGKILL)
        assert wait_running(c, "a", crashed)["pid"] == replacement.pid
        assert c.call("a", b"x") == b"2"  # the committed state, in the instance loaded ahead
    for name in ("a", "b"):
        keys = [r.fields()["worker_key"] for r in records(theater, name, check_seq=False)
                if r.kind in (Kind.GENESIS, Kind.WORKER_KEY)]
        assert len(set(keys)) == len(keys)  # every worker its own key, loaded ahead or not


def test_a_component_that_calls_the_host_while_instantiated_is_not_loaded_ahead(theater: Theater) -> None:
    """start_now.wat reads the clock from a start function, while it is instantiated: a spare that loads it
    ahead of its agent has no chain to record that on. The worker instantiates it again once it has the
    agent, so each agent's chain holds its own host call, before its init."""
    with theater.client() as c:
        c.spawn(theater.manifest("a", "start_now.wat"))
        wait_until(lambda: len(spare_workers(theater, c)) >= 2, 20, "the plain spare and the one for start_now.wat")
        c.spawn(theater.manifest("b", "start_now.wat"))
        assert c.call("b", b"hi") == b"hi"
    for name in ("a", "b"):
        kinds = [(r.kind, r.fields().get("function")) for r in records(theater, name)][:3]
        assert kinds == [(Kind.GENESIS, None), (Kind.HOST_CALL, "now"), (Kind.INIT, None)], (name, kinds)


def test_spares_are_loaded_for_the_four_profiles_spawned_last(theater: Theater) -> None:
    """One loaded spare per profile, for the four spawned most recently: the fifth profile's spawn ends the
    spare of the first, so idle spares cost a bounded amount of memory."""
    with theater.client() as c:
        c.spawn(theater.manifest("p0", "echo.wat"))
        first = _spare_of(theater, c, loaded=True)
        for i in range(1, 5):
            c.spawn(theater.manifest(f"p{i}", "echo.wat", limits={"max_logs_per_call": 10 + i}))
        wait_until(lambda: gone(first.pid), 20, "the spare of the profile spawned least lately to end")
        wait_until(lambda: sum(map(holds_an_artifact, spare_workers(theater, c))) == 4, 20, "four loaded spares")


def test_a_spare_that_dies_unused_is_reaped_and_replaced(theater: Theater) -> None:
    """SIGKILL the spare: the supervisor (its parent) reaps it, the fork-server makes another,
    and spawns go on."""
    with theater.client() as c:
        c.spawn(theater.manifest("a", "echo.wat"))
        dead = _spare_of(theater, c)
        dead.kill()
        _spare_of(theater, c, not_pid=dead.pid)  # the fork-server saw it end and made another
        c.spawn(theater.manifest("b", "echo.wat"))  # the supervisor takes the fork-server's notes here
        assert c.call("b", b"hi") == b"hi"
        wait_until(lambda: not psutil.pid_exists(dead.pid), 10, "the dead spare to be reaped")


_SUPERVISOR_WAITING_FOR_INIT = """
import sys
from supervisor import Supervisor, _workers
from theater.home import Home
_workers.GENESIS_COMMIT_S = 3600.0  # a genesis waits for its init's result however slow the machine is
Supervisor(Home(sys.argv[1])).serve_forever()
"""


def test_a_spawn_commits_its_genesis_with_its_inits_result(short_root: Callable[[str], Path]) -> None:
    """A new agent's genesis record is committed in the transaction of its init's result: a spawn costs the
    store one durable commit, and its chain is whole and verifies."""
    t = Theater(short_root("genesis"))
    t.start([sys.executable, "-c", _SUPERVISOR_WAITING_FOR_INIT, str(t.home.root)])
    try:
        with t.client() as c:
            c.spawn(t.manifest("warm", "echo.wat"))  # compiles the component: the next spawn does not wait
            before = c.top()["supervisor"]["commits_total"]
            c.spawn(t.manifest("a", "echo.wat"))
            assert c.top()["supervisor"]["commits_total"] - before == 1
            assert c.call("a", b"hi") == b"hi"
    finally:
        t.stop()
    assert [r.kind for r in records(t, "a")][:3] == [Kind.GENESIS, Kind.INIT, Kind.HANDLE]
    assert_verified(t)


_SUPERVISOR_KEEPING_NO_UNUSED_ARTIFACT = """
import sys
from supervisor import Supervisor, _artifacts
from theater.home import Home
_artifacts.MAX_UNUSED_BYTES = 0  # every artifact no agent uses is dropped at the next sweep
Supervisor(Home(sys.argv[1])).serve_forever()
"""


def test_the_artifact_cache_keeps_what_agents_use_and_drops_the_rest_past_its_budget(
    short_root: Callable[[str], Path],
) -> None:
    """Compiled artifacts no agent uses are kept up to a budget, the least recently used dropped first, after
    each compile and at the supervisor's start; those the home's agents use are never dropped. With a budget of
    nothing: removing an agent and compiling another component drops the removed one's artifact, not the
    other's; spawning the first component again compiles it again, and it runs."""
    t = Theater(short_root("sweep"))
    t.start([sys.executable, "-c", _SUPERVISOR_KEEPING_NO_UNUSED_ARTIFACT, str(t.home.root)])
    cache = t.home.root / "cache"
    try:
        with t.client() as c:
            c.spawn(t.manifest("a", "echo.wat"))
            [echo] = cache.glob("*.cwasm")
            c.spawn(t.manifest("b", "counter.wat"))  # a compile: the sweep keeps both, both are used
            assert len(list(cache.glob("*.cwasm"))) == 2 and echo.exists()
            c.stop("a")
            c.remove("a")
            c.spawn(t.manifest("c", "chatty.wat"))  # the next compile sweeps: echo's artifact is no one's now
            assert not echo.exists() and not echo.with_suffix(".tag").exists()
            assert len(list(cache.glob("*.cwasm"))) == 2
            c.spawn(t.manifest("a2", "echo.wat"))
            assert c.call("a2", b"back") == b"back"
            assert echo.exists()
        assert "dropped 1 compiled artifact(s) no agent uses" in supervisor_log(t)
    finally:
        t.stop()


def test_no_worker_or_fork_server_outlives_a_killed_supervisor(theater: Theater) -> None:
    """SIGKILL the supervisor: the fork-server, its spare and every forked worker end with it."""
    with theater.client() as c:
        c.spawn(theater.manifest("a", "counter.wat"))
        c.spawn(theater.manifest("b", "echo.wat"))
        workers = [a["pid"] for a in c.ps()]
        spare = _spare_of(theater, c)
    zygote = _zygote_of(theater)
    everyone = [zygote.pid, spare.pid, *workers]
    assert all(not gone(pid) for pid in everyone)
    theater.kill()
    wait_until(lambda: all(gone(pid) for pid in everyone), 10, "the fork-server and workers to die with the supervisor")


def test_a_dead_fork_server_is_replaced_and_spawns_go_on(theater: Theater) -> None:
    """Kill the fork-server: the supervisor notices at once (its socket closes), says so, ends the spares it
    held and starts a new fork-server, with no spawn needed to find out and no loop spinning on the dead
    socket meanwhile; spawns go on (from a fresh interpreter until the new one is ready), and running agents
    are untouched."""
    old = _zygote_of(theater)
    assert theater.proc is not None
    with theater.client() as c:
        c.spawn(theater.manifest("a", "echo.wat"))
        held = _spare_of(theater, c, loaded=True)  # its line is the supervisor's, not the fork-server's
        old.kill()
        new = _zygote_of(theater, not_pid=old.pid)
        assert gone(old.pid)  # reaped as it was replaced
        wait_until(lambda: gone(held.pid), 10, "the spare it had loaded to be ended")
        assert f"fork-server {old.pid} is gone" in supervisor_log(theater)
        c.spawn(theater.manifest("b", "echo.wat"))
        assert c.call("b", b"hi") == b"hi"

        def forked_by_the_new_one() -> bool:
            # Until the new fork-server has finished its imports, spawns start fresh interpreters.
            name = f"c{len([a for a in c.ps() if a['name'].startswith('c')])}"
            c.spawn(theater.manifest(name, "echo.wat"))
            return psutil.Process(ps(c, name)["pid"]).name() == "theater-worker"

        wait_until(forked_by_the_new_one, 30, "a worker forked by the new fork-server")
        assert new.is_running()
        assert c.call("a", b"still") == b"still"


# --- the fork-server, driven directly ------------------------------------------------------------


class _Endpoint:
    """A worker socket, as the supervisor binds it, to collect hellos."""

    def __init__(self, home: Home) -> None:
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind(home.workers_endpoint)
        self.early: dict[bytes, wire.Hello] = {}  # hellos read before they were asked for (loaded spares')

    def hello(self, token: bytes) -> wire.Hello:
        """The hello carrying ``token``: a loaded spare says hello before a spawn takes it."""
        deadline = time.monotonic() + 30
        while token not in self.early:
            assert self.sock.poll(max(0, int((deadline - time.monotonic()) * 1000))), "no hello within 30 s"
            frames = self.sock.recv_multipart()
            assert wire.parse_header(frames[1], wire.WorkerType) is wire.WorkerType.HELLO
            hello = wire.Hello.decode(frames[2:])
            self.early[hello.token] = hello
        return self.early.pop(token)


@pytest.fixture
def spawner() -> Any:
    root = Path("/tmp") / f"thz-{os.getpid()}-{time.monotonic_ns() % 10**9}"  # ipc:// paths must be short
    for d in ("run", "logs"):
        (root / "h" / d).mkdir(parents=True, exist_ok=True)
    home = Home(root / "h")
    lines: list[str] = []
    sp = Spawner(home, lines.append)
    endpoint = _Endpoint(home)
    manifest = root / "echo.toml"
    manifest.write_text(f'name = "echo"\ncomponent = "{COMPONENTS / "echo.wat"}"\n')
    config = load_manifest(manifest, policy_dirs(None))
    try:
        yield home, sp, endpoint, config, lines
    finally:
        endpoint.sock.close(0)
        sp.close()
        shutil.rmtree(root, ignore_errors=True)


def _wait_exit(worker: Any) -> int:
    ready, _, _ = select.select([worker.pidfd], [], [], 20)
    assert ready, "the worker did not end"
    return worker.reap()


def test_fork_server_compiles_once_and_workers_get_exact_exit_statuses(spawner: Any) -> None:
    """Through the fork-server: one compile for three workers of one component, a hello from each with
    its own key, and exact exit statuses (signal or code) through the pidfd."""
    home, sp, endpoint, config, _lines = spawner
    workers, keys = [], set()
    for i in range(3):
        w = sp.spawn(home.workers_endpoint, i, home.logs / "echo.log", home.run / "w" / str(i), config)
        hello = endpoint.hello(w.token)
        assert hello.pid == w.pid and w.proc is None
        keys.add(hello.worker_key)
        workers.append(w)
    assert len(keys) == 3
    assert len(os.listdir(f"/proc/{sp.zygote.pid}/task")) == 1
    workers[0].kill("test")
    assert exit_reason(_wait_exit(workers[0])) == "killed by signal 9 (SIGKILL)"
    os.kill(workers[1].pid, signal.SIGTERM)
    assert exit_reason(_wait_exit(workers[1])) == "killed by signal 15 (SIGTERM)"
    endpoint.sock.close(0)  # the last worker's spec never comes: it gives up with its protocol exit code
    workers[2].kill("test")
    assert _wait_exit(workers[2]) == -9
    sp.zygote.drain()  # the compile report
    key = artifact_key(config.component_sha256, config.limits)
    assert sp.cache.lookup(key) is not None
    assert (home.root / "cache" / f"{key}.tag").exists()


@pytest.mark.parametrize("ceiling", ["cpu", "memory"])
def test_a_compile_job_past_its_ceiling_ends_alone_and_the_worker_compiles(
    short_root: Callable[[str], Path], ceiling: str,
) -> None:
    """Compile jobs read guest bytes under ceilings on CPU time and address space: one that hits its
    ceiling ends (and says so), nothing is cached, and the waiting worker compiles the component itself."""
    t = Theater(short_root(f"ceiling-{ceiling}"))
    t.start([sys.executable, str(ROOT / "tests" / "run_ceiling_supervisor.py"), str(t.home.root), ceiling])
    try:
        with t.client() as c:
            c.spawn(t.manifest("a", "echo.wat"))
            assert c.call("a", b"hi") == b"hi"
        log = supervisor_log(t)
        # The hard CPU limit kills; an allocation past the address space aborts in the compiler, or
        # raises MemoryError in Python first.
        ends = ["was killed by SIGKILL"] if ceiling == "cpu" else ["was killed by SIGABRT", "MemoryError"]
        assert "failed after" in log and any(end in log for end in ends), log[-3000:]
        assert not list((t.home.root / "cache").glob("*.cwasm"))
        if ceiling == "cpu":  # and it is first in line for the OOM killer, as a worker is
            assert "compile job oom_score_adj 1000" in log, log[-3000:]
    finally:
        t.stop()



def test_a_worker_waiting_for_its_components_compile_is_given_its_hello_deadline_after_it(
    short_root: Callable[[str], Path],
) -> None:
    """A worker forked while its component compiles says hello only once the compile job has ended. A large
    component's first spawn on a busy machine compiled past the hello deadline, and its worker was killed
    (``no-hello``) while the compile went on. Here the compile waits for the test past several deadlines."""
    t = Theater(short_root("held-compile"))
    gate = t.dir / "gate"
    os.mkfifo(gate)
    t.start([sys.executable, str(ROOT / "tests" / "run_held_compile_supervisor.py"), str(t.home.root), str(gate)])
    outcome: dict[str, str] = {}

    def spawn() -> None:
        with t.client(timeout=60) as c:
            try:
                c.spawn(t.manifest("a", "echo.wat"))
                outcome["spawn"] = "ok"
            except ClientError as exc:
                outcome["spawn"] = str(exc)

    spawner = threading.Thread(target=spawn)
    spawner.start()
    try:
        wait_until(lambda: supervisor_log(t).count("hello deadline reached for a") >= 3 or outcome,
                   what="three hello deadlines while the component compiles")
        assert not outcome, outcome
        with open(gate, "wb"):  # the compile job goes on
            pass
        spawner.join(60)
        assert outcome == {"spawn": "ok"}
        with t.client() as c:
            assert c.call("a", b"hi") == b"hi"
        assert "sent no hello" not in supervisor_log(t)
    finally:
        with contextlib.suppress(OSError):  # a compile job still held: let it go (ENXIO: none waits)
            os.close(os.open(gate, os.O_WRONLY | os.O_NONBLOCK))
        spawner.join(60)
        t.stop()


def test_messages_sent_to_an_agent_that_never_started_are_answered(short_root: Callable[[str], Path]) -> None:
    """A client may send to an agent while it starts. When its worker ended before its first hello, the spawn
    failed and the agent was forgotten, but the messages in its mailbox were never answered (their callers
    waited out their own timeouts) and their bytes stayed counted against the tenant."""
    t = Theater(short_root("never-started"))
    gate = t.dir / "gate"
    os.mkfifo(gate)
    t.start([sys.executable, str(ROOT / "tests" / "run_held_compile_supervisor.py"), str(t.home.root), str(gate)])
    outcome: dict[str, str] = {}

    def attempt(what: str, act: Callable[[Client], object]) -> None:
        with t.client(timeout=60) as c:
            try:
                act(c)
                outcome[what] = "ok"
            except ClientError as exc:
                outcome[what] = f"{exc.code}: {exc}"

    threads = [threading.Thread(target=attempt, args=("spawn", lambda c: c.spawn(t.manifest("a", "echo.wat"))))]
    threads[0].start()
    try:
        wait_until(lambda: "hello deadline reached for a" in supervisor_log(t), what="the worker waiting on its compile")
        threads.append(threading.Thread(target=attempt, args=("call", lambda c: c.call("a", b"hi", timeout=30))))
        threads[1].start()
        with t.client() as c:
            wait_until(lambda: ps(c, "a")["mailbox"] == 1 and ps(c, "a")["pid"], what="the call queued")
            os.kill(ps(c, "a")["pid"], signal.SIGKILL)
        for thread in threads:
            thread.join(20)
        assert outcome["spawn"].startswith("spawn-failed: agent a failed to start: worker-died: killed by signal 9")
        assert outcome["call"] == outcome["spawn"], outcome
    finally:
        with contextlib.suppress(OSError):
            os.close(os.open(gate, os.O_WRONLY | os.O_NONBLOCK))
        for thread in threads:
            thread.join(60)
        t.stop()


def test_a_worker_made_ready_ahead_is_kept_when_its_hello_comes_before_the_fork_servers_answer(
    short_root: Callable[[str], Path],
) -> None:
    """A tree's next child has its worker made ready ahead. When that worker's hello is read before the
    fork-server's answer, the answer is read then, and the worker must still be found as the one made ready
    for its agent: it was ended as nobody's, and the agent later bound a new worker with the ended one's
    hello, which took the supervisor down in a tree's restart. Here every answer comes after its hello."""
    t = Theater(short_root("late-answer"))
    t.start([sys.executable, str(ROOT / "tests" / "run_late_answer_supervisor.py"), str(t.home.root)])
    children = [f"c{i}" for i in range(4)]
    tree = t.dir / "tree.toml"
    tree.write_text('name = "tree"\nstrategy = "one_for_one"\n' + "".join(
        f'\n[[children]]\nname = "{c}"\ncomponent = "{COMPONENTS / "echo.wat"}"\n' for c in children))
    try:
        with t.client() as c:
            c.spawn(tree)
            for _ in range(2):
                for child in children:
                    assert c.call(child, child.encode()) == child.encode()
                c.restart("tree")
        assert t.proc is not None and t.proc.poll() is None
    finally:
        t.stop()
    log = supervisor_log(t)  # complete once the supervisor has ended
    assert "up at" in log and "made ready ahead" not in log and "no agent waits for it" not in log, log[-3000:]


# --- the artifact cache ----------------------------------------------------------------------------


def _compiled_into(cache: ArtifactCache, key: str, source: bytes) -> Compiled:
    """Write an artifact as a compile job would, and report it as the fork-server would."""
    import hashlib

    blob = compile_component(make_engine(LIMITS), source).serialize()
    path = cache.path(key)
    path.write_bytes(blob)
    note = Compiled(key, True, 0.1, hashlib.sha256(blob).hexdigest(), len(blob), tuple(file_signature(os.stat(path))))
    cache.compiled(note)
    return note


def test_artifact_cache_hit_miss_and_every_kind_of_tampering(tmp_path: Path) -> None:
    """A miss, then a hit (also for a new process with the same secret); flipped bytes, truncation, a
    planted file, a forged tag and a tag moved from another artifact are all refused and deleted."""
    lines: list[str] = []
    cache = ArtifactCache(tmp_path / "cache", lines.append)
    assert (tmp_path / "cache" / "secret").stat().st_mode & 0o777 == 0o600
    source = (COMPONENTS / "echo.wat").read_bytes()
    key = artifact_key("ab" * 32, LIMITS)
    assert cache.lookup(key) is None
    note = _compiled_into(cache, key, source)
    hit = cache.lookup(key)
    assert hit == ArtifactOffer(key, str(cache.path(key)), note.sha256)
    assert ArtifactCache(tmp_path / "cache", lines.append).lookup(key) == hit  # a restarted supervisor: re-hashed

    def refused(damage: Any, why: str) -> None:
        _compiled_into(cache, key, source)
        damage(cache.path(key))
        lines.clear()
        assert ArtifactCache(tmp_path / "cache", lines.append).lookup(key) is None
        assert cache.lookup(key) is None
        assert not cache.path(key).exists() and not (tmp_path / "cache" / f"{key}.tag").exists()
        assert any(why in line and "compiling again" in line for line in lines), lines

    def flip(path: Path) -> None:
        with open(path, "r+b") as f:
            f.seek(path.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))

    refused(flip, "not the ones compiled")
    refused(lambda p: os.truncate(p, p.stat().st_size - 100), "not the ones compiled")

    def planted(path: Path) -> None:
        (tmp_path / "cache" / f"{key}.tag").unlink()
    refused(planted, "no valid tag")

    def forged(path: Path) -> None:
        tag_path = tmp_path / "cache" / f"{key}.tag"
        tag = json.loads(tag_path.read_text())
        path.write_bytes(b"\x7fELF" + os.urandom(4000))
        import hashlib
        tag.update(sha256=hashlib.sha256(path.read_bytes()).hexdigest(), size=4004)
        tag_path.write_text(json.dumps(tag))  # its MAC no longer matches: made without the secret
    refused(forged, "no valid tag")

    def moved(path: Path) -> None:
        other = artifact_key("cd" * 32, LIMITS)
        _compiled_into(cache, other, (COMPONENTS / "counter.wat").read_bytes())
        os.replace(cache.path(other), path)  # a genuine artifact, under another key's name
    refused(moved, "not the ones compiled")


def test_cache_key_covers_everything_that_shapes_the_machine_code() -> None:
    """Stack size (silently accepted by wasmtime on load) and every other engine setting move the key."""
    base = artifact_key("ab" * 32, LIMITS)
    assert artifact_key("ab" * 32, LIMITS) == base
    assert artifact_key("ac" * 32, LIMITS) != base
    changed = Limits(**{**LIMITS.as_dict(), "stack_bytes": LIMITS.stack_bytes // 2})
    assert artifact_key("ab" * 32, changed) != base
    unrelated = Limits(**{**LIMITS.as_dict(), "mailbox": LIMITS.mailbox - 1})
    assert artifact_key("ab" * 32, unrelated) == base  # not an engine setting


def test_sealed_artifact_loads_and_anything_else_is_refused(tmp_path: Path) -> None:
    """The fork-server's memfd: sealed, checked against the recorded SHA-256, the only thing a worker maps."""
    import hashlib

    source = (COMPONENTS / "echo.wat").read_bytes()
    blob = compile_component(make_engine(LIMITS), source).serialize()
    path = tmp_path / "a.cwasm"
    path.write_bytes(blob)
    digest = hashlib.sha256(blob).hexdigest()
    key = artifact_key(hashlib.sha256(source).hexdigest(), LIMITS)
    with pytest.raises(ValueError, match="recorded SHA-256"):
        seal_artifact(key, str(path), "00" * 32)
    fd, size = seal_artifact(key, str(path), digest)
    engine = make_engine(LIMITS)
    component = load_artifact(engine, {"key": key, "fd": os.dup(fd), "sha256": digest, "size": size}, key)
    sandbox = Sandbox(engine, component, LIMITS, {})
    assert sandbox.call_agent("handle", b"s", b"hi")[0].reply == b"hi"
    with pytest.raises(LoadError, match="another component"):
        load_artifact(engine, {"key": "0" * 64, "fd": os.dup(fd), "size": size}, key)
    with pytest.raises(OSError):
        os.write(fd, b"x")  # sealed against writes
    os.close(fd)
    plain = os.open(path, os.O_RDONLY)
    with pytest.raises(LoadError, match=r"artifact descriptor is (unusable|not a sealed artifact memfd)"):
        load_artifact(engine, {"key": key, "fd": plain, "size": size}, key)
    unsealed = os.memfd_create("theater-artifact-x", os.MFD_ALLOW_SEALING)
    os.write(unsealed, blob)
    with pytest.raises(LoadError, match="not a sealed artifact memfd"):
        load_artifact(engine, {"key": key, "fd": unsealed, "size": size}, key)


def test_artifact_is_compiled_once_and_recompiled_after_tampering(theater: Theater) -> None:
    """End to end: two agents and a restart share one compile; an altered artifact is noticed at the
    next spawn, compiled again, and the agent runs."""
    with theater.client() as c:
        c.spawn(theater.manifest("a", "echo.wat"))
        c.spawn(theater.manifest("b", "echo.wat"))
        _restart(theater, "a")
        assert c.call("a", b"1") == b"1"
        assert supervisor_log(theater).count("zygote: compiling") == 1
        [artifact] = list((theater.home.root / "cache").glob("*.cwasm"))
        with open(artifact, "r+b") as f:
            f.seek(200)
            f.write(b"\x00" * 16)
        c.spawn(theater.manifest("d", "echo.wat"))
        assert c.call("d", b"2") == b"2"
        log = supervisor_log(theater)
        assert "not the ones compiled" in log and "compiling again" in log
        assert log.count("zygote: compiling") == 2


# --- the call fast path against wasmtime's generic path --------------------------------------------


@pytest.fixture(scope="module")
def sandboxes() -> dict[str, Sandbox]:
    engine = make_engine(LIMITS)
    return {name: Sandbox(engine, (COMPONENTS / f"{name}.wat").read_bytes(), LIMITS, {})
            for name in ("echo", "guest_error", "bad_bytes")}


PAYLOADS = {
    "empty": b"",
    "one byte": b"\x00",
    "every byte value": bytes(range(256)),
    "high bytes": bytes(range(128, 256)) * 4,
    "ascii 100 B": b"x" * 100,
    "1 MiB mixed": os.urandom(1 << 20),
}


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("export", ["init", "handle"])
def test_fast_path_matches_generic_path(sandboxes: dict[str, Sandbox], payload: str, export: str) -> None:
    """call_agent returns what wasmtime's generic Func.__call__ returns, for every byte, both exports."""
    echo = sandboxes["echo"]
    data = PAYLOADS[payload]
    state = data[::-1]
    echo.call_agent(export, state, data)  # memory grown by the first large call: same fuel afterwards
    generic, generic_fuel = echo.call(export, to_guest(state), to_guest(data))
    fast, fast_fuel = echo.call_agent(export, state, data)
    assert fast == lifted_from_generic(export, generic)
    assert fast_fuel == generic_fuel
    assert from_guest_utf8(fast.state, "state", 1 << 21) == (data if export == "init" else state)
    if export == "handle":
        assert from_guest_utf8(fast.reply, "reply", 1 << 21) == data


def test_fast_path_errors_and_limits_match_generic_path(sandboxes: dict[str, Sandbox]) -> None:
    """A guest err, an out-of-range character, and the size limit at max and max+1: same outcome both ways."""
    err = sandboxes["guest_error"]
    fast, _ = err.call_agent("handle", b"", b"why")
    generic, _ = err.call("handle", "", "why")
    assert fast == lifted_from_generic("handle", generic) and not fast.ok and fast.error == "boom: why"

    bad = sandboxes["bad_bytes"]
    fast, _ = bad.call_agent("handle", b"", b"x")
    generic, _ = bad.call("handle", "", "x")
    assert fast == lifted_from_generic("handle", generic)
    with pytest.raises(CallFailed) as fast_error:
        from_guest_utf8(fast.reply, "reply", 100)
    with pytest.raises(CallFailed) as generic_error:
        from_guest(generic.reply, "reply", 100)
    assert (fast_error.value.status, fast_error.value.message) == (generic_error.value.status, generic_error.value.message)

    for data in (b"y" * 64, bytes([0xE9]) * 64):
        assert from_guest_utf8(data.decode("latin-1").encode(), "reply", 64) == data
        for convert, text in ((from_guest_utf8, data.decode("latin-1").encode() + b"z"), (from_guest, to_guest(data) + "z")):
            with pytest.raises(CallFailed) as over:
                convert(text, "reply", 64)  # type: ignore[operator]
            assert over.value.status == "too-large" and "reply of 65 bytes exceeds the limit of 64" in over.value.message



def test_a_loaded_spare_says_hello_before_a_spawn_takes_it(spawner: Any) -> None:
    """After a spawn, the fork-server announces a spare loaded for that profile with its token and hands
    the supervisor its line; the spare says hello with that token while no agent exists. The next spawn of
    the profile takes it without asking the fork-server: the same process, already known, whose output
    goes to the new agent's log from then on."""
    home, sp, endpoint, config, _lines = spawner
    first = sp.spawn(home.workers_endpoint, 0, home.logs / "a.log", home.run / "w" / "a", config)
    endpoint.hello(first.token)
    zygote = sp.zygote

    def announced() -> Any:
        zygote.drain()
        return zygote.loaded.get(config.load_profile)

    spare = wait_until(announced, 20, "a spare loaded for the profile")
    hello = endpoint.hello(spare.token)  # no agent has it yet
    assert hello.pid == spare.pid and hello.worker_key != b""
    taken = sp.spawn_nowait(home.workers_endpoint, 3, home.logs / "b.log", home.run / "w" / "b", config)
    assert (taken.pid, taken.token, taken.incarnation, taken.pending) == (spare.pid, spare.token, 3, False)
    assert config.load_profile not in zygote.loaded and spare.pid not in zygote.spares
    wait_until(lambda: os.readlink(f"/proc/{taken.pid}/fd/2") == str(home.logs / "b.log"), 10, "its log handed over")
    for w in (first, taken):
        w.kill("test")
        _wait_exit(w)


def test_an_answer_read_while_asking_for_the_next_worker_is_kept(spawner: Any) -> None:
    """The loop never waits for a fork: a spawn is asked, its answer arrives, and reading the fork-server's
    notes while the next spawn is asked must keep that answer for its worker (dropping it made the
    fork-server look silent: replaced after 5 s, its worker restarted from a fresh interpreter)."""
    home, sp, endpoint, config, lines = spawner
    first = sp.spawn_nowait(home.workers_endpoint, 0, home.logs / "a.log", home.run / "w" / "a", config)
    assert first.pending
    hello = endpoint.hello(first.token)  # the worker runs: its answer is (almost always) waiting in the socket by now
    second = sp.spawn_nowait(home.workers_endpoint, 0, home.logs / "b.log", home.run / "w" / "b", config)
    deadline = time.monotonic() + 3  # well inside the fork-server's 5 s answer deadline
    while (first.pending or second.pending) and time.monotonic() < deadline:
        sp.settle(0.1)
    assert not first.pending and not second.pending
    assert first.proc is None and second.proc is None, lines  # both forked, neither from a fresh interpreter
    assert (hello.pid, endpoint.hello(second.token).pid) == (first.pid, second.pid)
    for w in (first, second):
        w.kill("test")
        _wait_exit(w)


# --- calls sent ahead, as the worker reads them ------------------------------------------------


def test_a_worker_keeps_calls_sent_ahead_for_their_turn_and_obeys_a_stop_behind_them() -> None:
    """The worker's side of the supervisor's pipelined calls, on a real ZeroMQ pair: a call that arrives while
    a host request waits for its answer is kept and comes next; a STOP that has arrived behind calls sent
    ahead is seen before they run."""
    from worker._loop import SupervisorLink

    ctx = zmq.Context.instance()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for s in (router, dealer):
        s.linger = 0
    endpoint = f"inproc://link-{os.getpid()}-{time.monotonic_ns()}"
    router.bind(endpoint)
    dealer.connect(endpoint)
    try:
        dealer.send(b"hello")
        peer, _ = router.recv_multipart()
        calls = [wire.Call(i, wire.CallKind.HANDLE, b"m%d" % i).encode() for i in (1, 2, 3)]
        link = SupervisorLink(dealer)
        router.send_multipart([peer, *calls[0]])
        router.send_multipart([peer, *calls[1]])  # arrives before the reply to the request calls[0] makes: kept
        router.send_multipart([peer, *wire.HostRequest(1, {"answer": 42}).encode(wire.SupervisorType.HOST_REPLY)])
        assert link.next_frames() == calls[0]
        body, data = link.ask("kv", {"op": "get"}, None, 5_000)
        assert (body, data) == ({"answer": 42}, None)
        assert router.poll(5_000)
        assert wire.HostRequest.decode(router.recv_multipart()[2:], "host request").request_id == 1
        router.send_multipart([peer, *calls[2]])
        router.send_multipart([peer, wire.header(wire.SupervisorType.STOP)])
        assert link.next_frames() == calls[1]  # the call kept while the request waited
        wait_until(link.stop_waiting, 10, "the STOP behind the call sent ahead")
        assert link.next_frames() == calls[2]  # read while looking for the STOP, kept in order
    finally:
        router.close(0)
        dealer.close(0)


def test_the_ps_listing_is_written_with_its_keys_sorted_as_every_json_frame(theater: Theater) -> None:
    """``ps`` (a listing of thousands of agents is the longest reply) is written by orjson, not ``json``: its
    bytes are still those of every JSON frame, keys sorted and no spaces, with non-ASCII text as UTF-8."""
    with theater.client() as c:
        c.spawn(theater.manifest("a", "echo.wat"))
        c.spawn(theater.manifest("b", "counter.wat"))
        c.call("b", b"x")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(theater.home.control_endpoint)
    try:
        body = {"op": "ps", "id": 7, "token": theater.home.token.read_text().strip()}
        sock.send_multipart([wire.header(wire.ClientType.REQUEST), wire.encode_json(body)])
        assert sock.poll(30_000)
        frame = sock.recv_multipart()[1]
    finally:
        sock.close(0)
    orders: list[list[str]] = []
    reply = json.loads(frame, object_pairs_hook=lambda pairs: orders.append([k for k, _ in pairs]) or dict(pairs))
    assert [a["name"] for a in reply["result"]["agents"]] == ["a", "b"]
    assert orders and all(keys == sorted(keys) for keys in orders), orders
    assert frame == json.dumps(reply, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def test_a_listing_is_built_with_the_collector_paused_and_leaves_it_as_it_found_it() -> None:
    """``ps``, ``tree`` and ``top`` build a dict per agent inside ``_collector_paused``: no collection runs
    there, however many are made (collected while alive, thousands of rows would be moved into the oldest
    generation and set off full collections of the supervisor's heap), and the collector is left as it was,
    also when the reply fails."""
    from supervisor._control import _collector_paused

    started: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(info["generation"])

    gc.callbacks.append(count)
    try:
        assert gc.isenabled()
        with _collector_paused():
            assert not gc.isenabled()
            rows = [{"n": i} for i in range(20 * gc.get_threshold()[0])]  # twenty times what starts one
            del rows
        assert started == [] and gc.isenabled()
        with pytest.raises(KeyError), _collector_paused():
            raise KeyError("a reply that fails")
        assert gc.isenabled()
        gc.disable()
        try:
            with _collector_paused():
                pass
            assert not gc.isenabled()  # a caller's pause is its own to end
        finally:
            gc.enable()
        [{"n": i} for i in range(20 * gc.get_threshold()[0])]
        assert started  # the counting itself works: outside, as many dicts start collections
    finally:
        gc.callbacks.remove(count)


# --- host functions: their types read once ------------------------------------------------------------


def test_host_functions_read_their_types_once_and_refuse_a_call_of_another_type() -> None:
    """worker/_hostfuncs.py keeps a host function's parameter types from its first call. counter.wat's
    ``log`` and ``now`` get the guest's values on every call; a component importing ``log`` with other types,
    linked (against the rule the worker keeps, one linker per component) by the same linker, gets a trap
    naming the mismatch, never its values read as the first component's types."""
    import wasmtime
    import wasmtime.component as wc

    from worker._hostfuncs import add_host_func

    source = (COMPONENTS / "counter.wat").read_text()
    mistyped = (source
                .replace('(export "log" (func (param "level" $llx) (param "message" string)))',
                         '(export "log" (func (param "level" u32) (param "message" u32)))')
                .replace("(import \"rt\" \"log\" (func $log (param i32 i32 i32)))",
                         "(import \"rt\" \"log\" (func $log (param i32 i32)))")
                .replace("(call $log (i32.const 1) (i32.const 64) (i32.const 4))",
                         "(call $log (i32.const 1) (i32.const 64))"))
    assert mistyped.count("(param i32 i32))") == 1
    engine = make_engine(LIMITS)
    logged: list[tuple[Any, ...]] = []
    linker = wc.Linker(engine)
    with linker.root() as root, root.add_instance("theater:agent/runtime@0.1.0") as inst:
        add_host_func(inst, "log", lambda _store, level, message: logged.append((level, message)))
        add_host_func(inst, "now", lambda _store: 1_700_000_000_000_000_000)

    def handle(component_source: str, state: str) -> Any:
        store = wasmtime.Store(engine)
        store.set_fuel(10_000_000)
        store.set_epoch_deadline(1_000_000)
        instance = linker.instantiate(store, wc.Component(engine, component_source))
        func = instance.get_func(store, "handle")
        assert func is not None
        result = func(store, state, "m")
        func.post_return(store)
        return result

    for n in range(3):
        assert handle(source, str(n)).state == str(n + 1)
    assert logged == [("info", "tick")] * 3
    with pytest.raises(wasmtime.WasmtimeError) as trapped:
        handle(mistyped, "0")
    assert logged == [("info", "tick")] * 3
    assert "argument 0 of a host function is of another type than on its first call" in str(trapped.value)


# --- the supervisor's timers ------------------------------------------------------------------------


def test_a_turn_runs_one_due_timer_and_drops_the_cancelled_ones_before_it() -> None:
    """A turn of the loop runs one due timer (a crash storm's exits, each a durable commit, take a turn
    each), and drops on its way the cancelled ones due before it: a steady load of calls cancels thousands
    of timeouts a second, which one a turn piled up without bound. A cancelled timer never runs and lets
    go of what it would have run at once (an answered call's timeout held the whole call until it fell due)."""
    import gc
    import weakref

    from supervisor._timers import MAX_DROPPED, Timers

    timers, ran = Timers(), []
    past = time.monotonic() - 1
    cancelled = [timers.at(past, lambda i=i: ran.append(-i)) for i in range(MAX_DROPPED // 2)]
    for i in range(3):
        timers.at(past, lambda i=i: ran.append(i))
    timers.after(3600, lambda: ran.append(-1))
    for timer in cancelled:
        timer.cancel()
    timers.run_due()
    assert ran == [0]  # the cancelled ones ahead of it dropped, in the same turn
    timers.run_due()
    timers.run_due()
    timers.run_due()
    assert ran == [0, 1, 2]  # one a turn, and not the one an hour away

    class Call:
        pass

    call = Call()
    held = weakref.ref(call)
    timer = timers.at(past, lambda call=call: ran.append(id(call)))
    del call
    gc.collect()
    assert held() is not None
    timer.cancel()
    gc.collect()
    assert held() is None
    timers.run_due()
    assert ran == [0, 1, 2]


def test_a_due_timer_lets_the_loop_poll_without_sleeping() -> None:
    """Steps put off to a later turn (starts, hellos, a storm's exits, one a turn) are timers due at once:
    the loop's poll must not sleep for them. It slept up to a millisecond for a timer due a few microseconds
    ago (the wait was truncated toward zero, then had a millisecond added), once per timer when several
    fell due together."""
    from supervisor._timers import Timers

    timers = Timers()
    assert timers.timeout_ms() == 1000  # nothing due: the loop still looks up once a second
    timers.at(time.monotonic() + 3600, lambda: None)
    assert timers.timeout_ms() == 1000
    timers.at(time.monotonic() + 0.0025, lambda: None)
    assert 1 <= timers.timeout_ms() <= 3  # until it is due, rounded up: never a wake-up just before it
    timers.at(time.monotonic() - 1e-6, lambda: None)
    assert timers.timeout_ms() == 0
    timers.after(0, lambda: None)
    assert timers.timeout_ms() == 0


def test_cancelled_timers_due_far_ahead_do_not_pile_up() -> None:
    """An agent's timer cancelled (or its agent removed) cancels the loop's timer for it, and the heap is
    swept of cancelled timers once they are most of it: a one-day timer set and cancelled in a loop left
    one entry (and its closure) per cancel in the heap for a day."""
    from supervisor._timers import SWEEP_MIN, Timers

    timers, ran = Timers(), []
    keep = timers.after(3600, lambda: ran.append("kept"))
    for _ in range(10 * SWEEP_MIN):
        timers.after(86400, lambda: ran.append("cancelled")).cancel()
    assert len(timers._heap) <= 2 * SWEEP_MIN + 2
    assert keep.fn is not None and any(entry[2] is keep for entry in timers._heap)
    timers.at(time.monotonic() - 1, lambda: ran.append("due"))
    timers.run_due()
    assert ran == ["due"]
