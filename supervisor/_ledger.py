"""The ledger: the only way a worker's records reach the event store.

It checks a worker's RESULT whole — frame structure, the result's size, every
record's size against what an honest worker could write under the agent's
policy, every record's sequence, hash link, signer and signature, that the
final record answers the call that was sent, and that the state sent matches
the state hash signed — before anything is stored or acknowledged. Any failure
is a :class:`Violation`. The size checks come first and are length comparisons
on fields already decoded, so a result past a bound costs no signature check.
"""

from __future__ import annotations

import copy
import functools
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from theater import wire
from theater.capabilities import CAPABILITIES
from theater.chain import ChainVerifier
from theater.errors import ProtocolError, RecordError
from theater.records import HEADER, SIGNATURE_BYTES, STATUSES, Kind, Record, Signer, sha256, signature_valid
from theater.spec import Limits

from ._agent import Served
from ._errors import Violation
from ._store import Commit

__all__ = ["HOST_FUNCTIONS", "WASI_FUNCTIONS", "Checked", "Prechecked", "check_result", "precheck", "result_bound"]

VERIFY_THREADS = 2

WORKER_KINDS = (Kind.HOST_CALL, Kind.LOG)
FINAL_KINDS = (Kind.INIT, Kind.HANDLE, Kind.CHILD_EXIT, Kind.MESSAGE)
RUNTIME_INTERFACE = CAPABILITIES["runtime"].interface
# Interfaces the supervisor serves (host requests): their host-call records must be exactly what it answered.
SERVED_INTERFACES = frozenset(c.interface for c in CAPABILITIES.values() if not c.always_granted)

# --- what an honest worker can sign, under the agent's policy ---------------------------------
#
# docs/event-records.md section 8 lists every bound with its derivation; each comes from the
# worker's own code (worker/_caps/, worker/_loop.py). A record past one is a violation, whoever
# signed it: a compromised worker holds a valid key and can sign anything.

RECORD_OVERHEAD = HEADER.size + SIGNATURE_BYTES  # 167: the fixed header and the signature
MAX_LEVEL_BYTES = 5  # runtime.log writes debug, info, warn or error (any other level as info)
MAX_STATUS_BYTES = max(len(s) for s in STATUSES)  # 16: malformed-result
MAX_ERROR_BYTES = 4 * 4096  # a guest's error is cut to 4,096 characters; the worker's own messages are shorter
MAX_SHUTDOWN_DETAIL_BYTES = 4 * 256  # runtime.shutdown refuses a detail of more than 256 characters
MAX_WASM_NAME_BYTES = 100_000  # the longest name wasmtime parses in a component: a WASI import's, with its version
WASI_VERSION_PREFIX = "0.2."  # a worker links WASI 0.2.x only (worker/_engine.py is_wasi_import)

# A host function's input and output: at most this many bytes, or the policy limit of that name.
Size = int | str

# (interface, function) -> (input, output), for the theater:agent interfaces (recorded with their exact name).
HOST_FUNCTIONS: dict[tuple[str, str], tuple[Size, Size]] = {
    (RUNTIME_INTERFACE, "self-id"): (0, 36),  # the agent id as UUID text
    (RUNTIME_INTERFACE, "now"): (0, 8),  # a u64
    (RUNTIME_INTERFACE, "random-bytes"): (4, "max_random_bytes"),  # the length as a u32; the bytes
    (RUNTIME_INTERFACE, "finish"): (0, 0),
    (RUNTIME_INTERFACE, "shutdown"): (MAX_SHUTDOWN_DETAIL_BYTES, 0),  # the detail as UTF-8
}
# The interfaces the supervisor serves (SERVED_INTERFACES) need no bounds here: their records must be exactly
# the host calls it answered, which it bounded as it answered them.

