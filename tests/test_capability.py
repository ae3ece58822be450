"""The supervision capability: an agent that spawns, stops and lists children of its own.

The parent is ``tests/components/parent.wat``, driven by its messages
(``spawn:<template>:<name>``, ``stop:<id>``, ``children``, ``state``); its state
is the log of the exit notifications it was given, one ``<child-id>=<reason>``
line each. Everything runs real processes on a private home: the supervisor
from ``conftest``, one worker per agent, the real SQLite event store. Waits are
on replies, or on process-level facts with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    COMPONENTS,
    Theater,
    assert_verified,
    gone,
    holds_an_artifact,
    of,
    ps,
    records,
    spare_workers,
    wait_running,
    wait_status,
    wait_until,
)

from theater.client import Client, ClientError, NotRunning
from theater.records import Kind

SUPERVISION = "theater:agent/supervision@0.1.0"
CLI = [sys.executable, "-m", "supervisor"]

# --- manifests -------------------------------------------------------------------


def template(name: str, component: str, **keys: object) -> dict[str, object]:
    """A child template: an agent table whose component is ``tests/components/<component>``."""
    return {"name": name, "component": str(COMPONENTS / component), **keys}


WORKER = template("worker", "counter.wat")
CRASHER = template("crasher", "trap_on.wat")  # traps on the message "trap"


def parent_manifest(t: Theater, name: str = "parent", *, templates: list[dict[str, object]] | None = None,
                    supervision: dict[str, object] | None = None, **keys: object) -> Path:
    """A parent.wat agent under the `supervisor` policy with the worker and crasher templates.

    The manifest asks for the supervision capability: a manifest without
    `capabilities` gets only the runtime, whatever its policy allows.
    """
    table: dict[str, object] = {**(supervision or {}), "templates": [WORKER, CRASHER] if templates is None else templates}
    return t.manifest(name, "parent.wat", policy="supervisor", capabilities=["runtime", "supervision"],
                      supervision=table, **keys)


# --- helpers -----------------------------------------------------------------------


def say(c: Client, agent: str, message: str) -> str:
    """Call ``agent`` and return its reply as text (parent.wat always replies)."""
    reply = c.call(agent, message.encode())
    assert reply is not None, f"{agent} gave no reply to {message!r}"
    return reply.decode()


def spawn_child(c: Client, parent: str, template_name: str, name: str, *, wait: bool = True) -> str:
    """Have ``parent`` spawn a child; return the child's id (it must succeed).

    The spawn answers at once, while the child's worker is still starting; with
    ``wait`` this returns only once the child runs (see
    ``test_stopping_a_child_before_its_worker_said_hello_keeps_the_supervisor_up``
    for why no test here stops a child that is still starting).
    """
    reply = say(c, parent, f"spawn:{template_name}:{name}")
    assert not reply.startswith("err:"), reply
    assert str(uuid.UUID(reply)) == reply
    if wait:
        wait_running(c, f"{parent}.{name}")
    return reply


def tree_of(c: Client, name: str) -> dict[str, Any]:
    [root] = [r for r in c.request("tree")[0]["roots"] if r["name"] == name]
    return root


def cli(t: Theater, *args: str) -> str:
    proc = subprocess.run([*CLI, "--home", str(t.home.root), *args], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"theater {' '.join(args)} exited {proc.returncode}: {proc.stderr}"
    return proc.stdout


def still_serving_once(t: Theater, condition: Any, what: str) -> None:
    """Wait until ``condition()`` holds or the supervisor process has ended; then it must still run."""
    assert t.proc is not None

    def settled() -> bool:
        if t.proc.poll() is not None:
            return True
        try:
            return bool(condition())
        except NotRunning:  # it ended while answering
            return t.proc.poll() is not None

    wait_until(settled, 20, what)
    assert t.proc.poll() is None, "the supervisor ended:\n" + (t.dir / "supervisor.out").read_text()[-1500:]


def crash(c: Client, name: str) -> None:
    """Make a crasher child trap: the call fails with `trap` and its worker ends."""
    with pytest.raises(ClientError) as failed:
        c.call(name, b"trap")
    assert failed.value.code == "trap", failed.value


# --- 1. spawning children through the capability -------------------------------------


def test_spawned_children_run_under_the_parent(theater: Theater) -> None:
    """Two children spawned by the guest appear under the parent as `<parent>.<name>` and answer calls."""
    with theater.client() as c:
        parent = c.spawn(parent_manifest(theater))
        assert parent["status"] == "running"
        w = spawn_child(c, "parent", "worker", "w", wait=False)
        k = spawn_child(c, "parent", "crasher", "k", wait=False)
        assert w != k
        assert say(c, "parent", "children") == f"{w},{k}"

        # Calls by full name and by id reach the children (a call queues until the child is up).
        assert c.call("parent.w", b"x") == b"1"
        assert c.call(w, b"x") == b"2"
        assert c.call("parent.k", b"x") == b"1"
        info = {a["name"]: a for a in c.ps()}
        assert {n: (a["id"], a["parent"], a["policy"]) for n, a in info.items()} == {
            "parent": (parent["id"], None, "supervisor"),
            "parent.w": (w, "parent", "default"),
            "parent.k": (k, "parent", "default"),
        }
        root = tree_of(c, "parent")
        assert root["id"] == parent["id"] and root["kind"] == "agent" and root["strategy"] == "one_for_one"
        assert [(ch["name"], ch["id"], ch["status"]) for ch in root["children"]] == [
            ("parent.w", w, "running"), ("parent.k", k, "running"),
        ]
        assert len(c.request("tree")[0]["roots"]) == 1  # the children are not roots of their own

    # The CLI shows the same tree.
    [cli_root] = json.loads(cli(theater, "tree", "--json"))
    assert cli_root["name"] == "parent"
    assert [(ch["name"], ch["id"]) for ch in cli_root["children"]] == [("parent.w", w), ("parent.k", k)]

    # The guest's requests and the host's answers are recorded in the parent's chain.
    calls = [r.fields() for r in of(records(theater, "parent"), Kind.HOST_CALL)]
    assert [(f["interface"], f["function"]) for f in calls] == [(SUPERVISION, "spawn")] * 2 + [(SUPERVISION, "children")]
    assert [json.loads(f["output"]) for f in calls] == [
        {"ok": True, "id": w}, {"ok": True, "id": k}, {"ok": True, "children": [w, k]},
    ]
    assert json.loads(calls[0]["input"]) == {"template": "worker", "name": "w", "args": ""}
    # Each child has a chain of its own, under its full name.
    for name, child_id in (("parent.w", w), ("parent.k", k)):
        genesis = records(theater, name)[0]
        assert genesis.kind is Kind.GENESIS and genesis.agent_uuid == child_id
        assert genesis.fields()["name"] == name
        assert json.loads(genesis.fields()["config"])["parent"] == "parent"
    assert_verified(theater)


# --- 2. a crashed child: the parent is told, in both chains -------------------------------


def test_child_crash_is_delivered_to_the_parent_and_recorded_in_both_chains(theater: Theater) -> None:
    """A trapping child is restarted; the parent's child-exit gets its id and reason, tied to the child's exit record."""
    with theater.client() as c:
        c.spawn(parent_manifest(theater))
        k = spawn_child(c, "parent", "crasher", "k")
        assert c.call("parent.k", b"x") == b"1"
        pid = ps(c, "parent.k")["pid"]
        crash(c, "parent.k")
        after = wait_running(c, "parent.k", pid)
        assert after["restarts"] == 1
        # The notification was queued for the parent before the restart began, so this call follows it.
        state = say(c, "parent", "state")
        [line] = state.splitlines()
        assert line.startswith(f"{k}=trap: ") and line.endswith("; restarting"), line
        assert state.endswith("\n")
        assert c.call("parent.k", b"x") == b"2"  # restarted from its last committed state
        assert say(c, "parent", "children") == k

    child_exit = of(records(theater, "parent.k"), Kind.EXIT)
    assert [e.fields()["reason"] for e in child_exit] == ["trap"]
    [told] = of(records(theater, "parent"), Kind.CHILD_EXIT)
    fields = told.fields()
    assert fields["child"] == uuid.UUID(k).bytes
    assert fields["exit_hash"] == child_exit[0].hash
    assert fields["reason"] == line[len(k) + 1 :]
    assert fields["status"] == "ok" and fields["error"] == ""
    assert "trap" in child_exit[0].fields()["detail"]
    assert_verified(theater)


# --- 3. stopping a child -------------------------------------------------------------------


def test_stopped_child_is_not_restarted(theater: Theater) -> None:
    """`stop` ends one child for good (status stopped, no restart); its sibling keeps running."""
    with theater.client() as c:
        c.spawn(parent_manifest(theater))
        w = spawn_child(c, "parent", "worker", "w")
        spawn_child(c, "parent", "crasher", "k")
        pid = ps(c, "parent.w")["pid"]
        assert say(c, "parent", f"stop:{w}") == "ok"
        info = wait_status(c, "parent.w", "stopped")
        assert info["pid"] is None and info["restarts"] == 0
        wait_until(lambda: gone(pid), 10, "the stopped child's worker to end")
        with pytest.raises(ClientError) as refused:
            c.call("parent.w", b"x")
        assert refused.value.code == "refused"
        assert c.call("parent.k", b"x") == b"1"
        again = say(c, "parent", f"stop:{w}")  # a stopped child has left its parent's children
        assert again.startswith("err:") and "not one of parent's children" in again
        assert (ps(c, "parent.w")["status"], ps(c, "parent.w")["parent"]) == ("stopped", "parent")
        assert ps(c, "parent.w")["restarts"] == 0
    [exit_] = of(records(theater, "parent.w"), Kind.EXIT)
    assert exit_.fields()["reason"] == "stopped"
    assert not of(records(theater, "parent.w"), Kind.WORKER_KEY)  # never started again
    assert_verified(theater)


def test_stopped_child_is_reported_to_the_parent(theater: Theater) -> None:
    """After `stop`, the parent's child-exit is told `<id>=stopped...` and records it with the child's exit hash."""
    with theater.client() as c:
        c.spawn(parent_manifest(theater))
        w = spawn_child(c, "parent", "worker", "w")
        assert say(c, "parent", f"stop:{w}") == "ok"
        wait_status(c, "parent.w", "stopped")
        # Any notification is queued in the same loop turn that marks the child stopped: this call follows it.
        state = say(c, "parent", "state")
    assert state.startswith(f"{w}=stopped"), repr(state)
    [told] = of(records(theater, "parent"), Kind.CHILD_EXIT)
    [exit_] = of(records(theater, "parent.w"), Kind.EXIT)
    assert told.fields()["exit_hash"] == exit_.hash


# --- 4. only one's own children -------------------------------------------------------------


def test_a_child_name_is_free_again_once_that_child_stopped(theater: Theater) -> None:
    """Spawning a stopped child's name again starts the same agent (same id, same chain) from its initial
    state, as OTP restarts a child by its id; a name whose child still runs is refused."""
    with theater.client() as c:
        c.spawn(parent_manifest(theater))
        w = spawn_child(c, "parent", "worker", "w")
        assert [c.call("parent.w", b"x") for _ in range(2)] == [b"1", b"2"]
        assert say(c, "parent", "spawn:worker:w") == "err:parent already has a child named 'w' (running)"
        assert say(c, "parent", f"stop:{w}") == "ok"
        wait_status(c, "parent.w", "stopped")
        assert spawn_child(c, "parent", "worker", "w") == w
        assert c.call("parent.w", b"x") == b"1"  # initialised afresh
        assert say(c, "parent", "children") == w
    chain = records(theater, "parent.w")
    again = [r for r in chain if r.kind is Kind.WORKER_KEY]
    assert [r.fields()["reason"] for r in again] == ["spawned again by parent"]
    assert [r.kind for r in chain if r.seq > again[0].seq][:1] == [Kind.INIT]
    assert_verified(theater)


def test_after_a_supervisor_restart_a_parent_spawns_its_children_again(theater: Theater) -> None:
    """An agent's own children end with the supervisor process (they are not resumed: the parent decides);
    the restarted parent can spawn them again under the same names and ids."""
    with theater.client() as c:
        c.spawn(parent_manifest(theater))
        w = spawn_child(c, "parent", "worker", "w")
        assert c.call("parent.w", b"x") == b"1"
    theater.stop()
    theater.start()
    with theater.client() as c:
        wait_running(c, "parent")
        assert say(c, "parent", "children") == ""
        assert (ps(c, "parent.w")["status"], ps(c, "parent.w")["parent"]) == ("stopped", "parent")
        assert spawn_child(c, "parent", "worker", "w") == w
        assert ps(c, "parent.w")["parent"] == "parent"
        assert c.call("parent.w", b"x") == b"1"
        assert say(c, "parent", "children") == w
    assert_verified(theater)


def test_an_agent_acts_only_on_its_own_children(theater: Theater) -> None:
    """A cannot stop B's child, B itself, itself, or a top-level agent; nothing it asks for changes them."""
    with theater.client() as c:
        a = c.spawn(parent_manifest(theater, "pa"))
        b = c.spawn(parent_manifest(theater, "pb"))
        plain = c.spawn(theater.manifest("plain", "counter.wat"))
        bw = spawn_child(c, "pb", "worker", "w")
        assert c.call("pb.w", b"x") == b"1"
        before = ps(c, "pb.w")
        for target in (bw, "pb.w", b["id"], a["id"], plain["id"], "plain", "not-an-id", ""):
            reply = say(c, "pa", f"stop:{target}")
            assert reply.startswith("err:"), (target, reply)
            assert "not one of pa's children" in reply, reply
        assert say(c, "pa", "children") == ""
        assert say(c, "pb", "children") == bw
        # B's child kept running on the same worker, with its state.
        assert ps(c, "pb.w")["pid"] == before["pid"] and ps(c, "pb.w")["status"] == "running"
        assert c.call("pb.w", b"x") == b"2"
        assert {ps(c, n)["status"] for n in ("pa", "pb", "plain")} == {"running"}
        # B itself may stop it.
        assert say(c, "pb", f"stop:{bw}") == "ok"
        wait_status(c, "pb.w", "stopped")
    assert_verified(theater)


