"""Limits and failure classes, end to end: real supervisor, real workers, real components.

Every failure is checked by its exact status code and a fragment of its message,
then the agent is called again, and the home's chains are verified offline. A
guest ``err`` is an answer: the same worker serves the next call. Every other
failed call is a crash: the supervisor kills the worker (exit reason "trap",
detail "<status>: <message>"), the agent's supervisor restarts it on a new worker
process, and the next call is served from the last committed state. Waits are
on replies or on ``ps`` with deadlines, never sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from conftest import LAB_POLICY, Theater, assert_verified, ps, records, wait_running, wait_until, write_lab_policy

from supervisor._agent import TENANT_QUEUED_BYTES
from supervisor._audit import open_readonly
from supervisor._workers import PIPELINE_DEPTH
from theater import wire
from theater.client import Client, ClientError
from theater.errors import ProtocolError
from theater.records import Kind, sha256

KIB, MIB = 1024, 1024 * 1024
THEATER_CLI = Path(sys.executable).with_name("theater")


# --- helpers --------------------------------------------------------------------


def spawn(theater: Theater, c: Client, name: str, component: str, **extra: object) -> dict:
    summary = c.spawn(theater.manifest(name, component, **extra))
    assert summary["status"] == "running" and summary["pid"]
    return summary


def fails(c: Client, name: str, message: bytes, code: str, fragment: str, timeout: float = 10.0) -> str:
    """Call and expect an error reply with exactly ``code`` whose message contains ``fragment``."""
    with pytest.raises(ClientError) as info:
        c.call(name, message, timeout=timeout)
    assert info.value.code == code, f"{info.value.code}: {info.value}"
    assert fragment in str(info.value), str(info.value)
    return str(info.value)


def crashes(c: Client, name: str, message: bytes, code: str, fragment: str, timeout: float = 10.0) -> dict:
    """A call that fails with ``code`` and crashes the agent: its worker is replaced, restarts +1.

    Returns the ps row of the agent on its new worker.
    """
    before = ps(c, name)
    assert before["status"] == "running" and before["pid"], before
    fails(c, name, message, code, fragment, timeout)
    after = wait_running(c, name, before["pid"], restarts=before["restarts"] + 1)
    assert after["incarnation"] == before["incarnation"] + 1
    assert after["instance_restarts"] == before["instance_restarts"]  # a crash is not an instance restart
    return after


def crash_exits(theater: Theater, name: str) -> list[dict]:
    """Each worker's end and the next worker's key: the exit records, checked to be followed by a worker-key."""
    chain = records(theater, name, check_seq=False)
    out = []
    for r in chain:
        if r.kind is Kind.EXIT:
            nxt = chain[r.seq + 1]
            assert nxt.kind is Kind.WORKER_KEY, nxt.kind
            assert nxt.fields()["incarnation"] == r.fields()["incarnation"] + 1
            assert nxt.state_hash == r.state_hash  # the new worker starts from the last committed state
            out.append(r.fields())
    return out


def handles(theater: Theater, name: str) -> list[dict]:
    return [r.fields() for r in records(theater, name, check_seq=False) if r.kind is Kind.HANDLE]


def stored_state(theater: Theater, name: str) -> bytes:
    db = open_readonly(theater.home.store)
    try:
        (state,) = db.execute("SELECT state FROM agents WHERE name=?", (name,)).fetchone()
    finally:
        db.close()
    return state


def send_burst(theater: Theater, agent: str, messages: list[bytes], timeout: float = 30.0) -> list[dict]:
    """Pipeline one ``send`` request per message on one socket, then collect every reply body in order."""
    token = theater.home.token.read_text().strip()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(theater.home.control_endpoint)
    try:
        for rid, data in enumerate(messages, 1):
            body = {"op": "send", "id": rid, "token": token, "agent": agent}
            sock.send_multipart([wire.header(wire.ClientType.REQUEST), wire.encode_json(body), data])
        replies: dict[int, dict] = {}
        deadline = time.monotonic() + timeout
        while len(replies) < len(messages):
            remaining = deadline - time.monotonic()
            assert remaining > 0 and sock.poll(int(remaining * 1000) + 1), f"only {len(replies)} replies"
            frames = sock.recv_multipart()
            body = wire.decode_json(frames[1], "reply")
            replies[body["id"]] = body
        return [replies[rid] for rid in range(1, len(messages) + 1)]
    finally:
        sock.close(0)


# --- echo: the byte boundary and the message size limit -----------------------------------


def test_echo_round_trips_every_byte_up_to_the_limit(theater: Theater) -> None:
    """Echo returns 0 bytes, 1 byte, all 256 byte values and exactly max_message_bytes unchanged."""
    with theater.client() as c:
        spawn(theater, c, "echo", "echo.wat", limits={"max_message_bytes": 64 * KIB})
        assert c.call("echo", b"") == b""
        assert c.call("echo", b"\x00") == b"\x00"
        assert c.call("echo", b"\x00\xff") == b"\x00\xff"
        every = bytes(range(256))
        assert c.call("echo", every) == every
        full = every * (64 * KIB // 256)
        assert len(full) == 64 * KIB
        assert c.call("echo", full) == full
        assert [h["reply"] for h in handles(theater, "echo")] == [b"", b"\x00", b"\x00\xff", every, full]
        assert ps(c, "echo")["instance_restarts"] == 0
    assert_verified(theater)


def test_echo_one_byte_over_is_refused_by_the_supervisor(theater: Theater) -> None:
    """A message one byte over max_message_bytes is refused before it reaches the worker; echo still serves."""
    with theater.client() as c:
        spawn(theater, c, "echo", "echo.wat", limits={"max_message_bytes": 64 * KIB})
        head = ps(c, "echo")["head"]
        fails(c, "echo", b"x" * (64 * KIB + 1), "refused", f"message of {64 * KIB + 1} bytes exceeds echo's max_message_bytes 65536")
        with pytest.raises(ClientError) as info:
            c.send("echo", b"y" * (64 * KIB + 1))
        assert info.value.code == "refused" and "max_message_bytes" in str(info.value)
        assert ps(c, "echo")["head"] == head  # nothing was recorded: the worker never saw it
        assert handles(theater, "echo") == []
        assert c.call("echo", b"still here") == b"still here"
    assert_verified(theater)


def test_echo_at_the_default_policy_limit_of_one_mib(theater: Theater) -> None:
    """Under the default policy exactly 1 MiB of every byte value echoes; 1 MiB + 1 is refused."""
    with theater.client() as c:
        spawn(theater, c, "echo", "echo.wat")
        full = bytes(range(256)) * (MIB // 256)
        assert c.call("echo", full, timeout=20) == full
        fails(c, "echo", full + b"!", "refused", "exceeds echo's max_message_bytes 1048576")
        assert c.call("echo", b"ok") == b"ok"
    assert_verified(theater)


# --- counter: the host owns state ----------------------------------------------------------


def test_counter_state_survives_fifty_calls_and_a_send(theater: Theater) -> None:
    """50 sequential calls reply 1..50, and a fire-and-forget send is counted before a later call."""
    with theater.client() as c:
        spawn(theater, c, "counter", "counter.wat")
        assert [c.call("counter", b"tick") for _ in range(50)] == [str(n).encode() for n in range(1, 51)]
        assert c.send("counter", b"fire and forget") == {"queued": 1}  # answered on enqueue, before the reply
        assert c.call("counter", b"after the send") == b"52"
        assert stored_state(theater, "counter") == b"52"
        assert handles(theater, "counter")[50]["message"] == b"fire and forget"
    assert_verified(theater)


# --- guest errors and traps -----------------------------------------------------------------


def test_guest_error_fails_one_message_and_the_worker_survives(theater: Theater) -> None:
    """err("boom: ...") is a guest-error; the same worker answers the next message the same way."""
    with theater.client() as c:
        pid = spawn(theater, c, "ge", "guest_error.wat")["pid"]
        assert fails(c, "ge", b"first", "guest-error", "boom:") == "boom: first"
        assert fails(c, "ge", b"\x00\xff", "guest-error", "boom:") == "boom: \x00\xff"
        long = fails(c, "ge", b"\xff" * 100_000, "guest-error", "boom: \xff\xff")
        assert long == "boom: " + "\xff" * (4096 - 6)  # guest errors are cut to 4096 characters
        entry = ps(c, "ge")
        assert (entry["pid"], entry["status"], entry["restarts"], entry["instance_restarts"]) == (pid, "running", 0, 3)
        assert [(h["status"], h["reply"]) for h in handles(theater, "ge")] == [("guest-error", None)] * 3
        assert stored_state(theater, "ge") == b""
    assert_verified(theater)


@pytest.mark.parametrize(("component", "fragment"), [("trap.wat", "unreachable"), ("div_zero.wat", "divide by zero")])
def test_trap_is_classified_and_crashes_the_agent_onto_a_new_worker(theater: Theater, component: str, fragment: str) -> None:
    """unreachable and integer divide by zero are "trap"; each crashes the agent, whose new worker traps again."""
    with theater.client() as c:
        pids = [spawn(theater, c, "t", component)["pid"]]
        pids.append(crashes(c, "t", b"one", "trap", fragment)["pid"])
        entry = crashes(c, "t", b"two", "trap", fragment)
        pids.append(entry["pid"])
        assert len(set(pids)) == 3
        assert (entry["restarts"], entry["instance_restarts"]) == (2, 0)
        assert [h["status"] for h in handles(theater, "t")] == ["trap", "trap"]
    exits = crash_exits(theater, "t")
    assert [(e["incarnation"], e["reason"]) for e in exits] == [(0, "trap"), (1, "trap")]
    assert all(e["detail"].startswith("trap: wasm trap: ") and fragment in e["detail"] for e in exits), exits
    assert_verified(theater)


def test_trap_keeps_the_committed_state(theater: Theater) -> None:
    """After 1, 2 and a trap, the new worker's first call replies 3: state neither lost nor double-counted."""
    with theater.client() as c:
        pid = spawn(theater, c, "tc", "trap_on.wat")["pid"]
        assert c.call("tc", b"a") == b"1"
        assert c.call("tc", b"b") == b"2"
        entry = crashes(c, "tc", b"trap", "trap", "wasm `unreachable` instruction executed")
        assert entry["pid"] != pid
        assert stored_state(theater, "tc") == b"2"
        assert c.call("tc", b"c") == b"3"
        after = ps(c, "tc")
        assert (after["pid"], after["restarts"], after["instance_restarts"]) == (entry["pid"], 1, 0)
        assert [h["status"] for h in handles(theater, "tc")] == ["ok", "ok", "trap", "ok"]
    [exit_] = crash_exits(theater, "tc")
    assert exit_ == {"incarnation": 0, "reason": "trap",
                     "detail": "trap: wasm trap: wasm `unreachable` instruction executed"}
    assert_verified(theater)


