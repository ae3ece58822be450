"""The contract package: golden vectors, record encoding, chain rules, wire frames, package layering."""

from __future__ import annotations

import ast
import copy
import json
import random
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from theater import wire
from theater.chain import ChainVerifier, verify_chain
from theater.ed25519 import key_weakness
from theater.errors import ProtocolError, RecordError
from theater.records import (
    DOMAIN,
    FIELDS,
    HEADER,
    MAX_RECORD_BYTES,
    SIGNER_OF,
    VERSION,
    ZERO_HASH,
    Kind,
    Record,
    Signer,
    decode_payload,
    encode_payload,
    sha256,
    sign_record,
    verify_hello,
    verify_record,
)
from theater.spec import LIMIT_BOUNDS, AgentSpec, Limits

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors"
RECORDS = json.loads((VECTORS / "records.json").read_text())
FRAMES = json.loads((VECTORS / "frames.json").read_text())
SUPERVISOR_KEY = Ed25519PublicKey.from_public_bytes(bytes.fromhex(RECORDS["supervisor_public_key"]))
PRIVATE = {name: Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed)) for name, seed in RECORDS["seeds"].items()}
PUBLIC = {name: Ed25519PublicKey.from_public_bytes(bytes.fromhex(pub)) for name, pub in RECORDS["public_keys"].items()}
CHAIN = RECORDS["chain"]
RAWS = [bytes.fromhex(r["raw"]) for r in CHAIN]
MESSAGES = {m["name"]: m for m in FRAMES["messages"]}


def fields_from_json(kind: Kind, data: dict[str, Any]) -> dict[str, Any]:
    """Vector fields back to Python values: hex to bytes for bytes fields, null stays None."""
    out: dict[str, Any] = {}
    for name, typ in FIELDS[kind]:
        value = data[name]
        out[name] = bytes.fromhex(value) if typ in ("bytes", "opt-bytes") and value is not None else value
    return out


def kind_of(entry: dict[str, Any]) -> Kind:
    return Kind[entry["kind"].upper()]


def frames_of(name: str) -> list[bytes]:
    return [bytes.fromhex(f) for f in MESSAGES[name]["frames"]]


# --- golden record vectors -----------------------------------------------------------


def test_vector_chain_verifies() -> None:
    """The golden chain verifies with the published supervisor key and ends at its last record."""
    verifier = verify_chain(RAWS, SUPERVISOR_KEY)
    assert verifier.next_seq == len(CHAIN) == 10
    assert verifier.head_hash.hex() == CHAIN[-1]["hash"]
    assert verifier.state_hash == sha256(b"44")
    assert verifier.incarnation == 1
    assert verifier.agent_id.hex() == RECORDS["agent_id"].replace("-", "")
    assert [e["kind"] for e in CHAIN] == [
        "genesis", "init", "log", "host_call", "handle", "handle", "exit", "worker_key", "handle", "message",
    ]


def test_vector_keys_come_from_the_fixed_seeds() -> None:
    """The published public keys are those of the documented seeds (supervisor 0..31, workers 32..63, 64..95)."""
    assert RECORDS["seeds"] == {
        "supervisor": bytes(range(32)).hex(), "worker-0": bytes(range(32, 64)).hex(), "worker-1": bytes(range(64, 96)).hex(),
    }
    for name, private in PRIVATE.items():
        assert private.public_key().public_bytes_raw().hex() == RECORDS["public_keys"][name]
    assert RECORDS["supervisor_public_key"] == RECORDS["public_keys"]["supervisor"]
    assert RECORDS["agent_id"] == "00112233-4455-6677-8899-aabbccddeeff"


@pytest.mark.parametrize("entry", CHAIN, ids=[f"{e['seq']}-{e['kind']}" for e in CHAIN])
def test_vector_record_reencodes_byte_for_byte(entry: dict[str, Any]) -> None:
    """sign_record with the vector's key and fields reproduces the raw bytes and hash exactly."""
    kind = kind_of(entry)
    record = sign_record(
        PRIVATE[entry["key"]], kind=kind, agent_id=bytes.fromhex(RECORDS["agent_id"].replace("-", "")),
        seq=entry["seq"], time_ns=entry["time_ns"], prev_hash=bytes.fromhex(entry["prev_hash"]),
        state_hash=bytes.fromhex(entry["state_hash"]), fields=fields_from_json(kind, entry["fields"]),
        covered=entry["signer"] == "covered",
    )
    assert record.raw.hex() == entry["raw"]
    assert record.hash.hex() == entry["hash"] == sha256(record.raw).hex()
    assert record.payload.hex() == entry["payload"]
    assert record.signer.name.lower() == entry["signer"]


@pytest.mark.parametrize("entry", CHAIN, ids=[f"{e['seq']}-{e['kind']}" for e in CHAIN])
def test_vector_record_parses_to_its_fields(entry: dict[str, Any]) -> None:
    """Record.parse of each raw vector gives back the header and decoded fields the vector lists."""
    record = Record.parse(bytes.fromhex(entry["raw"]))
    kind = kind_of(entry)
    assert record.kind is kind and record.seq == entry["seq"] and record.time_ns == entry["time_ns"]
    assert record.agent_uuid == RECORDS["agent_id"]
    assert record.prev_hash.hex() == entry["prev_hash"] and record.state_hash.hex() == entry["state_hash"]
    assert record.fields() == fields_from_json(kind, entry["fields"])
    assert record.hash.hex() == entry["hash"]
    if entry["signer"] == "covered":  # no signature of its own: the next signed record covers it
        assert entry["kind"] in ("log", "host_call") and len(record.raw) == HEADER.size + len(record.payload)
        with pytest.raises(RecordError, match="does not verify"):
            verify_record(record, PUBLIC[entry["key"]])
    else:
        verify_record(record, PUBLIC[entry["key"]])


@pytest.mark.parametrize("case", RECORDS["invalid"], ids=[c["name"] for c in RECORDS["invalid"]])
def test_vector_invalid_case_fails_with_expected_error(case: dict[str, Any]) -> None:
    """Every named invalid chain is refused by verify_chain with its documented message fragment."""
    with pytest.raises(RecordError) as info:
        verify_chain([bytes.fromhex(r) for r in case["records"]], SUPERVISOR_KEY)
    assert case["error"] in str(info.value)


