"""The fork-server: a pre-started, single-threaded process that forks workers and compile jobs.

Started by the supervisor as ``python -m worker._zygote --socket-fd N --parent-pid P --endpoint E``.
It imports everything a worker needs (wasmtime, pyzmq, cryptography, the
worker's own modules), freezes the garbage collector's view of those objects,
then waits for requests on a ``SOCK_SEQPACKET`` socket to the supervisor. It
opens no ZeroMQ socket, creates no wasmtime engine, compiles nothing and starts
no thread, so it stays single-threaded and forking it is safe; it checks
``/proc/self/task`` before every fork and refuses to fork with a second thread.

A worker is forked with ``clone(CLONE_PARENT)``: its parent is the supervisor,
not this process, so the supervisor reaps it (exact exit status through its
pidfd) and the worker's parent-death signal fires when the supervisor dies.
This process does not outlive the supervisor either (parent-death signal), and
if it dies its workers keep running. The forked child sets up what ``Popen``
would (new session, log file as stdout/stderr, private working directory,
umask, no inherited descriptors but its bootstrap pipe) and then calls
:func:`worker.__main__.run`, which applies the worker's own hardening and makes
its own key.

Compile jobs are ordinary children of this process: each compiles one
component with the worker's engine configuration (in parallel: the job never
forks), writes the serialized artifact into the supervisor's cache directory
and reports its SHA-256. Workers forked while their component compiles wait
for the job before they start.

A worker never opens the cache: this process copies each artifact the
supervisor vouches for into a memfd once, checking its SHA-256 on the way,
seals it against any write, and hands the descriptor to every worker of that
component (inherited at the fork, or passed over the waiting worker's socket
once its compile job is done). The workers map it with
``Component.deserialize_file``, so the pages of the code are shared and hold
exactly the bytes that were checked.

Between spawns this process keeps one spare worker: forked into a fresh
cgroup, set up, hardened, with its key made and its ZeroMQ socket connected,
waiting on a socketpair. A spawn whose artifact is ready hands the spare its
bootstrap pipe, log file and artifact over that line (the spare answers the
supervisor's hello as any worker) instead of forking. For the profiles
spawned last it also keeps a loaded spare, which has loaded the component as
well; its line goes to the supervisor with its announcement and its token
after it, it says hello with no agent, and a spawn of its profile takes it
from the supervisor directly (``docs/wire-protocol.md`` section 3a). The next spare is made
50 ms later, so its fork and hardening do not compete with the agent just
started, unless spawns come in a burst (this one within 50 ms of the one
before, as a tree's children or a crash storm's replacements do): then the
next spare is made at once, so it hardens while the agent just started loads,
and the next spawn finds it ready. A spawn that must wait for a compile, or
finds no spare, forks as before. The supervisor, the spare's parent, is told
of each spare so it can reap one that ends unused.

Its messages with the supervisor are the typed ones of ``theater.forkserver``
(one JSON datagram each, descriptors as SCM_RIGHTS; ``docs/wire-protocol.md``
section 3a): ``Spawn`` with [bootstrap read end, log file] in; ``Spawned`` or
``SpawnRefused``, ``Compiled``, ``Ready`` (once, at start), ``SpareBorn`` (with
a loaded spare's line) and ``SpareEnded`` out, ``Took`` in. Between this process
and its own children (inside the worker package): to a plain spare,
{"artifact": {"key", "sha256", "size"}} with [bootstrap read end, log file,
artifact memfd]; to a loaded spare, its token.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import gc
import hashlib
import json
import os
import platform
import resource
import secrets
import select
import signal
import socket
import sys
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from theater.errors import ProtocolError
from theater.exits import WorkerExit
from theater.forkserver import (
    LOG_SIZE_BYTES,
    MAX_MESSAGE,
    TAKEN,
    TOKEN_BYTES,
    ArtifactOffer,
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
    decode_to_fork_server,
)
from theater.home import Home, log_line
from theater.records import sign_hello
from theater.spec import LoadProfile

from . import _harden
from ._engine import ARTIFACT_MEMFD_PREFIX, ARTIFACT_SEALS

if TYPE_CHECKING:
    from ._loop import Link

__all__ = ["CLONE_PARENT_SUPPORTED", "clone_parent", "main", "thread_count"]

PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
COMPILE_CPU_S = 600  # a compile job's CPU seconds (an 18 MB Python guest takes about 6 s here)
COMPILE_AS_BYTES = 16 * 1024**3  # a compile job's address space
PROGRESS_EVERY_S = 2.0
MAX_SEALED = 64  # artifacts kept as memfds; the least recently spawned is dropped first
SPARES = True  # keep workers forked and hardened ahead of the next spawn
SETTLE_MS = 5000  # how long a loaded spare waits for its connection's handshake before it may lock down ahead
MAX_LOADED = 4  # load profiles with a spare that has also loaded their component: the most recently spawned
SPARE_AFTER_S = 0.05  # after a spare is given out, how long this process waits before it makes the next
BURST_S = 0.05  # spawns closer together than this are a burst: the next spare is made at once

_libc = ctypes.CDLL(None, use_errno=True)
# Called with the GIL held, exactly as os.fork calls fork().
_libc_gil = ctypes.PyDLL(None, use_errno=True)
_libc_gil.syscall.restype = ctypes.c_long
_pyapi = ctypes.pythonapi

CLONE_PARENT = 0x00008000
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}.get(platform.machine())
CLONE_PARENT_SUPPORTED = _SYS_CLONE is not None and sys.platform == "linux"


def log(message: str) -> None:
    print(log_line("zygote", "INFO", message), file=sys.stderr, flush=True)


def thread_count() -> int:
    """Threads of this process as the kernel sees them (native ones included)."""
    return len(os.listdir("/proc/self/task"))


def _prctl(option: int, arg: int | bytes) -> None:
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def clone_parent() -> int:
    """``fork()``, except that the child's parent is this process's parent.

    Python's own fork bookkeeping runs around it exactly as in ``os.fork``
    (``PyOS_BeforeFork`` / ``PyOS_AfterFork_Child`` / ``_Parent``: import lock,
    thread state, ``os.register_at_fork`` hooks, the GIL). What a raw clone
    skips is glibc's fork wrapper: ``pthread_atfork`` handlers (none that
    matter here: OpenSSL and ZeroMQ detect a fork by its pid) and the thread
    id cached in the thread descriptor, which keeps the zygote's value and
    only serves glibc as an owner tag of recursive mutexes — a value no thread
    of the child can share while the zygote's pid is taken.
    """
    assert _SYS_CLONE is not None
    _pyapi.PyOS_BeforeFork()
    pid = _libc_gil.syscall(
        ctypes.c_long(_SYS_CLONE), ctypes.c_ulong(CLONE_PARENT | signal.SIGCHLD),
        ctypes.c_void_p(0), ctypes.c_void_p(0), ctypes.c_void_p(0), ctypes.c_void_p(0),
    )
    if pid == 0:
        _pyapi.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    _pyapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"clone(CLONE_PARENT) failed: {os.strerror(err)}")
    return int(pid)


# --- the forked worker --------------------------------------------------------------------


def _close_inherited(keep: set[int]) -> None:
    """Close every descriptor but ``keep`` and wasmtime's memfds (the children must not close those).

    Other components' artifact memfds are closed too: a worker keeps only its own.
    """
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in keep:
            continue
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the descriptor listdir itself used
        if target.startswith("/memfd:") and not target.startswith("/memfd:" + ARTIFACT_MEMFD_PREFIX):
            continue
        with contextlib.suppress(OSError):
            os.close(fd)


def _as_worker(workdir: str, output_fd: int, keep: set[int]) -> None:
    """In a forked child: what Popen would have set up for a worker (its name, session, standard
    streams, private working directory, umask, the signals a fresh interpreter has, no other inherited
    descriptors)."""
    _prctl(PR_SET_NAME, b"theater-worker")
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(output_fd, 1)
    os.dup2(output_fd, 2)
    os.makedirs(workdir, mode=0o700, exist_ok=True)  # the supervisor made it at its start; again if removed since
    os.chdir(workdir)
    os.umask(0o077)
    for sig in (signal.SIGCHLD, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as the interpreter a fresh worker starts sets it: EPIPE, not death
    _close_inherited({0, 1, 2, *keep, *_harden.inherited_fds()})


def _exit_with(body: Callable[[], int]) -> NoReturn:
    """Run a forked worker's ``body`` and end the process with its status, whatever happens."""
    code = 1
    try:
        code = body()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _become_worker(boot_fd: int, log_fd: int, workdir: str, artifact: Any, go_fd: int | None) -> NoReturn:
    """In the child: what Popen would have set up, then the worker's own entry point."""

    def body() -> int:
        keep = {boot_fd}
        if go_fd is not None:
            keep.add(go_fd)
        if artifact is not None:
            keep.add(artifact["fd"])
        _as_worker(workdir, log_fd, keep)
        offered = artifact
        if go_fd is not None:  # the component is being compiled: wait for the job's verdict
            with socket.socket(fileno=go_fd) as go:
                verdict, fds, _flags, _addr = socket.recv_fds(go, MAX_MESSAGE, 1)
            offered = json.loads(verdict) if verdict and fds else None
            if offered is not None:
                offered["fd"] = fds[0]
        from worker.__main__ import run

        return run(boot_fd, offered)

    _exit_with(body)


