"""The supervisor's error tree.

    SupervisorError
    ├── ConfigError        a manifest or policy is invalid (names file, key, problem)
    ├── StoreError         the event store cannot be opened, is locked or is corrupt
    ├── NotFound           no agent by that name or id
    └── Refused            a request is valid but cannot be served now (mailbox full, agent stopped…)
"""

from __future__ import annotations

__all__ = ["ConfigError", "NotFound", "Refused", "StoreError", "SupervisorError"]


class SupervisorError(Exception):
    """Base of every error the supervisor reports to a client. ``code`` travels on the wire."""

    code = "error"


class ConfigError(SupervisorError):
    code = "config"


class StoreError(SupervisorError):
    code = "store"


class NotFound(SupervisorError):
    code = "not-found"


class Refused(SupervisorError):
    code = "refused"
