"""The supervision engine: every restart decision, as a pure function of the tree, an event and ``now``.

Erlang/OTP's ``supervisor`` semantics (strategies, restart types, intensity
within a period, giving up and escalating, shutdown in reverse start order),
with no I/O and no clock of its own. The supervisor feeds it events (a member
exited, a member is ready, the operator asked for something) and carries out
the actions it returns (stop or start an agent, record, answer), feeding their
outcomes back as events. Top-level agents are the only child of an implicit
``one_for_one`` node, so every restart takes the same path.

Each node runs at most one *job* at a time (a restart plan, a start, a stop, a
give-up): a list of stop/start steps, each waiting for its outcome. While a
job runs, exits of the node's other children wait (*deferred*) until it ends;
an exit of a child the job is about to stop is consumed by that stop, as OTP's
``terminate_children`` consumes the exit of a sibling that already died.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "DEFAULT_INTENSITY",
    "DEFAULT_PERIOD_MS",
    "NOT_ABNORMAL",
    "PERMANENT_FAILURES",
    "STRATEGIES",
    "Action",
    "Done",
    "Engine",
    "Flags",
    "Leaf",
    "Member",
    "NodeKind",
    "NodeRecord",
    "Notify",
    "OwnerGaveUp",
    "Readmitted",
    "RecordExit",
    "Removed",
    "Settle",
    "Start",
    "Status",
    "Stop",
    "StopNode",
    "StoreTree",
    "Sup",
    "add_restart",
    "is_abnormal",
    "should_restart",
]

STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one")
RESTART_TYPES = ("permanent", "transient", "temporary")
DEFAULT_INTENSITY = 3
DEFAULT_PERIOD_MS = 5000
DEFAULT_SHUTDOWN_MS = 5000  # an agent's; a supervisor node's default is infinity, as in OTP
# Exit reasons that are not crashes: OTP's `normal` and `shutdown`, and the operator's `stop`.
NOT_ABNORMAL = frozenset({"normal", "shutdown", "stopped"})
# Failures that would only repeat: the component cannot load, or the confinement cannot be applied.
PERMANENT_FAILURES = frozenset({"load-failed", "hardening-failed"})


class Status(enum.StrEnum):
    """A member's status, as `ps` and `tree` show it."""

    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class NodeKind(enum.Enum):
    TREE = "tree"  # a supervisor node of a manifest tree: it has a chain of its own
    AGENT_ROOT = "agent-root"  # the implicit one_for_one node of a top-level agent
    OWNED = "owned"  # an agent's own children (the supervision capability)


@dataclass(frozen=True, slots=True)
class Flags:
    """A supervisor's flags: strategy, and at most ``intensity`` restarts per ``period_ms``."""

    strategy: str = "one_for_one"
    intensity: int = DEFAULT_INTENSITY
    period_ms: int = DEFAULT_PERIOD_MS

    def as_dict(self) -> dict[str, object]:
        return {"strategy": self.strategy, "intensity": self.intensity, "period_ms": self.period_ms}


def is_abnormal(reason: str) -> bool:
    return reason not in NOT_ABNORMAL


def ended_status(reason: str) -> Status:
    """How a member that ended with ``reason`` stays: `failed` after a crash, `stopped` otherwise."""
    return Status.FAILED if is_abnormal(reason) else Status.STOPPED


def should_restart(restart_type: str, reason: str) -> bool:
    """permanent: always; transient: only after an abnormal exit; temporary: never."""
    if restart_type == "permanent":
        return True
    if restart_type == "transient":
        return is_abnormal(reason)
    return False


def add_restart(history: list[float], now: float, period_ms: int, intensity: int) -> tuple[list[float], bool]:
    """OTP's restart intensity: keep restarts inside the period; False once there are more than ``intensity``."""
    window = period_ms / 1000
    kept = [t for t in history if now - t < window] + [now]
    return kept, len(kept) <= intensity


# --- the tree --------------------------------------------------------------------


