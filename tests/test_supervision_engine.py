"""The supervision engine alone: OTP's rules, driven by a virtual clock, in milliseconds of test time.

A small world plays the workers: a Start becomes `ready` (or the exit a test
scripted for it), a Stop becomes the exit it asked for. Every case of
docs/supervision.md is here, beside the end-to-end tests that run real workers.
"""

from __future__ import annotations

from collections import deque

import pytest

from supervisor._supervision import (
    Abandoned,
    Done,
    Engine,
    Flags,
    Leaf,
    NodeKind,
    NodeRecord,
    Notify,
    OwnerGaveUp,
    RecordExit,
    Removed,
    Settle,
    Start,
    Status,
    Stop,
    StopNode,
    StoreTree,
    Sup,
    add_restart,
    should_restart,
)


class World:
    """Applies the engine's actions as instant workers would, and keeps a log of them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.now = 0.0
        self.log: list[object] = []
        self.fail_start: dict[str, deque[str]] = {}  # name -> reasons its next starts end with
        self.slow: set[str] = set()  # names whose Stop/Start outcome the test delivers by hand
        self.pending: list[object] = []

    def apply(self, actions: list[object]) -> None:
        todo = deque(actions)
        while todo:
            action = todo.popleft()
            self.log.append(action)
            if isinstance(action, Start):
                if action.name in self.slow:
                    self.pending.append(action)
                    continue
                failures = self.fail_start.get(action.name)
                if failures:
                    todo.extend(self.engine.exited(action.name, failures.popleft(), self.now))
                else:
                    todo.extend(self.engine.ready(action.name, self.now))
            elif isinstance(action, Stop):
                if action.name in self.slow:
                    self.pending.append(action)
                    continue
                todo.extend(self.engine.exited(action.name, action.reason, self.now))

    def run(self, actions: list[object]) -> list[object]:
        start = len(self.log)
        self.apply(actions)
        return self.log[start:]

    def crash(self, name: str, reason: str = "trap") -> list[object]:
        return self.run(self.engine.exited(name, reason, self.now))

    def tick(self, ms: float) -> None:
        self.now += ms / 1000


def names(actions: list[object], kind: type) -> list[str]:
    return [a.name for a in actions if isinstance(a, kind)]  # type: ignore[attr-defined]


def tree(strategy: str = "one_for_one", n: int = 3, *, intensity: int = 3, period_ms: int = 5000,
         types: dict[str, str] | None = None, name: str = "root") -> Sup:
    types = types or {}
    kids = [Leaf(c, restart=types.get(c, "permanent")) for c in "abcdefgh"[:n]]
    return Sup(name, Flags(strategy, intensity, period_ms), children=list(kids))


def built(root: Sup) -> tuple[Engine, World]:
    """An engine holding ``root``, not started yet, and its world."""
    engine = Engine()
    engine.add(root)
    return engine, World(engine)


def started(root: Sup) -> tuple[Engine, World]:
    engine, world = built(root)
    world.run(engine.spawn(root, world.now, ticket="t"))
    return engine, world


def running(root: Sup) -> World:
    return started(root)[1]


# --- the pure rules ---------------------------------------------------------------------


def test_restart_types() -> None:
    assert should_restart("permanent", "normal") and should_restart("permanent", "trap")
    assert should_restart("transient", "trap") and not should_restart("transient", "normal")
    assert not should_restart("transient", "shutdown") and not should_restart("transient", "stopped")
    assert not should_restart("temporary", "trap")


def test_intensity_window_excludes_its_boundary() -> None:
    h, ok = add_restart([], 0.0, 1000, 1)
    assert ok
    h, ok = add_restart(h, 0.999, 1000, 1)
    assert not ok  # two within 1000 ms
    h, ok = add_restart([0.0], 1.0, 1000, 1)
    assert ok and h == [1.0]  # the first is exactly 1000 ms old: outside


# --- starting ---------------------------------------------------------------------------


def test_a_tree_starts_children_in_order_and_answers_once_all_are_ready() -> None:
    root = tree("one_for_all", 3)
    engine, world = built(root)
    out = world.run(engine.spawn(root, 0.0, ticket="t"))
    assert names(out, Start) == ["a", "b", "c"]
    assert out[0] == StoreTree("root", Status.RUNNING)
    assert NodeRecord("root", "start", {"reason": "start"}) in out
    assert out[-1] == Done("t", "root")
    assert all(c.status is Status.RUNNING for c in root.children) and root.status is Status.RUNNING


def test_each_start_waits_for_the_previous_child_to_be_ready() -> None:
    root = tree("one_for_one", 2)
    engine, world = built(root)
    world.slow.add("a")
    out = world.run(engine.spawn(root, 0.0, ticket="t"))
    assert names(out, Start) == ["a"]
    out = world.run(engine.ready("a", 0.0))
    assert names(out, Start) == ["b"] and out[-1] == Done("t", "root")


def test_each_start_names_the_child_its_job_starts_next() -> None:
    """``then`` lets the supervisor make the next child's worker ready ahead; ``will_start`` says whether that
    start is still coming."""
    root = tree("one_for_one", 3)
    engine, world = built(root)
    world.slow.update("abc")
    world.run(engine.spawn(root, 0.0, ticket="t"))
    assert world.pending == [Start("a", False, then="b")]
    assert engine.will_start("b") and engine.will_start("c") and not engine.will_start("a")
    for name, then in (("a", "c"), ("b", None)):
        world.pending.clear()
        world.run(engine.ready(name, 0.0))
        assert world.pending == [Start(chr(ord(name) + 1), False, then=then)]
    assert not engine.will_start("c")


def test_a_restarted_node_that_cannot_start_a_child_will_not_start_the_next() -> None:
    """OTP: a node restarted by its parent stops its start at a child that cannot start; the child after it,
    named as next, will not start."""
    inner = tree("one_for_one", 3, intensity=0, name="inner")
    root = Sup("root", Flags("one_for_one", 1, 5000), children=[inner])  # one restart of inner, no retry
    engine, world = started(root)
    world.slow.add("b")
    world.crash("a")  # inner gives up: it stops c, then b
    assert [type(a) for a in world.pending] == [Stop]
    world.pending.clear()
    world.run(engine.exited("b", "shutdown", world.now))  # root restarts inner: a starts, then b
    assert world.pending == [Start("b", True, then="c")] and engine.will_start("c")
    out = world.run(engine.exited("b", "load-failed", world.now))
    assert not engine.will_start("c") and "c" not in names(out, Start)


def test_a_shutdown_answers_the_spawns_and_operator_requests_it_abandons() -> None:
    """A tree's spawn still starting, and an operator's request queued behind it, will never end: each is
    answered once, with why, and never again."""
    root = tree("one_for_one", 3)
    engine, world = built(root)
    world.slow.add("b")
    world.run(engine.spawn(root, 0.0, ticket="spawn"))
    world.run(engine.stop("a", 0.0, ticket="stop-a"))  # queued: root's start is running
    out = world.run(engine.shutdown([root], 0.0, "going down"))
    assert [a for a in out if isinstance(a, Abandoned)] == [Abandoned("spawn", "going down"),
                                                            Abandoned("stop-a", "going down")]
    world.slow.clear()
    out = world.run(engine.exited("b", "shutdown", 0.0))
    assert not [a for a in out if isinstance(a, (Done, Abandoned))] and root.status is Status.STOPPED


# --- strategies -------------------------------------------------------------------------


def test_one_for_one_restarts_only_the_crashed_child() -> None:
    root = tree("one_for_one", 3)
    world = running(root)
    out = world.crash("b")
    assert names(out, Stop) == [] and names(out, Start) == ["b"]
    assert [a for a in out if isinstance(a, Start)] == [Start("b", counted=True)]
    assert root.restart_count == 1 and root.status is Status.RUNNING


def test_one_for_all_stops_the_others_in_reverse_and_starts_all_in_order() -> None:
    root = tree("one_for_all", 4)
    world = running(root)
    out = world.crash("b")
    assert names(out, Stop) == ["d", "c", "a"]
    assert names(out, Start) == ["a", "b", "c", "d"]
    rec = next(a for a in out if isinstance(a, NodeRecord))
    assert rec.event == "restart" and rec.fields["child"] == "b" and rec.fields["stop"] == "d,c,a"


def test_rest_for_one_restarts_the_child_and_those_after_it() -> None:
    root = tree("rest_for_one", 4)
    world = running(root)
    out = world.crash("b")
    assert names(out, Stop) == ["d", "c"] and names(out, Start) == ["b", "c", "d"]


def test_a_strategy_stops_with_reason_shutdown() -> None:
    root = tree("one_for_all", 2)
    world = running(root)
    out = world.crash("a")
    assert [a for a in out if isinstance(a, Stop)] == [Stop("b", "shutdown", "")]


# --- restart types ----------------------------------------------------------------------


def test_transient_is_restarted_after_a_crash_only() -> None:
    root = tree("one_for_one", 2, types={"a": "transient"})
    world = running(root)
    assert names(world.crash("a", "trap"), Start) == ["a"]
    out = world.crash("a", "normal")
    assert names(out, Start) == [] and Settle("a", Status.STOPPED, Status.STOPPED) in out
    assert len(root.children) == 2  # a transient child that ended normally stays a child


def test_temporary_is_never_restarted_and_leaves_its_node() -> None:
    root = tree("one_for_one", 2, types={"a": "temporary"})
    world = running(root)
    out = world.crash("a", "trap")
    assert names(out, Start) == [] and Removed("a") in out
    assert Settle("a", Status.FAILED, Status.FAILED) in out
    assert [c.name for c in root.children] == ["b"]


def test_a_temporary_child_that_left_comes_back_when_its_node_starts_again() -> None:
    """OTP: a supervisor's start gives every child spec again; so does a top-level agent's implicit node."""
    root = tree("one_for_one", 2, types={"a": "temporary"})
    engine, world = started(root)
    world.crash("a", "trap")
    assert [c.name for c in root.children] == ["b"]
    out = world.run(engine.restart("root", world.now, ticket="r"))
    assert names(out, Start) == ["a", "b"] and [c.name for c in root.children] == ["a", "b"]
    solo = Leaf("x", restart="temporary")
    top = Sup("x:root", Flags(), kind=NodeKind.AGENT_ROOT, owner="x", children=[solo])
    engine, world = started(top)
    world.crash("x", "trap")
    assert top.children == [] and solo.status is Status.FAILED
    assert names(world.run(engine.restart("x", world.now, ticket="r")), Start) == ["x"]
    assert solo.status is Status.RUNNING


def test_a_temporary_sibling_stopped_by_a_plan_is_not_started_again() -> None:
    root = tree("one_for_all", 3, types={"c": "temporary"})
    world = running(root)
    out = world.crash("a")
    assert names(out, Stop) == ["c", "b"] and names(out, Start) == ["a", "b"]


def test_a_child_waiting_for_its_nodes_job_to_start_it_shows_restarting() -> None:
    """A child the running plan will start, or whose crash waits for the plan and will be restarted, shows
    `restarting` (its messages queue); a temporary one, which the node will not restart, shows `failed`."""
    root = tree("one_for_all", 3, types={"c": "temporary"})
    engine, world = started(root)
    world.slow = {"b"}
    world.crash("a")  # the plan waits for b's stop; then it starts a and b
    a, b, c = root.children
    assert (a.status, a.shown, b.shown) == (Status.FAILED, Status.RESTARTING, Status.STOPPING)
    root = tree("one_for_one", 3, types={"c": "temporary"})
    engine, world = started(root)
    world.slow = {"a"}
    world.crash("a")  # the plan waits for a's start
    a, b, c = root.children
    world.crash("b")
    world.crash("c")
    assert (b.status, b.shown, c.shown) == (Status.FAILED, Status.RESTARTING, Status.FAILED)
    world.run(engine.ready("a", world.now))
    assert b.shown is Status.RUNNING and [m.name for m in root.children] == ["a", "b"]


def test_load_failed_is_never_restarted() -> None:
    root = tree("one_for_one", 2)
    world = running(root)
    out = world.crash("a", "load-failed")
    assert names(out, Start) == [] and Settle("a", Status.FAILED, Status.FAILED) in out
    assert root.restarts == []  # not counted


# --- intensity, giving up, escalation ----------------------------------------------------


def test_more_than_intensity_restarts_in_the_period_gives_up() -> None:
    root = tree("one_for_one", 3, intensity=2, period_ms=60_000)
    world = running(root)
    world.crash("b")
    world.tick(10)
    world.crash("b")
    world.tick(10)
    out = world.crash("b")
    assert names(out, Start) == []
    assert names(out, Stop) == ["c", "a"]  # reverse start order; b is already down
    give_up = next(a for a in out if isinstance(a, NodeRecord) and a.event == "give-up")
    assert give_up.fields == {"child": "b", "reason": "trap",
                              "detail": "more than 2 restarts in 60000 ms (last: b, trap)"}
    assert StoreTree("root", Status.FAILED) in out
    assert root.status is Status.FAILED
    assert root.last_exit == "gave up: more than 2 restarts in 60000 ms (last: b, trap)"
    assert all(a.why.startswith("supervisor root gave up") for a in out if isinstance(a, Stop))
    # A root has no parent to decide for it: its agents will not run again, and whoever still waits on one
    # (a call its worker never started, back in its mailbox) is answered.
    assert [a for a in out if isinstance(a, Settle)] == [
        Settle("a", Status.STOPPED, Status.STOPPED), Settle("b", Status.FAILED, Status.FAILED),
        Settle("c", Status.STOPPED, Status.STOPPED)]


def test_restarts_spread_wider_than_the_period_do_not_give_up() -> None:
    root = tree("one_for_one", 1, intensity=1, period_ms=1000)
    world = running(root)
    for _ in range(5):
        out = world.crash("a")
        assert names(out, Start) == ["a"]
        world.tick(1000)
    assert root.status is Status.RUNNING


def test_intensity_zero_gives_up_on_the_first_restart() -> None:
    root = tree("one_for_one", 1, intensity=0)
    world = running(root)
    out = world.crash("a")
    assert names(out, Start) == [] and root.status is Status.FAILED


def test_a_nested_node_that_gives_up_escalates_to_its_parent() -> None:
    inner = tree("one_for_one", 2, intensity=1, period_ms=60_000, name="inner")
    inner.children = [Leaf("i1"), Leaf("i2")]
    root = Sup("root", Flags("one_for_all", 3, 60_000), children=[Leaf("top"), inner])
    world = running(root)
    world.crash("i2")
    out = world.crash("i2")
    # inner gives up (stops i1), exits `shutdown`; root restarts one_for_all: stops top, starts both
    assert names(out, Stop) == ["i1", "top"]
    assert names(out, Start) == ["top", "i1", "i2"]
    events = [(a.node, a.event) for a in out if isinstance(a, NodeRecord)]
    assert events == [("inner", "give-up"), ("inner", "terminate"), ("root", "restart"), ("inner", "start")]
    assert root.restart_count == 1 and inner.status is Status.RUNNING and inner.restarts == []


def test_a_transient_node_that_gives_up_is_not_restarted() -> None:
    inner = Sup("inner", Flags("one_for_one", 0), restart="transient", children=[Leaf("i1")])
    root = Sup("root", Flags("one_for_one", 3), children=[Leaf("a"), inner])
    world = running(root)
    out = world.crash("i1")
    assert names(out, Start) == [] and inner.status is Status.FAILED and root.status is Status.RUNNING


def test_a_top_level_agent_gives_up_on_its_own_with_a_note_on_its_exit() -> None:
    leaf = Leaf("x")
    node = Sup("x:root", Flags("one_for_one", 1, 60_000), kind=NodeKind.AGENT_ROOT, children=[leaf])
    world = running(node)
    out = world.crash("x")
    assert RecordExit("x", "", None) in out and names(out, Start) == ["x"]
    out = world.crash("x")
    assert RecordExit("x", "; more than 1 restarts in 60000 ms, giving up", Status.FAILED) in out
    assert Settle("x", Status.FAILED, None) in out and names(out, Start) == []
    assert not any(isinstance(a, NodeRecord) for a in out)  # an implicit node has no chain


# --- the three rules that differed from OTP ------------------------------------------------


def test_an_exit_during_a_group_restart_is_consumed_by_that_restart() -> None:
    """one_for_all, intensity 1: b traps; c is killed while d is still stopping; OTP restarts once."""
    root = tree("one_for_all", 4, intensity=1, period_ms=60_000)
    engine, world = started(root)
    world.slow.add("d")
    out = world.crash("b")
    assert names(out, Stop) == ["d"]  # waiting for d
    out = world.crash("c", "worker-died")  # c dies while d stops
    assert names(out, Start) == [] and root.status is Status.RESTARTING
    world.slow.clear()
    out = world.run(engine.exited("d", "shutdown", world.now))
    assert names(out, Stop) == ["a"]  # c's exit is consumed: it is not stopped, not counted
    assert names(out, Start) == ["a", "b", "c", "d"]
    assert root.status is Status.RUNNING and root.restart_count == 1 and len(root.restarts) == 1


def test_an_exit_of_a_child_outside_the_plan_is_decided_after_it() -> None:
    root = tree("rest_for_one", 3, intensity=5)
    engine, world = started(root)
    world.slow.add("c")
    world.crash("b")  # stops c (slow)
    out = world.crash("a")  # a is before b: not in b's plan
    assert names(out, Start) == []
    world.slow.clear()
    out = world.run(engine.exited("c", "shutdown", world.now))
    # b's plan finishes (b, c), then a's exit is decided: rest_for_one stops b, c and starts a, b, c
    assert names(out, Start) == ["b", "c", "a", "b", "c"]
    assert root.restart_count == 2


def test_a_child_that_fails_to_start_stops_the_group_restart_there() -> None:
    """OTP's one_for_all_other_child_fails_restart: the children after it are not started."""
    root = tree("one_for_all", 4, intensity=3, period_ms=60_000)
    world = running(root)
    world.fail_start["b"] = deque(["trap"])
    out = world.crash("c")
    starts = names(out, Start)
    # first attempt: a, then b fails: c and d are not started; retried (counted): a stopped, all started
    assert starts == ["a", "b", "a", "b", "c", "d"]
    assert names(out, Stop) == ["d", "b", "a", "a"]
    assert root.restart_count == 2 and len(root.restarts) == 2
    retry = [a for a in out if isinstance(a, NodeRecord) and a.event == "restart"]
    assert [r.fields["child"] for r in retry] == ["c", "b"] and retry[1].fields["retry"] == "yes"