# --- 5. max_children -----------------------------------------------------------------------


def test_max_children_refuses_the_spawn_past_the_limit(theater: Theater) -> None:
    """With max_children = 2 the third spawn is an err naming max_children. A stopped child keeps its place
    (the next test removes one): its own name may start again."""
    with theater.client() as c:
        c.spawn(parent_manifest(theater, limits={"max_children": 2}))
        first = spawn_child(c, "parent", "worker", "a")
        spawn_child(c, "parent", "worker", "b")
        reply = say(c, "parent", "spawn:worker:c")
        assert reply.startswith("err:") and "max_children 2" in reply, reply
        assert all(a["name"] != "parent.c" for a in c.ps())
        assert len(say(c, "parent", "children").split(",")) == 2
        assert say(c, "parent", f"stop:{first}") == "ok"
        wait_status(c, "parent.a", "stopped")
        assert "max_children 2" in say(c, "parent", "spawn:worker:c")
        assert spawn_child(c, "parent", "worker", "a") == first  # the same child, started again
        assert c.call("parent.a", b"x") == b"1"
    assert_verified(theater)


# --- 6. bad templates and names -------------------------------------------------------------

BAD_NAMES = ["a/b", "..", "../x", "x/../y", "Upper", "ABC", "", "a.b", "b:c", "-x", "x" * 33, "é", "a b"]


