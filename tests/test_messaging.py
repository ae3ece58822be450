"""The messaging capability: real agents (tests/components/messenger.wat) sending to and calling each other
through a real supervisor. Every error case of `call-error` is reached for real, both chains of a
conversation are checked against each other, and cycles fail at once instead of timing out."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import Theater, assert_verified, of, ps, records, start_after_crash, wait_running, wait_until

from theater.client import Client, ClientError
from theater.records import Kind, Record

COMPONENT = "messenger.wat"
MESSAGING = "theater:agent/messaging@0.1.0"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def lab_policy(theater: Theater) -> None:
    """`messaging-lab`: the built-in messaging policy with a 60 s call, for agents that must stay busy."""
    text = (ROOT / "policies" / "messaging.toml").read_text()
    assert "wall_time_ms = 5000 " in text
    theater.home.policies.mkdir(exist_ok=True)
    (theater.home.policies / "messaging-lab.toml").write_text(text.replace("wall_time_ms = 5000 ", "wall_time_ms = 60000 "))


def agent(t: Theater, name: str, policy: str = "messaging", **extra: Any) -> Path:
    return t.manifest(name, COMPONENT, policy=policy, capabilities=["runtime", "messaging"], **extra)


def spawn(t: Theater, c: Client, *names: str, **extra: Any) -> dict[str, str]:
    """Spawn messengers; their ids by name."""
    return {name: c.spawn(agent(t, name, **extra))["id"] for name in names}


def ask(c: Client, name: str, text: str, timeout: float = 30.0) -> str:
    reply = c.call(name, text.encode(), timeout=timeout)
    assert reply is not None
    return reply.decode()


def host_calls(t: Theater, name: str, function: str) -> list[dict[str, Any]]:
    return [r.fields() for r in records(t, name) if r.kind is Kind.HOST_CALL and r.fields()["function"] == function]


def answer_of(fields: dict[str, Any]) -> dict[str, Any]:
    """A served host call's recorded answer: its JSON (the data after NUL, if any, left out)."""
    return json.loads(fields["output"].split(b"\0", 1)[0])  # type: ignore[no-any-return]


def messages(t: Theater, name: str) -> list[Record]:
    return of(records(t, name), Kind.MESSAGE)


# --- the happy paths, and what the chains show ---------------------------------------------------------


def test_a_call_is_answered_and_both_chains_name_each_other(theater: Theater) -> None:
    """A calls B: B's receive sees A's id (set by the supervisor), A gets B's reply; A's recorded answer
    holds the message id and the hash of B's record, and B's record holds A's id and the same message id."""
    with theater.client() as c:
        ids = spawn(theater, c, "a", "b")
        assert ask(c, "a", "call:3000:b:hello:world") == "ok:ack:hello:world"
        assert ask(c, "b", "state") == f"{ids['a']}=hello:world\n"
        assert ask(c, "a", f"call:3000:{ids['b']}:by-id") == "ok:ack:by-id"  # an id is an address too
    [first, _] = host_calls(theater, "a", "call")
    assert json.loads(first["input"].split(b"\0")[0]) == {"to": "b", "timeout_ms": 3000}
    assert first["input"].split(b"\0", 1)[1] == b"hello:world"
    answer = answer_of(first)
    assert answer["ok"] is True and first["output"].split(b"\0", 1)[1] == b"ack:hello:world"
    [received, _] = messages(theater, "b")
    f = received.fields()
    assert (f["origin"], f["sender"], f["message"], f["reply"]) == ("call", uuid.UUID(ids["a"]).bytes,
                                                                    b"hello:world", b"ack:hello:world")
    assert f["message_id"].hex() == answer["message_id"]
    assert (received.hash.hex(), received.seq) == (answer["record"], answer["seq"])
    assert_verified(theater)


