"""The record path: every record the supervisor stores passes here, in chain order.

Workers' results, checked by the ledger, wait in a batch that is committed as
one durable transaction per loop turn; a record the supervisor signs itself
(genesis, worker-key, exit, violation, state-reset, a node's decisions) first
commits the batch, so the store holds each chain in the order it was made.
A new agent's genesis is the exception: it is staged, and committed in the
same transaction as its worker's first result (or as the first thing of the
next commit, whatever it is), so a start costs one durable commit, not two.
Nothing is answered before its commit: whoever waits is told through the hooks.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from theater import wire
from theater.chain import ChainVerifier
from theater.errors import RecordError
from theater.records import Kind, Record, sha256, sign_record
from theater.rotation import KeySchedule, Rotation

from ._agent import Agent, Pending
from ._errors import StoreError
from ._ledger import Checked
from ._store import Commit, EventStore

__all__ = ["RecordPath", "Result"]

Result = tuple[Agent, Pending, Checked]
BeforeCommit = Callable[[Agent, Record], None]


def _nothing(agent: Agent, head: Record) -> None:
    pass


class RecordPath:
    def __init__(self, key: Ed25519PrivateKey, store: EventStore) -> None:
        self.key = key
        self.public_key: Ed25519PublicKey = key.public_key()
        self.store = store
        # Every key this home's supervisor has signed with, and which record each signed (key rotations).
        self.schedule = self._schedule()
        self.batch: list[Result] = []
        self.staged: list[tuple[Agent, Commit]] = []  # new agents' geneses, committed with the next batch, first
        # Set by the parts that act on commits: the workers answer results, clients wait for heads.
        self.on_results: Callable[[list[Result], StoreError | None], None] = lambda batch, error: None
        self.on_head: Callable[[bytes, int], None] = lambda chain_id, head: None
        self.on_record: Callable[[Agent, Record], None] | None = None
        self.on_committed: Callable[[Agent, list[Record]], None] = lambda agent, records: None  # usage, quotas
        self.on_unstored: Callable[[Agent, StoreError], None] = lambda agent, error: None  # a staged genesis failed

    def use_key(self, key: Ed25519PrivateKey) -> None:
        """Sign with ``key`` from now on (a rotation has committed). Live verifiers never check the supervisor's
        own records against a key: it signed them itself, a moment before."""
        self.key = key
        self.public_key = key.public_key()
        self.schedule = self._schedule()

    def _schedule(self) -> KeySchedule:
        try:
            return KeySchedule.build(self.public_key.public_bytes_raw(),
                                     [Rotation.parse(r) for r in self.store.rotations()])
        except RecordError as exc:
            raise StoreError(f"{self.store.path}: the store's key rotations do not fit this home's key: {exc}") from None

    # --- workers' results -------------------------------------------------------------------

    def add_result(self, result: Result) -> None:
        self.batch.append(result)

    def flush_results(self) -> None:
        """The end of a loop turn's drain: commit the results checked in it, if any, with what is staged. A
        staged genesis alone waits for its worker's first result (or its timer), whatever else came."""
        if self.batch:
            self.flush()

    def flush(self) -> None:
        """Commit the staged records and the results checked so far, in one transaction; every supervisor record
        follows them."""
        if not self.batch and not self.staged:
            return
        staged, self.staged = self.staged, []
        batch, self.batch = self.batch, []
        for agent, _, checked in batch:
            checked.commit.snapshot = agent.snapshot_due(checked.commit.records)
        try:
            self.store.commit([c for _, c in staged] + [checked.commit for _, _, checked in batch])
        except StoreError as exc:
            for agent, _ in staged:
                self.reload_head(agent)
                self.on_unstored(agent, exc)
            self.on_results(batch, exc)
            return
        for agent, c in staged:
            self.committed(agent, c.records)
        for agent, _, checked in batch:
            if checked.commit.state is not None:
                agent.state = checked.commit.state
            self.committed(agent, checked.commit.records)
        self.on_results(batch, None)

    # --- the supervisor's own records --------------------------------------------------------

    def genesis(self, agent: Agent, worker_key: bytes, confinement: str, before_commit: BeforeCommit = _nothing) -> None:
        """The agent's first record: its configuration (as stored, with its parent) and its first worker's key.
        Staged: committed with the worker's first result, or before any other record of the agent's."""
        if self.store.name_taken(agent.name):
            raise StoreError(f"an agent named {agent.name!r} already exists")
        stored = {**agent.config.as_dict(), "parent": agent.parent_name}
        config = wire.encode_json(stored).decode()
        record = sign_record(
            self.key, kind=Kind.GENESIS, agent_id=agent.id, seq=0, time_ns=time.time_ns(),
            prev_hash=bytes(32), state_hash=sha256(b""),
            fields={"name": agent.name, "component_sha256": bytes.fromhex(agent.config.component_sha256),
                    "config": config, "worker_key": worker_key, "confinement": confinement},
        )
        agent.verifier.advance(record, signature_checked=True)
        before_commit(agent, record)
        agent.in_store = True  # from here on its records are committed after this one, in the same transaction or later
        self.staged.append((agent, Commit(agent_id=agent.id, records=[record], create=(agent.name, stored, agent.state))))

    def append(self, agent: Agent, kind: Kind, fields: dict[str, Any], before_commit: BeforeCommit = _nothing,
               state_hash: bytes | None = None, **commit: Any) -> Record:
        """Sign a supervisor record into the agent's chain and commit it (``state_hash``: a state reset's)."""
        self.flush()  # results already checked precede this record in the chain and the store
        v = agent.verifier
        record = sign_record(
            self.key, kind=kind, agent_id=agent.id, seq=v.next_seq, time_ns=time.time_ns(),
            prev_hash=v.head_hash, state_hash=state_hash or v.state_hash or sha256(agent.state), fields=fields,
        )
        scratch = copy.copy(v)
        scratch.advance(record, signature_checked=True)
        before_commit(agent, record)
        self.store.commit([Commit(agent_id=agent.id, records=[record], **commit)])
        agent.verifier = scratch
        self.committed(agent, [record])
        return record

    def committed(self, agent: Agent, records: list[Record]) -> None:
        """Records are durable: count them, wake whoever waits on the chain, feed the foreground printer."""
        self.on_committed(agent, records)
        self.on_head(agent.id, agent.verifier.next_seq - 1)
        if self.on_record is not None:
            for record in records:
                self.on_record(agent, record)

    def reload_head(self, agent: Agent) -> None:
        """After a failed commit: the agent's chain and state are what the store holds (nothing, for one
        whose genesis was not stored)."""
        row = self.store.agent(agent.id)
        if row is None:
            agent.verifier = ChainVerifier(self.public_key)
            agent.in_store = False
            return
        agent.verifier = ChainVerifier.at_head(self.public_key, agent.id, row.head_seq, row.head_hash, row.state_hash)
        agent.state = row.state

    # --- supervisor nodes' chains --------------------------------------------------------------

    def open_node_chain(self, node_id: bytes, name: str, config: dict[str, Any], parent: str) -> ChainVerifier:
        """A tree node's chain: positioned at its stored head, or begun with its genesis."""
        head = self.store.node_head(node_id)
        if head is not None:
            return ChainVerifier.at_head(self.public_key, node_id, head[0], head[1], sha256(b""), node=True)
        verifier = ChainVerifier(self.public_key)
        self.append_node(node_id, name, verifier, Kind.NODE_GENESIS,
                         {"name": name, "config": wire.encode_json(config).decode(), "parent": parent})
        return verifier

    def append_node(self, node_id: bytes, name: str, verifier: ChainVerifier, kind: Kind,
                    fields: dict[str, str]) -> Record:
        self.flush()
        record = sign_record(self.key, kind=kind, agent_id=node_id, seq=verifier.next_seq, time_ns=time.time_ns(),
                             prev_hash=verifier.head_hash, state_hash=sha256(b""), fields=fields)
        self.store.append_node(node_id, name, record)
        verifier.advance(record, signature_checked=True)
        self.on_head(node_id, record.seq)
        return record
