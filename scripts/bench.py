"""Theater benchmarks: each figure beside a baseline measured in the same run, as a ratio.

Run through ``scripts/bench``. Prints one row per target (P1..P7 and R1 of
docs/performance.md) with its same-run baseline; ``--json`` for machines;
``--peers`` also installs Circus, supervisord and Extism into a throwaway
venv under /tmp and measures them in the same run. Targets are read from this
table, never asserted in tests.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import zmq

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = ROOT / "tests" / "components"
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "scripts"))
from theater import wire  # noqa: E402
from theater.client import Client  # noqa: E402
from theater.home import Home  # noqa: E402
from theater.records import Kind, Record  # noqa: E402
from theater.spec import Limits  # noqa: E402


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


# --- baselines ------------------------------------------------------------------


def fresh_interpreter(n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import zmq, wasmtime"], check=True)
        out.append(time.perf_counter() - t)
    return out


_ECHO_PEER = """
import sys, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.DEALER); s.connect(sys.argv[1])
s.send(b"ready")
while True:
    m = s.recv_multipart()
    if m == [b"stop"]: break
    s.send_multipart(m)
"""


def raw_zmq_round_trip(n: int, size: int) -> list[float]:
    tmp = tempfile.mkdtemp(prefix="thb-")
    endpoint = f"ipc://{tmp}/raw.sock"
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(endpoint)
    peer = subprocess.Popen([sys.executable, "-c", _ECHO_PEER, endpoint])
    ident, _ = router.recv_multipart()
    payload = b"x" * size
    out = []
    for _ in range(n):
        t = time.perf_counter()
        router.send_multipart([ident, payload])
        router.recv_multipart()
        out.append(time.perf_counter() - t)
    router.send_multipart([ident, b"stop"])
    peer.wait()
    router.close(0)
    ctx.term()
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def raw_zmq_messages_per_second(n: int, size: int) -> float:
    """One-way messages/s over a pyzmq ipc PUSH/PULL pair between two processes: M2's baseline."""
    tmp = tempfile.mkdtemp(prefix="thb-")
    endpoint = f"ipc://{tmp}/raw.sock"
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(endpoint)
    sender = f"import zmq,sys\ns=zmq.Context().socket(zmq.PUSH)\ns.connect(sys.argv[1])\n" \
             f"[s.send(b'x'*{size}) for _ in range({n})]\ns.close(linger=-1)"
    peer = subprocess.Popen([sys.executable, "-c", sender, endpoint])
    pull.recv()
    start = time.perf_counter()
    for _ in range(n - 1):
        pull.recv()
    rate = (n - 1) / (time.perf_counter() - start)
    peer.wait()
    pull.close(0)
    ctx.term()
    shutil.rmtree(tmp, ignore_errors=True)
    return rate


def raw_wasmtime_call(n: int, size: int) -> list[float]:
    import wasmtime
    from wasmtime import component as wc

    cfg = wasmtime.Config()
    cfg.consume_fuel = True
    cfg.epoch_interruption = True
    engine = wasmtime.Engine(cfg)
    comp = wc.Component(engine, (COMPONENTS / "echo.wat").read_text())
    linker = wc.Linker(engine)
    store = wasmtime.Store(engine)
    store.set_fuel(10**9)
    store.set_epoch_deadline(10**6)
    inst = linker.instantiate(store, comp)
    handle = inst.get_func(store, "handle")
    msg = "x" * size
    out = []
    for _ in range(n):
        t = time.perf_counter()
        handle(store, "", msg)
        handle.post_return(store)
        out.append(time.perf_counter() - t)
    return out


