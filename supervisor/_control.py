"""Clients' requests: authenticated, decoded into typed requests (``theater.control``), served, answered.

Two doors: the local socket, where every request must carry the control token
(the operator), and with ``--listen`` the TCP socket, where CurveZMQ has already
told us which tenant is asking (``_remote.py``); what a tenant may see is its
``Scope``. Every reply to a call is sent only once the result it carries is
committed. A client can never crash the supervisor: anything unexpected while
serving becomes an ``internal`` error reply.
"""

from __future__ import annotations

import contextlib
import gc
import hmac
import os
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from theater import control as req
from theater import wire
from theater.errors import ProtocolError
from theater.home import Home

from ._agent import Agent, Agents, Pending, queue_room
from ._config import OPERATOR, TENANT_SEP
from ._errors import SHUTTING_DOWN, NotFound, Refused, StoreUnavailable, SupervisorError
from ._ledger import Checked
from ._remote import server_keys
from ._scope import Scope, localized
from ._tenants import Tenants
from ._timers import Timer, Timers

if TYPE_CHECKING:
    from ._audit import ChainReport
    from ._checkpoints import Checkpoints
    from ._gc import Retention
    from ._record_path import RecordPath
    from ._remote import RemoteControl
    from ._trees import Supervision
    from ._usage import Usage
    from ._workers import Workers

__all__ = ["Control"]

BATCH = 256  # requests taken from the socket per loop turn
# The TCP socket's requests are bounded by time too: a tenant's flood (thousands of pipelined or malformed
# requests, frames of tens of MiB) must not hold the loop, and with it the workers' results that answer every
# other tenant's calls, for a whole batch. Past this much work the loop goes round and comes back for the
# rest; ROUTER's fair queueing gives each connection its turn.
REMOTE_TURN_S = 0.004
# A client's ident in tickets: LOCAL and ZeroMQ's routing id, or REMOTE, the tenant's name, NUL and the routing id.
LOCAL, REMOTE = b"L", b"R"

MAX_CONTROL_DATA = req.MAX_UPLOAD_BYTES  # the largest data frame: a tenant's component
MAX_ERROR_CHARS = 4096
# Replies queued to one client of the local socket that it has not read yet. ZeroMQ drops the replies past
# a pipe's high-water mark (1,000 by default), so a client that pipelined more requests than that before
# reading lost answers without a word; the local socket serves the operator alone, whose clients may
# pipeline this many. The TCP socket keeps ZeroMQ's 1,000: a tenant's unread replies are its own to lose.
LOCAL_UNREAD_REPLIES = 100_000
# Requests one requester (the operator, or one tenant) may have held for their answers at once: without a
# bound a client could park them until the supervisor runs out of memory.
# `wait`s, held until a record or their deadline. One record answers every wait on its chain in the same
# turn, so the bound stays under the 1,000 replies ZeroMQ queues to a TCP client before it drops them.
MAX_WAITS = 512
MAX_VERIFIES = 2  # `verify`s queued or running (each reads whole chains, on one thread)
MAX_CONTROL_FRAMES = MAX_CONTROL_DATA + 2 * wire.MAX_JSON_BYTES  # the largest message a client may send
Waiter = tuple[bytes, int, str]  # client identity, request id, requester (a tenant, or the operator)


