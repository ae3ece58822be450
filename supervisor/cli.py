"""The ``theater`` command. Data goes to stdout (``--json`` for machines), messages to stderr."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from theater.client import Client, ClientError, NoAnswer, NotRunning, supervisor_gone
from theater.errors import TheaterError
from theater.home import Home, default_home, write_private
from theater.records import Record
from theater.remote import Credentials, keypair
from theater.render import describe, one_line

from ._errors import StoreError, SupervisorError
from ._tenants import QUOTAS

if TYPE_CHECKING:
    from theater.checkpoint import Checkpoint

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
UP_TIMEOUT_S = 30.0


def _out(args: argparse.Namespace, data: Any, text: str | Callable[[], str]) -> None:
    if args.json:
        print(json.dumps(data, indent=None, sort_keys=True))
    else:
        print(text() if callable(text) else text)


def _err(message: str) -> None:
    print(f"theater: {message}", file=sys.stderr)


def _data_arg(value: str) -> bytes:
    """DATA on the command line: text, or @FILE for a file's bytes, or - for stdin."""
    if value == "-":
        return sys.stdin.buffer.read()
    if value.startswith("@@"):  # a message that starts with @
        return os.fsencode(value[1:])
    if value.startswith("@"):
        try:
            return Path(value[1:]).read_bytes()
        except OSError as exc:
            raise TheaterError(f"cannot read the message from {value[1:]}: {exc.strerror} "
                               "(@FILE sends a file's bytes; write @@ for a message that starts with @)") from None
    return os.fsencode(value)  # the argument's bytes as given, even if not UTF-8


def _output_problem(path: Path) -> str | None:
    """Why ``-o PATH`` cannot take the file, checked before any work is done; None if it can."""
    if path.is_dir():
        return f"{path}: is a directory; give the name of the file to write"
    if not path.parent.is_dir():
        return f"{path}: no directory {path.parent} to write it in"
    return None