def test_unknown_template_and_bad_names_are_refused(theater: Theater) -> None:
    """An unknown template is an err naming it; a child name is never a path (no '/', '..', uppercase...)."""
    with theater.client() as c:
        c.spawn(parent_manifest(theater))
        reply = say(c, "parent", "spawn:nope:x")
        assert reply.startswith("err:") and "'nope'" in reply, reply
        reply = say(c, "parent", "spawn:../worker:x")
        assert reply.startswith("err:") and "no child template" in reply, reply
        for name in BAD_NAMES:
            reply = say(c, "parent", f"spawn:worker:{name}")
            assert reply.startswith("err:") and "child name" in reply, (name, reply)
        assert [a["name"] for a in c.ps()] == ["parent"]
        assert say(c, "parent", "children") == ""
        # Good names still work afterwards (32 characters at most), and a name is taken once.
        spawn_child(c, "parent", "worker", "ok_name-1")
        spawn_child(c, "parent", "worker", "x" * 32)
        reply = say(c, "parent", "spawn:crasher:ok_name-1")
        assert reply.startswith("err:") and "already has a child named" in reply, reply
        assert sorted(a["name"] for a in c.ps()) == ["parent", "parent.ok_name-1", "parent." + "x" * 32]
    # Nothing was created under a refused name (a child's log file is named after it).
    assert sorted(p.name for p in theater.home.logs.iterdir()) == sorted(
        f"{n}.log" for n in ("parent", "parent.ok_name-1", "parent." + "x" * 32))
    assert_verified(theater)


