"""Replay an agent's chain: run its component again on exactly what the chain records, and compare.

Every value that reached the guest from outside is in the chain: the message
or call that started each call, and each host call's answer (the clock,
randomness, another agent's reply, a key-value read, an HTTP response). A
replay runs the same component under the same limits with a host that answers
every host call from the chain instead of the world — nothing is asked of a
supervisor, another agent, a store or a network — and checks that the guest
asks for exactly what the chain says it asked, in order, and writes exactly
the records the chain holds: the same logs, the same outcome, reply, fuel and
state hash. Instances live as they did: a fresh one for each worker
(`genesis`, `worker-key`) and after each failed call. The first difference is
reported with its record's sequence number, and the replay stops there.

A replay may start from a state snapshot instead of the genesis (``theater
replay --from``, or a chain compacted by ``theater gc``): the records are the
genesis and those after the snapshot, and the config's ``replay_start`` holds
the snapshot's record number and state. The instance is then a fresh one,
which the agent's worker at that point was not: a guest that carries
anything between calls in its instance's memory, beyond its state, can replay
differently from a snapshot than from the start of a worker.

Run as ``python -m worker.replay``: the component and the records come on
stdin (``theater replay`` writes them: ``theater/replay.py``), the process
confines itself as a worker does before it runs any guest code, and the report
is one JSON object on stdout. Exit status 0: the chain replays exactly; 1: it
diverges; 2: it could not be replayed.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from theater import wire
from theater.capabilities import CAPABILITIES
from theater.records import Kind, Record, sha256
from theater.replay import decode_input
from theater.spec import Limits

from ._caps import Host, language_runtime, link_granted
from ._engine import AGENT_EXPORTS, Sandbox, compile_component, make_engine, read_component
from ._errors import HostLimit, LoadError

__all__ = ["Report", "replay"]

FINAL_KINDS = (Kind.INIT, Kind.HANDLE, Kind.CHILD_EXIT, Kind.MESSAGE)
NO_ANSWER = "the supervisor did not answer a host request in time"  # what a live worker says when none came


@dataclass
class Report:
    calls: int = 0  # calls replayed (final records reached)
    records: int = 0  # records of the chain read
    diverged_at: int | None = None  # the sequence number of the first record that differs
    divergence: str = ""

    @property
    def ok(self) -> bool:
        return self.diverged_at is None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


class _Collector:
    """Stands where the worker's recorder stands: it keeps what a replayed call writes, unsigned."""

    def __init__(self) -> None:
        self.written: list[tuple[Kind, dict[str, Any], bytes | None]] = []

    def append(self, kind: Kind, fields: dict[str, Any], *, new_state: bytes | None = None) -> None:
        self.written.append((kind, fields, None if new_state is None else sha256(new_state)))

    def take(self) -> list[bytes]:
        return []


class _ReplayHost(Host):
    """Answers every host call from the chain's host-call records of the call being replayed."""

    def __init__(self, collector: _Collector, limits: Limits, agent_id: str) -> None:
        super().__init__(collector, limits, agent_id, ask=_never)  # type: ignore[arg-type]
        self.expected: deque[Record] = deque()
        self.divergence: tuple[int, str] | None = None

    def expect(self, records: list[Record]) -> None:
        self.expected = deque(r for r in records if r.kind is Kind.HOST_CALL)
        self.divergence = None

    def _next(self, interface: str, function: str, data_in: bytes) -> dict[str, Any] | None:
        self.count_host_call()  # the same limit the live call met, before anything is answered
        if not self.expected:
            return None
        record = self.expected.popleft()
        f = record.fields()
        if (f["interface"], f["function"], f["input"]) != (interface, function, data_in):
            self.divergence = (record.seq, f"the guest asked {interface} {function} with {data_in[:64]!r}; the "
                                           f"chain records {f['interface']} {f['function']} with {f['input'][:64]!r}")
            raise HostLimit("replay: the guest asked for something else than the chain records")
        self.recorder.append(Kind.HOST_CALL, dict(f))
        return f

    def value(self, interface: str, function: str, data_in: bytes, make: Any) -> bytes:
        f = self._next(interface, function, data_in)
        if f is None:
            self.divergence = (-1, f"the guest asked {interface} {function}, which the chain does not record")
            raise HostLimit("replay: the guest asked for more than the chain records")
        return bytes(f["output"])

    def ask(self, capability: str, body: dict[str, Any], data: bytes | None = None,
            wait_ms: int = 0) -> tuple[dict[str, Any], bytes | None]:
        args = {key: value for key, value in body.items() if key != "op"}
        f = self._next(CAPABILITIES[capability].interface, str(body["op"]), wire.host_call_bytes(args, data))
        if f is None:  # live, this request went unanswered and the call failed so
            raise HostLimit(NO_ANSWER)
        head, sep, tail = bytes(f["output"]).partition(b"\0")
        return json.loads(head), (tail if sep else None)


def _never(*_: Any) -> Any:
    raise AssertionError("a replay never asks a supervisor")


def _call_of(final: Record) -> wire.Call:
    """The call a final record answers, rebuilt from what the record repeats of it."""
    f = final.fields()
    if final.kind is Kind.INIT:
        return wire.Call(final.seq, wire.CallKind.INIT, f["args"])
    if final.kind is Kind.HANDLE:
        return wire.Call(final.seq, wire.CallKind.HANDLE, f["message"])
    if final.kind is Kind.CHILD_EXIT:
        return wire.Call(final.seq, wire.CallKind.CHILD_EXIT, wire.encode_child_exit(f["child"], f["exit_hash"], f["reason"]))
    origin = {o.label: o for o in wire.Origin}[f["origin"]]
    return wire.Call(final.seq, wire.CallKind.MESSAGE, wire.encode_message(origin, f["sender"], f["message_id"], f["message"]))


