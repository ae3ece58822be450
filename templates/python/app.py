"""An agent in Python, with the guest library (docs/writing-agents.md).

Its state is {"count": n}. A message's kind is the text before its first ':'
(or a JSON object's "kind"): "hello" and anything unknown count and echo,
"count" only reads, "fail" answers with an error and leaves the state as it was.
"""

from theater_agent import Agent, GuestError, log, self_id

agent = Agent(initial=lambda args: {"count": 0})


@agent.on("count")
def count(state, msg):
    return str(state["count"])


@agent.on("fail")
def fail(state, msg):
    raise GuestError("asked to fail")


@agent.otherwise
def echo(state, msg):
    state["count"] += 1
    if state["count"] == 1:
        log(f"first message, as {self_id()}")
    return f"{state['count']}: {msg.raw.decode(errors='replace')}"


WitWorld = agent.world()