def test_a_send_is_delivered_once_the_sending_call_commits(theater: Theater) -> None:
    with theater.client() as c:
        ids = spawn(theater, c, "a", "b")
        assert ask(c, "a", "send:b:fire-and-forget") == "ok"
        wait_until(lambda: ask(c, "b", "state") == f"{ids['a']}=fire-and-forget\n", what="the message in b's state")
        assert ask(c, "b", "hello from a client") == "ack:hello from a client"
        assert ask(c, "b", "state").endswith("-=hello from a client\n")  # a client's message has no sender
    [sent] = host_calls(theater, "a", "send")
    [received] = messages(theater, "b")
    assert received.fields()["origin"] == "send"
    assert received.fields()["message_id"].hex() == answer_of(sent)["message_id"]
    assert_verified(theater)


def test_a_call_that_fails_sends_nothing(theater: Theater) -> None:
    """Sends take effect with the call that made them: a call that traps after sending sends nothing."""
    with theater.client() as c:
        spawn(theater, c, "a", "b")
        with pytest.raises(ClientError) as info:
            c.call("a", b"send-then-trap:b:never")
        assert info.value.code == "trap"
        wait_running(c, "a")
        assert ask(c, "a", "send:b:after") == "ok"
        wait_until(lambda: "after" in ask(c, "b", "state"), what="the later message")
        assert "never" not in ask(c, "b", "state")
    assert [m.fields()["message"] for m in messages(theater, "b")] == [b"after"]


# --- every error, for real --------------------------------------------------------------------------------


def test_unknown_address(theater: Theater) -> None:
    with theater.client() as c:
        spawn(theater, c, "a")
        assert ask(c, "a", "send:nobody:x").startswith("err:unknown-address:no agent named or with id 'nobody'")
        assert ask(c, "a", "call:100:nobody:x").startswith("err:unknown-address:")


def test_policy_must_let_both_sides_talk(theater: Theater) -> None:
    """Deny by default: A's `to` must name B, and B's `from` must name A; a target without the capability
    takes no messages at all."""
    with theater.client() as c:
        c.spawn(agent(theater, "a", messaging={"to": ["b*"], "from": []}))
        c.spawn(agent(theater, "b1", messaging={"to": [], "from": ["a"]}))
        c.spawn(agent(theater, "b2", messaging={"to": [], "from": ["z*"]}))
        c.spawn(agent(theater, "c1", messaging={"to": ["*"], "from": ["*"]}))
        c.spawn(theater.manifest("plain", "echo.wat"))
        assert ask(c, "a", "call:1000:b1:x") == "ok:ack:x"
        assert ask(c, "a", "send:b2:x").startswith("err:denied:b2's policy does not let it hear from a")
        assert ask(c, "a", "send:c1:x").startswith("err:denied:a's policy does not let it message c1")
        assert ask(c, "b1", "send:a:x").startswith("err:denied:b1's policy does not let it message a")
        assert ask(c, "c1", "send:a:x").startswith("err:denied:a's policy does not let it hear from c1")
        assert ask(c, "c1", "send:plain:x").startswith("err:denied:plain does not hold the messaging capability")


def test_not_running_target(theater: Theater) -> None:
    with theater.client() as c:
        spawn(theater, c, "a", "b")
        c.stop("b")
        assert ask(c, "a", "send:b:x") == "err:not-running:b is stopped"
        assert ask(c, "a", "call:100:b:x") == "err:not-running:b is stopped"


def test_too_large_for_the_target(theater: Theater) -> None:
    with theater.client() as c:
        spawn(theater, c, "a")
        c.spawn(agent(theater, "small", limits={"max_message_bytes": 16}))
        assert ask(c, "a", "send:small:" + "x" * 16) == "ok"
        assert ask(c, "a", "send:small:" + "x" * 17).startswith("err:too-large:a message of 17 bytes is more than 16")


