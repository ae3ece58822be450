"""A worker that misbehaves on purpose: the real worker, except on its second handle call.

Launched by ``tests/run_supervisor.py`` as ``python tests/evil_worker.py MODE --bootstrap-fd N``.
It runs the real ``worker.__main__.main`` (same bootstrap, hello, confinement and
sandbox), but wraps ``worker._loop.Agent.run`` so that the RESULT of the second
handle call in this process is altered according to MODE:

    forge    re-sign the final record with a different, fresh Ed25519 key
    tamper   flip a byte inside the final record's payload, without re-signing
    replay   send the records of the first handle call again
    reorder  swap the first two records of the call (counter: log, host-call, handle)
    state    send a state whose sha256 is not the state hash signed in the record
    garbage  a RESULT whose meta frame is random bytes
    twice    send the (honest, padded with valid log records) RESULT twice, back to back:
             the copy answers no call

or so that, in the second handle call, before the guest runs, the worker sends a
HOST_REQUEST on its socket and then waits for the reply, as the real worker's
``SupervisorLink.ask`` does (if an answer came, it would finish the call honestly):

    grab-unheld     a well-formed ``supervision`` request ``{"op": "children"}``, from an agent
                    whose policy does not grant ``supervision`` (the counter, default policy)
    grab-unknown    a well-formed request for interface ``kv``, which no handler serves (op ``get``)
    grab-none       a body ``{"op": "children"}`` with no ``interface`` key at all
    grab-malformed  a ``supervision`` request whose id frame is 3 bytes instead of 8

or so that it never answers its second handle call (``hang``: it sleeps instead of running it),

or so that, in the second handle call, before the guest runs, it sends on its socket

    fault-list   a FAULT whose reason is a JSON list, not a string
    fault-late   a well-formed FAULT ``load-failed`` (it has run calls: nothing failed to load)
    hello-flood  HELLO_FLOOD hello frames on its established connection

and then runs the call honestly, or so that, in the second handle call, it waits for the STOP the operator's ``theater stop`` sends and then
sends STOP_FLOOD frames with a bad header (``stop-flood``), or so that (``ask-after-end``) the result of a
handle call whose
message starts with ``set-then-trap`` (keeper.wat: a trap) is sent only once the next call was sent
ahead, and is followed at once by a kv ``get`` HOST_REQUEST, though a worker whose call trapped may run
nothing more.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import zmq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from theater import wire
from theater.records import Kind, Record, sign_record

PADDING_LOGS = 90
MODES = (
    "forge", "tamper", "replay", "reorder", "state", "garbage", "twice",
    "grab-unheld", "grab-unknown", "grab-none", "grab-malformed", "hang",
    "fault-list", "fault-late", "hello-flood", "ask-after-end", "stop-flood",
)
STOP_FLOOD = 50
HELLO_FLOOD = 200
SENT_AHEAD_WAIT_MS = 20_000
MALFORMED_ID_BYTES = 3


class _Frames:
    """Anything with ``encode()`` is sent as-is by the worker loop."""

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames

    def encode(self) -> list[bytes]:
        return self.frames


class _Twice(list):
    """Frames the patched ``wire.send_frames`` sends twice in a row."""


class _ThenAsk(list):
    """A trapped call's RESULT frames, which the patched ``wire.send_frames`` sends once the next call was sent
    ahead, followed by a host request; the worker then waits to be killed."""


class _Marked:
    """A result whose frames go out as ``kind`` (``_Twice`` or ``_ThenAsk``), for the patched send to see."""

    def __init__(self, result: wire.Result, kind: type[list[bytes]]) -> None:
        self.result, self.kind = result, kind

    def encode(self) -> list[bytes]:
        return self.kind(self.result.encode())


_LINK: list[Any] = []  # the worker's SupervisorLink, once a call ran


def _sent_ahead(sock: zmq.Socket) -> None:
    """Wait until a call sent ahead has come: read ahead by the worker already (it looks for a STOP behind the
    calls it has before it runs one), or still in the socket."""
    deadline = time.monotonic() + SENT_AHEAD_WAIT_MS / 1000
    while not (_LINK and _LINK[0]._early) and not sock.poll(50) and time.monotonic() < deadline:
        pass


def _patch_send() -> None:
    """The worker loop sends its results through ``wire.send_frames``: marked frames are sent as marked."""
    real_send = wire.send_frames

    def send_frames(sock: zmq.Socket, frames: list[bytes], *args: Any, **kwargs: Any) -> None:
        if isinstance(frames, _ThenAsk):
            _sent_ahead(sock)
        real_send(sock, list(frames), *args, **kwargs)
        if isinstance(frames, _Twice):
            real_send(sock, list(frames), *args, **kwargs)
        if isinstance(frames, _ThenAsk):
            real_send(sock, wire.HostRequest(99, {"op": "get", "key": "a"}, "kv").encode(wire.WorkerType.HOST_REQUEST))
            while True:  # never obeys the STOP that follows: the request surely leaves, and the worker is killed
                time.sleep(60)

    wire.send_frames = send_frames


def _before_the_call(link: Any, mode: str) -> None:
    """``fault-list``, ``fault-late``, ``hello-flood``: frames the supervisor must shrug off or punish once."""
    sock: zmq.Socket = link._sock
    if mode == "fault-list":
        sock.send_multipart([wire.header(wire.WorkerType.FAULT), b'{"reason": ["load-failed"], "detail": "x"}'])
    elif mode == "fault-late":
        sock.send_multipart([wire.header(wire.WorkerType.FAULT),
                             b'{"reason": "load-failed", "detail": "I lie: nothing failed"}'])
    else:
        for _ in range(HELLO_FLOOD):
            sock.send_multipart([wire.header(wire.WorkerType.HELLO), b"{}"])


def _forge(result: wire.Result, first: list[bytes]) -> Any:
    final = Record.parse(result.records[-1])
    forged = sign_record(
        Ed25519PrivateKey.generate(), kind=final.kind, agent_id=final.agent_id, seq=final.seq,
        time_ns=final.time_ns, prev_hash=final.prev_hash, state_hash=final.state_hash, fields=final.fields(),
    )
    return wire.Result(result.call_id, result.state, [*result.records[:-1], forged.raw])


def _tamper(result: wire.Result, first: list[bytes]) -> Any:
    final = Record.parse(result.records[-1])
    raw = bytearray(final.raw)
    # The last payload byte is the low byte of the u64 `fuel` field: the payload stays canonical.
    raw[len(raw) - 64 - 1] ^= 0x01
    return wire.Result(result.call_id, result.state, [*result.records[:-1], bytes(raw)])


def _replay(result: wire.Result, first: list[bytes]) -> Any:
    return wire.Result(result.call_id, result.state, list(first))


def _reorder(result: wire.Result, first: list[bytes]) -> Any:
    records = list(result.records)
    assert len(records) >= 2, "reorder needs a call with at least two records"
    records[0], records[1] = records[1], records[0]
    return wire.Result(result.call_id, result.state, records)


def _state(result: wire.Result, first: list[bytes]) -> Any:
    assert result.state is not None, "the counter changes its state on every call"
    return wire.Result(result.call_id, result.state + b"0", result.records)


def _garbage(result: wire.Result, first: list[bytes]) -> Any:
    return _Frames([wire.header(wire.WorkerType.RESULT), os.urandom(37)])


def _twice(result: wire.Result, first: list[bytes]) -> Any:
    return _Marked(result, _Twice)


EVIL = {
    "forge": _forge, "tamper": _tamper, "replay": _replay, "reorder": _reorder, "state": _state,
    "garbage": _garbage, "twice": _twice,
}


# mode -> (interface, body) of the host request it sends; grab-malformed then cuts the id frame.
GRABS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "grab-unheld": ("supervision", {"op": "children"}),
    "grab-unknown": ("kv", {"op": "get", "key": "count"}),
    "grab-none": (None, {"op": "children"}),
    "grab-malformed": ("supervision", {"op": "children"}),
}


def host_request_frames(mode: str, request_id: int) -> list[bytes]:
    """The HOST_REQUEST that ``mode`` sends, as the worker's ``SupervisorLink.ask`` encodes it, then spoiled."""
    interface, body = GRABS[mode]
    frames = wire.HostRequest(request_id, body, interface).encode(wire.WorkerType.HOST_REQUEST)
    if mode == "grab-malformed":
        frames[1] = frames[1][:MALFORMED_ID_BYTES]
    return frames