def _become_spare(line_fd: int, workdir: str, endpoint: str, parent_pid: int, profile: LoadProfile | None,
                  artifact: dict[str, Any] | None) -> NoReturn:
    """In a spare child: set up, harden, make a key and connect as a worker would, then wait for an agent.

    Nothing here depends on the agent. A plain spare (no ``profile``) is handed
    the bootstrap (endpoint, token), the log file and the artifact over
    ``line_fd`` by the fork-server when a spawn takes it. A loaded spare also
    loads ``profile``'s component from ``artifact``; then it reads its token from
    the line (the fork-server writes it once the supervisor has been told of
    this spare), says hello to the supervisor, and waits for what the
    supervisor sends over the line when a spawn of the profile takes it: the
    agent's log file. Until then stdout and stderr are /dev/null. A spare whose
    line closes before that ends; the supervisor ends a loaded spare it no
    longer wants, and every spare dies with the supervisor.
    """

    def body() -> int:
        devnull = os.open(os.devnull, os.O_WRONLY)
        keep = {line_fd} if artifact is None else {line_fd, artifact["fd"]}
        _as_worker(workdir, devnull, keep)
        from worker._loop import connect

        confinement = _harden.harden_before_connect(parent_pid, endpoint, keep=frozenset(keep))
        _harden.prepare_lock_down()
        link = connect(endpoint, SETTLE_MS if profile is not None else 0)
        line = socket.socket(fileno=line_fd)  # before any lock-down: this asks the kernel what the socket is
        sign_hello(link.key, bytes(TOKEN_BYTES))  # a process's first signature costs 0.2 ms more: not at its hello
        with line:
            if profile is None or artifact is None:
                return _plain_spare(line, confinement, link)
            return _loaded_spare(line, endpoint, confinement, link, profile, artifact)

    _exit_with(body)