class Control:
    def __init__(self, home_root: Path, endpoint: str, token_path: Path, ctx: zmq.Context[zmq.Socket[bytes]],
                 agents: Agents, timers: Timers, log: Callable[[str], None]) -> None:
        self.home_root = home_root
        self.agents = agents
        self.timers = timers
        self.log = log
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.linger = 0
        self.socket.maxmsgsize = MAX_CONTROL_FRAMES
        self.socket.sndhwm = LOCAL_UNREAD_REPLIES
        self.socket.bind(endpoint)
        self.token = secrets.token_hex(32)
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token)
        self.waiters: dict[bytes, list[Waiter]] = {}  # chain id -> clients waiting for its next record
        self._expiries: dict[Waiter, Timer] = {}  # each waiter's wait_ms timer, cancelled when it is woken
        self._held: Counter[tuple[str, str]] = Counter()  # (requester, "wait" or "verify") -> requests held
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify")
        self._verifies: dict[Future[list[ChainReport]], Waiter] = {}  # each verify not answered yet, and whose
        self._stop_verifies = threading.Event()  # set at down: a verify in progress ends at its next record
        self.down_waiters: list[tuple[bytes, int]] = []
        self.remote: RemoteControl | None = None  # the TCP socket, with `theater up --listen`
        self.metrics_address: str | None = None  # http://HOST:PORT/metrics, with `theater up --metrics`
        # Set by the supervisor once all parts exist.
        self.records: RecordPath
        self.supervision: Supervision
        self.workers: Workers
        self.request_down: Callable[[], None]
        self.checkpoints: Checkpoints
        self.retention: Retention
        self.rotate_key: Callable[[], dict[str, Any]]
        self.tenants: Tenants
        self.usage: Usage

    def drain(self) -> None:
        """The local socket's requests: the operator's, each carrying the control token."""
        for _ in range(BATCH):
            try:
                frames = wire.recv_frames(self.socket, zmq.NOBLOCK)
            except zmq.Again:
                return
            self._take(LOCAL + frames[0], frames[1:], None)

    def drain_remote(self) -> None:
        """The TCP socket's requests: each from the tenant whose key completed the handshake."""
        assert self.remote is not None
        until = time.perf_counter() + REMOTE_TURN_S
        for _ in range(BATCH):
            got = self.remote.receive()
            if got is None:
                return
            frames, tenant, key = got
            # The tenant travels in the ident, so every reply, however late, is written for it.
            self._take(REMOTE + tenant.encode() + b"\0" + bytes(frames[0]), frames[1:], tenant, key)
            if time.perf_counter() > until:
                return

    def _take(self, ident: bytes, frames: Sequence[bytes | memoryview], tenant: str | None, key: str = "") -> None:
        """One request: the header and JSON frames are bytes (a longer one is refused by its length first);
        the data frame may be a view (``RemoteControl.receive``). A tenant's comes with the key its connection's
        handshake proved (``key``)."""
        rid = 0
        try:
            if len(frames) not in (2, 3) or wire.parse_header(frames[0], wire.ClientType) is not wire.ClientType.REQUEST:
                raise ProtocolError("a request is a header, a JSON frame and an optional data frame")
            text = frames[1]
            if isinstance(text, memoryview):  # read in place: longer than any JSON frame may be
                raise ProtocolError(f"request of {len(text)} bytes exceeds {wire.MAX_JSON_BYTES}")
            body = wire.decode_json(text, "request")
            rid = body.get("id", 0)
            rid = rid if isinstance(rid, int) and not isinstance(rid, bool) else 0
            if tenant is None:
                token = body.get("token", "")
                if not isinstance(token, str) or not hmac.compare_digest(
                        token.encode("utf-8", "surrogatepass"), self.token.encode()):
                    raise Refused("bad control token")
                tenant = OPERATOR
            else:  # removed since this connection's handshake (and perhaps added again, with another key)
                current = self.tenants.by_name.get(tenant)
                if current is None or not hmac.compare_digest(current.public_key, key):
                    raise Refused(f"{tenant!r} is not a tenant of this supervisor (not with this connection's key)")
            op = body.get("op")
            if tenant != OPERATOR and isinstance(op, str) and op in req.OPERATOR_ONLY_OPS:  # before its arguments
                message = f"only the operator may ask for {op:.32}"
                self.tenants.deny(tenant, "operator-only", message)
                raise Refused(message)
            request = req.decode_request(op, body, frames[2] if len(frames) == 3 else None)
            self._serve(ident, rid, request, tenant)
        except req.BadRequest as exc:
            self.reply_error(ident, rid, "refused", str(exc))
        except SupervisorError as exc:
            self.reply_error(ident, rid, exc.code, str(exc))
        except ProtocolError as exc:
            self.reply_error(ident, rid, "protocol", str(exc))
        except UnicodeEncodeError:  # a string the request escaped into a lone surrogate: no name, path or text has one
            self.reply_error(ident, rid, "refused", "a string in the request is not valid UTF-8 (a lone surrogate "
                                                    "escape)")
        except Exception as exc:  # a client must never be able to crash the supervisor
            self.log(f"internal error serving a request: {type(exc).__name__}: {exc}")
            self.reply_error(ident, rid, "internal", f"internal error: {type(exc).__name__}")

    def _refuse_while_unwritable(self, problem: str, request: req.Request, scope: Scope) -> None:
        """While the store cannot be written, work that needs it is refused at once rather than left waiting: a
        spawn, message or restart (a start records the worker's key), and a stop that would queue behind a
        restart or plan held until the store can be written (it would be answered only then)."""
        if isinstance(request, req.Spawn | req.Upload | req.Send | req.Call | req.Restart):
            raise StoreUnavailable(f"the event store cannot be written ({problem}); nothing was taken: "
                                   "try again once there is space")
        if isinstance(request, req.Stop):
            behind = self.supervision.engine.waits_behind(scope.member(request.agent).name)
            if behind is not None:
                raise StoreUnavailable(f"the event store cannot be written ({problem}) and {behind} waits for it, "
                                       "which this stop would follow; nothing was taken: try again once there is space")

    def _serve(self, ident: bytes, rid: int, request: req.Request, tenant: str) -> None:
        ticket = (ident, rid)
        problem = self.records.store.problem
        scope = Scope(self.supervision, self.tenants, tenant)
        if problem is not None:
            self.supervision.watch_store()
            self._refuse_while_unwritable(problem, request, scope)
        match request:
            case req.Ping():
                info = {"pid": os.getpid(), "home": str(self.home_root), "agents": len(scope.agents()),
                        "store_problem": problem, "tenant": tenant}
                if tenant == OPERATOR:
                    info["listen"] = self.remote.endpoint if self.remote is not None else None
                    info["metrics"] = self.metrics_address
                self.reply(ident, rid, info)
            case req.Spawn(manifest, replace, for_tenant):
                if tenant != OPERATOR:
                    raise Refused("a tenant's spawn carries its manifest's text and its component "
                                  "(theater --remote FILE spawn MANIFEST sends both), never a path")
                if for_tenant is not None and for_tenant not in self.tenants.by_name:
                    raise Refused(f"no tenant named {for_tenant!r}")
                self.supervision.spawn(Path(manifest), ticket, replace=replace, tenant=for_tenant or OPERATOR)
            case req.Upload():
                self.supervision.spawn_uploaded(request, ticket, tenant)
            case req.Send(agent, data):
                queued = self._queue(scope.agent(agent), data, None)
                self.reply(ident, rid, {"queued": queued})
            case req.Call(agent, data, timeout_ms):
                self._queue(scope.agent(agent), data, (ticket, timeout_ms))
            case req.Ps():
                now = time.time()
                with _collector_paused():  # the rows are built, sent and dropped inside
                    self.reply(ident, rid, {"agents": [a.summary(now) for a in scope.agents()], "store_problem": problem})
            case req.Tree():
                with _collector_paused():
                    roots = [m for m in self.supervision.roots() if scope.owns(m)]
                    self.reply(ident, rid, {"roots": [self.supervision.entry(m) for m in roots]})
            case req.Stop(agent):
                self.supervision.stop(scope.member(agent), ticket)
            case req.Restart(agent):
                self.supervision.restart(scope.member(agent), ticket)
            case req.Wait(agent, after, wait_ms):
                self._wait(ident, rid, scope.chain(agent), after, wait_ms, tenant)
            case req.Events(agent, after):
                self._events(ident, rid, scope.chain(agent), after)
            case req.Verify(agent):
                if agent is None and tenant != OPERATOR:  # every chain of its own
                    self._verify(ident, rid, tenant, None, [m.name for m in scope.members()])
                else:
                    self._verify(ident, rid, tenant, scope.chain(agent) if agent is not None else None)
            case req.Down():
                self.down_waiters.append(ticket)
                self.request_down()
            case req.Checkpoint():
                self.reply(ident, rid, self.checkpoints.make())
            case req.Remove(agent):
                self.reply(ident, rid, self.supervision.remove(scope.member(agent)))
            case req.RotateKey():
                self.reply(ident, rid, self.rotate_key())
            case req.Gc(agents):
                self.reply(ident, rid, {"agents": self.retention.run(list(agents))})
            case req.TenantAdd(name, public_key, policies, routes, quotas):
                added = self.tenants.add(name, public_key, list(policies), list(routes), quotas)
                self.reply(ident, rid, {**added.as_dict(), "server_key": server_keys(Home(self.home_root))[0],
                                        "endpoint": self.remote.endpoint if self.remote else None})
            case req.TenantList():
                self.reply(ident, rid, {"tenants": [self._tenant_entry(t.name) for t in self.tenants.by_name.values()],
                                        "refused_connections": self.tenants.refused_connections})
            case req.TenantRemove(name):
                self.supervision.remove_tenant(name, ticket)
            case req.Top():
                with _collector_paused():
                    self.reply(ident, rid, self.usage.top(scope))
            case req.Usage(of, since_ns):
                if tenant != OPERATOR and of not in (None, tenant):
                    self.tenants.deny(tenant, "usage", f"asked for the usage of tenant {of!r}")
                    raise NotFound(f"no tenant named {of!r}")
                self.reply(ident, rid, self.usage.report(of if tenant == OPERATOR else tenant, since_ns))

    def _tenant_entry(self, name: str) -> dict[str, Any]:
        t = self.tenants.by_name[name]
        mine = self.tenants.agents_of(name)
        return {**t.as_dict(), "agents": len(mine), "running": sum(1 for a in mine if a.alive),
                "denials": self.tenants.denials(name)}

    def _queue(self, agent: Agent, data: req.Data, call: tuple[tuple[bytes, int], int] | None) -> int:
        """Put a message in the agent's mailbox (bounded); a call is answered when its result is committed."""
        limits = agent.config.limits
        if len(data) > limits.max_message_bytes:
            raise Refused(f"message of {len(data)} bytes exceeds {agent.name}'s max_message_bytes {limits.max_message_bytes}")
        status = agent.leaf.shown  # restarting while its node's running plan is to start it again: it queues
        if status in ("stopped", "failed", "stopping"):
            tree = self.supervision.tree_of(agent)
            raise Refused(f"agent {agent.name} is {status}" + (f", in the tree {tree}" if tree is not None else ""))
        if agent.queued + agent.reserved >= limits.mailbox:  # places held for agents' sends count
            raise Refused(f"agent {agent.name}'s mailbox is full ({limits.mailbox} messages)")
        full = queue_room(agent.config.tenant, len(data))
        if full is not None:
            raise Refused(full)
        self.tenants.check_message(agent.config.tenant)
        pending = Pending(wire.Call(next(self.workers.call_ids), wire.CallKind.HANDLE, bytes(data)))
        if call is not None:
            pending.reply_to, timeout_ms = call
            pending.timeout = self.timers.after(timeout_ms / 1000, lambda: self.answer_error(
                pending, "timeout", f"no reply from {agent.name} within {timeout_ms} ms"))
        agent.mailbox.append(pending)
        queued = agent.queued
        self.workers.dispatch(agent)
        return queued

    def _hold(self, requester: str, kind: str, bound: int) -> None:
        """One more request of ``kind`` held for ``requester`` until it is answered, within ``bound``."""
        if self._held[requester, kind] >= bound:
            who = "the operator" if requester == OPERATOR else f"tenant {requester}"
            raise Refused(f"{who} already has {bound} {kind} requests waiting for their answers: "
                          "ask again once one is answered")
        self._held[requester, kind] += 1

    def _release(self, requester: str, kind: str) -> None:
        self._held[requester, kind] -= 1
        if not self._held[requester, kind]:
            del self._held[requester, kind]

    def _wait(self, ident: bytes, rid: int, ref: str, after: int, wait_ms: int, requester: str) -> None:
        """Answer once the chain of an agent or a tree node has a record after ``after``, or at ``wait_ms``."""
        chain_id, head = self.supervision.chain_head(ref)
        if head > after or wait_ms == 0:
            self.reply(ident, rid, {"head": head})
            return
        self._hold(requester, "wait", MAX_WAITS)
        entry = (ident, rid, requester)
        self.waiters.setdefault(chain_id, []).append(entry)

        def expire() -> None:
            self._expiries.pop(entry, None)
            lst = self.waiters.get(chain_id, [])
            if entry in lst:
                lst.remove(entry)
                self._release(requester, "wait")
                now = head  # the head when the wait began, if its agent was forgotten meanwhile (it never started)
                with contextlib.suppress(NotFound):
                    found, current = self.supervision.chain_head(ref)
                    if found == chain_id:  # not another agent given the name since
                        now = current
                self.reply(ident, rid, {"head": now})

        self._expiries[entry] = self.timers.after(wait_ms / 1000, expire)

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

    def _verify(self, ident: bytes, rid: int, requester: str, ref: str | None, only: list[str] | None = None) -> None:
        """Verify the home's chains (or the chains ``only`` names) as `theater verify` does, off the loop;
        answer when done."""
        from ._audit import verify_home

        self._hold(requester, "verify", MAX_VERIFIES)
        home, stop = Home(self.home_root), self._stop_verifies
        if only is None:
            job = self._pool.submit(verify_home, home, ref, stop=stop)
        else:
            job = self._pool.submit(lambda: [r for name in only for r in verify_home(home, name, stop=stop)])
        self._verifies[job] = (ident, rid, requester)

        def done() -> None:
            if job not in self._verifies:  # answered by end_verifies, at down
                return
            if not job.done():
                self.timers.after(0.02, done)
                return
            self._answer_verify(job)

        self.timers.after(0.02, done)

    def _answer_verify(self, job: Future[list[ChainReport]]) -> None:
        ident, rid, requester = self._verifies.pop(job)
        self._release(requester, "verify")
        try:
            reports = job.result()
        except CancelledError:  # queued behind another when down came: never started
            self.reply_error(ident, rid, Refused.code, SHUTTING_DOWN)
            return
        except SupervisorError as exc:  # Refused, SHUTTING_DOWN: stopped at down
            self.reply_error(ident, rid, exc.code, str(exc))
            return
        except Exception as exc:  # a corrupt store must not take the supervisor down
            self.reply_error(ident, rid, "store", f"cannot verify: {type(exc).__name__}: {exc}")
            return
        self.reply(ident, rid, {"chains": [r.as_dict() for r in reports]})

    def end_verifies(self) -> None:
        """At down: a verify in progress stops at its next record and one queued never starts, so that the
        process does not outlive ``down`` by the minutes a large home's verify takes; each is answered (refused:
        the supervisor is shutting down, or its reports if it had just finished)."""
        self._stop_verifies.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        for job in list(self._verifies):
            self._answer_verify(job)

    def wake(self, chain_id: bytes, head: int) -> None:
        for ident, rid, requester in self.waiters.pop(chain_id, None) or ():
            expiry = self._expiries.pop((ident, rid, requester), None)
            if expiry is not None:
                expiry.cancel()
            self._release(requester, "wait")
            self.reply(ident, rid, {"head": head})

    def finish_down(self, stopped: int) -> None:
        self.end_verifies()  # answered before down is: the process ends right after
        for ident, rid in self.down_waiters:
            self.reply(ident, rid, {"stopped": stopped})

    # --- answers ------------------------------------------------------------------------------

    def answer(self, pending: Pending, checked: Checked) -> None:
        """A call's committed result, to its caller."""
        if pending.answered or (pending.reply_to is None and pending.on_answer is None):
            return
        _answered(pending)
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
        _answered(pending)
        if pending.on_answer is not None:
            pending.on_answer(None, code, message)
            return
        assert pending.reply_to is not None
        self.reply_error(*pending.reply_to, code, message)

    def reply(self, ident: bytes, rid: int, result: dict[str, Any], data: bytes | None = None) -> None:
        tenant = _tenant_of(ident)
        if tenant != OPERATOR:
            result = localized(result, tenant)
        body = wire.encode_reply({"id": rid, "ok": True, "result": result})
        frames = [wire.header(wire.ClientType.REPLY), body]
        if data is not None:
            frames.append(data)
        self._send(ident, frames)

    def reply_error(self, ident: bytes, rid: int, code: str, message: str) -> None:
        if len(message) > MAX_ERROR_CHARS:  # an error always fits what a client reads
            message = message[:MAX_ERROR_CHARS] + "…"
        tenant = _tenant_of(ident)
        if tenant != OPERATOR:
            message = _local_names(message, tenant)
        body = {"id": rid, "ok": False, "error": {"code": code, "message": message}}
        self._send(ident, [wire.header(wire.ClientType.REPLY), wire.encode_reply(body)])

    def _send(self, ident: bytes, frames: list[bytes]) -> None:
        """To the client behind ``ident``, on the socket it came from."""
        if ident[:1] == REMOTE:
            if self.remote is None:
                return
            socket, routing_id = self.remote.socket, ident[ident.index(b"\0") + 1:]
        else:
            socket, routing_id = self.socket, ident[1:]
        with contextlib.suppress(zmq.ZMQError):
            wire.send_frames(socket, [routing_id, *frames], copy=False)

    def close(self) -> None:
        self.end_verifies()
        self.socket.close(0)
        if self.remote is not None:
            self.remote.close()


def _tenant_of(ident: bytes) -> str:
    """Whose client ``ident`` is: the tenant written into a remote client's ident, else the operator."""
    return ident[1:ident.index(b"\0")].decode() if ident[:1] == REMOTE else OPERATOR


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """For a reply with a row per agent, built, sent and dropped inside: its thousands of dicts hold no cycles.
    Collected while alive, they would be moved into the oldest generation, and every few dozen listings of
    2,000 agents would pay a full collection of the whole heap (9-15 ms, finding nothing)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _answered(pending: Pending) -> None:
    """Answered once: its timeout, if it has one, is cancelled, and lets go of it at once."""
    pending.answered = True
    if pending.timeout is not None:
        pending.timeout.cancel()
        pending.timeout = None


def _local_names(message: str, tenant: str) -> str:
    """An error as its tenant reads it: its agents' names without the tenant's prefix. Only a prefix that
    begins a name is dropped: a tenant named ``d`` must not lose the ``d:`` of "reached: 10"."""
    return re.sub(rf"(?<![a-z0-9_-]){re.escape(tenant + TENANT_SEP)}(?=[a-z0-9])", "", message)
