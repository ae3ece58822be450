"""The wasmtime side of a worker: one engine, one component, one call at a time.

Every call runs under a fuel budget, a wall-clock deadline (an epoch tick from
:class:`DeadlineTimer`) and the store's memory, table and instance limits.
A trap poisons a wasmtime store, so after any failed call the instance is
dropped and the next call gets a fresh store and instance; the agent continues
from its last committed state, which the host owns.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import gc
import hashlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import wasmtime
from wasmtime import _ffi as ffi
from wasmtime import component as wc
from wasmtime.component._enter import enter_wasm

from theater.artifacts import artifact_key, engine_config, file_signature
from theater.capabilities import NOT_GRANTED
from theater.spec import Limits

from ._errors import CallFailed, HostLimit, LoadError
from ._hostfuncs import HostInstance, Instance, add_host_func

__all__ = [
    "DeadlineTimer", "Lifted", "Sandbox", "artifact_key", "classify", "compile_component", "describe",
    "engine_config", "file_signature", "load_artifact", "make_engine", "tune_malloc",
]

AGENT_EXPORTS = {
    "init": "func(state: string, args: string) -> result<string, string>",
    "handle": "func(state: string, message: string) -> result<record{state: string, reply: option<string>}, string>",
}
TYPES_INTERFACE = "theater:agent/types@0.1.0"
WASI_VERSION_PREFIX = "0.2."


def is_wasi_import(name: str) -> bool:
    """A WASI 0.2 interface (``wasi:<package>/<interface>@0.2.<patch>``): linked by ``worker._caps.wasi``
    or as traps, never refused at load."""
    base, _, version = name.partition("@")
    return base.startswith("wasi:") and version.startswith(WASI_VERSION_PREFIX)

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
    Arming does not wake the thread while it already sleeps towards an earlier
    deadline (every call has the same wall time, so a later call's deadline is
    never earlier): a busy worker costs one wake-up per wall-time period, not
    two thread switches per call.
    """

    def __init__(self, engine: wasmtime.Engine) -> None:
        self._engine = engine
        self._cond = threading.Condition()
        self._due: float | None = None
        self._wake: float | None = None  # when the sleeping thread wakes; None: until notified
        self._thread = threading.Thread(target=self._run, name="deadline", daemon=True)
        self._thread.start()

    def arm(self, seconds: float) -> None:
        with self._cond:
            self._due = due = time.monotonic() + seconds
            if self._wake is None or self._wake > due:
                self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._due = None

    def _run(self) -> None:
        with self._cond:
            while True:
                if self._due is None:
                    self._wake = None
                    self._cond.wait()
                    continue
                remaining = self._due - time.monotonic()
                if remaining > 0:
                    self._wake = self._due
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


def make_engine(limits: Limits, *, parallel_compilation: bool = False) -> wasmtime.Engine:
    """The worker's engine: exactly ``theater.artifacts.engine_config(limits)``, which the artifact
    cache key is also built from (change a setting there, never here).

    ``parallel_compilation`` only for a process that compiles and never forks.
    """
    cfg = wasmtime.Config()
    for name, value in engine_config(limits).items():
        setattr(cfg, name, value)
    if parallel_compilation:
        cfg.parallel_compilation = True
    return wasmtime.Engine(cfg)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's maximum
TRIM_THRESHOLD = 64 * 1024 * 1024