# --- 7. capability and configuration errors ---------------------------------------------------


def test_importing_supervision_without_the_capability_fails_to_load(theater: Theater) -> None:
    """parent.wat under the default policy fails to spawn: load-failed naming the supervision interface."""
    with theater.client() as c:
        with pytest.raises(ClientError) as failed:
            c.spawn(theater.manifest("nocap", "parent.wat"))
        assert failed.value.code == "spawn-failed"
        message = str(failed.value)
        assert "load-failed" in message and SUPERVISION in message, message
        # Whether or not its chain was begun before the load, the agent is not running.
        for info in c.ps():
            assert info["name"] == "nocap" and info["status"] == "failed" and info["pid"] is None, info
            assert SUPERVISION in info["last_exit"], info


def test_supervision_table_without_the_capability_is_a_config_error(theater: Theater) -> None:
    """A [supervision] table needs the supervision capability, whether the policy lacks it or the manifest narrows it away."""
    table = {"templates": [WORKER]}
    with theater.client() as c:
        for path in (
            theater.manifest("p1", "parent.wat", supervision=table),
            theater.manifest("p2", "parent.wat", policy="supervisor", supervision=table),
            theater.manifest("p3", "parent.wat", policy="supervisor", capabilities=["runtime"], supervision=table),
        ):
            with pytest.raises(ClientError) as bad:
                c.spawn(path)
            assert bad.value.code == "config"
            assert str(path) in str(bad.value) and "supervision" in str(bad.value)
            assert "needs the supervision capability" in str(bad.value)
        assert c.ps() == []


