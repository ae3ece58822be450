"""Workers' lives as the supervisor sees them: start, hello, results, the mailbox, stops, violations, exits.

One ZeroMQ ROUTER socket for every worker and one pidfd per worker. A worker
is trusted with nothing: its hello must prove its key and pid, its results go
through the ledger's checks, anything malformed is a recorded violation and
the worker is killed. Its readiness and its exit go to the supervision
executor, which decides what happens next.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import select
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import zmq

from theater import wire
from theater.capabilities import CAPABILITIES, NOT_GRANTED
from theater.errors import ProtocolError, RecordError
from theater.exits import WorkerExit, crash_reason, exit_text
from theater.home import Home
from theater.records import MAX_RECORD_BYTES, Kind, Record, sha256, verify_hello
from theater.spec import AgentSpec

from ._agent import Agent, Agents, Pending
from ._config import AgentConfig, load_policy, policy_dirs
from ._errors import StoreError, Violation
from ._ledger import Checked, Prechecked, check_result, precheck, unrecorded_host_calls
from ._record_path import RecordPath, Result
from ._spawner import ZYGOTE_REPLY_TIMEOUT_S, LoadedSpare, Spawner, WorkerProcess, exit_reason
from ._supervision import PERMANENT_FAILURES, Status
from ._timers import Timers

if TYPE_CHECKING:
    from pathlib import Path

    from ._caps.effects import CallEffects
    from ._caps.timers import AgentTimers
    from ._control import Control
    from ._host import HostRequests
    from ._trees import Supervision
    from ._usage import Usage

__all__ = ["BATCH", "Workers"]

BATCH = 256  # messages taken from one socket per loop turn
HELLO_TIMEOUT_S = 20.0  # from the spawn, or from the end of the compile job its worker waited for
COMPILE_CHECK_S = 1.0  # how often a worker's hello deadline looks whether its compile job has ended
LAST_FRAMES_MS = 100  # how long a dead worker's last frame may trail its exit
FAULT_EXIT_S = 1.0  # a worker that sent a FAULT exits; one that has not by then is killed
WATCHDOG_GRACE_S = 5.0
# Calls sent to a worker and not yet answered: it starts the next one as soon as it has sent a result,
# instead of waiting for the supervisor's loop to read the result (and commit) and send the next. Measured
# with 10 busy agents (P3): 1 -> 7.0k records/s, 3 -> 8.1k, 5 -> 9.4k, 8 -> 10.4k, 16 -> 10.7k. At most this
# many messages (each within max_message_bytes) wait in a worker's socket.
PIPELINE_DEPTH = 8
LOAD_GRACE_S = 120.0  # more for a worker's first call: loading may compile components (about 1 s per 2 MB here)
RESULT_HEADER = wire.header(wire.WorkerType.RESULT)


# A new agent's genesis record waits at most this long for its init's result, to be committed with it (one
# durable commit per start instead of two); an init that takes longer has its genesis committed first.
GENESIS_COMMIT_S = 0.02
FDS_PER_AGENT = 2  # the supervisor's descriptors for one running agent: its worker's connection, its pidfd


class Workers:
    def __init__(self, home: Home, ctx: zmq.Context[zmq.Socket[bytes]], spawner: Spawner, agents: Agents,
                 records: RecordPath, timers: Timers, poller: zmq.Poller, log: Callable[..., None]) -> None:
        """``log(message, level=logging.INFO)``."""
        self.home = home
        self.spawner = spawner
        self.agents = agents
        self.records = records
        self.timers = timers
        self.poller = poller
        self.log = log
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.linger = 0
        self.socket.router_mandatory = True
        self.socket.maxmsgsize = MAX_RECORD_BYTES
        self.socket.bind(home.workers_endpoint)
        self.by_identity: dict[bytes, Agent] = {}
        self.by_token: dict[bytes, Agent] = {}
        self.by_pidfd: dict[int, Agent] = {}
        self.held: dict[int, tuple[Agent, WorkerProcess]] = {}  # pidfd -> a worker made ready ahead (prepare)
        self.preparing: set[Agent] = set()  # the agents with a worker made ready ahead
        # Every worker's pidfd, in one epoll set that the loop polls as one descriptor: a turn of the loop costs
        # the same with 3,000 workers as with one (zmq_poll over every pidfd took 70 µs a turn at 2,000).
        self.exits = select.epoll()
        self.poller.register(self.exits.fileno(), zmq.POLLIN)
        self.call_ids = itertools.count(1)
        self.ending: set[Agent] = set()  # reaped, waiting for a last frame that may trail the exit
        self._hellos: deque[tuple[bytes, list[bytes]]] = deque()  # handled one per turn, in order
        self._hellos_from: set[bytes] = set()  # the connections with a hello waiting there: one each
        self.zygote_fd: int | None = None  # the fork-server's socket, polled for its answers to spawns
        records.on_results = self._results_committed
        records.on_unstored = self._unstored
        # The parts a worker's outcomes go to; set by the supervisor once all parts exist.
        self.supervision: Supervision
        self.control: Control
        self.host: HostRequests
        self.effects: CallEffects
        self.agent_timers: AgentTimers
        self.usage: Usage
        self.running: Callable[[], bool] = lambda: True

    # --- start and hello ---------------------------------------------------------------------

    def start(self, agent: Agent) -> None:
        """Start the agent's worker: the one made ready ahead for it (``prepare``) if it has one."""
        agent.discard_results = False
        self.usage.spawns_total += 1
        worker, agent.prepared = agent.prepared, None
        parked, agent.parked = agent.parked, None  # its hello: taken with it, or dropped with it
        self.preparing.discard(agent)
        if worker is None or worker.exited or worker.kill_reason is not None:
            self._spawn(agent, ahead=False)
            return
        agent.worker = worker
        if not worker.pending:
            del self.held[worker.pidfd]
            self.by_pidfd[worker.pidfd] = agent
        if parked is not None:
            self._bind(agent, worker, parked)

    def prepare(self, agent: Agent) -> None:
        """Make a worker ready for ``agent`` before its start comes (the next child of a tree starting its
        children in order): spawned, its hello checked, and held there. Nothing of it is recorded and it is
        sent nothing until ``start`` takes it; ``unprepare`` ends it if the start is not coming."""
        if agent.worker is None and agent.prepared is None:
            self._spawn(agent, ahead=True)

    def unprepare(self, agent: Agent) -> None:
        worker, agent.prepared, agent.parked = agent.prepared, None, None
        self.preparing.discard(agent)
        if worker is not None:
            self.by_token.pop(worker.token, None)
            worker.kill("shutdown")  # reaped like any worker's end (or as the fork-server answers), unrecorded
            self.log(f"{agent.name}: the worker made ready ahead for it is ended: its start is not coming")

    def _spawn(self, agent: Agent, *, ahead: bool) -> None:
        worker = self.spawner.spawn_nowait(
            self.home.workers_endpoint, agent.incarnation + 1, self.home.logs / f"{agent.name}.log", self.home.workdir,
            agent.config,
        )
        if ahead:
            agent.prepared = worker
            self.preparing.add(agent)
        else:
            agent.worker = worker
        if worker.hello is not None:  # a loaded spare whose hello was checked before it was taken
            hello, worker.hello = worker.hello, None
            self._watch(agent, worker)
            self._sync_zygote_fd()
            if ahead:
                agent.parked = hello
            else:
                self._bind(agent, worker, hello)
            return
        self.by_token[worker.token] = agent
        if worker.pending:  # the fork-server answers in a later turn; its deadline is watched meanwhile
            self.timers.after(ZYGOTE_REPLY_TIMEOUT_S + 0.1, self.settle_spawns)
        else:
            self._watch(agent, worker)
        self._sync_zygote_fd()
        self.timers.after(HELLO_TIMEOUT_S, lambda: self._hello_timeout(agent, worker))

    def _watch(self, agent: Agent, worker: WorkerProcess) -> None:
        """Learn of the worker's end through its pidfd, in the epoll set the loop polls."""
        if worker is agent.prepared:
            self.held[worker.pidfd] = (agent, worker)
        else:
            self.by_pidfd[worker.pidfd] = agent
        self.exits.register(worker.pidfd, select.EPOLLIN)

    def reap_exited(self) -> None:
        """The epoll set is readable: take every worker whose pidfd says it has ended."""
        for fd, _ in self.exits.poll(0):
            if fd in self.held:
                self._held_ended(*self.held.pop(fd))
                continue
            agent = self.by_pidfd.get(fd)
            if agent is not None:
                self.on_exit(agent)

    def _held_ended(self, agent: Agent, worker: WorkerProcess) -> None:
        """A worker made ready ahead ended before its start (or was ended because the start is not coming):
        it had no agent yet, so there is nothing to record; the start, if it comes, spawns another."""
        self.exits.unregister(worker.pidfd)
        code = worker.reap()
        if agent.prepared is worker:
            agent.prepared = agent.parked = None
            self.preparing.discard(agent)
            self.by_token.pop(worker.token, None)
            self.log(f"{agent.name}: worker {worker.pid}, made ready ahead of its start, ended ({exit_reason(code)})")

    def settle_spawns(self, timeout: float = 0.0) -> None:
        """Take the fork-server's answers: each worker that now has a pid is watched."""
        for worker in self.spawner.settle(timeout):
            # Its token is forgotten once its hello is read, and a hello may come first (then _on_hello reads
            # the answer): the agent is found by its worker, or its worker made ready ahead.
            agent = self.by_token.get(worker.token) or next(
                (a for a in self.agents if worker is a.worker or worker is a.prepared), None)
            if agent is not None and (worker is agent.worker or worker is agent.prepared):
                self._watch(agent, worker)
            else:  # its agent no longer waits for it: end it
                self.log(f"worker {worker.pid}: no agent waits for it any more; ended")
                worker.kill("shutdown")
                with contextlib.suppress(ChildProcessError, OSError):
                    worker.reap()
        self._sync_zygote_fd()

    def _sync_zygote_fd(self) -> None:
        """Keep the current fork-server's socket in the poller (a replaced one has another)."""
        fd = self.spawner.fileno()
        if fd != self.zygote_fd:
            if self.zygote_fd is not None:
                with contextlib.suppress(KeyError, zmq.ZMQError):
                    self.poller.unregister(self.zygote_fd)
            if fd is not None:
                self.poller.register(fd, zmq.POLLIN)
            self.zygote_fd = fd

    def _next_hello(self) -> None:
        """Take the oldest hello waiting; the next waits for the next turn, so the calls of running agents
        are served between the durable commits of a crowd of new workers (a crash storm's restarts)."""
        identity, frames = self._hellos.popleft()
        self._hellos_from.discard(identity)
        if self._hellos:
            self.timers.after(0, self._next_hello)
        self._on_hello(identity, frames)

    def _hello_timeout(self, agent: Agent, worker: WorkerProcess) -> None:
        if (worker is agent.worker or worker is agent.prepared) and worker.identity is None and not worker.exited:
            # A worker forked while its component compiles waits for the job (whose own ceiling is CPU time)
            # before its hello: a first spawn of a large component on a busy machine takes longer than
            # HELLO_TIMEOUT_S, and was killed for it. The deadline starts once the job has ended.
            key = worker.compiling
            if key is not None:
                if key in self.spawner.cache.compiling:
                    self.timers.after(COMPILE_CHECK_S, lambda: self._hello_timeout(agent, worker))
                    return
                worker.compiling = None
                self.timers.after(HELLO_TIMEOUT_S, lambda: self._hello_timeout(agent, worker))
                return
            self.log(f"{agent.name}: worker {worker.pid} sent no hello in {HELLO_TIMEOUT_S}s; killing it")
            worker.kill("no-hello")

    def _on_hello(self, identity: bytes, frames: list[bytes]) -> None:
        known = self.by_identity.get(identity)
        if known is not None:  # bound while this one waited: a second hello, if the worker still holds it
            if known.worker is not None and known.worker.identity == identity:
                self.violation(known, "second hello on an established connection")
            return
        try:
            hello = wire.Hello.decode(frames)
        except ProtocolError as exc:
            self.log(f"dropping a malformed hello: {exc}")
            return
        agent = self.by_token.pop(hello.token, None)
        worker = next((w for w in (agent.worker, agent.prepared) if w is not None and w.token == hello.token),
                      None) if agent is not None else None
        if agent is None or worker is None:
            spare = self.spawner.loaded_spare(hello.token)
            if spare is None:
                self.log("dropping a hello with an unknown token")
            else:
                self._spare_hello(spare, identity, hello)
            return
        try:
            verify_hello(hello.worker_key, hello.token, hello.proof)
        except RecordError:
            worker.kill("bad-hello")
            self.log(f"{agent.name}: hello proof does not verify; killed")
            return
        if worker.pending:  # the worker spoke before the fork-server's answer was read: read it now
            deadline = time.monotonic() + ZYGOTE_REPLY_TIMEOUT_S + 1
            while worker.pending and time.monotonic() < deadline:
                self.settle_spawns(max(0.0, deadline - time.monotonic()))
        if hello.pid != worker.pid:
            worker.kill("bad-hello")
            self.log(f"{agent.name}: hello from pid {hello.pid}, expected {worker.pid}; killed")
            return
        worker.identity = identity
        if worker is agent.prepared:  # made ready ahead: it waits here for its start (see prepare)
            agent.parked = hello
            return
        self._bind(agent, worker, hello)

    def _spare_hello(self, spare: LoadedSpare, identity: bytes, hello: wire.Hello) -> None:
        """A loaded spare said hello before any spawn took it: checked as any worker's, and kept with it, so
        the spawn that takes it binds it at once. Nothing is recorded until then."""
        why = None
        if spare.hello is not None:
            why = "a second hello"
        elif hello.pid != spare.pid:
            why = f"a hello from pid {hello.pid}, expected {spare.pid}"
        else:
            try:
                verify_hello(hello.worker_key, hello.token, hello.proof)
            except RecordError:
                why = "a hello whose proof does not verify"
        if why is not None:
            self.log(f"loaded spare worker {spare.pid}: {why}; ended")
            self.spawner.end_spare(spare.pid)
            return
        spare.identity, spare.hello = identity, hello

    def _bind(self, agent: Agent, worker: WorkerProcess, hello: wire.Hello) -> None:
        """The worker's hello is checked (its identity set): record its key in the agent's chain and send it
        the agent."""
        identity = worker.identity
        assert identity is not None
        self.by_identity[identity] = agent
        agent.incarnation = worker.incarnation
        confinement = wire.encode_json(hello.confinement).decode()
        # The spec (and init) go out as soon as the key record is signed: the worker loads while the record is
        # made durable, and nothing of it is answered, nor any of its host requests served, before that. A new
        # agent's genesis is committed with its init's result (or GENESIS_COMMIT_S later at most), so a start
        # costs one durable commit; a later worker's key record at once, as the agent runs again from then.
        try:
            if not agent.in_store:
                self.records.genesis(agent, hello.worker_key, confinement, before_commit=self._send_spec)
                self.timers.after(GENESIS_COMMIT_S, self.records.flush)
            else:
                self.records.append(agent, Kind.WORKER_KEY, {
                    "incarnation": agent.incarnation, "worker_key": hello.worker_key,
                    "confinement": confinement, "reason": agent.last_exit or "start",
                    "component_sha256": bytes.fromhex(agent.config.component_sha256),
                }, before_commit=self._send_spec, incarnation=agent.incarnation)
        except StoreError as exc:
            self.log(f"{agent.name}: cannot record the worker's key: {exc}; killing it")
            self.by_identity.pop(identity, None)  # nothing more of that worker is served, nor its init's result
            worker.kill("store-failed")
            return
        if agent.initialized:
            self._ready(agent)
        self.dispatch(agent)

    def _unstored(self, agent: Agent, error: StoreError) -> None:
        """The record that bound the agent's worker could not be committed: that worker ends unheard."""
        self.log(f"{agent.name}: cannot record the worker's key: {error}; killing it")
        worker = agent.worker
        if worker is not None:
            agent.discard_results = True  # nothing it ran is taken: it is answered, not run again
            worker.kill("store-failed")

    def _send_spec(self, agent: Agent, head: Record) -> None:
        """What the worker needs to load the agent, its chain head being ``head``, and its init call if it
        has not run it yet. ``head`` is not yet durable (a genesis is committed with the worker's first result,
        a worker-key record just after this): nothing is answered before it is, and the worker's host requests
        (its only way to reach outside itself) are served only once the loop has made ``head`` durable, so the
        worker loads and runs meanwhile."""
        spec = AgentSpec.of(agent.config.load_profile, agent_id=agent.uuid, name=agent.name, head_seq=head.seq,
                            head_hash=head.hash.hex(), state_hash=sha256(agent.state).hex())
        self.send(agent, [wire.header(wire.SupervisorType.SPEC), wire.encode_json(spec.to_json()), agent.state])
        if not agent.initialized:
            agent.mailbox.appendleft(Pending(wire.Call(next(self.call_ids), wire.CallKind.INIT, agent.config.init_args)))
            self.dispatch(agent)

    def _ready(self, agent: Agent) -> None:
        agent.started_at = time.time()  # its uptime counts from each time it becomes running
        self.supervision.ready(agent)
        for ident, rid in agent.spawn_waiters:
            self.control.reply(ident, rid, agent.summary())
        agent.spawn_waiters.clear()

    # --- messages and results ------------------------------------------------------------------

    def drain(self) -> None:
        messages = []
        for _ in range(BATCH):
            try:
                messages.append(wire.recv_frames(self.socket, zmq.NOBLOCK))
            except zmq.Again:
                break
        prechecked = self._precheck(messages)
        for frames in messages:
            identity, body = frames[0], frames[1:]
            agent = self.by_identity.get(identity)
            try:
                typ = wire.parse_header(body[0], wire.WorkerType) if body else None
            except ProtocolError as exc:
                if agent is not None:
                    self.violation(agent, f"bad header: {exc}", body[0][:64])
                continue
            if typ is wire.WorkerType.HELLO:  # one per turn of the loop: each costs a durable commit
                if agent is not None:  # on a bound connection: from the worker that holds it now
                    self.violation(agent, "second hello on an established connection")
                elif identity in self._hellos_from:  # its first still waits: a flood is not queued
                    self.log("dropping a second hello from a connection whose first is still waiting")
                else:
                    self._hellos.append((identity, body[1:]))
                    self._hellos_from.add(identity)
                    if len(self._hellos) == 1:
                        self.timers.after(0, self._next_hello)
            elif agent is None:
                self.log(f"dropping a {typ} frame from an unknown peer")
            elif typ is wire.WorkerType.FAULT:
                self._on_fault(agent, body[1:])
            elif typ is wire.WorkerType.HOST_REQUEST:
                if agent.worker is not None and agent.worker.violated:  # being killed: nothing more of it is served
                    continue
                if agent.worker is not None and agent.worker.done:  # it may run no call after its last result
                    self.violation(agent, "a host request after a result that ended its worker")
                    continue
                self.records.flush()  # what the agent did before asking is committed first
                self.host.handle(agent, body[1:])
            elif agent.discard_results:  # being killed after a failed commit: what it ran is answered, not run again
                if typ is wire.WorkerType.RESULT and agent.sent:
                    ran = agent.sent.popleft()
                    self.effects.dropped(ran)
                    self.control.answer_error(ran, "store", "the agent's worker is being restarted after a failed "
                                              "commit; nothing of this call was stored")
                continue
            elif typ is wire.WorkerType.RESULT:
                worker = agent.worker
                if worker is None or worker.violated:
                    continue  # its end is being recorded, or it is being killed: nothing more of it is taken
                if worker.done:
                    self.violation(agent, "a result after one that ended its worker (it must run no other call)")
                    continue
                checked = self._check(agent, body[1:], prechecked.get(id(frames)))
                worker.ran = True
                if checked is not None:
                    pending = agent.sent.popleft()
                    self.effects.stage(pending, checked)
                    self.records.add_result((agent, pending, checked))
                    agent.verifier = checked.verifier  # the next result links to this one
                    agent.waiting_on = None
                    if crash_reason(pending.call.kind, checked.status) is not None or checked.ending is not None:
                        worker.done = True  # it runs none of the calls sent after this one (worker/_loop.py)
                    else:
                        # Pipelined: the worker runs the next messages while this result is made durable.
                        # Nothing is answered until the commit has returned.
                        self._watch_head(agent, worker)
                        self.dispatch(agent)
        self.records.flush_results()

    def dispatch(self, agent: Agent) -> None:
        """Send the next queued messages, up to PIPELINE_DEPTH unanswered, if the worker is connected and
        carries on: it finds the next one waiting as soon as it has sent a result."""
        worker = agent.worker
        if worker is None or worker.identity is None or worker.done:
            return
        if worker.kill_reason is not None or worker.exited:  # on its way out; the next worker gets the mailbox
            return
        if agent.status not in (Status.RUNNING, Status.STARTING, Status.RESTARTING):
            return
        while agent.mailbox and len(agent.sent) < PIPELINE_DEPTH:
            pending = agent.mailbox.popleft()
            agent.sent.append(pending)
            self.send(agent, pending.call.encode())
            if len(agent.sent) == 1:
                self._watch_head(agent, worker)

    def _watch_head(self, agent: Agent, worker: WorkerProcess) -> None:
        """The worker starts the oldest call sent (its previous result just came): kill it if that call is
        not answered within its wall time and a grace. One timer per worker, not one per call: when it
        fires it kills the worker if the call it runs now is overdue, and otherwise is set again for that
        call's deadline (thousands of calls a second made as many timers, each a turn of the loop)."""
        pending = agent.in_flight
        if pending is None:
            return
        grace = agent.config.limits.wall_time_ms / 1000 + WATCHDOG_GRACE_S
        if not worker.dispatched:  # its first call waits on its load: a component compiled in the worker
            worker.dispatched = True  # (a helper, or no artifact) takes seconds
            grace += LOAD_GRACE_S
        pending.deadline = time.monotonic() + grace
        if worker.watch is None or pending.deadline < worker.watch_at:  # none armed, or one too late for it
            self._arm_watchdog(agent, worker, pending.deadline)

    def _arm_watchdog(self, agent: Agent, worker: WorkerProcess, when: float) -> None:
        if worker.watch is not None:  # one set for a later deadline
            worker.watch.cancel()
        worker.watch = self.timers.at(when, lambda: self._watchdog(agent, worker))
        worker.watch_at = when

    def _watchdog(self, agent: Agent, worker: WorkerProcess) -> None:
        worker.watch = None
        if agent.worker is not worker or worker.exited:
            return
        pending = agent.in_flight
        if pending is None or pending.deadline is None:  # nothing running: the next call sent sets it again
            return
        if pending.deadline <= time.monotonic():
            self.log(f"{agent.name}: worker {worker.pid} did not answer within its deadline plus grace; killing it")
            worker.kill("unresponsive")
        else:
            self._arm_watchdog(agent, worker, pending.deadline)

    def send(self, agent: Agent, frames: list[bytes]) -> None:
        assert agent.worker is not None and agent.worker.identity is not None
        try:
            wire.send_frames(self.socket, [agent.worker.identity, *frames], copy=False)
        except zmq.ZMQError as exc:  # the peer went away; its pidfd will tell us why
            self.log(f"{agent.name}: cannot send to worker: {exc}")

    def _precheck(self, messages: list[list[bytes]]) -> dict[int, Prechecked]:
        """With two or more results in a drain batch, start checking their signatures on the verify pool
        (Ed25519 releases the GIL) while this thread parses and links the records in order. A lone result
        is checked in line: a worker signs one record per result (its logs and host calls are covered),
        so handing that one signature over would only add latency."""
        results = [f for f in messages if len(f) > 2 and f[1] == RESULT_HEADER]
        if len(results) < 2:
            return {}
        out = {}
        for frames in results:
            agent = self.by_identity.get(frames[0])
            if agent is not None and agent.in_flight is not None:
                ahead = precheck(frames[2:], verifier=agent.verifier, limits=agent.config.limits)
                if ahead is not None:
                    out[id(frames)] = ahead
        return out

    def _check(self, agent: Agent, frames: list[bytes], prechecked: Prechecked | None = None) -> Checked | None:
        if agent.in_flight is None:
            self.violation(agent, "result with no call in flight", b"".join(frames[:1]))
            return None
        try:
            return check_result(frames, verifier=agent.verifier, limits=agent.config.limits, call=agent.in_flight.call,
                                prechecked=prechecked, served=agent.in_flight.served)
        except Violation as v:
            self.violation(agent, v.reason, v.evidence)
        except Exception as exc:  # never let a worker's bytes crash the supervisor
            self.violation(agent, f"result could not be checked: {type(exc).__name__}: {exc}")
        return None

    def _results_committed(self, batch: list[Result], error: StoreError | None) -> None:
        """A batch of results is durable (or could not be made so): answer, and act on crashes and finishes."""
        if error is not None:
            # Nothing in this batch is durable: tell callers, restart the workers from the stored head.
            self.log(f"commit failed: {error}", logging.ERROR)
            for agent, pending, _ in batch:
                self.effects.dropped(pending)
                self.control.answer_error(pending, "store", f"the result could not be stored: {error}")
                self.records.reload_head(agent)
                if agent.worker:
                    agent.discard_results = True  # its chain ran ahead of the store: nothing more is taken from it
                    agent.worker.kill("store-failed")
            return
        for agent, pending, checked in batch:
            worker = agent.worker
            if pending.call.kind is wire.CallKind.INIT and checked.status == "ok":
                agent.initialized = True
                self._ready(agent)
            self.effects.committed(agent, pending, checked)
            self.control.answer(pending, checked)
            crash = crash_reason(pending.call.kind, checked.status)
            if checked.status != "ok" and crash is None:
                agent.instance_restarts += 1  # the worker discards the instance after any failed call
            if crash is not None and worker is not None:
                # The agent crashed: its worker ends and its supervisor decides what happens next. If it was
                # being stopped already, the exit says so first, with the call's failure as how it ended.
                failure = f"{checked.status}: {checked.error}"
                worker.fault = (f"{agent.stop_why} ({failure})" if worker.kill_reason and agent.stop_why
                                else failure)[:4096]
                worker.kill(crash)
                continue
            if checked.ending is not None and worker is not None:
                reason, detail = checked.ending
                agent.stop_why = f"it ended itself: {detail}" if detail else ""
                self.stop(agent, reason, agent.leaf.shutdown_ms)
                continue
            self.dispatch(agent)

    # --- faults, violations, stops, exits ------------------------------------------------------

    def _on_fault(self, agent: Agent, frames: list[bytes]) -> None:
        """The worker could not run the agent (bad component, missing required hardening): why, before it exits.
        Malformed, or from a worker that has run calls already, it is ignored (a FAULT is never a violation)."""
        worker = agent.worker
        if worker is None or len(frames) != 1:
            return
        try:
            fault = wire.decode_json(frames[0], "fault")
        except ProtocolError:
            return
        reason, detail = (fault.get("reason"), fault.get("detail")) if isinstance(fault, dict) else (None, None)
        if not isinstance(reason, str) or not isinstance(detail, str):
            self.log(f"{agent.name}: ignoring a malformed FAULT from worker {worker.pid}")
            return
        if worker.ran:
            self.log(f"{agent.name}: ignoring a FAULT from worker {worker.pid}, which has run calls already")
            return
        worker.fault = detail[:4096]
        if NOT_GRANTED in worker.fault:  # say which leaves each import out: the policy, or the manifest
            worker.fault = (worker.fault + not_granted_why(worker.fault, agent.config, self.home.root))[:4096]
        if reason in PERMANENT_FAILURES:
            worker.kill_reason = worker.kill_reason or reason
            # It exits next (status 3); one that does not is ended, so that no call waits on it meanwhile.
            self.timers.after(FAULT_EXIT_S, lambda: None if worker.exited else worker.kill(reason))

    def violation(self, agent: Agent, reason: str, evidence: bytes = b"") -> None:
        """The agent's current worker broke the protocol: killed, and recorded. Its later violations (a flood of
        them, while it dies) change nothing and are not logged."""
        evidence = evidence[:4096]
        worker = agent.worker
        if worker is None or worker.violated:
            return
        worker.violated = True
        self.log(f"{agent.name}: protocol violation: {reason}; killing worker", logging.WARNING)
        worker.kill_reason = "protocol-violation"  # over a reason it gave (a FAULT) or a stop on its way
        worker.kill("protocol-violation")
        try:
            self.records.append(agent, Kind.VIOLATION, {
                "incarnation": worker.incarnation, "reason": reason, "evidence": evidence,
            })
        except StoreError as exc:
            self.log(f"{agent.name}: cannot record the violation: {exc}", logging.ERROR)

    def stop(self, agent: Agent, reason: str, kill_after_ms: int | None) -> None:
        """Ask the worker to stop; kill it after ``kill_after_ms`` (0: at once, brutal_kill; None: never)."""
        worker = agent.worker
        if worker is None or worker.exited:
            return
        worker.kill_reason = worker.kill_reason or reason
        if worker.identity is None or kill_after_ms == 0:
            worker.kill(reason)
            return
        worker.stop_sent = True
        self.send(agent, [wire.header(wire.SupervisorType.STOP)])
        if kill_after_ms is None:
            return
        timeout_ms = kill_after_ms

        def too_slow() -> None:
            if not worker.exited:
                worker.fault = f"did not stop within its shutdown timeout of {timeout_ms} ms; killed"
                worker.kill(reason)

        self.timers.after(timeout_ms / 1000, too_slow)

    def on_exit(self, agent: Agent) -> None:
        """A worker's pidfd fired: reap it; once its last frame had its chance to arrive, record and decide."""
        worker = agent.worker
        assert worker is not None
        self.exits.unregister(worker.pidfd)
        self.by_pidfd.pop(worker.pidfd, None)
        code = worker.reap()

        def expecting() -> bool:  # a result or a fault it sent before it exited may trail its pidfd
            return worker.identity is not None and (
                (agent.in_flight is not None and not worker.done)
                or (code == WorkerExit.LOAD_FAILED and worker.fault is None))

        if expecting() and self.socket.poll(0):
            self.drain()
        if expecting():
            # Never block the loop for it: look again shortly; other agents are served meanwhile.
            self.ending.add(agent)
            self.timers.after(LAST_FRAMES_MS / 1000, lambda: self._ended(agent, worker, code))
            return
        self._ended(agent, worker, code)

    def _ended(self, agent: Agent, worker: WorkerProcess, code: int) -> None:
        self.ending.discard(agent)
        if worker.identity is not None and self.socket.poll(0):
            self.drain()
        self.by_token.pop(worker.token, None)
        if worker.identity is not None:
            self.by_identity.pop(worker.identity, None)
        how = exit_reason(code)
        reason = worker.kill_reason or ("load-failed" if code == WorkerExit.LOAD_FAILED else "worker-died")
        why, agent.stop_why = agent.stop_why, ""
        detail = worker.fault or (f"{why} ({how})" if why else how)
        agent.last_exit = exit_text(reason, detail)
        self.log(f"{agent.name}: worker {worker.pid} {how} ({reason})")
        # The call it was running. A worker that obeyed a STOP (status 0) ended between calls, or while it
        # waited for a host reply: if it asked nothing for the oldest call sent, it never started that one.
        started = not (code == 0 and worker.stop_sent and agent.sent and not agent.sent[0].asked)
        unrecorded = ""
        if agent.sent and not worker.done and started:
            running = agent.sent.popleft()
            unrecorded = unrecorded_host_calls(running.served, running.unanswered)
            self.effects.dropped(running)
            self.control.answer_error(running, "worker-died", f"the agent's worker ended during the call "
                                      f"({agent.last_exit}); nothing was committed")
            agent.waiting_on = None
        for pending in agent.sent:  # never started: what a misbehaving worker asked for them is not theirs
            self.effects.restart(pending)
        agent.mailbox.extendleft(reversed(agent.sent))  # never started: the next worker runs them, in order
        agent.sent.clear()
        if agent.worker is worker:
            agent.worker = None
        self.usage.worker_ended(agent, worker.cpu_ns, worker.peak_rss)
        if not agent.in_store:  # it ended before its first hello: there is no chain to record in
            self.forget_unstarted(agent, f"agent {agent.name} failed to start: {reason}: {detail}")
            return
        violated = reason == "protocol-violation" and worker.identity is not None
        self.supervision.exited(agent, worker.incarnation, reason, detail, violated=violated, unrecorded=unrecorded)

    def forget_unstarted(self, agent: Agent, failed: str) -> None:
        """An agent that ended, or was stopped, before its first hello has no chain: it is forgotten, and those
        waiting on it (its spawn, messages sent while it was starting, never run) are told ``failed``."""
        self.supervision.never_started(agent)
        self.agents.remove(agent)
        self.supervision.drop_unused_uploads(agent.config)
        for ident, rid in agent.spawn_waiters:
            self.control.reply_error(ident, rid, "spawn-failed", failed)
        agent.spawn_waiters.clear()
        for pending in agent.mailbox:
            self.control.answer_error(pending, "spawn-failed", failed)
        agent.mailbox.clear()

    def settle(self, agent: Agent) -> None:
        """The agent will not run again by itself: answer everyone waiting on it; its timers end with it
        (unless the supervisor is going down: then they wait for the next one)."""
        if self.running():
            try:
                self.agent_timers.stopped(agent)
            except StoreError as exc:
                self.log(f"{agent.name}: its timers could not be removed: {exc}")
            self.effects.messaging.forget([p.send_id for p in agent.mailbox if p.send_id is not None])
        for pending in agent.mailbox:
            self.control.answer_error(pending, "agent-stopped", f"agent {agent.name} is {agent.status}")
        agent.mailbox.clear()
        for ident, rid in agent.spawn_waiters:
            self.control.reply_error(ident, rid, "spawn-failed", f"agent {agent.name} failed to start: {agent.last_exit}")
        agent.spawn_waiters.clear()

    def alive(self) -> bool:
        """Some worker runs, or the end of one is still being recorded."""
        return bool(self.ending) or any(a.worker is not None and not a.worker.exited for a in self.agents)

    def close(self) -> None:
        for agent in self.agents:
            if agent.worker and not agent.worker.exited:
                agent.worker.kill("shutdown")
        for agent in list(self.preparing):
            self.unprepare(agent)
        with contextlib.suppress(zmq.ZMQError):
            self.socket.close(0)
        self.exits.close()


