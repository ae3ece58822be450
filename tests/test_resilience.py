"""Resilience: killed workers, restart intensity, a killed supervisor, lying workers, strangers, permissions.

Everything here runs real processes on a private home: the supervisor
subprocess from ``conftest``, real workers (or ``tests/evil_worker.py``, started
through ``tests/run_supervisor.py``), real ZeroMQ sockets and the real SQLite
event store. Waits are on replies or on process-level facts with a deadline.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import evil_worker
import pytest
import zmq
from conftest import (
    Theater,
    answers,
    assert_verified,
    gone,
    of,
    ps,
    records,
    start_after_crash,
    supervisor_log,
    wait_running,
    wait_status,
    wait_until,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from supervisor._audit import open_readonly
from theater import wire
from theater.client import Client, ClientError, NotRunning
from theater.records import Kind

TESTS = Path(__file__).resolve().parent
RUN_SUPERVISOR = TESTS / "run_supervisor.py"

# --- helpers -------------------------------------------------------------------


def _desired(t: Theater, name: str) -> str:
    db = open_readonly(t.home.store)
    try:
        [(desired,)] = db.execute("SELECT desired FROM agents WHERE name=?", (name,)).fetchall()
    finally:
        db.close()
    return desired


def _without_uptime(agents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in a.items() if k != "uptime_s"} for a in agents]


def _socket(endpoint: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    return sock


# --- 1. a killed worker ----------------------------------------------------------


def test_sigkilled_idle_worker_is_restarted_with_state_intact(theater: Theater) -> None:
    """A SIGKILLed idle worker is noticed and restarted once; the counter continues and the chain says why."""
    with theater.client() as c:
        c.spawn(theater.manifest("ctr", "counter.wat"))
        assert [c.call("ctr", b"m%d" % i) for i in range(3)] == [b"1", b"2", b"3"]
        before = ps(c, "ctr")
        os.kill(before["pid"], signal.SIGKILL)
        after = wait_running(c, "ctr", before["pid"])
        assert after["restarts"] == 1
        assert after["incarnation"] == before["incarnation"] + 1
        assert c.call("ctr", b"after") == b"4"

    chain = records(theater, "ctr")
    [exit_] = of(chain, Kind.EXIT)
    fields = exit_.fields()
    assert fields["reason"] == "worker-died"
    assert "killed by signal 9 (SIGKILL)" in fields["detail"]
    assert fields["incarnation"] == before["incarnation"]
    key = chain[exit_.seq + 1]
    assert key.kind is Kind.WORKER_KEY
    assert key.fields()["incarnation"] == before["incarnation"] + 1
    assert [h.fields()["reply"] for h in of(chain, Kind.HANDLE)] == [b"1", b"2", b"3", b"4"]
    assert_verified(theater)


# --- 2. restart intensity and restart types ----------------------------------------


def test_restart_intensity_gives_up_after_too_many_deaths(theater: Theater) -> None:
    """With intensity 2 per minute, the third SIGKILL leaves the agent failed, recorded and refusing calls."""
    manifest = theater.manifest("flaky", "counter.wat", restart={"intensity": 2, "period_ms": 60000})
    with theater.client() as c:
        c.spawn(manifest)
        assert c.call("flaky", b"x") == b"1"
        pid = ps(c, "flaky")["pid"]
        for kill in range(1, 4):
            os.kill(pid, signal.SIGKILL)
            if kill < 3:
                pid = wait_running(c, "flaky", pid)["pid"]
        info = wait_status(c, "flaky", "failed")
        assert info["pid"] is None
        assert info["restarts"] == 2
        with pytest.raises(ClientError) as refused:
            c.call("flaky", b"y")
        assert refused.value.code == "refused"
        assert ps(c, "flaky")["status"] == "failed"

    exits = [r.fields() for r in of(records(theater, "flaky"), Kind.EXIT)]
    assert len(exits) == 3
    assert all("killed by signal 9 (SIGKILL)" in e["detail"] for e in exits)
    assert not any("giving up" in e["detail"] for e in exits[:2])
    assert "more than 2 restarts in 60000 ms, giving up" in exits[2]["detail"]
    assert len(of(records(theater, "flaky"), Kind.WORKER_KEY)) == 2
    assert _desired(theater, "flaky") == "failed"
    assert_verified(theater)


def test_temporary_agent_is_not_restarted(theater: Theater) -> None:
    """A `temporary` agent whose worker is SIGKILLed is failed at once, never restarted."""
    with theater.client() as c:
        c.spawn(theater.manifest("once", "counter.wat", restart={"type": "temporary"}))
        assert c.call("once", b"x") == b"1"
        pid = ps(c, "once")["pid"]
        os.kill(pid, signal.SIGKILL)
        info = wait_status(c, "once", "failed")
        assert info["pid"] is None
        assert info["restarts"] == 0
        with pytest.raises(ClientError) as refused:
            c.call("once", b"y")
        assert refused.value.code == "refused"

    chain = records(theater, "once")
    assert chain[-1].kind is Kind.EXIT
    assert "killed by signal 9 (SIGKILL)" in chain[-1].fields()["detail"]
    assert not of(chain, Kind.WORKER_KEY)
    assert _desired(theater, "once") == "failed"
    assert_verified(theater)


# --- 3. a killed supervisor --------------------------------------------------------


class _Caller(threading.Thread):
    """Calls the counter in a loop and keeps every (message, reply) the supervisor acknowledged."""

    def __init__(self, t: Theater, name: str, tag: str) -> None:
        super().__init__(daemon=True)
        self.t, self.name, self.tag = t, name, tag
        self.acked: list[tuple[bytes, bytes]] = []
        self.errors: list[str] = []
        self.unanswered = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with Client(self.t.home) as c:
            n = 0
            while not self.stop.is_set():
                n += 1
                message = f"{self.tag}-{n}".encode()
                try:
                    result, reply = c.request("call", message, agent=self.name, timeout_ms=10_000, timeout=2.0)
                except NotRunning:
                    self.unanswered += 1  # in flight when the supervisor died (or sent after)
                    continue
                except ClientError as exc:
                    self.errors.append(f"{exc.code}: {exc}")
                    continue
                assert result.get("has_reply") and reply is not None
                self.acked.append((message, reply))


def test_supervisor_sigkill_mid_traffic_loses_nothing_committed(theater: Theater) -> None:
    """SIGKILL of the supervisor under load: workers die with it, and a restart resumes every acknowledged call."""
    with theater.client() as c:
        c.spawn(theater.manifest("ctr", "counter.wat"))
        c.spawn(theater.manifest("idle", "counter.wat"))
        assert c.call("idle", b"i") == b"1"
        workers = [a["pid"] for a in c.ps()]
    callers = [_Caller(theater, "ctr", f"t{i}") for i in range(2)]
    for caller in callers:
        caller.start()
    try:
        wait_until(lambda: all(len(k.acked) >= 5 for k in callers), 30, "acknowledged calls from every caller")
        theater.kill()  # SIGKILL, calls in flight
    finally:
        for caller in callers:
            caller.stop.set()
        for caller in callers:
            caller.join(timeout=10)
    assert not any(caller.is_alive() for caller in callers)
    assert all(caller.unanswered >= 1 for caller in callers), "no call was in flight at the kill"
    assert not [e for k in callers for e in k.errors], [e for k in callers for e in k.errors]
    acked = [pair for k in callers for pair in k.acked]
    wait_until(lambda: all(gone(pid) for pid in workers), 10, "workers to die with their supervisor")

    start_after_crash(theater)
    assert_verified(theater)  # including the supervisor-restart exits written at start-up
    with theater.client() as c:
        for name in ("ctr", "idle"):
            info = wait_running(c, name)
            assert info["pid"] not in workers
        reply = c.call("ctr", b"after-restart")
        assert c.call("idle", b"j") == b"2"
    assert reply is not None
    assert int(reply) > max(int(r) for _, r in acked)

    chain = records(theater, "ctr")
    stored = {h.fields()["message"]: h.fields()["reply"] for h in of(chain, Kind.HANDLE)}
    missing = [(m, r) for m, r in acked if stored.get(m) != r]
    assert not missing, f"acknowledged but not in the chain: {missing[:5]}"
    # Each reply is one more than the one before: nothing was applied twice or skipped.
    assert sorted(int(r) for r in stored.values()) == list(range(1, len(stored) + 1))
    assert stored[b"after-restart"] == reply
    for name in ("ctr", "idle"):
        exits = [r.fields() for r in of(records(theater, name), Kind.EXIT)]
        assert [e["reason"] for e in exits] == ["supervisor-restart"], name
    assert_verified(theater)


def test_up_detach_after_supervisor_crash_reports_success(theater: Theater) -> None:
    """After a SIGKILLed supervisor, `theater up --detach` starts a new one and reports success."""
    with theater.client() as c:
        c.spawn(theater.manifest("ctr", "counter.wat"))
    theater.kill()
    try:
        up = subprocess.run(
            [sys.executable, "-m", "supervisor", "--home", str(theater.home.root), "up", "--detach"],
            capture_output=True, text=True, timeout=60,
        )
        info = wait_until(lambda: answers(theater), 30, "a supervisor to answer")
        assert info["agents"] == 1  # type: ignore[index]  # it is up and has resumed the agent...
        assert up.returncode == 0, up.stderr  # ...so `up` must not say it failed
    finally:
        _down_detached(theater)


def _down_detached(t: Theater) -> None:
    """Stop a supervisor started by `up --detach` (not a child of this test)."""
    try:
        pid = int(t.home.pid_file.read_text())
    except (FileNotFoundError, ValueError):
        return
    try:
        with t.client(timeout=20) as c:
            c.down()
    except (NotRunning, ClientError):
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: gone(pid), 20, "the detached supervisor to end")


# --- 4. lying workers --------------------------------------------------------------

# mode -> a fragment the violation's reason must contain
EVIL_MODES = {
    "forge": "signature",
    "tamper": "signature",
    "replay": "sequence",
    "reorder": "sequence",
    "state": "state sent does not match",
    "garbage": "malformed result",
    # Hellos on its bound connection: they were queued, one handled a turn, each held against whatever worker
    # the agent had by then, so the worker that sent them was killed, then its innocent successors.
    "hello-flood": "second hello on an established connection",
}


@contextlib.contextmanager
def _evil_counter(theater: Theater, mode: str) -> Iterator[tuple[Client, int]]:
    """A supervisor whose workers are ``tests/evil_worker.py MODE``, the counter spawned and its first call (honest)
    made: a client, and the pid of the worker that took it."""
    theater.stop()
    theater.start(extra=[sys.executable, str(RUN_SUPERVISOR), str(theater.home.root), mode])
    with theater.client() as c:
        c.spawn(theater.manifest("ctr", "counter.wat"))
        assert c.call("ctr", b"first") == b"1"
        yield c, ps(c, "ctr")["pid"]


@pytest.mark.parametrize("mode", sorted(EVIL_MODES))
def test_lying_worker_is_caught_and_nothing_it_sent_is_stored(theater: Theater, mode: str) -> None:
    """A worker that forges, tampers, replays, reorders, lies about state, sends garbage or floods hellos is killed,
    recorded, restarted, and only it."""
    with _evil_counter(theater, mode) as (c, pid):
        with pytest.raises(ClientError) as died:
            c.call("ctr", b"second")
        assert died.value.code == "worker-died"
        info = wait_running(c, "ctr", pid)
        assert info["restarts"] == 1
        # The evil behaviour is on each process's 2nd handle call: the new worker's 1st is honest.
        assert c.call("ctr", b"third") == b"2"

    chain = records(theater, "ctr")
    [violation] = of(chain, Kind.VIOLATION)
    assert violation.kind == 8
    fields = violation.fields()
    assert EVIL_MODES[mode] in fields["reason"], fields["reason"]
    assert fields["incarnation"] == 0
    messages = [h.fields()["message"] for h in of(chain, Kind.HANDLE)]
    assert messages == [b"first", b"third"]  # nothing of the bad result, and no replayed copy
    after = chain[violation.seq + 1]
    assert after.kind is Kind.WORKER_KEY and after.fields()["incarnation"] == 1
    assert "protocol-violation" in after.fields()["reason"]
    assert f"protocol violation: {fields['reason']}" in supervisor_log(theater)
    assert supervisor_log(theater).count("protocol violation: ") == 1
    assert_verified(theater)


# mode -> a fragment the violation's reason must contain (supervisor/_host.py)
HOST_REQUEST_MODES = {
    "grab-unheld": "host request outside a call, or for 'supervision', which the agent does not hold",
    "grab-unknown": "for 'kv', which the agent does not hold or the supervisor does not serve",
    "grab-none": "host request names no interface",
    "grab-malformed": "malformed host request: host request must be an 8-byte id frame, a JSON frame and an optional data frame",
}


@pytest.mark.parametrize("mode", sorted(HOST_REQUEST_MODES))
def test_hostile_host_request_is_a_violation_and_nothing_of_the_call_is_stored(theater: Theater, mode: str) -> None:
    """A worker that asks mid-call for a capability it lacks, one nobody serves, none, or with a bad id frame
    is killed, recorded, restarted; the call it was in is not committed."""
    with _evil_counter(theater, mode) as (c, pid):
        assert ps(c, "ctr")["policy"] == "default"  # no supervision capability
        with pytest.raises(ClientError) as died:
            c.call("ctr", b"second")
        assert died.value.code == "worker-died"
        info = wait_running(c, "ctr", pid)
        assert info["restarts"] == 1
        # The hostile request is on each process's 2nd handle call: the new worker's 1st is honest.
        assert c.call("ctr", b"third") == b"2"

    chain = records(theater, "ctr")
    [violation] = of(chain, Kind.VIOLATION)
    fields = violation.fields()
    assert HOST_REQUEST_MODES[mode] in fields["reason"], fields["reason"]
    assert fields["incarnation"] == 0
    if mode == "grab-malformed":
        assert fields["evidence"] == b"".join(evil_worker.host_request_frames(mode, 1)[1:])
    messages = [h.fields()["message"] for h in of(chain, Kind.HANDLE)]
    assert messages == [b"first", b"third"]
    before = chain[violation.seq - 1]  # the first call's handle record: no log or host call of the second
    assert before.kind is Kind.HANDLE and before.fields()["message"] == b"first"
    after = chain[violation.seq + 1]
    assert after.kind is Kind.WORKER_KEY and after.fields()["incarnation"] == 1
    assert "protocol-violation" in after.fields()["reason"]
    assert f"protocol violation: {fields['reason']}" in supervisor_log(theater)
    assert_verified(theater)


@pytest.mark.parametrize("mode", ["fault-list", "fault-late"])
def test_a_fault_that_is_malformed_or_late_is_ignored(theater: Theater, mode: str) -> None:
    """A FAULT whose reason is not a string used to take the supervisor down (an unhashable list); one from
    a worker that has run calls left its agent running with no call ever dispatched again, and chose its
    exit reason. A FAULT is never a violation: both are ignored, and the worker goes on serving."""
    with _evil_counter(theater, mode) as (c, pid):
        assert c.call("ctr", b"second") == b"2"  # the FAULT went before it
        assert c.call("ctr", b"third") == b"3"
        assert ps(c, "ctr")["pid"] == pid and ps(c, "ctr")["restarts"] == 0
    assert of(records(theater, "ctr"), Kind.VIOLATION) == []
    assert "ignoring a" in supervisor_log(theater)
    assert_verified(theater)


def test_a_worker_on_its_way_out_is_recorded_as_a_violator_once(theater: Theater) -> None:
    """A worker being stopped (or one that sent a FAULT) has a kill reason already. A violation used to
    be taken as that worker's first unless that reason was `protocol-violation`: each of a flood of bad
    frames then wrote a violation record (a durable commit) and a warning. Now once, whatever came before."""
    with _evil_counter(theater, "stop-flood") as (c, _):
        c.send("ctr", b"second")  # its worker waits in this call for the STOP, and answers it with bad frames
        wait_until(lambda: "stop-flood on call" in (theater.home.logs / "ctr.log").read_text(), what="the call")
        c.stop("ctr")
        assert ps(c, "ctr")["status"] == "stopped"  # the operator's stop stands: a violation on the way out is no crash
    chain = records(theater, "ctr")
    [violation] = of(chain, Kind.VIOLATION)
    assert violation.fields()["reason"].startswith("bad header"), violation.fields()
    assert supervisor_log(theater).count("protocol violation: ") == 1
    assert_verified(theater)


def test_a_host_request_after_a_trapped_call_is_that_worker_s_violation(theater: Theater) -> None:
    """A worker whose call trapped may run nothing more. Its host request after that result was served,
    noted on the call sent ahead of it, which went back to the mailbox with that note: the next, honest
    worker to run it was convicted of not recording a host call. Now the request is the trapped worker's
    violation, and the call goes back clean."""
    theater.stop()
    theater.start(extra=[sys.executable, str(RUN_SUPERVISOR), str(theater.home.root), "ask-after-end"])
    with theater.client() as c:
        c.spawn(theater.manifest("k", "keeper.wat", policy="messaging", capabilities=["runtime", "kv"]))
        assert c.call("k", b"set:a:1") == b"ok"
        pid = ps(c, "k")["pid"]
        c.send("k", b"set-then-trap:b:2")  # sent first; its worker holds its result until the next is sent ahead
        assert c.call("k", b"get:a") == b"some:1"  # run by the next worker
        info = wait_running(c, "k", pid)
        assert c.call("k", b"get:a") == b"some:1"
        assert ps(c, "k")["pid"] == info["pid"] and ps(c, "k")["restarts"] == 1
    chain = records(theater, "k")
    [violation] = of(chain, Kind.VIOLATION)
    assert violation.fields()["incarnation"] == 0
    assert violation.fields()["reason"] == "a host request after a result that ended its worker"
    handled = [(h.fields()["message"], h.fields()["status"]) for h in of(chain, Kind.HANDLE)]
    assert handled[-2:] == [(b"get:a", "ok"), (b"get:a", "ok")], handled
    assert_verified(theater)


def test_result_sent_twice_leaves_a_consistent_resumable_store(theater: Theater) -> None:
    """A worker that sends its result twice is caught, and the store it leaves verifies and resumes."""
    theater.stop()
    theater.start(extra=[sys.executable, str(RUN_SUPERVISOR), str(theater.home.root), "twice"])
    with theater.client() as c:
        c.spawn(theater.manifest("ctr", "counter.wat", restart={"type": "temporary"}))
        assert c.call("ctr", b"first") == b"1"
        try:
            assert c.call("ctr", b"second") == b"2"  # the first copy is honest and may be committed
        except ClientError as exc:
            assert exc.code == "worker-died"
        wait_status(c, "ctr", "failed")
    chain = records(theater, "ctr")
    [violation] = of(chain, Kind.VIOLATION)
    assert "no call in flight" in violation.fields()["reason"]
    assert_verified(theater)
    theater.stop()
    theater.start()  # a plain supervisor must be able to resume this home
    with theater.client() as c:
        assert ps(c, "ctr")["status"] == "failed"
    assert_verified(theater)


def test_a_worker_that_never_answers_is_killed_at_its_calls_deadline_plus_grace(theater: Theater) -> None:
    """The supervisor's own watchdog, for a worker that stops answering (the worker's deadline only stops
    wasm): one timer per worker, set for the call it runs now. The first call's deadline has a long load
    grace; a later call's is earlier, and is the one kept."""
    theater.stop()
    theater.start(extra=[sys.executable, str(RUN_SUPERVISOR), str(theater.home.root), "hang"])
    with theater.client() as c:
        c.spawn(theater.manifest("ctr", "counter.wat", limits={"wall_time_ms": 200}))
        assert c.call("ctr", b"first") == b"1"
        began = time.monotonic()
        with pytest.raises(ClientError) as exc:
            c.call("ctr", b"second", timeout=60)
        assert exc.value.code == "worker-died"
        assert time.monotonic() - began < 30  # 0.2 s and the 5 s grace, not the first call's 120 s
        wait_until(lambda: "did not answer within its deadline plus grace; killing it" in supervisor_log(theater),
                   10, "the watchdog's log line")
        wait_until(lambda: of(records(theater, "ctr"), Kind.EXIT), 10, "the exit record")
    [exit_record] = of(records(theater, "ctr"), Kind.EXIT)
    assert exit_record.fields()["reason"] == "unresponsive"
    assert_verified(theater)


