"""Policies and manifests: parsed whole, validated at the door, frozen.

A policy (``policies/NAME.toml``) is a ceiling; a manifest names one and may
narrow it, never widen it. Every error names the file, the key and the problem.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import hashlib
import os
import re
import stat
import tomllib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from theater.artifacts import file_signature
from theater.capabilities import CAPABILITIES, always_granted
from theater.spec import DEFAULT_HARDENING, HARDENING_LAYERS, LIMIT_BOUNDS, MAX_HELPERS, Hardening, Limits, LoadProfile

from ._caps.grants import GRANTS, Grant, grant_from_dict, parse_grant
from ._errors import ConfigError
from ._supervision import DEFAULT_INTENSITY, DEFAULT_PERIOD_MS, DEFAULT_SHUTDOWN_MS, STRATEGIES, Flags

__all__ = [
    "AgentConfig",
    "Policy",
    "RestartSpec",
    "Retention",
    "SupervisionSpec",
    "TreeConfig",
    "config_from_dict",
    "config_to_dict",
    "load_any",
    "load_manifest",
    "load_policy",
    "policy_dirs",
]

OPERATOR = "operator"  # the tenant of the home's owner: every agent spawned over the local socket
TENANT_SEP = ":"  # between a tenant's name and its agent's name, in names the home holds
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # used with fullmatch
MAX_COMPONENT_BYTES = 256 * 1024 * 1024
MAX_INIT_ARGS_BYTES = 1024 * 1024
MAX_MANIFEST_BYTES = 1024 * 1024  # a manifest, an included manifest or a policy
MAX_NAMED_KEYS = 10  # unknown keys an error lists by name
def _builtin_policies() -> Path:
    """The built-in policies: installed beside this module (a wheel), or the checkout's policies/."""
    installed = Path(__file__).resolve().parent / "policies"
    return installed if installed.is_dir() else Path(__file__).resolve().parent.parent / "policies"


BUILTIN_POLICIES = _builtin_policies()
RESTART_TYPES = ("permanent", "transient", "temporary")


@dataclass(frozen=True, slots=True)
class Retention:
    """How much of an agent's chain the store keeps (``[retention]``): 0 is no limit. ``theater gc`` drops
    older records behind a signed compaction statement (``theater.compaction``) to stay within them."""

    max_records: int = 0
    max_bytes: int = 0

    BOUNDS: ClassVar[dict[str, tuple[int, int, str]]] = {
        "max_records": (10, 10**12, "records of a chain the store keeps"),
        "max_bytes": (64 * 1024, 2**50, "bytes of a chain the store keeps"),
    }

    @property
    def limited(self) -> bool:
        return bool(self.max_records or self.max_bytes)

    def as_dict(self) -> dict[str, int]:
        return {"max_records": self.max_records, "max_bytes": self.max_bytes}


NO_RETENTION = Retention()


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    description: str
    capabilities: tuple[str, ...]
    limits: Limits
    hardening: Hardening = DEFAULT_HARDENING
    retention: Retention = NO_RETENTION
    grants: dict[str, Grant] = field(default_factory=dict, hash=False)  # capability -> its settings


SHUTDOWN_INFINITY = -1  # `shutdown = "infinity"`, as stored in a configuration's `shutdown_ms`


@dataclass(frozen=True, slots=True)
class RestartSpec:
    """A child's restart spec, as in OTP.

    ``type``: permanent | transient | temporary. ``shutdown_ms``: how long a
    stop waits before it kills (None: brutal_kill, kill at once). ``from_state``:
    a restart resumes from the last committed state or from the initial one.
    ``intensity``/``period_ms`` apply when the agent runs at the top level,
    where it behaves as the only child of its own one_for_one supervisor.
    """

    type: str = "permanent"
    intensity: int = DEFAULT_INTENSITY
    period_ms: int = DEFAULT_PERIOD_MS
    shutdown_ms: int | None = DEFAULT_SHUTDOWN_MS  # None: brutal_kill; SHUTDOWN_INFINITY: wait for as long as it takes
    from_state: str = "last"

    @property
    def kill_after_ms(self) -> int | None:
        """The engine's view: how long a stop waits before it kills (0: at once; None: never)."""
        if self.shutdown_ms is None:
            return 0
        return None if self.shutdown_ms == SHUTDOWN_INFINITY else self.shutdown_ms

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, "intensity": self.intensity, "period_ms": self.period_ms,
                "shutdown_ms": self.shutdown_ms, "from_state": self.from_state}