# (interface without its @version, function) -> (input, output), for the WASI 0.2 functions a worker answers
# (worker/_caps/wasi.py). The interface is recorded with the version the component imports: at most
# MAX_WASM_NAME_BYTES, and 0.2.x.
WASI_FUNCTIONS: dict[tuple[str, str], tuple[Size, Size]] = {
    ("wasi:random/random", "get-random-bytes"): (8, "max_random_bytes"),  # the length as a u64; the bytes
    ("wasi:random/random", "get-random-u64"): (0, 8),
    ("wasi:random/insecure", "get-insecure-random-bytes"): (8, "max_random_bytes"),
    ("wasi:random/insecure", "get-insecure-random-u64"): (0, 8),
    ("wasi:random/insecure-seed", "insecure-seed"): (0, 16),  # two u64s
    ("wasi:clocks/wall-clock", "now"): (0, 12),  # seconds as a u64, nanoseconds as a u32
}


@dataclass(frozen=True, slots=True)
class Checked:
    """A verified result, ready to commit."""

    commit: Commit
    final: Record
    verifier: ChainVerifier  # positioned after the result; becomes the agent's on commit
    status: str
    error: str
    reply: bytes | None
    ending: tuple[str, str] | None  # the guest called runtime.finish or .shutdown: (exit reason, detail)


_EXPECTED = {
    wire.CallKind.INIT: Kind.INIT,
    wire.CallKind.HANDLE: Kind.HANDLE,
    wire.CallKind.CHILD_EXIT: Kind.CHILD_EXIT,
    wire.CallKind.MESSAGE: Kind.MESSAGE,
}
MAX_ORIGIN_BYTES = max(len(o.label) for o in wire.Origin)


def served_bytes(served: list[Served]) -> int:
    """What the host-call records of ``served`` take, exactly."""
    return sum(RECORD_OVERHEAD + 4 + len(i.encode()) + 4 + len(f.encode()) + 4 + len(a) + 4 + len(b)
               for i, f, a, b in served)


MAX_UNRECORDED_CHARS = 8192  # of an exit record's account of the host calls a dead worker never recorded
MAX_UNRECORDED_PART = 512  # of each call's arguments and answer in it


def unrecorded_host_calls(served: list[Served], unanswered: tuple[str, str, bytes] | None) -> str:
    """What an exit record appends for the host calls of a call whose worker ended before it sent the call's
    result (which would have recorded them): those served, and the one still waiting for its answer. A
    request made outside (an `http` fetch, a message sent with `messaging.call`) stays on the chain even
    when the worker dies, or is killed, right after it."""
    parts = [f"{interface} {function} {_served_part(argument)} -> {_served_part(answer)}"
             for interface, function, argument, answer in served]
    if unanswered is not None:
        interface, function, argument = unanswered
        parts.append(f"{interface} {function} {_served_part(argument)} -> (no answer yet)")
    if not parts:
        return ""
    text = f"; its call in flight had asked {len(parts)} host call(s) that no record holds: "
    shown = 0
    for part in parts:
        if len(text) + len(part) + 2 > MAX_UNRECORDED_CHARS - 64:
            break
        text += ("; " if shown else "") + part
        shown += 1
    if shown < len(parts):
        text += f"; and {len(parts) - shown} more"
    return text


def _served_part(data: bytes) -> str:
    """A served call's arguments or answer as text: its JSON (cut at MAX_UNRECORDED_PART characters), and
    the size and SHA-256 of the bytes beside it."""
    head, _, rest = data.partition(b"\0")
    text = head.decode("utf-8", "replace")
    if len(text) > MAX_UNRECORDED_PART:
        text = text[:MAX_UNRECORDED_PART] + "…"
    if rest:
        text += f" + {len(rest)} bytes (sha256 {sha256(rest).hex()})"
    return text


def max_records(limits: Limits) -> int:
    return limits.max_logs_per_call + limits.max_host_calls_per_call + 1


def _size(size: Size, limits: Limits) -> int:
    return getattr(limits, size) if isinstance(size, str) else size