# --- 5. strangers -------------------------------------------------------------------


def test_stranger_on_worker_socket_is_ignored(theater: Theater) -> None:
    """A peer with no spawn token gets nowhere on the worker socket: its hello and its result are dropped."""
    with theater.client() as c:
        c.spawn(theater.manifest("ctr", "counter.wat"))
        assert c.call("ctr", b"a") == b"1"
        before = c.ps()
    token = secrets.token_bytes(32)
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    hello = wire.Hello(token, public, key.sign(wire.HELLO_DOMAIN + token), os.getpid(), {"umask": "applied"})
    stranger = _socket(theater.home.workers_endpoint)
    try:
        stranger.send_multipart(hello.encode())
        wait_until(lambda: "hello with an unknown token" in supervisor_log(theater), 10, "the unknown-token log line")
        result = wire.Result(1, b"999", [secrets.token_bytes(300)])
        stranger.send_multipart(result.encode())
        wait_until(lambda: "frame from an unknown peer" in supervisor_log(theater), 10, "the unknown-peer log line")
        assert not stranger.poll(100), "the supervisor answered a stranger"
    finally:
        stranger.close(0)
    with theater.client() as c:
        assert _without_uptime(c.ps()) == _without_uptime(before)
        assert c.call("ctr", b"b") == b"2"
    assert theater.proc is not None and theater.proc.poll() is None
    assert not of(records(theater, "ctr"), Kind.VIOLATION)
    assert_verified(theater)


