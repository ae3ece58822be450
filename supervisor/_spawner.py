"""Starting worker processes and learning at once when one ends.

Workers are forked by the fork-server (``worker/_zygote.py``): a pre-started,
single-threaded process that has already imported wasmtime, pyzmq and
cryptography, so a spawn or a restart costs a fork, not an interpreter start.
The fork-server clones each worker with ``CLONE_PARENT``: the worker is this
process's child, so its end is seen through a pidfd in the supervisor's
poller, its exact exit status is collected with ``waitid(P_PIDFD)``, and its
parent-death signal fires when the supervisor dies. The fork-server itself
dies with the supervisor (parent-death signal too).

If the fork-server cannot be used (it died, did not answer in time, or the
machine has no ``CLONE_PARENT`` path), a worker is a fresh ``python -m
worker`` instead, with an empty environment, a private working directory, its
own session and no inherited descriptors but its bootstrap pipe; a dead
fork-server is replaced, with a log line either way.

Components are compiled once per engine configuration into the artifact cache
(``_artifacts.py``) by compile jobs the fork-server forks; workers map the
artifact from a sealed memfd instead of compiling.
"""

from __future__ import annotations

import contextlib
import os
import platform
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from theater.errors import ProtocolError
from theater.forkserver import (
    LOG_SIZE_BYTES,
    MAX_MESSAGE,
    TAKEN,
    ArtifactOffer,
    Boot,
    Compiled,
    CompileRequest,
    FromForkServer,
    Ready,
    SpareBorn,
    SpareEnded,
    Spawn,
    Spawned,
    SpawnRefused,
    Took,
    decode_from_fork_server,
)
from theater.home import Home
from theater.spec import Limits, LoadProfile
from theater.wire import Hello

from ._artifacts import ArtifactCache
from ._errors import ZygoteGone
from ._timers import Timer

__all__ = ["WORKER_COMMAND", "ZYGOTE_COMMAND", "LoadedSpare", "Spawner", "WorkerProcess", "exit_reason", "spawn_worker"]

WORKER_ENV = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONSAFEPATH": "1"}
ZYGOTE_READY_TIMEOUT_S = 30.0
MAX_ZYGOTE_FAILURES = 3
CLONE_MACHINES = ("x86_64", "aarch64")  # where worker/_zygote.py knows the clone system call
ZYGOTE_REPLY_TIMEOUT_S = 5.0


@dataclass(eq=False)
class WorkerProcess:
    pid: int
    pidfd: int
    token: bytes
    incarnation: int
    proc: subprocess.Popen[bytes] | None = None  # None: forked by the fork-server (our child all the same)
    identity: bytes | None = None
    kill_reason: str | None = None
    fault: str | None = None
    exited: bool = field(default=False)
    dispatched: bool = False  # it has been sent a call (its first waits on its load too)
    watch: Timer | None = None  # its watchdog (Workers._watch_head), if one is set
    watch_at: float = 0.0  # when that watchdog fires
    stop_sent: bool = False  # it was sent STOP: a clean exit then means it started no call after
    done: bool = False  # its last result ends it (a crash, a finish): it runs none of the calls sent after
    ran: bool = False  # a result of its was taken: it loaded its component, so a FAULT cannot come from it now
    violated: bool = False  # it broke the protocol: killed and recorded once; nothing more of it is taken
    cpu_ns: int = 0  # once reaped: user + system CPU time
    peak_rss: int = 0  # once reaped: its largest resident set, bytes
    hello: Hello | None = None  # a loaded spare's hello, checked before a spawn took it (``Spawner.spawn_nowait``)
    compiling: str | None = None  # the artifact it waits for: it says hello once that compile job has ended

    @property
    def pending(self) -> bool:
        """Asked of the fork-server, whose answer (the pid) has not come yet."""
        return self.pidfd < 0

    def kill(self, reason: str) -> None:
        """SIGKILL the worker (idempotent); ``reason`` is what the chain will say. A pending worker is
        killed as soon as its pid is known."""
        if self.kill_reason is None:
            self.kill_reason = reason
        if not self.exited and not self.pending:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def reap(self) -> int:
        """Collect the exit status once the pidfd is readable (Popen's convention: -N = signal N), and what
        the worker used (``cpu_ns``, ``peak_rss``: the kernel's own account, from wait4)."""
        self.exited = True
        try:
            try:
                _, status, usage = os.wait4(self.pid, 0)
            except ChildProcessError:  # reaped elsewhere (a Popen that polled): its status is all there is
                return self.proc.wait() if self.proc is not None else -signal.SIGKILL
            self.cpu_ns = int((usage.ru_utime + usage.ru_stime) * 1e9)
            self.peak_rss = usage.ru_maxrss * 1024
            code = os.waitstatus_to_exitcode(status)
            if self.proc is not None:
                self.proc.returncode = code
            return code
        finally:
            os.close(self.pidfd)


