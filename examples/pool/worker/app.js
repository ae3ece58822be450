// A pool worker: it squares numbers, and now and then it runs away (about one call in eight loops until
// its fuel or its deadline ends it), as real workers do. Its supervisor restarts it; the others go on.
//
//   square:N  replies N*N
import { agent, GuestError, randomBytes } from "theater";

export const { init, handle } = agent({
  initial: () => ({ done: 0 }),
  handlers: {
    square(state, msg) {
      const n = Number(msg.data);
      if (!Number.isFinite(n)) throw new GuestError(`square takes a number, not "${msg.data}"`);
      if (randomBytes(1)[0] < 32) for (;;) {}  // a runaway: fuel or the deadline ends it; its supervisor restarts it
      state.done += 1;
      return String(n * n);
    },
  },
});
