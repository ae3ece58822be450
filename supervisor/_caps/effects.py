"""A call's effects through the supervisor: staged into its commit, carried out once it is durable.

Everything a call asked of the supervisor beyond an answer — key-value writes,
messages sent, timers set or cancelled — waits beside the call
(``Pending.effects``). If the call succeeds, the writes and timers go into the
transaction that commits its records, and once that returned the messages are
delivered and the timers armed; if it fails, or never commits, they are dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._agent import Agent, Effects, Pending

if TYPE_CHECKING:
    from .._ledger import Checked
    from .messaging import Messaging
    from .timers import AgentTimers

__all__ = ["CallEffects"]


class CallEffects:
    def __init__(self, messaging: Messaging, timers: AgentTimers) -> None:
        self.messaging = messaging
        self.timers = timers

    def stage(self, pending: Pending, checked: Checked) -> None:
        """Put what a checked result commits beside its records into its commit."""
        commit, effects = checked.commit, pending.effects
        if pending.timer_id is not None:  # a delivered timer is used up by any committed outcome
            commit.timers_removed = [pending.timer_id]
        if pending.send_id is not None:  # so is a delivered message
            commit.sends_removed = [pending.send_id]
        if checked.status != "ok":
            return
        if effects.sends:  # kept until delivered: a supervisor that dies first delivers them when it starts again
            commit.sends_added = [self.messaging.row(target, sent) for target, sent in effects.sends]
        if effects.kv:
            commit.kv = effects.kv
        if effects.timers:
            commit.timers_added = effects.timers
        if effects.cancels:
            commit.timers_removed = [*(commit.timers_removed or ()), *effects.cancels]

    def committed(self, agent: Agent, pending: Pending, checked: Checked) -> None:
        effects = pending.effects
        if checked.status != "ok":  # nothing it did takes effect (the message it was, if any, left with it)
            self.messaging.release(effects.sends)
            return
        self.timers.committed(agent, effects.timers, effects.cancels)
        sends, effects.sends = effects.sends, []
        self.messaging.deliver(sends)

    def restart(self, pending: Pending) -> None:
        """A call sent to a worker that ended without starting it goes back to the mailbox: whatever that
        worker was served for it (a worker that ran none of it asked nothing, honestly) is forgotten, and
        the next worker runs it afresh."""
        self.messaging.release(pending.effects.sends)
        pending.effects = Effects()
        pending.served = []
        pending.asked = False
        pending.unanswered = None
        pending.deadline = None

    def dropped(self, pending: Pending) -> None:
        """The call will not commit: nothing it did through the supervisor takes effect, and a sent message
        it was is not delivered again (its worker ended running it, or its commit failed)."""
        self.messaging.release(pending.effects.sends)
        if pending.send_id is not None:
            self.messaging.forget([pending.send_id])
