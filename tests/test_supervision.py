"""Supervision trees, end to end: OTP supervisor behaviours with a real supervisor and real workers.

Each test writes a tree manifest (top-level ``strategy``/``children``), spawns
it, crashes children on demand (``trap_on.wat`` traps on the message "trap";
a worker can also be SIGKILLed by its pid from ``ps``) and checks what the
supervisor did: which children got new workers, in which order they were
stopped and started (from the ``exit`` and ``worker-key`` records' times across
the children's chains, read straight from the store), when a supervisor gives
up, and that every chain still verifies. Waits are on replies or on ``ps`` /
``tree`` with deadlines, never bare sleeps.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq
from conftest import (
    COMPONENTS,
    LAB_POLICY,
    ROOT,
    Theater,
    assert_verified,
    gone,
    of,
    ps,
    records,
    start_after_crash,
    supervisor_log,
    toml,
    wait_running,
    wait_status,
    wait_until,
    write_lab_policy,
)
from test_limits import send_burst

from supervisor._agent import uptime_s
from supervisor._audit import open_readonly
from supervisor._errors import NotFound
from theater import wire
from theater.client import Client, ClientError, NotRunning
from theater.records import Kind, sha256

VENV_THEATER = Path(sys.executable).parent / "theater"
COMMAND = [str(VENV_THEATER)] if VENV_THEATER.exists() else [sys.executable, "-m", "supervisor"]
TRAP = "wasm trap: wasm `unreachable` instruction executed"


# --- manifests --------------------------------------------------------------------


def agent(name: str, component: str = "trap_on.wat", **extra: object) -> dict[str, object]:
    """An inline agent child: tests/components/<component> plus manifest keys (restart, limits, policy...)."""
    return {"name": name, "component": str(COMPONENTS / component), **extra}


def sup(name: str, children: list[dict[str, object]], strategy: str = "one_for_one", *,
        intensity: int = 3, period_ms: int = 5000, **extra: object) -> dict[str, object]:
    """An inline supervisor child."""
    return {"name": name, "strategy": strategy, "intensity": intensity, "period_ms": period_ms,
            "children": children, **extra}


def tree_manifest(t: Theater, root: dict[str, object]) -> Path:
    """Write ``root`` (made by :func:`sup`) as a supervisor manifest file; children one per line."""
    lines = [f"{k} = {toml(v)}" for k, v in root.items() if k != "children"]
    lines.append("children = [")
    lines.extend(f"  {toml(child)}," for child in root["children"])  # type: ignore[union-attr]
    lines.append("]")
    path = t.dir / f"{root['name']}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


# --- observing ----------------------------------------------------------------------


def cli(t: Theater, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*COMMAND, "--home", str(t.home.root), *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def _pids(c: Client, names: list[str]) -> dict[str, int | None]:
    rows = {a["name"]: a for a in c.ps()}
    return {n: rows[n]["pid"] for n in names}


def _find(members: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    for m in members:
        if m["name"] == name:
            return m
        found = _find(m.get("children", []), name)
        if found is not None:
            return found
    return None


def _member(c: Client, name: str) -> dict[str, Any]:
    """A member (supervisor or agent) as the ``tree`` operation shows it."""
    found = _find(c.request("tree")[0]["roots"], name)
    assert found is not None, f"{name} is not in the tree"
    return found


def _wait_member(c: Client, name: str, status: str, timeout: float = 20.0, **fields: object) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        m = _member(c, name)
        ok = m["status"] == status and all(m[k] == v for k, v in fields.items())
        return m if ok else None

    return wait_until(reached, timeout, f"{name} {status} {fields}")  # type: ignore[return-value]


def _crash(c: Client, name: str) -> None:
    """Make a trap_on.wat agent trap: the call fails with "trap" and the agent crashes."""
    with pytest.raises(ClientError) as info:
        c.call(name, b"trap")
    assert info.value.code == "trap", f"{info.value.code}: {info.value}"
    assert TRAP in str(info.value)


def _exits(t: Theater, name: str) -> list[dict[str, Any]]:
    return [r.fields() for r in of(records(t, name), Kind.EXIT)]


def _events_after(t: Theater, names: list[str], since_ns: int) -> list[tuple[int, str, str, dict[str, Any]]]:
    """Every exit and worker-key record of ``names`` after ``since_ns``, in time order: (time, kind, name, fields)."""
    out = []
    for name in names:
        for r in records(t, name):
            if r.kind in (Kind.EXIT, Kind.WORKER_KEY) and r.time_ns > since_ns:
                out.append((r.time_ns, "exit" if r.kind is Kind.EXIT else "start", name, r.fields()))
    return sorted(out, key=lambda e: e[0])


# --- 1. strategies: exactly the right set, in the right order -------------------------------


def _spawn_counting(t: Theater, c: Client, strategy: str, names: list[str],
                    extra: list[dict[str, object]] | None = None) -> dict[str, int]:
    """Spawn a tree of trap_on counters (``extra`` children inserted after the second), count each to 1,
    and return their pids."""
    kids = [agent(n) for n in names]
    kids[2:2] = extra or []
    info = c.spawn(tree_manifest(t, sup("root", kids, strategy, intensity=5, period_ms=60000)))
    assert info["kind"] == "supervisor" and info["status"] == "running", info
    assert [ch["name"] for ch in info["children"]] == [k["name"] for k in kids]
    assert all(ch["status"] == "running" and ch["pid"] for ch in info["children"]), info
    for n in names:
        assert c.call(n, b"x") == b"1"
    return _pids(c, names)  # type: ignore[return-value]


def test_one_for_one_restarts_only_the_crashed_child(theater: Theater) -> None:
    """one_for_one: the crashed child gets a new worker and resumes its count; its siblings keep theirs."""
    names = ["a", "b", "c"]
    with theater.client() as c:
        before = _spawn_counting(theater, c, "one_for_one", names)
        _crash(c, "b")
        after = wait_running(c, "b", before["b"], restarts=1)
        assert _pids(c, names) == {**before, "b": after["pid"]}
        assert [ps(c, n)["restarts"] for n in names] == [0, 1, 0]
        assert [c.call(n, b"y") for n in names] == [b"2", b"2", b"2"]
        root = _member(c, "root")
        assert (root["status"], root["restarts"]) == ("running", 1)
    assert [e["reason"] for e in _exits(theater, "b")] == ["trap"]
    assert _exits(theater, "a") == _exits(theater, "c") == []
    assert_verified(theater)


def test_one_for_all_restarts_every_child_stopping_in_reverse_and_starting_in_order(theater: Theater) -> None:
    """one_for_all: all get new workers; the others stop in reverse start order, then all start in start order.
    A running temporary sibling is stopped with the others but not started again, and leaves the tree."""
    names = ["a", "b", "c", "d"]
    with theater.client() as c:
        before = _spawn_counting(theater, c, "one_for_all", names, [agent("tmp", restart={"type": "temporary"})])
        tmp = ps(c, "tmp")["pid"]
        since = time.time_ns()
        _crash(c, "b")
        for n in names:
            wait_running(c, n, before[n], restarts=1)
        after = _pids(c, names)
        assert all(after[n] != before[n] for n in names), (before, after)
        assert [c.call(n, b"y") for n in names] == [b"2"] * 4  # every child resumed from its committed state
        root = _member(c, "root")
        assert root["restarts"] == 1
        assert [m["name"] for m in root["children"]] == names  # the temporary child left
        gone = ps(c, "tmp")
        assert tmp and (gone["status"], gone["pid"], gone["restarts"]) == ("stopped", None, 0)
    events = [(kind, name) for _, kind, name, _ in _events_after(theater, [*names, "tmp"], since)]
    assert events == [("exit", "b"), ("exit", "d"), ("exit", "c"), ("exit", "tmp"), ("exit", "a"),
                      ("start", "a"), ("start", "b"), ("start", "c"), ("start", "d")], events
    assert not of(records(theater, "tmp"), Kind.WORKER_KEY)
    for n in ("a", "tmp", "c", "d"):
        [exit_] = _exits(theater, n)
        assert (exit_["reason"], exit_["detail"]) == ("shutdown", "exited with status 0"), exit_
    assert [e["reason"] for e in _exits(theater, "b")] == ["trap"]
    assert_verified(theater)


def test_rest_for_one_restarts_the_crashed_child_and_those_after_it(theater: Theater) -> None:
    """rest_for_one: the crashed child and the later ones restart (reverse stop, in-order start); earlier ones do not."""
    names = ["a", "b", "c", "d"]
    with theater.client() as c:
        before = _spawn_counting(theater, c, "rest_for_one", names)
        since = time.time_ns()
        _crash(c, "b")
        for n in ("b", "c", "d"):
            wait_running(c, n, before[n], restarts=1)
        after = ps(c, "a")
        assert (after["pid"], after["restarts"]) == (before["a"], 0)
        assert [c.call(n, b"y") for n in names] == [b"2"] * 4
    events = [(kind, name) for _, kind, name, _ in _events_after(theater, names, since)]
    assert events == [("exit", "b"), ("exit", "d"), ("exit", "c"),
                      ("start", "b"), ("start", "c"), ("start", "d")], events
    assert _exits(theater, "a") == []
    assert_verified(theater)


def test_queued_messages_survive_a_restart(theater: Theater) -> None:
    """Unlike an Erlang mailbox, messages queued behind the crashing one are served by the new worker, in order."""
    with theater.client() as c:
        c.spawn(tree_manifest(theater, sup("root", [agent("a")])))
        assert c.call("a", b"x") == b"1"
        pid = ps(c, "a")["pid"]
        assert c.send("a", b"trap") == {"queued": 1}  # dispatched at once: "trap" is in flight
        assert c.send("a", b"queued") == {"queued": 1}  # waits behind it in the mailbox
        assert c.call("a", b"after") == b"3"  # the new worker served "queued" (2), then this call (3)
        info = ps(c, "a")
        assert info["pid"] != pid and info["restarts"] == 1
    handles = [(h.fields()["message"], h.fields()["status"]) for h in of(records(theater, "a"), Kind.HANDLE)]
    assert handles == [(b"x", "ok"), (b"trap", "trap"), (b"queued", "ok"), (b"after", "ok")]
    assert_verified(theater)


# --- 2. restart types: permanent, transient, temporary on normal and abnormal exits -----------


def test_restart_types_on_normal_and_abnormal_exits(theater: Theater) -> None:
    """runtime.finish is a normal exit: permanent restarts, transient and temporary do not; a crash restarts
    permanent and transient only; temporary children leave their supervisor's children."""
    kids = [agent("perm", "finisher.wat"),
            agent("trans", "finisher.wat", restart={"type": "transient"}),
            agent("temp-normal", "finisher.wat", restart={"type": "temporary"}),
            agent("temp-crash", "finisher.wat", restart={"type": "temporary"})]
    names = [k["name"] for k in kids]
    with theater.client() as c:
        c.spawn(tree_manifest(theater, sup("root", kids, intensity=10, period_ms=60000)))
        pids = _pids(c, names)
        assert [c.call(n, b"x") for n in names] == [b"1"] * 4
        assert [m["restart"] for m in _member(c, "root")["children"]] == ["permanent", "transient", "temporary", "temporary"]

        # permanent: restarted even after a normal exit, from its committed state
        assert c.call("perm", b"finish") == b"2"  # the finishing call is committed and answered
        wait_running(c, "perm", pids["perm"], restarts=1)
        assert c.call("perm", b"y") == b"3"

        # transient: restarted after a crash...
        os.kill(pids["trans"], signal.SIGKILL)
        trans = wait_running(c, "trans", pids["trans"], restarts=1)
        assert c.call("trans", b"y") == b"2"
        # ...but not after a normal exit
        assert c.call("trans", b"finish") == b"3"
        info = wait_status(c, "trans", "stopped")
        assert (info["pid"], info["restarts"]) == (None, 1)
        assert trans["pid"] != pids["trans"]
        with pytest.raises(ClientError) as refused:
            c.call("trans", b"z")
        assert refused.value.code == "refused" and "stopped" in str(refused.value)

        # temporary: never restarted, whatever the exit
        assert c.call("temp-normal", b"finish") == b"2"
        assert (wait_status(c, "temp-normal", "stopped")["restarts"]) == 0
        os.kill(pids["temp-crash"], signal.SIGKILL)
        assert (wait_status(c, "temp-crash", "failed")["restarts"]) == 0

        root = _member(c, "root")
        assert [m["name"] for m in root["children"]] == ["perm", "trans"]  # temporary children are removed
        assert (root["status"], root["restarts"]) == ("running", 2)  # perm's normal exit and trans's crash
        assert _member(c, "trans")["status"] == "stopped"  # a transient child stays, stopped

    assert [(e["reason"], e["detail"]) for e in _exits(theater, "perm")] == [("normal", "exited with status 0")]
    assert [e["reason"] for e in _exits(theater, "trans")] == ["worker-died", "normal"]
    assert "killed by signal 9" in _exits(theater, "trans")[0]["detail"]
    assert [e["reason"] for e in _exits(theater, "temp-normal")] == ["normal"]
    assert [e["reason"] for e in _exits(theater, "temp-crash")] == ["worker-died"]
    for n in ("trans", "temp-normal", "temp-crash"):
        assert len(of(records(theater, n), Kind.WORKER_KEY)) == (1 if n == "trans" else 0), n
    finish = [r for r in records(theater, "perm") if r.kind is Kind.HOST_CALL]
    assert [r.fields()["function"] for r in finish] == ["finish"]
    assert_verified(theater)