# --- fuel, deadline, memory, stack ------------------------------------------------------------


def test_spin_is_stopped_by_the_deadline(theater: Theater) -> None:
    """With fuel to spare, an endless loop ends at wall_time_ms with "deadline", a crash: the agent gets a new worker."""
    write_lab_policy(theater)
    with theater.client() as c:
        pids = [spawn(theater, c, "spin", "spin.wat", policy=LAB_POLICY,
                      limits={"wall_time_ms": 200, "fuel_per_call": 10**12})["pid"]]
        for _ in range(2):
            start = time.monotonic()
            entry = crashes(c, "spin", b"go", "deadline", "interrupt")
            elapsed = time.monotonic() - start
            assert elapsed >= 0.2, elapsed  # it ran until its deadline (the status above says the deadline stopped it)
            pids.append(entry["pid"])
        assert len(set(pids)) == 3
        assert (entry["restarts"], entry["instance_restarts"]) == (2, 0)
        assert [h["status"] for h in handles(theater, "spin")] == ["deadline", "deadline"]
    exits = crash_exits(theater, "spin")
    assert [e["reason"] for e in exits] == ["trap", "trap"]
    assert all(e["detail"].startswith("deadline: ") and "interrupt" in e["detail"] for e in exits), exits
    assert_verified(theater)


