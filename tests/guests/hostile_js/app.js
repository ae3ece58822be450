// A JavaScript agent that misbehaves on request, without the guest library: it must be contained exactly
// as a WAT agent is (tests/test_guests.py).
//   "hi"      -> reply "echo:hi"
//   "print"   -> console.log and console.error, reply "printed"
//   "throw"   -> throws an Error from handle (not a string: the binding cannot make it an err)
//   "loop"    -> loops forever
//   "alloc"   -> allocates without bound
//   "recurse" -> recurses without end
export function init(state, args) {
  console.log("init: hostile_js is up");
  return "";
}

export function handle(state, message) {
  switch (message) {
    case "print":
      console.log("to stdout", 42);
      console.error("to stderr");
      return { state, reply: "printed" };
    case "throw":
      throw new Error("thrown on purpose");
    case "loop":
      for (;;) {}
    case "alloc": {
      const hoard = [];
      for (;;) hoard.push(new Array(1 << 20).fill(7));
    }
    case "recurse": {
      const down = (n) => down(n + 1) + 1;
      return { state, reply: String(down(0)) };
    }
    default:
      return { state, reply: `echo:${message}` };
  }
}
