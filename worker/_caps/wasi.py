"""WASI 0.2 for language runtimes: what a guest's runtime needs to start, and nothing to escape with.

Not a capability: no policy grants or withholds it, and this module declares no
``CAPABILITY`` (``worker._caps``). Every agent whose component imports WASI 0.2
gets it, because what it answers is harmless and recorded, and what could
reach outside the sandbox traps.

Guest toolchains for languages with a runtime (componentize-py's CPython, for
one) import the WASI 0.2 interfaces whether or not the agent's own code uses
them, and the runtime calls a few of them as it starts (its hash seed, its
environment). A worker links, at whatever 0.2.x version the component imports:

    wasi:cli/environment          no variables, no arguments, no working directory
    wasi:filesystem/preopens      no directories (so opening a file fails inside the guest)
    wasi:random/random            bytes from the OS, recorded
    wasi:random/insecure          bytes from the OS, recorded
    wasi:random/insecure-seed     a seed from the OS, recorded
    wasi:clocks/wall-clock        the host's clock, recorded

Every other WASI function (files, sockets, stdio, exit, monotonic clocks and
polling) is linked as a trap: calling it fails the call, as any trap does.
Each value handed in is a ``host-call`` record, like the runtime interface's,
and counts against ``max_host_calls_per_call``; random lengths are capped by
``max_random_bytes``. docs/wit.md (section 6.4) says what a guest sees, docs/event-records.md
(section 5.5) how each value is recorded.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from wasmtime import component as wc

from .._errors import HostLimit
from ._host import Host, Linker

CLOCK_RESOLUTION_NS = 1000


class Wasi:
    """The WASI functions a worker answers; the rest of WASI traps."""

    def __init__(self, host: Host) -> None:
        self._host = host
        self._limits = host.limits

    def linker_for(self, name: str) -> Linker | None:
        """How to link the imported interface ``name``, or None: its functions trap."""
        base = name.partition("@")[0]
        linkers: dict[str, Linker] = {
            "wasi:cli/environment": self._environment,
            "wasi:filesystem/preopens": lambda inst: inst.add_func("get-directories", lambda _store: []),
            "wasi:random/random": lambda inst: self._random(inst, name, "get-random-bytes", "get-random-u64"),
            "wasi:random/insecure": lambda inst: self._random(
                inst, name, "get-insecure-random-bytes", "get-insecure-random-u64"),
            "wasi:random/insecure-seed": lambda inst: self._seed(inst, name),
            "wasi:clocks/wall-clock": lambda inst: self._wall_clock(inst, name),
        }
        return linkers.get(base)

    def _value(self, interface: str, function: str, data_in: bytes, make: Callable[[], bytes]) -> bytes:
        return self._host.value(interface, function, data_in, make)

    @staticmethod
    def _environment(inst: wc.LinkerInstance) -> None:
        inst.add_func("get-environment", lambda _store: [])
        inst.add_func("get-arguments", lambda _store: [])
        inst.add_func("initial-cwd", lambda _store: None)

    def _random(self, inst: wc.LinkerInstance, interface: str, bytes_fn: str, u64_fn: str) -> None:
        def random_bytes(_store: Any, length: int) -> bytes:
            if length > self._limits.max_random_bytes:
                raise HostLimit(f"{bytes_fn}({length}) exceeds max_random_bytes {self._limits.max_random_bytes}")
            return self._value(interface, bytes_fn, length.to_bytes(8, "big"), lambda: os.urandom(length))

        def random_u64(_store: Any) -> int:
            return int.from_bytes(self._value(interface, u64_fn, b"", lambda: os.urandom(8)), "big")

        inst.add_func(bytes_fn, random_bytes)
        inst.add_func(u64_fn, random_u64)

    def _seed(self, inst: wc.LinkerInstance, interface: str) -> None:
        def insecure_seed(_store: Any) -> tuple[int, int]:
            data = self._value(interface, "insecure-seed", b"", lambda: os.urandom(16))
            return int.from_bytes(data[:8], "big"), int.from_bytes(data[8:], "big")

        inst.add_func("insecure-seed", insecure_seed)

    def _wall_clock(self, inst: wc.LinkerInstance, interface: str) -> None:
        def now(_store: Any) -> SimpleNamespace:
            def make() -> bytes:
                seconds, nanoseconds = divmod(time.time_ns(), 1_000_000_000)
                return seconds.to_bytes(8, "big") + nanoseconds.to_bytes(4, "big")

            data = self._value(interface, "now", b"", make)
            return SimpleNamespace(seconds=int.from_bytes(data[:8], "big"), nanoseconds=int.from_bytes(data[8:], "big"))

        inst.add_func("now", now)
        inst.add_func("resolution", lambda _store: SimpleNamespace(seconds=0, nanoseconds=CLOCK_RESOLUTION_NS))