def test_a_rest_for_one_child_that_keeps_failing_to_start_gives_up() -> None:
    """OTP's hanging_restart_loop_rest_for_one: retried, counted, until the node gives up."""
    root = tree("rest_for_one", 3, intensity=2, period_ms=60_000)
    world = running(root)
    world.fail_start["b"] = deque(["trap"] * 10)
    out = world.crash("b")
    assert "c" not in names(out, Start)  # never started while b cannot start
    assert names(out, Start) == ["b", "b"]
    assert root.status is Status.FAILED
    assert root.last_exit == "gave up: more than 2 restarts in 60000 ms (last: b, trap)"


def test_a_child_that_cannot_load_during_a_group_restart_gives_up_at_once() -> None:
    root = tree("one_for_all", 3, intensity=5)
    world = running(root)
    world.fail_start["b"] = deque(["load-failed"])
    out = world.crash("a")
    assert names(out, Start) == ["a", "b"] and root.status is Status.FAILED
    assert root.last_exit == "gave up: b cannot start (load-failed)"


def test_first_start_goes_on_without_a_child_that_cannot_load() -> None:
    root = tree("one_for_one", 3)
    engine, world = built(root)
    world.fail_start["b"] = deque(["load-failed"])
    out = world.run(engine.spawn(root, 0.0, ticket="t"))
    assert names(out, Start) == ["a", "b", "c"] and out[-1] == Done("t", "root")
    assert root.children[1].status is Status.FAILED and root.restarts == []


