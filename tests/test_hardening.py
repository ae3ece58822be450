"""OS hardening of workers, tested against real hardened workers, as root and as an unprivileged user.

The escape probes run inside a real worker through ``tests/probe_worker.py``
(started by ``tests/run_probe_supervisor.py``; a Python-only hook no policy,
manifest or guest can reach). A probe that fails leaves a signed log record
saying how; a probe that gets the worker killed leaves the supervisor's exit
record saying by which signal. The unprivileged runs start the supervisor as
uid 65534 with ``setpriv``. Every wait is on a reply or a process-level fact
with a deadline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import Theater, assert_verified, records, spare_workers, wait_running, wait_until

from supervisor._config import load_manifest, load_policy, policy_dirs
from supervisor._errors import ConfigError
from theater.client import Client, ClientError
from theater.errors import ProtocolError
from theater.records import Kind
from theater.spec import DEFAULT_HARDENING, HARDENING_LAYERS, AgentSpec, Hardening
from worker._harden.rlimits import LOG_ALLOWANCE

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
RUN_PROBE_SUPERVISOR = TESTS / "run_probe_supervisor.py"
NOBODY = 65534
SIGSYS = f"killed by signal {int(signal.SIGSYS)} (SIGSYS)"
ALL_BUT_SECCOMP = ",".join(layer for layer in HARDENING_LAYERS if layer != "seccomp")


# --- running as an unprivileged user -----------------------------------------------------------


def _as_nobody(argv: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


@pytest.fixture(scope="session")
def nobody_python() -> Iterator[str]:
    """An interpreter uid 65534 can run with this checkout's packages.

    ``sys.executable`` may live where that user cannot go (pyenv under /root, 0700);
    then a throw-away venv of the system's Python of the same version is made in
    /tmp and pointed at this venv's site-packages.
    """
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("running probes as another user needs root and setpriv")
    if _runs_as_nobody([sys.executable]):
        yield sys.executable
        return
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = shutil.which(version, path="/usr/local/bin:/usr/bin:/bin")
    if system is None:
        pytest.skip(f"{sys.executable} is not reachable by uid {NOBODY} and there is no system {version}")
    venv = Path(f"/tmp/theater-nobody-{os.getpid()}")
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([system, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    site = venv / "lib" / version / "site-packages"
    (site / "theater-checkout.pth").write_text(f"import site; site.addsitedir({sysconfig.get_path('purelib')!r})\n")
    python = str(venv / "bin" / "python")
    if not _runs_as_nobody([python]):
        shutil.rmtree(venv, ignore_errors=True)
        pytest.skip(f"uid {NOBODY} cannot import this checkout's packages with {system}")
    yield python
    shutil.rmtree(venv, ignore_errors=True)


def _runs_as_nobody(argv: list[str]) -> bool:
    """Whether ``argv`` runs as uid 65534 and can start its own interpreter again (as a supervisor does)."""
    again = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import wasmtime, zmq, theater'], check=True)"
    return subprocess.run(_as_nobody([*argv[:1], "-c", again]), cwd="/", capture_output=True, check=False).returncode == 0


@pytest.fixture
def probes(request: pytest.FixtureRequest, short_root: Callable[[str], Path]) -> Iterator[Any]:
    """``probes(user, layers)`` starts a probe supervisor; each is stopped at the end of the test.

    ``user`` "root-fork-server" runs as root with workers forked by a fork-server (with the
    hardening it prepares for them), the others start each worker from a fresh interpreter."""
    started: list[Theater] = []

    def start(user: str, layers: str = "all") -> Theater:
        root = short_root(user)
        t = Theater(root)
        if user.startswith("root"):
            argv = [sys.executable, str(RUN_PROBE_SUPERVISOR), str(t.home.root), layers]
            argv += ["fork-server"] if user == "root-fork-server" else []
        else:
            python = request.getfixturevalue("nobody_python")
            t.home.logs.mkdir(parents=True)
            for d in (root, t.home.root, t.home.logs):
                os.chown(d, NOBODY, NOBODY)
            argv = _as_nobody([python, str(RUN_PROBE_SUPERVISOR), str(t.home.root), layers])
        started.append(t)
        t.start(argv)
        return t

    yield start
    for t in started:
        t.stop()
    _sweep_cgroups()


def _sweep_cgroups() -> None:
    """Remove the empty per-worker cgroups the test's workers left (a worker cannot remove its own)."""
    subprocess.run([sys.executable, "-m", "worker.probe", "--sweep"], cwd="/", capture_output=True, check=False)


# --- helpers -------------------------------------------------------------------------------------


