"""The ledger holds every record a worker signs to what an honest worker writes under the agent's policy.

A compromised worker holds a valid key: it can sign anything. These tests sign
real records with a real worker key on a real chain, as such a worker would,
and hand them to the supervisor's checks: in line, and after the parallel
precheck. A record just at a bound passes; one byte past it is a violation
naming the record, the field, its size and the bound. The worker's own host
functions, run with the largest arguments they accept, write records that pass.
"""

from __future__ import annotations

import dataclasses
import sys
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Theater, of, ps, records, supervisor_log, wait_running
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from supervisor._config import load_policy, policy_dirs
from supervisor._errors import Violation
from supervisor._ledger import (
    HOST_FUNCTIONS,
    MAX_ERROR_BYTES,
    MAX_UNRECORDED_CHARS,
    MAX_UNRECORDED_PART,
    MAX_WASM_NAME_BYTES,
    SERVED_INTERFACES,
    WASI_FUNCTIONS,
    Checked,
    check_result,
    precheck,
    result_bound,
    unrecorded_host_calls,
)
from theater import wire
from theater.capabilities import CAPABILITIES
from theater.chain import ChainVerifier
from theater.client import ClientError
from theater.errors import ProtocolError
from theater.records import STATUSES, ZERO_HASH, Kind, Record, Signer, sha256, sign_record
from theater.spec import Limits
from worker._caps._host import Host
from worker._caps.runtime import Runtime
from worker._caps.wasi import Wasi
from worker._recorder import Recorder

AGENT = uuid.UUID(bytes=bytes(range(16)))
LIMITS = load_policy("default", policy_dirs(None)).limits
RUNTIME = CAPABILITIES["runtime"].interface
SUPERVISION = CAPABILITIES["supervision"].interface
HANDLE = wire.Call(1, wire.CallKind.HANDLE, b"hi")
INIT = wire.Call(1, wire.CallKind.INIT, b"init args")
CHILD = bytes(range(100, 116))
EXIT_HASH = bytes(range(32))
CHILD_EXIT = wire.Call(1, wire.CallKind.CHILD_EXIT, wire.encode_child_exit(CHILD, EXIT_HASH, "trap: boom; restarting"))
SMILE = "\U0001f600"  # 4 bytes of UTF-8; 12 bytes as escaped JSON

Fields = dict[str, Any]
Signed = tuple[Kind, Fields]


class Chain:
    """An agent's chain at its genesis, and the key of its worker, to sign what follows as that worker does."""

    def __init__(self) -> None:
        self.supervisor = Ed25519PrivateKey.generate()
        self.worker = Ed25519PrivateKey.generate()
        worker_public = self.worker.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.genesis = sign_record(self.supervisor, kind=Kind.GENESIS, agent_id=AGENT.bytes, seq=0, time_ns=1,
                                   prev_hash=ZERO_HASH, state_hash=sha256(b""),
                                   fields={"name": "a", "component_sha256": bytes(32), "config": "{}",
                                           "worker_key": worker_public, "confinement": "{}"})
        self.verifier = ChainVerifier(self.supervisor.public_key())
        self.verifier.advance(self.genesis)

    def frames(self, *before: Signed, call: wire.Call = HANDLE, state: bytes | None = None, covered: bool = False,
               **final: Any) -> list[bytes]:
        """The frames of a RESULT for ``call``: ``before`` (logs, host calls; ``covered``: unsigned, as a worker
        of this build writes them), then the final record, whose fields are those an honest worker writes for
        a call that succeeded, with ``final`` in their place."""
        kind, fields = final_record(call)
        fields.update(final)
        records: list[Record] = []
        head = self.verifier.head_hash
        for i, (k, f) in enumerate([*before, (kind, fields)]):
            last = i == len(before)
            record = sign_record(self.worker, kind=k, agent_id=AGENT.bytes, seq=self.verifier.next_seq + i,
                                 time_ns=2, prev_hash=head, fields=f, covered=covered and not last,
                                 state_hash=sha256(state) if last and state is not None else sha256(b""))
            records.append(record)
            head = record.hash
        return wire.Result(call.call_id, state, [r.raw for r in records]).encode()[1:]

    def recorder(self) -> Recorder:
        """What a real worker signs with: numbers, links and signs each record after the genesis."""
        return Recorder(self.worker, str(AGENT), 0, self.genesis.hash, sha256(b""))


