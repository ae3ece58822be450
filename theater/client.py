"""A client of a running supervisor, over its control socket.

Every request carries the home's control token; the socket lives in a 0700
directory, so only the owning user can reach it.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from . import control, wire
from .errors import ClientError, NoAnswer, NotRunning, TheaterError
from .home import Home
from .records import Record
from .remote import Credentials, read_upload

__all__ = ["Client", "ClientError", "NoAnswer", "NotRunning"]

_HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_SUCCEEDED)


def supervisor_gone(home: Home) -> bool:
    """The supervisor was killed: its pid file names a process that no longer exists (or a zombie), or
    nothing listens on its control socket. Anything less certain (no pid file, a process we may not
    signal) is left to the request's own timeout."""
    try:
        pid = int(home.pid_file.read_text().strip())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[-1].split()[0] == b"Z":  # killed, not yet reaped
                return True
    except (OSError, IndexError):
        pass
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(home.control_sock))
    except (ConnectionRefusedError, FileNotFoundError):
        return True  # a socket file with no one behind it
    except OSError:
        return False
    finally:
        probe.close()
    return False


_REQUEST_HEADER = wire.header(wire.ClientType.REQUEST)
_REPLY_HEADER = wire.header(wire.ClientType.REPLY)


def _reply_poller(sock: zmq.Socket[bytes]) -> zmq.Poller:
    """One poller for the client's life: ``Socket.poll`` builds and registers a new one at every wait."""
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    return poller


