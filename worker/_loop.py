"""The worker's life: hello, spec, load, then one call at a time until told to stop."""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections import deque
from typing import Any, NamedTuple

import zmq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from theater import wire
from theater.artifacts import engine_report
from theater.errors import ProtocolError
from theater.exits import WorkerExit, crash_reason
from theater.records import Kind, Record, sha256, sign_hello
from theater.spec import AgentSpec, LoadProfile

from ._boundary import from_guest, from_guest_utf8, to_guest
from ._caps import Ask, Host, language_runtime, link_granted
from ._engine import (
    AGENT_EXPORTS,
    Lifted,
    Sandbox,
    artifact_key,
    load_artifact,
    make_engine,
    read_component,
)
from ._errors import CallFailed, HostLimit, LoadError
from ._harden import lock_down, require
from ._recorder import Recorder

__all__ = ["Link", "Loaded", "connect", "hello_frames", "load_ahead", "serve"]

SPEC_TIMEOUT_MS = 30_000
MAX_ERROR_CHARS = 4096
STOP_HEADER = wire.header(wire.SupervisorType.STOP)
LAST_FRAMES_MS = 2000  # how long an exiting worker waits for its last frames to leave
ENGINE = engine_report()  # read at import, before the worker confines itself (it reads /proc/cpuinfo)


class Link(NamedTuple):
    """This worker's key and its connection to the supervisor, made before it has an agent."""

    key: Ed25519PrivateKey
    public: bytes
    ctx: zmq.Context
    sock: zmq.Socket
    settled: bool = False  # the connection's handshake is known to be done


def connect(endpoint: str, settle_ms: int = 0) -> Link:
    """A fresh key and a connected socket (a spare worker makes both while it waits for an agent).

    ZeroMQ connects in its I/O thread, later. With ``settle_ms``, wait up to that long for the handshake
    with the supervisor's socket to be done (``Link.settled``): a worker that locks down before its SPEC
    came over the connection must not leave its I/O thread a connection still to make (the allowlist
    refuses ``socket``, ``connect`` and ``getsockopt``).
    """
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = LAST_FRAMES_MS
    if not settle_ms:
        sock.connect(endpoint)
        return Link(key, public, ctx, sock)
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        sock.connect(endpoint)
        settled = bool(monitor.poll(settle_ms))
    finally:
        sock.disable_monitor()
        monitor.close(0)
    return Link(key, public, ctx, sock, settled)


def hello_frames(link: Link, token: bytes, confinement: dict[str, str]) -> list[bytes]:
    """The HELLO: the spawn token, this worker's key and proof of it, its pid, and what confines it (with
    what runs the agent, recorded for a replay to compare)."""
    proof = sign_hello(link.key, token)
    return wire.Hello(token, link.public, proof, os.getpid(), {**confinement, **ENGINE}).encode()


def serve(endpoint: str, token: bytes, confinement: dict[str, str], artifact: dict[str, Any] | None = None,
          link: Link | None = None, ahead: Loaded | None = None, *, greeted: bool = False) -> int:
    """``greeted``: this worker (a loaded spare) sent its hello before a spawn took it."""
    link = link or connect(endpoint)
    try:
        if not greeted:
            link.sock.send_multipart(hello_frames(link, token, confinement))
        return _serve(link.sock, link.key, artifact, ahead)
    finally:
        # Deliver whatever was sent last (a result, a fault) before the exit: a forked
        # worker ends with os._exit, which would otherwise drop ZeroMQ's queue.
        link.sock.close()
        link.ctx.term()


