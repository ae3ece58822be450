// A JavaScript agent on the guest library with kv and messaging (world service-agent): tests/test_guests.py.
import { agent, call, GuestError, kvGet, kvSet, log, send } from "theater";

export const { init, handle, receive } = agent({
  initial: () => ({ notes: 0, heard: [] }),
  handlers: {
    note(state, msg) {
      kvSet(`note:${state.notes}`, msg.data);
      state.notes += 1;
      return { notes: state.notes };
    },
    read(state, msg) {
      const value = kvGet(msg.data);
      return value === null ? "(none)" : value;
    },
    tell(state, msg) {
      send(msg.data.to, { kind: "hear", text: msg.data.text });
      return "sent";
    },
    ask(state, msg) {
      return call(msg.data.to, { kind: "heard" });
    },
    hear(state, msg) {
      state.heard.push(msg.data.text);
      log(`heard ${JSON.stringify(msg.data.text)} from ${msg.sender}`);
    },
    heard: (state) => state.heard,
    refuse(state) {
      state.notes = -1;  // not kept: the call fails
      throw new GuestError("refused on purpose");
    },
    crash() {
      return null.missing;
    },
  },
});
