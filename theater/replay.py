"""What ``theater replay`` hands the replay process (``python -m worker.replay``) on its stdin.

Length-prefixed parts (u32 big-endian length, then the bytes): the genesis
configuration as JSON (with ``component_sha256``, the hash the component must
have), the component's bytes, then each record of the chain, raw.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from .wire import encode_json

__all__ = ["decode_input", "encode_input"]

_LEN = struct.Struct(">I")


def encode_input(component: bytes, config: dict[str, Any], records: list[bytes]) -> bytes:
    parts = [encode_json(config), component, *records]
    return b"".join(_LEN.pack(len(p)) + p for p in parts)


def decode_input(data: bytes) -> tuple[dict[str, Any], bytes, list[bytes]]:
    """Raise ValueError if the input is cut short or lacks the config or the component."""
    parts, at = [], 0
    while at < len(data):
        if at + 4 > len(data):
            raise ValueError("replay input: a length cut short")
        (n,) = _LEN.unpack_from(data, at)
        if at + 4 + n > len(data):
            raise ValueError("replay input: a part cut short")
        parts.append(data[at + 4:at + 4 + n])
        at += 4 + n
    if len(parts) < 2:
        raise ValueError("replay input needs a config and a component")
    return json.loads(parts[0]), parts[1], parts[2:]