def _confinement(t: Theater, name: str) -> dict[str, str]:
    genesis = records(t, name, check_seq=False)[0]
    return json.loads(genesis.fields()["confinement"])


def _probe(t: Theater, c: Client, name: str, probe: str) -> str:
    """Run a probe that the worker survives; return its recorded outcome."""
    c.call(name, f"probe:{probe}".encode(), timeout=20)
    logs = [r.fields()["message"] for r in records(t, name, check_seq=False) if r.kind is Kind.LOG]
    key = probe.split(":")[0]
    return next(m for m in reversed(logs) if m.startswith(f"probe {key}: ")).split(": ", 1)[1]


def _probe_kills(t: Theater, c: Client, name: str, probe: str) -> str:
    """Run a probe that gets the worker killed; return the exit record's detail, once restarted."""
    pid = wait_running(c, name, timeout=30)["pid"]
    with pytest.raises(ClientError) as err:
        c.call(name, f"probe:{probe}".encode(), timeout=20)
    assert err.value.code == "worker-died", err.value
    wait_running(c, name, pid, timeout=30)
    exits = [r.fields() for r in records(t, name, check_seq=False) if r.kind is Kind.EXIT]
    return str(exits[-1]["detail"])


def _spawn(t: Theater, c: Client, name: str, component: str = "echo.wat", **extra: object) -> int:
    c.spawn(str(t.manifest(name, component, restart={"intensity": 20, "period_ms": 60_000}, **extra)))
    return wait_running(c, name, timeout=30)["pid"]


