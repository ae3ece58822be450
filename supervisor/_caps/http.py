"""`theater:agent/http`: HTTP requests made by the supervisor on an agent's behalf.

Workers have no network. A guest's `fetch` is a host request; the supervisor
checks it against the agent's `[http]` settings (origin, method, headers,
sizes), resolves the host once, refuses an internal address unless the origin
is named in `private`, and connects to exactly the address it checked (no
second lookup, so no DNS rebinding), keeping the host name for the Host header
and for TLS. Secrets are added here, at the boundary: the guest never sees them,
and any secret value the response echoes is replaced by `{secret:NAME}` before
the guest or the record sees it. Redirects are never followed.

The request runs on a small pool of threads; the loop hands them requests,
looks for their end with a short timer and answers then. An agent has at most
one request in flight (its call waits for the answer); a tenant (the operator's
agents are one) at most half the pool, so one tenant's slow servers cannot
hold every request of the others. A request ends by its deadline, whatever the
server does: a read blocked past it is woken by shutting its socket down. A
request whose call ended (its worker died) is not made, or is cut off.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import queue
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from .._errors import ConfigError
from .._host import Answer, HostCall, HostRequests
from .._timers import Timers
from .grants import HEADER_NAME_RE, SECRET_NAME_RE, HttpGrant, Origin

__all__ = ["SECRET_BYTES", "Egress", "header_value_problem", "read_secret"]

EGRESS_THREADS = 8  # requests in flight at once, all agents together; more wait their turn
TENANT_SHARE = EGRESS_THREADS // 2  # of them, at most this many for one tenant's agents at once
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


def header_value_problem(value: bytes) -> str | None:
    """Why ``value`` cannot be an HTTP header's value (RFC 9110 field-value), or None: visible characters
    (and bytes >= 0x80), with spaces and tabs only between them."""
    if value[:1] in (b" ", b"\t") or value[-1:] in (b" ", b"\t"):
        return "it starts or ends with a space or a tab"
    if any((c < 0x20 and c != 0x09) or c == 0x7F for c in value):
        return "it holds a control character"
    return None


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


class _Job:
    """One request: made on an egress thread, answered by the loop once ``done``."""

    def __init__(self, call: HostCall, request: _Request, grant: HttpGrant, timeout: float) -> None:
        self.call, self.request, self.grant, self.timeout = call, request, grant, timeout
        self.deadline: _Deadline | None = None  # set by the thread that makes it
        self.answer: Answer | None = None
        self.done = False
        self.cancelled = False  # its call ended: the thread that takes it does not make it


class Egress:
    def __init__(self, host: HostRequests, timers: Timers, secrets_dir: Path, log: Callable[[str], None]) -> None:
        self.host = host
        self.timers = timers
        self.secrets_dir = secrets_dir
        self.log = log
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        # Daemon threads: a request still waiting on its server must not keep a stopped supervisor's process
        # alive (a pool's threads are joined at the interpreter's exit).
        self._threads = [threading.Thread(target=self._serve, name=f"egress-{i}", daemon=True)
                         for i in range(EGRESS_THREADS)]
        self._started = False
        self._waiting: dict[str, deque[_Job]] = {}  # by tenant, in the order asked
        self._running: list[_Job] = []

    def host_request(self, call: HostCall) -> Answer | None:
        if call.op != "fetch":
            return _refused("denied", f"unknown http operation {call.op!r}")
        grant: HttpGrant = call.agent.config.grant("http")
        try:
            request = _check(grant, call.args, call.data or b"")
        except Refusal as refusal:
            return _refused(refusal.case, str(refusal))
        timeout = min(grant.timeout_ms, call.agent.config.limits.wall_time_ms) / 1000
        if not self._started:
            for thread in self._threads:
                thread.start()
            self._started = True
        self._waiting.setdefault(call.agent.config.tenant, deque()).append(_Job(call, request, grant, timeout))
        idle = not self._running
        self._dispatch()
        if idle:
            self.timers.after(POLL_S, self._poll)
        return None

    def _dispatch(self) -> None:
        """Hand waiting requests to free threads, the tenants taking turns, each within its share."""
        per_tenant = Counter(job.call.agent.config.tenant for job in self._running)
        while len(self._running) < EGRESS_THREADS:
            tenant = next((t for t, jobs in self._waiting.items() if jobs and per_tenant[t] < TENANT_SHARE), None)
            if tenant is None:
                return
            jobs = self._waiting.pop(tenant)  # to the end of the turn order
            job = jobs.popleft()
            if jobs:
                self._waiting[tenant] = jobs
            if not job.call.current:  # its worker died while it waited: no one would see the answer
                job.call.answered = True
                continue
            per_tenant[tenant] += 1
            self._running.append(job)
            self._queue.put(job)

    def _serve(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                job.answer = _fetch(job, self.secrets_dir)
            except Exception as exc:  # never let a request take the supervisor down
                job.answer = _refused("failed", f"{type(exc).__name__}")
            job.done = True

    def _poll(self) -> None:
        still = []
        for job in self._running:
            if job.done:
                assert job.answer is not None
                self.host.answer(job.call, job.answer)
                continue
            if not job.call.current and not job.cancelled:  # its call ended: cut the request off
                job.cancelled = True
                if job.deadline is not None:
                    job.deadline.expire()
            still.append(job)
        self._running = still
        self._dispatch()
        if self._running:
            self.timers.after(POLL_S, self._poll)

    def close(self) -> None:
        """Cut off the requests in flight; the threads end with them (or with the process)."""
        for job in self._running:
            job.cancelled = True
            if job.deadline is not None:
                job.deadline.expire()
        self._waiting.clear()
        if self._started:
            for _ in self._threads:
                self._queue.put(None)


class _Deadline:
    """The end of one exchange, kept whatever the server does: at ``seconds``, the connection's socket is shut
    down, which wakes a read blocked on it (a server sending a byte now and then would otherwise keep each
    read inside its own timeout for ever)."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds
        self.expired = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self.expire)
        self._timer.daemon = True
        self._timer.start()

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace hook: learns the connection's socket as soon as it is connected."""
        if event == "connection.connect_tcp.complete" and info.get("return_value") is not None:
            sock = info["return_value"].get_extra_info("socket")
            with self._lock:
                self._sock = sock
                if self.expired:
                    _shut(sock)

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            if self._sock is not None:
                _shut(self._sock)

    def remaining(self) -> float:
        return max(0.001, self.at - time.monotonic())

    def cancel(self) -> None:
        self._timer.cancel()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Request:
    def __init__(self, method: str, scheme: str, host: str, port: int, target: str,
                 headers: list[tuple[str, str]], body: bytes, origin: Origin) -> None:
        self.method, self.scheme, self.host, self.port = method, scheme, host, port
        self.target, self.headers, self.body, self.origin = target, headers, body, origin


