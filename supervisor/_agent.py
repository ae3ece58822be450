"""One agent as the supervisor sees it (config, chain head, state, mailbox, worker), and one tree node.

What supervision decides about them (status, restart history, plans) lives in
the engine's :class:`~supervisor._supervision.Leaf` and ``Sup``; these hold the rest.
"""

from __future__ import annotations

import contextlib
import functools
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from theater import wire
from theater.chain import ChainVerifier
from theater.records import Record

from ._config import OPERATOR, AgentConfig, RestartSpec, TreeConfig
from ._errors import NotFound
from ._spawner import WorkerProcess
from ._supervision import Leaf, NodeKind, Status, Sup
from ._timers import Timer

if TYPE_CHECKING:
    from ._ledger import Checked

__all__ = ["Agent", "AgentUsage", "Agents", "Effects", "Member", "Node", "Pending", "Served"]


# Told a call's outcome instead of a client: (the committed result, or None and an error code and message).
OnAnswer = Callable[["Checked | None", str, str], None]
# A host call the supervisor answered during a call, as the worker must record it:
# (WIT interface, function, input, output), input and output as wire.host_call_bytes.
Served = tuple[str, str, bytes, bytes]


@dataclass(eq=False)
class Effects:
    """What a call did through the supervisor that takes effect only if the call commits with status ok."""

    kv: dict[str, bytes | None] = field(default_factory=dict)  # key -> new value (None: deleted)
    kv_usage: tuple[int, int] | None = None  # (keys, bytes) with these writes, once the call wrote one
    sends: list[tuple[Agent, Pending]] = field(default_factory=list)  # messages to deliver on commit
    timers: list[tuple[int, int, bytes]] = field(default_factory=list)  # new timers: (id, due ns, message)
    cancels: list[int] = field(default_factory=list)  # timers cancelled


@dataclass
class AgentUsage:
    """One agent's tallies since this supervisor started (``_usage.py``)."""

    calls: int = 0
    messages: int = 0
    fuel: int = 0
    records: int = 0
    record_bytes: int = 0
    cpu_ns_ended: int = 0  # of its workers that have ended
    peak_rss: int = 0


@dataclass(eq=False)
class Pending:
    """A message waiting for, or in, the worker. ``reply_to`` is (client identity, request id); an agent
    waiting on the outcome is told through ``on_answer``."""

    call: wire.Call
    reply_to: tuple[bytes, int] | None = None
    answered: bool = False
    on_answer: OnAnswer | None = None
    timer_id: int | None = None  # the agent's timer this message is; consumed when its result commits
    send_id: bytes | None = None  # the stored send this message is (its message id); likewise consumed
    served: list[Served] = field(default_factory=list)  # host calls answered so far, in order
    effects: Effects = field(default_factory=Effects)
    deadline: float | None = None  # once the worker runs it: when its answer is overdue (monotonic)
    timeout: Timer | None = None  # its caller's timeout, cancelled once it is answered
    asked: bool = False  # its worker sent a host request for it: it started
    unanswered: tuple[str, str, bytes] | None = None  # the host call it waits on: (interface, function, input)


# Bytes of the messages waiting in mailboxes, by tenant (the operator's agents are one). An agent's mailbox holds
# up to `mailbox` messages of up to `max_message_bytes` (1,000 of 1 MiB by default): without a bound over a
# tenant's agents, one tenant's clients could make the supervisor hold gigabytes. Past TENANT_QUEUED_BYTES, its
# senders are refused (mailbox-full) until its agents have taken some.
TENANT_QUEUED_BYTES = 256 * 1024 * 1024
queued_bytes: Counter[str] = Counter()
# Bytes of messages sent by calls not yet committed, by their targets' tenant: they enter the mailboxes when the
# call commits, so the bound counts them from the send (a flood of uncommitted sends went past it otherwise).
reserved_bytes: Counter[str] = Counter()


def reserve(tenant: str, size: int) -> None:
    reserved_bytes[tenant] += size


def unreserve(tenant: str, size: int) -> None:
    reserved_bytes[tenant] -= size
    if reserved_bytes[tenant] <= 0:
        del reserved_bytes[tenant]


