// The helper component of examples/composed: plain JavaScript that exports the `text` interface
// (wit/compose.wit). It imports nothing: it runs inside the agent's sandbox, under the agent's limits.
export const text = {
  shout(s) {
    return s.toUpperCase() + "!";
  },
  words(s) {
    return s.split(/\s+/).filter((w) => w.length > 0).length;
  },
};
