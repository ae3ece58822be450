"""The ledger: the only way a worker's records reach the event store.

It checks a worker's RESULT whole — frame structure, every record's sequence,
hash link, signer and signature, that the final record answers the call that
was sent, and that the state sent matches the state hash signed — before
anything is stored or acknowledged. Any failure is a :class:`Violation`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from theater import wire
from theater.chain import ChainVerifier
from theater.errors import ProtocolError, RecordError
from theater.records import STATUSES, Kind, Record, sha256
from theater.spec import Limits

from ._store import Commit

__all__ = ["Checked", "Violation", "check_result"]

WORKER_KINDS = (Kind.HOST_CALL, Kind.LOG)


class Violation(Exception):
    """A worker broke the protocol. ``evidence`` is what it sent (bounded)."""

    def __init__(self, reason: str, evidence: bytes = b"") -> None:
        super().__init__(reason)
        self.reason = reason
        self.evidence = evidence[:4096]


@dataclass(frozen=True, slots=True)
class Checked:
    """A verified result, ready to commit."""

    commit: Commit
    final: Record
    verifier: ChainVerifier  # positioned after the result; becomes the agent's on commit
    status: str
    error: str
    reply: bytes | None
    finish: bool  # the guest called runtime.finish: end the agent normally after this call


_EXPECTED = {
    wire.CallKind.INIT: Kind.INIT,
    wire.CallKind.HANDLE: Kind.HANDLE,
    wire.CallKind.CHILD_EXIT: Kind.CHILD_EXIT,
}


def max_records(limits: Limits) -> int:
    return limits.max_logs_per_call + limits.max_host_calls_per_call + 1


def check_result(
    frames: list[bytes],
    *,
    verifier: ChainVerifier,
    limits: Limits,
    call: wire.Call,
) -> Checked:
    try:
        result = wire.Result.decode(frames, max_records=max_records(limits))
    except ProtocolError as exc:
        raise Violation(f"malformed result: {exc}", b"".join(frames[:2])) from None
    if result.call_id != call.call_id:
        raise Violation(f"result answers call {result.call_id}, but call {call.call_id} is in flight")
    scratch = copy.copy(verifier)
    records: list[Record] = []
    for raw in result.records:
        try:
            record = Record.parse(raw)
            scratch.advance(record)
        except RecordError as exc:
            raise Violation(f"rejected record: {exc}", raw) from None
        records.append(record)
    final = records[-1]
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
    finish = any(r.kind is Kind.HOST_CALL and r.fields()["function"] == "finish" for r in records[:-1])
    return Checked(commit=commit, final=final, verifier=scratch, status=status, error=error, reply=reply, finish=finish)
