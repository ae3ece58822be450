"""A team of agents in Python: a coordinator that hands jobs to two workers through messaging calls.

One component plays every role; its init args say which (see ../team.toml):

- ``worker``: ``receive`` answers ``square:<n>`` with n * n and counts its jobs.
- ``flaky``: the same, but it crashes (an uncaught exception traps the call) on
  every n divisible by 3. Its supervisor restarts it; the coordinator sees
  ``target-crashed`` and gives the job to the other worker.
- ``coordinator:<worker>,<worker>``: ``handle`` takes ``square-all:<n>,<n>,...``,
  calls the two workers in turn with a timeout, retries a failed job once on the
  other worker, and replies with what happened.

Built with componentize-py against wit/agent.wit's ``messaging-agent`` world.
Bytes cross as latin-1 strings, one character per byte.
"""

import wit_world
from componentize_py_types import Err
from wit_world.imports import messaging, runtime, types

TIMEOUT_MS = 1000


def role_of(state: str) -> tuple[str, list[str], int]:
    """(role, workers, jobs done) from the state: '<role>[:<worker>,<worker>]|<jobs>'."""
    head, _, jobs = state.partition("|")
    role, _, workers = head.partition(":")
    return role, [w for w in workers.split(",") if w], int(jobs or 0)


def with_jobs(state: str, jobs: int) -> str:
    return f"{state.partition('|')[0]}|{jobs}"


def describe(error: object) -> str:
    """`target-crashed: ...` from a CallError case."""
    name = type(error).__name__.removeprefix("CallError_")
    kebab = "".join("-" + c.lower() if c.isupper() else c for c in name).lstrip("-")
    return f"{kebab}: {getattr(error, 'value', '')}"


class WitWorld(wit_world.WitWorld):
    def init(self, state: str, args: str) -> str:
        runtime.log(types.LogLevel.INFO, f"{args.partition(':')[0]} {runtime.self_id()} starting")
        return with_jobs(args, 0)

    def receive(self, state: str, sender: str, message: str) -> types.Outcome:
        role, _, jobs = role_of(state)
        if role not in ("worker", "flaky") or not message.startswith("square:"):
            raise Err(f"{role} does not take {message!r}")
        n = int(message.removeprefix("square:"))
        if role == "flaky" and n % 3 == 0:
            raise RuntimeError(f"flaky worker crashed on {n}")  # not an Err: the call traps
        return types.Outcome(state=with_jobs(state, jobs + 1), reply=str(n * n))

    def handle(self, state: str, message: str) -> types.Outcome:
        role, workers, jobs = role_of(state)
        if role != "coordinator" or not message.startswith("square-all:"):
            return types.Outcome(state=state, reply=f"{role}: jobs done {jobs}")
        numbers = [int(n) for n in message.removeprefix("square-all:").split(",") if n]
        results, notes = [], []
        for i, n in enumerate(numbers):
            first, other = workers[i % 2], workers[(i + 1) % 2]
            answer = None
            for worker in (first, other):
                try:
                    answer = messaging.call(worker, f"square:{n}", TIMEOUT_MS).reply
                    if worker != first:
                        notes.append(f"{n}: {first} failed, retried on {worker}")
                    break
                except Err as err:
                    runtime.log(types.LogLevel.WARN, f"{worker} on {n}: {describe(err.value)}")
            results.append(f"{n}->{answer if answer is not None else '?'}")
        summary = " ".join(results) + (f" ({'; '.join(notes)})" if notes else "")
        return types.Outcome(state=with_jobs(state, jobs + len(numbers)), reply=summary)
