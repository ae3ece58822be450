"""What agents and tenants use, as `theater top`, `theater usage` and the Prometheus endpoint show it.

Counts come from what was committed (calls, messages, fuel, records and their
bytes: the same figures an auditor recounts from the chains); CPU time and
memory come from the kernel (a live worker's /proc, a reaped worker's wait4
rusage, kept in the store's ``worker_usage``).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from theater.records import Kind, Record

from ._config import OPERATOR
from ._errors import StoreError
from ._store import USAGE_COUNTS, EventStore
from ._tenants import Tenants
from ._timers import Timers

if TYPE_CHECKING:
    from ._agent import Agent, Agents, AgentUsage
    from ._scope import Scope
    from ._spawner import WorkerProcess

__all__ = ["MetricsServer", "Usage"]

_FUELLED = (Kind.INIT, Kind.HANDLE, Kind.MESSAGE, Kind.CHILD_EXIT)
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _proc(pid: int) -> tuple[int, int, int]:
    """A live worker's (CPU ns, resident bytes, peak resident bytes) from /proc; zeros once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) * 10**9 // _CLOCK_TICKS
        rss = int(fields[21]) * _PAGE
        peak = rss
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    peak = int(line.split()[1]) * 1024
                    break
        return cpu, rss, peak
    except (OSError, IndexError, ValueError):
        return 0, 0, 0


# `top` and the /metrics snapshot show each live worker's CPU and memory from /proc, two files costing
# ≈ 40 µs a worker: read all at once, 3,000 workers held the loop for ≈ 115 ms. While anyone watches (a
# `top` or a snapshot in the last WATCH_S), a slice of the workers is read each PROC_TICK_S instead, sized for
# a round of about PROC_ROUND_S: the figures are at most about that old, and no turn of the loop holds more
# than a slice. (A fixed 64 a tick read 1,000 workers three times a second: with --metrics, an idle loop
# was busy 11 % of the time.)
PROC_TICK_S = 0.02
PROC_ROUND_S = 1.0
PROC_MIN_SLICE = 8
WATCH_S = 10.0
# Agents whose rows one loop turn adds to the /metrics snapshot: made at once, the snapshot of 1,000 agents
# held the loop for 11-16 ms every second; in slices, no idle turn took more than 5.5 ms (measured).
SNAPSHOT_SLICE = 200


class Collections:
    """The supervisor's garbage collections, each a pause of its loop: a full one scans every object the
    agents hold (8-15 ms at 2,000 agents), and every reply due meanwhile waits."""

    def __init__(self) -> None:
        self.full = 0
        self.ns = 0  # time spent in collections of any generation
        self._started = 0
        gc.callbacks.append(self._observe)

    def _observe(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter_ns()
            return
        self.ns += time.perf_counter_ns() - self._started
        if info["generation"] == 2:
            self.full += 1

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._observe)


