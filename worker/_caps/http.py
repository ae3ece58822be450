"""`theater:agent/http`: HTTP requests, made by the supervisor (this worker has no network).

`fetch` is one host request (interface ``http``) with the body as its data;
the supervisor checks it against the agent's policy, adds its secrets, makes
the request and answers with the response (its body as data). Before asking,
the worker refuses what no policy could allow: more than 64 headers, a method
of more than 16 bytes, a URL, header name or header value of more than 8,192
bytes (UTF-8), a body of more than 16 MiB. The call then fails with status
``host-limit`` naming the value; nothing is sent or recorded.
"""

from __future__ import annotations

from typing import Any

from wasmtime import component as wc

from .._boundary import to_guest
from .._errors import HostLimit
from ._host import Host, HostCapability, Instance, guest_bytes, guest_text

MAX_URL_BYTES = 8192
MAX_HEADERS = 64
MAX_HEADER_BYTES = 8192
MAX_BODY_BYTES = 16 * 1024 * 1024  # the largest max_request_bytes a policy may set
ERRORS = ("denied", "private-address", "too-large", "timeout", "failed")


class Http:
    def __init__(self, host: Host) -> None:
        self._host = host

    def link(self, inst: Instance) -> None:
        inst.add_func("fetch", self.fetch)

    def fetch(self, _store: Any, method: str, url: str, headers: list[tuple[str, str]], body: str) -> wc.Record | wc.Variant:
        """result<response, http-error>: wasmtime-py takes it untagged (a Record, or the error's Variant).

        What no policy could allow fails the call (host-limit) before anything is asked: the worker never
        answers ``err`` itself, since every answer the guest gets must be the supervisor's, recorded."""
        if len(headers) > MAX_HEADERS:
            raise HostLimit(f"http.fetch: {len(headers)} headers are more than {MAX_HEADERS}")
        pairs = [[guest_text(k, "http.fetch: a header name", MAX_HEADER_BYTES),
                  guest_text(v, "http.fetch: a header value", MAX_HEADER_BYTES)] for k, v in headers]
        args = {"op": "fetch", "method": guest_text(method, "http.fetch: the method", 16),
                "url": guest_text(url, "http.fetch: the URL", MAX_URL_BYTES), "headers": pairs}
        data = guest_bytes(body, "http.fetch: the body", MAX_BODY_BYTES)
        answer, reply = self._host.ask(CAPABILITY.name, args, data, wait_ms=self._host.remaining_ms())
        if not answer.get("ok"):
            case = answer.get("error")
            if case == "timeout" and self._host.remaining_ms() == 0:  # the call's own wall time ran out first
                raise self._host.ran_out("http.fetch")
            return wc.Variant(case if case in ERRORS else "failed", str(answer.get("detail", "")))
        response = wc.Record()
        response.status = int(answer["status"])  # type: ignore[attr-defined]
        response.headers = [(str(k), str(v)) for k, v in answer.get("headers", [])]  # type: ignore[attr-defined]
        response.body = to_guest(reply or b"")  # type: ignore[attr-defined]
        return response


# The declaration worker._caps registers: granted by policy, no export required.
CAPABILITY = HostCapability("http", Http)
