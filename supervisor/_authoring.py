"""`theater new` and `theater build`: a project that builds and answers a call with one command each.

A project is a directory with a manifest named after it and its source: `app.py`
(Python, built with componentize-py), `app.js` (JavaScript, bundled with esbuild
and built with componentize-js) or `agent.wat` (WAT, which the worker compiles
itself: nothing to build). Python and JavaScript agents use the guest library
(`guest/`, docs/writing-agents.md). The WIT world is chosen from the manifest's
capabilities. Built components are cached by the hash of everything that goes
into them (sources, guest library, WIT, world, toolchain versions), in the
project (`.theater-build`) and in a cache shared by all projects, so a build is
never stale and never repeated.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path

from ._errors import ConfigError

__all__ = ["LANGUAGES", "SOURCES", "build", "build_key", "cache_dir", "name_problem", "new_project", "world_for"]

LANGUAGES = ("python", "js", "wat")
SOURCES = {"python": "app.py", "js": "app.js", "wat": "agent.wat"}
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
STAMP = ".theater-build"
SKIPPED_DIRS = frozenset({"__pycache__", "node_modules", ".git"})  # never a build's input
PROGRESS_S = 5.0  # a line this often while a build runs
# The JavaScript toolchain, installed from the npm registry into the cache on first use.
JS_TOOLS = {"@bytecodealliance/componentize-js": "0.23.0", "esbuild": "0.28.2"}
# WASI features componentize-js can leave out: the agent reaches HTTP through its own capability.
JS_DISABLED = ("http", "fetch-event", "clocks")
TOOL_TIMEOUT_S = 900


def _shipped(folder: str) -> Path:
    """A folder shipped beside this package (a wheel), or the checkout's."""
    installed = Path(__file__).resolve().parent / folder
    return installed if installed.is_dir() else Path(__file__).resolve().parent.parent / folder


