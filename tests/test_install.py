"""A normal install works: the built wheel, in a fresh venv, away from the checkout, runs an agent.

The wheel is built from the checkout as `pip install .` would build it and
installed into a new venv with no access to the checkout. Its third-party
dependencies (wasmtime, pyzmq, ...) are taken from the test's own environment
through a .pth line, so the test needs no network; Theater's own code and its
built-in policies come only from the wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = ROOT / "tests" / "components"


def run(argv: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_built_wheel_runs_an_agent_from_a_fresh_venv(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    built = run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                 "--wheel-dir", str(wheels), str(ROOT)], tmp_path, timeout=300)
    assert built.returncode == 0, built.stderr
    [wheel] = list(wheels.glob("theater-*.whl"))

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    tmp_path).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                     str(wheel)], tmp_path, timeout=300)
    assert installed.returncode == 0, installed.stderr

    where = run([str(python), "-c", "import supervisor, worker, theater, supervisor._config as c; "
                 "print(supervisor.__file__); print(worker.__file__); print(c.BUILTIN_POLICIES)"], tmp_path)
    assert where.returncode == 0, where.stderr
    for line in where.stdout.split():
        assert Path(line).is_relative_to(env_dir) and not Path(line).is_relative_to(ROOT), line
    assert Path(where.stdout.split()[-1], "default.toml").is_file()

    work = tmp_path / "elsewhere"
    work.mkdir()
    manifest = work / "echo.toml"
    manifest.write_text(f'name = "echo"\ncomponent = "{COMPONENTS / "echo.wat"}"\npolicy = "default"\n')
    theater = str(env_dir / "bin" / "theater")
    home = str(tmp_path / "home")
    up = run([theater, "--home", home, "up", "--detach"], work)
    assert up.returncode == 0, up.stderr
    try:
        spawned = run([theater, "--home", home, "spawn", str(manifest)], work)
        assert spawned.returncode == 0, spawned.stderr
        called = run([theater, "--home", home, "call", "echo", "installed"], work)
        assert called.returncode == 0 and called.stdout.strip() == "installed", (called.stdout, called.stderr)
        verified = run([theater, "--home", home, "verify"], work)
        assert verified.returncode == 0, verified.stdout + verified.stderr
    finally:
        down = run([theater, "--home", home, "down"], work)
    assert down.returncode == 0, down.stderr
