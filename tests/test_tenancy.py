"""Multi-tenant hosting: tenants on TCP with CurveZMQ, walled off from each other, bounded by quotas, metered.

A real supervisor listens on 127.0.0.1 (an ephemeral port) with its Prometheus
endpoint on; tenants are added by the operator over the local socket and reach it
only with the credentials `tenant add` returns, through real CurveZMQ handshakes.
Every wait is on a reply or on a counter with a deadline.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import zmq
from conftest import COMPONENTS, Theater, of, records, wait_running, wait_until
from prometheus_client.parser import text_string_to_metric_families

from supervisor._errors import Refused
from supervisor._timers import Timers
from supervisor._uploads import Stored, Uploads
from theater import wire
from theater.client import Client, ClientError, NotRunning
from theater.records import Kind
from theater.remote import Credentials, keypair

CLI = [sys.executable, "-m", "supervisor"]


@pytest.fixture
def hosted(short_root: Any) -> Any:
    """A supervisor serving tenants on TCP, with /metrics."""
    root = short_root("ten")
    t = Theater(root)
    t.start([sys.executable, "-m", "supervisor", "--home", str(t.home.root), "up",
             "--listen", "tcp://127.0.0.1:0", "--metrics", "127.0.0.1:0"])
    try:
        yield t
    finally:
        t.stop()


def add_tenant(t: Theater, name: str, **settings: Any) -> Credentials:
    public, secret = keypair()
    with t.client() as c:
        info = c.tenant_add(name, public, policies=settings.pop("policies", ["default", "messaging", "supervisor"]),
                            **settings)
    return Credentials(endpoint=info["endpoint"], server_key=info["server_key"], tenant=name, public_key=public,
                       secret_key=secret)


def tenant_client(creds: Credentials, timeout: float = 30.0) -> Client:
    return Client(credentials=creds, timeout=timeout)


def counter(t: Theater, name: str = "counter", **extra: Any) -> Path:
    return t.manifest(name, "counter.wat", **extra)


def denials(t: Theater, tenant: str) -> list[tuple[str, str]]:
    db = sqlite3.connect(f"file:{t.home.store}?mode=ro", uri=True)
    try:
        return db.execute("SELECT what, detail FROM denials WHERE tenant=? ORDER BY n", (tenant,)).fetchall()
    finally:
        db.close()


def refused_connections(t: Theater) -> int:
    with t.client() as c:
        return int(c.tenants()["refused_connections"])


# --- authentication ------------------------------------------------------------------------


def test_a_tenant_reaches_its_agents_over_tcp_and_sees_its_own_names(hosted: Theater) -> None:
    acme = add_tenant(hosted, "acme")
    with tenant_client(acme) as c:
        assert c.ping()["tenant"] == "acme"
        info = c.spawn(counter(hosted))
        assert info["name"] == "counter"
        assert c.call("counter", b"x") == b"1"
        assert [a["name"] for a in c.ps()] == ["counter"]
        assert [r.kind for r in c.events("counter")][:2] == [Kind.GENESIS, Kind.INIT]
    with hosted.client() as op:
        (row,) = op.ps()
        assert row["name"] == "acme:counter"
    genesis = records(hosted, "acme:counter")[0]
    assert json.loads(genesis.fields()["config"])["tenant"] == "acme"  # the genesis signs whose agent it is
    # The component came over the wire and is kept under its hash, never under a name the client chose.
    digest = json.loads(genesis.fields()["config"])["component_sha256"]
    assert (hosted.home.uploads / f"{digest}.wat").read_bytes() == (COMPONENTS / "counter.wat").read_bytes()


def test_clients_without_a_tenants_key_are_refused_before_any_request_is_read(hosted: Theater) -> None:
    acme = add_tenant(hosted, "acme")
    with tenant_client(acme) as c:
        c.spawn(counter(hosted))
    before = refused_connections(hosted)
    # A key the supervisor never heard of: refused at the handshake, and the client says so.
    public, secret = keypair()
    stranger = Credentials(acme.endpoint, acme.server_key, "acme", public, secret)
    with tenant_client(stranger) as c, pytest.raises(ClientError) as exc:
        c.ping()
    assert exc.value.code == "refused" and "refused this client's key" in str(exc.value)
    # The right client key but a forged server key: the client refuses to talk to an impostor.
    other_server, _ = keypair()
    with tenant_client(Credentials(acme.endpoint, other_server, "acme", acme.public_key, acme.secret_key)) as c, \
            pytest.raises(ClientError) as exc:
        c.ping()
    assert exc.value.code == "refused"
    # No CURVE at all: a plain socket's request is never read, let alone answered.
    ctx = zmq.Context.instance()
    plain = ctx.socket(zmq.DEALER)
    plain.linger = 0
    plain.connect(acme.endpoint)
    plain.send_multipart([wire.header(wire.ClientType.REQUEST), wire.encode_json({"op": "ps", "id": 1})])
    wait_until(lambda: refused_connections(hosted) >= before + 3, what="three refused handshakes counted")
    assert plain.poll(0) == 0
    plain.close(0)
    log = (hosted.dir / "supervisor.out").read_text()
    assert "refused a control connection" in log


def test_refused_handshakes_are_counted_exactly_and_logged_at_a_bounded_rate(hosted: Theater) -> None:
    """A client with no tenant's key, reconnecting as fast as it can, wrote a log line per refusal (about
    138 KiB/s, measured): someone who never authenticated could fill the disk. At most 10 a second are
    logged, a line a second tells how many more, and the count stays exact."""
    from supervisor._remote import REFUSALS_LOGGED_PER_SECOND

    acme = add_tenant(hosted, "acme")
    before = refused_connections(hosted)
    n = 160

    def stranger(_: int) -> None:  # a new client with a key nobody added, told of its refusal
        public, secret = keypair()
        with tenant_client(Credentials(acme.endpoint, acme.server_key, "acme", public, secret)) as c, \
                pytest.raises(ClientError, match="refused this client's key"):
            c.ping()

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(stranger, range(n)))
    wait_until(lambda: refused_connections(hosted) >= before + n, 30, what=f"{n} refused handshakes counted")
    seconds = time.monotonic() - started

    def logged() -> tuple[int, int]:
        lines = (hosted.dir / "supervisor.out").read_text().splitlines()
        each = sum("refused a control connection" in line for line in lines)
        told = [line.split("refused ", 1)[1].split(" more", 1)[0] for line in lines
                if "more control connections, not each logged" in line]
        return each, sum(int(k) for k in told)

    # Every refusal is either logged or told in a line once its second is over (that line may still come).
    wait_until(lambda: sum(logged()) >= refused_connections(hosted) - before, 10, what="the untold refusals told")
    each, told = logged()
    assert each + told == refused_connections(hosted) - before >= n
    assert each <= REFUSALS_LOGGED_PER_SECOND * (int(seconds) + 2), (each, seconds)


def test_a_tenants_large_frames_are_taken_or_refused_whole(hosted: Theater) -> None:
    """Frames longer than any JSON frame are read in place and copied only once taken: a message within the
    agent's limit arrives whole, one past it and an oversized JSON frame are refused by their length, and the
    connection, the agent and the supervisor go on."""
    mib = 1024 * 1024
    text = (COMPONENTS.parent.parent / "policies" / "default.toml").read_text()
    hosted.home.policies.mkdir(exist_ok=True)
    (hosted.home.policies / "bigmsg.toml").write_text(
        text.replace("max_message_bytes = 1048576 ", f"max_message_bytes = {4 * mib} "))
    big = add_tenant(hosted, "big", policies=["bigmsg"])
    with tenant_client(big) as c:
        c.spawn(hosted.manifest("echo", "echo.wat", policy="bigmsg", limits={"max_message_bytes": 4 * mib}))
        message = bytes(range(256)) * (3 * mib // 256) + b"tail"
        assert c.call("echo", message) == message
        with pytest.raises(ClientError) as refused:
            c.call("echo", b"x" * (5 * mib))
        assert (refused.value.code, str(refused.value)) == (
            "refused", f"message of {5 * mib} bytes exceeds echo's max_message_bytes {4 * mib}")
        assert c.send("echo", b"y" * (2 * mib))["queued"] >= 1
        with pytest.raises(ClientError) as local:  # the client does not send what would be answered with id 0
            c.request("ps", padding="z" * (2 * mib))
        assert local.value.code == "protocol" and str(local.value).startswith("request of ")
        assert str(local.value).endswith(f" bytes exceeds {mib}; nothing was sent"), str(local.value)
        assert c.call("echo", b"still here") == b"still here"
    # A JSON frame past its limit: answered (with id 0: its id could not be read), the connection still served.
    ctx = zmq.Context()
    try:
        raw = ctx.socket(zmq.DEALER)
        raw.linger = 0
        raw.curve_serverkey, raw.curve_publickey, raw.curve_secretkey = (
            big.server_key.encode(), big.public_key.encode(), big.secret_key.encode())
        raw.connect(big.endpoint)
        for request in ({"op": "ps", "id": 7, "padding": "z" * (2 * mib)}, {"op": "ping", "id": 8}):
            raw.send_multipart([wire.header(wire.ClientType.REQUEST), json.dumps(request).encode()])
            assert raw.poll(30_000), f"no answer to {request['op']}"
            reply = json.loads(raw.recv_multipart()[1])
            if request["op"] == "ps":
                assert (reply["id"], reply["error"]["code"]) == (0, "protocol"), reply
                assert reply["error"]["message"] == f"request of {len(json.dumps(request))} bytes exceeds {mib}"
            else:
                assert (reply["id"], reply["ok"], reply["result"]["tenant"]) == (8, True, "big"), reply
        raw.close(0)
    finally:
        ctx.term()


def test_a_removed_tenants_key_stops_working_and_its_agents_stop(hosted: Theater) -> None:
    acme = add_tenant(hosted, "acme")
    c = tenant_client(acme)
    try:
        c.spawn(counter(hosted))
        with hosted.client() as op:
            assert op.tenant_remove("acme") == {"removed": "acme", "stopped": 1}
            assert op.ps()[0]["status"] == "stopped"  # the chain stays, for audit
        refused_before = refused_connections(hosted)
        with pytest.raises(ClientError) as exc:  # a connection made before the removal: refused per request
            c.ps()
        assert exc.value.code == "refused"
        assert refused_connections(hosted) == refused_before  # a request refused, not a handshake
        with tenant_client(acme) as fresh, pytest.raises(ClientError) as exc2:  # a new one: refused at the handshake
            fresh.ps()
        assert exc2.value.code == "refused"
        with pytest.raises(ClientError) as exc3:  # a new tenant of that name would inherit the old one's agents
            add_tenant(hosted, "acme")
        assert "still in the home" in str(exc3.value)
        with hosted.client() as op:
            op.remove("acme:counter")
        successor = add_tenant(hosted, "acme")  # the name given to someone else, with a key of their own
        with tenant_client(successor) as theirs:
            theirs.spawn(counter(hosted, "secret"))
            # The old connection, still open, proved the old key: it gets nothing of the new tenant's.
            for ask in (c.ps, lambda: c.call("secret", b"x"), lambda: c.stop("secret")):
                with pytest.raises(ClientError) as exc4:
                    ask()
                assert exc4.value.code == "refused" and "not with this connection's key" in str(exc4.value)
            assert theirs.call("secret", b"x") == b"1"  # untouched: the first call it got
    finally:
        c.close()


# --- walls between tenants -----------------------------------------------------------------


def test_a_tenant_s_errors_lose_only_its_own_prefix_and_its_agents_may_be_named_like_ids(hosted: Theater) -> None:
    """Errors reach a tenant with its agents' names as it writes them: only a prefix that begins a name is
    dropped (a tenant named `d` lost the `d:` of "reached:"). And an agent named like a UUID is its own
    agent's name first (the name was taken for an id, and not found)."""
    d = add_tenant(hosted, "d", quotas={"agents": 1})
    named_like_an_id = "12345678123456781234567812345678"
    with tenant_client(d) as c:
        c.spawn(counter(hosted, named_like_an_id))
        assert c.call(named_like_an_id, b"x") == b"1"
        with pytest.raises(ClientError) as exc:
            c.spawn(counter(hosted, "two"))
        assert str(exc.value) == "tenant d's quota agents (1) is reached: 1 running, 1 more asked", exc.value
        with pytest.raises(ClientError) as missing:
            c.call("nosuch", b"x")
        assert str(missing.value) == "no agent named or with id 'nosuch'"
        before = denials(hosted, "d")
        with pytest.raises(ClientError) as full:  # its own agent by its full name: a hint, and no denial
            c.call(f"d:{named_like_an_id}", b"x")
        assert full.value.code == "not-found"
        assert str(full.value) == f"a tenant names its own agents without its prefix: '{named_like_an_id}'"
        assert denials(hosted, "d") == before


