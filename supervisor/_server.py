"""The supervisor process: its parts, and one poll loop over the control socket, the worker socket and the
workers' pidfds (one epoll set).

It never runs guest code and never blocks on a worker: every wait is a timer.

    Control      clients' typed requests and their answers         (_control.py)
    Workers      workers' hello, results, mailbox, stops and exits  (_workers.py)
    RecordPath   every stored record, in chain order, then answers  (_record_path.py)
    Supervision  the OTP engine's executor                          (_trees.py, _supervision.py)
    HostRequests guests' requests, dispatched by capability         (_host.py)
                 served by messaging, kv, timers, http              (_caps/)
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import logging
import os
import resource
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import zmq

from theater.home import LOG_DATEFMT, LOG_FORMAT, Home
from theater.records import Record

from ._agent import Agent, Agents
from ._caps.effects import CallEffects
from ._caps.http import Egress
from ._caps.kv import Kv
from ._caps.messaging import Messaging
from ._caps.timers import AgentTimers
from ._checkpoints import Checkpoints, settle_statements
from ._config import OPERATOR
from ._control import MAX_CONTROL_FRAMES, Control
from ._errors import SupervisorError
from ._gc import Retention
from ._host import HostRequests
from ._keys import load_or_create_key, rotate_key
from ._record_path import RecordPath
from ._remote import RemoteControl
from ._scope import Scope
from ._spawner import WORKER_COMMAND, Spawner
from ._store import EventStore
from ._tenants import Tenants
from ._timers import Timers
from ._trees import Supervision
from ._usage import MetricsServer, Usage
from ._workers import FDS_PER_AGENT, Workers

__all__ = ["Supervisor", "configure_logging"]

LOG = logging.getLogger("supervisor")
METRICS_PERIOD_S = 1.0  # how often the /metrics snapshot is made
REMOTE_IO_THREADS = 2  # the TCP socket's context's I/O threads, where CurveZMQ's crypto runs


def configure_logging(level: str) -> None:
    """The supervisor's log on stderr (the log file, with --detach): LOG_FORMAT, at ``level`` and above."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATEFMT))
    LOG.handlers[:] = [handler]
    LOG.setLevel(level.upper())
    LOG.propagate = False


MAX_OPEN_FILES = 1 << 20  # the soft limit taken when the hard one is unlimited


