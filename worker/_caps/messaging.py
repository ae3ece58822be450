"""`theater:agent/messaging`: send to and call other agents, through the supervisor.

Each is a host request (interface ``messaging``); the message travels in the
request's data frame. Before asking, the worker refuses an address of more
than 256 bytes (UTF-8) and a message longer than this agent's own
``max_message_bytes``: the call fails with status ``host-limit`` naming the
value, and nothing is sent or recorded. A call waits for the supervisor's
answer for at most its timeout, cut to what is left of this call's wall-clock
deadline; when that deadline is what runs out, the call itself ends there
(status ``deadline``) and the guest never sees ``timeout``. The answer is
recorded, as every value handed to the guest is. An agent granted messaging
must export ``receive``: other agents' messages arrive through it.
"""

from __future__ import annotations

from typing import Any

from wasmtime import component as wc

from .._boundary import to_guest
from ._host import Host, HostCapability, Instance, guest_bytes, guest_text

MAX_ADDRESS_BYTES = 256
ERRORS = ("unknown-address", "denied", "not-running", "mailbox-full", "too-large", "timeout", "target-crashed",
          "guest-error", "cycle")


class Messaging:
    def __init__(self, host: Host) -> None:
        self._host = host

    def link(self, inst: Instance) -> None:
        inst.add_func("send", self.send)
        inst.add_func("call", self.call)

    def _message(self, fn: str, to: object, message: object) -> tuple[str, bytes]:
        address = guest_text(to, f"messaging.{fn}: the address", MAX_ADDRESS_BYTES)
        data = guest_bytes(message, f"messaging.{fn}: the message", self._host.limits.max_message_bytes)
        return address, data

    # wasmtime-py takes these results untagged, as the bare value of their case (None, a Record, or the
    # call-error's Variant): their sides differ in Python type. (A result whose ok side holds an option
    # could not carry an err at all: an option accepts any Python object. Hence `call-reply`.)
    def send(self, _store: Any, to: str, message: str) -> wc.Variant | None:
        address, data = self._message("send", to, message)
        answer, _ = self._host.ask(CAPABILITY.name, {"op": "send", "to": address}, data)
        return None if answer.get("ok") else _error(answer)

    def call(self, _store: Any, to: str, message: str, timeout_ms: int) -> wc.Record | wc.Variant:
        address, data = self._message("call", to, message)
        wait = min(timeout_ms, self._host.remaining_ms())
        answer, reply = self._host.ask(CAPABILITY.name, {"op": "call", "to": address, "timeout_ms": wait}, data,
                                       wait_ms=wait)
        if not answer.get("ok"):
            if answer.get("error") == "timeout" and wait < timeout_ms:  # the wait was cut: the call's time is up
                raise self._host.ran_out("messaging.call")
            return _error(answer)
        answered = wc.Record()
        answered.reply = None if reply is None else to_guest(reply)  # type: ignore[attr-defined]
        return answered


def _error(answer: dict[str, Any]) -> wc.Variant:
    case = answer.get("error")
    return wc.Variant(case if case in ERRORS else "denied", str(answer.get("detail", "")))


# The declaration worker._caps registers: granted by policy; the guest must export receive.
CAPABILITY = HostCapability(
    "messaging",
    Messaging,
    exports={"receive": "func(state: string, sender: string, message: string) -> "
                        "result<record{state: string, reply: option<string>}, string>"},
)
