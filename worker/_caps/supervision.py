"""`theater:agent/supervision`: spawn, stop and list the agent's own children.

The worker cannot answer these alone: each is a host request to the supervisor
(HOST_REQUEST with interface ``supervision``), which acts only on this agent's
children and answers with HOST_REPLY. The answer is recorded, as every value
handed to the guest is. An agent granted this capability must export
``child-exit``: the supervisor tells it through that export when a child exits.
"""

from __future__ import annotations

from typing import Any

from wasmtime import component as wc

from .._errors import HostLimit
from ._host import Host, HostCapability, Instance

MAX_TEXT = 256


class Supervision:
    def __init__(self, host: Host) -> None:
        self._host = host

    def link(self, inst: Instance) -> None:
        inst.add_func("spawn", self.spawn)
        inst.add_func("stop", self.stop)
        inst.add_func("children", self.children)
        inst.add_func("remove", self.remove)

    def _ask(self, op: str, **args: Any) -> dict[str, Any]:
        return self._host.ask(CAPABILITY.name, {"op": op, **args})[0]

    def spawn(self, _store: Any, template: str, name: str, args: str) -> wc.Variant:
        if len(template) > MAX_TEXT or len(name) > MAX_TEXT:
            raise HostLimit("supervision.spawn: template and name are at most 256 characters")
        answer = self._ask("spawn", template=template, name=name, args=args)
        if answer.get("ok"):
            return wc.Variant("ok", str(answer["id"]))
        return wc.Variant("err", str(answer.get("error", "refused")))

    def stop(self, _store: Any, child: str) -> str | None:
        if len(child) > MAX_TEXT:
            raise HostLimit("supervision.stop: a child id is at most 256 characters")
        answer = self._ask("stop", child=child)
        return None if answer.get("ok") else str(answer.get("error", "refused"))

    def remove(self, _store: Any, child: str) -> str | None:
        """result<_, string>: wasmtime-py takes it untagged (None for ok, the error text for err)."""
        if len(child) > MAX_TEXT:
            raise HostLimit("supervision.remove: a child id is at most 256 characters")
        answer = self._ask("remove", child=child)
        return None if answer.get("ok") else str(answer.get("error", "refused"))

    def children(self, _store: Any) -> list[str]:
        answer = self._ask("children")
        return [str(c) for c in answer.get("children", [])]


# The declaration worker._caps registers: granted by policy; the guest must export child-exit.
CAPABILITY = HostCapability(
    "supervision",
    Supervision,
    exports={"child-exit": "func(state: string, child: string, reason: string) -> result<string, string>"},
)