def test_template_wider_than_its_parent_is_a_config_error(theater: Theater) -> None:
    """A template whose limits exceed the parent's is refused, naming the template, the key and the limit."""
    with theater.client() as c:
        narrow = parent_manifest(theater, "p1", limits={"memory_bytes": 33554432})  # templates keep 64 MiB
        with pytest.raises(ClientError) as bad:
            c.spawn(narrow)
        assert bad.value.code == "config"
        assert "supervision.templates[0].limits" in str(bad.value) and "memory_bytes" in str(bad.value), bad.value
        slow = parent_manifest(theater, "p2", limits={"wall_time_ms": 1000}, templates=[
            template("worker", "counter.wat", limits={"wall_time_ms": 1000}),
            template("crasher", "trap_on.wat", limits={"wall_time_ms": 1500}),
        ])
        with pytest.raises(ClientError) as bad:
            c.spawn(slow)
        assert bad.value.code == "config"
        assert "supervision.templates[1].limits" in str(bad.value) and "wall_time_ms" in str(bad.value), bad.value
        assert c.ps() == []


# --- 8. escalation ----------------------------------------------------------------------------


def test_too_many_child_restarts_take_the_parent_down_with_its_children(theater: Theater) -> None:
    """intensity 1 per minute: the second crash makes the parent's own supervisor give up; children stop, the parent restarts."""
    with theater.client() as c:
        c.spawn(parent_manifest(theater, supervision={"intensity": 1, "period_ms": 60000}))
        parent_pid = wait_running(c, "parent")["pid"]
        spawn_child(c, "parent", "worker", "w")
        k = spawn_child(c, "parent", "crasher", "k")
        assert c.call("parent.w", b"x") == b"1"
        child_pids = [ps(c, "parent.w")["pid"], ps(c, "parent.k")["pid"]]
        crash(c, "parent.k")
        child_pids.append(wait_running(c, "parent.k", child_pids[1])["pid"])  # the first crash is restarted
        assert ps(c, "parent")["pid"] == parent_pid
        crash(c, "parent.k")

        after = wait_running(c, "parent", parent_pid)  # the parent exited and, being permanent, was restarted
        assert after["restarts"] == 1
        wait_until(lambda: all(gone(pid) for pid in child_pids), 10, "every child's worker to end")
        assert (ps(c, "parent.w")["status"], ps(c, "parent.w")["parent"]) == ("stopped", "parent")
        assert ps(c, "parent.k")["status"] in ("stopped", "failed")
        assert ps(c, "parent.w")["pid"] is None and ps(c, "parent.k")["pid"] is None
        assert say(c, "parent", "children") == ""
        assert tree_of(c, "parent")["children"] == []
        # The first crash was delivered before everything went down.
        first = say(c, "parent", "state").splitlines()[0]
        assert first.startswith(f"{k}=trap: ") and first.endswith("; restarting"), first
        # The restarted parent supervises again, starting from no children.
        fresh = spawn_child(c, "parent", "worker", "w2")
        assert say(c, "parent", "children") == fresh
        assert c.call("parent.w2", b"x") == b"1"

    exits = [e.fields() for e in of(records(theater, "parent"), Kind.EXIT)]
    assert [e["reason"] for e in exits] == ["shutdown"]
    assert "gave up: more than 1 restarts in 60000 ms" in exits[0]["detail"], exits[0]
    [w_exit] = [e.fields() for e in of(records(theater, "parent.w"), Kind.EXIT)]
    assert w_exit["reason"] == "shutdown"
    assert w_exit["detail"].startswith("supervisor parent gave up: more than 1 restarts"), w_exit  # wit.md 6.2
    assert [e.fields()["reason"] for e in of(records(theater, "parent.k"), Kind.EXIT)] == ["trap", "trap"]
    assert_verified(theater)


