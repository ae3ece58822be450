"""Supervision at work: the engine's actions carried out with real workers, their outcomes fed back.

The decisions are the engine's (``_supervision.py``); this part of the
supervisor builds the engine's tree from manifests and stored rows, turns each
action into a worker start or stop, a record or an answer, and turns each
worker's readiness or exit into an event for the engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import os
import re
import resource
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from theater import wire
from theater.chain import ChainVerifier
from theater.exits import exit_text
from theater.home import Home
from theater.records import Kind, Record, sha256

from ._agent import Agent, Agents, Member, Node, Pending, uptime_s
from ._config import (
    MAX_COMPONENT_BYTES,
    OPERATOR,
    AgentConfig,
    TreeConfig,
    config_from_dict,
    config_to_dict,
    load_any,
    load_uploaded,
    policy_dirs,
    remember_digest,
    with_tenant,
)
from ._errors import NotFound, Refused, StoreError, StoreUnavailable, SupervisorError
from ._host import Answer, HostCall
from ._record_path import RecordPath
from ._store import Commit, EventStore
from ._supervision import (
    Abandoned,
    Action,
    Done,
    Engine,
    Flags,
    Leaf,
    NodeKind,
    NodeRecord,
    Notify,
    OwnerGaveUp,
    Purpose,
    Readmitted,
    RecordExit,
    Removed,
    Settle,
    Start,
    Status,
    Stop,
    StopNode,
    StoreTree,
    Sup,
)
from ._uploads import Stored, Uploads
from ._workers import FDS_PER_AGENT, Workers

if TYPE_CHECKING:
    from theater.control import Upload

    from ._control import Control
    from ._tenants import Tenants
    from ._usage import Usage

__all__ = ["Supervision"]

CHILD_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
STORE_PROBE_S = 0.5  # how often a store that could not be written is tried again
MAX_CHILD_EXIT_REASON = 1024  # characters of what a parent is told of a child's end, `; restarting` kept whole
Ticket = tuple[bytes, int]  # a client's identity and request id, answered when a job ends
RESTART_FAILED = "restart-failed"


class RestartTicket(NamedTuple):
    """An operator's restart: answered once what it started has settled, not when its job ends."""

    ident: bytes
    rid: int


def _implicit(agent: Agent) -> Sup:
    """A top-level agent's implicit one_for_one node, with the agent's own intensity."""
    spec = agent.restart
    return Sup(f"{agent.name}:root", Flags("one_for_one", spec.intensity, spec.period_ms),
               kind=NodeKind.AGENT_ROOT, owner=agent.name, children=[agent.leaf])