class Client:
    def __init__(self, home: Home | Path | str | None = None, *, timeout: float = 30.0,
                 credentials: Credentials | None = None, max_reply_bytes: int = wire.MAX_REPLY_JSON_BYTES) -> None:
        """The operator's client, on the home's local socket; or, with ``credentials``, a tenant's, over TCP
        with CurveZMQ (the supervisor's key is checked; the tenant's key is all that authenticates it).
        ``max_reply_bytes``: the longest reply JSON read (a longer one raises ProtocolError)."""
        self.timeout = timeout
        self.max_reply_bytes = max_reply_bytes
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._ids = itertools.count(1)
        self._monitor: zmq.Socket[bytes] | None = None
        self.credentials = credentials
        if credentials is not None:
            self.where = f"{credentials.endpoint} (tenant {credentials.tenant})"
            self._token = ""
            self._sock = self._ctx.socket(zmq.DEALER)
            self._sock.linger = 0
            self._sock.curve_serverkey = credentials.server_key.encode()
            self._sock.curve_publickey = credentials.public_key.encode()
            self._sock.curve_secretkey = credentials.secret_key.encode()
            self._monitor = self._sock.get_monitor_socket(_HANDSHAKE_EVENTS)
            self._sock.connect(credentials.endpoint)
            self._poller = _reply_poller(self._sock)
            return
        if home is None:
            raise TheaterError("a client needs a home or a tenant's credentials")
        self.home = home if isinstance(home, Home) else Home(home)
        self.where = str(self.home.root)
        try:
            self._token = self.home.token.read_text().strip()
        except FileNotFoundError:
            raise NotRunning(f"no supervisor is running at {self.home.root} (start one with `theater up`)") from None
        if supervisor_gone(self.home):
            raise NotRunning(f"the supervisor at {self.home.root} is not running (it ended without cleaning up); "
                             "start it with `theater up`")
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        self._sock.connect(self.home.control_endpoint)
        self._poller = _reply_poller(self._sock)

    def close(self) -> None:
        if self._monitor is not None:
            self._sock.disable_monitor()
            self._monitor.close(0)
        self._sock.close(0)

    def _refused(self) -> None:
        """Raise if the supervisor refused this client's key at the handshake (a tenant's client)."""
        assert self._monitor is not None
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                raise ClientError("refused", f"the supervisor at {self.where} refused this client's key: it is not "
                                             "a current tenant's (removed, or never added)")
            if event["event"] in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                raise ClientError("refused", f"the handshake with {self.where} failed: is server_key that "
                                             "supervisor's (theater tenant add prints it)?")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, op: str, data: bytes | None = None, *, timeout: float | None = None, **args: Any) -> tuple[dict[str, Any], bytes | None]:
        """Send one request and wait for its reply; raise ClientError on an error reply."""
        rid = next(self._ids)
        frames = [_REQUEST_HEADER, wire.encode_request({"op": op, "id": rid, "token": self._token, **args})]
        if len(frames[1]) > wire.MAX_JSON_BYTES:  # the supervisor would answer with id 0, which no wait matches
            raise ClientError("protocol", f"request of {len(frames[1])} bytes exceeds {wire.MAX_JSON_BYTES}; "
                                          "nothing was sent")
        if data is not None:
            frames.append(data)
        wire.send_frames(self._sock, frames, copy=False)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            remaining = deadline - time.monotonic()
            if self._monitor is not None:  # wait on the reply and on news of the handshake, a little at a time
                self._refused()
                if remaining > 0 and not self._poller.poll(int(min(remaining, 0.05) * 1000) + 1):
                    continue
            if remaining <= 0 or not self._poller.poll(int(remaining * 1000) + 1):
                raise NoAnswer(f"no answer from the supervisor at {self.where} within the timeout")
            reply = wire.recv_frames(self._sock)
            if len(reply) < 2 or reply[0] != _REPLY_HEADER:
                raise TheaterError("malformed reply from the supervisor")
            body = wire.decode_reply(reply[1], self.max_reply_bytes)
            if body.get("id") != rid:
                continue  # a late answer to an earlier, timed-out request
            if not body.get("ok"):
                err = body.get("error") or {}
                raise ClientError(str(err.get("code", "error")), str(err.get("message", "unknown error")))
            return body.get("result") or {}, (reply[2] if len(reply) > 2 else None)

    # Convenience wrappers; each is one request.
    def ping(self) -> dict[str, Any]:
        return self.request("ping")[0]

    def spawn(self, manifest: Path | str, *, replace: bool = False, tenant: str | None = None) -> dict[str, Any]:
        """Start an agent or a tree from a manifest the supervisor reads (the operator's, optionally for
        ``tenant``); a tenant's client sends the manifest's text and its component instead."""
        args: dict[str, Any] = {"replace": True} if replace else {}
        if self.credentials is not None:
            text, component, kind = read_upload(Path(manifest))
            return self.request("spawn", component, manifest_text=text, component_kind=kind, **args)[0]
        if tenant is not None:
            args["tenant"] = tenant
        return self.request("spawn", manifest=str(Path(manifest).resolve()), **args)[0]

    def remove(self, agent: str) -> dict[str, Any]:
        """Remove a stopped or failed agent: its chain ends with a removed record and its name is free."""
        return self.request("rm", agent=agent)[0]

    def send(self, agent: str, data: bytes) -> dict[str, Any]:
        return self.request("send", data, agent=agent)[0]

    def call(self, agent: str, data: bytes, *, timeout: float = 10.0) -> bytes | None:
        result, reply = self.request("call", data, agent=agent, timeout_ms=int(timeout * 1000), timeout=timeout + 5)
        return reply if result.get("has_reply") else None

    def ps(self) -> list[dict[str, Any]]:
        return self.request("ps")[0]["agents"]

    def stop(self, agent: str) -> dict[str, Any]:
        return self.request("stop", agent=agent)[0]

    def restart(self, agent: str, *, timeout: float = 120.0) -> dict[str, Any]:
        """Stop a member (agent or supervisor node) if it runs and start it again; its tree entry once ready."""
        return self.request("restart", agent=agent, timeout=timeout)[0]

    def tree(self) -> list[dict[str, Any]]:
        return self.request("tree")[0]["roots"]

    def events(self, agent: str, after: int = -1) -> list[Record]:
        """The committed records of an agent's or a supervisor node's chain after ``after``, in order."""
        out: list[Record] = []
        while True:
            result, data = self.request("events", agent=agent, after=after)
            out += [Record.parse(raw) for raw in control.unpack_records(data or b"")]
            if not result.get("more") or not result.get("count"):
                return out
            after = out[-1].seq

    def verify(self, agent: str | None = None, *, timeout: float = 600.0) -> list[dict[str, Any]]:
        """Every chain of the home (or one) checked by the supervisor as `theater verify` does offline."""
        if agent is None:
            return self.request("verify", timeout=timeout)[0]["chains"]
        return self.request("verify", timeout=timeout, agent=agent)[0]["chains"]

    def wait_events(self, agent: str, after: int, wait_ms: int) -> int:
        return int(self.request("wait", agent=agent, after=after, wait_ms=wait_ms, timeout=wait_ms / 1000 + 5)[0]["head"])

    def down(self) -> dict[str, Any]:
        return self.request("down")[0]

    # The operator's tenants (docs/tenancy.md).
    def tenant_add(self, name: str, public_key: str, *, policies: list[str], routes: list[str] | None = None,
                   quotas: dict[str, int] | None = None) -> dict[str, Any]:
        return self.request("tenant-add", name=name, public_key=public_key, policies=policies, routes=routes or [],
                            quotas=quotas or {})[0]

    def tenants(self) -> dict[str, Any]:
        return self.request("tenant-list")[0]

    def tenant_remove(self, name: str, *, timeout: float = 120.0) -> dict[str, Any]:
        return self.request("tenant-rm", name=name, timeout=timeout)[0]

    def top(self) -> dict[str, Any]:
        """One snapshot of what every visible agent (and tenant) uses now."""
        return self.request("top")[0]

    def usage(self, tenant: str | None = None, since_ns: int = 0) -> dict[str, Any]:
        args: dict[str, Any] = {"since_ns": since_ns}
        if tenant is not None:
            args["tenant"] = tenant
        return self.request("usage", **args)[0]
