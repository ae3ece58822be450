"""Every example in examples/ builds from source and does what its README says.

Projects are copied to a temporary directory and built there (builds are cached by the hash of their
sources: supervisor/_authoring.py); JavaScript ones are skipped, saying why, only where Node.js is absent.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, Theater, needs_node, of, records, wait_running, wait_until

from supervisor._authoring import build
from theater.client import ClientError
from theater.records import Kind

pytestmark = pytest.mark.shared_artifacts  # the same guests compiled once a session (conftest)

EXAMPLES = ROOT / "examples"


def copied(relative: str, into: Path) -> Path:
    target = into / Path(relative).name
    shutil.copytree(EXAMPLES / relative, target)
    return target


@pytest.mark.parametrize("lang", ["wat", "python", pytest.param("js", marks=needs_node)])
def test_the_counter_in_each_language(theater: Theater, tmp_path: Path, lang: str) -> None:
    if lang == "wat":
        manifest, name = EXAMPLES / "agents" / "counter.toml", "counter"
    else:
        project = copied(f"counter-{'py' if lang == 'python' else 'js'}", tmp_path)
        build(project, lambda line: None)
        manifest, name = project / f"{project.name}.toml", project.name
    with theater.client(timeout=300) as c:
        c.spawn(manifest)
        if lang == "wat":  # the WAT counter adds one per message, whatever it says
            assert [c.call(name, b"add") for _ in range(3)] == [b"1", b"2", b"3"]
            return
        assert c.call(name, b"add") == b"1"
        assert c.call(name, b"add:41") == b"42"
        assert c.call(name, b"get") == b"42"
        with pytest.raises(ClientError) as exc:
            c.call(name, b"add:many")
        assert exc.value.code == "guest-error" and "whole number" in str(exc.value)
        assert c.call(name, b"reset") is None
        assert c.call(name, b"get") == b"0"


@needs_node
def test_a_pool_of_workers_that_run_away_now_and_then(theater: Theater, tmp_path: Path) -> None:
    pool = copied("pool", tmp_path)
    build(pool / "worker", lambda line: None)
    with theater.client(timeout=300) as c:
        c.spawn(pool / "pool.toml")
        answered = failed = 0
        for i in range(60):  # about one call in eight runs away: some fail, the pool keeps answering
            worker = f"w{i % 3 + 1}"
            pid = wait_running(c, worker)["pid"]
            try:
                assert c.call(worker, f"square:{i}".encode(), timeout=30) == str(i * i).encode()
                answered += 1
            except ClientError as exc:
                assert exc.code in ("deadline", "out-of-fuel"), exc  # a runaway, ended by its bounds
                failed += 1
                wait_running(c, worker, old_pid=pid, timeout=60)  # restarted: a new worker is serving
        roots = c.tree()
    assert answered > failed
    (tree,) = roots
    assert tree["status"] == "running" and sum(child["restarts"] for child in tree["children"]) == failed
    runaways = sum(1 for w in ("w1", "w2", "w3") for r in of(records(theater, w), Kind.HANDLE)
                   if r.fields()["status"] in ("deadline", "out-of-fuel"))
    assert runaways == failed  # every failure was a runaway met by its bounds, and nothing else


GALLERY = {  # agent -> (what a call ends with, whether its worker is replaced); None: refused at spawn
    "spin": ({"deadline", "out-of-fuel"}, True),
    "memory-bomb": ({"guest-error"}, False),
    "deep-recursion": ({"stack-overflow"}, True),
    "div-zero": ({"trap"}, True),
    "bad-bytes": ({"malformed-result"}, True),
    "grabber": None,
    "wrong-shape": None,
}


def test_the_hostile_gallery_is_stopped_as_its_readme_says(theater: Theater) -> None:
    readme = (EXAMPLES / "hostile" / "README.md").read_text()
    with theater.client(timeout=120) as c:
        for name, expected in GALLERY.items():
            assert f"| `{name}` |" in readme
            manifest = EXAMPLES / "hostile" / f"{name}.toml"
            if expected is None:
                with pytest.raises(ClientError) as exc:
                    c.spawn(manifest)
                assert exc.value.code == "spawn-failed", (name, exc.value)
                continue
            c.spawn(manifest)
            with pytest.raises(ClientError) as exc:
                c.call(name, b"go")
            statuses, replaced = expected
            assert exc.value.code in statuses, (name, exc.value)
            if replaced:  # a crash: its exit is recorded once the worker has been reaped
                wait_until(lambda n=name: of(records(theater, n), Kind.EXIT), timeout=30, what=f"{name}'s exit")
            else:  # the call failed as a guest error: the worker is the same one, and answers again
                assert c.ps() and any(a["name"] == name and a["status"] == "running" for a in c.ps())
                assert not of(records(theater, name), Kind.EXIT), name
        big = EXAMPLES / "hostile" / "big-reply.toml"
        c.spawn(big)
        with pytest.raises(ClientError) as exc:
            c.call("big-reply", str(2 * 1024 * 1024).encode())  # more than the default 1 MiB max_message_bytes
        assert exc.value.code == "too-large"


@needs_node
def test_an_agent_composed_of_a_python_and_a_javascript_component(theater: Theater, tmp_path: Path) -> None:
    composed = copied("composed", tmp_path)
    helper = build(composed / "text-helper", lambda line: None)
    build(composed / "shouter", lambda line: None)
    assert helper is not None
    with theater.client(timeout=300) as c:
        c.spawn(composed / "shouter" / "shouter.toml")
        assert c.call("shouter", b"shout:hello there") == b"HELLO THERE! (2 words so far)"
        assert c.call("shouter", b"shout:and again") == b"AND AGAIN! (4 words so far)"
        # Without its helper the agent imports an interface nobody provides: refused at load, like a grab.
        alone = composed / "shouter" / "alone.toml"
        alone.write_text((composed / "shouter" / "shouter.toml").read_text()
                         .replace('name = "shouter"', 'name = "alone"').replace("helpers = ", "# helpers = "))
        with pytest.raises(ClientError) as exc:
            c.spawn(alone)
        assert exc.value.code == "spawn-failed" and "demo:compose/text" in str(exc.value)
    genesis = records(theater, "shouter")[0]
    config = json.loads(genesis.fields()["config"])
    assert config["helpers"] == [{"path": str(helper), "sha256": hashlib.sha256(helper.read_bytes()).hexdigest()}]


def test_a_coordinator_calls_specialists_with_timeouts(theater: Theater, tmp_path: Path) -> None:
    """examples/agents/team.toml, built as the README says: one flaky worker crashes on multiples of 3, the
    coordinator's call to it fails at once (target-crashed), and the job is retried on the steady one."""
    team = tmp_path / "team"
    shutil.copytree(EXAMPLES / "agents" / "team", team, ignore=shutil.ignore_patterns("*.wasm", "__pycache__"))
    componentize = Path(sys.executable).parent / "componentize-py"
    subprocess.run([str(componentize), "-d", str(ROOT / "wit"), "-w", "messaging-agent", "componentize", "app",
                    "-p", str(team), "-o", str(team / "team.wasm")], check=True, capture_output=True, timeout=600)
    shutil.copyfile(EXAMPLES / "agents" / "team.toml", tmp_path / "team.toml")
    with theater.client(timeout=300) as c:
        c.spawn(tmp_path / "team.toml")
        reply = c.call("coordinator", b"square-all:1,2,3,4,5,6", timeout=60)
    assert reply == b"1->1 2->4 3->9 4->16 5->25 6->36 (6: flaky failed, retried on steady)"
    # The flaky specialist crashed: its exit is recorded once its worker has been reaped, which may come after
    # the coordinator's reply.
    wait_until(lambda: of(records(theater, "flaky"), Kind.EXIT), timeout=30, what="flaky's exit record")
