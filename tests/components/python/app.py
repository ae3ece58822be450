"""A Python agent for the tests, built with componentize-py: it echoes, counts, and misbehaves on request.

``handle(state, message)`` takes the message as a command:

    echo:<bytes>   reply with <bytes>
    count          state + 1 (a decimal number), replied
    fail           err("asked to fail")
    time           reply with time.time() (the WASI wall clock, recorded)
    env            reply with the environment, argv and cwd the guest sees
    raise          an uncaught exception (a trap; its traceback goes to WASI stderr: log records)
    open:<path>    read a file; reply with the error it gets (no directory is preopened)
    stdout         print() (WASI stdout: a log record), reply "printed"
    spin           loop forever
    grow           allocate until memory runs out
    recurse        unbounded recursion

Bytes cross as strings with one character per byte (latin-1).
"""

import os
import sys
import time

import wit_world
from componentize_py_types import Err
from wit_world.imports import runtime, types


class WitWorld(wit_world.WitWorld):
    def init(self, state: str, args: str) -> str:
        runtime.log(types.LogLevel.INFO, f"python agent {runtime.self_id()} starting")
        return args or "0"

    def handle(self, state: str, message: str) -> types.Outcome:
        command, _, arg = message.partition(":")
        if command == "echo":
            return types.Outcome(state=state, reply=arg)
        if command == "count":
            n = str(int(state) + 1)
            return types.Outcome(state=n, reply=n)
        if command == "fail":
            raise Err("asked to fail")
        if command == "time":
            return types.Outcome(state=state, reply=repr(time.time()))
        if command == "env":
            return types.Outcome(state=state, reply=repr((dict(os.environ), sys.argv, _cwd())))
        if command == "raise":
            raise RuntimeError("an uncaught exception")
        if command == "open":
            try:
                with open(arg, "rb") as f:
                    return types.Outcome(state=state, reply=f.read(64).decode("latin-1"))
            except OSError as exc:
                return types.Outcome(state=state, reply=f"{type(exc).__name__}: {exc.strerror}")
        if command == "stdout":
            print("escaping through stdout", flush=True)
            return types.Outcome(state=state, reply="printed")
        if command == "spin":
            while True:
                pass
        if command == "grow":
            hoard = []
            while True:
                hoard.append(bytearray(1 << 20))
        if command == "recurse":
            return self.handle(state, message)
        raise Err(f"unknown command {command!r}")


def _cwd() -> str:
    try:
        return os.getcwd()
    except OSError as exc:
        return f"none ({exc.strerror})"