def tune_malloc() -> bool:
    """Serve payload-sized buffers from the heap rather than from fresh mmaps (glibc only).

    A 1 MB message crosses as three or four 1 MB buffers (the C API's byte
    vectors, Python bytes); past glibc's mmap threshold each is a fresh mapping
    whose pages fault in zero-filled and are unmapped again at free, which
    made a 1 MB echo 4-5x slower than the copies themselves. Fixed thresholds
    keep freed buffers in the heap for reuse (a worker that handled large
    messages keeps up to TRIM_THRESHOLD of free heap). Set in the fork-server,
    so every forked worker inherits it. Returns whether glibc took both.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)


ARTIFACT_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
ARTIFACT_MEMFD_PREFIX = "theater-artifact-"


def load_artifact(engine: wasmtime.Engine, artifact: dict[str, Any], expected_key: str) -> wc.Component:
    """Map a compiled artifact handed over as a sealed memfd; raise LoadError if it is not one.

    ``artifact`` is ``{"key", "fd", "sha256", "size"}``. The fork-server copied
    the cache file into the memfd, checked its SHA-256 against the one the
    supervisor recorded when the artifact was compiled, and sealed it against
    any write, so its bytes are the verified ones for as long as it exists; it
    is shared by every worker of that component. The descriptor is closed here
    (the mapping stays). A memfd, not the cache file: the worker may not read
    the supervisor's home once it is confined.
    """
    fd = artifact.get("fd")
    if not isinstance(fd, int):
        raise LoadError("the artifact offered has no descriptor")
    try:
        if artifact.get("key") != expected_key:
            raise LoadError("the artifact offered is for another component or engine configuration")
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            size = os.fstat(fd).st_size
        except OSError as exc:
            raise LoadError(f"the artifact descriptor is unusable: {exc.strerror}") from None
        if not target.startswith("/memfd:" + ARTIFACT_MEMFD_PREFIX) or seals & ARTIFACT_SEALS != ARTIFACT_SEALS:
            raise LoadError("the artifact descriptor is not a sealed artifact memfd")
        if size != artifact.get("size"):
            raise LoadError("the artifact memfd does not have the recorded size")
        try:
            return wc.Component.deserialize_file(engine, f"/proc/self/fd/{fd}")
        except wasmtime.WasmtimeError as exc:
            raise LoadError(f"the compiled artifact does not load: {_last_line(exc)}") from None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def read_component(path: str, sha256: str) -> bytes:
    """The component file's bytes, which must still be those spawned (raise LoadError otherwise)."""
    try:
        with open(path, "rb") as f:
            component = f.read()
    except OSError as exc:
        raise LoadError(f"cannot read {path}: {exc.strerror}") from None
    if hashlib.sha256(component).hexdigest() != sha256:
        raise LoadError(f"{path} changed since it was spawned (sha256 mismatch)")
    return component


def compile_component(engine: wasmtime.Engine, component_bytes: bytes) -> wc.Component:
    try:
        return wc.Component(engine, component_bytes)
    except wasmtime.WasmtimeError as exc:
        raise LoadError(f"component does not compile: {_last_line(exc)}") from None


Linker = Callable[[Instance], None]


