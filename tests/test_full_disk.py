"""The event store's filesystem fills up mid-traffic, then has space again.

The home lives on a small tmpfs made by the test. No call is answered as
committed that was not; the supervisor stays up, says what is wrong (`ping`,
`ps`), refuses new work that needs the disk, holds restarts, and carries on
by itself once there is space. Nothing committed is lost and every chain
verifies.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import Theater, assert_verified, fill_disk, records, wait_until

from theater.client import Client, ClientError
from theater.records import Kind

MESSAGE_BYTES = 200_000


def _fill_for_good(t: Theater) -> Path:
    """Fold the store's WAL into the database and truncate it, then take every byte left, so that no write
    fits, however small (a WAL keeps the space of earlier writes)."""
    db = sqlite3.connect(t.home.store)
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return fill_disk(t.home.root / "filler")


def _wait_serving(c: Client, name: str) -> None:
    """The store can be written again (the supervisor's probe said so) and the agent runs."""
    wait_until(lambda: c.ping()["store_problem"] is None, 30, "the store to be writable again")
    wait_until(lambda: next(a for a in c.ps() if a["name"] == name)["status"] == "running", 30, f"{name} to run again")


def test_a_full_disk_loses_nothing_committed_and_the_supervisor_carries_on(small_disk: Path) -> None:
    t = Theater(small_disk)
    t.start()
    try:
        with t.client(timeout=60) as c:
            c.spawn(str(t.manifest("echo", "echo.wat")))
            acked: dict[bytes, bytes] = {}
            refused = None
            for i in range(200):
                message = bytes([65 + i % 26]) * MESSAGE_BYTES + str(i).encode()
                try:
                    acked[message] = c.call("echo", message) or b""
                except ClientError as exc:
                    refused = exc
                    break
            assert refused is not None, "the disk never filled"
            assert refused.code == "store" and "could not be stored" in str(refused), refused

            # Room again: it carries on by itself.
            subprocess.run(["mount", "-o", "remount,size=8M", str(t.home.root)], check=True)
            _wait_serving(c, "echo")
            acked[b"room"] = c.call("echo", b"room") or b""

            filler = _fill_for_good(t)
            with pytest.raises(ClientError) as full:
                c.call("echo", b"while full")
            assert full.value.code == "store" and "could not be stored" in str(full.value), full.value
            assert c.ping()["store_problem"]  # the supervisor is up and says what is wrong
            with pytest.raises(ClientError) as again:
                c.call("echo", b"while full")
            assert again.value.code == "store" and "cannot be written" in str(again.value)
            with pytest.raises(ClientError) as spawn:
                c.spawn(str(t.manifest("other", "echo.wat")))
            assert spawn.value.code == "store"
            ps = subprocess.run([sys.executable, "-m", "supervisor", "--home", str(t.home.root), "ps"],
                                capture_output=True, text=True, timeout=60)
            assert ps.returncode == 0 and "the event store cannot be written" in ps.stderr, ps.stderr

            filler.unlink()  # space again
            _wait_serving(c, "echo")
            assert c.call("echo", b"after") == b"after"
    finally:
        t.stop()
    chain = records(t, "echo")
    stored = {r.fields()["message"]: r.fields()["reply"] for r in chain if r.kind is Kind.HANDLE}
    missing = [m[:8] for m, reply in acked.items() if stored.get(m) != reply]
    assert not missing, f"acknowledged but not stored: {missing}"
    assert stored[b"after"] == b"after"
    assert_verified(t)


def test_an_upload_that_does_not_fit_is_refused_and_leaves_nothing(small_disk: Path) -> None:
    """A spawn that carries its component (a tenant's, here the operator's) on a disk without room for it
    is refused with the reason, and what was written of it is gone again; the next one that fits spawns."""
    t = Theater(small_disk)
    t.start()
    try:
        with t.client(timeout=60) as c:
            text = 'name = "big"\ncomponent = "big.wasm"\n'
            with pytest.raises(ClientError) as full:
                c.request("spawn", b"\0asm" + bytes(4 * 1024 * 1024), manifest_text=text, component_kind="wasm")
            assert full.value.code == "store" and "No space left on device" in str(full.value), full.value
            assert "try again once there is space" in str(full.value)
            assert list(t.home.uploads.iterdir()) == []  # nor a partial file holding the space
            echo = (Path(__file__).parent / "components" / "echo.wat").read_bytes()
            c.request("spawn", echo, manifest_text='name = "small"\ncomponent = "echo.wat"\n', component_kind="wat")
            assert c.call("small", b"x") == b"x"
        assert_verified(t)
    finally:
        t.stop()


def test_a_spawn_whose_first_commit_does_not_fit_leaves_no_agent_and_can_be_made_again(small_disk: Path) -> None:
    """A new agent's genesis record is committed with its init's result, in one transaction. When that
    transaction does not fit, the spawn is refused, the store holds nothing of the agent, and once there is
    space the same spawn makes it, its chain beginning at its genesis."""
    t = Theater(small_disk)
    t.start()
    try:
        with t.client(timeout=60) as c:
            c.spawn(str(t.manifest("first", "echo.wat")))  # the component is compiled and cached
            filler = _fill_for_good(t)
            with pytest.raises(ClientError) as refused:
                c.spawn(str(t.manifest("second", "echo.wat")))
            assert refused.value.code == "spawn-failed" and "store-failed" in str(refused.value), refused.value
            assert "second" not in {a["name"] for a in c.ps()}
            filler.unlink()
            wait_until(lambda: c.ping()["store_problem"] is None, 30, "the store to be writable again")
            c.spawn(str(t.manifest("second", "echo.wat")))
            assert c.call("second", b"hi") == b"hi"
    finally:
        t.stop()
    chain = records(t, "second")
    assert [r.kind for r in chain][:3] == [Kind.GENESIS, Kind.INIT, Kind.HANDLE] and chain[0].seq == 0
    assert_verified(t)


def test_a_tree_stopped_while_a_restart_below_waits_for_the_store_answers_and_that_start_is_dropped(
    small_disk: Path,
) -> None:
    """An inner node's restart of its child waits while the store cannot be written; the operator's stop of
    the whole tree then stops that child, which has no worker yet. The stop must not wait for a worker that
    is never made (it was never answered, and the child stayed `stopping`): it answers, the child stays
    stopped once there is space, and a restart starts every child."""
    t = Theater(small_disk)
    t.start()
    component = tomllib.loads(t.manifest("x", "echo.wat").read_text())["component"]
    tree = t.dir / "tree.toml"
    tree.write_text(f'name = "tree"\n\n[[children]]\nname = "inner"\n\n[[children.children]]\nname = "b"\n'
                    f'component = "{component}"\n\n[[children]]\nname = "a"\ncomponent = "{component}"\n')

    def status(c: Client, name: str) -> str:
        return str(next(a for a in c.ps() if a["name"] == name)["status"])

    try:
        with t.client(timeout=60) as c:
            c.spawn(str(tree))
            pid = next(a for a in c.ps() if a["name"] == "b")["pid"]
            filler = _fill_for_good(t)
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: c.ping()["store_problem"] and status(c, "b") == "restarting", 30,
                       "b's restart to wait for the store")
            c.stop("tree")  # answered, though b has no worker to stop
            assert (status(c, "a"), status(c, "b")) == ("stopped", "stopped")
            filler.unlink()
            wait_until(lambda: c.ping()["store_problem"] is None, 30, "the store to be writable again")
            assert status(c, "b") == "stopped" and not next(a for a in c.ps() if a["name"] == "b")["pid"]
            c.restart("tree")
            assert c.call("a", b"a") == b"a" and c.call("b", b"b") == b"b"
    finally:
        t.stop()
    assert_verified(t)


