"""The ledger holds every record a worker signs to the agent's policy, whoever signed it.

A compromised worker holds a valid key: it can sign anything. These tests sign
real records with a real worker key on a real chain, as such a worker would,
and hand them to the supervisor's checks (in line, and after the parallel
signature precheck). A record just at a bound passes; one byte past it is a
violation naming the record, the field and the bound.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from supervisor._config import load_policy, policy_dirs
from supervisor._errors import Violation
from supervisor._ledger import MAX_ERROR_BYTES, MAX_NAME_BYTES, check_result, host_call_bound, precheck
from theater import wire
from theater.chain import ChainVerifier
from theater.records import ZERO_HASH, Kind, Record, sha256, sign_record
from theater.spec import Limits

AGENT = bytes(range(16))
LIMITS = load_policy("default", policy_dirs(None)).limits
MESSAGE = b"hi"


class Chain:
    """An agent's chain at its genesis, and a worker key to sign what follows, as a worker holds it."""

    def __init__(self) -> None:
        self.supervisor = Ed25519PrivateKey.generate()
        self.worker = Ed25519PrivateKey.generate()
        worker_public = self.worker.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        genesis = sign_record(self.supervisor, kind=Kind.GENESIS, agent_id=AGENT, seq=0, time_ns=1,
                              prev_hash=ZERO_HASH, state_hash=sha256(b""),
                              fields={"name": "a", "component_sha256": bytes(32), "config": "{}",
                                      "worker_key": worker_public, "confinement": "{}"})
        self.verifier = ChainVerifier(self.supervisor.public_key())
        self.verifier.advance(genesis)

    def result(self, *before: tuple[Kind, dict[str, object]], error: str = "") -> list[bytes]:
        """The frames of a handle RESULT: ``before`` (logs, host calls), then the handle record."""
        records: list[Record] = []
        head = self.verifier.head_hash
        for kind, fields in [*before, (Kind.HANDLE, {"message": MESSAGE, "reply": b"ok", "status": "ok" if not error
                                                    else "trap", "error": error, "fuel": 1})]:
            record = sign_record(self.worker, kind=kind, agent_id=AGENT, seq=self.verifier.next_seq + len(records),
                                 time_ns=2, prev_hash=head, state_hash=sha256(b""), fields=fields)
            records.append(record)
            head = record.hash
        return wire.Result(1, None, [r.raw for r in records]).encode()[1:]


def log(message: str, level: str = "info") -> tuple[Kind, dict[str, object]]:
    return Kind.LOG, {"level": level, "message": message, "truncated": 0}


def host_call(input_: bytes = b"", output: bytes = b"", function: str = "now",
              interface: str = "theater:agent/runtime@0.1.0") -> tuple[Kind, dict[str, object]]:
    return Kind.HOST_CALL, {"interface": interface, "function": function, "input": input_, "output": output}


CALL = wire.Call(1, wire.CallKind.HANDLE, MESSAGE)


def check(frames: list[bytes], chain: Chain, *, ahead: bool, limits: Limits = LIMITS) -> None:
    prechecked = precheck(frames, verifier=chain.verifier, limits=limits) if ahead else None
    if ahead:
        assert prechecked is not None  # the parallel path really ran
    check_result(frames, verifier=chain.verifier, limits=limits, call=CALL, prechecked=prechecked)


BOUND = host_call_bound(LIMITS)
CASES = [
    # (what, at the bound, one past it, the field the violation names)
    ("log message", log("x" * LIMITS.max_log_bytes), log("x" * (LIMITS.max_log_bytes + 1)), "message"),
    ("log message, multi-byte", log("é" * (LIMITS.max_log_bytes // 2)), log("é" * (LIMITS.max_log_bytes // 2) + "x"),
     "message"),
    ("log level", log("m", "l" * MAX_NAME_BYTES), log("m", "l" * (MAX_NAME_BYTES + 1)), "level"),
    ("host-call input", host_call(input_=b"i" * BOUND), host_call(input_=b"i" * (BOUND + 1)), "input"),
    ("host-call output", host_call(output=b"o" * BOUND), host_call(output=b"o" * (BOUND + 1)), "output"),
    ("host-call function", host_call(function="f" * MAX_NAME_BYTES), host_call(function="f" * (MAX_NAME_BYTES + 1)),
     "function"),
    ("host-call interface", host_call(interface="i" * MAX_NAME_BYTES),
     host_call(interface="i" * (MAX_NAME_BYTES + 1)), "interface"),
]


@pytest.mark.parametrize("ahead", [False, True], ids=["in-line", "prechecked"])
@pytest.mark.parametrize(("what", "at", "past", "field"), CASES, ids=[c[0] for c in CASES])
def test_every_field_a_worker_signs_is_held_to_the_policy(what: str, at: tuple[Kind, dict[str, object]],
                                                           past: tuple[Kind, dict[str, object]], field: str,
                                                           ahead: bool) -> None:
    chain = Chain()
    check(chain.result(at, log("padding")), chain, ahead=ahead)
    with pytest.raises(Violation, match=rf"record 1 \((log|host-call)\): {field} of \d+ bytes exceeds \d+ allowed"):
        check(chain.result(past, log("padding")), chain, ahead=ahead)


@pytest.mark.parametrize("ahead", [False, True], ids=["in-line", "prechecked"])
def test_a_call_error_is_bounded(ahead: bool) -> None:
    chain = Chain()
    check(chain.result(log("a"), error="e" * MAX_ERROR_BYTES), chain, ahead=ahead)
    with pytest.raises(Violation, match=r"\(handle\): error of \d+ bytes exceeds"):
        check(chain.result(log("a"), error="e" * (MAX_ERROR_BYTES + 1)), chain, ahead=ahead)


def test_the_16_mib_log_record_attack_is_a_violation() -> None:
    """What was found: a worker signing its own 16 MiB log records got them stored, call after call."""
    chain = Chain()
    frames = chain.result(log("x" * (16 << 20)))
    with pytest.raises(Violation, match="message of 16777216 bytes exceeds 4096"):
        check(frames, chain, ahead=False)
    with pytest.raises(Violation, match="message of 16777216 bytes exceeds 4096"):
        check(frames, chain, ahead=True)


def test_what_an_honest_worker_sends_under_the_policy_passes() -> None:
    """The largest honest host calls: random-bytes at max_random_bytes, a spawn carrying max_message_bytes of args."""
    chain = Chain()
    random = host_call(input_=LIMITS.max_random_bytes.to_bytes(4, "big"), output=b"r" * LIMITS.max_random_bytes,
                       function="random-bytes")
    args = "a" * LIMITS.max_message_bytes
    spawn = host_call(input_=json.dumps({"template": "t", "name": "n", "args": args}).encode(),
                      output=json.dumps({"ok": True, "id": "x" * 36}).encode(), function="spawn",
                      interface="theater:agent/supervision@0.1.0")
    check(chain.result(random, spawn, log("x" * LIMITS.max_log_bytes)), chain, ahead=True)


def test_a_stricter_policy_holds_tighter() -> None:
    """The bounds follow the agent's own limits: under a policy with max_log_bytes 16, 17 bytes is a violation."""
    strict = dataclasses.replace(LIMITS, max_log_bytes=16)
    chain = Chain()
    check(chain.result(log("x" * 16)), chain, ahead=False, limits=strict)
    with pytest.raises(Violation, match="message of 17 bytes exceeds 16"):
        check(chain.result(log("x" * 17)), chain, ahead=False, limits=strict)