def take_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one and return it. A distribution's usual soft limit
    (1,024) holds about 500 agents; past that a worker cannot be started (EMFILE) and the spawn waits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Supervisor:
    def __init__(
        self,
        home: Home,
        *,
        log: Callable[[str], None] | None = None,
        on_record: Callable[[Agent, Record], None] | None = None,
        worker_command: Sequence[str] = WORKER_COMMAND,
        zygote_command: Sequence[str] | None = None,
        witness: Path | None = None,
        listen: str | None = None,
        metrics: tuple[str, int] | None = None,
    ) -> None:
        """``witness``: a directory outside the home that gets a copy of every checkpoint. ``listen``: a
        tcp:// endpoint for tenants' clients (CurveZMQ, docs/tenancy.md). ``metrics``: (host, port) of a
        Prometheus ``/metrics`` endpoint.
        ``worker_command`` and ``zygote_command`` (the fork-server for those workers) exist for
        tests that run a deliberately misbehaving or probing worker; they are reachable only from
        Python, never from a manifest, a policy or the CLI."""
        self.home = home
        self._log = log  # a test's own sink; otherwise the logging module (logger "supervisor")
        if log is None and not logging.getLogger().handlers and not LOG.handlers:
            configure_logging("info")  # run without `theater up` (a test's script): still log to stderr
        # uploads/ exists before the fork-server builds its workers' Landlock rules: the one directory of the
        # home they may read, granted only if it is there (worker/_harden/landlock.py).
        for d in (home.root, home.run, home.logs, home.uploads.parent, home.uploads):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        self._lock = open(home.run / "supervisor.lock", "a+")  # noqa: SIM115 - held for life
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SupervisorError(f"a supervisor is already running at {home.root}") from None
        try:  # empty, as each worker checks: nothing left from before
            if home.workdir.is_symlink() or home.workdir.is_file():
                home.workdir.unlink()
            shutil.rmtree(home.workdir, ignore_errors=True)
            home.workdir.mkdir(mode=0o700)
        except OSError as exc:
            raise SupervisorError(f"cannot make {home.workdir} (every worker's working directory) afresh: "
                                  f"{exc.strerror}") from None
        open_files = take_open_files_limit()
        self.log(f"open files: {open_files} (about {open_files // FDS_PER_AGENT} agents running at once)")
        self.store = EventStore(home.store)
        self.spawner = Spawner(home, self.log, tuple(worker_command), zygote_command=zygote_command)  # starts it
        for sock in (home.control_sock, home.workers_sock):
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        self.running = True
        self._stopped_by_down = 0
        self.timers = Timers()
        self.poller = zmq.Poller()
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.agents = Agents()
        self.records = RecordPath(load_or_create_key(home, self.store), self.store)
        settle_statements(home, self.store, witness, self.log)
        self.records.on_record = on_record
        self.control = Control(home.root, home.control_endpoint, home.token, self.ctx, self.agents, self.timers, self.log)
        self.workers = Workers(home, self.ctx, self.spawner, self.agents, self.records, self.timers, self.poller,
                               self.log)
        self.host = HostRequests(self.workers)
        self.supervision = Supervision(self.agents, self.records, self.workers, self.control, self.store,
                                       policy_root=home.root, running=lambda: self.running, log=self.log)
        # The parts that hear of each other's outcomes.
        self.records.on_head = self.control.wake
        self.workers.supervision, self.workers.control, self.workers.host = self.supervision, self.control, self.host
        self.control.supervision, self.control.workers, self.control.records = self.supervision, self.workers, self.records
        self.control.request_down = self.request_down
        self.control.retention = Retention(self.store, self.records, self.log)
        self.control.rotate_key = lambda: rotate_key(home, self.records, self.store, witness, self.log)
        self.control.checkpoints = Checkpoints(home, self.records, self.store, self.timers, self.log, witness,
                                               before=self.control.retention.run)
        self.messaging = Messaging(self.store, self.agents, self.workers, self.host, self.timers, self.log)
        self.agent_timers = AgentTimers(self.store, self.agents, self.workers, self.timers, self.log)
        self.workers.effects = CallEffects(self.messaging, self.agent_timers)
        self.workers.agent_timers = self.agent_timers
        self.workers.running = lambda: self.running
        self.host.register("supervision", self.supervision.host_request)
        self.host.register("messaging", self.messaging.host_request)
        self.tenants = Tenants(self.store, self.agents, self.log)
        self.usage = Usage(self.store, self.agents, self.tenants, self.timers)
        self.control.tenants = self.supervision.tenants = self.messaging.tenants = self.tenants
        self.control.usage = self.workers.usage = self.supervision.usage = self.usage
        self.records.on_committed = self.usage.committed
        self.host.register("kv", Kv(self.store, self.tenants).host_request)
        self.host.register("timers", self.agent_timers.host_request)
        self.egress = Egress(self.host, self.timers, home.secrets, self.log)
        self.host.register("http", self.egress.host_request)
        # The TCP socket has a context of its own, with I/O threads of its own: tenants' frames are decrypted there
        # (CurveZMQ: about 50 ms of an I/O thread for 60 MiB, and each handshake's key exchanges). In the shared
        # context the workers' results, every tenant's calls, waited behind one tenant's large frames.
        self.remote_ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        if listen is not None:
            self.remote_ctx = zmq.Context(io_threads=REMOTE_IO_THREADS)
            self.control.remote = RemoteControl(home, self.remote_ctx, listen, self.tenants, self.log,
                                                MAX_CONTROL_FRAMES, self.timers)
            self.poller.register(self.control.remote.zap, zmq.POLLIN)
            self.poller.register(self.control.remote.socket, zmq.POLLIN)
            self.poller.register(self.control.remote.monitor, zmq.POLLIN)
            self.log(f"control API on {self.control.remote.endpoint} (CurveZMQ; server key "
                     f"{self.control.remote.public_key})")
        self.metrics: MetricsServer | None = None
        if metrics is not None:
            self.metrics = MetricsServer(*metrics, first=self.usage.top(self._whole_home()))
            self.timers.every(METRICS_PERIOD_S, self._refresh_metrics)
            self.control.metrics_address = f"http://{metrics[0]}:{self.metrics.port}/metrics"
            self.log(f"Prometheus metrics on {self.control.metrics_address}")
        home.pid_file.write_text(str(os.getpid()))
        self.poller.register(self.control.socket, zmq.POLLIN)
        self.poller.register(self.workers.socket, zmq.POLLIN)
        self.supervision.resume()
        self.agent_timers.resume()
        self.messaging.resume()

    def _whole_home(self) -> Scope:
        return Scope(self.supervision, self.tenants, OPERATOR)

    def _refresh_metrics(self) -> None:
        """The next /metrics snapshot, a slice of agents a turn; none begun while the last is still made."""
        assert self.metrics is not None
        if not self.metrics.making:
            self.metrics.making = True
            self.usage.top_in_slices(self._whole_home(), self.metrics.publish)

    def log(self, message: str, level: int = logging.INFO) -> None:
        if self._log is not None:
            self._log(f"{time.strftime('%H:%M:%S')} supervisor: {message}")
        else:
            LOG.log(level, message)

    @property
    def by_name(self) -> dict[str, Agent]:
        return self.agents.by_name

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
        # What start-up made (modules, classes, the store's and the policies' objects) lives as long as the
        # process: out of the collector's sight, a full collection scans only what came since. With 1,000
        # agents running, its pauses went from 31-50 ms to 8-14 ms (measured; they were the p99 of calls).
        gc.freeze()
        try:
            while True:
                events = dict(self.poller.poll(self.timers.timeout_ms()))
                if wake_r.fileno() in events:
                    with contextlib.suppress(BlockingIOError):
                        wake_r.recv(4096)
                if signalled:
                    signalled.clear()
                    self.request_down()
                if self.workers.socket in events:
                    self.workers.drain()
                if self.control.socket in events:
                    self.control.drain()
                remote = self.control.remote
                if remote is not None:
                    if remote.zap in events:
                        remote.answer_handshakes()
                    if remote.socket in events:
                        self.control.drain_remote()
                    if remote.monitor in events:
                        remote.count_failures()
                if self.workers.zygote_fd is not None and self.workers.zygote_fd in events:
                    self.workers.settle_spawns()
                if self.workers.exits.fileno() in events:
                    self.workers.reap_exited()
                self.timers.run_due()
                if not self.running and not self.workers.alive():  # every worker has been reaped
                    self._answer_calls_left()
                    self.control.finish_down(self._stopped_by_down)
                    break
        finally:
            signal.set_wakeup_fd(old_fd)
            for sig, h in old.items():
                signal.signal(sig, h)
            self.poller.unregister(wake_r.fileno())
            wake_r.close()
            wake_w.close()
            self.close()

    def _answer_calls_left(self) -> None:
        """Once every worker has stopped for `down`, what still waits on an agent (a client's call sent to a
        worker that obeyed its STOP first, or queued behind one) will not run: the next supervisor knows
        nothing of it. Each agent is settled, answering those now rather than leaving them to their callers'
        timeouts; going down, settling keeps its timers and stored sends for the next supervisor."""
        for agent in self.agents:
            self.workers.settle(agent)

    def request_down(self) -> None:
        if not self.running:
            return
        self.running = False
        self._stopped_by_down = sum(1 for agent in self.agents if agent.alive)  # what `down` answers it stopped
        self.log("shutting down: stopping every agent")
        self.supervision.shutdown()  # each tree stops its children in reverse start order

    def close(self) -> None:
        self.workers.close()
        self.usage.collections.close()
        self.spawner.close()
        for path in (self.home.token, self.home.pid_file, self.home.control_sock, self.home.workers_sock):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.control.close()
        self.supervision.uploads.close()  # an upload being written is finished, not cut short
        if self.metrics is not None:
            self.metrics.close()
        self.egress.close()
        self.ctx.term()
        if self.remote_ctx is not None:
            self.remote_ctx.term()
        self.store.close()
        self._lock.close()
        self.log("down")
