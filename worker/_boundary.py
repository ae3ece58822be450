"""Bytes across the component boundary, carried as latin-1 strings (see wit/agent.wit).

Both directions are a single C-level codec call: ``bytes.decode('latin-1')``
into the guest and ``str.encode('latin-1')`` out of it. On the fast path
(``Sandbox.call_agent``) the host sees the guest string's UTF-8 bytes: ASCII
bytes are their own latin-1 text, so they pass with one ``isascii()`` scan and
no copy; anything else is transcoded.
"""

from __future__ import annotations

from ._errors import CallFailed

__all__ = ["from_guest", "from_guest_utf8", "to_guest"]


def to_guest(data: bytes) -> str:
    return data.decode("latin-1")


def from_guest(text: object, what: str, limit: int) -> bytes:
    """Convert a guest-supplied ``bytes`` value, enforcing its type, encoding and size."""
    if not isinstance(text, str):
        raise CallFailed("malformed-result", f"{what} is {type(text).__name__}, not bytes")
    if len(text) > limit:
        raise CallFailed("too-large", f"{what} of {len(text)} bytes exceeds the limit of {limit}")
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise CallFailed(
            "malformed-result",
            f"{what} has character U+{ord(text[exc.start]):04X} at {exc.start}, outside U+0000..U+00FF",
        ) from None


def from_guest_utf8(raw: bytes, what: str, limit: int) -> bytes:
    """:func:`from_guest` for a guest string given as its UTF-8 bytes (same checks, same messages)."""
    if raw.isascii():
        if len(raw) > limit:
            raise CallFailed("too-large", f"{what} of {len(raw)} bytes exceeds the limit of {limit}")
        return raw
    return from_guest(raw.decode("utf-8"), what, limit)  # wasmtime hands over valid UTF-8 only
