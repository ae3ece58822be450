"""`theater new` and `theater build`: a project that builds and answers a call with one command each.

A project is a directory with a manifest named after it and its source: `app.py`
(Python, built with componentize-py into `<name>.wasm`) or `agent.wat` (WAT, which
the worker compiles itself: nothing to build). A build is skipped when the
source and the WIT world are what the last build used (their hash is kept in
`.theater-build`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ._errors import ConfigError

__all__ = ["LANGUAGES", "build", "new_project"]

LANGUAGES = ("python", "wat")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
STAMP = ".theater-build"
PROGRESS_S = 5.0  # a line this often while a build runs


def _shipped(folder: str) -> Path:
    """A folder shipped beside this package (a wheel), or the checkout's."""
    installed = Path(__file__).resolve().parent / folder
    return installed if installed.is_dir() else Path(__file__).resolve().parent.parent / folder


def new_project(name: str, lang: str, parent: Path) -> Path:
    """Write ``parent/name``: the source, the manifest and a README. Raise ConfigError if it cannot."""
    if not NAME_RE.fullmatch(name):
        raise ConfigError(f"{name!r} is not an agent name: 1-63 of a-z, 0-9, '-', '_', starting with a letter or digit")
    if lang not in LANGUAGES:
        raise ConfigError(f"{lang!r} is not a language theater new knows ({', '.join(LANGUAGES)})")
    project = parent / name
    if project.exists():
        raise ConfigError(f"{project} exists already: choose another name or directory")
    project.mkdir(parents=True)
    templates = _shipped("templates") / lang
    source = "app.py" if lang == "python" else "agent.wat"
    shutil.copyfile(templates / source, project / source)
    component = f"{name}.wasm" if lang == "python" else source
    (project / f"{name}.toml").write_text(
        f'# The agent {name}: its component, and the policy it runs under (docs/manifest-and-policy.md).\n'
        f'name = "{name}"\ncomponent = "{component}"\npolicy = "default"\n')
    build_line = f"theater build {project}\n" if lang == "python" else ""
    (project / "README.md").write_text(
        f"# {name}\n\nAn agent in {'Python' if lang == 'python' else 'WebAssembly text (WAT)'}. "
        f"Edit `{source}`, then:\n\n```sh\n{build_line}theater spawn {project / f'{name}.toml'}\n"
        f"theater call {name} hello\n```\n")
    return project


def build(project: Path, say: Callable[[str], None]) -> Path | None:
    """Build the project's component if it needs building; the component built (None: WAT, nothing to do).
    Raise ConfigError with the toolchain's own report when it fails."""
    project = project.resolve()
    if (project / "agent.wat").exists() and not (project / "app.py").exists():
        say(f"{project.name}: nothing to build (WAT is compiled by the worker at spawn)")
        return None
    if not (project / "app.py").exists():
        raise ConfigError(f"{project}: no app.py or agent.wat here: is it a project made by theater new?")
    wit = _shipped("wit")
    wasm = project / f"{project.name}.wasm"
    digest = hashlib.sha256()
    for path in sorted([*project.glob("*.py"), *wit.glob("*.wit")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    stamp = project / STAMP
    if wasm.exists() and stamp.exists() and stamp.read_text().strip() == digest.hexdigest():
        say(f"{project.name}: up to date ({wasm.name})")
        return wasm
    componentize = Path(sys.executable).parent / "componentize-py"
    if not componentize.exists():
        raise ConfigError(f"componentize-py is not installed beside {sys.executable} (pip install componentize-py)")
    say(f"{project.name}: building {wasm.name} with componentize-py (a Python agent takes several seconds)")
    started = time.monotonic()
    with tempfile.TemporaryFile() as report:
        proc = subprocess.Popen([str(componentize), "-d", str(wit), "-w", "agent", "componentize", "app", "-o",
                                 str(wasm)], cwd=project, stdout=report, stderr=subprocess.STDOUT,
                                env={**os.environ, "RUST_BACKTRACE": "0", "RUST_LIB_BACKTRACE": "0"})
        while True:  # what it is doing, while it does it
            try:
                proc.wait(timeout=PROGRESS_S)
                break
            except subprocess.TimeoutExpired:
                say(f"{project.name}: still building ({time.monotonic() - started:.0f} s)")
        if proc.returncode != 0:
            report.seek(0)
            text = report.read().decode(errors="replace").split("Stack backtrace:")[0].strip()
            raise ConfigError(f"{project.name}: componentize-py failed:\n{text[-4000:]}")
    stamp.write_text(digest.hexdigest() + "\n")
    say(f"{project.name}: built {wasm.name} ({wasm.stat().st_size:,} bytes) in {time.monotonic() - started:.1f} s")
    return wasm
