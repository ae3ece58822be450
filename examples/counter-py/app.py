"""A counter in Python, on the guest library: its state is {"count": n}.

    add[:N]  adds N (default 1) and replies with the new count
    get      replies with the count
    reset    sets it to 0
"""

from theater_agent import Agent, GuestError

agent = Agent(initial=lambda args: {"count": int(args or b"0")})


@agent.on("add")
def add(state, msg):
    try:
        n = int(msg.data or 1)
    except ValueError:
        raise GuestError(f"add takes a whole number, not {msg.data!r}") from None
    state["count"] += n
    return str(state["count"])


@agent.on("get")
def get(state, msg):
    return str(state["count"])


@agent.on("reset")
def reset(state, msg):
    state["count"] = 0


WitWorld = agent.world()
