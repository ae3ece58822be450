"""Retention: `[retention]` limits, `theater gc`, compaction statements, and what verify makes of them.

A real supervisor and counter agent; the store is a real SQLite file whose
records are dropped only behind a statement the supervisor signs.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import Theater
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_audit import broken, cli, edit, verify

from theater.compaction import Compaction
from theater.records import Kind, Record


def chain(t: Theater, name: str) -> list[Record]:
    db = sqlite3.connect(t.home.store)
    try:
        rows = db.execute("SELECT raw FROM records WHERE agent_id=(SELECT id FROM agents WHERE name=?) ORDER BY seq",
                          (name,)).fetchall()
        return [Record.parse(raw) for (raw,) in rows]
    finally:
        db.close()


def statement(t: Theater, name: str) -> dict[str, Any]:
    db = sqlite3.connect(t.home.store)
    try:
        (text,) = db.execute("SELECT statement FROM compactions WHERE agent_id=(SELECT id FROM agents WHERE name=?)",
                             (name,)).fetchone()
        return dict(json.loads(text))
    finally:
        db.close()


def gc(t: Theater, *agents: str) -> dict[str, dict[str, Any]]:
    return {e["agent"]: e for e in json.loads(cli(t, "gc", "--json", *agents).stdout)["agents"]}


def ticks(t: Theater, name: str, n: int) -> None:
    with t.client() as c:
        for _ in range(n):
            c.call(name, b"tick")


@pytest.fixture
def counted(theater: Theater) -> Theater:
    """`counter` keeps at most 20 records; `free` has no limit. 60 ticks each."""
    with theater.client() as c:
        c.spawn(theater.manifest("counter", "counter.wat", retention={"max_records": 20}))
        c.spawn(theater.manifest("free", "counter.wat"))
    ticks(theater, "counter", 60)
    ticks(theater, "free", 60)
    return theater


def test_gc_keeps_a_chain_within_its_limit_and_it_still_verifies(counted: Theater) -> None:
    before = chain(counted, "counter")
    assert len(before) > 60
    report = gc(counted)
    assert report["free"]["dropped"] == 0 and report["free"]["records"] == len(chain(counted, "free"))
    after = chain(counted, "counter")
    assert report["counter"]["records"] == len(after) <= 20
    assert len(after) >= 15  # snapshots every quarter of the limit: the cut keeps most of what it may
    assert after[0].kind is Kind.GENESIS and after[0].raw == before[0].raw
    assert after[-1].raw == before[-1].raw and [r.seq for r in after[1:]] == list(range(after[1].seq, before[-1].seq + 1))
    st = statement(counted, "counter")
    assert st["cut_seq"] == after[1].seq and st["prev_hash"] == before[after[1].seq - 1].hash.hex()
    assert st["dropped"] == {"from": 1, "records": after[1].seq - 1, "bytes": st["dropped"]["bytes"],
                             "root": st["dropped"]["root"]}
    assert verify(counted)[0] == 0
    ticks(counted, "counter", 40)  # the agent carries on from its head; a second gc cuts again
    gc(counted, "counter")
    again = statement(counted, "counter")
    assert again["dropped"]["from"] == st["cut_seq"] and again["previous"] != ""
    assert len(chain(counted, "counter")) <= 20 and verify(counted)[0] == 0
    with counted.client() as c:
        assert c.call("counter", b"tick") == b"101"  # the state was never touched


def test_the_store_refuses_to_drop_records_no_statement_covers(counted: Theater) -> None:
    db = sqlite3.connect(counted.home.store)
    with pytest.raises(sqlite3.IntegrityError, match="only records a compaction statement covers may go"):
        db.execute("DELETE FROM records WHERE seq=5")
    db.close()


def test_records_dropped_without_a_statement_or_under_a_forged_one_are_caught(counted: Theater, tmp_path: Path) -> None:
    gc(counted)
    counted.stop()
    agent = chain(counted, "free")[0].agent_id
    edit(counted, "DELETE FROM records WHERE agent_id=? AND seq BETWEEN 1 AND 30", args=(agent,))
    assert "free" in broken(counted)  # a gap with no statement: the link breaks
    doc = statement(counted, "counter")
    for field, value, problem in (
            ("cut_seq", doc["cut_seq"] + 1, "signature does not verify"),  # moved the cut, kept the signature
            ("signature", "00" * 64, "signature does not verify")):
        forged = {**doc, field: value}
        if field == "cut_seq":
            forged["dropped"] = {**doc["dropped"], "records": doc["dropped"]["records"] + 1}
        edit(counted, "UPDATE compactions SET statement=? WHERE agent_id=?",
             args=(json.dumps(forged), bytes.fromhex(doc["agent_id"])))
        assert problem in broken(counted)["counter"]
    edit(counted, "UPDATE compactions SET statement=? WHERE agent_id=?",
         args=(json.dumps(doc), bytes.fromhex(doc["agent_id"])))
    kept = chain(counted, "counter")
    edit(counted, "DELETE FROM records WHERE agent_id=? AND seq=?", args=(kept[0].agent_id, kept[1].seq))
    assert "previous-hash does not match" in broken(counted)["counter"] or \
        "expected" in broken(counted)["counter"]  # the first kept record is gone: the statement no longer joins


def test_a_statement_signed_with_the_key_still_must_fit_its_chain(counted: Theater) -> None:
    """A statement for another chain's genesis, or one whose prev_hash does not join the kept records,
    is refused even though the supervisor signed it."""
    gc(counted)
    counted.stop()
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.from_private_bytes(counted.home.key.read_bytes())
    doc = statement(counted, "counter")
    original = Compaction.parse(json.dumps(doc), key.public_key().public_bytes_raw())
    import dataclasses

    for change, problem in (({"genesis_hash": bytes(32)}, "of another chain"),
                            ({"prev_hash": bytes(32)}, "previous-hash does not match")):
        forged = dataclasses.replace(original, **change).signed(key)
        edit(counted, "UPDATE compactions SET statement=? WHERE agent_id=?",
             args=(forged.to_json(), original.agent_id))
        assert problem in broken(counted)["counter"]


def test_a_checkpoint_from_before_a_gc_still_passes(counted: Theater, tmp_path: Path) -> None:
    point = json.loads(cli(counted, "checkpoint", "--json").stdout)["files"][0]
    gc(counted)
    assert cli(counted, "verify", "--checkpoint", point).returncode == 0


def checkpoint_problems(t: Theater, point: Path) -> list[str]:
    """What ``verify --checkpoint`` says of the heads the checkpoint holds (not of the chains themselves)."""
    out = cli(t, "verify", "--json", "--checkpoint", str(point), check=False)
    return [r["problem"] for r in json.loads(out.stdout) if not r["ok"] and "the checkpoint of" in r["problem"]]


def test_a_dropped_head_is_vouched_for_only_by_its_own_chain_s_signed_statement(counted: Theater,
                                                                                 tmp_path: Path) -> None:
    """A checkpoint's head that a later gc dropped passes on the chain's compaction statement only if the
    statement verifies, is of that chain and names its stored genesis: a forged or borrowed statement, or a
    chain deleted whole with its compactions row left behind, is reported."""
    point = tmp_path / "point.json"
    cli(counted, "checkpoint", "-o", str(point))
    ticks(counted, "counter", 20)
    gc(counted, "counter")  # cuts past the checkpoint's head of counter
    counted.stop()
    assert checkpoint_problems(counted, point) == []
    doc = statement(counted, "counter")
    agent = bytes.fromhex(doc["agent_id"])
    key = Ed25519PrivateKey.from_private_bytes(counted.home.key.read_bytes())
    free = chain(counted, "free")[0]
    borrowed = dataclasses.replace(Compaction.parse(json.dumps(doc), key.public_key().public_bytes_raw()),
                                   agent_id=free.agent_id, genesis_hash=free.hash).signed(key)
    for text in (json.dumps({**doc, "signature": "00" * 64}), borrowed.to_json()):
        edit(counted, "UPDATE compactions SET statement=? WHERE agent_id=?", args=(text, agent))
        [problem] = checkpoint_problems(counted, point)
        assert problem.startswith("truncated or transactions lost: the checkpoint of")
    edit(counted, "UPDATE compactions SET statement=? WHERE agent_id=?", args=(json.dumps(doc), agent))
    edit(counted, "DELETE FROM records WHERE agent_id=?", "DELETE FROM snapshots WHERE agent_id=?",
         "DELETE FROM agents WHERE id=?", args=(agent,))
    assert verify(counted)[0] == 0  # consistent in itself: only the checkpoint shows the agent is gone
    [problem] = checkpoint_problems(counted, point)
    assert problem.startswith("deleted: the checkpoint of")


def test_retention_settings_are_checked(theater: Theater) -> None:
    with theater.client() as c:
        for table, problem in (({"max_records": 3}, "out of range 10.."),
                               ({"max_records": 10, "keep": 1}, "unknown key"),
                               ({"max_bytes": "big"}, "must be")):
            path = theater.manifest("r", "counter.wat", retention=table)
            with pytest.raises(Exception, match=problem):
                c.spawn(path)


def test_a_compacted_chain_and_a_snapshot_replay_identical(counted: Theater) -> None:
    """Replay starts where the chain was cut (the state kept with the statement), or with --from at the newest
    snapshot before the record named; a different component diverges at the first record replayed."""
    gc(counted)
    cut = statement(counted, "counter")["cut_seq"]
    out = json.loads(cli(counted, "replay", "counter", "--json").stdout)
    assert out["ok"] and out["from"] == cut and out["calls"] >= 4
    head = chain(counted, "free")[-1].seq  # gc snapshotted free's head too
    ticks(counted, "free", 5)
    out = json.loads(cli(counted, "replay", "free", "--from", str(head + 3), "--json").stdout)
    assert out["ok"] and out["from"] == head + 1 and out["calls"] == 5
    assert "from record" in cli(counted, "replay", "free", "--from", str(head + 3)).stdout
    whole = json.loads(cli(counted, "replay", "free", "--json").stdout)
    assert whole["ok"] and whole["from"] == 0 and whole["calls"] == 66  # init, 60 + 5 ticks
    from conftest import COMPONENTS

    other = cli(counted, "replay", "free", "--from", str(head + 3), "--component", str(COMPONENTS / "echo.wat"),
                "--json", check=False)
    assert other.returncode == 1 and json.loads(other.stdout)["diverged_at"] == head + 1


def test_replay_from_a_record_the_chain_does_not_have(counted: Theater) -> None:
    """--from below 1 is a usage error; past the chain's head, an error saying where it ends; inside the
    range a compaction dropped, the replay starts at the cut (nothing before it is stored)."""
    gc(counted, "counter")
    counted.stop()
    cut = statement(counted, "counter")["cut_seq"]
    head = chain(counted, "counter")[-1].seq
    for seq in ("0", "-5"):
        out = cli(counted, "replay", "counter", "--from", seq, check=False)
        assert out.returncode == 2 and f"argument --from: {seq}: a record number from 1" in out.stderr, out.stderr
    past = cli(counted, "replay", "counter", "--from", str(head + 1), check=False)
    assert past.returncode == 1
    assert past.stderr == f"theater: counter: --from {head + 1} is past the chain's end: its last record is {head}\n"
    inside = json.loads(cli(counted, "replay", "counter", "--from", str(cut - 5), "--json").stdout)
    assert inside["ok"] and inside["from"] == cut


def test_gc_follows_the_limits_the_genesis_signed_not_an_edited_row(theater: Theater) -> None:
    """Someone with file access sets a tight [retention] in an agent's row: the supervisor does not sign
    away that agent's history, since its genesis signed no limit."""
    with theater.client() as c:
        c.spawn(theater.manifest("free", "counter.wat"))
    ticks(theater, "free", 20)
    theater.stop()
    db = sqlite3.connect(theater.home.store)
    (config,) = db.execute("SELECT config FROM agents WHERE name='free'").fetchone()
    db.execute("UPDATE agents SET config=? WHERE name='free'",
               (json.dumps({**json.loads(config), "retention": {"max_records": 10, "max_bytes": 0}}),))
    db.commit()
    db.close()
    theater.start()
    before = len(chain(theater, "free"))
    report = gc(theater)
    assert report["free"]["dropped"] == 0 and report["free"]["limits"] == {"max_records": 0, "max_bytes": 0}
    assert len(chain(theater, "free")) >= before


def test_a_doctored_snapshot_is_refused_as_a_replay_start(counted: Theater) -> None:
    gc(counted)
    head = chain(counted, "free")[-1].seq
    ticks(counted, "free", 2)
    counted.stop()
    edit(counted, "UPDATE snapshots SET state=? WHERE seq=? AND agent_id=(SELECT id FROM agents WHERE name='free')",
         args=(b"999", head))
    out = cli(counted, "replay", "free", "--from", str(head + 1), check=False)
    assert out.returncode != 0 and "does not hash to the chain's state hash" in out.stderr


def test_gc_keeps_a_chain_within_its_byte_limit(theater: Theater) -> None:
    with theater.client() as c:
        c.spawn(theater.manifest("sized", "counter.wat", retention={"max_bytes": 65536}))
    ticks(theater, "sized", 150)
    before = sum(len(r.raw) for r in chain(theater, "sized"))
    assert before > 65536
    report = gc(theater, "sized")["sized"]
    kept = chain(theater, "sized")
    assert report["dropped"] > 0 and report["bytes"] == sum(len(r.raw) for r in kept) <= 65536
    assert report["bytes"] >= 65536 // 2  # snapshots a quarter of the limit apart: most of what it may keep stays
    assert verify(theater)[0] == 0