class Mailbox(deque[Pending]):
    """An agent's messages waiting for their turn, their bytes counted in ``queued_bytes`` for its tenant."""

    def __init__(self, tenant: str) -> None:
        super().__init__()
        self.tenant = tenant

    def _count(self, pendings: Iterable[Pending], sign: int) -> None:
        queued_bytes[self.tenant] += sign * sum(len(p.call.data) for p in pendings)
        if queued_bytes[self.tenant] <= 0:
            del queued_bytes[self.tenant]

    def append(self, pending: Pending) -> None:
        super().append(pending)
        self._count((pending,), 1)

    def appendleft(self, pending: Pending) -> None:
        super().appendleft(pending)
        self._count((pending,), 1)

    def extendleft(self, pendings: Iterable[Pending]) -> None:
        pendings = list(pendings)
        super().extendleft(pendings)
        self._count(pendings, 1)

    def extend(self, pendings: Iterable[Pending]) -> None:
        pendings = list(pendings)
        super().extend(pendings)
        self._count(pendings, 1)

    def popleft(self) -> Pending:
        pending = super().popleft()
        self._count((pending,), -1)
        return pending

    def pop(self) -> Pending:  # type: ignore[override]
        pending = super().pop()
        self._count((pending,), -1)
        return pending

    def remove(self, pending: Pending) -> None:
        super().remove(pending)
        self._count((pending,), -1)

    def clear(self) -> None:
        self._count(self, -1)
        super().clear()


def queue_room(tenant: str, size: int) -> str | None:
    """Why a message of ``size`` bytes cannot wait in a mailbox of ``tenant``'s agents now, or None."""
    held = queued_bytes[tenant] + reserved_bytes[tenant]
    if held + size <= TENANT_QUEUED_BYTES:
        return None
    who = "the operator's agents" if tenant == OPERATOR else f"the agents of tenant {tenant}"
    return (f"{who} already hold {held:,} bytes of messages waiting in mailboxes, or sent to them by calls not "
            f"yet committed (at most {TENANT_QUEUED_BYTES:,}): try again once they have taken some")


def uptime_s(now: float, since: float) -> float:
    """Seconds from ``since`` to ``now`` in whole milliseconds, as ``ps`` and ``tree`` show an uptime (not
    ``round(x, 3)``, which rounds through a decimal conversion: 0.2 against 0.08 µs, once per agent listed)."""
    return int((now - since) * 1000) / 1000


class _Member:
    """What agents and supervisor nodes are alike in: a name, an id and a restart spec, from their config."""

    id: bytes
    config: AgentConfig | TreeConfig

    @property
    def name(self) -> str:
        return self.config.name

    @functools.cached_property
    def uuid(self) -> str:
        """The id as text (kept: ``ps`` lists every agent, and making it costs more than the rest of a row)."""
        return str(uuid.UUID(bytes=self.id))

    @property
    def restart(self) -> RestartSpec:
        return self.config.restart