@dataclass(frozen=True, slots=True)
class TreeConfig:
    """A supervisor node: flags and ordered children (agents or further supervisors)."""

    name: str
    flags: Flags
    restart: RestartSpec
    children: tuple[AgentConfig | TreeConfig, ...]
    tenant: str = OPERATOR

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "flags": self.flags.as_dict(), "restart": self.restart.as_dict(),
                "children": [c.name for c in self.children], **_tenant_entry(self.tenant)}

    def walk(self) -> list[AgentConfig | TreeConfig]:
        out: list[AgentConfig | TreeConfig] = [self]
        for child in self.children:
            out.extend(child.walk() if isinstance(child, TreeConfig) else [child])
        return out


@dataclass(frozen=True, slots=True)
class SupervisionSpec:
    """An agent's own supervisor flags and the child templates its guest may spawn from."""

    flags: Flags
    templates: tuple[AgentConfig, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"flags": self.flags.as_dict(), "templates": [t.as_dict() for t in self.templates]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SupervisionSpec:
        return cls(Flags(**data["flags"]), tuple(AgentConfig.from_dict(t) for t in data["templates"]))


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """A manifest resolved against its policy: exactly what an agent runs with."""

    name: str
    component_path: str
    component_sha256: str
    policy: str
    capabilities: tuple[str, ...]
    limits: Limits
    restart: RestartSpec
    init_args: bytes
    supervision: SupervisionSpec | None = None
    hardening: Hardening = DEFAULT_HARDENING
    grants: dict[str, Grant] = field(default_factory=dict, hash=False)  # capability -> its settings
    retention: Retention = NO_RETENTION
    tenant: str = OPERATOR  # whose agent it is (docs/tenancy.md); the genesis signs it
    helpers: tuple[tuple[str, str], ...] = ()  # (path, sha256): components linked beside it (a composed agent)

    def grant(self, capability: str) -> Any:
        """The settings of a granted capability that has them (``_caps.grants``)."""
        return self.grants[capability]

    @property
    def load_profile(self) -> LoadProfile:
        """What its worker loads: the spawn request's profile and its SPEC's (``theater.spec.LoadProfile``)."""
        return LoadProfile(self.component_path, self.component_sha256, self.capabilities, self.limits,
                           self.hardening, self.helpers)

    def as_dict(self) -> dict[str, Any]:
        return {
            "grants": {cap: grant.as_dict() for cap, grant in self.grants.items()},
            "supervision": self.supervision.as_dict() if self.supervision else None,
            "name": self.name,
            "component_path": self.component_path,
            "component_sha256": self.component_sha256,
            "policy": self.policy,
            "capabilities": list(self.capabilities),
            "limits": self.limits.as_dict(),
            "restart": self.restart.as_dict(),
            "init_args": self.init_args.decode("latin-1"),
            "hardening": self.hardening.as_dict(),
            **({"retention": self.retention.as_dict()} if self.retention.limited else {}),
            **_tenant_entry(self.tenant),
            **({"helpers": [{"path": p, "sha256": h} for p, h in self.helpers]} if self.helpers else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AgentConfig:
        return cls(
            name=data["name"],
            component_path=data["component_path"],
            component_sha256=data["component_sha256"],
            policy=data["policy"],
            capabilities=tuple(data["capabilities"]),
            limits=Limits.from_dict(data["limits"]),
            restart=RestartSpec(**data["restart"]),
            init_args=data["init_args"].encode("latin-1"),
            supervision=SupervisionSpec.from_dict(data["supervision"]) if data.get("supervision") else None,
            hardening=Hardening.from_dict(data["hardening"]) if "hardening" in data else DEFAULT_HARDENING,
            grants={cap: grant_from_dict(cap, g) for cap, g in data.get("grants", {}).items()},
            retention=Retention(**data["retention"]) if "retention" in data else NO_RETENTION,
            tenant=data.get("tenant", OPERATOR),
            helpers=tuple((h["path"], h["sha256"]) for h in data.get("helpers", [])),
        )

    def template(self, name: str) -> AgentConfig | None:
        if self.supervision is None:
            return None
        return next((t for t in self.supervision.templates if t.name == name), None)


class _Table:
    """Reads one TOML table, remembering which keys were used, so leftovers are errors."""

    def __init__(self, path: Path, data: dict[str, Any], prefix: str = "") -> None:
        self.path, self.data, self.prefix = path, data, prefix
        self.used: set[str] = set()

    def err(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: {self.prefix}{key}: {problem}")

    def get(self, key: str, typ: type | tuple[type, ...], default: Any = ..., *, required: bool = False) -> Any:
        self.used.add(key)
        if key not in self.data:
            if required or default is ...:
                typo = difflib.get_close_matches(key, [str(k) for k in self.data], n=1, cutoff=0.7)
                if typo:  # the key is there, misspelled: say that, not that it is missing
                    raise ConfigError(f"{self.path}: unknown key {self.prefix}{typo[0][:64]} "
                                      f"(did you mean {self.prefix}{key}?)")
                raise ConfigError(f"{self.path}: missing required key {self.prefix}{key}")
            return default
        value = self.data[key]
        # bool is an int subclass in Python; TOML booleans are never integers here.
        if (isinstance(value, bool) and bool not in _as_tuple(typ)) or not isinstance(value, typ):
            names = "/".join(t.__name__ for t in _as_tuple(typ))
            raise self.err(key, f"must be {_article(names)}, got {type(value).__name__} {value!r}")
        return value

    def table(self, key: str) -> _Table:
        value = self.get(key, dict, {})
        return _Table(self.path, value, f"{self.prefix}{key}.")

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            near = difflib.get_close_matches(str(unknown[0]), sorted(self.used), n=1, cutoff=0.7)
            hint = f" (did you mean {self.prefix}{near[0]}?)" if near else ""
            raise ConfigError(f"{self.path}: unknown key {self.prefix}{str(unknown[0])[:64]}{hint}" + _also(unknown))


def _as_tuple(typ: type | tuple[type, ...]) -> tuple[type, ...]:
    return typ if isinstance(typ, tuple) else (typ,)


def _article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def _also(unknown: list[str]) -> str:
    """The other unknown keys, at most ``MAX_NAMED_KEYS`` of them: an error must stay readable."""
    rest = unknown[1:]
    if not rest:
        return ""
    shown = ", ".join(key[:64] for key in rest[:MAX_NAMED_KEYS])
    more = f" and {len(rest) - MAX_NAMED_KEYS} more" if len(rest) > MAX_NAMED_KEYS else ""
    return f" (also: {shown}{more})"


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def resolved(path: Path) -> Path:
    """``path`` made absolute with its links followed. A path no file can have (a NUL, a lone surrogate escape)
    or a loop of links is a ConfigError, named with anything unprintable escaped."""
    try:
        resolved_path = path.resolve()
        os.fsencode(resolved_path)  # a lone surrogate cannot be a file's name
        return resolved_path
    except (ValueError, RuntimeError, OSError) as exc:  # UnicodeEncodeError is a ValueError
        why = "a symlink loop" if isinstance(exc, RuntimeError) else NO_SUCH_PATH if isinstance(exc, ValueError) \
            else exc.strerror or str(exc)
        raise ConfigError(f"{_shown(path)}: cannot read: {why}") from None


NO_SUCH_PATH = "not a path a file can have"


def _shown(path: Path) -> str:
    """A path as an error names it: a lone surrogate escape in it written out, not carried into the reply."""
    return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


def open_regular(path: Path, cap: int) -> int:
    """A descriptor on ``path`` if it is a regular file of at most ``cap`` bytes (symlinks followed).

    The open never blocks (O_NONBLOCK: a FIFO opens at once) and the check is on the
    opened descriptor, so no client request can stall the supervisor's loop or make
    it read a device without end. Raises ConfigError naming the file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except ValueError:  # a NUL or a lone surrogate escape: no file has such a name
        raise ConfigError(f"{_shown(path)}: cannot read: {NO_SUCH_PATH}") from None
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:  # a loop of links is found here where resolve() leaves it be (Python 3.13)
        why = "a symlink loop" if exc.errno == errno.ELOOP else exc.strerror
        raise ConfigError(f"{path}: cannot read: {why}") from None
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "not a file")
        problem = f"is {kind}, not a regular file"
    elif st.st_size > cap:
        problem = f"is {st.st_size} bytes, more than {cap}"
    if problem is not None:
        os.close(fd)
        raise ConfigError(f"{path}: {problem}")
    return fd


def _read_toml(path: Path) -> dict[str, Any]:
    return _parse_file(path, _read_file(path))


def _read_file(path: Path) -> bytes:
    fd = open_regular(path, MAX_MANIFEST_BYTES)
    try:
        chunks, size = [], 0
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_MANIFEST_BYTES:
                raise ConfigError(f"{path}: is more than {MAX_MANIFEST_BYTES} bytes")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def _parse_file(path: Path, data: bytes) -> dict[str, Any]:
    try:
        return _parse_toml(data.decode("utf-8"), path)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: it is not UTF-8") from None


def _parse_toml(text: str, label: Path | str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label}: not valid TOML: {str(exc)[:256]}") from None
    except RecursionError:
        raise ConfigError(f"{label}: not valid TOML here: its tables or arrays are nested too deeply") from None


UPLOADED = Path("<uploaded manifest>")  # how errors name a manifest a tenant sent as text


def load_uploaded(text: str, component: Path, dirs: list[Path]) -> AgentConfig:
    """An agent manifest sent as text with its component (a tenant's spawn), resolved as :func:`load_manifest`
    resolves one on disk. Its ``component`` keys (the agent's, and its child templates', which must name the
    same file) are replaced by ``component``: an uploaded manifest can reach no file of the supervisor's."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise ConfigError(f"{UPLOADED}: is more than {MAX_MANIFEST_BYTES} characters")
    data = _parse_toml(text, UPLOADED)
    top = _Table(UPLOADED, data)
    if _is_tree(top):
        raise ConfigError(f"{UPLOADED}: a supervisor manifest (strategy/children) names other files; "
                          "send one agent manifest per spawn")
    declared = top.get("component", str, required=True)
    if "helpers" in data:
        raise top.err("helpers", "name other files: an uploaded manifest carries one component")
    supervision = data.get("supervision")
    templates = supervision.get("templates", []) if isinstance(supervision, dict) else []
    if not isinstance(templates, list):
        raise top.err("supervision.templates", "must be an array of tables")
    for i, t in enumerate(templates):
        if isinstance(t, dict) and t.get("component", declared) != declared:
            raise top.err(f"supervision.templates[{i}].component",
                          f"must name the agent's own component ({declared!r}): an uploaded manifest carries one")
        if isinstance(t, dict):
            t["component"] = str(component)
    data["component"] = str(component)
    config = _agent(top, component.parent, dirs)
    top.finish()
    return config


def _limits(table: _Table, ceiling: Limits | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, (low, high, what) in LIMIT_BOUNDS.items():
        if key not in table.data:
            continue
        value = table.get(key, int)
        if not low <= value <= high:
            raise table.err(key, f"{value} is out of range {low}..{high} ({what})")
        if ceiling is not None and value > getattr(ceiling, key):
            raise table.err(key, f"{value} exceeds the policy's ceiling {getattr(ceiling, key)}; a manifest may only narrow its policy")
        out[key] = value
    table.used.update(LIMIT_BOUNDS)  # every limit is a known key, set or not: an unknown one is told the nearest
    table.finish()
    return out


def _capabilities(table: _Table, allowed: tuple[str, ...] | None) -> tuple[str, ...]:
    """The listed capabilities, known and within ``allowed``; the always-granted ones first if not listed."""
    always = list(always_granted())
    caps = table.get("capabilities", list, always)
    for cap in caps:
        if not isinstance(cap, str) or cap not in CAPABILITIES:
            raise table.err("capabilities", f"unknown capability {cap!r} (known: {', '.join(CAPABILITIES)})")
        if allowed is not None and cap not in allowed:
            raise table.err("capabilities", f"{cap!r} is not granted by the policy; a manifest may only narrow its policy")
    return tuple(dict.fromkeys([*(cap for cap in always if cap not in caps), *caps]))


def policy_dirs(home: Path | None) -> list[Path]:
    """Where policy names are looked up: the home's ``policies/`` first, then the built-in ones."""
    dirs = [home / "policies"] if home is not None else []
    return [*dirs, BUILTIN_POLICIES]


def load_policy(name: str, dirs: list[Path]) -> Policy:
    if not NAME_RE.fullmatch(name):
        raise ConfigError(f"policy name {name!r} is not a plain name (a-z, 0-9, '-', '_')")
    for d in dirs:
        path = d / f"{name}.toml"
        if path.exists() or path.is_symlink():  # whatever it is: reading it says what is wrong with it
            break
    else:
        known = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.toml")})
        near = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f" (did you mean {near[0]!r}?)" if near else f" (known: {', '.join(known)})" if known else ""
        raise ConfigError(f"no policy named {name!r} in {', '.join(map(str, dirs))}{hint}")
    data = _read_file(path)
    key = (name, str(path), data)
    policy = _POLICIES.get(key)
    if policy is None:
        policy = _POLICIES[key] = _policy(name, path, data)
        while len(_POLICIES) > MAX_CACHED_POLICIES:
            _POLICIES.popitem(last=False)
    _POLICIES.move_to_end(key)
    return policy


# Policies as parsed, by name, path and the file's bytes: a policy file is read at every spawn (a tree of
# 100 children reads it 100 times) and parsed again only when its bytes changed. Policy is immutable.
MAX_CACHED_POLICIES = 32
_POLICIES: OrderedDict[tuple[str, str, bytes], Policy] = OrderedDict()


def _policy(name: str, path: Path, data: bytes) -> Policy:
    top = _Table(path, _parse_file(path, data))
    description = top.get("description", str, "")
    caps = _capabilities(top, None)
    values = _limits(top.table("limits"), None)
    missing = sorted(set(LIMIT_BOUNDS) - set(values))
    if missing:
        raise ConfigError(f"{path}: [limits] must set every limit; missing {', '.join(missing)}")
    hardening = _hardening(top.table("hardening"), None)
    grants = _grants(top, caps, {})
    retention = _retention(top.table("retention"), None)
    top.finish()
    return Policy(name=name, description=description, capabilities=caps, limits=Limits(**values), hardening=hardening,
                  grants=grants, retention=retention)


def _retention(table: _Table, policy: Retention | None) -> Retention:
    """A policy's ``[retention]`` (``policy`` None), or a manifest's, which may set a limit its policy lacks
    or lower one it has."""
    values = {}
    for key, (low, high, what) in Retention.BOUNDS.items():
        ceiling = getattr(policy, key) if policy is not None else 0
        value = table.get(key, int, ceiling)
        if value != 0 and not low <= value <= high:
            raise table.err(key, f"{value} is out of range {low}..{high} ({what}), or 0 for no limit")
        if ceiling and not 0 < value <= ceiling:
            raise table.err(key, f"{value} exceeds the policy's {ceiling}; a manifest may only narrow its policy "
                                 "(0 is no limit)")
        values[key] = value
    table.finish()
    return Retention(**values)


def _grants(top: _Table, caps: tuple[str, ...], ceiling: dict[str, Grant]) -> dict[str, Grant]:
    """Each granted capability's settings table (``_caps.grants``), within ``ceiling`` (a manifest's policy's)."""
    grants = {}
    for cap in GRANTS:
        if cap in caps:
            grants[cap] = parse_grant(cap, top.table(cap), ceiling.get(cap))
        elif cap in top.data:
            raise top.err(cap, f"settings for the {cap} capability, which is not granted here")
    return grants


def config_to_dict(config: AgentConfig | TreeConfig) -> dict[str, Any]:
    """A whole tree (or one agent) as JSON-able data, as stored and as shown."""
    if isinstance(config, AgentConfig):
        return {"kind": "agent", **config.as_dict()}
    return {"kind": "supervisor", "name": config.name, "flags": config.flags.as_dict(),
            "restart": config.restart.as_dict(), "children": [config_to_dict(c) for c in config.children],
            **_tenant_entry(config.tenant)}


def config_from_dict(data: dict[str, Any]) -> AgentConfig | TreeConfig:
    if data["kind"] == "agent":
        return AgentConfig.from_dict(data)
    return TreeConfig(name=data["name"], flags=Flags(**data["flags"]), restart=RestartSpec(**data["restart"]),
                      children=tuple(config_from_dict(c) for c in data["children"]),
                      tenant=data.get("tenant", OPERATOR))


def _tenant_entry(tenant: str) -> dict[str, str]:
    """The operator's own configurations carry no tenant key: they read as they did before tenants."""
    return {} if tenant == OPERATOR else {"tenant": tenant}


def with_tenant(config: AgentConfig | TreeConfig, tenant: str) -> AgentConfig | TreeConfig:
    """A configuration (a tree: every member, an agent: its child templates too) as ``tenant``'s: each name
    gets the tenant's prefix (``acme:counter``), so names of different tenants never collide or reveal each
    other. The operator's configurations are returned as they are."""
    if tenant == OPERATOR:
        return config
    name = f"{tenant}{TENANT_SEP}{config.name}"
    if isinstance(config, TreeConfig):
        return dataclasses.replace(config, name=name, tenant=tenant,
                                   children=tuple(with_tenant(c, tenant) for c in config.children))
    supervision = config.supervision
    if supervision is not None:  # templates keep their short names: a child is named after its parent
        supervision = dataclasses.replace(
            supervision, templates=tuple(dataclasses.replace(t, tenant=tenant) for t in supervision.templates))
    return dataclasses.replace(config, name=name, tenant=tenant, supervision=supervision)


_DIGESTS: OrderedDict[str, tuple[list[int], str]] = OrderedDict()  # path -> (file signature, SHA-256)
MAX_DIGESTS = 256


def component_digest(path: Path) -> str:
    """The file's SHA-256, hashed again only when the file changed since it was last hashed here.

    A spawn or restart of an agent with an 18 MB Python component would otherwise
    spend ~15 ms hashing the same bytes every time; ``file_signature`` changes on
    any write, truncation or replacement of the file.
    """
    with os.fdopen(open_regular(path, MAX_COMPONENT_BYTES), "rb") as f:
        signature = file_signature(os.fstat(f.fileno()))
        known = _DIGESTS.get(str(path))
        if known is not None and known[0] == signature:
            _DIGESTS.move_to_end(str(path))
            return known[1]
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    remember_digest(path, signature, digest)
    return digest


def remember_digest(path: Path, signature: list[int], digest: str) -> None:
    """Keep the SHA-256 of the file at ``path`` as it is at ``signature``: one hashed here, or a tenant's
    upload hashed as it was written, which the spawn that follows then does not read again."""
    _DIGESTS[str(path)] = (signature, digest)
    while len(_DIGESTS) > MAX_DIGESTS:
        _DIGESTS.popitem(last=False)


def load_manifest(path: Path, dirs: list[Path]) -> AgentConfig:
    """Parse an agent manifest, resolve its policy and component, and apply its narrowing."""
    config = load_any(path, dirs)
    if isinstance(config, TreeConfig):
        raise ConfigError(f"{resolved(path)}: is a supervisor manifest (it has strategy/children), not an agent manifest")
    return config


def load_any(path: Path, dirs: list[Path], _seen: tuple[Path, ...] = ()) -> AgentConfig | TreeConfig:
    """Parse an agent manifest or a supervisor (tree) manifest, children included."""
    path = resolved(path)
    if path in _seen:
        raise ConfigError(f"{path}: includes itself through its children")
    top = _Table(path, _read_toml(path))
    config = _node(top, path.parent, dirs, (*_seen, path))
    top.finish()
    names = [c.name for c in config.walk()] if isinstance(config, TreeConfig) else [config.name]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{path}: names must be unique in a tree; repeated: {', '.join(dupes)}")
    return config


def _is_tree(table: _Table) -> bool:
    return "strategy" in table.data or "children" in table.data


def _node(top: _Table, base: Path, dirs: list[Path], seen: tuple[Path, ...]) -> AgentConfig | TreeConfig:
    if _is_tree(top):
        return _tree(top, base, dirs, seen)
    return _agent(top, base, dirs)


def _tree(top: _Table, base: Path, dirs: list[Path], seen: tuple[Path, ...]) -> TreeConfig:
    name = _name(top)
    flags = _flags(top)
    restart = _restart(top.table("restart"), default_shutdown="infinity")
    entries = top.get("children", list, [])
    if not entries:
        raise top.err("children", "a supervisor needs at least one child")
    children: list[AgentConfig | TreeConfig] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise top.err(f"children[{i}]", "must be a table")
        table = _Table(top.path, entry, f"{top.prefix}children[{i}].")
        if "manifest" in entry:
            ref = table.get("manifest", str)
            table.finish()
            children.append(load_any(base / ref, dirs, seen))
        else:
            children.append(_node(table, base, dirs, seen))
            table.finish()
    return TreeConfig(name=name, flags=flags, restart=restart, children=tuple(children))


def _flags(table: _Table) -> Flags:
    """A supervisor's flags, as a tree manifest or an agent's [supervision] table writes them."""
    strategy = table.get("strategy", str, "one_for_one")
    if strategy not in STRATEGIES:
        raise table.err("strategy", f"{strategy!r} is not one of {', '.join(STRATEGIES)}")
    intensity = _ranged(table, "intensity", DEFAULT_INTENSITY, 0, 1000)
    period = _ranged(table, "period_ms", DEFAULT_PERIOD_MS, 1, 86_400_000)
    return Flags(strategy, intensity, period)


def _ranged(table: _Table, key: str, default: int, low: int, high: int) -> int:
    value: int = table.get(key, int, default)
    if not low <= value <= high:
        raise table.err(key, f"{value} is out of range {low}..{high}")
    return value


def _name(top: _Table) -> str:
    name = top.get("name", str, required=True)
    if not NAME_RE.fullmatch(name):
        raise top.err("name", f"{name!r} must be 1-63 characters of a-z, 0-9, '-', '_', starting with a letter or digit")
    return name


def _agent(top: _Table, base: Path, dirs: list[Path]) -> AgentConfig:
    name = _name(top)
    component_rel = top.get("component", str, required=True)
    try:
        policy = load_policy(top.get("policy", str, "default"), dirs)
    except ConfigError as exc:
        if str(exc).startswith(("policy name", "no policy named")):  # the manifest's key is what is wrong
            raise top.err("policy", str(exc)) from None
        raise
    init_args = top.get("init_args", str, "")
    try:
        init_bytes = init_args.encode("latin-1")
    except UnicodeEncodeError:
        raise top.err("init_args", "must be bytes written as characters U+0000..U+00FF") from None
    if len(init_bytes) > MAX_INIT_ARGS_BYTES:
        raise top.err("init_args", f"is {len(init_bytes)} bytes, more than {MAX_INIT_ARGS_BYTES}")
    caps = _capabilities(top, policy.capabilities)
    narrowed = _limits(top.table("limits"), policy.limits)
    restart = _restart(top.table("restart"), default_shutdown=DEFAULT_SHUTDOWN_MS)
    hardening = _hardening(top.table("hardening"), policy.hardening)
    grants = _grants(top, caps, policy.grants)
    retention = _retention(top.table("retention"), policy.retention)

    component = resolved(base / component_rel)
    if component.suffix not in (".wasm", ".wat"):
        raise top.err("component", f"{component_rel!r} must name a .wasm or .wat file")
    try:
        digest = component_digest(component)
    except ConfigError as exc:
        problem = str(exc).removeprefix(f"{component}: ")
        if problem == "no such file":
            raise top.err("component", f"{component} does not exist") from None
        raise top.err("component", f"{component} {problem}") from None
    except OSError as exc:
        raise top.err("component", f"cannot read {component}: {exc.strerror}") from None
    helpers = _helper_components(top, base)
    limits = Limits(**{**policy.limits.as_dict(), **narrowed})
    if len(init_bytes) > limits.max_message_bytes:
        raise top.err("init_args", f"is {len(init_bytes)} bytes, more than max_message_bytes {limits.max_message_bytes}")
    supervision = None
    if "supervision" in top.data:
        if "supervision" not in caps:
            raise top.err("supervision", "needs the supervision capability (capabilities = [\"runtime\", \"supervision\"])")
        supervision = _supervision(top.table("supervision"), base, dirs, caps, limits)
    return AgentConfig(
        name=name,
        component_path=str(component),
        component_sha256=digest,
        policy=policy.name,
        capabilities=caps,
        limits=limits,
        restart=restart,
        init_args=init_bytes,
        supervision=supervision,
        hardening=hardening,
        grants=grants,
        retention=retention,
        helpers=helpers,
    )


def _helper_components(top: _Table, base: Path) -> tuple[tuple[str, str], ...]:
    """``helpers``: components linked beside the agent's own, whose exported interfaces it may import."""
    refs = top.get("helpers", list, [])
    if len(refs) > MAX_HELPERS:
        raise top.err("helpers", f"at most {MAX_HELPERS} helper components")
    out = []
    for i, ref in enumerate(refs):
        if not isinstance(ref, str):
            raise top.err(f"helpers[{i}]", "must be the path of a .wasm file")
        path = resolved(base / ref)
        if path.suffix != ".wasm":
            raise top.err(f"helpers[{i}]", f"{ref!r} must name a .wasm component")
        try:
            out.append((str(path), component_digest(path)))
        except ConfigError as exc:
            raise top.err(f"helpers[{i}]", str(exc).removeprefix(f"{path}: ")) from None
        except OSError as exc:
            raise top.err(f"helpers[{i}]", f"cannot read {path}: {exc.strerror}") from None
    return tuple(out)


def _hardening(table: _Table, policy: Hardening | None) -> Hardening:
    """A policy's ``[hardening]`` (``policy`` None), or a manifest's, which may only add required layers.

    Layers a policy names in neither list are preferred; without the table a
    policy gets ``DEFAULT_HARDENING``.
    """
    if policy is None and not table.data:
        return DEFAULT_HARDENING
    if policy is not None and "preferred" in table.data:
        raise table.err("preferred", "a manifest may only add required layers; what is preferred is its policy's")
    required = _layers(table, "required")
    preferred = _layers(table, "preferred") if policy is None else ()
    both = sorted(set(required) & set(preferred))
    if both:
        raise table.err("required", f"{', '.join(both)} cannot be both required and preferred")
    table.finish()
    if policy is not None:
        required = (*policy.required, *required)
    kept = [layer for layer in HARDENING_LAYERS if layer in required]
    return Hardening(required=tuple(kept), preferred=tuple(x for x in HARDENING_LAYERS if x not in kept))


def _layers(table: _Table, key: str) -> tuple[str, ...]:
    names = table.get(key, list, [])
    for name in names:
        if not isinstance(name, str) or name not in HARDENING_LAYERS:
            raise table.err(key, f"unknown hardening layer {name!r} (known: {', '.join(HARDENING_LAYERS)})")
    if len(set(names)) != len(names):
        raise table.err(key, "names a layer twice")
    return tuple(names)


def _supervision(table: _Table, base: Path, dirs: list[Path], caps: tuple[str, ...], ceiling: Limits) -> SupervisionSpec:
    """Child templates must not exceed their parent: same or fewer capabilities, limits at most the parent's."""
    flags = _flags(table)
    entries = table.get("templates", list, [])
    templates: list[AgentConfig] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise table.err(f"templates[{i}]", "must be a table")
        t = _Table(table.path, entry, f"{table.prefix}templates[{i}].")
        template = _agent(t, base, dirs)
        t.finish()
        wider = [k for k, v in template.limits.as_dict().items() if v > getattr(ceiling, k)]
        if wider:
            raise t.err("limits", f"{', '.join(wider)} exceed the parent's; a child may not have more than its parent")
        extra = sorted(set(template.capabilities) - set(caps))
        if extra:
            raise t.err("capabilities", f"{', '.join(extra)} not held by the parent")
        templates.append(template)
    names = [t.name for t in templates]
    if len(set(names)) != len(names):
        raise table.err("templates", "template names must be unique")
    table.finish()
    return SupervisionSpec(flags, tuple(templates))


def _restart(table: _Table, *, default_shutdown: int | str) -> RestartSpec:
    typ = table.get("type", str, "permanent")
    if typ not in RESTART_TYPES:
        raise table.err("type", f"{typ!r} is not one of {', '.join(RESTART_TYPES)}")
    intensity = _ranged(table, "intensity", DEFAULT_INTENSITY, 0, 1000)
    period = _ranged(table, "period_ms", DEFAULT_PERIOD_MS, 1, 86_400_000)
    shutdown = table.get("shutdown", (int, str), default_shutdown)
    if isinstance(shutdown, str) and shutdown not in ("brutal_kill", "infinity"):
        raise table.err("shutdown", f"{shutdown!r} must be a timeout in ms, \"brutal_kill\" or \"infinity\"")
    if isinstance(shutdown, int) and not 0 <= shutdown <= 3_600_000:
        raise table.err("shutdown", f"{shutdown} is out of range 0..3600000")
    from_state = table.get("from", str, "last")
    if from_state not in ("last", "initial"):
        raise table.err("from", f"{from_state!r} must be \"last\" (last committed state) or \"initial\"")
    table.finish()
    shutdown_ms = None if shutdown == "brutal_kill" else SHUTDOWN_INFINITY if shutdown == "infinity" else shutdown
    return RestartSpec(type=typ, intensity=intensity, period_ms=period, shutdown_ms=shutdown_ms, from_state=from_state)