def test_an_agent_may_end_with_reason_shutdown(theater: Theater) -> None:
    """runtime.shutdown(detail) is OTP's {shutdown, Term}: not a crash. The call is committed and answered, then
    the agent ends with reason `shutdown` and its detail; a permanent agent is restarted, a transient one is not."""
    kids = [agent("perm", "ender.wat"), agent("trans", "ender.wat", restart={"type": "transient"})]
    with theater.client() as c:
        c.spawn(tree_manifest(theater, sup("root", kids, intensity=10, period_ms=60000)))
        pids = _pids(c, ["perm", "trans"])
        assert c.call("perm", b"finish") == b"1"
        wait_running(c, "perm", pids["perm"], restarts=1)
        assert c.call("perm", b"y") == b"2"
        assert c.call("trans", b"finish") == b"1"
        assert wait_status(c, "trans", "stopped")["restarts"] == 0
        with pytest.raises(ClientError) as too_long:  # a detail past 256 characters is a host limit: a crash
            c.call("perm", b"long")
        assert too_long.value.code == "host-limit" and "at most 256 characters" in str(too_long.value)
        wait_running(c, "perm", None, restarts=2)
        assert c.call("perm", b"z") == b"3"
    for name in ("trans",):
        [ended] = _exits(theater, name)
        assert (ended["reason"], ended["detail"]) == ("shutdown", "it ended itself: done by itself (exited with status 0)")
        [asked] = [r.fields() for r in records(theater, name) if r.kind is Kind.HOST_CALL]
        assert (asked["function"], asked["input"]) == ("shutdown", b"done by itself")
    first, second = _exits(theater, "perm")
    assert (first["reason"], first["detail"]) == ("shutdown", "it ended itself: done by itself (exited with status 0)")
    assert second["reason"] == "trap" and "at most 256 characters" in second["detail"]
    assert_verified(theater)


def test_top_level_agents_on_a_normal_exit(theater: Theater) -> None:
    """A top-level agent is the only child of its own one_for_one supervisor: a normal exit restarts only permanent."""
    types = ["permanent", "transient", "temporary"]
    with theater.client() as c:
        for t in types:
            c.spawn(theater.manifest(t, "finisher.wat", restart={"type": t}))
        pids = _pids(c, types)
        assert [c.call(t, b"finish") for t in types] == [b"1"] * 3
        wait_running(c, "permanent", pids["permanent"], restarts=1)
        assert c.call("permanent", b"x") == b"2"
        for t in ("transient", "temporary"):
            info = wait_status(c, t, "stopped")
            assert (info["pid"], info["restarts"], info["last_exit"]) == (None, 0, "normal: exited with status 0")
    for t in types:
        assert [e["reason"] for e in _exits(theater, t)] == ["normal"]
    assert_verified(theater)


# --- 3. restart intensity -------------------------------------------------------------------


def test_intensity_exceeded_gives_up_stopping_children_in_reverse_order(theater: Theater) -> None:
    """More than `intensity` restarts within `period_ms`: the supervisor stops every child (last first) and fails."""
    names = ["x", "y", "crasher"]
    with theater.client() as c:
        c.spawn(tree_manifest(theater, sup("root", [agent(n) for n in names], intensity=2, period_ms=60000)))
        pids = _pids(c, names)
        pid = pids["crasher"]
        for n in range(1, 3):
            _crash(c, "crasher")
            pid = wait_running(c, "crasher", pid, restarts=n)["pid"]
        since = time.time_ns()
        _crash(c, "crasher")  # the third crash in the period
        root = _wait_member(c, "root", "failed")
        assert "more than 2 restarts in 60000 ms" in root["last_exit"] and "crasher" in root["last_exit"], root
        info = {n: ps(c, n) for n in names}
        assert [(info[n]["status"], info[n]["pid"]) for n in names] == [("stopped", None), ("stopped", None), ("failed", None)]
        assert info["crasher"]["restarts"] == 2
        with pytest.raises(ClientError) as refused:
            c.call("x", b"hello?")
        assert refused.value.code == "refused"
    events = [(kind, name) for _, kind, name, _ in _events_after(theater, names, since)]
    assert events == [("exit", "crasher"), ("exit", "y"), ("exit", "x")], events
    for n in ("x", "y"):
        [exit_] = _exits(theater, n)
        assert exit_["reason"] == "shutdown"
        assert exit_["detail"].startswith("supervisor root gave up: more than 2 restarts in 60000 ms"), exit_
    assert [e["reason"] for e in _exits(theater, "crasher")] == ["trap"] * 3
    assert_verified(theater)


def test_the_same_crashes_spread_wider_than_the_period_do_not_escalate(theater: Theater) -> None:
    """Three crashes against intensity 2, each after the previous restart has left the 300 ms period: no escalation."""
    with theater.client() as c:
        c.spawn(tree_manifest(theater, sup("root", [agent("other"), agent("crasher")], intensity=2, period_ms=300)))
        other = ps(c, "other")["pid"]
        pid = ps(c, "crasher")["pid"]
        for n in range(1, 5):
            if n > 1:
                last_exit = of(records(theater, "crasher"), Kind.EXIT)[-1].time_ns
                wait_until(lambda t=last_exit: time.time_ns() - t > 350_000_000, 5, "the last restart to leave the period")
            _crash(c, "crasher")
            pid = wait_running(c, "crasher", pid, restarts=n)["pid"]
        root = _member(c, "root")
        assert (root["status"], root["restarts"], root["last_exit"]) == ("running", 4, "")
        assert ps(c, "other")["pid"] == other
        assert c.call("crasher", b"x") == b"1"
    assert_verified(theater)