# JSON that json.loads rejects with something other than JSONDecodeError.
HOSTILE_JSON = {
    "deep-nesting": b"[" * 100_000,  # RecursionError
    "huge-integer": b'{"n": ' + b"1" * 5000 + b"}",  # ValueError: int string conversion limit
}


# Regression (found here, fixed in wire.decode_json): RecursionError/ValueError escaped and killed the loop.
@pytest.mark.parametrize("payload", sorted(HOSTILE_JSON))
def test_stranger_hello_with_hostile_json_does_not_crash_supervisor(theater: Theater, payload: str) -> None:
    """A hello whose confinement frame is hostile JSON is dropped; the supervisor keeps serving."""
    with theater.client() as c:
        c.spawn(theater.manifest("ctr", "counter.wat"))
        assert c.call("ctr", b"a") == b"1"
    stranger = _socket(theater.home.workers_endpoint)
    try:
        stranger.send_multipart([wire.header(wire.WorkerType.HELLO), secrets.token_bytes(132), HOSTILE_JSON[payload]])
        assert theater.proc is not None
        wait_until(lambda: "malformed hello" in supervisor_log(theater) or theater.proc.poll() is not None,
                   10, "the hello to be handled")
    finally:
        stranger.close(0)
    assert theater.proc.poll() is None, f"supervisor exited with {theater.proc.returncode}"
    assert "dropping a malformed hello" in supervisor_log(theater)
    with theater.client() as c:
        assert c.call("ctr", b"b") == b"2"


