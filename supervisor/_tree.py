"""Supervision decisions, OTP semantics, as pure functions of the tree and ``now``.

The supervisor loop executes what these decide: which children to stop (in
reverse start order) and which to start again (in start order) when a child
exits, and when a supervisor has restarted too often and must give up.
Reference: Erlang/OTP ``supervisor`` (strategies, restart types, intensity).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ABNORMAL_OK",
    "STRATEGIES",
    "Flags",
    "Plan",
    "add_restart",
    "is_abnormal",
    "plan_restart",
    "should_restart",
]

STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one")
# Exit reasons that are not crashes: OTP's `normal` and `shutdown`.
ABNORMAL_OK = ("normal", "shutdown", "stopped")


@dataclass(frozen=True, slots=True)
class Flags:
    """A supervisor's flags: strategy, and at most ``intensity`` restarts per ``period_ms``."""

    strategy: str = "one_for_one"
    intensity: int = 3
    period_ms: int = 5000

    def as_dict(self) -> dict[str, object]:
        return {"strategy": self.strategy, "intensity": self.intensity, "period_ms": self.period_ms}


@dataclass(frozen=True, slots=True)
class Plan:
    """Stop ``stop`` one by one (already in reverse start order), then start ``start`` in order."""

    stop: tuple[str, ...]
    start: tuple[str, ...]
    remove: tuple[str, ...]  # temporary children that leave the supervisor for good


def is_abnormal(reason: str) -> bool:
    return reason not in ABNORMAL_OK


def should_restart(restart_type: str, reason: str) -> bool:
    """permanent: always; transient: only after an abnormal exit; temporary: never."""
    if restart_type == "permanent":
        return True
    if restart_type == "transient":
        return is_abnormal(reason)
    return False


def add_restart(history: list[float], now: float, period_ms: int, intensity: int) -> tuple[list[float], bool]:
    """OTP's restart intensity: keep restarts inside the period; False once there are more than ``intensity``."""
    window = period_ms / 1000
    kept = [t for t in history if now - t < window] + [now]
    return kept, len(kept) <= intensity


def plan_restart(
    strategy: str,
    children: list[str],
    failed: str,
    running: set[str],
    temporary: set[str],
) -> Plan:
    """What restarting ``failed`` means under ``strategy``.

    ``children`` is the start order; ``running`` the children still alive
    (``failed`` is not); temporary siblings that are stopped are not started
    again, as in OTP.
    """
    if strategy == "one_for_one":
        return Plan(stop=(), start=(failed,), remove=())
    if strategy == "one_for_all":
        affected = [c for c in children if c != failed]
    elif strategy == "rest_for_one":
        affected = children[children.index(failed) + 1 :]
    else:  # pragma: no cover - validated at load
        raise ValueError(strategy)
    stop = tuple(c for c in reversed(affected) if c in running)
    again = set(affected) | {failed}
    start = tuple(c for c in children if c in again and (c == failed or c not in temporary))
    remove = tuple(c for c in affected if c in temporary and c in running)
    return Plan(stop=stop, start=start, remove=remove)
