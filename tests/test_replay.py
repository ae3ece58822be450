"""`theater replay`: an agent's component runs again on exactly what its chain records, in a confined
process, with no supervisor, no other agent, no store state and no network behind it. Real chains made by a
real supervisor; a replay that reads anything live, or a chain the component would not write, is caught."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import COMPONENTS, Theater, ps, records, wait_running, wait_until
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from theater.artifacts import WASMTIME_VERSION
from theater.client import ClientError
from theater.records import Kind, sign_record
from worker.replay import replay

ROOT = Path(__file__).resolve().parent.parent


def run_replay(t: Theater, agent: str) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run([sys.executable, "-m", "supervisor", "--home", str(t.home.root), "replay", agent, "--json"],
                          capture_output=True, text=True, timeout=300, check=False)
    report = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return proc.returncode, report, proc.stderr


def replays(t: Theater, agent: str) -> dict[str, Any]:
    code, report, err = run_replay(t, agent)
    assert code == 0 and report["ok"], (report, err)
    return report


def test_a_chain_with_crashes_restarts_and_failures_replays_exactly(theater: Theater) -> None:
    """counter.wat reads the clock and logs; its worker is killed, a call traps, and the agent restarts:
    every call replays with the recorded clock, in the instances it really ran in."""
    with theater.client() as c:
        c.spawn(theater.manifest("ctr", "counter.wat"))
        for _ in range(3):
            c.call("ctr", b"tick")
        pid = ps(c, "ctr")["pid"]
        os.kill(pid, signal.SIGKILL)  # a restart: the replay takes a fresh instance there too
        wait_running(c, "ctr", pid)
        c.call("ctr", b"tick")
        c.spawn(theater.manifest("trap", "trap_on.wat"))
        c.call("trap", b"fine")
        with pytest.raises(ClientError):
            c.call("trap", b"trap")
        wait_running(c, "trap")
        c.call("trap", b"fine again")
    theater.stop()  # nothing live from here on
    assert replays(theater, "ctr")["calls"] == 5
    report = replays(theater, "trap")
    assert report["calls"] == 4 and "engine_note" not in report
    keyed = [r for r in records(theater, "ctr") if r.kind in (Kind.GENESIS, Kind.WORKER_KEY)]
    assert len(keyed) == 2  # each worker stated the engine that ran it, under the supervisor's signature
    for record in keyed:
        stated = json.loads(record.fields()["confinement"])
        assert stated["engine.wasmtime"] == WASMTIME_VERSION and "cranelift_nan_canonicalization=True" in \
            stated["engine.settings"]


def test_a_runaway_replays_into_the_same_deadline(theater: Theater) -> None:
    """The replay runs under the chain's own limits: the spinning call ends at its deadline again."""
    with theater.client() as c:
        c.spawn(theater.manifest("spin", "spin.wat", limits={"wall_time_ms": 100}))
        with pytest.raises(ClientError) as info:
            c.call("spin", b"go")
        assert info.value.code == "deadline"
    theater.stop()
    assert replays(theater, "spin")["calls"] == 2


def test_a_conversation_replays_without_the_other_agent(theater: Theater) -> None:
    """a called b; a's replay takes b's answers from a's own chain: b is stopped and the supervisor down."""
    manifest = {"policy": "messaging", "capabilities": ["runtime", "messaging"]}
    with theater.client() as c:
        c.spawn(theater.manifest("a", "messenger.wat", **manifest))
        c.spawn(theater.manifest("b", "messenger.wat", **manifest))
        assert c.call("a", b"call:3000:b:hello") == b"ok:ack:hello"
        assert c.call("a", b"send:b:later") == b"ok"
        assert c.call("a", b"call:3000:b:trap").startswith(b"err:target-crashed")
        wait_until(lambda: b"later" in (c.call("b", b"state") or b""), what="the send")
        c.stop("b")
    theater.stop()
    assert replays(theater, "a")["calls"] == 4
    assert replays(theater, "b")["calls"] >= 3


def test_kv_reads_come_from_the_chain_not_the_store(theater: Theater) -> None:
    """After the calls, the kv table is changed behind the agent's back: the replay still reads what the
    calls read."""
    with theater.client() as c:
        c.spawn(theater.manifest("k", "keeper.wat", policy="messaging", capabilities=["runtime", "kv"]))
        assert c.call("k", b"set:x:1") == b"ok"
        assert c.call("k", b"get:x") == b"some:1"
    theater.stop()
    db = sqlite3.connect(theater.home.store)
    db.execute("UPDATE kv SET value = ?", (b"tampered",))
    db.commit()
    db.close()
    assert replays(theater, "k")["calls"] == 3