class Sandbox:
    """A compiled agent component with only the granted imports linked."""

    def __init__(
        self,
        engine: wasmtime.Engine,
        component: bytes | wc.Component,
        limits: Limits,
        interfaces: dict[str, Linker],
        exports: dict[str, str] = AGENT_EXPORTS,
        wasi: Callable[[str], Linker | None] | None = None,
        helpers: Sequence[bytes | wc.Component] = (),
    ) -> None:
        """``component`` is the component's bytes (compiled here) or a component already compiled
        or loaded for ``engine``. ``wasi`` links the WASI 0.2 interfaces a language runtime imports
        (``worker._caps.wasi``): each one it has no linker for, and every function not linked, traps.
        ``helpers``: components instantiated beside it, in the same store and under the same limits, whose
        exported interfaces it may import (a composed agent, docs/writing-agents.md section 5)."""
        self.engine = engine
        self.limits = limits
        self.exports = exports
        self.component = component if isinstance(component, wc.Component) else compile_component(engine, component)
        self.helpers = [h if isinstance(h, wc.Component) else compile_component(engine, h) for h in helpers]
        self._params = (_Val * 2)()
        self._result = _Val()
        # Each helper's exported interfaces, by name: their functions, bound to the helper of the current store.
        self._provided: dict[str, list[str]] = {}
        for helper in self.helpers:
            for name, item in helper.type.exports(engine).items():
                if isinstance(item.ty, wc.ComponentInstanceType) and not is_wasi_import(name):
                    if name in self._provided or name in interfaces or name == TYPES_INTERFACE:
                        raise LoadError(f"interface {name} is provided twice (by a helper and the host, or two helpers)")
                    self._provided[name] = [f for f, t in item.ty.exports(engine).items()
                                            if isinstance(t.ty, wc.FuncType)]
        self._helper_funcs: dict[tuple[str, str], wc.Func] = {}
        self._helper_linkers = [self._linker_for(h, interfaces, wasi, {}) for h in self.helpers]
        self.linker = self._linker_for(self.component, interfaces, wasi, self._provided)
        self.timer = DeadlineTimer(engine)
        self._store: wasmtime.Store | None = None
        self._dropped = False
        self.last_fuel = 0
        self._funcs: dict[str, wc.Func] = {}
        self._instantiate()  # fail at load, not at the first call
        self._check_exports()

    def _linker_for(self, component: wc.Component, interfaces: dict[str, Linker],
                    wasi: Callable[[str], Linker | None] | None, provided: dict[str, list[str]]) -> wc.Linker:
        """A linker with exactly the granted interfaces, WASI for a language runtime, and the interfaces
        helpers provide (each function a call into the helper of the current store)."""
        wasi_imports = self._check_imports(component, interfaces, wasi is not None, set(provided))
        linker = wc.Linker(self.engine)
        with linker.root() as root:
            with root.add_instance(TYPES_INTERFACE):
                pass
            for name, link in interfaces.items():
                with root.add_instance(name) as inst:
                    link(HostInstance(inst))
            for name in wasi_imports:
                assert wasi is not None
                wasi_link = wasi(name)
                if wasi_link is not None:
                    with root.add_instance(name) as inst:
                        wasi_link(HostInstance(inst))
            for name, functions in provided.items():
                with root.add_instance(name) as inst:
                    for function in functions:
                        add_host_func(inst, function, self._bridge(name, function))
        if wasi_imports:
            linker.define_unknown_imports_as_traps(component)
        return linker

    def _bridge(self, interface: str, function: str) -> Callable[..., Any]:
        def call(store: Any, *args: Any) -> Any:
            func = self._helper_funcs[(interface, function)]
            result = func(store, *args)
            func.post_return(store)
            return result
        return call

    def _check_imports(self, component: wc.Component, interfaces: dict[str, Linker], wasi: bool,
                       provided: set[str]) -> list[str]:
        """Refuse any import that is neither granted, nor provided by a helper, nor WASI 0.2; return the WASI ones."""
        wanted = component.type.imports(self.engine)
        allowed = set(interfaces) | {TYPES_INTERFACE} | provided
        wasi_imports = [name for name in wanted if wasi and name not in allowed and is_wasi_import(name)]
        denied = sorted(name for name in wanted if name not in allowed and name not in wasi_imports)
        if denied:
            granted = ", ".join(sorted(interfaces)) or "none beyond runtime"
            # Which of the two it is (the policy does not grant it, or the manifest leaves it out) only the
            # supervisor knows: it adds that (supervisor/_workers.py, Workers._on_fault).
            raise LoadError(
                f"{NOT_GRANTED}: " + ", ".join(denied) + f" (granted: {granted})"
            )
        return wasi_imports

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
        if self._store is not None or self._dropped:
            self._store = None
            self._funcs = {}
            gc.collect()  # a dropped store keeps its memory reserved until collected
        self._dropped = False
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
            for helper, linker in zip(self.helpers, self._helper_linkers, strict=True):
                helper_instance = linker.instantiate(store, helper)
                for name in self._provided:
                    at = helper_instance.get_export_index(store, name)
                    if at is None:
                        continue
                    for function in self._provided[name]:
                        index = helper_instance.get_export_index(store, function, at)
                        func = helper_instance.get_func(store, index) if index is not None else None
                        if func is not None:
                            self._helper_funcs[(name, function)] = func
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
        store, budget = self._prepare()
        func = self._funcs[export]
        self.timer.arm(self.limits.wall_time_ms / 1000)
        try:
            result = func(store, *args)
            func.post_return(store)
        except Exception as exc:  # a trap, a host import that raised, or a result that did not lift
            raise self._failed(exc) from None
        finally:
            self.timer.disarm()
            self.last_fuel = _fuel_used(store, budget)
        return result, self.last_fuel

    def call_agent(self, export: str, state: bytes, data: bytes) -> tuple[Lifted, int]:
        """``init`` or ``handle`` with bytes in and out: the fast path of :meth:`call`.

        Builds the two string arguments straight from the bytes (latin-1 text
        is its bytes when they are ASCII, so usually nothing is transcoded) and
        reads the result's strings straight out of wasmtime's value tree,
        without re-reading the function's type or lifting through generic
        Python values. The export types were checked at load, so the layout is
        known. Same limits, same failure classes as :meth:`call`.
        """
        store, budget = self._prepare()
        func = self._funcs[export]
        params, result = self._params, self._result
        lowered = 0
        try:
            _lower_bytes(params[0], state)
            lowered = 1
            _lower_bytes(params[1], data)
            lowered = 2
            context = store._context()
            self.timer.arm(self.limits.wall_time_ms / 1000)
            try:
                enter_wasm(lambda: _func_call(ctypes.byref(func._func), context, params, 2, ctypes.byref(result), 1))
            finally:
                self.timer.disarm()
            try:
                lifted = _lift_agent_result(result, export == "init")
            finally:
                _clear(result)
            func.post_return(store)
        except Exception as exc:  # a trap, a host import that raised, or a result that did not lift
            raise self._failed(exc) from None
        finally:
            for i in range(lowered):
                _clear(params[i])
            self.last_fuel = _fuel_used(store, budget)
        return lifted, self.last_fuel

    def _prepare(self) -> tuple[wasmtime.Store, int]:
        """The store for the next call (a fresh instance after a failure), fuel and epoch deadline set."""
        if self._store is None:
            try:
                self._instantiate()
            except LoadError as exc:
                raise CallFailed("trap", str(exc)) from None
        store = self._store
        assert store is not None
        budget = self.limits.fuel_per_call
        store.set_fuel(budget)
        store.set_epoch_deadline(1)
        return store, budget

    def _failed(self, exc: Exception) -> CallFailed:
        """Classify a failed call; the instance is dropped whatever the cause (a trap poisons the store)."""
        self._drop()
        if isinstance(exc, CallFailed):
            return exc
        if isinstance(exc, wasmtime.WasmtimeError):
            return classify(exc)
        if isinstance(exc, HostLimit):
            return CallFailed("host-limit", str(exc))
        return CallFailed("malformed-result", f"{type(exc).__name__}: {exc}")

    def _drop(self) -> None:
        self._store = None
        self._dropped = True

    def discard_instance(self) -> None:
        """Drop the current instance (after a failed call) so the next call starts fresh."""
        if self._store is not None:
            self._drop()