def test_a_tenant_s_component_is_at_most_64_mib() -> None:
    """The data frame may be a little longer than a component (the socket's limit has room for the JSON): the
    request itself says 64 MiB, as tenancy.md does."""
    from theater import control

    text = 'name = "a"\ncomponent = "a.wasm"\n'
    body = {"manifest_text": text, "component_kind": "wasm"}
    assert isinstance(control.decode_request("spawn", body, bytearray(control.MAX_UPLOAD_BYTES)), control.Upload)
    with pytest.raises(control.BadRequest, match=r"a component of 67108865 bytes is more than 67108864 \(64 MiB\)"):
        control.decode_request("spawn", body, bytearray(control.MAX_UPLOAD_BYTES + 1))


def test_a_tenant_cannot_touch_another_tenants_agents(hosted: Theater) -> None:
    acme, bob = add_tenant(hosted, "acme"), add_tenant(hosted, "bob")
    with tenant_client(acme) as a:
        agent_id = a.spawn(counter(hosted))["id"]
        a.call("counter", b"x")
    with tenant_client(bob) as b:
        assert b.ps() == [] and b.tree() == []
        top = b.top()
        assert top["agents"] == [] and top["tenants"] == [] and "supervisor" not in top
        with pytest.raises(ClientError) as exc:  # a tenant cannot spawn as another: `tenant` is the operator's
            b.request("spawn", manifest=str(counter(hosted)), tenant="acme")
        assert exc.value.code == "refused"
        for ref in ("counter", agent_id, "acme:counter"):
            for attempt in (lambda r: b.call(r, b"x"), lambda r: b.send(r, b"x"), lambda r: b.stop(r),
                            lambda r: b.restart(r), lambda r: b.events(r), lambda r: b.remove(r),
                            lambda r: b.wait_events(r, 0, 0), lambda r: b.verify(r)):
                with pytest.raises(ClientError) as exc:
                    attempt(ref)
                assert exc.value.code == "not-found", (ref, exc.value)
                assert "forbidden" not in str(exc.value)
        assert b.verify() == []  # bob's own chains: none
        for op, args in (("down", {}), ("checkpoint", {}), ("gc", {}), ("rotate-key", {}), ("tenant-list", {}),
                         ("tenant-add", {"name": "acme"}), ("tenant-rm", {})):  # refused before its arguments are read
            with pytest.raises(ClientError) as exc:
                b.request(op, **args)
            assert exc.value.code == "refused" and "only the operator" in str(exc.value), (op, exc.value)
        for odd in ([], {}, ["down"]):  # an op of the wrong kind is an unknown operation, for a tenant too
            with pytest.raises(ClientError) as exc:
                b.request(odd)  # type: ignore[arg-type]
            assert exc.value.code == "refused" and "unknown operation" in str(exc.value), (odd, exc.value)
        with pytest.raises(ClientError) as exc:  # spawning is limited to the tenant's policies
            b.spawn(counter(hosted, "big", policy="strict"))
        assert "may not spawn under policy 'strict'" in str(exc.value)
        with pytest.raises(ClientError) as exc:  # a tenant names no path on the supervisor's machine
            b.request("spawn", manifest=str(counter(hosted)))
        assert "never a path" in str(exc.value)
        with pytest.raises(ClientError) as exc:
            b.usage("acme")
        assert exc.value.code == "not-found"
    with tenant_client(acme) as a:
        assert a.call("counter", b"x") == b"2"  # untouched
    # Every refusal is counted; they are stored up to 10 a second per tenant (a flood of refusals cannot fill
    # the disk), so the first ones are in the store.
    with hosted.client() as op:
        (entry,) = [t for t in op.tenants()["tenants"] if t["name"] == "bob"]
    assert entry["denials"] >= 16 + 5 + 1 + 1
    stored = [what for what, _ in denials(hosted, "bob")]
    assert len(stored) >= 10 and stored[:10] == ["not-found"] * 10