def verify_rate(n: int, openssl: bool = False) -> float:
    """Ed25519 verifies/s on one thread: libsodium, as the record path checks signatures (theater.ed25519),
    or OpenSSL (``cryptography``), which it used before."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from theater import ed25519

    key = Ed25519PrivateKey.generate()
    msg = b"x" * 200
    sig = key.sign(msg)
    pub = key.public_key()
    t = time.perf_counter()
    for _ in range(n):
        if openssl:
            pub.verify(sig, msg)
        else:
            ed25519.valid(pub, sig, msg)
    return n / (time.perf_counter() - t)


# --- theater ------------------------------------------------------------------------


class Running:
    def supervisor_pid(self) -> int:
        return int(self.home.pid_file.read_text())

    def __init__(self, *up: str) -> None:
        """``up``: more options for `theater up` (--listen …)."""
        self.root = Path(tempfile.mkdtemp(prefix="thb-"))
        self.home = Home(self.root / "h")
        subprocess.run([sys.executable, "-m", "supervisor", "--home", str(self.home.root), "up", "--detach", *up],
                       check=True, capture_output=True)
        self.client = Client(self.home, timeout=120)

    def manifest(self, name: str, component: str, restart: dict[str, int] | None = None, policy: str = "default",
                 capabilities: str = '["runtime"]', **limits: int) -> Path:
        path = self.root / f"{name}.toml"
        text = f'name = "{name}"\ncomponent = "{COMPONENTS / component}"\npolicy = "{policy}"\n'
        text += f"capabilities = {capabilities}\n"
        if limits:
            text += "[limits]\n" + "".join(f"{k} = {v}\n" for k, v in limits.items())
        if restart:
            text += "[restart]\n" + "".join(f"{k} = {v}\n" for k, v in restart.items())
        path.write_text(text)
        return path

    def close(self) -> None:
        try:
            self.client.down()
        finally:
            self.client.close()
            shutil.rmtree(self.root, ignore_errors=True)


IDLE_BEFORE_S = 0.1  # P1 and P5 start each spawn or kill from an idle supervisor: see spawn_to_first_reply


def spawn_to_first_reply(t: Running, n: int, component: str = "echo.wat", prefix: str = "spawn",
                         idle_before: float = IDLE_BEFORE_S, message: bytes | None = None,
                         ) -> tuple[list[float], dict[str, float]]:
    """P1 (and P1b): `spawn` (genesis, init committed) and one call, through the fork-server.

    Also where the time goes, from the records' own timestamps: request -> genesis
    (the supervisor signs it on the worker's hello: fork, worker start, hardening,
    key, connect), genesis -> init record (spec, artifact, instantiate, init call),
    init -> handle record (commit, spawn reply, the client's call). The first spawn,
    which compiles the component, is timed as ``"first spawn (compiles)"``.

    Each spawn starts ``idle_before`` seconds after the previous one ended, so the
    fork-server has its spare worker ready (it makes the next one 50 ms after
    handing one out); with ``idle_before=0`` spawns come back to back and most
    are forked on demand.
    """
    start = time.perf_counter()
    t.client.spawn(t.manifest(f"{prefix}-warm", component))  # compiles the artifact once
    first = time.perf_counter() - start
    t.client.stop(f"{prefix}-warm")
    out = []
    phases: dict[str, list[float]] = {"request -> hello": [], "hello -> init run": [], "init run -> first call run": []}
    for i in range(n):
        path = t.manifest(f"{prefix}{i}", component)
        time.sleep(idle_before)
        wall = time.time_ns()
        start = time.perf_counter()
        t.client.spawn(path)
        t.client.call(f"{prefix}{i}", message or (b"echo:hi" if component.endswith(".wasm") else b"hi"))
        out.append(time.perf_counter() - start)
        t.client.stop(f"{prefix}{i}")
        times = {r.kind: r.time_ns for r in _records(t, f"{prefix}{i}")}
        phases["request -> hello"].append((times[Kind.GENESIS] - wall) / 1e6)
        phases["hello -> init run"].append((times[Kind.INIT] - times[Kind.GENESIS]) / 1e6)
        phases["init run -> first call run"].append((times[Kind.HANDLE] - times[Kind.INIT]) / 1e6)
    summary = {k: statistics.median(v) for k, v in phases.items()}
    summary["first spawn (compiles)"] = first * 1000
    return out, summary


def tree_to_all_answering(t: Running, children: int, runs: int) -> tuple[list[float], list[float], list[float]]:
    """P1d: `spawn` of one manifest holding a one_for_one node of ``children`` WAT echo agents, until every
    child has answered a call (the spawn request answers once the node has started its children).

    Also the A/B the burst is held to: an agent already running is called in a loop from another client,
    alone for as long as a burst takes, then during a second burst. Returns (the bursts timed alone, the
    bystander's calls alone, its calls during the bursts)."""
    import threading

    t.client.spawn(t.manifest("bystander", "echo.wat"))
    calls: list[float] = []
    stop = threading.Event()

    def bystander() -> None:
        with Client(t.home, timeout=120) as c:
            while not stop.is_set():
                start = time.perf_counter()
                c.call("bystander", b"x" * 100)
                calls.append(time.perf_counter() - start)

    def burst(name: str) -> float:
        path = t.root / f"{name}.toml"
        text = f'name = "{name}"\nstrategy = "one_for_one"\n'
        for i in range(children):
            text += f'\n[[children]]\nname = "{name}c{i}"\ncomponent = "{COMPONENTS / "echo.wat"}"\npolicy = "default"\n'
        path.write_text(text)
        start = time.perf_counter()
        t.client.spawn(path)
        for i in range(children):
            t.client.call(f"{name}c{i}", b"hi")
        took = time.perf_counter() - start
        t.client.stop(name)
        return took

    out, idle, during = [], [], []
    for run in range(runs):
        out.append(burst(f"tree{run}"))
        stop.clear()
        thread = threading.Thread(target=bystander)
        thread.start()
        deadline = time.perf_counter() + out[-1]
        while time.perf_counter() < deadline:  # the bystander alone, as long as a burst takes
            time.sleep(0.01)
        idle += calls
        calls.clear()
        burst(f"tree{run}ab")
        during += calls
        stop.set()
        thread.join()
        calls.clear()
    t.client.stop("bystander")
    return out, idle, during


def round_trip_floor(n: int, zmq100: list[float], commit_ms: float) -> float:
    """P2's floor in ms: two raw ZeroMQ round trips (client <-> supervisor <-> worker), one durable commit,
    one Ed25519 sign and one verify of a 300-byte record, with the implementation the record path uses."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from theater import ed25519

    key = Ed25519PrivateKey.generate()
    public, message = key.public_key(), b"r" * 300
    signature = ed25519.sign(key, message)
    start = time.perf_counter()
    for _ in range(n):
        ed25519.sign(key, message)
    sign_ms = (time.perf_counter() - start) / n * 1000
    start = time.perf_counter()
    for _ in range(n):
        ed25519.valid(public, signature, message)
    verify_ms = (time.perf_counter() - start) / n * 1000
    return 2 * pct(zmq100, 50) * 1000 + commit_ms + sign_ms + verify_ms


def build_python_agent(t: Running) -> Path | None:
    """P1b's guest: examples/agents/py_echo built with componentize-py (None if it is not installed)."""
    componentize = Path(sys.executable).parent / "componentize-py"
    if not componentize.exists():
        return None
    wasm = t.root / "py_echo.wasm"
    subprocess.run([str(componentize), "-d", str(ROOT / "wit"), "-w", "agent", "componentize", "app", "-o", str(wasm)],
                   cwd=ROOT / "examples" / "agents" / "py_echo", check=True, capture_output=True)
    return wasm


def build_js_agent(t: Running) -> Path | None:
    """P1c's guest: examples/counter-js built with `theater build` (None without Node.js and npm)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return None
    from supervisor._authoring import build

    project = t.root / "counter-js"
    shutil.copytree(ROOT / "examples" / "counter-js", project)
    return build(project, lambda line: None)


def _records(t: Running, name: str) -> list[Record]:
    return t.client.events(name)


def call_round_trip(t: Running, n: int, size: int) -> tuple[list[float], dict[str, float]]:
    """P2, and its two halves from the handle record's own timestamp (signed in the worker):
    client -> supervisor -> worker -> guest call -> signed, then back -> verified -> committed -> reply."""
    name = f"echo{size}"
    t.client.spawn(t.manifest(name, "echo.wat"))
    payload = b"x" * size
    for _ in range(20):
        t.client.call(name, payload)
    out, walls = [], []
    for _ in range(n):
        wall = time.time_ns()
        start = time.perf_counter()
        t.client.call(name, payload)
        out.append(time.perf_counter() - start)
        walls.append((wall, time.time_ns()))
    handles = [r for r in _records(t, name) if r.kind is Kind.HANDLE][-n:]
    there = [(h.time_ns - w[0]) / 1e6 for h, w in zip(handles, walls, strict=True)]
    back = [(w[1] - h.time_ns) / 1e6 for h, w in zip(handles, walls, strict=True)]
    return out, {"to the worker, guest call, signed": statistics.median(there),
                 "back: verified, committed (fsync), replied": statistics.median(back)}


def agent_call_round_trip(t: Running, n: int) -> tuple[list[float], list[float]]:
    """M1: a client call whose handler makes one messaging call to another agent, beside the same client
    call that makes none: the difference is the agent -> agent call (route, deliver, run, commit, answer)."""
    for name in ("m1a", "m1b"):
        t.client.spawn(t.manifest(name, "messenger.wat", policy="messaging", capabilities='["runtime", "messaging"]'))
    with_call, without = [], []
    for _ in range(20):
        t.client.call("m1a", b"call:5000:m1b:state")
    for _ in range(n):
        start = time.perf_counter()
        t.client.call("m1a", b"call:5000:m1b:state")
        with_call.append(time.perf_counter() - start)
        start = time.perf_counter()
        t.client.call("m1a", b"state")
        without.append(time.perf_counter() - start)
    return with_call, without


def router_messages_per_second(t: Running, rounds: int, per_round: int = 500) -> float:
    """M2: messages/s from one agent to another through the supervisor: calls of ``per_round`` sends each
    (within the messaging policy's mailbox and host-call limits), timed until the target has committed
    every message (each a MESSAGE call with its own signed, stored record)."""
    for name in ("m2a", "m2b"):
        t.client.spawn(t.manifest(name, "messenger.wat", policy="messaging", capabilities='["runtime", "messaging"]'))
    head = len(_records(t, "m2b")) - 1
    start = time.perf_counter()
    for _ in range(rounds):
        want = head + per_round
        reply = t.client.call("m2a", f"sendn:{per_round}:m2b:state".encode())
        assert reply == b"ok", reply
        while head < want:
            head = t.client.wait_events("m2b", head, 10_000)
    return rounds * per_round / (time.perf_counter() - start)


def stored_records_per_second(t: Running, agents: int, per_agent: int,
                              component: str = "counter.wat") -> tuple[float, int]:
    """P3: every agent's mailbox filled by pipelined `send`s on one socket; records/s until all are stored.

    A counter.wat call yields two records (a log and the result), a chatty.wat call eleven."""
    names = [f"load-{component.split('.')[0]}{i}" for i in range(agents)]
    for name in names:
        t.client.spawn(t.manifest(name, component, mailbox=per_agent + 10))
    heads = {a["name"]: a["head"] for a in t.client.ps()}
    token = t.home.token.read_text().strip()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(t.home.control_endpoint)
    start = time.perf_counter()
    rid = answered = 0
    for _ in range(per_agent):
        for name in names:
            rid += 1
            body = {"op": "send", "id": rid, "token": token, "agent": name}
            sock.send_multipart([wire.header(wire.ClientType.REQUEST), wire.encode_json(body), b"m"])
            while rid - answered >= 500:  # a window: the control socket drops replies past its high-water mark
                sock.recv_multipart()
                answered += 1
    while answered < rid:
        sock.recv_multipart()
        answered += 1
    for name in names:
        t.client.call(name, b"m", timeout=120)
    elapsed = time.perf_counter() - start
    sock.close(0)
    after = {a["name"]: a["head"] for a in t.client.ps()}
    records = sum(after[n] - heads[n] for n in names)
    for name in names:
        t.client.stop(name)
    return records / elapsed, records


def verify_and_replay_rates(t: Running, agent: str) -> tuple[float, int, float, int]:
    """V1 and V2: `theater verify`'s records/s over the whole bench home, and a replay's records/s of one
    agent's chain (in this process, without the replay process's confinement: the re-execution itself)."""
    import json as _json

    from supervisor._audit import chain_records, verify_home
    from worker.replay import replay

    start = time.perf_counter()
    reports = verify_home(t.home)
    verified = sum(r.records for r in reports)
    verify_rate = verified / (time.perf_counter() - start)
    chain = chain_records(t.home, agent)
    config = _json.loads(chain[0].fields()["config"])
    config["component_sha256"] = chain[0].fields()["component_sha256"].hex()
    component = Path(config["component_path"]).read_bytes()
    start = time.perf_counter()
    report = replay(chain, component, config)
    assert report.ok, report
    return verify_rate, verified, len(chain) / (time.perf_counter() - start), len(chain)


def sqlite_commit_ms(t: Running, n: int, gap_s: float = 0.0) -> float:
    """One durable commit on the same disk as the event store, in the same settings, made ``gap_s`` after the
    one before. On a virtual disk a write that follows a pause waits much longer than one of a steady stream
    (here 0.07 ms back to back, 0.7-1.3 ms after a pause of 0.5-2 ms, measured): a call's commit follows the
    pause in which the worker ran it, so P2's floor is also given with the commit made after such a pause."""
    import sqlite3

    path = t.root / f"commit-probe-{gap_s}.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE r (raw BLOB)")
    times = []
    for _ in range(n):
        if gap_s:
            time.sleep(gap_s)
        start = time.perf_counter()
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO r VALUES (?)", (os.urandom(300),))
        db.execute("COMMIT")
        times.append(time.perf_counter() - start)
    db.close()
    return statistics.median(times) * 1000


def restart_to_reply(t: Running, n: int, idle_before: float = IDLE_BEFORE_S,
                     name: str = "restart") -> tuple[list[float], dict[str, float]]:
    """P5: SIGKILL an idle worker; time until its replacement has answered a call.

    Phases from the records: kill -> exit record (death seen on the pidfd), exit ->
    worker-key record (fork, worker start, hardening, hello). Each kill comes
    ``idle_before`` seconds after the previous restart was served (see
    spawn_to_first_reply).
    """
    t.client.spawn(t.manifest(name, "echo.wat", restart={"intensity": 1000, "period_ms": 1000}))
    t.client.call(name, b"x")
    out = []
    phases: dict[str, list[float]] = {"kill -> exit recorded": [], "exit -> new worker's hello": []}
    for _ in range(n):
        info = next(a for a in t.client.ps() if a["name"] == name)
        pid, head = info["pid"], info["head"]
        time.sleep(idle_before)
        wall = time.time_ns()
        start = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        # The call must reach the new worker, not the dying one: wait for the exit and worker-key records
        # (one request that the supervisor answers when the head moves; polling `ps` would load it with a
        # listing of every agent of the home).
        while head < info["head"] + 2:
            head = t.client.wait_events(name, head, 30_000)
        t.client.call(name, b"y")
        out.append(time.perf_counter() - start)
        records = _records(t, name)
        exit_ = next(r for r in reversed(records) if r.kind is Kind.EXIT)
        key = next(r for r in records if r.seq == exit_.seq + 1)
        phases["kill -> exit recorded"].append((exit_.time_ns - wall) / 1e6)
        phases["exit -> new worker's hello"].append((key.time_ns - exit_.time_ns) / 1e6)
    return out, {k: statistics.median(v) for k, v in phases.items()}


_RELAY = """
import sys, zmq
ctx = zmq.Context()
front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
front.bind(sys.argv[1])
back.connect(sys.argv[2])
poller = zmq.Poller()
poller.register(front, zmq.POLLIN)
poller.register(back, zmq.POLLIN)
while True:
    ready = dict(poller.poll())
    if front in ready:
        back.send_multipart(front.recv_multipart())
    if back in ready:
        front.send_multipart(back.recv_multipart())
"""
_ROUTER_ECHO = """
import sys, zmq
s = zmq.Context().socket(zmq.ROUTER)
s.bind(sys.argv[1])
while True:
    s.send_multipart(s.recv_multipart())
"""


class RawRelayPath:
    """The bare shape of a call without Theater: a client -> a relay process -> an echo process and back, over
    pyzmq ipc, four one-way hops as a call makes. R1's floor: how the same storm slows bare IPC."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="thb-")
        front, back = f"ipc://{self.tmp}/front", f"ipc://{self.tmp}/back"
        self.procs = [subprocess.Popen([sys.executable, "-c", _ROUTER_ECHO, back]),
                      subprocess.Popen([sys.executable, "-c", _RELAY, front, back])]
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(front)
        for _ in range(200):
            self.round_trip()

    def round_trip(self) -> float:
        start = time.perf_counter()
        self.sock.send(b"x" * 100)
        self.sock.recv()
        return time.perf_counter() - start

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        self.sock.close(0)
        self.ctx.term()
        shutil.rmtree(self.tmp, ignore_errors=True)


def crash_storm(t: Running, victims: int, n: int, storms: int = 3) -> dict[str, list[float]]:
    """R1: a healthy agent's call latency, idle and while ``victims`` workers, each in the middle of a call,
    are SIGKILLed at once and restarted; and the same for a bare relay path (``RawRelayPath``), storms taking
    turns. Returns round trips by "idle", "storm", "raw idle", "raw storm"."""
    t.client.spawn(t.manifest("healthy", "echo.wat"))
    names = [f"victim{i}" for i in range(victims)]
    for name in names:
        t.client.spawn(t.manifest(name, "spin.wat", restart={"intensity": 1000, "period_ms": 1000}))
    raw = RawRelayPath()

    def call() -> float:
        start = time.perf_counter()
        t.client.call("healthy", b"x")
        return time.perf_counter() - start

    try:
        for _ in range(20):
            call()
        out: dict[str, list[float]] = {"idle": [call() for _ in range(n)],
                                       "raw idle": [raw.round_trip() for _ in range(n)], "storm": [], "raw storm": []}
        for i in range(2 * storms):
            probe, into = (call, out["storm"]) if i % 2 == 0 else (raw.round_trip, out["raw storm"])
            for name in names:  # every victim busy in a call, so its end waits for a last frame that never comes
                t.client.send(name, b"go")
            deadline = time.monotonic() + 30
            while any(a["mailbox"] for a in t.client.ps() if a["name"] in names):
                if time.monotonic() > deadline:
                    raise RuntimeError("the victims did not take their calls")
            pids = [a["pid"] for a in t.client.ps() if a["name"] in names and a["pid"]]
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            end = time.monotonic() + 0.5  # round trips across the storm: the kills, the exits, the restarts
            while time.monotonic() < end:
                into.append(probe())
            deadline = time.monotonic() + 30
            while not all(a["status"] == "running" and a["pid"] not in pids
                          for a in t.client.ps() if a["name"] in names):
                if time.monotonic() > deadline:
                    raise RuntimeError("the victims did not come back")
        return out
    finally:
        raw.close()


_FLOOD = """
import sys
from pathlib import Path
from theater.client import Client, ClientError
from theater.remote import Credentials
with Client(credentials=Credentials.load(Path(sys.argv[1])), timeout=30) as c:
    while True:
        try:
            c.send("echo", b"flood")
        except ClientError:
            pass
"""


def tenant_flood(n: int, flooders: int = 2, quota: int = 200) -> tuple[list[float], list[float], int]:
    """T1: tenant B's call round trips over TCP, idle and while tenant A's clients flood A's agent with sends
    (A's calls_per_second quota is ``quota``). Returns (idle, during the flood, A's requests refused)."""
    from theater.remote import Credentials, keypair

    t = Running("--listen", "tcp://127.0.0.1:0")
    flood: list[subprocess.Popen[bytes]] = []
    try:
        creds = {}
        for name, quotas in (("a", {"calls_per_second": quota}), ("b", {})):
            public, secret = keypair()
            info = t.client.tenant_add(name, public, policies=["default"], quotas=quotas)
            creds[name] = Credentials(info["endpoint"], info["server_key"], name, public, secret)
            (t.root / f"{name}.key").write_bytes(creds[name].dump())
        with Client(credentials=creds["a"], timeout=60) as a:
            a.spawn(t.manifest("echo", "echo.wat"))
        with Client(credentials=creds["b"], timeout=60) as b:
            b.spawn(t.manifest("echo", "echo.wat"))
            for _ in range(50):
                b.call("echo", b"x")
            idle = []
            for _ in range(n):
                start = time.perf_counter()
                b.call("echo", b"x")
                idle.append(time.perf_counter() - start)
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            flood = [subprocess.Popen([sys.executable, "-c", _FLOOD, str(t.root / "a.key")], env=env)
                     for _ in range(flooders)]
            deadline = time.monotonic() + 30
            while t.client.tenants()["tenants"][0]["denials"] < 100:  # the flood is on, and past its quota
                if time.monotonic() > deadline:
                    raise RuntimeError("tenant a's flood never reached its quota")
            during = []
            for _ in range(n):
                start = time.perf_counter()
                b.call("echo", b"x")
                during.append(time.perf_counter() - start)
        refused = int(t.client.tenants()["tenants"][0]["denials"])
        return idle, during, refused
    finally:
        for p in flood:
            p.kill()
            p.wait()
        t.close()


# `ps` answers timed in P6: enough that the p99 is not simply the slowest one (the first, which finds the
# supervisor's memory cold).
PS_SAMPLES = 200


def idle_pss(t: Running, n: int) -> dict[str, float]:
    """P6: PSS (MiB) of ``n`` idle echo workers, mean per worker, and of the fork-server; with all of them
    running, the supervisor's own PSS and how it answers: `ps` (ms, p50 and p99 of PS_SAMPLES) and calls to one of
    them (ms, p50 and p99 of 500)."""
    names = [f"idle{i}" for i in range(n)]
    for name in names:
        t.client.spawn(t.manifest(name, "echo.wat"))
        t.client.call(name, b"warm")
    pids = [a["pid"] for a in t.client.ps() if a["name"] in names]
    pss = [_pss(pid) for pid in pids]
    zygote = [p for p in psutil.Process(t.supervisor_pid()).children() if p.name() == "theater-zygote"]
    ps_ms, call_ms = [], []
    listed = 0
    for _ in range(PS_SAMPLES):
        start = time.perf_counter()
        listed = len(t.client.ps())
        ps_ms.append(time.perf_counter() - start)
    for _ in range(500):
        start = time.perf_counter()
        t.client.call(names[n // 2], b"x" * 100)
        call_ms.append(time.perf_counter() - start)
    out = {"pss": statistics.mean(pss), "zygote pss": _pss(zygote[0].pid) if zygote else float("nan"),
           "supervisor pss": _pss(t.supervisor_pid()), "ps p50": pct(ps_ms, 50) * 1000,
           "ps p99": pct(ps_ms, 99) * 1000, "listed": float(listed),
           "call p50": pct(call_ms, 50) * 1000, "call p99": pct(call_ms, 99) * 1000}
    for name in names:
        t.client.stop(name)
    return out


def _pss(pid: int) -> float:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# --- in-process: the worker's own code, without the process around it ----------------------------


def _limits(**override: int) -> Limits:
    import tomllib

    base = tomllib.loads((ROOT / "policies" / "default.toml").read_text())["limits"]
    return Limits(**{**base, **override})


def payload_round_trips(n: int) -> dict[str, list[float]]:
    """P7: guest<->host echo inside a worker's Sandbox (fast path), and the stock generic call."""
    from worker._boundary import from_guest_utf8, to_guest
    from worker._engine import Sandbox, make_engine, tune_malloc

    tune_malloc()  # as the fork-server sets it for every worker it forks
    limits = _limits()
    sandbox = Sandbox(make_engine(limits), (COMPONENTS / "echo.wat").read_bytes(), limits, {})
    cap = limits.max_message_bytes
    cases = {
        "0 B": b"", "100 B": b"x" * 100, "1 MB ascii": b"x" * 1_000_000,
        "1 MB all byte values": bytes(range(256)) * 3906 + bytes(64), f"max {cap} B": b"y" * cap,
    }
    out: dict[str, list[float]] = {}
    for label, data in cases.items():
        reps = n if len(data) < 10_000 else max(20, n // 50)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            lifted, _ = sandbox.call_agent("handle", b"", data)
            from_guest_utf8(lifted.reply, "reply", cap)
            times.append(time.perf_counter() - start)
        out[label] = times
        gen = []
        for _ in range(reps):
            start = time.perf_counter()
            result, _ = sandbox.call("handle", "", to_guest(data))
            result.reply.encode("latin-1")
            gen.append(time.perf_counter() - start)
        out[label + " generic"] = gen
    # Why every byte value is slower (docs/performance.md, P7): the same call with ASCII of the UTF-8 size the
    # bytes take as latin-1 text (2 bytes per byte >= 0x80) is wasmtime's share; CPython's codecs do the rest.
    every = cases["1 MB all byte values"]
    utf8 = every.decode("latin-1").encode("utf-8")
    same_size = b"z" * len(utf8)
    reps = max(20, n // 50)
    floors: dict[str, list[float]] = {"wasmtime": [], "transcoding": [], "memmove": []}
    buffer = ctypes.create_string_buffer(len(every))
    for _ in range(reps):
        start = time.perf_counter()
        sandbox.call_agent("handle", b"", same_size)
        floors["wasmtime"].append(time.perf_counter() - start)
        start = time.perf_counter()
        every.decode("latin-1").encode("utf-8").decode("utf-8").encode("latin-1")
        floors["transcoding"].append(time.perf_counter() - start)
        start = time.perf_counter()
        ctypes.memmove(buffer, every, len(every))
        floors["memmove"].append(time.perf_counter() - start)
    out.update({f"floor {k}": v for k, v in floors.items()})
    return out


def runaway_overshoot(n: int) -> tuple[list[float], int, int]:
    """P4: a spinning guest under a 50 ms deadline: ms past the deadline; a memory bomb's pages at the cap."""
    from worker._engine import Sandbox, make_engine
    from worker._errors import CallFailed

    deadline_ms = 50
    limits = _limits(wall_time_ms=deadline_ms, fuel_per_call=10**12)
    spin = Sandbox(make_engine(limits), (COMPONENTS / "spin.wat").read_bytes(), limits, {})
    over = []
    for _ in range(n):
        spin.call_agent("init", b"", b"")  # a fresh instance (the last call trapped) before the clock starts
        start = time.perf_counter()
        try:
            spin.call_agent("handle", b"", b"")
        except CallFailed as exc:
            assert exc.status == "deadline", exc
        over.append((time.perf_counter() - start) * 1000 - deadline_ms)
    bomb_limits = _limits(memory_bytes=4 * 1024 * 1024)
    bomb = Sandbox(make_engine(bomb_limits), (COMPONENTS / "memory_bomb.wat").read_bytes(), bomb_limits, {})
    lifted, _ = bomb.call_agent("handle", b"", b"")
    pages = int((lifted.error or "0").split()[-2]) if lifted.error else -1
    return over, pages, bomb_limits.memory_bytes // 65536


def raw_verify_rate_parallel(n: int, threads: int) -> float:
    from concurrent.futures import ThreadPoolExecutor

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    msg = b"x" * 200
    sig = key.sign(msg)
    pub = key.public_key()

    from theater import ed25519

    def chunk(k: int) -> None:
        for _ in range(k):
            ed25519.valid(pub, sig, msg)

    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        list(pool.map(chunk, [n // threads] * threads))
        return n / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--peers", action="store_true", help="also install and measure Circus, supervisord and Extism")
    parser.add_argument("--idle", type=int, default=0, help="idle agents for P6 (default 200, 30 with --quick)")
    parser.add_argument("--no-hardening", action="store_true", help="skip the spawn cost of each hardening layer")
    args = parser.parse_args()
    q = args.quick
    rows: list[dict[str, object]] = []

    def row(key: str, what: str, ours: float, base: float, base_what: str, unit: str, target: str,
            higher_better: bool = False) -> None:
        ratio = ours / base if base else float("nan")
        rows.append({"key": key, "what": what, "ours": ours, "baseline": base, "baseline_what": base_what,
                     "unit": unit, "ratio": ratio, "higher_is_better": higher_better, "target": target})

    interp = fresh_interpreter(5 if q else 15)
    zmq100 = raw_zmq_round_trip(500 if q else 3000, 100)
    zmq_rate = raw_zmq_messages_per_second(20000 if q else 200000, 100)
    wt100 = raw_wasmtime_call(500 if q else 3000, 100)
    vrate = verify_rate(2000 if q else 10000)
    vrate_openssl = verify_rate(2000 if q else 10000, openssl=True)
    vrate2 = raw_verify_rate_parallel(4000 if q else 20000, 2)
    p7 = payload_round_trips(300 if q else 2000)
    over, pages, cap_pages = runaway_overshoot(5 if q else 20)

    t = Running()
    try:
        spawn, spawn_phases = spawn_to_first_reply(t, 5 if q else 15)
        py_wasm = build_python_agent(t)
        py_spawn, py_phases = spawn_to_first_reply(t, 5 if q else 15, str(py_wasm), "pyspawn") if py_wasm else ([], {})
        js_wasm = build_js_agent(t)
        js_spawn, js_phases = spawn_to_first_reply(t, 5 if q else 15, str(js_wasm), "jsspawn",
                                                     message=b"get") if js_wasm else ([], {})
        rt100, rt_phases = call_round_trip(t, 300 if q else 2000, 100)
        commit_ms = sqlite_commit_ms(t, 200 if q else 1000)
        floor_ms = round_trip_floor(2000, zmq100, commit_ms)
        # A call's commit comes after the loop waited on the worker: the round trip's own first half, p50.
        gap_commit_ms = sqlite_commit_ms(t, 100 if q else 500, gap_s=rt_phases["to the worker, guest call, signed"] / 1000)
        gap_floor_ms = floor_ms - commit_ms + gap_commit_ms
        restart, restart_phases = restart_to_reply(t, 5 if q else 15)
        tree, bystander_idle, bystander_burst = tree_to_all_answering(t, 100, 2 if q else 4)
        spawn_b2b, _ = spawn_to_first_reply(t, 5 if q else 15, prefix="b2b", idle_before=0.0)
        restart_b2b, _ = restart_to_reply(t, 5 if q else 15, idle_before=0.0, name="restart-b2b")
        rate, records = stored_records_per_second(t, 10, 50 if q else 300)
        chatty_rate, chatty_records = stored_records_per_second(t, 10, 10 if q else 60, "chatty.wat")
        v_rate, v_records, r_rate, r_records = verify_and_replay_rates(t, "load-counter0")
        storm_runs = crash_storm(t, 20, 200 if q else 1000)
        m1, m1_without = agent_call_round_trip(t, 300 if q else 2000)
        m2 = router_messages_per_second(t, 2 if q else 10)
        idle_n = args.idle or (30 if q else 200)
        idle = idle_pss(t, idle_n)
    finally:
        t.close()
    tenant_idle, tenant_flooded, tenant_refused = tenant_flood(300 if q else 2000)

    ms, us = 1000.0, 1e6
    row("P1", "spawn -> first reply (WAT echo), p50", statistics.median(spawn) * ms, statistics.median(interp) * ms,
        "fresh interpreter + import zmq, wasmtime", "ms", "<= 5 ms")
    first_spawn = spawn_phases.pop("first spawn (compiles)")
    for phase, value in spawn_phases.items():
        row("P1", f"  {phase}, p50", value, statistics.median(spawn) * ms, "P1 total", "ms", "-")
    row("P1", "  spawns back to back (most forked on demand, no spare ready), p50", statistics.median(spawn_b2b) * ms,
        statistics.median(spawn) * ms, "P1 total", "ms", "-")
    row("P1", "  (first spawn of the WAT echo, compiling it)", first_spawn, statistics.median(spawn) * ms, "P1 total",
        "ms", "-")
    if py_spawn:
        py_first = py_phases.pop("first spawn (compiles)")
        row("P1b", "spawn -> first reply (Python echo, componentize-py), cached artifact, p50",
            statistics.median(py_spawn) * ms, py_first, "its first spawn, compiling the 18 MB component", "ms", "<= 15 ms")
        for phase, value in py_phases.items():
            row("P1b", f"  {phase}, p50", value, statistics.median(py_spawn) * ms, "P1b total", "ms", "-")
    else:
        print("P1b skipped: componentize-py is not installed (scripts/setup installs it)", file=sys.stderr)
    if js_spawn:
        js_first = js_phases.pop("first spawn (compiles)")
        row("P1c", "spawn -> first reply (JavaScript counter, componentize-js), cached artifact, p50",
            statistics.median(js_spawn) * ms, js_first, "its first spawn, compiling the 12 MB component", "ms", "-")
        row("P1c", "  the same against P1b (Python)", statistics.median(js_spawn) * ms,
            statistics.median(py_spawn) * ms if py_spawn else float("nan"), "P1b p50", "ms", "-")
        for phase, value in js_phases.items():
            row("P1c", f"  {phase}, p50", value, statistics.median(js_spawn) * ms, "P1c total", "ms", "-")
    else:
        print("P1c skipped: JavaScript agents need Node.js and npm", file=sys.stderr)
    row("P1d", "tree of 100 WAT echo agents, one manifest: spawn -> all have answered, p50",
        statistics.median(tree) * ms, statistics.median(spawn) * ms * 100, "100 x P1 (one at a time)", "ms", "<= 1000 ms")
    row("P1d", "  a running agent's call during the bursts, p50", pct(bystander_burst, 50) * ms,
        pct(bystander_idle, 50) * ms, "the same agent's calls just before, p50", "ms", "a few %")
    row("P1d", "  the same, p99", pct(bystander_burst, 99) * ms, pct(bystander_idle, 99) * ms,
        "the same agent's calls just before, p99", "ms", "-")
    row("P2", "call round trip 100 B, p50", pct(rt100, 50) * ms, floor_ms,
        "floor: 2 raw zmq round trips + commit + sign + verify", "ms", "<= 1.25x baseline")
    row("P2", "  the same against one raw pyzmq round trip", pct(rt100, 50) * ms, pct(zmq100, 50) * ms,
        "raw pyzmq ipc round trip 100 B", "ms", "-")
    for phase, value in rt_phases.items():
        row("P2", f"  {phase}, p50", value, pct(rt100, 50) * ms, "P2 total", "ms", "-")
    row("P2", "  one durable SQLite commit (WAL, synchronous=FULL), back to back, p50", commit_ms, pct(rt100, 50) * ms,
        "P2 total", "ms", "-")
    row("P2", "  the same commit after a pause as long as the call's way to the worker, p50", gap_commit_ms,
        commit_ms, "the commit back to back", "ms", "-")
    row("P2", "  call round trip 100 B, p50, against the floor with that commit", pct(rt100, 50) * ms, gap_floor_ms,
        "floor: 2 raw zmq round trips + commit after a pause + sign + verify", "ms", "<= 1.25x baseline")
    row("P2", "call round trip 100 B, p99", pct(rt100, 99) * ms, pct(zmq100, 99) * ms, "raw pyzmq ipc round trip 100 B",
        "ms", "-")
    row("P3", f"verified + durably stored records/s (10 agents, 2 per call, {records} records)", rate, vrate,
        "Ed25519 verifies/s, libsodium, one thread", "rec/s", ">= 10,000/s", True)
    row("P3", f"  the same, 11 records per call (chatty.wat, {chatty_records} records)", chatty_rate, vrate,
        "Ed25519 verifies/s, libsodium, one thread", "rec/s", "-", True)
    row("V1", f"theater verify: records/s over the whole home ({v_records} records)", v_rate, rate,
        "P3: records/s stored live", "rec/s", "-", higher_better=True)
    row("V2", f"replay: records/s re-executed and compared ({r_records} records, counter.wat)", r_rate, rate,
        "P3: records/s stored live", "rec/s", "-", higher_better=True)
    row("P3", "  (Ed25519 verifies/s, two threads, same run)", vrate2, vrate, "Ed25519 verifies/s, one thread",
        "rec/s", "-", True)
    row("P3", "  (Ed25519 verifies/s, OpenSSL, one thread)", vrate_openssl, vrate,
        "Ed25519 verifies/s, libsodium, one thread", "rec/s", "-", True)
    row("P4", f"runaway guest: past its 50 ms deadline, p50 (max {max(over):.2f})", statistics.median(over),
        50.0, "the deadline", "ms", "<= 2 ms past")
    row("P4", f"memory bomb: pages reached / cap {cap_pages}", float(pages), float(cap_pages), "cap (pages)", "pages",
        "= cap")
    row("P5", "worker SIGKILL -> replacement answers a call, p50", statistics.median(restart) * ms,
        statistics.median(interp) * ms, "fresh interpreter + import zmq, wasmtime", "ms", "<= 10 ms")
    for phase, value in restart_phases.items():
        row("P5", f"  {phase}, p50", value, statistics.median(restart) * ms, "P5 total", "ms", "-")
    row("P5", "  restarts back to back (most forked on demand, no spare ready), p50",
        statistics.median(restart_b2b) * ms, statistics.median(restart) * ms, "P5 total", "ms", "-")
    storm, storm_idle = storm_runs["storm"], storm_runs["idle"]
    raw_storm, raw_idle = storm_runs["raw storm"], storm_runs["raw idle"]
    row("R1", "crash storm: healthy agent's call p99 while 20 busy workers are killed", pct(storm, 99) * ms,
        pct(storm_idle, 99) * ms, "the same agent's idle p99", "ms", "<= 3x baseline")
    row("R1", "  the same, p50", pct(storm, 50) * ms, pct(storm_idle, 50) * ms, "the same agent's idle p50", "ms", "-")
    row("R1", "  floor: bare 4-hop pyzmq relay path's p99 in the same storms", pct(raw_storm, 99) * ms,
        pct(raw_idle, 99) * ms, "its idle p99", "ms", "-")
    row("T1", f"tenant B's call p99 over TCP while tenant A floods ({tenant_refused} of A's sends refused)",
        pct(tenant_flooded, 99) * ms, pct(tenant_idle, 99) * ms, "B's idle p99, same run", "ms", "bounded")
    row("T1", "  the same, p50", pct(tenant_flooded, 50) * ms, pct(tenant_idle, 50) * ms, "B's idle p50", "ms", "-")
    hop50 = (pct(m1, 50) - pct(m1_without, 50)) * ms
    hop99 = (pct(m1, 99) - pct(m1_without, 99)) * ms
    row("M1", "agent -> agent call round trip (the call's share of a client call), p50", hop50,
        pct(zmq100, 50) * ms, "raw pyzmq ipc round trip 100 B", "ms", "-")
    row("M1", "agent -> agent call round trip (the call's share of a client call), p99", hop99,
        pct(zmq100, 99) * ms, "raw pyzmq ipc round trip 100 B", "ms", "-")
    row("M1", "  client -> a -> b -> a -> client, p50", pct(m1, 50) * ms, pct(m1_without, 50) * ms,
        "client -> a -> client, same run", "ms", "-")
    row("M2", "messages/s through the router, each delivered, run, signed, stored", m2, zmq_rate,
        "raw pyzmq ipc one-way messages/s, 100 B", "msg/s", "-", higher_better=True)
    row("P6", f"idle agent PSS, mean of {idle_n} running at once", idle["pss"], idle["zygote pss"],
        "the fork-server's own PSS", "MiB", "<= 4 MiB (3,000)")
    row("P6", f"  the supervisor's own PSS with {idle_n} agents", idle["supervisor pss"], idle["pss"],
        "one idle agent's PSS", "MiB", "-")
    row("P6", f"  a call's round trip with {idle_n} agents running, p99", idle["call p99"], idle["call p50"],
        "its p50", "ms", "<= 5 ms")
    row("P6", f"  `ps` with {idle_n} agents running (it lists all {idle['listed']:.0f} of the home), p99", idle["ps p99"],
        idle["ps p50"], "its p50", "ms", "<= 5 ms")
    for label in [k for k in p7 if not k.endswith(" generic") and not k.startswith("floor ")]:
        row("P7", f"guest<->host echo {label}, p50", pct(p7[label], 50) * us, pct(p7[label + ' generic'], 50) * us,
            "wasmtime-py generic call, same payload", "us",
            {"100 B": "<= 30 us", "1 MB ascii": "<= 1000 us", "1 MB all byte values": "<= 1000 us"}.get(label, "-"))
    memmove = pct(p7["floor memmove"], 50) * us
    row("P7", "  1 MB all byte values: wasmtime's share (ASCII echo of the same 2 MB of UTF-8), p50",
        pct(p7["floor wasmtime"], 50) * us, memmove, "memmove of 1 MB", "us", "-")
    row("P7", "  1 MB all byte values: CPython's latin-1 <-> UTF-8 codecs, both ways, p50",
        pct(p7["floor transcoding"], 50) * us, memmove, "memmove of 1 MB", "us", "-")
    row("-", "in-worker share: raw wasmtime echo call 100 B, p50", pct(wt100, 50) * ms, pct(zmq100, 50) * ms,
        "raw pyzmq ipc round trip 100 B", "ms", "-")
    if not args.no_hardening:
        from bench_hardening import bench as hardening_bench  # scripts/bench_hardening.py

        table = hardening_bench(3 if q else 10)["variants"]
        none = table["none"]["median_ms"]
        for name, r in table.items():
            row("H", f"spawn with hardening: {name} (uid {os.geteuid()})", r["median_ms"], none,
                "spawn with no hardening layer", "ms", "-")
    if args.peers:
        from peers import measure_peers  # scripts/peers.py

        rows.extend(measure_peers(q, statistics.median(restart) * ms, pct(p7["100 B"], 50) * us,
                                  pct(p7["1 MB ascii"], 50) * us))

    if args.json:
        print(json.dumps({"machine": machine(), "rows": rows}, indent=2))
        return 0
    print(f"machine: {machine()}")
    print(f"{'':3} {'measure':<66} {'ours':>10} {'baseline':>10} {'ratio':>8}  {'target':<14} baseline")
    for r in rows:
        print(f"{r['key']:3} {r['what']:<66} {r['ours']:>10.3f} {r['baseline']:>10.3f} {r['ratio']:>7.2f}x  "
              f"{r['target']:<14} {r['baseline_what']} ({r['unit']})")
    return 0


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cpu, Python {platform.python_version()}, {platform.platform()}"


if __name__ == "__main__":
    sys.exit(main())
