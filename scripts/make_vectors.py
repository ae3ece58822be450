#!/usr/bin/env python3
"""Generate Theater's golden test vectors: ``tests/vectors/records.json`` and ``frames.json``.

``records-v1.json`` beside them holds the version-1 vectors this script wrote before
covered records existed; it is kept as it was, since version-1 chains must still verify.

Everything is deterministic: fixed Ed25519 seeds (Ed25519 signing is itself
deterministic), a fixed agent id and fixed times, so running this twice gives
byte-identical files. ``--check`` regenerates in memory and exits 1 if the files
on disk differ (use it in CI so the vectors cannot drift from the code).

    python scripts/make_vectors.py            # (re)write the vector files
    python scripts/make_vectors.py --check    # verify they are up to date
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from theater import wire  # noqa: E402
from theater.capabilities import CAPABILITIES  # noqa: E402
from theater.records import (  # noqa: E402
    COVERABLE,
    DOMAIN,
    FIELDS,
    HEADER,
    VERSION,
    ZERO_HASH,
    Kind,
    Record,
    Signer,
    encode_payload,
    sha256,
    sign_record,
)
from theater.spec import AgentSpec, Limits  # noqa: E402

VECTORS = ROOT / "tests" / "vectors"

SEEDS = {
    "supervisor": bytes(range(32)),
    "worker-0": bytes(range(32, 64)),
    "worker-1": bytes(range(64, 96)),
}
CHILD_UUID = "00112233-4455-6677-8899-aabbccddee01"
MESSAGE_ID = bytes(range(0x30, 0x40))  # a message id as the supervisor chooses one (16 bytes)
AGENT_UUID = "00112233-4455-6677-8899-aabbccddeeff"
AGENT_ID = uuid.UUID(AGENT_UUID).bytes
OTHER_AGENT_ID = uuid.UUID("ffeeddcc-bbaa-9988-7766-554433221100").bytes
T0 = 1_700_000_000_000_000_000  # 2023-11-14T22:13:20Z, in ns
RUNTIME = CAPABILITIES["runtime"].interface
CONFINEMENT = wire.encode_json({"landlock": "enforced", "no_new_privs": "on", "seccomp": "enforced"}).decode()
COMPONENT_SHA256 = sha256(b"(component)")  # stands in for a real component's digest


def key(name: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(SEEDS[name])


def public(name: str) -> bytes:
    return key(name).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def time_of(seq: int) -> int:
    return T0 + seq * 1_000_000


# --- the valid chain --------------------------------------------------------------

def chain_plan() -> list[tuple[str, Kind, dict[str, Any], bytes | None]]:
    """(signing key, kind, fields, state after it or None if unchanged) for each record."""
    limits_doc = {"fuel_per_call": 500000000, "memory_bytes": 67108864}
    config = wire.encode_json({"name": "counter", "policy": "default", "limits": limits_doc}).decode()
    return [
        ("supervisor", Kind.GENESIS, {
            "name": "counter", "component_sha256": COMPONENT_SHA256, "config": config,
            "worker_key": public("worker-0"), "confinement": CONFINEMENT,
        }, b""),
        ("worker-0", Kind.INIT, {"args": b"41", "status": "ok", "error": "", "fuel": 1234}, b"41"),
        ("worker-0", Kind.LOG, {"level": "info", "message": "tick", "truncated": 0}, None),
        ("worker-0", Kind.HOST_CALL, {
            "interface": RUNTIME, "function": "now", "input": b"",
            "output": (T0 + 3_500_000).to_bytes(8, "big"),
        }, None),
        ("worker-0", Kind.HANDLE, {"message": b"hi", "reply": b"42", "status": "ok", "error": "", "fuel": 2345}, b"42"),
        ("worker-0", Kind.HANDLE, {
            "message": b"boom", "reply": None, "status": "guest-error",
            "error": "counter: state is not a decimal number", "fuel": 345,
        }, None),
        ("supervisor", Kind.EXIT, {"incarnation": 0, "reason": "killed", "detail": "signal 9"}, None),
        ("supervisor", Kind.WORKER_KEY, {
            "incarnation": 1, "worker_key": public("worker-1"), "confinement": CONFINEMENT, "reason": "killed",
            "component_sha256": COMPONENT_SHA256,
        }, None),
        ("worker-1", Kind.HANDLE, {"message": b"again", "reply": b"43", "status": "ok", "error": "", "fuel": 2346}, b"43"),
        ("worker-1", Kind.MESSAGE, {
            "origin": "call", "sender": uuid.UUID(CHILD_UUID).bytes, "message_id": MESSAGE_ID, "message": b"add:1",
            "reply": b"44", "status": "ok", "error": "", "fuel": 2400,
        }, b"44"),
    ]


def build_chain() -> tuple[list[Record], list[str]]:
    records: list[Record] = []
    signers: list[str] = []
    prev, state_hash = ZERO_HASH, sha256(b"")
    for seq, (who, kind, fields, state) in enumerate(chain_plan()):
        if state is not None:
            state_hash = sha256(state)
        record = sign_record(key(who), kind=kind, agent_id=AGENT_ID, seq=seq, time_ns=time_of(seq),
                             prev_hash=prev, state_hash=state_hash, fields=fields, covered=kind in COVERABLE)
        records.append(record)
        signers.append(who)
        prev = record.hash
    return records, signers


def fields_json(kind: Kind, fields: dict[str, Any]) -> dict[str, Any]:
    """Fields as JSON: bytes as hex, absent opt-bytes as null, str and ints as themselves."""
    out: dict[str, Any] = {}
    for name, _ in FIELDS[kind]:
        value = fields[name]
        out[name] = value.hex() if isinstance(value, bytes) else value
    return out


# --- invalid cases ----------------------------------------------------------------

def raw_record(signing_key: Ed25519PrivateKey, *, kind: int, signer: int, seq: int, prev_hash: bytes,
               state_hash: bytes, payload: bytes, agent_id: bytes = AGENT_ID, version: int = VERSION) -> bytes:
    """Encode and sign a record by hand, bypassing every check ``sign_record`` makes (signer 2: covered,
    no signature)."""
    body = HEADER.pack(version, kind, signer, agent_id, seq, time_of(seq), prev_hash, state_hash, len(payload)) + payload
    return body if signer == Signer.COVERED else body + signing_key.sign(DOMAIN + body)


def resign(record: Record, who: str, **changes: Any) -> bytes:
    """A properly signed copy of ``record`` with some header fields changed."""
    args: dict[str, Any] = {
        "kind": int(record.kind), "signer": int(record.signer), "seq": record.seq, "prev_hash": record.prev_hash,
        "state_hash": record.state_hash, "payload": record.payload, "agent_id": record.agent_id,
    }
    args.update(changes)
    return raw_record(key(who), **args)


def flip(raw: bytes, offset: int, mask: int = 0x01) -> bytes:
    out = bytearray(raw)
    out[offset] ^= mask
    return bytes(out)


def invalid_cases(chain: list[Record]) -> list[dict[str, Any]]:
    raws = [r.raw for r in chain]
    log, handle = chain[2], chain[4]  # a covered log (then a covered host call), and the handle that covers them
    assert log.signer is Signer.COVERED and handle.signer is Signer.WORKER
    sig_start = len(handle.raw) - 64
    # Offsets of the log message "tick" inside the log record, and of the handle's message "hi".
    msg_offset = HEADER.size + 4 + len(b"info") + 4
    assert log.raw[msg_offset:msg_offset + 4] == b"tick"
    hi_offset = HEADER.size + 4
    assert handle.raw[hi_offset:hi_offset + 2] == b"hi"
    worker0 = key("worker-0")
    state = chain[4].state_hash  # the state in force from record 4 on

    cases: list[tuple[str, list[bytes], str]] = [
        ("empty chain", [], "empty chain"),
        ("bad signature", [*raws[:4], flip(handle.raw, sig_start)], "signature of record 4 (handle) does not verify"),
        ("payload byte flipped", [*raws[:4], flip(handle.raw, hi_offset)],
         "signature of record 4 (handle) does not verify"),
        ("covered record's payload byte flipped", [*raws[:2], flip(log.raw, msg_offset), *raws[3:5]],
         "record 3: previous-hash does not match the chain head"),
        ("chain ends with covered records", raws[:4], "the chain ends with 2 covered record(s)"),
        ("supervisor record after covered records",
         [*raws[:4], raw_record(key("supervisor"), kind=Kind.EXIT, signer=0, seq=4, prev_hash=chain[3].hash,
                                state_hash=chain[3].state_hash, payload=chain[6].payload)],
         "record 4: a supervisor record follows 2 covered record(s)"),
        ("covered record of a kind that must be signed", [*raws[:4], resign(handle, "worker-0", signer=2)],
         "a version-2 handle record cannot be covered"),
        ("covered version-1 record", [*raws[:2], resign(log, "worker-0", version=1)],
         "a version-1 log record cannot be covered"),
        ("covered record while no worker key is in force",
         [*raws[:7], raw_record(worker0, kind=Kind.LOG, signer=2, seq=7, prev_hash=chain[6].hash, state_hash=state,
                                payload=log.payload)],
         "record 7: worker record while no worker key is in force"),
        ("covering record signed by another key", [*raws[:4], resign(handle, "worker-1")],
         "signature of record 4 (handle) does not verify"),
        ("wrong seq", [*raws[:2], resign(log, "worker-0", seq=3)], "record has sequence 3, expected 2"),
        ("wrong prev hash", [*raws[:2], resign(log, "worker-0", prev_hash=chain[0].hash)],
         "record 2: previous-hash does not match the chain head"),
        ("genesis not first", [raw_record(key("supervisor"), kind=Kind.EXIT, signer=0, seq=0, prev_hash=ZERO_HASH,
                                          state_hash=sha256(b""), payload=chain[6].payload)],
         "record 0: a chain starts with genesis, and only there"),
        ("second genesis", [raws[0], resign(chain[0], "supervisor", seq=1, prev_hash=chain[0].hash)],
         "record 1: a chain starts with genesis, and only there"),
        ("worker record after exit with no new key",
         [*raws[:7], raw_record(worker0, kind=Kind.HANDLE, signer=1, seq=7, prev_hash=chain[6].hash,
                                state_hash=state, payload=chain[5].payload)],
         "record 7: worker record while no worker key is in force"),
        ("old worker key after restart", [*raws[:8], resign(chain[8], "worker-0")],
         "signature of record 8 (handle) does not verify"),
        ("state hash changed by a non-ok handle", [*raws[:5], resign(chain[5], "worker-0", state_hash=sha256(b"99"))],
         "record 5 (handle) changes the state hash"),
        ("state hash changed by a log", [*raws[:2], resign(log, "worker-0", state_hash=sha256(b"99"))],
         "record 2 (log) changes the state hash"),
        ("unknown kind", [raws[0], raw_record(worker0, kind=200, signer=1, seq=1, prev_hash=chain[0].hash,
                                              state_hash=chain[1].state_hash, payload=chain[1].payload)],
         "unknown record kind 200"),
        ("trailing payload bytes", [*raws[:2], resign(log, "worker-0", payload=log.payload + b"\x00")],
         "log payload has 1 trailing bytes"),
        ("wrong signer byte", [*raws[:2], resign(log, "supervisor", signer=0)],
         "log records are signed by the worker"),
        ("unknown signer byte", [*raws[:2], resign(log, "worker-0", signer=3)], "unknown record kind 6 or signer 3"),
        ("unsupported version", [raw_record(key("supervisor"), kind=Kind.GENESIS, signer=0, seq=0, prev_hash=ZERO_HASH,
                                            state_hash=sha256(b""), payload=chain[0].payload, version=3)],
         "unsupported record version 3"),
        ("record of another agent", [*raws[:2], resign(log, "worker-0", agent_id=OTHER_AGENT_ID)],
         "record 2 belongs to another agent"),
        ("payload length mismatch", [*raws[:2], log.raw[:-1]], "record length does not match its payload length"),
        ("worker-key naming another component",
         [*raws[:7], resign(chain[7], "supervisor",
                            payload=encode_payload(Kind.WORKER_KEY, {**chain[7].fields(), "component_sha256": bytes(32)}))],
         "record 7: the worker-key record names another component than the genesis"),
        ("small-order worker key",  # the identity point: (R = identity, S = 0) would verify for any record
         [resign(chain[0], "supervisor", payload=encode_payload(Kind.GENESIS, {**chain[0].fields(),
                                                                               "worker_key": b"\x01" + bytes(31)}))],
         "record 0: the worker key is a point of small order"),
    ]
    return [{"name": name, "records": [r.hex() for r in rs], "error": error} for name, rs, error in cases]


def records_document() -> dict[str, Any]:
    chain, signers = build_chain()
    return {
        "description": (
            "Golden event records (theater/records.py, version 2: the log and host-call records are covered by "
            "the handle after them). 'chain' is one agent's valid history; "
            "every case in 'invalid' must fail theater.chain.verify_chain with a RecordError whose message "
            "contains 'error'. Generated by scripts/make_vectors.py; do not edit by hand."
        ),
        "seeds": {name: seed.hex() for name, seed in SEEDS.items()},
        "public_keys": {name: public(name).hex() for name in SEEDS},
        "supervisor_public_key": public("supervisor").hex(),
        "agent_id": AGENT_UUID,
        "chain": [
            {
                "seq": r.seq,
                "kind": r.kind.name.lower(),
                "signer": r.signer.name.lower(),
                "key": who,
                "time_ns": r.time_ns,
                "prev_hash": r.prev_hash.hex(),
                "state_hash": r.state_hash.hex(),
                "fields": fields_json(r.kind, r.fields()),
                "payload": r.payload.hex(),
                "raw": r.raw.hex(),
                "hash": r.hash.hex(),
            }
            for r, who in zip(chain, signers, strict=True)
        ],
        "invalid": invalid_cases(chain),
    }


# --- frames -----------------------------------------------------------------------

def frames_document() -> dict[str, Any]:
    chain, _ = build_chain()
    token = bytes(range(0xA0, 0xC0))
    control_token = "c0" * 32
    hello = wire.Hello(token=token, worker_key=public("worker-0"),
                       proof=key("worker-0").sign(wire.HELLO_DOMAIN + token), pid=4242,
                       confinement={"landlock": "enforced", "seccomp": "enforced"})
    limits = Limits(memory_bytes=16777216, fuel_per_call=50000000, wall_time_ms=500, max_message_bytes=65536,
                    max_state_bytes=262144, max_logs_per_call=20, max_log_bytes=1024, max_host_calls_per_call=100,
                    max_random_bytes=1024, stack_bytes=262144, table_elements=10000, instances=16, mailbox=100, max_children=0)
    spec = AgentSpec(agent_id=AGENT_UUID, name="counter", component_path="/srv/agents/counter.wasm",
                     component_sha256=COMPONENT_SHA256.hex(), capabilities=("runtime",), limits=limits,
                     head_seq=0, head_hash=chain[0].hash.hex(), state_hash=sha256(b"").hex())
    frames: list[tuple[str, str, list[bytes], dict[str, Any]]] = [
        ("hello", "worker -> supervisor", hello.encode(), {
            "token": token.hex(), "worker_key": hello.worker_key.hex(), "proof": hello.proof.hex(),
            "pid": hello.pid, "confinement": hello.confinement,
        }),
        ("spec", "supervisor -> worker", [wire.header(wire.SupervisorType.SPEC), wire.encode_json(spec.to_json()), b""],
         {"spec": spec.to_json(), "state": ""}),
        ("call init", "supervisor -> worker", wire.Call(1, wire.CallKind.INIT, b"41").encode(),
         {"call_id": 1, "kind": "init", "data": b"41".hex()}),
        ("call handle", "supervisor -> worker", wire.Call(2, wire.CallKind.HANDLE, b"hi").encode(),
         {"call_id": 2, "kind": "handle", "data": b"hi".hex()}),
        ("result with state", "worker -> supervisor",
         wire.Result(2, b"42", [r.raw for r in chain[2:5]]).encode(),
         {"call_id": 2, "state": b"42".hex(), "records": [r.raw.hex() for r in chain[2:5]]}),
        ("result without state", "worker -> supervisor", wire.Result(3, None, [chain[5].raw]).encode(),
         {"call_id": 3, "state": None, "records": [chain[5].raw.hex()]}),
        ("fault", "worker -> supervisor",
         [wire.header(wire.WorkerType.FAULT), wire.encode_json({"detail": "no such export", "reason": "load-failed"})],
         {"fault": {"detail": "no such export", "reason": "load-failed"}}),
        ("stop", "supervisor -> worker", [wire.header(wire.SupervisorType.STOP)], {}),
        ("host request", "worker -> supervisor",
         wire.HostRequest(1, {"op": "spawn", "template": "worker", "name": "w", "args": ""}, "supervision")
         .encode(wire.WorkerType.HOST_REQUEST),
         {"request_id": 1, "interface": "supervision",
          "body": {"op": "spawn", "template": "worker", "name": "w", "args": ""}}),
        ("host reply", "supervisor -> worker",
         wire.HostRequest(1, {"ok": True, "id": CHILD_UUID}).encode(wire.SupervisorType.HOST_REPLY),
         {"request_id": 1, "body": {"ok": True, "id": CHILD_UUID}}),
        ("call message", "supervisor -> worker",
         wire.Call(5, wire.CallKind.MESSAGE, wire.encode_message(wire.Origin.CALL, uuid.UUID(CHILD_UUID).bytes,
                                                                 MESSAGE_ID, b"add:1")).encode(),
         {"call_id": 5, "kind": "message", "origin": "call", "sender": CHILD_UUID, "message_id": MESSAGE_ID.hex(),
          "message": b"add:1".hex()}),
        ("host request with data", "worker -> supervisor",
         wire.HostRequest(2, {"op": "call", "to": "counter", "timeout_ms": 1000}, "messaging", b"add:1")
         .encode(wire.WorkerType.HOST_REQUEST),
         {"request_id": 2, "interface": "messaging", "body": {"op": "call", "to": "counter", "timeout_ms": 1000},
          "data": b"add:1".hex()}),
        ("host reply with data", "supervisor -> worker",
         wire.HostRequest(2, {"ok": True, "has_reply": True, "message_id": MESSAGE_ID.hex(), "seq": 9,
                              "record": "00" * 32}, None, b"44").encode(wire.SupervisorType.HOST_REPLY),
         {"request_id": 2, "body": {"ok": True, "has_reply": True, "message_id": MESSAGE_ID.hex(), "seq": 9,
                                    "record": "00" * 32}, "data": b"44".hex()}),
        ("call child-exit", "supervisor -> worker",
         wire.Call(4, wire.CallKind.CHILD_EXIT, wire.encode_child_exit(uuid.UUID(CHILD_UUID).bytes, chain[6].hash,
                                                                        "trap: deadline: wasm trap: interrupt; restarting")).encode(),
         {"call_id": 4, "kind": "child-exit", "child": CHILD_UUID, "exit_hash": chain[6].hash.hex(),
          "reason": "trap: deadline: wasm trap: interrupt; restarting"}),
        ("control request", "client -> supervisor",
         [wire.header(wire.ClientType.REQUEST),
          wire.encode_json({"op": "call", "id": 1, "token": control_token, "agent": "counter", "timeout_ms": 10000}),
          b"hi"],
         {"request": {"op": "call", "id": 1, "token": control_token, "agent": "counter", "timeout_ms": 10000},
          "data": b"hi".hex()}),
        ("control reply", "supervisor -> client",
         [wire.header(wire.ClientType.REPLY),
          wire.encode_json({"id": 1, "ok": True, "result": {"status": "ok", "has_reply": True, "seq": 4}}),
          b"42"],
         {"reply": {"id": 1, "ok": True, "result": {"status": "ok", "has_reply": True, "seq": 4}},
          "data": b"42".hex()}),
        ("control error reply", "supervisor -> client",
         [wire.header(wire.ClientType.REPLY),
          wire.encode_json({"id": 2, "ok": False, "error": {"code": "not-found", "message": "no agent named or with id 'x'"}})],
         {"reply": {"id": 2, "ok": False, "error": {"code": "not-found", "message": "no agent named or with id 'x'"}}}),
    ]
    return {
        "description": (
            "Golden wire frames (theater/wire.py, version 1): each message is a list of ZeroMQ frames in hex, "
            "starting with the version:u8 type:u8 header frame; 'decoded' is what they mean. "
            "Generated by scripts/make_vectors.py; do not edit by hand."
        ),
        "messages": [
            {"name": name, "direction": direction, "frames": [f.hex() for f in fs], "decoded": decoded}
            for name, direction, fs, decoded in frames
        ],
    }


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=True) + "\n"


def outputs() -> dict[Path, str]:
    return {VECTORS / "records.json": render(records_document()), VECTORS / "frames.json": render(frames_document())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the files on disk are not what would be written")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if args.check:
            try:
                on_disk = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                on_disk = None
            if on_disk != text:
                stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is out of date; run scripts/make_vectors.py", file=sys.stderr)
        return 1
    if args.check:
        print("vectors are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