# --- 9. a stopped parent takes its children with it ---------------------------------------------


def test_stopping_the_parent_stops_its_children(theater: Theater) -> None:
    """`theater stop parent` ends the parent and both children, none is restarted, and the chains say why."""
    with theater.client() as c:
        c.spawn(parent_manifest(theater))
        spawn_child(c, "parent", "worker", "w")
        spawn_child(c, "parent", "crasher", "k")
        pids = [wait_running(c, n)["pid"] for n in ("parent", "parent.w", "parent.k")]
    out = json.loads(cli(theater, "stop", "--json", "parent"))
    assert out["name"] == "parent" and out["status"] == "stopped"
    with theater.client() as c:
        for name in ("parent.w", "parent.k"):
            wait_status(c, name, "stopped")
        wait_until(lambda: all(gone(pid) for pid in pids), 10, "every worker to end")
        assert {a["name"]: (a["status"], a["pid"], a["restarts"]) for a in c.ps()} == {
            "parent": ("stopped", None, 0), "parent.w": ("stopped", None, 0), "parent.k": ("stopped", None, 0),
        }
        assert tree_of(c, "parent")["children"] == []
    for name in ("parent.w", "parent.k"):
        [exit_] = of(records(theater, name), Kind.EXIT)
        assert exit_.fields()["reason"] == "shutdown"
        assert "its supervisor parent is stopping" in exit_.fields()["detail"]
    [exit_] = of(records(theater, "parent"), Kind.EXIT)
    assert exit_.fields()["reason"] == "stopped"
    assert_verified(theater)


def test_parent_stop_completes_only_after_its_children_stopped(theater: Theater) -> None:
    """When `stop parent` has answered, no child is still running, and each child exited before its parent."""
    with theater.client() as c:
        c.spawn(parent_manifest(theater))
        spawn_child(c, "parent", "worker", "w")
        spawn_child(c, "parent", "crasher", "k")
        answer = c.stop("parent")
        for name in ("parent.w", "parent.k"):
            wait_status(c, name, "stopped")
    assert [ch["status"] for ch in answer.get("children", [])] in ([], ["stopped", "stopped"]), answer
    [parent_exit] = of(records(theater, "parent"), Kind.EXIT)
    for name in ("parent.w", "parent.k"):
        [child_exit] = of(records(theater, name), Kind.EXIT)
        assert child_exit.time_ns < parent_exit.time_ns, name


# --- defects found by these tests (strict xfail: each passes once fixed) ------------------------------------------------------------


def _plain_spare(t: Theater, c: Client) -> int | None:
    """The pid of the fork-server's plain spare, if there is one."""
    return next((p.pid for p in spare_workers(t, c) if not holds_an_artifact(p)), None)


