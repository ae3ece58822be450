"""Reaching a supervisor on another machine: a tenant's credentials file and its CurveZMQ keys.

The operator makes the file with ``theater tenant add`` and hands it to the
tenant; it is all a client needs (``theater --remote FILE ps``). It holds the
tenant's secret key: keep it as you would an SSH key.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeGuard

import zmq
import zmq.utils.z85 as z85

from .errors import TheaterError

__all__ = ["Credentials", "keypair", "read_upload", "valid_key"]

MAX_CREDENTIALS_BYTES = 4096


def keypair() -> tuple[str, str]:
    """A new CurveZMQ key pair, (public, secret), each Z85 (40 characters)."""
    public, secret = zmq.curve_keypair()
    return public.decode(), secret.decode()


def valid_key(text: object) -> TypeGuard[str]:
    if not isinstance(text, str) or len(text) != 40:
        return False
    try:
        return len(z85.decode(text)) == 32
    except (ValueError, KeyError, IndexError):
        return False


@dataclass(frozen=True, slots=True)
class Credentials:
    endpoint: str  # tcp://HOST:PORT of the supervisor's control API
    server_key: str  # the supervisor's CurveZMQ public key: the client checks it is talking to that one
    tenant: str
    public_key: str
    secret_key: str

    def dump(self) -> bytes:
        return json.dumps({"theater_credentials": 1, **asdict(self)}, indent=2).encode() + b"\n"

    @classmethod
    def load(cls, path: Path) -> Credentials:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            raise TheaterError(f"{path}: cannot open the credentials file: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise TheaterError(f"{path}: a credentials file must be a regular file")
            data = f.read(MAX_CREDENTIALS_BYTES + 1)
        if len(data) > MAX_CREDENTIALS_BYTES:
            raise TheaterError(f"{path}: more than {MAX_CREDENTIALS_BYTES} bytes: not a credentials file")
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise TheaterError(f"{path}: not a credentials file (not JSON)") from None
        if not isinstance(body, dict) or body.get("theater_credentials") != 1:
            raise TheaterError(f"{path}: not a credentials file (no \"theater_credentials\": 1)")
        names = ("endpoint", "server_key", "tenant", "public_key", "secret_key")
        unknown = sorted(set(body) - {"theater_credentials", *names})
        if unknown:
            raise TheaterError(f"{path}: unknown keys {', '.join(unknown)}")
        for name in names:
            if not isinstance(body.get(name), str):
                raise TheaterError(f"{path}: {name} must be a string")
        for name in ("server_key", "public_key", "secret_key"):
            if not valid_key(body[name]):
                raise TheaterError(f"{path}: {name} is not a CurveZMQ key in Z85 (40 characters)")
        if not body["endpoint"].startswith("tcp://"):
            raise TheaterError(f"{path}: endpoint must be tcp://HOST:PORT")
        return cls(**{name: body[name] for name in names})


def read_upload(manifest: Path) -> tuple[str, bytes, str]:
    """What a tenant's spawn sends: the manifest's text, its component's bytes and their kind (wasm or wat)."""
    import tomllib

    try:
        text = manifest.read_text()
        data = tomllib.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise TheaterError(f"{manifest}: cannot read the manifest: {exc}") from None
    ref = data.get("component")
    if not isinstance(ref, str):
        raise TheaterError(f"{manifest}: component must name the agent's .wasm or .wat file")
    path = (manifest.parent / ref).resolve()
    kind = path.suffix.lstrip(".")
    if kind not in ("wasm", "wat"):
        raise TheaterError(f"{manifest}: component {ref!r} must be a .wasm or .wat file")
    try:
        return text, path.read_bytes(), kind
    except OSError as exc:
        raise TheaterError(f"{manifest}: cannot read its component {path}: {exc.strerror}") from None
