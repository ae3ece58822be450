"""`theater top`: a live table of agents and what they use, refreshed in place (rich draws it)."""

from __future__ import annotations

import time
from typing import Any

from theater.client import Client

__all__ = ["run_top"]

_SORT_KEYS = {"cpu": "cpu_s", "memory": "rss_bytes", "fuel": "fuel", "calls": "calls", "name": "name"}


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def render(snapshot: dict[str, Any], sort: str) -> Any:
    from rich.console import Group
    from rich.table import Table

    key = _SORT_KEYS[sort]
    rows = sorted(snapshot["agents"], key=lambda r: r[key], reverse=key != "name")
    agents = Table(title=f"agents by {sort} — {time.strftime('%H:%M:%S', time.localtime(snapshot['time']))}",
                   expand=True)
    for column in ("NAME", "TENANT", "STATUS", "PID", "CPU s", "RSS MiB", "PEAK MiB", "FUEL", "CALLS", "MSGS",
                   "RECORDS", "RESTARTS", "MAILBOX"):
        agents.add_column(column, justify="left" if column in ("NAME", "TENANT", "STATUS") else "right")
    for r in rows:
        agents.add_row(r["name"], r["tenant"], r["status"], str(r["pid"] or "-"), f"{r['cpu_s']:.2f}",
                       _mib(r["rss_bytes"]), _mib(r["peak_rss_bytes"]), str(r["fuel"]), str(r["calls"]),
                       str(r["messages"]), str(r["records"]), str(r["restarts"]), str(r["mailbox"]))
    tenants = Table(title="tenants", expand=True)
    for column in ("TENANT", "AGENTS", "RUNNING", "CPU s", "RSS MiB", "GRANTED MiB", "FUEL", "CALLS", "RECORDS",
                   "DENIALS"):
        tenants.add_column(column, justify="left" if column == "TENANT" else "right")
    for t in snapshot["tenants"]:
        tenants.add_row(t["tenant"], str(t["agents"]), str(t["running"]), f"{t['cpu_s']:.2f}", _mib(t["rss_bytes"]),
                        _mib(t["memory_granted_bytes"]), str(t["fuel"]), str(t["calls"]), str(t["records"]),
                        str(t["denials"]))
    parts: list[Any] = [agents, tenants]
    sup = snapshot.get("supervisor")
    if sup:
        parts.append(f"supervisor pid {sup['pid']}: cpu {sup['cpu_s']:.2f} s, rss {_mib(sup['rss_bytes'])} MiB, "
                     f"{sup['records_total']} records in {sup['commits_total']} commits, "
                     f"{sup['spawns_total']} worker spawns, {sup['restarts_total']} restarts, "
                     f"{sup['refused_connections']} connections refused")
    return Group(*parts)


def run_top(client: Client, *, sort: str, interval: float) -> int:
    from rich.live import Live

    with Live(render(client.top(), sort), auto_refresh=False, screen=False) as live:
        try:
            while True:
                time.sleep(max(0.2, interval))
                live.update(render(client.top(), sort), refresh=True)
        except KeyboardInterrupt:
            return 0
