"""One agent as the supervisor sees it: its config, chain head, state, mailbox and worker."""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from theater import wire
from theater.chain import ChainVerifier

from ._config import AgentConfig, RestartSpec, TreeConfig
from ._spawner import WorkerProcess

__all__ = ["Agent", "Member", "Node", "Pending"]


@dataclass(eq=False)
class Pending:
    """A message waiting for, or in, the worker. ``reply_to`` is (client identity, request id)."""

    call: wire.Call
    reply_to: tuple[bytes, int] | None = None
    answered: bool = False


class _Member:
    """What agents and supervisor nodes are alike in: a name, an id and a restart spec, from their config."""

    id: bytes
    config: AgentConfig | TreeConfig

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def uuid(self) -> str:
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
    status: str = "starting"  # starting | running | stopping | restarting | stopped | failed
    worker: WorkerProcess | None = None
    mailbox: deque[Pending] = field(default_factory=deque)
    in_flight: Pending | None = None
    restarts: list[float] = field(default_factory=list)
    restart_count: int = 0
    instance_restarts: int = 0
    last_exit: str = ""
    started_at: float = field(default_factory=time.time)
    spawn_waiters: list[tuple[bytes, int]] = field(default_factory=list)
    stop_waiters: list[tuple[bytes, int]] = field(default_factory=list)
    parent: Node | None = None
    on_stopped: list[Callable[[], None]] = field(default_factory=list)  # run once the worker has exited
    on_ready: list[Callable[[], None]] = field(default_factory=list)  # run once init is committed
    children: Node | None = None  # set when the agent holds the supervision capability
    stop_why: str = ""  # why we are stopping it, for its exit record
    orphan_of: str = ""  # the parent's name, for a child from before a supervisor restart: not restarted, not a root
    held: bool = False
    discard_results: bool = False  # its worker is being killed after a failed commit  # stopped by the operator: its tree does not start it until `restart`

    @property
    def alive(self) -> bool:
        return self.worker is not None and not self.worker.exited

    def summary(self) -> dict[str, object]:
        return {
            "id": self.uuid,
            "name": self.name,
            "status": self.status,
            "pid": self.worker.pid if self.worker and not self.worker.exited else None,
            "incarnation": self.incarnation,
            "restarts": self.restart_count,
            "instance_restarts": self.instance_restarts,
            "head": self.verifier.next_seq - 1,
            "mailbox": len(self.mailbox),
            "policy": self.config.policy,
            "uptime_s": round(time.time() - self.started_at, 3) if self.status == "running" else 0,
            "last_exit": self.last_exit,
            "parent": self.parent.name if self.parent else (self.orphan_of or None),
        }

    def tree(self) -> dict[str, object]:
        out: dict[str, object] = {"kind": "agent", "restart": self.restart.type, **self.summary()}
        if self.children is not None:
            out["strategy"] = self.children.config.flags.strategy
            out["children"] = [c.tree() for c in self.children.children]
        return out


@dataclass(eq=False)
class Node(_Member):
    """A supervisor in a tree: flags, ordered children, restart history, and the plan being executed."""

    id: bytes
    config: TreeConfig
    parent: Node | None = None
    children: list[Member] = field(default_factory=list)
    restarts: list[float] = field(default_factory=list)
    restart_count: int = 0
    status: str = "starting"  # starting | running | restarting | stopping | stopped | failed
    started_at: float = field(default_factory=time.time)
    busy: bool = False  # a restart plan is running; exits wait in `deferred`
    deferred: list[tuple[Member, str]] = field(default_factory=list)
    last_exit: str = ""
    spawn_waiters: list[tuple[bytes, int]] = field(default_factory=list)
    owner: Agent | None = None  # the agent whose own children these are (supervision capability)

    @property
    def alive(self) -> bool:
        return any(c.alive for c in self.children)

    def tree(self) -> dict[str, object]:
        return {
            "kind": "supervisor",
            "id": self.uuid,
            "name": self.name,
            "strategy": self.config.flags.strategy,
            "intensity": self.config.flags.intensity,
            "period_ms": self.config.flags.period_ms,
            "restart": self.restart.type,
            "restarts": self.restart_count,
            "status": self.status,
            "uptime_s": round(time.time() - self.started_at, 3) if self.status == "running" else 0,
            "last_exit": self.last_exit,
            "children": [c.tree() for c in self.children],
        }


Member = Agent | Node