@functools.lru_cache(maxsize=256)
def _calls_bound(limits: Limits) -> int:
    """The most the log and host-call records of one result take under ``limits``: each kind's count
    limit times its largest record."""
    log = 4 + MAX_LEVEL_BYTES + 4 + limits.max_log_bytes + 1
    host_call = max(
        [4 + len(interface) + 4 + len(function) + 4 + _size(i, limits) + 4 + _size(o, limits)
         for (interface, function), (i, o) in HOST_FUNCTIONS.items()]
        + [4 + MAX_WASM_NAME_BYTES + 4 + len(function) + 4 + _size(i, limits) + 4 + _size(o, limits)
           for (_, function), (i, o) in WASI_FUNCTIONS.items()])
    return (limits.max_logs_per_call * (RECORD_OVERHEAD + log)
            + limits.max_host_calls_per_call * (RECORD_OVERHEAD + host_call))


def result_bound(limits: Limits, call: wire.Call, served: list[Served] = []) -> int:  # noqa: B006 - never mutated
    """The most bytes (records and state) an honest worker's RESULT for ``call`` takes under ``limits``.

    The log and host-call records at their count limits, each at its largest, then the final record and
    the state: either the call succeeded (status ``ok``, no error, a reply of up to ``max_message_bytes``
    for a handle or message call, a state of up to ``max_state_bytes``) or it failed (a status of up to 16
    bytes, an error of up to MAX_ERROR_BYTES, no reply, no state). The final record repeats the call's
    data. The host calls the supervisor answered (``served``) take exactly what they take.
    """
    data = len(call.data)
    if call.kind is wire.CallKind.CHILD_EXIT:  # child (16), exit hash (32), reason: the call's data, in three
        echo, reply_ok, reply_failed = 4 + 4 + 4 + data, 0, 0
    elif call.kind is wire.CallKind.HANDLE:  # message; the reply is an opt-bytes
        echo, reply_ok, reply_failed = 4 + data, 1 + 4 + limits.max_message_bytes, 1
    elif call.kind is wire.CallKind.MESSAGE:  # origin, then sender (16), message id (16), message: the data, in three
        echo, reply_ok, reply_failed = 4 + MAX_ORIGIN_BYTES + 4 + 4 + 4 + data, 1 + 4 + limits.max_message_bytes, 1
    else:  # init: args
        echo, reply_ok, reply_failed = 4 + data, 0, 0
    ok = reply_ok + 4 + len("ok") + 4 + 8 + limits.max_state_bytes  # status, an empty error, fuel; the state
    failed = reply_failed + 4 + MAX_STATUS_BYTES + 4 + MAX_ERROR_BYTES + 8
    return _calls_bound(limits) + served_bytes(served) + RECORD_OVERHEAD + echo + max(ok, failed)


# --- signatures of a drain batch, checked in parallel -----------------------------------------
#
# Ed25519 verification releases the GIL, so the signatures of every result in a
# drain batch are checked on a small pool while the loop thread parses and links
# the records; check_result then only waits for the outcome. A signature checked
# ahead counts only for the same bytes under the same key: anything else is
# checked again in line, so this never accepts what check_result alone would refuse.
# Records past a bound are not handed to the pool: precheck applies every bound
# that does not depend on the call first, and check_result reuses what it found.

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="verify")
        return _pool


@dataclass(frozen=True, slots=True)
class _Bounded:
    """A result's records hold to every bound that does not depend on the call, under ``limits``."""

    limits: Limits
    ending: tuple[str, str] | None  # the guest called runtime.finish or .shutdown: (exit reason, detail)
    served: int = 0  # host-call records of the interfaces the supervisor serves


class _Served(Exception):
    """A record of a host call the supervisor answered: it can only be checked against the answers."""


