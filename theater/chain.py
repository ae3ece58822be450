"""Chain rules: what makes a sequence of records one agent's valid history.

The same :class:`ChainVerifier` checks records live in the supervisor before
they are stored and offline in ``theater verify`` or an auditor's script.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .compaction import Compaction
from .ed25519 import key_weakness
from .errors import RecordError
from .records import GENESES, NODE_KINDS, ZERO_HASH, Kind, Record, Signer, verify_record
from .rotation import KeySchedule

__all__ = ["ChainVerifier", "verify_chain", "walk_chain"]

# Kinds whose "ok" outcome may change the agent's state.
_STATE_CHANGING = (Kind.INIT, Kind.HANDLE, Kind.CHILD_EXIT, Kind.MESSAGE)


class ChainVerifier:
    """Incrementally checks one agent's chain: sequence, hash link, signer, state link.

    ``check_link`` is the cheap, ordered part; ``verify_record`` (signature) may
    run elsewhere (for example in a thread pool) before ``advance`` is called
    with ``signature_checked=True``.
    """

    def __init__(self, supervisor_key: Ed25519PublicKey, schedule: KeySchedule | None = None) -> None:
        self.supervisor_key = supervisor_key
        self.schedule = schedule  # after key rotations: which key signed which supervisor record
        self.agent_id: bytes | None = None
        self.next_seq = 0
        self.head_hash = ZERO_HASH
        self.state_hash: bytes | None = None
        self.worker_key: Ed25519PublicKey | None = None
        self.incarnation = -1
        self.node = False  # the chain is a supervisor node's (it began with node-genesis)
        self.removed = False  # the chain ended with a removed record: nothing may follow
        self.component: bytes | None = None  # the genesis's component hash, once seen
        self.uncovered = 0  # covered records since the last signed one: the worker's next signature covers them

    def __copy__(self) -> ChainVerifier:
        """A twin to check a result on (the supervisor copies the live verifier for every result)."""
        twin = ChainVerifier.__new__(ChainVerifier)
        twin.__dict__.update(self.__dict__)
        return twin

    @classmethod
    def at_head(cls, supervisor_key: Ed25519PublicKey, agent_id: bytes, head_seq: int, head_hash: bytes,
                state_hash: bytes, *, node: bool = False) -> ChainVerifier:
        """A verifier positioned after a stored chain's head, with no worker key in force: what follows
        the head is checked as if the chain had been verified up to it."""
        verifier = cls(supervisor_key)
        verifier.agent_id = agent_id
        verifier.next_seq = head_seq + 1
        verifier.head_hash = head_hash
        verifier.state_hash = state_hash
        verifier.node = node
        return verifier

    def key_for(self, record: Record) -> Ed25519PublicKey:
        if record.signer is Signer.SUPERVISOR:
            if self.schedule is not None:
                return self.schedule.key_for(record.agent_id, record.seq)
            return self.supervisor_key
        if self.worker_key is None:
            raise RecordError(f"record {record.seq}: worker record while no worker key is in force")
        return self.worker_key

    def check_link(self, record: Record) -> None:
        """Raise unless ``record`` may follow the current head (signature aside)."""
        if self.agent_id is not None and record.agent_id != self.agent_id:
            raise RecordError(f"record {record.seq} belongs to another agent")
        if record.seq != self.next_seq:
            raise RecordError(f"record has sequence {record.seq}, expected {self.next_seq}")
        if record.prev_hash != self.head_hash:
            raise RecordError(f"record {record.seq}: previous-hash does not match the chain head")
        if (record.kind in GENESES) != (record.seq == 0):
            raise RecordError(f"record {record.seq}: a chain starts with genesis, and only there")
        if record.seq > 0 and (record.kind in NODE_KINDS) != self.node:
            whose = "a supervisor node's" if record.kind in NODE_KINDS else "an agent's"
            raise RecordError(f"record {record.seq}: {whose} record in the chain of "
                              f"{'a supervisor node' if self.node else 'an agent'}")
        if self.removed:
            raise RecordError(f"record {record.seq}: the chain ended with its removed record")
        if record.kind is Kind.REMOVED and self.worker_key is not None:
            raise RecordError(f"record {record.seq}: a removed record while a worker key is in force")
        if record.kind is Kind.STATE_RESET and self.worker_key is not None:
            raise RecordError(f"record {record.seq}: a state reset while a worker key is in force")
        if record.signer is not Signer.SUPERVISOR and self.worker_key is None:
            raise RecordError(f"record {record.seq}: worker record while no worker key is in force")
        if record.signer is Signer.SUPERVISOR and self.uncovered:
            raise RecordError(f"record {record.seq}: a supervisor record follows {self.uncovered} covered "
                              "record(s) that no worker signature covers")
        if record.kind is Kind.WORKER_KEY and self.component is not None \
                and record.fields()["component_sha256"] != self.component:
            raise RecordError(f"record {record.seq}: the worker-key record names another component than the genesis")
        if record.seq > 0 and record.state_hash != self.state_hash:
            changes = record.kind in _STATE_CHANGING and record.fields()["status"] == "ok"
            if not changes and record.kind is not Kind.STATE_RESET:
                raise RecordError(
                    f"record {record.seq} ({record.kind.name.lower()}) changes the state hash"
                )

    def advance(self, record: Record, *, signature_checked: bool = False) -> None:
        """Check ``record`` completely and make it the new head."""
        self.check_link(record)
        if record.signer is Signer.COVERED:
            self.uncovered += 1  # its hash is signed by the record that covers it, or the chain is refused
        else:
            if not signature_checked:
                verify_record(record, self.key_for(record))
            self.uncovered = 0
        if record.kind in (Kind.GENESIS, Kind.WORKER_KEY):
            fields = record.fields()
            self.worker_key = _public_key(fields["worker_key"], record.seq)
            self.incarnation = fields.get("incarnation", 0)
            if record.kind is Kind.GENESIS:
                self.component = fields["component_sha256"]
        elif record.kind in (Kind.EXIT, Kind.VIOLATION):
            self.worker_key = None
        self.removed = record.kind is Kind.REMOVED
        if record.seq == 0:
            self.node = record.kind is Kind.NODE_GENESIS
        self.agent_id = record.agent_id
        self.next_seq = record.seq + 1
        self.head_hash = record.hash
        self.state_hash = record.state_hash


    def require_covered(self) -> None:
        """Raise if the head is a covered record: nothing signed its hash, so nothing vouches for it."""
        if self.uncovered:
            raise RecordError(f"the chain ends with {self.uncovered} covered record(s) that no worker "
                              "signature covers")

    def skip(self, statement: Compaction) -> None:
        """Carry on past records dropped behind a compaction statement (its signature already checked):
        the verifier must stand just after the genesis the statement names."""
        if self.next_seq != 1 or self.node:
            raise RecordError("a compaction statement follows an agent's genesis, and only that")
        if statement.agent_id != self.agent_id or statement.genesis_hash != self.head_hash:
            raise RecordError("the compaction statement is of another chain (its agent or genesis differs)")
        self.worker_key = _public_key(statement.worker_key, statement.cut_seq - 1) if statement.worker_key else None
        self.incarnation = statement.incarnation
        self.next_seq = statement.cut_seq
        self.head_hash = statement.prev_hash
        self.state_hash = statement.state_hash


def _public_key(raw: bytes, seq: int) -> Ed25519PublicKey:
    weakness = key_weakness(raw)
    if weakness is not None:
        raise RecordError(f"record {seq}: the worker key {weakness}")
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise RecordError(f"record {seq}: worker key is not an Ed25519 public key") from exc


def walk_chain(records: Iterable[bytes], verifier: ChainVerifier,
               compaction: Compaction | None = None) -> Iterator[Record]:
    """Verify a chain from genesis with ``verifier`` (new), as :func:`verify_chain` does, yielding each record
    once it has passed: a caller checking more of each record reads a long chain one record at a time."""
    for position, raw in enumerate(records):
        try:
            record = Record.parse(raw)
        except RecordError as exc:  # located by where it stands, since its own sequence number is not readable
            raise RecordError(f"record {position} (by position) does not parse: {exc}") from None
        verifier.advance(record)
        if position == 0 and compaction is not None:
            verifier.skip(compaction)
        yield record
    if verifier.next_seq == 0:
        raise RecordError("empty chain")
    verifier.require_covered()


def verify_chain(records: Iterable[bytes], supervisor_key: Ed25519PublicKey,
                 compaction: Compaction | None = None, schedule: KeySchedule | None = None) -> ChainVerifier:
    """Verify a whole chain from genesis (past the records ``compaction`` dropped, if given; its signature
    already checked), under ``schedule`` if the supervisor's key was rotated; return the verifier positioned
    at its head."""
    verifier = ChainVerifier(supervisor_key, schedule)
    for _record in walk_chain(records, verifier, compaction):
        pass
    return verifier
