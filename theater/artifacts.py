"""The engine configuration both sides agree on, and the compiled-artifact cache key derived from it.

``engine_config`` is every ``wasmtime.Config`` setting a worker's engine uses;
``worker._engine.make_engine`` applies exactly these, and :func:`artifact_key`
is built from the same dictionary, so they cannot drift: change a setting here
and every cached artifact built under the old value stops matching. wasmtime
rejects a serialized artifact whose fuel, epoch, guard or reservation settings
differ from the engine's, but silently accepts one compiled with another NaN
canonicalisation or stack size: those are in the key with everything else.

This module imports neither wasmtime nor either side.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform

from .spec import Limits

__all__ = ["NOT_IN_ARTIFACT_KEY", "TARGET", "WASMTIME_VERSION", "artifact_key", "engine_config", "file_signature"]


_FIXED_ENGINE: dict[str, bool | int] = {
    "consume_fuel": True,
    "epoch_interruption": True,
    "cranelift_nan_canonicalization": True,  # the same NaN bits on every machine: replay gives the same state
    "parallel_compilation": False,  # no compiler threads: the worker stays easy to confine
    "wasm_threads": False,
}


def engine_config(limits: Limits) -> dict[str, bool | int]:
    """Every ``wasmtime.Config`` setting of a worker's engine, by attribute name."""
    return {**_FIXED_ENGINE, "max_wasm_stack": limits.stack_bytes}


def engine_report() -> dict[str, str]:
    """What a worker states in its hello (and so in its genesis or worker-key record) about the engine that
    will run the agent: what fuel counts and floating-point results depend on, for a later replay."""
    fixed = sorted((k, v) for k, v in _FIXED_ENGINE.items() if k != "parallel_compilation")
    return {"engine.wasmtime": WASMTIME_VERSION, "engine.target": _target(),
            "engine.settings": " ".join(f"{k}={v}" for k, v in fixed) + " max_wasm_stack=limits.stack_bytes"}


# Settings that change how fast code is compiled, never the code: left out of the cache key.
NOT_IN_ARTIFACT_KEY = frozenset({"parallel_compilation"})


def _target() -> str:
    """What machine code is generated for: the architecture and the CPU features Cranelift detects."""
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
    metadata change, so an unchanged signature means unchanged bytes (the
    supervisor re-hashes a cached artifact only when its signature moved).
    """
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
