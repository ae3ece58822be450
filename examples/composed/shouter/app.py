"""An agent made of two components in two languages: this Python agent imports `demo:compose/text`, which
the JavaScript helper (../text-helper) exports; Theater links them in the agent's worker (`helpers` in the
manifest) and records both components' hashes in the genesis.

    shout:TEXT   replies TEXT in capitals, counting the words it has shouted
"""

from theater_agent import Agent
from wit_world.imports import text

agent = Agent(initial=lambda args: {"words": 0})


@agent.on("shout")
def shout(state, msg):
    state["words"] += text.words(msg.data)
    return f"{text.shout(msg.data)} ({state['words']} words so far)"


WitWorld = agent.world()