def test_a_stop_or_restart_that_would_wait_for_the_store_is_refused_at_once(small_disk: Path) -> None:
    """An agent's restart after a crash waits while the store cannot be written, and an operator's stop of
    that agent queues behind it (OTP's order): it was answered only once there was space again, so a client
    timed out with no word of why. While the store cannot be written, such a stop, and any restart, is
    refused at once with the reason; once there is space the agent's own restart goes on, and both work."""
    t = Theater(small_disk)
    t.start()
    try:
        with t.client(timeout=60) as c:
            c.spawn(str(t.manifest("echo", "echo.wat")))
            pid = c.ps()[0]["pid"]
            filler = _fill_for_good(t)
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: c.ping()["store_problem"] and c.ps()[0]["status"] == "restarting", 30,
                       "the restart to wait for the store")
            with pytest.raises(ClientError, match=r"cannot be written .* and echo's restart waits for it") as stop:
                c.stop("echo")
            with pytest.raises(ClientError, match=r"cannot be written .*; nothing was taken") as restart:
                c.restart("echo")
            assert stop.value.code == restart.value.code == "store"
            assert c.ps()[0]["status"] == "restarting"
            filler.unlink()
            _wait_serving(c, "echo")
            assert c.call("echo", b"back") == b"back"
            c.restart("echo")
            assert c.stop("echo")["status"] == "stopped"
    finally:
        t.stop()
    assert_verified(t)


