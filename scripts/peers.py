"""`scripts/bench --peers`: the peers, installed into a throwaway venv and measured in the same run.

- Circus and supervisord restarting a SIGKILLed worker: the child is a Python
  process that imports zmq and wasmtime and sends a ZeroMQ message (its pid)
  when it is up; the time is SIGKILL -> the replacement's message.
- Extism calling an echo plugin: a core wasm module written in WAT against
  Extism's kernel ABI (``extism:host/env``), compiled with wasmtime's
  ``wat2wasm``; the time is one ``Plugin.call`` with the payload.

Each measurement runs with the peers' own interpreter (the throwaway venv);
the rows carry Theater's figure from the same run as the baseline.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import zmq

VENV = Path(tempfile.gettempdir()) / "theater-peers-venv"
PEERS = ("circus", "supervisor", "extism")
CHILD = textwrap.dedent("""
    import os, sys, zmq, wasmtime
    s = zmq.Context().socket(zmq.PUSH)
    s.connect(sys.argv[1])
    s.send(str(os.getpid()).encode())
    s.close(linger=1000)
    import signal
    signal.pause()
""")

ECHO_PLUGIN = """
(module
  (import "extism:host/env" "input_length" (func $input_length (result i64)))
  (import "extism:host/env" "input_load_u64" (func $input_load_u64 (param i64) (result i64)))
  (import "extism:host/env" "input_load_u8" (func $input_load_u8 (param i64) (result i32)))
  (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
  (import "extism:host/env" "store_u64" (func $store_u64 (param i64 i64)))
  (import "extism:host/env" "store_u8" (func $store_u8 (param i64 i32)))
  (import "extism:host/env" "output_set" (func $output_set (param i64 i64)))
  ;; echo: copy the input into a fresh kernel block, 8 bytes at a time, and make it the output
  (func (export "echo") (result i32)
    (local $n i64) (local $dst i64) (local $i i64)
    (local.set $n (call $input_length))
    (local.set $dst (call $alloc (local.get $n)))
    (block $done8
      (loop $words
        (br_if $done8 (i64.gt_u (i64.add (local.get $i) (i64.const 8)) (local.get $n)))
        (call $store_u64 (i64.add (local.get $dst) (local.get $i)) (call $input_load_u64 (local.get $i)))
        (local.set $i (i64.add (local.get $i) (i64.const 8)))
        (br $words)))
    (block $done
      (loop $bytes
        (br_if $done (i64.ge_u (local.get $i) (local.get $n)))
        (call $store_u8 (i64.add (local.get $dst) (local.get $i)) (call $input_load_u8 (local.get $i)))
        (local.set $i (i64.add (local.get $i) (i64.const 1)))
        (br $bytes)))
    (call $output_set (local.get $dst) (local.get $n))
    (i32.const 0)))
"""

EXTISM_BENCH = textwrap.dedent("""
    import json, sys, time, extism
    wasm = open(sys.argv[1], "rb").read()
    n = int(sys.argv[2])
    plugin = extism.Plugin(wasm, wasi=False)
    out = {}
    for label, data in (("100 B", b"x" * 100), ("1 MB", b"x" * 1_000_000)):
        assert plugin.call("echo", data) == data
        reps = n if len(data) < 10000 else max(20, n // 50)
        times = []
        for _ in range(reps):
            t = time.perf_counter(); plugin.call("echo", data); times.append(time.perf_counter() - t)
        times.sort()
        out[label] = times[len(times) // 2] * 1e6
    print(json.dumps(out))
""")


def ensure_venv() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    missing = [p for p in PEERS if subprocess.run([str(python), "-m", "pip", "show", "-q", p],
                                                   capture_output=True).returncode != 0]
    if missing:
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *missing],
                       check=True)
    return python


class _Inbox:
    def __init__(self, tmp: Path) -> None:
        self.endpoint = f"ipc://{tmp}/up.sock"
        self.sock = zmq.Context.instance().socket(zmq.PULL)
        self.sock.linger = 0
        self.sock.bind(self.endpoint)

    def next_pid(self, timeout_s: float) -> int:
        if not self.sock.poll(int(timeout_s * 1000)):
            raise TimeoutError("no child came up")
        return int(self.sock.recv())


def _reap(tmp: Path) -> None:
    """Kill whatever a peer left running from this run (its children may sit in process groups of their
    own): every process whose command line names this run's directory."""
    import psutil

    left = [p for p in psutil.process_iter(["cmdline"])
            if p.pid != os.getpid() and any(str(tmp) in part for part in (p.info["cmdline"] or []))]
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(left, timeout=10)


def _restarts(inbox: _Inbox, n: int, timeout_s: float) -> list[float]:
    pid = inbox.next_pid(30)
    out = []
    for _ in range(n):
        start = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        pid = inbox.next_pid(timeout_s)
        out.append(time.perf_counter() - start)
    return out


def circus_restarts(python: Path, tmp: Path, n: int, check_delay: float) -> list[float]:
    tmp = Path(tempfile.mkdtemp(dir=tmp))
    inbox = _Inbox(tmp)
    child = tmp.parent / "child.py"
    ini = tmp / "circus.ini"
    ini.write_text(textwrap.dedent(f"""
        [circus]
        check_delay = {check_delay}
        endpoint = ipc://{tmp}/circus-ctl.sock
        pubsub_endpoint = ipc://{tmp}/circus-pub.sock
        statsd = False
        [watcher:child]
        cmd = {sys.executable} {child} {inbox.endpoint}
        numprocesses = 1
        copy_env = True
    """))
    proc = subprocess.Popen([str(python), "-m", "circus.circusd", str(ini)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, cwd=tmp)
    try:
        return _restarts(inbox, n, 30)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _reap(tmp)
        inbox.sock.close(0)


def supervisord_restarts(python: Path, tmp: Path, n: int) -> list[float]:
    tmp = Path(tempfile.mkdtemp(dir=tmp))
    inbox = _Inbox(tmp)
    child = tmp.parent / "child.py"
    conf = tmp / "supervisord.conf"
    conf.write_text(textwrap.dedent(f"""
        [supervisord]
        nodaemon = true
        logfile = {tmp}/supervisord.log
        pidfile = {tmp}/supervisord.pid
        [program:child]
        command = {sys.executable} {child} {inbox.endpoint}
        autorestart = true
        startsecs = 0
        startretries = 1000
    """))
    out = open(tmp / "supervisord.out", "wb")  # noqa: SIM115 - closed below
    # cwd: not the checkout, whose own `supervisor` package would shadow supervisord's under -m
    proc = subprocess.Popen([str(python), "-m", "supervisor.supervisord", "-c", str(conf)],
                            stdout=out, stderr=out, start_new_session=True, cwd=tmp)
    try:
        return _restarts(inbox, n, 30)
    except TimeoutError:
        raise TimeoutError("no child came up; supervisord said: "
                           + (tmp / "supervisord.out").read_text(errors="replace")[-500:]) from None
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _reap(tmp)
        out.close()
        inbox.sock.close(0)


def extism_echo(python: Path, tmp: Path, n: int) -> dict[str, float]:
    import wasmtime

    plugin = tmp / "echo.wasm"
    plugin.write_bytes(wasmtime.wat2wasm(ECHO_PLUGIN))
    script = tmp / "extism_bench.py"
    script.write_text(EXTISM_BENCH)
    done = subprocess.run([str(python), str(script), str(plugin), str(n)], capture_output=True, text=True, check=True,
                          cwd=tmp)
    return json.loads(done.stdout)


def measure_peers(quick: bool, theater_restart_ms: float, theater_100b_us: float, theater_1mb_us: float) -> list[dict[str, Any]]:
    python = ensure_venv()
    n = 5 if quick else 15
    rows: list[dict[str, Any]] = []

    def row(what: str, peer: float, ours: float, unit: str) -> None:
        rows.append({"key": "peer", "what": what, "ours": peer, "baseline": ours, "unit": unit,
                     "baseline_what": "Theater, same run", "ratio": peer / ours if ours else float("nan"),
                     "higher_is_better": False, "target": "-"})

    tmp = Path(tempfile.mkdtemp(prefix="thpeer-"))
    try:
        (tmp / "child.py").write_text(CHILD)
        for label, fn in (
            ("Circus (check_delay 0.01): SIGKILL -> replacement up, p50", lambda: circus_restarts(python, tmp, n, 0.01)),
            ("Circus (default check_delay 5): SIGKILL -> replacement up, p50",
             lambda: circus_restarts(python, tmp, max(3, n // 3), 5.0)),
            ("supervisord: SIGKILL -> replacement up, p50", lambda: supervisord_restarts(python, tmp, max(3, n // 3))),
        ):
            try:
                row(label, statistics.median(fn()) * 1000, theater_restart_ms, "ms")
            except Exception as exc:  # a peer that does not run here is reported, not fatal
                print(f"peers: {label}: {type(exc).__name__}: {exc}", file=sys.stderr)
        try:
            ext = extism_echo(python, tmp, 300 if quick else 2000)
            row("Extism echo plugin 100 B (in-process call), p50", ext["100 B"], theater_100b_us, "us")
            row("Extism echo plugin 1 MB (in-process call), p50", ext["1 MB"], theater_1mb_us, "us")
        except Exception as exc:
            print(f"peers: Extism: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows
