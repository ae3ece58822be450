"""A Python agent built with componentize-py from ``tests/components/python/app.py``, run for real.

The component is built once per module (about 10 s) and compiled once by the
supervisor's compile job (about 7 s); every test then spawns it from the cached
artifact. It checks what a language runtime gets from WASI (no environment, no
directories, recorded randomness and wall-clock time) and that everything else
in WASI, and the usual hostile behaviours, fail the call without harming the
agent's committed state.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import COMPONENTS, ROOT, Theater, assert_verified, records, wait_running

from theater.client import Client, ClientError
from theater.records import Kind

APP = COMPONENTS / "python"
COMPONENTIZE = Path(sys.executable).parent / "componentize-py"
WASI_RANDOM = "wasi:random/random@0.2.9"  # the WASI version componentize-py 0.25.1 imports
WASI_CLOCK = "wasi:clocks/wall-clock@0.2.9"
FIRST_SPAWN_TIMEOUT_S = 180  # the compile job: about 7 s here, more on a loaded machine


@pytest.fixture(scope="module")
def py_theater() -> Iterator[tuple[Theater, Path]]:
    """A supervisor, and the Python agent's component (built here with componentize-py)."""
    assert COMPONENTIZE.exists(), f"{COMPONENTIZE} is missing: scripts/setup installs componentize-py"
    root = Path(os.environ.get("THEATER_TEST_TMP", "/tmp")) / f"th-py-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    root.mkdir(parents=True)
    wasm = root / "python-agent.wasm"
    build = subprocess.run(
        [str(COMPONENTIZE), "-d", str(ROOT / "wit"), "-w", "agent", "componentize", "app", "-o", str(wasm)],
        cwd=APP, capture_output=True, text=True, timeout=600, check=False,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    t = Theater(root)
    t.start()
    try:
        with t.client(timeout=FIRST_SPAWN_TIMEOUT_S) as c:
            c.spawn(t.manifest("warm", str(wasm)))  # compiles once; later spawns load the artifact
            c.stop("warm")
        yield t, wasm
    finally:
        t.stop()
        shutil.rmtree(root, ignore_errors=True)


def _spawn(t: Theater, c: Client, name: str, wasm: Path) -> None:
    c.spawn(t.manifest(name, str(wasm), restart={"intensity": 50, "period_ms": 60_000}))


def test_a_python_agent_runs_with_what_wasi_gives_it_recorded(py_theater: tuple[Theater, Path]) -> None:
    t, wasm = py_theater
    every_byte = bytes(range(256))
    with t.client() as c:
        _spawn(t, c, "py", wasm)
        assert c.call("py", b"echo:" + every_byte) == every_byte
        assert c.call("py", b"echo:") == b""
        assert [c.call("py", b"count") for _ in range(3)] == [b"1", b"2", b"3"]
        with pytest.raises(ClientError) as err:
            c.call("py", b"fail")
        assert err.value.code == "guest-error" and "asked to fail" in str(err.value)
        assert c.call("py", b"env") == b"({}, [], '/')"  # no variables, no arguments, no directory
        now = c.call("py", b"time")
    chain = records(t, "py")
    calls = [r.fields() for r in chain if r.kind is Kind.HOST_CALL]
    randoms = [f for f in calls if f["interface"] == WASI_RANDOM]
    assert randoms and all(f["function"] == "get-random-bytes" for f in randoms)
    assert all(len(f["output"]) == int.from_bytes(f["input"], "big") for f in randoms)
    [clock] = [f for f in calls if f["interface"] == WASI_CLOCK]
    seconds, nanos = int.from_bytes(clock["output"][:8], "big"), int.from_bytes(clock["output"][8:], "big")
    assert now is not None and float(now) == pytest.approx(seconds + nanos / 1e9, abs=1e-6)
    [self_id] = [f["output"].decode() for f in calls if f["function"] == "self-id"]
    assert [r.fields()["message"] for r in chain if r.kind is Kind.LOG] == [f"python agent {self_id} starting"]
    assert_verified(t)


@pytest.mark.parametrize(("command", "statuses", "detail"), [
    (b"raise", ("trap",), "unreachable"),  # CPython writes its traceback to stderr (log records), then aborts
    (b"spin", ("out-of-fuel", "deadline"), ""),  # whichever comes first: 500 M fuel or 2 s
    (b"grow", ("trap",), ""),
    (b"recurse", ("trap",), ""),
])
def test_a_hostile_python_agent_fails_its_call_and_keeps_its_state(
    py_theater: tuple[Theater, Path], command: bytes, statuses: tuple[str, ...], detail: str,
) -> None:
    t, wasm = py_theater
    name = f"hostile-{command.decode()}"
    with t.client() as c:
        _spawn(t, c, name, wasm)
        assert c.call(name, b"count") == b"1"
        pid = wait_running(c, name)["pid"]
        with pytest.raises(ClientError) as err:
            c.call(name, command, timeout=30)
        assert err.value.code in statuses and detail in str(err.value), err.value
        wait_running(c, name, pid)
        assert c.call(name, b"count") == b"2"  # restarted from the committed state
        assert c.call(name, b"open:/etc/passwd") == b"FileNotFoundError: No such file or directory"
    if command == b"raise":  # the traceback is on the chain, as log records of the failing call
        lines = [r.fields()["message"] for r in records(t, name) if r.kind is Kind.LOG]
        assert "stderr: RuntimeError: an uncaught exception" in lines
    assert_verified(t)


def test_what_a_python_agent_prints_is_recorded(py_theater: tuple[Theater, Path]) -> None:
    t, wasm = py_theater
    with t.client() as c:
        _spawn(t, c, "printer", wasm)
        assert c.call("printer", b"stdout") == b"printed"
        assert c.call("printer", b"count") == b"1"  # no crash: the same worker goes on
    chain = records(t, "printer")
    [printed] = [r for r in chain if r.kind is Kind.LOG and r.fields()["message"].startswith("stdout: ")]
    assert printed.fields()["message"] == "stdout: escaping through stdout" and printed.fields()["level"] == "info"
    assert not [r for r in chain if r.kind is Kind.EXIT]
    assert_verified(t)


def test_a_python_agent_replays_identically(py_theater: tuple[Theater, Path]) -> None:
    """CPython in the sandbox, replayed: its WASI clock and randomness come from the chain, so the same
    component writes the same chain again (theater replay, in its confined process)."""
    t, wasm = py_theater
    with t.client() as c:
        _spawn(t, c, "py-replay", wasm)
        assert [c.call("py-replay", b"count") for _ in range(3)] == [b"1", b"2", b"3"]
        c.call("py-replay", b"echo:again")
    proc = subprocess.run([sys.executable, "-m", "supervisor", "--home", str(t.home.root), "replay", "py-replay",
                           "--json"], capture_output=True, text=True, timeout=600, check=False)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["ok"], (report, proc.stderr[-2000:])
    assert report["calls"] == 5