def test_the_worker_bounds_the_address_and_the_sender_s_message(theater: Theater) -> None:
    """An address of more than 256 bytes of UTF-8 and a message longer than the sender's own max_message_bytes
    are refused by the sender's worker before anything is asked: the call fails with host-limit, naming the
    value, and nothing is recorded for it. At the bound, the supervisor answers as usual."""
    with theater.client() as c:
        c.spawn(agent(theater, "small", limits={"max_message_bytes": 100}, restart={"intensity": 100}))
        c.spawn(agent(theater, "a", restart={"intensity": 100}))
        spawn(theater, c, "b")

        def refused(name: str, text: bytes) -> str:
            pid = ps(c, name)["pid"]
            with pytest.raises(ClientError) as info:
                c.call(name, text)
            assert info.value.code == "host-limit", info.value
            wait_running(c, name, pid)
            return str(info.value)

        assert ask(c, "small", "big:100:b") == "ok"
        assert refused("small", b"big:101:b") == "messaging.send: the message of 101 bytes is more than 100"
        assert ask(c, "a", "send::x") == "err:unknown-address:an address is an agent's name or id, 1-256 bytes"
        assert ask(c, "a", f"send:{'q' * 256}:x") == f"err:unknown-address:no agent named or with id '{'q' * 256}'"
        assert refused("a", f"send:{'q' * 257}:x".encode()) == "messaging.send: the address is more than 256 bytes"
        # messenger.wat reads its message's bytes as latin-1: each 0xE9 is an 'é', two bytes of UTF-8
        assert c.call("a", b"send:" + b"\xe9" * 128 + b":x").startswith(b"err:unknown-address:no agent named")
        assert refused("a", b"send:" + b"\xe9" * 129 + b":x") == "messaging.send: the address is more than 256 bytes"
        assert refused("a", f"call:1000:{'q' * 257}:x".encode()) == "messaging.call: the address is more than 256 bytes"
    assert [answer_of(f).get("error") for f in host_calls(theater, "small", "send")] == [None]
    sent = host_calls(theater, "a", "send")
    assert [answer_of(f).get("error") for f in sent] == ["unknown-address"] * 3
    for name, failed in (("small", 1), ("a", 3)):
        assert [r.fields()["status"] for r in of(records(theater, name), Kind.HANDLE)].count("host-limit") == failed
    assert_verified(theater)


def test_mailbox_full_is_an_error_to_the_sender(theater: Theater) -> None:
    """Places for sends are held from the send: with a mailbox of 3, the fourth send of one call is refused,
    and the three that were taken arrive."""
    with theater.client() as c:
        ids = spawn(theater, c, "a")
        c.spawn(agent(theater, "b", limits={"mailbox": 3}))
        assert ask(c, "a", "sendn:5:b:m") == "err:3:mailbox-full:b's mailbox is full (3 messages)"
        wait_until(lambda: ask(c, "b", "state").count(f"{ids['a']}=m") == 3, what="three messages in b")


def test_call_timeout(theater: Theater) -> None:
    """The target spins until its own deadline (60 s here); the caller's 300 ms timeout answers first."""
    with theater.client() as c:
        spawn(theater, c, "a")
        c.spawn(agent(theater, "slow", policy="messaging-lab"))
        assert ask(c, "a", "call:300:slow:spin") == "err:timeout:no reply from slow within 300 ms"
        assert ask(c, "a", "call:3000:a-missing:x").startswith("err:unknown-address")  # a is free again


def test_a_call_longer_than_the_caller_s_wall_time_ends_the_call_at_its_deadline(theater: Theater) -> None:
    """The caller's call has 300 ms; it calls with a minute's timeout an agent that spins for seconds. Its
    wait is cut to what is left of its wall time, and that is what runs out: the call ends at its deadline
    (status `deadline`), and the guest never sees `timeout`."""
    text = (theater.home.policies / "messaging-lab.toml").read_text()
    (theater.home.policies / "messaging-spin.toml").write_text(
        text.replace("wall_time_ms = 60000 ", "wall_time_ms = 1500 ")
            .replace("fuel_per_call = 500000000 ", "fuel_per_call = 1000000000000 "))
    with theater.client() as c:
        c.spawn(agent(theater, "a", limits={"wall_time_ms": 300}))
        c.spawn(agent(theater, "slow", policy="messaging-spin"))
        started = time.monotonic()
        with pytest.raises(ClientError) as info:
            c.call("a", b"call:60000:slow:spin")
        assert info.value.code == "deadline", info.value
        assert str(info.value) == "wall_time_ms (300 ms) ran out while waiting on messaging.call"
        assert time.monotonic() - started < 10  # not the minute's timeout
    [asked] = host_calls(theater, "a", "call")
    assert 0 < json.loads(asked["input"].split(b"\0")[0])["timeout_ms"] <= 300
    assert answer_of(asked)["error"] == "timeout"  # the supervisor's answer, recorded; the guest did not run on
    [handled] = of(records(theater, "a"), Kind.HANDLE)
    assert handled.fields()["status"] == "deadline"


