"""The control API on TCP, for tenants on other machines: CurveZMQ with our own ZAP handler.

libzmq asks the ZAP handler (a REP socket at ``inproc://zeromq.zap.01``, polled
by the supervisor's loop like any other) about every CURVE handshake; we answer
200 with the tenant's name and that key as the User-Id only for a current tenant's key. A
client with no key, a wrong key or a removed tenant's key never completes the
handshake, so none of its requests is read; each refusal is counted, and logged
up to REFUSALS_LOGGED_PER_SECOND (a client with no key must not fill the disk
with the supervisor's log: beyond that, one line a second says how many more).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import zmq
import zmq.utils.z85 as z85
from zmq.utils.monitor import recv_monitor_message

from theater.home import Home, write_private
from theater.remote import keypair, valid_key
from theater.wire import MAX_JSON_BYTES

from ._errors import SupervisorError
from ._tenants import Tenants
from ._timers import Timers

__all__ = ["ZAP_DOMAIN", "RemoteControl", "server_keys"]

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"theater"
REFUSALS_LOGGED_PER_SECOND = 10  # each logged; beyond, counted, and one line a second says how many


def server_keys(home: Home) -> tuple[str, str]:
    """The control API's key pair (public, secret), made on first use and kept in the home (0600)."""
    try:
        data = json.loads(home.control_key.read_bytes())
        public, secret = data["public"], data["secret"]
        if valid_key(public) and valid_key(secret):
            return public, secret
        raise SupervisorError(f"{home.control_key}: not a CurveZMQ key pair")
    except FileNotFoundError:
        public, secret = keypair()
        write_private(home.control_key, json.dumps({"public": public, "secret": secret}).encode())
        return public, secret
    except (ValueError, KeyError, TypeError):
        raise SupervisorError(f"{home.control_key}: not a CurveZMQ key pair") from None


class RemoteControl:
    def __init__(self, home: Home, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, tenants: Tenants,
                 log: Callable[[str], None], max_message: int, timers: Timers) -> None:
        self.tenants = tenants
        self.log = log
        self.refusals = RefusalLog(log, timers)
        self.public_key, secret = server_keys(home)
        self.zap = ctx.socket(zmq.REP)
        self.zap.linger = 0
        self.zap.bind(ZAP_ENDPOINT)  # before any CURVE socket, so no handshake goes unasked
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.linger = 0
        self.socket.maxmsgsize = max_message
        self.socket.curve_server = True
        self.socket.curve_secretkey = secret.encode()
        self.socket.zap_domain = ZAP_DOMAIN
        try:
            self.socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise SupervisorError(f"cannot listen on {endpoint}: {exc}") from None
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        # Every failed handshake (no CURVE at all, a wrong server key, a key ZAP refused) is counted from here.
        self.monitor = self.socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                                      | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                                      | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)

    def answer_handshakes(self) -> None:
        """Every pending ZAP request: 200 and the tenant's name for a current tenant's key, 400 otherwise."""
        while True:
            try:
                frames = self.zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 6:  # not a ZAP request: answer something well-formed all the same
                self.zap.send_multipart([b"1.0", b"", b"500", b"malformed ZAP request", b"", b""])
                continue
            version, request_id, domain, address, _identity, mechanism = frames[:6]
            tenant = None
            if domain == ZAP_DOMAIN and mechanism == b"CURVE" and len(frames) == 7 and len(frames[6]) == 32:
                tenant = self.tenants.by_key(z85.encode(frames[6]).decode())
            if tenant is None:  # counted when the monitor reports the failed handshake
                why = "not a tenant's key" if mechanism == b"CURVE" else f"mechanism {mechanism[:16]!r}"
                self.refusals.log(f"refused a control connection from {address.decode(errors='replace')[:64]}: {why}")
                self.zap.send_multipart([version, request_id, b"400", b"not a tenant's key", b"", b""])
                continue
            # The User-Id every request of this connection carries: the tenant and the key it proved, so that a
            # request is taken only while that key is still the tenant's (not after a removal and a new tenant
            # of the same name).
            self.zap.send_multipart([version, request_id, b"200", b"OK",
                                     f"{tenant.name} {tenant.public_key}".encode(), b""])

    def count_failures(self) -> None:
        """Handshakes that failed: each is a client refused before any of its requests was read."""
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            self.tenants.refused_connections += 1
            if event["event"] != zmq.EVENT_HANDSHAKE_FAILED_AUTH:  # ZAP's refusals are logged as they are made
                self.refusals.log(f"refused a control connection: its handshake failed "
                                  f"({_HOW.get(zmq.Event(event['event']), '?')})")

    def receive(self) -> tuple[list[bytes | memoryview], str, str] | None:
        """One request, the tenant whose key completed the handshake and that key (Z85), or None when there is
        none.

        A frame longer than any JSON a request may carry (a message's or an upload's data) is read in place,
        as a view of ZeroMQ's message: most such frames from a flood are refused (too large for the agent, a
        bad request) and copying 60 MiB for nothing held the loop 20-35 ms. It is copied once taken."""
        try:
            frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        user = frames[-1].get("User-Id")
        tenant, _, key = (user if isinstance(user, str) else "").partition(" ")
        return [f.bytes if len(f) <= MAX_JSON_BYTES else f.buffer for f in frames], tenant, key

    def close(self) -> None:
        self.socket.disable_monitor()
        self.monitor.close(0)
        self.socket.close(0)
        self.zap.close(0)


_HOW = {zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "not CurveZMQ, or not this supervisor's server key",
        zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the connection ended during the handshake"}


class RefusalLog:
    """Log lines about clients refused before they authenticated, at most REFUSALS_LOGGED_PER_SECOND a
    second; how many more there were is told in one line when the second is over (the count stays exact
    in ``refused_connections``)."""

    def __init__(self, log: Callable[[str], None], timers: Timers) -> None:
        self._log = log
        self._timers = timers
        self._second = -1
        self._logged = 0
        self._unlogged = 0

    def log(self, line: str) -> None:
        second = int(time.monotonic())
        if second != self._second:
            self._second, self._logged = second, 0
        if self._logged < REFUSALS_LOGGED_PER_SECOND:
            self._logged += 1
            self._log(line)
            return
        if not self._unlogged:
            self._timers.after(second + 1 - time.monotonic(), self._tell_unlogged)
        self._unlogged += 1

    def _tell_unlogged(self) -> None:
        unlogged, self._unlogged = self._unlogged, 0
        self._log(f"refused {unlogged} more control connections, not each logged (at most "
                  f"{REFUSALS_LOGGED_PER_SECOND} a second are)")