def test_an_uploaded_manifest_reaches_no_file_of_the_supervisors(hosted: Theater) -> None:
    acme = add_tenant(hosted, "acme")
    text = f'name = "sneak"\ncomponent = "counter.wat"\npolicy = "supervisor"\ncapabilities = ["runtime", "supervision"]\n' \
           f'[supervision]\ntemplates = [{{name = "w", component = "{COMPONENTS / "echo.wat"}"}}]\n'
    with tenant_client(acme) as c:
        with pytest.raises(ClientError) as exc:
            c.request("spawn", (COMPONENTS / "counter.wat").read_bytes(), manifest_text=text, component_kind="wat")
        assert "must name the agent's own component" in str(exc.value)
        tree = 'name = "t"\nstrategy = "one_for_one"\nchildren = [{manifest = "/etc/passwd"}]\n'
        with pytest.raises(ClientError) as exc:
            c.request("spawn", b"(component)", manifest_text=tree, component_kind="wat")
        assert "send one agent manifest per spawn" in str(exc.value)


def test_a_tenants_component_is_kept_only_while_an_agent_uses_it(hosted: Theater) -> None:
    """Every spawn of a tenant stores its component; a spawn refused after that (a quota, a bad manifest)
    deletes it again, and so do ``rm`` and ``spawn --replace`` of the last agent that used one (with the
    artifact compiled for it), and a start sweeps what a crash left: a tenant cannot fill the disk."""
    up = add_tenant(hosted, "up", quotas={"agents": 1})
    uploads, cache = hosted.home.uploads, hosted.home.root / "cache"

    def variant(name: str, n: int, extra: str = "") -> Path:
        component = hosted.dir / f"{name}-{n}.wat"
        component.write_text((COMPONENTS / "counter.wat").read_text() + f"\n;; variant {n}\n")
        manifest = hosted.dir / f"{name}.toml"
        manifest.write_text(f'name = "{name}"\ncomponent = "{component.name}"\n{extra}')
        return manifest

    def artifacts() -> set[str]:
        return {p.name for p in cache.glob("*.cwasm")}

    before = artifacts()
    with tenant_client(up) as c:
        c.spawn(variant("a", 1))
        assert c.call("a", b"x") == b"1"
        [first] = list(uploads.iterdir())
        compiled = artifacts() - before
        assert len(compiled) == 1
        with pytest.raises(ClientError) as exc:
            c.spawn(variant("b", 2))
        assert exc.value.code == "quota"
        with pytest.raises(ClientError) as exc:
            c.spawn(variant("c", 3, "colour = 1\n"))
        assert exc.value.code == "config" and "colour" in str(exc.value)
        assert list(uploads.iterdir()) == [first]
        c.stop("a")
        c.spawn(variant("a", 4), replace=True)  # the new component in, the old one and its artifact out
        assert c.call("a", b"x") == b"1"
        [second] = list(uploads.iterdir())
        assert second != first and not compiled & artifacts()
        c.stop("a")
        c.remove("a")
        assert list(uploads.iterdir()) == []
        assert artifacts() == before
    hosted.kill()
    (uploads / ("0" * 64 + ".wat")).write_bytes(b"(component)")
    hosted.start([sys.executable, "-m", "supervisor", "--home", str(hosted.home.root), "up",
                  "--listen", "tcp://127.0.0.1:0", "--metrics", "127.0.0.1:0"])
    assert list(uploads.iterdir()) == []