def test_an_init_crash_at_first_start_goes_through_the_restart_rules() -> None:
    root = tree("one_for_one", 2)
    engine, world = built(root)
    world.fail_start["a"] = deque(["guest-error"])
    out = world.run(engine.spawn(root, 0.0, ticket="t"))
    assert names(out, Start) == ["a", "b", "a"] and root.restart_count == 1
    assert Done("t", "root") in out


# --- shutdown and the operator -------------------------------------------------------------


def test_operator_stop_holds_and_restart_releases_without_counting() -> None:
    root = tree("one_for_all", 3)
    engine, world = started(root)
    out = world.run(engine.stop("b", world.now, ticket="s"))
    assert [a for a in out if isinstance(a, Stop)] == [Stop("b", "stopped", "stopped by the operator")]
    assert Settle("b", Status.STOPPED, Status.STOPPED) in out and out[-1] == Done("s", "b")
    assert root.children[1].held
    out = world.crash("a")  # the plan skips held b
    assert names(out, Start) == ["a", "c"]
    out = world.run(engine.restart("b", world.now, ticket="r"))
    assert names(out, Start) == ["b"] and out[-1] == Done("r", "b")
    assert [a for a in out if isinstance(a, Start)] == [Start("b", counted=False)]
    assert not root.children[1].held and root.restart_count == 1


