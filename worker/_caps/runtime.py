"""`theater:agent/runtime`: log, self-id, now, random-bytes, finish, shutdown. Always granted, always recorded."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from .._boundary import to_guest
from .._errors import HostLimit
from ._host import Host, HostCapability, Instance

LEVELS = ("debug", "info", "warn", "error")
MAX_SHUTDOWN_DETAIL = 256


class Runtime:
    """Every value handed in is recorded; log lines are counted per call against ``max_logs_per_call``."""

    def __init__(self, host: Host) -> None:
        self._host = host
        self._limits = host.limits

    def link(self, inst: Instance) -> None:
        inst.add_func("log", self.log)
        inst.add_func("self-id", self.self_id)
        inst.add_func("now", self.now)
        inst.add_func("random-bytes", self.random_bytes)
        inst.add_func("finish", self.finish)
        inst.add_func("shutdown", self.shutdown)

    def _value(self, function: str, data_in: bytes, make: Callable[[], bytes]) -> bytes:
        return self._host.value(INTERFACE, function, data_in, make)

    def log(self, _store: Any, level: str, message: str) -> None:
        lines = self._limits.max_logs_per_call
        self._host.count("log", lines, f"more than {lines} log lines in one call (max_logs_per_call)")
        self._host.log_record(level if level in LEVELS else "info", message.encode("utf-8", "surrogatepass"))

    def self_id(self, _store: Any) -> str:
        return self._value("self-id", b"", self._host.agent_id.encode).decode()

    def now(self, _store: Any) -> int:
        return int.from_bytes(self._value("now", b"", lambda: time.time_ns().to_bytes(8, "big")), "big")

    def finish(self, _store: Any) -> None:
        """Recorded; the supervisor ends the agent normally once this call is committed."""
        self._value("finish", b"", bytes)
        self._host.ending = True

    def shutdown(self, _store: Any, detail: str) -> None:
        """Recorded; the supervisor ends the agent with reason `shutdown` and this detail once the call is committed."""
        if len(detail) > MAX_SHUTDOWN_DETAIL:
            raise HostLimit(f"runtime.shutdown: the detail is at most {MAX_SHUTDOWN_DETAIL} characters")
        self._value("shutdown", detail.encode("utf-8", "surrogatepass"), bytes)
        self._host.ending = True

    def random_bytes(self, _store: Any, length: int) -> str:
        if length > self._limits.max_random_bytes:
            raise HostLimit(f"random-bytes({length}) exceeds max_random_bytes {self._limits.max_random_bytes}")
        return to_guest(self._value("random-bytes", length.to_bytes(4, "big"), lambda: os.urandom(length)))


# The declaration worker._caps registers: always granted (theater.capabilities), no export required.
CAPABILITY = HostCapability("runtime", Runtime)
INTERFACE = CAPABILITY.interface
