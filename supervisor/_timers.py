"""Timers for the supervisor's loop: every wait the supervisor does is one of these, never a blocking call."""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable

__all__ = ["Timer", "Timers"]

MAX_DROPPED = 1000  # cancelled timers one turn of the loop drops on its way to a due one


class Timer:
    """A timer set; ``cancel`` drops what it would run (and all that holds), leaving a small entry to
    fall due."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn: Callable[[], None] | None = fn

    def cancel(self) -> None:
        self.fn = None


class Timers:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()

    def at(self, when: float, fn: Callable[[], None]) -> Timer:
        timer = Timer(fn)
        heapq.heappush(self._heap, (when, next(self._seq), timer))
        return timer

    def after(self, seconds: float, fn: Callable[[], None]) -> Timer:
        return self.at(time.monotonic() + seconds, fn)

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
            fn = heapq.heappop(heap)[2].fn
            if fn is not None:
                fn()
                return
