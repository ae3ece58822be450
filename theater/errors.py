"""The contract's error tree.

    TheaterError
    ├── RecordError        a record is malformed, mis-signed or breaks its chain
    ├── ProtocolError      a frame is malformed, oversized or of an unknown type
    ├── BadRequest         a control request's operation is unknown or an argument is wrong
    ├── ClientError        the supervisor answered a client's request with an error (``code``)
    └── NotRunning         no supervisor answers at this home
        └── NoAnswer       the request was sent, and no answer came within the timeout
"""

from __future__ import annotations

__all__ = ["BadRequest", "ClientError", "NoAnswer", "NotRunning", "ProtocolError", "RecordError", "TheaterError"]


class TheaterError(Exception):
    """Base of every error the contract raises."""


class RecordError(TheaterError):
    """Raised when a record fails to parse, verify or link."""


class ProtocolError(TheaterError):
    """Raised when a wire frame is malformed, oversized or unexpected."""


class BadRequest(TheaterError):
    """A control request whose operation is unknown or whose arguments are wrong (error code ``refused``)."""


class ClientError(TheaterError):
    """The supervisor answered with an error. ``code`` says which kind."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class NotRunning(TheaterError):
    """No supervisor answers at this home."""


class NoAnswer(NotRunning):
    """A request went out and its answer did not come in time: the supervisor may be busy, or gone."""