def cache_dir() -> Path:
    """Where built components and the JavaScript toolchain are kept: $THEATER_CACHE, else
    $XDG_CACHE_HOME/theater, else ~/.cache/theater."""
    if os.environ.get("THEATER_CACHE"):
        return Path(os.environ["THEATER_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "theater"


def world_for(capabilities: Sequence[str]) -> str:
    """The WIT world (wit/agent.wit) that imports what the capabilities grant, and nothing more."""
    caps = set(capabilities) - {"runtime"}
    if not caps:
        return "agent"
    if caps == {"supervision"}:
        return "supervising-agent"
    if caps == {"messaging"}:
        return "messaging-agent"
    if caps == {"messaging", "kv", "timers"}:
        return "service-agent"
    if caps == {"http"}:
        return "http-agent"
    also = ""
    if caps <= {"messaging", "kv", "timers"}:  # the one world with kv or timers imports all three
        also = (": kv and timers come in the service-agent world, which imports messaging, kv and timers, so list "
                "all three (the built-in messaging policy grants them)")
    raise ConfigError(f"no WIT world imports exactly {', '.join(sorted(caps))}{also}; a built agent takes one of "
                      "runtime alone, supervision, messaging, messaging/kv/timers, http (docs/writing-agents.md)")


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name an agent (and its project), or None."""
    if NAME_RE.fullmatch(name):
        return None
    return f"{name!r} is not an agent name: 1-63 of a-z, 0-9, '-', '_', starting with a letter or digit"


def new_project(name: str, lang: str, parent: Path) -> Path:
    """Write ``parent/name``: the source, the manifest and a README. Raise ConfigError if it cannot."""
    problem = name_problem(name)
    if problem is not None:
        raise ConfigError(problem)
    if lang not in LANGUAGES:
        raise ConfigError(f"{lang!r} is not a language theater new knows ({', '.join(LANGUAGES)})")
    project = parent / name
    if project.exists():
        raise ConfigError(f"{project} exists already: choose another name or directory")
    project.mkdir(parents=True)
    source = SOURCES[lang]
    shutil.copyfile(_shipped("templates") / lang / source, project / source)
    component = source if lang == "wat" else f"{name}.wasm"
    (project / f"{name}.toml").write_text(
        f'# The agent {name}: its component, and the policy it runs under (docs/manifest-and-policy.md).\n'
        f'# Add capabilities (and a policy that grants them) here; theater build picks the WIT world from them.\n'
        f'name = "{name}"\ncomponent = "{component}"\npolicy = "default"\ncapabilities = ["runtime"]\n')
    build_line = "" if lang == "wat" else f"theater build {project}\n"
    language = {"python": "Python", "js": "JavaScript", "wat": "WebAssembly text (WAT)"}[lang]
    (project / "README.md").write_text(
        f"# {name}\n\nAn agent in {language}. Edit `{source}`, then:\n\n```sh\n{build_line}"
        f"theater spawn {project / f'{name}.toml'}\ntheater call {name} hello\n```\n\n"
        f"A spawned agent keeps the component it was spawned with. To run a new build: `theater stop {name}`, "
        f"then `theater spawn {project / f'{name}.toml'} --replace` (a new agent, from its initial state).\n\n"
        "How agents are written: docs/writing-agents.md.\n")
    return project


def _language(project: Path) -> str:
    found = [lang for lang, source in SOURCES.items() if (project / source).exists()]
    if len(found) != 1:
        raise ConfigError(f"{project}: a project holds exactly one of app.py, app.js, agent.wat (found "
                          f"{', '.join(SOURCES[f] for f in found) or 'none'}): is it a project made by theater new?")
    return found[0]


def _capabilities(project: Path) -> tuple[str, ...]:
    manifest = project / f"{project.name}.toml"
    try:
        data = tomllib.loads(manifest.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{project}: no manifest {manifest.name} (the project's name is its directory's)") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{manifest}: not valid TOML: {exc}") from None
    caps = data.get("capabilities", ["runtime"])
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise ConfigError(f"{manifest}: capabilities must be a list of names")
    return tuple(caps)


def build(project: Path, say: Callable[[str], None]) -> Path | None:
    """Build the project's component if it needs building; the component built (None: WAT, nothing to do).
    Raise ConfigError with the toolchain's own report when it fails. ``project`` may also be its manifest
    (``DIR/DIR.toml``), which names the project as well."""
    project = project.resolve()
    if project.is_file() and project.suffix == ".toml" and project.stem == project.parent.name:
        project = project.parent
    lang = _language(project)
    if lang == "wat":
        say(f"{project.name}: nothing to build (WAT is compiled by the worker at spawn)")
        return None
    guest = _shipped("guest") / lang
    with tempfile.TemporaryDirectory(prefix="theater-wit-") as wit_tmp:
        wit, world = _wit_and_world(project, Path(wit_tmp))
        return _build(project, lang, wit, world, guest, say)


def _wit_and_world(project: Path, tmp: Path) -> tuple[Path, str]:
    """The WIT to build against and the world: Theater's, with the world its capabilities need; or, for a
    project with a `wit/` of its own (a helper component, or an agent that imports one), that WIT with
    Theater's package beside it in `deps/`, and the world `build.toml` names."""
    own = project / "wit"
    if not own.is_dir():
        return _shipped("wit"), world_for(_capabilities(project))
    settings = project / "build.toml"
    try:
        world = tomllib.loads(settings.read_text()).get("world")
    except FileNotFoundError:
        raise ConfigError(f"{project}: a project with its own wit/ names its world in build.toml "
                          "(world = \"NAME\")") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{settings}: not valid TOML: {exc}") from None
    if not isinstance(world, str) or not re.fullmatch(r"[a-z][a-z0-9-]*", world):
        raise ConfigError(f"{settings}: world must be the name of a world in {own}")
    wit = tmp / "wit"
    shutil.copytree(own, wit)
    (wit / "deps" / "theater").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_shipped("wit") / "agent.wit", wit / "deps" / "theater" / "agent.wit")
    return wit, world


def _sources(project: Path) -> list[Path]:
    """Every file of the project a build may read, in subdirectories too (componentize-py takes the whole
    directory, esbuild follows imports): all but what a build writes, the manifest (its capabilities are
    the world, hashed as such) and the directories of caches and packages."""
    left_out = {project / f"{project.name}.wasm", project / STAMP, project / f"{project.name}.toml"}
    found = []
    for folder, dirs, files in os.walk(project):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
        found += [p for p in (Path(folder) / f for f in files) if p not in left_out]
    return sorted(found)


def build_key(project: Path, lang: str, wit: Path, world: str, guest: Path) -> str:
    """The SHA-256 of everything that goes into a build: the project's sources, the WIT and world, the guest
    library and the toolchain's versions. A build of the same key is the same component."""
    tools = JS_TOOLS if lang == "js" else _componentize_py_version()
    digest = hashlib.sha256(f"{lang}\0{world}\0{json.dumps(tools)}".encode())
    for root, paths in ((project, _sources(project)), (wit, sorted(wit.rglob("*.wit"))),
                        (guest, sorted(guest.iterdir()))):
        for path in paths:
            if path.is_file():  # by its place in its tree: lib/util.py and util.py are two files
                digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _build(project: Path, lang: str, wit: Path, world: str, guest: Path, say: Callable[[str], None]) -> Path:
    key = build_key(project, lang, wit, world, guest)
    wasm, stamp = project / f"{project.name}.wasm", project / STAMP
    if wasm.exists() and stamp.exists() and stamp.read_text().strip() == key:
        say(f"{project.name}: up to date ({wasm.name})")
        return wasm
    cached = cache_dir() / "builds" / f"{key}.wasm"
    if cached.exists():
        shutil.copyfile(cached, wasm)
        stamp.write_text(key + "\n")
        say(f"{project.name}: {wasm.name} from the build cache (the same sources were built before)")
        return wasm
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="theater-build-") as tmp:
        out = Path(tmp) / "out.wasm"
        if lang == "python":
            _build_python(project, world, wit, guest, out, say)
        else:
            _build_js(project, world, wit, guest, Path(tmp), out, say)
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_path = tempfile.mkstemp(dir=cached.parent, prefix=f".{key[:16]}-")  # builds running at once
        os.close(fd)
        shutil.copyfile(out, tmp_path)
        os.replace(tmp_path, cached)  # whole or not at all
        shutil.copyfile(out, wasm)
    stamp.write_text(key + "\n")
    say(f"{project.name}: built {wasm.name} ({wasm.stat().st_size:,} bytes, world {world}) in "
        f"{time.monotonic() - started:.1f} s")
    return wasm


