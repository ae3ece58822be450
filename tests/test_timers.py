"""The timers capability: a real agent (tests/components/alarm.wat) waking itself up. Timers are
committed with their call, survive worker and supervisor crashes, end with the agent, and every bound is hit."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import Theater, assert_verified, of, ps, records, start_after_crash, wait_running, wait_until

from theater.client import Client, ClientError
from theater.records import Kind

COMPONENT = "alarm.wat"


def alarm(t: Theater, name: str = "t", **timers: int) -> Path:
    extra: dict[str, Any] = {"timers": timers} if timers else {}
    return t.manifest(name, COMPONENT, policy="messaging", capabilities=["runtime", "timers"], **extra)


def ask(c: Client, text: str, name: str = "t") -> str:
    reply = c.call(name, text.encode())
    assert reply is not None
    return reply.decode()


def pending_timers(t: Theater) -> list[int]:
    db = sqlite3.connect(f"file:{t.home.store}?mode=ro", uri=True)
    try:
        return [r[0] for r in db.execute("SELECT id FROM timers ORDER BY id")]
    finally:
        db.close()


def has_line(c: Client, line: str, name: str = "t") -> bool:
    return f"{line}\n" in ask(c, "state", name)


def test_a_timer_delivers_its_message_through_handle(theater: Theater) -> None:
    with theater.client() as c:
        c.spawn(alarm(theater))
        reply = ask(c, "after:50:wake-up")
        assert reply.startswith("id:")
        timer_id = int(reply[3:])
        wait_until(lambda: has_line(c, "wake-up"), what="the timer's message")
        wait_until(lambda: not pending_timers(theater), what="the timer consumed")
    [fired] = of(records(theater, "t"), Kind.MESSAGE)
    f = fired.fields()
    assert (f["origin"], f["message"], int.from_bytes(f["message_id"], "big")) == ("timer", b"wake-up", timer_id)
    assert_verified(theater)


def test_a_cancelled_timer_never_fires(theater: Theater) -> None:
    with theater.client() as c:
        c.spawn(alarm(theater))
        first = ask(c, "after:100:cancelled")[3:]
        assert ask(c, f"cancel:{first}") == "true"
        assert ask(c, f"cancel:{first}") == "false"
        assert ask(c, "cancel:12345") == "false"
        ask(c, "after:200:later")
        wait_until(lambda: has_line(c, "later"), what="the later timer")
        assert "cancelled" not in ask(c, "state")


def test_a_timer_already_on_its_way_cannot_be_cancelled(theater: Theater) -> None:
    """A timer that came due while the call cancelling it waited behind the agent's current one was answered
    `true` and delivered all the same. Here the agent's worker is stopped (SIGSTOP) with the cancel sent to it,
    until the timer's delivery is queued behind the cancel: the cancel says `false`, and the timer fires."""
    with theater.client() as c:
        c.spawn(alarm(theater))
        pid = ps(c, "t")["pid"]
        timer_id = ask(c, "after:1000:on-its-way")[3:]
        os.kill(pid, signal.SIGSTOP)
        answer: dict[str, str] = {}
        try:
            def cancel() -> None:
                with theater.client() as other:
                    answer["cancel"] = ask(other, f"cancel:{timer_id}")

            canceller = threading.Thread(target=cancel)
            canceller.start()
            # Behind the call the stopped worker holds (the cancel, or the delivery if it came due first), the
            # other waits: either way the timer's message is on its way when the cancel runs. (On a machine
            # slow enough that the timer was delivered before the stop, the cancel finds it gone: false too.)
            wait_until(lambda: ps(c, "t")["mailbox"] >= 1 or of(records(theater, "t"), Kind.MESSAGE),
                       what="the cancel and the timer's delivery both queued")
        finally:
            os.kill(pid, signal.SIGCONT)
        canceller.join(30)
        assert answer == {"cancel": "false"}
        wait_until(lambda: has_line(c, "on-its-way"), what="the timer delivered")


def test_a_cancelled_timer_leaves_nothing_set_in_the_supervisor_s_loop(theater: Theater) -> None:
    """Cancelling a timer also cancels what the supervisor's loop had set to fire it: each day-long timer set and
    cancelled used to keep its place in the loop (with its closure) until the day was over."""
    with theater.client() as c:
        c.spawn(alarm(theater))
        ask(c, "state")
        before = c.top()["supervisor"]["timers"]
        for _ in range(50):
            timer_id = ask(c, "after:86400000:tomorrow")[3:]
            assert ask(c, f"cancel:{timer_id}") == "true"
        after = c.top()["supervisor"]["timers"]
    assert after < before + 5, (before, after)  # a watchdog or two may differ; fifty timers may not


def test_a_wait_for_records_woken_early_leaves_nothing_set_in_the_supervisor_s_loop(theater: Theater) -> None:
    """A client's wait for a chain's next record (`events --follow`) woken by a commit cancels its expiry too:
    each kept its place in the loop for the whole wait it had asked for (up to ten minutes). (A wait that
    arrives after the commit is answered at once and sets nothing: either way nothing may stay set.)"""
    with theater.client() as c, theater.client() as follower:
        c.spawn(alarm(theater))
        ask(c, "state")
        before = c.top()["supervisor"]["timers"]
        for _ in range(20):
            head = follower.wait_events("t", -1, 0)  # the chain's head, now
            with ThreadPoolExecutor(1) as pool:
                woken = pool.submit(follower.wait_events, "t", head, 600_000)
                ask(c, "state")
                assert woken.result(timeout=30) > head
        after = c.top()["supervisor"]["timers"]
    assert after < before + 5, (before, after)


