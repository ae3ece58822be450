"""Host requests: what a guest asks that its worker cannot answer alone, dispatched by capability.

A capability that needs the supervisor (today `supervision`) registers one
handler here. A request is served only during a call of the agent that asked,
and only if the agent holds the capability; anything else is a violation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from theater import wire
from theater.errors import ProtocolError

from ._agent import Agent
from ._errors import ConfigError, NotFound, Refused
from ._workers import Workers

__all__ = ["Handler", "HostRequests"]

Handler = Callable[[Agent, dict[str, Any]], dict[str, Any]]


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
        if agent.in_flight is None or handler is None or capability not in agent.config.capabilities:
            self.workers.violation(agent, f"host request outside a call, or for {capability[:64]!r}, which the agent "
                                          "does not hold or the supervisor does not serve")
            return
        try:
            answer = handler(agent, request.body)
        except (Refused, NotFound, ConfigError) as exc:
            answer = {"ok": False, "error": str(exc)}
        self.workers.send(agent, wire.HostRequest(request.request_id, answer).encode(wire.SupervisorType.HOST_REPLY))