@dataclass(eq=False)
class Leaf:
    """An agent as the engine sees it: a name, a restart type, a status."""

    name: str
    restart: str = "permanent"
    shutdown_ms: int | None = DEFAULT_SHUTDOWN_MS  # how long a stop waits before it kills; None: infinity
    status: Status = Status.STOPPED
    held: bool = False  # stopped by the operator: no plan starts it until the operator restarts it
    parent: Sup | None = None
    owns: Sup | None = None  # its own children, when it holds the supervision capability
    waiter: Job | None = None  # the job whose current step is this member

    def walk(self) -> Iterator[Member]:
        yield self

    def walk_spec(self) -> Iterator[Member]:
        yield self

    @property
    def up(self) -> bool:
        return self.status in (Status.STARTING, Status.RUNNING, Status.RESTARTING, Status.STOPPING)

    @property
    def shown(self) -> Status:
        """Its status as `ps` and `tree` show it and as messages find it: one that ended and that its node's
        running job will start again (a restart plan still stopping a sibling) is `restarting`, and messages to
        it queue; so is one whose crash waits for that job to end to be decided, if its type restarts it."""
        node = self.parent
        if self.up or self.held or node is None or node.job is None or node.job.cancelled:
            return self.status
        job = node.job
        if any(op == "start" and m is self for op, m in job.steps):
            return Status.RESTARTING
        if job.purpose in (Purpose.RESTART, Purpose.START) and not any(m is self for _, m in job.steps) and any(
                m is self and reason not in PERMANENT_FAILURES and should_restart(self.restart, reason)
                for m, reason in node.deferred):
            return Status.RESTARTING
        return self.status


@dataclass(eq=False)
class Sup:
    """A supervisor node: flags, ordered children, restart history, and the job it is running."""

    name: str
    flags: Flags = field(default_factory=Flags)
    restart: str = "permanent"
    kind: NodeKind = NodeKind.TREE
    shutdown_ms: int | None = None  # the whole subtree's time to stop; None: infinity (OTP's default)
    children: list[Member] = field(default_factory=list)
    # A tree's node or a top-level agent's: the children its configuration gives, in start order. Each start of
    # the node begins with all of them again, those that left it (temporary children that ended) included, as
    # an OTP supervisor's init gives every child spec again. Set when the engine takes the node.
    spec: tuple[Member, ...] = ()
    parent: Sup | None = None
    owner: str = ""  # OWNED: the agent whose children these are; AGENT_ROOT: the agent
    status: Status = Status.STOPPED
    restarts: list[float] = field(default_factory=list)
    restart_count: int = 0
    last_exit: str = ""
    held: bool = False
    job: Job | None = None  # this node's own job
    waiter: Job | None = None  # the job (its parent's, or an operator's) waiting for this node
    deferred: list[tuple[Member, str]] = field(default_factory=list)  # exits that arrived during the job
    queue: deque[Job] = field(default_factory=deque)  # operator jobs waiting for the job to end

    def walk(self) -> Iterator[Member]:
        yield self
        for c in self.children:
            yield from c.walk()

    def walk_spec(self) -> Iterator[Member]:
        """Every member a start of this node starts: its spec's children, not only those it has now."""
        yield self
        for c in self.spec if self.kind is not NodeKind.OWNED else self.children:
            yield from c.walk_spec() if isinstance(c, Sup) else (c,)

    @property
    def up(self) -> bool:
        return any(c.up for c in self.children)


Member = Leaf | Sup
Step = tuple[Literal["stop", "release", "start"], Member]


class Purpose(enum.Enum):
    RESTART = "restart"  # a counted restart plan after a child's exit
    GIVE_UP = "give-up"  # intensity exceeded: stop every child, then exit with `shutdown`
    START = "start"  # a node starting its children in order
    STOP = "stop"  # a node stopping its children in reverse order
    OPERATOR = "operator"  # an operator's stop or restart of one member
    SPAWN = "spawn"  # a new root (tree or top-level agent), or a resumed one


@dataclass(eq=False)
class Job:
    """Steps run one at a time; each waits for its member to have stopped or to be ready."""

    node: Sup | None  # whose own job it is (None: a spawn's or an operator's)
    purpose: Purpose
    steps: deque[Step]
    counted: bool = False  # its starts are restarts by a supervisor (not a resume, not the operator's)
    reason: str = "shutdown"  # the exit reason its stops ask for
    why: str = ""  # the explanation its stops give
    target: Member | None = None
    subject: str = ""  # the name the request named
    ticket: object = None  # opaque to the engine: who to answer when it ends
    hold: bool = False  # an operator's stop holds its target until the operator restarts it
    stopped_target: bool = False  # its stop found its target up and stopped it (not one that had ended already)
    current: Member | None = None
    waiting: bool = False
    cancelled: bool = False
    failed_start: tuple[Member, str] | None = None


# --- actions ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    """Start the agent's worker. ``counted``: a restart by a supervisor (its count moves; from = initial applies).
    ``then``: the agent the same job starts next, once this one is ready; its worker may be made ready ahead
    of its turn, provided nothing of it is recorded and it runs nothing until its own Start."""

    name: str
    counted: bool
    then: str | None = None


@dataclass(frozen=True, slots=True)
class Stop:
    """Ask the agent's worker to stop; kill it after ``kill_after_ms`` (0: at once, brutal_kill; None:
    never, infinity). Its exit comes back as an event."""

    name: str
    reason: str
    why: str
    kill_after_ms: int | None = DEFAULT_SHUTDOWN_MS


@dataclass(frozen=True, slots=True)
class StopNode:
    """A tree node begins to stop its children, last first; after ``kill_after_ms`` (None: never,
    infinity) whatever still runs under it is killed."""

    name: str
    kill_after_ms: int | None = None


@dataclass(frozen=True, slots=True)
class RecordExit:
    """Record the end of an agent's worker, adding ``note`` to its detail and storing ``desired`` if set."""

    name: str
    note: str = ""
    desired: Status | None = None


