"""Host interfaces: one module per capability, found here, linked only when the spec grants it.

A capability module (``runtime.py``, ``supervision.py``) is named after its
capability and declares ``CAPABILITY``, a :class:`HostCapability`: the
capability's name (the policy key; its WIT interface comes with it from
``theater.capabilities``), how its host functions are made for an agent, and
any guest export it requires (``supervision``'s ``child-exit``). ``REGISTRY``
maps each name to its declaration. It is built from the modules of this
package, so adding a capability adds a module here and touches nothing else in
the worker (``docs/wit.md`` section 6.3); every capability in
``theater.capabilities`` must have its module, and every module a capability.

``wasi.py`` is not a capability: no policy grants or withholds it, and it
declares no ``CAPABILITY``. It is what a language runtime's WASI 0.2 imports
get (componentize-py's CPython, for one): the few harmless functions answered
and recorded, the rest trapping. :func:`language_runtime` makes it for an agent.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable

from theater.capabilities import CAPABILITIES

from .._errors import LoadError
from . import wasi
from ._host import Ask, Host, HostCapability, Linker

__all__ = ["REGISTRY", "Ask", "Host", "HostCapability", "Linker", "language_runtime", "link_granted"]


def _discover() -> dict[str, HostCapability]:
    found: dict[str, HostCapability] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        cap = getattr(module, "CAPABILITY", None)
        if cap is None:
            continue
        if not isinstance(cap, HostCapability) or cap.name != info.name or cap.name not in CAPABILITIES:
            raise ImportError(f"{module.__name__}.CAPABILITY must declare the capability {info.name!r} of theater.capabilities")
        found[cap.name] = cap
    missing = sorted(set(CAPABILITIES) - set(found))
    if missing:
        raise ImportError(f"no host module in {__name__} for the capabilities {missing}")
    return {name: found[name] for name in CAPABILITIES}


REGISTRY: dict[str, HostCapability] = _discover()


def link_granted(granted: Iterable[str], host: Host) -> tuple[dict[str, Linker], dict[str, str]]:
    """For exactly the capabilities granted: WIT interface -> how to link it, and the guest exports they require."""
    interfaces: dict[str, Linker] = {}
    exports: dict[str, str] = {}
    for name in granted:
        cap = REGISTRY.get(name)
        if cap is None:
            raise LoadError(f"this worker has no host module for the capability {name!r}")
        interfaces[cap.interface] = cap.functions(host).link
        exports.update(cap.exports)
    return interfaces, exports


def language_runtime(host: Host) -> wasi.Wasi:
    """The WASI 0.2 support for this agent's language runtime (not a capability: every agent has it)."""
    return wasi.Wasi(host)