# --- 6. control-socket authentication --------------------------------------------


def test_wrong_control_token_is_refused(theater: Theater) -> None:
    """Requests with a wrong or missing control token are refused, and do not disturb the supervisor."""
    with theater.client() as c:
        c.spawn(theater.manifest("ctr", "counter.wat"))
        real = c._token
        for bad in ("0" * len(real), real[:-1] + ("0" if real[-1] != "0" else "1"), ""):
            c._token = bad
            for op, args in (("ping", {}), ("ps", {}), ("call", {"agent": "ctr"}), ("down", {})):
                with pytest.raises(ClientError) as refused:
                    c.request(op, b"x" if op == "call" else None, **args)
                assert refused.value.code == "refused", (op, bad)
        c._token = real
        assert c.call("ctr", b"x") == b"1"  # no refused call reached the agent
        assert ps(c, "ctr")["head"] == 4  # genesis, init, and one call's log, host-call, handle


@pytest.mark.parametrize("rid", [True, False, "7", 1.5, None], ids=repr)
def test_a_request_id_that_is_not_an_integer_is_echoed_as_0(theater: Theater, rid: object) -> None:
    """wire-protocol.md 8.2: a JSON true is no integer, though Python's bool is an int (it was echoed back)."""
    sock = _socket(theater.home.control_endpoint)
    try:
        token = theater.home.token.read_text().strip()
        sock.send_multipart([wire.header(wire.ClientType.REQUEST), wire.encode_json({"op": "ping", "id": rid,
                                                                                     "token": token})])
        assert sock.poll(30_000), "no reply"
        reply = wire.decode_json(sock.recv_multipart()[1], "reply")
    finally:
        sock.close(0)
    assert reply["ok"] is True and reply["id"] == 0 and type(reply["id"]) is int, reply


