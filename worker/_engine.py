"""The wasmtime side of a worker: one engine, one component, one call at a time.

Every call runs under a fuel budget, a wall-clock deadline (an epoch tick from
:class:`DeadlineTimer`) and the store's memory, table and instance limits.
A trap poisons a wasmtime store, so after any failed call the instance is
dropped and the next call gets a fresh store and instance; the agent continues
from its last committed state, which the host owns.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import importlib.metadata
import json
import os
import platform
import threading
import time
from collections.abc import Callable
from typing import Any

import wasmtime
from wasmtime import component as wc

from theater.spec import Limits

from ._errors import CallFailed, LoadError

__all__ = [
    "DeadlineTimer", "Lifted", "Sandbox", "artifact_key", "classify", "compile_component", "describe",
    "engine_config", "file_signature", "load_artifact", "make_engine",
]

AGENT_EXPORTS = {
    "init": "func(state: string, args: string) -> result<string, string>",
    "handle": "func(state: string, message: string) -> result<record{state: string, reply: option<string>}, string>",
}
TYPES_INTERFACE = "theater:agent/types@0.1.0"

# Last line of a wasmtime trap message -> failure status.
_TRAPS = (
    ("all fuel consumed", "out-of-fuel"),
    ("wasm trap: interrupt", "deadline"),
    ("call stack exhausted", "stack-overflow"),
    ("exceeds memory limits", "memory"),
    ("memory limit", "memory"),
    ("beyond end of memory", "memory"),
)


def classify(error: BaseException) -> CallFailed:
    """Turn a wasmtime failure into a :class:`CallFailed` with a precise status."""
    text = str(error).strip()
    last = text.splitlines()[-1].strip() if text else type(error).__name__
    for needle, status in _TRAPS:
        if needle in text:
            return CallFailed(status, last)
    return CallFailed("trap", last)


class DeadlineTimer:
    """Interrupts a running call at its wall-clock deadline by ticking the engine's epoch.

    The thread sleeps until armed, so an idle worker costs nothing; the store's
    epoch deadline is one tick, so the first tick after the deadline traps.
    """

    def __init__(self, engine: wasmtime.Engine) -> None:
        self._engine = engine
        self._cond = threading.Condition()
        self._due: float | None = None
        self._thread = threading.Thread(target=self._run, name="deadline", daemon=True)
        self._thread.start()

    def arm(self, seconds: float) -> None:
        with self._cond:
            self._due = time.monotonic() + seconds
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._due = None

    def _run(self) -> None:
        with self._cond:
            while True:
                if self._due is None:
                    self._cond.wait()
                    continue
                remaining = self._due - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                self._due = None
                self._engine.increment_epoch()


def describe(ty: Any) -> str:
    """A WIT-like rendering of a component value type, for export checks and errors."""
    if ty is None:
        return "_"
    if isinstance(ty, wc.String):
        return "string"
    if isinstance(ty, wc.RecordType):
        inner = ", ".join(f"{name}: {describe(t)}" for name, t in ty.fields)
        return f"record{{{inner}}}"
    if isinstance(ty, wc.OptionType):
        return f"option<{describe(ty.payload)}>"
    if isinstance(ty, wc.ResultType):
        return f"result<{describe(ty.ok)}, {describe(ty.err)}>"
    if isinstance(ty, wc.ListType):
        return f"list<{describe(ty.element)}>"
    return type(ty).__name__.lower()


def _describe_func(fty: Any) -> str:
    params = ", ".join(f"{name}: {describe(t)}" for name, t in fty.params)
    result = fty.result
    return f"func({params})" + (f" -> {describe(result)}" if result is not None else "")


def engine_config(limits: Limits) -> dict[str, bool | int]:
    """Every ``wasmtime.Config`` setting a worker's engine uses, by attribute name.

    :func:`make_engine` applies exactly these, and the compiled-artifact cache
    key is built from them (see :func:`artifact_key`), so the two cannot drift:
    change a setting here and every cached artifact built under the old value
    stops matching.
    """
    return {
        "consume_fuel": True,
        "epoch_interruption": True,
        "cranelift_nan_canonicalization": True,
        "parallel_compilation": False,  # no compiler threads: the worker stays easy to confine
        "wasm_threads": False,
        "max_wasm_stack": limits.stack_bytes,
    }


# Settings that change how fast code is compiled, never the code: left out of the cache key.
NOT_IN_ARTIFACT_KEY = frozenset({"parallel_compilation"})


def make_engine(limits: Limits, *, parallel_compilation: bool = False) -> wasmtime.Engine:
    """The worker's engine. ``parallel_compilation`` only for a process that compiles and never forks."""
    cfg = wasmtime.Config()
    for name, value in engine_config(limits).items():
        setattr(cfg, name, value)
    if parallel_compilation:
        cfg.parallel_compilation = True
    return wasmtime.Engine(cfg)