def _componentize_py() -> str:
    return str(Path(sys.executable).parent / "componentize-py")


@functools.cache
def _componentize_py_version() -> str:
    """What the build key holds of the Python toolchain: its own version, so that an upgrade builds again."""
    try:
        done = subprocess.run([_componentize_py(), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable: {exc}"  # the build itself then says what is wrong
    return f"{done.returncode} {done.stdout.strip()}"


def _build_python(project: Path, world: str, wit: Path, guest: Path, out: Path, say: Callable[[str], None]) -> None:
    componentize = _componentize_py()
    if not Path(componentize).exists():
        raise ConfigError(f"componentize-py is not installed beside {sys.executable} (pip install componentize-py)")
    say(f"{project.name}: building with componentize-py, world {world} (a Python agent takes several seconds)")
    _run([componentize, "-d", str(wit), "-w", world, "componentize", "app", "-p", str(project), "-p", str(guest),
          "-o", str(out)], project, "componentize-py", say)


def _build_js(project: Path, world: str, wit: Path, guest: Path, tmp: Path, out: Path,
              say: Callable[[str], None]) -> None:
    tools = js_toolchain(say)
    bin_dir = tools / "node_modules" / ".bin"
    shutil.copyfile(guest / "theater.js", tmp / "theater.js")
    (tmp / "capabilities.js").write_text("".join(
        f'export * as {name} from "theater:agent/{interface}@0.1.0";\n' for name, interface in _interfaces(wit, world)))
    bundle = tmp / "bundle.js"
    say(f"{project.name}: bundling app.js with esbuild")
    packages = {m for f in wit.rglob("*.wit") for m in re.findall(r"^package ([a-z0-9-]+:[a-z0-9-]+)", f.read_text(), re.M)}
    externals = [f"--external:{p}/*" for p in sorted(packages | {"theater:agent"})]  # WIT interfaces: the component's
    _run([str(bin_dir / "esbuild"), str(project / "app.js"), "--bundle", "--format=esm", "--platform=neutral",
          f"--alias:theater={tmp / 'theater.js'}", *externals, f"--outfile={bundle}",
          "--log-level=warning"], project, "esbuild", say)
    say(f"{project.name}: building with componentize-js, world {world} (a JavaScript agent takes several seconds)")
    disabled = [arg for feature in JS_DISABLED for arg in ("-d", feature)]
    _run([str(bin_dir / "componentize-js"), str(bundle), "--wit", str(wit), "-n", world, *disabled, "-o", str(out)],
         project, "componentize-js", say)


def _interfaces(wit: Path, world: str) -> list[tuple[str, str]]:
    """The theater:agent interfaces ``world`` imports (itself, or through a Theater world it includes), as
    (JavaScript name, interface)."""
    theater = (_shipped("wit") / "agent.wit").read_text()

    def body(text: str, name: str) -> str:
        match = re.search(r"^world " + re.escape(name) + r" \{(.*?)^\}", text, re.S | re.M)
        return match.group(1) if match else ""

    texts = [f.read_text() for f in wit.glob("*.wit")]
    own = next((b for t in texts if (b := body(t, world))), "")
    if wit == _shipped("wit"):
        names = re.findall(r"^\s*import ([a-z-]+);", own, re.M)
    else:
        names = re.findall(r"^\s*import theater:agent/([a-z-]+)(?:@[0-9.]+)?;", own, re.M)
        for included in re.findall(r"^\s*include theater:agent/([a-z-]+)(?:@[0-9.]+)?;", own, re.M):
            names += re.findall(r"^\s*import ([a-z-]+);", body(theater, included), re.M)
    return [(n.replace("-", "_"), n) for n in dict.fromkeys(names)]


def js_toolchain(say: Callable[[str], None]) -> Path:
    """componentize-js and esbuild, installed once (pinned versions) from the npm registry into the cache."""
    key = hashlib.sha256(json.dumps(JS_TOOLS, sort_keys=True).encode()).hexdigest()[:16]
    tools = cache_dir() / f"js-toolchain-{key}"
    if (tools / ".installed").exists():
        return tools
    npm = shutil.which("npm")
    if shutil.which("node") is None or npm is None:
        raise ConfigError("JavaScript agents need Node.js (18 or newer) and npm on PATH to build: install them, "
                          "then run theater build again")
    tools.mkdir(parents=True, exist_ok=True)
    with open(tools / ".lock", "w") as lock:  # builds started at once install it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (tools / ".installed").exists():
            return tools
        (tools / "package.json").write_text(json.dumps({"name": "theater-js-toolchain", "private": True,
                                                        "dependencies": JS_TOOLS}, indent=2))
        say(f"installing the JavaScript toolchain ({', '.join(f'{k}@{v}' for k, v in JS_TOOLS.items())}) into "
            f"{tools}: once, about a minute")
        _run([npm, "install", "--no-audit", "--no-fund", "--loglevel=error"], tools, "npm install", say)
        (tools / ".installed").write_text(json.dumps(JS_TOOLS) + "\n")
    return tools


def _run(argv: list[str], cwd: Path, what: str, say: Callable[[str], None]) -> None:
    """Run a toolchain step, saying it is still going every few seconds; its own report if it fails."""
    started = time.monotonic()
    with tempfile.TemporaryFile() as report:
        proc = subprocess.Popen(argv, cwd=cwd, stdout=report, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "RUST_BACKTRACE": "0", "RUST_LIB_BACKTRACE": "0"})
        while True:
            try:
                proc.wait(timeout=PROGRESS_S)
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() - started > TOOL_TIMEOUT_S:
                    proc.kill()
                    proc.wait()
                    raise ConfigError(f"{cwd.name}: {what} took more than {TOOL_TIMEOUT_S} s; stopped") from None
                say(f"{cwd.name}: {what} still running ({time.monotonic() - started:.0f} s)")
        if proc.returncode != 0:
            report.seek(0)
            text = report.read().decode(errors="replace").split("Stack backtrace:")[0].strip()
            raise ConfigError(f"{cwd.name}: {what} failed:\n{text[-4000:]}")