def test_target_crash_during_a_call(theater: Theater) -> None:
    with theater.client() as c:
        spawn(theater, c, "a", "b")
        pid = ps(c, "b")["pid"]
        reply = ask(c, "a", "call:3000:b:trap")
        assert reply.startswith("err:target-crashed:b's call failed: trap:"), reply
        wait_running(c, "b", pid)
        assert ask(c, "a", "call:3000:b:fail") == "err:guest-error:failed on purpose"
        assert ask(c, "a", "call:3000:b:fine") == "ok:ack:fine"


@pytest.mark.parametrize(("names", "expected"), [
    (["a"], "a -> a"),
    (["a", "b"], "b -> a -> b"),
    (["a", "b", "c"], "c -> a -> b -> c"),
])
def test_call_cycles_fail_at_once_naming_the_path(theater: Theater, names: list[str], expected: str) -> None:
    """A -> ... -> A: the last call of the ring is refused the moment it is made, with the path; each agent
    on the way passes the refusal back as its reply (timeouts here are a minute: none is waited for)."""
    with theater.client() as c:
        spawn(theater, c, *names)
        message = f"call:60000:{names[0]}:x"
        for name in reversed(names):
            message = f"call:60000:{name}:{message}"
        reply = ask(c, names[0], message.split(":", 3)[3])
        assert reply.endswith(f"err:cycle:the call would wait on itself: {expected}"), reply


def test_a_flooding_agent_fills_only_its_target_s_mailbox(theater: Theater) -> None:
    """A flood stops at the target's mailbox bound (the sender is told), the supervisor holds no more than
    that, and another agent's calls are answered meanwhile."""
    with theater.client() as c:
        spawn(theater, c, "flood", "quiet")
        c.spawn(agent(theater, "sink", policy="messaging-lab", limits={"mailbox": 50}))
        c.send("sink", b"spin")  # busy until its deadline: nothing leaves its mailbox
        for _ in range(3):
            reply = ask(c, "flood", "sendn:1000:sink:x")
            assert ":mailbox-full:" in reply, reply
            assert ps(c, "sink")["mailbox"] <= 50
            assert ask(c, "quiet", "still here") == "ack:still here"


def test_ungranted_import_is_refused_at_spawn(theater: Theater) -> None:
    with theater.client() as c:
        with pytest.raises(ClientError) as info:
            c.spawn(theater.manifest("m", COMPONENT))
        assert info.value.code == "spawn-failed"
        assert str(info.value).endswith(f"component imports capabilities not granted to this agent: {MESSAGING} "
                                        "(granted: theater:agent/runtime@0.1.0); the agent's policy 'default' does "
                                        "not grant messaging"), info.value


def test_events_trace_follows_a_message_across_agents(theater: Theater) -> None:
    """`theater events --trace ID`: the caller's recorded call and the receiver's message record, in order."""
    import subprocess
    import sys

    with theater.client() as c:
        spawn(theater, c, "a", "b")
        assert ask(c, "a", "call:3000:b:traced") == "ok:ack:traced"
    [sent] = host_calls(theater, "a", "call")
    message_id = answer_of(sent)["message_id"]
    proc = subprocess.run([sys.executable, "-m", "supervisor", "--home", str(theater.home.root), "events", "--trace",
                           message_id, "--json"], capture_output=True, text=True, timeout=60, check=True)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(e["agent"], e["kind"]) for e in lines] == [("b", "message"), ("a", "host-call")]
    assert lines[0]["fields"]["message_id"] == message_id


# --- sent messages are kept until delivered ------------------------------------------------------


def _stored_sends(t: Theater) -> int:
    db = sqlite3.connect(f"file:{t.home.store}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT count(*) FROM sends").fetchone()[0])
    finally:
        db.close()


