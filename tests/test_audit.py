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

from conftest import COMPONENTS, Theater, assert_verified, fill_disk, wait_running, wait_until

from theater.records import Kind, Record

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
    db = sqlite3.connect(theater.home.store)
    raws = [Record.parse(raw) for (raw,) in db.execute(
        "SELECT raw FROM records WHERE agent_id=(SELECT id FROM agents WHERE name='counter') ORDER BY seq")]
    db.close()
    counter_hash = hashlib.sha256((COMPONENTS / "counter.wat").read_bytes()).digest()
    assert raws[0].fields()["component_sha256"] == counter_hash
    [key_record] = [r for r in raws if r.kind is Kind.WORKER_KEY]  # the new worker states what it runs
    assert key_record.fields()["component_sha256"] == counter_hash


def test_a_deleted_agent_row_leaves_records_verify_reports(theater: Theater) -> None:
    with theater.client() as c:
        c.spawn(theater.manifest("gone", "echo.wat"))
        c.spawn(theater.manifest("kept", "echo.wat"))
        c.call("gone", b"x")
    theater.stop()
    edit(theater, "DELETE FROM agents WHERE name='gone'")
    assert broken(theater) == {"?": "records of a chain that no agents or nodes row names"}


def test_verify_reads_a_chain_one_record_at_a_time(theater: Theater) -> None:
    """A chain is checked without holding it: verify (offline, or a client's verify in the supervisor) of a chain
    with no retention limit used to load every record of it at once, twice over (raw and parsed)."""
    import tracemalloc

    from supervisor._audit import verify_home

    with theater.client() as c:
        c.spawn(theater.manifest("chatty", "chatty.wat"))
        for _ in range(300):  # 11 records a call
            c.call("chatty", b"x")
    db = sqlite3.connect(f"file:{theater.home.store}?mode=ro", uri=True)
    try:
        count, size = db.execute("SELECT count(*), sum(length(raw)) FROM records").fetchone()
    finally:
        db.close()
    tracemalloc.start()
    try:
        reports = verify_home(theater.home, "chatty")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [r.ok for r in reports] == [True] and reports[0].records > 3000 and count > 3000
    assert peak < size / 4, (peak, size)  # the chain's own bytes alone were more than the whole peak may be


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
    code, answer, err = verify(theater)  # --json: the error is a JSON object on stdout
    assert code == 1 and "Traceback" not in err, err
    error = answer["error"]  # type: ignore[call-overload]
    assert error["code"] == "store" and error["message"].startswith(f"{theater.home.store}: not a readable event store")
    text = subprocess.run([*CLI, "--home", str(theater.home.root), "verify"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert text.returncode == 1 and f"{theater.home.store}: not a readable event store" in text.stderr


# --- checkpoints and a pinned key: what a home's writer cannot undo --------------------------------------


def cli(t: Theater, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CLI, "--home", str(t.home.root), *args], capture_output=True, text=True, timeout=120,
                          check=False)
    assert not check or proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc


def checkpointed(t: Theater, tmp: Path) -> Path:
    """Two agents with some history, stopped (each chain ends with its exit record), a checkpoint copied out
    of the home, and the supervisor down."""
    with t.client() as c:
        for name in ("one", "two"):
            c.spawn(t.manifest(name, "counter.wat"))
            c.call(name, b"tick")
            c.stop(name)
    out = tmp / "witness.json"
    info = json.loads(cli(t, "checkpoint", "-o", str(out), "--json").stdout)
    assert info["chains"] == 2 and Path(info["files"][0]).parent == t.home.checkpoints
    t.stop()
    assert verify(t)[0] == 0
    return out


def test_checkpoint_o_is_checked_before_the_supervisor_makes_one(theater: Theater, tmp_path: Path) -> None:
    for out, problem in ((tmp_path / "no" / "cp.json", f"no directory {tmp_path / 'no'} to write it in"),
                         (tmp_path, "is a directory; give the name of the file to write")):
        refused = cli(theater, "checkpoint", "-o", str(out), check=False)
        assert refused.returncode == 1 and refused.stderr == f"theater: {out}: {problem}\n"
    assert list(theater.home.checkpoints.glob("*")) == []  # none signed and kept for a copy that failed
    out = tmp_path / "cp.json"
    info = json.loads(cli(theater, "checkpoint", "-o", str(out), "--json").stdout)
    assert info["files"][-1] == str(out) and out.read_bytes() == Path(info["files"][0]).read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["cp.json"]


def test_a_checkpoint_catches_a_chain_cut_at_its_end(theater: Theater, tmp_path: Path) -> None:
    point = checkpointed(theater, tmp_path)
    db = sqlite3.connect(theater.home.store)
    agent_id, head = db.execute("SELECT id, head_seq FROM agents WHERE name='two'").fetchone()
    prev = Record.parse(db.execute("SELECT raw FROM records WHERE agent_id=? AND seq=?", (agent_id, head - 1)).fetchone()[0])
    db.close()
    edit(theater, f"DELETE FROM records WHERE agent_id=? AND seq={head}", args=(agent_id,))  # its exit record
    edit(theater, "UPDATE agents SET head_seq=?, head_hash=? WHERE id=?", args=(head - 1, prev.hash, agent_id))
    assert verify(theater)[0] == 0  # consistent in itself: nothing inside the home shows the cut
    code, reports, _ = subprocess_verify(theater, "--checkpoint", str(point))
    assert code == 1
    [problem] = [r["problem"] for r in reports if not r["ok"]]
    assert problem.startswith("truncated or transactions lost: the checkpoint of") and f"ends at {head - 1}" in problem


def test_a_checkpoint_catches_a_deleted_agent_and_a_rolled_back_home(theater: Theater, tmp_path: Path) -> None:
    point = checkpointed(theater, tmp_path)
    edit(theater, "DELETE FROM records WHERE agent_id=(SELECT id FROM agents WHERE name='one')",
         "DELETE FROM agents WHERE name='one'")
    assert verify(theater)[0] == 0
    code, reports, _ = subprocess_verify(theater, "--checkpoint", str(point))
    assert code == 1 and [r["problem"].split(":")[0] for r in reports if not r["ok"]] == ["deleted"]


def test_a_checkpoint_catches_a_record_rewritten_with_the_home_s_own_key(theater: Theater, tmp_path: Path) -> None:
    """Whoever can read supervisor.key can re-sign a supervisor record; the checkpoint kept elsewhere still
    holds the original's hash."""
    point = checkpointed(theater, tmp_path)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from theater.records import sign_record

    key = Ed25519PrivateKey.from_private_bytes(theater.home.key.read_bytes())
    db = sqlite3.connect(theater.home.store)
    agent_id, head = db.execute("SELECT id, head_seq FROM agents WHERE name='one'").fetchone()
    last = Record.parse(db.execute("SELECT raw FROM records WHERE agent_id=? AND seq=?", (agent_id, head)).fetchone()[0])
    db.close()
    forged = sign_record(key, kind=last.kind, agent_id=last.agent_id, seq=last.seq, time_ns=last.time_ns,
                         prev_hash=last.prev_hash, state_hash=last.state_hash,
                         fields={**last.fields(), "detail": "nothing to see here"})
    edit(theater, "UPDATE records SET raw=?, hash=? WHERE agent_id=? AND seq=?",
         args=(forged.raw, forged.hash, agent_id, head))
    edit(theater, "UPDATE agents SET head_hash=? WHERE id=?", args=(forged.hash, agent_id))
    assert verify(theater)[0] == 0  # the home's key signed it: nothing inside the home tells
    code, reports, _ = subprocess_verify(theater, "--checkpoint", str(point))
    assert code == 1
    assert [r["problem"].split(":")[0] for r in reports if not r["ok"]] == ["rolled back or rewritten"]


def test_a_pinned_key_is_what_verify_trusts(theater: Theater, tmp_path: Path) -> None:
    with theater.client() as c:
        c.spawn(theater.manifest("e", "echo.wat"))
    theater.stop()
    shown = json.loads(cli(theater, "key", "--json").stdout)
    assert shown["public_key"] == theater.home.public_key.read_bytes().hex()
    assert cli(theater, "verify", "--fingerprint", shown["fingerprint"]).returncode == 0
    wrong = cli(theater, "verify", "--fingerprint", "00" * 32, check=False)
    assert wrong.returncode == 1 and "is not the one whose fingerprint you hold" in wrong.stderr
    other = tmp_path / "other.pub"
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other.write_text(Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex())
    code, reports, _ = subprocess_verify(theater, "--pubkey", str(other))
    assert code == 1 and all(not r["ok"] for r in reports)  # the home's chains are not signed by the key held
    other.write_text("01" + "00" * 31)  # the identity point: every (R = identity, S = 0) would verify under it
    weak = cli(theater, "verify", "--pubkey", str(other), check=False)
    assert weak.returncode != 0 and "is a point of small order" in weak.stderr


def test_a_witness_gets_every_checkpoint(theater: Theater, tmp_path: Path) -> None:
    theater.stop()
    witness = tmp_path / "witness"
    theater.start([*CLI, "--home", str(theater.home.root), "up", "--witness", str(witness)])
    with theater.client() as c:
        c.spawn(theater.manifest("e", "echo.wat"))
    info = json.loads(cli(theater, "checkpoint", "--json").stdout)
    copy = witness / Path(info["files"][0]).name
    assert str(copy) in info["files"] and copy.read_bytes() == Path(info["files"][0]).read_bytes()
    assert cli(theater, "verify", "--checkpoint", str(copy)).returncode == 0


def subprocess_verify(t: Theater, *extra: str) -> tuple[int, list[dict[str, Any]], str]:
    proc = cli(t, "verify", "--json", *extra, check=False)
    return proc.returncode, (json.loads(proc.stdout) if proc.stdout.strip() else []), proc.stderr


# --- bundles: chains carried to another machine --------------------------------------------------------


def bundle_of(t: Theater, tmp: Path) -> tuple[Path, dict[str, Any]]:
    with t.client() as c:
        c.spawn(t.manifest("one", "counter.wat"))
        c.spawn(t.manifest("two", "counter.wat"))
        for _ in range(3):
            c.call("one", b"tick")
            c.call("two", b"tick")
    point = tmp / "point.json"
    cli(t, "checkpoint", "-o", str(point))
    t.stop()
    out = tmp / "audit.bundle"
    cli(t, "export", "one", "two", "-o", str(out), "--checkpoint", str(point))
    return out, json.loads(out.read_text())


def test_export_refuses_a_directory_and_leaves_no_temporary_when_the_write_fails(theater: Theater,
                                                                                 small_disk: Path) -> None:
    """A directory as -o is refused before anything is read; a bundle that does not fit leaves nothing behind,
    and either error names the path given, not the temporary."""
    with theater.client() as c:
        c.spawn(theater.manifest("one", "counter.wat"))
    out = small_disk / "h"
    refused = cli(theater, "export", "one", "-o", str(out), check=False)
    assert refused.returncode == 1 and refused.stderr == f"theater: {out}: is a directory; give the name of the file to write\n"
    assert list(small_disk.iterdir()) == [out] and list(out.iterdir()) == []
    fill_disk(out / "filler")
    full = cli(theater, "export", "one", "-o", str(out / "one.bundle"), check=False)
    assert full.returncode == 1 and full.stderr == f"theater: {out / 'one.bundle'}: No space left on device\n"
    assert [p.name for p in out.iterdir()] == ["filler"]


def verify_doc(t: Theater, tmp: Path, doc: dict[str, Any], *extra: str) -> tuple[int, dict[str, str]]:
    path = tmp / "edited.bundle"
    path.write_text(json.dumps(doc))
    code, reports, err = subprocess_verify(t, "--bundle", str(path), *extra)
    assert reports or err, err
    return code, {r["name"]: r["problem"] for r in reports if not r["ok"]}


def test_numbers_out_of_range_and_json_nested_too_deep_are_errors_naming_the_file(theater: Theater,
                                                                                 tmp_path: Path) -> None:
    """A checkpoint, a bundle, or a statement inside one with a seq or a time out of u64 range, or nested
    100,000 deep, is refused naming the file, never a traceback."""
    _, doc = bundle_of(theater, tmp_path)
    point = doc["checkpoint"]

    def written(name: str, content: Any) -> Path:  # "HUGE" stands for 1e400, which json.dumps cannot write
        out = tmp_path / name
        out.write_text(content if isinstance(content, str) else json.dumps(content).replace('"HUGE"', "1e400"))
        return out

    def seq(value: int) -> dict[str, Any]:
        return {**point, "chains": [{**point["chains"][0], "seq": value}, *point["chains"][1:]]}

    deep = "[" * 100_000 + "]" * 100_000
    out_of_range = "is not an integer in 0 .. 2^64 - 1"
    for name, content, problem in (("neg.json", seq(-1), f"a checkpoint chain's seq {out_of_range}"),
                                   ("big.json", seq(2**64), f"a checkpoint chain's seq {out_of_range}"),
                                   ("inf.json", {**point, "time_ns": "HUGE"}, f"the checkpoint's time_ns {out_of_range}"),
                                   ("deep.json", deep, "not a checkpoint: RecursionError")):
        bad = written(name, content)
        for command in (("verify",), ("export", "one", "-o", str(tmp_path / "x.bundle"))):
            out = cli(theater, *command, "--checkpoint", str(bad), check=False)
            assert out.returncode == 1 and out.stderr.startswith(f"theater: {bad}: {problem}"), out.stderr
    rotation = {"version": 1, "chains": [], "root": hashlib.sha256(b"").hexdigest(), "old_key": "", "new_key": "",
                "old_signature": "", "new_signature": "", "time_ns": "HUGE"}
    for name, content, problem in (
            ("neg.bundle", {**doc, "checkpoint": seq(-1)}, f"a checkpoint chain's seq {out_of_range}"),
            ("rotation.bundle", {**doc, "key_rotations": [json.dumps(rotation)]}, f"time_ns {out_of_range}"),
            ("deep.bundle", deep, "not a readable bundle: RecursionError")):
        bad = written(name, content)
        out = cli(theater, "verify", "--bundle", str(bad), check=False)
        assert out.returncode == 1 and out.stderr.startswith(f"theater: store: {bad}: ") and problem in out.stderr, \
            out.stderr
    compaction = {"version": 1, "dropped": {}, "agent_id": "", "genesis_hash": "", "cut_seq": "HUGE"}
    bad = written("cut.bundle", {**doc, "chains": [{**doc["chains"][0], "compaction": json.dumps(compaction)}]})
    code, reports, err = subprocess_verify(theater, "--bundle", str(bad))
    assert code == 1 and reports[0]["problem"] == f"the compaction statement's cut_seq {out_of_range}", err


def test_a_bundle_verifies_elsewhere_and_every_manipulation_is_located(theater: Theater, tmp_path: Path) -> None:
    path, doc = bundle_of(theater, tmp_path)
    elsewhere = Theater(tmp_path / "elsewhere")  # another home, with no store: only the bundle
    code, reports, err = subprocess_verify(elsewhere, "--bundle", str(path))
    assert code == 0 and [r["name"] for r in reports] == ["one", "two"], (reports, err)

    def edited(change: Any) -> dict[str, str]:
        copy = json.loads(json.dumps(doc))
        change(copy["chains"][0]["records"], copy)
        code, problems = verify_doc(elsewhere, tmp_path, copy)
        assert code == 1
        return problems

    def flip(at: int) -> Any:
        def change(records: list[str], _: Any) -> None:
            raw = bytearray(bytes.fromhex(records[2]))
            raw[at] ^= 0x01
            records[2] = raw.hex()
        return change

    # Record 2 is a covered log (no signature of its own): a flipped bit breaks the link of the record after it.
    assert edited(flip(-1))["one"] == "record 3: previous-hash does not match the chain head"
    assert edited(flip(102))["one"].startswith("record 2 (by position) does not parse")  # the payload's length
    assert "sequence 3, expected 2" in edited(lambda r, _: r.pop(2))["one"]  # dropped
    assert "sequence" in edited(lambda r, _: r.insert(3, r[3]))["one"]  # inserted again
    assert "sequence" in edited(lambda r, _: r.__setitem__(slice(2, 4), [r[3], r[2]]))["one"]  # reordered

    def splice(records: list[str], whole: Any) -> None:
        records[3] = whole["chains"][1]["records"][3]  # the same position in the other agent's chain

    assert "record 3" in edited(splice)["one"]
    # The checkpoint was made before `down` wrote each chain's exit record: cut that and the record before it.
    # The record before it is a handle, which covers the log and host call before it: cut without the handle,
    # those are vouched for by nothing.
    assert edited(lambda r, _: r.__delitem__(slice(-2, None))) == {
        "one": "the chain ends with 2 covered record(s) that no worker signature covers"}

    def cut(records: list[str], _: Any) -> None:
        del records[-2:]
        while bytes.fromhex(records[-1])[2] == 2:  # covered: cut back to the last signed record
            records.pop()

    truncated = edited(cut)
    assert truncated == {"one": f"truncated: the bundle's checkpoint holds record {len(doc['chains'][0]['records']) - 2}"}
    other = tmp_path / "other.pub"
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other.write_text(Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex())
    copy = json.loads(json.dumps(doc))
    copy["checkpoint"] = None  # else refused at once: signed by another key than the one held
    code, problems = verify_doc(elsewhere, tmp_path, copy, "--pubkey", str(other))
    assert code == 1 and set(problems) == {"one", "two"}
