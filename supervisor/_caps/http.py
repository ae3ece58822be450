"""`theater:agent/http`: HTTP requests made by the supervisor on an agent's behalf.

Workers have no network. A guest's `fetch` is a host request; the supervisor
checks it against the agent's `[http]` settings (origin, method, headers,
sizes), resolves the host once, refuses an internal address unless the origin
is named in `private`, and connects to exactly the address it checked (no
second lookup, so no DNS rebinding), keeping the host name for the Host header
and for TLS. Secrets are added here, at the boundary: the guest never sees them,
and any secret value the response echoes is replaced by `{secret:NAME}` before
the guest or the record sees it. Redirects are never followed.

The request runs on a small thread pool; the loop checks for its end with a
short timer and answers then. An agent has at most one request in flight: its
call waits for the answer.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from .._errors import ConfigError
from .._host import Answer, HostCall, HostRequests
from .._timers import Timers
from .grants import HEADER_NAME_RE, SECRET_NAME_RE, HttpGrant, Origin

__all__ = ["SECRET_BYTES", "Egress", "read_secret"]

EGRESS_THREADS = 8  # requests in flight at once, all agents together; more wait their turn
POLL_S = 0.005  # how often the loop looks for finished requests while any is in flight
MAX_HEADERS = 64
MAX_HEADER_VALUE = 8192
MAX_URL = 8192
SECRET_BYTES = 64 * 1024
# Set by the supervisor from the request alone, never by a guest.
RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade",
                              "te", "trailer", "proxy-authorization", "proxy-connection"})
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
                        "proxy-authenticate", "proxy-authorization"})


class Refusal(Exception):
    def __init__(self, case: str, detail: str) -> None:
        super().__init__(detail)
        self.case = case


def read_secret(secrets_dir: Path, name: str) -> bytes:
    """A secret's value from the home (``secrets/NAME``); raise ConfigError naming it (never its value)."""
    if not SECRET_NAME_RE.fullmatch(name):
        raise ConfigError(f"{name!r} is not a secret name")
    try:
        fd = os.open(secrets_dir / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        raise ConfigError(f"no secret named {name!r} in {secrets_dir} (theater secret set {name})") from None
    with os.fdopen(fd, "rb") as f:
        value = f.read(SECRET_BYTES + 1)
    if len(value) > SECRET_BYTES:
        raise ConfigError(f"secret {name!r} is larger than {SECRET_BYTES} bytes")
    return value


class Egress:
    def __init__(self, host: HostRequests, timers: Timers, secrets_dir: Path, log: Callable[[str], None]) -> None:
        self.host = host
        self.timers = timers
        self.secrets_dir = secrets_dir
        self.log = log
        self._pool = ThreadPoolExecutor(EGRESS_THREADS, thread_name_prefix="egress")
        self._running: list[tuple[HostCall, Future[Answer]]] = []

    def host_request(self, call: HostCall) -> Answer | None:
        if call.op != "fetch":
            return _refused("denied", f"unknown http operation {call.op!r}")
        grant: HttpGrant = call.agent.config.grant("http")
        try:
            request = _check(grant, call.args, call.data or b"")
        except Refusal as refusal:
            return _refused(refusal.case, str(refusal))
        timeout = min(grant.timeout_ms, call.agent.config.limits.wall_time_ms) / 1000
        job = self._pool.submit(_fetch, request, grant, self.secrets_dir, timeout)
        self._running.append((call, job))
        if len(self._running) == 1:
            self.timers.after(POLL_S, self._poll)
        return None

    def _poll(self) -> None:
        still = []
        for call, job in self._running:
            if not job.done():
                still.append((call, job))
                continue
            try:
                answer = job.result()
            except Exception as exc:  # never let a request take the supervisor down
                answer = _refused("failed", f"{type(exc).__name__}: {exc}"[:1024])
            self.host.answer(call, answer)
        self._running = still
        if still:
            self.timers.after(POLL_S, self._poll)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Request:
    def __init__(self, method: str, scheme: str, host: str, port: int, target: str,
                 headers: list[tuple[str, str]], body: bytes, origin: Origin) -> None:
        self.method, self.scheme, self.host, self.port = method, scheme, host, port
        self.target, self.headers, self.body, self.origin = target, headers, body, origin


def _check(grant: HttpGrant, args: dict[str, Any], body: bytes) -> _Request:
    """The request, if the grant allows it; Refusal (with its http-error case) if not."""
    method, url, headers = args.get("method"), args.get("url"), args.get("headers")
    if not isinstance(method, str) or method not in grant.methods:
        raise Refusal("denied", f"method {str(method)[:16]!r} is not allowed ([http] methods = {list(grant.methods)})")
    if not isinstance(url, str) or len(url) > MAX_URL:
        raise Refusal("denied", f"a URL is a string of at most {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise Refusal("denied", f"not a URL: {exc}") from None
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host or parts.username is not None or parts.password is not None:
        raise Refusal("denied", "a URL is http:// or https://, a host, and no user or password")
    origin = next((o for o in grant.allow if o.admits(parts.scheme, host, port)), None)
    if origin is None:
        raise Refusal("denied", f"{parts.scheme}://{host}:{port} is not allowed ([http] allow)")
    if len(body) > grant.max_request_bytes:
        raise Refusal("too-large", f"a request body of {len(body)} bytes is more than max_request_bytes "
                                   f"({grant.max_request_bytes})")
    if not isinstance(headers, list) or len(headers) > MAX_HEADERS:
        raise Refusal("denied", f"at most {MAX_HEADERS} headers")
    secret_headers = {r.header for r in grant.secrets if r.origin.admits(parts.scheme, host, port)}
    checked = []
    for pair in headers:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise Refusal("denied", "a header is a (name, value) pair of strings")
        name, value = pair
        if not HEADER_NAME_RE.fullmatch(name) or len(value) > MAX_HEADER_VALUE or any(c in value for c in "\r\n\0"):
            raise Refusal("denied", f"header {name[:64]!r} is not a valid header")
        if name.lower() in RESERVED_HEADERS or name.lower() in secret_headers:
            raise Refusal("denied", f"header {name!r} is set by the supervisor, not by the agent")
        checked.append((name, value))
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Request(method, parts.scheme, host, port, target, checked, body, origin)


def internal(address: str) -> bool:
    """An address a request must not reach unless its origin is named in `private`."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return bool(ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
                or ip.is_unspecified or not ip.is_global)


def _resolve(request: _Request, grant: HttpGrant) -> str:
    """The one address the request goes to, checked."""
    try:
        infos = socket.getaddrinfo(request.host, request.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise Refusal("failed", f"cannot resolve {request.host}: {exc}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise Refusal("failed", f"{request.host} has no address")
    private_ok = any(o.admits(request.scheme, request.host, request.port) for o in grant.private)
    bad = [a for a in addresses if internal(a)]
    if bad and not private_ok:
        raise Refusal("private-address", f"{request.host} resolves to {bad[0]}, an internal address; the policy "
                                         "does not name this origin in [http] private")
    return addresses[0]


def _fetch(request: _Request, grant: HttpGrant, secrets_dir: Path, timeout: float) -> Answer:
    """Runs on the egress pool: the request, and the answer for the guest (secrets redacted)."""
    try:
        added, secrets = _secret_headers(request, grant, secrets_dir)
        address = _resolve(request, grant)
    except Refusal as refusal:
        return _refused(refusal.case, str(refusal))
    except ConfigError as exc:
        return _refused("denied", str(exc))
    netloc = f"[{address}]" if ":" in address else address
    url = f"{request.scheme}://{netloc}:{request.port}{request.target}"
    headers = [*request.headers, *added, ("host", request.host if request.port in (80, 443)
                                          else f"{request.host}:{request.port}")]
    extensions = {"sni_hostname": request.host} if request.scheme == "https" else {}
    limit = grant.max_response_bytes
    try:
        with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client, \
                client.stream(request.method, url, headers=headers, content=request.body,
                              extensions=extensions) as response:
            chunks, size = [], 0
            for chunk in response.iter_raw():
                size += len(chunk)
                if size > limit:
                    return _refused("too-large", f"the response body is more than max_response_bytes ({limit})")
                chunks.append(chunk)
            status = response.status_code
            reply_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.raw
                             if k.decode("latin-1").lower() not in HOP_BY_HOP][:MAX_HEADERS]
    except httpx.TimeoutException:
        return _refused("timeout", f"no complete response from {request.host} within {int(timeout * 1000)} ms")
    except httpx.HTTPError as exc:
        return _refused("failed", f"{type(exc).__name__}: {exc}"[:1024])
    body = b"".join(chunks)
    for name, value in secrets:  # a server that echoes a secret must not hand it to the guest or the record
        if value:
            body = body.replace(value, f"{{secret:{name}}}".encode())
            reply_headers = [(k, v.replace(value.decode("latin-1"), f"{{secret:{name}}}")) for k, v in reply_headers]
    return Answer({"ok": True, "status": status, "headers": [[k, v[:MAX_HEADER_VALUE]] for k, v in reply_headers]},
                  body)


def _secret_headers(request: _Request, grant: HttpGrant,
                    secrets_dir: Path) -> tuple[list[tuple[str, str]], list[tuple[str, bytes]]]:
    """The headers the policy's secrets rules add for this request, and the secrets they use."""
    added, used = [], []
    for rule in grant.secrets:
        if not rule.origin.admits(request.scheme, request.host, request.port):
            continue
        value = rule.value
        for name in rule.names:
            secret = read_secret(secrets_dir, name)
            if any(c in secret for c in b"\r\n\0"):
                raise ConfigError(f"secret {name!r} holds a line break or NUL: it cannot go in a header")
            used.append((name, secret))
            value = value.replace(f"{{secret:{name}}}", secret.decode("latin-1"))
        added.append((rule.header, value))
    return added, used


def _refused(case: str, detail: str) -> Answer:
    return Answer({"ok": False, "error": case, "detail": detail[:1024]})
