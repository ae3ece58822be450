"""What every host module shares: the declaration a capability module makes, and the agent's host context."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from theater import wire
from theater.capabilities import CAPABILITIES
from theater.records import Kind
from theater.spec import Limits

from .._errors import CallFailed, HostLimit
from .._hostfuncs import Instance
from .._recorder import Recorder

__all__ = ["Ask", "Host", "HostCapability", "HostFunctions", "Instance", "Linker", "guest_bytes", "guest_text"]

Linker = Callable[[Instance], None]
# Ask the supervisor (HOST_REQUEST, HOST_REPLY): interface (a capability name), body, data, how long to wait
# (ms) -> the answer and its data.
Ask = Callable[[str, dict[str, Any], bytes | None, int], tuple[dict[str, Any], bytes | None]]
ASK_WAIT_MS = 10_000  # how long a host request waits for its answer, past any wait the request itself names


class HostFunctions(Protocol):
    """One agent's host functions for one interface."""

    def link(self, inst: Instance) -> None:
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
        self._started = time.monotonic()
        self._output: dict[str, bytearray] = {}
        self.ending = False  # this call called runtime.finish or runtime.shutdown: the agent ends after it

    def adopt(self, recorder: Recorder, agent_id: str, ask: Ask) -> None:
        """Bind a host made before its agent was known (a spare loads its component ahead) to that agent."""
        self.recorder = recorder
        self.agent_id = agent_id
        self._ask = ask

    def untouched(self) -> bool:
        """Nothing was written or recorded yet: a component loaded ahead did nothing outside its instance."""
        return not any(self._output.values())

    def begin_call(self) -> None:
        self.ending = False
        self._counts.clear()
        self._started = time.monotonic()
        self._output = {}

    # --- what the guest writes to stdout and stderr -----------------------------------------

    def output(self, stream: str, data: bytes) -> None:
        """Bytes the guest wrote to ``stream`` (``stdout`` or ``stderr``): each line becomes a log record of
        this call (``wit.md`` section 6.4), up to ``max_logs_per_call`` records with the guest's own log lines;
        a line longer than ``max_log_bytes`` is cut into records of that size. Past the limit, output is
        dropped, not fatal: a traceback must not fail the call that printed it a second time."""
        buffer = self._output.setdefault(stream, bytearray())
        if self._counts.get("log", 0) >= self.limits.max_logs_per_call:
            return
        buffer += data
        room = self.limits.max_log_bytes - len(stream) - 2
        while buffer:
            cut = buffer.find(b"\n")
            if cut < 0 and len(buffer) < room:
                return
            line, rest = (bytes(buffer[:cut]), buffer[cut + 1:]) if 0 <= cut <= room else (bytes(buffer[:room]), buffer[room:])
            self._output[stream] = buffer = bytearray(rest)
            self._output_record(stream, line)

    def end_call(self) -> None:
        """The call is over: what is left of a line without its newline is a record too."""
        for stream, buffer in self._output.items():
            if buffer:
                self._output_record(stream, bytes(buffer))
        self._output = {}

    def _output_record(self, stream: str, line: bytes) -> None:
        n = self._counts.get("log", 0)
        if n >= self.limits.max_logs_per_call:
            return
        self._counts["log"] = n + 1
        self.log_record("info" if stream == "stdout" else "error",
                        f"{stream}: ".encode() + line.decode("utf-8", "replace").encode())

    def log_record(self, level: str, raw: bytes) -> None:
        """A log record of this call: ``raw`` (UTF-8) cut to ``max_log_bytes``, and marked if it was cut."""
        limit = self.limits.max_log_bytes
        self.recorder.append(Kind.LOG, {"level": level, "message": raw[:limit].decode("utf-8", "ignore"),
                                        "truncated": int(len(raw) > limit)})

    def remaining_ms(self) -> int:
        """What is left of this call's wall-clock deadline (``wall_time_ms``), in ms, at least 0."""
        return max(0, self.limits.wall_time_ms - int((time.monotonic() - self._started) * 1000))

    def ran_out(self, what: str) -> CallFailed:
        """What a host function raises when the supervisor's ``timeout`` answer came because this call's own
        wall time ran out while it waited on ``what``: the call ends at its deadline (status ``deadline``), as
        one interrupted there does, and the guest never sees ``timeout`` (``docs/capabilities.md``). The
        answer is recorded all the same: it is the supervisor's."""
        return CallFailed("deadline", f"wall_time_ms ({self.limits.wall_time_ms} ms) ran out while waiting on {what}")

    def count(self, what: str, limit: int, refusal: str) -> None:
        """Count one ``what`` in this call; past ``limit``, refuse with ``refusal`` (the call fails, host-limit)."""
        n = self._counts[what] = self._counts.get(what, 0) + 1
        if n > limit:
            raise HostLimit(refusal)

    def count_host_call(self) -> None:
        limit = self.limits.max_host_calls_per_call
        self.count("host-call", limit, f"more than {limit} host calls in one call (max_host_calls_per_call)")

    def value(self, interface: str, function: str, data_in: bytes, make: Callable[[], bytes]) -> bytes:
        """A value from outside for the guest: ``make()`` gives it (as its recorded bytes), and it is counted
        and recorded before the guest sees it. A replay (``worker/replay.py``) gives the recorded bytes instead."""
        data_out = make()
        self.record(interface, function, data_in, data_out)
        return data_out

    def record(self, interface: str, function: str, data_in: bytes, data_out: bytes) -> None:
        """Count a host call and record what it handed to the guest (``interface`` as recorded: WIT name and version)."""
        self.count_host_call()
        self.recorder.append(
            Kind.HOST_CALL, {"interface": interface, "function": function, "input": data_in, "output": data_out},
        )

    def ask(self, capability: str, body: dict[str, Any], data: bytes | None = None,
            wait_ms: int = 0) -> tuple[dict[str, Any], bytes | None]:
        """A host request to the supervisor: ``body`` is ``{"op": <function>, …arguments}``, ``data`` any
        bytes beside it; ``wait_ms`` how long the supervisor may take on purpose (a messaging call).

        Counted before it is sent; once answered, recorded as one ``host-call``
        record (function ``op``; input the arguments, output the answer, each as
        ``wire.host_call_bytes``) before the guest sees the answer.
        """
        self.count_host_call()
        answer, answer_data = self._ask(capability, body, data, wait_ms + ASK_WAIT_MS)
        args = {key: value for key, value in body.items() if key != "op"}
        self.recorder.append(Kind.HOST_CALL, {
            "interface": CAPABILITIES[capability].interface, "function": str(body["op"]),
            "input": wire.host_call_bytes(args, data), "output": wire.host_call_bytes(answer, answer_data),
        })
        return answer, answer_data


def guest_text(text: object, what: str, limit: int) -> str:
    """A guest-supplied string of at most ``limit`` UTF-8 bytes, or the call fails (host-limit)."""
    if not isinstance(text, str):
        raise HostLimit(f"{what} is not a string")
    if len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit:
        raise HostLimit(f"{what} is more than {limit} bytes")
    return text


def guest_bytes(text: object, what: str, limit: int) -> bytes:
    """A guest-supplied ``bytes`` value (see wit/agent.wit) of at most ``limit`` bytes, or the call fails."""
    if not isinstance(text, str):
        raise HostLimit(f"{what} is not bytes")
    if len(text) > limit:
        raise HostLimit(f"{what} of {len(text)} bytes is more than {limit}")
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise HostLimit(f"{what} has character U+{ord(text[exc.start]):04X}, outside U+0000..U+00FF") from None