def _seccomp_filters(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Seccomp_filters:\s*(\d+)", status, re.M).group(1))  # type: ignore[union-attr]


def _log_limit(pid: int) -> int:
    line = next(x for x in Path(f"/proc/{pid}/limits").read_text().splitlines() if x.startswith("Max file size"))
    return int(line.split()[3])


def test_a_loaded_spare_limits_its_agents_log_past_the_size_it_has(probes: Any) -> None:
    """A log may grow by 1 MiB past its size at lock-down. A loaded spare's allowlist refuses ``fstat`` by
    the time it has its agent, so the supervisor sends the size with the log; the spare used to take its
    failed ``fstat`` for an empty log, and an agent whose log had reached 1 MiB could not write to it again."""
    t = probes("root-fork-server")
    with t.client() as c:
        _spawn(t, c, "p")
        assert "File too large" in _probe(t, c, "p", "flood-log")
        log = t.home.logs / "p.log"
        flooded = log.stat().st_size
        assert flooded >= LOG_ALLOWANCE

        def loaded_spare() -> list[int]:  # locked down ahead: the denylist and the hand-over's allowlist
            found = []
            for p in spare_workers(t, c):
                try:
                    if _seccomp_filters(p.pid) == 2:
                        found.append(p.pid)
                except (OSError, AttributeError):  # it ended, or is still being made
                    continue
            return found

        spares = wait_until(loaded_spare, what="a loaded spare for p's component")
        _probe_kills(t, c, "p", "exec")
        new = wait_running(c, "p", timeout=30)["pid"]
        assert new in spares and _seccomp_filters(new) == 3, "the restart did not take the loaded spare"
        assert _log_limit(new) >= flooded + LOG_ALLOWANCE
        before = log.stat().st_size
        assert "File too large" in _probe(t, c, "p", "flood-log")
        assert log.stat().st_size >= before + LOG_ALLOWANCE // 2  # it wrote again, up to its new limit


# --- policies, manifests and the spec ---------------------------------------------------------------


def test_policies_carry_a_hardening_profile(tmp_path: Path) -> None:
    default = load_policy("default", policy_dirs(None))
    assert default.hardening == DEFAULT_HARDENING == Hardening(
        ("rlimits", "no_new_privs", "seccomp"), ("landlock", "namespaces", "cgroups"))
    assert load_policy("strict", policy_dirs(None)).hardening.required == ("rlimits", "no_new_privs", "seccomp", "landlock")
    pol = tmp_path / "policies"
    pol.mkdir()
    limits = (ROOT / "policies" / "default.toml").read_text().split("[limits]")[1].split("[hardening]")[0]

    def policy(name: str, table: str) -> str:
        (pol / f"{name}.toml").write_text(f"[limits]{limits}\n[hardening]\n{table}\n")
        return name

    assert load_policy(policy("p1", 'required = ["cgroups"]'), [pol]).hardening == Hardening(
        ("cgroups",), ("rlimits", "no_new_privs", "seccomp", "landlock", "namespaces"))
    for table, fragment in (
        ('required = ["seccomp"]\nmandatory = ["x"]', "unknown key hardening.mandatory"),
        ('required = ["selinux"]', "hardening.required: unknown hardening layer 'selinux'"),
        ('preferred = ["seccomp", "seccomp"]', "hardening.preferred: names a layer twice"),
        ('required = ["seccomp"]\npreferred = ["seccomp"]', "seccomp cannot be both required and preferred"),
        ('required = "seccomp"', "hardening.required: must be a list"),
    ):
        with pytest.raises(ConfigError) as err:
            load_policy(policy("bad", table), [pol])
        assert str(pol / "bad.toml") in str(err.value) and fragment in str(err.value), err.value


def test_a_manifest_may_add_required_layers_never_remove_one(tmp_path: Path) -> None:
    def manifest(table: str) -> Path:
        path = tmp_path / "m.toml"
        path.write_text(f'name = "m"\ncomponent = "{TESTS / "components" / "echo.wat"}"\npolicy = "strict"\n{table}\n')
        return path

    assert load_manifest(manifest(""), policy_dirs(None)).hardening.required == ("rlimits", "no_new_privs", "seccomp", "landlock")
    added = load_manifest(manifest('[hardening]\nrequired = ["cgroups"]'), policy_dirs(None)).hardening
    assert added == Hardening(("rlimits", "no_new_privs", "seccomp", "landlock", "cgroups"), ("namespaces",))
    # Naming fewer layers removes none of the policy's.
    fewer = load_manifest(manifest('[hardening]\nrequired = ["rlimits"]'), policy_dirs(None)).hardening
    assert fewer.required == ("rlimits", "no_new_privs", "seccomp", "landlock")
    for table, fragment in (
        ('[hardening]\npreferred = ["seccomp"]', "hardening.preferred: a manifest may only add required layers"),
        ('[hardening]\nrequired = ["apparmor"]', "unknown hardening layer 'apparmor'"),
    ):
        with pytest.raises(ConfigError) as err:
            load_manifest(manifest(table), policy_dirs(None))
        assert str(tmp_path / "m.toml") in str(err.value) and fragment in str(err.value), err.value
    assert load_manifest(manifest(""), policy_dirs(None)).as_dict()["hardening"]["required"][-1] == "landlock"


def test_the_spec_carries_the_profile_strictly() -> None:
    config = load_manifest(ROOT / "examples" / "agents" / "echo.toml", policy_dirs(None))
    spec = AgentSpec(agent_id="0" * 32, name="e", component_path=config.component_path,
                     component_sha256=config.component_sha256, capabilities=("runtime",), limits=config.limits,
                     head_seq=0, head_hash="00", state_hash="00", hardening=Hardening(("seccomp",), ("cgroups",)))
    data = json.loads(json.dumps(spec.to_json()))
    assert data["hardening"] == {"required": ["seccomp"], "preferred": ["cgroups"]}
    assert AgentSpec.from_json(data) == spec
    for bad in (None, {}, {"required": ["seccomp"]}, {"required": ["seccomp"], "preferred": [], "x": []},
                {"required": ["nope"], "preferred": []}, {"required": ["seccomp"], "preferred": ["seccomp"]},
                {"required": [{}], "preferred": []}):
        with pytest.raises(ProtocolError):
            AgentSpec.from_json({**data, "hardening": bad})
    del data["hardening"]
    with pytest.raises(ProtocolError):
        AgentSpec.from_json(data)


# --- a real hardened worker --------------------------------------------------------------------------

FAILING_PROBES = ("open", "inet", "unix", "connect", "fork", "thread", "write", "alloc", "exec-mmap", "flood-log")


@pytest.mark.parametrize("user", ["root", "nobody", "root-fork-server"])
def test_a_hardened_worker_cannot_escape(probes: Any, user: str, request: pytest.FixtureRequest) -> None:
    """Files, sockets, processes, threads, other processes' memory and signals, executable memory,
    host memory beyond RLIMIT_AS and a log flood beyond RLIMIT_FSIZE all fail; exec and ptrace kill
    the worker with SIGSYS and the supervisor records it; the confinement recorded is what the
    doctor finds."""
    t = probes(user)
    with t.client() as c:
        other = _spawn(t, c, "other")
        _spawn(t, c, "p")
        outcomes = {probe: _probe(t, c, "p", probe) for probe in FAILING_PROBES}
        outcomes["proc-mem"] = _probe(t, c, "p", f"proc-mem:{other}")
        outcomes["kill"] = _probe(t, c, "p", f"kill:{t.proc.pid if t.proc else 1}")
        for probe, outcome in outcomes.items():
            assert outcome.startswith("denied: "), (probe, outcome)
        assert "Operation not permitted" in outcomes["open"]  # seccomp refuses openat outright
        assert "MemoryError" in outcomes["alloc"]  # a 1 GiB host allocation: the wasm limit never sees it
        assert "[Errno 27] File too large" in outcomes["flood-log"]  # RLIMIT_FSIZE (Python ignores SIGXFSZ)
        assert c.call("p", b"still serving") == b"still serving"
        assert _probe_kills(t, c, "p", "exec") == SIGSYS
        assert _probe_kills(t, c, "p", "ptrace") == SIGSYS
        assert c.call("p", b"after two kills") == b"after two kills"

    confinement = _confinement(t, "p")
    expected = {layer: "applied" for layer in ("hygiene", *HARDENING_LAYERS)}
    if user == "nobody":
        expected["cgroups"] = confinement["cgroups"]
        assert confinement["cgroups"].startswith("unavailable: ") and "EACCES" in confinement["cgroups"]
        assert confinement["rlimits.nproc"] == "16"
    assert {k: v for k, v in confinement.items() if "." not in k} == expected
    uid = 65534 if user == "nobody" else 0  # a worker that is not root maps its ids too (it must be dumpable then)
    assert confinement["namespaces.ids"] == f"uid {uid} and gid {uid} mapped to themselves", confinement

    # The doctor, run as the same user, reports what this worker recorded.
    argv = ["-m", "supervisor", "--home", str(t.home.root), "doctor", "--json"]
    argv = [sys.executable, *argv] if user.startswith("root") else _as_nobody([request.getfixturevalue("nobody_python"), *argv])
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/tmp"}
    doctor = json.loads(subprocess.run(argv, cwd="/", capture_output=True, check=True, timeout=60, env=env).stdout)
    assert doctor["layers"] == expected
    assert doctor["lock_down"] == "completed"
    assert all(outcome.startswith("denied") for outcome in doctor["attempts"].values()), doctor["attempts"]
    assert doctor["policies"]["default"]["starts"] and doctor["policies"]["strict"]["starts"]
    assert doctor["machine"]["euid"] == (0 if user.startswith("root") else NOBODY)


@pytest.mark.parametrize("layers", ["all", "rlimits,no_new_privs,namespaces,cgroups,seccomp"])
def test_a_forked_worker_keeps_no_landlock_ruleset(probes: Any, layers: str) -> None:
    """The Landlock ruleset a fork-server prepared is closed in every worker before its hello, whether
    the worker restricted itself with it or left Landlock out (an open one could be added to)."""
    t = probes("root-fork-server", layers)
    with t.client() as c:
        pid = _spawn(t, c, "p")
        assert c.call("p", b"x") == b"x"
    targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    assert targets and not any("landlock" in target for target in targets), targets
    assert _confinement(t, "p")["landlock"] == ("applied" if layers == "all" else "skipped")


def test_forked_workers_are_born_each_in_a_cgroup_of_their_own(probes: Any) -> None:
    """Between spawns the fork-server moves itself into a fresh group, so the next worker is born
    in it and needs no move: each group holds exactly one worker, its pids limit at its threads."""
    t = probes("root-fork-server")
    with t.client() as c:
        pids = {name: _spawn(t, c, name) for name in ("a", "b", "c")}
    confinements = {name: _confinement(t, name) for name in pids}
    if confinements["a"]["cgroups"] != "applied":
        pytest.skip(f"cgroups here: {confinements['a']['cgroups']}")
    paths = {name: confinements[name]["cgroups.path"] for name in pids}
    assert len(set(paths.values())) == 3, paths
    for name in ("a", "b"):  # the fork-server left their groups before it served the next spawn
        assert re.fullmatch(r"(.*/)?theater/w-\d+-\d+", paths[name]), paths[name]
        for controller in ("pids", "cpu"):
            procs = (Path("/sys/fs/cgroup") / controller / paths[name] / "cgroup.procs").read_text().split()
            assert procs == [str(pids[name])], (controller, procs)
        limit = (Path("/sys/fs/cgroup/pids") / paths[name] / "pids.max").read_text().strip()
        assert limit == str(psutil.Process(pids[name]).num_threads())


@pytest.mark.parametrize("user", ["root", "nobody"])
def test_each_layer_stops_escapes_without_seccomp(probes: Any, user: str) -> None:
    """With the seccomp layer left out, Landlock, the read-only mount namespace, the network
    namespace, the pids cgroup or RLIMIT_NPROC, and Landlock's signal scope still stop each escape."""
    t = probes(user, ALL_BUT_SECCOMP)
    with t.client() as c:
        other = _spawn(t, c, "other")
        _spawn(t, c, "p")
        outcome = {p.split(":")[0]: _probe(t, c, "p", p) for p in (
            "open", "write", "connect", "fork", "exec", f"kill:{t.proc.pid if t.proc else 1}", f"proc-mem:{other}")}
    assert outcome["open"].startswith("denied: PermissionError: [Errno 13]")  # Landlock, stage 2
    assert outcome["write"].startswith("denied: OSError: [Errno 30]")  # read-only mounts
    assert outcome["connect"].startswith("denied: PermissionError: [Errno 13]")  # Landlock's TCP rules
    assert outcome["fork"].startswith("denied: BlockingIOError: [Errno 11]")  # pids cgroup / RLIMIT_NPROC
    assert outcome["exec"].startswith("denied: PermissionError: [Errno 13]")  # Landlock, noexec mounts
    assert outcome["kill"].startswith("denied: PermissionError: [Errno 1]")  # Landlock's signal scope
    assert outcome["proc-mem"].startswith("denied: PermissionError: [Errno 13]")
    assert _confinement(t, "p")["seccomp"] == "skipped"


def test_a_required_layer_missing_stops_the_worker(probes: Any) -> None:
    """A worker whose policy requires a layer it could not apply sends FAULT hardening-failed, exits
    before reading the component, and the supervisor records why; the agent is not restarted."""
    t = probes("root", "strict:" + ALL_BUT_SECCOMP)
    with t.client() as c, pytest.raises(ClientError) as err:
        c.spawn(str(t.manifest("p", "echo.wat")))
    assert err.value.code == "spawn-failed"
    assert "hardening-failed: seccomp is required by the agent's policy, but skipped" in str(err.value)
    chain = records(t, "p", check_seq=False)
    assert json.loads(chain[0].fields()["confinement"])["seccomp"] == "skipped"
    assert chain[-1].kind is Kind.EXIT
    assert "hardening-failed: seccomp is required" in chain[-1].fields()["detail"]
    assert not any(r.kind in (Kind.INIT, Kind.HANDLE) for r in chain)


def test_a_policy_requirement_reaches_the_worker(probes: Any) -> None:
    t = probes("nobody")  # cgroups are unavailable to uid 65534 here
    (t.home.policies).mkdir(exist_ok=True)
    limits = (ROOT / "policies" / "default.toml").read_text().split("[limits]")[1].split("[hardening]")[0]
    (t.home.policies / "needs-cgroups.toml").write_text(f'[limits]{limits}\n[hardening]\nrequired = ["cgroups"]\n')
    with t.client() as c, pytest.raises(ClientError) as err:
        c.spawn(str(t.manifest("p", "echo.wat", policy="needs-cgroups")))
    assert "hardening-failed: cgroups is required" in str(err.value)


@pytest.mark.parametrize("user", ["root", "nobody", "root-fork-server"])
def test_a_worker_never_outlives_its_supervisor(probes: Any, user: str, request: pytest.FixtureRequest) -> None:
    """The parent-death signal, whether the worker was started by Popen or forked by the fork-server."""
    t = request.getfixturevalue("theater") if user == "root-fork-server" else probes(user)
    with t.client() as c:
        pid = _spawn(t, c, "p")
    worker = psutil.Process(pid)
    assert t.proc is not None
    t.kill()
    wait_until(lambda: not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE, 20, "the worker to exit")


@pytest.mark.parametrize("user", ["root", "root-fork-server", "nobody"])
def test_a_machine_out_of_memory_loses_workers_before_the_supervisor(probes: Any, user: str) -> None:
    """Every worker, however started, puts itself first in line for the kernel's OOM killer: the kernel's
    own score ranks it above the supervisor, whose death would end every agent."""
    t = probes(user)
    with t.client() as c:
        pid = _spawn(t, c, "p")
        assert c.call("p", b"x") == b"x"
    assert t.proc is not None
    assert Path(f"/proc/{pid}/oom_score_adj").read_text().strip() == "1000"
    worker, supervisor = (int(Path(f"/proc/{p}/oom_score").read_text()) for p in (pid, t.proc.pid))
    assert worker > supervisor, (worker, supervisor)


_STAGE1 = """
import os, sys
from worker import _harden
home = sys.argv[1]
layers = frozenset({"no_new_privs", "landlock"})
report = _harden.harden_before_connect(os.getppid(), f"ipc://{home}/run/workers.sock", layers)
assert report["landlock"] == "applied", report
def attempt(path):
    try:
        with open(path, "rb") as f:
            f.read(1)
        return "read"
    except OSError as exc:
        return exc.strerror
print({p: attempt(p) for p in sys.argv[2:]})
"""


@pytest.mark.parametrize("user", ["root", "nobody"])
def test_landlock_hides_the_supervisors_home_from_the_start(user: str, request: pytest.FixtureRequest) -> None:
    """Before lock-down (while the component compiles), a worker can read what it may need (a tenant's
    uploaded component among it) but not the supervisor's key, token or store, nor the artifact cache and
    the secret that vouches for it, nor anything under /proc (its own status and task list were opened
    before)."""
    tmp_path = request.getfixturevalue("short_root")(f"ll-{user}")
    home = tmp_path / "h"
    (home / "run").mkdir(parents=True)
    (home / "cache" / "uploads").mkdir(parents=True)
    secret, artifact, upload = home / "cache" / "secret", home / "cache" / "artifact", home / "cache" / "uploads" / "c.wat"
    hidden = [home / "supervisor.key", home / "run" / "control.token", secret, artifact]
    for path in (*hidden, upload, tmp_path / "beside"):
        path.write_text("x")
    work = tmp_path / "w"
    work.mkdir(mode=0o700)
    targets = [*hidden, upload, tmp_path / "beside", TESTS / "components" / "echo.wat", Path("/proc/1/status"),
               Path("/proc/self/status")]
    argv = [sys.executable, "-c", _STAGE1, str(home), *map(str, targets)]
    if user == "nobody":
        python = request.getfixturevalue("nobody_python")
        argv = _as_nobody([python, *argv[1:]])
        for d in (tmp_path, home, home / "run", home / "cache", home / "cache" / "uploads", work):
            os.chown(d, NOBODY, NOBODY)
        for path in targets[:6]:
            os.chown(path, NOBODY, NOBODY)
    out = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=60, check=False,
                         env={"PYTHONSAFEPATH": "1"})
    assert out.returncode == 0, out.stderr
    seen = eval(out.stdout)  # the dict the child printed
    assert [seen[str(p)] for p in targets] == [
        *["Permission denied"] * 4, "read", "read", "read", "Permission denied", "Permission denied"]


