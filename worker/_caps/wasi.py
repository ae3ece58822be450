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

    wasi:cli/stdout, wasi:cli/stderr, wasi:io/streams
                                  writes to stdout and stderr become log records of the
                                  call (a line each, ``Host.output``), never lost, never waiting
    wasi:cli/stdin                a stream to hold; reading it traps
    wasi:cli/terminal-*           no terminal

Every other WASI function (files, sockets, stdin, exit, monotonic clocks and
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
from ._host import Host, Instance, Linker

CLOCK_RESOLUTION_NS = 1000
OUTPUT_STREAM, INPUT_STREAM = 1, 2  # host resource types of wasi:io/streams
STDIN, STDOUT, STDERR = 0, 1, 2  # the reps of the standard streams
_STREAM_NAMES = {STDOUT: "stdout", STDERR: "stderr"}
WRITE_BUDGET = 1 << 20  # what check-write allows at a time: a write never waits
OK = wc.Variant("ok", None)  # result<_, stream-error>'s ok (its cases are tagged, so a Variant is needed)


def _rep(store: Any, stream: Any) -> int:
    """The rep of a borrowed output stream. Turning the borrow into its host resource also releases it, as
    the component model requires of every borrow a host function is handed (a host function that leaves
    one traps the call: "borrow handles still remain at the end of the call")."""
    if isinstance(stream, wc.ResourceHost):
        return stream.rep
    return stream.to_host(store).rep


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
            "wasi:cli/stdout": lambda inst: self._stdio(inst, "get-stdout", STDOUT),
            "wasi:cli/stderr": lambda inst: self._stdio(inst, "get-stderr", STDERR),
            # No terminal: the standard streams are not ttys.
            "wasi:cli/terminal-stdin": lambda inst: inst.add_func("get-terminal-stdin", lambda _store: None),
            "wasi:cli/terminal-stdout": lambda inst: inst.add_func("get-terminal-stdout", lambda _store: None),
            "wasi:cli/terminal-stderr": lambda inst: inst.add_func("get-terminal-stderr", lambda _store: None),
            # An empty stdin to hold: a runtime may take it as it starts (StarlingMonkey does); reading it traps.
            "wasi:cli/stdin": lambda inst: inst.add_func(
                "get-stdin", lambda _store: wc.ResourceHost.own(STDIN, INPUT_STREAM)),
            "wasi:io/streams": self._streams,
        }
        return linkers.get(base)

    def _value(self, interface: str, function: str, data_in: bytes, make: Callable[[], bytes]) -> bytes:
        return self._host.value(interface, function, data_in, make)

    @staticmethod
    def _stdio(inst: Instance, function: str, rep: int) -> None:
        inst.add_func(function, lambda _store: wc.ResourceHost.own(rep, OUTPUT_STREAM))

    def _streams(self, inst: Instance) -> None:
        """Output streams are stdout and stderr, whose bytes become log records (``Host.output``); every
        write succeeds at once, so nothing ever waits. Input streams and polling trap."""
        inst.add_resource("output-stream", wc.ResourceType.host(OUTPUT_STREAM), lambda _store, _rep: None)
        inst.add_resource("input-stream", wc.ResourceType.host(INPUT_STREAM), lambda _store, _rep: None)

        def write(_store: Any, stream: Any, contents: bytes) -> wc.Variant:
            self._host.output(_STREAM_NAMES.get(_rep(_store, stream), "stdout"), bytes(contents))
            return OK

        for method in ("write", "blocking-write-and-flush"):
            inst.add_func(f"[method]output-stream.{method}", write)
        def flush(store: Any, stream: Any) -> wc.Variant:
            _rep(store, stream)
            return OK

        def check_write(store: Any, stream: Any) -> int:  # result<u64, stream-error>: untagged, ok is the int
            _rep(store, stream)
            return WRITE_BUDGET

        for method in ("flush", "blocking-flush"):
            inst.add_func(f"[method]output-stream.{method}", flush)
        inst.add_func("[method]output-stream.check-write", check_write)

    @staticmethod
    def _environment(inst: Instance) -> None:
        inst.add_func("get-environment", lambda _store: [])
        inst.add_func("get-arguments", lambda _store: [])
        inst.add_func("initial-cwd", lambda _store: None)

    def _random(self, inst: Instance, interface: str, bytes_fn: str, u64_fn: str) -> None:
        def random_bytes(_store: Any, length: int) -> bytes:
            if length > self._limits.max_random_bytes:
                raise HostLimit(f"{bytes_fn}({length}) exceeds max_random_bytes {self._limits.max_random_bytes}")
            return self._value(interface, bytes_fn, length.to_bytes(8, "big"), lambda: os.urandom(length))

        def random_u64(_store: Any) -> int:
            return int.from_bytes(self._value(interface, u64_fn, b"", lambda: os.urandom(8)), "big")

        inst.add_func(bytes_fn, random_bytes)
        inst.add_func(u64_fn, random_u64)

    def _seed(self, inst: Instance, interface: str) -> None:
        def insecure_seed(_store: Any) -> tuple[int, int]:
            data = self._value(interface, "insecure-seed", b"", lambda: os.urandom(16))
            return int.from_bytes(data[:8], "big"), int.from_bytes(data[8:], "big")

        inst.add_func("insecure-seed", insecure_seed)

    def _wall_clock(self, inst: Instance, interface: str) -> None:
        def now(_store: Any) -> SimpleNamespace:
            def make() -> bytes:
                seconds, nanoseconds = divmod(time.time_ns(), 1_000_000_000)
                return seconds.to_bytes(8, "big") + nanoseconds.to_bytes(4, "big")

            data = self._value(interface, "now", b"", make)
            return SimpleNamespace(seconds=int.from_bytes(data[:8], "big"), nanoseconds=int.from_bytes(data[8:], "big"))

        inst.add_func("now", now)
        inst.add_func("resolution", lambda _store: SimpleNamespace(seconds=0, nanoseconds=CLOCK_RESOLUTION_NS))
