"""`theater:agent/supervision`: spawn, stop and list the agent's own children.

The worker cannot answer these alone: each is a HOST_REQUEST to the supervisor,
which acts only on this agent's children and answers with HOST_REPLY. The
answer is recorded, as every value handed to the guest is.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from wasmtime import component as wc

from theater import wire
from theater.records import Kind

from .._errors import HostLimit
from .._recorder import Recorder

INTERFACE = "theater:agent/supervision@0.1.0"
CHILD_EXIT_EXPORT = ("child-exit", "func(state: string, child: string, reason: string) -> result<string, string>")
MAX_TEXT = 256

Ask = Callable[[dict[str, Any]], dict[str, Any]]


class Supervision:
    def __init__(self, recorder: Recorder, ask: Ask, count_host_call: Callable[[], None]) -> None:
        self._recorder = recorder
        self._ask = ask
        self._count = count_host_call

    def link(self, inst: wc.LinkerInstance) -> None:
        inst.add_func("spawn", self.spawn)
        inst.add_func("stop", self.stop)
        inst.add_func("children", self.children)

    def _call(self, function: str, body: dict[str, Any]) -> dict[str, Any]:
        self._count()
        answer = self._ask({"op": function, **body})
        self._recorder.append(Kind.HOST_CALL, {
            "interface": INTERFACE, "function": function,
            "input": wire.encode_json(body), "output": wire.encode_json(answer),
        })
        return answer

    def spawn(self, _store: Any, template: str, name: str, args: str) -> wc.Variant:
        if len(template) > MAX_TEXT or len(name) > MAX_TEXT:
            raise HostLimit("supervision.spawn: template and name are at most 256 characters")
        answer = self._call("spawn", {"template": template, "name": name, "args": args})
        if answer.get("ok"):
            return wc.Variant("ok", str(answer["id"]))
        return wc.Variant("err", str(answer.get("error", "refused")))

    def stop(self, _store: Any, child: str) -> str | None:
        if len(child) > MAX_TEXT:
            raise HostLimit("supervision.stop: a child id is at most 256 characters")
        answer = self._call("stop", {"child": child})
        return None if answer.get("ok") else str(answer.get("error", "refused"))

    def children(self, _store: Any) -> list[str]:
        answer = self._call("children", {})
        return [str(c) for c in answer.get("children", [])]


def exit_now() -> None:
    """The supervisor asked this worker to stop while it waited on a host request."""
    os._exit(0)