def _write_whole(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: a temporary beside it, renamed over it. An error names ``path``
    and leaves no temporary (a full disk must not keep a partial copy)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def _show_bytes(data: bytes | None) -> str:
    if data is None:
        return "(no reply)"
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.hex()


# --- commands ------------------------------------------------------------------


def _client(args: argparse.Namespace, home: Home, *, timeout: float = 30.0) -> Client:
    """The operator's client on the home's socket, or with --remote a tenant's over TCP (docs/tenancy.md)."""
    remote = getattr(args, "remote", None) or getattr(args, "top_remote", None)
    if remote is not None:
        return Client(credentials=Credentials.load(remote), timeout=timeout)
    return Client(home, timeout=timeout)


def _last_error(log: Path, began: int) -> str:
    """What a supervisor started in the background said last before it ended (its ``theater: …`` line in
    the log, from ``began`` on), as ``": …"``; empty if it said nothing (a full disk may take even that)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(began, f.seek(0, os.SEEK_END) - 65536))
            tail = f.read(65536).decode("utf-8", "replace")
    except OSError:
        return ""
    said = [line.removeprefix("theater: ") for line in tail.splitlines() if line.startswith("theater: ")]
    return f": {said[-1][:1000]}" if said else ""


def _full(root: Path, *, wrote: bool) -> str:
    """Why a supervisor may have said nothing: the filesystem of its home is full (under 1 MiB free).
    ``wrote``: whether its log kept anything of this run."""
    try:
        st = os.statvfs(root)
    except OSError:
        return ""
    free = st.f_bavail * st.f_frsize
    if free >= 1024 * 1024:
        return ""
    kept = "" if wrote else ", so nothing it wrote was kept"
    return f": the filesystem holding {root} is full ({free:,} bytes free){kept}"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def cmd_up(args: argparse.Namespace, home: Home) -> int:
    if args.detach:
        with contextlib.suppress(NotRunning, ClientError, OSError):  # one runs here already: nothing to start
            with Client(home, timeout=1.0) as c:
                info = c.ping()
            asked = [f"--{o.replace('_', '-')}" for o in ("listen", "metrics", "witness") if getattr(args, o)]
            asked += ["--log-level"] if args.log_level != "info" else []
            if asked:  # its options are the ones it was started with
                return _fail(args, "refused", f"a supervisor is already running at {home.root} (pid {info['pid']}), "
                                              f"with the options it was started with: {', '.join(asked)} would "
                                              "change nothing", "`theater down` first, then `theater up` with them")
            _out(args, info, f"supervisor up (pid {info['pid']}) at {home.root}")
            return EXIT_OK
        home.logs.mkdir(parents=True, exist_ok=True, mode=0o700)
        log_path = home.logs / "supervisor.log"
        with open(log_path, "ab") as log:
            began = log.tell()
            extra = ["--witness", str(args.witness.resolve())] if args.witness else []
            extra += ["--listen", args.listen] if args.listen else []
            extra += ["--metrics", args.metrics] if args.metrics else []
            proc = subprocess.Popen(
                [sys.executable, "-m", "supervisor", "--home", str(home.root), "up", "--log-level", args.log_level,
                 *extra],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )
        deadline = time.monotonic() + UP_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                why = _last_error(log_path, began) or _full(home.root, wrote=_size(log_path) > began)
                _err(f"the supervisor exited with status {proc.returncode}{why}; see {log_path}")
                return EXIT_FAIL
            try:
                with Client(home, timeout=1.0) as c:
                    info = c.ping()
                _out(args, info, f"supervisor up (pid {info['pid']}) at {home.root}")
                return EXIT_OK
            except (NotRunning, ClientError):  # not bound yet, or a stale token from a crashed run
                time.sleep(0.05)
        _err("the supervisor did not answer within 30 s")
        return EXIT_FAIL
    from ._server import Supervisor, configure_logging

    configure_logging(args.log_level)
    sup = Supervisor(home, witness=args.witness.resolve() if args.witness else None, listen=args.listen,
                     metrics=_host_port(args.metrics) if args.metrics else None)
    sup.serve_forever()
    return EXIT_OK


def cmd_down(args: argparse.Namespace, home: Home) -> int:
    with _client(args, home) as c:
        result = c.down()
    _out(args, result, f"supervisor down ({result.get('stopped', 0)} agents stopped)")
    return EXIT_OK


def cmd_spawn(args: argparse.Namespace, home: Home) -> int:
    remote = getattr(args, "remote", None) or args.top_remote
    progress = None if args.json or remote else Progress(home, args.manifest)
    ok = False
    try:
        with _client(args, home, timeout=args.timeout) as c:
            info = c.spawn(args.manifest, replace=args.replace, tenant=args.tenant)
        ok = True
    finally:
        if progress is not None:
            progress.end(ok)
    _out(args, info, info["id"])
    return EXIT_OK


class Progress:
    """What a spawn is doing while it takes long (a first spawn compiles the component): on a terminal one
    line kept up to date, otherwise a line every few seconds, on stderr. It shows only once the spawn has
    taken PROGRESS_AFTER_S (the environment's THEATER_PROGRESS_AFTER_S, if set)."""

    def __init__(self, home: Home, manifest: Path) -> None:
        import threading

        self.home, self.name = home, _manifest_name(manifest)
        self.tty = sys.stderr.isatty()
        self.after = float(os.environ.get("THEATER_PROGRESS_AFTER_S", PROGRESS_AFTER_S))
        self.started = time.monotonic()
        self.shown = False
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        if self.done.wait(self.after):
            return
        with contextlib.suppress(NotRunning, TheaterError), Client(self.home, timeout=5) as c:
            while True:
                self._say(f"spawn {self.name}: {self._phase(c)} ({time.monotonic() - self.started:.1f} s)")
                if self.done.wait(0.25 if self.tty else 5.0):
                    return

    def _phase(self, c: Client) -> str:
        entry = next((a for a in c.ps() if a["name"] == self.name), None)
        if entry is None:
            tree = _find(c.tree(), self.name)
            if tree is not None and tree["kind"] == "supervisor":  # a tree starts its agents one after another
                agents = list(_agents_under(tree))
                running = sum(1 for a in agents if a["status"] == "running" and a["head"] >= 0)
                return f"starting the tree: {running} of {len(agents)} agents running"
            return "loading the manifest and starting"
        if entry["pid"] is None:
            return f"{entry['status']}, waiting for a worker"
        if entry["head"] < 0:
            return f"worker {entry['pid']} is loading the component (a first spawn compiles it)"
        return f"worker {entry['pid']} is running init"

    def _say(self, line: str) -> None:
        self.shown = True
        print(f"\r\033[K{line}" if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def end(self, ok: bool) -> None:
        self.done.set()
        self.thread.join(timeout=6)
        if self.shown:
            self._say(f"spawn {self.name}: {'done' if ok else 'failed'} after {time.monotonic() - self.started:.1f} s")
            if self.tty:
                print(file=sys.stderr)


PROGRESS_AFTER_S = 1.0


def _find(members: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    for member in members:
        if member["name"] == name:
            return member
        found = _find(member.get("children") or [], name)
        if found is not None:
            return found
    return None


def _agents_under(member: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for child in member.get("children") or []:
        if child["kind"] == "agent":
            yield child
        yield from _agents_under(child)


def _manifest_name(manifest: Path) -> str:
    """The agent's name, for the progress lines; read as the supervisor reads a manifest (a regular file of at
    most 1 MiB, opened without blocking: a FIFO or a device is the supervisor's to refuse, not ours to hang on)."""
    import tomllib

    from ._config import MAX_MANIFEST_BYTES, open_regular

    try:
        with os.fdopen(open_regular(manifest, MAX_MANIFEST_BYTES), "rb") as f:
            return str(tomllib.loads(f.read(MAX_MANIFEST_BYTES).decode())["name"])
    except (OSError, ValueError, KeyError, RecursionError, SupervisorError):  # the supervisor says what is wrong
        return manifest.stem


def cmd_send(args: argparse.Namespace, home: Home) -> int:
    with _client(args, home) as c:
        result = c.send(args.agent, _data_arg(args.data))
    _out(args, result, f"queued ({result['queued']} in mailbox)")
    return EXIT_OK


def cmd_call(args: argparse.Namespace, home: Home) -> int:
    with _client(args, home) as c:
        reply = c.call(args.agent, _data_arg(args.data), timeout=args.timeout)
    data = {"reply": None if reply is None else reply.decode("latin-1"), "reply_hex": None if reply is None else reply.hex()}
    _out(args, data, _show_bytes(reply))
    return EXIT_OK


def cmd_ps(args: argparse.Namespace, home: Home) -> int:
    with _client(args, home) as c:
        report = c.request("ps")[0]
    agents = report["agents"]
    if report.get("store_problem"):
        _err(f"warning: the event store cannot be written ({report['store_problem']}): spawns and messages are "
             "refused, and restarts wait, until it can")

    def table() -> str:
        if not agents:
            return "no agents"
        lines = [f"{'NAME':<16} {'ID':<36} {'STATUS':<10} {'PID':>7} {'RESTARTS':>8} {'HEAD':>6} {'MAILBOX':>7}"]
        for a in agents:
            lines.append(f"{a['name']:<16} {a['id']:<36} {a['status']:<10} {a['pid'] or '-':>7} {a['restarts']:>8} {a['head']:>6} {a['mailbox']:>7}")
        return "\n".join(lines)

    _out(args, agents, table)
    return EXIT_OK


def cmd_stop(args: argparse.Namespace, home: Home) -> int:
    with _client(args, home) as c:
        info = c.stop(args.agent)
    _out(args, info, f"{info['name']} {info['status']}")
    return EXIT_OK


def cmd_tree(args: argparse.Namespace, home: Home) -> int:
    with _client(args, home) as c:
        roots = c.tree()

    def lines(member: dict[str, Any], depth: int) -> list[str]:
        pad = "  " * depth
        if member["kind"] == "supervisor":
            head = (f"{pad}{member['name']} [{member['strategy']}, {member['intensity']}/{member['period_ms']}ms] "
                    f"{member['status']} restarts={member['restarts']} up={member['uptime_s']}s")
            if member["last_exit"]:
                head += f"  ({member['last_exit']})"
            return [head] + [line for child in member["children"] for line in lines(child, depth + 1)]
        text = (f"{pad}{member['name']} ({member['restart']}) {member['status']} pid={member['pid'] or '-'} "
                f"restarts={member['restarts']} up={member['uptime_s']}s  {member['id']}")
        return [text + (f"  ({member['last_exit']})" if member["last_exit"] and member["status"] != "running" else "")]

    _out(args, roots, lambda: "\n".join(line for r in roots for line in lines(r, 0)) or "no agents")
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace, home: Home) -> int:
    """Which hardening layers work here, and what a worker under each policy would get."""
    from ._doctor import diagnose, render

    report = diagnose(home.root)
    _out(args, report, lambda: render(report))
    return EXIT_OK if not report["probe_error"] else EXIT_FAIL


def cmd_restart(args: argparse.Namespace, home: Home) -> int:
    with _client(args, home, timeout=120) as c:
        info = c.restart(args.agent)
    _out(args, info, f"{info['name']} {info['status']}")
    if not getattr(args, "remote", None) and not args.top_remote:
        note = _component_changed(home, str(info["name"]))
        if note:
            print(f"  note: {note}", file=sys.stderr)
    return EXIT_OK


def _component_changed(home: Home, name: str) -> str:
    """Whether the agent's component file holds other bytes than the component it was spawned with, which it
    still runs (its genesis names it): a rebuilt agent restarted runs the old build."""
    from ._config import component_digest
    from ._store import open_readonly

    try:
        db = open_readonly(home.store)
        try:
            row = db.execute("SELECT config FROM agents WHERE name=?", (name,)).fetchone()
        finally:
            db.close()
        if row is None:
            return ""
        config = json.loads(row[0])
        path, spawned = Path(config["component_path"]), config["component_sha256"]
        if component_digest(path) == spawned:
            return ""
    except (OSError, ValueError, KeyError, TypeError, sqlite3.Error, SupervisorError):
        return ""
    return (f"{path} has changed since {name} was spawned; it runs the build it was spawned with (SHA-256 "
            f"{spawned[:16]}…) from that build's compiled artifact, and fails to load once the cache no longer holds "
            f"it. To run the new one: `theater stop {name}`, then `theater spawn MANIFEST --replace` (a new agent, "
            f"from its initial state)")


def cmd_events(args: argparse.Namespace, home: Home) -> int:
    """A chain's records: through the supervisor when one runs (and always with --follow), otherwise read
    from the store itself. With --trace, the records of every chain that name one message."""
    from ._audit import chain_records

    if args.trace is not None:
        from ._audit import trace

        for name, record in trace(home, args.trace):
            _out(args, {"agent": name, **describe(record)}, f"{name:<16} {one_line(record)}")
        return EXIT_OK

    try:
        client: Client | None = _client(args, home)
    except NotRunning:
        if args.follow:
            raise
        client = None
    last = -1
    try:
        while True:
            if client is None:
                batch = chain_records(home, args.agent, last)
            else:
                try:
                    batch = client.events(args.agent, last)
                except NotRunning:
                    if args.follow:
                        raise
                    client.close()
                    client = None
                    continue
            for record in batch:
                _out(args, describe(record), functools.partial(one_line, record))
                last = record.seq
            sys.stdout.flush()
            if not args.follow or client is None:
                return EXIT_OK
            client.wait_events(args.agent, last, 30_000)
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        if client is not None:
            client.close()


def _read_public_key(path: Path) -> bytes | None:
    """A key file as ``--pubkey`` takes it: exactly 32 raw bytes (as ``supervisor.pub``, which may start or end
    with any byte), or 64 hex digits with white space around them; None if it is neither."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) == 32:
        return data
    try:
        raw = bytes.fromhex(data.strip().decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    return raw if len(raw) == 32 else None


def _checkpoint_file(path: Path) -> Checkpoint:
    """A checkpoint file (``--checkpoint``), parsed and checked; an error naming the file if it is not one."""
    from theater.checkpoint import Checkpoint
    from theater.errors import RecordError

    try:
        return Checkpoint.parse(path.read_bytes())
    except RecordError as exc:
        raise TheaterError(f"{path}: {exc}") from None


def cmd_verify(args: argparse.Namespace, home: Home) -> int:
    from theater.checkpoint import fingerprint

    from ._audit import verify_home

    pinned = None
    if args.pubkey is not None:
        pinned = _read_public_key(args.pubkey)
        if pinned is None:
            _err(f"{args.pubkey}: not a readable public key: 32 raw bytes, or 64 hex digits")
            return EXIT_USAGE
    if args.fingerprint is not None:
        from ._audit import known_keys

        held = [pinned] if pinned is not None else known_keys(home, args.bundle)
        match = [k for k in held if fingerprint(k) == args.fingerprint.strip().lower()]
        if not match:
            _err(f"the supervisor key{'s' if len(held) > 1 else ''} {', '.join(map(fingerprint, held))} "
                 f"{'are' if len(held) > 1 else 'is'} not the one whose fingerprint you hold")
            return EXIT_FAIL
        pinned = match[0]
    point = _checkpoint_file(args.checkpoint) if args.checkpoint is not None else None
    if args.bundle is not None:
        from ._audit import verify_bundle

        try:
            reports = verify_bundle(args.bundle.read_bytes(), pinned)
        except StoreError as exc:
            return _fail(args, exc.code, f"{args.bundle}: {exc}", "")
    else:
        reports = verify_home(home, args.agent, pinned=pinned, checkpoint=point)

    def text() -> str:
        if not reports:
            return "no agents to verify"
        return "\n".join(
            f"{'ok    ' if r.ok else 'BROKEN'} {r.name:<16} {r.records:>7} records" + (f"  {r.problem}" if r.problem else "")
            for r in reports
        )

    _out(args, [r.as_dict() for r in reports], text)
    return EXIT_OK if all(r.ok for r in reports) else EXIT_FAIL


def cmd_run(args: argparse.Namespace, home: Home) -> int:
    """Supervisor in the foreground, spawn the manifest, print its events until Ctrl-C."""
    from ._config import load_any, policy_dirs
    from ._server import Supervisor

    config = load_any(Path(args.manifest), policy_dirs(home.root))  # fail early, before starting

    def show(agent: Any, record: Record) -> None:
        if args.json:
            print(json.dumps({"agent": agent.name, **describe(record)}, sort_keys=True), flush=True)
        else:
            print(f"{agent.name:<12} {one_line(record)}", flush=True)

    sup = Supervisor(home, on_record=show, log=lambda line: print(line, file=sys.stderr, flush=True))
    existing = sup.by_name.get(config.name) or sup.supervision.nodes.get(config.name)
    if existing is None:
        sup.supervision.spawn(Path(args.manifest).resolve(), None)
    elif existing.status in ("stopped", "failed"):  # already in this home: start it again rather than spawn twice
        sup.supervision.restart(existing, None)
    _err(f"running {config.name}; talk to it with `theater --home {home.root} call NAME DATA`; Ctrl-C stops")
    sup.serve_forever()
    return EXIT_OK


def _record_number(text: str) -> int:
    """``replay --from SEQ``: a record number from 1 (record 0 is the genesis, where a replay starts anyway)."""
    try:
        seq = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a record number") from None
    if seq < 1:
        raise argparse.ArgumentTypeError(f"{seq}: a record number from 1 (record 0 is the genesis, where a replay "
                                         "without --from starts)")
    return seq


def cmd_replay(args: argparse.Namespace, home: Home) -> int:
    """Run an agent's component again on its chain's recorded inputs, in a confined process; compare."""
    import tempfile

    from theater.replay import encode_input

    from ._audit import replay_start, verify_home
    from ._config import MAX_COMPONENT_BYTES, open_regular

    broken = [r for r in verify_home(home, args.agent) if not r.ok]
    if broken:
        _err(f"{args.agent}: the chain does not verify, so it cannot be replayed: {broken[0].problem}")
        return EXIT_FAIL
    records, start, state = replay_start(home, args.agent, args.from_seq)
    genesis = records[0].fields() if records and records[0].kind.name == "GENESIS" else None
    if genesis is None:
        _err(f"{args.agent}: not an agent's chain (a supervisor node's chain has no component to replay)")
        return EXIT_FAIL
    if args.from_seq is not None and args.from_seq > records[-1].seq:
        _err(f"{args.agent}: --from {args.from_seq} is past the chain's end: its last record is {records[-1].seq}")
        return EXIT_FAIL
    config = json.loads(genesis["config"])
    path = args.component or Path(config["component_path"])
    with os.fdopen(open_regular(path, MAX_COMPONENT_BYTES), "rb") as f:
        component = f.read()
    config["component_sha256"] = genesis["component_sha256"].hex()
    if state is not None:
        config["replay_start"] = {"seq": start, "state": state.hex()}
    if args.component is not None:  # a rebuilt component, on purpose: where does it first behave otherwise?
        import hashlib

        config["component_sha256"] = hashlib.sha256(component).hexdigest()
    with tempfile.TemporaryDirectory(prefix="theater-replay-") as cwd:  # private and empty, as a worker's
        proc = subprocess.run([sys.executable, "-m", "worker.replay"], input=encode_input(
            component, config, [r.raw for r in records]), capture_output=True, cwd=cwd, timeout=args.timeout,
            check=False)
    try:
        report = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        _err(f"{args.agent}: the replay process ended with status {proc.returncode} and no report: "
             f"{proc.stderr.decode(errors='replace')[-2000:]}")
        return EXIT_FAIL
    if "error" in report:
        _err(f"{args.agent}: cannot replay: {report['error']}")
        return EXIT_FAIL

    report["from"] = start + 1 if state is not None else 0
    from theater.artifacts import engine_report

    ours = engine_report()
    recorded = {f"wasmtime {json.loads(r.fields()['confinement']).get('engine.wasmtime', '(not stated)')}"
                for r in records if r.kind.name in ("GENESIS", "WORKER_KEY")}
    others = sorted(e for e in recorded if e != f"wasmtime {ours['engine.wasmtime']}")
    if others:  # fuel counts may differ between engine versions: say so beside the verdict
        report["engine_note"] = f"recorded under {', '.join(others)}; replayed under wasmtime {ours['engine.wasmtime']}"
    origin = f" (from record {start + 1}, the state snapshot at record {start})" if state is not None else ""

    def text() -> str:
        note = f"\n  note: {report['engine_note']}" if "engine_note" in report else ""
        if report["ok"]:
            return (f"ok     {args.agent}: {report['calls']} calls replayed from {report['records']} records{origin}, "
                    f"all as recorded{note}")
        return f"DIVERGES {args.agent} at record {report['diverged_at']}: {report['divergence']}{note}"

    _out(args, report, text)
    return EXIT_OK if report["ok"] else EXIT_FAIL


def cmd_gc(args: argparse.Namespace, home: Home) -> int:
    """Snapshot every agent's state, and compact the chains past their policy's [retention] limits."""
    with _client(args, home) as c:
        info = c.request("gc", agents=args.agents)[0]

    def line(e: dict[str, Any]) -> str:
        limits = ", ".join(f"{k} {v}" for k, v in e["limits"].items() if v) or "no limits"
        done = f"dropped {e['dropped']} records" if e["dropped"] else e.get("note", "within its limits")
        return f"  {e['agent']:<20} {e['records']:>8} records {e['bytes']:>12} bytes  ({limits}): {done}"

    _out(args, info, lambda: "\n".join(["snapshots taken; chains compacted past [retention]:",
                                         *map(line, info["agents"])]) if info["agents"] else "no agents")
    return EXIT_OK


def cmd_new(args: argparse.Namespace, home: Home) -> int:
    from ._authoring import name_problem, new_project

    problem = name_problem(args.name)
    if problem is not None:  # a value of the wrong form: a usage error, as the parser's own
        return _fail(args, "usage", f"new: {problem}", "")
    project = new_project(args.name, args.lang, args.dir.resolve())
    _out(args, {"project": str(project), "lang": args.lang},
         lambda: f"created {project}\n" + (project / "README.md").read_text().split("\n\n", 1)[1].strip())
    return EXIT_OK


def cmd_build(args: argparse.Namespace, home: Home) -> int:
    from ._authoring import build

    component = build(args.project, lambda line: print(line, file=sys.stderr, flush=True))
    _out(args, {"component": str(component) if component else None}, str(component) if component else "")
    return EXIT_OK


def cmd_logs(args: argparse.Namespace, home: Home) -> int:
    """The log file `up --detach` writes; with --follow, new lines as they come (Ctrl-C ends)."""
    path = home.logs / "supervisor.log"
    if not path.exists():
        return _fail(args, "not-found", f"no supervisor log at {path}",
                     "the supervisor writes it when started with `theater up --detach`; in the foreground it logs "
                     "to the terminal")
    with open(path, "rb") as f:
        while True:
            chunk = f.read(65536)
            if chunk:
                sys.stdout.buffer.write(chunk)
                continue
            sys.stdout.flush()
            if not args.follow:
                return EXIT_OK
            time.sleep(0.2)  # a terminal's follow: nothing waits on it


def cmd_rm(args: argparse.Namespace, home: Home) -> int:
    with _client(args, home) as c:
        info = c.remove(args.agent)
    _out(args, info, f"removed {info['removed']} ({info['id']}); its chain ends at record {info['head']}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace, home: Home) -> int:
    from ._audit import export_bundle

    problem = _output_problem(args.output)
    if problem is not None:
        return _fail(args, "os", problem, "")
    point = _checkpoint_file(args.checkpoint) if args.checkpoint is not None else None
    data = export_bundle(home, args.agents, point)
    _write_whole(args.output, data)
    _out(args, {"bundle": str(args.output), "chains": len(args.agents), "bytes": len(data)},
         f"wrote {args.output}: {len(args.agents)} chains, {len(data)} bytes")
    return EXIT_OK


def cmd_key(args: argparse.Namespace, home: Home) -> int:
    """The supervisor's public key and its fingerprint: what an auditor pins (verify --fingerprint)."""
    from theater.checkpoint import fingerprint

    from ._audit import known_keys

    if args.action == "rotate":
        with _client(args, home) as c:
            info = c.request("rotate-key")[0]
        _out(args, info, lambda: f"rotated: {info['old']} -> {info['new']}\n"
                                 f"the statement both keys signed ({info['chains']} chain heads):\n"
                                 + "\n".join(f"  {f}" for f in info["files"]))
        return EXIT_OK
    *earlier, public = known_keys(home)
    unsettled = home.public_key.read_bytes() != public  # a rotation committed; the next start writes the key
    note = "\n(supervisor.pub still holds the key before it: the supervisor stopped during the rotation, and its " \
           "next start settles it)" if unsettled else ""
    _out(args, {"public_key": public.hex(), "fingerprint": fingerprint(public), "settled": not unsettled,
                "previous": [{"public_key": k.hex(), "fingerprint": fingerprint(k)} for k in earlier]},
         lambda: f"public key   {public.hex()}\nfingerprint  {fingerprint(public)}"
                 + "".join(f"\nretired      {fingerprint(k)}" for k in reversed(earlier)) + note)
    return EXIT_OK


def cmd_checkpoint(args: argparse.Namespace, home: Home) -> int:
    problem = _output_problem(args.output) if args.output is not None else None
    if problem is not None:  # before the supervisor signs and keeps a checkpoint the command then fails to copy
        return _fail(args, "os", problem, "")
    with _client(args, home) as c:
        info = c.request("checkpoint")[0]
    if args.output is not None:
        _write_whole(args.output, Path(info["files"][0]).read_bytes())
        info["files"].append(str(args.output))
    _out(args, info, lambda: f"checkpoint of {info['chains']} chains, root {info['root']}\n"
                             + "\n".join(f"  {f}" for f in info["files"]))
    return EXIT_OK


def cmd_secret(args: argparse.Namespace, home: Home) -> int:
    """Secrets live in the home, never pass the control socket, and are read by the supervisor per request."""
    from ._caps.grants import SECRET_NAME_RE
    from ._caps.http import SECRET_BYTES, header_value_problem

    home.secrets.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(home.secrets, 0o700)
    if args.action == "list":
        names = sorted(p.name for p in home.secrets.iterdir() if SECRET_NAME_RE.fullmatch(p.name))
        _out(args, {"secrets": names}, lambda: "\n".join(names) if names else "(no secrets)")
        return EXIT_OK
    name = args.name or ""
    if not SECRET_NAME_RE.fullmatch(name):
        _err(f"secret name {name!r} must be 1-63 of a-z, 0-9, '-', '_'")
        return EXIT_USAGE
    path = home.secrets / name
    if args.action == "rm":
        try:
            path.unlink()
        except FileNotFoundError:
            _err(f"no secret named {name!r}")
            return EXIT_FAIL
        _out(args, {"removed": name}, f"removed secret {name}")
        return EXIT_OK
    if sys.stdin.isatty():
        import getpass

        value = getpass.getpass(f"value of secret {name}: ").encode()
    else:
        value = sys.stdin.buffer.read(SECRET_BYTES + 1).rstrip(b"\r\n")
    if len(value) > SECRET_BYTES:
        _err(f"a secret is at most {SECRET_BYTES} bytes")
        return EXIT_FAIL
    if not value or any(c in value for c in b"\r\n\0"):
        _err("a secret is one line of text: not empty, no line break or NUL inside")
        return EXIT_FAIL
    problem = header_value_problem(value)
    if problem is not None:  # it goes into a header: one the HTTP library refused would echo it in its error
        _err(f"a secret goes into an HTTP header, and this value cannot: {problem}")
        return EXIT_FAIL
    write_private(path, value)
    _out(args, {"set": name}, f"secret {name} set ({len(value)} bytes)")
    return EXIT_OK


def cmd_tenant(args: argparse.Namespace, home: Home) -> int:
    with _client(args, home) as c:
        if args.action == "list":
            report = c.tenants()
            tenants = report["tenants"]

            def table() -> str:
                lines = [f"{'TENANT':<16} {'AGENTS':>6} {'RUNNING':>7} {'DENIALS':>7}  POLICIES / ROUTES / QUOTAS"]
                for t in tenants:
                    quotas = " ".join(f"{k}={v}" for k, v in t["quotas"].items()) or "no quotas"
                    routes = ",".join(t.get("routes") or ()) or "no routes"
                    lines.append(f"{t['name']:<16} {t['agents']:>6} {t['running']:>7} {t['denials']:>7}  "
                                 f"{','.join(t['policies'])} / {routes} / {quotas}")
                lines.append(f"connections refused at the handshake: {report['refused_connections']}")
                return "\n".join(lines)

            _out(args, report, table)
            return EXIT_OK
        if not args.name:
            return _fail(args, "usage", f"theater tenant {args.action} needs the tenant's name", "")
        if args.action == "rm":
            info = c.tenant_remove(args.name)
            _out(args, info, f"tenant {info['removed']} removed ({info['stopped']} agents stopped; their chains stay)")
            return EXIT_OK
        quotas = {}
        for item in args.quota:
            name, _, value = item.partition("=")
            if name not in QUOTAS or not value.isdigit():
                return _fail(args, "usage", f"--quota {item!r}: NAME=INTEGER with NAME one of {', '.join(QUOTAS)}", "")
            quotas[name] = int(value)
        output = args.output or Path(f"{args.name}.key")
        if output.exists():
            return _fail(args, "usage", f"{output} exists: the credentials are written to a new file", "choose -o FILE")
        public, secret = keypair()
        info = c.tenant_add(args.name, public, policies=args.policy or ["default"], routes=args.route, quotas=quotas)
    endpoint = args.endpoint or info.get("endpoint") or ""
    creds = Credentials(endpoint=endpoint, server_key=info["server_key"], tenant=args.name, public_key=public,
                        secret_key=secret)
    write_private(output, creds.dump())
    note = "" if endpoint.startswith("tcp://") and "0.0.0.0" not in endpoint else \
        f"\n  note: set \"endpoint\" in {output} to the address its clients reach (tcp://HOST:PORT)"
    _out(args, {**info, "credentials": str(output)},
         f"tenant {args.name} added; its credentials (secret: hand them over privately) are in {output}{note}")
    return EXIT_OK


def cmd_top(args: argparse.Namespace, home: Home) -> int:
    from ._top import run_top

    with _client(args, home) as c:
        if args.json:
            _out(args, c.top(), "")
            return EXIT_OK
        return run_top(c, sort=args.sort, interval=args.interval)


def cmd_usage(args: argparse.Namespace, home: Home) -> int:
    since_ns = _since(args.since)
    with _client(args, home) as c:
        report = c.usage(args.tenant, since_ns)

    def table() -> str:
        rows = report["agents"]
        lines = [f"usage {'of tenant ' + report['tenant'] if report['tenant'] else 'of every tenant'} since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(report['since_ns'] / 1e9))}",
                 f"{'AGENT':<24} {'TENANT':<12} {'CPU_S':>8} {'PEAK_MIB':>8} {'FUEL':>14} {'CALLS':>8} "
                 f"{'MESSAGES':>8} {'RECORDS':>8} {'BYTES':>10} {'WORKERS':>7}"]
        for r in [*rows, {"name": "total", "tenant": "", **report["total"]}]:
            lines.append(f"{r['name'][:24]:<24} {r['tenant'][:12]:<12} {r['cpu_ns'] / 1e9:>8.2f} "
                         f"{r['peak_rss'] / 2**20:>8.1f} {r['fuel']:>14} {r['calls']:>8} {r['messages']:>8} "
                         f"{r['records']:>8} {r['record_bytes']:>10} {r['workers']:>7}")
        if report.get("denials"):
            lines.append(f"requests refused: {report['denials']}")
        return "\n".join(lines)

    _out(args, report, table)
    return EXIT_OK


def _since(text: str) -> int:
    """A start time: an age (90s, 15m, 24h, 7d) before now, or an ISO 8601 date or date and time."""
    import datetime

    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[:-1].isdigit() and text[-1:] in units:
        return time.time_ns() - int(text[:-1]) * units[text[-1]] * 10**9
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise TheaterError(f"--since {text!r}: an age like 24h or 7d, or an ISO date like 2026-12-01") from None
    if when.tzinfo is None:
        when = when.astimezone()
    return int(when.timestamp() * 10**9)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise TheaterError(f"--metrics {text!r}: HOST:PORT, like 127.0.0.1:9464")
    return host, int(port)


COMMANDS: dict[str, Callable[[argparse.Namespace, Home], int]] = {
    "up": cmd_up, "down": cmd_down, "spawn": cmd_spawn, "run": cmd_run, "send": cmd_send, "call": cmd_call,
    "ps": cmd_ps, "events": cmd_events, "verify": cmd_verify, "stop": cmd_stop,
    "tree": cmd_tree, "restart": cmd_restart, "doctor": cmd_doctor, "secret": cmd_secret, "replay": cmd_replay,
    "key": cmd_key, "checkpoint": cmd_checkpoint, "export": cmd_export, "rm": cmd_rm, "logs": cmd_logs,
    "new": cmd_new, "build": cmd_build, "gc": cmd_gc, "tenant": cmd_tenant, "top": cmd_top, "usage": cmd_usage,
}


class UsageError(Exception):
    """A command line argparse refused: reported as one line (or a JSON object), exit status 2."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse, except that a usage error is raised for `main` to report as every other error is, rather
    than printed as a usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.prog, message)


def _seconds(most: float) -> Callable[[str], float]:
    """A --timeout or --interval: a finite number of seconds, at least a millisecond (what a request
    carries) and at most ``most``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not 0.001 <= value <= most:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0.001 to {most:g}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--home", type=Path, default=argparse.SUPPRESS, help="state directory (default: $THEATER_HOME or ~/.local/state/theater)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output on stdout")
    common.add_argument("--remote", type=Path, default=argparse.SUPPRESS, metavar="CREDENTIALS",
                        help="act as a tenant on a supervisor elsewhere, with the file theater tenant add wrote")
    p = _Parser(prog="theater", description="Run untrusted agents as sandboxed, supervised WebAssembly "
                                "components.", epilog=GROUPS, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Accepted before or after the command; the subcommand's value wins.
    p.add_argument("--home", dest="top_home", type=Path, default=None, help="state directory (default: $THEATER_HOME or ~/.local/state/theater)")
    p.add_argument("--json", dest="top_json", action="store_true", help="machine-readable output on stdout")
    p.add_argument("--remote", dest="top_remote", type=Path, default=None, metavar="CREDENTIALS",
                   help="act as a tenant on a supervisor elsewhere, with the file theater tenant add wrote")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = sub.add_parser("up", parents=[common], help="start the supervisor")
    up.add_argument("--detach", action="store_true", help="run in the background and return once it answers")
    up.add_argument("--witness", type=Path, help="a directory outside the home that gets a copy of every checkpoint")
    up.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                    help="the least severe lines the supervisor logs (default: info)")
    up.add_argument("--listen", metavar="tcp://HOST:PORT", help="also serve tenants' clients on TCP (CurveZMQ; "
                                                                 "theater tenant add makes their credentials)")
    up.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics at http://HOST:PORT/metrics")
    tn = sub.add_parser("tenant", parents=[common], help="tenants: who may control agents over TCP, and their quotas")
    tn.add_argument("action", choices=("add", "list", "rm"), help="add NAME, list, rm NAME")
    tn.add_argument("name", nargs="?", help="the tenant's name (add, rm)")
    tn.add_argument("--policy", action="append", default=[], help="a policy its agents may run under (repeat)")
    tn.add_argument("--route", action="append", default=[], help="a tenant its agents may message, if that "
                                                                  "tenant lists this one too (repeat)")
    tn.add_argument("--quota", action="append", default=[], metavar="NAME=VALUE",
                    help=f"a quota (repeat): {', '.join(QUOTAS)}")
    tn.add_argument("-o", "--output", type=Path, help="where to write the tenant's credentials (default NAME.key)")
    tn.add_argument("--endpoint", metavar="tcp://HOST:PORT", help="the address its clients reach, written in its "
                                                                   "credentials (default: what the supervisor listens on)")
    tp = sub.add_parser("top", parents=[common], help="agents' CPU, memory, fuel and calls, refreshing in place")
    tp.add_argument("--sort", choices=("cpu", "memory", "fuel", "calls", "name"), default="cpu",
                    help="the column to sort by (default cpu)")
    tp.add_argument("--interval", type=_seconds(3600), default=1.0, help="seconds between refreshes (default 1)")
    us = sub.add_parser("usage", parents=[common], help="what a tenant used, from the store (what a host bills by)")
    us.add_argument("--tenant", help="the tenant (default: yours; the operator: every tenant)")
    us.add_argument("--since", default="30d", help="a start: an ISO date/time, or an age like 24h, 7d (default 30d)")
    nw = sub.add_parser("new", parents=[common], help="write a new agent project (source, manifest, README)")
    nw.add_argument("name", help="the agent's name, and the project directory's")
    nw.add_argument("--lang", choices=("python", "js", "wat"), default="python", help="the guest language (default python)")
    nw.add_argument("--dir", type=Path, default=Path("."), help="where to create the project (default: here)")
    bd = sub.add_parser("build", parents=[common], help="build a project's component (skipped if up to date)")
    bd.add_argument("project", type=Path, help="the project directory theater new made")
    lg = sub.add_parser("logs", parents=[common], help="the supervisor's log (of `up --detach`)")
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    sub.add_parser("down", parents=[common], help="stop every agent and the supervisor")
    s = sub.add_parser("spawn", parents=[common], help="start an agent from its manifest; prints its id")
    s.add_argument("manifest", type=Path, help="an agent manifest, or a supervisor manifest (a tree)")
    s.add_argument("--timeout", type=_seconds(86400), default=60.0, help="seconds to wait for the agent to be ready")
    s.add_argument("--replace", action="store_true", help="remove a stopped or failed agent of the same name first")
    s.add_argument("--tenant", help="spawn it as this tenant's (the operator's local spawns only)")
    rmp = sub.add_parser("rm", parents=[common], help="remove a stopped or failed agent (its chain ends; the name is free)")
    rmp.add_argument("agent", help="agent name or id")
    r = sub.add_parser("run", parents=[common], help="supervisor in the foreground + spawn + follow events")
    r.add_argument("manifest", type=Path, help="an agent or supervisor manifest")
    for name, what in (("send", "queue a message for an agent"), ("call", "send a message and print the reply")):
        c = sub.add_parser(name, parents=[common], help=what)
        c.add_argument("agent", help="agent name or id")
        c.add_argument("data", help="message text, @FILE for a file's bytes, or - for stdin")
        if name == "call":
            c.add_argument("--timeout", type=_seconds(3600), default=10.0, help="seconds to wait for the reply")
    sub.add_parser("ps", parents=[common], help="list agents")
    e = sub.add_parser("events", parents=[common], help="print an agent's event records")
    e.add_argument("agent", nargs="?", help="agent or supervisor node, by name or id")
    e.add_argument("--follow", "-f", action="store_true", help="keep printing new records")
    e.add_argument("--trace", metavar="MESSAGE_ID", help="the records of every agent that name this message id "
                                                         "(from a messaging host call's answer)")
    v = sub.add_parser("verify", parents=[common], help="verify every chain offline (exit 1 if any is broken)")
    v.add_argument("agent", nargs="?", help="one agent or node (default: every chain of the home)")
    v.add_argument("--pubkey", type=Path, help="the supervisor's public key as you hold it (32 raw bytes or hex), "
                                               "instead of the home's")
    v.add_argument("--fingerprint", help="the supervisor key's fingerprint as you hold it (theater key)")
    v.add_argument("--checkpoint", type=Path, help="a checkpoint whose every head the store must still hold")
    v.add_argument("--bundle", type=Path, help="verify a bundle from theater export instead of the home")
    ex = sub.add_parser("export", parents=[common], help="write chains to a self-contained bundle for an auditor")
    ex.add_argument("agents", nargs="+", help="agents or supervisor nodes, by name or id")
    ex.add_argument("-o", "--output", type=Path, required=True, help="the bundle file to write")
    ex.add_argument("--checkpoint", type=Path, help="a checkpoint to carry along (its heads are checked on verify)")
    st = sub.add_parser("stop", parents=[common], help="stop an agent or a subtree (it stays stopped across restarts)")
    st.add_argument("agent", help="agent or supervisor node (a subtree), by name or id")
    sub.add_parser("tree", parents=[common], help="the live supervision tree")
    rs = sub.add_parser("restart", parents=[common], help="stop an agent or subtree and start it again")
    rs.add_argument("agent", help="agent or supervisor node (a subtree), by name or id")
    sub.add_parser("doctor", parents=[common], help="which OS hardening layers work here, and what each policy gets")
    ky = sub.add_parser("key", parents=[common], help="the supervisor's public key and fingerprint, for auditors to pin")
    ky.add_argument("action", nargs="?", choices=("show", "rotate"), default="show",
                    help="show (default), or rotate: a new key, under a statement the old and new keys both sign")
    cp = sub.add_parser("checkpoint", parents=[common], help="sign every chain's head now; keep a copy elsewhere")
    cp.add_argument("-o", "--output", type=Path, help="also write the checkpoint to this file (a witness copy)")
    gc = sub.add_parser("gc", parents=[common], help="snapshot agents' state; compact chains past their [retention]")
    gc.add_argument("agents", nargs="*", help="agents, by name or id (default: every agent)")
    rp = sub.add_parser("replay", parents=[common], help="run an agent again on its recorded inputs; exit 1 if it diverges")
    rp.add_argument("agent", help="agent, by name or id (a removed one by its id)")
    rp.add_argument("--timeout", type=_seconds(86400), default=600.0, help="seconds the replay may take")
    rp.add_argument("--from", dest="from_seq", type=_record_number, metavar="SEQ",
                    help="start at the newest state snapshot before record SEQ (theater gc keeps them), not the genesis")
    rp.add_argument("--component", type=Path, help="replay with this component instead of the one the genesis "
                                                   "names (a rebuild): the report is where it first differs")
    se = sub.add_parser("secret", parents=[common], help="named secrets that [http] rules add to requests")
    se.add_argument("action", choices=("set", "list", "rm"), help="set NAME (value on stdin), list, rm NAME")
    se.add_argument("name", nargs="?", help="the secret's name (set, rm)")
    for name, command in sub.choices.items():
        command.formatter_class = argparse.RawDescriptionHelpFormatter
        command.epilog = f"example:\n  {EXAMPLES[name]}"
    return p


GROUPS = """commands, by what they are for:
  the supervisor   up, down, logs, checkpoint, key, gc
  hosting          tenant, top, usage
  agents           new, build, spawn, run, send, call, stop, restart, rm, secret
  inspection       ps, tree, events, verify, replay, export, doctor

`theater COMMAND --help` shows a command's options and an example.
start here:
  theater up --detach
  theater spawn examples/agents/counter.toml
  theater call counter hello"""

EXAMPLES = {
    "up": "theater up --detach --witness /mnt/elsewhere/checkpoints",
    "down": "theater down",
    "spawn": "theater spawn examples/agents/counter.toml        # or a tree: examples/agents/team.toml",
    "run": "theater run examples/agents/counter.toml          # Ctrl-C stops it",
    "send": "theater send counter tick                          # @FILE for a file's bytes, - for stdin",
    "call": "theater call counter tick --timeout 5",
    "ps": "theater ps --json",
    "events": "theater events counter --follow                   # or: theater events --trace <message id>",
    "verify": "theater verify --fingerprint <fp> --checkpoint cp.json",
    "stop": "theater stop counter",
    "tree": "theater tree",
    "restart": "theater restart counter",
    "doctor": "theater doctor",
    "secret": "printf %s \"$API_KEY\" | theater secret set openai",
    "replay": "theater replay counter                             # --component FILE: a rebuild",
    "key": "theater key                                        # theater key rotate: retire it for a new one",
    "checkpoint": "theater checkpoint -o /mnt/elsewhere/cp.json",
    "gc": "theater gc                                         # [retention] max_records/max_bytes in the policy",
    "export": "theater export counter team -o audit.bundle --checkpoint cp.json",
    "rm": "theater rm counter                                 # or: theater spawn counter.toml --replace",
    "logs": "theater logs --follow",
    "new": "theater new greeter --lang python && theater build greeter",
    "build": "theater build greeter                              # then: theater spawn greeter/greeter.toml",
    "tenant": "theater tenant add acme --policy default --quota agents=10 -o acme.key",
    "top": "theater top --sort memory                          # --json: one snapshot",
    "usage": "theater usage --tenant acme --since 2026-12-01",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        command = exc.prog.removeprefix("theater").strip()
        message = f"{command}: {exc}" if command else str(exc)
        return _fail(argparse.Namespace(json="--json" in argv), "usage", message, f"`{exc.prog} --help` shows its usage")
    args.json = getattr(args, "json", False) or args.top_json
    chosen = getattr(args, "home", None) or args.top_home
    home = Home(chosen if chosen is not None else default_home())
    try:
        if home.root.exists() and not home.root.is_dir():
            return _fail(args, "usage", f"--home {home.root} is a file, not a directory",
                         "give a directory (it is created if missing), or leave --home out")
        if args.command == "events" and args.agent is None and args.trace is None:  # before looking at the home
            return _fail(args, "usage", "events: needs an AGENT, or --trace MESSAGE_ID",
                         "`theater events --help` shows its usage")
        remote = getattr(args, "remote", None) or args.top_remote
        if args.command in ("verify", "events", "key", "replay", "export") and _fresh(home) \
                and getattr(args, "bundle", None) is None and remote is None:
            if args.command == "verify":
                _out(args, [], f"no agents yet at {home.root}: nothing to verify")
                return EXIT_OK
            return _fail(args, "not-found", f"no agents yet at {home.root}",
                         "start a supervisor with `theater up` and spawn an agent; the key and the store appear then")
        return COMMANDS[args.command](args, home)
    except ClientError as exc:
        return _fail(args, exc.code, str(exc), _hint(exc.code, str(exc), getattr(args, "manifest", None),
                                                     getattr(args, "agent", None)))
    except NoAnswer as exc:
        return _fail(args, "timeout", str(exc), _silence_hint(args, home))
    except NotRunning as exc:  # the hint names the home when it is not the one a bare `theater up` uses
        home_arg = "" if home.root == default_home() else f" --home {home.root}"
        return _fail(args, "not-running", str(exc), f"start it with `theater{home_arg} up --detach` (or `theater"
                                                     f"{home_arg} up` in the foreground)")
    except (SupervisorError, TheaterError) as exc:
        return _fail(args, getattr(exc, "code", "error"), str(exc), "")
    except BrokenPipeError:  # `theater events x | head`: the reader has what it wanted
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(args, "os", f"{where}{exc.strerror or exc}", "")
    except KeyboardInterrupt:
        return 130


def _silence_hint(args: argparse.Namespace, home: Home) -> str:
    """A request no answer came for: a supervisor that has ended since, or one that is busy."""
    if not (getattr(args, "remote", None) or args.top_remote) and supervisor_gone(home):
        return "the supervisor has ended: start it with `theater up` (or `theater up --detach`)"
    longer = ", or give it longer with --timeout" if hasattr(args, "timeout") else ""
    return f"the supervisor did not answer in time (a busy machine, a long start): try again{longer}"


def _fresh(home: Home) -> bool:
    """A home no supervisor has run in yet: no store, no key."""
    return not home.store.exists() and not home.public_key.exists()


def _fail(args: argparse.Namespace, code: str, message: str, hint: str) -> int:
    """An error: a line on stderr (and the hint), or with --json one object on stdout. Exit 1 (2: usage)."""
    if getattr(args, "json", False):
        print(json.dumps({"error": {"code": code, "message": message, "hint": hint}}, sort_keys=True))
    else:
        _err(f"{code}: {message}" if code not in ("error", "os", "usage") else message)
        if hint:
            print(f"  hint: {hint}", file=sys.stderr)
    return EXIT_USAGE if code == "usage" else EXIT_FAIL


def _hint(code: str, message: str, manifest: object = None, typed: object = None) -> str:
    """What to do next, where a user is most often stuck: the commands to type, with the agent the user named
    (else the one the error begins with: `agent NAME failed to start`; never a name from further on, which may
    be a guest's words)."""
    named = re.match(r"agent ([^\s,]+)[ ,]", message)
    agent = str(typed) if typed else named.group(1) if named else "<agent>"
    spawn = f"`theater spawn {manifest if manifest else '<manifest>'} --replace`"
    if code == "refused" and " is failed, in the tree " in message:  # a tree's agents cannot be removed
        return f"see why with `theater events {agent}`; start it again with `theater restart {agent}`"
    if code == "refused" and " is failed" in message:
        return (f"see why with `theater events {agent}`; start it again with `theater restart {agent}` (one that "
                f"failed to load needs a fixed manifest or component and {spawn}), or remove it with "
                f"`theater rm {agent}`")
    if code == "refused" and " is stopped" in message:
        return f"start it again with `theater restart {agent}`"
    if code == "not-found":
        return "`theater ps` lists the agents; `theater tree` the supervisors"
    if code == "restart-failed" and "load-failed" in message:
        return f"its component does not load: fix the manifest or component, then {spawn}"
    if code == "restart-failed":
        return f"`theater events {agent}` shows why it ended; `theater tree` shows its supervisors"
    if code == "spawn-failed":
        return (f"`theater events {agent}` shows its records; fix the manifest or component, then {spawn} (the "
                f"failed agent still holds its name)")
    project = Path(str(manifest)) if manifest else None
    if code == "config" and project is not None and "is a directory, not a regular file" in message \
            and (project / f"{project.name}.toml").is_file():
        return f"give the project's manifest: `theater spawn {project / (project.name + '.toml')}`"
    if code == "config" and project is not None and ".wasm does not exist" in message:
        from ._authoring import SOURCES

        if any((project.parent / source).is_file() for source in SOURCES.values()):
            return f"build it first: `theater build {project.parent}`"
    if (code == "config" and ".wat" in message) or (".wasm" in message and "not valid TOML" in message):
        return "`theater spawn` takes a manifest (.toml) that names the component, not the component itself"
    return ""


if __name__ == "__main__":
    sys.exit(main())