def test_timers_and_http_replay_offline(theater: Theater) -> None:
    class Api(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"hello")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{server.server_address[1]}"
    text = (ROOT / "policies" / "default.toml").read_text().replace('capabilities = ["runtime"]',
                                                                    'capabilities = ["runtime", "http"]')
    theater.home.policies.mkdir(exist_ok=True)
    (theater.home.policies / "web.toml").write_text(
        text.replace("[hardening]", f'[http]\nallow = ["{origin}"]\nprivate = ["{origin}"]\n\n[hardening]'))
    try:
        with theater.client() as c:
            c.spawn(theater.manifest("f", "fetcher.wat", policy="web", capabilities=["runtime", "http"]))
            assert c.call("f", f"GET {origin}/x".encode()) == b"200 hello"
            c.spawn(theater.manifest("t", "alarm.wat", policy="messaging", capabilities=["runtime", "timers"]))
            c.call("t", b"after:0:wake")
            wait_until(lambda: b"wake" in (c.call("t", b"state") or b""), what="the timer")
    finally:
        server.shutdown()
        server.server_close()
    theater.stop()
    assert replays(theater, "f")["calls"] == 2
    assert replays(theater, "t")["calls"] >= 3


def test_a_chain_the_component_would_not_write_diverges(theater: Theater) -> None:
    """Replay compares: a handle record whose reply the component would not give is found, at its seq."""
    with theater.client() as c:
        c.spawn(theater.manifest("e", "echo.wat"))
        c.call("e", b"one")
        c.call("e", b"two")
    chain = records(theater, "e")
    config = json.loads(chain[0].fields()["config"])
    component = Path(config["component_path"]).read_bytes()
    assert replay(chain, component, config).ok
    last = chain[-1]
    forged_fields = {**last.fields(), "reply": b"not what echo says"}
    forged = sign_record(Ed25519PrivateKey.generate(), kind=last.kind, agent_id=last.agent_id, seq=last.seq,
                         time_ns=last.time_ns, prev_hash=last.prev_hash, state_hash=last.state_hash,
                         fields=forged_fields)
    report = replay([*chain[:-1], forged], component, config)
    assert report.diverged_at == last.seq
    assert "field reply" in report.divergence and "not what echo says" in report.divergence


def test_a_divergence_names_kinds_as_records_do(theater: Theater) -> None:
    """`host-call`, as `events` and the docs write it (it read `host_call`)."""
    with theater.client() as c:
        c.spawn(theater.manifest("n", "counter.wat"))
        c.call("n", b"one")
    chain = records(theater, "n")
    config = json.loads(chain[0].fields()["config"])
    component = Path(config["component_path"]).read_bytes()
    log = next(r for r in chain if r.kind is Kind.LOG)
    call = next(r for r in chain if r.kind is Kind.HOST_CALL)
    as_call = sign_record(Ed25519PrivateKey.generate(), kind=Kind.HOST_CALL, agent_id=log.agent_id, seq=log.seq,
                          time_ns=log.time_ns, prev_hash=log.prev_hash, state_hash=log.state_hash,
                          fields=call.fields())
    report = replay([*chain[:log.seq], as_call, *chain[log.seq + 1:]], component, config)
    assert report.diverged_at == log.seq
    assert report.divergence == "the replay writes log where the chain holds host-call", report.divergence


def test_a_changed_component_is_refused(theater: Theater) -> None:
    copy = theater.dir / "echo.wat"
    shutil.copy(COMPONENTS / "echo.wat", copy)
    manifest = theater.dir / "e.toml"
    manifest.write_text(f'name = "e"\ncomponent = "{copy}"\n')
    with theater.client() as c:
        c.spawn(manifest)
        c.call("e", b"one")
    theater.stop()
    copy.write_text(copy.read_text() + "\n;; changed\n")
    code, _, err = run_replay(theater, "e")
    assert code == 1 and "the component is not the one the chain's genesis names" in err, err
    assert [r.kind for r in records(theater, "e")][:1] == [Kind.GENESIS]


def test_a_rebuilt_component_is_caught_at_its_first_different_record(theater: Theater) -> None:
    """trap_on.wat's chain replayed with echo.wat as a "rebuild": init already runs differently (other code,
    other fuel, and echo keeps the empty args as its state where trap_on writes '0'): the report names the
    init record, the first that differs."""
    with theater.client() as c:
        c.spawn(theater.manifest("ctr", "trap_on.wat"))
        c.call("ctr", b"one")
    theater.stop()
    proc = subprocess.run([sys.executable, "-m", "supervisor", "--home", str(theater.home.root), "replay", "ctr",
                           "--component", str(COMPONENTS / "echo.wat"), "--json"],
                          capture_output=True, text=True, timeout=300, check=False)
    report = json.loads(proc.stdout)
    first_call = next(r.seq for r in records(theater, "ctr") if r.kind is Kind.INIT)
    assert proc.returncode == 1 and report["diverged_at"] == first_call, report
    assert report["divergence"].startswith("init field fuel: the replay gives"), report
