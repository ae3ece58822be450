"""Theater benchmarks: each figure beside a baseline measured in the same run, as a ratio.

Run through ``scripts/bench``. Prints a table; ``--json`` for machines.
Targets are read from this table, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = ROOT / "tests" / "components"
sys.path.insert(0, str(ROOT))

from theater.client import Client  # noqa: E402
from theater.home import Home  # noqa: E402


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


def verify_rate(n: int) -> float:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    msg = b"x" * 200
    sig = key.sign(msg)
    pub = key.public_key()
    t = time.perf_counter()
    for _ in range(n):
        pub.verify(sig, msg)
    return n / (time.perf_counter() - t)


# --- theater ------------------------------------------------------------------------


class Running:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="thb-"))
        self.home = Home(self.root / "h")
        subprocess.run([sys.executable, "-m", "supervisor", "--home", str(self.home.root), "up", "--detach"], check=True, capture_output=True)
        self.client = Client(self.home, timeout=120)

    def manifest(self, name: str, component: str, **limits: int) -> Path:
        path = self.root / f"{name}.toml"
        text = f'name = "{name}"\ncomponent = "{COMPONENTS / component}"\n'
        if limits:
            text += "[limits]\n" + "".join(f"{k} = {v}\n" for k, v in limits.items())
        path.write_text(text)
        return path

    def close(self) -> None:
        try:
            self.client.down()
        finally:
            self.client.close()
            shutil.rmtree(self.root, ignore_errors=True)


def spawn_to_first_reply(t: Running, n: int) -> list[float]:
    out = []
    for i in range(n):
        path = t.manifest(f"spawn{i}", "echo.wat")
        start = time.perf_counter()
        t.client.spawn(path)
        t.client.call(f"spawn{i}", b"hi")
        out.append(time.perf_counter() - start)
        t.client.stop(f"spawn{i}")
    return out


def call_round_trip(t: Running, n: int, size: int) -> list[float]:
    name = f"echo{size}"
    t.client.spawn(t.manifest(name, "echo.wat"))
    payload = b"x" * size
    for _ in range(20):
        t.client.call(name, payload)
    out = []
    for _ in range(n):
        start = time.perf_counter()
        t.client.call(name, payload)
        out.append(time.perf_counter() - start)
    return out


def stored_records_per_second(t: Running, agents: int, per_agent: int) -> tuple[float, int]:
    names = [f"load{i}" for i in range(agents)]
    for name in names:
        t.client.spawn(t.manifest(name, "counter.wat", mailbox=per_agent + 10))
    heads = {a["name"]: a["head"] for a in t.client.ps()}
    start = time.perf_counter()
    for _ in range(per_agent):
        for name in names:
            t.client.send(name, b"m")
    for name in names:
        t.client.call(name, b"m", timeout=120)
    elapsed = time.perf_counter() - start
    after = {a["name"]: a["head"] for a in t.client.ps()}
    records = sum(after[n] - heads[n] for n in names)
    return records / elapsed, records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    q = args.quick
    rows: list[dict[str, object]] = []

    def row(what: str, ours: float, base: float, base_what: str, unit: str, higher_better: bool = False) -> None:
        ratio = ours / base if base else float("nan")
        rows.append({"what": what, "ours": ours, "baseline": base, "baseline_what": base_what, "unit": unit,
                     "ratio": ratio, "higher_is_better": higher_better})

    interp = fresh_interpreter(5 if q else 15)
    zmq100 = raw_zmq_round_trip(500 if q else 3000, 100)
    wt100 = raw_wasmtime_call(500 if q else 3000, 100)
    vrate = verify_rate(2000 if q else 10000)

    t = Running()
    try:
        spawn = spawn_to_first_reply(t, 5 if q else 15)
        rt100 = call_round_trip(t, 300 if q else 2000, 100)
        rate, records = stored_records_per_second(t, 10, 50 if q else 300)
    finally:
        t.close()

    ms = 1000.0
    row("spawn -> first reply, p50", statistics.median(spawn) * ms, statistics.median(interp) * ms, "fresh interpreter + import zmq, wasmtime", "ms")
    row("call round trip 100 B, p50", pct(rt100, 50) * ms, pct(zmq100, 50) * ms, "raw pyzmq ipc round trip 100 B", "ms")
    row("call round trip 100 B, p99", pct(rt100, 99) * ms, pct(zmq100, 99) * ms, "raw pyzmq ipc round trip 100 B", "ms")
    row("in-worker share: raw wasmtime echo call 100 B, p50", pct(wt100, 50) * ms, pct(zmq100, 50) * ms, "raw pyzmq ipc round trip 100 B", "ms")
    row(f"verified + durably stored records/s (10 agents, {records} records)", rate, vrate, "Ed25519 verifies/s, one core", "rec/s", True)

    if args.json:
        print(json.dumps({"machine": machine(), "rows": rows}, indent=2))
        return 0
    print(f"machine: {machine()}")
    print(f"{'measure':<62} {'ours':>10} {'baseline':>10} {'ratio':>7}  baseline")
    for r in rows:
        print(f"{r['what']:<62} {r['ours']:>10.3f} {r['baseline']:>10.3f} {r['ratio']:>6.2f}x  {r['baseline_what']} ({r['unit']})")
    return 0


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cpu, Python {platform.python_version()}, {platform.platform()}"


if __name__ == "__main__":
    sys.exit(main())