def _plain_spare(line: socket.socket, confinement: dict[str, str], link: Link) -> int:
    data, fds, _flags, _addr = socket.recv_fds(line, MAX_MESSAGE, 3)
    if not data or len(fds) != 3:  # the fork-server ended before this spare was needed
        return 0
    boot_fd, log_fd, artifact_fd = fds
    _log_to(log_fd)
    from worker.__main__ import run

    return run(boot_fd, {**json.loads(data)["artifact"], "fd": artifact_fd}, confinement, link)


def _loaded_spare(line: socket.socket, endpoint: str, confinement: dict[str, str], link: Link, profile: LoadProfile,
                  artifact: dict[str, Any]) -> int:
    from worker._loop import hello_frames, load_ahead, serve

    kept: dict[str, Any] | None = {**artifact, "fd": os.dup(artifact["fd"])}  # in case it loads at the SPEC
    ahead = load_ahead(profile, artifact)  # the artifact's descriptor is closed, used or not
    if ahead is not None:
        assert kept is not None
        os.close(kept["fd"])
        kept = None
        if link.settled:  # else its agent's lock-down does it all, as for any worker
            _harden.lock_down_ahead(profile.limits)
    # Two writers use the line: the fork-server writes the token once the supervisor knows of this spare, and
    # the supervisor, when a spawn takes the spare, sends the token again with the agent's log file. A spawn
    # may take the spare as soon as it is announced, so either may come first; the hello goes with the first.
    token: bytes | None = None
    log_fd: int | None = None
    while log_fd is None:
        data, fds, _flags, _addr = socket.recv_fds(line, MAX_MESSAGE, 1)  # recvmsg: allowed after lock-down
        taken = data.startswith(TAKEN) and len(fds) == 1
        said, size = (data[len(TAKEN):-LOG_SIZE_BYTES], data[-LOG_SIZE_BYTES:]) if taken else (data, b"")
        if len(said) != TOKEN_BYTES or len(fds) != taken or token not in (None, said) or len(data) != (
                len(TAKEN) + TOKEN_BYTES + LOG_SIZE_BYTES if taken else TOKEN_BYTES):
            for fd in fds:  # the line closed before a spawn took this spare, or is not what it should be
                os.close(fd)
            return 0 if not data else WorkerExit.PROTOCOL
        if token is None:
            token = said
            link.sock.send_multipart(hello_frames(link, token, confinement))
        if taken:
            log_fd = fds[0]
            _harden.log_handed_over(int.from_bytes(size, "big"))
    assert token is not None
    _log_to(log_fd)
    return serve(endpoint, token, confinement, kept, link, ahead, greeted=True)