class _Replayer:
    def __init__(self, component: bytes, config: dict[str, Any], agent_id: str) -> None:
        from ._loop import Agent  # the worker's own call path, run unchanged

        self.limits = Limits.from_dict(config["limits"])
        self.collector = _Collector()
        self.host = _ReplayHost(self.collector, self.limits, agent_id)
        self.interfaces, required = link_granted(config["capabilities"], self.host)
        self.exports = {**AGENT_EXPORTS, **required}
        self.engine = make_engine(self.limits)
        self.component = compile_component(self.engine, component)
        self.agent = Agent.__new__(Agent)
        self.agent.limits = self.limits
        self.agent.recorder = self.collector  # type: ignore[assignment]
        self.agent.host = self.host
        self.agent.state = b""
        # Made once, before the process locks itself down (a sandbox starts its deadline thread).
        helpers = [read_component(h["path"], h["sha256"]) for h in config.get("helpers", [])]  # a composed agent
        self.agent.sandbox = Sandbox(self.engine, self.component, self.limits, self.interfaces, self.exports,
                                     language_runtime(self.host).linker_for, helpers)

    def new_worker(self) -> None:
        """A fresh instance, as a new worker has: nothing of the last one's memory carries over."""
        self.agent.sandbox.discard_instance()

    def call(self, before: list[Record], final: Record) -> tuple[int, str] | None:
        """Replay one call; the first difference from the chain, if any: (record seq, what)."""
        self.host.expect(before)
        self.collector.written = []
        self.agent.run(_call_of(final))
        if self.host.divergence is not None and self.host.divergence[0] >= 0:
            return self.host.divergence
        recorded = [*before, final]
        for i, (kind, fields, state_hash) in enumerate(self.collector.written):
            if i >= len(recorded):
                return final.seq, f"the replayed call writes more records than the chain holds ({_kind(kind)})"
            r = recorded[i]
            if kind is not r.kind:
                return r.seq, f"the replay writes {_kind(kind)} where the chain holds {_kind(r.kind)}"
            want = r.fields()
            diff = sorted(k for k in want if fields.get(k) != want[k])
            if diff:
                k = diff[0]
                return r.seq, f"{_kind(r.kind)} field {k}: the replay gives {_show(fields.get(k))}, the chain " \
                              f"holds {_show(want[k])}"
            if r is final and want["status"] == "ok" and state_hash is not None and state_hash != r.state_hash:
                return r.seq, "the state the replay computes does not hash to the record's state hash"
        if len(self.collector.written) < len(recorded):
            r = recorded[len(self.collector.written)]
            return r.seq, f"the chain holds a {_kind(r.kind)} record the replayed call does not write"
        if self.host.divergence is not None:
            return final.seq, self.host.divergence[1]
        return None


def _kind(kind: Kind) -> str:
    """A kind as records and the docs name it: `host-call`, not `host_call`."""
    return kind.name.lower().replace("_", "-")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def replay(records: list[Record], component: bytes, config: dict[str, Any],
           lock_down: Callable[[Limits], None] | None = None) -> Report:
    """Replay an agent's whole chain (verified by the caller) with its component and genesis config.
    ``lock_down`` confines the process once the component is compiled, before any guest code runs."""
    report = Report()
    if not records or records[0].kind is not Kind.GENESIS:
        report.diverged_at, report.divergence = 0, "the chain does not start with an agent's genesis"
        return report
    replayer = _Replayer(component, config, str(uuid.UUID(bytes=records[0].agent_id)))
    if lock_down is not None:
        lock_down(replayer.limits)
    start = config.get("replay_start")  # replaying from a snapshot: the state after record start["seq"]
    pending: list[Record] = []
    for record in records:
        report.records += 1
        kind = record.kind
        if start is not None and record.seq == start["seq"] + 1:
            replayer.agent.state = bytes.fromhex(start["state"])
        if kind is Kind.WORKER_KEY:
            replayer.new_worker()
            pending = []
        elif kind is Kind.STATE_RESET:
            replayer.agent.state = b""
        elif kind in (Kind.HOST_CALL, Kind.LOG):
            pending.append(record)
        elif kind in FINAL_KINDS:
            report.calls += 1
            found = replayer.call(pending, record)
            pending = []
            if found is not None:
                report.diverged_at, report.divergence = found
                return report
    return report


# --- the process `theater replay` runs -------------------------------------------------------------


def main() -> int:
    from ._harden import harden_before_connect, lock_down

    try:
        config, component, raws = decode_input(sys.stdin.buffer.read())
        if sha256(component).hex() != config["component_sha256"]:
            raise LoadError("the component is not the one the chain's genesis names (its SHA-256 differs)")
        records = [Record.parse(raw) for raw in raws]
        # Confined as a worker is before the guest's first instruction: no new privileges, the worker's
        # resource limits, and (once the component is compiled) its system-call allowlist.
        harden_before_connect(os.getppid(), "ipc:///nonexistent", frozenset({"rlimits", "no_new_privs", "seccomp"}))
        report = replay(records, component, config, lock_down)
    except (LoadError, ValueError, KeyError) as exc:
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 2
    print(json.dumps(report.as_dict()), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
