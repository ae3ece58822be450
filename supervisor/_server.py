"""The supervisor process: one poll loop over the control socket, the worker socket and pidfds.

It never runs guest code and never blocks on a worker: every wait has a timer.
Worker results are checked by the ledger, committed in groups (one durable
transaction per loop turn) and only then answered.

This module is the loop, the workers' lives and the record path; supervision
trees are executed in ``_trees.py`` and clients' requests served in
``_control.py``, both parts of the one :class:`Supervisor` and its state.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import heapq
import itertools
import os
import secrets
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import zmq
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from theater import wire
from theater.chain import ChainVerifier
from theater.errors import ProtocolError
from theater.home import Home
from theater.records import MAX_RECORD_BYTES, Kind, Record, sha256, sign_record
from theater.spec import AgentSpec

from ._agent import Agent, Pending
from ._config import AgentConfig
from ._control import BATCH, ControlRequests
from ._errors import ConfigError, NotFound, Refused, StoreError, SupervisorError
from ._ledger import Checked, Prechecked, Violation, check_result, precheck
from ._spawner import WORKER_COMMAND, Spawner, WorkerProcess, exit_reason
from ._store import Commit, EventStore
from ._supervision import Status
from ._trees import Supervision

__all__ = ["Supervisor", "load_or_create_key"]

HELLO_TIMEOUT_S = 20.0
LAST_FRAMES_MS = 100  # how long a dead worker's last frame may trail its exit
WATCHDOG_GRACE_S = 5.0
MAX_CONTROL_DATA = 64 * 1024 * 1024
EXIT_LOAD_FAILED = 3
MIN_FRAMES_OF_TWO_RECORDS = 6  # identity, header, meta, state (if any), then one frame per record
RESULT_HEADER = wire.header(wire.WorkerType.RESULT)


def load_or_create_key(home: Home) -> Ed25519PrivateKey:
    """The supervisor's long-term key: 32-byte seed, 0600, created on first start."""
    if home.key.exists():
        mode = home.key.stat().st_mode & 0o777
        if mode & 0o077:
            raise SupervisorError(f"{home.key} is readable by others (mode {mode:o}); it must be 0600")
        key = Ed25519PrivateKey.from_private_bytes(home.key.read_bytes())
    else:
        key = Ed25519PrivateKey.generate()
        seed = key.private_bytes_raw()
        fd = os.open(home.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(seed)
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    if not home.public_key.exists() or home.public_key.read_bytes() != public:
        home.public_key.write_bytes(public)
    return key


def _crash_reason(kind: wire.CallKind, status: str) -> str | None:
    """The exit reason a failed call means, or None if the agent carries on.

    A guest ``err`` from handle is an answer, not a crash; from init it means
    the agent could not start. Every other failure is a crash (OTP: the process died).
    """
    if status == "ok":
        return None
    if status == "guest-error":
        return "guest-error" if kind is wire.CallKind.INIT else None
    return "trap"


class Timers:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), fn))

    def after(self, seconds: float, fn: Callable[[], None]) -> None:
        self.at(time.monotonic() + seconds, fn)

    def timeout_ms(self) -> int:
        if not self._heap:
            return 1000
        return max(0, min(1000, int((self._heap[0][0] - time.monotonic()) * 1000) + 1))

    def run_due(self) -> None:
        now = time.monotonic()
        while self._heap and self._heap[0][0] <= now:
            _, _, fn = heapq.heappop(self._heap)
            fn()


