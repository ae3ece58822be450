"""Timers for the supervisor's loop: every wait the supervisor does is one of these, never a blocking call."""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable

__all__ = ["Timer", "Timers"]

MAX_DROPPED = 1000  # cancelled timers one turn of the loop drops on its way to a due one
# Cancelled timers in the heap past which it is rebuilt without them, once they are over half of it: a
# cancelled timer due in a day (an agent's timer cancelled, or its agent removed) would otherwise stay a day.
SWEEP_MIN = 1024


class Timer:
    """A timer set; ``cancel`` drops what it would run (and all that holds), leaving a small entry to
    fall due, or to be swept out with the other cancelled ones (``Timers.at``)."""

    __slots__ = ("_owner", "fn")

    def __init__(self, fn: Callable[[], None], owner: Timers | None = None) -> None:
        self.fn: Callable[[], None] | None = fn
        self._owner = owner  # the Timers whose heap holds it, while it is there and not cancelled

    def cancel(self) -> None:
        self.fn = None
        if self._owner is not None:
            self._owner._cancelled += 1
            self._owner = None


class Timers:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._cancelled = 0  # cancelled timers still in the heap

    def at(self, when: float, fn: Callable[[], None]) -> Timer:
        if self._cancelled > SWEEP_MIN and 2 * self._cancelled > len(self._heap):
            self._heap = [entry for entry in self._heap if entry[2].fn is not None]
            heapq.heapify(self._heap)
            self._cancelled = 0
        timer = Timer(fn, self)
        heapq.heappush(self._heap, (when, next(self._seq), timer))
        return timer

    def after(self, seconds: float, fn: Callable[[], None]) -> Timer:
        return self.at(time.monotonic() + seconds, fn)

    def __len__(self) -> int:
        """Timers set and neither run nor cancelled (what `top` and /metrics show as the loop's timers)."""
        return len(self._heap) - self._cancelled

    def every(self, seconds: float, fn: Callable[[], None]) -> None:
        """``fn`` every ``seconds``, for as long as the loop runs."""
        def tick() -> None:
            self.after(seconds, tick)
            fn()

        self.after(seconds, tick)

    def timeout_ms(self) -> int:
        """How long the loop may sleep: until the next timer, at most a second."""
        if not self._heap:
            return 1000
        wait = self._heap[0][0] - time.monotonic()
        # A timer already due polls without sleeping (its few microseconds past due were rounded up to a
        # whole millisecond, paid once per timer when several fell due together: a storm's exits, a burst's
        # hellos and starts); one still to come sleeps until it is due, rounded up so the loop does not wake
        # just before it.
        return 0 if wait <= 0 else min(1000, math.ceil(wait * 1000))

    def run_due(self) -> None:
        """Run the oldest due timer, only one: the loop polls again (without sleeping) before the next, so
        what many timers do at once (a crash storm's exits, each a durable commit) is spread over turns
        between which the other agents' calls are served. Cancelled timers ahead of it are dropped on the
        way, up to MAX_DROPPED a turn: under a steady load of calls thousands of answered calls' timeouts
        fall due every second, and one a turn they piled up without bound."""
        heap = self._heap
        now = time.monotonic()
        for _ in range(MAX_DROPPED):
            if not heap or heap[0][0] > now:
                return
            timer = heapq.heappop(heap)[2]
            fn = timer.fn
            if fn is not None:
                timer._owner = None  # out of the heap: a cancel from now on has nothing to sweep
                fn()
                return
            self._cancelled -= 1