# --- threads started around lock-down -----------------------------------------------------------------


@pytest.mark.parametrize("user", ["root", "root-fork-server"])
def test_rseq_reaches_the_kernel_after_lock_down(probes: Any, user: str) -> None:
    """A thread cloned just before lock-down may start after it, on a loaded machine. As it starts, glibc
    registers its rseq area and ZeroMQ's I/O thread reads and sets its scheduling policy; each aborts the
    process if that fails. After lock-down rseq with no area gets the kernel's EINVAL (not seccomp's
    EPERM), and the scheduling calls succeed (they were killed with SIGSYS)."""
    t = probes(user)
    with t.client() as c:
        _spawn(t, c, "p")
        outcome = _probe(t, c, "p", "rseq")
        assert "errno EINVAL" in outcome, outcome
        # ZeroMQ's I/O thread, as it starts, reads and sets its scheduling policy, and aborts on failure.
        assert _probe(t, c, "p", "sched") == "allowed: 'policy 0, priority 0'"
        assert c.call("p", b"still serving") == b"still serving"


# The older forms of calls the allowlist refuses, which glibc still uses for some wrappers (epoll_create,
# inotify_init, mknod, rmdir, umask): refused like their newer siblings, not killed.
LEGACY_CALLS = ("pipe", "rmdir", "lchown", "umask", "getdents", "mknod", "mknodat", "epoll_create", "inotify_init",
                "signalfd", "eventfd", "utimes", "fsync", "flock", "getxattr", "sendfile", "preadv2", "fadvise64",
                "fchmodat2", "getxattrat")