# --- 4. nested trees escalate level by level --------------------------------------------------


def test_nested_supervisors_escalate_level_by_level(theater: Theater) -> None:
    """An inner supervisor that gives up is restarted by its parent (counted there); when the root gives up,
    everything is stopped, the tree shows why, the supervisor keeps answering and every chain verifies."""
    inner = sup("inner", [agent("i1"), agent("i2")], intensity=1, period_ms=60000)
    with theater.client() as c:
        c.spawn(tree_manifest(theater, sup("root", [agent("top"), inner], intensity=1, period_ms=60000)))
        pids = _pids(c, ["top", "i1", "i2"])
        assert c.call("i1", b"x") == b"1"

        # 1st crash of i2: inner restarts it (inner's intensity 1 is now used up)
        _crash(c, "i2")
        pid = wait_running(c, "i2", pids["i2"], restarts=1)["pid"]
        assert _member(c, "inner")["restarts"] == 1 and _member(c, "root")["restarts"] == 0

        # 2nd crash: inner gives up; root restarts inner (i1 and i2 on new workers), counted in root's intensity
        since = time.time_ns()
        _crash(c, "i2")
        _wait_member(c, "root", "running", restarts=1)
        _wait_member(c, "inner", "running")
        wait_running(c, "i1", pids["i1"], restarts=1)
        i2 = wait_running(c, "i2", pid, restarts=2)
        assert ps(c, "top")["pid"] == pids["top"]  # one_for_one at the root: the sibling is untouched
        assert c.call("i1", b"y") == b"2"  # restarted from its committed state
        events = [(kind, name) for _, kind, name, _ in _events_after(theater, ["i1", "i2"], since)]
        assert events == [("exit", "i2"), ("exit", "i1"), ("start", "i1"), ("start", "i2")], events
        [i1_exit] = _exits(theater, "i1")
        assert i1_exit["reason"] == "shutdown"
        assert i1_exit["detail"].startswith("supervisor inner gave up: more than 1 restarts in 60000 ms (last: i2, trap)")

        # inner gives up again: the root's second restart in its period is one too many, so the root gives up
        _crash(c, "i2")
        i2 = wait_running(c, "i2", i2["pid"], restarts=3)
        _crash(c, "i2")
        root = _wait_member(c, "root", "failed")
        assert "more than 1 restarts in 60000 ms (last: inner, shutdown)" in root["last_exit"], root
        assert all(a["pid"] is None and a["status"] in ("stopped", "failed") for a in c.ps()), c.ps()
        assert ps(c, "top")["status"] == "stopped"
        assert c.ping()["agents"] == 3  # the supervisor process stays up and answers

    out = cli(theater, "tree", "--json")
    assert out.returncode == 0, out.stderr
    [root] = json.loads(out.stdout)
    assert (root["name"], root["kind"], root["status"]) == ("root", "supervisor", "failed")
    assert "gave up: more than 1 restarts in 60000 ms" in root["last_exit"]
    assert root["uptime_s"] == 0
    text = cli(theater, "tree")
    assert text.returncode == 0 and "root [one_for_one, 1/60000ms] failed" in text.stdout, text.stdout
    assert theater.proc is not None and theater.proc.poll() is None
    top_exit = _exits(theater, "top")[-1]
    assert top_exit["reason"] == "shutdown" and "supervisor root gave up" in top_exit["detail"]
    assert_verified(theater)

    with theater.client() as c:  # the operator brings the failed tree back, every child from its committed state
        assert c.request("restart", agent="root")[0]["status"] == "running"
        assert [c.call(n, b"z") for n in ("top", "i1", "i2")] == [b"1", b"3", b"1"]
    assert_verified(theater)


# --- 5. shutdown: a timeout honoured, then a kill; brutal_kill; a clean exit --------------------


def _busy(c: Client, name: str) -> None:
    """Send a message the spin agent will loop on, and wait until its worker runs it: out of the mailbox
    is not enough (a STOP that reaches the worker before it starts the call is obeyed first), so until the
    worker has spent 50 ms of CPU on it, which an idle worker does not."""
    worker = psutil.Process(ps(c, name)["pid"])
    before = sum(worker.cpu_times()[:2])
    assert c.send(name, b"go") == {"queued": 1}
    wait_until(lambda: sum(worker.cpu_times()[:2]) - before >= 0.05, 20, f"{name}'s worker to run its message")


SPIN_LIMITS = {"wall_time_ms": 30000, "fuel_per_call": 10**12}


def test_shutdown_timeout_then_kill_brutal_kill_and_a_clean_exit(theater: Theater) -> None:
    """`theater stop`: a child busy past its 300 ms shutdown is killed when it runs out, a brutal_kill child is
    killed at once, and an idle child stops by itself."""
    write_lab_policy(theater)
    kids = [agent("slow", "spin.wat", policy=LAB_POLICY, limits=SPIN_LIMITS, restart={"shutdown": 300}),
            agent("brutal", "spin.wat", policy=LAB_POLICY, limits=SPIN_LIMITS, restart={"shutdown": "brutal_kill"}),
            agent("polite", "counter.wat")]
    with theater.client() as c:
        c.spawn(tree_manifest(theater, sup("root", kids)))
        _busy(c, "slow")
        _busy(c, "brutal")
        start = time.monotonic()
        out = cli(theater, "stop", "slow")
        assert out.returncode == 0, out.stderr
        assert time.monotonic() - start >= 0.3  # it was given its full shutdown timeout
        assert out.stdout.strip() == "slow stopped"
        start = time.monotonic()
        assert c.stop("brutal")["status"] == "stopped"
        assert time.monotonic() - start < 5.0  # not its default 5 s shutdown: no STOP was sent, it was killed
        assert c.stop("polite")["status"] == "stopped"
        assert [ps(c, n)["status"] for n in ("slow", "brutal", "polite")] == ["stopped"] * 3
        assert _member(c, "root")["restarts"] == 0  # an operator stop is not a crash
    [slow] = _exits(theater, "slow")
    assert (slow["reason"], slow["detail"]) == ("stopped", "did not stop within its shutdown timeout of 300 ms; killed")
    assert [e["reason"] for n in ("brutal", "polite") for e in _exits(theater, n)] == ["stopped", "stopped"]
    assert_verified(theater)


def test_operator_stop_records_how_the_worker_ended(theater: Theater) -> None:
    """The exit record of `theater stop` says the brutal_kill child was killed by signal 9 and the idle one exited 0."""
    write_lab_policy(theater)
    kids = [agent("brutal", "spin.wat", policy=LAB_POLICY, limits=SPIN_LIMITS, restart={"shutdown": "brutal_kill"}),
            agent("polite", "counter.wat")]
    with theater.client() as c:
        c.spawn(tree_manifest(theater, sup("root", kids)))
        _busy(c, "brutal")
        c.stop("brutal")
        c.stop("polite")
    [brutal] = _exits(theater, "brutal")
    assert "killed by signal 9" in brutal["detail"], brutal
    [polite] = _exits(theater, "polite")
    assert "exited with status 0" in polite["detail"], polite


def test_a_stop_whose_agents_call_then_fails_keeps_the_stops_reason(theater: Theater) -> None:
    """A worker obeys STOP only between calls: when the call it runs then fails (out of fuel, past its
    deadline), the exit record of an operator's stop, and of `down`, still says who stopped it, with the
    call's failure as how it ended."""
    with theater.client() as c:
        for name in ("s1", "s2"):
            c.spawn(theater.manifest(name, "spin.wat"))  # the default policy: the spin fails within 2 s
        _busy(c, "s1")
        assert c.stop("s1")["status"] == "stopped"
        _busy(c, "s2")
    theater.stop()
    for name, reason, why in (("s1", "stopped", "stopped by the operator"),
                              ("s2", "shutdown", "the supervisor is shutting down")):
        [ended] = _exits(theater, name)
        assert ended["reason"] == reason, ended
        assert ended["detail"].startswith(f"{why} (out-of-fuel: ") or ended["detail"].startswith(
            f"{why} (deadline: "), ended


def test_sibling_restart_honours_the_shutdown_timeout(theater: Theater) -> None:
    """one_for_all: a sibling busy in a long call is given its 300 ms, then killed; the restart then goes on."""
    write_lab_policy(theater)
    kids = [agent("slow", "spin.wat", policy=LAB_POLICY, limits=SPIN_LIMITS, restart={"shutdown": 300}),
            agent("brutal", "spin.wat", policy=LAB_POLICY, limits=SPIN_LIMITS, restart={"shutdown": "brutal_kill"}),
            agent("crasher")]
    with theater.client() as c:
        c.spawn(tree_manifest(theater, sup("root", kids, "one_for_all")))
        pids = _pids(c, ["slow", "brutal", "crasher"])
        _busy(c, "slow")
        _busy(c, "brutal")
        since = time.time_ns()
        _crash(c, "crasher")
        for n in ("slow", "brutal", "crasher"):
            wait_running(c, n, pids[n], restarts=1)
    events = _events_after(theater, ["slow", "brutal", "crasher"], since)
    assert [(kind, name) for _, kind, name, _ in events] == [
        ("exit", "crasher"), ("exit", "brutal"), ("exit", "slow"),
        ("start", "slow"), ("start", "brutal"), ("start", "crasher")]
    times = {(kind, name): t for t, kind, name, _ in events}
    assert times[("exit", "slow")] - times[("exit", "brutal")] >= 300_000_000  # slow was given its 300 ms
    [slow] = _exits(theater, "slow")
    assert (slow["reason"], slow["detail"]) == ("shutdown", "did not stop within its shutdown timeout of 300 ms; killed")
    [brutal] = _exits(theater, "brutal")
    assert brutal["reason"] == "shutdown" and brutal["detail"].startswith("killed by signal 9"), brutal
    assert_verified(theater)


