"""The supervisor's long-term key: made on first start, loaded after, and rotated under a signed statement.

A rotation must never leave a home whose key and store disagree, whatever
moment the process dies at. The new seed is first made durable beside the old
one (``supervisor.key.next``); then the statement both keys sign is committed
to the store; only then does the new seed replace the old. A starting
supervisor that finds a ``.next`` seed finishes the rotation if the store holds
its statement, and discards the seed otherwise.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from theater.checkpoint import Head, fingerprint
from theater.home import Home, write_private
from theater.rotation import Rotation

from ._checkpoints import keep_statement
from ._errors import SupervisorError
from ._record_path import RecordPath
from ._store import EventStore

__all__ = ["load_or_create_key", "rotate_key"]


def _next_seed(home: Home) -> Path:
    return home.key.with_name(home.key.name + ".next")


def load_or_create_key(home: Home, store: EventStore) -> Ed25519PrivateKey:
    """The supervisor's key: 32-byte seed, 0600, created on first start; a rotation cut short is settled."""
    pending = _next_seed(home)
    for path in (pending, home.public_key):  # what a rotation killed mid-write left (write_private's temporaries)
        path.with_name(f".{path.name}.tmp").unlink(missing_ok=True)
    if pending.exists():
        new = Ed25519PrivateKey.from_private_bytes(pending.read_bytes())
        statements = store.rotations()
        if statements and Rotation.parse(statements[-1]).new_key == new.public_key().public_bytes_raw():
            os.replace(pending, home.key)  # the statement is committed: the rotation stands
        else:
            pending.unlink()  # it never committed: the old key is still the key
    if home.key.exists():
        mode = home.key.stat().st_mode & 0o777
        if mode & 0o077:
            raise SupervisorError(f"{home.key} is readable by others (mode {mode:o}); it must be 0600")
        key = Ed25519PrivateKey.from_private_bytes(home.key.read_bytes())
    else:
        key = Ed25519PrivateKey.generate()
        fd = os.open(home.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes_raw())
    public = key.public_key().public_bytes_raw()
    if not home.public_key.exists() or home.public_key.read_bytes() != public:
        write_private(home.public_key, public)
    return key


def rotate_key(home: Home, records: RecordPath, store: EventStore, witness: Path | None,
               log: Callable[[str], None]) -> dict[str, Any]:
    """Retire the supervisor's key for a new one; what changed and where the statement went."""
    records.flush()  # every checked result is committed, and so covered by the statement's heads
    old = records.key
    new = Ed25519PrivateKey.generate()
    heads = [Head(chain, seq, hash_) for chain, seq, hash_ in store.chain_heads()]
    rotation = Rotation.make(old, new, heads, time.time_ns())
    pending = _next_seed(home)
    write_private(pending, new.private_bytes_raw())
    try:
        store.add_rotation(rotation.to_json())
    except Exception:
        pending.unlink()
        raise
    os.replace(pending, home.key)
    write_private(home.public_key, rotation.new_key)
    records.use_key(new)
    files = keep_statement(home, witness, f"rotation-{rotation.time_ns}.json", rotation.to_json().encode() + b"\n", log)
    return {"old": fingerprint(rotation.old_key), "new": fingerprint(rotation.new_key),
            "public_key": rotation.new_key.hex(), "chains": len(heads), "files": files}
