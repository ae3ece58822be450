"""``theater doctor``: which hardening layers work on this machine, which do not and why.

The answer comes from a real probe: ``python -m worker.probe`` is started like a
worker (empty environment, private empty working directory, own session), applies
every layer exactly as a worker does, connects back over a path ``ipc://``
socket, locks down and tries what a compromised worker would. Around that the
doctor reports the machine (kernel, privileges, container hints, the kernel
settings that decide each layer) and, for every policy it can find, whether a
worker under it would start and what it would be missing.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import zmq

from theater.spec import HARDENING_LAYERS

from ._config import load_policy, policy_dirs
from ._errors import ConfigError, SupervisorError

__all__ = ["diagnose"]

PROBE_COMMAND = (sys.executable, "-m", "worker.probe")
PROBE_TIMEOUT_S = 30.0

# Kernel settings that decide whether a layer is available, read as they are.
KNOBS = {
    "kernel.unprivileged_userns_clone": "/proc/sys/kernel/unprivileged_userns_clone",
    "user.max_user_namespaces": "/proc/sys/user/max_user_namespaces",
    "kernel.apparmor_restrict_unprivileged_userns": "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
    "kernel.seccomp.actions_avail": "/proc/sys/kernel/seccomp/actions_avail",
    "kernel.yama.ptrace_scope": "/proc/sys/kernel/yama/ptrace_scope",
}


def diagnose(home: Path | None) -> dict[str, Any]:
    """The doctor's whole answer, as the ``--json`` output shows it."""
    probe = run_probe()
    report: dict[str, str] = probe.get("report", {})
    layers = {layer: report.get(layer, "unavailable: the probe did not report it") for layer in ("hygiene", *HARDENING_LAYERS)}
    return {
        "machine": machine(),
        "layers": layers,
        "details": {k: v for k, v in sorted(report.items()) if "." in k},
        "why": {layer: explain(layer, status) for layer, status in layers.items() if status != "applied"},
        "lock_down": probe.get("lock_down", ""),
        "attempts": probe.get("attempts", {}),
        "probe_error": probe.get("error", ""),
        "policies": policies(home, layers),
    }


def machine() -> dict[str, Any]:
    uname = platform.uname()
    status = _status_fields()
    return {
        "kernel": f"{uname.system} {uname.release}",
        "arch": uname.machine,
        "python": platform.python_version(),
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "capabilities": status.get("CapEff", "?"),
        "seccomp_in_kernel": "Seccomp" in status,
        "no_new_privs_now": status.get("NoNewPrivs", "?"),
        "container_hints": container_hints(),
        "knobs": {name: _read(path) for name, path in KNOBS.items() if os.path.exists(path)},
        "cgroup_mounts": _cgroup_mounts(),
    }


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as exc:
        return f"unreadable: {exc.strerror}"


def _status_fields() -> dict[str, str]:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def _cgroup_mounts() -> list[str]:
    mounts = []
    with open("/proc/self/mounts") as f:
        for line in f:
            where, fstype = line.split()[1:3]
            if fstype in ("cgroup", "cgroup2"):
                writable = "rw" if os.access(where, os.W_OK) else "read-only for this user"
                mounts.append(f"{where} ({fstype}, {writable})")
    return mounts


def container_hints() -> list[str]:
    hints = []
    for marker in ("/.dockerenv", "/run/.containerenv"):
        if os.path.exists(marker):
            hints.append(f"{marker} exists")
    try:
        with open("/proc/1/environ", "rb") as f:
            for var in f.read().split(b"\0"):
                if var.startswith(b"container="):
                    hints.append(f"pid 1 has {var.decode(errors='replace')}")
    except OSError:
        pass
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                if parts[4] == "/":
                    fstype = parts[parts.index("-") + 1]
                    if fstype in ("overlay", "aufs", "fuse-overlayfs"):
                        hints.append(f"the root file system is {fstype}")
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/proc/self/cgroup") as f:
            nested = sorted({line.split(":", 2)[2].strip() for line in f} - {"/"})
        if nested:
            hints.append(f"this process is in cgroup {nested[0]}")
    except OSError:
        pass
    return hints


def explain(layer: str, status: str) -> str:
    """A sentence on why a layer is missing, from its status and the machine's settings."""
    root = os.geteuid() == 0
    if status == "skipped":
        return "not attempted"
    if layer == "cgroups":
        if "EACCES" in status or "EROFS" in status:
            return ("the cgroup v1 controllers are writable only by root here" if not root
                    else "the cgroup file system is read-only or not delegated to this user")
        return "per-worker groups need writable cgroup v1 pids and cpu hierarchies"
    if layer == "namespaces":
        if not root:
            return ("unprivileged user namespaces are refused (see the kernel.* and user.* knobs; "
                    "Ubuntu restricts them through AppArmor)")
        return "the kernel or the container's seccomp profile refuses unshare"
    if layer == "landlock":
        return "the kernel has no Landlock, or it is not in the lsm= boot list"
    if layer == "seccomp":
        return "the kernel has no seccomp filter support, or this machine is not x86_64"
    return status


