"""An agent that asks an HTTP API for a forecast, with an API key it never sees.

``handle("forecast:<city>")`` fetches ``<base>/forecast?city=<city>`` (the base
URL is its init args) and replies with the body. The request carries no key:
the supervisor adds ``Authorization: Bearer <key>`` from the secret named in
the policy's ``[http] secrets`` rule, and replaces the key with
``{secret:NAME}`` in anything the API sends back. Built with componentize-py
against wit/agent.wit's ``http-agent`` world.
"""

import wit_world
from componentize_py_types import Err
from wit_world.imports import http, runtime, types


class WitWorld(wit_world.WitWorld):
    def init(self, state: str, args: str) -> str:
        return args  # the API's base URL

    def handle(self, state: str, message: str) -> types.Outcome:
        if not message.startswith("forecast:"):
            raise Err(f"unknown request {message!r}; try forecast:<city>")
        url = f"{state}/forecast?city={message.removeprefix('forecast:')}"
        try:
            response = http.fetch("GET", url, [("Accept", "text/plain")], "")
        except Err as err:
            runtime.log(types.LogLevel.WARN, f"{url}: {type(err.value).__name__}: {err.value.value}")
            raise Err(f"the API could not be reached: {err.value.value}") from None
        return types.Outcome(state=state, reply=f"{response.status} {response.body}")