# Regression (found here, fixed in wire.decode_json): the request is parsed before the token check.
@pytest.mark.parametrize("payload", sorted(HOSTILE_JSON))
def test_unauthenticated_hostile_request_does_not_crash_supervisor(theater: Theater, payload: str) -> None:
    """A request without a token whose JSON is hostile gets an error reply; the supervisor keeps serving."""
    sock = _socket(theater.home.control_endpoint)
    try:
        sock.send_multipart([wire.header(wire.ClientType.REQUEST), HOSTILE_JSON[payload]])
        assert theater.proc is not None
        wait_until(lambda: sock.poll(0) or theater.proc.poll() is not None, 10, "a reply or the supervisor's end")
        assert theater.proc.poll() is None, f"supervisor exited with {theater.proc.returncode}"
        header, body = sock.recv_multipart()
        assert header == wire.header(wire.ClientType.REPLY)
        reply = wire.decode_json(body, "reply")
        assert reply["ok"] is False and reply["error"]["code"] == "protocol", reply
    finally:
        sock.close(0)
    with theater.client() as c:
        c.ping()


# --- 7. permissions ------------------------------------------------------------------


def test_the_supervisor_takes_its_hard_open_files_limit(short_root: Any) -> None:
    """A running agent holds two of the supervisor's descriptors (its worker's connection and its pidfd): at
    the soft limit most systems give a shell (1,024) the 500th spawn never got a worker. The supervisor
    raises its soft limit to the hard one, and its log says how many agents that allows."""
    t = Theater(short_root("nofile"))
    launch = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096)); "
              "os.execv(sys.executable, sys.argv[1:])")
    t.start([sys.executable, "-c", launch, sys.executable, "-m", "supervisor", "--home", str(t.home.root), "up"])
    try:
        assert t.proc is not None
        [line] = [x for x in Path(f"/proc/{t.proc.pid}/limits").read_text().splitlines() if "open files" in x]
        assert line.split()[3:5] == ["4096", "4096"], line
        assert "open files: 4096 (about 2048 agents running at once)" in (t.dir / "supervisor.out").read_text()
        with t.client() as c:
            c.spawn(t.manifest("a", "echo.wat"))
            assert c.call("a", b"x") == b"x"
    finally:
        t.stop()


