"""The control socket's requests: spawn, call, send, stop, restart, wait, and their replies.

Every request is authenticated by the control token before it gets here; every
reply to a call is sent only once the result it carries is committed."""

from __future__ import annotations

import contextlib
import hmac
import os
from pathlib import Path
from typing import Any

import zmq

from theater import wire
from theater.errors import ProtocolError

from ._agent import Pending
from ._errors import Refused, SupervisorError
from ._ledger import Checked

BATCH = 256  # messages taken from one socket per loop turn


class ControlRequests:
    """Part of :class:`supervisor.Supervisor` (its state lives there): what clients ask of it."""

    def _drain_control(self) -> None:
        for _ in range(BATCH):
            try:
                frames = self.control.recv_multipart(zmq.NOBLOCK)
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
                data = frames[3] if len(frames) == 4 else None
                self._handle_request(ident, rid, str(body.get("op")), body, data)
            except SupervisorError as exc:
                self._reply_error(ident, rid, exc.code, str(exc))
            except ProtocolError as exc:
                self._reply_error(ident, rid, "protocol", str(exc))
            except Exception as exc:  # a client must never be able to crash the supervisor
                self.log(f"internal error serving a request: {type(exc).__name__}: {exc}")
                self._reply_error(ident, rid, "internal", f"internal error: {type(exc).__name__}")

    def _handle_request(self, ident: bytes, rid: int, op: str, body: dict[str, Any], data: bytes | None) -> None:
        if op == "ping":
            self._reply(ident, rid, {"pid": os.getpid(), "home": str(self.home.root), "agents": len(self.agents)})
        elif op == "spawn":
            self._op_spawn(ident, rid, body)
        elif op in ("send", "call"):
            self._op_message(ident, rid, op, body, data)
        elif op == "ps":
            self._reply(ident, rid, {"agents": [a.summary() for a in self.agents.values()]})
        elif op == "stop":
            self._op_stop(ident, rid, body)
        elif op == "restart":
            self._op_restart(ident, rid, body)
        elif op == "tree":
            self._reply(ident, rid, {"roots": [self.supervision.entry(m) for m in self.supervision.roots()]})
        elif op == "wait":
            self._op_wait(ident, rid, body)
        elif op == "down":
            self.down_waiters.append((ident, rid))
            self.request_down()
        else:
            raise Refused(f"unknown operation {op!r}")

    def _op_restart(self, ident: bytes, rid: int, body: dict[str, Any]) -> None:
        member = self.supervision.member(body.get("agent"))
        self.supervision.restart(member, (ident, rid))

    def _op_spawn(self, ident: bytes, rid: int, body: dict[str, Any]) -> None:
        manifest = body.get("manifest")
        if not isinstance(manifest, str) or not os.path.isabs(manifest):
            raise Refused("spawn needs the manifest's absolute path")
        self.supervision.spawn(Path(manifest), (ident, rid))

    def _op_message(self, ident: bytes, rid: int, op: str, body: dict[str, Any], data: bytes | None) -> None:
        agent = self.find(body.get("agent"))
        data = data or b""
        limits = agent.config.limits
        if len(data) > limits.max_message_bytes:
            raise Refused(f"message of {len(data)} bytes exceeds {agent.name}'s max_message_bytes {limits.max_message_bytes}")
        if agent.status in ("stopped", "failed", "stopping"):
            raise Refused(f"agent {agent.name} is {agent.status}")
        if len(agent.mailbox) >= limits.mailbox:
            raise Refused(f"agent {agent.name}'s mailbox is full ({limits.mailbox} messages)")
        pending = Pending(wire.Call(next(self.call_ids), wire.CallKind.HANDLE, data))
        if op == "call":
            pending.reply_to = (ident, rid)
            timeout_ms = body.get("timeout_ms", 10_000)
            if not isinstance(timeout_ms, int) or not 1 <= timeout_ms <= 3_600_000:
                raise Refused("timeout_ms must be an integer in 1..3600000")
            self.timers.after(timeout_ms / 1000, lambda: self._answer_error(pending, "timeout", f"no reply from {agent.name} within {timeout_ms} ms"))
        agent.mailbox.append(pending)
        if op == "send":
            self._reply(ident, rid, {"queued": len(agent.mailbox)})
        self.dispatch(agent)

    def _op_stop(self, ident: bytes, rid: int, body: dict[str, Any]) -> None:
        self.supervision.stop(self.supervision.member(body.get("agent")), (ident, rid))

    def _op_wait(self, ident: bytes, rid: int, body: dict[str, Any]) -> None:
        """Answer once the chain of an agent or a tree node has a record after ``after``, or at ``wait_ms``."""
        ref = body.get("agent")
        chain_id, head = self.supervision.chain_head(ref)
        after, wait_ms = body.get("after", -1), body.get("wait_ms", 0)
        if not isinstance(after, int) or not isinstance(wait_ms, int) or not 0 <= wait_ms <= 600_000:
            raise Refused("wait needs integer after and wait_ms in 0..600000")
        if head > after or wait_ms == 0:
            self._reply(ident, rid, {"head": head})
            return
        entry = (ident, rid, after)
        self.waiters.setdefault(chain_id, []).append(entry)

        def expire() -> None:
            lst = self.waiters.get(chain_id, [])
            if entry in lst:
                lst.remove(entry)
                self._reply(ident, rid, {"head": self.supervision.chain_head(ref)[1]})

        self.timers.after(wait_ms / 1000, expire)

    def wake_waiters(self, chain_id: bytes, head: int) -> None:
        for ident, rid, _ in self.waiters.pop(chain_id, None) or ():
            self._reply(ident, rid, {"head": head})

    def _answer(self, pending: Pending, checked: Checked) -> None:
        if pending.reply_to is None or pending.answered:
            return
        pending.answered = True
        ident, rid = pending.reply_to
        if checked.status == "ok":
            result = {"status": "ok", "has_reply": checked.reply is not None, "seq": checked.final.seq}
            self._reply(ident, rid, result, checked.reply)
        else:
            self._reply_error(ident, rid, checked.status, checked.error)

    def _answer_error(self, pending: Pending, code: str, message: str) -> None:
        if pending.reply_to is None or pending.answered:
            return
        pending.answered = True
        self._reply_error(*pending.reply_to, code, message)

    def reply(self, ident: bytes, rid: int, result: dict[str, Any], data: bytes | None = None) -> None:
        self._reply(ident, rid, result, data)

    def _reply(self, ident: bytes, rid: int, result: dict[str, Any], data: bytes | None = None) -> None:
        frames = [ident, wire.header(wire.ClientType.REPLY), wire.encode_json({"id": rid, "ok": True, "result": result})]
        if data is not None:
            frames.append(data)
        with contextlib.suppress(zmq.ZMQError):
            self.control.send_multipart(frames, copy=False)

    def _reply_error(self, ident: bytes, rid: int, code: str, message: str) -> None:
        body = {"id": rid, "ok": False, "error": {"code": code, "message": message}}
        with contextlib.suppress(zmq.ZMQError):
            self.control.send_multipart([ident, wire.header(wire.ClientType.REPLY), wire.encode_json(body)])
