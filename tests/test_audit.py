"""Tampering with a real store, as someone with file access to the home would, and what catches it.

Each test makes a real history (a supervisor, workers, a parent with a child), stops the supervisor,
edits the SQLite file directly (dropping the append-only triggers where it must), and checks that
`theater verify` names the problem, or that the next supervisor runs only what was signed.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import COMPONENTS, Theater, assert_verified, wait_running, wait_until

from theater.records import Record

CLI = [sys.executable, "-m", "supervisor"]


def verify(t: Theater) -> tuple[int, list[dict[str, Any]], str]:
    proc = subprocess.run([*CLI, "--home", str(t.home.root), "verify", "--json"], capture_output=True, text=True,
                          timeout=120, check=False)
    return proc.returncode, (json.loads(proc.stdout) if proc.stdout.strip() else []), proc.stderr


def broken(t: Theater) -> dict[str, str]:
    code, reports, err = verify(t)
    assert code == 1, (reports, err)
    return {r["name"]: r["problem"] for r in reports if not r["ok"]}


def edit(t: Theater, *statements: str, args: tuple[Any, ...] = ()) -> None:
    """Run SQL on the stopped supervisor's store, with the append-only triggers out of the way."""
    db = sqlite3.connect(t.home.store)
    db.execute("DROP TRIGGER IF EXISTS records_no_update")
    db.execute("DROP TRIGGER IF EXISTS records_no_delete")
    for sql in statements:
        db.execute(sql, args if "?" in sql else ())
    db.commit()
    db.close()


def test_a_restart_runs_the_signed_configuration_not_the_edited_row(theater: Theater) -> None:
    """The agents row of `counter` is pointed at echo.wat: the next supervisor still runs counter.wat (as its
    genesis signed), and verify names the row."""
    with theater.client() as c:
        c.spawn(theater.manifest("counter", "counter.wat"))
        assert c.call("counter", b"tick") == b"1"
    theater.stop()
    db = sqlite3.connect(theater.home.store)
    [(config,)] = db.execute("SELECT config FROM agents WHERE name='counter'").fetchall()
    doctored = json.loads(config)
    doctored["component_path"] = str(COMPONENTS / "echo.wat")
    doctored["component_sha256"] = hashlib.sha256((COMPONENTS / "echo.wat").read_bytes()).hexdigest()
    db.execute("UPDATE agents SET config=? WHERE name='counter'", (json.dumps(doctored),))
    db.commit()
    db.close()
    assert broken(theater) == {"counter": "the agents row's configuration differs from the one its genesis signed"}
    theater.start()
    with theater.client() as c:
        wait_running(c, "counter")
        assert c.call("counter", b"tick") == b"2"  # the counter, not an echo of "tick"
    assert "differs from the one its genesis signed; running the signed one" in (theater.dir / "supervisor.out").read_text()


def test_a_deleted_agent_row_leaves_records_verify_reports(theater: Theater) -> None:
    with theater.client() as c:
        c.spawn(theater.manifest("gone", "echo.wat"))
        c.spawn(theater.manifest("kept", "echo.wat"))
        c.call("gone", b"x")
    theater.stop()
    edit(theater, "DELETE FROM agents WHERE name='gone'")
    assert broken(theater) == {"?": "records of a chain that no agents or nodes row names"}


def test_the_copy_columns_must_match_the_signed_record(theater: Theater) -> None:
    with theater.client() as c:
        c.spawn(theater.manifest("e", "echo.wat"))
        c.call("e", b"x")
    theater.stop()
    edit(theater, "UPDATE records SET kind=7 WHERE seq=1")
    problem = broken(theater)["e"]
    assert problem == "record 1: the store's columns (seq, kind, time, hash) differ from the signed record", problem


def test_a_child_whose_exit_the_parent_was_told_of_must_still_hold_it(theater: Theater) -> None:
    """The parent's child-exit record names the child's exit record by hash: truncating the child's chain
    behind it (and fixing the child's row to match) is caught from the parent's side."""
    worker = {"name": "worker", "component": str(COMPONENTS / "trap_on.wat")}
    manifest = theater.manifest("parent", "parent.wat", policy="supervisor", capabilities=["runtime", "supervision"],
                                supervision={"templates": [worker]})
    with theater.client() as c:
        c.spawn(manifest)
        child = c.call("parent", b"spawn:worker:w")
        assert child is not None and not child.startswith(b"err:")
        wait_running(c, "parent.w")
        assert c.call("parent", b"stop:" + child) == b"ok"
        wait_until(lambda: b"=stopped" in (c.call("parent", b"state") or b""), what="the exit notification")
    theater.stop()
    assert_verified(theater)
    db = sqlite3.connect(theater.home.store)
    child_id = db.execute("SELECT id FROM agents WHERE name='parent.w'").fetchone()[0]
    [(last_seq,)] = db.execute("SELECT max(seq) FROM records WHERE agent_id=?", (child_id,)).fetchall()
    exit_seq = db.execute("SELECT max(seq) FROM records WHERE agent_id=? AND kind=7", (child_id,)).fetchone()[0]
    prev = db.execute("SELECT hash, raw FROM records WHERE agent_id=? AND seq=?", (child_id, exit_seq - 1)).fetchone()
    db.close()
    before = Record.parse(prev[1])
    edit(theater, "DELETE FROM records WHERE agent_id=? AND seq>=" + str(exit_seq), args=(child_id,))
    edit(theater, "UPDATE agents SET head_seq=?, head_hash=?, state_hash=? WHERE id=?",
         args=(exit_seq - 1, before.hash, before.state_hash, child_id))
    assert last_seq >= exit_seq
    problems = broken(theater)
    assert list(problems) == ["parent"], problems
    assert "(child-exit) names exit record" in problems["parent"] and "not in that child's chain" in problems["parent"]


def test_a_corrupt_store_is_a_located_error_not_a_traceback(theater: Theater) -> None:
    with theater.client() as c:
        c.spawn(theater.manifest("e", "echo.wat"))
    theater.stop()
    for suffix in ("-wal", "-shm"):
        Path(f"{theater.home.store}{suffix}").unlink(missing_ok=True)
    theater.home.store.write_bytes(b"this is not a database" * 100)
    code, _, err = verify(theater)
    assert code == 1
    assert f"{theater.home.store}: not a readable event store" in err and "Traceback" not in err, err