def _check(grant: HttpGrant, args: dict[str, Any], body: bytes) -> _Request:
    """The request, if the grant allows it; Refusal (with its http-error case) if not. Every ``denied`` case
    that can be seen here comes before ``too-large`` for the body (``docs/capabilities.md`` section 5); the
    bounds a worker applies before asking (host-limit) are checked again, since a worker is untrusted."""
    method, url, headers = args.get("method"), args.get("url"), args.get("headers")
    if not isinstance(method, str) or method not in grant.methods:
        raise Refusal("denied", f"method {str(method)[:16]!r} is not allowed ([http] methods = {list(grant.methods)})")
    if not isinstance(url, str) or _utf8_len(url) > MAX_URL:
        raise Refusal("denied", f"a URL is a string of at most {MAX_URL} bytes")
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
    if not isinstance(headers, list) or len(headers) > MAX_HEADERS:
        raise Refusal("denied", f"at most {MAX_HEADERS} headers")
    secret_headers = {r.header for r in grant.secrets if r.origin.admits(parts.scheme, host, port)}
    checked = []
    for pair in headers:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise Refusal("denied", "a header is a (name, value) pair of strings")
        name, value = pair
        if not HEADER_NAME_RE.fullmatch(name) or _utf8_len(value) > MAX_HEADER_VALUE \
                or any(c in value for c in "\r\n\0"):
            raise Refusal("denied", f"header {name[:64]!r} is not a valid header")
        if name.lower() in RESERVED_HEADERS or name.lower() in secret_headers:
            raise Refusal("denied", f"header {name!r} is set by the supervisor, not by the agent")
        checked.append((name, value))
    if len(body) > grant.max_request_bytes:
        raise Refusal("too-large", f"a request body of {len(body)} bytes is more than max_request_bytes "
                                   f"({grant.max_request_bytes})")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Request(method, parts.scheme, host, port, target, checked, body, origin)


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


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


def _fetch(job: _Job, secrets_dir: Path) -> Answer:
    """Runs on an egress thread: the request, and the answer for the guest (secrets redacted)."""
    if job.cancelled:
        return _refused("failed", "the call that asked has ended")
    request, grant, timeout = job.request, job.grant, job.timeout
    job.deadline = deadline = _Deadline(timeout)
    if job.cancelled:  # cancelled while the deadline was being made: the loop may have found none to expire
        deadline.cancel()
        return _refused("failed", "the call that asked has ended")
    try:
        try:
            added, secrets = _secret_headers(request, grant, secrets_dir)
            address = _resolve(request, grant)
        except Refusal as refusal:
            return _refused(refusal.case, str(refusal))
        except ConfigError as exc:
            return _refused("denied", str(exc))
        return _exchange(request, grant, address, added, secrets, deadline, timeout)
    finally:
        deadline.cancel()


