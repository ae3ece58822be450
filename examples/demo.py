"""The demo scene: a supervisor, three agents, a runaway, a crash, and a verified record of it all.

Run through ``scripts/demo``. Everything happens on a throw-away home
(``--home DIR`` to keep it), with the same ``theater`` commands a user types.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AGENTS = ROOT / "examples" / "agents"
THEATER = [sys.executable, "-m", "supervisor"]


def theater(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*THEATER, "--home", str(home), *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        sys.exit(f"demo: `theater {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def say(text: str) -> None:
    print(text, flush=True)


def step(title: str) -> None:
    say(f"\n== {title}")


def wait_for(predicate, what: str, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    sys.exit(f"demo: timed out waiting for {what}")


def ps(home: Path) -> dict[str, dict]:  # type: ignore[type-arg]
    return {a["name"]: a for a in json.loads(theater(home, "ps", "--json").stdout)}


def team_scene(home: Path) -> None:
    """Agents that talk: a coordinator calls two workers, one of which crashes on every third job."""
    step("agents that talk: a coordinator calls two workers (Python, messaging capability)")
    if build_python("team", "messaging-agent") is None:
        say("   skipped: componentize-py is not installed (scripts/setup installs it)")
        return
    theater(home, "spawn", str(AGENTS / "team.toml"))
    reply = theater(home, "call", "coordinator", "square-all:1,2,3,4,5,6", "--timeout", "30").stdout.strip()
    say(f"   coordinator replied: {reply}")
    flaky = ps(home)["flaky"]
    say(f"   flaky crashed on a multiple of 3 and its supervisor restarted it (restarts: {flaky['restarts']})")
    events = [json.loads(line) for line in theater(home, "events", "coordinator", "--json").stdout.splitlines()]
    calls = [e for e in events if e["kind"] == "host-call" and e["fields"]["function"] == "call"]
    first = json.loads(bytes.fromhex(calls[0]["fields"]["output"]).split(b"\0", 1)[0])
    received = [json.loads(line) for line in theater(home, "events", "steady", "--json").stdout.splitlines()]
    match = next(e for e in received if e["hash"] == first["record"])
    coordinator_id = ps(home)["coordinator"]["id"].replace("-", "")
    if match["kind"] != "message" or match["fields"]["sender"] != coordinator_id:
        sys.exit(f"demo: steady's record {match['seq']} does not name the coordinator as its sender")
    say(f"   both sides are on record: the coordinator's call #{calls[0]['seq']} names steady's record "
        f"#{match['seq']} by hash; that record names the coordinator as sender")


def build_python(app: str, world: str) -> Path | None:
    """examples/agents/<app>/<app>.wasm, built with componentize-py (None if it is not installed)."""
    componentize = Path(sys.executable).parent / "componentize-py"
    wasm = AGENTS / app / f"{app}.wasm"
    if not componentize.exists():
        return None
    if not wasm.exists() or wasm.stat().st_mtime < (AGENTS / app / "app.py").stat().st_mtime:
        subprocess.run([str(componentize), "-d", str(ROOT / "wit"), "-w", world, "componentize", "app",
                        "-o", str(wasm)], cwd=AGENTS / app, check=True, capture_output=True, timeout=300)
    return wasm


API_KEY = "demo-key-8c1f2a"


def weather_api() -> tuple[ThreadingHTTPServer, int]:
    """A local API that wants a bearer key, and (carelessly) echoes it back."""

    class Api(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            auth = self.headers.get("Authorization", "")
            city = self.path.partition("city=")[2] or "nowhere"
            ok = auth == f"Bearer {API_KEY}"
            body = (f"sunny in {city} (you sent {auth})" if ok else "401: no key").encode()
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def weather_scene(home: Path) -> None:
    """An agent calls a local HTTP API; the supervisor adds the key, the agent and the records never see it."""
    step("HTTP egress with a secret: the supervisor adds the API key, the agent never sees it")
    wasm = build_python("weather", "http-agent")
    if wasm is None:
        say("   skipped: componentize-py is not installed (scripts/setup installs it)")
        return
    server, port = weather_api()
    try:
        subprocess.run([*THEATER, "--home", str(home), "secret", "set", "weather"], input=API_KEY.encode(),
                       check=True, capture_output=True, timeout=60)
        policy = (AGENTS / "weather-api.toml").read_text().replace("8787", str(port))
        (home / "policies").mkdir(exist_ok=True)
        (home / "policies" / "weather-api.toml").write_text(policy)
        manifest = (AGENTS / "weather.toml").read_text().replace("8787", str(port))
        manifest = manifest.replace('component = "weather/weather.wasm"', f'component = "{wasm}"')
        (home / "weather.toml").write_text(manifest)
        theater(home, "spawn", str(home / "weather.toml"))
        reply = theater(home, "call", "weather", "forecast:lisbon", "--timeout", "30").stdout.strip()
        say(f"   weather replied: {reply}")
        store = (home / "events.sqlite3").read_bytes() + (home / "events.sqlite3-wal").read_bytes() \
            if (home / "events.sqlite3-wal").exists() else (home / "events.sqlite3").read_bytes()
        if API_KEY.encode() in store or API_KEY in reply:
            sys.exit("demo: the API key reached the agent or the event store")
        say("   the API saw the key; the agent's reply and every stored record hold {secret:weather} instead")
    finally:
        server.shutdown()
        server.server_close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--home", type=Path, help="keep the demo's state here instead of a temporary directory")
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="theater-demo-"))
    started = time.monotonic()
    try:
        step("supervisor")
        say("   " + theater(home, "up", "--detach").stdout.strip())

        step("spawn three agents from their manifests")
        for manifest in ("counter.toml", "echo.toml", "spin.toml"):
            agent_id = theater(home, "spawn", str(AGENTS / manifest)).stdout.strip()
            say(f"   {manifest:<13} -> {agent_id}")

        step("messages")
        replies = [theater(home, "call", "counter", "tick").stdout.strip() for _ in range(3)]
        say(f"   counter replied {', '.join(replies)}")
        theater(home, "send", "counter", "tock")
        say(f"   send + call: counter is now at {theater(home, 'call', 'counter', 'tick').stdout.strip()}")
        say(f"   echo replied {theater(home, 'call', 'echo', 'hello, theater').stdout.strip()!r}")

        step("a runaway agent (infinite loop, 200 ms deadline)")
        before = ps(home)["runaway"]
        t0 = time.monotonic()
        runaway = theater(home, "call", "runaway", "go", check=False)
        elapsed = (time.monotonic() - t0) * 1000
        say(f"   stopped after {elapsed:.0f} ms (command round trip): {runaway.stderr.strip()}")
        info = wait_for(lambda: (a := ps(home)["runaway"])["status"] == "running" and a["pid"] != before["pid"] and a,
                        "the runaway's restart")
        say(f"   a crash, so its supervisor restarted it: worker {before['pid']} -> {info['pid']}, restarts {info['restarts']}")

        step("a crash: SIGKILL the counter's worker")
        before = ps(home)["counter"]
        os.kill(before["pid"], signal.SIGKILL)
        after = wait_for(lambda: (a := ps(home)["counter"])["pid"] not in (None, before["pid"]) and a["status"] == "running" and a, "the counter's restart")
        say(f"   worker {before['pid']} killed; supervisor restarted it as {after['pid']} (restarts: {after['restarts']})")
        say(f"   state survived: counter continues at {theater(home, 'call', 'counter', 'tick').stdout.strip()}")

        step("a supervision tree (rest_for_one) from one manifest")
        theater(home, "spawn", str(AGENTS / "pipeline.toml"))
        for line in theater(home, "tree").stdout.strip().splitlines():
            say("   " + line)

        team_scene(home)
        weather_scene(home)

        step("the counter's chain (last 6 records)")
        for line in theater(home, "events", "counter").stdout.strip().splitlines()[-6:]:
            say("   " + line)

        step("verify every chain (signatures, sequence, hash links, state)")
        for line in theater(home, "verify").stdout.strip().splitlines():
            say("   " + line)

        step("shut down")
        say("   " + theater(home, "down").stdout.strip())
        verify = theater(home, "verify", "--json", check=False)
        reports = json.loads(verify.stdout)
        ok = verify.returncode == 0 and all(r["ok"] for r in reports)
        total = sum(r["records"] for r in reports)
        say(f"\nsummary: {len(reports)} agents, {total} signed records, every chain {'verifies' if ok else 'DOES NOT verify'}; "
            f"{time.monotonic() - started:.1f} s; state kept in {home}" if args.home else
            f"\nsummary: {len(reports)} agents, {total} signed records, every chain {'verifies' if ok else 'DOES NOT verify'}; "
            f"{time.monotonic() - started:.1f} s")
        return 0 if ok else 1
    finally:
        theater(home, "down", check=False)
        if args.home is None:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