def _serve(sock: zmq.Socket, key: Ed25519PrivateKey, artifact: dict[str, Any] | None, ahead: Loaded | None) -> int:
    if not sock.poll(SPEC_TIMEOUT_MS):
        return WorkerExit.PROTOCOL
    try:
        frames = sock.recv_multipart()
        if wire.parse_header(frames[0], wire.SupervisorType) is not wire.SupervisorType.SPEC or len(frames) != 3:
            raise ProtocolError("expected a spec frame and a state frame")
        spec = AgentSpec.from_json(wire.decode_json(frames[1], "spec"))
        state = frames[2]
    except ProtocolError as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return WorkerExit.PROTOCOL
    link = SupervisorLink(sock)
    try:
        require(spec.hardening)  # before any guest byte is read
        agent = Agent(spec, state, key, link.ask, artifact, ahead)
        lock_down(spec.limits)  # compiled and instantiated: now the seccomp allowlist, before any guest call
    except LoadError as exc:
        sock.send_multipart([wire.header(wire.WorkerType.FAULT), wire.encode_json({"reason": exc.reason, "detail": str(exc)})])
        return WorkerExit.LOAD_FAILED
    ended = False  # the last result ends this worker (a crash, a finish): it runs no other call
    while True:
        frames = link.next_frames()
        try:
            typ = wire.parse_header(frames[0], wire.SupervisorType)
            if typ is wire.SupervisorType.STOP:
                return 0
            if typ is not wire.SupervisorType.CALL:
                raise ProtocolError(f"unexpected {typ.name} frame")
            call = wire.Call.decode(frames[1:])
        except ProtocolError as exc:
            print(f"worker: {exc}", file=sys.stderr)
            return WorkerExit.PROTOCOL
        if ended:
            continue  # sent ahead before the supervisor knew; it runs them in the next worker
        if link.stop_waiting():  # a STOP behind calls sent ahead is obeyed first: they are never run
            return 0
        wire.send_frames(sock, agent.run(call).encode())
        ended = crash_reason(call.kind, agent.status) is not None or agent.host.ending


class SupervisorLink:
    """The frames from the supervisor, and the host requests the worker cannot answer alone, asked mid-call.

    The supervisor sends a worker its next calls before their turn (``PIPELINE_DEPTH`` in
    ``supervisor/_workers.py``), so a call can arrive while a host request waits for its answer: it is
    kept, and run in its turn.
    """

    def __init__(self, sock: zmq.Socket) -> None:
        self._sock = sock
        self._ids = 0
        self._early: deque[list[bytes]] = deque()  # frames read ahead of their turn

    def next_frames(self) -> list[bytes]:
        """The next message from the supervisor, in the order it was sent."""
        return self._early.popleft() if self._early else wire.recv_frames(self._sock)

    def stop_waiting(self) -> bool:
        """Whether a STOP has come behind the calls sent ahead (everything already here is read)."""
        while wire.readable(self._sock):
            frames = wire.recv_frames(self._sock)
            if frames and frames[0] == STOP_HEADER:
                return True
            self._early.append(frames)
        return False

    def ask(self, interface: str, body: dict[str, Any], data: bytes | None, wait_ms: int) -> tuple[dict[str, Any], bytes | None]:
        """Send ``body`` (and ``data``) as a HOST_REQUEST for ``interface`` (a capability's name) and wait
        at most ``wait_ms`` for its answer."""
        self._ids += 1
        request = wire.HostRequest(self._ids, body, interface, data)
        # Copied, whatever its size: pyzmq sends 64 KiB and more without a copy by starting a thread that frees
        # the bytes, and a worker may start no thread after lock-down; the send then failed after its first
        # frames, and the result that followed was read as the rest of the request (a protocol violation).
        wire.send_frames(self._sock, request.encode(wire.WorkerType.HOST_REQUEST))
        deadline = time.monotonic() + wait_ms / 1000
        while True:
            if not self._sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                raise HostLimit("the supervisor did not answer a host request in time")
            frames = wire.recv_frames(self._sock)
            typ = wire.parse_header(frames[0], wire.SupervisorType)
            if typ is wire.SupervisorType.STOP:  # stopped mid-call: exit at once, nothing of the call is sent
                os._exit(0)
            if typ is wire.SupervisorType.CALL:  # sent ahead: its turn comes after this call
                self._early.append(frames)
                continue
            if typ is not wire.SupervisorType.HOST_REPLY:
                raise ProtocolError(f"unexpected {typ.name} frame while waiting for a host reply")
            reply = wire.HostRequest.decode(frames[1:], "host reply")
            if reply.request_id == self._ids:
                return reply.body, reply.data


class Loaded(NamedTuple):
    """A component linked and instantiated for a load profile, and the host its imports call."""

    profile: LoadProfile
    host: Host
    sandbox: Sandbox