def _exchange(request: _Request, grant: HttpGrant, address: str, added: list[tuple[str, str]],
              secrets: list[tuple[str, bytes]], deadline: _Deadline, timeout: float) -> Answer:
    netloc = f"[{address}]" if ":" in address else address
    url = f"{request.scheme}://{netloc}:{request.port}{request.target}"
    # As bytes (httpx would write a str as ASCII and fail on anything else): the guest's values in UTF-8, a
    # secret's header as the bytes the secret holds.
    host = request.host if request.port in (80, 443) else f"{request.host}:{request.port}"
    headers = [*((name.encode(), value.encode()) for name, value in request.headers),
               *((name.encode(), value.encode("latin-1")) for name, value in added), (b"host", host.encode())]
    asked_encoding = any(name.lower() == "accept-encoding" for name, _ in request.headers)
    if not asked_encoding:
        # The body reaches the guest as the server sent it: unencoded unless the guest asked for an encoding
        # (httpx would otherwise ask for gzip). A secret in an encoded body could not be found to redact.
        headers.append((b"accept-encoding", b"identity"))
    extensions: dict[str, Any] = {"trace": deadline.trace}
    if request.scheme == "https":
        extensions["sni_hostname"] = request.host
    limit = grant.max_response_bytes
    redact = _Redactor(secrets)
    try:
        with httpx.Client(timeout=deadline.remaining(), follow_redirects=False, trust_env=False) as client, \
                client.stream(request.method, url, headers=headers, content=request.body,
                              extensions=extensions) as response:
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if secrets and encoding != "identity":
                why = "" if asked_encoding else " though the request asked for none"
                return _refused("failed", f"the response is encoded ({encoding[:32]}){why}: a secret this request "
                                          "carries could not be kept out of it")
            chunks, size = [], 0
            for chunk in response.iter_raw():
                if deadline.expired:
                    raise httpx.ReadTimeout("deadline")
                size += len(chunk)
                if size > limit:
                    return _refused("too-large", f"the response body is more than max_response_bytes ({limit})")
                chunks.append(chunk)
            status = response.status_code
            reply_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.raw
                             if k.decode("latin-1").lower() not in HOP_BY_HOP][:MAX_HEADERS]
    except httpx.HTTPError as exc:
        if deadline.expired or isinstance(exc, httpx.TimeoutException):
            return _refused("timeout", f"no complete response from {request.host} within {int(timeout * 1000)} ms")
        return _refused("failed", redact.text(f"{type(exc).__name__}: {exc}")[:1024])
    if deadline.expired:
        return _refused("timeout", f"no complete response from {request.host} within {int(timeout * 1000)} ms")
    return Answer({"ok": True, "status": status,
                   "headers": [[redact.text(k), redact.text(v)[:MAX_HEADER_VALUE]] for k, v in reply_headers]},
                  redact.body(b"".join(chunks)))


class _Redactor:
    """Replaces each secret value a request carried with ``{secret:NAME}``: a server that echoes one must not
    hand it to the guest or the record, in a body, a header's name or value, or an error's text."""

    def __init__(self, secrets: list[tuple[str, bytes]]) -> None:
        self.secrets = [(name, value) for name, value in secrets if value]

    def body(self, data: bytes) -> bytes:
        for name, value in self.secrets:
            # Its bytes, and those a server makes of them that reads a header as latin-1 and writes UTF-8
            # (Python's http.server and WSGI do): a secret beyond ASCII comes back so.
            for form in dict.fromkeys((value, value.decode("latin-1").encode())):
                data = data.replace(form, f"{{secret:{name}}}".encode())
        return data

    def text(self, text: str) -> str:
        for name, value in self.secrets:  # as a header carries it, and as Python writes it in a bytes repr
            for form in (value.decode("latin-1"), repr(value)[2:-1]):
                text = text.replace(form, f"{{secret:{name}}}")
        return text


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
            problem = header_value_problem(secret) if secret else "it is empty"
            if problem is not None:
                raise ConfigError(f"secret {name!r} cannot go in a header: {problem} (theater secret set {name})")
            used.append((name, secret))
            value = value.replace(f"{{secret:{name}}}", secret.decode("latin-1"))
        problem = header_value_problem(value.encode("latin-1"))
        if problem is not None:
            raise ConfigError(f"the {rule.header} header of a secrets rule is not a valid header value: {problem}")
        added.append((rule.header, value))
    return added, used


def _refused(case: str, detail: str) -> Answer:
    return Answer({"ok": False, "error": case, "detail": detail[:1024]})