def test_a_call_that_fails_sets_no_timer(theater: Theater) -> None:
    with theater.client() as c:
        c.spawn(alarm(theater))
        with pytest.raises(ClientError):
            c.call("t", b"after-then-trap:0:never")
        wait_running(c, "t")
        assert pending_timers(theater) == []
        ask(c, "after:0:marker")
        wait_until(lambda: has_line(c, "marker"), what="a later timer")
        assert "never" not in ask(c, "state")


def test_timers_survive_a_worker_crash(theater: Theater) -> None:
    with theater.client() as c:
        c.spawn(alarm(theater))
        ask(c, "after:1500:after-crash")
        pid = ps(c, "t")["pid"]
        with pytest.raises(ClientError):
            c.call("t", b"after-then-trap:0:x")
        wait_running(c, "t", pid)
        wait_until(lambda: has_line(c, "after-crash"), what="the timer after the restart")


def test_timers_survive_a_supervisor_kill(theater: Theater) -> None:
    with theater.client() as c:
        c.spawn(alarm(theater))
        ask(c, "after:1000:after-restart")
    assert len(pending_timers(theater)) == 1  # committed with its call
    theater.kill()
    start_after_crash(theater)
    with theater.client() as c:
        wait_running(c, "t")
        wait_until(lambda: has_line(c, "after-restart"), what="the timer after the supervisor restart")
    assert pending_timers(theater) == []
    assert_verified(theater)


def test_timers_end_when_the_agent_stops(theater: Theater) -> None:
    with theater.client() as c:
        c.spawn(alarm(theater))
        ask(c, "after:60000:never")
        assert len(pending_timers(theater)) == 1
        c.stop("t")
    assert pending_timers(theater) == []


def test_timers_wait_for_a_supervisor_shut_down_cleanly(theater: Theater) -> None:
    with theater.client() as c:
        c.spawn(alarm(theater))
        ask(c, "after:60000:later")
    theater.stop()
    assert len(pending_timers(theater)) == 1  # `down` is not the agent stopping: it resumes with the next start


def test_each_timer_bound_is_enforced(theater: Theater) -> None:
    with theater.client() as c:
        c.spawn(alarm(theater, max_pending=2, max_delay_ms=10_000))
        assert ask(c, "after:10001:x") == "err:a delay of 10001 ms is outside 0..max_delay_ms (10000)"
        assert ask(c, "after:10000:a").startswith("id:")
        assert ask(c, "after:10000:b").startswith("id:")
        assert ask(c, "after:10000:c") == "err:2 timers are pending already (max_pending)"
        c.spawn(alarm(theater, "other", max_pending=2, max_delay_ms=10_000))  # another agent's count is its own
        assert ask(c, "after:10000:a", "other").startswith("id:")
        assert ask(c, "after:10000:b", "other").startswith("id:")
        assert ask(c, "after:10000:c", "other") == "err:2 timers are pending already (max_pending)"
        c.stop("t")  # its timers go with it, and its count
        c.restart("t")
        assert ask(c, "after:10000:a").startswith("id:") and ask(c, "after:10000:b").startswith("id:")
        assert ask(c, "after:10000:c") == "err:2 timers are pending already (max_pending)"
        with pytest.raises(ClientError, match=r"timers\.max_pending: 101 exceeds the policy's 100"):
            c.spawn(alarm(theater, "wide", max_pending=101))


def test_a_timer_message_over_max_message_bytes_fails_the_call(theater: Theater) -> None:
    """The worker refuses a message longer than the agent's max_message_bytes before asking: the call fails
    with host-limit, naming it, and sets nothing; at exactly the bound the timer is set."""
    with theater.client() as c:
        c.spawn(theater.manifest("t", COMPONENT, policy="messaging", capabilities=["runtime", "timers"],
                                 limits={"max_message_bytes": 100}))
        assert ask(c, "bigafter:100") == "ack"
        pid = ps(c, "t")["pid"]
        with pytest.raises(ClientError) as info:
            c.call("t", b"bigafter:101")
        assert info.value.code == "host-limit"
        assert str(info.value) == "timers.after: the message of 101 bytes is more than 100"
        wait_running(c, "t", pid)
    assert len(pending_timers(theater)) == 1
    assert len([r for r in records(theater, "t") if r.kind is Kind.HOST_CALL]) == 1


def test_a_timer_re_armed_from_its_own_delivery_fits_max_pending_1(theater: Theater) -> None:
    """A periodic timer sets the next one from the call that delivers it: the timer being delivered is not
    counted as pending (the commit that ends its call removes it), so max_pending = 1 allows it."""
    with theater.client() as c:
        c.spawn(alarm(theater, max_pending=1))
        first = int(ask(c, "after:50:after:60000:again")[3:])  # its message, delivered to handle, sets the next
        wait_until(lambda: len(host_calls(theater, "after")) == 2, what="the re-arming call")
        wait_until(lambda: pending_timers(theater) not in ([], [first]), what="the next timer committed")
        [second] = pending_timers(theater)
        assert ask(c, "after:60000:third") == "err:1 timers are pending already (max_pending)"  # still bounded
    answers = [r["output"] for r in host_calls(theater, "after")]
    assert answers[1] == f'{{"id":{second},"ok":true}}'.encode()
    assert_verified(theater)


def host_calls(t: Theater, function: str) -> list[dict[str, Any]]:
    return [r.fields() for r in records(t, "t") if r.kind is Kind.HOST_CALL and r.fields()["function"] == function]


def test_ungranted_timers_import_is_refused_at_spawn(theater: Theater) -> None:
    with theater.client() as c:
        with pytest.raises(ClientError) as info:
            c.spawn(theater.manifest("t", COMPONENT))
        assert str(info.value).endswith("not granted to this agent: theater:agent/timers@0.1.0 (granted: "
                                        "theater:agent/runtime@0.1.0); the agent's policy 'default' does not grant "
                                        "timers"), info.value
