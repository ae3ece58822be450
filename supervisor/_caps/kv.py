"""`theater:agent/kv`: each agent's own key-value store, in the event store's database.

Keys are opaque strings: they are SQLite values, never file names. A call's
writes are held beside the call (``Effects.kv``) and read back by the same
call; they reach the database in the transaction that commits the call's
records, and only if the call succeeded, so a call that fails leaves no write
behind. Every answer is a recorded host call, so a replay reads exactly what
the call read. Quotas (``[kv]``) count the committed keys and values plus the
call's own writes.
"""

from __future__ import annotations

from theater import wire

from .._host import Answer, HostCall
from .._store import EventStore
from .._tenants import Tenants
from .grants import KvGrant

__all__ = ["Kv"]


class Kv:
    def __init__(self, store: EventStore, tenants: Tenants | None = None) -> None:
        self.store = store
        self.tenants = tenants

    def host_request(self, call: HostCall) -> Answer:
        key = call.args.get("key", call.args.get("prefix"))
        if not isinstance(key, str) or not _utf8(key):
            return Answer({"ok": False, "error": "a key is a string of Unicode scalar values"})
        grant: KvGrant = call.agent.config.grant("kv")
        if len(key.encode()) > grant.max_key_bytes:
            return Answer({"ok": False, "error": f"a key of more than max_key_bytes ({grant.max_key_bytes}) bytes"})
        agent, effects = call.agent, call.pending.effects
        writes = effects.kv
        if call.op == "get":
            value = writes[key] if key in writes else self.store.kv_get(agent.id, key)
            return Answer({"ok": True, "found": value is not None}, value)
        if call.op in ("set", "delete"):
            value = (call.data or b"") if call.op == "set" else None
            if value is not None and len(value) > grant.max_value_bytes:
                return Answer({"ok": False, "error": f"a value of {len(value)} bytes is more than max_value_bytes "
                                                     f"({grant.max_value_bytes})"})
            count, total = effects.kv_usage if effects.kv_usage is not None else self.store.kv_usage(agent.id)
            before = (_size(key, v) if (v := writes[key]) is not None else None) if key in writes \
                else self.store.kv_size(agent.id, key)
            if before is not None:
                count, total = count - 1, total - before
            if value is not None:
                count, total = count + 1, total + _size(key, value)
                if count > grant.max_keys:
                    return Answer({"ok": False, "error": f"more than max_keys ({grant.max_keys}) keys"})
                if total > grant.max_total_bytes:
                    return Answer({"ok": False, "error": f"{total} bytes of keys and values, more than "
                                                         f"max_total_bytes ({grant.max_total_bytes})"})
                quota = self.tenants.check_kv(agent, total) if self.tenants is not None else None
                if quota is not None:
                    return Answer({"ok": False, "error": quota})
            writes[key] = value
            effects.kv_usage = (count, total)
            if call.op == "delete":
                return Answer({"ok": True, "existed": before is not None})
            return Answer({"ok": True})
        if call.op == "list-keys":
            keys = set(self.store.kv_keys(agent.id, key))
            for k, v in writes.items():
                if k.startswith(key):
                    (keys.add if v is not None else keys.discard)(k)
            listed = sorted(keys)
            return Answer({"ok": True, "count": len(listed)}, wire.encode_json({"keys": listed}))
        return Answer({"ok": False, "error": f"unknown kv operation {call.op!r}"})


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate, from JSON escapes: no guest string holds one
        return False
    return True


def _size(key: str, value: bytes) -> int:
    """What a key and its value count against max_total_bytes."""
    return len(key.encode()) + len(value)