def test_vector_invalid_cases_cover_the_brief() -> None:
    """The invalid set contains every case the format's rules call for."""
    names = {c["name"] for c in RECORDS["invalid"]}
    assert {
        "bad signature", "payload byte flipped", "wrong seq", "wrong prev hash", "genesis not first",
        "worker record after exit with no new key", "state hash changed by a non-ok handle", "unknown kind",
        "trailing payload bytes", "wrong signer byte",
    } <= names


def test_vector_chain_covers_its_logs_and_host_calls() -> None:
    """A version-2 chain: the log and host call of a handle carry no signature; the handle's covers them."""
    assert [e["signer"] for e in CHAIN] == ["supervisor", "worker", "covered", "covered", "worker", "worker",
                                            "supervisor", "supervisor", "worker", "worker"]
    assert all(raw[0] == VERSION == 2 for raw in RAWS)


# Version-1 records (each one signed, as every worker wrote them before covered records) still verify:
# tests/vectors/records-v1.json is kept exactly as it was generated then.
RECORDS_V1 = json.loads((VECTORS / "records-v1.json").read_text())
RAWS_V1 = [bytes.fromhex(r["raw"]) for r in RECORDS_V1["chain"]]


def test_version_1_vectors_still_verify() -> None:
    """The version-1 golden chain verifies with this build's verifier and the documented one; its invalid
    cases are still refused (their messages may have changed with the format)."""
    assert {raw[0] for raw in RAWS_V1} == {1}
    verifier = verify_chain(RAWS_V1, SUPERVISOR_KEY)
    assert verifier.head_hash.hex() == RECORDS_V1["chain"][-1]["hash"]
    documented = _documented_verifier()
    public = bytes.fromhex(RECORDS_V1["supervisor_public_key"])
    assert documented["verify_chain"](RAWS_V1, public)[2] == verifier.head_hash
    for case in RECORDS_V1["invalid"]:
        if case["name"] == "unsupported version":  # its record is a version-2 genesis: valid since version 2
            continue
        raws = [bytes.fromhex(r) for r in case["records"]]
        with pytest.raises(RecordError):
            verify_chain(raws, SUPERVISOR_KEY)
        with pytest.raises(documented["Invalid"]):
            documented["verify_chain"](raws, public)


def test_a_mixed_chain_of_both_versions_verifies() -> None:
    """A home upgraded mid-chain: version-1 records, then version-2 ones with covered records."""
    plan = [(r["key"], kind_of(r), fields_from_json(kind_of(r), r["fields"]), r["state_hash"]) for r in CHAIN]
    raws, prev = list(RAWS_V1[:5]), bytes.fromhex(RECORDS_V1["chain"][4]["hash"])
    for seq, (who, kind, fields, state_hash) in enumerate(plan[5:], start=5):
        record = sign_record(PRIVATE[who], kind=kind, agent_id=RAWS[0][3:19], seq=seq, time_ns=seq,
                             prev_hash=prev, state_hash=bytes.fromhex(state_hash), fields=fields)
        raws.append(record.raw)
        prev = record.hash
    log = sign_record(PRIVATE["worker-1"], kind=Kind.LOG, agent_id=RAWS[0][3:19], seq=10, time_ns=10, prev_hash=prev,
                      state_hash=bytes.fromhex(plan[-1][3]), fields={"level": "info", "message": "x", "truncated": 0},
                      covered=True)
    handle = sign_record(PRIVATE["worker-1"], kind=Kind.HANDLE, agent_id=RAWS[0][3:19], seq=11, time_ns=11,
                         prev_hash=log.hash, state_hash=log.state_hash,
                         fields={"message": b"m", "reply": None, "status": "guest-error", "error": "e", "fuel": 1})
    raws += [log.raw, handle.raw]
    assert verify_chain(raws, SUPERVISOR_KEY).next_seq == 12
    assert _documented_verifier()["verify_chain"](raws, SUPERVISOR_KEY.public_bytes_raw())[1] == 11
    with pytest.raises(RecordError, match="ends with 1 covered record"):
        verify_chain(raws[:-1], SUPERVISOR_KEY)


def test_sign_record_refuses_to_cover_a_signed_kind() -> None:
    with pytest.raises(RecordError, match="cannot be covered"):
        sign_record(PRIVATE["worker-0"], kind=Kind.HANDLE, agent_id=bytes(16), seq=1, time_ns=1, prev_hash=bytes(32),
                    state_hash=bytes(32), covered=True,
                    fields={"message": b"", "reply": None, "status": "ok", "error": "", "fuel": 0})


def _documented_verifier() -> dict[str, Any]:
    """The independent verifier of docs/event-records.md section 10, run as the document prints it."""
    text = (ROOT / "docs" / "event-records.md").read_text()
    section = text[text.index("## 10. Writing an independent verifier"):]
    code = section[section.index("```python\n") + len("```python\n"):]
    namespace: dict[str, Any] = {}
    exec(compile(code[:code.index("```")], "event-records.md#10", "exec"), namespace)
    return namespace


def test_documented_verifier_agrees_with_the_vectors() -> None:
    """The document's own verifier accepts the golden chain and refuses every invalid case, as
    theater/chain.py does: the format can be checked from the docs alone."""
    verifier = _documented_verifier()
    public = bytes.fromhex(RECORDS["supervisor_public_key"])
    agent_id, head_seq, head, _ = verifier["verify_chain"](RAWS, public)
    assert (agent_id, head_seq, head.hex()) == (RAWS[0][3:19], CHAIN[-1]["seq"], CHAIN[-1]["hash"])
    for case in RECORDS["invalid"]:
        with pytest.raises(verifier["Invalid"]):
            verifier["verify_chain"]([bytes.fromhex(r) for r in case["records"]], public)