def test_a_restart_whose_start_waits_for_the_store_is_answered_at_once_and_goes_on(small_disk: Path) -> None:
    """A restart taken before any write had failed finds the disk full on its way (its first write) and its
    start waits for the store: it is answered then, with why and what follows, not when space comes back (a
    client waited for its whole timeout); the start goes on by itself once there is space."""
    t = Theater(small_disk)
    t.start()
    try:
        with t.client(timeout=60) as c:
            c.spawn(str(t.manifest("echo", "echo.wat")))
            c.stop("echo")
            filler = _fill_for_good(t)
            assert c.ping()["store_problem"] is None  # nothing has tried to write yet
            with pytest.raises(ClientError, match=r"echo cannot start now \(.*full.*\); this request for echo goes "
                                                  r"on by itself once it can") as held:
                c.restart("echo")
            assert held.value.code == "store" and c.ps()[0]["status"] == "starting"
            filler.unlink()
            _wait_serving(c, "echo")
            assert c.call("echo", b"back") == b"back"
    finally:
        t.stop()
    assert_verified(t)


def test_up_on_a_full_disk_says_why_it_did_not_start(small_disk: Path) -> None:
    """`theater up --detach` runs the supervisor in the background; when that cannot open its store, `up`
    fails with the supervisor's own words from its log, not only a pointer to the log, or, when the disk is
    too full to keep even those, says that."""
    t = Theater(small_disk)
    t.start()
    with t.client() as c:
        c.spawn(str(t.manifest("echo", "echo.wat")))
    t.stop()
    filler = _fill_for_good(t)
    up = [sys.executable, "-m", "supervisor", "--home", str(t.home.root), "up", "--detach"]
    failed = subprocess.run(up, capture_output=True, text=True, timeout=60)
    assert failed.returncode != 0
    assert f"the supervisor exited with status 1: the filesystem holding {t.home.root} is full (0 bytes free), so " \
           "nothing it wrote was kept; see " in failed.stderr, failed.stderr
    with open(filler, "r+b") as f:  # room for the log, not for the store
        f.truncate(os.path.getsize(filler) - 4096)
    failed = subprocess.run(up, capture_output=True, text=True, timeout=60)
    assert failed.returncode != 0
    # SQLite's own words for it vary ("database or disk is full", "disk I/O error"): they are passed on.
    assert f"the supervisor exited with status 1: store: {t.home.store}: cannot open the event store: " \
        in failed.stderr, failed.stderr
    filler.unlink()
    assert subprocess.run(up, capture_output=True, text=True, timeout=60).returncode == 0
    with Client(t.home) as c:
        assert c.call("echo", b"back") == b"back"
        c.down()
    assert_verified(t)