def test_secrets_and_sockets_are_private(theater: Theater) -> None:
    """run/ is 0700; the supervisor key and the control token are 0600."""
    home = theater.home
    assert stat.S_IMODE(home.run.stat().st_mode) == 0o700
    assert stat.S_IMODE(home.root.stat().st_mode) == 0o700
    assert stat.S_IMODE(home.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.token.stat().st_mode) == 0o600
    assert home.control_sock.parent == home.run and home.workers_sock.parent == home.run


def test_every_worker_works_in_one_empty_directory_that_nothing_fills(theater: Theater) -> None:
    """Workers (spares, restarts, workers forked on demand) all work in <home>/run/workers, private and
    empty: a directory per worker would grow by one entry per restart for as long as the home is used. A
    start empties what an earlier run left there, since each worker checks that it is empty."""
    home = theater.home
    with theater.client() as c:
        for name in ("a", "b"):
            c.spawn(theater.manifest(name, "counter.wat"))
            assert c.call(name, b"x") == b"1"
        for _ in range(3):  # each restart takes a spare, and the fork-server makes the next one
            pid = ps(c, "a")["pid"]
            os.kill(pid, signal.SIGKILL)
            wait_running(c, "a", pid)
        pids = [ps(c, name)["pid"] for name in ("a", "b")]
        assert all(os.readlink(f"/proc/{pid}/cwd") == str(home.workdir) for pid in pids)
        assert stat.S_IMODE(home.workdir.stat().st_mode) == 0o700
        assert list(home.workdir.iterdir()) == []
    theater.stop()
    (home.workdir / "left-over").mkdir(parents=True)
    (home.workdir / "left-over" / "file").write_bytes(b"x")
    theater.start()
    assert list(home.workdir.iterdir()) == []
    with theater.client() as c:
        wait_running(c, "a")
        assert c.call("a", b"x") == b"2" and c.call("b", b"x") == b"2"
    theater.stop()
    elsewhere = theater.dir / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_bytes(b"x")
    home.workdir.rmdir()
    home.workdir.symlink_to(elsewhere)  # replaced by a directory of its own, the link's target untouched
    theater.start()
    assert not home.workdir.is_symlink() and list(home.workdir.iterdir()) == []
    assert (elsewhere / "keep").read_bytes() == b"x"
    with theater.client() as c:
        wait_running(c, "a")
        assert c.call("a", b"x") == b"3"
    assert_verified(theater)


