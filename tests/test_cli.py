"""The ``theater`` command against a real supervisor: output formats, exit codes and error messages."""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import itertools
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import zmq
from conftest import COMPONENTS, needs_node

from theater import wire
from theater.client import ClientError
from theater.control import EVENTS_REPLY_BYTES

if TYPE_CHECKING:
    from conftest import Theater

VENV_THEATER = Path(sys.executable).parent / "theater"
COMMAND = [str(VENV_THEATER)] if VENV_THEATER.exists() else [sys.executable, "-m", "supervisor"]
CLI_TIMEOUT_S = 60


def cli(home: Path, *args: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run ``theater --home HOME ARGS...`` with a deadline; stdin is closed."""
    return subprocess.run([*COMMAND, "--home", str(home), *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def ok(home: Path, *args: str) -> str:
    """Run a command that must succeed; return its stdout."""
    proc = cli(home, *args)
    assert proc.returncode == 0, f"theater {' '.join(args)} exited {proc.returncode}: {proc.stderr}"
    return proc.stdout


def spawn(t: Theater, name: str, component: str) -> str:
    """Spawn tests/components/<component> as ``name``; return the id the CLI printed."""
    return ok(t.home.root, "spawn", str(t.manifest(name, component))).strip()


def test_spawn_prints_id_and_json(theater: Theater) -> None:
    """spawn prints the new agent's UUID; with --json it prints an object whose "id" is that UUID."""
    text_id = spawn(theater, "counter", "counter.wat")
    assert str(uuid.UUID(text_id)) == text_id
    out = ok(theater.home.root, "spawn", "--json", str(theater.manifest("echo", "echo.wat")))
    info = json.loads(out)
    assert str(uuid.UUID(info["id"])) == info["id"] != text_id
    assert info["name"] == "echo"
    top_level = json.loads(ok(theater.home.root, "--json", "spawn", str(theater.manifest("echo2", "echo.wat"))))
    assert uuid.UUID(top_level["id"])


def test_call_prints_the_reply(theater: Theater) -> None:
    """call prints the agent's reply: counter counts from its committed state, echo echoes."""
    spawn(theater, "counter", "counter.wat")
    spawn(theater, "echo", "echo.wat")
    assert ok(theater.home.root, "call", "counter", "tick") == "1\n"
    assert ok(theater.home.root, "call", "counter", "tick") == "2\n"
    assert ok(theater.home.root, "call", "echo", "hello, théâtre") == "hello, théâtre\n"
    data = json.loads(ok(theater.home.root, "call", "--json", "echo", "abc"))
    assert data == {"reply": "abc", "reply_hex": b"abc".hex()}


def test_call_by_id_and_send(theater: Theater) -> None:
    """An agent can be addressed by id; send queues a message whose effect the next call sees."""
    agent_id = spawn(theater, "counter", "counter.wat")
    assert json.loads(ok(theater.home.root, "send", "--json", agent_id, "x"))["queued"] >= 0
    assert ok(theater.home.root, "call", agent_id, "x") == "2\n"


def test_ps_json_is_a_list_of_agents(theater: Theater) -> None:
    """ps --json prints a JSON list with one entry per agent, carrying its id, name and status."""
    assert json.loads(ok(theater.home.root, "ps", "--json")) == []
    ids = {spawn(theater, "counter", "counter.wat"): "counter", spawn(theater, "echo", "echo.wat"): "echo"}
    agents = json.loads(ok(theater.home.root, "ps", "--json"))
    assert isinstance(agents, list)
    assert {a["id"]: a["name"] for a in agents} == ids
    assert {a["status"] for a in agents} == {"running"}
    table = ok(theater.home.root, "ps")
    assert table.splitlines()[0].split()[:3] == ["NAME", "ID", "STATUS"]
    assert all(agent_id in table for agent_id in ids)


def test_events_json_one_object_per_line_with_increasing_seq(theater: Theater) -> None:
    """events NAME --json prints one JSON object per line, seq 0, 1, 2... starting with genesis then init."""
    agent_id = spawn(theater, "counter", "counter.wat")
    for _ in range(2):
        ok(theater.home.root, "call", "counter", "x")
    lines = ok(theater.home.root, "events", "counter", "--json").splitlines()
    events = [json.loads(line) for line in lines]
    assert all(isinstance(e, dict) for e in events)
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert [e["kind"] for e in events[:2]] == ["genesis", "init"]
    # each counter handle logs once and reads the clock once before its handle record
    assert [e["kind"] for e in events[2:]] == ["log", "host-call", "handle"] * 2
    assert {e["agent_id"] for e in events} == {agent_id}
    for before, after in itertools.pairwise(events):
        assert after["prev_hash"] == before["hash"]
    assert events[-1]["fields"]["reply"] == b"2".hex()
    text = ok(theater.home.root, "events", agent_id).splitlines()
    assert [line.split()[0] for line in text] == [f"#{e['seq']}" for e in events]


def test_verify_ok_then_broken_after_store_corruption(theater: Theater) -> None:
    """verify prints ok and exits 0; after a record's raw bytes are altered (once down) it prints BROKEN and exits 1."""
    home = theater.home.root
    spawn(theater, "counter", "counter.wat")
    spawn(theater, "echo", "echo.wat")
    ok(home, "call", "counter", "x")
    ok(home, "call", "echo", "y")
    proc = cli(home, "verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(line.split()[0] == "ok" for line in lines)
    assert {line.split()[1] for line in lines} == {"counter", "echo"}

    ok(home, "down")
    assert theater.proc is not None
    theater.proc.wait(timeout=30)

    db = sqlite3.connect(theater.home.store)
    try:
        (agent_id,) = db.execute("SELECT id FROM agents WHERE name='counter'").fetchone()
        (raw,) = db.execute("SELECT raw FROM records WHERE agent_id=? AND seq=2", (agent_id,)).fetchone()
        flipped = bytearray(raw)
        assert raw[2] == 2  # a covered log: the handle after it signs its hash
        flipped[-1] ^= 0x01  # its last payload byte (the truncated flag): still parses, no longer links
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("UPDATE records SET raw=? WHERE agent_id=? AND seq=2", (bytes(flipped), agent_id))
        db.execute("DROP TRIGGER records_no_update")
        db.execute("UPDATE records SET raw=? WHERE agent_id=? AND seq=2", (bytes(flipped), agent_id))
        db.commit()
    finally:
        db.close()

    proc = cli(home, "verify")
    assert proc.returncode == 1
    broken = [line for line in proc.stdout.splitlines() if line.startswith("BROKEN")]
    assert len(broken) == 1 and broken[0].split()[1] == "counter"
    assert "record 3: previous-hash does not match the chain head" in broken[0]
    assert any(line.split()[:2] == ["ok", "echo"] for line in proc.stdout.splitlines())
    reports = json.loads(ok_or_fail(home, "verify", "--json"))
    assert {r["name"]: r["ok"] for r in reports} == {"counter": False, "echo": True}
    assert cli(home, "verify", "echo").returncode == 0
    single = cli(home, "verify", "counter")
    assert single.returncode == 1 and "BROKEN" in single.stdout


def ok_or_fail(home: Path, *args: str) -> str:
    """Run a command that may exit 0 or 1 (verify) but must not fail otherwise; return stdout."""
    proc = cli(home, *args)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.stdout


def test_verify_unknown_agent_fails(theater: Theater) -> None:
    """verify NAME for an agent not in the store exits 1 and says so on stderr."""
    spawn(theater, "echo", "echo.wat")
    proc = cli(theater.home.root, "verify", "nobody")
    assert proc.returncode == 1
    assert "no agent or supervisor node named or with id 'nobody'" in proc.stderr


@pytest.mark.parametrize(("extra", "fragments"), [
    ({"limits": {"memory_bytes": 134217728}}, ["limits.memory_bytes", "ceiling 67108864"]),
    ({"colour": "blue"}, ["unknown key colour"]),
    ({"restart": {"intensity": "x"}}, ["restart.intensity", "must be an int"]),
])
def test_spawn_bad_manifest_fails_naming_the_key(theater: Theater, extra: dict[str, object], fragments: list[str]) -> None:
    """spawn with an invalid manifest exits 1 with a stderr message naming the file and the key; nothing is spawned."""
    path = theater.manifest("bad", "echo.wat", **extra)
    proc = cli(theater.home.root, "spawn", str(path))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert str(path.resolve()) in proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr
    assert json.loads(ok(theater.home.root, "ps", "--json")) == []


def test_spawn_missing_manifest_fails(theater: Theater) -> None:
    """spawn of a manifest path that does not exist exits 1 saying there is no such file."""
    proc = cli(theater.home.root, "spawn", str(theater.dir / "absent.toml"))
    assert proc.returncode == 1 and "no such file" in proc.stderr


def test_call_unknown_agent_fails(theater: Theater) -> None:
    """call to an agent that does not exist exits 1 with "no agent" on stderr."""
    proc = cli(theater.home.root, "call", "ghost", "hi")
    assert proc.returncode == 1
    assert "no agent" in proc.stderr and "ghost" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("args", [["ps"], ["call", "x", "y"], ["send", "x", "y"], ["stop", "x"], ["down"],
                                  ["spawn", "/nonexistent/m.toml"]], ids=lambda a: a[0])
def test_commands_without_a_supervisor_fail(args: list[str], tmp_path: Path) -> None:
    """Commands that need a supervisor exit 1 with "no supervisor is running" when none is up at the home."""
    home = tmp_path / "h"
    proc = cli(home, *args)
    assert proc.returncode == 1
    assert "no supervisor is running" in proc.stderr
    assert proc.stdout == ""


def test_supervisor_survives_a_deeply_nested_control_request(theater: Theater) -> None:
    """A malformed (deeply nested JSON) control request is answered with an error and the supervisor stays up."""
    assert theater.proc is not None
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(theater.home.control_endpoint)
        sock.send_multipart([wire.header(wire.ClientType.REQUEST), b"[" * 100_000])
        deadline = time.monotonic() + 10.0
        answered = 0
        while not answered and time.monotonic() < deadline and theater.proc.poll() is None:
            answered = sock.poll(100)
    finally:
        sock.close(0)
    assert answered, f"no reply; supervisor exit status {theater.proc.poll()}"
    assert json.loads(ok(theater.home.root, "ps", "--json")) == []


def test_events_and_verify_go_through_the_client_and_match_the_store(theater: Theater) -> None:
    """Client.events gives the same records as the store holds (agents and tree nodes alike), across
    several replies; Client.verify gives what the offline verifier gives; with no supervisor, `events`
    reads the store itself."""
    from supervisor._audit import chain_records, verify_home

    spawn(theater, "echo", "echo.wat")
    with theater.client() as c:
        for i in range(5):
            c.call("echo", f"m{i}".encode())
        for i in range(6):  # ~2 MB records (message and reply): the chain takes more than one reply of 8 MiB
            c.call("echo", bytes([65 + i]) * 1_000_000)
        got = c.events("echo")
        assert sum(len(r.raw) for r in got) > EVENTS_REPLY_BYTES
        assert [r.raw for r in got] == [r.raw for r in chain_records(theater.home, "echo")]
        assert [r.seq for r in got] == list(range(got[-1].seq + 1))
        assert [r.seq for r in c.events("echo", after=3)] == list(range(4, got[-1].seq + 1))
        assert c.verify() == [r.as_dict() for r in verify_home(theater.home)]
        with pytest.raises(ClientError) as missing:
            c.events("nobody")
        assert missing.value.code == "not-found"
    online = cli(theater.home.root, "events", "echo", "--json")
    theater.stop()
    offline = cli(theater.home.root, "events", "echo", "--json")
    assert online.returncode == offline.returncode == 0, (online.stderr, offline.stderr)
    assert online.stdout.count("\n") == len(got)
    assert offline.stdout.startswith(online.stdout)  # the same records, then the exit `down` wrote
    assert json.loads(offline.stdout.splitlines()[-1])["kind"] == "exit"


def test_a_manifest_that_is_a_fifo_or_a_device_is_refused_at_once_and_nothing_stalls(theater: Theater) -> None:
    """spawn of a FIFO (whose open would block) or of /dev/zero (which never ends) is a config error answered
    at once; the supervisor serves other agents all along and stops cleanly."""
    import os

    spawn(theater, "echo", "echo.wat")
    fifo = theater.dir / "fifo.toml"
    os.mkfifo(fifo)
    zero = theater.dir / "zero.toml"
    zero.symlink_to("/dev/zero")
    for path, what in ((fifo, "is a FIFO, not a regular file"), (zero, "is a character device, not a regular file")):
        proc = cli(theater.home.root, "spawn", str(path))
        assert proc.returncode == 1 and what in proc.stderr, proc.stderr
        with theater.client() as c:
            assert c.call("echo", b"still here") == b"still here"
    down = cli(theater.home.root, "down")
    assert down.returncode == 0, down.stderr


# --- errors a new user meets: said in their terms, with what to do -------------------------------------


def test_errors_say_what_was_wrong_and_what_to_do(theater: Theater, tmp_path: Path) -> None:
    home = theater.home.root
    ok(home, "spawn", str(theater.manifest("counter", "counter.wat")))
    nofile = cli(home, "call", "counter", "@nofile")
    assert nofile.returncode == 1 and "cannot read the message from nofile: No such file or directory" in nofile.stderr
    assert "Errno" not in nofile.stderr
    assert ok(home, "call", "counter", "@@at").strip() == "1"  # @@ sends a message starting with @
    a_file = tmp_path / "plain-file"
    a_file.write_text("x")
    wrong_home = cli(a_file, "ps")
    assert wrong_home.returncode == 2 and f"--home {a_file} is a file, not a directory" in wrong_home.stderr
    assert "Errno" not in wrong_home.stderr
    elsewhere = tmp_path / "no-supervisor-here"
    absent = cli(elsewhere, "ps")  # the hint starts a supervisor at that home, not the default one
    assert absent.returncode == 1 and f"no supervisor is running at {elsewhere}" in absent.stderr
    assert f"hint: start it with `theater --home {elsewhere} up --detach`" in absent.stderr, absent.stderr
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 2000 + "]" * 2000 + "\n")
    nested = cli(home, "spawn", str(deep))  # the progress line's name read too: one error, no traceback
    assert nested.returncode == 1 and "nested too deeply" in nested.stderr and "Traceback" not in nested.stderr
    component = cli(home, "spawn", str(Path(__file__).parent / "components" / "counter.wat"))
    assert component.returncode == 1 and "takes a manifest (.toml) that names the component" in component.stderr
    ok(home, "stop", "counter")
    stopped = cli(home, "call", "counter", "x")
    assert stopped.returncode == 1 and "hint: start it again with `theater restart counter`" in stopped.stderr


@pytest.mark.parametrize("args", [["spawn"], ["bogus"], ["events"], ["call", "x", "y", "--frob"],
                                  ["call", "x", "y", "--timeout", "nan"],
                                  ["call", "x", "y", "--timeout", "inf"], ["call", "x", "y", "--timeout", "0"],
                                  ["spawn", "m.toml", "--timeout", "-1"], ["top", "--interval", "1e9"]],
                         ids=lambda a: "-".join(a))
def test_usage_errors_are_one_line_or_json_and_exit_2(args: list[str], tmp_path: Path) -> None:
    """argparse's own refusals read as every other error does (cli.md section 1): a NaN or infinite timeout
    used to end in a traceback, and a usage error printed a usage block that --json did not change."""
    home = tmp_path / "h"
    text = cli(home, *args)
    assert text.returncode == 2 and text.stdout == "" and "Traceback" not in text.stderr, text.stderr
    first, hint = text.stderr.splitlines()
    assert first.startswith("theater: ") and hint.startswith("  hint: `theater") and "--help` shows its usage" in hint
    machine = cli(home, "--json", *args)
    assert machine.returncode == 2 and machine.stderr == ""
    assert json.loads(machine.stdout)["error"]["code"] == "usage"


def test_no_answer_in_time_is_a_timeout_not_a_missing_supervisor(theater: Theater) -> None:
    """A supervisor that is there but does not answer in time (here: stopped with SIGSTOP) is reported as a
    timeout, with a hint to wait longer, not as "start it with `theater up`"."""
    import signal

    assert theater.proc is not None
    manifest = str(theater.manifest("counter", "counter.wat"))
    os.kill(theater.proc.pid, signal.SIGSTOP)
    try:
        text = cli(theater.home.root, "spawn", manifest, "--timeout", "0.05")
        machine = cli(theater.home.root, "--json", "spawn", manifest, "--timeout", "0.05")
    finally:
        os.kill(theater.proc.pid, signal.SIGCONT)
    assert text.returncode == 1 and "theater: timeout: no answer from the supervisor" in text.stderr, text.stderr
    assert "give it longer with --timeout" in text.stderr and "theater up" not in text.stderr
    assert json.loads(machine.stdout)["error"]["code"] == "timeout"


def test_a_record_s_line_cannot_be_split_or_drive_the_terminal() -> None:
    """What an agent writes (a log line, the detail of its end) is shown on its record's one line: a newline
    followed by a record of its own making, escape sequences and carriage returns are written as escapes."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from theater.records import Kind, sign_record
    from theater.render import one_line

    forged = "all good\n#7     12:00:00.000 handle     message='transfer' reply='approved' status=ok"
    key, zero = Ed25519PrivateKey.generate(), bytes(32)
    common = {"agent_id": bytes(16), "time_ns": 1, "prev_hash": zero, "state_hash": zero}
    log = sign_record(key, kind=Kind.LOG, seq=3, fields={"level": "info", "message": forged, "truncated": 0}, **common)
    end = sign_record(key, kind=Kind.EXIT, seq=4, fields={"incarnation": 1, "reason": "normal",
                                                          "detail": "bye\r\x1b[31mRED\u202e"}, **common)
    for record, shown in ((log, "[info] all good\\n#7     12:00:00.000 handle"), (end, "bye\\r\\x1b[31mRED\\u202e")):
        line = one_line(record)
        assert line.isprintable() and shown in line, line


def test_json_errors_are_json_on_stdout(theater: Theater) -> None:
    proc = cli(theater.home.root, "call", "nosuch", "x", "--json")
    assert proc.returncode == 1
    error = json.loads(proc.stdout)["error"]
    assert error["code"] == "not-found" and "nosuch" in error["message"] and error["hint"]


def test_a_closed_pipe_ends_quietly(theater: Theater) -> None:
    home = theater.home.root
    ok(home, "spawn", str(theater.manifest("counter", "counter.wat")))
    with theater.client() as c:  # records enough to fill the pipe's first read (a process a call took 5 s)
        for _ in range(20):
            c.call("counter", b"tick")
    proc = subprocess.run(f"{sys.executable} -m supervisor --home {home} events counter --json | head -1",
                          shell=True, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)
    assert json.loads(proc.stdout)["seq"] == 0
    assert "Broken pipe" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_misspelled_key_is_named_with_the_nearest_known_one(theater: Theater, tmp_path: Path) -> None:
    manifest = tmp_path / "typo.toml"
    manifest.write_text('name = "typo"\ncomponnet = "counter.wat"\n')
    proc = cli(theater.home.root, "spawn", str(manifest))
    assert proc.returncode == 1 and "unknown key componnet (did you mean component?)" in proc.stderr, proc.stderr
    manifest.write_text(f'name = "typo"\ncomponent = "{Path(__file__).parent / "components" / "counter.wat"}"\n'
                        "[limits]\nmemory_byte = 65536\n")
    proc = cli(theater.home.root, "spawn", str(manifest))
    assert "unknown key limits.memory_byte (did you mean limits.memory_bytes?)" in proc.stderr, proc.stderr
    manifest.write_text(f'name = "typo"\ncomponent = "{Path(__file__).parent / "components" / "counter.wat"}"\n'
                        'policy = "defualt"\n')
    proc = cli(theater.home.root, "spawn", str(manifest))
    assert f"{manifest}: policy: no policy named 'defualt'" in proc.stderr and "(did you mean 'default'?)" in proc.stderr


# --- theater rm: a way out for a failed or unwanted agent -----------------------------------------------


def test_rm_frees_the_name_of_a_failed_spawn_and_its_history_stays_verifiable(theater: Theater, tmp_path: Path) -> None:
    """The new user's story: a spawn fails, the fixed manifest cannot take the name, `rm` (or `spawn
    --replace`) frees it; the old chain ends with a signed removed record and still verifies."""
    home = theater.home.root
    broken = theater.manifest("svc", "missing_export.wat")
    failed = cli(home, "spawn", str(broken))
    assert failed.returncode == 1 and "spawn-failed" in failed.stderr and "--replace` (the failed agent" in failed.stderr
    fixed = theater.manifest("svc", "counter.wat")
    taken = cli(home, "spawn", str(fixed))
    assert taken.returncode == 1 and "theater rm svc removes a stopped or failed one" in taken.stderr
    old = json.loads(ok(home, "ps", "--json"))[0]["id"]
    log = theater.home.logs / "svc.log"
    assert log.exists()
    removed = json.loads(ok(home, "rm", "svc", "--json"))
    assert removed["removed"] == "svc" and removed["id"] == old
    assert not log.exists()  # its workers' log goes with it: names that come and go leave no files behind
    new = ok(home, "spawn", str(fixed)).strip()
    assert new != old and ok(home, "call", "svc", "tick").strip() == "1"
    reports = {r["name"]: r for r in json.loads(ok(home, "verify", "--json"))}
    assert reports["svc"]["ok"] and reports["svc (removed)"]["ok"] and reports["svc (removed)"]["id"] == old
    events = [json.loads(line) for line in ok(home, "events", old, "--json").splitlines()]
    assert events[-1]["kind"] == "removed" and events[-1]["signer"] == "supervisor"
    [alone] = json.loads(ok(home, "verify", old, "--json"))  # a removed chain by its id, on its own
    assert alone["ok"] and alone["name"] == "svc (removed)"
    # spawn --replace does both in one step, for a stopped agent too
    ok(home, "stop", "svc")
    again = ok(home, "spawn", str(fixed), "--replace").strip()
    assert again not in (old, new) and ok(home, "call", "svc", "tick").strip() == "1"  # a new agent, a new state


def test_restart_says_when_the_component_file_changed_since_the_spawn(theater: Theater, tmp_path: Path) -> None:
    """A rebuilt agent restarted runs the component it was spawned with (its genesis names it): restart says so,
    and how to run the new one."""
    home = theater.home.root
    component = tmp_path / "echo.wat"
    shutil.copyfile(COMPONENTS / "echo.wat", component)
    manifest = tmp_path / "e.toml"
    manifest.write_text(f'name = "e"\ncomponent = "{component}"\n')
    ok(home, "spawn", str(manifest))
    same = cli(home, "restart", "e")
    assert same.returncode == 0 and "note:" not in same.stderr, same.stderr
    component.write_text(component.read_text() + "\n;; rebuilt\n")
    changed = cli(home, "restart", "e")
    assert changed.returncode == 0 and changed.stdout.strip() == "e running"
    assert f"note: {component} has changed since e was spawned; it runs the build it was spawned with" \
        in changed.stderr and "`theater stop e`, then `theater spawn MANIFEST --replace`" in changed.stderr
    assert ok(home, "call", "e", "still").strip() == "still"


def test_rm_refuses_a_running_agent_and_a_tree_member(theater: Theater) -> None:
    """A tree can be neither removed nor replaced: every refusal, and the hints, say so and what is possible
    (never `theater rm`, which is always refused for a tree's root and members)."""
    home = theater.home.root
    ok(home, "spawn", str(theater.manifest("live", "echo.wat")))
    running = cli(home, "rm", "live")
    assert running.returncode == 1 and "agent live is running: stop it first (theater stop live)" in running.stderr
    again = cli(home, "spawn", str(theater.manifest("live", "echo.wat")))  # taken by a running agent: stop it first
    assert again.returncode == 1 and "running); stop it first (theater stop live); then theater rm live" in again.stderr
    assert cli(home, "rm", "nosuch").returncode == 1
    tree = theater.dir / "t.toml"
    tree.write_text(f'name = "t"\nintensity = 0\nchildren = [{{ name = "m", component = "{COMPONENTS}/trap_on.wat" }}]\n')
    ok(home, "spawn", str(tree))
    assert cli(home, "call", "m", "trap").returncode == 1  # intensity 0: the tree gives up
    kept = "a tree and its members cannot be removed; they stay in the home and their names stay taken " \
           "(theater stop t stops the tree, theater restart t starts it again)"
    for name, what in (("t", "the root"), ("m", "an agent")):
        out = cli(home, "rm", name)
        assert out.returncode == 1 and f"refused: {name} is {what} of the tree t: {kept}" in out.stderr, out.stderr
    taken = "in the tree t: a tree and its members can be neither removed nor replaced, and their names stay taken; " \
            "give this one another name"
    for args in ((str(tree),), (str(tree), "--replace"), (str(theater.manifest("m", "echo.wat")), "--replace")):
        out = cli(home, "spawn", *args)
        assert out.returncode == 1 and taken in out.stderr and "theater rm" not in out.stderr, out.stderr
    refused = cli(home, "send", "m", "x")
    assert refused.returncode == 1 and "refused: agent m is failed, in the tree t" in refused.stderr
    assert "theater restart m`" in refused.stderr and "theater rm" not in refused.stderr, refused.stderr
    assert json.loads(ok(home, "verify", "--json"))[0]["ok"]


def test_a_removed_chain_takes_no_more_records(theater: Theater) -> None:
    """The chain rule: nothing follows a removed record, whoever signs it."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from theater.chain import ChainVerifier
    from theater.errors import RecordError
    from theater.records import ZERO_HASH, Kind, sha256, sign_record

    key = Ed25519PrivateKey.generate()
    agent = uuid.uuid4().bytes
    verifier = ChainVerifier(key.public_key())
    worker = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    records = [("genesis", Kind.GENESIS, {"name": "a", "component_sha256": bytes(32), "config": "{}",
                                          "worker_key": worker, "confinement": "{}"}),
               ("exit", Kind.EXIT, {"incarnation": 0, "reason": "stopped", "detail": ""}),
               ("removed", Kind.REMOVED, {"reason": "removed by the operator"}),
               ("after", Kind.STATE_RESET, {"reason": "x"})]
    head = ZERO_HASH
    for i, (_, kind, fields) in enumerate(records):
        record = sign_record(key, kind=kind, agent_id=agent, seq=i, time_ns=1, prev_hash=head, state_hash=sha256(b""),
                             fields=fields)
        if i < 3:
            verifier.advance(record)
            head = record.hash
        else:
            with pytest.raises(RecordError, match="the chain ended with its removed record"):
                verifier.advance(record)


def test_a_fresh_home_says_there_are_no_agents_yet(tmp_path: Path) -> None:
    home = tmp_path / "fresh"
    verified = cli(home, "verify")
    assert verified.returncode == 0 and "no agents yet" in verified.stdout
    events = cli(home, "events", "x")
    assert events.returncode == 1 and "no agents yet" in events.stderr and "hint: start a supervisor" in events.stderr
    assert "Errno" not in events.stderr and "missing" not in events.stderr


def test_down_counts_the_agents_it_stopped(theater: Theater) -> None:
    home = theater.home.root
    ok(home, "spawn", str(theater.manifest("on", "echo.wat")))
    ok(home, "spawn", str(theater.manifest("off", "echo.wat")))
    ok(home, "stop", "off")
    assert json.loads(ok(home, "down", "--json")) == {"stopped": 1}


def test_help_groups_commands_and_every_command_has_an_example(tmp_path: Path) -> None:
    from supervisor.cli import EXAMPLES, GROUPS, build_parser

    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subcommands.choices) == set(EXAMPLES)
    grouped = {name.strip() for line in GROUPS.splitlines()[1:5] for name in re.split(r"\s{2,}", line.strip())[1].split(",")}
    assert grouped == set(EXAMPLES)  # every command is in exactly the groups the help lists
    for name, command in subcommands.choices.items():
        assert command.description is None or command.description
        assert any(a.help for a in subcommands._choices_actions if a.dest == name), name  # a one-line description
        for action in command._actions:
            if not action.option_strings:  # a positional
                assert action.help, (name, action.dest)
    top = cli(tmp_path, "--help")
    assert "inspection" in top.stdout and "theater call counter hello" in top.stdout
    assert "example:" in cli(tmp_path, "replay", "--help").stdout


def test_logs_have_levels_and_times_and_theater_logs_shows_them(tmp_path: Path) -> None:
    home = tmp_path / "h"
    missing = cli(home, "logs")
    assert missing.returncode == 1 and "no supervisor log at" in missing.stderr and "up --detach" in missing.stderr
    assert ok(home, "up", "--detach")
    ok(home, "down")
    lines = ok(home, "logs").splitlines()
    line = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR) (supervisor|zygote): ")
    assert lines and all(line.match(x) for x in lines), lines
    assert any(" INFO supervisor: up at " in x for x in lines)
    ok(home, "up", "--detach", "--log-level", "warning")
    second = ok(home, "up", "--detach")  # one runs already: no second process, nothing in the log
    assert second.startswith("supervisor up (pid ")
    other = cli(home, "up", "--detach", "--metrics", "127.0.0.1:0")  # options it would not take: refused
    assert other.returncode == 1 and "already running" in other.stderr and "--metrics would change nothing" \
        in other.stderr, other.stderr
    ok(home, "down")
    assert ok(home, "logs").splitlines() == lines  # nothing below a warning happened, nor an "already running"


@pytest.mark.parametrize("lang", ["wat", "python", pytest.param("js", marks=needs_node)])
def test_a_new_project_builds_and_answers_a_call(theater: Theater, tmp_path: Path, lang: str) -> None:
    """`theater new`, `theater build` (skipped the second time), `theater spawn`, `theater call`: the README's
    lines, through the real CLI."""
    home = theater.home.root
    created = ok(home, "new", "greeter", "--lang", lang, "--dir", str(tmp_path))
    project = tmp_path / "greeter"
    assert f"created {project}" in created and (project / "greeter.toml").exists()
    again = cli(home, "new", "greeter", "--dir", str(tmp_path))
    assert again.returncode == 1 and "exists already" in again.stderr
    bad = cli(home, "new", "Bad.Name", "--dir", str(tmp_path))  # a value of the wrong form: usage, exit 2
    assert bad.returncode == 2 and "'Bad.Name' is not an agent name" in bad.stderr, bad.stderr
    directory = cli(home, "spawn", str(project))  # the project, not its manifest: the hint names the manifest
    assert directory.returncode == 1 and f"hint: give the project's manifest: `theater spawn {project}/greeter.toml`" \
        in directory.stderr, directory.stderr
    if lang != "wat":  # spawned before it was built: the hint says to build it
        unbuilt = cli(home, "spawn", str(project / "greeter.toml"))
        assert unbuilt.returncode == 1 and f"hint: build it first: `theater build {project}`" in unbuilt.stderr
    built = cli(home, "build", str(project / "greeter.toml"), timeout=600)  # the manifest names the project too
    assert built.returncode == 0, built.stderr
    if lang != "wat":  # built now, or taken from the cache of builds of exactly these sources
        assert "built greeter.wasm" in built.stderr or "from the build cache" in built.stderr, built.stderr
        assert "up to date" in cli(home, "build", str(project)).stderr
    else:
        assert "nothing to build" in built.stderr
    env = {**os.environ, "THEATER_PROGRESS_AFTER_S": "0"}  # show progress from the start, not after a second
    proc = subprocess.run([*COMMAND, "--home", str(home), "spawn", str(project / "greeter.toml"), "--timeout", "300"],
                          capture_output=True, text=True, timeout=600, check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    if lang != "wat":  # its first spawn compiles a 12-18 MB component: the progress says what is going on
        lines = proc.stderr.splitlines()
        assert lines[0].startswith("spawn greeter: ") and "s)" in lines[0], lines
        assert lines[-1].startswith("spawn greeter: done after "), lines
    reply = ok(home, "call", "greeter", "hello").strip()
    assert reply == ("hello" if lang == "wat" else "1: hello")
    if lang != "wat":  # the template's guest-library handlers
        assert ok(home, "call", "greeter", "count").strip() == "1"
        failed = cli(home, "call", "greeter", "fail")
        assert failed.returncode == 1 and "guest-error: asked to fail" in failed.stderr


def test_a_killed_supervisor_is_reported_at_once_even_before_it_is_reaped(theater: Theater) -> None:
    """SIGKILL leaves a zombie (the test has not waited for it yet) and a socket file no one listens on:
    the client says so at once instead of waiting out its timeout."""
    import signal

    assert theater.proc is not None
    os.kill(theater.proc.pid, signal.SIGKILL)
    wait_for_zombie = [theater.proc.pid]
    try:
        import psutil
        from conftest import wait_until
        wait_until(lambda: psutil.Process(wait_for_zombie[0]).status() == psutil.STATUS_ZOMBIE, what="the zombie")
        proc = cli(theater.home.root, "ps", timeout=10)  # far below the client's own 30 s timeout
        assert proc.returncode == 1 and "is not running (it ended without cleaning up)" in proc.stderr, proc.stderr
    finally:
        theater.proc.wait()


@pytest.mark.parametrize("lang", ["python", "js"])
def test_a_build_key_covers_sources_in_subdirectories_and_the_toolchain_s_version(tmp_path: Path, lang: str) -> None:
    """`build` is skipped, or taken from the build cache, only for the same inputs: a module imported from a
    subdirectory of the project (lib/util.py) was left out of the key, so editing it built nothing and the old
    component was served, as it was after an upgrade of componentize-py (its path was keyed, not its version)."""
    from supervisor._authoring import _componentize_py_version, _shipped, build_key, new_project

    project = new_project("keyed", lang, tmp_path)
    key = functools.partial(build_key, project, lang, _shipped("wit"), "agent", _shipped("guest") / lang)
    first = key()
    lib = project / "lib"
    lib.mkdir()
    (lib / "util.txt").write_text("one")
    second = key()
    (lib / "util.txt").write_text("two")
    assert len({first, second, key()}) == 3
    (project / "lib.txt").write_text("two")  # the same name and bytes elsewhere in the tree: another input
    assert key() not in (first, second)
    now = key()
    for written in (project / "keyed.wasm", project / ".theater-build", project / "__pycache__" / "x.pyc",
                    project / "node_modules" / "m" / "index.js"):
        written.parent.mkdir(parents=True, exist_ok=True)
        written.write_text("output, not input")
    (project / "keyed.toml").write_text((project / "keyed.toml").read_text() + "\n# a comment\n")
    assert key() == now  # what a build writes, packages, caches and the manifest (hashed as its world) are not
    if lang == "python":
        assert _componentize_py_version().endswith(f"componentize-py {importlib.metadata.version('componentize-py')}")


def test_build_refuses_capabilities_no_world_imports_exactly(theater: Theater, tmp_path: Path) -> None:
    """kv alone used to build against the world with messaging, kv and timers: a component whose imports its
    manifest does not grant, which no spawn can load. The build says what to list instead."""
    home = theater.home.root
    ok(home, "new", "kvd", "--dir", str(tmp_path))
    manifest = tmp_path / "kvd" / "kvd.toml"
    manifest.write_text(manifest.read_text().replace('["runtime"]', '["runtime", "kv"]'))
    proc = cli(home, "build", str(tmp_path / "kvd"))
    assert proc.returncode == 1, proc
    assert "no WIT world imports exactly kv: kv and timers come in the service-agent world" in proc.stderr
    assert "list all three" in proc.stderr and not (tmp_path / "kvd" / "kvd.wasm").exists()


def test_a_failed_build_shows_the_toolchain_s_report(theater: Theater, tmp_path: Path) -> None:
    home = theater.home.root
    ok(home, "new", "broken", "--dir", str(tmp_path))
    with open(tmp_path / "broken" / "app.py", "a") as f:
        f.write("\nthis is not python(\n")
    proc = cli(home, "build", str(tmp_path / "broken"), timeout=600)
    assert proc.returncode == 1
    assert "componentize-py failed" in proc.stderr and "SyntaxError" in proc.stderr and "app.py" in proc.stderr
    assert "Stack backtrace" not in proc.stderr


@needs_node
def test_a_failed_javascript_build_shows_the_toolchain_s_report(theater: Theater, tmp_path: Path) -> None:
    home = theater.home.root
    ok(home, "new", "broken", "--lang", "js", "--dir", str(tmp_path))
    with open(tmp_path / "broken" / "app.js", "a") as f:
        f.write("\nexport function (\n")
    proc = cli(home, "build", str(tmp_path / "broken"), timeout=600)
    assert proc.returncode == 1
    assert "esbuild failed" in proc.stderr and "app.js" in proc.stderr, proc.stderr
