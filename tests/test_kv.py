"""The kv capability: a real agent (tests/components/keeper.wat) keeping data in the supervisor's store.
Writes commit with their call, survive worker and supervisor crashes, and every quota is hit."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import Theater, assert_verified, of, ps, records, start_after_crash, wait_running

from theater.client import Client, ClientError
from theater.records import Kind

COMPONENT = "keeper.wat"


def keeper(t: Theater, name: str = "k", **kv: int) -> Path:
    extra: dict[str, Any] = {"kv": kv} if kv else {}
    return t.manifest(name, COMPONENT, policy="messaging", capabilities=["runtime", "kv"], **extra)


def ask(c: Client, text: str, name: str = "k") -> str:
    reply = c.call(name, text.encode())
    assert reply is not None
    return reply.decode()


def stored(t: Theater) -> list[tuple[str, bytes]]:
    db = sqlite3.connect(f"file:{t.home.store}?mode=ro", uri=True)
    try:
        return [(k, bytes(v)) for k, v in db.execute("SELECT key, value FROM kv ORDER BY key")]
    finally:
        db.close()


def test_get_set_delete_list(theater: Theater) -> None:
    with theater.client() as c:
        c.spawn(keeper(theater))
        assert ask(c, "get:a") == "none"
        assert ask(c, "set:a:1") == "ok"
        assert ask(c, "set:ab:two:with:colons") == "ok"
        assert ask(c, "set:b:3") == "ok"
        assert ask(c, "get:ab") == "some:two:with:colons"
        assert ask(c, "list:a") == "a,ab"
        assert ask(c, "list:") == "a,ab,b"
        assert ask(c, "del:a") == "true"
        assert ask(c, "del:a") == "false"
        assert ask(c, "list:") == "ab,b"
    assert stored(theater) == [("ab", b"two:with:colons"), ("b", b"3")]
    # Every read and write is a recorded host call, in order: a replay reads exactly what the call read.
    calls = [(r.fields()["function"], r.fields()["output"]) for r in records(theater, "k") if r.kind is Kind.HOST_CALL]
    assert [f for f, _ in calls] == ["get", "set", "set", "set", "get", "list-keys", "list-keys", "delete", "delete",
                                     "list-keys"]
    assert calls[4][1] == b'{"found":true,"ok":true}\0two:with:colons'
    assert_verified(theater)


def test_a_key_is_never_a_path(theater: Theater) -> None:
    with theater.client() as c:
        c.spawn(keeper(theater))
        for key in ("../../etc/passwd", "/tmp/x", "%", "_", "a*", "é"):
            assert ask(c, f"set:{key}:v") == "ok"
            assert ask(c, f"get:{key}") == "some:v"
        assert ask(c, "list:%") == "%"  # a prefix is text, not a LIKE pattern
        assert ask(c, "list:_") == "_"
    assert not (theater.home.root / "etc").exists()


@pytest.mark.parametrize("how", ["set-then-trap", "set-then-fail"])
def test_a_call_that_fails_leaves_no_write_behind(theater: Theater, how: str) -> None:
    with theater.client() as c:
        c.spawn(keeper(theater))
        assert ask(c, "set:kept:1") == "ok"
        with pytest.raises(ClientError):
            c.call("k", f"{how}:kept:2".encode())
        wait_running(c, "k")
        assert ask(c, "get:kept") == "some:1"
    assert stored(theater) == [("kept", b"1")]


def test_writes_survive_a_worker_crash_and_a_supervisor_kill(theater: Theater) -> None:
    with theater.client() as c:
        c.spawn(keeper(theater))
        assert ask(c, "set:x:before") == "ok"
        pid = ps(c, "k")["pid"]
        with pytest.raises(ClientError):
            c.call("k", b"set-then-trap:x:lost")
        wait_running(c, "k", pid)
        assert ask(c, "get:x") == "some:before"
        assert ask(c, "set:y:committed") == "ok"
    theater.kill()
    start_after_crash(theater)
    with theater.client() as c:
        wait_running(c, "k")
        assert ask(c, "get:x") == "some:before"
        assert ask(c, "get:y") == "some:committed"
    assert_verified(theater)


def test_a_value_of_the_default_largest_size_is_written_by_a_locked_down_worker(theater: Theater) -> None:
    """A value of 65,536 bytes (the default max_value_bytes) used to get the worker killed as a protocol violator:
    pyzmq sends 64 KiB and more without a copy by starting a thread, which a worker may not after lock-down, so the
    request was cut short after its first frames and the result that followed was read as its rest."""
    with theater.client() as c:
        c.spawn(keeper(theater))
        value = "v" * 65536
        assert ask(c, "set:big:" + value) == "ok"
        assert ask(c, "get:big") == "some:" + value
        assert ps(c, "k")["restarts"] == 0
    assert of(records(theater, "k"), Kind.VIOLATION) == []


def test_each_quota_is_enforced(theater: Theater) -> None:
    with theater.client() as c:
        c.spawn(keeper(theater, max_key_bytes=8, max_value_bytes=10, max_keys=5, max_total_bytes=40))
        assert ask(c, "set:12345678:v") == "ok"
        assert ask(c, "set:123456789:v") == "err:a key of more than max_key_bytes (8) bytes"
        assert ask(c, "set:v:" + "x" * 10) == "ok"
        assert ask(c, "set:v:" + "x" * 11) == "err:a value of 11 bytes is more than max_value_bytes (10)"
        assert ask(c, "del:12345678") == "true"
        assert ask(c, "del:v") == "true"
        assert ask(c, "fill:6:v") == "err:5:more than max_keys (5) keys"
        assert ask(c, "list:") == "k0,k1,k2,k3,k4"  # the five that fitted are committed: the call succeeded
        assert ask(c, "del:k4") == "true"
        # Four keys of 2 bytes with a 1-byte value: 12 bytes of the 40.
        assert ask(c, "set:big:" + "x" * 10) == "ok"  # 3 + 10 bytes -> 25
        assert ask(c, "del:big") == "true"  # -> 12
        assert ask(c, "set:k0:" + "x" * 10) == "ok"  # a value replaced counts once: 12 - 3 + 12 -> 21
        assert ask(c, "set:k1:" + "x" * 10) == "ok"  # -> 30
        assert ask(c, "set:k2:" + "x" * 10) == "ok"  # -> 39
        assert ask(c, "set:k3:" + "x" * 10) == "err:48 bytes of keys and values, more than max_total_bytes (40)"
    assert [(k, len(v)) for k, v in stored(theater)] == [("k0", 10), ("k1", 10), ("k2", 10), ("k3", 1)]


def test_kv_settings_are_checked_like_limits(theater: Theater) -> None:
    with theater.client() as c:
        with pytest.raises(ClientError, match=r"kv\.max_keys: 1001 exceeds the policy's 1000"):
            c.spawn(keeper(theater, "wide", max_keys=1001))
        with pytest.raises(ClientError, match=r"kv\.bogus"):
            c.spawn(keeper(theater, "typo", bogus=1))
        with pytest.raises(ClientError, match="settings for the kv capability, which is not granted here"):
            c.spawn(theater.manifest("nokv", COMPONENT, policy="messaging", capabilities=["runtime"],
                                     kv={"max_keys": 1}))


def test_ungranted_kv_import_is_refused_at_spawn(theater: Theater) -> None:
    """The load error says which leaves the import out: the policy that does not grant it, or the manifest
    that does not list a capability its policy grants."""
    with theater.client() as c:
        with pytest.raises(ClientError) as info:
            c.spawn(theater.manifest("k", COMPONENT))
        assert info.value.code == "spawn-failed"
        assert str(info.value).endswith(
            "load-failed: component imports capabilities not granted to this agent: theater:agent/kv@0.1.0 "
            "(granted: theater:agent/runtime@0.1.0); the agent's policy 'default' does not grant kv"), info.value
        with pytest.raises(ClientError) as info:
            c.spawn(theater.manifest("listed", COMPONENT, policy="messaging", capabilities=["runtime", "timers"]))
        assert str(info.value).endswith(
            "load-failed: component imports capabilities not granted to this agent: theater:agent/kv@0.1.0 "
            "(granted: theater:agent/runtime@0.1.0, theater:agent/timers@0.1.0); the agent's policy 'messaging' "
            "grants kv, but its manifest does not list it in capabilities (capabilities = ['runtime', 'timers'])"
        ), info.value
        assert "kv, but its manifest does not list it" in ps(c, "listed")["last_exit"]


def test_list_keys_answer_is_recorded_with_its_keys(theater: Theater) -> None:
    with theater.client() as c:
        c.spawn(keeper(theater))
        assert ask(c, "fill:3:v") == "ok"
        assert ask(c, "list:k") == "k0,k1,k2"
    [listed] = [r.fields() for r in records(theater, "k") if r.kind is Kind.HOST_CALL
                and r.fields()["function"] == "list-keys"]
    head, data = listed["output"].split(b"\0", 1)
    assert json.loads(head) == {"ok": True, "count": 3} and json.loads(data) == {"keys": ["k0", "k1", "k2"]}