def final_record(call: wire.Call) -> Signed:
    outcome = {"status": "ok", "error": "", "fuel": 1}
    if call.kind is wire.CallKind.HANDLE:
        return Kind.HANDLE, {"message": call.data, "reply": b"ok", **outcome}
    if call.kind is wire.CallKind.INIT:
        return Kind.INIT, {"args": call.data, **outcome}
    child, exit_hash, reason = wire.decode_child_exit(call.data)
    return Kind.CHILD_EXIT, {"child": child, "exit_hash": exit_hash, "reason": reason, **outcome}


def log(message: str, level: str = "info") -> Signed:
    return Kind.LOG, {"level": level, "message": message, "truncated": 0}


def host_call(function: str, input_: bytes = b"", output: bytes = b"", interface: str = RUNTIME) -> Signed:
    return Kind.HOST_CALL, {"interface": interface, "function": function, "input": input_, "output": output}


def passes(frames: list[bytes], chain: Chain, *, ahead: bool, call: wire.Call = HANDLE,
           limits: Limits = LIMITS) -> Checked:
    prechecked = precheck(frames, verifier=chain.verifier, limits=limits) if ahead else None
    assert prechecked is not None or not ahead  # the parallel path really ran
    return check_result(frames, verifier=chain.verifier, limits=limits, call=call, prechecked=prechecked)


def refused(frames: list[bytes], chain: Chain, match: str, *, ahead: bool, call: wire.Call = HANDLE,
            limits: Limits = LIMITS, precheck_refuses: bool = True) -> None:
    """The result is a violation whose reason matches ``match``. On the parallel path, a bound that does not
    depend on the call already stops the precheck: nothing past it goes to the signature pool."""
    prechecked = precheck(frames, verifier=chain.verifier, limits=limits) if ahead else None
    if ahead:
        assert (prechecked is None) == precheck_refuses
    with pytest.raises(Violation, match=match):
        check_result(frames, verifier=chain.verifier, limits=limits, call=call, prechecked=prechecked)


PATHS = pytest.mark.parametrize("ahead", [False, True], ids=["in-line", "prechecked"])

R = LIMITS.max_random_bytes
WASI_RANDOM = "wasi:random/random@0.2.3"
LONGEST_WASI = "wasi:random/random@0.2.0-" + "a" * (MAX_WASM_NAME_BYTES - len("wasi:random/random@0.2.0-"))

