"""The contract's error tree.

    TheaterError
    ├── RecordError        a record is malformed, mis-signed or breaks its chain
    └── ProtocolError      a frame is malformed, oversized or of an unknown type
"""

from __future__ import annotations

__all__ = ["ProtocolError", "RecordError", "TheaterError"]


class TheaterError(Exception):
    """Base of every error the contract raises."""


class RecordError(TheaterError):
    """Raised when a record fails to parse, verify or link."""


class ProtocolError(TheaterError):
    """Raised when a wire frame is malformed, oversized or unexpected."""
