"""`theater:agent/timers`: messages this agent sends itself later, kept by the supervisor.

Each function is a host request (interface ``timers``); the message travels in
the data frame. A message longer than this agent's ``max_message_bytes`` is
refused before asking: the call fails with status ``host-limit``. A due
timer's message arrives through ``handle``.
"""

from __future__ import annotations

from typing import Any

from ._host import Host, HostCapability, Instance, guest_bytes


class Timers:
    def __init__(self, host: Host) -> None:
        self._host = host

    def link(self, inst: Instance) -> None:
        inst.add_func("after", self.after)
        inst.add_func("cancel", self.cancel)

    def after(self, _store: Any, delay_ms: int, message: str) -> int | str:
        """result<u64, string>: wasmtime-py takes it untagged (the id for ok, the error text for err)."""
        data = guest_bytes(message, "timers.after: the message", self._host.limits.max_message_bytes)
        answer, _ = self._host.ask(CAPABILITY.name, {"op": "after", "delay_ms": delay_ms}, data)
        if answer.get("ok"):
            return int(answer["id"])
        return str(answer.get("error", "refused"))

    def cancel(self, _store: Any, timer_id: int) -> bool:
        answer, _ = self._host.ask(CAPABILITY.name, {"op": "cancel", "id": timer_id})
        return bool(answer.get("cancelled"))


# The declaration worker._caps registers: granted by policy, no export required.
CAPABILITY = HostCapability("timers", Timers)