def test_uploads_are_stored_off_the_loop_one_per_requester_and_never_swept_on_their_way(tmp_path: Path) -> None:
    """A tenant's component is hashed and written on a thread (64 MiB of it stalled every agent's calls for a
    few hundred milliseconds); a requester has one on its way at a time; and a sweep never deletes one stored
    for a spawn that has not yet given it to its agent."""
    timers = Timers()
    uploads = Uploads(tmp_path / "uploads", timers)
    outcomes: dict[str, Stored] = {}
    swept: list[list[str]] = []

    def then(requester: str) -> Callable[[Future[Stored]], None]:
        def done(job: Future[Stored]) -> None:
            outcomes[requester] = job.result()
            swept.append(uploads.unused([]))  # stored, not yet settled: kept
        return done

    try:
        uploads.store("acme", b"(component)", "wat", then("acme"))
        with pytest.raises(Refused, match="still being stored"):
            uploads.store("acme", b"(component) ;; another", "wat", then("acme"))
        uploads.store("bob", b"(component) ;; bob", "wat", then("bob"))
        wait_until(lambda: timers.run_due() or len(outcomes) == 2, 30, "both uploads stored")
        assert swept == [[], []]
        for requester, text in (("acme", b"(component)"), ("bob", b"(component) ;; bob")):
            stored = outcomes[requester]
            assert stored.path.read_bytes() == text and stored.sha256 == hashlib.sha256(text).hexdigest()
            assert stored.path.name == f"{stored.sha256}.wat" and stat.S_IMODE(stored.path.stat().st_mode) == 0o600
        uploads.store("acme", b"(component) ;; again", "wat", then("again"))  # the first is answered
        wait_until(lambda: timers.run_due() or "again" in outcomes, 30, "the next upload stored")
        uploads.settled(outcomes["acme"].path.name)
        assert uploads.unused([str(outcomes["bob"].path)]) == [outcomes["acme"].path.name]
    finally:
        uploads.close()


