"""An agent in Python, built with componentize-py against wit/agent.wit's `agent` world.

Its state is the number of messages it has handled; it replies with that number
and the message. `bytes` cross the component boundary as strings with one
character per byte (latin-1): decode with `.encode("latin-1")` if you need bytes.
Raise `Err("why")` to answer a message with an error (the state stays as it
was); any other exception fails the call, and its supervisor restarts the agent.
"""

import wit_world
from componentize_py_types import Err
from wit_world.imports import runtime, types


class WitWorld(wit_world.WitWorld):
    def init(self, state: str, args: str) -> str:
        runtime.log(types.LogLevel.INFO, f"starting as {runtime.self_id()}")
        return "0"

    def handle(self, state: str, message: str) -> types.Outcome:
        if message == "fail":
            raise Err("asked to fail")
        count = int(state or "0") + 1
        return types.Outcome(state=str(count), reply=f"{count}: {message}")