def test_older_forms_of_refused_calls_are_refused_too(probes: Any) -> None:
    t = probes("root-fork-server")
    with t.client() as c:
        _spawn(t, c, "p")
        for name in LEGACY_CALLS:
            assert _probe(t, c, "p", f"syscall:{name}") == f"allowed: '{name} returned -1, errno EPERM'", name
        assert c.call("p", b"still serving") == b"still serving"


_LATE_THREADS = """
import _thread, json, os, signal, sys
import zmq
from theater.spec import Limits
from worker import _harden, _zygote

def pair(ctx):
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://late")
    b.connect("inproc://late")
    return a, b

def python_thread():
    ran = _thread.allocate_lock()
    ran.acquire()
    _thread.start_new_thread(ran.release, ())  # returns once cloned, without waiting for the thread to run
    return ran

forked = sys.argv[1] == "forked"
if forked and _zygote.clone_parent():  # as the fork-server forks a worker: the child's parent is the test
    sys.exit(0)
if forked:
    print(os.getpid(), flush=True)
signal.alarm(50)  # whatever happens below, this process ends
# Run everything the late threads run once, so that nothing below waits for a page from disk.
ctx = zmq.Context()
[s.close() for s in pair(ctx)]
ctx.term()
python_thread().acquire()
# One CPU and a real-time policy: a thread cloned from now on inherits both, and runs only once this one waits.
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
try:
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
except PermissionError as exc:
    print(json.dumps({"skip": f"no real-time policy here: {exc}"}))
    sys.exit(0)
_harden.harden_before_connect(os.getppid(), "ipc:///unused", frozenset({"rlimits", "no_new_privs", "seccomp"}))
if forked:
    _harden.prepare_lock_down()  # as a spare worker does while it waits for an agent
before = set(os.listdir("/proc/self/task"))
ctx = zmq.Context()
a, b = pair(ctx)  # ZeroMQ's reaper and I/O threads: cloned, not started
ran = python_thread()
late = sorted(set(os.listdir("/proc/self/task")) - before)
schedstats = [os.open(f"/proc/self/task/{tid}/schedstat", os.O_RDONLY) for tid in late]
_harden.lock_down(Limits(**json.loads(sys.argv[2])))
on_cpu = [int(os.read(fd, 200).split()[0]) for fd in schedstats]  # ns each late thread has run so far
ran.acquire()  # this thread waits: the late ones start now, under the allowlist
a.send(b"ping")
echo = b.recv()
a.close()
b.close()
ctx.term()  # the reaper and the I/O thread close the sockets and end
print(json.dumps({"late": len(late), "on_cpu_at_lock_down": on_cpu, "echo": echo.decode()}), flush=True)
"""