def not_granted_why(fault: str, config: AgentConfig, home: Path) -> str:
    """What to add to a worker's ``NOT_GRANTED`` load failure: for each capability it names, whether the agent's
    policy does not grant it, or grants it while the manifest leaves it out of ``capabilities``. The policy is
    read as it is now (the configuration keeps only what the agent was given)."""
    listed = fault.split(f"{NOT_GRANTED}: ", 1)[-1].split(" (granted: ", 1)[0].split(", ")
    by_interface = {cap.interface: name for name, cap in CAPABILITIES.items()}
    names = [by_interface[i] for i in listed if i in by_interface]
    if not names:
        return ""
    try:
        granted = load_policy(config.policy, policy_dirs(home)).capabilities
    except Exception as exc:  # removed or broken since the spawn: say so, and no more
        return f"; the agent's policy {config.policy!r} cannot be read to say which leaves them out: {exc}"[:1024]
    refused = [n for n in names if n not in granted]
    left_out = [n for n in names if n in granted]
    why = []
    if refused:
        why.append(f"the agent's policy {config.policy!r} does not grant {', '.join(refused)}")
    if left_out:
        why.append(f"the agent's policy {config.policy!r} grants {', '.join(left_out)}, but its manifest does not "
                   f"list {'it' if len(left_out) == 1 else 'them'} in capabilities (capabilities = "
                   f"{list(config.capabilities)})")
    return "; " + "; ".join(why)
