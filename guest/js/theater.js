// Write a Theater agent in plain JavaScript (built with componentize-js by `theater build`).
//
//   import { agent, GuestError, log } from "theater";
//
//   export const { init, handle } = agent({
//     initial: (args) => ({ count: 0 }),
//     handlers: {
//       add(state, msg) { state.count += msg.data.n ?? 1; return state.count; },
//     },
//   });
//
// - State is a JSON value (an object unless `initial` says otherwise), kept by the supervisor between calls
//   as JSON text (UTF-8). Handlers change it in place, or set `msg.state`.
// - Messages are routed by kind: a JSON object's "kind" (the object is `msg.data`), or the text before the
//   first ":" (the rest is `msg.data`, a string). `otherwise` takes any other kind.
// - Replies: a handler returns undefined or null (no reply), a Uint8Array (bytes as they are), a string (sent
//   as UTF-8), or anything else JSON can encode.
// - Errors: `throw new GuestError("why")` answers with that error and keeps the state as it was. Any other
//   exception does the same, and its message and stack go to the agent's chain as an `error` log record.
// - Capabilities are plain functions: log, now, selfId, randomBytes, finish, shutdown; and where the agent's
//   world has them send, call, kvGet, kvSet, kvDelete, kvKeys, after, cancel, fetch, spawnChild,
//   stopChild, children. One whose capability
//   the world lacks throws a GuestError naming it.
//
// The WIT world carries bytes as strings of one character per byte (latin-1); this module converts at the
// boundary, so an agent sees Uint8Array and string as JavaScript means them.
import * as caps from "./capabilities.js";  // written by `theater build`: the interfaces of the agent's world

export class GuestError extends Error {}

const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder();
const MAX_STACK_CHARS = 3000;

function toWire(data) {
  const bytes = typeof data === "string" ? utf8.encode(data) : data;
  let out = "";
  for (let i = 0; i < bytes.length; i += 8192) {
    out += String.fromCharCode.apply(null, bytes.subarray(i, i + 8192));
  }
  return out;
}

function fromWire(text) {
  const out = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
  return out;
}

function encode(value) {
  if (value instanceof Uint8Array) return value;
  if (typeof value === "string") return utf8.encode(value);
  return utf8.encode(JSON.stringify(value));
}

function need(cap, name) {
  if (cap === undefined) throw new GuestError(`this agent's world has no ${name} capability (see docs/writing-agents.md)`);
  return cap;
}

function why(error) {
  if (error && typeof error === "object" && "payload" in error) return `${error.tag}: ${error.payload}`;
  return String(error);
}

// --- the runtime, always there -------------------------------------------------------------------

export const log = (message, level = "info") => caps.runtime.log(level, String(message));
export const now = () => caps.runtime.now();  // BigInt nanoseconds since the epoch (recorded)
export const selfId = () => caps.runtime.selfId();
export const randomBytes = (n) => fromWire(caps.runtime.randomBytes(n));
export const finish = () => caps.runtime.finish();
export const shutdown = (detail) => caps.runtime.shutdown(detail);

// --- capabilities, where the world has them ------------------------------------------------------

export function send(to, message) {
  try { need(caps.messaging, "messaging").send(to, toWire(encode(message))); }
  catch (e) { if (e instanceof GuestError) throw e; throw new GuestError(`send to ${to}: ${why(e.payload ?? e)}`); }
}

export function call(to, message, timeoutMs = 5000) {
  let reply;
  try { reply = need(caps.messaging, "messaging").call(to, toWire(encode(message)), timeoutMs); }
  catch (e) { if (e instanceof GuestError) throw e; throw new GuestError(`call to ${to}: ${why(e.payload ?? e)}`); }
  return reply.reply === undefined || reply.reply === null ? null : fromWire(reply.reply);
}