@pytest.mark.parametrize("start", ["fresh", "forked"])
def test_threads_that_start_after_lock_down_keep_the_worker_alive(start: str, short_root: Callable[[str], Path]) -> None:
    """ZeroMQ's threads and a Python thread, cloned just before lock-down, start only after it: a process
    hardened by the worker's own steps (a fresh interpreter, or forked the way the fork-server forks a spare
    worker) holds them back with a real-time policy on one CPU until the allowlist is in force. As each
    starts, glibc registers its rseq area and ZeroMQ reads and sets its scheduling policy; glibc aborts the
    process if the registration fails (`Fatal glibc error: rseq registration failed`, signal 6, while rseq
    was refused), ZeroMQ if its calls do (SIGSYS, while they were not allowed). Here all start and work."""
    if os.geteuid() != 0:
        pytest.skip("holding threads back with a real-time policy needs root")
    work = short_root("late") / "w"
    work.mkdir(mode=0o700)
    limits = tomllib.loads((ROOT / "policies" / "default.toml").read_text())["limits"]
    out = subprocess.run([sys.executable, "-c", _LATE_THREADS, start, json.dumps(limits)], cwd=work,
                         capture_output=True, text=True, timeout=120, check=False, env={"PYTHONSAFEPATH": "1"})
    lines = out.stdout.splitlines()
    status = out.returncode
    if start == "forked":
        assert status == 0 and lines, out.stderr
        status = os.waitstatus_to_exitcode(os.waitpid(int(lines.pop(0)), 0)[1])  # our child (CLONE_PARENT)
    assert status == 0, f"exit status {status}: {out.stderr}"
    result = json.loads(lines[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result == {"late": 3, "on_cpu_at_lock_down": [0, 0, 0], "echo": "ping"}, result


_SUPERVISOR_WITHOUT_FORK_SERVER = """
import sys
from supervisor import Supervisor
from theater.home import Home
# The real worker by another name: the supervisor then starts each one from a fresh interpreter.
Supervisor(Home(sys.argv[1]), worker_command=(sys.executable, "-m", "worker.__main__")).serve_forever()
"""
BUSY_WORKERS = {"fork-server": 96, "fresh-interpreter": 48}
BUSY_CLIENTS = 6


@pytest.mark.parametrize("start", ["fork-server", "fresh-interpreter"])
def test_many_workers_start_and_serve_with_every_core_busy(start: str, request: pytest.FixtureRequest) -> None:
    """Workers started in parallel while two spinning processes per core keep every core busy, forked by the
    fork-server (spares included) or each from a fresh interpreter: every one hardens, answers a call and
    stays up until stopped; no worker ends by itself (while rseq was refused, about 1 start in 70 on a
    loaded machine aborted with `rseq registration failed`, signal 6), and every chain verifies."""
    if start == "fork-server":
        t = request.getfixturevalue("theater")  # `python -m supervisor up`, as deployed
    else:
        t = Theater(request.getfixturevalue("short_root")("busy"))
        request.addfinalizer(t.stop)
        t.start([sys.executable, "-c", _SUPERVISOR_WITHOUT_FORK_SERVER, str(t.home.root)])
    names = [f"w{i}" for i in range(BUSY_WORKERS[start])]
    replies: dict[str, bytes | None] = {}

    def start_and_call(chunk: list[str]) -> None:
        with t.client(timeout=120) as c:
            for name in chunk:
                c.spawn(str(t.manifest(name, "echo.wat")))
            for name in chunk:
                replies[name] = c.call(name, name.encode(), timeout=60)

    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * (os.cpu_count() or 2))]
    try:
        with ThreadPoolExecutor(BUSY_CLIENTS) as pool:
            list(pool.map(start_and_call, [names[i::BUSY_CLIENTS] for i in range(BUSY_CLIENTS)]))
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    with t.client(timeout=60) as c:
        for name in names:
            c.stop(name)
    assert replies == {name: name.encode() for name in names}
    exits = {name: [r.fields() for r in records(t, name) if r.kind is Kind.EXIT] for name in names}
    ended_otherwise = {name: e for name, e in exits.items() if [x["reason"] for x in e] != ["stopped"]}
    assert not ended_otherwise, ended_otherwise
    assert_verified(t)


