"""A Python agent on the guest library with kv and messaging (world service-agent): tests/test_guests.py."""

from theater_agent import Agent, GuestError, call, kv_get, kv_set, log, send

agent = Agent(initial=lambda args: {"notes": 0, "heard": []})


@agent.on("note")
def note(state, msg):
    kv_set(f"note:{state['notes']}", msg.data)
    state["notes"] += 1
    return {"notes": state["notes"]}


@agent.on("read")
def read(state, msg):
    value = kv_get(msg.data)
    return value if value is not None else b"(none)"


@agent.on("tell")
def tell(state, msg):
    send(msg.data["to"], {"kind": "hear", "text": msg.data["text"]})
    return "sent"


@agent.on("ask")
def ask(state, msg):
    reply = call(msg.data["to"], {"kind": "heard"})
    return reply


@agent.on("hear")
def hear(state, msg):
    state["heard"].append(msg.data["text"])
    log(f"heard {msg.data['text']!r} from {msg.sender}")


@agent.on("heard")
def heard(state, msg):
    return state["heard"]


@agent.on("refuse")
def refuse(state, msg):
    state["notes"] = -1  # not kept: the call fails
    raise GuestError("refused on purpose")


@agent.on("crash")
def crash(state, msg):
    return {}["missing"]


WitWorld = agent.world()