def test_operator_requests_wait_for_a_running_plan() -> None:
    root = tree("one_for_all", 3)
    engine, world = started(root)
    world.slow.add("c")
    world.crash("a")  # stopping c
    out = world.run(engine.stop("b", world.now, ticket="s"))
    assert out == []  # queued behind the plan
    world.slow.clear()
    out = world.run(engine.exited("c", "shutdown", world.now))
    assert names(out, Start) == ["a", "b", "c"]
    assert out[-1] == Done("s", "b") and names(out, Stop)[-1] == "b"


def test_operator_restart_of_a_subtree_records_its_stop_and_start() -> None:
    inner = Sup("inner", Flags(), children=[Leaf("i1"), Leaf("i2")])
    root = Sup("root", Flags(), children=[Leaf("a"), inner])
    engine, world = started(root)
    out = world.run(engine.restart("inner", world.now, ticket="r"))
    assert names(out, Stop) == ["i2", "i1"] and names(out, Start) == ["i1", "i2"]
    events = [(a.node, a.event, a.fields.get("reason")) for a in out if isinstance(a, NodeRecord)]
    assert events == [("inner", "terminate", "shutdown"), ("inner", "start", "operator")]
    assert root.restart_count == 0


def test_operator_restart_of_a_failed_top_level_agent_starts_a_fresh_window() -> None:
    leaf = Leaf("x")
    node = Sup("x:root", Flags("one_for_one", 0), kind=NodeKind.AGENT_ROOT, children=[leaf])
    engine, world = started(node)
    world.crash("x")
    assert leaf.status is Status.FAILED and node.status is Status.FAILED
    out = world.run(engine.restart("x", world.now, ticket="r"))
    assert names(out, Start) == ["x"] and out[-1] == Done("r", "x") and node.restarts == []
    assert leaf.status is Status.RUNNING