def load(profile: LoadProfile, host: Host, artifact: dict[str, Any] | None, *, may_compile: bool = True) -> Loaded:
    """Exactly the granted capabilities linked, each from its host module (worker/_caps/), with the exports
    they require; the artifact mapped (or, if there is none or it does not load, the component compiled here
    when ``may_compile``); the component instantiated."""
    engine = make_engine(profile.limits)
    compiled = None
    if artifact is not None:  # compiled once, elsewhere: map it instead of compiling (its descriptor is closed)
        try:
            compiled = load_artifact(engine, artifact, artifact_key(profile.component_sha256, profile.limits))
        except LoadError as exc:
            if not may_compile:
                raise
            print(f"worker: not using the cached artifact ({exc}); compiling", file=sys.stderr, flush=True)
    elif not may_compile:
        raise LoadError("no compiled artifact")
    component = compiled or read_component(profile.component_path, profile.component_sha256)
    interfaces, required = link_granted(profile.capabilities, host)
    exports = {**AGENT_EXPORTS, **required}
    wasi = language_runtime(host).linker_for  # not a capability: whatever WASI 0.2 the component imports
    helpers = [read_component(path, digest) for path, digest in profile.helpers]
    return Loaded(profile, host, Sandbox(engine, component, profile.limits, interfaces, exports, wasi, helpers))


class _NoAgentYet(Recorder):
    """The recorder and supervisor link of a host loaded ahead of its agent.

    A component whose instantiation reaches the host (a start function that
    logs, or asks the time) cannot be loaded ahead: what it was handed would be
    recorded for no agent. Any such use fails the instantiation, and the worker
    loads the component again once it has its agent.
    """

    def __init__(self) -> None:  # no key and no chain: nothing is ever appended
        self.pending = []

    def append(self, kind: Kind, fields: dict[str, Any], *, new_state: bytes | None = None) -> Record:
        raise HostLimit("the component called the host while it was loaded ahead of its agent")

    def ask(self, interface: str, body: dict[str, Any], data: bytes | None, wait_ms: int) -> tuple[dict[str, Any], bytes | None]:
        raise HostLimit("the component called the host while it was loaded ahead of its agent")


def load_ahead(profile: LoadProfile, artifact: dict[str, Any]) -> Loaded | None:
    """In a spare: ``profile`` loaded before its agent is known, or None if it cannot be (the worker then
    loads it once it has its agent, and reports any failure then). The policy's hardening is checked first,
    as for an agent: no guest byte is read before."""
    try:
        require(profile.hardening)
    except LoadError:
        os.close(artifact["fd"])
        return None
    nobody = _NoAgentYet()
    try:
        loaded = load(profile, Host(nobody, profile.limits, "", nobody.ask), artifact, may_compile=False)
    except Exception:  # whatever it was, the load at the agent's start meets it again and reports it
        return None
    return loaded if loaded.host.untouched() else None