def _target() -> str:
    """The machine code generation targets: architecture and the CPU features Cranelift detects."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        pass
    return f"{platform.machine()}-{platform.system().lower()}/{hashlib.sha256(flags.encode()).hexdigest()[:16]}"


WASMTIME_VERSION = importlib.metadata.version("wasmtime")
TARGET = _target()


def artifact_key(component_sha256: str, limits: Limits) -> str:
    """Cache key of a compiled artifact: the component and everything that shapes its machine code."""
    config = {k: v for k, v in engine_config(limits).items() if k not in NOT_IN_ARTIFACT_KEY}
    material = {
        "component_sha256": component_sha256,
        "config": config,
        "wasmtime": WASMTIME_VERSION,
        "target": TARGET,
        "format": 1,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_signature(st: os.stat_result) -> list[int]:
    """What identifies one version of a file: any write, truncation or replacement changes it.

    ``st_ctime_ns`` cannot be set from user space; it moves on every content or
    metadata change, so an unchanged signature means unchanged bytes.
    """
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def load_artifact(engine: wasmtime.Engine, artifact: dict[str, Any], expected_key: str) -> wc.Component:
    """Map a compiled artifact the supervisor vouched for; raise LoadError if it is not that file.

    ``artifact`` is ``{"key", "path", "sha256", "signature"}``: the supervisor
    hashed the file and recorded its signature; the file opened here must
    still have that signature (same inode, size, mtime and ctime), so it holds
    the bytes that were hashed, and it is mapped through this very descriptor.
    """
    if artifact.get("key") != expected_key:
        raise LoadError("the artifact offered is for another component or engine configuration")
    try:
        fd = os.open(str(artifact["path"]), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise LoadError(f"cannot open the compiled artifact: {exc.strerror}") from None
    try:
        if file_signature(os.fstat(fd)) != list(artifact.get("signature", ())):
            raise LoadError("the compiled artifact changed after it was verified")
        try:
            return wc.Component.deserialize_file(engine, f"/proc/self/fd/{fd}")
        except wasmtime.WasmtimeError as exc:
            raise LoadError(f"the compiled artifact does not load: {_last_line(exc)}") from None
    finally:
        os.close(fd)


def compile_component(engine: wasmtime.Engine, component_bytes: bytes) -> wc.Component:
    try:
        return wc.Component(engine, component_bytes)
    except wasmtime.WasmtimeError as exc:
        raise LoadError(f"component does not compile: {_last_line(exc)}") from None


Linker = Callable[[wc.LinkerInstance], None]


class Sandbox:
    """A compiled agent component with only the granted imports linked."""

    def __init__(
        self,
        engine: wasmtime.Engine,
        component_bytes: bytes,
        limits: Limits,
        interfaces: dict[str, Linker],
        exports: dict[str, str] = AGENT_EXPORTS,
    ) -> None:
        self.engine = engine
        self.limits = limits
        self.exports = exports
        try:
            self.component = wc.Component(engine, component_bytes)
        except wasmtime.WasmtimeError as exc:
            raise LoadError(f"component does not compile: {_last_line(exc)}") from None
        self._check_imports(interfaces)
        self.linker = wc.Linker(engine)
        with self.linker.root() as root:
            with root.add_instance(TYPES_INTERFACE):
                pass
            for name, link in interfaces.items():
                with root.add_instance(name) as inst:
                    link(inst)
        self.timer = DeadlineTimer(engine)
        self._store: wasmtime.Store | None = None
        self.last_fuel = 0
        self._funcs: dict[str, wc.Func] = {}
        self._instantiate()  # fail at load, not at the first call
        self._check_exports()

    def _check_imports(self, interfaces: dict[str, Linker]) -> None:
        wanted = self.component.type.imports(self.engine)
        allowed = set(interfaces) | {TYPES_INTERFACE}
        denied = sorted(name for name in wanted if name not in allowed)
        if denied:
            raise LoadError(
                "component imports capabilities its policy does not grant: " + ", ".join(denied)
            )

    def _check_exports(self) -> None:
        assert self._store is not None
        for name, expected in self.exports.items():
            func = self._funcs.get(name)
            if func is None:
                raise LoadError(f"component does not export `{name}` (expected {expected})")
            actual = _describe_func(func.type(self._store))
            if actual != expected:
                raise LoadError(f"export `{name}` has type {actual}, expected {expected}")

    def _instantiate(self) -> None:
        self._store = None
        self._funcs = {}
        gc.collect()  # a dropped store keeps its memory reserved until collected
        store = wasmtime.Store(self.engine)
        store.set_limits(
            memory_size=self.limits.memory_bytes,
            table_elements=self.limits.table_elements,
            instances=self.limits.instances,
            tables=self.limits.instances,
            memories=self.limits.instances,
        )
        store.set_fuel(self.limits.fuel_per_call)
        store.set_epoch_deadline(1)
        try:
            instance = self.linker.instantiate(store, self.component)
        except wasmtime.WasmtimeError as exc:
            raise LoadError(f"component does not instantiate: {_last_line(exc)}") from None
        except Exception as exc:  # a host import raising during a start function
            raise LoadError(f"component does not instantiate: {exc}") from None
        for name in self.exports:
            func = instance.get_func(store, name)
            if func is not None:
                self._funcs[name] = func
        self._store = store

    def call(self, export: str, *args: str) -> tuple[Any, int]:
        """Run one export under the limits; return (result, fuel used) or raise CallFailed."""
        if self._store is None:
            try:
                self._instantiate()
            except LoadError as exc:
                raise CallFailed("trap", str(exc)) from None
        store = self._store
        assert store is not None
        func = self._funcs[export]
        budget = self.limits.fuel_per_call
        store.set_fuel(budget)
        store.set_epoch_deadline(1)
        self.timer.arm(self.limits.wall_time_ms / 1000)
        try:
            result = func(store, *args)
            func.post_return(store)
        except CallFailed:
            self._store = None
            raise
        except wasmtime.WasmtimeError as exc:
            self._store = None
            raise classify(exc) from None
        except Exception as exc:  # a host import raised, or the result did not lift
            self._store = None
            if isinstance(exc, HostLimit):
                raise CallFailed("host-limit", str(exc)) from None
            raise CallFailed("malformed-result", f"{type(exc).__name__}: {exc}") from None
        finally:
            self.timer.disarm()
            self.last_fuel = _fuel_used(store, budget)
        return result, self.last_fuel

    def discard_instance(self) -> None:
        """Drop the current instance (after a failed call) so the next call starts fresh."""
        self._store = None


class HostLimit(Exception):
    """A host import refused a guest request that exceeds a policy limit."""


def _fuel_used(store: wasmtime.Store, budget: int) -> int:
    try:
        return budget - store.get_fuel()
    except wasmtime.WasmtimeError:
        return budget


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return " / ".join(lines[-2:]) if lines else type(exc).__name__