def test_shutdown_stops_every_root_children_last_first_and_holds_nothing() -> None:
    root = tree("one_for_one", 3)
    engine, world = started(root)
    out = world.run(engine.shutdown([root], world.now, "the supervisor is shutting down"))
    assert names(out, Stop) == ["c", "b", "a"]
    assert not any(isinstance(a, Settle) for a in out) and not any(c.held for c in root.children)
    assert NodeRecord("root", "terminate", {"reason": "shutdown", "detail": "the supervisor is shutting down"}) in out


def test_shutdown_during_a_plan_abandons_it() -> None:
    root = tree("one_for_all", 3)
    engine, world = started(root)
    world.slow.add("c")
    world.crash("a")
    world.slow.clear()
    out = world.run(engine.shutdown([root], world.now, "down"))
    assert names(out, Start) == []
    assert set(names(out, Stop)) == {"c", "b"}


# --- agents that supervise their own children ------------------------------------------------


def owner_setup(intensity: int = 1) -> tuple[Engine, World, Sup]:
    owner = Leaf("p")
    own = Sup("p:children", Flags("one_for_one", intensity, 60_000), kind=NodeKind.OWNED, owner="p",
              status=Status.RUNNING)
    owner.owns = own
    top = Sup("p:root", Flags(), kind=NodeKind.AGENT_ROOT, children=[owner])
    engine = Engine()
    engine.add(top)
    engine.add(own)
    world = World(engine)
    world.run(engine.spawn(top, 0.0))
    return engine, world, own


