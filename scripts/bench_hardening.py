"""What OS hardening costs a worker's spawn: spawn time with all layers, none, and each left out or alone.

``python scripts/bench_hardening.py [--runs N] [--json]`` starts one supervisor per
variant (workers started by Popen, as ``python scripts/bench_hardening.py
--worker LAYERS``) and times ``spawn`` round trips: manifest to an initialised
agent, which covers process start, imports, hardening, hello, genesis, spec,
compile, lock-down and the init call, and (``layer_costs``) the time the worker spends inside
the hardening steps themselves. ``bench()`` returns the table for
scripts/bench.py. Run it as root and as an unprivileged user to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from theater.client import Client, ClientError, NotRunning  # noqa: E402
from theater.home import Home  # noqa: E402
from theater.spec import HARDENING_LAYERS  # noqa: E402

COMPONENT = ROOT / "examples" / "agents" / "echo.wat"
START_TIMEOUT_S = 30.0


def variants() -> dict[str, list[str]]:
    """Variant name -> the layers attempted (hygiene always is)."""
    out = {"none": [], "all": list(HARDENING_LAYERS)}
    for layer in HARDENING_LAYERS:
        out[f"only {layer}"] = [layer]
    for layer in HARDENING_LAYERS:
        out[f"all but {layer}"] = [x for x in HARDENING_LAYERS if x != layer]
    return out


def _worker(layers: str) -> int:
    """A worker that attempts only ``layers`` and requires none of them (hygiene still is)."""
    import worker.__main__ as entry
    from theater.spec import Hardening
    from worker import _harden, _loop

    attempted = frozenset(x for x in layers.split(",") if x)
    _harden.ATTEMPTED_LAYERS = attempted
    real_require = _harden.require

    def require(hardening: Hardening) -> None:  # a layer may be unavailable alone (seccomp needs no_new_privs)
        real_require(Hardening((), hardening.preferred))

    _loop.require = require  # type: ignore[assignment]
    sys.argv = [sys.argv[0], *sys.argv[3:]]
    return entry.main()


def _supervisor(home: str, layers: str) -> int:
    from supervisor import Supervisor

    command = [sys.executable, str(Path(__file__).resolve()), "--worker", layers or ","]
    Supervisor(Home(home), worker_command=command, log=lambda line: None).serve_forever()
    return 0


def _start_supervisor(layers: list[str], root: Path) -> tuple[subprocess.Popen[bytes], Home]:
    home = Home(root / "h")
    home.root.mkdir(parents=True)
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--supervisor", str(home.root), ",".join(layers) or ","],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with Client(home, timeout=1.0) as c:
                c.ping()
            return proc, home
        except (NotRunning, ClientError):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("a benchmark supervisor did not start") from None
            time.sleep(0.02)


def _spawn_once(home: Home, tmp: Path, name: str) -> float:
    """Milliseconds from the spawn request to the initialised agent's reply; then stop it."""
    manifest = tmp / f"{name}.toml"
    manifest.write_text(f'name = "{name}"\ncomponent = "{COMPONENT}"\n')
    with Client(home, timeout=60) as c:
        t0 = time.perf_counter()
        c.spawn(str(manifest))
        elapsed = (time.perf_counter() - t0) * 1000
        c.stop(name)
    return elapsed