@dataclass(eq=False)
class LoadedSpare:
    """A worker the fork-server loaded for ``profile`` ahead of any agent (``SpareBorn`` with a token): our
    child, whose line we hold. Its hello comes when it is ready, often before a spawn takes it."""

    pid: int
    pidfd: int
    token: bytes
    profile: LoadProfile
    line: socket.socket
    identity: bytes | None = None  # once its hello has been checked
    hello: Hello | None = None


class AgentLike(Protocol):
    """What the spawner needs of an agent's configuration to find or compile its artifact."""

    @property
    def name(self) -> str: ...
    @property
    def component_path(self) -> str: ...
    @property
    def component_sha256(self) -> str: ...
    @property
    def limits(self) -> Limits: ...
    @property
    def load_profile(self) -> LoadProfile: ...


WORKER_COMMAND = (sys.executable, "-m", "worker")
ZYGOTE_COMMAND = (sys.executable, "-m", "worker._zygote")


def spawn_worker(
    endpoint: str, incarnation: int, log_path: Path, workdir: Path, command: Sequence[str] = WORKER_COMMAND,
    token: bytes | None = None,
) -> WorkerProcess:
    """A worker from a fresh interpreter (the fallback, and the test hook for other worker commands)."""
    token = token or secrets.token_bytes(32)
    read_end, write_end = os.pipe()
    workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [*command, "--bootstrap-fd", str(read_end)],
                pass_fds=(read_end,),
                env=WORKER_ENV,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                umask=0o077,
            )
        os.close(read_end)
        _write_boot(write_end, endpoint, token)
    finally:
        os.close(write_end)
    pidfd = os.pidfd_open(proc.pid)
    return WorkerProcess(pid=proc.pid, pidfd=pidfd, token=token, incarnation=incarnation, proc=proc)


def _write_boot(fd: int, endpoint: str, token: bytes) -> None:
    os.write(fd, Boot(endpoint, token, os.getpid()).encode())