def test_stopping_a_child_before_its_worker_said_hello_keeps_the_supervisor_up(theater: Theater) -> None:
    """A guest that stops the child it has just spawned gets `ok`; the child ends, the supervisor serves on,
    and the parent is not told of a child that never had a chain."""
    with theater.client(timeout=2) as c:
        c.spawn(parent_manifest(theater))
        # The child's component compiled by an agent of another load profile (one more required layer): the
        # child's worker is then the fork-server's plain spare, held stopped here before it is handed the
        # child, so it cannot say hello (the supervisor's SIGKILL still ends it).
        c.spawn(theater.manifest("warm", "counter.wat", hardening={"required": ["rlimits", "no_new_privs", "seccomp",
                                                                              "cgroups"]}))
        spare = wait_until(lambda: _plain_spare(theater, c), what="the fork-server's plain spare")
        os.kill(spare, signal.SIGSTOP)
        child = spawn_child(c, "parent", "worker", "early", wait=False)
        # Worker starts run one per loop turn: the pid appears a turn after the spawn's answer.
        info = wait_until(lambda: (i := ps(c, "parent.early"))["pid"] is not None and i, what="the child's pid")
        assert (info["pid"], info["head"]) == (spare, -1)
        try:  # a short deadline: the supervisor may end before it answers
            reply = c.request("call", f"stop:{child}".encode(), agent="parent", timeout_ms=3000, timeout=3.5)[1]
        except NotRunning:
            reply = None
        def ended() -> bool:  # a child that never said hello has no chain: it leaves the list
            entries = [a for a in c.ps() if a["name"] == "parent.early"]
            return not entries or entries[0]["status"] in ("stopped", "failed")

        still_serving_once(theater, ended, "the early child to end")
        assert reply == b"ok"
        assert ps(c, "parent")["status"] == "running"
        # It has no chain: the parent is not told of it (wit.md section 6.2). It was, with an exit hash of zeros
        # that no chain holds, and `theater verify` found the parent's chain broken for good.
        assert say(c, "parent", "state") == ""
    assert not of(records(theater, "parent"), Kind.CHILD_EXIT)
    assert_verified(theater)


def test_the_operators_stop_of_a_child_keeps_it_in_its_parents_list_and_a_restart_there(theater: Theater) -> None:
    """wit.md section 6.2: the agent is not told of children the operator stops or restarts, and the child stays
    in its list. It was told, and the child left the list; an operator's restart then ran it outside its parent,
    where the parent's stop did not reach it and `down` waited for it for ever."""
    with theater.client() as c:
        c.spawn(parent_manifest(theater))
        w = spawn_child(c, "parent", "worker", "w")
        c.stop("parent.w")
        assert ps(c, "parent.w")["status"] == "stopped"
        assert say(c, "parent", "children") == w
        c.restart("parent.w")
        wait_running(c, "parent.w")
        assert say(c, "parent", "children") == w and say(c, "parent", "state") == ""
        c.stop("parent")
        assert ps(c, "parent.w")["status"] == "stopped"
    assert not of(records(theater, "parent"), Kind.CHILD_EXIT)
    theater.stop()  # `down`, which must end
    assert theater.proc is not None and theater.proc.returncode == 0


def test_a_child_its_parent_let_go_is_not_restarted_by_the_operator(theater: Theater) -> None:
    """A child the parent stopped itself has left its list: only the parent may start it again. An operator's
    restart ran it with no supervisor (section above)."""
    with theater.client() as c:
        c.spawn(parent_manifest(theater))
        w = spawn_child(c, "parent", "worker", "w")
        assert say(c, "parent", f"stop:{w}") == "ok"
        wait_status(c, "parent.w", "stopped")
        with pytest.raises(ClientError) as refused:
            c.restart("parent.w")
        assert str(refused.value) == ("parent.w is a child of agent parent, which no longer has it among its "
                                      "children: only parent can start it again (supervision.spawn of 'w')")
        assert ps(c, "parent.w")["status"] == "stopped"
        assert spawn_child(c, "parent", "worker", "w") == w  # the parent may


SUB = template("sub", "parent.wat", policy="supervisor", capabilities=["runtime", "supervision"],
               supervision={"templates": [WORKER]})  # a child that supervises children of its own


def test_a_supervising_child_removed_and_spawned_again_is_a_new_child(theater: Theater) -> None:
    """The removed child's own children's node stayed in the engine: spawning the name again failed inside
    the spawn, which killed the parent (a protocol violation) and left the new child in `ps`, stopped, with
    no chain and no parent, for good."""
    with theater.client() as c:
        c.spawn(parent_manifest(theater, templates=[WORKER, SUB]))
        old = spawn_child(c, "parent", "sub", "a")
        assert say(c, "parent", f"stop:{old}") == "ok"
        wait_status(c, "parent.a", "stopped")
        assert say(c, "parent", f"remove:{old}") == "ok"
        new = spawn_child(c, "parent", "sub", "a")
        assert new != old
        assert (ps(c, "parent.a")["parent"], ps(c, "parent")["restarts"]) == ("parent", 0)
        assert spawn_child(c, "parent.a", "worker", "x")  # it supervises, as the first one did
    assert not of(records(theater, "parent"), Kind.VIOLATION)
    assert_verified(theater)


