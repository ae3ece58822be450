"""The supervisor's key: rotation under a statement both keys sign, and what verify makes of it.

A real supervisor, real agents, the real store; keys are read from and
written to the home as the supervisor keeps them.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Theater, wait_running
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_audit import CLI, broken, cli, edit, verify

from supervisor.cli import _read_public_key
from theater.checkpoint import Head, fingerprint
from theater.records import Kind, Record, sign_record
from theater.rotation import Rotation


def key_info(t: Theater) -> dict[str, Any]:
    return dict(json.loads(cli(t, "key", "--json").stdout))


def ticks(t: Theater, name: str, n: int) -> None:
    with t.client() as c:
        for _ in range(n):
            c.call(name, b"tick")


def last_record(t: Theater, name: str) -> Record:
    db = sqlite3.connect(t.home.store)
    try:
        (raw,) = db.execute("SELECT raw FROM records WHERE agent_id=(SELECT id FROM agents WHERE name=?) "
                            "ORDER BY seq DESC LIMIT 1", (name,)).fetchone()
        return Record.parse(raw)
    finally:
        db.close()


@pytest.fixture
def rotated(theater: Theater, tmp_path: Path) -> tuple[Theater, dict[str, Any], Path]:
    """counter ticks, a checkpoint, the key rotates, counter ticks and restarts under the new key."""
    with theater.client() as c:
        c.spawn(theater.manifest("counter", "counter.wat"))
    ticks(theater, "counter", 3)
    before = key_info(theater)
    point = Path(json.loads(cli(theater, "checkpoint", "--json").stdout)["files"][0])
    out = json.loads(cli(theater, "key", "rotate", "--json").stdout)
    assert out["old"] == before["fingerprint"] and out["new"] != out["old"]
    ticks(theater, "counter", 3)
    cli(theater, "restart", "counter")  # exit and worker-key records signed by the new key
    with theater.client() as c:
        wait_running(c, "counter")
        assert c.call("counter", b"tick") == b"7"
    return theater, before, point


def test_after_a_rotation_every_chain_verifies_under_either_key(rotated: tuple[Theater, dict[str, Any], Path],
                                                                tmp_path: Path) -> None:
    theater, before, point = rotated
    now = key_info(theater)
    assert now["fingerprint"] != before["fingerprint"]
    assert [p["fingerprint"] for p in now["previous"]] == [before["fingerprint"]]
    assert theater.home.public_key.read_bytes().hex() == now["public_key"]
    assert Ed25519PrivateKey.from_private_bytes(theater.home.key.read_bytes()).public_key().public_bytes_raw().hex() \
        == now["public_key"]
    assert verify(theater)[0] == 0
    for fp in (before["fingerprint"], now["fingerprint"]):
        assert cli(theater, "verify", "--fingerprint", fp).returncode == 0
    old = tmp_path / "old.pub"
    old.write_text(before["public_key"])
    assert cli(theater, "verify", "--pubkey", str(old), "--checkpoint", str(point)).returncode == 0
    bundle = tmp_path / "audit.bundle"
    cli(theater, "export", "counter", "-o", str(bundle))
    assert cli(theater, "verify", "--bundle", str(bundle), "--pubkey", str(old)).returncode == 0
    theater.stop()  # a new supervisor signs with the new key, and says so
    theater.start()
    with theater.client() as c:
        wait_running(c, "counter")
    assert key_info(theater)["fingerprint"] == now["fingerprint"] and verify(theater)[0] == 0
    exits = [r for r in chain_of(theater, "counter") if r.kind is Kind.EXIT]
    assert exits and verify(theater)[0] == 0


def chain_of(t: Theater, name: str) -> list[Record]:
    db = sqlite3.connect(t.home.store)
    try:
        return [Record.parse(raw) for (raw,) in db.execute(
            "SELECT raw FROM records WHERE agent_id=(SELECT id FROM agents WHERE name=?) ORDER BY seq", (name,))]
    finally:
        db.close()


def test_an_old_key_used_after_its_rotation_is_caught(theater: Theater) -> None:
    """The retired key, kept by someone, signs a record placed after the rotation's head: refused, since
    from that head on only the new key counts."""
    with theater.client() as c:
        c.spawn(theater.manifest("counter", "counter.wat"))
    ticks(theater, "counter", 2)
    old_seed = theater.home.key.read_bytes()
    cli(theater, "key", "rotate")
    cli(theater, "stop", "counter")  # an exit record after the rotation, by the new key
    theater.stop()
    last = last_record(theater, "counter")
    old = Ed25519PrivateKey.from_private_bytes(old_seed)
    forged = sign_record(old, kind=last.kind, agent_id=last.agent_id, seq=last.seq, time_ns=last.time_ns,
                         prev_hash=last.prev_hash, state_hash=last.state_hash,
                         fields={**last.fields(), "detail": "rewritten with the retired key"})
    edit(theater, "UPDATE records SET raw=?, hash=? WHERE agent_id=? AND seq=?",
         args=(forged.raw, forged.hash, last.agent_id, last.seq))
    edit(theater, "UPDATE agents SET head_hash=? WHERE id=?", args=(forged.hash, last.agent_id))
    assert "signature of record" in broken(theater)["counter"]


def test_a_rotation_the_old_key_did_not_sign_is_refused(theater: Theater, tmp_path: Path) -> None:
    """Someone with file access swaps in a key of their own with a rotation statement: without the old key's
    signature it does not verify, and verify pinned to the old key says so."""
    with theater.client() as c:
        c.spawn(theater.manifest("counter", "counter.wat"))
    before = key_info(theater)
    theater.stop()
    mine = Ed25519PrivateKey.generate()
    stranger = Ed25519PrivateKey.generate()
    fake = Rotation.make(stranger, mine, [], time.time_ns())
    doc = json.loads(fake.to_json())
    doc["old_key"] = before["public_key"]  # claims to come from the real key; that key never signed it
    edit(theater, "INSERT INTO key_rotations (statement) VALUES (?)", args=(json.dumps(doc),))
    theater.home.public_key.write_bytes(mine.public_key().public_bytes_raw())
    plain = cli(theater, "verify", check=False)
    assert plain.returncode != 0 and "key rotations do not verify" in plain.stderr
    old = tmp_path / "old.pub"
    old.write_text(before["public_key"])
    pinned = cli(theater, "verify", "--pubkey", str(old), check=False)
    assert pinned.returncode != 0 and "the old key's signature does not verify" in pinned.stderr


@pytest.mark.parametrize("committed", [True, False], ids=["statement-committed", "statement-lost"])
def test_a_rotation_cut_short_settles_on_the_next_start(theater: Theater, committed: bool) -> None:
    """The new seed is durable before the statement, the statement before the seed replaces the old: a
    supervisor killed in between starts with the key the store agrees with, and writes the file (and the
    witness's copy) of a statement committed before it could; the temporaries of files cut short go."""
    with theater.client() as c:
        c.spawn(theater.manifest("counter", "counter.wat"))
    ticks(theater, "counter", 2)
    theater.stop()
    old = Ed25519PrivateKey.from_private_bytes(theater.home.key.read_bytes())
    new = Ed25519PrivateKey.generate()
    pending = theater.home.key.with_name("supervisor.key.next")
    pending.write_bytes(new.private_bytes_raw())
    pending.chmod(0o600)
    if committed:
        db = sqlite3.connect(theater.home.store)
        heads = [Head(a, s, h) for a, s, h in db.execute(
            "SELECT r.agent_id, r.seq, r.hash FROM records r JOIN (SELECT agent_id, max(seq) m FROM records "
            "GROUP BY agent_id) t ON r.agent_id=t.agent_id AND r.seq=t.m")]
        db.close()
        rotation = Rotation.make(old, new, heads, time.time_ns())
        edit(theater, "INSERT INTO key_rotations (statement) VALUES (?)", args=(rotation.to_json(),))
        # Until the next start, supervisor.pub holds the old key: offline readers follow the statement the old
        # key signed (they used to refuse the home: "the key rotations end at <new>, not at <old>").
        new_fp = fingerprint(new.public_key().public_bytes_raw())
        assert verify(theater)[0] == 0
        info = key_info(theater)
        assert info["fingerprint"] == new_fp and info["settled"] is False
        assert [p["fingerprint"] for p in info["previous"]] == [fingerprint(old.public_key().public_bytes_raw())]
        bundle = theater.dir / "cut.bundle"
        cli(theater, "export", "counter", "-o", str(bundle))
        assert cli(theater, "verify", "--bundle", str(bundle)).returncode == 0
    for left in (".supervisor.key.next.tmp", ".supervisor.pub.tmp"):  # a rotation killed inside write_private
        (theater.home.root / left).write_bytes(b"partial")
    theater.home.checkpoints.mkdir(exist_ok=True)
    for left in (f".rotation-{time.time_ns()}.json.tmp", f".{time.time_ns()}.json.tmp"):  # a rotation's, a checkpoint's
        (theater.home.checkpoints / left).write_bytes(b"partial")
    witness = theater.dir / "witness"
    theater.start([*CLI, "--home", str(theater.home.root), "up", "--witness", str(witness)])
    with theater.client() as c:
        wait_running(c, "counter")
        assert c.call("counter", b"tick") == b"3"
    expected = new if committed else old
    assert not pending.exists()
    assert key_info(theater)["fingerprint"] == fingerprint(expected.public_key().public_bytes_raw())
    assert key_info(theater)["settled"] is True
    assert verify(theater)[0] == 0
    assert not list(theater.home.root.glob(".supervisor.*.tmp"))
    assert not list(theater.home.checkpoints.glob(".*.tmp"))
    written = sorted(p.name for p in theater.home.checkpoints.iterdir())
    if committed:
        name = f"rotation-{rotation.time_ns}.json"
        assert written == [name]
        assert (theater.home.checkpoints / name).read_text() == (witness / name).read_text() == rotation.to_json() + "\n"
    else:
        assert written == []


def test_compaction_carries_on_across_a_rotation(theater: Theater) -> None:
    """A compaction statement signed by the retired key stays good; the next one is the new key's."""
    with theater.client() as c:
        c.spawn(theater.manifest("counter", "counter.wat", retention={"max_records": 20}))
    ticks(theater, "counter", 30)
    first = json.loads(cli(theater, "gc", "--json").stdout)["agents"][0]
    cli(theater, "key", "rotate")
    assert verify(theater)[0] == 0  # the statement is the old key's, the key in force the new one
    ticks(theater, "counter", 30)
    second = json.loads(cli(theater, "gc", "--json").stdout)["agents"][0]
    assert first["dropped"] > 0 and second["dropped"] > 0, (first.get("note"), second.get("note"))
    db = sqlite3.connect(theater.home.store)
    (statement,) = db.execute("SELECT statement FROM compactions").fetchone()
    db.close()
    assert json.loads(statement)["public_key"] == key_info(theater)["public_key"]
    assert verify(theater)[0] == 0


def test_a_pinned_key_file_is_read_whatever_its_first_and_last_bytes(tmp_path: Path) -> None:
    """A raw 32-byte key may start or end with a byte that is white space: it was stripped, and the rest read
    as hex, which crashed `verify --pubkey` for about one home key in twenty."""
    raw = b" " + bytes(range(1, 31)) + b"\n"
    path = tmp_path / "k.pub"
    path.write_bytes(raw)
    assert _read_public_key(path) == raw
    path.write_text(f"  {raw.hex()}\n")
    assert _read_public_key(path) == raw
    for bad in (b"short", b"z" * 64, raw + b"x"):
        path.write_bytes(bad)
        assert _read_public_key(path) is None


def test_verify_names_a_pinned_key_file_that_is_not_a_key(theater: Theater, tmp_path: Path) -> None:
    path = tmp_path / "k.pub"
    path.write_bytes(b"not a key at all")
    proc = cli(theater, "verify", "--pubkey", str(path), check=False)
    assert proc.returncode == 2 and f"{path}: not a readable public key: 32 raw bytes, or 64 hex digits" in proc.stderr
    missing = cli(theater, "verify", "--pubkey", str(tmp_path / "absent.pub"), check=False)
    assert missing.returncode == 2 and "absent.pub: not a readable public key" in missing.stderr
