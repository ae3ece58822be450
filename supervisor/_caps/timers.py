"""`theater:agent/timers`: messages an agent sends itself later, kept in the event store.

A timer exists once the call that set it is committed (its row is written in
that call's transaction), and so does a cancel. When it is due, the supervisor
puts a MESSAGE call (origin ``timer``, the timer's id as the message id) in the
agent's mailbox; the transaction that commits that call's records removes the
timer. A worker that ends before its result is committed leaves the timer in
place, and it is delivered again: at least once, never silently lost. Timers
survive worker and supervisor restarts; they are removed when the agent stops.
Due times are wall-clock nanoseconds, so a supervisor restart keeps them.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from theater import wire

from .._agent import Agent, Agents, Pending
from .._host import Answer, HostCall
from .._store import EventStore
from .._supervision import Status
from .._timers import Timer, Timers
from .grants import TimersGrant

if TYPE_CHECKING:
    from .._ledger import Checked
    from .._workers import Workers

__all__ = ["AgentTimers"]

RETRY_S = 0.5  # a due timer whose agent is not running, or whose mailbox is full, is tried again this often
MAX_ID = 2**63 - 1
RECEIVING = (Status.RUNNING, Status.STARTING, Status.RESTARTING)


class AgentTimers:
    def __init__(self, store: EventStore, agents: Agents, workers: Workers, loop: Timers,
                 log: Callable[[str], None]) -> None:
        self.store = store
        self.agents = agents
        self.workers = workers
        self.loop = loop
        self.log = log
        self.pending: dict[int, tuple[bytes, int, bytes]] = {}  # committed: id -> (agent id, due ns, message)
        self._of: dict[bytes, set[int]] = {}  # the same, by agent: a count or a stop never walks every agent's
        self.delivering: set[int] = set()  # in a mailbox or in flight
        self._armed: dict[int, Timer] = {}  # the loop's timer that fires each (a cancel must drop it too)

    def resume(self) -> None:
        """After a supervisor start: every committed timer, armed again."""
        for timer_id, agent_id, due_ns, message in self.store.timers():
            self._add(timer_id, agent_id, due_ns, message)
            self._arm(timer_id, due_ns)

    def _add(self, timer_id: int, agent_id: bytes, due_ns: int, message: bytes) -> None:
        self.pending[timer_id] = (agent_id, due_ns, message)
        self._of.setdefault(agent_id, set()).add(timer_id)

    def _remove(self, timer_id: int) -> None:
        held = self.pending.pop(timer_id, None)
        if held is not None:
            mine = self._of[held[0]]
            mine.discard(timer_id)
            if not mine:
                del self._of[held[0]]

    # --- host requests ---------------------------------------------------------------------

    def host_request(self, call: HostCall) -> Answer:
        grant: TimersGrant = call.agent.config.grant("timers")
        effects = call.pending.effects
        if call.op == "after":
            delay = call.args.get("delay_ms")
            message = call.data or b""
            if type(delay) is not int or not 0 <= delay <= grant.max_delay_ms:
                return Answer({"ok": False, "error": f"a delay of {delay} ms is outside 0..max_delay_ms "
                                                     f"({grant.max_delay_ms})"})
            limit = call.agent.config.limits.max_message_bytes
            if len(message) > limit:
                return Answer({"ok": False, "error": f"a message of {len(message)} bytes is more than "
                                                     f"max_message_bytes ({limit})"})
            # The timer this call delivers (if it is a timer's) is not counted: the transaction that commits
            # the call removes it, in the same step as it adds the timers the call sets. So a timer re-armed
            # from its own delivery fits under max_pending = 1.
            delivering = call.pending.timer_id
            of_agent = self._of.get(call.agent.id, set())
            mine = len(of_agent) - (delivering in of_agent)
            cancelled = sum(1 for timer_id in effects.cancels if timer_id != delivering)
            if mine + len(effects.timers) - cancelled >= grant.max_pending:
                return Answer({"ok": False, "error": f"{grant.max_pending} timers are pending already "
                                                     "(max_pending)"})
            timer_id = self._new_id(effects.timers)
            effects.timers.append((timer_id, time.time_ns() + delay * 1_000_000, message))
            return Answer({"ok": True, "id": timer_id})
        if call.op == "cancel":
            wanted = call.args.get("id")
            if type(wanted) is not int:
                return Answer({"ok": True, "cancelled": False})
            new = [t for t in effects.timers if t[0] == wanted]
            if new:
                effects.timers.remove(new[0])
                return Answer({"ok": True, "cancelled": True})
            held = self.pending.get(wanted)
            if held is None or held[0] != call.agent.id or wanted in effects.cancels:
                return Answer({"ok": True, "cancelled": False})
            if wanted in self.delivering:  # it came due and its message is on its way: too late to stop it
                return Answer({"ok": True, "cancelled": False})
            effects.cancels.append(wanted)
            return Answer({"ok": True, "cancelled": True})
        return Answer({"ok": False, "error": f"unknown timers operation {call.op!r}"})

    def _new_id(self, new: list[tuple[int, int, bytes]]) -> int:
        while True:
            timer_id = secrets.randbelow(MAX_ID) + 1
            if timer_id not in self.pending and all(t[0] != timer_id for t in new):
                return timer_id

    # --- committed calls -------------------------------------------------------------------

    def committed(self, agent: Agent, added: list[tuple[int, int, bytes]], cancelled: list[int]) -> None:
        for timer_id, due_ns, message in added:
            self._add(timer_id, agent.id, due_ns, message)
            self._arm(timer_id, due_ns)
        for timer_id in cancelled:
            self._remove(timer_id)
            self._disarm(timer_id)

    def consumed(self, timer_id: int) -> None:
        """The call that delivered the timer is committed (and its row removed with it)."""
        self._remove(timer_id)
        self.delivering.discard(timer_id)
        self._disarm(timer_id)

    def stopped(self, agent: Agent) -> None:
        """The agent stopped: its timers are removed."""
        mine = list(self._of.get(agent.id, ()))
        if not mine:
            return
        for timer_id in mine:
            self._remove(timer_id)
            self._disarm(timer_id)
        self.store.remove_timers(agent.id)

    # --- delivery ----------------------------------------------------------------------------

    def _arm(self, timer_id: int, due_ns: int) -> None:
        self._arm_in(timer_id, max(0.0, (due_ns - time.time_ns()) / 1e9))

    def _arm_in(self, timer_id: int, seconds: float) -> None:
        """Fire the timer in ``seconds``, keeping the loop's timer so that a cancel can drop it."""
        self._armed[timer_id] = self.loop.after(seconds, lambda: self._fire(timer_id))

    def _disarm(self, timer_id: int) -> None:
        """The timer is gone (cancelled, delivered, or its agent stopped): its loop timer goes with it."""
        armed = self._armed.pop(timer_id, None)
        if armed is not None:
            armed.cancel()

    def _fire(self, timer_id: int) -> None:
        self._armed.pop(timer_id, None)
        held = self.pending.get(timer_id)
        if held is None or timer_id in self.delivering:
            return
        agent_id, _, message = held
        agent = self.agents.by_id.get(agent_id)
        if agent is None:
            return
        if agent.status not in RECEIVING or agent.queued + agent.reserved >= agent.config.limits.mailbox:
            self._arm_in(timer_id, RETRY_S)
            return
        if any(timer_id in p.effects.cancels for p in agent.sent):  # a call that cancels it is being run or
            self._arm_in(timer_id, RETRY_S)  # committed: if it commits the timer is gone, else it fires then
            return
        data = wire.encode_message(wire.Origin.TIMER, agent.id, timer_id.to_bytes(16, "big"), message)
        pending = Pending(wire.Call(next(self.workers.call_ids), wire.CallKind.MESSAGE, data), timer_id=timer_id)
        pending.on_answer = lambda checked, code, detail: self._outcome(timer_id, checked)
        self.delivering.add(timer_id)
        agent.mailbox.append(pending)
        self.workers.dispatch(agent)

    def _outcome(self, timer_id: int, checked: Checked | None) -> None:
        if checked is not None:
            self.consumed(timer_id)
            return
        self.delivering.discard(timer_id)  # not committed: deliver it again
        self._arm_in(timer_id, RETRY_S)