def test_spin_is_stopped_by_fuel(theater: Theater) -> None:
    """With a long deadline, an endless loop ends when fuel_per_call runs out, a crash: the agent gets a new worker."""
    write_lab_policy(theater)
    with theater.client() as c:
        pid = spawn(theater, c, "spin", "spin.wat", policy=LAB_POLICY,
                    limits={"wall_time_ms": 60000, "fuel_per_call": 1_000_000})["pid"]
        first = crashes(c, "spin", b"go", "out-of-fuel", "all fuel consumed", timeout=10)
        entry = crashes(c, "spin", b"go", "out-of-fuel", "all fuel consumed", timeout=10)
        assert len({pid, first["pid"], entry["pid"]}) == 3
        assert (entry["restarts"], entry["instance_restarts"]) == (2, 0)
        assert [(h["status"], h["fuel"]) for h in handles(theater, "spin")] == [("out-of-fuel", 1_000_000)] * 2
    exits = crash_exits(theater, "spin")
    assert [e["reason"] for e in exits] == ["trap", "trap"]
    assert all(e["detail"].startswith("out-of-fuel: ") and "all fuel consumed" in e["detail"] for e in exits), exits
    assert_verified(theater)


@pytest.mark.parametrize(("memory_bytes", "pages"), [(1 * MIB, 16), (4 * MIB, 64)])
def test_memory_bomb_stops_exactly_at_memory_bytes(theater: Theater, memory_bytes: int, pages: int) -> None:
    """memory.grow fails softly at exactly memory_bytes / 64 KiB pages, call after call."""
    with theater.client() as c:
        pid = spawn(theater, c, "bomb", "memory_bomb.wat", limits={"memory_bytes": memory_bytes})["pid"]
        assert fails(c, "bomb", b"grow", "guest-error", f"grew to {pages} pages") == f"grew to {pages} pages"
        assert fails(c, "bomb", b"again", "guest-error", "grew to") == f"grew to {pages} pages"
        assert ps(c, "bomb")["pid"] == pid
    assert_verified(theater)


