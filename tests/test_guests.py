"""Guests in Python and JavaScript, built from source by `theater build` (componentize-py, componentize-js):
contained exactly as WAT agents are, their output and tracebacks on the chain, the guest libraries' API.

Each project in tests/guests/ is copied to a temporary directory and built there; builds are cached by the
hash of everything that goes into them (supervisor/_authoring.py), so the suite never rebuilds the same
sources and never runs a stale build. JavaScript needs Node.js and npm; without them those tests are skipped.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import Theater, needs_node, of, records, wait_running, wait_status, write_lab_policy

from supervisor._authoring import build
from theater.client import Client, ClientError
from theater.records import Kind

pytestmark = pytest.mark.shared_artifacts  # the same guests compiled once a session (conftest)

GUESTS = Path(__file__).resolve().parent / "guests"


def built(project: str, into: Path) -> Path:
    """tests/guests/<project> copied under ``into`` and built; its manifest."""
    target = into / project
    shutil.copytree(GUESTS / project, target)
    build(target, lambda line: None)
    return target / f"{project}.toml"


def logs(t: Theater, name: str) -> list[str]:
    return [r.fields()["message"] for r in of(records(t, name), Kind.LOG)]


def call_status(c: Client, name: str, message: str) -> str:
    try:
        c.call(name, message.encode(), timeout=60)
        return "ok"
    except ClientError as exc:
        return exc.code


@needs_node
def test_a_javascript_agent_is_contained_like_a_wat_one(theater: Theater, tmp_path: Path) -> None:
    write_lab_policy(theater)  # a huge fuel budget: the loop meets its deadline, the hoard its memory cap
    manifest = built("hostile_js", tmp_path)
    with theater.client(timeout=300) as c:
        c.spawn(manifest)
        assert c.call("hostile_js", b"hi") == b"echo:hi"
        outcomes = {}
        for message in ("throw", "loop", "alloc", "recurse"):
            pid = next(a["pid"] for a in c.ps() if a["name"] == "hostile_js")
            outcomes[message] = call_status(c, "hostile_js", message)
            if outcomes[message] != "guest-error":  # a crash: its worker is replaced
                wait_running(c, "hostile_js", old_pid=pid, timeout=120)
            assert c.call("hostile_js", b"hi", timeout=60) == b"echo:hi"  # and the agent answers again
    assert outcomes["throw"] == "trap"  # an Error thrown past the binding: the engine aborts
    assert outcomes["loop"] == "deadline"
    # The cap on linear memory holds: memory.grow fails at it, and the engine reports "out of memory" as an
    # error of the call (its instance is discarded; the worker stays).
    assert outcomes["alloc"] == "guest-error"
    assert outcomes["recurse"] == "trap"  # the engine's recursion limit, then an abort
    chain = records(theater, "hostile_js")
    handled = [(r.fields()["message"], r.fields()["status"], r.fields()["error"]) for r in of(chain, Kind.HANDLE)]
    assert [m for m, status, _ in handled if status == "ok"] == [b"hi"] * 5
    assert (b"alloc", "guest-error", "out of memory") in handled
    exits = [r.fields()["reason"] for r in of(chain, Kind.EXIT)]
    assert exits == ["trap"] * 3  # throw, loop, recurse ended their workers, nothing else did


@needs_node
def test_a_javascript_agents_console_reaches_its_chain(theater: Theater, tmp_path: Path) -> None:
    write_lab_policy(theater)
    manifest = built("hostile_js", tmp_path)
    with theater.client(timeout=300) as c:
        c.spawn(manifest)
        assert c.call("hostile_js", b"print") == b"printed"
        with pytest.raises(ClientError):
            c.call("hostile_js", b"throw")
    lines = logs(theater, "hostile_js")
    assert "stdout: init: hostile_js is up" in lines
    assert "stdout: to stdout 42" in lines and "stderr: to stderr" in lines
    assert any("thrown on purpose" in line or "expected a string" in line for line in lines)  # the engine's word


def test_a_python_traceback_reaches_the_chain(theater: Theater, tmp_path: Path) -> None:
    manifest = built("tracer_py", tmp_path)
    with theater.client(timeout=300) as c:
        c.spawn(manifest)
        assert c.call("tracer_py", b"hi") == b"ok"
        with pytest.raises(ClientError) as exc:
            c.call("tracer_py", b"boom")
        assert exc.value.code == "trap"
    chain = records(theater, "tracer_py")
    failed = of(chain, Kind.HANDLE)[-1]
    assert failed.fields()["status"] == "trap"
    # The traceback's lines are log records of the failing call: just before its handle record.
    before = [r.fields()["message"] for r in chain[:failed.seq] if r.kind is Kind.LOG][-8:]
    assert "stderr: Traceback (most recent call last):" in before
    assert "stderr: ValueError: boom went the agent" in before
    assert "stdout: handling boom" in logs(theater, "tracer_py")
    assert all(len(line.encode()) <= 4096 for line in logs(theater, "tracer_py"))


def _exercise_library(theater: Theater, c: Client, me: str, other: str) -> None:
    assert json.loads(c.call(me, b"note:first") or b"") == {"notes": 1}
    assert c.call(me, b'{"kind": "note", "ignored": true}') is not None  # a JSON message: data is the object
    assert c.call(me, b"read:note:0") == b"first"
    assert c.call(me, b"read:nothing") == b"(none)"
    with pytest.raises(ClientError) as exc:
        c.call(me, b"refuse")
    assert exc.value.code == "guest-error" and "refused on purpose" in str(exc.value)
    with pytest.raises(ClientError) as exc:
        c.call(me, b"crash")
    assert exc.value.code == "guest-error"  # an unexpected exception: a guest error, the instance discarded
    with pytest.raises(ClientError) as exc:
        c.call(me, b"unknown-kind")
    assert exc.value.code == "guest-error" and "no handler for messages of kind" in str(exc.value)
    tell = json.dumps({"kind": "tell", "to": other, "text": f"hello from {me}"}).encode()
    assert c.call(me, tell) == b"sent"
    asked = json.dumps({"kind": "ask", "to": other}).encode()
    assert json.loads(c.call(me, asked) or b"") == [f"hello from {me}"]


def test_the_python_guest_library(theater: Theater, tmp_path: Path) -> None:
    py = built("service_py", tmp_path)
    with theater.client(timeout=300) as c:
        c.spawn(py)
        c.spawn(built_copy(py, tmp_path, "peer_py"))
        _exercise_library(theater, c, "service_py", "peer_py")
    lines = logs(theater, "service_py")
    assert any("Traceback" in line and "KeyError" in line for line in lines)  # the unexpected exception, logged
    assert any(line.startswith("heard 'hello from service_py'") for line in logs(theater, "peer_py"))


@needs_node
def test_the_javascript_guest_library_and_a_conversation_across_languages(theater: Theater, tmp_path: Path) -> None:
    js, py = built("service_js", tmp_path), built("service_py", tmp_path)
    with theater.client(timeout=300) as c:
        c.spawn(js)
        c.spawn(py)
        _exercise_library(theater, c, "service_js", "service_py")  # JavaScript talks to Python
        tell = json.dumps({"kind": "tell", "to": "service_js", "text": "and back"}).encode()
        assert c.call("service_py", tell) == b"sent"
        assert json.loads(c.call("service_js", b"heard") or b"") == ["and back"]
    lines = logs(theater, "service_js")
    assert any("TypeError" in line for line in lines)  # the unexpected exception's message and stack, logged


def built_copy(manifest: Path, into: Path, name: str) -> Path:
    """Another agent from the same built project, under ``name``."""
    text = manifest.read_text().replace(f'name = "{manifest.stem}"', f'name = "{name}"')
    copy = manifest.parent / f"{name}.toml"
    copy.write_text(text)
    return copy


def test_a_stopped_guest_is_stopped(theater: Theater, tmp_path: Path) -> None:
    """A guest built here stops and starts as any agent (its worker's WASI streams hold no resource open)."""
    manifest = built("tracer_py", tmp_path)
    with theater.client(timeout=300) as c:
        c.spawn(manifest)
        c.stop("tracer_py")
        wait_status(c, "tracer_py", "stopped")
        c.restart("tracer_py")
        assert c.call("tracer_py", b"again") == b"ok"