def test_an_agents_own_child_is_restarted_and_the_agent_told() -> None:
    engine, world, own = owner_setup()
    world.run(engine.start_child(own, Leaf("p.c"), world.now))
    out = world.crash("p.c")
    assert Notify("p", "p.c", "trap; restarting") in out and names(out, Start) == ["p.c"]


def test_an_agents_own_supervisor_giving_up_takes_the_agent_down() -> None:
    engine, world, own = owner_setup(intensity=0)
    world.run(engine.start_child(own, Leaf("p.c"), world.now))
    out = world.crash("p.c")
    assert any(isinstance(a, OwnerGaveUp) and a.owner == "p" for a in out)
    assert own.children == [] and own.status is Status.RUNNING


def test_stopping_an_agent_stops_its_own_children_first() -> None:
    engine, world, own = owner_setup()
    world.run(engine.start_child(own, Leaf("p.c1"), world.now))
    world.run(engine.start_child(own, Leaf("p.c2"), world.now))
    out = world.run(engine.stop("p", world.now, ticket="s"))
    assert names(out, Stop) == ["p.c2", "p.c1", "p"] and own.children == []


def test_a_crashed_agents_children_stop_and_are_not_restarted_with_it() -> None:
    engine, world, own = owner_setup()
    world.run(engine.start_child(own, Leaf("p.c"), world.now))
    out = world.crash("p")
    assert names(out, Stop) == ["p.c"] and names(out, Start) == ["p"]
    assert own.children == []


