"""The http capability: a real agent (tests/components/fetcher.wat) reaching a real HTTP server on the
loopback address through the supervisor, under policies written for each test. Every refusal and bound is
hit for real; secrets are added at the boundary and never reach the guest or a record."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import Theater, assert_verified, of, ps, records, wait_running, wait_until

from supervisor._caps.grants import Origin
from supervisor._caps.http import internal
from theater import wire
from theater.client import Client, ClientError
from theater.records import Kind

COMPONENT = "fetcher.wat"
SECRET = "s3cr3t-value-that-must-not-leak"


class Server:
    """A loopback HTTP server: /echo answers with what it got, /big?n=N with N bytes, /slow waits for
    ``release``, /auth echoes the Authorization header in its body and a header, /gzip-auth does the same
    gzip-compressed if the request accepts it and /gzip-always whether or not, /name-auth puts it in a header's
    name, /drip sends a body a byte every 20 ms until ``release`` or the client goes, and /hold holds each
    request until one ``step`` is released (``held`` and ``done`` count them)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.seen: list[dict[str, Any]] = []
        self.steps = threading.Semaphore(0)
        self.held = self.done = 0
        self.arrived_after: list[int] = []  # for each /hold request: how many had been answered when it came
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(200)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length) if length else b""
                outer.seen.append({"method": self.command, "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                   "body": body})
                if self.path.startswith("/big"):
                    self._answer(b"b" * int(self.path.split("=")[1]))
                elif self.path == "/slow":
                    outer.release.wait(60)
                    self._answer(b"late")
                elif self.path == "/auth":
                    auth = self.headers.get("Authorization", "")
                    self._answer(f"auth={auth}".encode(), {"X-Echo": auth})
                elif self.path in ("/gzip-auth", "/gzip-always"):
                    body = f"auth={self.headers.get('Authorization', '')}".encode()
                    if self.path == "/gzip-always" or "gzip" in self.headers.get("Accept-Encoding", ""):
                        self._answer(gzip.compress(body), {"Content-Encoding": "gzip"})
                    else:
                        self._answer(body)
                elif self.path == "/name-auth":
                    self._answer(b"named", {f"X-{self.headers.get('Authorization', '').split()[-1]}": "1"})
                elif self.path == "/drip":
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    while not outer.release.wait(0.02):
                        try:
                            self.wfile.write(b"d")
                            self.wfile.flush()
                        except OSError:
                            return
                elif self.path == "/hold":
                    with outer.lock:
                        outer.held += 1
                        outer.arrived_after.append(outer.done)
                    outer.steps.acquire(timeout=60)
                    with outer.lock:
                        outer.done += 1
                    self._answer(b"held")
                else:
                    self._answer(f"{self.command} {self.path} {body.decode()}".encode())

            do_GET = do_POST = do_PUT = _serve

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        for _ in range(64):
            self.steps.release()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


def policy(t: Theater, name: str, http: str, wall_time_ms: int = 2000) -> None:
    """A policy granting runtime and http, with ``http`` as its [http] table's body."""
    text = (Path(__file__).resolve().parent.parent / "policies" / "default.toml").read_text()
    text = text.replace("wall_time_ms = 2000 ", f"wall_time_ms = {wall_time_ms} ")
    text = text.replace('capabilities = ["runtime"]', 'capabilities = ["runtime", "http"]')
    text = text.replace("[hardening]", f"[http]\n{http}\n\n[hardening]")
    t.home.policies.mkdir(exist_ok=True)
    (t.home.policies / f"{name}.toml").write_text(text)


def local(server: Server, *, extra: str = "", private: bool = True, host: str = "127.0.0.1") -> str:
    origin = f"http://{host}:{server.port}"
    return f'allow = ["{origin}"]\n' + (f'private = ["{origin}"]\n' if private else "") + extra


def fetcher(t: Theater, c: Client, policy_name: str, name: str = "f", **extra: Any) -> None:
    c.spawn(t.manifest(name, COMPONENT, policy=policy_name, capabilities=["runtime", "http"], **extra))


def ask(c: Client, text: str, name: str = "f") -> str:
    reply = c.call(name, text.encode(), timeout=30)
    assert reply is not None
    return reply.decode()


def test_get_and_post_reach_the_server_and_are_recorded(theater: Theater, server: Server) -> None:
    policy(theater, "web", local(server, extra='methods = ["GET", "POST"]'))
    with theater.client() as c:
        fetcher(theater, c, "web")
        url = f"http://127.0.0.1:{server.port}"
        assert ask(c, f"GET {url}/hello?x=1") == "200 GET /hello?x=1 "
        assert ask(c, f"POST {url}/submit the body") == "200 POST /submit the body"
        assert ask(c, f"h=X-Trace:abc;GET {url}/h") == "200 GET /h "
    assert server.seen[2]["headers"]["x-trace"] == "abc"
    assert server.seen[0]["headers"]["host"] == f"127.0.0.1:{server.port}"
    [get, post, _] = [r.fields() for r in records(theater, "f") if r.kind is Kind.HOST_CALL]
    assert get["input"] == wire.host_call_bytes({"method": "GET", "url": f"{url}/hello?x=1", "headers": []}, b"")
    head, body = post["output"].split(b"\0", 1)
    assert json.loads(head)["status"] == 200 and body == b"POST /submit the body"
    assert_verified(theater)


def test_what_the_policy_does_not_allow_is_denied(theater: Theater, server: Server) -> None:
    policy(theater, "web", local(server))
    with theater.client() as c:
        fetcher(theater, c, "web")
        url = f"http://127.0.0.1:{server.port}"
        assert ask(c, f"POST {url}/x body").startswith("err:denied:method 'POST' is not allowed")
        assert ask(c, f"GET http://127.0.0.1:{server.port + 1}/x").startswith("err:denied:")
        assert ask(c, "GET https://example.com/").startswith("err:denied:https://example.com:443 is not allowed")
        assert ask(c, f"GET http://user:pw@127.0.0.1:{server.port}/").startswith("err:denied:")
        assert ask(c, "GET file:///etc/passwd").startswith("err:denied:")
        assert ask(c, f"h=Host:evil.example;GET {url}/").startswith("err:denied:header 'Host' is set by the supervisor")
    assert server.seen == []


def test_internal_addresses_are_refused_unless_the_policy_names_them(theater: Theater, server: Server) -> None:
    """The test server is on loopback: allowed but not named in `private`, it is refused after DNS, and a
    name that resolves there (localhost) is refused the same way."""
    policy(theater, "outside", f'allow = ["http://127.0.0.1:{server.port}", "http://localhost:{server.port}"]')
    with theater.client() as c:
        fetcher(theater, c, "outside")
        for host in ("127.0.0.1", "localhost"):
            reply = ask(c, f"GET http://{host}:{server.port}/x")
            assert reply.startswith(f"err:private-address:{host} resolves to 127.0.0.1, an internal address"), reply
    assert server.seen == []


def test_sizes_are_capped_both_ways(theater: Theater, server: Server) -> None:
    policy(theater, "small", local(server, extra='methods = ["POST", "GET"]\nmax_request_bytes = 10\n'
                                                 "max_response_bytes = 100"))
    with theater.client() as c:
        fetcher(theater, c, "small")
        url = f"http://127.0.0.1:{server.port}"
        assert ask(c, f"POST {url}/p {'x' * 10}") == f"200 POST /p {'x' * 10}"
        assert ask(c, f"POST {url}/p {'x' * 11}").startswith("err:too-large:a request body of 11 bytes")
        assert ask(c, f"GET {url}/big?n=100") == "200 " + "b" * 100
        assert ask(c, f"GET {url}/big?n=101").startswith("err:too-large:the response body is more than")


def refused(c: Client, text: str | bytes, name: str = "f") -> str:
    """A request the worker refuses before asking: the call fails with host-limit (the agent restarts); its
    text."""
    pid = ps(c, name)["pid"]
    with pytest.raises(ClientError) as info:
        c.call(name, text.encode() if isinstance(text, str) else text, timeout=30)
    assert info.value.code == "host-limit", info.value
    wait_running(c, name, pid)
    return str(info.value)


def test_what_the_guest_hands_over_is_bounded_by_the_worker(theater: Theater, server: Server) -> None:
    """Each bound at exactly its limit (served, or the supervisor's documented err) and one past it: the call
    fails with host-limit naming the value, and nothing is asked or recorded for it (the worker never answers
    a capability function with an err of its own: the ledger takes only the supervisor's answers)."""
    policy(theater, "web", local(server))
    url = f"http://127.0.0.1:{server.port}"
    with theater.client() as c:
        fetcher(theater, c, "web", restart={"intensity": 100})
        answered = 0
        # The method: 16 bytes reach the supervisor (denied: not in methods); 17 do not.
        assert ask(c, f"{'G' * 16} {url}/m").startswith("err:denied:method 'GGGGGGGGGGGGGGGG' is not allowed")
        answered += 1
        assert refused(c, f"{'G' * 17} {url}/m") == "http.fetch: the method is more than 16 bytes"
        # The URL: 8,192 bytes of UTF-8 are served; 8,193 are not, whether 8,193 characters or 8,192 with a 'é'.
        base = f"{url}/u?q="
        exact = base + "a" * (8192 - len(base))
        assert ask(c, f"GET {exact}") == f"200 GET {exact[len(url):]} "
        answered += 1
        assert refused(c, f"GET {exact}a") == "http.fetch: the URL is more than 8192 bytes"
        accented = (f"GET {exact[:-1]}" + "\xe9").encode("latin-1")  # fetcher reads its message's bytes as latin-1
        assert refused(c, accented) == "http.fetch: the URL is more than 8192 bytes"
        # A header value of 8,192 bytes goes out; one of 8,193 does not.
        assert ask(c, f"h=X-Long:{'v' * 8192};GET {url}/v") == "200 GET /v "
        answered += 1
        assert server.seen[-1]["headers"]["x-long"] == "v" * 8192
        assert refused(c, f"h=X-Long:{'v' * 8193};GET {url}/v") == "http.fetch: a header value is more than 8192 bytes"
        # A header name of 8,192 bytes reaches the supervisor (denied: no header name is that long); 8,193 do not.
        assert ask(c, f"h={'n' * 8192}:1;GET {url}/n").startswith("err:denied:header 'nnnn")
        answered += 1
        assert refused(c, f"h={'n' * 8193}:1;GET {url}/n") == "http.fetch: a header name is more than 8192 bytes"
        # 64 headers go out; 65 do not (this was the worker's own `err denied`, recorded nowhere).
        assert ask(c, f"h*64=X-Many:1;GET {url}/many") == "200 GET /many "
        answered += 1
        assert refused(c, f"h*65=X-Many:1;GET {url}/many") == "http.fetch: 65 headers are more than 64"
    chain = records(theater, "f")
    assert len([r for r in chain if r.kind is Kind.HOST_CALL]) == answered
    statuses = [r.fields()["status"] for r in of(chain, Kind.HANDLE)]
    assert statuses.count("host-limit") == 6 and statuses.count("ok") == answered
    assert_verified(theater)


def test_denied_comes_before_too_large(theater: Theater, server: Server) -> None:
    """Every `denied` the supervisor can see at once (here a header it sets itself, or one a secrets rule sets)
    comes before `too-large` for the body. A secret missing from the home is found only when the request is
    made, on an egress thread: a body too large is told first."""
    url = f"http://127.0.0.1:{server.port}"
    rule = f'secrets = [{{ origin = "{url}", header = "Authorization", value = "Bearer {{secret:absent}}" }}]'
    policy(theater, "tight", local(server, extra=f'methods = ["POST"]\nmax_request_bytes = 4\n{rule}'))
    with theater.client() as c:
        fetcher(theater, c, "tight")
        assert ask(c, f"h=Host:x;POST {url}/o 12345").startswith("err:denied:header 'Host' is set by the supervisor")
        assert ask(c, f"h=Authorization:x;POST {url}/o 12345").startswith(
            "err:denied:header 'Authorization' is set by the supervisor")
        assert ask(c, f"POST {url}/o 12345").startswith("err:too-large:a request body of 5 bytes")
        assert ask(c, f"POST {url}/o 1234").startswith("err:denied:no secret named 'absent'")
    assert server.seen == []


def test_a_slow_server_times_out(theater: Theater, server: Server) -> None:
    """The server holds the request until the test releases it, after the answer came back."""
    policy(theater, "quick", local(server, extra="timeout_ms = 300"))
    with theater.client() as c:
        fetcher(theater, c, "quick")
        assert ask(c, f"GET http://127.0.0.1:{server.port}/slow").startswith("err:timeout:no complete response")
        server.release.set()
        assert ask(c, f"GET http://127.0.0.1:{server.port}/fine") == "200 GET /fine "


def test_a_timeout_longer_than_the_wall_time_ends_the_call_at_its_deadline(theater: Theater, server: Server) -> None:
    """`timeout_ms` (a minute) is cut to the agent's `wall_time_ms` (400 ms): that is what runs out, and the call
    itself ends at its deadline (status `deadline`); the guest never sees `timeout`."""
    policy(theater, "patient", local(server, extra="timeout_ms = 60000"), wall_time_ms=400)
    with theater.client() as c:
        fetcher(theater, c, "patient")
        with pytest.raises(ClientError) as info:
            c.call("f", f"GET http://127.0.0.1:{server.port}/slow".encode(), timeout=30)
        assert info.value.code == "deadline", info.value
        assert str(info.value) == "wall_time_ms (400 ms) ran out while waiting on http.fetch"
    [asked] = [r.fields() for r in records(theater, "f") if r.kind is Kind.HOST_CALL]
    assert json.loads(asked["output"])["error"] == "timeout"  # the supervisor's answer, recorded
    assert [r.fields()["status"] for r in of(records(theater, "f"), Kind.HANDLE)] == ["deadline"]


def set_secret(t: Theater, name: str, value: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "supervisor", "--home", str(t.home.root), "secret", "set", name],
                          input=value.encode(), capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (t.home.secrets / name).stat().st_mode & 0o777 == 0o600


def keyed(t: Theater, server: Server, secret: str) -> str:
    """Agent ``f`` under a policy whose secrets rule adds ``Authorization: Bearer <secret api>`` to requests to
    the server; the server's URL."""
    url = f"http://127.0.0.1:{server.port}"
    rule = f'secrets = [{{ origin = "{url}", header = "Authorization", value = "Bearer {{secret:api}}" }}]'
    policy(t, "keyed", local(server, extra=rule))
    set_secret(t, "api", secret)
    with t.client() as c:
        fetcher(t, c, "keyed")
    return url


def test_secrets_are_added_at_the_boundary_and_never_seen_or_recorded(theater: Theater, server: Server) -> None:
    url = keyed(theater, server, SECRET)
    with theater.client() as c:
        # The server sees the secret; it echoes it back in its body and a header; the guest gets it redacted.
        assert ask(c, f"GET {url}/auth") == "200 auth=Bearer {secret:api}"
        assert ask(c, f"h=Authorization:mine;GET {url}/auth").startswith("err:denied:header 'Authorization' is set")
    assert server.seen[0]["headers"]["authorization"] == f"Bearer {SECRET}"
    chain = records(theater, "f")
    assert all(SECRET.encode() not in r.raw for r in chain)
    [call, refused] = [r.fields() for r in chain if r.kind is Kind.HOST_CALL]
    assert json.loads(refused["output"])["error"] == "denied"
    assert ["X-Echo", "Bearer {secret:api}"] in json.loads(call["output"].split(b"\0", 1)[0])["headers"]
    assert SECRET.encode() not in theater.home.store.read_bytes()
    assert_verified(theater)


def test_a_secret_echoed_compressed_in_a_header_name_or_in_an_error_is_redacted(
    theater: Theater, server: Server,
) -> None:
    """httpx asks for gzip unless told otherwise, and a compressed echo of the secret reached the guest; so did
    one in a response header's name, and one in the HTTP library's error about a header value it refused."""
    url = keyed(theater, server, SECRET)
    with theater.client() as c:
        assert ask(c, f"GET {url}/gzip-auth") == "200 auth=Bearer {secret:api}"  # asked for no encoding
        assert server.seen[-1]["headers"]["accept-encoding"] == "identity"
        reply = ask(c, f"GET {url}/gzip-always")
        assert reply.startswith("err:failed:the response is encoded (gzip) though the request asked for none"), reply
        reply = ask(c, f"h=Accept-Encoding:gzip;GET {url}/gzip-auth")
        assert reply.startswith("err:failed:the response is encoded (gzip): a secret this request carries"), reply
        assert ask(c, f"GET {url}/name-auth") == "200 named"
        # A value no header may carry, written past the CLI (which refuses it): named, never echoed.
        (theater.home.secrets / "api").write_bytes(SECRET.encode() + b" ")
        reply = ask(c, f"GET {url}/auth")
        assert reply == "err:denied:secret 'api' cannot go in a header: it starts or ends with a space or a tab " \
                        "(theater secret set api)", reply
    chain = records(theater, "f")
    assert all(SECRET.encode() not in r.raw for r in chain)
    named = [r.fields() for r in chain if r.kind is Kind.HOST_CALL][3]
    assert ["X-{secret:api}", "1"] in json.loads(named["output"].split(b"\0", 1)[0])["headers"]
    assert SECRET.encode() not in theater.home.store.read_bytes()
    assert_verified(theater)


def test_headers_beyond_ascii_go_out_as_their_bytes(theater: Theater, server: Server) -> None:
    """A secret is bytes, and may hold any but the characters no header may; a guest's header value is text.
    Both were written as ASCII by the HTTP library, which failed on anything else."""
    url = keyed(theater, server, "pässwörd-ß")
    with theater.client() as c:
        assert ask(c, f"GET {url}/auth").startswith("200 auth=")
        # fetcher.wat reads its message's bytes as latin-1 characters: these make the text "Zoë"
        assert c.call("f", f"h=X-Name:Zoë;GET {url}/h".encode("latin-1"), timeout=30) == b"200 GET /h "
    # The test server reads header bytes as latin-1: encoded back, they are what was sent. Its echo in the body
    # is those characters written as UTF-8, other bytes than the secret's: redacted all the same.
    assert server.seen[0]["headers"]["authorization"].encode("latin-1") == "Bearer pässwörd-ß".encode()
    assert server.seen[1]["headers"]["x-name"].encode("latin-1") == "Zoë".encode()
    [auth, _] = [r.fields() for r in records(theater, "f") if r.kind is Kind.HOST_CALL]
    assert ["X-Echo", "Bearer {secret:api}"] in json.loads(auth["output"].split(b"\0", 1)[0])["headers"]


def test_a_server_that_drips_its_body_is_cut_off_at_the_timeout(theater: Theater, server: Server) -> None:
    """Each read of a body sent a byte every 20 ms returns well within any read timeout: only a deadline on the
    whole exchange ends it (before, the worker was killed past its call's deadline, and nothing recorded)."""
    policy(theater, "quick", local(server, extra="timeout_ms = 300"))
    with theater.client() as c:
        fetcher(theater, c, "quick")
        reply = ask(c, f"GET http://127.0.0.1:{server.port}/drip")
        assert reply == "err:timeout:no complete response from 127.0.0.1 within 300 ms", reply
        assert ask(c, f"GET http://127.0.0.1:{server.port}/fine") == "200 GET /fine "
    [drip, _] = [r.fields() for r in records(theater, "f") if r.kind is Kind.HOST_CALL]
    assert json.loads(drip["output"])["error"] == "timeout"


def test_one_tenant_holds_at_most_half_the_egress_threads(theater: Theater, server: Server) -> None:
    """Five of the operator's agents fetch at once from a server that holds each request: four reach it, and
    the fifth only once one of them was answered, so another tenant's requests always find threads free."""
    policy(theater, "web", local(server, extra="timeout_ms = 60000"), wall_time_ms=60_000)
    names = [f"f{i}" for i in range(5)]
    with theater.client() as c:
        for name in names:
            fetcher(theater, c, "web", name=name)
    replies: dict[str, str] = {}

    def fetch(name: str) -> None:
        with theater.client() as own:
            replies[name] = ask(own, f"GET http://127.0.0.1:{server.port}/hold", name)

    threads = [threading.Thread(target=fetch, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    wait_until(lambda: server.held == 4, what="four held requests")
    server.steps.release()
    wait_until(lambda: server.held == 5, what="the fifth request")
    for _ in range(4):
        server.steps.release()
    for thread in threads:
        thread.join(60)
    assert replies == {name: "200 held" for name in names}
    assert sorted(server.arrived_after) == [0, 0, 0, 0, 1]


def test_down_ends_the_supervisor_while_a_request_waits_on_its_server(theater: Theater, server: Server) -> None:
    """The request threads used to be joined at the interpreter's exit: `down` answered, and the process lived
    on (its lock released, its pid file gone) until the server answered."""
    policy(theater, "web", local(server, extra="timeout_ms = 60000"), wall_time_ms=60_000)
    with theater.client() as c:
        fetcher(theater, c, "web")
        c.send("f", f"GET http://127.0.0.1:{server.port}/slow".encode())
        wait_until(lambda: any(s["path"] == "/slow" for s in server.seen), what="the held request")
        c.down()
    assert theater.proc is not None
    theater.proc.wait(timeout=20)  # raises if the process lives on: the server holds the request for 60 s


def test_a_request_made_by_a_call_whose_worker_dies_stays_on_the_chain(theater: Theater, server: Server) -> None:
    """The worker records a host call with its call's result; killed while the request was on its way, it
    recorded nothing, though the server had the request. The exit record says what the call had asked."""
    policy(theater, "web", local(server, extra="timeout_ms = 60000"), wall_time_ms=60_000)
    url = f"http://127.0.0.1:{server.port}/slow"
    with theater.client() as c:
        fetcher(theater, c, "web")
        c.send("f", f"GET {url}".encode())
        wait_until(lambda: any(s["path"] == "/slow" for s in server.seen), what="the held request")
        os.kill(ps(c, "f")["pid"], signal.SIGKILL)
        wait_until(lambda: of(records(theater, "f"), Kind.EXIT), what="the exit record")
        assert ps(c, "f")["last_exit"] == "worker-died: killed by signal 9 (SIGKILL)"  # the account is the record's
    [exit_record] = of(records(theater, "f"), Kind.EXIT)
    detail = exit_record.fields()["detail"]
    assert detail.startswith("killed by signal 9 (SIGKILL); its call in flight had asked 1 host call(s) that no "
                             "record holds: theater:agent/http@0.1.0 fetch "), detail
    assert f'"url":"{url}"' in detail and detail.endswith(" -> (no answer yet)"), detail
    assert not of(records(theater, "f"), Kind.HOST_CALL)
    assert_verified(theater)


def test_a_missing_secret_is_named_not_leaked(theater: Theater, server: Server) -> None:
    url = f"http://127.0.0.1:{server.port}"
    rule = f'secrets = [{{ origin = "{url}", header = "Authorization", value = "Bearer {{secret:absent}}" }}]'
    policy(theater, "keyed", local(server, extra=rule))
    with theater.client() as c:
        fetcher(theater, c, "keyed")
        assert ask(c, f"GET {url}/auth").startswith("err:denied:no secret named 'absent'")
    assert server.seen == []


def test_ungranted_http_import_is_refused_at_spawn(theater: Theater) -> None:
    with theater.client() as c:
        with pytest.raises(ClientError) as info:
            c.spawn(theater.manifest("f", COMPONENT))
        assert str(info.value).endswith("not granted to this agent: theater:agent/http@0.1.0 (granted: "
                                        "theater:agent/runtime@0.1.0); the agent's policy 'default' does not grant "
                                        "http"), info.value


def test_a_manifest_narrows_http_and_never_widens_it(theater: Theater, server: Server) -> None:
    policy(theater, "web", local(server, extra='methods = ["GET", "POST"]'))
    with theater.client() as c:
        with pytest.raises(ClientError, match=r"http\.allow: 'http://example\.com' is not within the policy's"):
            fetcher(theater, c, "web", name="wide", http={"allow": ["http://example.com"]})
        with pytest.raises(ClientError, match=r"http\.methods: 'PUT' is not allowed by the policy"):
            fetcher(theater, c, "web", name="put", http={"methods": ["PUT"]})
        fetcher(theater, c, "web", name="narrow", http={"methods": ["GET"]})
        assert ask(c, f"POST http://127.0.0.1:{server.port}/x y", "narrow").startswith("err:denied:method 'POST'")


def test_a_manifest_s_secrets_are_exactly_the_policy_s(theater: Theater, server: Server) -> None:
    """A manifest that gives `secrets` must give exactly the policy's rules (in any order): one that dropped a
    rule would let its guest set that header itself. The error names the key and the difference."""
    url = f"http://127.0.0.1:{server.port}"
    one = {"origin": url, "header": "Authorization", "value": "Bearer {secret:api}"}
    two = {"origin": url, "header": "X-Key", "value": "{secret:key}"}
    rules = "secrets = [" + ", ".join(
        f'{{ origin = "{r["origin"]}", header = "{r["header"]}", value = "{r["value"]}" }}' for r in (one, two)) + "]"
    policy(theater, "keyed", local(server, extra=rules))
    shown = {"one": f"{{ origin = '{url}', header = 'authorization', value = 'Bearer {{secret:api}}' }}",
             "two": f"{{ origin = '{url}', header = 'x-key', value = '{{secret:key}}' }}"}
    with theater.client() as c:
        with pytest.raises(ClientError) as info:
            fetcher(theater, c, "keyed", name="none", http={"secrets": []})
        assert str(info.value).endswith(
            "http.secrets: must be exactly the policy's secrets rules (order aside), or be left out: it leaves out "
            f"{shown['one']}, {shown['two']}"), info.value
        with pytest.raises(ClientError) as info:
            fetcher(theater, c, "keyed", name="half", http={"secrets": [two]})
        assert str(info.value).endswith(f"it leaves out {shown['one']}"), info.value
        other = {**two, "value": "{secret:other}"}
        with pytest.raises(ClientError) as info:
            fetcher(theater, c, "keyed", name="swapped", http={"secrets": [one, other]})
        assert str(info.value).endswith(
            f"it leaves out {shown['two']}; the policy has no rule "
            f"{{ origin = '{url}', header = 'x-key', value = '{{secret:other}}' }}"), info.value
        fetcher(theater, c, "keyed", name="reordered", http={"secrets": [two, one]})
        fetcher(theater, c, "keyed", name="inherits")
        for name in ("reordered", "inherits"):
            assert ask(c, f"h=Authorization:mine;GET {url}/auth", name).startswith(
                "err:denied:header 'Authorization' is set by the supervisor")
    assert server.seen == []


def test_secret_cli(theater: Theater) -> None:
    set_secret(theater, "one", "v1")
    proc = subprocess.run([sys.executable, "-m", "supervisor", "--home", str(theater.home.root), "secret", "list"],
                          capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["one"] and "v1" not in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "supervisor", "--home", str(theater.home.root), "secret", "set",
                          "../x"], input=b"v", capture_output=True, check=False)
    assert bad.returncode == 2 and b"must be 1-63" in bad.stderr
    for value in (b"v1 ", b"\tv1", b"v\x0b1"):  # no header may carry them, and the HTTP library would say so
        bad = subprocess.run([sys.executable, "-m", "supervisor", "--home", str(theater.home.root), "secret", "set",
                              "two"], input=value, capture_output=True, check=False)
        assert bad.returncode == 1 and b"a secret goes into an HTTP header, and this value cannot" in bad.stderr
        assert value not in bad.stderr
    assert not (theater.home.secrets / "two").exists()
    assert theater.home.secrets.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize(("address", "inside"), [
    ("127.0.0.1", True), ("10.1.2.3", True), ("172.16.0.1", True), ("192.168.1.1", True), ("169.254.169.254", True),
    ("0.0.0.0", True), ("100.64.0.1", True), ("224.0.0.1", True), ("::1", True), ("fe80::1", True), ("fc00::1", True),
    ("::ffff:127.0.0.1", True), ("8.8.8.8", False), ("2606:4700::1111", False),
])
def test_internal_address_ranges(address: str, inside: bool) -> None:
    assert internal(address) is inside


def test_origin_patterns() -> None:
    wild = Origin.parse("https://*.example.com")
    assert wild.admits("https", "api.example.com", 443) and wild.admits("https", "a.b.example.com", 443)
    assert not wild.admits("https", "example.com", 443) and not wild.admits("http", "api.example.com", 80)
    assert not wild.admits("https", "evilexample.com", 443)
    assert Origin.parse("http://127.0.0.1:8080").admits("http", "127.0.0.1", 8080)
    assert Origin.parse("https://api.example.com").within((wild,))
    assert not wild.within((Origin.parse("https://api.example.com"),))
    for bad in ("ftp://x", "http://a/b", "http://x:0", "http://u@x", "https://*", "http://a b"):
        with pytest.raises(ValueError):
            Origin.parse(bad)