@dataclass(frozen=True, slots=True)
class Settle:
    """The agent will not run again by itself: answer whoever waits on it; store ``desired`` if set."""

    name: str
    status: Status
    desired: Status | None = None


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A decision of a tree node, for its own chain."""

    node: str
    event: Literal["start", "restart", "give-up", "terminate"]
    fields: dict[str, str]


@dataclass(frozen=True, slots=True)
class Notify:
    """Tell ``owner``, an agent that supervises its own children, that ``child`` exited."""

    owner: str
    child: str
    reason: str


@dataclass(frozen=True, slots=True)
class OwnerGaveUp:
    """An agent's own supervisor gave up: the agent exits with it (reason `shutdown`)."""

    owner: str
    why: str


@dataclass(frozen=True, slots=True)
class Removed:
    """A child left its node for good (a temporary child, or an agent's own child)."""

    name: str


@dataclass(frozen=True, slots=True)
class Readmitted:
    """A temporary child that had left its node comes back with the node's start: its stored desired state
    (that of its end) is running again, so that a supervisor restart resumes it with its node."""

    name: str


@dataclass(frozen=True, slots=True)
class StoreTree:
    """Store a tree root's desired state."""

    root: str
    desired: Status


@dataclass(frozen=True, slots=True)
class Done:
    """A spawn's or an operator's job ended: answer ``ticket`` about ``member``."""

    ticket: object
    member: str


@dataclass(frozen=True, slots=True)
class Abandoned:
    """A spawn's or an operator's job will never end (the supervisor is going down): answer ``ticket`` that."""

    ticket: object
    why: str


Action = (Start | Stop | StopNode | RecordExit | Settle | NodeRecord | Notify | OwnerGaveUp | Removed | Readmitted
          | StoreTree | Done | Abandoned)


# --- the engine ------------------------------------------------------------------


