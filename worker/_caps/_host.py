"""What every host module shares: the declaration a capability module makes, and the agent's host context."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from wasmtime import component as wc

from theater import wire
from theater.capabilities import CAPABILITIES
from theater.records import Kind
from theater.spec import Limits

from .._errors import HostLimit
from .._recorder import Recorder

__all__ = ["Ask", "Host", "HostCapability", "HostFunctions", "Linker"]

Linker = Callable[[wc.LinkerInstance], None]
# Ask the supervisor (HOST_REQUEST, HOST_REPLY): interface (a capability name), body -> answer.
Ask = Callable[[str, dict[str, Any]], dict[str, Any]]


class HostFunctions(Protocol):
    """One agent's host functions for one interface."""

    def link(self, inst: wc.LinkerInstance) -> None:
        """Add the functions to the interface's linker instance."""


@dataclass(frozen=True, slots=True)
class HostCapability:
    """What a capability module declares as ``CAPABILITY``.

    ``name`` is the capability's name, a key of ``theater.capabilities.CAPABILITIES``
    (the policy key); the module is named after it. ``functions`` makes the
    interface's host functions for one agent from its :class:`Host`.
    ``exports`` are the guest exports the capability requires (name -> the
    lifted function type, as ``worker._engine.describe`` renders it), checked at load.
    """

    name: str
    functions: Callable[[Host], HostFunctions]
    exports: Mapping[str, str] = field(default_factory=dict)

    @property
    def interface(self) -> str:
        """The WIT interface, with package and version, as linked and as recorded."""
        return CAPABILITIES[self.name].interface


class Host:
    """One agent's host side, shared by its host modules: limits, per-call counters, the record, the supervisor.

    Every value a host function hands to the guest is recorded as a ``host-call``
    record and counts against ``max_host_calls_per_call`` (:meth:`record`, or
    :meth:`ask` for what only the supervisor can answer). Counters start again
    at zero with each call (:meth:`begin_call`).
    """

    def __init__(self, recorder: Recorder, limits: Limits, agent_id: str, ask: Ask) -> None:
        self.recorder = recorder
        self.limits = limits
        self.agent_id = agent_id
        self._ask = ask
        self._counts: dict[str, int] = {}

    def begin_call(self) -> None:
        self._counts.clear()

    def count(self, what: str, limit: int, refusal: str) -> None:
        """Count one ``what`` in this call; past ``limit``, refuse with ``refusal`` (the call fails, host-limit)."""
        n = self._counts[what] = self._counts.get(what, 0) + 1
        if n > limit:
            raise HostLimit(refusal)

    def count_host_call(self) -> None:
        limit = self.limits.max_host_calls_per_call
        self.count("host-call", limit, f"more than {limit} host calls in one call (max_host_calls_per_call)")

    def record(self, interface: str, function: str, data_in: bytes, data_out: bytes) -> None:
        """Count a host call and record what it handed to the guest (``interface`` as recorded: WIT name and version)."""
        self.count_host_call()
        self.recorder.append(
            Kind.HOST_CALL, {"interface": interface, "function": function, "input": data_in, "output": data_out},
        )

    def ask(self, capability: str, body: dict[str, Any]) -> dict[str, Any]:
        """A host request to the supervisor: ``body`` is ``{"op": <function>, …arguments}``.

        Counted before it is sent; once answered, recorded as one ``host-call``
        record (function ``op``, input the arguments and output the answer, each
        as canonical JSON) before the guest sees the answer.
        """
        self.count_host_call()
        answer = self._ask(capability, body)
        args = {key: value for key, value in body.items() if key != "op"}
        self.recorder.append(Kind.HOST_CALL, {
            "interface": CAPABILITIES[capability].interface, "function": str(body["op"]),
            "input": wire.encode_json(args), "output": wire.encode_json(answer),
        })
        return answer