def test_deep_recursion_is_a_stack_overflow(theater: Theater) -> None:
    """Unbounded recursion is "stack-overflow" (the worker process itself does not overflow); the agent crashes and restarts."""
    with theater.client() as c:
        pid = spawn(theater, c, "deep", "deep_recursion.wat")["pid"]
        first = crashes(c, "deep", b"down", "stack-overflow", "call stack exhausted")
        entry = crashes(c, "deep", b"down again", "stack-overflow", "call stack exhausted")
        assert len({pid, first["pid"], entry["pid"]}) == 3
        assert (entry["restarts"], entry["instance_restarts"]) == (2, 0)
        assert [h["status"] for h in handles(theater, "deep")] == ["stack-overflow", "stack-overflow"]
    exits = crash_exits(theater, "deep")
    assert [e["reason"] for e in exits] == ["trap", "trap"]
    # the worker was killed by the supervisor (SIGKILL), it did not die of the overflow
    assert all(e["detail"].startswith("stack-overflow: ") and "call stack exhausted" in e["detail"] for e in exits), exits
    assert_verified(theater)


# --- results the host must refuse -------------------------------------------------------------


def test_big_reply_at_and_over_the_limit(theater: Theater) -> None:
    """A reply of exactly max_message_bytes passes; one byte more is "too-large", commits nothing and crashes the agent."""
    with theater.client() as c:
        pid = spawn(theater, c, "big", "big_reply.wat", limits={"max_message_bytes": 64 * KIB})["pid"]
        assert c.call("big", b"65536") == b"x" * 65536
        entry = crashes(c, "big", b"65537", "too-large", "reply of 65537 bytes exceeds the limit of 65536")
        assert entry["pid"] != pid and entry["restarts"] == 1
        assert stored_state(theater, "big") == b""
        last = [r for r in records(theater, "big", check_seq=False) if r.kind is Kind.HANDLE][-1]
        assert last.state_hash == sha256(b"")
        assert (last.fields()["status"], last.fields()["reply"]) == ("too-large", None)
        assert c.call("big", b"3") == b"xxx"
        assert ps(c, "big")["pid"] == entry["pid"]
    [exit_] = crash_exits(theater, "big")
    assert exit_["reason"] == "trap"
    assert exit_["detail"].startswith("too-large: reply of 65537 bytes exceeds the limit of 65536"), exit_
    assert_verified(theater)


def test_bad_bytes_reply_is_a_malformed_result(theater: Theater) -> None:
    """A reply holding U+0100 is "malformed-result" naming the character, a crash; each new worker serves the next call."""
    with theater.client() as c:
        pids = [spawn(theater, c, "bad", "bad_bytes.wat")["pid"]]
        for _ in range(2):
            pids.append(crashes(c, "bad", b"x", "malformed-result", "reply has character U+0100 at 1")["pid"])
        assert len(set(pids)) == 3
        assert [h["status"] for h in handles(theater, "bad")] == ["malformed-result"] * 2
    exits = crash_exits(theater, "bad")
    assert [e["reason"] for e in exits] == ["trap", "trap"]
    assert all(e["detail"].startswith("malformed-result: ") and "U+0100 at 1" in e["detail"] for e in exits), exits
    assert_verified(theater)


@pytest.mark.parametrize(("component", "fragment"), [
    ("wrong_shape.wat", "export `handle` has type func(state: string, message: string) -> u32"),
    ("missing_export.wat", "component does not export `handle`"),
    ("grabber.wat", "not granted to this agent: theater:agent/kv@0.1.0 (granted: theater:agent/runtime@0.1.0); "
                    "the agent's policy 'default' does not grant kv"),
])
def test_unrunnable_component_fails_to_spawn(theater: Theater, component: str, fragment: str) -> None:
    """A wrong export type, a missing export or a denied import is "spawn-failed"; the agent is failed."""
    with theater.client() as c:
        with pytest.raises(ClientError) as info:
            c.spawn(theater.manifest("nope", component))
        assert info.value.code == "spawn-failed"
        assert "load-failed" in str(info.value) and fragment in str(info.value), str(info.value)
        entry = ps(c, "nope")
        assert (entry["status"], entry["pid"]) == ("failed", None)
        assert fragment in entry["last_exit"]
        fails(c, "nope", b"hello?", "refused", "agent nope is failed")
        kinds = [r.kind for r in records(theater, "nope", check_seq=False)]
        assert kinds == [Kind.GENESIS, Kind.EXIT]
        assert records(theater, "nope", check_seq=False)[-1].fields()["reason"] == "load-failed"
    assert_verified(theater)


