"""Clients' requests: authenticated, decoded into typed requests (``theater.control``), served, answered.

Every request must carry the control token; every reply to a call is sent only
once the result it carries is committed. A client can never crash the
supervisor: anything unexpected while serving becomes an ``internal`` error reply.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from theater import control as req
from theater import wire
from theater.errors import ProtocolError
from theater.home import Home

from ._agent import Agents, Pending
from ._errors import Refused, StoreUnavailable, SupervisorError
from ._ledger import Checked
from ._timers import Timers

if TYPE_CHECKING:
    from ._checkpoints import Checkpoints
    from ._gc import Retention
    from ._record_path import RecordPath
    from ._trees import Supervision
    from ._workers import Workers

__all__ = ["Control"]

BATCH = 256  # requests taken from the socket per loop turn

MAX_CONTROL_DATA = 64 * 1024 * 1024
MAX_ERROR_CHARS = 4096
Waiter = tuple[bytes, int, int]  # client identity, request id, the head it has seen


class Control:
    def __init__(self, home_root: Path, endpoint: str, token_path: Path, ctx: zmq.Context[zmq.Socket[bytes]],
                 agents: Agents, timers: Timers, log: Callable[[str], None]) -> None:
        self.home_root = home_root
        self.agents = agents
        self.timers = timers
        self.log = log
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.linger = 0
        self.socket.maxmsgsize = MAX_CONTROL_DATA + 2 * wire.MAX_JSON_BYTES
        self.socket.bind(endpoint)
        self.token = secrets.token_hex(32)
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token)
        self.waiters: dict[bytes, list[Waiter]] = {}  # chain id -> clients waiting for its next record
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify")
        self.down_waiters: list[tuple[bytes, int]] = []
        # Set by the supervisor once all parts exist.
        self.records: RecordPath
        self.supervision: Supervision
        self.workers: Workers
        self.request_down: Callable[[], None]
        self.checkpoints: Checkpoints
        self.retention: Retention
        self.rotate_key: Callable[[], dict[str, Any]]

    def drain(self) -> None:
        for _ in range(BATCH):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            ident = frames[0]
            rid = 0
            try:
                if len(frames) not in (3, 4) or wire.parse_header(frames[1], wire.ClientType) is not wire.ClientType.REQUEST:
                    raise ProtocolError("a request is a header, a JSON frame and an optional data frame")
                body = wire.decode_json(frames[2], "request")
                rid = body.get("id", 0) if isinstance(body.get("id", 0), int) else 0
                if not hmac.compare_digest(str(body.get("token", "")), self.token):
                    raise Refused("bad control token")
                request = req.decode_request(body.get("op"), body, frames[3] if len(frames) == 4 else None)
                self._serve(ident, rid, request)
            except req.BadRequest as exc:
                self.reply_error(ident, rid, "refused", str(exc))
            except SupervisorError as exc:
                self.reply_error(ident, rid, exc.code, str(exc))
            except ProtocolError as exc:
                self.reply_error(ident, rid, "protocol", str(exc))
            except Exception as exc:  # a client must never be able to crash the supervisor
                self.log(f"internal error serving a request: {type(exc).__name__}: {exc}")
                self.reply_error(ident, rid, "internal", f"internal error: {type(exc).__name__}")

    def _serve(self, ident: bytes, rid: int, request: req.Request) -> None:
        ticket = (ident, rid)
        problem = self.records.store.problem
        if problem is not None:
            self.supervision.watch_store()
        if problem is not None and isinstance(request, req.Spawn | req.Send | req.Call):
            raise StoreUnavailable(f"the event store cannot be written ({problem}); nothing was taken: "
                                   "try again once there is space")
        match request:
            case req.Ping():
                self.reply(ident, rid, {"pid": os.getpid(), "home": str(self.home_root), "agents": len(self.agents),
                                        "store_problem": problem})
            case req.Spawn(manifest, replace):
                self.supervision.spawn(Path(manifest), ticket, replace=replace)
            case req.Send(agent, data):
                queued = self._queue(agent, data, None)
                self.reply(ident, rid, {"queued": queued})
            case req.Call(agent, data, timeout_ms):
                self._queue(agent, data, (ticket, timeout_ms))
            case req.Ps():
                self.reply(ident, rid, {"agents": [a.summary() for a in self.agents], "store_problem": problem})
            case req.Tree():
                self.reply(ident, rid, {"roots": [self.supervision.entry(m) for m in self.supervision.roots()]})
            case req.Stop(agent):
                self.supervision.stop(self.supervision.member(agent), ticket)
            case req.Restart(agent):
                self.supervision.restart(self.supervision.member(agent), ticket)
            case req.Wait(agent, after, wait_ms):
                self._wait(ident, rid, agent, after, wait_ms)
            case req.Events(agent, after):
                self._events(ident, rid, agent, after)
            case req.Verify(agent):
                self._verify(ident, rid, agent)
            case req.Down():
                self.down_waiters.append(ticket)
                self.request_down()
            case req.Checkpoint():
                self.reply(ident, rid, self.checkpoints.make())
            case req.Remove(agent):
                self.reply(ident, rid, self.supervision.remove(self.supervision.member(agent)))
            case req.RotateKey():
                self.reply(ident, rid, self.rotate_key())
            case req.Gc(agents):
                self.reply(ident, rid, {"agents": self.retention.run(list(agents))})

    def _queue(self, ref: str, data: bytes, call: tuple[tuple[bytes, int], int] | None) -> int:
        """Put a message in the agent's mailbox (bounded); a call is answered when its result is committed."""
        agent = self.agents.find(ref)
        limits = agent.config.limits
        if len(data) > limits.max_message_bytes:
            raise Refused(f"message of {len(data)} bytes exceeds {agent.name}'s max_message_bytes {limits.max_message_bytes}")
        if agent.status in ("stopped", "failed", "stopping"):
            raise Refused(f"agent {agent.name} is {agent.status}")
        if len(agent.mailbox) + agent.reserved >= limits.mailbox:  # places held for agents' sends count
            raise Refused(f"agent {agent.name}'s mailbox is full ({limits.mailbox} messages)")
        pending = Pending(wire.Call(next(self.workers.call_ids), wire.CallKind.HANDLE, data))
        if call is not None:
            pending.reply_to, timeout_ms = call
            self.timers.after(timeout_ms / 1000, lambda: self.answer_error(
                pending, "timeout", f"no reply from {agent.name} within {timeout_ms} ms"))
        agent.mailbox.append(pending)
        queued = len(agent.mailbox)
        self.workers.dispatch(agent)
        return queued

    def _wait(self, ident: bytes, rid: int, ref: str, after: int, wait_ms: int) -> None:
        """Answer once the chain of an agent or a tree node has a record after ``after``, or at ``wait_ms``."""
        chain_id, head = self.supervision.chain_head(ref)
        if head > after or wait_ms == 0:
            self.reply(ident, rid, {"head": head})
            return
        entry = (ident, rid, after)
        self.waiters.setdefault(chain_id, []).append(entry)

        def expire() -> None:
            lst = self.waiters.get(chain_id, [])
            if entry in lst:
                lst.remove(entry)
                self.reply(ident, rid, {"head": self.supervision.chain_head(ref)[1]})

        self.timers.after(wait_ms / 1000, expire)

    def _events(self, ident: bytes, rid: int, ref: str, after: int) -> None:
        """A chain's committed records after ``after``, as many as fit one reply (at least one)."""
        chain_id, head = self.supervision.chain_head(ref)
        raws: list[bytes] = []
        size = 0
        for raw in self.records.store.records(chain_id, after):
            if raws and size + len(raw) > req.EVENTS_REPLY_BYTES:
                break
            raws.append(raw)
            size += len(raw)
        last = after + len(raws)
        self.reply(ident, rid, {"count": len(raws), "head": head, "more": last < head}, req.pack_records(raws))

    def _verify(self, ident: bytes, rid: int, ref: str | None) -> None:
        """Verify the home's chains as `theater verify` does, off the loop; answer when done."""
        from ._audit import verify_home

        job = self._pool.submit(verify_home, Home(self.home_root), ref)

        def done() -> None:
            if not job.done():
                self.timers.after(0.02, done)
                return
            try:
                reports = job.result()
            except SupervisorError as exc:
                self.reply_error(ident, rid, exc.code, str(exc))
                return
            except Exception as exc:  # a corrupt store must not take the supervisor down
                self.reply_error(ident, rid, "store", f"cannot verify: {type(exc).__name__}: {exc}")
                return
            self.reply(ident, rid, {"chains": [r.as_dict() for r in reports]})

        self.timers.after(0.02, done)

    def wake(self, chain_id: bytes, head: int) -> None:
        for ident, rid, _ in self.waiters.pop(chain_id, None) or ():
            self.reply(ident, rid, {"head": head})

    def finish_down(self, stopped: int) -> None:
        for ident, rid in self.down_waiters:
            self.reply(ident, rid, {"stopped": stopped})

    # --- answers ------------------------------------------------------------------------------

    def answer(self, pending: Pending, checked: Checked) -> None:
        """A call's committed result, to its caller."""
        if pending.answered or (pending.reply_to is None and pending.on_answer is None):
            return
        pending.answered = True
        if pending.on_answer is not None:
            pending.on_answer(checked, "", "")
            return
        assert pending.reply_to is not None
        ident, rid = pending.reply_to
        if checked.status == "ok":
            result = {"status": "ok", "has_reply": checked.reply is not None, "seq": checked.final.seq}
            self.reply(ident, rid, result, checked.reply)
        else:
            self.reply_error(ident, rid, checked.status, checked.error)

    def answer_error(self, pending: Pending, code: str, message: str) -> None:
        if pending.answered or (pending.reply_to is None and pending.on_answer is None):
            return
        pending.answered = True
        if pending.on_answer is not None:
            pending.on_answer(None, code, message)
            return
        assert pending.reply_to is not None
        self.reply_error(*pending.reply_to, code, message)

    def reply(self, ident: bytes, rid: int, result: dict[str, Any], data: bytes | None = None) -> None:
        frames = [ident, wire.header(wire.ClientType.REPLY), wire.encode_json({"id": rid, "ok": True, "result": result})]
        if data is not None:
            frames.append(data)
        with contextlib.suppress(zmq.ZMQError):
            self.socket.send_multipart(frames, copy=False)

    def reply_error(self, ident: bytes, rid: int, code: str, message: str) -> None:
        if len(message) > MAX_ERROR_CHARS:  # an error always fits what a client reads
            message = message[:MAX_ERROR_CHARS] + "…"
        body = {"id": rid, "ok": False, "error": {"code": code, "message": message}}
        with contextlib.suppress(zmq.ZMQError):
            self.socket.send_multipart([ident, wire.header(wire.ClientType.REPLY), wire.encode_json(body)])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.socket.close(0)