def test_messages_cross_tenants_only_where_both_allow_the_route(hosted: Theater) -> None:
    acme = add_tenant(hosted, "acme", routes=["bob", "carol"])
    bob = add_tenant(hosted, "bob")
    carol = add_tenant(hosted, "carol", routes=["acme"])
    caps = {"policy": "messaging", "capabilities": ["runtime", "messaging"]}
    for creds in (acme, bob, carol):
        with tenant_client(creds) as c:
            c.spawn(hosted.manifest("m", "messenger.wat", **caps))
    with hosted.client() as op:
        ids = {a["name"]: a["id"] for a in op.ps()}
    with tenant_client(acme) as a:
        # bob lists no route: bob's agent is not found, exactly as one that does not exist
        assert a.call("m", f"send:{ids['bob:m']}:hi".encode()) == \
            f"err:unknown-address:no agent named or with id '{ids['bob:m']}'".encode()
        assert a.call("m", b"send:m:hi") == b"ok"  # its own agent, by its short name
    with tenant_client(bob) as b:
        assert b.call("m", f"send:{ids['acme:m']}:hi".encode()).startswith(b"err:unknown-address")
    with tenant_client(carol) as c:
        assert c.call("m", f"send:{ids['acme:m']}:from-carol".encode()) == b"ok"  # both list each other
    with tenant_client(acme) as a:
        state = a.call("m", b"state")
        assert state is not None and b"=from-carol" in state
    assert [w for w, _ in denials(hosted, "acme")].count("route") == 1
    assert [w for w, _ in denials(hosted, "bob")].count("route") == 1


