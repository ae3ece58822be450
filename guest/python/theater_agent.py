"""Write a Theater agent in plain Python (built with componentize-py by `theater build`).

    from theater_agent import Agent, GuestError, log

    agent = Agent(initial=lambda args: {"count": 0})

    @agent.on("add")
    def add(state, msg):
        state["count"] += msg.data.get("n", 1)
        return state["count"]

    WitWorld = agent.world()

- **State** is a JSON value (a dict unless ``initial`` says otherwise), kept by the supervisor between
  calls as compact JSON with sorted keys (UTF-8). Handlers change it in place, or set ``msg.state``.
- **Messages** are routed by kind: a JSON object's ``"kind"`` (the object is ``msg.data``), or the text
  before the first ``:`` (the rest is ``msg.data``, a string). ``agent.default`` takes any other.
- **Replies**: a handler returns ``None`` (no reply), ``bytes``, ``str`` (sent as UTF-8), or anything
  else JSON can encode.
- **Errors**: ``raise GuestError("why")`` answers with that error and keeps the state as it was. Any
  other exception does the same, and its traceback goes to the agent's chain as an ``error`` log record.
- **Capabilities** are plain functions: ``log``, ``now``, ``self_id``, ``random_bytes``, ``finish``,
  ``shutdown``; and where the world has them ``send``, ``call``, ``kv_get``, ``kv_set``, ``kv_delete``,
  ``kv_keys``, ``after``, ``cancel``, ``fetch``, ``spawn_child``, ``stop_child``, ``children``. A function
  whose capability the agent's world lacks raises ``GuestError`` naming it.

The WIT world carries bytes as strings of one character per byte (latin-1); this module converts at the
boundary, so an agent sees ``bytes`` and ``str`` as Python means them.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import wit_world
from componentize_py_types import Err
from wit_world.imports import runtime, types

try:
    from wit_world.imports import messaging as _messaging
except ImportError:
    _messaging = None
try:
    from wit_world.imports import kv as _kv
except ImportError:
    _kv = None
try:
    from wit_world.imports import timers as _timers
except ImportError:
    _timers = None
try:
    from wit_world.imports import http as _http
except ImportError:
    _http = None
try:
    from wit_world.imports import supervision as _supervision
except ImportError:
    _supervision = None

__all__ = ["Agent", "GuestError", "Message", "after", "call", "cancel", "children", "fetch", "finish", "kv_delete",
           "kv_get", "kv_keys", "kv_set", "log", "now", "random_bytes", "self_id", "send", "shutdown", "spawn_child",
           "stop_child"]

MAX_TRACEBACK_CHARS = 3000  # a log record is bounded by the policy's max_log_bytes as well


class GuestError(Exception):
    """Answer the message with this error; the state stays as it was."""


def _to_wire(data: bytes | str) -> str:
    return (data.encode() if isinstance(data, str) else bytes(data)).decode("latin-1")


def _from_wire(text: str) -> bytes:
    return text.encode("latin-1")


def _need(module: Any, capability: str) -> Any:
    if module is None:
        raise GuestError(f"this agent's world has no {capability} capability (see docs/writing-agents.md)")
    return module


# --- the runtime, always there ---------------------------------------------------------------

_LEVELS = {"debug": types.LogLevel.DEBUG, "info": types.LogLevel.INFO, "warn": types.LogLevel.WARN,
           "error": types.LogLevel.ERROR}


def log(message: object, level: str = "info") -> None:
    runtime.log(_LEVELS[level], str(message))


def now() -> int:
    """Wall-clock time, nanoseconds since the epoch (recorded: a replay sees the same)."""
    return runtime.now()


def self_id() -> str:
    return runtime.self_id()


def random_bytes(n: int) -> bytes:
    return _from_wire(runtime.random_bytes(n))


def finish() -> None:
    """End this agent normally once this call is committed."""
    runtime.finish()


def shutdown(detail: str) -> None:
    runtime.shutdown(detail)


# --- capabilities, where the world has them ---------------------------------------------------

def _why(error: Any) -> str:
    """A WIT variant error (``CallError_Timeout(value=...)``) as ``timeout: ...``."""
    case = type(error).__name__.partition("_")[2]
    if not case or not hasattr(error, "value"):
        return str(error)
    return "".join("-" + c.lower() if c.isupper() else c for c in case).lstrip("-") + f": {error.value}"


def send(to: str, message: bytes | str | dict[str, Any]) -> None:
    """Queue a message for another agent (delivered once this call is committed)."""
    try:
        _need(_messaging, "messaging").send(to, _to_wire(_encode(message)))
    except Err as exc:
        raise GuestError(f"send to {to}: {_why(exc.value)}") from None


def call(to: str, message: bytes | str | dict[str, Any], timeout_ms: int = 5000) -> bytes | None:
    """Call another agent and wait for its committed reply."""
    try:
        reply = _need(_messaging, "messaging").call(to, _to_wire(_encode(message)), timeout_ms)
    except Err as exc:
        raise GuestError(f"call to {to}: {_why(exc.value)}") from None
    return None if reply.reply is None else _from_wire(reply.reply)


def kv_get(key: str) -> bytes | None:
    value = _need(_kv, "kv").get(key)
    return None if value is None else _from_wire(value)


def kv_set(key: str, value: bytes | str | Any) -> None:
    """Keep ``value`` under ``key`` (bytes as they are, a str as UTF-8, anything else as JSON); written when
    this call is committed."""
    try:
        _need(_kv, "kv").set(key, _to_wire(_encode(value)))
    except Err as exc:
        raise GuestError(f"kv set {key}: {exc.value}") from None


def kv_delete(key: str) -> bool:
    return bool(_need(_kv, "kv").delete(key))


def kv_keys(prefix: str = "") -> list[str]:
    return list(_need(_kv, "kv").list_keys(prefix))


def after(delay_ms: int, message: bytes | str | dict[str, Any]) -> int:
    try:
        return int(_need(_timers, "timers").after(delay_ms, _to_wire(_encode(message))))
    except Err as exc:
        raise GuestError(f"timer: {exc.value}") from None


def cancel(timer_id: int) -> bool:
    return bool(_need(_timers, "timers").cancel(timer_id))


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


def fetch(method: str, url: str, headers: list[tuple[str, str]] | None = None, body: bytes | str = b"") -> Response:
    try:
        r = _need(_http, "http").fetch(method, url, headers or [], _to_wire(body))
    except Err as exc:
        raise GuestError(f"{method} {url}: {_why(exc.value)}") from None
    return Response(r.status, list(r.headers), _from_wire(r.body))


def spawn_child(template: str, name: str, args: bytes | str = b"") -> str:
    """Start a child from one of this agent's templates; its id."""
    try:
        return str(_need(_supervision, "supervision").spawn(template, name, _to_wire(args)))
    except Err as exc:
        raise GuestError(f"spawn {name}: {exc.value}") from None