def _log_to(log_fd: int) -> None:
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)


def seal_artifact(key: str, path: str, sha256: str) -> tuple[int, int]:
    """Copy a cached artifact into a sealed memfd, checking its SHA-256 on the way: (fd, size).

    Raises ValueError if the file's bytes are not the ones recorded. Once
    sealed, nobody can change the memfd's bytes, so workers load exactly what
    was checked here, however the cache file changes later.
    """
    src = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    fd = os.memfd_create(ARTIFACT_MEMFD_PREFIX + key[:16], os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        digest = hashlib.sha256()
        size = 0
        while chunk := os.read(src, 1 << 20):
            digest.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
            size += len(chunk)
        if digest.hexdigest() != sha256:
            raise ValueError(f"cached artifact {path} does not have the recorded SHA-256")
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, ARTIFACT_SEALS)
        return fd, size
    except BaseException:
        os.close(fd)
        raise
    finally:
        os.close(src)


# --- compile jobs ------------------------------------------------------------------------------


@dataclass
class Job:
    key: str
    path: str
    label: str
    pid: int
    result_fd: int
    started: float
    waiters: list[socket.socket] = field(default_factory=list)
    profiles: list[LoadProfile] = field(default_factory=list)  # spawned while it compiles: spares load them after
    output: bytes = b""
    next_progress: float = 0.0


def _compile_job(request: CompileRequest, result_fd: int) -> None:
    """In a child of the zygote: compile one component into the cache. Never returns."""
    code = 1
    result: dict[str, Any]
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        _prctl(PR_SET_NAME, b"theater-compile")
        for fd in _harden.inherited_fds():  # workers' hardening, not a compile job's
            os.close(fd)
        # It reads guest bytes: no privilege gain, no core, and a ceiling on CPU time and memory
        # so a hostile component cannot hold the machine while it compiles.
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, (COMPILE_CPU_S, COMPILE_CPU_S))
        resource.setrlimit(resource.RLIMIT_AS, (COMPILE_AS_BYTES, COMPILE_AS_BYTES))
        _harden.first_out_of_memory()  # a machine out of memory loses the compile, not the supervisor
        from theater.spec import Limits

        from ._engine import artifact_key, compile_component, file_signature, make_engine, read_component

        limits = Limits.from_dict(request.limits)
        if artifact_key(request.component_sha256, limits) != request.key:
            raise ValueError("the compile request's key does not match its component and limits")
        source = read_component(request.component_path, request.component_sha256)
        engine = make_engine(limits, parallel_compilation=True)
        blob = compile_component(engine, source).serialize()
        final = request.path
        tmp = f"{final}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            os.rename(tmp, final)
            signature = file_signature(os.fstat(fd))
        finally:
            os.close(fd)
        result = {"ok": True, "sha256": hashlib.sha256(blob).hexdigest(), "signature": signature, "size": len(blob)}
        code = 0
    except BaseException as exc:
        detail = str(exc).strip().splitlines()
        result = {"ok": False, "error": f"{type(exc).__name__}: {detail[-1] if detail else ''}"}
    try:
        os.write(result_fd, json.dumps(result).encode())
    finally:
        os._exit(code)


