"""What a worker is told to run: the agent spec the supervisor sends in its SPEC frame.

Both sides import it; the supervisor builds it from a manifest and a policy,
the worker applies it. Bounds here are the absolute ranges any policy may use.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .capabilities import CAPABILITIES
from .errors import ProtocolError

__all__ = ["DEFAULT_HARDENING", "HARDENING_LAYERS", "LIMIT_BOUNDS", "AgentSpec", "Hardening", "Limits", "LoadProfile",
           "field_values"]

KIB = 1024
MIB = 1024 * KIB

# name -> (minimum, maximum, what it bounds)
LIMIT_BOUNDS: dict[str, tuple[int, int, str]] = {
    "memory_bytes": (64 * KIB, 4096 * MIB, "linear memory per agent, bytes"),
    "fuel_per_call": (1_000, 10**12, "wasm fuel for one call"),
    "wall_time_ms": (1, 3_600_000, "wall-clock deadline of one call, ms"),
    "max_message_bytes": (0, 64 * MIB, "largest message or reply, bytes"),
    "max_state_bytes": (0, 64 * MIB, "largest committed state, bytes"),
    "max_logs_per_call": (0, 10_000, "log lines in one call"),
    "max_log_bytes": (1, 64 * KIB, "one log line, bytes"),
    "max_host_calls_per_call": (0, 100_000, "recorded host calls (now, random...) in one call"),
    "max_random_bytes": (0, MIB, "one random-bytes request, bytes"),
    "stack_bytes": (64 * KIB, 2 * MIB, "wasm stack, bytes"),
    "table_elements": (0, 10_000_000, "wasm table elements"),
    "instances": (1, 10_000, "core instances in a component"),
    "mailbox": (1, 1_000_000, "queued messages per agent"),
    "max_children": (0, 10_000, "children an agent may supervise at once (supervision capability)"),
}


_NAMES: dict[type, tuple[str, ...]] = {}


def field_values(obj: Any) -> dict[str, Any]:
    """A dataclass's fields by name, one level deep: ``dataclasses.asdict`` copies every value recursively,
    at about ten times the cost, on a spawn's way (the spec, the fork-server's request)."""
    names = _NAMES.get(type(obj))
    if names is None:
        names = _NAMES[type(obj)] = tuple(f.name for f in fields(obj))
    return {name: getattr(obj, name) for name in names}


@dataclass(frozen=True, slots=True)
class Limits:
    memory_bytes: int
    fuel_per_call: int
    wall_time_ms: int
    max_message_bytes: int
    max_state_bytes: int
    max_logs_per_call: int
    max_log_bytes: int
    max_host_calls_per_call: int
    max_random_bytes: int
    stack_bytes: int
    table_elements: int
    instances: int
    mailbox: int
    max_children: int

    def as_dict(self) -> dict[str, int]:
        return field_values(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Limits:
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            raise ProtocolError(f"limits must have exactly the keys {sorted(names)}")
        for name, value in data.items():
            low, high, _ = LIMIT_BOUNDS[name]
            if type(value) is not int or not low <= value <= high:
                raise ProtocolError(f"limit {name} must be an integer in {low}..{high}")
        return cls(**data)


# OS confinement layers a worker applies to itself (worker/_harden/, docs/hardening.md).
HARDENING_LAYERS = ("rlimits", "no_new_privs", "seccomp", "landlock", "namespaces", "cgroups")


@dataclass(frozen=True, slots=True)
class Hardening:
    """Which confinement layers must be in force for an agent to run.

    A worker applies every layer the machine allows, whatever the policy says.
    A ``required`` layer that is unavailable stops the agent from starting; a
    ``preferred`` one is reported. Layers named in neither list are preferred.
    """

    required: tuple[str, ...]
    preferred: tuple[str, ...]

    def as_dict(self) -> dict[str, list[str]]:
        return {"required": list(self.required), "preferred": list(self.preferred)}

    @classmethod
    def from_dict(cls, data: Any) -> Hardening:
        if not isinstance(data, dict) or set(data) != {"required", "preferred"}:
            raise ProtocolError("hardening must have exactly the keys ['preferred', 'required']")
        lists = []
        for key in ("required", "preferred"):
            value = data[key]
            if not isinstance(value, list) or any(v not in HARDENING_LAYERS for v in value) or len(set(value)) != len(value):
                raise ProtocolError(f"hardening {key} must be a list of distinct layers from {list(HARDENING_LAYERS)}")
            lists.append(tuple(value))
        if set(lists[0]) & set(lists[1]):
            raise ProtocolError("a hardening layer cannot be both required and preferred")
        return cls(*lists)


DEFAULT_HARDENING = Hardening(
    required=("rlimits", "no_new_privs", "seccomp"), preferred=("landlock", "namespaces", "cgroups")
)


MAX_HELPERS = 8  # components linked beside an agent's own


def _helpers(data: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(data, list) or len(data) > MAX_HELPERS or not all(
            isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in data):
        raise ProtocolError(f"helpers must be at most {MAX_HELPERS} [path, sha256] pairs")
    return tuple((h[0], h[1]) for h in data)


@dataclass(frozen=True, slots=True)
class LoadProfile:
    """What loading an agent's component depends on, and nothing of the agent itself.

    Two agents with equal profiles load into identical sandboxes, so a spare
    worker can load one ahead, before it knows which agent it will run (the
    fork-server's loaded spares, ``docs/wire-protocol.md`` section 3a).
    """

    component_path: str
    component_sha256: str
    capabilities: tuple[str, ...]
    limits: Limits
    hardening: Hardening = DEFAULT_HARDENING
    helpers: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "component_path": self.component_path, "component_sha256": self.component_sha256,
            "capabilities": list(self.capabilities), "limits": self.limits.as_dict(),
            "hardening": self.hardening.as_dict(), "helpers": [list(h) for h in self.helpers],
        }

    @classmethod
    def from_json(cls, data: Any) -> LoadProfile:
        if not isinstance(data, dict) or set(data) != _PROFILE_KEYS:
            raise ProtocolError(f"a load profile has exactly the keys {sorted(_PROFILE_KEYS)}")
        try:
            return cls._parse(data, data["helpers"], "load profile")
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed load profile: {exc!r}") from None

    @classmethod
    def _parse(cls, data: dict[str, Any], helpers: Any, what: str) -> LoadProfile:
        """The profile's keys of ``data`` (a profile's or a SPEC's), each checked; KeyError, TypeError or
        ValueError for a missing or mistyped one."""
        caps = tuple(data["capabilities"])
        if any(c not in CAPABILITIES for c in caps):
            raise ProtocolError(f"{what} grants unknown capabilities {caps}")
        return cls(str(data["component_path"]), str(data["component_sha256"]), caps, Limits.from_dict(data["limits"]),
                   Hardening.from_dict(data["hardening"]), _helpers(helpers))


_PROFILE_KEYS = {"component_path", "component_sha256", "capabilities", "limits", "hardening", "helpers"}


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """Everything a worker needs; sent once, right after the worker's hello."""

    agent_id: str
    name: str
    component_path: str
    component_sha256: str
    capabilities: tuple[str, ...]
    limits: Limits
    head_seq: int
    head_hash: str
    state_hash: str
    hardening: Hardening = DEFAULT_HARDENING
    helpers: tuple[tuple[str, str], ...] = ()  # (path, sha256) of components linked beside it (composed agents)

    @classmethod
    def of(cls, profile: LoadProfile, *, agent_id: str, name: str, head_seq: int, head_hash: str,
           state_hash: str) -> AgentSpec:
        """The spec of one agent that loads ``profile``."""
        return cls(agent_id=agent_id, name=name, head_seq=head_seq, head_hash=head_hash, state_hash=state_hash,
                   **field_values(profile))

    @property
    def profile(self) -> LoadProfile:
        return LoadProfile(**{name: getattr(self, name) for name in _PROFILE_KEYS})

    def to_json(self) -> dict[str, Any]:
        data = field_values(self)
        data["limits"] = self.limits.as_dict()
        data["capabilities"] = list(self.capabilities)
        data["hardening"] = self.hardening.as_dict()
        if self.helpers:  # absent when there are none: a spec reads as it did before composed agents
            data["helpers"] = [list(h) for h in self.helpers]
        else:
            del data["helpers"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AgentSpec:
        try:
            profile = LoadProfile._parse(data, data.get("helpers", []), "spec")
            return cls.of(profile, agent_id=str(data["agent_id"]), name=str(data["name"]),
                          head_seq=int(data["head_seq"]), head_hash=str(data["head_hash"]),
                          state_hash=str(data["state_hash"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed agent spec: {exc!r}") from None
