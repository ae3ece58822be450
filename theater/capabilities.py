"""Capabilities: the host interfaces an agent can be granted, by name.

A capability is one interface of the WIT package ``theater:agent``
(``wit/agent.wit``), and its name is the interface's name in the package:
``supervision`` is ``theater:agent/supervision@0.1.0``. The name is what
policies and manifests list under ``capabilities``, what the supervisor sends
in the spec's ``capabilities``, and what a HOST_REQUEST names in its
``interface`` key (``docs/wire-protocol.md`` section 4.7). An
``always_granted`` capability is given to every agent, whatever its manifest
lists.

Both sides read this table: the supervisor to check policies and manifests,
the worker to find the host module that implements each capability
(``worker/_caps/``). Adding a capability adds one entry here
(``docs/wit.md`` section 6.3).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CAPABILITIES", "NOT_GRANTED", "PACKAGE", "Capability", "always_granted"]

PACKAGE = "theater:agent"
# How a worker's load failure for an import that is not linked begins: `NOT_GRANTED: <interfaces> (granted: …)`.
# The supervisor, which knows the agent's policy and manifest, adds which of them leaves each one out.
NOT_GRANTED = "component imports capabilities not granted to this agent"


@dataclass(frozen=True, slots=True)
class Capability:
    name: str  # the policy key, and the interface's name in the package
    interface: str  # the WIT interface, with its package and version
    always_granted: bool = False

    def __post_init__(self) -> None:
        if not self.interface.startswith(f"{PACKAGE}/{self.name}@"):
            raise ValueError(f"capability {self.name!r} must be the interface {PACKAGE}/{self.name}@<version>")


CAPABILITIES: dict[str, Capability] = {
    cap.name: cap
    for cap in (
        Capability("runtime", "theater:agent/runtime@0.1.0", always_granted=True),
        Capability("supervision", "theater:agent/supervision@0.1.0"),
        Capability("messaging", "theater:agent/messaging@0.1.0"),
        Capability("kv", "theater:agent/kv@0.1.0"),
        Capability("timers", "theater:agent/timers@0.1.0"),
        Capability("http", "theater:agent/http@0.1.0"),
    )
}


def always_granted() -> tuple[str, ...]:
    """The names of the capabilities every agent has, in table order."""
    return tuple(name for name, cap in CAPABILITIES.items() if cap.always_granted)
