"""`theater:agent/kv`: this agent's key-value store, kept by the supervisor.

Each function is a host request (interface ``kv``); values travel in the data
frame. The supervisor holds the quotas and makes the writes durable with the
call; the worker only refuses what no policy could allow (keys of more than
1 KiB, values of more than 16 MiB) before asking.
"""

from __future__ import annotations

import json
from typing import Any

from .._boundary import to_guest
from ._host import Host, HostCapability, Instance, guest_bytes, guest_text

MAX_KEY_BYTES = 1024  # the largest max_key_bytes a policy may set
MAX_VALUE_BYTES = 16 * 1024 * 1024  # the largest max_value_bytes


class Kv:
    def __init__(self, host: Host) -> None:
        self._host = host

    def link(self, inst: Instance) -> None:
        inst.add_func("get", self.get)
        inst.add_func("set", self.set)
        inst.add_func("delete", self.delete)
        inst.add_func("list-keys", self.list_keys)

    def _ask(self, op: str, key: str, data: bytes | None = None, name: str = "key") -> tuple[dict[str, Any], bytes | None]:
        return self._host.ask(CAPABILITY.name, {"op": op, name: guest_text(key, f"kv.{op}: the {name}", MAX_KEY_BYTES)},
                              data)

    def get(self, _store: Any, key: str) -> str | None:
        answer, value = self._ask("get", key)
        return to_guest(value) if answer.get("found") and value is not None else None

    def set(self, _store: Any, key: str, value: str) -> str | None:
        """result<_, string>: wasmtime-py takes it untagged (None for ok, the error text for err)."""
        answer, _ = self._ask("set", key, guest_bytes(value, "kv.set: the value", MAX_VALUE_BYTES))
        return None if answer.get("ok") else str(answer.get("error", "refused"))

    def delete(self, _store: Any, key: str) -> bool:
        answer, _ = self._ask("delete", key)
        return bool(answer.get("existed"))

    def list_keys(self, _store: Any, prefix: str) -> list[str]:
        answer, data = self._ask("list-keys", prefix, name="prefix")
        if not answer.get("ok") or data is None:
            return []
        return [str(k) for k in json.loads(data)["keys"]]


# The declaration worker._caps registers: granted by policy, no export required.
CAPABILITY = HostCapability("kv", Kv)