def _grab(link: Any, mode: str) -> None:
    """Send ``mode``'s host request on the worker's socket, then wait for its reply as ``SupervisorLink.ask`` does."""
    link._ids += 1
    sock: zmq.Socket = link._sock
    sock.send_multipart(host_request_frames(mode, link._ids))
    if not sock.poll(link.TIMEOUT_MS):
        print("evil worker: no answer to the host request; carrying on", file=sys.stderr, flush=True)
        return
    frames = sock.recv_multipart()
    typ = wire.parse_header(frames[0], wire.SupervisorType)
    if typ is wire.SupervisorType.STOP:  # stopped mid-call: exit at once, as the real worker does
        os._exit(0)
    print(f"evil worker: the supervisor sent {typ.name} instead of killing me; carrying on", file=sys.stderr, flush=True)


def main() -> int:
    mode = sys.argv.pop(1) if len(sys.argv) > 1 else ""
    if mode not in MODES:
        print(f"usage: evil_worker.py {{{','.join(MODES)}}} --bootstrap-fd N", file=sys.stderr)
        return 2
    if mode in ("twice", "ask-after-end"):
        _patch_send()
    import worker.__main__ as entry
    from worker import _loop

    real_run = _loop.Agent.run
    handled: list[list[bytes]] = []  # records of each handle call in this process

    def run(self: _loop.Agent, call: wire.Call) -> Any:
        if mode == "hang" and call.kind is wire.CallKind.HANDLE and len(handled) == 1:
            print(f"evil worker: hang on call {call.call_id}", file=sys.stderr, flush=True)
            time.sleep(3600)
        if mode in ("fault-list", "fault-late", "hello-flood") and call.kind is wire.CallKind.HANDLE and len(handled) == 1:
            print(f"evil worker: {mode} on call {call.call_id}", file=sys.stderr, flush=True)
            _before_the_call(self.host._ask.__self__, mode)  # type: ignore[attr-defined]
        if mode == "stop-flood" and call.kind is wire.CallKind.HANDLE and len(handled) == 1:
            print(f"evil worker: {mode} on call {call.call_id}", file=sys.stderr, flush=True)
            sock = self.host._ask.__self__._sock  # type: ignore[attr-defined]
            if sock.poll(SENT_AHEAD_WAIT_MS):  # the STOP has come: answer it with garbage, not with an exit
                for _ in range(STOP_FLOOD):
                    sock.send_multipart([b"\xff"])
            while True:
                time.sleep(60)
        if mode in GRABS and call.kind is wire.CallKind.HANDLE and len(handled) == 1:
            print(f"evil worker: {mode} on call {call.call_id}", file=sys.stderr, flush=True)
            _grab(self.host._ask.__self__, mode)  # type: ignore[attr-defined]  # the worker's SupervisorLink
        if mode == "twice" and call.kind is wire.CallKind.HANDLE and len(handled) == 1:
            # Validly signed padding: checking this result keeps the supervisor busy for a
            # few milliseconds, so the copy sent right behind it is drained in the same turn.
            for i in range(PADDING_LOGS):
                self.recorder.append(Kind.LOG, {"level": "info", "message": f"padding {i}", "truncated": 0})
        result = real_run(self, call)
        if call.kind is not wire.CallKind.HANDLE:
            return result
        _LINK[:] = [self.host._ask.__self__]  # type: ignore[attr-defined]  # the worker's SupervisorLink
        if mode == "ask-after-end" and call.data.startswith(b"set-then-trap"):
            print(f"evil worker: {mode} on call {call.call_id}", file=sys.stderr, flush=True)
            return _Marked(result, _ThenAsk)
        handled.append(list(result.records))
        if len(handled) == 2 and mode in EVIL:
            print(f"evil worker: {mode} on call {call.call_id}", file=sys.stderr, flush=True)
            return EVIL[mode](result, handled[0])
        return result

    _loop.Agent.run = run  # type: ignore[method-assign]
    return entry.main()


if __name__ == "__main__":
    sys.exit(main())
