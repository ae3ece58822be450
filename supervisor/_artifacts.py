"""The compiled-artifact cache: each component compiled once per engine configuration.

    <home>/cache/                 0700
      secret                      0600  32 random bytes: the key of the tags below
      <key>.cwasm                       a serialized component (wasmtime ``Component.serialize``)
      <key>.tag                         {"key", "sha256", "size", "mac"}: HMAC-SHA256 under ``secret``

``key`` is :func:`theater.artifacts.artifact_key`: the component's SHA-256 and
every engine setting that shapes or constrains the machine code (fuel, epochs,
NaN canonicalisation, stack size, the memory settings, wasmtime's version, the
CPU target), taken from the same dictionary ``make_engine`` applies.

Artifacts are written by compile jobs the fork-server forks (they never run
guest code) and reported to the supervisor with their SHA-256; only then does
the supervisor write the tag. An artifact is offered to a worker only if its
tag verifies under this home's secret and the file's SHA-256 is the tagged one:
a file someone else planted (no tag, or a tag not made with the secret), or a
file changed after it was written (flipped bytes, truncation, replacement) is
deleted and compiled again. The hash is taken again whenever the file's
signature (device, inode, size, mtime, ctime) moves; ctime cannot be set from
user space, so an unchanged signature means unchanged bytes. The fork-server
checks the SHA-256 once more as it copies the file into the sealed memfd the
workers map, so what runs is what was hashed.

The cache keeps every artifact an agent of the home uses (its own component,
and its child templates'), and at most MAX_UNUSED_BYTES of the others, the
least recently used dropped first: swept at the supervisor's start and after
each compile. Rebuilding an agent again and again (a new component hash each
time, 30 MB each for a Python agent) would otherwise fill the disk. A dropped
artifact costs one compile if it is wanted again; workers map sealed copies,
so none is affected.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from theater.artifacts import artifact_key, file_signature
from theater.forkserver import ArtifactOffer, Compiled, CompileRequest
from theater.spec import Limits

from ._errors import SupervisorError

__all__ = ["ArtifactCache"]

TAG_DOMAIN = b"theater/artifact-tag/v1\x00"
MAX_UNUSED_BYTES = 1 << 30  # artifacts no agent uses, kept for a spawn that may want them again


@dataclass(frozen=True, slots=True)
class _Verified:
    sha256: str
    signature: list[int]
    size: int


class ArtifactCache:
    def __init__(self, root: Path, log: Callable[[str], None]) -> None:
        self.root = root
        self._log = log
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        self._secret = _load_or_create_secret(root / "secret")
        self._verified: dict[str, _Verified] = {}
        self._used_at: dict[str, float] = {}  # key -> when a spawn last asked for it (wall clock, as mtimes)
        self.compiling: set[str] = set()
        self.in_use: Callable[[], set[str]] = set  # the keys the home's agents use (set by the supervisor)

    def key(self, component_sha256: str, limits: Limits) -> str:
        return artifact_key(component_sha256, limits)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.cwasm"

    def lookup(self, key: str) -> ArtifactOffer | None:
        """The verified artifact to offer a worker, or None (then it must be compiled)."""
        self._used_at[key] = time.time()
        path = self.path(key)
        try:
            signature = file_signature(os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            self._verified.pop(key, None)
            return None
        known = self._verified.get(key)
        if known is None or known.signature != signature:
            known = self._verify(key, path)
            if known is None:
                return None
        return ArtifactOffer(key, str(path), known.sha256)

    def _verify(self, key: str, path: Path) -> _Verified | None:
        self._verified.pop(key, None)
        problem = None
        tag = self._read_tag(key)
        if tag is None:
            problem = "it has no valid tag (not written by this cache)"
        else:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as exc:
                problem = f"cannot be opened: {exc.strerror}"
            else:
                try:
                    before = file_signature(os.fstat(fd))
                    digest, size = _hash_fd(fd)
                    after = file_signature(os.fstat(fd))
                finally:
                    os.close(fd)
                if before != after:
                    problem = "it changed while it was being checked"
                elif size != tag["size"] or digest != tag["sha256"]:
                    problem = "its bytes are not the ones compiled (truncated, altered or replaced)"
                else:
                    verified = _Verified(digest, after, size)
                    self._verified[key] = verified
                    return verified
        self._log(f"cached artifact {path.name} {problem}; discarding it and compiling again")
        self.discard(key)
        return None

    def sweep(self, budget: int | None = None) -> list[str]:
        """Delete the artifacts no agent uses past ``budget`` bytes of them (MAX_UNUSED_BYTES), the least
        recently used first; the keys deleted."""
        budget = MAX_UNUSED_BYTES if budget is None else budget
        keep = self.in_use() | self.compiling
        unused: list[tuple[float, int, str]] = []
        for entry in os.scandir(self.root):
            key = entry.name.removesuffix(".cwasm")
            if key == entry.name or key in keep:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            unused.append((max(self._used_at.get(key, 0.0), st.st_mtime), st.st_size, key))
        total = sum(size for _, size, _ in unused)
        dropped = []
        for _, size, key in sorted(unused):
            if total <= budget:
                break
            self.discard(key)
            total -= size
            dropped.append(key)
        if dropped:
            self._log(f"dropped {len(dropped)} compiled artifact(s) no agent uses, the least recently used: "
                      f"the rest of them take {total:,} bytes, at most {budget:,}")
        return dropped

    def discard(self, key: str) -> None:
        self._verified.pop(key, None)
        self._used_at.pop(key, None)
        for p in (self.path(key), self.root / f"{key}.tag"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def compile_request(self, key: str, component_path: str, component_sha256: str, limits: Limits,
                        label: str) -> CompileRequest:
        self.compiling.add(key)
        return CompileRequest(key, str(self.path(key)), component_path, component_sha256, limits.as_dict(), label)

    def compiled(self, note: Compiled) -> None:
        """A compile job's report (through the fork-server): record and tag the artifact it wrote."""
        key = note.key
        self.compiling.discard(key)
        if not note.ok:
            self._log(f"compiling {key[:12]}… failed: {note.error}")
            return
        sha, size, signature = note.sha256, note.size, list(note.signature)
        try:
            self._write_tag(key, sha, size)
        except OSError as exc:  # a full disk: the artifact stays untagged, so it is compiled again next time
            self._log(f"cannot tag the artifact {key[:12]}…: {exc.strerror}; it will be compiled again")
            with contextlib.suppress(OSError):
                self.path(key).unlink()
            return
        self._verified[key] = _Verified(sha, signature, size)
        self.sweep()

    # --- tags ---------------------------------------------------------------------

    def _mac(self, key: str, sha256: str, size: int) -> str:
        message = TAG_DOMAIN + f"{key}\x00{sha256}\x00{size}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def _write_tag(self, key: str, sha256: str, size: int) -> None:
        tag = {"key": key, "sha256": sha256, "size": size, "mac": self._mac(key, sha256, size)}
        final = self.root / f"{key}.tag"
        tmp = self.root / f"{key}.tag.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(tag, f)
            os.replace(tmp, final)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def _read_tag(self, key: str) -> dict[str, Any] | None:
        try:
            with open(self.root / f"{key}.tag", "rb") as f:
                tag = json.loads(f.read(4096))
            ok = (
                isinstance(tag, dict) and tag.get("key") == key and isinstance(tag.get("sha256"), str)
                and isinstance(tag.get("size"), int) and isinstance(tag.get("mac"), str)
                and hmac.compare_digest(tag["mac"], self._mac(key, tag["sha256"], tag["size"]))
            )
        except (OSError, ValueError):
            return None
        return tag if ok else None


def _hash_fd(fd: int) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    while chunk := os.read(fd, 1 << 20):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def _load_or_create_secret(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        st = os.stat(path, follow_symlinks=False)
        if st.st_mode & 0o077:
            raise SupervisorError(f"{path} is readable by others (mode {st.st_mode & 0o777:o}); it must be 0600") from None
        secret = path.read_bytes()
        if len(secret) != 32:
            raise SupervisorError(f"{path} is not a 32-byte cache secret") from None
        return secret
    secret = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    return secret