def test_sends_committed_but_not_delivered_survive_a_supervisor_kill(theater: Theater) -> None:
    """A committed call's sends wait in the target's mailbox, in the supervisor's memory: a supervisor killed
    then lost them, though the sender's chain says they were sent. They are stored with the sending call and
    delivered by the next supervisor, each once and in order; a delivered one is not delivered again."""
    with theater.client() as c:
        spawn(theater, c, "a", "b")
        b_worker = next(a for a in c.ps() if a["name"] == "b")["pid"]
        os.kill(b_worker, signal.SIGSTOP)  # b takes nothing in: what a sends waits for it
        assert ask(c, "a", "sendn:20:b:kept") == "ok"
        assert _stored_sends(theater) == 20
    theater.kill()
    with contextlib.suppress(ProcessLookupError):  # it ended with its supervisor, or ends now
        os.kill(b_worker, signal.SIGKILL)
    start_after_crash(theater)
    sent = [answer_of(f)["message_id"] for f in host_calls(theater, "a", "send")]
    assert len(sent) == 20
    with theater.client() as c:
        wait_until(lambda: ask(c, "b", "state").count("=kept\n") == 20, what="the 20 messages in b's state")
    assert [m.fields()["message_id"].hex() for m in messages(theater, "b")] == sent
    assert _stored_sends(theater) == 0
    theater.kill()
    start_after_crash(theater)
    with theater.client() as c:
        assert ask(c, "b", "state").count("=kept\n") == 20  # none came twice
    assert len(messages(theater, "b")) == 20
    assert_verified(theater)


def test_sends_to_a_target_that_stops_are_dropped_and_forgotten(theater: Theater) -> None:
    """Messages waiting for a target that is stopped are dropped, as before: their stored sends go with them,
    so no later supervisor delivers them."""
    with theater.client() as c:
        spawn(theater, c, "a")
        c.spawn(agent(theater, "b", restart={"shutdown": "brutal_kill"}))
        os.kill(next(a for a in c.ps() if a["name"] == "b")["pid"], signal.SIGSTOP)
        assert ask(c, "a", "sendn:5:b:never") == "ok"
        assert _stored_sends(theater) == 5
        c.stop("b")
        assert _stored_sends(theater) == 0
    theater.kill()
    start_after_crash(theater)
    with theater.client() as c:
        c.restart("b")
        assert "never" not in ask(c, "b", "state")
    assert messages(theater, "b") == []
    assert_verified(theater)


def test_a_sent_message_that_fails_its_target_is_used_up_all_the_same(theater: Theater) -> None:
    """A message whose `receive` returns an error (or traps) is delivered: its stored send goes in the same
    transaction as the target's record of the failure, and no later supervisor delivers it again."""
    with theater.client() as c:
        spawn(theater, c, "a", "b")
        assert ask(c, "a", "send:b:fail") == "ok"
        wait_until(lambda: len(messages(theater, "b")) == 1, what="b's record of the message")
        assert messages(theater, "b")[0].fields()["status"] == "guest-error"
        assert _stored_sends(theater) == 0
    theater.kill()
    start_after_crash(theater)
    with theater.client() as c:
        assert ask(c, "b", "state") == ""
    assert len(messages(theater, "b")) == 1
    assert_verified(theater)


def test_sends_of_a_call_not_yet_committed_count_against_the_target_tenant_s_bound(theater: Theater) -> None:
    """A call's sends enter their targets' mailboxes when it commits; the bytes a tenant's mailboxes may hold
    (lowered here to 100,000) counted only what had entered, so one call could send past the bound. Each send
    now holds its bytes from the moment it is made: the fourth of 30,000 bytes is refused, in the call."""
    theater.stop()
    theater.start(extra=[sys.executable, str(ROOT / "tests" / "run_small_bound_supervisor.py"), str(theater.home.root),
                         "100000"])
    with theater.client() as c:
        spawn(theater, c, "a", "c")
        payload = "x" * 30_000
        reply = ask(c, "a", f"sendn:5:c:{payload}")
        assert reply.startswith("err:3:mailbox-full:") and "not yet committed" in reply, reply[:200]
        # The three that fitted were committed and delivered; once c has taken them there is room again.
        wait_until(lambda: ask(c, "a", f"sendn:3:c:{payload}") == "ok", what="room once c has taken them")
