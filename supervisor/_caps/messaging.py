"""`theater:agent/messaging`: agents' messages and calls to each other, routed by the supervisor.

The supervisor sees every message, so it is the one place that can say who
sent it (the receiver is told the sender's id, never what the sender claims),
bound every mailbox, and see a call cycle the moment it would close: each
agent waits on at most one call at a time (``Agent.waiting_on``), so following
those edges from the target back to the caller finds the cycle at once.

A ``send`` is delivered once the sending call is committed, with status ok (a
call that fails sends nothing); a ``call`` is delivered at once, since the
caller waits for it. Each delivery is a MESSAGE call to the target: its record
names the sender's id and the message id, and the caller's host-call record
holds the same message id and the hash of the target's record, so an auditor
can follow a conversation both ways.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from theater import wire

from .._agent import Agent, Agents, Pending, queue_room, reserve, unreserve
from .._config import OPERATOR, TENANT_SEP
from .._errors import StoreError
from .._host import Answer, HostCall, HostRequests
from .._store import EventStore
from .._supervision import NodeKind, Status
from .._tenants import QuotaExceeded, local_name
from .._timers import Timers
from .grants import MessagingGrant, matches

if TYPE_CHECKING:
    from .._ledger import Checked
    from .._tenants import Tenants
    from .._workers import Workers

__all__ = ["Messaging"]

MAX_ADDRESS_BYTES = 256  # UTF-8; a worker refuses a longer address itself (host-limit), this is its copy
RECEIVING = (Status.RUNNING, Status.STARTING, Status.RESTARTING)


class Messaging:
    def __init__(self, store: EventStore, agents: Agents, workers: Workers, host: HostRequests, timers: Timers,
                 log: Callable[[str], None]) -> None:
        self.store = store
        self.agents = agents
        self.workers = workers
        self.host = host
        self.timers = timers
        self.log = log
        self.tenants: Tenants  # set by the supervisor once all parts exist

    # --- host requests ---------------------------------------------------------------------

    def host_request(self, call: HostCall) -> Answer | None:
        if call.op not in ("send", "call"):
            return _error("denied", f"unknown messaging operation {call.op!r}")
        sender, args, message = call.agent, call.args, call.data or b""
        to = args.get("to")
        if not isinstance(to, str) or not 0 < len(to.encode("utf-8", "surrogatepass")) <= MAX_ADDRESS_BYTES:
            return _error("unknown-address", f"an address is an agent's name or id, 1-{MAX_ADDRESS_BYTES} bytes")
        target = self._find(to, sender)
        if target is None:
            return _error("unknown-address", f"no agent named or with id {to!r}")
        refusal = self._refusal(sender, target, len(message))
        if refusal is not None:
            return refusal
        try:
            self.tenants.check_message(target.config.tenant)
        except QuotaExceeded as exc:  # the guest's error cases have no quota: it is denied, with the quota named
            return _error("denied", str(exc))
        message_id = uuid.uuid4().bytes
        if call.op == "send":
            pending = self._pending(wire.Origin.SEND, sender.id, message_id, message, send_id=message_id)
            call.pending.effects.sends.append((target, pending))
            target.reserved += 1
            reserve(target.config.tenant, len(pending.call.data))
            return Answer({"ok": True, "message_id": message_id.hex()})
        timeout_ms = args.get("timeout_ms")
        if type(timeout_ms) is not int or timeout_ms < 0:
            return _error("timeout", "timeout_ms must be a non-negative integer")
        timeout_ms = min(timeout_ms, sender.config.limits.wall_time_ms)  # the caller's call ends by then anyway
        path = self._cycle(sender, target)
        if path is not None:
            return _error("cycle", f"the call would wait on itself: {path}")
        pending = self._pending(wire.Origin.CALL, sender.id, message_id, message)
        pending.on_answer = lambda checked, code, detail: self._answer(call, target, message_id, checked, code, detail)
        sender.waiting_on = target
        target.mailbox.append(pending)
        pending.timeout = self.timers.after(timeout_ms / 1000, lambda: self._timeout(call, pending, target, timeout_ms))
        self.workers.dispatch(target)
        return None

    def _find(self, address: str, sender: Agent) -> Agent | None:
        """The agent an address names, as the sender's tenant writes names: its own agents without the prefix,
        another tenant's in full (``other:name``). An agent of a tenant it may not reach is not found."""
        tenant = sender.config.tenant
        candidates = [address]
        if tenant != OPERATOR:
            candidates.insert(0, f"{tenant}{TENANT_SEP}{address}")
        for ref in candidates:
            try:
                target = self.agents.find(ref)
            except Exception:  # NotFound, or not a name or id at all
                continue
            if self.tenants.may_route(tenant, target.config.tenant):
                return target
            self.tenants.deny(tenant, "route", f"{sender.name} addressed {target.name}: no route between tenants "
                                               f"{tenant} and {target.config.tenant}")
            return None
        return None

    def _refusal(self, sender: Agent, target: Agent, size: int) -> Answer | None:
        """Why ``sender`` may not message ``target`` now, if it may not."""
        if target is not sender:
            mine: MessagingGrant = sender.config.grant("messaging")
            them, me = local_name(target.name, sender.config.tenant), local_name(sender.name, target.config.tenant)
            if not matches(mine.to, them, _relations(target, sender)):
                return _error("denied", f"{sender.name}'s policy does not let it message {target.name} "
                                        f"([messaging] to = {list(mine.to)})")
            theirs: MessagingGrant | None = target.config.grants.get("messaging")  # type: ignore[assignment]
            if theirs is None:
                return _error("denied", f"{target.name} does not hold the messaging capability: it takes no messages")
            if not matches(theirs.from_, me, _relations(sender, target)):
                return _error("denied", f"{target.name}'s policy does not let it hear from {sender.name} "
                                        f"([messaging] from = {list(theirs.from_)})")
        if target.status not in RECEIVING:
            return _error("not-running", f"{target.name} is {target.status}")
        # The sender's own limit is its worker's to apply before asking (host-limit); checked again here, as a
        # worker is untrusted. The target's is what `too-large` is for.
        for who, whose in ((target, f"{target.name}'s"), (sender, f"{sender.name}'s own")):
            limit = who.config.limits.max_message_bytes
            if size > limit:
                return _error("too-large", f"a message of {size} bytes is more than {limit} ({whose} "
                                           "max_message_bytes)")
        if target.queued + target.reserved >= target.config.limits.mailbox:
            return _error("mailbox-full", f"{target.name}'s mailbox is full ({target.config.limits.mailbox} messages)")
        full = queue_room(target.config.tenant, size)
        if full is not None:
            return _error("mailbox-full", full)
        return None

    def _cycle(self, caller: Agent, target: Agent) -> str | None:
        """The wait-for path from ``caller`` back to itself through ``target``, if this call would close one."""
        path = [caller]
        at: Agent | None = target
        while at is not None and at not in path:
            path.append(at)
            at = at.waiting_on
        if at is not caller:
            return None
        return " -> ".join(a.name for a in [*path, caller])

    def _pending(self, origin: wire.Origin, sender_id: bytes, message_id: bytes, message: bytes, *,
                 send_id: bytes | None = None) -> Pending:
        data = wire.encode_message(origin, sender_id, message_id, message)
        return Pending(wire.Call(next(self.workers.call_ids), wire.CallKind.MESSAGE, data), send_id=send_id)

    # --- outcomes ----------------------------------------------------------------------------

    def _answer(self, call: HostCall, target: Agent, message_id: bytes, checked: Checked | None, code: str,
                detail: str) -> None:
        """The target's committed outcome (or why there is none), to the waiting caller."""
        if call.agent.waiting_on is target:
            call.agent.waiting_on = None
        ids = {"message_id": message_id.hex()}
        if checked is None:
            answer = _error("target-crashed", f"{target.name}: {code}: {detail}", ids)
        elif checked.status == "guest-error":
            answer = _error("guest-error", checked.error, ids)
        elif checked.status != "ok":
            answer = _error("target-crashed", f"{target.name}'s call failed: {checked.status}: {checked.error}", ids)
        else:
            answer = Answer({"ok": True, **ids, "seq": checked.final.seq, "record": checked.final.hash.hex(),
                             "has_reply": checked.reply is not None}, checked.reply)
        self.host.answer(call, answer)

    def _timeout(self, call: HostCall, pending: Pending, target: Agent, timeout_ms: int) -> None:
        if pending.answered:
            return
        pending.answered = True  # whatever the target does with it now, this caller has stopped waiting
        if pending in target.mailbox:  # not delivered yet: nobody waits for it any more
            target.mailbox.remove(pending)
        if call.agent.waiting_on is target:
            call.agent.waiting_on = None
        self.host.answer(call, _error("timeout", f"no reply from {target.name} within {timeout_ms} ms",
                                      {"message_id": wire.decode_message(pending.call.data)[2].hex()}))

    def deliver(self, sends: list[tuple[Agent, Pending]]) -> None:
        """A committed call's sends, into their targets' mailboxes (their places were held since the send)."""
        for target, pending in sends:
            target.reserved -= 1
            unreserve(target.config.tenant, len(pending.call.data))
        self._queue(sends)

    def _queue(self, sends: list[tuple[Agent, Pending]]) -> None:
        dropped = []
        for target, pending in sends:
            if target.status not in RECEIVING:
                self.log(f"{target.name}: a message for it was dropped: it is {target.status}")
                assert pending.send_id is not None
                dropped.append(pending.send_id)
                continue
            target.mailbox.append(pending)
            self.workers.dispatch(target)
        self.forget(dropped)

    def resume(self) -> None:
        """After a supervisor start: the messages committed calls sent that were not delivered (the last
        supervisor died first), queued again in the order they were sent."""
        sends, gone = [], []
        for message_id, target_id, sender_id, message in self.store.sends():
            target = self.agents.by_id.get(target_id)
            if target is None:
                gone.append(message_id)
                continue
            sends.append((target, self._pending(wire.Origin.SEND, sender_id, message_id, message, send_id=message_id)))
        self.forget(gone)
        if sends:
            self.log(f"delivering {len(sends)} messages sent before this supervisor started")
        self._queue(sends)

    def row(self, target: Agent, pending: Pending) -> tuple[bytes, bytes, bytes]:
        """A send as its sender's commit stores it: (message id, target id, message)."""
        _, _, message_id, message = wire.decode_message(pending.call.data)
        return message_id, target.id, message

    def forget(self, message_ids: list[bytes]) -> None:
        """Messages that will not be delivered: their stored sends go."""
        if not message_ids:
            return
        try:
            self.store.remove_sends(message_ids)
        except StoreError as exc:  # kept: delivered once more when the next supervisor starts (at least once)
            self.log(f"{len(message_ids)} sent messages that will not be delivered could not be forgotten: {exc}")

    def release(self, sends: list[tuple[Agent, Pending]]) -> None:
        """A call that will not commit: its sends are dropped, their places freed."""
        for target, pending in sends:
            target.reserved -= 1
            unreserve(target.config.tenant, len(pending.call.data))
        sends.clear()


def _error(case: str, detail: str, extra: dict[str, str] | None = None) -> Answer:
    return Answer({"ok": False, "error": case, "detail": detail[:1024], **(extra or {})})


def _relations(who: Agent, other: Agent) -> set[str]:
    """How ``who`` stands to ``other`` in the supervision tree: its @parent, one of its @children, a @sibling."""
    out = set()
    if who.leaf.owns is not None and other.leaf.parent is who.leaf.owns:
        out.add("@parent")
    if other.leaf.owns is not None and who.leaf.parent is other.leaf.owns:
        out.add("@children")
    parent = who.leaf.parent
    if parent is not None and parent is other.leaf.parent and parent.kind is not NodeKind.AGENT_ROOT:
        out.add("@siblings")
    return out
