"""Chaos soak: many agents, concurrent clients, random worker kills, one supervisor kill mid-traffic.

Run through ``scripts/soak`` (defaults: 100 agents, 100,000 messages); the test
suite runs it small. Afterwards it checks, and prints:

- every reply a client received is in the agent's chain (0 acknowledged-but-lost);
- every chain verifies;
- every agent (all permanent) is running;
- no worker or fork-server of the home is left once the supervisor is down;
- the supervisor's RSS after warm-up, and, within the restarted process, after its warm-up, after each
  quarter of its traffic, and at the end.

Exit status 0 only if every check holds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from supervisor._audit import chain_records, verify_home  # noqa: E402
from theater.client import Client, ClientError, NotRunning  # noqa: E402
from theater.home import Home  # noqa: E402
from theater.records import Kind  # noqa: E402

COMPONENTS = ROOT / "tests" / "components"


def up(home: Home) -> None:
    subprocess.run([sys.executable, "-m", "supervisor", "--home", str(home.root), "up", "--detach"], check=True,
                   capture_output=True, timeout=120)


def build_python_echo(root: Path) -> Path:
    """examples/agents/py_echo built with componentize-py (scripts/setup installs it)."""
    wasm = root / "py_echo.wasm"
    componentize = Path(sys.executable).parent / "componentize-py"
    subprocess.run([str(componentize), "-d", str(ROOT / "wit"), "-w", "agent", "componentize", "app", "-o", str(wasm)],
                   cwd=ROOT / "examples" / "agents" / "py_echo", check=True, capture_output=True, timeout=600)
    return wasm


def rss_mib(home: Home) -> float:
    return psutil.Process(int(home.pid_file.read_text())).memory_info().rss / 2**20


class Traffic:
    """Clients that call random agents with unique messages and remember every reply they got."""

    def __init__(self, home: Home, names: list[str], seed: int) -> None:
        self.home, self.names = home, names
        self.acked: dict[str, dict[bytes, bytes]] = {n: {} for n in names}
        self.errors = 0
        self.sent = 0
        self.lock = threading.Lock()
        self.rng = random.Random(seed)

    def run(self, count: int, clients: int) -> None:
        def client(index: int, n: int) -> None:
            rng = random.Random(self.rng.random())
            c = None
            for i in range(n):
                name = rng.choice(self.names)
                message = f"{name}:{index}:{i}:{rng.random()}".encode()
                try:
                    if c is None:
                        c = Client(self.home, timeout=15)
                    reply = c.call(name, message, timeout=10)
                except (ClientError, NotRunning):
                    with self.lock:
                        self.errors += 1
                    if c is not None:
                        c.close()
                        c = None
                    continue
                with self.lock:
                    self.sent += 1
                    self.acked[name][message] = reply or b""
            if c is not None:
                c.close()

        threads = [threading.Thread(target=client, args=(i, count // clients)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def killer(home: Home, names: list[str], stop: threading.Event, every_s: float, seed: int) -> list[int]:
    """Kill a random agent's worker every ``every_s`` seconds until ``stop``."""
    rng = random.Random(seed)
    killed: list[int] = []
    while not stop.wait(every_s):
        try:
            with Client(home, timeout=5) as c:
                running = [a for a in c.ps() if a["pid"] and a["name"] in names]
        except (ClientError, NotRunning):
            continue
        if running:
            victim = rng.choice(running)
            try:
                os.kill(victim["pid"], signal.SIGKILL)
                killed.append(victim["pid"])
            except ProcessLookupError:
                pass
    return killed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--kill-every", type=float, default=0.2, help="seconds between worker kills")
    parser.add_argument("--seed", type=int, default=20261205)
    parser.add_argument("--python", type=int, default=5, help="how many of the agents are Python (componentize-py)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="soak-", dir="/tmp"))
    home = Home(root / "h")
    names = [f"a{i}" for i in range(args.agents)]
    figures: dict[str, object] = {"agents": args.agents, "messages": args.messages, "clients": args.clients,
                                  "python_agents": min(args.python, args.agents)}
    python_wasm = build_python_echo(root) if args.python > 0 else None
    up(home)
    try:
        with Client(home, timeout=120) as c:
            for i, name in enumerate(names):
                if python_wasm is not None and i < args.python:
                    component = python_wasm  # every few agents of the mix run CPython in the sandbox
                else:
                    component = COMPONENTS / ("echo.wat" if i % 2 == 0 else "counter.wat")
                manifest = root / f"{name}.toml"
                manifest.write_text(f'name = "{name}"\ncomponent = "{component}"\n'
                                    "[restart]\nintensity = 1000\nperiod_ms = 1000\n")
                c.spawn(str(manifest))
        traffic = Traffic(home, names, args.seed)
        started = time.monotonic()
        warmup = min(2000, args.messages // 10)
        traffic.run(warmup, args.clients)
        figures["rss_after_warmup_mib"] = round(rss_mib(home), 1)

        for phase in ("before", "after"):
            stop = threading.Event()
            kills: list[int] = []
            k = threading.Thread(target=lambda stop=stop, kills=kills: kills.extend(
                killer(home, names, stop, args.kill_every, args.seed)))
            k.start()
            if phase == "before":
                # The supervisor is SIGKILLed mid-traffic, then started again.
                crash = threading.Timer(max(1.0, args.messages / 2 / 4000), lambda: os.kill(
                    int(home.pid_file.read_text()), signal.SIGKILL))
                crash.start()
            half = (args.messages - warmup) // 2
            if phase == "before":
                traffic.run(half, args.clients)
            else:  # the restarted process's RSS after each quarter: flat, or still growing?
                quarters: list[float] = []
                for _ in range(4):
                    traffic.run(half // 4, args.clients)
                    quarters.append(round(rss_mib(home), 1))
                figures["rss_restarted_by_quarter_mib"] = quarters
            stop.set()
            k.join()
            figures[f"worker_kills_{phase}"] = len(kills)
            if phase == "before":
                crash.join()
                deadline = time.monotonic() + 30
                while True:  # the killed supervisor's workers die with it
                    try:
                        os.kill(int(home.pid_file.read_text()), 0)
                    except (ProcessLookupError, ValueError, FileNotFoundError):
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError("the supervisor did not die")
                    time.sleep(0.05)
                up(home)
                # RSS within one process: the restarted supervisor, warmed up with every agent resumed,
                # against the same process at the end.
                traffic.run(warmup, args.clients)
                figures["rss_restarted_after_warmup_mib"] = round(rss_mib(home), 1)
        figures["seconds"] = round(time.monotonic() - started, 1)
        figures["answered"] = traffic.sent
        figures["errors_seen_by_clients"] = traffic.errors
        figures["rss_end_mib"] = round(rss_mib(home), 1)

        with Client(home, timeout=60) as c:
            deadline = time.monotonic() + 60
            while True:
                statuses = {a["name"]: a["status"] for a in c.ps()}
                if all(statuses.get(n) == "running" for n in names) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        not_running = sorted(n for n in names if statuses.get(n) != "running")
        lost = 0
        for name in names:
            stored = {r.fields()["message"]: r.fields()["reply"] for r in chain_records(home, name)
                      if r.kind is Kind.HANDLE and r.fields()["status"] == "ok"}
            lost += sum(1 for m, reply in traffic.acked[name].items() if stored.get(m, b"") != reply or m not in stored)
        broken = [r.name for r in verify_home(home) if not r.ok]
        figures.update(acknowledged_but_lost=lost, chains_broken=len(broken), agents_not_running=len(not_running))
    finally:
        pid = int(home.pid_file.read_text())
        with Client(home, timeout=120) as c:
            c.down()
        with contextlib.suppress(psutil.NoSuchProcess, psutil.TimeoutExpired):
            psutil.Process(pid).wait(timeout=30)  # down answers just before the process ends
    leftovers = [" ".join(p.info["cmdline"] or [])[:200] for p in psutil.process_iter(["cmdline", "status"])
                 if p.info["status"] != psutil.STATUS_ZOMBIE
                 and any(str(home.root) in part for part in (p.info["cmdline"] or []))]
    figures["processes_left"] = leftovers
    ok = (figures["acknowledged_but_lost"] == 0 and figures["chains_broken"] == 0
          and figures["agents_not_running"] == 0 and not leftovers)
    figures["ok"] = ok
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:<28} {value}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
