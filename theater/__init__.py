"""Theater's contract: records, chains, wire frames, specs, and the client.

This package imports neither ``supervisor`` nor ``worker``; both import it, and
an auditor's verifier or a client library needs nothing else.
"""

from .chain import ChainVerifier, verify_chain
from .errors import ProtocolError, RecordError, TheaterError
from .records import Kind, Record, Signer

__all__ = [
    "ChainVerifier",
    "Kind",
    "ProtocolError",
    "Record",
    "RecordError",
    "Signer",
    "TheaterError",
    "verify_chain",
]