def test_the_owner_stopping_a_child_tells_it_and_frees_the_name() -> None:
    engine, world, own = owner_setup()
    world.run(engine.start_child(own, Leaf("p.c"), world.now))
    out = world.run(engine.stop("p.c", world.now, ticket="x", why="stopped by its supervisor p", hold=False))
    assert Notify("p", "p.c", "stopped") in out and Removed("p.c") in out and own.children == []


def test_a_child_the_agent_stops_after_it_ended_is_told_of_once() -> None:
    """The child crashes and the agent's node gives up; while the give-up still stops a slow sibling, the
    agent stops the crashed child (still in its list, so the stop is taken and waits). It was told of the
    crash: the stop, finding it ended, tells nothing more (it told the same exit a second time)."""
    engine, world, own = owner_setup(intensity=0)
    world.run(engine.start_child(own, Leaf("p.c"), world.now))
    world.run(engine.start_child(own, Leaf("p.d"), world.now))
    world.slow.add("p.d")
    out = world.crash("p.c")
    assert Notify("p", "p.c", "trap") in out and names(world.pending, Stop) == ["p.d"]
    out += world.run(engine.stop("p.c", world.now, ticket="x", why="stopped by its supervisor p", hold=False))
    out += world.run(engine.exited("p.d", "shutdown", world.now))
    assert [a for a in out if isinstance(a, Notify) and a.child == "p.c"] == [Notify("p", "p.c", "trap")]
    assert Done("x", "p.c") in out


def test_a_child_the_agent_stops_while_its_failed_start_waits_to_be_decided_is_told_of_once() -> None:
    """The operator restarts the agent's child and it cannot start: its exit waits for the node to be free
    (no node job ends to decide it). The agent then stops it: the stop finds it ended, and tells the agent
    of that end, once, since the child leaves its list and the waiting decision would tell nothing."""
    engine, world, own = owner_setup()
    world.run(engine.start_child(own, Leaf("p.c"), world.now))
    world.fail_start["p.c"] = deque(["load-failed"])
    out = world.run(engine.restart("p.c", world.now, ticket="r"))
    out += world.run(engine.stop("p.c", world.now, ticket="x", why="stopped by its supervisor p", hold=False))
    assert [a for a in out if isinstance(a, Notify)] == [Notify("p", "p.c", "stopped")]
    assert own.children == [] and own.deferred == []


