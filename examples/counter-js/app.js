// A counter in JavaScript, on the guest library: its state is {"count": n}.
//
//   add[:N]  adds N (default 1) and replies with the new count
//   get      replies with the count
//   reset    sets it to 0
import { agent, GuestError } from "theater";

const decoder = new TextDecoder();

export const { init, handle } = agent({
  initial: (args) => ({ count: Number(decoder.decode(args) || "0") }),
  handlers: {
    add(state, msg) {
      const n = msg.data === "" ? 1 : Number(msg.data);
      if (!Number.isInteger(n)) throw new GuestError(`add takes a whole number, not "${msg.data}"`);
      state.count += n;
      return String(state.count);
    },
    get: (state) => String(state.count),
    reset(state) { state.count = 0; },
  },
});