# --- the server ------------------------------------------------------------------------------


@dataclass
class Spare:
    """A worker forked and hardened ahead of need. A plain spare (``profile`` None) waits on ``line`` for the
    agent this process hands it. A loaded spare has also loaded and instantiated ``profile``'s component; its
    line is the supervisor's, and this process watches it through ``pidfd`` until the supervisor says it
    took it (``Took``)."""

    pid: int
    line: socket.socket | None
    profile: LoadProfile | None = None
    pidfd: int = -1

    def fileno(self) -> int:
        """Readable once the spare has ended (a plain spare never writes to its line)."""
        return self.line.fileno() if self.line is not None else self.pidfd


class Zygote:
    def __init__(self, sock: socket.socket, endpoint: str, parent_pid: int) -> None:
        self.sock = sock
        self.endpoint = endpoint
        self.parent_pid = parent_pid
        self.regroup = False  # a fork left this process in a group that is not a fresh one
        self.gone = False  # the supervisor's end of the socket is closed
        self.spare: Spare | None = None  # the plain spare
        self.loaded: dict[LoadProfile, Spare] = {}  # the loaded spares, one per recent profile
        # The profiles spawned lately (most recent last, at most MAX_LOADED), with the artifact each loads.
        self.recent: OrderedDict[LoadProfile, ArtifactOffer] = OrderedDict()
        self.spares_made = 0
        self.spares_enabled = SPARES
        self.spare_after = 0.0  # the next spare is made once this process has been idle until then
        self.last_spawn = -BURST_S  # monotonic time of the last spawn request
        self.jobs: dict[str, Job] = {}
        self.sealed: OrderedDict[str, tuple[str, int, int]] = OrderedDict()  # key -> (sha256, fd, size)

    def _sealed(self, key: str, path: str, sha256: str) -> dict[str, Any] | None:
        """The artifact as a sealed memfd (made once per artifact, shared by every worker), or None."""
        entry = self.sealed.get(key)
        if entry is not None and entry[0] != sha256:
            self._unseal(key)
            entry = None
        if entry is None:
            try:
                fd, size = seal_artifact(key, path, sha256)
            except (OSError, ValueError) as exc:
                log(f"not using cached artifact {key[:12]}…: {exc}")
                return None
            entry = self.sealed[key] = (sha256, fd, size)
            while len(self.sealed) > MAX_SEALED:
                self._unseal(next(iter(self.sealed)))
        self.sealed.move_to_end(key)
        return {"key": key, "fd": entry[1], "sha256": sha256, "size": entry[2]}

    def _unseal(self, key: str) -> None:
        _, fd, _ = self.sealed.pop(key)
        os.close(fd)

    def serve(self) -> int:
        while not self.gone:
            self._prepare_next()
            timeout = PROGRESS_EVERY_S if self.jobs else None
            if self._missing():
                timeout = max(0.0, min(timeout or SPARE_AFTER_S, self.spare_after - time.monotonic()))
            fds = [self.sock.fileno(), *(job.result_fd for job in self.jobs.values())]
            spares = self._spares()
            fds += [spare.fileno() for spare in spares]
            ready, _, _ = select.select(fds, [], [], timeout)
            for job in list(self.jobs.values()):
                if job.result_fd in ready:
                    self._job_output(job)
            if self.sock.fileno() in ready and not self._request():
                return 0  # the supervisor closed its end: it is going down
            for spare in spares:
                if spare.fileno() in ready and spare in self._spares():
                    self._spare_ended(spare, "it ended before it was needed")
                    if spare.profile is not None:  # no other until that profile is spawned again
                        self.recent.pop(spare.profile, None)
            now = time.monotonic()
            for job in self.jobs.values():
                if now >= job.next_progress:
                    job.next_progress = now + PROGRESS_EVERY_S
                    log(f"still compiling {job.label}: {now - job.started:.1f} s so far")
        return 0

    def _spares(self) -> list[Spare]:
        return [*self.loaded.values(), *([self.spare] if self.spare is not None else [])]

    def _missing(self) -> list[LoadProfile | None]:
        """The spares to make, most wanted first: one loaded for each recent profile (the latest first),
        then a plain one (None)."""
        if not self.spares_enabled:
            return []
        wanted: list[LoadProfile | None] = [p for p in reversed(self.recent) if p not in self.loaded]
        return [*wanted, None] if self.spare is None else wanted

    def _prepare_next(self) -> None:
        """While nobody waits: a fresh cgroup for the next fork, and a spare worker born in it (one per
        turn, the one most wanted first)."""
        if self.regroup:
            self._regroup()
        missing = self._missing()
        if missing and time.monotonic() >= self.spare_after:
            self._make_spare(missing[0])
            if self.regroup:
                self._regroup()

    def _make_spare(self, profile: LoadProfile | None) -> None:
        threads = thread_count()
        if threads != 1:
            log(f"{threads} threads; no spare worker")
            return
        artifact = None
        if profile is not None:
            offer = self.recent[profile]
            artifact = self._sealed(offer.key, offer.path, offer.sha256)
            if artifact is None:  # the artifact is gone from the cache: no spare loads it
                del self.recent[profile]
                return
        self.spares_made += 1
        workdir = Home(_harden.home_of(self.endpoint)).workdir
        ours = theirs = None
        try:
            workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            pid = clone_parent()
        except OSError as exc:
            for end in (ours, theirs):
                if end is not None:
                    end.close()
            log(f"cannot make a spare worker ({exc}); every worker is forked on demand from now on")
            self.spares_enabled = False
            return
        if pid == 0:
            ours.close()
            _become_spare(theirs.detach(), str(workdir), self.endpoint, self.parent_pid, profile, artifact)
        theirs.close()
        self.regroup = True
        if profile is None:
            self.spare = Spare(pid, ours)
            self._send(SpareBorn(pid))
            return
        # A loaded spare's line goes to the supervisor, and its token follows on the line once the supervisor
        # has been told of it: whenever its hello comes, the supervisor knows the token.
        self.loaded[profile] = Spare(pid, None, profile, os.pidfd_open(pid))  # our clone: its pid is not reused yet
        token = secrets.token_bytes(TOKEN_BYTES)
        with ours:
            self._send(SpareBorn(pid, token, profile), ours.fileno())
            with contextlib.suppress(OSError):
                ours.send(token)

    def _forget(self, spare: Spare) -> None:
        if self.spare is spare:
            self.spare = None
        elif spare.profile is not None and self.loaded.get(spare.profile) is spare:
            del self.loaded[spare.profile]
        if spare.line is not None:
            spare.line.close()
        else:
            os.close(spare.pidfd)

    def _spare_ended(self, spare: Spare, why: str) -> None:
        """The spare is unusable or not wanted: the supervisor (its parent) ends it and reaps it."""
        self._forget(spare)
        log(f"spare worker {spare.pid}: {why}")
        self._send(SpareEnded(spare.pid))

    def _give_spare(self, boot_fd: int, log_fd: int, artifact: dict[str, Any]) -> int | None:
        """Hand the plain spare its agent (a loaded spare is the supervisor's to give). Its pid, or None if
        there is none that can take it."""
        spare = self.spare
        if spare is None or spare.line is None:
            return None
        try:
            message = json.dumps({"artifact": {k: v for k, v in artifact.items() if k != "fd"}}).encode()
            socket.send_fds(spare.line, [message], [boot_fd, log_fd, artifact["fd"]])
        except OSError as exc:
            self._spare_ended(spare, f"cannot be given its agent ({exc})")
            return None
        self._forget(spare)
        return spare.pid

    def _spawned(self, profile: LoadProfile, offer: ArtifactOffer) -> None:
        """``profile`` was spawned: keep a spare loaded for it, ending the one of the profile spawned least
        lately past MAX_LOADED."""
        self.recent[profile] = offer
        self.recent.move_to_end(profile)
        while len(self.recent) > MAX_LOADED:
            old, _ = self.recent.popitem(last=False)
            spare = self.loaded.get(old)
            if spare is not None:
                self._spare_ended(spare, "its component was not spawned lately")

    def _regroup(self) -> None:
        self.regroup = False
        why = _harden.enter_next_cgroup()
        if why:
            log(f"the next worker makes its own cgroup: {why}")

    def _send(self, message: FromForkServer, fd: int | None = None) -> None:
        try:
            if fd is None:
                self.sock.send(message.encode())
            else:
                socket.send_fds(self.sock, [message.encode()], [fd])
        except OSError:  # the supervisor closed its end (it is going down): end quietly, as on EOF
            self.gone = True

    def _request(self) -> bool:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_MESSAGE, 8)
        except ConnectionError:
            return False
        if not data:
            return False  # the supervisor closed its end
        request_id = 0
        try:
            request = decode_to_fork_server(data)
            if isinstance(request, Took):
                if fds:
                    raise ProtocolError("a took note comes with no descriptor")
                self._took(request.pid)
                return True
            request_id = request.id
            if len(fds) != 2:
                raise ProtocolError(f"a spawn request comes with 2 descriptors, not {len(fds)}")
            self._send(Spawned(request.id, self._spawn(request, fds[0], fds[1])))
        except Exception as exc:
            self._send(SpawnRefused(request_id, f"{type(exc).__name__}: {exc}"))
        finally:
            for fd in fds:
                os.close(fd)
        return True

    def _spawning(self) -> None:
        now = time.monotonic()
        burst, self.last_spawn = now - self.last_spawn < BURST_S, now
        # Alone, the next spare is made a little later, not while the agent just started is loading: on two
        # cores its fork and hardening would slow that start by as much as they save. In a burst the next
        # spawn is coming: its spare hardens while this agent loads, and the burst as a whole goes faster.
        self.spare_after = now if burst else now + SPARE_AFTER_S

    def _took(self, pid: int) -> None:
        """The supervisor gave the loaded spare ``pid`` its agent: a spawn of its profile."""
        spare = next((s for s in self.loaded.values() if s.pid == pid), None)
        if spare is None or spare.profile is None:
            return  # it ended, or was let go of, before the note came: nothing of it is left here
        self._spawning()
        self._forget(spare)
        if spare.profile in self.recent:
            self.recent.move_to_end(spare.profile)

    def _spawn(self, request: Spawn, boot_fd: int, log_fd: int) -> int:
        self._spawning()
        offered = request.artifact
        compile_request = request.compile
        artifact = None
        if offered is not None:
            artifact = self._sealed(offered.key, offered.path, offered.sha256)
        go_r = go_w = None
        if compile_request is not None and artifact is None:
            job = self.jobs.get(compile_request.key) or self._start_job(compile_request)
            go_r, go_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            job.waiters.append(go_w)
            if request.profile is not None:
                job.profiles.append(request.profile)
        if artifact is not None and offered is not None and request.profile is not None:
            self._spawned(request.profile, offered)
        if artifact is not None:  # a spare, already hardened, takes the agent
            pid = self._give_spare(boot_fd, log_fd, artifact)
            if pid is not None:
                return pid
        if self.regroup:  # a compile job was just forked from this process's own group
            self._regroup()
        threads = thread_count()
        if threads != 1:
            raise RuntimeError(f"the zygote has {threads} threads; refusing to fork")
        pid = clone_parent()
        if pid == 0:
            _become_worker(boot_fd, log_fd, request.workdir, artifact, None if go_r is None else go_r.detach())
        self.regroup = True
        if go_r is not None:
            go_r.close()
        return pid

    def _start_job(self, request: CompileRequest) -> Job:
        result_r, result_w = os.pipe()
        threads = thread_count()
        if threads != 1:
            raise RuntimeError(f"the zygote has {threads} threads; refusing to fork")
        _harden.leave_cgroups()  # a compile job runs in the fork-server's own groups, not a worker's
        self.regroup = True
        pid = os.fork()
        if pid == 0:
            os.close(result_r)
            self.sock.close()
            _compile_job(request, result_w)
        os.close(result_w)
        label = request.label or request.component_path
        try:
            size = os.stat(request.component_path).st_size
        except OSError:
            size = 0
        log(f"compiling {label} ({size:,} bytes, sha256 {request.component_sha256[:12]}…)")
        now = time.monotonic()
        job = Job(request.key, request.path, label, pid, result_r, now, next_progress=now + PROGRESS_EVERY_S)
        self.jobs[job.key] = job
        return job

    def _job_output(self, job: Job) -> None:
        chunk = os.read(job.result_fd, 65536)
        if chunk:
            job.output += chunk
            return
        os.close(job.result_fd)
        del self.jobs[job.key]
        _, status = os.waitpid(job.pid, 0)
        seconds = time.monotonic() - job.started
        try:
            result = json.loads(job.output)
        except ValueError:
            code = os.waitstatus_to_exitcode(status)
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            with contextlib.suppress(ValueError):
                how = f"was killed by {signal.Signals(-code).name}" if code < 0 else how
            result = {"ok": False, "error": f"the compile job {how} with no result (a ceiling: CPU "
                                            f"{COMPILE_CPU_S} s, address space {COMPILE_AS_BYTES >> 20} MiB?)"}
        artifact = None
        if result.get("ok"):
            log(f"compiled {job.label} in {seconds:.2f} s (artifact {result['size']:,} bytes)")
            artifact = self._sealed(job.key, job.path, result["sha256"])
        else:
            log(f"compiling {job.label} failed after {seconds:.2f} s: {result.get('error')}")
        for go in job.waiters:  # each waiting worker loads the artifact, or compiles for itself
            try:
                if artifact is not None:
                    socket.send_fds(go, [json.dumps({k: v for k, v in artifact.items() if k != "fd"}).encode()],
                                    [artifact["fd"]])
            except OSError:
                pass  # that worker is gone
            finally:
                go.close()
        if artifact is not None:
            for profile in job.profiles:
                self._spawned(profile, ArtifactOffer(job.key, job.path, str(result["sha256"])))
        if result.get("ok"):
            self._send(Compiled(job.key, True, seconds, str(result["sha256"]), int(result["size"]),
                                tuple(int(v) for v in result["signature"])))
        else:
            self._send(Compiled(job.key, False, seconds, error=str(result.get("error", ""))))