def exit_reason(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown"
        return f"killed by signal {-code} ({name})"
    return f"exited with status {code}"


class Zygote:
    """The supervisor's handle on one fork-server process."""

    def __init__(self, cwd: Path, endpoint: str, on_note: Callable[[Compiled], None],
                 command: Sequence[str] = ZYGOTE_COMMAND) -> None:
        self._on_note = on_note
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = ours
        try:
            self.proc = subprocess.Popen(
                [*command, "--socket-fd", str(theirs.fileno()), "--parent-pid", str(os.getpid()),
                 "--endpoint", endpoint],
                pass_fds=(theirs.fileno(),), env=WORKER_ENV, cwd=cwd, stdin=subprocess.DEVNULL,
                start_new_session=True, umask=0o077,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.pid = self.proc.pid
        self.ready = False
        self.started = time.monotonic()
        self._ids = 0
        # Spare workers the fork-server announced and has not handed out: our children (CLONE_PARENT),
        # so ours to end and reap if they end unused.
        self.spares: dict[int, int] = {}  # pid -> pidfd
        self.loaded: dict[LoadProfile, LoadedSpare] = {}  # the loaded spares among them, by profile
        self._answered: list[Spawned | SpawnRefused] = []  # answers read while waiting for something else

    def wait_ready(self, timeout: float) -> bool:
        """True once the fork-server has said it is ready (waits at most ``timeout``)."""
        deadline = time.monotonic() + timeout
        while not self.ready:
            got = self._recv(max(0.0, deadline - time.monotonic()))
            if got is None:
                return False
            self._take_message(*got)
        return True

    def request(self, workdir: str, artifact: ArtifactOffer | None, compile_request: CompileRequest | None,
                fds: list[int], profile: LoadProfile | None = None) -> int:
        """Ask for a worker (the descriptors go with the request); its id. The answer comes by ``answers``."""
        self._ids += 1
        request = Spawn(self._ids, workdir, artifact, compile_request, profile)
        try:
            socket.send_fds(self.sock, [request.encode()], fds)
        except OSError as exc:
            raise ZygoteGone(f"cannot send to it: {exc}") from exc
        return request.id

    def answers(self, timeout: float) -> list[Spawned | SpawnRefused]:
        """The answers to spawn requests that have come (waiting up to ``timeout`` for the first); notes are
        taken on the way."""
        found, self._answered = self._answered, []
        while (got := self._recv(0.0 if found else timeout)) is not None:
            self._take_message(*got)
            found += self._answered
            self._answered = []
            timeout = 0.0
        return found

    def drain(self) -> None:
        """Take the notes (compile reports) that arrived since the last request, without waiting."""
        while (got := self._recv(0.0)) is not None:
            self._take_message(*got)

    def took(self, spare: LoadedSpare) -> None:
        """Tell the fork-server that ``spare`` has its agent (a spawn of its profile: it makes the next)."""
        try:
            self.sock.send(Took(spare.pid).encode())
        except OSError as exc:
            raise ZygoteGone(f"cannot send to it: {exc}") from exc

    def spare_with_token(self, token: bytes) -> LoadedSpare | None:
        """The loaded spare whose hello carries ``token``, if it is one not yet taken. Its token reaches it
        only after the fork-server announced it, so the announcement is read here if it was not yet."""
        spare = next((s for s in self.loaded.values() if s.token == token), None)
        if spare is None:
            self.drain()
            spare = next((s for s in self.loaded.values() if s.token == token), None)
        return spare

    def take_loaded(self, profile: LoadProfile) -> LoadedSpare | None:
        """The loaded spare for ``profile``, no longer a spare: the caller gives it its agent or ends it."""
        spare = self.loaded.pop(profile, None)
        if spare is not None:
            del self.spares[spare.pid]
        return spare

    def end_spare(self, pid: int) -> None:
        """Kill and reap the spare ``pid`` (unused, or not to be used); nothing if it is not one."""
        pidfd = self.spares.pop(pid, None)
        loaded = next((s for s in self.loaded.values() if s.pid == pid), None)
        if loaded is not None:
            del self.loaded[loaded.profile]
            loaded.line.close()
        if pidfd is not None:
            _end(pidfd)

    def _take_message(self, message: FromForkServer, fds: list[int]) -> None:
        if isinstance(message, SpareBorn) and message.token is not None and message.profile is not None:
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise ZygoteGone("it announced a loaded spare without its line")
            line = socket.socket(fileno=fds[0])
            try:
                pidfd = os.pidfd_open(message.pid)
            except OSError:  # already reaped elsewhere: nothing to track
                line.close()
                return
            old = self.loaded.get(message.profile)
            if old is not None:  # the fork-server keeps one per profile: an older one is not its any more
                self.end_spare(old.pid)
            self.spares[message.pid] = pidfd
            self.loaded[message.profile] = LoadedSpare(message.pid, pidfd, message.token, message.profile, line)
            return
        for fd in fds:  # no other message comes with a descriptor
            os.close(fd)
        match message:
            case Ready(threads=threads, clone_parent=clone_parent):
                if threads != 1 or not clone_parent:
                    raise ZygoteGone(f"it cannot fork workers safely here ({message})")
                self.ready = True
            case Compiled():
                self._on_note(message)
            case SpareBorn(pid=pid):
                with contextlib.suppress(OSError):  # already reaped elsewhere: nothing to track
                    self.spares[pid] = os.pidfd_open(pid)
            case SpareEnded(pid=pid):
                self.end_spare(pid)
            case Spawned() | SpawnRefused():  # read on the way to something else: kept for ``answers``
                self._answered.append(message)
            case _:
                pass

    def take_spare(self, pid: int) -> int | None:
        """The pidfd of the spare worker ``pid`` if a spawn just handed it out, else None."""
        return self.spares.pop(pid, None)

    def _recv(self, timeout: float) -> tuple[FromForkServer, list[int]] | None:
        """One message and its descriptors (a loaded spare's line comes with its announcement), or None if
        none came in ``timeout``; ZygoteGone if the fork-server is gone."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return None
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_MESSAGE, 1)
        except OSError as exc:
            raise ZygoteGone(f"its socket failed: {exc}") from exc
        if not data:
            raise ZygoteGone("it closed its socket")
        try:
            return decode_from_fork_server(data), fds
        except ProtocolError as exc:
            for fd in fds:
                os.close(fd)
            raise ZygoteGone(f"it sent a malformed message: {exc}") from exc

    def close(self) -> str:
        """End the fork-server, then its unused spare; return how the fork-server ended."""
        self.sock.close()
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "did not end"
        finally:
            for spare in self.loaded.values():
                spare.line.close()
            self.loaded.clear()
            for pidfd in self.spares.values():
                _end(pidfd)
            self.spares.clear()
        return exit_reason(code)


def _end(pidfd: int) -> None:
    """Kill and reap a child that was never given an agent."""
    try:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
    finally:
        os.close(pidfd)


@dataclass(slots=True)
class _Asked:
    """A spawn the fork-server has been asked for: what its fallback would need."""

    worker: WorkerProcess
    endpoint: str
    log_path: Path
    workdir: Path
    deadline: float


class Spawner:
    """Starts workers for one supervisor: through the fork-server when it can, else from scratch."""

    def __init__(self, home: Home, log: Callable[[str], None], command: Sequence[str] = WORKER_COMMAND,
                 *, use_zygote: bool = True, zygote_command: Sequence[str] | None = None) -> None:
        self._home = home
        self._log = log
        self._command = tuple(command)
        self.cache = ArtifactCache(home.root / "cache", log)
        self.zygote: Zygote | None = None
        # Another worker command (a test hook) runs as given, with no fork-server unless the
        # hook brings its own. The fork-server's CLONE_PARENT path exists for these machines only.
        if zygote_command is None and self._command == WORKER_COMMAND:
            zygote_command = ZYGOTE_COMMAND
        self._zygote_command = tuple(zygote_command or ())
        self._use_zygote = use_zygote and bool(self._zygote_command) and platform.machine() in CLONE_MACHINES
        self._first = True
        self._failures = 0  # fork-servers in a row that never became ready
        self._pending: dict[int, _Asked] = {}  # spawn request id -> the worker waiting for its answer
        self._settled: list[WorkerProcess] = []  # pending ones started another way when a fork-server went
        if self._use_zygote:
            self._start_zygote()

    def _start_zygote(self) -> None:
        try:
            self.zygote = Zygote(self._home.run, self._home.workers_endpoint, self.cache.compiled, self._zygote_command)
        except OSError as exc:
            self.zygote = None
            self._log(f"cannot start the fork-server ({exc}); workers start from a fresh interpreter")

    def _usable_zygote(self) -> Zygote | None:
        zygote = self.zygote
        if zygote is None:
            return None
        try:
            if not zygote.ready:
                # The first spawn waits for the fork-server's imports; later ones never wait for a new one.
                zygote.wait_ready(ZYGOTE_READY_TIMEOUT_S if self._first else 0.0)
            if zygote.ready:
                zygote.drain()
                return zygote
            if self._first:
                raise ZygoteGone(f"not ready within {ZYGOTE_READY_TIMEOUT_S} s")
            return None
        except ZygoteGone as exc:
            self._replace_zygote(str(exc))
            return None

    def _replace_zygote(self, why: str) -> None:
        assert self.zygote is not None
        old = self.zygote
        how = old.close()
        self.zygote = None
        self._abandon_pending()
        self.cache.compiling.clear()
        self._failures = 0 if old.ready else self._failures + 1
        if self._failures >= MAX_ZYGOTE_FAILURES:
            self._log(f"fork-server {old.pid} is gone ({why}; {how}); {self._failures} in a row never became "
                      "ready, so workers start from a fresh interpreter from now on")
            return
        self._log(f"fork-server {old.pid} is gone ({why}; {how}); starting a new one (until it is ready, workers "
                  "start from a fresh interpreter)")
        self._start_zygote()

    def spawn(self, endpoint: str, incarnation: int, log_path: Path, workdir: Path,
              agent: AgentLike | None = None) -> WorkerProcess:
        """A worker, waiting for the fork-server's answer (``spawn_nowait`` does not wait)."""
        worker = self.spawn_nowait(endpoint, incarnation, log_path, workdir, agent)
        deadline = time.monotonic() + ZYGOTE_REPLY_TIMEOUT_S + 1
        while worker.pending and time.monotonic() < deadline:
            self.settle(max(0.0, deadline - time.monotonic()))
        return worker

    def spawn_nowait(self, endpoint: str, incarnation: int, log_path: Path, workdir: Path,
                     agent: AgentLike | None = None) -> WorkerProcess:
        """A worker: through the fork-server, a pending one whose pid ``settle`` fills in once the answer
        comes (the supervisor's loop never waits for a fork); else one from a fresh interpreter."""
        zygote = self._usable_zygote() if agent is not None else None
        self._first = False
        if zygote is None or agent is None:
            return spawn_worker(endpoint, incarnation, log_path, workdir, self._command)
        key = self.cache.key(agent.component_sha256, agent.limits)
        artifact = self.cache.lookup(key)  # an altered artifact is noticed at the next spawn, loaded spare or not
        spare = zygote.take_loaded(agent.load_profile) if artifact is not None else None
        if spare is not None:
            given = self._give(zygote, spare, incarnation, log_path)
            if given is not None:
                return given
        compile_request = None
        if artifact is None:
            compile_request = self.cache.compile_request(
                key, agent.component_path, agent.component_sha256, agent.limits, f"{agent.name} ({agent.component_path})",
            )
        token = secrets.token_bytes(32)
        read_end, write_end = os.pipe()
        try:
            _write_boot(write_end, endpoint, token)  # waiting in the pipe: the worker never waits for us
        finally:
            os.close(write_end)
        worker = WorkerProcess(pid=0, pidfd=-1, token=token, incarnation=incarnation,
                               compiling=None if compile_request is None else key)
        try:
            log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                request = zygote.request(str(workdir), artifact, compile_request, [read_end, log_fd],
                                         agent.load_profile)
            finally:
                os.close(log_fd)
        except ZygoteGone as exc:
            self._replace_zygote(str(exc))
            return spawn_worker(endpoint, incarnation, log_path, workdir, self._command, token)
        finally:
            os.close(read_end)
        self._pending[request] = _Asked(worker, endpoint, log_path, workdir, time.monotonic() + ZYGOTE_REPLY_TIMEOUT_S)
        return worker

    def _give(self, zygote: Zygote, spare: LoadedSpare, incarnation: int, log_path: Path) -> WorkerProcess | None:
        """The loaded spare as the agent's worker: its log file sent over its line, the fork-server told. It
        says hello (or has said it: ``WorkerProcess.hello``) with its own token. None if it is gone."""
        try:
            log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            spare.line.close()
            _end(spare.pidfd)
            raise
        try:
            size = os.fstat(log_fd).st_size.to_bytes(LOG_SIZE_BYTES, "big")
            socket.send_fds(spare.line, [TAKEN + spare.token + size], [log_fd])  # the token: the fork-server's may be late
        except OSError as exc:
            self._log(f"loaded spare worker {spare.pid} cannot be given its agent ({exc}); asking for another")
            _end(spare.pidfd)
            return None
        finally:
            os.close(log_fd)
            spare.line.close()
        try:
            zygote.took(spare)
        except ZygoteGone as exc:  # the worker is ours and has its agent; the next spawn starts a new fork-server
            self._log(f"fork-server {zygote.pid} could not be told a spare was taken: {exc}")
        return WorkerProcess(pid=spare.pid, pidfd=spare.pidfd, token=spare.token, incarnation=incarnation,
                             identity=spare.identity, hello=spare.hello)

    def loaded_spare(self, token: bytes) -> LoadedSpare | None:
        """The loaded spare not yet taken whose hello carries ``token``, if there is one."""
        zygote = self.zygote
        if zygote is None:
            return None
        try:
            return zygote.spare_with_token(token)
        except ZygoteGone as exc:
            self._replace_zygote(str(exc))
            return None

    def end_spare(self, pid: int) -> None:
        if self.zygote is not None:
            self.zygote.end_spare(pid)

    def fileno(self) -> int | None:
        """The fork-server's socket, for the supervisor's poller: readable when answers come."""
        return self.zygote.sock.fileno() if self.zygote is not None else None

    def settle(self, timeout: float = 0.0) -> list[WorkerProcess]:
        """Fill in the pending workers whose answers have come (waiting up to ``timeout``); a refusal, a
        fork-server gone or silent past its deadline starts them from a fresh interpreter instead. The
        workers settled, each with its pidfd (and killed at once if it was killed while pending)."""
        done: list[WorkerProcess] = []
        try:
            if self.zygote is None:
                raise ZygoteGone("it is not running")
            for answer in self.zygote.answers(timeout if self._pending else 0.0):
                asked = self._pending.pop(answer.id, None)
                if asked is None:
                    continue  # an answer to a spawn already started another way
                if isinstance(answer, Spawned):
                    pidfd = self.zygote.take_spare(answer.pid)
                    asked.worker.pid = answer.pid
                    asked.worker.pidfd = pidfd if pidfd is not None else os.pidfd_open(answer.pid)  # our child
                else:
                    self._log(f"the fork-server refused a spawn ({answer.error}); that worker starts from a fresh "
                              "interpreter")
                    self._fall_back(asked)
                done.append(asked.worker)
            late = [a for a in self._pending.values() if a.deadline < time.monotonic()]
            if late:
                raise ZygoteGone(f"no answer within {ZYGOTE_REPLY_TIMEOUT_S} s")
        except ZygoteGone as exc:  # noticed here, with or without a spawn waiting: a new one starts at once
            if self.zygote is not None:
                self._replace_zygote(str(exc))
            self._abandon_pending()
        done += self._settled
        self._settled = []
        for worker in done:
            if worker.kill_reason is not None:
                worker.kill(worker.kill_reason)
        return done

    def _abandon_pending(self) -> None:
        """The fork-server that was asked is gone: its pending workers start from a fresh interpreter."""
        for asked in self._pending.values():
            self._fall_back(asked)
            self._settled.append(asked.worker)
        self._pending.clear()

    def _fall_back(self, asked: _Asked) -> None:
        fresh = spawn_worker(asked.endpoint, asked.worker.incarnation, asked.log_path, asked.workdir, self._command,
                             asked.worker.token)
        asked.worker.pid, asked.worker.pidfd, asked.worker.proc = fresh.pid, fresh.pidfd, fresh.proc

    def close(self) -> None:
        if self.zygote is not None:
            with contextlib.suppress(ZygoteGone):
                if self.zygote.ready:
                    self.zygote.drain()  # tag what was compiled since the last spawn, for the next start
            self.zygote.close()
            self.zygote = None