class Engine:
    """Holds the trees. Each public method takes one event and ``now`` and returns the actions it calls for.

    Continuations (a job waiting for a step, a node reporting to its parent) are
    queued and run to completion inside the call, never by recursion into a job
    that is still on the stack.
    """

    def __init__(self) -> None:
        self.members: dict[str, Member] = {}
        self._out: list[Action] = []
        self._queue: deque[Job] = deque()
        self._queued_on: set[Sup] = set()  # nodes with operator jobs waiting for their job to end
        self._now = 0.0

    # --- building ---------------------------------------------------------------

    def add(self, member: Member, parent: Sup | None = None) -> None:
        """Put a member (and its subtree) in the engine, under ``parent`` as its last child, or as a root."""
        for m in member.walk():
            if self.members.get(m.name, m) is not m:
                raise ValueError(f"a member named {m.name!r} already exists")
        for m in member.walk():
            self.members[m.name] = m
            if isinstance(m, Sup):
                for c in m.children:
                    c.parent = m
                if m.kind is not NodeKind.OWNED:
                    m.spec = tuple(m.children)
        member.parent = parent
        if parent is not None and member not in parent.children:
            parent.children.append(member)

    def forget(self, name: str, now: float) -> list[Action]:
        """An agent that ended before it had a chain leaves the engine; a job waiting on it goes on."""
        self._now = now
        member = self.members.pop(name, None)
        if member is None:
            return []
        if isinstance(member, Leaf) and member.owns is not None and self.members.get(member.owns.name) is member.owns:
            del self.members[member.owns.name]  # its own children's node goes with it: a new agent of the name adds its own
        node = member.parent
        if node is not None and member in node.children:
            node.children.remove(member)
        if node is not None and node.kind is NodeKind.AGENT_ROOT:
            self.members.pop(node.name, None)
            node.status = Status.FAILED
        self._resume(member)
        return self._drain()

    @staticmethod
    def root_of(member: Member) -> Member:
        while member.parent is not None:
            member = member.parent
        return member

    # --- events -----------------------------------------------------------------

    def spawn(self, root: Member, now: float, ticket: object = None, *, resume: bool = False) -> list[Action]:
        """Start a new root (a tree, or a top-level agent's implicit node), or resume a stored one."""
        self._now = now
        if isinstance(root, Sup) and root.kind is NodeKind.TREE and not resume:
            self._emit(StoreTree(root.name, Status.RUNNING))
        self._schedule(Job(None, Purpose.SPAWN, deque([("start", root)]), target=root, subject=root.name, ticket=ticket))
        return self._drain()

    def ready(self, name: str, now: float) -> list[Action]:
        """An agent's worker serves: its init is committed, or its state was resumed."""
        self._now = now
        leaf = self.members.get(name)
        if isinstance(leaf, Leaf) and leaf.status in (Status.STARTING, Status.RESTARTING):
            leaf.status = Status.RUNNING
            self._resume(leaf)
        return self._drain()

    def exited(self, name: str, reason: str, now: float) -> list[Action]:
        """An agent's worker ended with ``reason``, asked to or not."""
        self._now = now
        leaf = self.members.get(name)
        if not isinstance(leaf, Leaf) or not leaf.up:
            return []
        if leaf.owns is not None and leaf.owns.up:
            # Its children do not outlive it (OTP), and are not restarted with it.
            self._stop_owned(leaf.owns, f"its supervisor {leaf.name} exited ({reason})")
        if leaf.status is Status.STOPPING:  # the stop a job asked for
            leaf.status = Status.STOPPED
            self._emit(RecordExit(leaf.name))
            self._resume(leaf)
            return self._drain()
        starting = leaf.status in (Status.STARTING, Status.RESTARTING)
        leaf.status = ended_status(reason)
        job = leaf.waiter
        if starting and job is not None and not job.cancelled:
            leaf.waiter = None
            self._start_failed(job, leaf, reason)
        else:
            leaf.waiter = None
            self._exit(leaf, reason)
        return self._drain()

    def stop(self, name: str, now: float, ticket: object = None, *, reason: str = "stopped",
             why: str = "stopped by the operator", hold: bool = True) -> list[Action]:
        """Stop a member (the operator's stop holds it until the operator restarts it)."""
        self._now = now
        target = self._operand(name)
        self._submit(Job(None, Purpose.OPERATOR, deque([("stop", target)]), reason=reason, why=why,
                         target=target, subject=name, ticket=ticket, hold=hold))
        return self._drain()

    def restart(self, name: str, now: float, ticket: object = None) -> list[Action]:
        """The operator's restart: stop if running, then start from the committed state; not counted."""
        self._now = now
        target = self._operand(name)
        steps: deque[Step] = deque([("stop", target), ("release", target), ("start", target)])
        self._submit(Job(None, Purpose.OPERATOR, steps, reason="shutdown", why="restarted by the operator",
                         target=target, subject=name, ticket=ticket))
        return self._drain()

    def shutdown(self, roots: list[Member], now: float, why: str) -> list[Action]:
        """Stop every root at once; each stops its children one at a time, last first."""
        self._now = now
        for root in roots:
            waiting = []  # the jobs with someone to answer: each waits on a member, or in a node's queue
            for m in root.walk():
                waiting += [m.waiter] if m.waiter is not None else []
                if isinstance(m, Sup):
                    waiting += m.queue
                    self._cancel(m)
                    m.queue.clear()
            for job in waiting:
                if job.ticket is not None and not job.cancelled:
                    job.cancelled = True
                    self._emit(Abandoned(job.ticket, why))
            self._schedule(Job(None, Purpose.STOP, deque([("stop", root)]), reason="shutdown", why=why, target=root))
        return self._drain()

    def start_child(self, node: Sup, leaf: Leaf, now: float) -> list[Action]:
        """An agent spawned a child of its own: it starts at once, under the agent's own node."""
        self._now = now
        self.add(leaf, node)
        leaf.held = False
        self._start(leaf, None)
        return self._drain()

    # --- the rules ----------------------------------------------------------------

    def _exit(self, child: Member, reason: str) -> None:
        """``child`` ended on its own (not asked to): its supervisor decides, now or once its job ends."""
        node = child.parent
        if node is None:
            if isinstance(child, Leaf):
                self._emit(RecordExit(child.name))
            self._settle(child)
            return
        if isinstance(child, Leaf):
            note, desired = self._verdict(node, child, reason)
            self._emit(RecordExit(child.name, note, desired))
        if node.job is not None:
            node.deferred.append((child, reason))
            return
        self._decide(node, child, reason)

    def _verdict(self, node: Sup, child: Member, reason: str) -> tuple[str, Status | None]:
        """A top-level agent's exit record says what its implicit node decides, and stores its desired state."""
        if node.kind is not NodeKind.AGENT_ROOT or node.job is not None:
            return "", None
        if reason in PERMANENT_FAILURES or not should_restart(child.restart, reason):
            return "", ended_status(reason)
        flags = node.flags
        if add_restart(node.restarts, self._now, flags.period_ms, flags.intensity)[1]:
            return "", None
        return f"; more than {flags.intensity} restarts in {flags.period_ms} ms, giving up", Status.FAILED

    def _decide(self, node: Sup, child: Member, reason: str) -> None:
        """OTP: restart ``child`` per its restart type and the node's strategy, or give up."""
        if child not in node.children or node.status in (Status.STOPPING, Status.STOPPED, Status.FAILED):
            self._settle(child)
            return
        if reason in PERMANENT_FAILURES or not should_restart(child.restart, reason):
            if child.restart == "temporary":
                node.children.remove(child)
                self._emit(Removed(child.name))
            self._settle(child, persist=node.kind is not NodeKind.AGENT_ROOT)
            self._notify(node, child, reason)
            if node.kind is NodeKind.AGENT_ROOT:
                node.status = ended_status(reason)
            return
        self._restart(node, child, reason)

    def _restart(self, node: Sup, child: Member, reason: str, *, retry: bool = False) -> None:
        flags = node.flags
        node.restarts, ok = add_restart(node.restarts, self._now, flags.period_ms, flags.intensity)
        if not ok:
            self._notify(node, child, reason)
            why = f"more than {flags.intensity} restarts in {flags.period_ms} ms (last: {child.name}, {reason})"
            self._give_up(node, child, reason, why)
            return
        self._notify(node, child, f"{reason}; restarting")
        stop, start = self._plan(node, child)
        node.restart_count += 1
        node.status = Status.RESTARTING
        if node.kind is NodeKind.TREE:
            self._emit(NodeRecord(node.name, "restart", {
                "child": child.name, "reason": reason, "strategy": flags.strategy,
                "stop": ",".join(m.name for m in stop), "start": ",".join(m.name for m in start),
                "retry": "yes" if retry else "no",
            }))
        steps: deque[Step] = deque([("stop", m) for m in stop] + [("start", m) for m in start])
        self._schedule(Job(node, Purpose.RESTART, steps, counted=True))

    def _plan(self, node: Sup, failed: Member) -> tuple[list[Member], list[Member]]:
        """What restarting ``failed`` means under the node's strategy: (stop, in order), (start, in order).

        Temporary siblings a strategy stops are not started again (they leave the node);
        held children are neither stopped nor started by a plan.
        """
        children = node.children
        if node.flags.strategy == "one_for_one":
            affected: list[Member] = []
        elif node.flags.strategy == "one_for_all":
            affected = [c for c in children if c is not failed]
        else:  # rest_for_one
            affected = children[children.index(failed) + 1:]
        stop = [c for c in reversed(affected) if not c.held and (c.up or self._deferred(node, c))]
        again = {id(c) for c in affected} | {id(failed)}
        start = [c for c in children if id(c) in again and not c.held and (c is failed or c.restart != "temporary")]
        return stop, start

    def _give_up(self, node: Sup, offender: Member, reason: str, why: str) -> None:
        """Too many restarts: stop every child in reverse start order, then exit with reason `shutdown`."""
        node.last_exit = f"gave up: {why}"
        node.status = Status.STOPPING
        if node.kind is NodeKind.TREE:
            self._emit(NodeRecord(node.name, "give-up", {"child": offender.name, "reason": reason, "detail": why}))
        steps: deque[Step] = deque(("stop", c) for c in reversed(node.children))
        who = node.owner if node.kind is NodeKind.OWNED else node.name  # an agent's children: the agent
        self._schedule(Job(node, Purpose.GIVE_UP, steps, reason="shutdown", why=f"supervisor {who} gave up: {why}"))

    def _start_failed(self, job: Job, member: Member, reason: str) -> None:
        """``member`` ended before it was ready, while ``job`` was starting it."""
        node = member.parent
        if job.purpose is Purpose.RESTART and job.node is not None:
            # OTP: the restart stops at the child that failed to start (later children are not
            # started) and is tried again, counted, as a restart of that child.
            self._cancel(job.node)
            if isinstance(member, Leaf):
                note, desired = self._verdict(job.node, member, reason)
                self._emit(RecordExit(member.name, note, desired))
            if reason in PERMANENT_FAILURES:  # retrying would fail the same way: give up at once
                self._settle(member)
                self._give_up(job.node, member, reason, f"{member.name} cannot start ({reason})")
            else:
                self._restart(job.node, member, reason, retry=True)
            return
        if job.purpose is Purpose.START and job.counted and job.node is not None:
            # A node restarted by its parent could not start a child: it stops the children it
            # started, and its own start fails; its parent decides.
            if isinstance(member, Leaf):
                self._emit(RecordExit(member.name))
            job.steps = deque(("stop", c) for c in reversed(job.node.children) if c.up)
            job.failed_start = (member, reason)
            self._queue.append(job)
            return
        # A first start, a resume, or the operator's start: the job goes on without it, and the exit
        # is decided like any other once the node is free (a load failure is never retried).
        if node is None:
            if isinstance(member, Leaf):
                self._emit(RecordExit(member.name))
            self._settle(member)
        else:
            if isinstance(member, Leaf):
                note, desired = self._verdict(node, member, reason)
                self._emit(RecordExit(member.name, note, desired))
            node.deferred.append((member, reason))
        self._queue.append(job)

    # --- jobs ------------------------------------------------------------------------

    def _operand(self, name: str) -> Member:
        """The member an operator's request acts on: a top-level agent is acted on with its implicit node."""
        member = self.members[name]
        if member.parent is not None and member.parent.kind is NodeKind.AGENT_ROOT:
            return member.parent
        return member

    def _submit(self, job: Job) -> None:
        """An operator's job waits for any job of the nodes above its target (OTP: requests queue)."""
        assert job.target is not None
        busy = self._busy_above(job.target)
        if busy is not None:
            busy.queue.append(job)
            self._queued_on.add(busy)
        else:
            self._schedule(job)

    def waits_behind(self, name: str) -> str | None:
        """What an operator's stop or restart of ``name`` would queue behind: the running job of a node above
        it, named by that node (by the agent, for a top-level agent's own restart); None if it would run now."""
        busy = self._busy_above(self._operand(name))
        if busy is None:
            return None
        return f"{busy.owner}'s restart" if busy.kind is NodeKind.AGENT_ROOT else f"supervisor {busy.name}'s plan"

    def untie_waiting(self, name: str, answerable: Callable[[object], bool]) -> list[tuple[object, Purpose, str]]:
        """Whoever waits for agent ``name``'s start, which cannot go on for now (the store cannot be written):
        a spawn or an operator's request waiting for it or for a node above it to start, and the operators'
        requests queued behind plans above it. Each whose ticket is ``answerable`` now is returned once as
        (ticket, purpose, subject) to be told; its job goes on, and answers no one."""
        jobs: list[Job] = []
        member = self.members.get(name)
        while member is not None:
            if member.waiter is not None and member.status in (Status.STARTING, Status.RESTARTING):
                jobs.append(member.waiter)
            if isinstance(member, Sup):
                jobs += member.queue
            member = member.parent
        out = []
        for job in jobs:
            if job.node is None and job.ticket is not None and not job.cancelled and answerable(job.ticket):
                out.append((job.ticket, job.purpose, job.subject))
                job.ticket = None
        return out

    def _busy_above(self, member: Member) -> Sup | None:
        found = None
        node: Sup | None = member if isinstance(member, Sup) else member.parent
        while node is not None:
            if node.job is not None:
                found = node
            node = node.parent
        return found

    def _schedule(self, job: Job) -> None:
        if job.node is not None:
            self._cancel(job.node)
            job.node.job = job
        self._queue.append(job)

    def _cancel(self, node: Sup) -> None:
        if node.job is not None:
            node.job.cancelled = True
            node.job = None

    def _resume(self, member: Member) -> None:
        """``member``'s step is done: the job waiting on it goes on."""
        job, member.waiter = member.waiter, None
        if job is not None and job.current is member and not job.cancelled:
            self._queue.append(job)

    def _drain(self) -> list[Action]:
        while self._queue:
            self._run(self._queue.popleft())
        out, self._out = self._out, []
        return out

    def _run(self, job: Job) -> None:
        """Take the job's next steps until one must wait; end it when none is left."""
        if job.cancelled:
            return
        while job.steps:
            op, member = job.steps.popleft()
            job.current = member
            if op == "release":
                for m in member.walk_spec():
                    m.held = False
                continue
            if self._stop(member, job) if op == "stop" else self._start(member, job):
                return
        job.current = None
        self._ended(job)

    def _stop(self, member: Member, job: Job) -> bool:
        """Begin stopping ``member``; True if the job must wait for it."""
        if job.node is not None:
            pending = self._deferred(job.node, member)
            if pending is not None:  # it exited already: this stop consumes that exit (OTP)
                job.node.deferred.remove(pending)
                self._settle(member)
                return False
        if isinstance(member, Sup):
            if member.status in (Status.STOPPED, Status.FAILED) and not member.up:
                return False
            member.status = Status.STOPPING
            self._wait_on(member, job)
            steps: deque[Step] = deque(("stop", c) for c in reversed(member.children))
            # A subtree's agents stop with reason `shutdown`; a top-level agent's implicit node passes
            # the operator's own reason on.
            reason = job.reason if member.kind is NodeKind.AGENT_ROOT else "shutdown"
            self._schedule(Job(member, Purpose.STOP, steps, reason=reason,
                               why=job.why or f"supervisor {member.name} stopping"))
            if member.kind is NodeKind.TREE:
                self._emit(StopNode(member.name, member.shutdown_ms))
            return True
        if member.owns is not None and member.owns.up:  # its own children stop first, last first
            job.steps.appendleft(("stop", member))
            job.current = member.owns
            self._wait_on(member.owns, job)
            self._stop_owned(member.owns, f"its supervisor {member.name} is stopping")
            return True
        if not member.up:
            return False
        member.status = Status.STOPPING
        if member is job.target:
            job.stopped_target = True
        self._wait_on(member, job)
        self._emit(Stop(member.name, job.reason, job.why, member.shutdown_ms))
        return True

    def _start(self, member: Member, job: Job | None) -> bool:
        """Begin starting ``member``; True if the job must wait for it."""
        if member.held or member.up:
            return False
        counted = job is not None and job.counted
        self._wait_on(member, job)
        if isinstance(member, Sup):
            member.status = Status.STARTING
            member.restarts = []
            if member.kind is not NodeKind.OWNED:  # a temporary child that ended comes back with its node
                for back in member.spec:
                    if isinstance(back, Leaf) and back not in member.children and not back.held:
                        self._emit(Readmitted(back.name))
                member.children = list(member.spec)
            if member.kind is NodeKind.TREE:
                how = "restart" if counted else "operator" if job and job.purpose is Purpose.OPERATOR else "start"
                self._emit(NodeRecord(member.name, "start", {"reason": how}))
            steps: deque[Step] = deque(("start", c) for c in member.children)
            self._schedule(Job(member, Purpose.START, steps, counted=counted))
            return True
        member.status = Status.RESTARTING if counted else Status.STARTING
        self._emit(Start(member.name, counted, self._next_start(job)))
        return job is not None

    def _wait_on(self, member: Member, job: Job | None) -> None:
        """``job``'s current step is ``member``. An operator's (or a spawn's) job already waiting on it is
        superseded: a node above decided meanwhile (a sibling crashed during the operator's restart) and now
        stops or starts ``member`` itself. Whoever asked is told, once, instead of waiting for ever."""
        old = member.waiter
        if old is not None and old is not job and old.node is None and not old.cancelled and old.current is member:
            old.cancelled = True
            if old.ticket is not None:
                by = f"supervisor {job.node.name}" if job is not None and job.node is not None else "another request"
                self._emit(Abandoned(old.ticket, f"superseded: {by} took over {member.name} meanwhile; ask again "
                                                 "once it is done"))
        member.waiter = job

    @staticmethod
    def _next_start(job: Job | None) -> str | None:
        """The agent ``job`` starts after its current step, if that is the start of an agent not running."""
        if job is None or not job.steps:
            return None
        op, member = job.steps[0]
        return member.name if op == "start" and isinstance(member, Leaf) and not (member.held or member.up) else None

    def will_start(self, name: str) -> bool:
        """Whether a job still to run its steps has the start of agent ``name`` among them."""
        leaf = self.members.get(name)
        node = leaf.parent if isinstance(leaf, Leaf) else None
        job = node.job if node is not None else None
        return job is not None and not job.cancelled and any(op == "start" and m is leaf for op, m in job.steps)

    def _stop_owned(self, node: Sup, why: str) -> None:
        steps: deque[Step] = deque(("stop", c) for c in reversed(node.children))
        self._schedule(Job(node, Purpose.STOP, steps, reason="shutdown", why=why))

    def _ended(self, job: Job) -> None:
        node = job.node
        if node is not None and node.job is job:
            node.job = None
        if job.purpose is Purpose.RESTART:
            assert node is not None
            node.status = Status.RUNNING
            for child in [c for c in node.children if c.restart == "temporary" and not c.up and not c.held]:
                node.children.remove(child)  # a temporary sibling the plan stopped leaves the node (OTP)
                self._emit(Removed(child.name))
            self._after_job(node)
        elif job.purpose is Purpose.GIVE_UP:
            assert node is not None
            node.deferred.clear()
            self._gave_up(node)
        elif job.purpose is Purpose.START:
            assert node is not None
            if job.failed_start is not None:
                member, reason = job.failed_start
                node.status = Status.FAILED
                node.last_exit = f"could not start {member.name} ({reason})"
                if node.kind is NodeKind.TREE:
                    self._emit(NodeRecord(node.name, "terminate", {"reason": "shutdown", "detail": node.last_exit}))
                self._start_of_node_failed(node)
                self._run_queued()
                return
            node.status = Status.RUNNING
            self._resume(node)
            self._after_job(node)
        elif job.purpose is Purpose.STOP and node is not None:
            node.deferred.clear()
            if node.kind is NodeKind.OWNED:
                for c in node.children:
                    self._emit(Removed(c.name))
                node.children.clear()
                node.restarts = []
                node.status = Status.RUNNING  # an agent's own node lives as long as the agent
            else:
                if node.status is not Status.FAILED:
                    node.status = Status.STOPPED
                if node.kind is NodeKind.TREE:
                    self._emit(NodeRecord(node.name, "terminate", {"reason": job.reason, "detail": job.why}))
            self._resume(node)
            self._after_job(node)
        elif job.purpose is Purpose.OPERATOR:
            self._operator_done(job)
        elif job.purpose is Purpose.SPAWN and job.target is not None:
            self._emit(Done(job.ticket, job.subject))
        self._run_queued()

    def _operator_done(self, job: Job) -> None:
        target = job.target
        assert target is not None
        stopped = job.why != "restarted by the operator"
        if job.hold:
            for m in target.walk():
                m.held = True
        if stopped:
            self._settle(target)
        root = self.root_of(target)
        if isinstance(target, Sup) and target is root and target.kind is NodeKind.TREE:
            self._emit(StoreTree(target.name, Status.STOPPED if stopped else Status.RUNNING))
        owner = target.parent
        # The agent's own supervision.stop (not held): the child leaves its list, and it is told. An operator's
        # stop holds the child in the list (a restart starts it there again), and the agent is not told.
        if stopped and not job.hold and owner is not None and owner.kind is NodeKind.OWNED:
            if target in owner.children:
                owner.children.remove(target)
                self._emit(Removed(target.name))
            # Told once: of this stop, or of an end of its own still waiting for the node to decide it (it
            # leaves the list now, so that decision would tell nothing). One that ended and was decided
            # already was told of that end (twice before: the same exit record and reason again).
            untold = self._deferred(owner, target)
            if untold is not None:
                owner.deferred.remove(untold)
            if job.stopped_target or untold is not None:
                self._notify(owner, target, "stopped")
        self._emit(Done(job.ticket, job.subject))

    def _after_job(self, node: Sup) -> None:
        """Exits that waited for the job are decided now, in order; then queued operator jobs run."""
        while node.job is None and node.deferred:
            member, reason = node.deferred.pop(0)
            self._decide(node, member, reason)

    def _run_queued(self) -> None:
        for node in [n for n in self._queued_on if n.job is None]:
            self._queued_on.discard(node)
            waiting, node.queue = node.queue, deque()
            for job in waiting:
                self._submit(job)

    def _start_of_node_failed(self, node: Sup) -> None:
        job, node.waiter = node.waiter, None
        if job is not None and job.current is node and not job.cancelled:
            self._start_failed(job, node, "shutdown")
        elif node.parent is not None:
            self._exit(node, "shutdown")

    def _gave_up(self, node: Sup) -> None:
        """A node's children have stopped after it gave up: it exits with reason `shutdown`."""
        if node.kind is NodeKind.OWNED:
            for c in node.children:
                self._emit(Removed(c.name))
            node.children.clear()
            node.restarts = []
            node.status = Status.RUNNING  # a restarted owner starts with no children
            self._emit(OwnerGaveUp(node.owner, node.last_exit))
            return
        node.status = Status.FAILED
        if node.kind is NodeKind.AGENT_ROOT:
            self._settle(node, persist=False)
        if node.kind is NodeKind.TREE:
            self._emit(NodeRecord(node.name, "terminate", {"reason": "shutdown", "detail": node.last_exit}))
            if node.parent is None:
                self._emit(StoreTree(node.name, Status.FAILED))
        if node.waiter is not None:  # it was being started by its parent's job: that start failed
            self._start_of_node_failed(node)
        elif node.parent is not None:
            self._exit(node, "shutdown")
        elif node.kind is NodeKind.TREE:  # a root: nothing above decides, and its agents will not run again
            self._settle(node)  # (calls their workers never started are back in their mailboxes: answered)

    def _settle(self, member: Member, *, persist: bool = True) -> None:
        for m in member.walk():
            if isinstance(m, Sup):
                if m.status is not Status.FAILED and not m.up:
                    m.status = Status.STOPPED
            elif not m.up:
                self._emit(Settle(m.name, m.status, m.status if persist else None))

    def _deferred(self, node: Sup, member: Member) -> tuple[Member, str] | None:
        return next((d for d in node.deferred if d[0] is member), None)

    def _notify(self, node: Sup, child: Member, reason: str) -> None:
        if node.kind is NodeKind.OWNED and isinstance(child, Leaf):
            self._emit(Notify(node.owner, child.name, reason))

    def _emit(self, action: Action) -> None:
        self._out.append(action)
