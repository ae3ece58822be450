"""One agent as the supervisor sees it: its config, chain head, state, mailbox and worker."""

from __future__ import annotations

import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from theater import wire
from theater.chain import ChainVerifier

from ._config import AgentConfig, RestartSpec
from ._spawner import WorkerProcess

__all__ = ["Agent", "Pending", "add_restart"]


@dataclass(eq=False)
class Pending:
    """A message waiting for, or in, the worker. ``reply_to`` is (client identity, request id)."""

    call: wire.Call
    reply_to: tuple[bytes, int] | None = None
    answered: bool = False


def add_restart(history: list[float], now: float, spec: RestartSpec) -> tuple[list[float], bool]:
    """OTP's restart intensity: keep restarts within the period; False once there are too many."""
    window = spec.period_ms / 1000
    kept = [t for t in history if now - t < window] + [now]
    return kept, len(kept) <= spec.intensity


@dataclass(eq=False)
class Agent:
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

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def uuid(self) -> str:
        return str(uuid.UUID(bytes=self.id))

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
        }