class Usage:
    def __init__(self, store: EventStore, agents: Agents, tenants: Tenants, timers: Timers) -> None:
        self.store = store
        self.agents = agents
        self.tenants = tenants
        self.timers = timers
        self.started = time.time()
        self._samples: dict[WorkerProcess, tuple[int, int, int]] = {}  # live workers' last /proc figures
        self._round: deque[WorkerProcess] = deque()  # the workers still to read in this round
        self._per_tick = PROC_MIN_SLICE  # how many of them a tick reads
        self._watched_until = 0.0
        self._sampling = False
        # The supervisor's own figures.
        self.records_total = 0
        self.spawns_total = 0
        self.restarts_total = 0
        self.collections = Collections()
        # CPU of workers that ended before this supervisor started (the store's worker_usage, not its records).
        self._ended_cpu = {agent_id: cpu for agent_id, (cpu, _) in store.ended_workers(None, 0).items()}

    def of(self, agent: Agent) -> AgentUsage:
        if agent.id in self._ended_cpu:  # its workers before this supervisor started
            agent.usage.cpu_ns_ended += self._ended_cpu.pop(agent.id)
        return agent.usage

    # --- hooks ---------------------------------------------------------------------------

    def committed(self, agent: Agent, records: list[Record]) -> None:
        u = self.of(agent)
        size = fuel = 0
        for record in records:
            size += len(record.raw)
            if record.kind in _FUELLED:
                fuel += int(record.fields()["fuel"])
                if record.kind is Kind.HANDLE:
                    u.calls += 1
                elif record.kind is Kind.MESSAGE:
                    u.messages += 1
        u.records += len(records)
        u.record_bytes += size
        u.fuel += fuel
        self.records_total += len(records)
        self.tenants.committed(agent, size, fuel)

    def worker_ended(self, agent: Agent, cpu_ns: int, peak_rss: int) -> None:
        u = self.of(agent)
        u.cpu_ns_ended += cpu_ns
        u.peak_rss = max(u.peak_rss, peak_rss)
        if agent.in_store:
            with contextlib.suppress(StoreError):  # a full disk: the figure is lost, the supervisor is not
                self.store.add_worker_usage(agent.id, agent.config.tenant, cpu_ns, peak_rss)

    # --- views ---------------------------------------------------------------------------

    def _watch(self) -> None:
        self._watched_until = time.monotonic() + WATCH_S
        if not self._sampling:
            self._sampling = True
            self.timers.after(PROC_TICK_S, self._sample)

    def _sample(self) -> None:
        """Read the next slice of the live workers' /proc; stop (and forget) once no one has watched for a while."""
        if time.monotonic() > self._watched_until:
            self._sampling = False
            self._samples.clear()
            self._round.clear()
            return
        if not self._round:
            live = [a.worker for a in self.agents if a.worker is not None and not a.worker.exited
                    and not a.worker.pending]
            self._samples = {w: self._samples[w] for w in live if w in self._samples}  # the ended ones go
            self._round.extend(live)
            self._per_tick = max(PROC_MIN_SLICE, math.ceil(len(live) * PROC_TICK_S / PROC_ROUND_S))
        for _ in range(min(self._per_tick, len(self._round))):
            worker = self._round.popleft()
            if not worker.exited:
                self._samples[worker] = _proc(worker.pid)
        self.timers.after(PROC_TICK_S, self._sample)

    def _live(self, worker: WorkerProcess) -> tuple[int, int, int]:
        """A live worker's figures, as last sampled (read now if it has not been yet)."""
        sample = self._samples.get(worker)
        if sample is None:
            sample = self._samples[worker] = _proc(worker.pid)
        return sample

    def agent_row(self, agent: Agent) -> dict[str, Any]:
        u = self.of(agent)
        worker = agent.worker
        cpu = rss = peak = 0
        if worker is not None and not worker.exited and not worker.pending:
            cpu, rss, peak = self._live(worker)
        return {
            "name": agent.name, "id": agent.uuid, "tenant": agent.config.tenant, "status": str(agent.status),
            "pid": worker.pid if worker is not None and not worker.pending and not worker.exited else None,
            "cpu_s": round((u.cpu_ns_ended + cpu) / 1e9, 3), "rss_bytes": rss,
            "peak_rss_bytes": max(u.peak_rss, peak), "memory_limit_bytes": agent.config.limits.memory_bytes,
            "fuel": u.fuel, "calls": u.calls, "messages": u.messages, "records": u.records,
            "record_bytes": u.record_bytes, "restarts": agent.restart_count, "mailbox": agent.queued,
        }

    def top(self, scope: Scope) -> dict[str, Any]:
        self._watch()
        return self._snapshot(scope, [self.agent_row(a) for a in scope.agents()])

    def top_in_slices(self, scope: Scope, done: Callable[[dict[str, Any]], None]) -> None:
        """``top(scope)`` built SNAPSHOT_SLICE agents a loop turn, so that a large home's snapshot never holds
        the loop for long; ``done`` gets it once whole (its rows read within a few turns of each other)."""
        self._watch()
        agents = list(scope.agents())
        rows: list[dict[str, Any]] = []

        def step(start: int) -> None:
            rows.extend(self.agent_row(a) for a in agents[start:start + SNAPSHOT_SLICE])
            if start + SNAPSHOT_SLICE < len(agents):
                self.timers.after(0, lambda: step(start + SNAPSHOT_SLICE))
            else:
                done(self._snapshot(scope, rows))

        step(0)

    def _snapshot(self, scope: Scope, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {"time": time.time(), "agents": rows, "tenants": self._tenant_rows(rows),
                **({"supervisor": self.supervisor_row()} if scope.tenant == OPERATOR else {})}

    def _tenant_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for row in rows:
            t = out.setdefault(row["tenant"], {"tenant": row["tenant"], "agents": 0, "running": 0, "cpu_s": 0.0,
                                               "rss_bytes": 0, "memory_granted_bytes": 0, "fuel": 0, "calls": 0,
                                               "messages": 0, "records": 0, "record_bytes": 0, "restarts": 0,
                                               "mailbox": 0, "denials": self.tenants.denials(row["tenant"])})
            t["agents"] += 1
            if row["pid"] is not None:
                t["running"] += 1
                t["memory_granted_bytes"] += row["memory_limit_bytes"]
            for k in ("cpu_s", "rss_bytes", "fuel", "calls", "messages", "records", "record_bytes", "restarts",
                      "mailbox"):
                t[k] += row[k]
        for t in out.values():
            t["cpu_s"] = round(t["cpu_s"], 3)
        return sorted(out.values(), key=lambda t: t["tenant"])

    def supervisor_row(self) -> dict[str, Any]:
        cpu, rss, _ = _proc(os.getpid())
        return {"pid": os.getpid(), "uptime_s": round(time.time() - self.started, 3), "cpu_s": round(cpu / 1e9, 3),
                "rss_bytes": rss, "records_total": self.records_total, "commits_total": self.store.commits,
                "commit_seconds_total": round(self.store.commit_ns / 1e9, 6), "spawns_total": self.spawns_total,
                "restarts_total": self.restarts_total,
                "gc_full_collections_total": self.collections.full,
                "gc_seconds_total": round(self.collections.ns / 1e9, 6),
                "mailbox_total": sum(a.queued for a in self.agents), "timers": len(self.timers),
                "agents": len(self.agents), "running": sum(1 for a in self.agents if a.alive),
                "refused_connections": self.tenants.refused_connections}

    def report(self, tenant: str | None, since_ns: int) -> dict[str, Any]:
        """What a host bills by, from the store: per agent and in total, from ``since_ns`` on (CPU of
        workers still running is added whole, from the kernel)."""
        stored = self.store.usage(tenant, since_ns)
        names = {**self.store.owners(), **{a.id: (a.name, a.config.tenant) for a in self.agents}}
        agents = []
        for agent in self.agents:
            if tenant not in (None, agent.config.tenant) or agent.worker is None or agent.worker.pending \
                    or agent.worker.exited:
                continue
            cpu, _, peak = _proc(agent.worker.pid)
            u = stored.setdefault(agent.id, dict.fromkeys(USAGE_COUNTS, 0))
            u["cpu_ns"] += cpu
            u["peak_rss"] = max(u["peak_rss"], peak)
        total = dict.fromkeys(USAGE_COUNTS, 0)
        for agent_id, u in sorted(stored.items(), key=lambda kv: names.get(kv[0], ("", ""))[0]):
            name, owner = names.get(agent_id, ("?", "?"))
            agents.append({"id": agent_id.hex(), "name": name, "tenant": owner, **u})
            for k in USAGE_COUNTS:
                total[k] = max(total[k], u[k]) if k == "peak_rss" else total[k] + u[k]
        denials = self.store.denials(tenant, since_ns) if tenant not in (None, OPERATOR) else []
        return {"tenant": tenant, "since_ns": since_ns, "until_ns": time.time_ns(), "agents": agents,
                "total": total, "denials": len(denials)}


class MetricsServer:
    """``/metrics`` in Prometheus text format (the official client library), from a snapshot the loop makes
    every ``period`` seconds: the HTTP thread never touches the supervisor's live state."""

    def __init__(self, host: str, port: int, first: dict[str, Any]) -> None:
        from prometheus_client import start_http_server
        from prometheus_client.registry import CollectorRegistry

        self.latest = first
        self.lock = threading.Lock()
        self.making = False  # a snapshot is being made, a slice a loop turn
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        self.server, self.thread = start_http_server(port, addr=host, registry=registry)
        self.port = self.server.server_address[1]

    def publish(self, latest: dict[str, Any]) -> None:
        self.making = False
        with self.lock:
            self.latest = latest

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# name -> (help, type, key in an agent's or tenant's row); counters get _total from the client library.
_AGENT_SERIES = (
    ("cpu_seconds", "CPU seconds its workers used", "counter", "cpu_s"),
    ("memory_rss_bytes", "resident memory of its worker now", "gauge", "rss_bytes"),
    ("memory_peak_bytes", "peak resident memory of its workers", "gauge", "peak_rss_bytes"),
    ("fuel", "fuel its committed calls burned", "counter", "fuel"),
    ("calls", "calls from clients it committed", "counter", "calls"),
    ("messages", "messages from agents it committed", "counter", "messages"),
    ("records", "event records committed to its chain", "counter", "records"),
    ("record_bytes", "bytes of event records committed to its chain", "counter", "record_bytes"),
    ("restarts", "times it was restarted", "counter", "restarts"),
    ("mailbox_depth", "messages waiting in its mailbox", "gauge", "mailbox"),
)


_TENANT_SERIES = (
    *_AGENT_SERIES,
    ("denials", "requests refused", "counter", "denials"),
    ("agents", "agents it has", "gauge", "agents"),
    ("memory_granted_bytes", "memory granted to its running agents", "gauge", "memory_granted_bytes"),
)
_SUPERVISOR_SERIES = (
    ("records", "event records committed", "counter", "records_total"),
    ("commits", "durable store transactions", "counter", "commits_total"),
    ("commit_seconds", "time spent in durable store transactions", "counter", "commit_seconds_total"),
    ("worker_spawns", "workers started", "counter", "spawns_total"),
    ("restarts", "agent restarts by supervision", "counter", "restarts_total"),
    ("gc_full_collections", "full garbage collections of its heap (each pauses its loop)", "counter",
     "gc_full_collections_total"),
    ("gc_seconds", "time its loop spent in garbage collections", "counter", "gc_seconds_total"),
    ("mailbox_depth", "messages waiting in every mailbox", "gauge", "mailbox_total"),
    ("timers", "timers set in its loop (calls' timeouts, watchdogs, agents' timers), neither run nor cancelled",
     "gauge", "timers"),
    ("agents", "agents it knows", "gauge", "agents"),
    ("agents_running", "agents with a live worker", "gauge", "running"),
    ("refused_connections", "control connections refused at the handshake", "counter", "refused_connections"),
    ("cpu_seconds", "CPU seconds the supervisor used", "counter", "cpu_s"),
    ("memory_rss_bytes", "the supervisor's resident memory", "gauge", "rss_bytes"),
)
# Who a snapshot's rows are: (its key in the snapshot, series prefix, help prefix, series, (label, row key)...).
_SUBJECTS: tuple[tuple[str, str, str, tuple[tuple[str, str, str, str], ...], tuple[tuple[str, str], ...]], ...] = (
    ("agents", "agent", "Per agent", _AGENT_SERIES, (("agent", "name"), ("tenant", "tenant"))),
    ("tenants", "tenant", "Per tenant", _TENANT_SERIES, (("tenant", "tenant"),)),
    ("supervisor", "supervisor", "The supervisor", _SUPERVISOR_SERIES, ()),
)


class _Collector:
    def __init__(self, server: MetricsServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self.server.lock:
            snap = self.server.latest
        families: dict[str, Any] = {}
        for key, prefix, what, series, labels in _SUBJECTS:
            rows = snap[key] if isinstance(snap[key], list) else [snap[key]]
            for row in rows:
                for name, doc, kind, field in series:
                    if field not in row:  # a tenant has no peak: its agents' peaks are at different times
                        continue
                    full = f"theater_{prefix}_{name}"
                    if full not in families:
                        cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                        families[full] = cls(full, f"{what}: {doc}", labels=[label for label, _ in labels])
                    families[full].add_metric([row[k] for _, k in labels], row[field])
        yield from families.values()
