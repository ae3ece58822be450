"""Readable renderings of records, for the CLI and for auditors' tools."""

from __future__ import annotations

import time
import uuid
from typing import Any

from .exits import exit_text
from .records import Kind, Record

__all__ = ["describe", "one_line"]

_PREVIEW = 60


def _preview(data: bytes | None) -> str | None:
    if data is None:
        return None
    text = data[:_PREVIEW].decode("latin-1")
    shown = "".join(c if c.isprintable() and ord(c) < 0x7F else "." for c in text)
    return shown + ("…" if len(data) > _PREVIEW else "")


def describe(record: Record) -> dict[str, Any]:
    """A JSON-able view of a record: header fields plus its decoded payload (bytes as hex)."""
    fields = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in record.fields().items()}
    return {
        "seq": record.seq,
        "kind": record.kind.name.lower().replace("_", "-"),
        "signer": record.signer.name.lower(),
        "agent_id": record.agent_uuid,
        "time_ns": record.time_ns,
        "hash": record.hash.hex(),
        "prev_hash": record.prev_hash.hex(),
        "state_hash": record.state_hash.hex(),
        "fields": fields,
    }


def one_line(record: Record) -> str:
    f = record.fields()
    stamp = time.strftime("%H:%M:%S", time.localtime(record.time_ns / 1e9)) + f".{record.time_ns // 1_000_000 % 1000:03d}"
    kind = record.kind.name.lower().replace("_", "-")
    if record.kind is Kind.GENESIS:
        detail = f"name={f['name']} component={f['component_sha256'].hex()[:12]}"
    elif record.kind is Kind.WORKER_KEY:
        detail = f"incarnation={f['incarnation']} after: {f['reason']}"
    elif record.kind is Kind.INIT:
        detail = f"status={f['status']} fuel={f['fuel']}" + (f" error={f['error']!r}" if f["error"] else "")
    elif record.kind is Kind.HANDLE:
        detail = f"message={_preview(f['message'])!r} reply={_preview(f['reply'])!r} status={f['status']} fuel={f['fuel']}"
        if f["error"]:
            detail += f" error={f['error'][:120]!r}"
    elif record.kind is Kind.MESSAGE:
        sender = str(uuid.UUID(bytes=f["sender"])) if len(f["sender"]) == 16 else f["sender"].hex()
        detail = (f"{f['origin']} from={sender[:8]} message={_preview(f['message'])!r} reply={_preview(f['reply'])!r} "
                  f"status={f['status']} fuel={f['fuel']}")
        if f["error"]:
            detail += f" error={f['error'][:120]!r}"
    elif record.kind is Kind.HOST_CALL:
        detail = f"{f['function']} -> {_preview(f['output'])!r}"
    elif record.kind is Kind.LOG:
        detail = f"[{f['level']}] {f['message']}" + (" (truncated)" if f["truncated"] else "")
    elif record.kind in (Kind.EXIT, Kind.NODE_GIVE_UP, Kind.NODE_TERMINATE):
        detail = (f"{f['child']} " if "child" in f else "") + exit_text(f["reason"], f["detail"])
    elif record.kind is Kind.NODE_GENESIS:
        detail = f"name={f['name']} parent={f['parent'] or '-'} config={f['config']}"
    elif record.kind is Kind.NODE_RESTART:
        detail = (f"{f['child']} {f['reason']}; {f['strategy']}: stop [{f['stop']}] start [{f['start']}]"
                  + (" (again: a start failed)" if f["retry"] == "yes" else ""))
    else:
        detail = f"{f['reason']}"
    return f"#{record.seq:<5} {stamp} {kind:<10} {_shown(detail)}"


def _shown(text: str) -> str:
    """``text`` on one line, as written: an agent's log, exit detail or name could otherwise print a line of
    its own (a newline and a record of its making), or drive the terminal (escape sequences, carriage returns,
    bidirectional overrides). What is not printable is written as its Python escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
