"""`theater:agent/runtime`: log, self-id, now, random-bytes. Always granted, always recorded."""

from __future__ import annotations

import os
import time
from typing import Any

from wasmtime import component as wc

from theater.records import Kind
from theater.spec import Limits

from .._boundary import to_guest
from .._errors import HostLimit
from .._recorder import Recorder

INTERFACE = "theater:agent/runtime@0.1.0"
LEVELS = ("debug", "info", "warn", "error")


class Runtime:
    """Per-call counters reset by :meth:`begin_call`; every value handed in is recorded."""

    def __init__(self, recorder: Recorder, limits: Limits, agent_id: str) -> None:
        self._recorder = recorder
        self._limits = limits
        self._agent_id = agent_id
        self._logs = 0
        self._host_calls = 0

    def begin_call(self) -> None:
        self._logs = 0
        self._host_calls = 0

    def link(self, inst: wc.LinkerInstance) -> None:
        inst.add_func("log", self.log)
        inst.add_func("self-id", self.self_id)
        inst.add_func("now", self.now)
        inst.add_func("random-bytes", self.random_bytes)
        inst.add_func("finish", self.finish)

    def count_host_call(self) -> None:
        """Every recorded host call, of any interface, counts against max_host_calls_per_call."""
        self._host_calls += 1
        if self._host_calls > self._limits.max_host_calls_per_call:
            raise HostLimit(
                f"more than {self._limits.max_host_calls_per_call} host calls in one call (max_host_calls_per_call)"
            )

    def _record(self, function: str, data_in: bytes, data_out: bytes) -> None:
        self.count_host_call()
        self._recorder.append(
            Kind.HOST_CALL,
            {"interface": INTERFACE, "function": function, "input": data_in, "output": data_out},
        )

    def log(self, _store: Any, level: str, message: str) -> None:
        self._logs += 1
        if self._logs > self._limits.max_logs_per_call:
            raise HostLimit(f"more than {self._limits.max_logs_per_call} log lines in one call (max_logs_per_call)")
        raw = message.encode("utf-8", "surrogatepass")
        limit = self._limits.max_log_bytes
        truncated = len(raw) > limit
        if truncated:
            raw = raw[:limit]
        text = raw.decode("utf-8", "ignore")
        self._recorder.append(Kind.LOG, {"level": level if level in LEVELS else "info", "message": text, "truncated": int(truncated)})

    def self_id(self, _store: Any) -> str:
        self._record("self-id", b"", self._agent_id.encode())
        return self._agent_id

    def now(self, _store: Any) -> int:
        value = time.time_ns()
        self._record("now", b"", value.to_bytes(8, "big"))
        return value

    def finish(self, _store: Any) -> None:
        """Recorded; the supervisor ends the agent normally once this call is committed."""
        self._record("finish", b"", b"")

    def random_bytes(self, _store: Any, length: int) -> str:
        if length > self._limits.max_random_bytes:
            raise HostLimit(f"random-bytes({length}) exceeds max_random_bytes {self._limits.max_random_bytes}")
        data = os.urandom(length)
        self._record("random-bytes", length.to_bytes(4, "big"), data)
        return to_guest(data)
