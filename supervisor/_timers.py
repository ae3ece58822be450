"""Timers for the supervisor's loop: every wait the supervisor does is one of these, never a blocking call."""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable

__all__ = ["Timers"]


class Timers:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), fn))

    def after(self, seconds: float, fn: Callable[[], None]) -> None:
        self.at(time.monotonic() + seconds, fn)

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

    def run_due(self) -> None:
        """Run the oldest due timer, only one: the loop polls again (without sleeping) before the next, so
        what many timers do at once (a crash storm's exits, each a durable commit) is spread over turns
        between which the other agents' calls are served."""
        if self._heap and self._heap[0][0] <= time.monotonic():
            _, _, fn = heapq.heappop(self._heap)
            fn()