_LOCKED_AHEAD = """
import os
from worker._harden import seccomp
from worker._harden.confinement import Confinement

outcome = []
r, w = os.pipe()
confinement = Confinement(pid=os.getpid())
seccomp.lock_ahead(confinement)
outcome.append(f"ahead: dup2 {os.dup2(w, 50)}")  # the hand-over's dup2 passes
try:  # a loaded spare opens no file on its way to its agent: fstat is refused already
    os.fstat(w)
    outcome.append("ahead: fstat passed")
except OSError as exc:
    outcome.append(f"ahead: fstat {exc.errno}")
seccomp.close_handover(confinement)
for name, call in (("dup2", lambda: os.dup2(w, 51)), ("fstat", lambda: os.fstat(w)),
                   ("lseek", lambda: os.lseek(w, 0, os.SEEK_CUR))):
    try:
        call()
        outcome.append(f"closed: {name} passed")
    except OSError as exc:
        outcome.append(f"closed: {name} {exc.errno}")
os.write(1, "; ".join(outcome).encode())
"""


def test_a_spare_locked_down_ahead_ends_with_exactly_the_allowlist() -> None:
    """A loaded spare installs the allowlist before it has an agent, with the few calls of the hand-over
    (seccomp.HANDOVER) let through, and closes them at its agent's lock-down: each is refused in the
    allowlist itself, and the real kernel filters refuse them once closed, not before. (In a process of
    its own, with one thread, so the filters apply to the whole of it.)"""
    from worker._harden import seccomp

    assert all(seccomp.ALLOWLIST.get(name) == seccomp.EPERM for name in seccomp.HANDOVER)
    run = subprocess.run([sys.executable, "-c", _LOCKED_AHEAD], cwd=ROOT, capture_output=True, timeout=60, check=False)
    report = run.stdout.decode()
    assert run.returncode == 0, (report, run.stderr.decode()[-2000:])
    assert report == (f"ahead: dup2 50; ahead: fstat {seccomp.EPERM}; closed: dup2 {seccomp.EPERM}; "
                      f"closed: fstat {seccomp.EPERM}; closed: lseek {seccomp.EPERM}")


_SWEEP = """
import json, os, sys
from worker._harden import cgroups
from worker._harden.confinement import Prepared

prepared = Prepared()
if cgroups.prepare(prepared):
    print(json.dumps({"skip": "no cgroup v1 pids and cpu hierarchies here"}))
    sys.exit(0)
first = prepared.born_in["pids"]
cgroups.enter_next(prepared)  # this process leaves the first group, empty now
kept = first.is_dir()  # within SWEEP_EVERY_S of the last sweep: not looked at
prepared.cgroups_swept -= cgroups.SWEEP_EVERY_S
cgroups.enter_next(prepared)
print(json.dumps({"kept": kept, "removed": not first.is_dir()}))
cgroups.leave(prepared)
"""


def test_a_fork_server_sweeps_ended_workers_groups_at_most_every_few_seconds() -> None:
    """Making the next worker's group tries to remove every ended worker's empty group, which costs a spawn
    time in proportion to the workers running; a fork-server does it at most every SWEEP_EVERY_S, on the
    real cgroup hierarchy."""
    out = subprocess.run([sys.executable, "-c", _SWEEP], capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result == {"kept": True, "removed": True}