@dataclass(eq=False)
class Agent(_Member):
    id: bytes
    config: AgentConfig
    verifier: ChainVerifier
    state: bytes
    initialized: bool
    incarnation: int
    in_store: bool
    leaf: Leaf = field(init=False)
    worker: WorkerProcess | None = None
    prepared: WorkerProcess | None = None  # made ready ahead of its start; not yet its worker (Workers.prepare)
    parked: wire.Hello | None = None  # the prepared worker's checked hello (its identity is the worker's)
    mailbox: Mailbox = field(init=False)
    # Sent to its worker and not yet answered, oldest first (at most PIPELINE_DEPTH): the worker runs them in
    # order, so the first is the one it runs now; the others wait in its socket.
    sent: deque[Pending] = field(default_factory=deque)
    restart_count: int = 0
    instance_restarts: int = 0
    last_exit: str = ""
    started_at: float = field(default_factory=time.time)  # when it last became running (Workers._ready)
    spawn_waiters: list[tuple[bytes, int]] = field(default_factory=list)
    stop_why: str = ""  # why we are stopping it, for its exit record
    orphan_of: str = ""  # the parent's name, for a child from before a supervisor restart: not restarted, not a root
    discard_results: bool = False  # its worker is being killed after a failed commit
    waiting_on: Agent | None = None  # the agent whose reply its call in flight waits for (messaging.call)
    reserved: int = 0  # mailbox places held for messages sent by calls not yet committed
    unsnapshotted: tuple[int, int] = (0, 0)  # records and bytes committed since its last state snapshot
    usage: AgentUsage = field(default_factory=AgentUsage)

    @property
    def queued(self) -> int:
        """Messages waiting for their turn: in the mailbox, or sent ahead to the worker (not the one it runs)."""
        return len(self.mailbox) + max(0, len(self.sent) - 1)

    @property
    def in_flight(self) -> Pending | None:
        """The call its worker runs now (or starts next): the oldest one sent and not answered."""
        return self.sent[0] if self.sent else None

    def snapshot_due(self, records: list[Record]) -> bool:
        """Whether this commit also snapshots the state (a later compaction's cut point): an agent with
        ``[retention]`` limits gets one each quarter of its limit, so a cut can keep most of what it may."""
        retention = self.config.retention
        if not retention.limited:
            return False
        count, size = self.unsnapshotted
        count, size = count + len(records), size + sum(len(r.raw) for r in records)
        due = (retention.max_records and count >= max(1, retention.max_records // 4)) or \
            (retention.max_bytes and size >= retention.max_bytes // 4)
        self.unsnapshotted = (0, 0) if due else (count, size)
        return bool(due)

    def __post_init__(self) -> None:
        self.leaf = Leaf(self.config.name, restart=self.config.restart.type,
                         shutdown_ms=self.config.restart.kill_after_ms)
        self.mailbox = Mailbox(self.config.tenant)

    @property
    def status(self) -> Status:
        return self.leaf.status

    @property
    def alive(self) -> bool:
        return self.worker is not None and not self.worker.exited

    @property
    def parent_is_agent(self) -> bool:
        """Started by another agent (the supervision capability), not by a client or a manifest tree."""
        node = self.leaf.parent
        return node is not None and node.kind is NodeKind.OWNED

    @property
    def parent_name(self) -> str | None:
        """The supervisor it belongs to: a tree node, or the agent whose own child it is."""
        node = self.leaf.parent
        if node is None or node.kind is NodeKind.AGENT_ROOT:
            return self.orphan_of or None
        return node.owner if node.kind is NodeKind.OWNED else node.name

    def summary(self, now: float | None = None) -> dict[str, object]:
        """The agent as ``ps`` lists it; ``now`` (``time.time()``) is taken once for a whole listing, whose
        thousands of rows are most of its cost."""
        worker, status = self.worker, self.leaf.status
        if status is Status.FAILED or status is Status.STOPPED:
            status = self.leaf.shown  # waiting for its node's plan to start it again: restarting
        return {
            "head": self.verifier.next_seq - 1,
            "id": self.uuid,
            "incarnation": self.incarnation,
            "instance_restarts": self.instance_restarts,
            "last_exit": self.last_exit,
            "mailbox": self.queued,
            "name": self.config.name,
            "parent": self.parent_name,
            "pid": worker.pid if worker is not None and not worker.exited and worker.pidfd >= 0 else None,
            "policy": self.config.policy,
            "restarts": self.restart_count,
            "status": status,  # a str enum, written as its value (.value is a descriptor call: 0.1 µs a row)
            "uptime_s": uptime_s(now or time.time(), self.started_at) if status is Status.RUNNING else 0,
        }


@dataclass(eq=False)
class Node(_Member):
    """A supervisor node of a manifest tree: its config and id beside the engine's view of it."""

    id: bytes
    config: TreeConfig
    sup: Sup
    started_at: float = field(default_factory=time.time)
    head_ns: int = 0  # when its chain's last record was written (this supervisor process)

    @property
    def status(self) -> Status:
        return self.sup.status


Member = Agent | Node


class Agents:
    """Every agent the supervisor knows, by id and by name (names are unique in a home)."""

    def __init__(self) -> None:
        self.by_id: dict[bytes, Agent] = {}
        self.by_name: dict[str, Agent] = {}

    def add(self, agent: Agent) -> None:
        self.by_id[agent.id] = agent
        self.by_name[agent.name] = agent

    def remove(self, agent: Agent) -> None:
        self.by_id.pop(agent.id, None)
        self.by_name.pop(agent.name, None)

    def __iter__(self) -> Iterator[Agent]:
        return iter(list(self.by_id.values()))

    def __len__(self) -> int:
        return len(self.by_id)

    def get(self, name: str) -> Agent | None:
        return self.by_name.get(name)

    def __getitem__(self, name: str) -> Agent:
        return self.by_name[name]

    def find(self, ref: object) -> Agent:
        """An agent by name, or by id in any spelling :class:`uuid.UUID` accepts."""
        if not isinstance(ref, str):
            raise NotFound("agent must be a name or an id")
        agent = self.by_name.get(ref)
        if agent is None:
            with contextlib.suppress(ValueError):
                agent = self.by_id.get(uuid.UUID(ref).bytes)
        if agent is None:
            raise NotFound(f"no agent named or with id {ref!r}")
        return agent