# --- quotas ----------------------------------------------------------------------------------


def _until_refused(fn: Any, limit: int = 500) -> ClientError:
    for _ in range(limit):
        try:
            fn()
        except ClientError as exc:
            return exc
    raise AssertionError(f"not refused within {limit} tries")


def test_every_quota_is_enforced(hosted: Theater) -> None:
    q = add_tenant(hosted, "q", quotas={"agents": 1})
    with tenant_client(q) as c:
        c.spawn(counter(hosted, "one"))
        with pytest.raises(ClientError) as exc:
            c.spawn(counter(hosted, "two"))
        assert exc.value.code == "quota" and "quota agents (1)" in str(exc.value)

    mem = add_tenant(hosted, "mem", quotas={"memory_bytes": 1024 * 1024})
    with tenant_client(mem) as c, pytest.raises(ClientError) as exc:
        c.spawn(counter(hosted, "m"))
    assert exc.value.code == "quota" and "quota memory_bytes" in str(exc.value)

    fuel = add_tenant(hosted, "fuel", quotas={"fuel_per_second": 100})  # each counter call burns ~300
    with tenant_client(fuel) as c:
        c.spawn(counter(hosted, "f"))
        exc = _until_refused(lambda: c.call("f", b"x"))
        assert exc.code == "quota" and "quota fuel_per_second" in str(exc)

    rate = add_tenant(hosted, "rate", quotas={"calls_per_second": 3})
    with tenant_client(rate) as c:
        c.spawn(counter(hosted, "r"))
        exc = _until_refused(lambda: c.send("r", b"x"))
        assert exc.code == "quota" and "quota calls_per_second" in str(exc)

    talk = add_tenant(hosted, "talk", quotas={"calls_per_second": 3})  # an agent's message to its agents counts
    with tenant_client(talk) as c:
        for name in ("a", "b"):
            c.spawn(hosted.manifest(name, "messenger.wat", policy="messaging", capabilities=["runtime", "messaging"]))
        replies: list[bytes | None] = []

        def a_call_taken() -> bool:  # refused (quota) until the bucket is above zero again, then taken
            with contextlib.suppress(ClientError):
                replies.append(c.call("a", b"send:b:x"))
            return any(r != b"ok" for r in replies)

        # Each taken call takes a token, and so does its send: the bucket of 3 is below zero after two. The next
        # call is taken once it is just above zero, and takes it below zero again: that call's send is refused.
        wait_until(a_call_taken, what="a send refused")
        reply = replies[-1]
        a_id = next(agent["id"] for agent in c.ps() if agent["name"] == "a")
    answered = of(records(hosted, a_id), Kind.HOST_CALL)[-1].fields()["output"]
    assert answered.startswith(b'{"detail":"tenant talk') and b'"error":"denied"' in answered  # as the guest got it
    assert reply is not None and reply.startswith(b"err:denied:tenant talk's quota calls_per_second"), reply

    kv = add_tenant(hosted, "kv", quotas={"kv_bytes": 100})
    with tenant_client(kv) as c:
        c.spawn(hosted.manifest("k", "keeper.wat", policy="messaging", capabilities=["runtime", "kv"]))
        assert c.call("k", b"set:a:" + b"v" * 50) == b"ok"
        reply = c.call("k", b"set:b:" + b"v" * 60)
        assert reply is not None and reply.startswith(b"err:") and b"quota kv_bytes (100)" in reply

    day = add_tenant(hosted, "day", quotas={"record_bytes_per_day": 8000})
    with tenant_client(day) as c:
        c.spawn(counter(hosted, "d"))
        exc = _until_refused(lambda: c.call("d", b"x"))
        assert exc.code == "quota" and "quota record_bytes_per_day" in str(exc)

    kids = add_tenant(hosted, "kids", quotas={"children": 1})
    from test_capability import parent_manifest

    with hosted.client() as op:  # the operator spawns a tree-shaped agent for a tenant from its own disk
        op.spawn(parent_manifest(hosted), tenant="kids")
    with tenant_client(kids) as c:
        first = c.call("parent", b"spawn:worker:w1")
        assert first is not None and uuid.UUID(first.decode())
        second = c.call("parent", b"spawn:worker:w2")
        assert second is not None and b"quota children (1)" in second
    for tenant, quota in (("q", "agents"), ("mem", "memory_bytes"), ("fuel", "fuel_per_second"),
                          ("rate", "calls_per_second"), ("kv", "kv_bytes"), ("day", "record_bytes_per_day"),
                          ("kids", "children")):
        assert f"quota {quota}" in [w for w, _ in denials(hosted, tenant)], tenant