export const kvGet = (key) => { const v = need(caps.kv, "kv").get(key); return v === undefined || v === null ? null : fromWire(v); };
export function kvSet(key, value) {
  try { need(caps.kv, "kv").set(key, toWire(encode(value))); }
  catch (e) { if (e instanceof GuestError) throw e; throw new GuestError(`kv set ${key}: ${why(e.payload ?? e)}`); }
}
export const kvDelete = (key) => need(caps.kv, "kv").delete(key);
export const kvKeys = (prefix = "") => need(caps.kv, "kv").listKeys(prefix);
export function after(delayMs, message) {
  try { return need(caps.timers, "timers").after(BigInt(delayMs), toWire(encode(message))); }
  catch (e) { if (e instanceof GuestError) throw e; throw new GuestError(`timer: ${why(e.payload ?? e)}`); }
}
export const cancel = (id) => need(caps.timers, "timers").cancel(BigInt(id));
export function fetch(method, url, headers = [], body = "") {
  let r;
  try { r = need(caps.http, "http").fetch(method, url, headers, toWire(encode(body))); }
  catch (e) { if (e instanceof GuestError) throw e; throw new GuestError(`${method} ${url}: ${why(e.payload ?? e)}`); }
  return { status: r.status, headers: r.headers, body: fromWire(r.body), text() { return fromUtf8.decode(this.body); } };
}

export function spawnChild(template, name, args = "") {
  try { return need(caps.supervision, "supervision").spawn(template, name, toWire(encode(args))); }
  catch (e) { if (e instanceof GuestError) throw e; throw new GuestError(`spawn ${name}: ${why(e.payload ?? e)}`); }
}
export function stopChild(child) {
  try { need(caps.supervision, "supervision").stop(child); }
  catch (e) { if (e instanceof GuestError) throw e; throw new GuestError(`stop ${child}: ${why(e.payload ?? e)}`); }
}
export const children = () => need(caps.supervision, "supervision").children();

// --- the agent -----------------------------------------------------------------------------------

function kindOf(raw) {
  if (raw[0] === 0x7b) {  // "{"
    try {
      const data = JSON.parse(fromUtf8.decode(raw));
      if (data && typeof data === "object" && typeof data.kind === "string") return [data.kind, data];
    } catch (_) { /* not JSON: a text message */ }
  }
  const text = fromUtf8.decode(raw);
  const at = text.indexOf(":");
  return at < 0 ? [text.trim(), ""] : [text.slice(0, at).trim(), text.slice(at + 1)];
}

function guarded(run) {
  try {
    return run();
  } catch (e) {
    if (e instanceof GuestError) throw e.message;
    const text = e instanceof Error ? `${e.name}: ${e.message}\n${e.stack ?? ""}` : `thrown: ${String(e)}`;
    caps.runtime.log("error", text.slice(0, MAX_STACK_CHARS));
    throw e instanceof Error ? `${e.name}: ${e.message}` : String(e);
  }
}

const dump = (state) => toWire(utf8.encode(JSON.stringify(state)));
const load = (state) => (state === "" ? null : JSON.parse(fromUtf8.decode(fromWire(state))));

export function agent({ initial = () => ({}), handlers = {}, otherwise, childExit } = {}) {
  const handle = (state, message, sender) => guarded(() => {
    const raw = fromWire(message);
    const [kind, data] = kindOf(raw);
    const msg = { kind, data, raw, state: load(state), sender: sender ?? null };
    const handler = Object.hasOwn(handlers, kind) ? handlers[kind] : otherwise;
    if (handler === undefined) {
      throw new GuestError(`no handler for messages of kind "${kind}" (known: ${Object.keys(handlers).sort().join(", ")})`);
    }
    const reply = handler(msg.state, msg);
    return { state: dump(msg.state), reply: reply === undefined || reply === null ? undefined : toWire(encode(reply)) };
  });
  return {
    init: (state, args) => guarded(() => dump(initial(fromWire(args)))),
    handle: (state, message) => handle(state, message),
    receive: (state, sender, message) => handle(state, message, sender),
    childExit: (state, child, reason) => guarded(() => {
      const current = load(state);
      if (childExit) childExit(current, child, reason);
      return dump(current);
    }),
  };
}
