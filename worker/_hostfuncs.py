"""Host functions the guest calls, with the types they are called with read once.

wasmtime-py's ``LinkerInstance.add_func`` reads the function's type from
wasmtime on every call: a type handle, each parameter's name and its whole
type tree, down to an enum's case names one foreign call at a time. About
half of a host call's cost went there (a ``log`` or ``now`` of a small
agent). Here the types are read on a function's first call and kept.

That is sound because a linker serves exactly one component
(``Sandbox._linker_for``) and a component imports a function with exactly
one type: every call of one linked function comes with the same type. Each
call still checks the number of arguments and results, and that every
argument is of the kind the first call's was, so a value is never read as
another type. Values are converted by wasmtime-py's own converters, and a
Python exception travels as with ``add_func`` (a trap that ``enter_wasm``
turns back into the exception).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any, Protocol

from wasmtime import WasmtimeError
from wasmtime import _ffi as ffi
from wasmtime.component import LinkerInstance
from wasmtime.component._enter import catch_exceptions
from wasmtime.component._linker import FUNCTIONS, func_finalize
from wasmtime.component._types import FuncType

__all__ = ["HostInstance", "Instance", "add_host_func"]


class Instance(Protocol):
    """Where a host module adds its functions (and WASI its resources): a :class:`HostInstance`."""

    def add_func(self, name: str, func: Callable[..., Any]) -> None: ...

    def add_resource(self, name: str, ty: Any, dtor: Callable[..., Any]) -> None: ...


class _Linked:
    """One linked function, and what its first call taught about its type."""

    __slots__ = ("func", "kinds", "params", "result")

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        self.params: list[Any] | None = None  # the parameters' ValTypes
        self.result: Any = None  # the result's ValType, or None
        self.kinds: list[int] = []  # each argument's value kind on the first call


class HostInstance:
    """A linker instance as the sandbox hands it to host modules: their ``add_func`` links through
    :func:`add_host_func`; resources are added as they are."""

    def __init__(self, inst: LinkerInstance) -> None:
        self._inst = inst

    def add_func(self, name: str, func: Callable[..., Any]) -> None:
        add_host_func(self._inst, name, func)

    def add_resource(self, name: str, ty: Any, dtor: Callable[..., Any]) -> None:
        self._inst.add_resource(name, ty, dtor)


def add_host_func(inst: LinkerInstance, name: str, func: Callable[..., Any]) -> None:
    """``inst.add_func(name, func)``, with the function's type read on its first call only."""
    raw = name.encode("utf-8")
    idx = FUNCTIONS.allocate(_Linked(func))  # type: ignore[arg-type]  # freed by wasmtime-py's finalizer
    err = ffi.wasmtime_component_linker_instance_add_func(inst.ptr(), ctypes.create_string_buffer(raw), len(raw),
                                                          _call, idx, func_finalize)
    if err:
        raise WasmtimeError._from_ptr(err)


@ffi.wasmtime_component_func_callback_t
def _call(idx: int, context: Any, ty_raw: Any, args: Any, nargs: int, results: Any, nresults: int) -> Any:
    def run(store: Any) -> None:
        linked: _Linked = FUNCTIONS.get(idx or 0)  # type: ignore[assignment]
        params = linked.params
        if params is None:
            with FuncType._from_ptr(ty_raw, owner=store) as fty:
                params = [ty for _, ty in fty.params]
                linked.result = fty.result
            linked.kinds = [args[i].kind for i in range(nargs)]
            linked.params = params
        result_ty = linked.result
        if nargs != len(params) or nresults != (0 if result_ty is None else 1):
            raise WasmtimeError(f"host function called with {nargs} arguments and {nresults} results, "
                                f"not the {len(params)} and {0 if result_ty is None else 1} it was linked with")
        kinds = linked.kinds
        for i in range(nargs):
            if args[i].kind != kinds[i]:
                raise WasmtimeError(f"argument {i} of a host function is of another type than on its first call")
        result = linked.func(store, *[ty.convert_from_c(args[i]) for i, ty in enumerate(params)])
        if result_ty is None:
            if result is not None:
                raise WasmtimeError("a host function without a result returned a value")
        else:
            result_ty.convert_to_c(store, result, results)

    return catch_exceptions(context, run)
