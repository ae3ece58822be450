"""Fuzzing every parser that reads bytes from someone untrusted, with Hypothesis, on a bounded budget.

Each parser must answer arbitrary input with its own typed error and nothing
else: records and RESULT frames from a worker, control requests from a client,
the fork-server's messages and a worker's bootstrap, manifests and policies.
A live supervisor is also sent arbitrary frames on its control socket and
must keep answering. A longer run: ``scripts/fuzz``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from typing import Any

import pytest
import zmq
from conftest import Theater
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor._config import load_any, policy_dirs
from supervisor._errors import ConfigError
from theater import control, forkserver, wire
from theater.errors import BadRequest, ProtocolError, RecordError
from theater.records import HEADER, SIGNATURE_BYTES, VERSION, Record

EXAMPLES = int(os.environ.get("THEATER_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)


@st.composite
def record_like(draw: Any) -> bytes:
    """Bytes shaped like a record often enough to get past the first checks."""
    payload = draw(st.binary(max_size=200))
    header = bytes([VERSION, draw(st.integers(0, 20)), draw(st.integers(0, 3))]) + draw(st.binary(min_size=96,
                                                                                                   max_size=96))
    length = draw(st.sampled_from([len(payload), len(payload) + 1, draw(st.integers(0, 2**32 - 1))]))
    return header + length.to_bytes(4, "big") + payload + draw(st.binary(min_size=SIGNATURE_BYTES,
                                                                         max_size=SIGNATURE_BYTES))


@FUZZ
@given(st.one_of(st.binary(max_size=400), record_like()))
def test_record_parse_raises_only_record_error(raw: bytes) -> None:
    try:
        record = Record.parse(raw)
    except RecordError:
        return
    assert len(record.raw) >= HEADER + SIGNATURE_BYTES
    with contextlib.suppress(RecordError):
        record.fields()


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=8), st.integers(0, 2000))
def test_result_decode_raises_only_protocol_error(frames: list[bytes], max_records: int) -> None:
    with contextlib.suppress(ProtocolError):
        wire.Result.decode(frames, max_records=max_records)


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=4))
def test_worker_frames_raise_only_protocol_error(frames: list[bytes]) -> None:
    for decode in (wire.Hello.decode, wire.Call.decode, lambda f: wire.HostRequest.decode(f, "host request")):
        with contextlib.suppress(ProtocolError):
            decode(frames)
    for frame in frames[:1]:
        with contextlib.suppress(ProtocolError):
            wire.parse_header(frame, wire.WorkerType)


@FUZZ
@given(json_values, json_values, st.one_of(st.none(), st.binary(max_size=32)))
def test_control_requests_raise_only_bad_request(op: Any, body: Any, data: bytes | None) -> None:
    ops = ["ping", "spawn", "send", "call", "ps", "tree", "stop", "restart", "wait", "events", "verify", "down"]
    for name in [op, *ops]:
        with contextlib.suppress(BadRequest):
            control.decode_request(name, body if isinstance(body, dict) else {"agent": body}, data)


@FUZZ
@given(st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode())))
def test_fork_server_messages_raise_only_protocol_error(data: bytes) -> None:
    for decode in (forkserver.Boot.decode, forkserver.decode_from_fork_server, forkserver.decode_to_fork_server):
        with contextlib.suppress(ProtocolError):
            decode(data)


toml_keys = st.sampled_from(["name", "component", "policy", "strategy", "children", "limits", "restart", "manifest",
                             "init_args", "capabilities", "intensity", "period_ms", "type", "shutdown", "from",
                             "memory_bytes", "hardening", "required", "supervision", "templates", "x"])
toml_scalars = st.one_of(st.integers(-5, 10**7), st.text(max_size=12), st.booleans(),
                         st.lists(st.text(max_size=8), max_size=3))


@st.composite
def manifests(draw: Any) -> str:
    lines = [f"{draw(toml_keys)} = {json.dumps(draw(toml_scalars))}" for _ in range(draw(st.integers(0, 6)))]
    for _ in range(draw(st.integers(0, 2))):
        lines.append(f"[{draw(toml_keys)}]")
        lines += [f"{draw(toml_keys)} = {json.dumps(draw(toml_scalars))}" for _ in range(draw(st.integers(0, 3)))]
    if draw(st.booleans()):
        lines.append(draw(st.text(max_size=40)))
    return "\n".join(lines) + "\n"


@FUZZ
@given(manifests())
def test_manifests_raise_only_config_error(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    directory = tmp_path_factory.mktemp("m")
    (directory / "c.wat").write_text("(component)")
    path = directory / "m.toml"
    path.write_text(text.replace('"c"', '"c.wat"'))
    with contextlib.suppress(ConfigError):
        load_any(path, policy_dirs(None))


def test_a_live_supervisor_survives_arbitrary_control_frames(theater: Theater) -> None:
    """Random frames and random JSON (a fixed seed, so a failure replays) on the real control socket: the
    supervisor keeps answering, and a real agent keeps serving."""
    manifest = theater.manifest("echo", "echo.wat")
    with theater.client() as c:
        c.spawn(str(manifest))
        token = theater.home.token.read_text().strip()
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(theater.home.control_endpoint)
        rng = random.Random(20261205)
        header = wire.header(wire.ClientType.REQUEST)
        ops = ["ping", "spawn", "send", "call", "ps", "tree", "stop", "restart", "wait", "events", "verify", "zap"]
        sent = 0
        try:
            for i in range(EXAMPLES):
                kind = i % 4
                if kind == 0:
                    frames = [rng.randbytes(rng.randrange(0, 40)) for _ in range(rng.randrange(1, 5))]
                elif kind == 1:
                    frames = [header, rng.randbytes(rng.randrange(0, 80))]
                else:
                    body: dict[str, Any] = {"op": rng.choice(ops), "id": i, "token": token if kind == 2 else "bad"}
                    for key in ("agent", "after", "wait_ms", "timeout_ms", "manifest"):
                        if rng.random() < 0.5:
                            body[key] = rng.choice([None, -1, 0, 2**70, "echo", "nobody", "/dev/zero", [], {}, 1.5])
                    if body["op"] in ("stop", "restart", "down"):
                        body["op"] = "ps"  # keep the agent and the supervisor up for the checks below
                    if body["op"] == "wait":
                        body["wait_ms"] = 0
                    frames = [header, json.dumps(body).encode()]
                sock.send_multipart(frames)
                sent += 1
            assert c.ping()["pid"] > 0
            assert c.call("echo", b"after the fuzz") == b"after the fuzz"
        finally:
            sock.close(0)
    assert sent == EXAMPLES
    assert theater.proc is not None and theater.proc.poll() is None