# --- 8. orderly shutdown ----------------------------------------------------------


def test_down_stops_every_worker_and_start_resumes_desired_state(theater: Theater) -> None:
    """`theater down` ends every worker and the supervisor (exit 0); the next start resumes what should run."""
    with theater.client() as c:
        for name in ("a", "b", "off"):
            c.spawn(theater.manifest(name, "counter.wat"))
        assert c.call("a", b"x") == b"1"
        assert c.call("b", b"x") == b"1"
        assert c.stop("off")["status"] == "stopped"
        workers = [a["pid"] for a in c.ps() if a["pid"] is not None]
    assert len(workers) == 2
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "--home", str(theater.home.root), "down"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "supervisor down" in done.stdout
    assert theater.proc is not None
    assert theater.proc.wait(timeout=20) == 0
    assert all(gone(pid) for pid in workers)  # reaped by the supervisor before it exited
    assert not theater.home.token.exists() and not theater.home.control_sock.exists()
    for name in ("a", "b"):
        last = records(theater, name)[-1]
        assert last.kind is Kind.EXIT and last.fields()["reason"] == "shutdown"
    assert_verified(theater)

    theater.start()
    with theater.client() as c:
        for name in ("a", "b"):
            assert wait_running(c, name)["pid"] not in workers
        assert ps(c, "off")["status"] == "stopped"
        assert ps(c, "off")["pid"] is None
        assert c.call("a", b"y") == b"2"
        assert c.call("b", b"y") == b"2"
        with pytest.raises(ClientError) as refused:
            c.call("off", b"y")
        assert refused.value.code == "refused"
    for name in ("a", "b"):
        chain = records(theater, name)
        assert [e.fields()["reason"] for e in of(chain, Kind.EXIT)] == ["shutdown"]  # no supervisor-restart
        assert len(of(chain, Kind.WORKER_KEY)) == 1
    assert_verified(theater)