class Supervisor(ControlRequests):
    def __init__(
        self,
        home: Home,
        *,
        log: Callable[[str], None] | None = None,
        on_record: Callable[[Agent, Record], None] | None = None,
        worker_command: Sequence[str] = WORKER_COMMAND,
        zygote_command: Sequence[str] | None = None,
    ) -> None:
        """``worker_command`` and ``zygote_command`` (the fork-server for those workers) exist for
        tests that run a deliberately misbehaving or probing worker; they are reachable only from
        Python, never from a manifest, a policy or the CLI."""
        self.home = home
        self._worker_command = tuple(worker_command)
        self._on_record = on_record
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        for d in (home.root, home.run, home.logs):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        self._lock = open(home.run / "supervisor.lock", "a+")  # noqa: SIM115 - held for life
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SupervisorError(f"a supervisor is already running at {home.root}") from None
        self.key = load_or_create_key(home)
        self.public_key: Ed25519PublicKey = self.key.public_key()
        self.store = EventStore(home.store)
        self.spawner = Spawner(home, self.log, self._worker_command, zygote_command=zygote_command)  # starts it
        self.agents: dict[bytes, Agent] = {}
        self.by_name: dict[str, Agent] = {}
        self.supervision = Supervision(self)
        self.by_identity: dict[bytes, Agent] = {}
        self.by_token: dict[bytes, Agent] = {}
        self.by_pidfd: dict[int, Agent] = {}
        self.waiters: dict[bytes, list[tuple[bytes, int, int]]] = {}
        self.timers = Timers()
        self.call_ids = itertools.count(1)
        self.running = True
        self.down_waiters: list[tuple[bytes, int]] = []
        self._batch: list[tuple[Agent, Pending, Checked]] = []

        for sock in (home.control_sock, home.workers_sock):
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        self.ctx = zmq.Context()
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.linger = 0
        self.control.maxmsgsize = MAX_CONTROL_DATA + 2 * wire.MAX_JSON_BYTES
        self.control.bind(home.control_endpoint)
        self.workers = self.ctx.socket(zmq.ROUTER)
        self.workers.linger = 0
        self.workers.router_mandatory = True
        self.workers.maxmsgsize = MAX_RECORD_BYTES
        self.workers.bind(home.workers_endpoint)
        self.token = secrets.token_hex(32)
        fd = os.open(home.token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token)
        home.pid_file.write_text(str(os.getpid()))
        self.poller = zmq.Poller()
        self.poller.register(self.control, zmq.POLLIN)
        self.poller.register(self.workers, zmq.POLLIN)
        self._resume_agents()

    # --- logging ------------------------------------------------------------

    def log(self, message: str) -> None:
        self._log(f"{time.strftime('%H:%M:%S')} supervisor: {message}")

    # --- start-up: resume what was running ----------------------------------

    def _resume_agents(self) -> None:
        for row in self.store.agents():
            config = AgentConfig.from_dict(row.config)
            verifier = ChainVerifier(self.public_key)
            verifier.agent_id = row.id
            verifier.next_seq = row.head_seq + 1
            verifier.head_hash = row.head_hash
            verifier.state_hash = row.state_hash
            last = Record.parse(next(self.store.records(row.id, after=row.head_seq - 1)))
            if last.hash != row.head_hash:
                raise StoreError(f"agent {row.name}: stored head does not match its last record")
            worker_alive_in_chain = last.kind not in (Kind.EXIT, Kind.VIOLATION)
            agent = Agent(
                id=row.id, config=config, verifier=verifier, state=row.state,
                initialized=row.initialized, incarnation=row.incarnation, in_store=True,
            )
            agent.leaf.status = Status(row.desired) if row.desired != "running" else Status.STOPPED
            agent.leaf.held = row.desired == "stopped"
            # The previous supervisor's workers died with it (parent-death signal).
            if worker_alive_in_chain:
                self.append_record(agent, Kind.EXIT, {
                    "incarnation": agent.incarnation, "reason": "supervisor-restart",
                    "detail": "the previous supervisor ended; its worker ended with it",
                })
            agent.orphan_of = row.config.get("parent") or ""  # until its tree, if it has one, claims it below
            self.register(agent)
        self.supervision.resume()

    def register(self, agent: Agent) -> None:
        self.agents[agent.id] = agent
        self.by_name[agent.name] = agent
        if "supervision" in agent.config.capabilities and agent.leaf.owns is None:
            self.supervision.own_children(agent)

    def find(self, ref: object) -> Agent:
        if not isinstance(ref, str):
            raise NotFound("agent must be a name or an id")
        agent = self.by_name.get(ref)
        if agent is None:
            with contextlib.suppress(ValueError):
                agent = self.agents.get(uuid.UUID(ref).bytes)
        if agent is None:
            raise NotFound(f"no agent named or with id {ref!r}")
        return agent

    # --- the loop -------------------------------------------------------------

    def serve_forever(self) -> None:
        """Run until ``down`` or SIGINT/SIGTERM; signals only set a flag the loop reads."""
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signalled: list[int] = []
        handler = lambda signum, _frame: signalled.append(signum)  # noqa: E731
        old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        old_fd = signal.set_wakeup_fd(wake_w.fileno())
        self.poller.register(wake_r.fileno(), zmq.POLLIN)
        self.log(f"up at {self.home.root} (pid {os.getpid()})")
        try:
            while True:
                events = dict(self.poller.poll(self.timers.timeout_ms()))
                if wake_r.fileno() in events:
                    with contextlib.suppress(BlockingIOError):
                        wake_r.recv(4096)
                if signalled:
                    signalled.clear()
                    self.request_down()
                if self.workers in events:
                    self._drain_workers()
                if self.control in events:
                    self._drain_control()
                for fd in [fd for fd in events if isinstance(fd, int) and fd != wake_r.fileno()]:
                    agent = self.by_pidfd.get(fd)
                    if agent is not None:
                        self._on_worker_exit(agent)
                self.timers.run_due()
                if self._shutdown_done():
                    break
        finally:
            signal.set_wakeup_fd(old_fd)
            for sig, h in old.items():
                signal.signal(sig, h)
            self.poller.unregister(wake_r.fileno())
            wake_r.close()
            wake_w.close()
            self.close()

    def close(self) -> None:
        for agent in self.agents.values():
            if agent.worker and not agent.worker.exited:
                agent.worker.kill("shutdown")
        self.spawner.close()
        for path in (self.home.token, self.home.pid_file, self.home.control_sock, self.home.workers_sock):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.control.close(0)
        self.workers.close(0)
        self.ctx.term()
        self.store.close()
        self._lock.close()
        self.log("down")

    def request_down(self) -> None:
        if not self.running:
            return
        self.running = False
        self.log("shutting down: stopping every agent")
        self.supervision.shutdown()  # each tree stops its children in reverse start order

    def _shutdown_done(self) -> bool:
        if self.running:
            return False
        if any(a.worker is not None and not a.worker.exited for a in self.agents.values()):
            return False  # keep looping until every worker has been reaped
        for ident, rid in self.down_waiters:
            self._reply(ident, rid, {"stopped": len(self.agents)})
        return True

    # --- workers: spawn, hello, results, exits ----------------------------------

    def start_worker(self, agent: Agent) -> None:
        agent.discard_results = False
        workdir = self.home.run / "workers" / agent.uuid
        worker = self.spawner.spawn(
            self.home.workers_endpoint, agent.incarnation + 1, self.home.logs / f"{agent.name}.log", workdir,
            agent.config,
        )
        agent.worker = worker
        self.by_token[worker.token] = agent
        self.by_pidfd[worker.pidfd] = agent
        self.poller.register(worker.pidfd, zmq.POLLIN)
        self.timers.after(HELLO_TIMEOUT_S, lambda: self._hello_timeout(agent, worker))

    def _hello_timeout(self, agent: Agent, worker: WorkerProcess) -> None:
        if agent.worker is worker and worker.identity is None and not worker.exited:
            self.log(f"{agent.name}: worker {worker.pid} sent no hello in {HELLO_TIMEOUT_S}s; killing it")
            worker.kill("no-hello")

    def _drain_workers(self) -> None:
        batch = self._batch
        messages = []
        for _ in range(BATCH):
            try:
                messages.append(self.workers.recv_multipart(zmq.NOBLOCK))
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
                    self._violation(agent, f"bad header: {exc}", body[0][:64])
                continue
            if typ is wire.WorkerType.HELLO:
                self._on_hello(identity, body[1:], agent)
            elif agent is None:
                self.log(f"dropping a {typ} frame from an unknown peer")
            elif typ is wire.WorkerType.FAULT:
                self._on_fault(agent, body[1:])
            elif typ is wire.WorkerType.HOST_REQUEST:
                self._flush_batch()  # what the agent did before asking is committed first
                self._on_host_request(agent, body[1:])
            elif agent.discard_results:
                continue
            elif typ is wire.WorkerType.RESULT:
                checked = self._check(agent, body[1:], prechecked.get(id(frames)))
                if checked is not None:
                    pending = agent.in_flight
                    assert pending is not None
                    batch.append((agent, pending, checked))
                    agent.verifier = checked.verifier  # the next result links to this one
                    agent.in_flight = None
                    if _crash_reason(pending.call.kind, checked.status) is None and not checked.finish:
                        # Pipelined: the worker runs the next message while this result is made durable.
                        # Nothing is answered until the commit below has returned.
                        self.dispatch(agent)
        self._flush_batch()

    def _flush_batch(self) -> None:
        """Commit the results checked so far; every supervisor record must follow them."""
        if self._batch:
            batch, self._batch = self._batch, []
            self._commit_batch(batch)

    def _on_hello(self, identity: bytes, frames: list[bytes], known: Agent | None) -> None:
        if known is not None:
            self._violation(known, "second hello on an established connection")
            return
        try:
            hello = wire.Hello.decode(frames)
        except ProtocolError as exc:
            self.log(f"dropping a malformed hello: {exc}")
            return
        agent = self.by_token.pop(hello.token, None)
        worker = agent.worker if agent else None
        if agent is None or worker is None or worker.token != hello.token:
            self.log("dropping a hello with an unknown token")
            return
        try:
            key = Ed25519PublicKey.from_public_bytes(hello.worker_key)
            key.verify(hello.proof, wire.HELLO_DOMAIN + hello.token)
        except (ValueError, InvalidSignature):
            worker.kill("bad-hello")
            self.log(f"{agent.name}: hello proof does not verify; killed")
            return
        if hello.pid != worker.pid:
            worker.kill("bad-hello")
            self.log(f"{agent.name}: hello from pid {hello.pid}, expected {worker.pid}; killed")
            return
        worker.identity = identity
        self.by_identity[identity] = agent
        agent.incarnation = worker.incarnation
        confinement = wire.encode_json(hello.confinement).decode()
        try:  # the spec goes out before the key record's commit: the worker loads while it is made durable
            if not agent.in_store:
                self._write_genesis(agent, hello.worker_key, confinement, before_commit=self._send_spec)
            else:
                reason = agent.last_exit or "start"
                self.append_record(agent, Kind.WORKER_KEY, {
                    "incarnation": agent.incarnation, "worker_key": hello.worker_key,
                    "confinement": confinement, "reason": reason,
                }, before_commit=self._send_spec, incarnation=agent.incarnation)
        except StoreError as exc:
            self.log(f"{agent.name}: cannot record the worker's key: {exc}; killing it")
            worker.kill("store-failed")
            return
        if not agent.initialized:
            agent.mailbox.appendleft(Pending(wire.Call(next(self.call_ids), wire.CallKind.INIT, agent.config.init_args)))
        else:
            self._became_ready(agent)
        self.dispatch(agent)

    def _send_spec(self, agent: Agent, head: Record) -> None:
        """What the worker needs to load the agent, its chain head being ``head`` (not yet durable:
        the worker's first result is committed after it, and nothing is answered before that)."""
        spec = AgentSpec(
            agent_id=agent.uuid, name=agent.name, component_path=agent.config.component_path,
            component_sha256=agent.config.component_sha256, capabilities=agent.config.capabilities,
            limits=agent.config.limits, head_seq=head.seq, head_hash=head.hash.hex(),
            state_hash=sha256(agent.state).hex(), hardening=agent.config.hardening,
        )
        self._send_worker(agent, [wire.header(wire.SupervisorType.SPEC), wire.encode_json(spec.to_json()), agent.state])

    def _write_genesis(self, agent: Agent, worker_key: bytes, confinement: str,
                       before_commit: Callable[[Agent, Record], None] = lambda agent, head: None) -> None:
        stored = {**agent.config.as_dict(), "parent": agent.parent_name}
        config = wire.encode_json(stored).decode()
        genesis = sign_record(
            self.key, kind=Kind.GENESIS, agent_id=agent.id, seq=0, time_ns=time.time_ns(),
            prev_hash=bytes(32), state_hash=sha256(b""),
            fields={"name": agent.name, "component_sha256": bytes.fromhex(agent.config.component_sha256),
                    "config": config, "worker_key": worker_key, "confinement": confinement},
        )
        agent.verifier.advance(genesis)
        before_commit(agent, genesis)
        self.store.create_agent(agent.id, agent.name, stored, genesis, agent.state)
        agent.in_store = True
        self._committed(agent, [genesis])

    def append_record(self, agent: Agent, kind: Kind, fields: dict[str, Any],
                      before_commit: Callable[[Agent, Record], None] = lambda agent, head: None,
                      state_hash: bytes | None = None, **commit: Any) -> Record:
        """Sign a supervisor record into the agent's chain and commit it (``state_hash``: a state reset's)."""
        self._flush_batch()  # results already checked precede this record in the chain and the store
        v = agent.verifier
        record = sign_record(
            self.key, kind=kind, agent_id=agent.id, seq=v.next_seq, time_ns=time.time_ns(),
            prev_hash=v.head_hash, state_hash=state_hash or v.state_hash or sha256(agent.state), fields=fields,
        )
        scratch = copy.copy(v)
        scratch.advance(record)
        before_commit(agent, record)
        self.store.commit([Commit(agent_id=agent.id, records=[record], **commit)])
        agent.verifier = scratch
        self._committed(agent, [record])
        return record

    def _committed(self, agent: Agent, records: list[Record]) -> None:
        """Called once records are durable: wake event waiters, feed the foreground printer."""
        self.wake_waiters(agent.id, agent.verifier.next_seq - 1)
        if self._on_record is not None:
            for record in records:
                self._on_record(agent, record)

    def _became_ready(self, agent: Agent) -> None:
        agent.started_at = time.time()
        self.supervision.ready(agent)
        for ident, rid in agent.spawn_waiters:
            self._reply(ident, rid, agent.summary())
        agent.spawn_waiters.clear()

    def dispatch(self, agent: Agent) -> None:
        """Send the next queued message if the worker is connected and idle."""
        worker = agent.worker
        if agent.in_flight is not None or not agent.mailbox or worker is None or worker.identity is None:
            return
        if worker.kill_reason is not None or worker.exited:  # on its way out; the next worker gets the mailbox
            return
        if agent.status not in (Status.RUNNING, Status.STARTING, Status.RESTARTING):
            return
        pending = agent.mailbox.popleft()
        agent.in_flight = pending
        self._send_worker(agent, pending.call.encode())
        grace = agent.config.limits.wall_time_ms / 1000 + WATCHDOG_GRACE_S
        self.timers.after(grace, lambda: self._watchdog(agent, worker, pending))

    def _watchdog(self, agent: Agent, worker: WorkerProcess, pending: Pending) -> None:
        if agent.worker is worker and agent.in_flight is pending and not worker.exited:
            self.log(f"{agent.name}: worker {worker.pid} did not answer within its deadline plus grace; killing it")
            worker.kill("unresponsive")

    def _send_worker(self, agent: Agent, frames: list[bytes]) -> None:
        assert agent.worker is not None and agent.worker.identity is not None
        try:
            self.workers.send_multipart([agent.worker.identity, *frames], copy=False)
        except zmq.ZMQError as exc:  # the peer went away; its pidfd will tell us why
            self.log(f"{agent.name}: cannot send to worker: {exc}")

    def _precheck(self, messages: list[list[bytes]]) -> dict[int, Prechecked]:
        """With two or more records in a drain batch, start checking all their signatures on the
        verify pool (Ed25519 releases the GIL) while this thread parses and links them in order.
        (A lone one-record result is checked in line: handing it over would only add latency.)"""
        results = [f for f in messages if len(f) > 2 and f[1] == RESULT_HEADER]
        if len(results) < 2 and not any(len(f) >= MIN_FRAMES_OF_TWO_RECORDS for f in results):
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
            self._violation(agent, "result with no call in flight", b"".join(frames[:1]))
            return None
        try:
            return check_result(frames, verifier=agent.verifier, limits=agent.config.limits, call=agent.in_flight.call,
                                prechecked=prechecked)
        except Violation as v:
            self._violation(agent, v.reason, v.evidence)
        except Exception as exc:  # never let a worker's bytes crash the supervisor
            self._violation(agent, f"result could not be checked: {type(exc).__name__}: {exc}")
        return None

    def _commit_batch(self, batch: list[tuple[Agent, Pending, Checked]]) -> None:
        try:
            self.store.commit([checked.commit for _, _, checked in batch])
        except StoreError as exc:
            # Nothing in this batch is durable: tell callers, restart the workers from the stored head.
            self.log(f"commit failed: {exc}")
            for agent, pending, _ in batch:
                self._answer_error(pending, "store", f"the result could not be stored: {exc}")
                self._reload_head(agent)
                if agent.worker:
                    agent.discard_results = True  # its chain ran ahead of the store: nothing more is taken from it
                    agent.worker.kill("store-failed")
            return
        for agent, pending, checked in batch:
            if checked.commit.state is not None:
                agent.state = checked.commit.state
            self._committed(agent, checked.commit.records)
            worker = agent.worker
            if pending.call.kind is wire.CallKind.INIT and checked.status == "ok":
                agent.initialized = True
                self._became_ready(agent)
            self._answer(pending, checked)
            crash = _crash_reason(pending.call.kind, checked.status)
            if checked.status != "ok" and crash is None:
                agent.instance_restarts += 1  # the worker discards the instance after any failed call
            if crash is not None and worker is not None:
                # The agent crashed: its worker ends and its supervisor decides what happens next.
                worker.fault = f"{checked.status}: {checked.error}"[:4096]
                worker.kill(crash)
                continue
            if checked.finish and worker is not None:
                self.stop_worker(agent, "normal")
                continue
            self.dispatch(agent)

    def _reload_head(self, agent: Agent) -> None:
        row = self.store.agent(agent.id)
        if row is None:
            return
        agent.verifier.next_seq = row.head_seq + 1
        agent.verifier.head_hash = row.head_hash
        agent.verifier.state_hash = row.state_hash
        agent.state = row.state

    def _on_fault(self, agent: Agent, frames: list[bytes]) -> None:
        """The worker could not run the agent (bad component, missing required hardening): why, before it exits."""
        worker = agent.worker
        if worker is None:
            return
        try:
            fault = wire.decode_json(frames[0], "fault") if len(frames) == 1 else {}
        except ProtocolError:
            return
        worker.fault = str(fault.get("detail", ""))[:4096]
        if fault.get("reason") in ("load-failed", "hardening-failed"):
            worker.kill_reason = worker.kill_reason or str(fault["reason"])

    def _violation(self, agent: Agent, reason: str, evidence: bytes = b"") -> None:
        evidence = evidence[:4096]
        worker = agent.worker
        self.log(f"{agent.name}: protocol violation: {reason}; killing worker")
        if worker is None or worker.kill_reason == "protocol-violation":
            return
        worker.kill("protocol-violation")
        try:
            self.append_record(agent, Kind.VIOLATION, {
                "incarnation": worker.incarnation, "reason": reason, "evidence": evidence,
            })
        except StoreError as exc:
            self.log(f"{agent.name}: cannot record the violation: {exc}")

    def _on_worker_exit(self, agent: Agent) -> None:
        """A worker's pidfd fired: reap it, record why it ended, then let its supervisor decide."""
        worker = agent.worker
        assert worker is not None
        self.poller.unregister(worker.pidfd)
        self.by_pidfd.pop(worker.pidfd, None)
        code = worker.reap()
        expecting = agent.in_flight is not None or (code == EXIT_LOAD_FAILED and worker.fault is None)
        if expecting and worker.identity is not None and self.workers.poll(LAST_FRAMES_MS):
            # A worker's last frame (a result, a fault) was sent before it exited but may reach
            # our socket after its pidfd does: read what has arrived before deciding.
            self._drain_workers()
        self.by_token.pop(worker.token, None)
        if worker.identity is not None:
            self.by_identity.pop(worker.identity, None)
        how = exit_reason(code)
        reason = worker.kill_reason or ("load-failed" if code == EXIT_LOAD_FAILED else "worker-died")
        why, agent.stop_why = agent.stop_why, ""
        detail = worker.fault or (f"{why} ({how})" if why else how)
        agent.last_exit = f"{reason}: {detail}"
        self.log(f"{agent.name}: worker {worker.pid} {how} ({reason})")
        if agent.in_flight is not None:
            self._answer_error(agent.in_flight, "worker-died", f"the agent's worker ended during the call ({agent.last_exit}); nothing was committed")
            agent.in_flight = None
        agent.worker = None
        if not agent.in_store:  # it ended before its first hello: there is no chain to record in
            self.supervision.never_started(agent)
            self._fail_spawn(agent, f"{reason}: {detail}")
            return
        violated = reason == "protocol-violation" and worker.identity is not None
        self.supervision.exited(agent, worker.incarnation, reason, detail, violated=violated)

    def _on_host_request(self, agent: Agent, frames: list[bytes]) -> None:
        """A guest's supervision call, relayed by its worker: act only on this agent's own children."""
        try:
            request = wire.HostRequest.decode(frames, "host request")
        except ProtocolError as exc:
            self._violation(agent, f"malformed host request: {exc}", b"".join(frames)[:256])
            return
        if agent.in_flight is None or agent.leaf.owns is None or "supervision" not in agent.config.capabilities:
            self._violation(agent, "host request outside a call, or without the supervision capability")
            return
        body = request.body
        op = body.get("op")
        try:
            if op == "spawn":
                child = self.supervision.spawn_child(agent, body.get("template"), body.get("name"), body.get("args"))
                answer: dict[str, Any] = {"ok": True, "id": child}
            elif op == "stop":
                self.supervision.stop_child(agent, body.get("child"))
                answer = {"ok": True}
            elif op == "children":
                answer = {"ok": True, "children": self.supervision.children_of(agent)}
            else:
                answer = {"ok": False, "error": f"unknown supervision operation {op!r}"}
        except (Refused, NotFound, ConfigError) as exc:
            answer = {"ok": False, "error": str(exc)}
        self._send_worker(agent, wire.HostRequest(request.request_id, answer).encode(wire.SupervisorType.HOST_REPLY))

    def _fail_spawn(self, agent: Agent, why: str) -> None:
        self.agents.pop(agent.id, None)
        self.by_name.pop(agent.name, None)
        for ident, rid in agent.spawn_waiters:
            self._reply_error(ident, rid, "spawn-failed", f"agent {agent.name} failed to start: {why}")
        agent.spawn_waiters.clear()

    def stop_worker(self, agent: Agent, reason: str) -> None:
        """Ask the worker to stop; kill it after the agent's shutdown timeout (at once for brutal_kill)."""
        worker = agent.worker
        if worker is None or worker.exited:
            return
        worker.kill_reason = worker.kill_reason or reason
        timeout_ms = agent.restart.shutdown_ms
        if worker.identity is None or timeout_ms is None or timeout_ms == 0:
            worker.kill(reason)
            return
        self._send_worker(agent, [wire.header(wire.SupervisorType.STOP)])

        def too_slow() -> None:
            if not worker.exited:
                worker.fault = f"did not stop within its shutdown timeout of {timeout_ms} ms; killed"
                worker.kill(reason)

        self.timers.after(timeout_ms / 1000, too_slow)

    def reset_state(self, agent: Agent, why: str) -> None:
        """The agent starts again from its initial state: the next worker calls init. The chain says so
        (a `state-reset` record stating the empty state's hash), so the next worker's records link."""
        if agent.in_store:
            try:
                self.append_record(agent, Kind.STATE_RESET, {"reason": why}, state_hash=sha256(b""),
                                   state=b"", initialized=False)
            except StoreError as exc:
                self.log(f"{agent.name}: cannot record the state reset: {exc}; it resumes its committed state")
                return
        agent.state, agent.initialized = b"", False

    def settle(self, agent: Agent) -> None:
        """The agent will not run again by itself: answer everyone waiting on it."""
        for pending in agent.mailbox:
            self._answer_error(pending, "agent-stopped", f"agent {agent.name} is {agent.status}")
        agent.mailbox.clear()
        for ident, rid in agent.spawn_waiters:
            self._reply_error(ident, rid, "spawn-failed", f"agent {agent.name} failed to start: {agent.last_exit}")
        agent.spawn_waiters.clear()