def test_forgetting_an_agent_that_supervises_drops_its_own_node() -> None:
    """A removed agent's own children's node goes with it: a new agent of the same name adds its own (the
    engine refused it as a duplicate, after the new agent was half made)."""
    engine, world, own = owner_setup()
    world.run(engine.stop("p", world.now, ticket="s"))
    world.run(engine.forget("p", world.now))
    assert "p" not in engine.members and own.name not in engine.members
    engine.add(Sup(own.name, Flags(), kind=NodeKind.OWNED, owner="p", status=Status.RUNNING))


@pytest.mark.parametrize("strategy", ["one_for_one", "one_for_all", "rest_for_one"])
def test_a_crash_storm_always_ends_in_a_settled_tree(strategy: str) -> None:
    root = tree(strategy, 5, intensity=3, period_ms=1000)
    engine, world = started(root)
    for i in range(40):
        name = "abcde"[i * 7 % 5]
        if root.status is Status.FAILED:
            break
        if engine.members[name].up:
            world.crash(name)
        world.tick(50)
    assert root.job is None and root.deferred == []
    assert all(c.status in (Status.RUNNING, Status.STOPPED, Status.FAILED) for c in root.children)


# --- shutdown timeouts ----------------------------------------------------------------------


def test_each_stop_carries_the_childs_own_shutdown() -> None:
    """A stop kills after the child's shutdown: its timeout in ms, 0 for brutal_kill, never (None) for
    infinity; a node's stop carries its own limit for its whole subtree (infinity by default, as in OTP)."""
    inner = Sup("inner", Flags(), shutdown_ms=300, children=[Leaf("i1", shutdown_ms=None)])
    root = Sup("root", Flags("one_for_all"), children=[
        Leaf("a", shutdown_ms=2000), Leaf("b", shutdown_ms=0), inner, Leaf("c", shutdown_ms=None)])
    world = running(root)
    out = world.run(world.engine.shutdown([root], world.now, "down"))
    stops = {a.name: a.kill_after_ms for a in out if isinstance(a, Stop)}
    assert stops == {"c": None, "i1": None, "b": 0, "a": 2000}
    assert names(out, Stop) == ["c", "i1", "b", "a"]  # reverse start order, the subtree in its place
    # the root's own default is infinity; the subtree's limit is its own
    assert [(a.name, a.kill_after_ms) for a in out if isinstance(a, StopNode)] == [("root", None), ("inner", 300)]


def test_an_operator_request_superseded_by_a_decision_above_is_answered_once() -> None:
    """The operator restarts a subtree; before it has stopped, a sibling crashes and the node above restarts
    every child (one_for_all), the subtree with them. The operator's request cannot finish as asked: it is
    answered at once, saying so, never left waiting, and the tree ends running."""
    inner = Sup("inner", Flags(), children=[Leaf("i1"), Leaf("i2")])
    root = Sup("root", Flags("one_for_all", 10, 5000), children=[inner, Leaf("d")])
    engine, world = started(root)
    world.slow.add("i2")
    out = world.run(engine.restart("inner", world.now, ticket="r"))
    assert names(out, Stop) == ["i2"] and not [a for a in out if isinstance(a, (Done, Abandoned))]
    out = world.crash("d")  # root restarts all: it stops inner (waiting on i2) itself
    abandoned = [a for a in out if isinstance(a, Abandoned)]
    assert len(abandoned) == 1 and abandoned[0].ticket == "r" and "supervisor root" in abandoned[0].why, out
    world.slow.clear()
    out = world.run(engine.exited("i2", "shutdown", world.now))
    assert not [a for a in out if isinstance(a, (Done, Abandoned))]
    assert names(out, Start) == ["i1", "i2", "d"]
    assert all(m.status is Status.RUNNING for m in root.walk()), [(m.name, m.status) for m in root.walk()]
