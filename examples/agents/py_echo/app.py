"""An echo agent in Python, built with componentize-py against wit/agent.wit's `agent` world.

Bytes cross as strings with one character per byte (latin-1): ``to_bytes`` and
``from_bytes`` are the whole of the encoding a guest author deals with.
"""

import wit_world
from componentize_py_types import Err
from wit_world.imports import runtime, types


def to_bytes(text: str) -> bytes:
    return text.encode("latin-1")


def from_bytes(data: bytes) -> str:
    return data.decode("latin-1")


class WitWorld(wit_world.WitWorld):
    def init(self, state: str, args: str) -> str:
        runtime.log(types.LogLevel.INFO, f"python echo agent {runtime.self_id()} starting")
        return args

    def handle(self, state: str, message: str) -> types.Outcome:
        if to_bytes(message) == b"fail":
            raise Err("asked to fail")
        return types.Outcome(state=state, reply=message)
