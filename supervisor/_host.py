"""Host requests: what a guest asks that its worker cannot answer alone, dispatched by capability.

Each capability served here registers one handler. A request is served only
during a call of the agent that asked, and only if the agent holds the
capability; anything else is a violation. A handler answers at once (it returns
the answer) or later (it returns None and calls :meth:`HostRequests.answer`,
as a messaging call does once its target replied). Every answer sent is noted
on the call in flight, exactly as the worker must record it: the ledger holds
the worker's host-call records to those notes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from theater import wire
from theater.capabilities import CAPABILITIES
from theater.errors import ProtocolError

from ._agent import Agent, Pending
from ._errors import ConfigError, NotFound, Refused
from ._spawner import WorkerProcess
from ._workers import Workers

__all__ = ["Answer", "Handler", "HostCall", "HostRequests"]

MAX_OP_CHARS = 64


@dataclass(frozen=True, slots=True)
class Answer:
    """A host reply: its JSON body and the bytes that travel beside it."""

    body: dict[str, Any]
    data: bytes | None = None


@dataclass(eq=False)
class HostCall:
    """One guest request being served: answered exactly once, now or later."""

    agent: Agent
    worker: WorkerProcess
    pending: Pending  # the agent's call in flight when it asked
    request_id: int
    capability: str
    op: str
    args: dict[str, Any]  # the body without `op`
    data: bytes | None
    answered: bool = field(default=False)

    @property
    def current(self) -> bool:
        """The call that asked is still in flight in the same worker: an answer can still reach it."""
        return self.agent.worker is self.worker and self.agent.in_flight is self.pending and not self.worker.exited


Handler = Callable[[HostCall], Answer | None]


class HostRequests:
    def __init__(self, workers: Workers) -> None:
        self.workers = workers
        self.handlers: dict[str, Handler] = {}  # capability name -> its handler

    def register(self, capability: str, handler: Handler) -> None:
        self.handlers[capability] = handler

    def handle(self, agent: Agent, frames: list[bytes]) -> None:
        try:
            request = wire.HostRequest.decode(frames, "host request")
        except ProtocolError as exc:
            self.workers.violation(agent, f"malformed host request: {exc}", b"".join(frames)[:256])
            return
        capability = request.interface
        if capability is None:
            self.workers.violation(agent, "host request names no interface")
            return
        handler = self.handlers.get(capability)
        pending, worker = agent.in_flight, agent.worker
        if pending is None or worker is None or handler is None or capability not in agent.config.capabilities:
            self.workers.violation(agent, f"host request outside a call, or for {capability[:64]!r}, which the agent "
                                          "does not hold or the supervisor does not serve")
            return
        pending.asked = True
        op = request.body.get("op")
        if not isinstance(op, str) or len(op) > MAX_OP_CHARS:
            self.workers.violation(agent, "host request without an operation name", frames[1][:256])
            return
        args = {key: value for key, value in request.body.items() if key != "op"}
        call = HostCall(agent, worker, pending, request.request_id, capability, op, args, request.data)
        # Until it is answered (and so in ``served``), what it asked: an exit record names it if the worker
        # ends first, since the request may have been made all the same (``_ledger.unrecorded_host_calls``).
        pending.unanswered = (CAPABILITIES[capability].interface, op, wire.host_call_bytes(args, request.data))
        try:
            answer = handler(call)
        except (Refused, NotFound, ConfigError) as exc:
            answer = Answer({"ok": False, "error": str(exc)})
        except Exception as exc:  # a worker's arguments must never take the supervisor down: it broke the protocol
            self.workers.violation(agent, f"host request {capability}.{op} could not be served: "
                                          f"{type(exc).__name__}: {str(exc)[:200]}", frames[1][:256])
            return
        if answer is not None:
            self.answer(call, answer)

    def answer(self, call: HostCall, answer: Answer) -> None:
        """Send the answer, if the call that asked still waits for it; note it as the worker must record it."""
        if call.answered:
            return
        call.answered = True
        if not call.current:
            return
        call.pending.unanswered = None
        call.pending.served.append((
            CAPABILITIES[call.capability].interface, call.op,
            wire.host_call_bytes(call.args, call.data), wire.host_call_bytes(answer.body, answer.data),
        ))
        reply = wire.HostRequest(call.request_id, answer.body, None, answer.data)
        self.workers.send(call.agent, reply.encode(wire.SupervisorType.HOST_REPLY))
