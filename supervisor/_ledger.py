"""The ledger: the only way a worker's records reach the event store.

It checks a worker's RESULT whole — frame structure, every record's sequence,
hash link, signer and signature, that the final record answers the call that
was sent, and that the state sent matches the state hash signed — before
anything is stored or acknowledged. Any failure is a :class:`Violation`.
"""

from __future__ import annotations

import copy
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from theater import wire
from theater.capabilities import CAPABILITIES
from theater.chain import ChainVerifier
from theater.errors import ProtocolError, RecordError
from theater.records import STATUSES, Kind, Record, Signer, sha256, signature_valid
from theater.spec import Limits

from ._errors import Violation
from ._store import Commit

__all__ = ["Checked", "Prechecked", "check_result", "precheck"]

VERIFY_THREADS = 2

WORKER_KINDS = (Kind.HOST_CALL, Kind.LOG)
RUNTIME_INTERFACE = CAPABILITIES["runtime"].interface
MAX_SHUTDOWN_DETAIL_BYTES = 1024  # 256 characters of UTF-8
# Bounds on what a worker may sign, beyond the policy's own limits (docs/event-records.md section 8):
MAX_NAME_BYTES = 256  # a log level, a host call's interface or function name
MAX_ERROR_BYTES = 4 * 4096  # a call's error: the worker cuts it to 4,096 characters (at most 4 bytes each)
HOST_CALL_SLACK = 64 * 1024  # a host call's JSON framing around a message (supervision.spawn's args)


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
}


def max_records(limits: Limits) -> int:
    return limits.max_logs_per_call + limits.max_host_calls_per_call + 1


# --- signatures of a drain batch, checked in parallel -----------------------------------------
#
# Ed25519 verification releases the GIL, so the signatures of every result in a
# drain batch are checked on a small pool while the loop thread parses and links
# the records; check_result then only waits for the outcome. A signature checked
# ahead counts only for the same bytes under the same key: anything else is
# checked again in line, so this never accepts what check_result alone would refuse.

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="verify")
        return _pool