@dataclass(frozen=True, slots=True)
class Prechecked:
    """A result's records parsed and held to the policy's bounds ahead, and the signatures of its signed
    records under ``key`` being checked on the pool, ``chunk`` signed records per task (a result of many
    signed records, as version-1 workers send, is spread over every thread; a version-2 result has one)."""

    records: list[Record]
    bounded: _Bounded
    key: Ed25519PublicKey
    chunk: int
    signed: dict[int, int]  # index in records -> index among the signed records
    signatures: list[Future[list[bool]]]

    def verified(self, index: int, record: Record, key: Ed25519PublicKey) -> bool:
        nth = self.signed.get(index)
        if nth is None or key is not self.key or self.records[index] is not record:
            return False
        return self.signatures[nth // self.chunk].result()[nth % self.chunk]


def _verify_all(records: list[Record], key: Ed25519PublicKey) -> list[bool]:
    return [signature_valid(r, key) for r in records]


_DURING_SIGNERS = (Signer.WORKER, Signer.COVERED)  # a call's logs and host calls: signed, or covered


def precheck(frames: list[bytes], *, verifier: ChainVerifier, limits: Limits) -> Prechecked | None:
    """Parse a RESULT's records, hold them to the policy, and start checking their signatures; None if it
    must be checked in line (check_result then says what is wrong, if anything is)."""
    key = verifier.worker_key
    if key is None:
        return None
    try:
        result = wire.Result.decode(frames, max_records=max_records(limits))
        records = [Record.parse(raw) for raw in result.records]
        final = records[-1]
        if (final.signer is not Signer.WORKER or final.kind not in FINAL_KINDS
                or any(r.kind not in WORKER_KINDS or r.signer not in _DURING_SIGNERS for r in records[:-1])):
            return None
        bounded = _bound(records, limits, None)
    except (ProtocolError, RecordError, Violation, _Served):
        return None
    signed_at = [i for i, r in enumerate(records) if r.signer is Signer.WORKER]
    signed = [records[i] for i in signed_at]
    chunk = -(-len(signed) // VERIFY_THREADS)
    pool = _executor()
    tasks = [pool.submit(_verify_all, signed[i:i + chunk], key) for i in range(0, len(signed), chunk)]
    return Prechecked(records, bounded, key, chunk, {i: nth for nth, i in enumerate(signed_at)}, tasks)


def check_result(
    frames: list[bytes],
    *,
    verifier: ChainVerifier,
    limits: Limits,
    call: wire.Call,
    prechecked: Prechecked | None = None,
    served: list[Served] = [],  # noqa: B006 - never mutated
) -> Checked:
    """``served``: the host calls the supervisor answered during the call, which the worker must have
    recorded exactly, in order (all of them, if the call succeeded)."""
    try:
        result = wire.Result.decode(frames, max_records=max_records(limits))
    except ProtocolError as exc:
        raise Violation(f"malformed result: {exc}", b"".join(frames[:2])) from None
    if result.call_id != call.call_id:
        raise Violation(f"result answers call {result.call_id}, but call {call.call_id} is in flight")
    state = result.state
    total = sum(map(len, result.records)) + (0 if state is None else len(state))
    bound = result_bound(limits, call, served)
    if total > bound:
        raise Violation(f"result of {total} bytes exceeds {bound}, the most the agent's policy allows for this call",
                        frames[0])
    if state is not None and len(state) > limits.max_state_bytes:
        raise Violation(f"state of {len(state)} bytes exceeds max_state_bytes ({limits.max_state_bytes})", state[:256])
    ahead = prechecked if prechecked is not None and _same(prechecked.records, result.records) else None
    records = ahead.records if ahead is not None else _parse(result.records)
    final = records[-1]
    expected = _EXPECTED[call.kind]
    if final.kind is not expected or any(r.kind not in WORKER_KINDS for r in records[:-1]):
        raise Violation(f"a {expected.name.lower()} result must be host calls and logs, then one {expected.name.lower()} record", final.raw)
    if ahead is not None and ahead.bounded.limits == limits and not ahead.bounded.served:
        bounded = ahead.bounded
    else:
        bounded = _bound(records, limits, served)
    fields = final.fields()
    if bounded.served < len(served) and fields["status"] == "ok":
        raise Violation(f"the supervisor answered {len(served)} host requests, the result records {bounded.served}",
                        final.raw[:256])
    sent_matches = _repeats_call(final, fields, call)
    scratch = copy.copy(verifier)
    for i, record in enumerate(records):
        try:
            if ahead is not None and ahead.verified(i, record, scratch.key_for(record)):
                scratch.advance(record, signature_checked=True)
            else:
                scratch.advance(record)
        except RecordError as exc:
            raise Violation(f"rejected record: {exc}", record.raw) from None
    if not sent_matches:
        raise Violation(f"the {expected.name.lower()} record does not carry the message that was sent", final.raw)
    status, error = fields["status"], fields["error"]
    if state is not None:
        if sha256(state) != final.state_hash:
            raise Violation("the state sent does not match the state hash signed in the record", final.raw)
    elif final.state_hash != verifier.state_hash:
        raise Violation("the record's state hash changed but no state was sent", final.raw)
    commit = Commit(agent_id=final.agent_id, records=records, state=state)
    if expected is Kind.INIT and status == "ok":
        commit.initialized = True
    return Checked(commit=commit, final=final, verifier=scratch, status=status, error=error, reply=fields.get("reply"),
                   ending=bounded.ending)


def _same(parsed: list[Record], raws: list[bytes]) -> bool:
    """The records parsed ahead are those of this result, byte string for byte string."""
    return len(parsed) == len(raws) and all(r.raw is raw for r, raw in zip(parsed, raws, strict=True))


def _parse(raws: list[bytes]) -> list[Record]:
    records = []
    for raw in raws:
        try:
            records.append(Record.parse(raw))
        except RecordError as exc:
            raise Violation(f"rejected record: {exc}", raw) from None
    return records


# --- the bounds -------------------------------------------------------------------------------


def _too_large(record: Record, name: str, size: int, limit: int, why: str) -> Violation:
    kind = record.kind.name.lower().replace("_", "-")
    return Violation(f"record {record.seq} ({kind}): {name} of {size} bytes exceeds {limit} ({why})", record.raw[:256])


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _check_bytes(record: Record, name: str, value: bytes, limit: int, why: str) -> None:
    if len(value) > limit:
        raise _too_large(record, name, len(value), limit, why)


def _check_text(record: Record, name: str, text: str, limit: int, why: str) -> None:
    """Hold a str field's UTF-8 size to ``limit``. Its length in characters is a lower bound, and its size
    for ASCII; other text is encoded only if it has at most ``limit`` characters (so at most 4 * ``limit``
    bytes), or on the way to a violation."""
    if len(text) > limit or _utf8_size(text) > limit:
        raise _too_large(record, name, _utf8_size(text), limit, why)


def _bound(records: list[Record], limits: Limits, served: list[Served] | None) -> _Bounded:
    """Hold every log and host-call record, and the final record's own outcome, to what an honest worker
    under ``limits`` writes; records of other kinds are left to the kind rule. A host call the supervisor
    served must be the next one of ``served``, byte for byte (None: not known yet, raise _Served). Also
    reads how the guest asked to end, if it did (the last request wins)."""
    logs = sum(1 for r in records if r.kind is Kind.LOG)
    if logs > limits.max_logs_per_call:
        raise Violation(f"result carries {logs} log records, more than max_logs_per_call ({limits.max_logs_per_call})")
    host_calls = sum(1 for r in records if r.kind is Kind.HOST_CALL)
    if host_calls > limits.max_host_calls_per_call:
        raise Violation(f"result carries {host_calls} host-call records, more than max_host_calls_per_call "
                        f"({limits.max_host_calls_per_call})")
    ending: tuple[str, str] | None = None
    n_served = 0
    for record in records:
        kind = record.kind
        if kind is Kind.LOG:
            fields = record.fields()
            _check_text(record, "level", fields["level"], MAX_LEVEL_BYTES, "debug, info, warn or error")
            _check_text(record, "message", fields["message"], limits.max_log_bytes, "max_log_bytes")
        elif kind is Kind.HOST_CALL and (fields := record.fields())["interface"] in SERVED_INTERFACES:
            if served is None:
                raise _Served
            got = (fields["interface"], fields["function"], fields["input"], fields["output"])
            if n_served >= len(served) or got != served[n_served]:
                raise Violation(f"record {record.seq} (host-call): {fields['function'][:64]!r} of "
                                f"{fields['interface'][:64]!r} is not the host call the supervisor answered "
                                f"({n_served + 1} of {len(served)})", record.raw[:256])
            n_served += 1
        elif kind is Kind.HOST_CALL:
            interface, function = fields["interface"], fields["function"]
            label, (size_in, size_out) = _host_function(record, interface, function)
            for name, size in (("input", size_in), ("output", size_out)):
                why = f"{label}, {size}" if isinstance(size, str) else label
                _check_bytes(record, name, fields[name], _size(size, limits), why)
            if interface == RUNTIME_INTERFACE and function == "finish":
                ending = ("normal", "")
            elif interface == RUNTIME_INTERFACE and function == "shutdown":
                ending = ("shutdown", fields["input"].decode("utf-8", "replace"))
        elif kind in FINAL_KINDS and record is records[-1]:
            fields = record.fields()
            _check_text(record, "error", fields["error"], MAX_ERROR_BYTES, "a guest's error, cut to 4,096 characters")
            reply = fields.get("reply")
            if reply is not None:
                _check_bytes(record, "reply", reply, limits.max_message_bytes, "max_message_bytes")
            status = fields["status"]
            if status not in STATUSES:
                raise Violation(f"unknown call status {status[:64]!r}", record.raw[:256])
    return _Bounded(limits, ending, n_served)


def _host_function(record: Record, interface: str, function: str) -> tuple[str, tuple[Size, Size]]:
    """How the host function recorded is labelled in a reason, and the most its input and output hold."""
    sizes = HOST_FUNCTIONS.get((interface, function))
    if sizes is not None:
        return f"{interface.partition('@')[0]} {function}", sizes
    if interface.startswith("wasi:"):
        _check_text(record, "interface", interface, MAX_WASM_NAME_BYTES, "the longest name in a component")
        base, _, version = interface.partition("@")
        sizes = WASI_FUNCTIONS.get((base, function)) if version.startswith(WASI_VERSION_PREFIX) else None
        if sizes is not None:
            return f"{base} {function}", sizes
    raise Violation(f"record {record.seq} (host-call): function {function[:64]!r} of interface {interface[:64]!r} "
                    "is not one a worker records", record.raw[:256])


def _repeats_call(record: Record, fields: dict[str, Any], call: wire.Call) -> bool:
    """Hold the fields the final record repeats from the call to the sizes sent; whether they are what was sent."""
    if call.kind is wire.CallKind.CHILD_EXIT:
        child, exit_hash, reason = wire.decode_child_exit(call.data)
        _check_bytes(record, "child", fields["child"], len(child), "the child id sent")
        _check_bytes(record, "exit_hash", fields["exit_hash"], len(exit_hash), "the exit hash sent")
        _check_text(record, "reason", fields["reason"], len(call.data) - len(child) - len(exit_hash), "the reason sent")
        return bool((fields["child"], fields["exit_hash"], fields["reason"]) == (child, exit_hash, reason))
    if call.kind is wire.CallKind.INIT:
        _check_bytes(record, "args", fields["args"], len(call.data), "the init arguments sent")
        return bool(fields["args"] == call.data)
    if call.kind is wire.CallKind.MESSAGE:
        origin, sender, message_id, message = wire.decode_message(call.data)
        _check_text(record, "origin", fields["origin"], MAX_ORIGIN_BYTES, "send, call or timer")
        _check_bytes(record, "sender", fields["sender"], len(sender), "the sender id sent")
        _check_bytes(record, "message_id", fields["message_id"], len(message_id), "the message id sent")
        _check_bytes(record, "message", fields["message"], len(message), "the message sent")
        return bool((fields["origin"], fields["sender"], fields["message_id"], fields["message"])
                    == (origin.label, sender, message_id, message))
    _check_bytes(record, "message", fields["message"], len(call.data), "the message sent")
    return bool(fields["message"] == call.data)
