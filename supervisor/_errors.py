"""The supervisor's error tree: every exception the supervisor defines is here.

    SupervisorError        reported to a client; ``code`` travels on the wire
    ├── ConfigError        a manifest or policy is invalid (names file, key, problem)
    ├── StoreError         the event store cannot be opened, is locked or is corrupt
    │   └── StoreUnavailable   it cannot be written now (a full disk): work that needs it is refused
    ├── NotFound           no agent by that name or id
    └── Refused            a request is valid but cannot be served now (mailbox full, agent stopped…)
    Violation              a worker broke the protocol: it is killed and the violation recorded
    ZygoteGone             the fork-server died, hung or refused: workers start from a fresh interpreter
"""

from __future__ import annotations

__all__ = ["SHUTTING_DOWN", "ConfigError", "NotFound", "Refused", "StoreError", "StoreUnavailable", "SupervisorError",
           "Violation", "ZygoteGone"]

SHUTTING_DOWN = "the supervisor is shutting down"  # what Refused says of work that `down` ended or never began


class SupervisorError(Exception):
    """Base of every error the supervisor reports to a client. ``code`` travels on the wire."""

    code = "error"


class ConfigError(SupervisorError):
    code = "config"


class StoreError(SupervisorError):
    code = "store"


class StoreUnavailable(StoreError):
    """Work that needs the event store is refused while it cannot be written (a full disk…)."""


class NotFound(SupervisorError):
    code = "not-found"


class Refused(SupervisorError):
    code = "refused"


class Violation(Exception):
    """A worker broke the protocol. ``evidence`` is what it sent (bounded)."""

    def __init__(self, reason: str, evidence: bytes = b"") -> None:
        super().__init__(reason)
        self.reason = reason
        self.evidence = evidence[:4096]


class ZygoteGone(Exception):
    """The fork-server did not answer: it died, hung, or refused."""