@pytest.mark.parametrize("change", ["deleted", "edited"])
def test_an_agent_only_ever_runs_the_component_it_was_spawned_with(theater: Theater, change: str) -> None:
    """The component file deleted or edited under a running agent: a restart still loads the compiled
    artifact of the spawned hash; once no artifact is left, the next worker reports load-failed
    naming the cause, and the agent stops without a restart loop."""
    component = theater.dir / "mine.wat"
    component.write_bytes((Path(__file__).parent / "components" / "counter.wat").read_bytes())
    path = theater.dir / "mine.toml"
    path.write_text(f'name = "mine"\ncomponent = "{component}"\n')
    with theater.client() as c:
        c.spawn(path)
        assert c.call("mine", b"x") == b"1"
        if change == "deleted":
            component.unlink()
        else:
            component.write_bytes((Path(__file__).parent / "components" / "echo.wat").read_bytes())
        pid = ps(c, "mine")["pid"]
        os.kill(pid, signal.SIGKILL)
        pid = wait_running(c, "mine", pid)["pid"]
        assert c.call("mine", b"x") == b"2"  # the counter it was spawned as, its state restored
        for cached in (theater.home.root / "cache").glob("*.*"):
            cached.unlink()
        os.kill(pid, signal.SIGKILL)
        info = wait_status(c, "mine", "failed")
        cause = "cannot read" if change == "deleted" else "changed since it was spawned (sha256 mismatch)"
        assert "load-failed" in info["last_exit"] and cause in info["last_exit"], info["last_exit"]
        assert info["restarts"] == 2
    [*_, last] = records(theater, "mine")
    assert last.kind is Kind.EXIT and last.fields()["reason"] == "load-failed"
    assert_verified(theater)


def test_calls_sent_ahead_of_a_crash_run_once_in_the_next_worker(theater: Theater) -> None:
    """The supervisor sends a worker its next calls before their turn. When one of them crashes the agent,
    the worker runs none of the calls sent after it: the next worker runs each of them, once, in order, from
    the state committed before the crash."""
    with theater.client() as c:
        c.spawn(theater.manifest("counter", "trap_on.wat"))
        token = theater.home.token.read_text().strip()
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(theater.home.control_endpoint)
        messages = [b"a", b"trap", b"b", b"c", b"d", b"e"]
        for rid, message in enumerate(messages, 1):  # one burst: all queued in one turn of the supervisor's loop
            body = {"op": "send", "id": rid, "token": token, "agent": "counter"}
            sock.send_multipart([wire.header(wire.ClientType.REQUEST), wire.encode_json(body), message])
        for _ in messages:
            assert sock.poll(30_000), "no reply to a send"
            sock.recv_multipart()
        sock.close(0)
        assert c.call("counter", b"f") == b"6"  # a and b..f: five counted on 1, the trap not at all
    chain = records(theater, "counter")
    handled = [(r.fields()["message"], r.fields()["status"]) for r in chain if r.kind is Kind.HANDLE]
    assert handled == [(b"a", "ok"), (b"trap", "trap"), *((m, "ok") for m in (b"b", b"c", b"d", b"e", b"f"))]
    kinds = [r.kind for r in chain]
    assert kinds.count(Kind.EXIT) == 1 and kinds.count(Kind.WORKER_KEY) == 1
    trap = next(i for i, r in enumerate(chain) if r.kind is Kind.HANDLE and r.fields()["message"] == b"trap")
    assert kinds[trap + 1:trap + 3] == [Kind.EXIT, Kind.WORKER_KEY]  # the crashed worker ran nothing after it
