// An agent in JavaScript, with the guest library (docs/writing-agents.md).
//
// Its state is {"count": n}. A message's kind is the text before its first ':'
// (or a JSON object's "kind"): "hello" and anything unknown count and echo,
// "count" only reads, "fail" answers with an error and leaves the state as it was.
import { agent, GuestError, log, selfId } from "theater";

const decoder = new TextDecoder();

export const { init, handle } = agent({
  initial: (args) => ({ count: 0 }),
  handlers: {
    count: (state) => String(state.count),
    fail: () => { throw new GuestError("asked to fail"); },
  },
  otherwise: (state, msg) => {
    state.count += 1;
    if (state.count === 1) log(`first message, as ${selfId()}`);
    return `${state.count}: ${decoder.decode(msg.raw)}`;
  },
});