def _stop_supervisor(proc: subprocess.Popen[bytes], home: Home) -> None:
    try:
        with Client(home, timeout=20) as c:
            c.down()
        proc.wait(timeout=30)
    except (NotRunning, ClientError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()


_IN_PROCESS = """
import json, os, sys, time
from worker import _harden, _loop  # what a worker imports before it hardens
from theater.spec import Limits
layers, endpoint, limits = frozenset(x for x in sys.argv[1].split(",") if x), sys.argv[2], json.loads(sys.argv[3])
t0 = time.perf_counter()
report = _harden.harden_before_connect(os.getppid(), endpoint, layers)
t1 = time.perf_counter()
_harden.require(_harden.Hardening((), ()))
_harden.lock_down(Limits.from_dict(limits))
t2 = time.perf_counter()
print(json.dumps({"before_connect_ms": (t1 - t0) * 1000, "lock_down_ms": (t2 - t1) * 1000, "report": report}))
"""


def layer_costs(runs: int = 15) -> dict[str, Any]:
    """Time spent inside the worker in ``harden_before_connect`` and ``lock_down``, per variant (ms).

    Each run is a fresh process (layers cannot be undone); the variants are
    interleaved so that load on the machine spreads over all of them.
    """
    from supervisor._config import load_policy, policy_dirs

    limits = json.dumps(load_policy("default", policy_dirs(None)).limits.as_dict())
    samples: dict[str, dict[str, list[float]]] = {n: {"before_connect_ms": [], "lock_down_ms": []} for n in variants()}
    for _ in range(runs):
        for name, layers in variants().items():
            with tempfile.TemporaryDirectory(prefix="thl-") as tmp:
                work = Path(tmp) / "w"
                work.mkdir(mode=0o700)
                out = subprocess.run(
                    [sys.executable, "-c", _IN_PROCESS, ",".join(layers), f"ipc://{tmp}/run/workers.sock", limits],
                    cwd=work, env={"PYTHONSAFEPATH": "1"}, capture_output=True, check=True, start_new_session=True,
                ).stdout
            result = json.loads(out)
            for key in samples[name]:
                samples[name][key].append(result[key])
    subprocess.run([sys.executable, "-m", "worker.probe", "--sweep"], cwd="/", capture_output=True, check=False)
    return {name: {k: round(statistics.median(v), 2) for k, v in s.items()} for name, s in samples.items()}


def bench(runs: int = 15) -> dict[str, Any]:
    """Spawn time (ms, median and spread) per variant, its cost against ``none``, and the in-process cost."""
    tmp = Path(tempfile.mkdtemp(prefix="thb-", dir="/tmp"))
    supervisors = {}
    try:
        for i, (name, layers) in enumerate(variants().items()):
            supervisors[name] = _start_supervisor(layers, tmp / str(i))
        times: dict[str, list[float]] = {name: [] for name in supervisors}
        for i in range(runs + 1):  # interleaved, so that load on the machine spreads over all variants
            for name, (_, home) in supervisors.items():
                elapsed = _spawn_once(home, tmp, f"a{i}")
                if i:  # the first spawn warms the page cache
                    times[name].append(elapsed)
    finally:
        for proc, home in supervisors.values():
            _stop_supervisor(proc, home)
        shutil.rmtree(tmp, ignore_errors=True)
    rows: dict[str, Any] = {}
    for name, t in times.items():
        rows[name] = {"median_ms": round(statistics.median(t), 1), "min_ms": round(min(t), 1),
                      "max_ms": round(max(t), 1), "runs": len(t)}
    base = rows["none"]["median_ms"]
    for row in rows.values():
        row["over_none_ms"] = round(row["median_ms"] - base, 1)
    costs = layer_costs(runs)
    for name, row in rows.items():
        row.update(costs[name])
    return {"uid": os.geteuid(), "runs": runs, "variants": rows}


def main() -> int:
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        return _worker(sys.argv[2])
    if len(sys.argv) == 4 and sys.argv[1] == "--supervisor":
        return _supervisor(sys.argv[2], sys.argv[3])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    result = bench(args.runs)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"spawn time (request to initialised agent) and time inside the worker, uid {result['uid']}, "
          f"median of {result['runs']} (ms)")
    print(f"{'variant':<24} {'spawn':>7} {'min':>7} {'max':>7} {'vs none':>8} {'harden':>7} {'lock':>6}")
    for name, row in result["variants"].items():
        print(f"{name:<24} {row['median_ms']:>7} {row['min_ms']:>7} {row['max_ms']:>7} {row['over_none_ms']:>+8} "
              f"{row['before_connect_ms']:>7} {row['lock_down_ms']:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