class Agent:
    """One agent in this worker: its sandbox, its committed state and its recorder."""

    def __init__(
        self,
        spec: AgentSpec,
        state: bytes,
        key: Ed25519PrivateKey,
        ask: Ask,
        artifact: dict[str, Any] | None = None,
        ahead: Loaded | None = None,
    ) -> None:
        """``ahead``: the component this worker loaded before it was given the agent (a loaded spare); it
        must have been loaded for exactly the spec's load profile (LoadError otherwise)."""
        if sha256(state).hex() != spec.state_hash:
            raise LoadError("the state sent does not match the spec's state hash")
        self.limits = spec.limits
        self.state = state
        self.recorder = Recorder(key, spec.agent_id, spec.head_seq, bytes.fromhex(spec.head_hash), bytes.fromhex(spec.state_hash))
        if ahead is not None and ahead.profile == spec.profile:
            ahead.host.adopt(self.recorder, spec.agent_id, ask)
            loaded = ahead
            if artifact is not None:
                os.close(artifact["fd"])  # offered again with the agent; already mapped
        else:
            if ahead is not None:
                print("worker: the component loaded ahead is not the agent's; loading it", file=sys.stderr, flush=True)
            loaded = load(spec.profile, Host(self.recorder, spec.limits, spec.agent_id, ask), artifact)
        self.host = loaded.host
        self.sandbox = loaded.sandbox
        self.status = ""  # the last call's

    def run(self, call: wire.Call) -> wire.Result:
        self.host.begin_call()
        kind, export = _KINDS[call.kind]
        new_state: bytes | None = None
        reply: bytes | None = None
        status, error = "ok", ""
        self.sandbox.last_fuel = 0  # a call refused before it runs uses no fuel
        try:
            message = wire.decode_message(call.data)[3] if kind is Kind.MESSAGE else call.data
            if kind is not Kind.CHILD_EXIT and len(message) > self.limits.max_message_bytes:
                raise CallFailed("too-large", f"message of {len(message)} bytes exceeds max_message_bytes")
            if kind is Kind.MESSAGE:
                origin, sender, _, _ = wire.decode_message(call.data)
                if origin is wire.Origin.TIMER:  # the agent's own message, back through handle
                    lifted, _ = self.sandbox.call_agent("handle", self.state, message)
                    new_state, reply, error = self._lifted_outcome(lifted)
                else:
                    result, _ = self.sandbox.call(export, to_guest(self.state), str(uuid.UUID(bytes=sender)),
                                                  to_guest(message))
                    new_state, reply, error = self._outcome(kind, result)
            elif kind is Kind.CHILD_EXIT:
                child, exit_hash, reason = wire.decode_child_exit(call.data)
                args = (str(uuid.UUID(bytes=child)), reason)
                result, _ = self.sandbox.call(export, to_guest(self.state), *args)
                new_state, reply, error = self._outcome(kind, result)
            else:  # init and handle: bytes in, bytes out, on the fast path
                lifted, _ = self.sandbox.call_agent(export, self.state, call.data)
                new_state, reply, error = self._lifted_outcome(lifted)
            if error:
                status = "guest-error"
        except CallFailed as failed:
            status, error = failed.status, failed.message
            new_state, reply = None, None
        self.status = status
        self.host.end_call()  # the last line the guest wrote without a newline
        if status != "ok":
            self.sandbox.discard_instance()
        fuel = self.sandbox.last_fuel
        fields: dict[str, Any]
        if kind is Kind.INIT:
            fields = {"args": call.data, "status": status, "error": error, "fuel": fuel}
        elif kind is Kind.CHILD_EXIT:
            child, exit_hash, reason = wire.decode_child_exit(call.data)
            fields = {"child": child, "exit_hash": exit_hash, "reason": reason, "status": status, "error": error, "fuel": fuel}
        elif kind is Kind.MESSAGE:
            origin, sender, message_id, message = wire.decode_message(call.data)
            fields = {"origin": origin.label, "sender": sender, "message_id": message_id, "message": message,
                      "reply": reply, "status": status, "error": error, "fuel": fuel}
        else:
            fields = {"message": call.data, "reply": reply, "status": status, "error": error, "fuel": fuel}
        self.recorder.append(kind, fields, new_state=new_state)
        changed = new_state is not None and new_state != self.state
        if new_state is not None:
            self.state = new_state
        return wire.Result(call.call_id, new_state if changed else None, self.recorder.take())

    def _lifted_outcome(self, lifted: Lifted) -> tuple[bytes | None, bytes | None, str]:
        """(new state, reply, guest error) from an init or handle outcome read on the fast path."""
        if not lifted.ok:
            return None, None, _guest_error(lifted.error)
        assert lifted.state is not None
        state = from_guest_utf8(lifted.state, "state", self.limits.max_state_bytes)
        reply = None if lifted.reply is None else from_guest_utf8(lifted.reply, "reply", self.limits.max_message_bytes)
        return state, reply, ""

    def _outcome(self, kind: Kind, result: Any) -> tuple[bytes | None, bytes | None, str]:
        """(new state, reply, guest error) from an export's lifted result."""
        if kind in (Kind.INIT, Kind.CHILD_EXIT):
            tag, payload = getattr(result, "tag", None), getattr(result, "payload", None)
            if tag == "err":
                return None, None, _guest_error(payload)
            return from_guest(payload, "state", self.limits.max_state_bytes), None, ""
        if isinstance(result, str):
            return None, None, _guest_error(result)
        state = from_guest(getattr(result, "state", None), "state", self.limits.max_state_bytes)
        raw_reply = getattr(result, "reply", None)
        reply = None if raw_reply is None else from_guest(raw_reply, "reply", self.limits.max_message_bytes)
        return state, reply, ""


_KINDS = {
    wire.CallKind.INIT: (Kind.INIT, "init"),
    wire.CallKind.HANDLE: (Kind.HANDLE, "handle"),
    wire.CallKind.CHILD_EXIT: (Kind.CHILD_EXIT, "child-exit"),
    wire.CallKind.MESSAGE: (Kind.MESSAGE, "receive"),
}


def _guest_error(text: object) -> str:
    message = text if isinstance(text, str) else repr(text)
    message = message[:MAX_ERROR_CHARS] or "(empty error)"
    return message