# --- usage and metrics -------------------------------------------------------------------------


def _metrics(t: Theater) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with t.client() as c:
        url = c.ping()["metrics"]
    text = httpx.get(url, timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_parse_and_match_the_agents_records(hosted: Theater) -> None:
    acme = add_tenant(hosted, "acme")
    with tenant_client(acme) as c:
        c.spawn(counter(hosted))
        c.send("counter", b"y")  # a mailbox is first in, first out: the calls after it commit after it
        for _ in range(5):
            c.call("counter", b"x")
        with pytest.raises(ClientError):
            c.call("nobody", b"x")
    chain = records(hosted, "acme:counter")
    labels = (("agent", "acme:counter"), ("tenant", "acme"))
    seen: list[Any] = []
    wait_until(lambda: seen.append(_metrics(hosted).get(("theater_agent_records_total", labels))) or
               seen[-1] == len(chain), what=f"the metrics snapshot to catch up ({len(chain)} records; {seen[-3:]})")
    m = _metrics(hosted)
    assert m[("theater_agent_calls_total", labels)] == len(of(chain, Kind.HANDLE)) == 6
    assert m[("theater_agent_record_bytes_total", labels)] == sum(len(r.raw) for r in chain)
    fuel = sum(r.fields()["fuel"] for r in chain if r.kind in (Kind.INIT, Kind.HANDLE))
    assert m[("theater_agent_fuel_total", labels)] == fuel > 0
    assert m[("theater_agent_memory_rss_bytes", labels)] > 0
    assert m[("theater_tenant_records_total", (("tenant", "acme"),))] == len(chain)
    assert m[("theater_supervisor_records_total", ())] >= len(chain)
    assert m[("theater_supervisor_worker_spawns_total", ())] >= 1
    assert m[("theater_supervisor_commits_total", ())] >= 1
    assert m[("theater_supervisor_gc_seconds_total", ())] > 0  # young collections, at least, have run
    assert m[("theater_supervisor_gc_full_collections_total", ())] >= 0


def test_the_metrics_snapshot_made_a_slice_of_agents_a_turn_holds_every_agent(short_root: Any) -> None:
    """The loop makes the /metrics snapshot a few agents a turn (thousands at once held it for milliseconds
    every second): here two a turn, so five agents take three turns, and each one's figures are there."""
    t = Theater(short_root("slices"))
    t.start([sys.executable, str(Path(__file__).parent / "run_sliced_metrics_supervisor.py"), str(t.home.root)])
    try:
        with t.client() as c:
            for i in range(5):
                c.spawn(counter(t, f"c{i}"))
                for _ in range(i + 1):
                    c.call(f"c{i}", b"x")
        want = {f"c{i}": i + 1 for i in range(5)}
        seen: list[Any] = []

        def calls() -> dict[str, float]:
            m = _metrics(t)
            return {dict(labels)["agent"]: v for (name, labels), v in m.items() if name == "theater_agent_calls_total"}

        wait_until(lambda: seen.append(calls()) or seen[-1] == want, what=f"every agent's calls in /metrics ({seen[-1:]})")
        assert _metrics(t)[("theater_supervisor_agents", ())] == 5
    finally:
        t.stop()


def test_usage_reports_what_the_store_holds_and_survives_a_restart(hosted: Theater) -> None:
    acme = add_tenant(hosted, "acme")
    with tenant_client(acme) as c:
        c.spawn(counter(hosted))
        for _ in range(3):
            c.call("counter", b"x")
        pid = c.ps()[0]["pid"]
    with hosted.client() as op:
        op.restart("acme:counter")
        wait_running(op, "acme:counter", old_pid=pid)
    chain = records(hosted, "acme:counter")
    with tenant_client(acme) as c:
        report = c.usage()
    assert report["tenant"] == "acme"
    (row,) = report["agents"]
    assert row["name"] == "counter" and row["calls"] == 3  # as the tenant names it
    assert row["records"] == len(chain) and row["record_bytes"] == sum(len(r.raw) for r in chain)
    assert row["workers"] == 2  # the first and the restarted one
    assert row["cpu_ns"] > 0 and row["peak_rss"] > 0  # the first worker's, from wait4, kept in the store
    out = subprocess.run([*CLI, "--home", str(hosted.home.root), "usage", "--tenant", "acme", "--since", "1h",
                          "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["total"]["calls"] == 3
    top = subprocess.run([*CLI, "--home", str(hosted.home.root), "top", "--json"], capture_output=True, text=True,
                         check=True)
    snapshot = json.loads(top.stdout)
    assert [a["name"] for a in snapshot["agents"]] == ["acme:counter"]
    assert snapshot["tenants"][0]["tenant"] == "acme" and snapshot["supervisor"]["spawns_total"] >= 2


def test_top_follows_each_live_worker_though_it_reads_them_a_slice_at_a_time(theater: Theater) -> None:
    """`top` (and the /metrics snapshot) take a live worker's CPU and memory from a sampler that reads a
    slice of the workers each turn while someone watches, never all of them in one turn: the figures are
    there for every running worker and follow one as it works."""
    with theater.client() as c:
        for name in ("a", "b"):
            c.spawn(theater.manifest(name, "counter.wat"))
        first = {r["name"]: r for r in c.top()["agents"]}
        assert all(r["pid"] and r["rss_bytes"] > 0 and r["peak_rss_bytes"] >= r["rss_bytes"] for r in first.values())

        def grew() -> bool:
            for _ in range(100):
                c.call("a", b"x")
            return next(r for r in c.top()["agents"] if r["name"] == "a")["cpu_s"] > first["a"]["cpu_s"]

        wait_until(grew, 120, "a's CPU in top to grow as it works")


def test_an_ended_workers_usage_is_stored_with_its_exit_record(theater: Theater) -> None:
    """A worker's CPU time and peak memory (from wait4) are written in the transaction that commits its exit
    record, not in a commit of their own: once the exit is durable, so are they, through a SIGKILL of the
    supervisor."""
    with theater.client() as c:
        c.spawn(theater.manifest("counter", "counter.wat"))
        c.call("counter", b"x")
        pid = c.ps()[0]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_running(c, "counter", old_pid=pid)
    assert [r.kind for r in records(theater, "counter")].count(Kind.EXIT) == 1
    theater.kill()
    with sqlite3.connect(theater.home.store) as db:
        rows = db.execute("SELECT cpu_ns, peak_rss FROM worker_usage").fetchall()
    assert len(rows) == 1 and rows[0][0] > 0 and rows[0][1] > 0, rows


def test_the_cli_makes_credentials_a_tenant_uses(hosted: Theater) -> None:
    key = hosted.dir / "acme.key"
    out = subprocess.run([*CLI, "--home", str(hosted.home.root), "tenant", "add", "acme", "--policy", "default",
                          "--quota", "agents=3", "-o", str(key)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert key.stat().st_mode & 0o777 == 0o600
    spawn = subprocess.run([*CLI, "--remote", str(key), "spawn", str(counter(hosted))], capture_output=True,
                           text=True)
    assert spawn.returncode == 0, spawn.stderr
    call = subprocess.run([*CLI, "--remote", str(key), "call", "counter", "x"], capture_output=True, text=True)
    assert call.stdout.strip() == "1", call.stderr
    listed = subprocess.run([*CLI, "--home", str(hosted.home.root), "tenant", "list", "--json"], capture_output=True,
                            text=True, check=True)
    (t,) = json.loads(listed.stdout)["tenants"]
    assert t["name"] == "acme" and t["quotas"] == {"agents": 3} and t["running"] == 1
    text = subprocess.run([*CLI, "--home", str(hosted.home.root), "tenant", "list"], capture_output=True, text=True,
                          check=True).stdout.splitlines()
    assert text[1].split()[0] == "acme" and text[1].endswith("default / no routes / agents=3"), text
    bad = subprocess.run([*CLI, "--home", str(hosted.home.root), "tenant", "add", "x", "--quota", "cpu=1",
                          "-o", str(hosted.dir / "x.key")], capture_output=True, text=True)
    assert bad.returncode == 2 and "--quota 'cpu=1'" in bad.stderr


def test_a_local_supervisor_without_listen_still_serves_the_operator(theater: Theater) -> None:
    with theater.client() as c:
        info = c.ping()
        assert info["listen"] is None and info["metrics"] is None and info["tenant"] == "operator"
    with pytest.raises(NotRunning):
        Client(theater.dir / "nowhere", timeout=1)


def test_a_tenant_s_hourly_record_tally_keeps_one_day_without_the_quota() -> None:
    """Every commit adds to its tenant's hourly tally of record bytes; only the `record_bytes_per_day` check
    forgot hours past a day, so a tenant without that quota kept one entry per hour of uptime for good."""
    from supervisor._tenants import HOUR_NS, _Account

    account, start = _Account(), 1_800_000_000 * 10**9
    for hour in range(24 * 30):  # a commit an hour for 30 days, and no quota reading the tally
        account.add_record_bytes(start + hour * HOUR_NS, 100)
    assert len(account.record_hours) == 24
    assert account.record_bytes_today(start + (24 * 30 - 1) * HOUR_NS) == 24 * 100