def stop_child(child: str) -> None:
    try:
        _need(_supervision, "supervision").stop(child)
    except Err as exc:
        raise GuestError(f"stop {child}: {exc.value}") from None


def children() -> list[str]:
    return list(_need(_supervision, "supervision").children())


# --- the agent --------------------------------------------------------------------------------

@dataclass
class Message:
    kind: str
    data: Any  # the JSON object, or the text after "kind:"
    raw: bytes
    state: Any
    sender: str | None = None  # another agent's id, for a message from an agent

    def json(self) -> Any:
        return json.loads(self.raw)


Handler = Callable[[Any, Message], Any]


@dataclass
class Agent:
    initial: Callable[[bytes], Any] = dict
    handlers: dict[str, Handler] = field(default_factory=dict)
    default: Handler | None = None
    child_exit: Callable[[Any, str, str], None] | None = None

    def on(self, kind: str) -> Callable[[Handler], Handler]:
        """Register the handler for messages of ``kind``."""
        def register(fn: Handler) -> Handler:
            self.handlers[kind] = fn
            return fn
        return register

    def otherwise(self, fn: Handler) -> Handler:
        """Register the handler for messages of any kind with no handler of its own."""
        self.default = fn
        return fn

    def on_child_exit(self, fn: Callable[[Any, str, str], None]) -> Callable[[Any, str, str], None]:
        self.child_exit = fn
        return fn

    # What the component exports, on the WIT world's terms.

    def _init(self, state: str, args: str) -> str:
        return _guarded(lambda: _dump(self.initial(_from_wire(args))))

    def _handle(self, state: str, message: str, sender: str | None = None) -> types.Outcome:
        def run() -> types.Outcome:
            raw = _from_wire(message)
            kind, data = _kind(raw)
            msg = Message(kind, data, raw, _load(state), sender)
            handler = self.handlers.get(kind, self.default)
            if handler is None:
                raise GuestError(f"no handler for messages of kind {kind!r} (known: {', '.join(sorted(self.handlers))})")
            reply = handler(msg.state, msg)
            return types.Outcome(state=_dump(msg.state), reply=None if reply is None else _to_wire(_encode(reply)))
        return _guarded(run)

    def _child_exit(self, state: str, child: str, reason: str) -> str:
        def run() -> str:
            current = _load(state)
            if self.child_exit is not None:
                self.child_exit(current, child, reason)
            return _dump(current)
        return _guarded(run)

    def world(self) -> type:
        """The class componentize-py wants as ``WitWorld``, for whichever world this agent is built for."""
        agent = self
        members: dict[str, Any] = {
            "init": lambda _self, state, args: agent._init(state, args),
            "handle": lambda _self, state, message: agent._handle(state, message),
        }
        if hasattr(wit_world.WitWorld, "receive"):
            members["receive"] = lambda _self, state, sender, message: agent._handle(state, message, sender)
        if hasattr(wit_world.WitWorld, "child_exit"):
            members["child_exit"] = lambda _self, state, child, reason: agent._child_exit(state, child, reason)
        return type("WitWorld", (wit_world.WitWorld,), members)


def _kind(raw: bytes) -> tuple[str, Any]:
    if raw[:1] == b"{":
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("kind"), str):
            return data["kind"], data
    text = raw.decode(errors="replace")
    kind, _, rest = text.partition(":")
    return kind.strip(), rest


def _encode(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _dump(state: Any) -> str:
    return _to_wire(json.dumps(state, sort_keys=True, separators=(",", ":")))


def _load(state: str) -> Any:
    return json.loads(_from_wire(state)) if state else None


def _guarded(fn: Callable[[], Any]) -> Any:
    """Run a call; a GuestError becomes the call's error, any other exception too, with its traceback logged."""
    try:
        return fn()
    except GuestError as exc:
        raise Err(str(exc)) from None
    except Err:
        raise
    except Exception as exc:
        text = traceback.format_exc()
        runtime.log(types.LogLevel.ERROR, text[-MAX_TRACEBACK_CHARS:])
        raise Err(f"{type(exc).__name__}: {exc}") from None