def main(argv: list[str]) -> int:
    if len(argv) != 6 or argv[0] != "--socket-fd" or argv[2] != "--parent-pid" or argv[4] != "--endpoint":
        print("usage: python -m worker._zygote --socket-fd N --parent-pid P --endpoint E (started by the supervisor)",
              file=sys.stderr)
        return WorkerExit.USAGE
    sock_fd, parent_pid, endpoint = int(argv[1]), int(argv[3]), argv[5]
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the supervisor died before the signal was armed
        return WorkerExit.PARENT_GONE
    _prctl(PR_SET_NAME, b"theater-zygote")
    sock = socket.socket(fileno=sock_fd)
    # Everything a worker imports, imported once here.
    import wasmtime  # noqa: F401
    import zmq  # noqa: F401
    from cryptography.hazmat.primitives.asymmetric import ed25519

    import worker.__main__  # noqa: F401
    from worker import _engine, _harden, _loop  # noqa: F401

    # Instantiate OpenSSL's random generator once: a child's first key then costs ≈ 0.5 ms, not
    # ≈ 3.5 ms. Children still get keys of their own: the generator reseeds when the pid changes.
    ed25519.Ed25519PrivateKey.generate().sign(b"warm-up")
    _engine.tune_malloc()  # inherited by every worker: megabyte payloads without page-fault storms
    for layer, why in _harden.prepare_for_workers(endpoint).items():
        log(f"not prepared for workers: {layer} ({why}); each worker tries it for itself")
    gc.collect()
    gc.freeze()  # children never scan (and so never copy) the pages of what was imported here
    threads = thread_count()
    sock.send(Ready(os.getpid(), threads, CLONE_PARENT_SUPPORTED).encode())
    if threads != 1:
        log(f"{threads} threads after imports; a zygote must have one, so it refuses to fork")
    return Zygote(sock, endpoint, parent_pid).serve()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
