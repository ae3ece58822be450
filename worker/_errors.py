"""Worker-side failure classes.

    CallFailed            one call failed; the worker carries on
      status: out-of-fuel | deadline | memory | stack-overflow | trap |
              guest-error | host-limit | malformed-result | too-large
    HostLimit             a host function refused the guest (a policy limit); the call fails
                          with status host-limit
    LoadError             the component cannot be run as an agent (fatal)
      HardeningFailed     the OS confinement the agent's policy requires is not in force (fatal)
"""

from __future__ import annotations

__all__ = ["CallFailed", "HardeningFailed", "HostLimit", "LoadError"]


class CallFailed(Exception):
    """A call did not produce a committed outcome; the worker discards the instance either way."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class HostLimit(Exception):
    """A host import refused a guest request that exceeds a policy limit."""


class LoadError(Exception):
    """The component is not a valid theater:agent component, or cannot be instantiated.

    ``reason`` is the FAULT frame's reason.
    """

    reason = "load-failed"


class HardeningFailed(LoadError):
    """A layer the policy requires is unavailable, or a reported layer could not be completed."""

    reason = "hardening-failed"