def test_strict_key_rule_matches_between_code_and_docs() -> None:
    """theater/ed25519.py and the documented verifier refuse the same keys: every small-order point,
    non-canonical encodings, non-points; and accept real keys."""
    strict = _documented_verifier()["strict_key"]
    p = 2**255 - 19
    weak = [b"\x01" + bytes(31), bytes(32), bytes(31) + b"\x80", (p - 1).to_bytes(32, "little"),
            bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
            bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85"),
            (p + 1).to_bytes(32, "little"), b"\x01" + bytes(30) + b"\x80", (2).to_bytes(32, "little")]
    for raw in weak:
        assert key_weakness(raw) is not None and not strict(raw), raw.hex()
    for _ in range(50):
        raw = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
        assert key_weakness(raw) is None and strict(raw)


def test_a_key_of_mixed_order_is_judged_by_the_rule_not_by_libsodiums_stricter_check() -> None:
    """libsodium's point check, the fast path of key_weakness, also refuses a point outside the prime-order
    subgroup. The rule refuses only small order, so a real key plus a torsion point (order 8L) is accepted,
    by the code as by the documented verifier: the fast path does not change which keys are taken."""
    import nacl.bindings

    from theater import ed25519

    p = ed25519._P

    def point(raw: bytes) -> tuple[int, int]:
        encoded = int.from_bytes(raw, "little")
        y = encoded & ((1 << 255) - 1)
        x = ed25519._recover_x(y, encoded >> 255)
        assert x is not None
        return x, y

    def add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
        (x1, y1), (x2, y2) = a, b
        t = ed25519._D * x1 * x2 * y1 * y2 % p
        return ((x1 * y2 + y1 * x2) * pow(1 + t, -1, p) % p, (y1 * y2 + x1 * x2) * pow(1 - t, -1, p) % p)

    order_eight = point(bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"))
    x, y = add(point(Ed25519PrivateKey.generate().public_key().public_bytes_raw()), order_eight)
    raw = (y | (x & 1) << 255).to_bytes(32, "little")
    assert not nacl.bindings.crypto_core_ed25519_is_valid_point(raw)
    assert key_weakness(raw) is None and _documented_verifier()["strict_key"](raw)


def test_openssl_ed25519_behaviour_is_what_the_docs_say() -> None:
    """docs/event-records.md 2.1: OpenSSL refuses S >= L but takes a small-order key, under which
    (R = identity, S = 0) verifies anything; so the strict key rule is ours to enforce, in the hello too."""
    identity = b"\x01" + bytes(31)
    Ed25519PublicKey.from_public_bytes(identity).verify(identity + bytes(32), b"any message at all")
    key = Ed25519PrivateKey.generate()
    signature = key.sign(b"m")
    order = 2**252 + 27742317777372353535851937790883648493
    malleated = signature[:32] + (int.from_bytes(signature[32:], "little") + order).to_bytes(32, "little")
    with pytest.raises(InvalidSignature):
        key.public_key().verify(malleated, b"m")
    token = bytes(16)
    with pytest.raises(RecordError, match="small order"):
        verify_hello(identity, token, identity + bytes(32))


def test_the_record_path_verifier_is_stricter_than_openssl() -> None:
    """theater.ed25519 (libsodium) refuses what OpenSSL refuses, and also the small-order key's universal
    signature that OpenSSL takes: whatever the record path stored verifies under OpenSSL too."""
    from theater import ed25519

    identity = Ed25519PublicKey.from_public_bytes(b"\x01" + bytes(31))
    assert not ed25519.valid(identity, b"\x01" + bytes(31) + bytes(32), b"any message at all")
    key = Ed25519PrivateKey.generate()
    signature = ed25519.sign(key, b"m")
    assert signature == key.sign(b"m")  # the same deterministic RFC 8032 signature as OpenSSL's
    assert ed25519.valid(key.public_key(), signature, b"m")
    key.public_key().verify(signature, b"m")
    order = 2**252 + 27742317777372353535851937790883648493
    malleated = signature[:32] + (int.from_bytes(signature[32:], "little") + order).to_bytes(32, "little")
    assert not ed25519.valid(key.public_key(), malleated, b"m")
    assert not ed25519.valid(key.public_key(), signature, b"n")
    assert not ed25519.valid(key.public_key(), signature[:63], b"m")


def test_make_vectors_check_passes() -> None:
    """scripts/make_vectors.py --check finds the vectors on disk identical to what it generates."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_vectors.py"), "--check"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stdout


# --- payload encoding ------------------------------------------------------------------

SAMPLE_FIELDS: dict[Kind, dict[str, Any]] = {
    Kind.GENESIS: {"name": "é-agent", "component_sha256": bytes(32), "config": "{}", "worker_key": bytes(32), "confinement": ""},
    Kind.WORKER_KEY: {"incarnation": 2**32 - 1, "worker_key": b"\x01" * 32, "confinement": "{}", "reason": "crashed",
                      "component_sha256": bytes(32)},
    Kind.INIT: {"args": b"", "status": "ok", "error": "", "fuel": 2**64 - 1},
    Kind.HANDLE: {"message": b"\x00\xff", "reply": b"", "status": "ok", "error": "", "fuel": 0},
    Kind.HOST_CALL: {"interface": "i", "function": "random-bytes", "input": b"\x00\x00\x00\x10", "output": bytes(16)},
    Kind.LOG: {"level": "warn", "message": "ünïcode ✓", "truncated": 1},
    Kind.EXIT: {"incarnation": 0, "reason": "stopped", "detail": ""},
    Kind.VIOLATION: {"incarnation": 7, "reason": "bad header", "evidence": b"\x09\x09"},
    Kind.CHILD_EXIT: {"child": bytes(16), "exit_hash": bytes(32), "reason": "trap: deadline; restarting", "status": "ok", "error": "", "fuel": 5},
    Kind.STATE_RESET: {"reason": "restarted from its initial state"},
    Kind.REMOVED: {"reason": "removed by the operator"},
    Kind.MESSAGE: {"origin": "call", "sender": bytes(range(16)), "message_id": b"\xff" * 16, "message": b"\x00hi",
                   "reply": None, "status": "ok", "error": "", "fuel": 7},
    Kind.NODE_GENESIS: {"name": "shop", "config": "{}", "parent": ""},
    Kind.NODE_START: {"reason": "restart"},
    Kind.NODE_RESTART: {"child": "db", "reason": "trap", "strategy": "rest_for_one", "stop": "web", "start": "db,web",
                        "retry": "no"},
    Kind.NODE_GIVE_UP: {"child": "db", "reason": "trap", "detail": "more than 3 restarts in 5000 ms (last: db, trap)"},
    Kind.NODE_TERMINATE: {"reason": "shutdown", "detail": "the supervisor is shutting down"},
}


@pytest.mark.parametrize("kind", list(Kind), ids=[k.name.lower() for k in Kind])
def test_payload_round_trips(kind: Kind) -> None:
    """encode_payload then decode_payload gives back exactly the fields, for every kind."""
    fields = SAMPLE_FIELDS[kind]
    assert decode_payload(kind, encode_payload(kind, fields)) == fields
    if kind is Kind.HANDLE:
        absent = {**fields, "reply": None}
        encoded = encode_payload(kind, absent)
        assert decode_payload(kind, encoded) == absent
        assert len(encoded) == len(encode_payload(kind, fields)) - 4  # absent: flag only; empty: flag + length


def test_schema_covers_every_kind() -> None:
    """Every kind has a payload schema and a signer, and the sample fields match each schema."""
    assert set(FIELDS) == set(Kind) == set(SIGNER_OF)
    for kind in Kind:
        assert set(SAMPLE_FIELDS[kind]) == {name for name, _ in FIELDS[kind]}


@pytest.mark.parametrize("kind", list(Kind), ids=[k.name.lower() for k in Kind])
def test_encode_payload_rejects_wrong_field_set(kind: Kind) -> None:
    """A missing, an extra or a renamed field is a RecordError naming the schema."""
    fields = SAMPLE_FIELDS[kind]
    first = next(iter(fields))
    for bad in ({k: v for k, v in fields.items() if k != first}, {**fields, "extra": 1},
                {**{k: v for k, v in fields.items() if k != first}, first + "_": fields[first]}, {}):
        with pytest.raises(RecordError, match="payload needs fields"):
            encode_payload(kind, bad)


@pytest.mark.parametrize("entry", CHAIN, ids=[f"{e['seq']}-{e['kind']}" for e in CHAIN])
def test_decode_payload_rejects_every_truncation(entry: dict[str, Any]) -> None:
    """Every strict prefix of a valid payload is a RecordError, and so is one extra byte."""
    kind, payload = kind_of(entry), bytes.fromhex(entry["payload"])
    for n in range(len(payload)):
        with pytest.raises(RecordError):
            decode_payload(kind, payload[:n])
    with pytest.raises(RecordError, match="trailing bytes"):
        decode_payload(kind, payload + b"\x00")


def test_decode_payload_rejects_bad_option_flag_and_utf8() -> None:
    """An option flag other than 0/1 and a str field that is not UTF-8 are RecordErrors naming the field."""
    good = encode_payload(Kind.HANDLE, SAMPLE_FIELDS[Kind.HANDLE])
    flag_at = 4 + 2  # after message (u32 length + 2 bytes)
    bad_flag = good[:flag_at] + b"\x02" + good[flag_at + 1:]
    with pytest.raises(RecordError, match="'reply': option flag must be 0 or 1, got 2"):
        decode_payload(Kind.HANDLE, bad_flag)
    bad_utf8 = b"\x00\x00\x00\x01\xff" + encode_payload(Kind.LOG, SAMPLE_FIELDS[Kind.LOG])[9:]
    with pytest.raises(RecordError, match="'level' is not valid UTF-8"):
        decode_payload(Kind.LOG, bad_utf8)


# --- record parsing ---------------------------------------------------------------------


@pytest.mark.parametrize("entry", CHAIN, ids=[f"{e['seq']}-{e['kind']}" for e in CHAIN])
def test_parse_rejects_truncation_at_every_offset(entry: dict[str, Any]) -> None:
    """Record.parse of every strict prefix of a valid record raises RecordError and nothing else."""
    raw = bytes.fromhex(entry["raw"])
    for n in range(len(raw)):
        try:
            Record.parse(raw[:n])
        except RecordError:
            continue
        except Exception as exc:  # pragma: no cover - the failure message is the point
            pytest.fail(f"prefix of {n} bytes raised {type(exc).__name__}: {exc}")
        pytest.fail(f"prefix of {n} bytes parsed")
    with pytest.raises(RecordError, match="record length does not match"):
        Record.parse(raw + b"\x00")


@pytest.mark.parametrize("entry", CHAIN, ids=[f"{e['seq']}-{e['kind']}" for e in CHAIN])
def test_parse_rejects_truncated_payload_with_consistent_length(entry: dict[str, Any]) -> None:
    """A record whose header length agrees with a truncated payload is still refused (payload check)."""
    raw = bytes.fromhex(entry["raw"])
    record = Record.parse(raw)
    key = PRIVATE[entry["key"]]
    for n in range(len(record.payload)):
        body = raw[: HEADER.size - 4] + n.to_bytes(4, "big") + record.payload[:n]
        signature = b"" if record.signer is Signer.COVERED else key.sign(DOMAIN + body)
        with pytest.raises(RecordError, match="truncated"):
            Record.parse(body + signature)


def test_parse_rejects_oversized_record() -> None:
    """A record longer than MAX_RECORD_BYTES is refused before anything else is looked at."""
    with pytest.raises(RecordError, match="exceeds"):
        Record.parse(bytes(MAX_RECORD_BYTES + 1))


def test_sign_record_rejects_bad_sizes() -> None:
    """sign_record refuses an agent id that is not 16 bytes and hashes that are not 32 bytes."""
    base = {"kind": Kind.EXIT, "agent_id": bytes(16), "seq": 1, "time_ns": 0, "prev_hash": bytes(32),
            "state_hash": bytes(32), "fields": SAMPLE_FIELDS[Kind.EXIT]}
    for change in ({"agent_id": bytes(15)}, {"prev_hash": bytes(31)}, {"state_hash": bytes(33)}):
        with pytest.raises(RecordError, match="16 bytes"):
            sign_record(PRIVATE["supervisor"], **{**base, **change})


def test_header_layout_is_as_documented() -> None:
    """The fixed header is 103 bytes: version, kind, signer, agent id, seq, time, prev, state, payload length."""
    assert HEADER.size == 1 + 1 + 1 + 16 + 8 + 8 + 32 + 32 + 4
    raw = RAWS[1]
    assert raw[0] == VERSION and raw[1] == Kind.INIT and raw[2] == Signer.WORKER
    assert raw[3:19].hex() == RECORDS["agent_id"].replace("-", "")
    assert int.from_bytes(raw[19:27], "big") == 1
    assert int.from_bytes(raw[27:35], "big") == CHAIN[1]["time_ns"]
    assert raw[35:67].hex() == CHAIN[1]["prev_hash"] and raw[67:99].hex() == CHAIN[1]["state_hash"]
    assert int.from_bytes(raw[99:103], "big") == len(raw) - HEADER.size - 64


def test_random_byte_flips_never_parse_and_verify() -> None:
    """Flipping random bytes of valid records never gives one that parses and verifies, alone or in the chain."""
    rng = random.Random(20240601)
    positioned = []
    verifier = ChainVerifier(SUPERVISOR_KEY)
    for raw in RAWS:
        positioned.append(copy.copy(verifier))
        verifier.advance(Record.parse(raw))
    parsed = 0
    for _ in range(3000):
        index = rng.randrange(len(RAWS))
        original = RAWS[index]
        mutated = bytearray(original)
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            mutated[rng.randrange(len(mutated))] ^= rng.randrange(1, 256)
        mutated_bytes = bytes(mutated)
        if mutated_bytes == original:
            continue
        try:
            record = Record.parse(mutated_bytes)
        except RecordError:
            record = None
        if record is not None:
            parsed += 1
            for name, key in PUBLIC.items():
                with pytest.raises(RecordError):
                    verify_record(record, key)
                    pytest.fail(f"record {index} with bytes flipped verifies under {name}: {mutated_bytes.hex()}")
        # A covered record is vouched for by the signed record after it: check up to that one.
        covering = next(i for i in range(index, len(RAWS)) if CHAIN[i]["signer"] != "covered")
        with pytest.raises(RecordError):
            scratch = copy.copy(positioned[index])
            for raw in [mutated_bytes, *RAWS[index + 1:covering + 1]]:
                scratch.advance(Record.parse(raw))
    assert parsed > 100  # most single flips land in places parsing cannot see, so signatures were exercised


def test_chain_rejects_a_flipped_record_anywhere() -> None:
    """verify_chain over the whole chain with one record's byte flipped raises RecordError, for every record."""
    for index, raw in enumerate(RAWS):
        mutated = bytearray(raw)
        mutated[len(raw) // 2] ^= 0x40
        with pytest.raises(RecordError):
            verify_chain([*RAWS[:index], bytes(mutated), *RAWS[index + 1:]], SUPERVISOR_KEY)


def test_record_at_the_widest_allowed_message_limit_parses() -> None:
    """A handle record whose message is exactly the largest max_message_bytes any policy may set still parses."""
    biggest = LIMIT_BOUNDS["max_message_bytes"][1]
    record = sign_record(
        PRIVATE["worker-0"], kind=Kind.HANDLE, agent_id=bytes(16), seq=1, time_ns=0, prev_hash=bytes(32),
        state_hash=bytes(32), fields={"message": bytes(biggest), "reply": None, "status": "ok", "error": "", "fuel": 1},
    )
    assert Record.parse(record.raw).raw == record.raw


# --- golden frames -----------------------------------------------------------------------


def test_frame_vectors_cover_the_brief() -> None:
    """frames.json holds a hello, both calls, results with and without state, and control request/replies."""
    assert {"hello", "call init", "call handle", "result with state", "result without state",
            "control request", "control reply"} <= set(MESSAGES)


def test_hello_frames_decode_and_reencode() -> None:
    """The golden hello decodes to its fields, its proof verifies, and it re-encodes byte for byte."""
    frames, decoded = frames_of("hello"), MESSAGES["hello"]["decoded"]
    assert wire.parse_header(frames[0], wire.WorkerType) is wire.WorkerType.HELLO
    hello = wire.Hello.decode(frames[1:])
    assert (hello.token.hex(), hello.worker_key.hex(), hello.proof.hex(), hello.pid, hello.confinement) == (
        decoded["token"], decoded["worker_key"], decoded["proof"], decoded["pid"], decoded["confinement"])
    Ed25519PublicKey.from_public_bytes(hello.worker_key).verify(hello.proof, wire.HELLO_DOMAIN + hello.token)
    assert hello.encode() == frames
    assert len(frames[1]) == 132


@pytest.mark.parametrize("name", ["call init", "call handle"])
def test_call_frames_decode_and_reencode(name: str) -> None:
    """The golden calls decode to their id, kind and data and re-encode byte for byte."""
    frames, decoded = frames_of(name), MESSAGES[name]["decoded"]
    assert wire.parse_header(frames[0], wire.SupervisorType) is wire.SupervisorType.CALL
    call = wire.Call.decode(frames[1:])
    assert (call.call_id, call.kind.name.lower(), call.data.hex()) == (decoded["call_id"], decoded["kind"], decoded["data"])
    assert call.encode() == frames


@pytest.mark.parametrize("name", ["result with state", "result without state"])
def test_result_frames_decode_and_reencode(name: str) -> None:
    """The golden results decode to id, optional state and records, and re-encode byte for byte."""
    frames, decoded = frames_of(name), MESSAGES[name]["decoded"]
    assert wire.parse_header(frames[0], wire.WorkerType) is wire.WorkerType.RESULT
    result = wire.Result.decode(frames[1:], max_records=10)
    assert result.call_id == decoded["call_id"]
    assert (None if result.state is None else result.state.hex()) == decoded["state"]
    assert [r.hex() for r in result.records] == decoded["records"]
    assert result.encode() == frames
    for raw in result.records:
        assert raw in RAWS


def test_spec_frame_decodes_and_reencodes() -> None:
    """The golden spec frame parses into an AgentSpec whose JSON re-encodes byte for byte."""
    frames, decoded = frames_of("spec"), MESSAGES["spec"]["decoded"]
    assert wire.parse_header(frames[0], wire.SupervisorType) is wire.SupervisorType.SPEC
    spec = AgentSpec.from_json(wire.decode_json(frames[1], "spec"))
    assert spec.to_json() == decoded["spec"]
    assert wire.encode_json(spec.to_json()) == frames[1]
    assert frames[2].hex() == decoded["state"]


@pytest.mark.parametrize("name", ["control request", "control reply", "control error reply", "fault", "stop"])
def test_json_frames_decode_and_reencode(name: str) -> None:
    """Control requests/replies, faults and stop: header type, canonical JSON body and data frame as recorded."""
    frames, decoded = frames_of(name), MESSAGES[name]["decoded"]
    enum_type = {"control request": wire.ClientType, "control reply": wire.ClientType,
                 "control error reply": wire.ClientType, "fault": wire.WorkerType, "stop": wire.SupervisorType}[name]
    expected = {"control request": wire.ClientType.REQUEST, "control reply": wire.ClientType.REPLY,
                "control error reply": wire.ClientType.REPLY, "fault": wire.WorkerType.FAULT,
                "stop": wire.SupervisorType.STOP}[name]
    assert wire.parse_header(frames[0], enum_type) is expected
    assert frames[0] == wire.header(expected)
    body = decoded.get("request") or decoded.get("reply") or decoded.get("fault")
    if body is None:
        assert len(frames) == 1
        return
    assert wire.decode_json(frames[1], name) == body
    assert wire.encode_json(body) == frames[1]
    if "data" in decoded:
        assert frames[2].hex() == decoded["data"]


# --- wire rejections ---------------------------------------------------------------------

HEADER_TYPES = [wire.WorkerType, wire.SupervisorType, wire.ClientType]


@pytest.mark.parametrize("enum_type", HEADER_TYPES, ids=lambda t: t.__name__)
def test_parse_header_rejects_wrong_version_type_and_size(enum_type: type) -> None:
    """parse_header refuses another version, an unknown type and a frame that is not two bytes."""
    for member in enum_type:
        assert wire.parse_header(wire.header(member), enum_type) is member
    for version in (0, 2, 255):
        with pytest.raises(ProtocolError, match=f"unsupported protocol version {version}"):
            wire.parse_header(bytes((version, 1)), enum_type)
    for typ in (0, max(enum_type) + 1, 255):
        with pytest.raises(ProtocolError, match=f"unknown {enum_type.__name__} frame type {typ}"):
            wire.parse_header(bytes((wire.VERSION, typ)), enum_type)
    for frame in (b"", b"\x01", b"\x01\x01\x00"):
        with pytest.raises(ProtocolError, match="header frame must be 2 bytes"):
            wire.parse_header(frame, enum_type)


def test_hello_decode_rejects_malformed() -> None:
    """Hello.decode refuses a wrong frame count, a wrong-size fixed frame and a bad confinement frame."""
    frames = frames_of("hello")[1:]
    for bad in ([], frames[:1], [*frames, b"{}"], [frames[0][:-1], frames[1]], [frames[0] + b"\x00", frames[1]]):
        with pytest.raises(ProtocolError, match="hello must be a 132-byte frame"):
            wire.Hello.decode(bad)
    for confinement, fragment in ((b"not json", "not valid JSON"), (b"\xff\xfe", "not valid JSON"),
                                  (b"[]", "must be a JSON object"), (b'{"a":1}', "map strings to strings"),
                                  (b'{"a":null}', "map strings to strings")):
        with pytest.raises(ProtocolError, match=fragment):
            wire.Hello.decode([frames[0], confinement])


def test_call_decode_rejects_malformed() -> None:
    """Call.decode refuses a wrong frame count, a meta frame that is not 9 bytes and an unknown call kind."""
    frames = frames_of("call handle")[1:]
    for bad in ([], frames[:1], [*frames, b""], [frames[0][:-1], frames[1]], [frames[0] + b"\x00", frames[1]]):
        with pytest.raises(ProtocolError, match="call must be a 9-byte meta frame"):
            wire.Call.decode(bad)
    with pytest.raises(ProtocolError, match="unknown call kind 9"):
        wire.Call.decode([frames[0][:8] + b"\x09", frames[1]])


def test_result_decode_rejects_malformed() -> None:
    """Result.decode refuses a bad meta frame, unknown flags, a missing state frame, no records and too many."""
    with_state = frames_of("result with state")[1:]
    without = frames_of("result without state")[1:]
    for bad in ([], [with_state[0][:-1], *with_state[1:]], [with_state[0] + b"\x00", *with_state[1:]]):
        with pytest.raises(ProtocolError, match="result must start with a 9-byte meta frame"):
            wire.Result.decode(bad, max_records=10)
    with pytest.raises(ProtocolError, match="unknown flags 0x3"):
        wire.Result.decode([with_state[0][:8] + b"\x03", *with_state[1:]], max_records=10)
    with pytest.raises(ProtocolError, match="announces a state frame but has none"):
        wire.Result.decode(with_state[:1], max_records=10)
    with pytest.raises(ProtocolError, match="carries no record"):
        wire.Result.decode(with_state[:2], max_records=10)
    with pytest.raises(ProtocolError, match="carries no record"):
        wire.Result.decode(without[:1], max_records=10)
    with pytest.raises(ProtocolError, match="carries 3 records, more than 2"):
        wire.Result.decode(with_state, max_records=2)


def test_decode_json_rejects_malformed() -> None:
    """decode_json refuses oversized, non-JSON, non-UTF-8 and non-object frames with ProtocolError."""
    for frame, fragment in ((b" " * (wire.MAX_JSON_BYTES + 1), "exceeds"), (b"{", "not valid JSON"),
                            (b"\xff", "not valid JSON"), (b"", "not valid JSON"), (b"[1]", "must be a JSON object"),
                            (b'"s"', "must be a JSON object"), (b"null", "must be a JSON object")):
        with pytest.raises(ProtocolError, match=fragment):
            wire.decode_json(frame, "thing")
    assert wire.decode_json(b" " * (wire.MAX_JSON_BYTES - 2) + b"{}", "thing") == {}


def test_decode_json_rejects_deep_nesting_with_protocol_error() -> None:
    """A deeply nested JSON frame under the size limit is a ProtocolError, not a RecursionError."""
    with pytest.raises(ProtocolError):
        wire.decode_json(b"[" * 100_000, "request")


def test_decode_json_rejects_huge_integer_with_protocol_error() -> None:
    """A JSON integer literal too long for int() is a ProtocolError, not a bare ValueError."""
    with pytest.raises(ProtocolError):
        wire.decode_json(b'{"id":' + b"9" * 5000 + b"}", "request")


# --- agent spec (the SPEC frame's body) ------------------------------------------------------


def spec_json() -> dict[str, Any]:
    return copy.deepcopy(MESSAGES["spec"]["decoded"]["spec"])


def test_spec_rejects_malformed() -> None:
    """AgentSpec.from_json refuses unknown capabilities, missing keys and limits that are not exact and in range."""
    low = LIMIT_BOUNDS["memory_bytes"][0]
    cases = [
        ({"capabilities": ["runtime", "net"]}, "unknown capabilities"),
        ({"capabilities": 5}, "malformed agent spec"),
        ({"limits": {**spec_json()["limits"], "extra": 1}}, "limits must have exactly the keys"),
        ({"limits": {**spec_json()["limits"], "memory_bytes": low - 1}}, "limit memory_bytes must be an integer"),
        ({"limits": {**spec_json()["limits"], "mailbox": True}}, "limit mailbox must be an integer"),
        ({"limits": {**spec_json()["limits"], "mailbox": 10.0}}, "limit mailbox must be an integer"),
        ({"limits": None}, "limits must have exactly the keys"),
    ]
    for change, fragment in cases:
        with pytest.raises(ProtocolError, match=fragment):
            AgentSpec.from_json({**spec_json(), **change})
    missing = spec_json()
    del missing["head_hash"]
    with pytest.raises(ProtocolError, match="malformed agent spec"):
        AgentSpec.from_json(missing)
    assert isinstance(AgentSpec.from_json(spec_json()).limits, Limits)


def test_spec_rejects_limits_given_as_a_list() -> None:
    """A spec whose limits are a list of the right names is a ProtocolError."""
    with pytest.raises(ProtocolError):
        AgentSpec.from_json({**spec_json(), "limits": list(LIMIT_BOUNDS)})


# --- layering ---------------------------------------------------------------------------------


def imported_top_modules(path: Path, package_root: Path) -> set[str]:
    """Top-level module names a source file imports (absolute, resolved relative, and import_module strings)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = list(path.relative_to(package_root).parent.parts)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                assert node.module is not None
                found.add(node.module.split(".")[0])
            else:
                base = package[: len(package) - (node.level - 1)]
                assert base, f"{path}: relative import climbs above the top-level package"
                found.add(base[0])
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("__import__", "import_module")))):
            found.add(node.args[0].value.split(".")[0])
    return found


@pytest.mark.parametrize(("package", "forbidden"), [
    ("theater", {"supervisor", "worker"}),
    ("supervisor", {"worker"}),
    ("worker", {"supervisor"}),
])
def test_package_layering(package: str, forbidden: set[str]) -> None:
    """theater imports neither supervisor nor worker; supervisor and worker never import each other."""
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    offenders = {str(f.relative_to(ROOT)): sorted(imported_top_modules(f, ROOT) & forbidden) for f in files}
    assert {f: m for f, m in offenders.items() if m} == {}
    if package != "theater":
        assert any("theater" in imported_top_modules(f, ROOT) for f in files)  # the checker does see imports


def test_supervision_frames_decode_to_their_golden_meaning() -> None:
    """The host request, host reply and child-exit call vectors decode to what frames.json says they mean."""
    for name, typ in (("host request", wire.WorkerType), ("host reply", wire.SupervisorType)):
        frames, meaning = frames_of(name), MESSAGES[name]["decoded"]
        frame_type = wire.parse_header(frames[0], typ)
        assert frame_type.name == name.upper().replace(" ", "_")
        decoded = wire.HostRequest.decode(frames[1:], name)
        assert (decoded.request_id, decoded.interface, decoded.body) == (
            meaning["request_id"], meaning.get("interface"), meaning["body"])
        assert decoded.encode(frame_type) == frames
    assert wire.decode_json(frames_of("host request")[2], "host request")["interface"] == "supervision"
    frames = frames_of("call child-exit")
    call = wire.Call.decode(frames[1:])
    child, exit_hash, reason = wire.decode_child_exit(call.data)
    meaning = MESSAGES["call child-exit"]["decoded"]
    assert call.kind is wire.CallKind.CHILD_EXIT
    assert (str(uuid.UUID(bytes=child)), exit_hash.hex(), reason) == (meaning["child"], meaning["exit_hash"], meaning["reason"])
    with pytest.raises(ProtocolError, match="shorter than 48 bytes"):
        wire.decode_child_exit(call.data[:47])


def test_host_request_names_its_interface() -> None:
    """A host request carries its interface in the body's `interface` key; decoded, the body is the interface's own."""
    request = wire.HostRequest(7, {"op": "get", "key": "k"}, "kv")
    frames = request.encode(wire.WorkerType.HOST_REQUEST)
    assert frames[2] == b'{"interface":"kv","key":"k","op":"get"}'
    assert wire.HostRequest.decode(frames[1:], "host request") == request
    reply = wire.HostRequest.decode(wire.HostRequest(7, {"ok": True}).encode(wire.SupervisorType.HOST_REPLY)[1:], "host reply")
    assert reply.interface is None and reply.body == {"ok": True}
    with pytest.raises(ProtocolError, match="interface must be a string"):
        wire.HostRequest.decode([frames[1], b'{"interface":3,"op":"get"}'], "host request")


def test_capabilities_are_interfaces_of_the_wit_package_and_have_host_modules() -> None:
    """Each capability is an interface of wit/agent.wit at the package's version, and the worker registers exactly them."""
    from theater.capabilities import CAPABILITIES
    from worker._caps import REGISTRY

    wit = (ROOT / "wit" / "agent.wit").read_text()
    package = re.search(r"^package (\S+)@(\S+);", wit, re.M)
    assert package is not None
    declared = set(re.findall(r"^interface ([a-z][a-z0-9-]*) \{", wit, re.M))
    for name, cap in CAPABILITIES.items():
        assert name in declared
        assert cap.interface == f"{package[1]}/{name}@{package[2]}"
    assert list(REGISTRY) == list(CAPABILITIES)
    assert all(REGISTRY[name].interface == cap.interface for name, cap in CAPABILITIES.items())


def test_a_verifier_at_a_stored_head_takes_what_follows_and_refuses_the_rest() -> None:
    """ChainVerifier.at_head: positioned after record N, it accepts N+1 linked to N's hash and state, and
    nothing else; no worker key is in force until a worker-key record."""
    key = Ed25519PrivateKey.generate()
    agent = bytes(range(16))
    genesis = sign_record(key, kind=Kind.GENESIS, agent_id=agent, seq=0, time_ns=1, prev_hash=ZERO_HASH,
                          state_hash=sha256(b""), fields=SAMPLE_FIELDS[Kind.GENESIS])
    verifier = ChainVerifier.at_head(key.public_key(), agent, 0, genesis.hash, sha256(b""))
    exit_ = sign_record(key, kind=Kind.EXIT, agent_id=agent, seq=1, time_ns=2, prev_hash=genesis.hash,
                        state_hash=sha256(b""), fields=SAMPLE_FIELDS[Kind.EXIT])
    other = sign_record(key, kind=Kind.EXIT, agent_id=bytes(16), seq=1, time_ns=2, prev_hash=genesis.hash,
                        state_hash=sha256(b""), fields=SAMPLE_FIELDS[Kind.EXIT])
    with pytest.raises(RecordError, match="another agent"):
        verifier.advance(other)
    assert verifier.worker_key is None
    verifier.advance(exit_)
    assert (verifier.next_seq, verifier.head_hash) == (2, exit_.hash)


# --- the bootstrap, the fork-server's messages, exit codes ---------------------------------------


def test_fork_server_messages_round_trip_and_refuse_what_is_malformed() -> None:
    """Each message decodes to exactly what was encoded; a wrong type, a missing field, an unknown note,
    an oversized datagram or a bootstrap with a bad token is a ProtocolError naming the problem."""
    from theater import forkserver as fs

    boot = fs.Boot("ipc:///tmp/h/run/workers.sock", bytes(range(32)), 4242)
    assert fs.Boot.decode(boot.encode()) == boot
    offer = fs.ArtifactOffer("k" * 64, "/h/cache/k", "ab" * 32)
    compile_ = fs.CompileRequest("k" * 64, "/h/cache/k", "/a/c.wasm", "cd" * 32, {"fuel_per_call": 1}, "c")
    profile = AgentSpec.from_json(spec_json()).profile
    for request in (fs.Spawn(7, "/h/run/workers/x", offer, None), fs.Spawn(8, "/w", None, compile_)):
        assert fs.decode_to_fork_server(request.encode()) == request
    for message in (fs.Ready(12, 1, True), fs.Spawned(7, 99), fs.SpawnRefused(7, "RuntimeError: threads"),
                    fs.Compiled("k", True, 0.5, "ab" * 32, 1234, (1, 2, 3)), fs.Compiled("k", False, 0.5, error="boom"),
                    fs.SpareBorn(5), fs.SpareEnded(5), fs.SpareBorn(6, bytes(range(32)), profile)):
        assert fs.decode_from_fork_server(message.encode()) == message
    for to_it in (fs.Spawn(9, "/w", offer, None, profile), fs.Took(6)):
        assert fs.decode_to_fork_server(to_it.encode()) == to_it
    bad = [
        (fs.Boot.decode, b'{"endpoint": "ipc://x", "token": "00", "parent_pid": 1}', "'token' is not 32 bytes"),
        (fs.Boot.decode, b'{"endpoint": "tcp://x:1", "token": "' + b"00" * 32 + b'", "parent_pid": 1}', "ipc://"),
        (fs.Boot.decode, b'{"endpoint": "ipc://x", "token": "' + b"00" * 32 + b'", "parent_pid": true}', "parent_pid"),
        (fs.Boot.decode, b"[1]", "not a JSON object"),
        (fs.decode_to_fork_server, b'{"op": "spawn", "id": "1", "workdir": "/w"}', "'id'"),
        (fs.decode_to_fork_server, b'{"op": "spawn", "id": 1, "workdir": "/w", "artifact": {"key": "k"}}', "'path'"),
        (fs.decode_from_fork_server, b'{"note": "gossip"}', "unknown note"),
        (fs.decode_from_fork_server, b'{"ready": 1, "threads": 1, "clone_parent": 1}', "'clone_parent'"),
        (fs.decode_from_fork_server, b'{"note": "compiled", "key": "k", "ok": true, "seconds": 1, "sha256": "x",'
                                     b' "size": 1, "signature": ["a"]}', "'signature'"),
        (fs.decode_from_fork_server, b"{}", "neither"),
        (fs.decode_from_fork_server, b" " * (fs.MAX_MESSAGE + 1), "more than"),
        (fs.decode_from_fork_server, b'{"note": "spare", "pid": 6, "token": "00"}', "'token' is not 32 bytes"),
        (fs.decode_from_fork_server, b'{"note": "spare", "pid": 6, "token": "' + b"00" * 32 + b'"}', "'profile'"),
        (fs.decode_from_fork_server, b'{"note": "spare", "pid": 6, "token": "' + b"00" * 32 + b'", "profile": {}}',
         "a load profile has exactly the keys"),
        (fs.decode_to_fork_server, b'{"op": "took"}', "'pid'"),
        (fs.decode_to_fork_server, b'{"op": "fork", "id": 1}', "unknown op"),
    ]
    for decode, data, why in bad:
        with pytest.raises(ProtocolError, match=re.escape(why)):
            decode(data)


def test_exit_codes_are_defined_once() -> None:
    """The worker's exit statuses are the contract's; the hardening layer and the supervisor use the same."""
    from supervisor import _workers
    from theater.exits import WorkerExit
    from worker import _harden

    assert [int(c) for c in WorkerExit] == [0, 2, 3, 4, 70]
    assert _harden.EXIT_PARENT_GONE is WorkerExit.PARENT_GONE
    assert "LOAD_FAILED" in {e.name for e in WorkerExit} and not hasattr(_workers, "EXIT_LOAD_FAILED")