class Lifted(NamedTuple):
    """An ``init`` or ``handle`` outcome as the guest returned it.

    ``ok`` is the result's case. On ``ok``, ``state`` and ``reply`` (None: no
    reply; always None for init) are the guest strings' UTF-8 bytes, to be
    turned into bytes by ``_boundary.from_guest_utf8``; on ``err``, ``error``
    is the guest's error text.
    """

    ok: bool
    state: bytes | None
    reply: bytes | None
    error: str | None


def lifted_from_generic(export: str, result: Any) -> Lifted:
    """The same :class:`Lifted` from what the generic ``Func.__call__`` path returns."""
    if export == "init":
        if getattr(result, "tag", None) == "ok":
            return Lifted(True, _utf8(result.payload), None, None)
        return Lifted(False, None, None, getattr(result, "payload", None))
    if isinstance(result, str):
        return Lifted(False, None, None, result)
    reply = getattr(result, "reply", None)
    return Lifted(True, _utf8(getattr(result, "state", None)), None if reply is None else _utf8(reply), None)


def _utf8(text: Any) -> Any:
    return text.encode("utf-8") if isinstance(text, str) else text


# --- wasmtime's C value tree, read and written directly -----------------------------------
# A wasmtime_component_val_t is a kind byte and a union; a string is a wasm_byte_vec_t
# (size, data); a result is (is_ok, boxed payload); a record is (size, entries), each entry
# a name and a value; an option is a boxed value or NULL. See wasmtime/component/_types.py.