# what -> (at the bound, one past it, the field the violation names, its bound)
RECORD_CASES: dict[str, tuple[Signed, Signed, str, int]] = {
    "log message": (log("x" * LIMITS.max_log_bytes), log("x" * (LIMITS.max_log_bytes + 1)), "message",
                    LIMITS.max_log_bytes),
    "log message, multi-byte": (log("é" * (LIMITS.max_log_bytes // 2)), log("é" * (LIMITS.max_log_bytes // 2) + "x"),
                                "message", LIMITS.max_log_bytes),
    "log level": (log("m", "debug"), log("m", "debugs"), "level", 5),
    "self-id output": (host_call("self-id", output=b"u" * 36), host_call("self-id", output=b"u" * 37), "output", 36),
    "self-id input": (host_call("self-id"), host_call("self-id", b"i"), "input", 0),
    "now output": (host_call("now", output=bytes(8)), host_call("now", output=bytes(9)), "output", 8),
    "random-bytes input": (host_call("random-bytes", bytes(4)), host_call("random-bytes", bytes(5)), "input", 4),
    "random-bytes output": (host_call("random-bytes", output=bytes(R)), host_call("random-bytes", output=bytes(R + 1)),
                            "output", R),
    "finish output": (host_call("finish"), host_call("finish", output=b"o"), "output", 0),
    "shutdown detail": (host_call("shutdown", (SMILE * 256).encode()), host_call("shutdown", (SMILE * 256 + "x").encode()),
                        "input", 1024),
    "wasi get-random-bytes input": (host_call("get-random-bytes", bytes(8), interface=WASI_RANDOM),
                                    host_call("get-random-bytes", bytes(9), interface=WASI_RANDOM), "input", 8),
    "wasi get-random-bytes output": (host_call("get-random-bytes", bytes(8), bytes(R), interface=WASI_RANDOM),
                                     host_call("get-random-bytes", bytes(8), bytes(R + 1), interface=WASI_RANDOM),
                                     "output", R),
    "wasi insecure-seed output": (host_call("insecure-seed", output=bytes(16), interface="wasi:random/insecure-seed@0.2.0"),
                                  host_call("insecure-seed", output=bytes(17), interface="wasi:random/insecure-seed@0.2.0"),
                                  "output", 16),
    "wasi wall-clock output": (host_call("now", output=bytes(12), interface="wasi:clocks/wall-clock@0.2.0"),
                               host_call("now", output=bytes(13), interface="wasi:clocks/wall-clock@0.2.0"), "output", 12),
    "wasi interface": (host_call("get-random-u64", output=bytes(8), interface=LONGEST_WASI),
                       host_call("get-random-u64", output=bytes(8), interface=LONGEST_WASI + "a"), "interface",
                       MAX_WASM_NAME_BYTES),
}


@PATHS
def test_covered_logs_and_host_calls_pass_under_the_final_records_signature(ahead: bool) -> None:
    chain = Chain()
    checked = passes(chain.frames(log("tick"), host_call("now", output=bytes(8)), covered=True), chain, ahead=ahead)
    assert [r.signer for r in checked.commit.records] == [Signer.COVERED, Signer.COVERED, Signer.WORKER]
    assert [len(r.signature) for r in checked.commit.records] == [0, 0, 64]


@PATHS
def test_a_covered_record_changed_after_the_signature_is_refused(ahead: bool) -> None:
    """The covering signature holds the covered records through the hash chain: one changed byte of a covered
    log breaks the link of the record after it, though every signature present still verifies."""
    chain = Chain()
    frames = chain.frames(log("tick"), host_call("now", output=bytes(8)), covered=True)
    result = wire.Result.decode(frames, max_records=10)
    changed = bytearray(result.records[0])
    changed[-2] ^= ord("t") ^ ord("k")  # "tick" -> "tikk": same length, still parses
    frames = wire.Result(HANDLE.call_id, None, [bytes(changed), *result.records[1:]]).encode()[1:]
    refused(frames, chain, "record 2: previous-hash does not match", ahead=ahead, precheck_refuses=False)


@PATHS
def test_a_result_that_ends_with_a_covered_record_is_refused(ahead: bool) -> None:
    """Only the record that ends a call is signed; a result with nothing signed after its covered records
    (or ending in one) is a violation before any chain rule."""
    chain = Chain()
    frames = chain.frames(log("tick"), log("tock"), covered=True)
    result = wire.Result.decode(frames, max_records=10)
    frames = wire.Result(HANDLE.call_id, None, result.records[:2]).encode()[1:]
    refused(frames, chain, "must be host calls and logs, then one handle record", ahead=ahead)


@PATHS
def test_a_covered_record_past_a_bound_is_refused_as_a_signed_one(ahead: bool) -> None:
    chain = Chain()
    refused(chain.frames(log("x" * (LIMITS.max_log_bytes + 1)), covered=True), chain,
            f"message of {LIMITS.max_log_bytes + 1} bytes exceeds {LIMITS.max_log_bytes}", ahead=ahead)


@PATHS
@pytest.mark.parametrize("what", RECORD_CASES)
def test_every_field_of_a_log_or_host_call_is_held_to_its_bound(what: str, ahead: bool) -> None:
    at, past, field, bound = RECORD_CASES[what]
    chain = Chain()
    passes(chain.frames(log("before"), at), chain, ahead=ahead)
    size = len(past[1][field].encode() if isinstance(past[1][field], str) else past[1][field])
    assert size == bound + 1
    kind = "log" if past[0] is Kind.LOG else "host-call"
    refused(chain.frames(log("before"), past), chain, rf"^record 2 \({kind}\): {field} of {bound + 1} bytes exceeds {bound} ",
            ahead=ahead)


def test_every_host_function_of_every_capability_has_bounds() -> None:
    """Adding a capability means telling the ledger what its host functions record: bounds for what the
    worker answers itself (runtime), an exact match with the supervisor's answers for the rest."""
    bounded = {interface for interface, _ in HOST_FUNCTIONS}
    assert bounded | SERVED_INTERFACES == {c.interface for c in CAPABILITIES.values()}
    assert not bounded & SERVED_INTERFACES


ANSWERED = (SUPERVISION, "children", b"{}", b'{"children":[],"ok":true}')
KV_ANSWERED = ("theater:agent/kv@0.1.0", "get", b'{"key":"k"}', b'{"found":true,"ok":true}\x00value')


def served_call(answered: tuple[str, str, bytes, bytes], **change: bytes) -> Signed:
    interface, function, input_, output = answered
    return host_call(function, change.get("input", input_), change.get("output", output), interface=interface)


@pytest.mark.parametrize("answered", [ANSWERED, KV_ANSWERED], ids=["supervision", "kv"])
def test_a_host_call_the_supervisor_served_must_be_recorded_exactly_as_answered(answered: Any) -> None:
    """The supervisor knows what it answered: a record of a served interface that differs in one byte, one
    it never answered, or a successful call that leaves an answer out, is a violation. Such a result is
    never checked ahead (the answers are known only where the call is checked)."""

    def check(*before: Signed, served: list[Any], **final: Any) -> Checked:
        chain = Chain()
        frames = chain.frames(*before, **final)
        assert precheck(frames, verifier=chain.verifier, limits=LIMITS) is None or not before
        return check_result(frames, verifier=chain.verifier, limits=LIMITS, call=HANDLE, served=served)

    check(served_call(answered), served=[answered])
    for forged in (served_call(answered, output=answered[3] + b"!"), served_call(answered, input=b"{ }")):
        with pytest.raises(Violation, match=r"^record 1 \(host-call\): .* is not the host call the supervisor "
                                            r"answered \(1 of 1\)$"):
            check(forged, served=[answered])
    with pytest.raises(Violation, match=r"is not the host call the supervisor answered \(1 of 0\)$"):
        check(served_call(answered), served=[])
    with pytest.raises(Violation, match=r"^the supervisor answered 2 host requests, the result records 1$"):
        check(served_call(answered), served=[answered, answered])
    # A call that failed may have stopped waiting before an answer came: what it recorded is still exact.
    check(served_call(answered), served=[answered, answered], status="host-limit", reply=None, error="late")


@PATHS
@pytest.mark.parametrize(("interface", "function"), [
    (RUNTIME, "log"), (RUNTIME, "sleep"), ("theater:agent/runtime@0.2.0", "now"),
    ("wasi:random/random@0.3.0", "get-random-u64"), ("wasi:random/random", "get-random-u64"),
    ("wasi:filesystem/types@0.2.0", "read"), ("wasi:clocks/wall-clock@0.2.0", "resolution"),
])
def test_a_host_call_no_worker_records_is_a_violation(interface: str, function: str, ahead: bool) -> None:
    chain = Chain()
    refused(chain.frames(host_call(function, interface=interface)), chain,
            rf"^record 1 \(host-call\): function '{function}' of interface .* is not one a worker records", ahead=ahead)


@PATHS
def test_the_16_mib_log_record_attack_is_a_violation(ahead: bool) -> None:
    """What was found: a worker signing its own 16 MiB log records got them stored, call after call."""
    chain = Chain()
    frames = chain.frames(log("x" * (16 << 20)))
    refused(frames, chain, r"^record 1 \(log\): message of 16777216 bytes exceeds 4096 \(max_log_bytes\)$",
            ahead=ahead)


@PATHS
def test_the_bounds_follow_the_agents_policy(ahead: bool) -> None:
    """Under a stricter policy the same records are held tighter: max_log_bytes 16, max_random_bytes 4."""
    strict = dataclasses.replace(LIMITS, max_log_bytes=16, max_random_bytes=4)
    chain = Chain()
    passes(chain.frames(log("x" * 16), host_call("random-bytes", bytes(4), bytes(4))), chain, ahead=ahead, limits=strict)
    refused(chain.frames(log("x" * 17)), chain, r"message of 17 bytes exceeds 16 \(max_log_bytes\)", ahead=ahead,
            limits=strict)
    refused(chain.frames(host_call("random-bytes", bytes(4), bytes(5))), chain,
            r"output of 5 bytes exceeds 4 \(theater:agent/runtime random-bytes, max_random_bytes\)", ahead=ahead,
            limits=strict)


def test_records_parsed_ahead_under_other_limits_are_held_again() -> None:
    """check_result applies the bounds to precheck's parsed records too: what was prechecked under a roomier
    policy (the agent's limits changed in between) is held to the limits of the check."""
    roomy = dataclasses.replace(LIMITS, max_log_bytes=LIMITS.max_log_bytes * 2)
    chain = Chain()
    frames = chain.frames(log("x" * (LIMITS.max_log_bytes + 1)))
    prechecked = precheck(frames, verifier=chain.verifier, limits=roomy)
    assert prechecked is not None
    with pytest.raises(Violation, match=r"message of 4097 bytes exceeds 4096"):
        check_result(frames, verifier=chain.verifier, limits=LIMITS, call=HANDLE, prechecked=prechecked)


# --- the final record ----------------------------------------------------------------------


@PATHS
@pytest.mark.parametrize("call", [HANDLE, INIT, CHILD_EXIT], ids=["handle", "init", "child-exit"])
def test_a_calls_error_is_bounded(call: wire.Call, ahead: bool) -> None:
    chain = Chain()
    kind = final_record(call)[0].name.lower().replace("_", "-")
    failed = {"status": "trap", **({"reply": None} if call.kind is wire.CallKind.HANDLE else {})}
    passes(chain.frames(call=call, error="e" * MAX_ERROR_BYTES, **failed), chain, ahead=ahead, call=call)
    passes(chain.frames(call=call, error=SMILE * (MAX_ERROR_BYTES // 4), **failed), chain, ahead=ahead, call=call)
    refused(chain.frames(call=call, error=SMILE * (MAX_ERROR_BYTES // 4) + "e", **failed), chain,
            rf"^record 1 \({kind}\): error of {MAX_ERROR_BYTES + 1} bytes exceeds {MAX_ERROR_BYTES} ", ahead=ahead,
            call=call)


@PATHS
def test_a_reply_is_bounded_by_max_message_bytes(ahead: bool) -> None:
    chain = Chain()
    n = LIMITS.max_message_bytes
    assert passes(chain.frames(reply=b"r" * n), chain, ahead=ahead).reply == b"r" * n
    refused(chain.frames(reply=b"r" * (n + 1)), chain,
            rf"^record 1 \(handle\): reply of {n + 1} bytes exceeds {n} \(max_message_bytes\)$", ahead=ahead)


@PATHS
def test_an_unknown_status_is_refused_before_any_signature_is_checked(ahead: bool) -> None:
    chain = Chain()
    for status in STATUSES:
        passes(chain.frames(status=status, reply=None), chain, ahead=ahead)
    refused(chain.frames(status="s" * (16 << 20)), chain, r"^unknown call status 'ssss", ahead=ahead)


# what -> (call, the final record's field, a value one byte longer than the call's, the bound)
ECHO_CASES: dict[str, tuple[wire.Call, str, Any, int]] = {
    "handle message": (HANDLE, "message", HANDLE.data + b"!", len(HANDLE.data)),
    "init args": (INIT, "args", INIT.data + b"!", len(INIT.data)),
    "child-exit child": (CHILD_EXIT, "child", CHILD + b"!", 16),
    "child-exit exit_hash": (CHILD_EXIT, "exit_hash", EXIT_HASH + b"!", 32),
    "child-exit reason": (CHILD_EXIT, "reason", "trap: boom; restarting!", len("trap: boom; restarting")),
}


@PATHS
@pytest.mark.parametrize("what", ECHO_CASES)
def test_what_the_final_record_repeats_is_held_to_the_call_sent(what: str, ahead: bool) -> None:
    """The call's data is the bound (the record must equal it); a longer field is named before any
    signature is checked. The precheck does not know the call: check_result holds its parsed records."""
    call, field, longer, bound = ECHO_CASES[what]
    chain = Chain()
    passes(chain.frames(call=call), chain, ahead=ahead, call=call)
    kind = final_record(call)[0].name.lower().replace("_", "-")
    refused(chain.frames(call=call, **{field: longer}), chain,
            rf"^record 1 \({kind}\): {field} of {bound + 1} bytes exceeds {bound} \(the .* sent\)$", ahead=ahead,
            call=call, precheck_refuses=False)


# --- counts and the whole result -------------------------------------------------------------


@PATHS
def test_each_kind_is_held_to_its_count(ahead: bool) -> None:
    """At most max_logs_per_call log records and max_host_calls_per_call host-call records, each on its own."""
    few = dataclasses.replace(LIMITS, max_logs_per_call=2, max_host_calls_per_call=2)
    chain = Chain()
    now = host_call("now", output=bytes(8))
    passes(chain.frames(log("a"), log("b"), now, now), chain, ahead=ahead, limits=few)
    refused(chain.frames(log("a"), log("b"), log("c")), chain,
            r"^result carries 3 log records, more than max_logs_per_call \(2\)$", ahead=ahead, limits=few)
    refused(chain.frames(now, now, now), chain,
            r"^result carries 3 host-call records, more than max_host_calls_per_call \(2\)$", ahead=ahead, limits=few)


SMALL = dataclasses.replace(LIMITS, max_logs_per_call=1, max_host_calls_per_call=1, max_log_bytes=8,
                            max_message_bytes=32768, max_state_bytes=1024)
LONGEST_INSECURE = "wasi:random/insecure@0.2.0-" + "a" * (MAX_WASM_NAME_BYTES - len("wasi:random/insecure@0.2.0-"))
LARGEST_HOST_CALL = host_call("get-insecure-random-bytes", bytes(8), bytes(SMALL.max_random_bytes),
                              interface=LONGEST_INSECURE)


@PATHS
def test_a_result_at_its_total_passes_and_one_byte_more_is_refused_before_anything_is_parsed(ahead: bool) -> None:
    """Every record at its largest, at each count limit, and the largest outcome: exactly result_bound.
    One byte more is refused on the frames' lengths alone."""
    chain = Chain()
    state = b"s" * SMALL.max_state_bytes
    frames = chain.frames(log("x" * 8, "debug"), LARGEST_HOST_CALL, state=state, reply=b"r" * SMALL.max_message_bytes)
    bound = result_bound(SMALL, HANDLE)
    assert sum(map(len, frames[1:])) == bound
    passes(frames, chain, ahead=ahead, limits=SMALL)
    over = chain.frames(log("x" * 9, "debug"), LARGEST_HOST_CALL, state=state, reply=b"r" * SMALL.max_message_bytes)
    refused(over, chain, rf"^result of {bound + 1} bytes exceeds {bound}, the most the agent's policy allows",
            ahead=ahead, limits=SMALL)


@PATHS
def test_a_failed_call_at_the_total_passes(ahead: bool) -> None:
    """When the longest error outweighs the largest reply and state, a failed call reaches the total."""
    tiny = dataclasses.replace(SMALL, max_message_bytes=0, max_state_bytes=0)
    chain = Chain()
    frames = chain.frames(log("x" * 8, "debug"), LARGEST_HOST_CALL, status="malformed-result", reply=None,
                          error="e" * MAX_ERROR_BYTES)
    assert sum(map(len, frames[1:])) == result_bound(tiny, HANDLE)
    passes(frames, chain, ahead=ahead, limits=tiny)


def test_the_total_follows_the_policy_and_the_call() -> None:
    assert result_bound(LIMITS, wire.Call(1, wire.CallKind.HANDLE, b"x" * 10)) == result_bound(LIMITS, HANDLE) + 8
    assert result_bound(dataclasses.replace(LIMITS, max_logs_per_call=LIMITS.max_logs_per_call + 1), HANDLE) == (
        result_bound(LIMITS, HANDLE) + 167 + 4 + 5 + 4 + LIMITS.max_log_bytes + 1)


@PATHS
def test_a_state_past_max_state_bytes_is_refused(ahead: bool) -> None:
    chain = Chain()
    n = LIMITS.max_state_bytes
    passes(chain.frames(state=b"s" * n), chain, ahead=ahead)
    # The precheck does not look at the state: check_result refuses it before any record is checked.
    refused(chain.frames(state=b"s" * (n + 1)), chain, rf"^state of {n + 1} bytes exceeds max_state_bytes \({n}\)$",
            ahead=ahead, precheck_refuses=False)


# --- what the worker's own host functions write ----------------------------------------------


class Functions:
    """What a host module adds to a linker instance, by name (the linker's side of ``add_func``)."""

    def __init__(self) -> None:
        self.funcs: dict[str, Callable[..., Any]] = {}

    def add_func(self, name: str, func: Callable[..., Any]) -> None:
        self.funcs[name] = func


def supervisor_side(capability: str, body: dict[str, Any], data: bytes | None,
                    wait_ms: int) -> tuple[dict[str, Any], bytes | None]:
    """The request crosses the wire as the real worker sends it and the supervisor reads it (a frame past
    the JSON limit is refused there); the answer is the largest HOST_REPLY the worker reads."""
    request = wire.HostRequest(1, body, capability, data).encode(wire.WorkerType.HOST_REQUEST)
    wire.HostRequest.decode(request[1:], "host request")
    answer = {"ok": False, "error": "e" * (wire.MAX_JSON_BYTES - len(wire.encode_json({"ok": False, "error": ""})))}
    reply = wire.HostRequest(1, answer).encode(wire.SupervisorType.HOST_REPLY)
    assert len(reply[2]) == wire.MAX_JSON_BYTES
    decoded = wire.HostRequest.decode(reply[1:], "host reply")
    return decoded.body, decoded.data


def largest_spawn_args() -> str:
    """The longest args whose spawn request (template and name at 256 characters) the supervisor reads."""
    empty = {"op": "spawn", "template": "t" * 256, "name": SMILE * 256, "args": "", "interface": "supervision"}
    return "a" * (wire.MAX_JSON_BYTES - len(wire.encode_json(empty)))


def honest_calls(host: Host) -> None:
    """Every host function a worker links, each called with the largest arguments it accepts."""
    funcs = Functions()
    Runtime(host).link(funcs)  # type: ignore[arg-type]
    rt = funcs.funcs
    rt["log"](None, "warn", SMILE * host.limits.max_log_bytes)  # cut to max_log_bytes
    rt["log"](None, "a level no worker knows", "m")  # written as info
    rt["self-id"](None)
    rt["now"](None)
    rt["random-bytes"](None, host.limits.max_random_bytes)
    rt["shutdown"](None, SMILE * 256)
    rt["finish"](None)
    wasi = Wasi(host)
    for interface in ("wasi:random/random@0.2.3", "wasi:random/insecure@0.2.0", "wasi:random/insecure-seed@0.2.0",
                      "wasi:clocks/wall-clock@0.2.0", "wasi:cli/environment@0.2.0", "wasi:filesystem/preopens@0.2.0",
                      LONGEST_WASI):
        linker = wasi.linker_for(interface)
        assert linker is not None
        funcs = Functions()
        linker(funcs)  # type: ignore[arg-type]
        for name, func in funcs.funcs.items():
            if name.endswith("-bytes"):
                func(None, host.limits.max_random_bytes)
            else:
                func(None)


@PATHS
@pytest.mark.parametrize("policy", ["default", "strict", "supervisor"])
def test_what_the_worker_records_at_its_own_limits_passes(policy: str, ahead: bool) -> None:
    """The worker's own host functions (runtime, WASI), each called with the largest arguments it
    accepts, sign records the ledger takes under the same policy; and each one it records has a bound."""
    limits = load_policy(policy, policy_dirs(None)).limits
    chain = Chain()
    recorder = chain.recorder()
    host = Host(recorder, limits, str(AGENT), supervisor_side)
    honest_calls(host)
    recorder.append(Kind.HANDLE, {"message": HANDLE.data, "reply": b"r" * limits.max_message_bytes, "status": "ok",
                                  "error": "", "fuel": 1})
    signed = [Record.parse(raw) for raw in recorder.take()]
    frames = wire.Result(HANDLE.call_id, None, [r.raw for r in signed]).encode()[1:]
    checked = passes(frames, chain, ahead=ahead, call=HANDLE, limits=limits)
    assert checked.ending == ("normal", "")  # finish came after shutdown: the last request wins
    calls = {(r.fields()["interface"].partition("@")[0], r.fields()["function"]) for r in signed
             if r.kind is Kind.HOST_CALL}
    known = {(i.partition("@")[0], f) for i, f in HOST_FUNCTIONS} | set(WASI_FUNCTIONS)
    assert calls == known  # every function a worker records is bounded, and every bound is of one it records
    largest = {f["function"]: (len(f["input"]), len(f["output"]))
               for f in (r.fields() for r in signed if r.kind is Kind.HOST_CALL)}
    assert largest["shutdown"][0] == 1024
    assert {len(r.fields()["message"].encode()) for r in signed if r.kind is Kind.LOG} == {limits.max_log_bytes, 1}


def test_one_character_more_of_spawn_args_is_refused_by_the_supervisor_not_recorded() -> None:
    """The spawn input's bound is the HOST_REQUEST's: a request one byte longer never reaches the record."""
    chain = Chain()
    host = Host(chain.recorder(), LIMITS, str(AGENT), supervisor_side)
    with pytest.raises(ProtocolError, match="exceeds 1048576"):
        host.ask("supervision", {"op": "spawn", "template": "t" * 256, "name": SMILE * 256,
                                 "args": largest_spawn_args() + "a"})
    assert host.recorder.pending == []


# --- end to end: a real supervisor, a worker that signs a 16 MiB log record ---------------------

SUPERVISOR = """
import sys
from supervisor import Supervisor
from theater.home import Home
Supervisor(Home(sys.argv[1]), worker_command=[sys.executable, "-c", sys.argv[2]]).serve_forever()
"""

# The real worker, except that on its second handle call it signs a 16 MiB log record first.
BIG_LOG_WORKER = """
import sys
import worker.__main__ as entry
from theater import wire
from theater.records import Kind
from worker import _loop

real_run = _loop.Agent.run
handled = []

def run(self, call):
    if call.kind is wire.CallKind.HANDLE:
        handled.append(call.call_id)
        if len(handled) == 2:
            self.recorder.append(Kind.LOG, {"level": "info", "message": "x" * (16 << 20), "truncated": 0})
    return real_run(self, call)

_loop.Agent.run = run
sys.exit(entry.main())
"""


def test_a_worker_signing_a_16_mib_log_record_is_killed_and_nothing_of_it_is_stored(theater: Theater) -> None:
    theater.stop()
    theater.start(extra=[sys.executable, "-c", SUPERVISOR, str(theater.home.root), BIG_LOG_WORKER])
    with theater.client() as c:
        c.spawn(theater.manifest("ctr", "counter.wat"))
        assert c.call("ctr", b"first") == b"1"
        pid = ps(c, "ctr")["pid"]
        with pytest.raises(ClientError) as died:
            c.call("ctr", b"second")
        assert died.value.code == "worker-died"
        wait_running(c, "ctr", pid)
        assert c.call("ctr", b"third") == b"2"  # the new worker's first handle call is honest
    chain = records(theater, "ctr")
    [violation] = of(chain, Kind.VIOLATION)
    reason = violation.fields()["reason"]
    assert reason.endswith("(log): message of 16777216 bytes exceeds 4096 (max_log_bytes)"), reason
    assert f"protocol violation: {reason}" in supervisor_log(theater)
    assert [h.fields()["message"] for h in of(chain, Kind.HANDLE)] == [b"first", b"third"]
    assert max(len(r.raw) for r in chain) < 8192
    stored = [theater.home.store, theater.home.store.with_name(theater.home.store.name + "-wal")]
    assert sum(p.stat().st_size for p in stored if p.exists()) < (4 << 20)


def test_an_exit_records_account_of_unrecorded_host_calls_is_bounded() -> None:
    """However many host calls a dead worker's call had asked, and however large, the exit record's account
    of them stays within MAX_UNRECORDED_CHARS: each part cut, the bytes beside it by size and hash, the rest
    counted."""
    url = "http://example.com/" + "p" * 20_000
    argument = wire.host_call_bytes({"method": "POST", "url": url, "headers": []}, b"x" * 1_000_000)
    answer = wire.host_call_bytes({"ok": True, "status": 200, "headers": []}, b"")
    served = [("theater:agent/http@0.1.0", "fetch", argument, answer)] * 1000
    text = unrecorded_host_calls(served, ("theater:agent/http@0.1.0", "fetch", argument))
    assert len(text) <= MAX_UNRECORDED_CHARS
    assert text.startswith("; its call in flight had asked 1001 host call(s) that no record holds: ")
    first = text.split("; ")[2]
    assert first.count("p") >= MAX_UNRECORDED_PART - 100 and "…" in first
    assert "+ 1000000 bytes (sha256 " in first and first.endswith('-> {"headers":[],"ok":true,"status":200}')
    shown = text.count(" fetch ")
    assert 1 <= shown < 1001 and text.endswith(f"; and {1001 - shown} more")
    assert unrecorded_host_calls([], None) == ""