# --- 6. a crash-looping child never wedges its supervisor or starves its siblings ----------------


class _Caller(threading.Thread):
    """Calls a counter in a loop, keeping every reply and how long each took, until told to stop or refused
    because its supervisor stopped it."""

    def __init__(self, t: Theater, name: str) -> None:
        super().__init__(daemon=True)
        self.t, self.name = t, name
        self.replies: list[bytes | None] = []
        self.slowest = 0.0
        self.errors: list[str] = []
        self.stopped_by_supervisor = ""
        self.stop = threading.Event()

    def run(self) -> None:
        with Client(self.t.home, timeout=10) as c:
            while not self.stop.is_set():
                start = time.monotonic()
                try:
                    self.replies.append(c.call(self.name, b"tick", timeout=5))
                except ClientError as exc:
                    if exc.code in ("refused", "agent-stopped") and f"agent {self.name} is stop" in str(exc):
                        self.stopped_by_supervisor = str(exc)
                    else:
                        self.errors.append(f"{exc.code}: {exc}")
                    return
                except NotRunning as exc:
                    self.errors.append(str(exc))
                    return
                self.slowest = max(self.slowest, time.monotonic() - start)


def _send_async(t: Theater, op: str, **body: object) -> zmq.Socket:
    """Send one control request without waiting for its reply; poll the returned socket for it."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(t.home.control_endpoint)
    token = t.home.token.read_text().strip()
    sock.send_multipart([wire.header(wire.ClientType.REQUEST), wire.encode_json({"op": op, "id": 1, "token": token, **body})])
    return sock


def _check_sibling_kept_serving(caller: _Caller, since: int, until: int) -> None:
    """Every call was answered promptly and in order until the caller was told to stop or its supervisor stopped
    it (the only refusal allowed), and calls were answered while the crash loop ran (replies ``since``..``until``)."""
    caller.stop.set()
    caller.join(timeout=20)
    assert not caller.is_alive()
    assert not caller.errors, caller.errors
    assert caller.replies == [str(n).encode() for n in range(1, len(caller.replies) + 1)]
    assert until - since >= 3, (since, until)
    assert caller.slowest < 2.0, caller.slowest


def _busy_echo(t: Theater) -> Path:
    """echo.wat whose handle first counts down a million per byte of its message: a call as long as asked."""
    spin = """(local $n i64)
      (local.set $n (i64.mul (i64.extend_i32_u (local.get $ml)) (i64.const 1000000)))
      (block $done (loop $spin
        (br_if $done (i64.eqz (local.get $n)))
        (local.set $n (i64.sub (local.get $n) (i64.const 1)))
        (br $spin)))
      (i32.store8 (i32.const 16) (i32.const 0))
      (i32.store (i32.const 20) (local.get $sp))"""
    source = (COMPONENTS / "echo.wat").read_text()
    head = """(func (export "handle") (param $sp i32) (param $sl i32) (param $mp i32) (param $ml i32)
          (result i32)
      (i32.store8 (i32.const 16) (i32.const 0))
      (i32.store (i32.const 20) (local.get $sp))"""
    assert source.count(head) == 1
    path = t.dir / "busy_echo.wat"
    path.write_text(source.replace(head, head.split("(i32.store8")[0] + spin))
    return path


LONG_THEN_THREE = [b"x" * 40, b"a", b"b", b"c"]  # to _busy_echo: a long call, then three short ones


def _calls_then(t: Theater, request: dict[str, Any]) -> dict[int, tuple[bool, Any]]:
    """On one socket, which keeps their order: LONG_THEN_THREE as calls to `busy` (ids 1-4), then ``request``
    (id 5). Every answer by id: (ok, the reply's data frame if ok, else the error)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(t.home.control_endpoint)
    token = t.home.token.read_text().strip()
    try:
        for rid, message in enumerate(LONG_THEN_THREE, 1):
            body = {"op": "call", "id": rid, "token": token, "agent": "busy", "timeout_ms": 60_000}
            sock.send_multipart([wire.header(wire.ClientType.REQUEST), wire.encode_json(body), message])
        sock.send_multipart([wire.header(wire.ClientType.REQUEST), wire.encode_json({**request, "id": 5, "token": token})])
        outcomes: dict[int, tuple[bool, Any]] = {}
        while len(outcomes) < 5:
            assert sock.poll(30_000), f"answers so far: {outcomes}"
            frames = sock.recv_multipart()
            reply = wire.decode_reply(frames[1])
            outcomes[reply["id"]] = (reply["ok"], (frames[2] if len(frames) > 2 else None) if reply["ok"]
                                     else reply["error"])
    finally:
        sock.close(0)
    return outcomes


def test_calls_left_queued_at_down_are_answered(theater: Theater) -> None:
    """`down` stops the agent while a long call runs and three more wait behind it, sent ahead to its worker.
    The worker obeys its STOP first; the calls it never started will not run (the next supervisor knows
    nothing of them): they are answered `agent-stopped` before the supervisor ends, not left to time out."""
    with theater.client() as c:
        c.spawn(theater.manifest("busy", str(_busy_echo(theater))))
        assert c.call("busy", b"warm") == b"warm"
    outcomes = _calls_then(theater, {"op": "down"})
    assert outcomes[5][0], outcomes
    left = [outcomes[rid][1] for rid in range(1, 5) if not outcomes[rid][0]]
    assert left, outcomes  # the long call holds the three behind it past the STOP
    assert all(error == {"code": "agent-stopped", "message": "agent busy is stopped"} for error in left), outcomes
    assert theater.proc is not None and theater.proc.wait(timeout=20) == 0


def _store_descriptors(t: Theater) -> int:
    """How many descriptors the supervisor process holds on the event store file: a verify opens one more."""
    assert t.proc is not None
    held = 0
    for fd in os.listdir(f"/proc/{t.proc.pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            held += os.readlink(f"/proc/{t.proc.pid}/fd/{fd}") == str(t.home.store)
    return held


def test_down_stops_a_verify_in_progress_and_answers_its_client(theater: Theater) -> None:
    """A verify runs on a thread of the supervisor's. `down` was answered while it went on, the process lived
    until it ended (minutes, for a large home), and its client was never answered. Now `down` stops it: its
    client is answered refused (a verify that ran to its end would be answered with its chains), and the
    process ends."""
    with theater.client() as c:
        c.spawn(theater.manifest("chatty", "chatty.wat"))  # 11 records a message: some 50,000 in all
        for _ in range(5):
            assert all(r["ok"] for r in send_burst(theater, "chatty", [b"x"] * 900))
            c.call("chatty", b"x")  # answered after the burst's messages, so every one of them is committed
        c.stop("chatty")  # no worker to wait for at `down`, which then ends at once, long before the verify would
    before = _store_descriptors(theater)
    sock = _send_async(theater, "verify")
    try:
        wait_until(lambda: _store_descriptors(theater) > before, what="the verify to open the store")
        with theater.client() as c:
            assert c.down() == {"stopped": 0}
        assert sock.poll(30_000), "the verify's client was not answered"
        reply = wire.decode_reply(sock.recv_multipart()[1])
    finally:
        sock.close(0)
    # The verify takes about a second and `down` comes within milliseconds of its start, so it is refused;
    # were the test held up that long, it would have ended and been answered with its chains, which is right too.
    assert reply.get("error") == {"code": "refused", "message": "the supervisor is shutting down"} \
        or reply["result"]["chains"][0]["ok"], reply
    assert theater.proc is not None and theater.proc.wait(timeout=20) == 0


def test_calls_sent_ahead_of_a_stop_are_answered_agent_stopped_not_worker_died(theater: Theater) -> None:
    """A worker obeys a STOP before the calls it was sent ahead (wire-protocol.md section 4.6). Those calls
    never started: their callers are told the agent stopped (``agent-stopped``), as for queued ones, and
    ``worker-died`` (the worker ended during the call) is not what happened. The first call runs long, so
    the three behind it and the STOP reach the worker while it runs; one socket keeps the order."""
    with theater.client() as c:
        c.spawn(theater.manifest("busy", str(_busy_echo(theater))))
        assert c.call("busy", b"warm") == b"warm"
        outcomes = _calls_then(theater, {"op": "stop", "agent": "busy"})
        assert outcomes[5][0], outcomes
        calls = [outcomes[rid] for rid in range(1, 5)]
        ran = [ok for ok, _ in calls]
        assert ran == sorted(ran, reverse=True), calls  # the ones that ran came first
        for (ok, what), message in zip(calls, LONG_THEN_THREE, strict=True):
            assert what == message if ok else what["code"] == "agent-stopped", calls
        assert not all(ran), calls  # the STOP came before the calls behind the long one
        assert ps(c, "busy")["status"] == "stopped"
    assert [e.fields()["reason"] for e in of(records(theater, "busy"), Kind.EXIT)] == ["stopped"]
    assert_verified(theater)


def test_handle_crash_loop_gives_up_without_starving_a_sibling(theater: Theater) -> None:
    """A child fed one crashing message after another crashes on each new worker until its supervisor gives up;
    meanwhile its sibling answers every call promptly and ps answers."""
    with theater.client() as c:
        c.spawn(tree_manifest(theater, sup("root", [agent("sib", "counter.wat"), agent("loop")],
                                           intensity=5, period_ms=60000)))
        caller = _Caller(theater, "sib")
        caller.start()
        wait_until(lambda: len(caller.replies) >= 2 or caller.errors, 10, "the sibling to answer")
        since = len(caller.replies)
        for _ in range(8):  # each worker of "loop" takes the next one and crashes on it
            c.send("loop", b"trap")
        root = _wait_member(c, "root", "failed")
        _check_sibling_kept_serving(caller, since, until=len(caller.replies))
        assert "more than 5 restarts in 60000 ms (last: loop, trap)" in root["last_exit"], root
        assert ps(c, "loop")["restarts"] == 5
        assert ps(c, "sib")["status"] == "stopped"
    assert [e["reason"] for e in _exits(theater, "loop")] == ["trap"] * 6
    assert_verified(theater)


def test_init_crash_loop_gives_up_without_starving_a_sibling(theater: Theater) -> None:
    """A child whose init traps on every start is restarted until its supervisor gives up; its sibling keeps
    answering every call promptly meanwhile."""
    manifest = tree_manifest(theater, sup("root", [agent("sib", "counter.wat"), agent("loop", "init_trap.wat")],
                                          intensity=20, period_ms=60000))
    spawn = _send_async(theater, "spawn", manifest=str(manifest))  # the tree's start itself is not at issue here
    try:
        with theater.client() as c:
            wait_until(lambda: any(a["name"] == "sib" and a["status"] == "running" for a in c.ps()), 20, "sib running")
            caller = _Caller(theater, "sib")
            caller.start()
            root = _wait_member(c, "root", "failed", timeout=30)
            _check_sibling_kept_serving(caller, 0, until=len(caller.replies))
            assert "more than 20 restarts in 60000 ms (last: loop, trap)" in root["last_exit"], root
            assert ps(c, "loop")["restarts"] == 20
            assert c.ping()
    finally:
        spawn.close(0)
    exits = of(records(theater, "loop"), Kind.EXIT)
    assert [e.fields()["reason"] for e in exits] == ["trap"] * 21
    assert all(e.fields()["detail"] == f"trap: {TRAP}" for e in exits)
    assert_verified(theater)


def test_spawning_a_tree_whose_child_cannot_start_is_answered(theater: Theater) -> None:
    """The spawn of a tree whose second child cannot load its component is answered (an error, or a tree that
    shows the child failed), and is not left starting; the child is never restarted."""
    manifest = tree_manifest(theater, sup("root", [agent("sib", "counter.wat"), agent("bad", "missing_export.wat")],
                                          intensity=2, period_ms=60000))
    with theater.client(timeout=5) as c:  # "bad" fails to load within a second
        try:
            info = c.spawn(manifest)
        except ClientError as exc:
            assert exc.code == "spawn-failed" and "bad" in str(exc), f"{exc.code}: {exc}"
        else:
            bad = _find([info], "bad")
            assert info["status"] == "failed" or (bad is not None and bad["status"] == "failed"), info
        assert _member(c, "root")["status"] != "starting"
        bad = _find(c.request("tree")[0]["roots"], "bad")
        if bad is not None:
            assert bad["restarts"] == 0 and "load-failed" in bad["last_exit"], bad


def test_children_start_in_order_though_the_next_ones_worker_is_made_ready_ahead(theater: Theater) -> None:
    """While a child starts, the next child's worker is spawned and its hello checked, but nothing of it is
    recorded and it runs nothing until the one before is ready: each child's first record follows the
    previous child's init."""
    names = ["a", "b", "c", "d"]
    with theater.client() as c:
        info = c.spawn(tree_manifest(theater, sup("root", [agent(n, "counter.wat") for n in names])))
        assert info["status"] == "running", info
        assert [c.call(n, b"x") for n in names] == [b"1"] * 4
    for before, after in itertools.pairwise(names):
        [init] = of(records(theater, before), Kind.INIT)
        first = records(theater, after)[0]
        assert first.kind is Kind.GENESIS and first.time_ns > init.time_ns, (before, after)
    assert_verified(theater)


def _held_start(t: Theater) -> tuple[threading.Thread, list[object], int]:
    """Spawn root = [x, b, c] from a thread, b's init held by a call to x that spins (50 s at most): while
    b starts, c's worker is made ready ahead. Returns the spawning thread, where its outcome goes, and the
    pid of c's held worker (the worker whose output goes to c's log while c has no worker of its own)."""
    lab = (ROOT / "policies" / "messaging.toml").read_text().replace("wall_time_ms = 5000 ", "wall_time_ms = 60000 ")
    t.home.policies.mkdir(exist_ok=True)
    (t.home.policies / "messaging-lab.toml").write_text(lab)
    talk = {"policy": "messaging-lab", "capabilities": ["runtime", "messaging"]}
    kids = [agent("x", "messenger.wat", **talk, messaging={"to": [], "from": ["b"]}),
            agent("b", "messenger.wat", **talk, messaging={"to": ["x"], "from": []}, init_args="call:50000:x:spin"),
            agent("c", "counter.wat")]
    outcome: list[object] = []

    def spawn() -> None:
        with t.client(timeout=120) as c:
            try:
                outcome.append(c.spawn(tree_manifest(t, sup("root", kids))))
            except (ClientError, NotRunning) as exc:
                outcome.append(exc)

    thread = threading.Thread(target=spawn)
    thread.start()
    log = str(t.home.logs / "c.log")

    def held() -> int | None:
        sup_pid = int(t.home.pid_file.read_text())
        for pid in Path("/proc").iterdir():
            try:
                if (pid.name.isdigit() and f"PPid:\t{sup_pid}\n" in (pid / "status").read_text()
                        and os.readlink(pid / "fd" / "2") == log):
                    return int(pid.name)
            except OSError:
                continue
        return None

    return thread, outcome, wait_until(held, what="c's worker made ready ahead")  # type: ignore[return-value]


def test_a_held_worker_that_dies_is_replaced_when_its_turn_comes(theater: Theater) -> None:
    """The worker made ready for c dies while b's start holds the plan: nothing of it is recorded, and
    when c's turn comes it starts on a new worker."""
    thread, outcome, pid = _held_start(theater)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: f"c: worker {pid}, made ready ahead of its start, ended" in supervisor_log(theater),
               what="the held worker's end logged")
    with theater.client() as c:
        os.kill(ps(c, "x")["pid"], signal.SIGKILL)  # b's call fails at once; b's init returns, c's turn comes
        thread.join(60)
        assert not thread.is_alive() and isinstance(outcome[0], dict), outcome
        info = wait_running(c, "c")
        assert info["pid"] != pid and c.call("c", b"x") == b"1"
    kinds = [r.kind for r in records(theater, "c")]
    assert kinds[:2] == [Kind.GENESIS, Kind.INIT] and Kind.HANDLE in kinds and Kind.WORKER_KEY not in kinds, kinds
    assert_verified(theater)


def test_a_held_worker_is_ended_unrecorded_when_its_start_is_abandoned(theater: Theater) -> None:
    """`theater down` abandons the start while b holds it: the spawn is answered that the supervisor is going
    down, the worker made ready for c is ended, and c, never started, has no record at all."""
    thread, outcome, pid = _held_start(theater)
    with theater.client() as c:
        c.down()
    thread.join(60)
    [refused] = outcome  # the spawn still waiting is answered, not left to time out
    assert isinstance(refused, ClientError) and refused.code == "refused", refused
    assert "the supervisor is shutting down" in str(refused)
    wait_until(lambda: gone(pid), what="c's held worker gone")
    assert theater.proc is not None
    wait_until(lambda: theater.proc.poll() is not None, what="the supervisor gone")  # type: ignore[union-attr]
    assert "c: the worker made ready ahead for it is ended: its start is not coming" in supervisor_log(theater)
    with pytest.raises(NotFound):  # not even a genesis: the store has never heard of c
        records(theater, "c")


# --- 7. restart from the last committed state, or from the initial one ---------------------------


def test_restart_resumes_from_the_last_committed_state_and_the_chain_continues(theater: Theater) -> None:
    """from = "last": the new worker continues the count; from = "initial": init runs again and the count restarts.
    Either way the chain goes on: exit, then worker-key, with contiguous sequence numbers, and it verifies."""
    kids = [agent("keep"), agent("fresh", restart={"from": "initial"})]
    with theater.client() as c:
        c.spawn(tree_manifest(theater, sup("root", kids, intensity=5, period_ms=60000)))
        for n in ("keep", "fresh"):
            assert [c.call(n, b"x") for _ in range(3)] == [b"1", b"2", b"3"]
            pid = ps(c, n)["pid"]
            _crash(c, n)
            wait_running(c, n, pid, restarts=1)
        os.kill(ps(c, "keep")["pid"], signal.SIGKILL)  # a killed worker is the same kind of crash
        wait_running(c, "keep", None, restarts=2)
        assert c.call("keep", b"y") == b"4"
        assert c.call("fresh", b"y") == b"1"

    keep = records(theater, "keep")  # contiguous seq checked there
    kinds = [r.kind for r in keep]
    assert kinds == [Kind.GENESIS, Kind.INIT, *[Kind.HANDLE] * 4, Kind.EXIT, Kind.WORKER_KEY, Kind.EXIT,
                     Kind.WORKER_KEY, Kind.HANDLE], kinds
    three = keep[4].state_hash  # after the third call
    assert all(r.state_hash == three for r in keep[5:10])  # the trap, the exits and the new keys keep the state
    assert [r.fields()["incarnation"] for r in keep if r.kind in (Kind.EXIT, Kind.WORKER_KEY)] == [0, 1, 1, 2]
    assert keep[7].fields()["reason"].startswith("trap: ")  # the new worker's key says why it was started
    keys = [r.fields()["worker_key"] for r in keep if r.kind in (Kind.GENESIS, Kind.WORKER_KEY)]
    assert len(set(keys)) == 3  # each worker made its own key, signed into the same chain
    assert keep[-1].fields()["reply"] == b"4"

    fresh = records(theater, "fresh")
    kinds = [r.kind for r in fresh]
    assert kinds == [Kind.GENESIS, Kind.INIT, *[Kind.HANDLE] * 4, Kind.EXIT, Kind.STATE_RESET, Kind.WORKER_KEY,
                     Kind.INIT, Kind.HANDLE]
    reset = fresh[7]  # the chain says the state went back to the empty initial state, and why
    assert reset.state_hash == sha256(b"") != fresh[6].state_hash
    assert reset.fields()["reason"] == 'restarted from its initial state (from = "initial")'
    assert fresh[8].state_hash == sha256(b"")  # the new worker's key record links to the reset state
    assert fresh[9].fields()["status"] == "ok"  # init was called again...
    assert fresh[9].state_hash == fresh[1].state_hash  # ...and gave the initial state again
    assert fresh[-1].fields()["reply"] == b"1"
    assert_verified(theater)


def test_restart_from_initial_takes_the_records_init_writes_before_its_result(theater: Theater) -> None:
    """from = "initial" after a non-empty state was committed: the log and host-call records that the second
    init writes before its init record carry the empty state's hash, which the state-reset record put in the
    chain, so they are accepted; the agent runs again once (no crash loop, its supervisor does not give up)."""
    with theater.client() as c:
        c.spawn(tree_manifest(theater, sup("root", [agent("fresh", "init_logs.wat", restart={"from": "initial"})],
                                           intensity=5, period_ms=60000)))
        assert [c.call("fresh", b"x") for _ in range(3)] == [b"1", b"2", b"3"]
        pid = ps(c, "fresh")["pid"]
        _crash(c, "fresh")
        wait_running(c, "fresh", pid, restarts=1)
        assert c.call("fresh", b"y") == b"1"  # the initial state: init ran again
        node = _member(c, "fresh")
        assert (node["status"], node["restarts"]) == ("running", 1), node
        root = _member(c, "root")
        assert (root["status"], root["restarts"]) == ("running", 1), root

    chain = records(theater, "fresh")  # contiguous seq checked there
    kinds = [r.kind for r in chain]
    init_calls = [Kind.LOG, Kind.HOST_CALL, Kind.INIT]  # init logs, reads the clock, then returns
    assert kinds == [Kind.GENESIS, *init_calls, *[Kind.HANDLE] * 4, Kind.EXIT, Kind.STATE_RESET, Kind.WORKER_KEY,
                     *init_calls, Kind.HANDLE], kinds
    assert [e["reason"] for e in _exits(theater, "fresh")] == ["trap"]
    empty = sha256(b"")
    assert chain[6].state_hash == chain[7].state_hash == chain[8].state_hash == sha256(b"3")  # kept by trap, exit
    reset = chain[9]
    assert reset.fields()["reason"] == 'restarted from its initial state (from = "initial")'
    assert reset.state_hash == chain[10].state_hash == empty  # the new worker's key links to the reset state
    for log, call, init in (chain[1:4], chain[11:14]):  # each worker's init records, the second's included
        assert (log.fields()["level"], log.fields()["message"]) == ("info", "init")
        assert (call.fields()["interface"], call.fields()["function"]) == ("theater:agent/runtime@0.1.0", "now")
        assert log.state_hash == call.state_hash == empty  # written before init's result, on the empty state
        assert init.fields()["status"] == "ok" and init.state_hash == sha256(b"0")
    assert chain[-1].fields()["reply"] == b"1"
    assert_verified(theater)


# --- 8. `theater restart` and `theater tree` ------------------------------------------------------


def test_operator_restart_of_an_agent_and_a_subtree_does_not_count_against_intensity(theater: Theater) -> None:
    """`theater restart` gives an agent or a whole subtree new workers (stopping in reverse, starting in order),
    from their committed state, without using up any supervisor's intensity or counting as restarts in ps;
    `theater tree --json` shows ids, names, strategies, restart counts, status and uptime."""
    inner = sup("inner", [agent("s1"), agent("s2")], "rest_for_one", intensity=1, period_ms=60000)
    with theater.client() as c:
        c.spawn(tree_manifest(theater, sup("root", [agent("a"), inner], intensity=1, period_ms=60000)))
        for n in ("a", "s1", "s2"):
            assert c.call(n, b"x") == b"1"
        for via_cli in (True, False):
            pid = ps(c, "a")["pid"]
            if via_cli:
                out = cli(theater, "restart", "a", "--json")
                assert out.returncode == 0, out.stderr
                info = json.loads(out.stdout)
            else:
                info = c.request("restart", agent="a")[0]
            assert (info["name"], info["kind"], info["status"]) == ("a", "agent", "running")
            assert info["pid"] not in (None, pid) and info["restarts"] == 0
        assert c.call("a", b"y") == b"2"  # restarted from its committed state

        before = _pids(c, ["s1", "s2"])
        since = time.time_ns()
        out = cli(theater, "restart", "inner", "--json")
        assert out.returncode == 0, out.stderr
        info = json.loads(out.stdout)
        assert (info["name"], info["kind"], info["status"], info["restarts"]) == ("inner", "supervisor", "running", 0)
        after = _pids(c, ["s1", "s2"])
        assert all(after[n] not in (None, before[n]) for n in after), (before, after)
        assert [c.call(n, b"y") for n in ("s1", "s2")] == [b"2", b"2"]
        events = [(kind, name) for _, kind, name, _ in _events_after(theater, ["s1", "s2"], since)]
        assert events == [("exit", "s2"), ("exit", "s1"), ("start", "s1"), ("start", "s2")], events

        out = cli(theater, "tree", "--json")
        assert out.returncode == 0, out.stderr
        [root] = json.loads(out.stdout)
        assert {k: root[k] for k in ("kind", "name", "strategy", "intensity", "period_ms", "restarts", "status")} == {
            "kind": "supervisor", "name": "root", "strategy": "one_for_one", "intensity": 1, "period_ms": 60000,
            "restarts": 0, "status": "running"}
        assert root["uptime_s"] > 0
        assert uptime_s(10.0, 8.7654) == 1.234 and uptime_s(5.0, 5.0) == 0  # whole milliseconds, never more
        [a, sub] = root["children"]
        assert (a["kind"], a["name"], a["restart"], a["restarts"], a["status"]) == ("agent", "a", "permanent", 0, "running")
        assert a["id"] == ps(c, "a")["id"] and a["pid"] == ps(c, "a")["pid"] and a["uptime_s"] >= 0
        assert (sub["kind"], sub["name"], sub["strategy"], sub["restarts"], sub["status"]) == (
            "supervisor", "inner", "rest_for_one", 0, "running")
        assert [(m["name"], m["restarts"], m["status"]) for m in sub["children"]] == [("s1", 0, "running"), ("s2", 0, "running")]
        ids = [root["id"], a["id"], sub["id"], *[m["id"] for m in sub["children"]]]
        assert len(set(ids)) == 5 and all(len(i) == 36 for i in ids)

        # intensity 1 is still whole at both levels: one crash is restarted, the next one is one too many
        _crash(c, "s1")
        _wait_member(c, "inner", "running", restarts=1)
        wait_running(c, "s2", after["s2"], restarts=1)  # rest_for_one: s2 comes after s1
        assert _member(c, "root")["restarts"] == 0
        crashed = ps(c, "a")["pid"]  # read before the crash: once it is restarted, ps shows the new worker
        _crash(c, "a")
        wait_running(c, "a", crashed, restarts=1)
        assert _member(c, "root")["status"] == "running"
        _crash(c, "a")
        assert "more than 1 restarts in 60000 ms" in _wait_member(c, "root", "failed")["last_exit"]
    exits = _exits(theater, "a")
    assert [e["reason"] for e in exits] == ["shutdown", "shutdown", "trap", "trap"]
    assert [e["detail"] for e in exits[:2]] == ["restarted by the operator (exited with status 0)"] * 2  # who, and how it ended
    for n in ("s1", "s2"):  # so do a restarted subtree's children's chains
        assert _exits(theater, n)[0] == {"incarnation": 0, "reason": "shutdown", "detail": "restarted by the operator (exited with status 0)"}
    assert_verified(theater)


def test_uptime_counts_from_each_time_an_agent_becomes_running(theater: Theater) -> None:
    """`uptime_s` is the time since the agent last became running: an operator restart and a restart after a
    crash each start it again from 0."""
    with theater.client() as c:
        c.spawn(theater.manifest("up", "trap_on.wat"))
        wait_until(lambda: ps(c, "up")["uptime_s"] >= 1.0, 20, "up running for a second")
        since = time.monotonic()
        info = c.restart("up")
        assert info["uptime_s"] <= time.monotonic() - since, info
        wait_until(lambda: ps(c, "up")["uptime_s"] >= 1.0, 20, "up running for a second again")
        pid, since = ps(c, "up")["pid"], time.monotonic()
        _crash(c, "up")
        info = wait_running(c, "up", pid, restarts=1)
        assert info["uptime_s"] <= time.monotonic() - since, info
        assert _member(c, "up")["uptime_s"] <= time.monotonic() - since


def test_operator_restart_of_what_cannot_start_answers_why_once_settled(theater: Theater) -> None:
    """`theater restart` answers once the restart has settled: an agent whose init traps until its supervisor
    gives up, a tree that gives up on such a child, and a child that cannot load are each answered
    `restart-failed`, naming the outcome and the last exit (the CLI exits 1), not with a passing status."""
    init_trap = "wasm trap: wasm `unreachable` instruction executed"
    with theater.client() as c:
        with pytest.raises(ClientError) as spawned:
            c.spawn(theater.manifest("itop", "init_trap.wat", restart={"intensity": 1, "period_ms": 60000}))
        assert spawned.value.code == "spawn-failed"
        out = cli(theater, "restart", "itop")
        assert out.returncode == 1, out
        assert out.stderr.startswith(f"theater: restart-failed: itop did not start: it is failed (trap: {init_trap}; "
                                     "more than 1 restarts in 60000 ms, giving up)"), out.stderr
        assert ps(c, "itop")["status"] == "failed"

        kids = [agent("ok", "counter.wat"), agent("loop", "init_trap.wat"), agent("bad", "missing_export.wat")]
        c.spawn(tree_manifest(theater, sup("root", kids[:2], intensity=1, period_ms=60000)))
        _wait_member(c, "root", "failed")
        with pytest.raises(ClientError) as restarted:
            c.restart("root")
        assert restarted.value.code == "restart-failed", restarted.value
        assert str(restarted.value) == ("root did not start: supervisor root gave up: more than 1 restarts in 60000 ms "
                                        f"(last: loop, trap); loop is failed (trap: {init_trap})")

        c.spawn(tree_manifest(theater, sup("other", [kids[0] | {"name": "ok2"}, kids[2]])))
        wait_status(c, "bad", "failed")
        with pytest.raises(ClientError) as restarted:
            c.restart("bad")
        assert restarted.value.code == "restart-failed", restarted.value
        assert str(restarted.value).startswith("bad did not start: it is failed (load-failed: "), restarted.value
        assert _member(c, "other")["status"] == "running" and c.call("ok2", b"x") == b"1"


def _down_promptly(t: Theater) -> None:
    """`theater down` is answered and the supervisor exits: nothing runs outside the trees it stops."""
    with t.client(timeout=20) as c:
        c.down()
    assert t.proc is not None
    t.proc.wait(timeout=20)


def test_operator_restart_of_a_temporary_child_that_left_its_node_is_refused(theater: Theater) -> None:
    """A temporary child that ended has left its node (OTP: restart_child answers not_found): `theater restart`
    of it is refused, saying to restart its node, which starts it again among its children."""
    kids = [agent("a"), agent("tmp", restart={"type": "temporary"})]
    with theater.client() as c:
        c.spawn(tree_manifest(theater, sup("root", kids)))
        _crash(c, "tmp")
        wait_status(c, "tmp", "failed")
        out = cli(theater, "restart", "tmp")
        assert out.returncode == 1, out
        assert "tmp is a temporary child of supervisor root and has ended" in out.stderr, out.stderr
        assert "theater restart root" in out.stderr and "theater rm" not in out.stderr, out.stderr
        assert ps(c, "tmp")["status"] == "failed" and ps(c, "tmp")["pid"] is None  # not started
        assert [m["name"] for m in _member(c, "root")["children"]] == ["a"]
        info = c.request("restart", agent="root")[0]
        assert [(m["name"], m["status"]) for m in info["children"]] == [("a", "running"), ("tmp", "running")]
        assert c.call("tmp", b"x") == b"1"  # under its node again
        assert c.stop("root")["status"] == "stopped"
        assert ps(c, "tmp")["status"] == "stopped"
    _down_promptly(theater)


def test_operator_restart_of_a_member_under_a_failed_node_is_refused(theater: Theater) -> None:
    """A child (or a subtree) of a node that gave up would run unsupervised: its restart is refused, naming the
    failed node to restart; restarting that node starts it."""
    kids = [agent("a"), sup("inner", [agent("b")])]
    with theater.client() as c:
        c.spawn(tree_manifest(theater, sup("root", kids, intensity=0)))
        _crash(c, "a")
        _wait_member(c, "root", "failed")
        for name in ("a", "inner", "b"):
            with pytest.raises(ClientError) as refused:
                c.request("restart", agent=name)
            assert refused.value.code == "refused", refused.value
            assert f"{name}'s supervisor root failed (gave up: more than 0 restarts" in str(refused.value)
            assert str(refused.value).endswith("theater restart root"), refused.value
        assert [ps(c, n)["pid"] for n in ("a", "b")] == [None, None]
        info = c.request("restart", agent="root")[0]
        assert (info["status"], _find([info], "a")["status"], _find([info], "b")["status"]) == (
            "running", "running", "running")
        _crash(c, "a")  # supervised again: restarted by its node (intensity 0 of a fresh start: it gives up)
        _wait_member(c, "root", "failed")
        c.request("restart", agent="root")
        c.stop("root")  # a stopped node has no children to restart either
        for name in ("a", "inner", "b"):
            with pytest.raises(ClientError) as refused:
                c.request("restart", agent=name)
            assert f"{name}'s supervisor root is stopped: restarted alone {name} would run unsupervised" \
                in str(refused.value), refused.value
        assert [ps(c, n)["pid"] for n in ("a", "b")] == [None, None]
    _down_promptly(theater)


# --- 9. trees survive the supervisor --------------------------------------------------------------


def test_tree_survives_down_and_start(theater: Theater) -> None:
    """`down` stops a tree last child first; the next start brings it back in start order, each child from its
    committed state; a child and a tree the operator stopped stay stopped until `theater restart`."""
    names = ["a", "b", "c", "d"]
    with theater.client() as c:
        c.spawn(tree_manifest(theater, sup("root", [agent(n) for n in names], "one_for_all")))
        c.spawn(tree_manifest(theater, sup("off", [agent("z")])))
        for i, n in enumerate(names):
            for _ in range(i + 1):
                c.call(n, b"x")
        root_id = _member(c, "root")["id"]
        assert c.stop("b")["status"] == "stopped"
        assert c.stop("off")["status"] == "stopped"
        workers = [a["pid"] for a in c.ps() if a["pid"]]
    assert len(workers) == 3
    since = time.time_ns()
    theater.stop()
    assert theater.proc is not None and theater.proc.returncode == 0
    stops = _events_after(theater, names, since)
    assert [(kind, name) for _, kind, name, _ in stops] == [("exit", "d"), ("exit", "c"), ("exit", "a")]
    assert all(f["reason"] == "shutdown" for *_, f in stops)
    assert_verified(theater)

    since = time.time_ns()
    theater.start()
    with theater.client() as c:
        root = _wait_member(c, "root", "running")
        assert root["id"] == root_id and [m["name"] for m in root["children"]] == names
        running = ["a", "c", "d"]
        assert all(ps(c, n)["status"] == "running" and ps(c, n)["pid"] not in workers for n in running)
        assert [ps(c, n)["restarts"] for n in running] == [0, 0, 0]  # a resume is not a restart
        assert [c.call(n, b"y") for n in running] == [b"2", b"4", b"5"]
        assert (ps(c, "b")["status"], ps(c, "b")["pid"]) == ("stopped", None)
        assert _member(c, "off")["status"] == "stopped"
        assert (ps(c, "z")["status"], ps(c, "z")["pid"]) == ("stopped", None)
        starts = [(kind, name) for _, kind, name, _ in _events_after(theater, [*names, "z"], since)]
        assert starts == [("start", "a"), ("start", "c"), ("start", "d")], starts
        c.request("restart", agent="b")
        assert c.call("b", b"y") == b"3"
    assert_verified(theater)


def test_tree_survives_a_supervisor_sigkill(theater: Theater) -> None:
    """A SIGKILLed supervisor takes its workers with it; the next start records why, then restarts the tree in order."""
    names = ["a", "b"]
    inner = sup("inner", [agent("i")])
    with theater.client() as c:
        c.spawn(tree_manifest(theater, sup("root", [agent("a"), inner, agent("b")])))
        for n in (*names, "i"):
            assert c.call(n, b"x") == b"1"
    theater.kill()
    since = time.time_ns()
    start_after_crash(theater)
    with theater.client() as c:
        _wait_member(c, "root", "running")
        assert [c.call(n, b"y") for n in ("a", "i", "b")] == [b"2", b"2", b"2"]
        assert [m["name"] for m in _member(c, "root")["children"]] == ["a", "inner", "b"]
    events = _events_after(theater, ["a", "i", "b"], since)
    assert sorted((kind, name) for _, kind, name, _ in events if kind == "exit") == [("exit", "a"), ("exit", "b"), ("exit", "i")]
    assert all(f["reason"] == "supervisor-restart" for _, kind, _, f in events if kind == "exit")
    assert [name for _, kind, name, _ in events if kind == "start"] == ["a", "i", "b"]
    assert_verified(theater)


def test_a_temporary_child_back_with_its_restarted_node_is_resumed_with_it(theater: Theater) -> None:
    """A temporary child that ended left its node, and its stored desired state was its end's; when the node's
    own supervisor restarts the node, the child starts again with it, and is stored as running again: after a
    supervisor SIGKILL it resumed with its node (it used to stay stopped)."""
    inner = sup("inner", [agent("tmp", "finisher.wat", restart={"type": "temporary"}), agent("q")], intensity=0)
    with theater.client() as c:
        c.spawn(tree_manifest(theater, sup("root", [inner], intensity=5, period_ms=60000)))
        assert c.call("tmp", b"finish") == b"1"  # a normal end: it leaves inner, stored as stopped
        wait_status(c, "tmp", "stopped")
        _crash(c, "q")  # inner gives up (intensity 0); root restarts it, and tmp comes back with it
        _wait_member(c, "inner", "running", restarts=0)
        wait_until(lambda: ps(c, "tmp")["status"] == "running", what="tmp back with inner")
    theater.kill()
    start_after_crash(theater)
    with theater.client() as c:
        _wait_member(c, "root", "running")
        wait_until(lambda: ps(c, "tmp")["status"] == "running", what="tmp resumed with its node")
        assert [m["name"] for m in _member(c, "inner")["children"]] == ["tmp", "q"]
    assert_verified(theater)


def test_tree_survives_two_restarts_of_the_supervisor(theater: Theater) -> None:
    """Every child of a running tree runs again after each of two `down` + start cycles, and is stored as running."""
    names = ["a", "b", "c"]
    with theater.client() as c:
        c.spawn(tree_manifest(theater, sup("root", [agent(n) for n in names])))
    for cycle in (1, 2):
        theater.stop()
        theater.start()
        with theater.client() as c:
            _wait_member(c, "root", "running")
            assert [(ps(c, n)["status"], c.call(n, b"x")) for n in names] == [("running", str(cycle).encode())] * 3
        db = open_readonly(theater.home.store)
        try:
            desired = dict(db.execute("SELECT name, desired FROM agents").fetchall())
        finally:
            db.close()
        assert desired == dict.fromkeys(names, "running"), (cycle, desired)


def test_operator_restart_of_a_failed_top_level_agent_starts_a_fresh_intensity(theater: Theater) -> None:
    """After a top-level agent gave up and the operator restarted it, it again gets `intensity` restarts."""
    with theater.client() as c:
        c.spawn(theater.manifest("solo", "trap_on.wat", restart={"intensity": 1, "period_ms": 60000}))
        pid = ps(c, "solo")["pid"]
        _crash(c, "solo")
        pid = wait_running(c, "solo", pid, restarts=1)["pid"]
        _crash(c, "solo")
        assert "more than 1 restarts in 60000 ms" in wait_status(c, "solo", "failed")["last_exit"]
        assert c.request("restart", agent="solo")[0]["status"] == "running"
        pid = ps(c, "solo")["pid"]
        _crash(c, "solo")  # one crash, within intensity 1 of a fresh start
        info = wait_until(lambda: (i := ps(c, "solo"))["status"] in ("running", "failed") and i["pid"] != pid and i,
                          20, "solo restarted or failed")
        assert info["status"] == "running", info  # type: ignore[index]


# --- 9. supervisor nodes have chains ------------------------------------------------------------


def test_a_tree_nodes_decisions_are_signed_into_its_own_chain(theater: Theater) -> None:
    """start, restart (with the child and reason), give-up (with the offender), terminate: each a record of the
    node's chain, signed by the supervisor, shown by `events` and followed by `wait`."""
    kids = [agent("a"), agent("b")]
    with theater.client() as c:
        c.spawn(tree_manifest(theater, sup("root", kids, "one_for_all", intensity=1, period_ms=60000)))
        head = c.wait_events("root", -1, 0)
        pid = ps(c, "b")["pid"]
        _crash(c, "b")
        wait_running(c, "b", pid, restarts=1)
        assert c.wait_events("root", head, 10_000) > head  # `events root --follow` wakes on the node's records
        _crash(c, "b")
        _wait_member(c, "root", "failed")
        shown = _member(c, "root")
    chain = records(theater, "root")
    assert (shown["head"], shown["head_ns"]) == (chain[-1].seq, chain[-1].time_ns)  # `tree --json` shows the chain
    kinds = [r.kind for r in chain]
    assert kinds == [Kind.NODE_GENESIS, Kind.NODE_START, Kind.NODE_RESTART, Kind.NODE_GIVE_UP, Kind.NODE_TERMINATE]
    genesis = chain[0].fields()
    assert genesis["name"] == "root" and genesis["parent"] == ""
    assert json.loads(genesis["config"]) == {"strategy": "one_for_all", "intensity": 1, "period_ms": 60000,
                                              "restart": "permanent", "children": ["a", "b"]}
    restart = chain[2].fields()
    assert (restart["child"], restart["reason"], restart["stop"], restart["start"]) == ("b", "trap", "a", "a,b")
    give_up = chain[3].fields()
    assert (give_up["child"], give_up["reason"]) == ("b", "trap")
    assert give_up["detail"] == "more than 1 restarts in 60000 ms (last: b, trap)"
    assert chain[4].fields()["reason"] == "shutdown"
    assert all(r.state_hash == sha256(b"") for r in chain)
    assert_verified(theater)
    shown = subprocess.run([sys.executable, "-m", "supervisor", "--home", str(theater.home.root), "events", "root"],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "node-restart" in shown.stdout and "node-give-up" in shown.stdout


def test_a_child_waiting_for_its_nodes_plan_is_restarting_and_its_messages_queue(theater: Theater) -> None:
    """one_for_all: while the plan waits for a sibling's stop, the child that crashed shows `restarting` and a
    message sent to it is queued (not refused as `failed`); the new worker serves it once the plan starts it."""
    write_lab_policy(theater)
    kids = [agent("slow", "spin.wat", policy=LAB_POLICY, limits=SPIN_LIMITS, restart={"shutdown": "infinity"}),
            agent("c")]
    with theater.client() as c:
        c.spawn(tree_manifest(theater, sup("root", kids, "one_for_all")))
        _busy(c, "slow")
        slow = ps(c, "slow")["pid"]
        _crash(c, "c")
        wait_status(c, "c", "restarting")
        assert ps(c, "slow")["status"] == "stopping" and _member(c, "c")["status"] == "restarting"
        assert c.send("c", b"x") == {"queued": 1}
        os.kill(slow, signal.SIGKILL)  # its stop ends: the plan goes on and starts both
        wait_running(c, "c", restarts=1)
        assert c.call("c", b"y") == b"2"  # the queued message was served first
    assert_verified(theater)


def test_shutdown_infinity_waits_for_the_call_in_progress(theater: Theater) -> None:
    """`shutdown = "infinity"`: a stop waits for the worker however long its call takes (here until the
    call's own 1.5 s deadline), and never kills it for being slow."""
    write_lab_policy(theater)
    limits = {"wall_time_ms": 1500, "fuel_per_call": 10**12}
    kids = [agent("patient", "spin.wat", policy=LAB_POLICY, limits=limits, restart={"shutdown": "infinity"})]
    with theater.client() as c:
        c.spawn(tree_manifest(theater, sup("root", kids)))
        _busy(c, "patient")
        start = time.monotonic()
        assert c.stop("patient")["status"] == "stopped"
        assert time.monotonic() - start >= 1.0  # it waited for the call to reach its deadline
    [ended] = _exits(theater, "patient")
    assert ended["reason"] == "stopped"
    assert "did not stop within" not in ended["detail"]
    assert_verified(theater)


def test_a_nodes_shutdown_timeout_bounds_its_whole_subtree(theater: Theater) -> None:
    """OTP: a supervisor child's `shutdown` is the time its whole subtree gets to stop; then what still runs is
    killed, even a child whose own shutdown is infinity. A node's default is infinity."""
    write_lab_policy(theater)
    kids = [sup("inner", [agent("busy", "spin.wat", policy=LAB_POLICY, limits=SPIN_LIMITS,
                                restart={"shutdown": "infinity"})], restart={"shutdown": 300})]
    with theater.client() as c:
        c.spawn(tree_manifest(theater, sup("root", kids)))
        _busy(c, "busy")
        start = time.monotonic()
        assert c.stop("inner")["status"] == "stopped"
        assert 0.3 <= time.monotonic() - start < 20
    [ended] = _exits(theater, "busy")
    assert ended["reason"] == "shutdown"
    assert ended["detail"] == "supervisor inner did not stop within its shutdown timeout of 300 ms; killed"
    chain = records(theater, "inner")
    assert chain[-1].kind is Kind.NODE_TERMINATE
    assert_verified(theater)