_Val = ffi.wasmtime_component_val_t
_BOOL = ffi.WASMTIME_COMPONENT_BOOL.value
_STRING = ffi.WASMTIME_COMPONENT_STRING.value
_RECORD = ffi.WASMTIME_COMPONENT_RECORD.value
_OPTION = ffi.WASMTIME_COMPONENT_OPTION.value
_RESULT = ffi.WASMTIME_COMPONENT_RESULT.value
# Own prototypes (the binding's argtypes want a POINTER(c_uint8); this one takes bytes as is).
_byte_vec_new = ctypes.CFUNCTYPE(None, ctypes.POINTER(ffi.wasm_byte_vec_t), ctypes.c_size_t, ctypes.c_void_p)(
    ("wasm_byte_vec_new", ffi.dll)
)
_func_call = ffi.wasmtime_component_func_call
_val_delete = ffi.wasmtime_component_val_delete


def _clear(slot: Any) -> None:
    """Free what ``slot`` owns and leave a value with nothing to free: wasmtime assigns
    results over the previous value (dropping it), so a freed slot must not keep its pointers."""
    _val_delete(ctypes.byref(slot))
    slot.kind = _BOOL
    slot.of.boolean = False


def _lower_bytes(slot: Any, data: bytes) -> None:
    """Fill ``slot`` with the string whose characters are ``data``'s bytes (latin-1), as UTF-8."""
    raw = data if data.isascii() else data.decode("latin-1").encode("utf-8")
    slot.kind = _STRING
    _byte_vec_new(ctypes.byref(slot.of.string), len(raw), raw)


def _string(val: Any) -> bytes:
    if val.kind != _STRING:
        raise CallFailed("malformed-result", f"expected a string, got value kind {val.kind}")
    vec = val.of.string
    return ctypes.string_at(vec.data, vec.size) if vec.size else b""


def _lift_agent_result(result: Any, init: bool) -> Lifted:
    """Read ``result<string, string>`` (init) or ``result<outcome, string>`` (handle)."""
    if result.kind != _RESULT or not result.of.result.val:
        raise CallFailed("malformed-result", "the export did not return a result with a payload")
    payload = result.of.result.val.contents
    if not result.of.result.is_ok:
        return Lifted(False, None, None, _string(payload).decode("utf-8"))
    if init:
        return Lifted(True, _string(payload), None, None)
    if payload.kind != _RECORD or payload.of.record.size != 2:
        raise CallFailed("malformed-result", "handle's ok payload is not the outcome record")
    fields = payload.of.record.data
    state = _string(fields[0].val)
    option = fields[1].val
    if option.kind != _OPTION:
        raise CallFailed("malformed-result", "outcome.reply is not an option")
    reply = _string(option.of.option.contents) if option.of.option else None
    return Lifted(True, state, reply, None)


def _fuel_used(store: wasmtime.Store, budget: int) -> int:
    try:
        return budget - store.get_fuel()
    except wasmtime.WasmtimeError:
        return budget


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return " / ".join(lines[-2:]) if lines else type(exc).__name__
