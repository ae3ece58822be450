"""Timers for the supervisor's loop: every wait the supervisor does is one of these, never a blocking call."""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable

__all__ = ["Timer", "Timers"]

RUN_DUE_BUDGET_S = 0.0005  # how long one turn of the loop runs due timers, past the first


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
        return max(0, min(1000, int((self._heap[0][0] - time.monotonic()) * 1000) + 1))

    def run_due(self, budget_s: float = RUN_DUE_BUDGET_S) -> None:
        """Run the due timers, oldest first, for up to ``budget_s`` (at least one): the loop polls again
        before the rest, so what many timers do at once (a crash storm's exits, each a durable commit) is
        spread over turns between which the other agents' calls are served, while thousands of cheap ones
        (the timeouts of calls already answered) do not each take a turn. One a turn, they came due faster
        than the loop turned under a steady load of calls, and piled up without bound."""
        heap = self._heap
        if not heap or heap[0][0] > time.monotonic():
            return
        stop = time.monotonic() + budget_s
        while True:
            fn = heapq.heappop(heap)[2].fn
            if fn is not None:
                fn()
            if not heap:
                return
            now = time.monotonic()
            if heap[0][0] > now or now >= stop:
                return