class Supervision:
    """The executor of the supervision engine, inside the supervisor's loop."""

    def __init__(self, agents: Agents, records: RecordPath, workers: Workers, control: Control, store: EventStore, *,
                 policy_root: Path, running: Callable[[], bool], log: Callable[[str], None]) -> None:
        self.agents = agents
        self.records = records
        self.workers = workers
        self.control = control
        self.store = store
        self.policy_root = policy_root
        self.uploads = Uploads(Home(policy_root).uploads, workers.timers)  # policy_root is the home
        self.running = running
        self.log = log
        self.tenants: Tenants  # set by the supervisor once all parts exist
        self.usage: Usage
        self.engine = Engine()
        self.nodes: dict[str, Node] = {}  # tree nodes by name
        self.trees: list[Node] = []  # tree roots, in spawn order
        # agent -> (incarnation, reason, detail, and the account of host calls no record holds) to record
        self._exits: dict[str, tuple[int, str, str, str]] = {}
        self._violated: set[str] = set()  # agents whose last worker's part of the chain a violation ended
        self._never_ran: set[str] = set()  # agents stopped before their start made a worker: no exit to record
        self.chains: dict[str, ChainVerifier] = {}  # tree nodes' own chains, by node name
        self._waiting_for_store: list[Agent] = []  # starts held while the store cannot be written
        self._starts: deque[tuple[Agent, bool]] = deque()  # worker starts (or prepares), one per turn of the loop
        self._watching = False
        self._restarted: list[tuple[RestartTicket, str]] = []  # restarts whose job ended, until they settle
        self._applying = 0
        workers.spawner.cache.in_use = self.artifacts_in_use

    # --- building ---------------------------------------------------------------------

    def build_node(self, config: TreeConfig, node_id: bytes | None = None, parent: str = "") -> Node:
        """Node objects for a tree config (``parent``: the enclosing node's name); agents already in the
        store keep their chains."""
        sup = Sup(config.name, config.flags, restart=config.restart.type, shutdown_ms=config.restart.kill_after_ms)
        node = Node(id=node_id or uuid.uuid5(uuid.NAMESPACE_OID, f"theater-tree:{config.name}").bytes,
                    config=config, sup=sup)
        self.nodes[node.name] = node
        self._open_chain(node, parent)
        for child in config.children:
            if isinstance(child, TreeConfig):
                sup.children.append(self.build_node(child, parent=config.name).sup)
                continue
            agent = self.agents.by_name.get(child.name)
            if agent is None:
                agent = Agent(id=uuid.uuid4().bytes, config=child, verifier=ChainVerifier(self.records.public_key),
                              state=b"", initialized=False, incarnation=-1, in_store=False)
                self.register(agent)
            agent.orphan_of = ""
            sup.children.append(agent.leaf)
        return node

    def own_children(self, agent: Agent) -> None:
        """An agent that holds the supervision capability supervises children of its own."""
        sup = agent.config.supervision
        flags = sup.flags if sup is not None else Flags()
        own = Sup(f"{agent.name}:children", flags, kind=NodeKind.OWNED, owner=agent.name, status=Status.RUNNING)
        agent.leaf.owns = own
        self.engine.add(own)

    def roots(self) -> list[Member]:
        """Top-level agents and tree roots, in the order they were started."""
        agents = [a for a in self.agents if a.leaf.parent is not None
                  and a.leaf.parent.kind is NodeKind.AGENT_ROOT]
        return [*agents, *self.trees]

    def member(self, ref: object) -> Member:
        if isinstance(ref, str) and ref in self.nodes:
            return self.nodes[ref]
        if isinstance(ref, str):
            for node in self.nodes.values():
                if node.uuid == ref:
                    return node
        return self.agents.find(ref)

    def agents_under(self, member: Member) -> list[Agent]:
        if isinstance(member, Agent):
            return [member]
        return [self.agents.by_name[m.name] for m in member.sup.walk() if isinstance(m, Leaf)]

    # --- what clients and agents ask -------------------------------------------------------

    def spawn(self, manifest: Path, ticket: Ticket | None, *, replace: bool = False, tenant: str = OPERATOR) -> Member:
        """Load a manifest and start its agent or tree as ``tenant``'s; an agent is stored once its worker says
        hello. ``replace``: a stopped or failed agent of the same name is removed first (as ``theater rm``)."""
        if not self.running():
            raise Refused("the supervisor is shutting down")
        return self._spawn(with_tenant(load_any(manifest, policy_dirs(self.policy_root)), tenant), ticket, replace)

    def spawn_uploaded(self, upload: Upload, ticket: Ticket, tenant: str) -> None:
        """A tenant's spawn: its manifest's text and its component's bytes. The component is kept in the home
        under its SHA-256 (never under a name the client chose), stored off the loop; the manifest may name no
        other file. Answered as ``spawn``, or with the error that refused it."""
        if not self.running():
            raise Refused("the supervisor is shutting down")
        if len(upload.component) > MAX_COMPONENT_BYTES:
            raise Refused(f"a component of {len(upload.component)} bytes is more than {MAX_COMPONENT_BYTES}")

        def stored(job: Future[Stored]) -> None:
            name, refusal = None, None
            try:
                if not self.running():
                    raise Refused("the supervisor is shutting down")
                try:
                    component = job.result()
                except OSError as exc:
                    later = ": try again once there is space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
                    raise StoreUnavailable(f"cannot store the component ({exc.strerror}); nothing was taken"
                                           f"{later}") from None
                name = component.path.name
                remember_digest(component.path, component.signature, component.sha256)
                config = load_uploaded(upload.manifest_text, component.path, policy_dirs(self.policy_root))
                self._spawn(with_tenant(config, tenant), ticket, upload.replace)
            except SupervisorError as exc:
                refusal = (exc.code, str(exc))
            except Exception as exc:  # as for any request: a client must never be able to crash the supervisor
                self.log(f"internal error serving an uploaded spawn: {type(exc).__name__}: {exc}")
                refusal = ("internal", f"internal error: {type(exc).__name__}")
            try:
                if name is not None:
                    self.uploads.settled(name)
                self.drop_unused_uploads()  # a refused spawn keeps nothing, gone before the client hears of it
            finally:
                if refusal is not None:
                    self.control.reply_error(*ticket, *refusal)

        self.uploads.store(tenant, upload.component, upload.kind, stored)

    def drop_unused_uploads(self, forgotten: AgentConfig | None = None, *, starting: bool = False) -> None:
        """A tenant's component stays in the home only while an agent of the home uses it: after a refused
        spawn, a removal or an agent that never started, every upload no agent uses is deleted, and so is the
        artifact compiled for ``forgotten`` (the agent just forgotten) if no agent shares it. Otherwise a
        tenant could fill the disk by sending components."""
        used = {a.config.component_path for a in self.agents}
        for name in self.uploads.unused(used, starting=starting):
            self.log(f"deleted the uploaded component {name}: no agent uses it")
        if forgotten is not None and forgotten.component_path not in used \
                and os.path.dirname(forgotten.component_path) == os.path.realpath(self.uploads.root):
            cache = self.workers.spawner.cache
            key = cache.key(forgotten.component_sha256, forgotten.limits)
            if key not in self.artifacts_in_use():
                cache.discard(key)

    def artifacts_in_use(self) -> set[str]:
        """The artifact cache's keys of every agent of the home and of the child templates they may spawn from."""
        cache = self.workers.spawner.cache
        configs = [a.config for a in self.agents]
        configs += [t for c in configs if c.supervision for t in c.supervision.templates]
        return {cache.key(c.component_sha256, c.limits) for c in configs}

    def _spawn(self, config: AgentConfig | TreeConfig, ticket: Ticket | None, replace: bool) -> Member:
        members = config.walk() if isinstance(config, TreeConfig) else [config]
        agents = [c for c in members if isinstance(c, AgentConfig)]
        templates = [t for c in agents if c.supervision for t in c.supervision.templates]
        self.tenants.check_spawn(config.tenant, {c.policy for c in [*agents, *templates]},
                                 [(c.name, c.limits.memory_bytes) for c in agents])
        names = [c.name for c in members]
        for name in names:  # all checked before --replace removes anything
            existing = self.agents.by_name.get(name) or self.nodes.get(name)
            tree = self.tree_of(existing) if existing is not None else None
            if existing is not None and tree is not None:
                raise Refused(f"a member named {name!r} already exists ({existing.uuid}, {existing.status}) in the "
                              f"tree {tree}: a tree and its members can be neither removed nor replaced, and their "
                              "names stay taken; give this one another name")
            if existing is not None and not replace:
                running = existing.status not in ("stopped", "failed")
                first = f"stop it first (theater stop {name}); then " if running else ""
                raise Refused(f"a member named {name!r} already exists ({existing.uuid}, {existing.status}); "
                              f"{first}theater rm {name} removes a stopped or failed one, spawn --replace does both")
        replaced = []
        if replace:
            for name in names:
                existing = self.agents.by_name.get(name) or self.nodes.get(name)
                if existing is not None:
                    self.remove(existing, drop_upload=False)  # not before the new agent holds its own
                    replaced.append(existing)
        member = self._add(config, ticket)
        for old in replaced:
            if isinstance(old, Agent):
                self.drop_unused_uploads(old.config)
        return member

    def _add(self, config: AgentConfig | TreeConfig, ticket: Ticket | None) -> Member:
        if isinstance(config, TreeConfig):
            root = self.build_node(config, uuid.uuid4().bytes)
            self.trees.append(root)
            self.engine.add(root.sup)
            self.apply(self.engine.spawn(root.sup, time.monotonic(), ticket))
            return root
        agent = Agent(id=uuid.uuid4().bytes, config=config, verifier=ChainVerifier(self.records.public_key),
                      state=b"", initialized=False, incarnation=-1, in_store=False)
        self.register(agent)
        if ticket is not None:
            agent.spawn_waiters.append(ticket)
        top = _implicit(agent)
        self.engine.add(top)
        self.apply(self.engine.spawn(top, time.monotonic()))
        return agent

    def register(self, agent: Agent) -> None:
        if "supervision" in agent.config.capabilities and agent.leaf.owns is None:
            self.own_children(agent)  # first: if the engine refuses its node, no half-registered agent is left
        self.agents.add(agent)

    def _load_stored(self) -> None:
        """Every stored agent, positioned at its chain's head; a worker that died with the previous
        supervisor gets its exit record now."""
        for row in self.store.agents():
            signed = self._signed_config(row.id, row.name, row.config)
            config = AgentConfig.from_dict(signed)
            verifier = ChainVerifier.at_head(self.records.public_key, row.id, row.head_seq, row.head_hash,
                                             row.state_hash)
            last = Record.parse(next(self.store.records(row.id, after=row.head_seq - 1)))
            if last.hash != row.head_hash:
                raise StoreError(f"agent {row.name}: stored head does not match its last record")
            agent = Agent(id=row.id, config=config, verifier=verifier, state=row.state,
                          initialized=row.initialized, incarnation=row.incarnation, in_store=True)
            agent.leaf.status = Status(row.desired) if row.desired != "running" else Status.STOPPED
            agent.leaf.held = row.desired == "stopped"
            if last.kind not in (Kind.EXIT, Kind.VIOLATION):  # its worker died with the previous supervisor
                self.records.append(agent, Kind.EXIT, {
                    "incarnation": agent.incarnation, "reason": "supervisor-restart",
                    "detail": "the previous supervisor ended; its worker ended with it",
                })
            agent.orphan_of = signed.get("parent") or ""  # until its tree, if it has one, claims it
            self.register(agent)

    def _signed_config(self, agent_id: bytes, name: str, row_config: dict[str, Any]) -> dict[str, Any]:
        """The configuration the agent's genesis record signed: what every worker of the agent runs.

        The ``agents`` row holds a copy for lookups; it is not signed, so a row that differs from the
        genesis (an edited store) is never run, only reported (``theater verify`` says so too)."""
        genesis = Record.parse(next(self.store.records(agent_id)))
        if genesis.kind is not Kind.GENESIS:
            raise StoreError(f"agent {name}: its chain does not start with a genesis record")
        signed: dict[str, Any] = json.loads(genesis.fields()["config"])
        if signed != row_config:
            self.log(f"agent {name}: the stored row's configuration differs from the one its genesis signed; "
                     "running the signed one (theater verify reports the row)")
        return signed

    def resume(self) -> None:
        """After a supervisor start: top-level agents and trees whose desired state is running start again."""
        self._load_stored()
        self.drop_unused_uploads(starting=True)  # those of agents removed or never started before a crash
        self.workers.spawner.cache.sweep()
        rows = {row.id: row for row in self.store.agents()}
        for agent in list(self.agents):
            if not agent.orphan_of:
                top = _implicit(agent)
                self.engine.add(top)
                if rows[agent.id].desired == "running":
                    self.log(f"resuming {agent.name} from record {agent.verifier.next_seq - 1}")
                    self.apply(self.engine.spawn(top, time.monotonic(), resume=True))
                else:
                    top.status = agent.leaf.status
        for tree_id, _name, data, desired in self.store.trees():
            config = load_stored_tree(data)
            root = self.build_node(config, tree_id)
            self.trees.append(root)
            self.engine.add(root.sup)
            if desired == "running":
                self.log(f"resuming tree {root.name}")
                self.apply(self.engine.spawn(root.sup, time.monotonic(), resume=True))
            else:
                for m in root.sup.walk():
                    if isinstance(m, Sup):
                        m.status = Status(desired)
        for agent in self.agents:
            if agent.leaf.parent is None and rows[agent.id].desired == "running":
                # An agent's own children are not restarted with it; they stay stopped after a restart.
                self.commit_desired(agent, Status.STOPPED)

    def stop(self, member: Member, ticket: Ticket | None) -> None:
        self.apply(self.engine.stop(member.name, time.monotonic(), ticket))

    def restart(self, member: Member, ticket: Ticket | None) -> None:
        """Stop a member if it runs, then start it from its committed state: not counted."""
        if not self.running():
            raise Refused("the supervisor is shutting down")
        if isinstance(member, Agent):
            self._refuse_let_go(member)
            self._refuse_left_its_node(member)
        self._refuse_under_failed(member)
        top = member.leaf if isinstance(member, Agent) else member.sup
        for leaf in top.walk_spec():  # a temporary child that left a node starts again with that node
            if isinstance(leaf, Leaf):
                agent = self.agents.by_name[leaf.name]
                agent.last_exit = agent.last_exit or "restarted by the operator"
                self.commit_desired(agent, Status.RUNNING)
        self.apply(self.engine.restart(member.name, time.monotonic(),
                                       RestartTicket(*ticket) if ticket is not None else None))

    def _restart_outcome(self, name: str) -> dict[str, Any] | str | None:
        """Where a restart whose job ended stands: its tree entry once every agent and node under it runs, why
        it did not start once nothing under it (nor any node above it) is still on its way, else None."""
        try:
            member = self.member(name)
        except NotFound:
            return f"{name} was removed before it started"
        top: Leaf | Sup = member.leaf if isinstance(member, Agent) else member.sup
        above, node = [], top.parent
        while node is not None:
            above.append(node)
            node = node.parent
        moving = (Status.STARTING, Status.RESTARTING, Status.STOPPING)
        under = list(top.walk())
        if any(n.job is not None for n in above) or any(
                m.status in moving or (isinstance(m, Sup) and m.job is not None) for m in under):
            return None
        leaves = [self.agents.by_name[m.name] for m in under if isinstance(m, Leaf)]
        if all(m.status is Status.RUNNING for m in under):
            return self.entry(member)
        failed = [n for n in [*reversed(above), *under] if isinstance(n, Sup) and n.kind is NodeKind.TREE
                  and n.status is Status.FAILED]
        why = [f"supervisor {failed[0].name} {failed[0].last_exit}"] if failed else []
        # Under a node that gave up, the agents that failed (not those it stopped when it gave up).
        down = [a for a in leaves if a.status is Status.FAILED or (not failed and a.status is not Status.RUNNING)]
        if isinstance(member, Agent):
            why.append(f"it is {member.status} ({member.last_exit})")
        else:
            why += [f"{a.name} is {a.status} ({a.last_exit})" for a in down] or [f"it is {member.status}"]
        return f"{name} did not start: " + "; ".join(why)

    def _answer_restarts(self) -> None:
        """Answer each restart that has settled: with its tree entry, or with why it did not start."""
        waiting, self._restarted = self._restarted, []
        for ticket, name in waiting:
            outcome = self._restart_outcome(name)
            if outcome is None:
                self._restarted.append((ticket, name))
            elif isinstance(outcome, str):
                self.control.reply_error(*ticket, RESTART_FAILED, outcome)
            else:
                self.control.reply(*ticket, outcome)

    @staticmethod
    def _refuse_left_its_node(agent: Agent) -> None:
        """A temporary tree child that ended has left its node (OTP deletes it; restart_child answers
        not_found): started alone it would run outside its tree, stopped by nothing, and `down` would wait for
        it for ever. It starts again with its node."""
        node = agent.leaf.parent
        if node is not None and node.kind is NodeKind.TREE and agent.leaf not in node.children:
            raise Refused(f"{agent.name} is a temporary child of supervisor {node.name} and has ended, so it left "
                          f"{node.name}'s children: restarted alone it would run outside its tree. It starts "
                          f"again with its node: theater restart {node.name}")

    @staticmethod
    def _refuse_under_failed(member: Member) -> None:
        """A member of a tree whose node (or a node above it) has given up, or was stopped, would run
        unsupervised: its crash would restart nothing, and nothing would give up (an OTP supervisor that is
        not running has no children to restart). That node is restarted instead, and starts it."""
        node = member.leaf.parent if isinstance(member, Agent) else member.sup.parent
        down = None
        while node is not None:
            if node.kind is NodeKind.TREE and node.status in (Status.FAILED, Status.STOPPED):
                down = node  # the highest one: restarting it starts everything under it
            node = node.parent
        if down is not None:
            how = f"failed ({down.last_exit})" if down.status is Status.FAILED else "is stopped"
            raise Refused(f"{member.name}'s supervisor {down.name} {how}: restarted alone {member.name} would run "
                          f"unsupervised. Restart that node, which starts {member.name} with it: "
                          f"theater restart {down.name}")

    @staticmethod
    def _refuse_let_go(agent: Agent) -> None:
        """An agent's own child that its parent no longer has (the parent stopped it, or was told of its end,
        or the parent itself ended, or a supervisor restart came between) belongs to no supervisor: started by
        the operator it would run outside every tree, stopped by nothing, and `down` would wait for it for
        ever. Only its parent starts it again (supervision.spawn, by name)."""
        node = agent.leaf.parent
        let_go = (node is not None and node.kind is NodeKind.OWNED and agent.leaf not in node.children) or (
            bool(agent.orphan_of) and (node is None or node.kind is not NodeKind.OWNED))
        if let_go:
            parent = node.owner if node is not None and node.kind is NodeKind.OWNED else agent.orphan_of
            raise Refused(f"{agent.name} is a child of agent {parent}, which no longer has it among its children: "
                          f"only {parent} can start it again (supervision.spawn of {agent.name.rsplit('.', 1)[-1]!r})")

    def remove(self, member: Member, *, drop_upload: bool = True) -> dict[str, Any]:
        """``theater rm``: a stopped or failed agent's chain ends with a signed removed record, in the same
        transaction that moves its row to ``removed`` and drops its kv data and timers; its name is free, and its
        workers' log file goes (a home whose agents come and go under new names would otherwise keep one for
        every name ever used). ``drop_upload``: an uploaded component no agent uses any more is deleted
        (drop_unused_uploads)."""
        tree = self.tree_of(member)
        if tree is not None:
            what = ("the root" if member.name == tree else "a supervisor node") if isinstance(member, Node) \
                else "an agent"
            raise Refused(f"{member.name} is {what} of the tree {tree}: a tree and its members cannot be removed; "
                          f"they stay in the home and their names stay taken (theater stop {tree} stops the tree, "
                          f"theater restart {tree} starts it again)")
        assert isinstance(member, Agent)
        agent = member
        if agent.alive or agent.status not in (Status.STOPPED, Status.FAILED):
            raise Refused(f"agent {agent.name} is {agent.status}: stop it first (theater stop {agent.name})")
        kept = self.kept_children(agent)  # not only its current ones: those it stopped, or that stopped with it
        if kept:  # (they were left in the home, and the next agent of the name took them over)
            raise Refused(f"agent {agent.name} still has children, running or stopped "
                          f"({', '.join(c.name for c in kept)}): remove them first")
        if not agent.in_store:
            raise Refused(f"agent {agent.name} has no chain yet")
        record = self.records.append(agent, Kind.REMOVED, {"reason": "removed by the operator"}, remove=True)
        self.apply(self.engine.forget(agent.name, time.monotonic()))
        self.agents.remove(agent)
        with contextlib.suppress(FileNotFoundError):
            (self.workers.home.logs / f"{agent.name}.log").unlink()
        if drop_upload:
            self.drop_unused_uploads(agent.config)
        return {"removed": agent.name, "id": agent.uuid, "head": record.seq}

    def tree_of(self, member: Member) -> str | None:
        """The name of the tree (its root) a supervisor node or an agent belongs to, or None."""
        node = member.sup if isinstance(member, Node) else member.leaf.parent
        if node is None or node.kind is not NodeKind.TREE:
            return None
        return self.engine.root_of(node).name

    def remove_tenant(self, name: str, ticket: Ticket) -> None:
        """The operator removes a tenant: its key stops working at once, its agents are stopped (their chains
        stay, for audit), and the answer comes when every one of them has stopped."""
        self.tenants.remove(name)
        mine = [m for m in self.roots() if m.config.tenant == name]
        running = [m for m in mine if m.status not in (Status.STOPPED, Status.FAILED)]
        answer = {"removed": name, "stopped": len(running)}
        if not running:
            self.control.reply(*ticket, answer)
            return
        waiting = {m.name for m in running}

        def stopped(member_name: str) -> Callable[[], None]:
            def done() -> None:
                waiting.discard(member_name)
                if not waiting:
                    self.control.reply(*ticket, answer)
            return done

        for member in running:
            self.apply(self.engine.stop(member.name, time.monotonic(), stopped(member.name)))

    def shutdown(self) -> None:
        waiting, self._restarted = self._restarted, []
        for ticket, _name in waiting:
            self.control.reply_error(*ticket, Refused.code, "the supervisor is shutting down")
        roots = [self.engine.root_of(m.leaf if isinstance(m, Agent) else m.sup) for m in self.roots()]
        self.apply(self.engine.shutdown(roots, time.monotonic(), "the supervisor is shutting down"))

    def spawn_child(self, parent: Agent, template_name: object, name: object, args: object) -> str:
        own = parent.leaf.owns
        assert own is not None
        if not isinstance(template_name, str) or not isinstance(name, str) or not isinstance(args, str):
            raise Refused("spawn needs a template name, a child name and args")
        template = parent.config.template(template_name)
        if template is None:
            raise Refused(f"no child template named {template_name[:64]!r} in {parent.name}'s manifest")
        if not CHILD_NAME_RE.fullmatch(name):
            raise Refused("a child name is 1-32 characters of a-z, 0-9, '-', '_', starting with a letter or digit")
        busy = own.job.purpose if own.job is not None else None
        if parent.status is Status.STOPPING or busy in (Purpose.GIVE_UP, Purpose.STOP):  # its init may spawn
            # Its children are being stopped (it gave up, or it stops): one started now would be left out of
            # that, run on with no supervisor, and keep `down` waiting for ever.
            why = "it gave up and stops its children" if busy is Purpose.GIVE_UP else f"it is {parent.status}"
            raise Refused(f"{parent.name} cannot start a child now: {why}")
        full = f"{parent.name}.{name}"
        earlier = self.agents.by_name.get(full)
        if earlier is not None and (earlier.alive or earlier.status not in (Status.STOPPED, Status.FAILED)):
            raise Refused(f"{parent.name} already has a child named {name!r} ({earlier.status})")
        limit = parent.config.limits.max_children
        kept = len(self.kept_children(parent))
        if earlier is None and kept >= limit:  # a stopped child counts until it is removed: the home stays bounded
            raise Refused(f"{parent.name} keeps {kept} children, running or stopped (max_children {limit}); "
                          "remove a stopped one (supervision.remove) to start another")
        try:
            data = args.encode("latin-1")
        except UnicodeEncodeError:
            raise Refused("args must be bytes (characters U+0000..U+00FF)") from None
        if len(data) > template.limits.max_message_bytes:
            raise Refused(f"args of {len(data)} bytes exceed the template's max_message_bytes")
        config = dataclasses.replace(template, name=full, init_args=data)
        self.tenants.check_child(parent.config.tenant, 0 if earlier is not None and earlier.alive
                                 else config.limits.memory_bytes)
        if earlier is not None:
            child = self._spawn_again(parent, earlier, config)
        else:
            child = Agent(id=uuid.uuid4().bytes, config=config, verifier=ChainVerifier(self.records.public_key), state=b"",
                          initialized=False, incarnation=-1, in_store=False)
            self.register(child)
        self.apply(self.engine.start_child(own, child.leaf, time.monotonic()))
        return child.uuid

    def kept_children(self, parent: Agent) -> list[Agent]:
        """The agent's own children it still has, running or stopped (not removed)."""
        prefix = f"{parent.name}."
        return [a for a in self.agents if a.name.startswith(prefix) and "." not in a.name[len(prefix):]]

    def remove_child(self, parent: Agent, ref: object) -> None:
        """A guest's supervision.remove: one of its own children, stopped or failed, is removed."""
        child = next((c for c in self.kept_children(parent) if c.uuid == ref), None)
        if child is None:
            raise NotFound(f"{str(ref)[:64]!r} is not a child of {parent.name}")
        self.remove(child)

    def _spawn_again(self, parent: Agent, child: Agent, config: AgentConfig) -> Agent:
        """A child name used before (the child stopped, or ended with a previous supervisor process):
        the same agent and chain start again from the initial state, as OTP restarts a child by its id.
        Its configuration is in its genesis record, so the template must still give the same one."""
        if dataclasses.replace(child.config, init_args=config.init_args) != config:
            raise Refused(f"{child.name} ran before with another configuration (its template or component "
                          "changed since); give the child another name")
        child.config = config
        self.reset_state(child, f"spawned again by {parent.name}")
        child.orphan_of = ""
        child.last_exit = f"spawned again by {parent.name}"
        if child.leaf.parent is not None and child.leaf in child.leaf.parent.children:
            child.leaf.parent.children.remove(child.leaf)
        self.engine.members.pop(child.name, None)
        self.commit_desired(child, Status.RUNNING)
        return child

    def stop_child(self, parent: Agent, ref: object) -> None:
        own = parent.leaf.owns
        assert own is not None
        child = next((self.agents.by_name[c.name] for c in own.children if self.agents.by_name[c.name].uuid == ref), None)
        if child is None:
            raise NotFound(f"{str(ref)[:64]!r} is not one of {parent.name}'s children")
        self.apply(self.engine.stop(child.name, time.monotonic(), reason="stopped",
                                    why=f"stopped by its supervisor {parent.name}", hold=False))

    def children_of(self, parent: Agent) -> list[str]:
        own = parent.leaf.owns
        return [self.agents.by_name[c.name].uuid for c in own.children] if own is not None else []

    # --- what workers do -----------------------------------------------------------------------

    def ready(self, agent: Agent) -> None:
        self.apply(self.engine.ready(agent.name, time.monotonic()))

    def exited(self, agent: Agent, incarnation: int, reason: str, detail: str, *, violated: bool,
               unrecorded: str = "") -> None:
        """A stored agent's worker ended: its supervisor decides; its exit record is written on the way, its
        detail followed by ``unrecorded`` (``_ledger.unrecorded_host_calls``: for the record, not for ps)."""
        self._exits[agent.name] = (incarnation, reason, detail, unrecorded)
        if violated:
            self._violated.add(agent.name)
        self.apply(self.engine.exited(agent.name, reason, time.monotonic()))
        if agent.name in self._exits:  # not a member of any tree (a child from before a supervisor restart)
            self._record_exit(agent, "", None)

    def reset_state(self, agent: Agent, why: str) -> None:
        """The agent starts again from its initial state: the next worker calls init. The chain says so
        (a `state-reset` record stating the empty state's hash), so the next worker's records link."""
        if agent.in_store:
            try:
                self.records.append(agent, Kind.STATE_RESET, {"reason": why}, state_hash=sha256(b""),
                                    state=b"", initialized=False)
            except StoreError as exc:
                self.log(f"{agent.name}: cannot record the state reset: {exc}; it resumes its committed state")
                return
        agent.state, agent.initialized = b"", False

    def host_request(self, call: HostCall) -> Answer:
        """A guest's `supervision` call: it acts only on this agent's own children."""
        agent, op, args = call.agent, call.op, call.args
        if op == "spawn":
            return Answer({"ok": True, "id": self.spawn_child(agent, args.get("template"), args.get("name"),
                                                              args.get("args"))})
        if op == "stop":
            self.stop_child(agent, args.get("child"))
            return Answer({"ok": True})
        if op == "children":
            return Answer({"ok": True, "children": self.children_of(agent)})
        if op == "remove":
            self.remove_child(agent, args.get("child"))
            return Answer({"ok": True})
        return Answer({"ok": False, "error": f"unknown supervision operation {op!r}"})

    def never_started(self, agent: Agent) -> None:
        """An agent whose worker ended before its first hello: it has no chain, and is forgotten."""
        self.apply(self.engine.forget(agent.name, time.monotonic()))

    # --- the actions ----------------------------------------------------------------------------

    def apply(self, actions: list[Action]) -> None:
        """Carry out the engine's actions; then answer the operator's restarts that have settled."""
        self._applying += 1
        try:
            self._apply(actions)
        finally:
            self._applying -= 1
        if self._restarted and not self._applying:
            self._answer_restarts()

    def _apply(self, actions: list[Action]) -> None:
        started_early: Start | None = None
        for i, action in enumerate(actions):
            if isinstance(action, Start):
                if action is not started_early:
                    self._start(action)
                if action.then is not None and self.store.problem is None:
                    self._start_worker(self.agents.by_name[action.then], ahead=True)
            elif isinstance(action, RecordExit):
                # An exit followed at once by the restart of the same agent: the new worker is asked for before
                # the exit record's commit, and forks or wakes while it is made durable. Its hello is read after
                # that commit (this loop is busy until then), so its key record still follows the exit record.
                after = actions[i + 1] if i + 1 < len(actions) else None
                started_early = (after if isinstance(after, Start) and after.name == action.name
                                 and not self._resets(after) else None)
                self._record_exit(self.agents.by_name[action.name], action.note, action.desired,
                                  then=functools.partial(self._start, started_early) if started_early else None)
            elif isinstance(action, Stop):
                agent = self.agents.by_name[action.name]
                agent.stop_why = action.why
                if agent.worker is None:
                    self._stop_before_start(agent, action.reason)
                else:
                    self.workers.stop(agent, action.reason, action.kill_after_ms)
            elif isinstance(action, StopNode) and action.kill_after_ms is not None:
                self._node_deadline(self.nodes[action.name], action.kill_after_ms)
            elif isinstance(action, Settle):
                agent = self.agents.by_name[action.name]
                self.workers.settle(agent)
                if action.desired is not None:
                    self.commit_desired(agent, action.desired)
            elif isinstance(action, NodeRecord):
                self._node_record(action)
            elif isinstance(action, Notify):
                self._notify(self.agents.by_name[action.owner], self.agents.by_name[action.child], action.reason)
            elif isinstance(action, OwnerGaveUp):
                owner = self.agents.by_name[action.owner]
                worker = owner.worker
                if worker is not None and not worker.exited:
                    worker.fault = action.why
                    worker.kill("shutdown")
            elif isinstance(action, Removed):
                pass  # the engine has taken it out of its node; `ps` still lists the agent
            elif isinstance(action, Readmitted):
                self.commit_desired(self.agents.by_name[action.name], Status.RUNNING)
            elif isinstance(action, StoreTree):
                node = self.nodes[action.root]
                with contextlib.suppress(StoreError):
                    self.store.save_tree(node.id, node.name, config_to_dict(node.config), str(action.desired))
            elif isinstance(action, Done) and isinstance(action.ticket, RestartTicket):
                self._restarted.append((action.ticket, action.member))
            elif isinstance(action, Done) and isinstance(action.ticket, tuple):
                ident, rid = action.ticket
                self.control.reply(ident, rid, self.entry(self.member(action.member)))
            elif isinstance(action, Done) and callable(action.ticket):
                action.ticket()
            elif isinstance(action, Abandoned) and isinstance(action.ticket, tuple):
                ident, rid = action.ticket
                self.control.reply_error(ident, rid, Refused.code, action.why)
        for agent in [a for a in self.workers.preparing if not self._due(a)]:
            self.workers.unprepare(agent)

    def _due(self, agent: Agent) -> bool:
        """Whether the agent's start is coming: queued here, or among the steps of a job still running."""
        return self.engine.will_start(agent.name) or (agent.status in (Status.STARTING, Status.RESTARTING)
                                                       and agent.worker is None)

    def watch_store(self) -> None:
        """While the store cannot be written (a full disk…), try a small write every half second; once
        one succeeds, start the workers that were held."""
        if self._watching:
            return
        self._watching = True
        troubled = self.store.problem is not None
        if troubled:
            self.log(f"the event store cannot be written ({self.store.problem}); spawns and messages are refused "
                     "and restarts wait until it can")

        def look() -> None:
            if not self.store.probe():
                self.workers.timers.after(STORE_PROBE_S, look)
                return
            self._watching = False
            if troubled:
                self.log("the event store can be written again")
            held, self._waiting_for_store = self._waiting_for_store, []
            for agent in held:
                if agent.worker is None and agent.status in (Status.STARTING, Status.RESTARTING):
                    self._start_worker(agent)

        self.workers.timers.after(STORE_PROBE_S, look)

    def _start_worker(self, agent: Agent, *, ahead: bool = False) -> None:
        """Queue the agent's worker start (``ahead``: a worker made ready for its start to come, see
        ``Workers.prepare``). Starts run one per turn of the loop, in order: after a crash storm the twenty
        replacements do not hold the loop for twenty fork-server round trips in a row, and other agents'
        calls are served between them."""
        self._starts.append((agent, ahead))
        if len(self._starts) == 1:
            self.workers.timers.after(0, self._start_next)

    def _start_next(self) -> None:
        agent, ahead = self._starts.popleft()
        if self._starts:
            self.workers.timers.after(0, self._start_next)  # due after this turn's timers: the next turn
        if ahead:
            if self._due(agent) and self.store.problem is None and self.agents.by_name.get(agent.name) is agent:
                with contextlib.suppress(OSError):  # then it starts as any worker does, in its turn
                    self.workers.prepare(agent)
            return
        if agent.status not in (Status.STARTING, Status.RESTARTING) or agent.alive:
            return  # stopped, or started by other means, while it waited (apply ended any worker made ahead)
        self._start_now(agent)

    def _start_now(self, agent: Agent) -> None:
        """Start the agent's worker; if the machine refuses (no space for its log, no descriptors…), the
        start is held and tried again with the store's probe, instead of taking the supervisor down."""
        try:
            self.workers.start(agent)
        except OSError as exc:
            why = str(exc)
            if exc.errno == errno.EMFILE:
                limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
                why = (f"the supervisor's open-files limit of {limit} is reached, {FDS_PER_AGENT} for each running "
                       "agent: raise its hard limit (ulimit -Hn, LimitNOFILE=) or stop agents")
            self.log(f"{agent.name}: cannot start a worker ({why}); trying again shortly")
            self._hold_for_store(agent, why)

    def _node_deadline(self, node: Node, limit_ms: int) -> None:
        """OTP: a supervisor child gets its shutdown time to stop its whole subtree, then is killed."""

        def too_slow() -> None:
            if node.sup.status is not Status.STOPPING:
                return
            for agent in self.agents_under(node):
                worker = agent.worker
                if worker is not None and not worker.exited:
                    worker.fault = f"supervisor {node.name} did not stop within its shutdown timeout of {limit_ms} ms; killed"
                    worker.kill(worker.kill_reason or "shutdown")

        self.workers.timers.after(limit_ms / 1000, too_slow)

    def _start(self, action: Start) -> None:
        agent = self.agents.by_name[action.name]
        if action.counted:
            agent.restart_count += 1
            self.usage.restarts_total += 1
            if self._resets(action):
                self.reset_state(agent, "restarted from its initial state (from = \"initial\")")
        if self.store.problem is not None:  # its key could not be recorded: start it once writes work
            self._hold_for_store(agent, self.store.problem)
            return
        self._start_worker(agent)

    def _hold_for_store(self, agent: Agent, why: str) -> None:
        """The agent's start waits until the store can be written (or the machine lets a worker start):
        whoever waits for it is told now, rather than left waiting for as long; the start itself goes on then."""
        self._waiting_for_store.append(agent)
        self.watch_store()
        for ticket, purpose, subject in self.engine.untie_waiting(agent.name, lambda t: isinstance(t, tuple)):
            ident, rid = cast(tuple[bytes, int], ticket)  # a client's (internal continuations stay tied)
            what = "spawn" if purpose is Purpose.SPAWN else "request"
            self.control.reply_error(ident, rid, StoreUnavailable.code,
                                     f"{agent.name} cannot start now ({why}); this {what} for {subject} goes on "
                                     "by itself once it can, and is not answered again")

    def _resets(self, action: Start) -> bool:
        """Whether starting ``action``'s agent first records a reset to its initial state."""
        agent = self.agents.by_name[action.name]
        return action.counted and agent.restart.from_state == "initial" and agent.in_store

    def _stop_before_start(self, agent: Agent, reason: str) -> None:
        """A stop that came while the agent's start had not made its worker yet (starts run one per turn, and
        wait while the store cannot be written): nothing runs, so nothing is stopped, and the queued start
        finds the agent no longer starting and drops it. The engine hears the outcome in the next turn, as it
        would a worker's exit; no exit record is written, since no worker ran since the last one."""

        def outcome() -> None:
            if agent.worker is not None or agent.status is not Status.STOPPING:
                return  # it was started or settled meanwhile: its worker's exit (if any) is the outcome
            if not agent.in_store:  # a new agent (a child just spawned) stopped before it ever ran: no chain
                self.workers.forget_unstarted(agent, f"agent {agent.name} was stopped before it started")
                return
            self._never_ran.add(agent.name)
            try:
                self.apply(self.engine.exited(agent.name, reason, time.monotonic()))
            finally:
                self._never_ran.discard(agent.name)

        self.workers.timers.after(0, outcome)

    def _record_exit(self, agent: Agent, note: str, desired: Status | None,
                     then: Callable[[], None] | None = None) -> None:
        """The exit record; ``then`` runs once it is in the chain, before its commit (or after a failure)."""
        incarnation, reason, detail, unrecorded = self._exits.pop(agent.name, (agent.incarnation, "shutdown", "", ""))
        if note:
            detail += note
            agent.last_exit = exit_text(reason, detail)
        detail += unrecorded
        want = str(desired) if desired is not None else None
        ran = False

        def run_then(_agent: Agent, _record: Record) -> None:
            nonlocal ran
            ran = True
            if then is not None:
                then()

        try:
            # Nothing of its own to end: a violation record already ended this worker's part of the chain, or
            # no worker ran since the last one's exit.
            if agent.name in self._violated or agent.name in self._never_ran:
                self._violated.discard(agent.name)
                if want is not None:
                    self.store.commit([Commit(agent_id=agent.id, records=[], desired=want)])
                return
            self.records.append(agent, Kind.EXIT, {"incarnation": incarnation, "reason": reason, "detail": detail},
                                before_commit=run_then, desired=want)
        except StoreError:
            pass
        finally:
            if then is not None and not ran:
                then()

    def _open_chain(self, node: Node, parent: str) -> None:
        """A tree node's chain: positioned at its stored head, or begun with its genesis."""
        config = {**node.config.flags.as_dict(), "restart": node.restart.type,
                  "children": [c.name for c in node.config.children]}
        try:
            self.chains[node.name] = self.records.open_node_chain(node.id, node.name, config, parent)
        except StoreError as exc:
            self.log(f"{node.name}: cannot open its chain: {exc}")

    def _append_node(self, node: Node, kind: Kind, fields: dict[str, str]) -> None:
        verifier = self.chains.get(node.name)
        if verifier is None:
            return
        try:
            node.head_ns = self.records.append_node(node.id, node.name, verifier, kind, fields).time_ns
        except StoreError as exc:
            self.log(f"{node.name}: cannot record {kind.name.lower()}: {exc}")

    def _node_record(self, action: NodeRecord) -> None:
        node = self.nodes.get(action.node)
        if node is None:
            return
        fields = ", ".join(f"{k}={v}" for k, v in action.fields.items())
        self.log(f"{node.name}: {action.event} ({fields})")
        kind = {"start": Kind.NODE_START, "restart": Kind.NODE_RESTART, "give-up": Kind.NODE_GIVE_UP,
                "terminate": Kind.NODE_TERMINATE}[action.event]
        if action.event == "start":
            node.started_at = time.time()
        self._append_node(node, kind, action.fields)

    def chain_head(self, ref: object) -> tuple[bytes, int]:
        """The id and head of an agent's or a tree node's chain (or a removed agent's, from the store)."""
        try:
            member = self.member(ref)
        except NotFound:
            removed = self.store.removed_head(ref) if isinstance(ref, str) else None
            if removed is None:
                raise
            return removed
        if isinstance(member, Node):
            return member.id, self.chains[member.name].next_seq - 1
        return member.id, member.verifier.next_seq - 1

    def _notify(self, owner: Agent, child: Agent, reason: str) -> None:
        """Tell an agent that supervises its own children that one of them exited (recorded in both chains)."""
        if owner.status in (Status.STOPPED, Status.FAILED, Status.STOPPING):
            return
        if not child.in_store:  # its worker ended before its first hello: it has no chain, and is forgotten
            return
        suffix = "; restarting" if reason.endswith("; restarting") else ""
        said = (child.last_exit or reason.removesuffix(suffix))[:MAX_CHILD_EXIT_REASON - len(suffix)] + suffix
        data = wire.encode_child_exit(child.id, child.verifier.head_hash, said)
        owner.mailbox.append(Pending(wire.Call(next(self.workers.call_ids), wire.CallKind.CHILD_EXIT, data)))
        self.workers.dispatch(owner)

    def commit_desired(self, agent: Agent, desired: Status) -> None:
        with contextlib.suppress(StoreError):
            self.store.commit([Commit(agent_id=agent.id, records=[], desired=str(desired))])

    # --- what `tree` shows ----------------------------------------------------------------------

    def entry(self, member: Member) -> dict[str, object]:
        if isinstance(member, Agent):
            out: dict[str, object] = {"kind": "agent", "restart": member.restart.type, **member.summary()}
            own = member.leaf.owns
            if own is not None:
                out["strategy"] = own.flags.strategy
                out["children"] = [self.entry(self.agents.by_name[c.name]) for c in own.children]
            return out
        sup = member.sup
        return {
            "kind": "supervisor",
            "id": member.uuid,
            "name": member.name,
            "strategy": sup.flags.strategy,
            "intensity": sup.flags.intensity,
            "period_ms": sup.flags.period_ms,
            "restart": member.restart.type,
            "restarts": sup.restart_count,
            "status": str(sup.status),
            "uptime_s": uptime_s(time.time(), member.started_at) if sup.status is Status.RUNNING else 0,
            "last_exit": sup.last_exit,
            "head": self.chains[member.name].next_seq - 1 if member.name in self.chains else -1,
            "head_ns": member.head_ns,
            "children": [self.entry(self.nodes[c.name] if isinstance(c, Sup) else self.agents.by_name[c.name])
                         for c in sup.children],
        }


def load_stored_tree(data: dict[str, object]) -> TreeConfig:
    config = config_from_dict(data)
    if not isinstance(config, TreeConfig):
        raise StoreError(f"the stored tree {data.get('name')!r} is not a supervisor's configuration")
    return config
