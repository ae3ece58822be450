"""A Python agent without the guest library that prints and raises: its output and its traceback must
reach its chain as log records (tests/test_guests.py)."""

import wit_world
from wit_world.imports import types


class WitWorld(wit_world.WitWorld):
    def init(self, state: str, args: str) -> str:
        print("init: tracer_py is up")
        return ""

    def handle(self, state: str, message: str) -> types.Outcome:
        print("handling", message)
        if message == "boom":
            raise ValueError("boom went the agent")
        return types.Outcome(state=state, reply="ok")
