"""Supervision trees at work: starting, stopping and restarting members, and agents' own children.

The decisions (restart or not, which members, giving up) are pure functions in
``_tree.py``; this is their execution inside the supervisor's loop, one step at
a time, each step waiting for a stop or an init to be committed."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from theater import wire
from theater.chain import ChainVerifier
from theater.errors import ProtocolError

from ._agent import Agent, Member, Node, Pending
from ._config import AgentConfig, TreeConfig, config_to_dict, load_any, policy_dirs
from ._errors import ConfigError, NotFound, Refused, StoreError
from ._store import Commit
from ._tree import add_restart, is_abnormal, plan_restart, should_restart

CHILD_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


class TreeExecution:
    """Part of :class:`supervisor.Supervisor` (its state lives there): the execution of supervision."""

    def _build_node(self, config: TreeConfig, parent: Node | None, node_id: bytes | None = None) -> Node:
        """Node objects for a tree config; agents already in the store keep their chains."""
        node = Node(id=node_id or uuid.uuid5(uuid.NAMESPACE_OID, f"theater-tree:{config.name}").bytes, config=config, parent=parent)
        self.nodes[node.name] = node
        for child in config.children:
            if isinstance(child, TreeConfig):
                node.children.append(self._build_node(child, node))
                continue
            agent = self.by_name.get(child.name)
            if agent is None:
                agent = Agent(id=uuid.uuid4().bytes, config=child, verifier=ChainVerifier(self.public_key),
                              state=b"", initialized=False, incarnation=-1, in_store=False, status="stopped")
                self._register(agent)
            agent.parent = node
            agent.orphan_of = ""
            node.children.append(agent)
        return node

    def _roots(self) -> list[Member]:
        """Top-level agents and tree roots, in the order they were started."""
        return [*[a for a in self.agents.values() if a.parent is None and not a.orphan_of], *self.trees]

    def _agents_under(self, member: Member) -> list[Agent]:
        if isinstance(member, Agent):
            return [member]
        return [a for c in member.children for a in self._agents_under(c)]

    def _store_node(self, node: Node, *, desired: str) -> None:
        root = node
        while root.parent is not None:
            root = root.parent
        if node is root:
            with contextlib.suppress(StoreError):
                self.store.save_tree(root.id, root.name, config_to_dict(root.config), desired)

    def _on_host_request(self, agent: Agent, frames: list[bytes]) -> None:
        """A guest's supervision call, relayed by its worker: act only on this agent's own children."""
        try:
            request = wire.HostRequest.decode(frames, "host request")
        except ProtocolError as exc:
            self._violation(agent, f"malformed host request: {exc}", b"".join(frames)[:256])
            return
        if agent.in_flight is None or agent.children is None or "supervision" not in agent.config.capabilities:
            self._violation(agent, "host request outside a call, or without the supervision capability")
            return
        body = request.body
        op = body.get("op")
        try:
            if op == "spawn":
                answer = {"ok": True, "id": self._spawn_child(agent, body.get("template"), body.get("name"), body.get("args"))}
            elif op == "stop":
                self._stop_child(agent, body.get("child"))
                answer = {"ok": True}
            elif op == "children":
                answer = {"ok": True, "children": [c.uuid for c in agent.children.children]}
            else:
                answer = {"ok": False, "error": f"unknown supervision operation {op!r}"}
        except (Refused, NotFound, ConfigError) as exc:
            answer = {"ok": False, "error": str(exc)}
        self._send_worker(agent, wire.HostRequest(request.request_id, answer).encode(wire.SupervisorType.HOST_REPLY))

    def _spawn_child(self, parent: Agent, template_name: object, name: object, args: object) -> str:
        assert parent.children is not None
        if not isinstance(template_name, str) or not isinstance(name, str) or not isinstance(args, str):
            raise Refused("spawn needs a template name, a child name and args")
        template = parent.config.template(template_name)
        if template is None:
            raise Refused(f"no child template named {template_name[:64]!r} in {parent.name}'s manifest")
        if not CHILD_NAME_RE.fullmatch(name):
            raise Refused("a child name is 1-32 characters of a-z, 0-9, '-', '_', starting with a letter or digit")
        full = f"{parent.name}.{name}"
        earlier = self.by_name.get(full)
        if earlier is not None and (earlier.alive or earlier.status not in ("stopped", "failed")):
            raise Refused(f"{parent.name} already has a child named {name!r} ({earlier.status})")
        live = sum(1 for c in parent.children.children if isinstance(c, Agent) and c.status not in ("stopped", "failed"))
        if live >= parent.config.limits.max_children:
            raise Refused(f"{parent.name} already has {live} children (max_children {parent.config.limits.max_children})")
        try:
            data = args.encode("latin-1")
        except UnicodeEncodeError:
            raise Refused("args must be bytes (characters U+0000..U+00FF)") from None
        if len(data) > template.limits.max_message_bytes:
            raise Refused(f"args of {len(data)} bytes exceed the template's max_message_bytes")
        config = dataclasses.replace(template, name=full, init_args=data)
        if earlier is not None:
            child = self._spawn_again(parent, earlier, config)
        else:
            child = Agent(id=uuid.uuid4().bytes, config=config, verifier=ChainVerifier(self.public_key), state=b"",
                          initialized=False, incarnation=-1, in_store=False, parent=parent.children)
            self._register(child)
        parent.children.children.append(child)
        self._start_worker(child)
        return child.uuid

    def _spawn_again(self, parent: Agent, child: Agent, config: AgentConfig) -> Agent:
        """A child name used before (the child stopped, or ended with a previous supervisor process):
        the same agent and chain start again from the initial state, as OTP restarts a child by its id.
        Its configuration is in its genesis record, so the template must still give the same one."""
        assert parent.children is not None
        if dataclasses.replace(child.config, init_args=config.init_args) != config:
            raise Refused(f"{child.name} ran before with another configuration (its template or component "
                          "changed since); give the child another name")
        child.config = config
        child.state, child.initialized = b"", False
        child.parent, child.orphan_of, child.held = parent.children, "", False
        child.restarts = []
        child.last_exit = f"spawned again by {parent.name}"
        if child in parent.children.children:
            parent.children.children.remove(child)
        self._commit_desired(child, "running")
        return child

    def _stop_child(self, parent: Agent, ref: object) -> None:
        assert parent.children is not None
        child = next((c for c in parent.children.children if isinstance(c, Agent) and c.uuid == ref), None)
        if child is None:
            raise NotFound(f"{str(ref)[:64]!r} is not one of {parent.name}'s children")

        def stopped() -> None:
            self._commit_desired(child, "stopped")
            self._settle(child, "stopped")
            if child in own.children:
                own.children.remove(child)
            self._notify_owner(own, child, child.last_exit or "stopped")

        own = parent.children
        self._stop_member(child, "stopped", stopped, why=f"stopped by its supervisor {parent.name}")

    def _notify_owner(self, node: Node, child: Member, reason: str) -> None:
        """Tell an agent that supervises its own children that one of them exited (recorded in both chains)."""
        owner = node.owner
        if owner is None or not isinstance(child, Agent) or owner.status in ("stopped", "failed", "stopping"):
            return
        data = wire.encode_child_exit(child.id, child.verifier.head_hash, reason[:1024])
        owner.mailbox.append(Pending(wire.Call(next(self.call_ids), wire.CallKind.CHILD_EXIT, data)))
        self._dispatch(owner)

    def _child_exited(self, node: Node, child: Member, reason: str) -> None:
        """One of ``node``'s children ended on its own: restart per strategy, or give up."""
        if child not in node.children:  # no longer this supervisor's child (stopped, removed)
            if isinstance(child, Agent):
                self._settle(child, "stopped" if not is_abnormal(reason) else "failed")
            return
        if node.busy:
            node.deferred.append((child, reason))
            return
        if node.status in ("stopping", "stopped", "failed"):
            return
        said = child.last_exit or reason
        if not should_restart(child.restart.type, reason) or reason in ("load-failed", "hardening-failed"):
            if child.restart.type == "temporary" and child in node.children:
                node.children.remove(child)
            if isinstance(child, Agent):
                self._settle(child, "stopped" if not is_abnormal(reason) else "failed")
                self._commit_desired(child, child.status)
            self._notify_owner(node, child, said)
            return
        flags = node.config.flags
        node.restarts, ok = add_restart(node.restarts, time.monotonic(), flags.period_ms, flags.intensity)
        if not ok:
            self._notify_owner(node, child, said)
            self._give_up(node, f"more than {flags.intensity} restarts in {flags.period_ms} ms (last: {child.name}, {reason})")
            return
        self._notify_owner(node, child, f"{said}; restarting")
        names = [c.name for c in node.children]
        running = {c.name for c in node.children if c is not child and c.alive}
        temporary = {c.name for c in node.children if c.restart.type == "temporary"}
        plan = plan_restart(flags.strategy, names, child.name, running, temporary)
        by_name = {c.name: c for c in node.children}
        node.restart_count += 1
        node.status = "restarting"
        node.busy = True
        self.log(f"{node.name}: {child.name} exited ({reason}); {flags.strategy}: stopping {list(plan.stop)}, starting {list(plan.start)}")
        steps: list[tuple[str, Member]] = [("stop", by_name[n]) for n in plan.stop] + [("start", by_name[n]) for n in plan.start]

        def done() -> None:
            for name in plan.remove:
                if by_name[name] in node.children:
                    node.children.remove(by_name[name])
            node.busy = False
            node.status = "running"
            deferred, node.deferred = node.deferred, []
            for member, why in deferred:
                self._child_exited(node, member, why)

        self._run_steps(steps, done)

    def _give_up(self, node: Node, why: str) -> None:
        """Too many restarts: stop every child in reverse start order, then exit with reason shutdown."""
        self.log(f"{node.name}: giving up: {why}")
        node.last_exit = f"gave up: {why}"
        node.busy = True
        node.status = "stopping"

        def done() -> None:
            node.busy = False
            node.deferred.clear()
            node.status = "failed"
            self._store_node(node, desired="failed")
            if node.owner is not None:  # an agent's own supervisor gave up: the agent exits with it
                owner_worker = node.owner.worker
                if owner_worker is not None and not owner_worker.exited:
                    owner_worker.fault = node.last_exit
                    owner_worker.kill("shutdown")
                node.status = "running"  # a restarted owner starts with no children
                node.children.clear()
                node.restarts = []
            elif node.parent is not None:
                self._child_exited(node.parent, node, "shutdown")
            else:
                self.log(f"{node.name}: the root of its tree gave up; its agents are stopped and their chains kept")

        self._stop_members(list(reversed(node.children)), f"supervisor {node.name} gave up: {why}", done)

    def _run_steps(self, steps: list[tuple[str, Member]], done: Callable[[], None], *, counted: bool = True) -> None:
        """Run stop/start steps one at a time, each waiting for the previous to finish."""
        if not steps:
            done()
            return
        action, member = steps[0]

        def next_step() -> None:
            self._run_steps(steps[1:], done, counted=counted)

        if action == "stop":
            self._stop_member(member, "shutdown", next_step)
        else:
            self._start_member(member, next_step, counted=counted)

    def _stop_members(self, members: list[Member], why: str, done: Callable[[], None]) -> None:
        if not members:
            done()
            return
        self._stop_member(members[0], "shutdown", lambda: self._stop_members(members[1:], why, done), why=why)

    def _stop_member(self, member: Member, reason: str, done: Callable[[], None], *, why: str = "") -> None:
        if isinstance(member, Node):
            member.status = "stopping"

            def stopped() -> None:
                member.status = "stopped"
                done()

            self._stop_members(list(reversed(member.children)), why or f"supervisor {member.name} stopping", stopped)
            return
        self._stop_agent(member, reason, done, why=why)

    def _stop_agent(self, agent: Agent, reason: str, done: Callable[[], None], *, why: str = "") -> None:
        """Stop an agent: its own children first, in reverse start order, then its worker."""

        def stop_worker() -> None:
            if not agent.alive:
                agent.status = "stopped" if agent.status != "failed" else agent.status
                done()
                return
            agent.on_stopped.append(done)
            agent.stop_why = why
            self._stop_worker(agent, reason)

        if agent.children is None or not agent.children.alive:
            stop_worker()
            return
        self._stop_own_children(agent, f"its supervisor {agent.name} is stopping", stop_worker)

    def _stop_own_children(self, agent: Agent, why: str, then: Callable[[], None]) -> None:
        """Stop an agent's own children in reverse start order; they leave it for good (dynamic children)."""
        own = agent.children
        assert own is not None
        own.busy = True

        def stopped() -> None:
            own.busy = False
            own.deferred.clear()
            own.children.clear()
            own.restarts = []
            then()

        self._stop_members(list(reversed(own.children)), why, stopped)

    def _start_member(self, member: Member, done: Callable[[], None], *, counted: bool = True) -> None:
        """Start a member; ``counted``: a supervisor's restart (not a resume or an operator's start)."""
        if isinstance(member, Node):
            member.status = "starting"
            member.restarts = []

            def started() -> None:
                member.status = "running"
                member.started_at = time.time()
                done()

            self._run_steps([("start", c) for c in member.children], started, counted=counted)
            return
        if member.alive or member.held:
            done()
            return
        member.on_ready.append(done)
        if member.in_store and counted:
            self._restart_agent(member)
        else:
            self._start_worker(member)

    def _commit_desired(self, agent: Agent, desired: str) -> None:
        with contextlib.suppress(StoreError):
            self.store.commit([Commit(agent_id=agent.id, records=[], desired=desired)])

    def _fail_spawn(self, agent: Agent, why: str) -> None:
        self.agents.pop(agent.id, None)
        self.by_name.pop(agent.name, None)
        for ident, rid in agent.spawn_waiters:
            self._reply_error(ident, rid, "spawn-failed", f"agent {agent.name} failed to start: {why}")

    def _stop_worker(self, agent: Agent, reason: str) -> None:
        """Ask the worker to stop; kill it after the child's shutdown timeout (at once for brutal_kill)."""
        worker = agent.worker
        if worker is None or worker.exited:
            return
        agent.status = "stopping"
        worker.kill_reason = worker.kill_reason or reason
        timeout_ms = agent.restart.shutdown_ms
        if worker.identity is None or timeout_ms is None or timeout_ms == 0:
            worker.kill(reason)
            return
        self._send_worker(agent, [wire.header(wire.SupervisorType.STOP)])

        def too_slow() -> None:
            if not worker.exited:
                worker.fault = f"did not stop within its shutdown timeout of {timeout_ms} ms; killed"
                worker.kill(reason)

        self.timers.after(timeout_ms / 1000, too_slow)

    def spawn_local(self, manifest: Path) -> Member:
        """Load a manifest and start its agent or tree; an agent is stored once its worker says hello."""
        if not self.running:
            raise Refused("the supervisor is shutting down")
        config = load_any(manifest, policy_dirs(self.home.root))
        names = [c.name for c in config.walk()] if isinstance(config, TreeConfig) else [config.name]
        for name in names:
            existing = self.by_name.get(name) or self.nodes.get(name)
            if existing is not None:
                raise Refused(f"a member named {name!r} already exists ({existing.uuid}, {existing.status})")
        if isinstance(config, TreeConfig):
            root = self._build_node(config, None, uuid.uuid4().bytes)
            self.trees.append(root)
            self._store_node(root, desired="running")
            self._start_member(root, lambda: self._tree_started(root))
            return root
        agent = Agent(
            id=uuid.uuid4().bytes, config=config, verifier=ChainVerifier(self.public_key),
            state=b"", initialized=False, incarnation=-1, in_store=False,
        )
        self._register(agent)
        self._start_worker(agent)
        return agent

    def _tree_started(self, root: Node) -> None:
        for ident, rid in root.spawn_waiters:
            self._reply(ident, rid, root.tree())
        root.spawn_waiters.clear()

    def restart_member(self, member: Member, done: Callable[[], None] = lambda: None) -> None:
        """Stop a member (agent or subtree) if it runs, then start it again from its committed state.

        An operator's restart: it does not count against any restart intensity.
        """

        def stopped() -> None:
            for agent in self._agents_under(member):
                agent.held = False
                agent.restarts = []  # an operator's restart starts a fresh intensity window
                agent.last_exit = agent.last_exit or "restarted by the operator"
                self._commit_desired(agent, "running")
            if isinstance(member, Node):
                self._store_node(member, desired="running")
            self._start_member(member, done, counted=False)

        self._stop_member(member, "shutdown", stopped, why="restarted by the operator")