@dataclass(frozen=True, slots=True)
class Prechecked:
    """A result's records parsed ahead, and their signatures under ``key`` being checked on the pool,
    ``chunk`` records per task (a result with many records is spread over every thread)."""

    records: list[Record]
    key: Ed25519PublicKey
    chunk: int
    signatures: list[Future[list[bool]]]

    def verified(self, index: int, record: Record, key: Ed25519PublicKey) -> bool:
        if key is not self.key or self.records[index] is not record:
            return False
        return self.signatures[index // self.chunk].result()[index % self.chunk]


def _verify_all(records: list[Record], key: Ed25519PublicKey) -> list[bool]:
    return [signature_valid(r, key) for r in records]


def precheck(frames: list[bytes], *, verifier: ChainVerifier, limits: Limits) -> Prechecked | None:
    """Parse a RESULT's records and start checking their signatures; None if it must be checked in line."""
    key = verifier.worker_key
    if key is None:
        return None
    try:
        result = wire.Result.decode(frames, max_records=max_records(limits))
        records = [Record.parse(raw) for raw in result.records]
    except (ProtocolError, RecordError):
        return None  # check_result says why
    if any(r.signer is not Signer.WORKER for r in records):
        return None
    chunk = -(-len(records) // VERIFY_THREADS)
    pool = _executor()
    tasks = [pool.submit(_verify_all, records[i:i + chunk], key) for i in range(0, len(records), chunk)]
    return Prechecked(records, key, chunk, tasks)


def check_result(
    frames: list[bytes],
    *,
    verifier: ChainVerifier,
    limits: Limits,
    call: wire.Call,
    prechecked: Prechecked | None = None,
) -> Checked:
    try:
        result = wire.Result.decode(frames, max_records=max_records(limits))
    except ProtocolError as exc:
        raise Violation(f"malformed result: {exc}", b"".join(frames[:2])) from None
    if result.call_id != call.call_id:
        raise Violation(f"result answers call {result.call_id}, but call {call.call_id} is in flight")
    scratch = copy.copy(verifier)
    records: list[Record] = []
    ahead = prechecked if prechecked is not None and len(prechecked.records) == len(result.records) else None
    for i, raw in enumerate(result.records):
        try:
            record = ahead.records[i] if ahead is not None and ahead.records[i].raw is raw else Record.parse(raw)
            if ahead is not None and ahead.verified(i, record, scratch.key_for(record)):
                scratch.advance(record, signature_checked=True)
            else:
                scratch.advance(record)
        except RecordError as exc:
            raise Violation(f"rejected record: {exc}", raw) from None
        records.append(record)
    final = records[-1]
    for record in records:
        _within_policy(record, limits)
    expected = _EXPECTED[call.kind]
    if final.kind is not expected or any(r.kind not in WORKER_KINDS for r in records[:-1]):
        raise Violation(f"a {expected.name.lower()} result must be host calls and logs, then one {expected.name.lower()} record", final.raw)
    fields = final.fields()
    if expected is Kind.CHILD_EXIT:
        child, exit_hash, reason = wire.decode_child_exit(call.data)
        sent_matches = (fields["child"], fields["exit_hash"], fields["reason"]) == (child, exit_hash, reason)
    else:
        sent_matches = (fields["args"] if expected is Kind.INIT else fields["message"]) == call.data
    if not sent_matches:
        raise Violation(f"the {expected.name.lower()} record does not carry the message that was sent", final.raw)
    status, error = fields["status"], fields["error"]
    if status not in STATUSES:
        raise Violation(f"unknown call status {status[:64]!r}", final.raw[:256])
    reply = fields.get("reply")
    if reply is not None and len(reply) > limits.max_message_bytes:
        raise Violation(f"reply of {len(reply)} bytes exceeds max_message_bytes", final.raw[:256])
    state = result.state
    if state is not None:
        if len(state) > limits.max_state_bytes:
            raise Violation(f"state of {len(state)} bytes exceeds max_state_bytes", state[:256])
        if sha256(state) != final.state_hash:
            raise Violation("the state sent does not match the state hash signed in the record", final.raw)
    elif final.state_hash != verifier.state_hash:
        raise Violation("the record's state hash changed but no state was sent", final.raw)
    commit = Commit(agent_id=final.agent_id, records=records, state=state)
    if expected is Kind.INIT and status == "ok":
        commit.initialized = True
    return Checked(commit=commit, final=final, verifier=scratch, status=status, error=error, reply=reply,
                   ending=_ending(records[:-1]))


def host_call_bound(limits: Limits) -> int:
    """The most an honest worker puts in a host call's input or output under ``limits``: a message
    (supervision.spawn's args) in its JSON, or a random-bytes answer."""
    return max(limits.max_message_bytes, limits.max_random_bytes) + HOST_CALL_SLACK


def _within_policy(record: Record, limits: Limits) -> None:
    """Every field a worker signs is no larger than an honest worker under the agent's policy could make
    it; anything larger is a violation, whoever signed it."""
    fields = record.fields()
    sizes: list[tuple[str, int, int]] = []
    if record.kind is Kind.LOG:
        sizes = [("level", len(fields["level"]), MAX_NAME_BYTES),
                 ("message", len(fields["message"].encode("utf-8", "surrogatepass")), limits.max_log_bytes)]
    elif record.kind is Kind.HOST_CALL:
        bound = host_call_bound(limits)
        sizes = [("interface", len(fields["interface"]), MAX_NAME_BYTES),
                 ("function", len(fields["function"]), MAX_NAME_BYTES),
                 ("input", len(fields["input"]), bound), ("output", len(fields["output"]), bound)]
    elif record.kind in (Kind.INIT, Kind.HANDLE, Kind.CHILD_EXIT):
        sizes = [("error", len(fields["error"].encode("utf-8", "surrogatepass")), MAX_ERROR_BYTES)]
    for name, size, limit in sizes:
        if size > limit:
            raise Violation(f"record {record.seq} ({record.kind.name.lower().replace('_', '-')}): {name} of "
                            f"{size} bytes exceeds {limit} allowed by the agent's policy", record.raw[:256])


def _ending(records: list[Record]) -> tuple[str, str] | None:
    """How the guest asked to end, if it did (the last request wins): runtime.finish is `normal`,
    runtime.shutdown is `shutdown` with the guest's detail, bounded here too: the worker is not trusted."""
    ending = None
    for r in records:
        if r.kind is not Kind.HOST_CALL:
            continue
        fields = r.fields()
        if fields["interface"] != RUNTIME_INTERFACE:
            continue
        if fields["function"] == "finish":
            ending = ("normal", "")
        elif fields["function"] == "shutdown":
            ending = ("shutdown", fields["input"][:MAX_SHUTDOWN_DETAIL_BYTES].decode("utf-8", "replace"))
    return ending
