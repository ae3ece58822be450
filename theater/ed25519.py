"""Strict Ed25519 public keys: what OpenSSL's verify lets through and the record format does not.

OpenSSL (through ``cryptography``) rejects a signature whose ``S`` is not
below the group order, but accepts public keys of small order (the identity
point among them, under which the signature ``R = identity, S = 0`` verifies
for every message) and non-canonical encodings of a point. A worker key of
that kind would let anyone forge that worker's records, so a key is refused
unless it is the canonical encoding of a point of large order.
``docs/event-records.md`` section 2 states the rule for independent verifiers.
"""

from __future__ import annotations

import functools

import nacl.bindings
import nacl.exceptions
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["key_weakness", "sign", "valid"]

_SIGNATURE_BYTES = 64


# Signing and verifying on the record path go through libsodium (PyNaCl): measured here, its verify takes
# 53 µs against OpenSSL's 102 µs and its sign 19 µs against 32 µs, for the same RFC 8032 signatures (both
# refuse an S at or above the group order; libsodium also refuses small-order keys and R, which the record
# format refuses anyway). Keys stay cryptography objects everywhere else.


_last_secret: tuple[Ed25519PrivateKey, bytes] | None = None  # a process signs with one key at a time


def sign(key: Ed25519PrivateKey, message: bytes) -> bytes:
    """The 64-byte Ed25519 signature of ``message`` under ``key``."""
    global _last_secret
    if _last_secret is None or _last_secret[0] is not key:
        _last_secret = (key, key.private_bytes_raw() + key.public_key().public_bytes_raw())
    return nacl.bindings.crypto_sign(message, _last_secret[1])[:_SIGNATURE_BYTES]


def valid(key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is ``key``'s signature of ``message``."""
    if len(signature) != _SIGNATURE_BYTES:
        return False
    try:
        nacl.bindings.crypto_sign_open(signature + message, key.public_bytes_raw())
    except nacl.exceptions.BadSignatureError:
        return False
    return True

_P = 2**255 - 19
_D = (-121665 * pow(121666, -1, _P)) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


@functools.lru_cache(maxsize=256)
def key_weakness(raw: bytes) -> str | None:
    """Why ``raw`` is not acceptable as a 32-byte Ed25519 public key, or None if it is.

    Every key a worker makes passes libsodium's check (a canonical encoding of a point of the prime-order
    subgroup, not of small order), which is stricter than the rule and takes 32 µs; anything else is judged
    by the rule itself, in Python (0.2 ms), which also names what is wrong. The same key is checked again as
    its record is linked into the chain, so recent answers are kept.
    """
    if len(raw) != 32:
        return f"is {len(raw)} bytes, not 32"
    if nacl.bindings.crypto_core_ed25519_is_valid_point(raw):
        return None
    encoded = int.from_bytes(raw, "little")
    y, sign = encoded & ((1 << 255) - 1), encoded >> 255
    if y >= _P:
        return "is a non-canonical encoding (y is not below p)"
    x = _recover_x(y, sign)
    if x is None:
        return "is not the encoding of a curve point"
    if x == 0 and sign:
        return "is a non-canonical encoding (x is zero with its sign bit set)"
    if _times_eight_is_identity(x, y):
        return "is a point of small order (its signatures can be forged)"
    return None


def _recover_x(y: int, sign: int) -> int | None:
    """RFC 8032 section 5.1.3, steps 2-4."""
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x = (u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P)) % _P
    if (v * x * x - u) % _P != 0:
        x = (x * _SQRT_M1) % _P
        if (v * x * x - u) % _P != 0:
            return None
    if x != 0 and (x & 1) != sign:
        x = _P - x
    return x


def _times_eight_is_identity(x: int, y: int) -> bool:
    """Three doublings in affine coordinates (RFC 8032's addition law with both points equal)."""
    for _ in range(3):
        xy = x * y % _P
        denominator_x = (1 + _D * xy * xy) % _P
        denominator_y = (1 - _D * xy * xy) % _P
        x, y = (2 * xy * pow(denominator_x, -1, _P)) % _P, ((y * y + x * x) * pow(denominator_y, -1, _P)) % _P
    return x == 0 and y == 1