def test_a_child_that_keeps_stopped_children_of_its_own_is_not_removed(theater: Theater) -> None:
    """cli.md, wit.md: an agent that still has children is not removed. Its stopped children were not
    counted: they stayed in the home, and the next child of the same name took them over (its child `x`
    was the old one, its chain naming the removed agent as its parent)."""
    with theater.client() as c:
        c.spawn(parent_manifest(theater, templates=[WORKER, SUB]))
        a = spawn_child(c, "parent", "sub", "a")
        x = spawn_child(c, "parent.a", "worker", "x")
        assert say(c, "parent", f"stop:{a}") == "ok"
        wait_status(c, "parent.a.x", "stopped")
        wait_status(c, "parent.a", "stopped")
        refused = say(c, "parent", f"remove:{a}")
        assert refused == ("err:agent parent.a still has children, running or stopped (parent.a.x): "
                           "remove them first"), refused
        with pytest.raises(ClientError) as by_operator:
            c.remove("parent.a")
        assert "still has children" in str(by_operator.value)
        c.remove("parent.a.x")
        assert say(c, "parent", f"remove:{a}") == "ok"
        spawn_child(c, "parent", "sub", "a")
        assert spawn_child(c, "parent.a", "worker", "x") != x
    assert_verified(theater)


def test_supervision_capability_without_templates_answers_the_guest(theater: Theater) -> None:
    """With the capability but no [supervision] table: a config error, or answers (no templates, no children), never a violation."""
    manifest = theater.manifest("bare", "parent.wat", policy="supervisor", capabilities=["runtime", "supervision"])
    with theater.client() as c:
        try:
            c.spawn(manifest)
        except ClientError as exc:
            assert exc.code == "config" and "supervision" in str(exc), exc
            return
        assert say(c, "bare", "children") == ""
        assert say(c, "bare", "spawn:worker:x").startswith("err:")
        assert ps(c, "bare")["restarts"] == 0
    assert not of(records(theater, "bare"), Kind.VIOLATION)


def test_a_child_of_a_stopped_parent_is_left_to_its_parent(theater: Theater) -> None:
    """`theater stop parent` stops its children, which leave its list: `theater restart parent.k` is refused
    (it ran k with no supervisor: a crash of it once took the supervisor down, and `down` waited for it for
    ever). The parent, restarted, spawns k again, and k's crash is its to handle."""
    with theater.client(timeout=5) as c:
        c.spawn(parent_manifest(theater))
        k = spawn_child(c, "parent", "crasher", "k")
        c.stop("parent")
        wait_status(c, "parent.k", "stopped")
        with pytest.raises(ClientError) as refused:
            c.request("restart", agent="parent.k")
        assert "only parent can start it again" in str(refused.value), refused.value
        c.restart("parent")
        wait_running(c, "parent")
        assert spawn_child(c, "parent", "crasher", "k") == k
        pid = ps(c, "parent.k")["pid"]
        crash(c, "parent.k")
        still_serving_once(theater, lambda: ps(c, "parent.k")["pid"] not in (None, pid), "the crash to be handled")
        c.ping()


def test_stopped_children_count_until_the_parent_removes_them(theater: Theater) -> None:
    """A guest spawning and stopping children under fresh names could fill the home: max_children bounds
    the children it keeps, running or stopped, and supervision.remove frees one (its chain ends with a
    removed record; its name is free)."""
    with theater.client() as c:
        c.spawn(parent_manifest(theater, limits={"max_children": 2}))
        first = spawn_child(c, "parent", "worker", "a")
        second = spawn_child(c, "parent", "worker", "b")
        assert say(c, "parent", f"stop:{first}") == "ok"
        wait_status(c, "parent.a", "stopped")
        refused = say(c, "parent", "spawn:worker:c")
        assert refused == "err:parent keeps 2 children, running or stopped (max_children 2); remove a stopped " \
                          "one (supervision.remove) to start another", refused
        running = say(c, "parent", f"remove:{second}")
        assert running.startswith("err:") and "stop it first" in running, running
        assert say(c, "parent", f"remove:{first}") == "ok"
        assert say(c, "parent", "remove:not-a-child").startswith("err:")
        spawn_child(c, "parent", "worker", "c")
        assert {a["name"] for a in c.ps()} == {"parent", "parent.b", "parent.c"}
    removed = [r for r in records(theater, first) if r.kind is Kind.REMOVED]
    assert len(removed) == 1
    assert_verified(theater)