# --- recorded host calls and their limits -------------------------------------------------------


def test_random_reply_is_the_recorded_host_output(theater: Theater) -> None:
    """random-bytes gives 16 fresh bytes per call, and the chain records exactly what the guest got."""
    with theater.client() as c:
        agent_id = spawn(theater, c, "rnd", "random.wat")["id"]
        first, second = c.call("rnd", b"1"), c.call("rnd", b"2")
    assert len(first) == len(second) == 16 and first != second
    out = subprocess.run([str(THEATER_CLI), "--home", str(theater.home.root), "events", "rnd", "--json"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    events = [json.loads(line) for line in out.splitlines()]
    calls = [e["fields"] for e in events if e["kind"] == "host-call"]
    assert [(f["function"], f["interface"]) for f in calls] == [
        ("self-id", "theater:agent/runtime@0.1.0"), ("random-bytes", "theater:agent/runtime@0.1.0")] * 2
    assert {bytes.fromhex(f["output"]).decode() for f in calls if f["function"] == "self-id"} == {agent_id}
    randoms = [f for f in calls if f["function"] == "random-bytes"]
    assert [bytes.fromhex(f["output"]) for f in randoms] == [first, second]
    assert all(bytes.fromhex(f["input"]) == (16).to_bytes(4, "big") for f in randoms)
    replies = [bytes.fromhex(e["fields"]["reply"]) for e in events if e["kind"] == "handle"]
    assert replies == [first, second]
    assert_verified(theater)


def test_counter_logs_once_and_calls_now_once_per_call(theater: Theater) -> None:
    """At max_logs_per_call = 1 and max_host_calls_per_call = 1 the counter (one log, one now) still runs."""
    with theater.client() as c:
        spawn(theater, c, "counter", "counter.wat", limits={"max_logs_per_call": 1, "max_host_calls_per_call": 1})
        assert [c.call("counter", b"") for _ in range(3)] == [b"1", b"2", b"3"]
    after_init = [r for r in records(theater, "counter", check_seq=False) if r.seq > 1]
    assert [r.kind for r in after_init] == [Kind.LOG, Kind.HOST_CALL, Kind.HANDLE] * 3
    assert {(f["level"], f["message"]) for f in (r.fields() for r in after_init if r.kind is Kind.LOG)} == {("info", "tick")}
    assert {r.fields()["function"] for r in after_init if r.kind is Kind.HOST_CALL} == {"now"}
    assert_verified(theater)


@pytest.mark.parametrize(("component", "limit", "fragment", "state"), [
    ("counter.wat", "max_logs_per_call", "more than 0 log lines in one call (max_logs_per_call)", b"0"),
    ("counter.wat", "max_host_calls_per_call", "more than 0 host calls in one call (max_host_calls_per_call)", b"0"),
    ("random.wat", "max_random_bytes", "random-bytes(16) exceeds max_random_bytes 15", b""),
])
def test_exhausted_host_budget_fails_every_call(theater: Theater, component: str, limit: str, fragment: str,
                                                state: bytes) -> None:
    """A host budget below what the guest asks for makes every call "host-limit", a crash each time; state stays at its init value."""
    value = 15 if limit == "max_random_bytes" else 0
    with theater.client() as c:
        # Four crashes in a row: more than the default intensity (3 restarts in 5 s) allows.
        pids = [spawn(theater, c, "hl", component, limits={limit: value},
                      restart={"intensity": 10, "period_ms": 60000})["pid"]]
        for _ in range(4):
            pids.append(crashes(c, "hl", b"tick", "host-limit", fragment)["pid"])
        entry = ps(c, "hl")
        assert len(set(pids)) == 5
        assert (entry["status"], entry["restarts"], entry["instance_restarts"]) == ("running", 4, 0)
        assert stored_state(theater, "hl") == state
        assert [h["status"] for h in handles(theater, "hl")] == ["host-limit"] * 4
    exits = crash_exits(theater, "hl")
    assert [e["reason"] for e in exits] == ["trap"] * 4
    assert all(e["detail"].startswith("host-limit: ") and fragment in e["detail"] for e in exits), exits
    assert_verified(theater)


def test_long_log_lines_are_truncated_and_flagged(theater: Theater) -> None:
    """With max_log_bytes = 3 the counter's "tick" is recorded as "tic", flagged truncated; the call succeeds."""
    with theater.client() as c:
        spawn(theater, c, "counter", "counter.wat", limits={"max_log_bytes": 3})
        assert c.call("counter", b"") == b"1"
    (log,) = [r.fields() for r in records(theater, "counter", check_seq=False) if r.kind is Kind.LOG]
    assert log == {"level": "info", "message": "tic", "truncated": 1}
    assert_verified(theater)


# --- the mailbox ----------------------------------------------------------------------------


def test_message_flood_is_bounded_by_the_mailbox_and_loses_nothing(theater: Theater) -> None:
    """200 pipelined sends to a mailbox of 50: the excess is refused, every accepted one is counted."""
    with theater.client() as c:
        spawn(theater, c, "counter", "counter.wat", limits={"mailbox": 50})
        replies = send_burst(theater, "counter", [str(i).encode() for i in range(200)])
        accepted = [i for i, r in enumerate(replies) if r["ok"]]
        refused = [r["error"] for r in replies if not r["ok"]]
        assert accepted[:50] == list(range(50))  # the mailbox cannot be full before 50 are queued
        assert refused, "a burst of 200 into a mailbox of 50 refused nothing"
        assert all(e["code"] == "refused" and "mailbox is full (50 messages)" in e["message"] for e in refused)
        assert len(accepted) + len(refused) == 200
        # Each handled message adds three records (log, now, handle) after genesis and init.
        target, head, deadline = 1 + 3 * len(accepted), ps(c, "counter")["head"], time.monotonic() + 30
        while head < target:
            assert time.monotonic() < deadline, f"head {head} never reached {target}"
            head = c.wait_events("counter", head, 10_000)
        assert c.call("counter", b"last") == str(len(accepted) + 1).encode()
        assert [h["message"] for h in handles(theater, "counter")][:-1] == [str(i).encode() for i in accepted]
    assert_verified(theater)


# --- replies and requests held for their answers ---------------------------------------------


def test_a_reply_longer_than_any_request_reaches_the_client_whole(theater: Theater) -> None:
    """A request's JSON is read up to 1 MiB, but a listing of a large home is longer (``ps`` of some 4,300
    agents): the client reads a reply up to its ``max_reply_bytes`` and past that names the limit. Tenants
    with long lists of policies make a long listing without thousands of workers."""
    policies = [f"p{i:031d}" for i in range(40)]
    with theater.client() as c:
        for i in range(700):
            c.tenant_add(f"t{i:04d}", zmq.curve_keypair()[0].decode(), policies=policies, routes=policies)
        listing = c.tenants()["tenants"]
        assert [t["name"] for t in listing] == [f"t{i:04d}" for i in range(700)]
        assert all(t["policies"] == policies and t["routes"] == policies for t in listing)
        size = len(wire.encode_reply({"id": 1, "ok": True, "result": c.tenants()}))  # as the next client's first
        assert size > wire.MAX_JSON_BYTES, size
    with Client(theater.home, max_reply_bytes=size - 1) as c:
        with pytest.raises(ProtocolError, match=rf"reply of {size} bytes exceeds this client's limit of {size - 1} "):
            c.tenants()
        assert c.ping()["agents"] == 0  # the same client reads the next, shorter reply


@pytest.mark.parametrize("name", ["agent-é-代理", "lone-\udc80-surrogate"])
def test_a_request_carries_any_text_both_ways(theater: Theater, name: str) -> None:
    """A request goes as UTF-8 JSON, or escaped when it holds what UTF-8 cannot carry (a lone surrogate): the
    supervisor reads either and names the text back in its answer, itself written either way."""
    request = wire.encode_request({"agent": name})
    assert (b"\\udc80" in request) if "\udc80" in name else (name.encode() in request)
    with theater.client() as c, pytest.raises(ClientError) as refused:
        c.call(name, b"x")
    assert refused.value.code == "not-found" and repr(name) in str(refused.value)


def _collect(sock: zmq.Socket, count: int, timeout: float = 60.0) -> dict[int, dict]:
    replies: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    while len(replies) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0 and sock.poll(int(remaining * 1000) + 1), f"only {len(replies)} of {count} replies"
        body = wire.decode_reply(sock.recv_multipart()[1])
        replies[body["id"]] = body
    return replies


def test_requests_held_for_their_answers_are_bounded_per_requester(theater: Theater) -> None:
    """A `wait` is held until a record or its deadline, a `verify` until its chains are read: each costs the
    supervisor memory (and a verify a thread's time) until it is answered, so a requester may hold at most
    MAX_WAITS and MAX_VERIFIES of them; past that it is refused at once, and may ask again later."""
    from supervisor._control import MAX_VERIFIES, MAX_WAITS

    token = theater.home.token.read_text().strip()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(theater.home.control_endpoint)
    try:
        with theater.client() as c:
            spawn(theater, c, "counter", "counter.wat")
            head = ps(c, "counter")["head"]
            for rid in range(1, MAX_WAITS + 2):
                body = {"op": "wait", "id": rid, "token": token, "agent": "counter", "after": head, "wait_ms": 600_000}
                sock.send_multipart([wire.header(wire.ClientType.REQUEST), wire.encode_json(body)])
            [refused] = _collect(sock, 1).values()  # the others are held until the next record
            assert refused["id"] == MAX_WAITS + 1 and refused["error"]["code"] == "refused", refused
            assert f"the operator already has {MAX_WAITS} wait requests waiting" in refused["error"]["message"]
            assert c.call("counter", b"x") == b"1"  # a record: every held wait is answered
            woken = _collect(sock, MAX_WAITS)
            assert sorted(woken) == list(range(1, MAX_WAITS + 1))
            assert all(r["ok"] and r["result"]["head"] > head for r in woken.values())
            assert c.wait_events("counter", 10**6, 1) > head  # held again once answered (1 ms: then its deadline)

            # Ten verifies at once (sent while the supervisor is stopped, so they are read together): the
            # first MAX_VERIFIES are held while the verify thread reads the chains; the rest are refused.
            pid = int(theater.home.pid_file.read_text())
            os.kill(pid, signal.SIGSTOP)
            try:
                for rid in range(1, 11):
                    body = {"op": "verify", "id": 100 + rid, "token": token}
                    sock.send_multipart([wire.header(wire.ClientType.REQUEST), wire.encode_json(body)])
            finally:
                os.kill(pid, signal.SIGCONT)
            answers = list(_collect(sock, 10).values())
            verified = [r for r in answers if r["ok"]]
            refused_all = [r for r in answers if not r["ok"]]
            assert len(verified) >= MAX_VERIFIES and refused_all, answers
            assert all(r["result"]["chains"] and all(ch["ok"] for ch in r["result"]["chains"]) for r in verified)
            assert all(f"already has {MAX_VERIFIES} verify requests" in r["error"]["message"] for r in refused_all)
            assert c.verify()  # and again once they are answered
    finally:
        sock.close(0)


def test_a_local_client_that_pipelines_thousands_of_requests_gets_every_answer(theater: Theater) -> None:
    """Ten thousand requests sent before any reply is read are all answered: past ZeroMQ's default
    high-water mark (1,000 queued to one client) the replies were dropped without a word (20,000 got 3,667)."""
    token = theater.home.token.read_text().strip()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(theater.home.control_endpoint)
    try:
        for rid in range(1, 10_001):
            body = {"op": "ping", "id": rid, "token": token}
            sock.send_multipart([wire.header(wire.ClientType.REQUEST), wire.encode_json(body)])
        replies = _collect(sock, 10_000)
        assert sorted(replies) == list(range(1, 10_001)) and all(r["ok"] for r in replies.values())
    finally:
        sock.close(0)


def test_a_tenants_agents_hold_at_most_their_share_of_queued_bytes(theater: Theater) -> None:
    """An agent's mailbox takes 1,000 messages of 1 MiB by default: a client could make the supervisor hold a
    gigabyte for each agent its tenant has. Messages waiting in a tenant's mailboxes are bounded in bytes
    (TENANT_QUEUED_BYTES); past it, its senders are refused until its agents take some."""
    with theater.client() as c:
        c.spawn(theater.manifest("e", "echo.wat"))
        pid = ps(c, "e")["pid"]
        os.kill(pid, signal.SIGSTOP)  # takes nothing from its mailbox
        data = b"x" * (1 << 20)
        accepted = 0
        try:
            with pytest.raises(ClientError) as refused:
                while accepted <= (TENANT_QUEUED_BYTES >> 20) + PIPELINE_DEPTH:
                    c.send("e", data)
                    accepted += 1
        finally:
            os.kill(pid, signal.SIGCONT)
        assert f"the operator's agents already hold {TENANT_QUEUED_BYTES:,} bytes of messages waiting in mailboxes, " \
               f"or sent to them by calls not yet committed (at most {TENANT_QUEUED_BYTES:,})" in str(refused.value)
        # Those the worker was sent ahead of their turn are in its socket, not in the mailbox.
        assert TENANT_QUEUED_BYTES >> 20 <= accepted <= (TENANT_QUEUED_BYTES >> 20) + PIPELINE_DEPTH

        def taken() -> bool:
            try:
                return c.call("e", b"again", timeout=60) == b"again"
            except ClientError as exc:
                assert "bytes of messages waiting" in str(exc), exc
                return False

        wait_until(taken, 120, "the agent to take its messages")


def _raw_replies(theater: Theater, bodies: list[bytes], data: dict[int, bytes] | None = None) -> list[dict]:
    """Send each JSON body as it is written (ids 1..n) on one socket; every reply body, in order."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(theater.home.control_endpoint)
    try:
        for i, body in enumerate(bodies, 1):
            extra = [data[i]] if data and i in data else []
            sock.send_multipart([wire.header(wire.ClientType.REQUEST), body, *extra])
        replies: dict[int, dict] = {}
        deadline = time.monotonic() + 30
        while len(replies) < len(bodies):
            remaining = deadline - time.monotonic()
            assert remaining > 0 and sock.poll(int(remaining * 1000) + 1), f"only {len(replies)} replies"
            body = wire.decode_json(sock.recv_multipart()[1], "reply")
            replies[body["id"]] = body
        return [replies[i] for i in range(1, len(bodies) + 1)]
    finally:
        sock.close(0)


def test_odd_strings_paths_and_numbers_in_requests_are_named_refusals(theater: Theater, tmp_path: Path) -> None:
    """Each of these was answered `internal` (a TypeError, UnicodeEncodeError, OverflowError, ValueError or
    RuntimeError inside the supervisor); an upload's `tenant` was ignored, the agent made the operator's."""
    token = theater.home.token.read_text().strip()
    loop = tmp_path / "loop.toml"
    loop.symlink_to(loop)
    requests = [
        {"op": "ping", "id": 1, "token": "\u00e9"},  # a token that is not ASCII
        {"op": "events", "id": 2, "token": token, "agent": "\ud800"},  # a lone surrogate escape
        {"op": "usage", "id": 3, "token": token, "tenant": "\ud800"},
        {"op": "events", "id": 4, "token": token, "agent": "a", "after": 2**63},
        {"op": "spawn", "id": 5, "token": token, "manifest": "/tmp/a\u0000b.toml"},
        {"op": "spawn", "id": 6, "token": token, "manifest": str(loop)},
        {"op": "spawn", "id": 7, "token": token, "manifest_text": 'name = "x"\ncomponent = "x.wat"\n',
         "component_kind": "wat", "tenant": "bob"},
    ]
    replies = _raw_replies(theater, [json.dumps(r).encode() for r in requests],
                           {7: (Path(__file__).parent / "components" / "echo.wat").read_bytes()})
    errors = [(r["error"]["code"], r["error"]["message"]) for r in replies]
    assert errors[0] == ("refused", "bad control token")
    assert errors[1][0] == errors[2][0] == "refused" and "not valid UTF-8" in errors[1][1] + errors[2][1]
    assert errors[3] == ("refused", "events needs an integer after in -1..2^63-1")
    assert errors[4][0] == "config" and "not a path a file can have" in errors[4][1], errors[4]
    assert errors[5][0] == "config" and "a symlink loop" in errors[5][1], errors[5]
    assert errors[6] == ("refused", "a spawn with manifest_text takes no tenant: the agent is the requester's")
    with theater.client() as c:
        assert c.ping()["agents"] == 0
    assert "internal error" not in (theater.dir / "supervisor.out").read_text()


def test_sends_not_yet_committed_count_against_a_tenants_queued_bytes() -> None:
    """A message an agent sends enters its target's mailbox when the sending call commits; until then its bytes
    are held for the target's tenant, so calls sending at once cannot take that tenant past its bound."""
    from supervisor._agent import queue_room, reserve, unreserve

    tenant = "bound-test"
    assert queue_room(tenant, TENANT_QUEUED_BYTES) is None
    reserve(tenant, TENANT_QUEUED_BYTES - 10)
    try:
        assert queue_room(tenant, 10) is None
        refused = queue_room(tenant, 11)
        assert refused is not None and "or sent to them by calls not yet committed" in refused
    finally:
        unreserve(tenant, TENANT_QUEUED_BYTES - 10)
    assert queue_room(tenant, TENANT_QUEUED_BYTES) is None