def policies(home: Path | None, layers: dict[str, str]) -> dict[str, Any]:
    """Every policy the supervisor could use here, and what a worker under it would get."""
    out: dict[str, Any] = {}
    dirs = policy_dirs(home)
    for d in dirs:
        for path in sorted(d.glob("*.toml")) if d.is_dir() else []:
            name = path.stem
            if name in out:
                continue  # the home's policy of that name wins
            try:
                policy = load_policy(name, dirs)
            except ConfigError as exc:
                out[name] = {"error": str(exc)}
                continue
            required, preferred = policy.hardening.required, policy.hardening.preferred
            missing = {layer: layers[layer] for layer in ("hygiene", *required) if layers[layer] != "applied"}
            out[name] = {
                "required": list(required),
                "preferred": list(preferred),
                "starts": not missing,
                "missing_required": missing,
                "missing_preferred": {x: layers[x] for x in preferred if layers[x] != "applied"},
                "applied": [x for x in HARDENING_LAYERS if layers[x] == "applied"],
            }
    return out


def run_probe() -> dict[str, Any]:
    """Start a probe worker, receive its report; then remove its (and any ended worker's) cgroup."""
    limits = load_policy("default", policy_dirs(None)).limits
    ctx = zmq.Context()
    try:
        with tempfile.TemporaryDirectory(prefix="theater-doctor-") as tmp:
            os.chmod(tmp, 0o700)
            workdir = Path(tmp) / "work"
            workdir.mkdir(mode=0o700)
            sock = ctx.socket(zmq.PAIR)
            sock.linger = 0
            endpoint = f"ipc://{tmp}/probe.sock"
            sock.bind(endpoint)
            proc = subprocess.Popen(
                [*PROBE_COMMAND, endpoint, json.dumps(limits.as_dict())],
                env={"PYTHONDONTWRITEBYTECODE": "1", "PYTHONSAFEPATH": "1"}, cwd=workdir,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                start_new_session=True, umask=0o077,
            )
            try:
                result = _converse(sock, proc)
            finally:
                if proc.poll() is None:
                    proc.kill()
                stderr = proc.communicate()[1].decode(errors="replace")
                sock.close()
            if "error" in result and stderr:
                result["error"] += f"; its stderr: {stderr.strip()[-2000:]}"
            subprocess.run([*PROBE_COMMAND, "--sweep"], env={"PYTHONSAFEPATH": "1"}, cwd="/",
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=PROBE_TIMEOUT_S, check=False)
            return result
    finally:
        ctx.term()


def _converse(sock: zmq.Socket, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    timeout_ms = int(PROBE_TIMEOUT_S * 1000)
    if not sock.poll(timeout_ms):
        return {"error": f"the probe sent nothing in {PROBE_TIMEOUT_S:.0f} s (exit status {proc.poll()})"}
    sock.recv()
    sock.send(b"{}")
    if not sock.poll(timeout_ms):
        code = proc.wait(timeout=PROBE_TIMEOUT_S)
        return {"error": f"the probe died while locking down (exit status {code})"}
    try:
        result = json.loads(sock.recv())
    except ValueError as exc:
        raise SupervisorError(f"the probe's report is not JSON: {exc}") from None
    proc.wait(timeout=PROBE_TIMEOUT_S)
    return result if isinstance(result, dict) else {"error": "the probe's report is not an object"}


def render(d: dict[str, Any]) -> str:
    m = d["machine"]
    lines = [
        f"machine: {m['kernel']} {m['arch']}, Python {m['python']}, uid {m['uid']} (euid {m['euid']}), "
        f"capabilities {m['capabilities']}",
        f"container: {'; '.join(m['container_hints']) or 'no hints'}",
        "",
        f"{'LAYER':<13} STATUS",
    ]
    for layer, status in d["layers"].items():
        why = d["why"].get(layer)
        lines.append(f"{layer:<13} {status}" + (f"\n{'':<13} why: {why}" if why and why != status else ""))
    lines += ["", f"lock-down: {d['lock_down'] or '-'}"]
    if d["probe_error"]:
        lines.append(f"probe error: {d['probe_error']}")
    lines += ["", "a hardened worker that tries to:"]
    lines += [f"  {what:<24} {outcome}" for what, outcome in d["attempts"].items()]
    lines += ["", f"{'POLICY':<14} {'WORKER':<8} DETAIL"]
    for name, p in d["policies"].items():
        if "error" in p:
            lines.append(f"{name:<14} {'-':<8} {p['error']}")
            continue
        if p["starts"]:
            missing = ", ".join(p["missing_preferred"]) or "nothing"
            lines.append(f"{name:<14} {'starts':<8} applied: {', '.join(p['applied'])}; missing preferred: {missing}")
        else:
            missing = "; ".join(f"{k} ({v})" for k, v in p["missing_required"].items())
            lines.append(f"{name:<14} {'refused':<8} missing required: {missing}")
    return "\n".join(lines)
