"""The control protocol: versioned JSON lines between the daemon and its clients (CLI, tray).

Pure functions and one framing class, no sockets, so every rule is unit-tested:

* request  ``{"v":1,"id":7,"cmd":"connect","args":{"name":"orders"}}``
* response ``{"v":1,"id":7,"ok":true,"result":{...}}`` or
  ``{"v":1,"id":7,"ok":false,"error":{"kind":"port_in_use","message":"...","hint":"..."}}``
* event    ``{"v":1,"event":"status","data":{...}}`` (only on a connection that subscribed)

One message per line (UTF-8 JSON, no raw newline inside), at most ``MAX_REQUEST_BYTES`` for a
request and ``MAX_MESSAGE_BYTES`` for anything the daemon sends. Errors travel as a ``kind``
that maps back to the exception tree of ``errors`` on the client side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..core import errors
from ..core.errors import ProtocolError

VERSION = 1
MAX_REQUEST_BYTES = 64 * 1024
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_ID_LENGTH = 64

CREDS_FIELDS = ("username", "password", "mysql", "url", "jdbc", "lease_user")
_NUMBER = (int, float)

# cmd -> {arg: type}; names in REQUIRED_ARGS must be present.
COMMANDS: dict[str, dict[str, Any]] = {
    "status": {},
    "subscribe": {},
    "connect": {"name": str, "all": bool, "wait": _NUMBER},
    "disconnect": {"name": str, "all": bool},
    "reconnect": {"name": str, "all": bool},
    "creds": {"name": str, "field": str},
    "renew": {"name": str, "rotate": bool},
    "reset_password": {"name": str},          # a new local password (login = "local")
    "login": {"wait": _NUMBER, "use_device_code": bool},
    "reload": {},
    "stop": {"wait": _NUMBER},
}
REQUIRED_ARGS = {"creds": ("name",), "reset_password": ("name",)}
ONE_TARGET = ("connect", "disconnect", "reconnect")   # need exactly one of name / all


# ----------------------------------------------------------------------------- messages

@dataclass(frozen=True)
class Request:
    id: int | str | None
    cmd: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Response:
    id: int | str | None
    ok: bool
    result: Any = None
    error: dict[str, Any] | None = None


@dataclass(frozen=True)
class Event:
    event: str
    data: Any = None


class BadRequest(ProtocolError):
    """A request that cannot be served; ``kind`` says why and ``id`` echoes the request."""

    def __init__(self, kind: str, message: str, hint: str = "", id: Any = None) -> None:
        super().__init__(message, hint)
        self.kind = kind
        self.id = id


def _dump(obj: dict[str, Any], limit: int) -> bytes:
    line = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode() + b"\n"
    if len(line) > limit:
        raise ProtocolError(f"message of {len(line)} bytes exceeds the limit of {limit}")
    return line


def encode_request(req_id: int | str, cmd: str, args: dict[str, Any] | None = None) -> bytes:
    return _dump({"v": VERSION, "id": req_id, "cmd": cmd, "args": args or {}}, MAX_REQUEST_BYTES)


def encode_result(req_id: Any, result: Any) -> bytes:
    return _dump({"v": VERSION, "id": req_id, "ok": True, "result": result}, MAX_MESSAGE_BYTES)


def encode_error(req_id: Any, kind: str, message: str, hint: str = "", **extra: Any) -> bytes:
    error = {"kind": kind, "message": message, "hint": hint, **extra}
    return _dump({"v": VERSION, "id": req_id, "ok": False, "error": error}, MAX_MESSAGE_BYTES)


def encode_event(event: str, data: Any = None) -> bytes:
    return _dump({"v": VERSION, "event": event, "data": data}, MAX_MESSAGE_BYTES)


# ----------------------------------------------------------------------------- decoding

def _load_object(line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:   # UnicodeDecodeError is a ValueError
        raise BadRequest("malformed", f"not a JSON line: {str(exc)[:80]}",
                         "send one JSON object per line (UTF-8)") from None
    if not isinstance(obj, dict):
        raise BadRequest("malformed", f"expected a JSON object, got {type(obj).__name__}",
                         'send {"v":1,"id":1,"cmd":"status","args":{}}')
    return obj


def _valid_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) < 2 ** 53
    return isinstance(value, str) and len(value) <= MAX_ID_LENGTH


def _check_version(obj: dict[str, Any], req_id: Any) -> None:
    if obj.get("v") != VERSION:
        raise BadRequest("version", f"unsupported protocol version {obj.get('v')!r} (this side speaks {VERSION})",
                         "restart the daemon after an upgrade: `dbtunneld stop`, then run the command again", req_id)


def _type_ok(value: Any, kind: Any) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    return isinstance(value, kinds)


def _check_args(cmd: str, args: Any, req_id: Any) -> dict[str, Any]:
    if not isinstance(args, dict):
        raise BadRequest("bad_args", f"{cmd}: args must be an object", id=req_id)
    schema = COMMANDS[cmd]
    for name, value in args.items():
        if name not in schema:
            known = ", ".join(schema) or "none"
            raise BadRequest("bad_args", f"{cmd}: unknown argument {name!r} (known: {known})", id=req_id)
        if not _type_ok(value, schema[name]):
            raise BadRequest("bad_args", f"{cmd}: argument {name!r} has the wrong type", id=req_id)
    for name in REQUIRED_ARGS.get(cmd, ()):
        if name not in args:
            raise BadRequest("bad_args", f"{cmd}: argument {name!r} is required", id=req_id)
    if cmd in ONE_TARGET and ("name" in args) == bool(args.get("all")):
        raise BadRequest("bad_args", f"{cmd}: give either a cluster name or all=true", id=req_id)
    if cmd == "creds" and args.get("field", "username") not in CREDS_FIELDS:
        raise BadRequest("bad_args", f"creds: unknown field {args['field']!r}",
                         f"use one of {', '.join(CREDS_FIELDS)}", req_id)
    return args


def parse_request(line: bytes) -> Request:
    """Validate one request line; raise BadRequest (with the id when it could be read)."""
    obj = _load_object(line)
    req_id = obj.get("id")
    if not _valid_id(req_id):
        raise BadRequest("malformed", "id must be an integer or a short string")
    _check_version(obj, req_id)
    cmd = obj.get("cmd")
    if not isinstance(cmd, str) or cmd not in COMMANDS:
        shown = cmd if isinstance(cmd, str) and len(cmd) < 40 else "?"
        raise BadRequest("unknown_command", f"unknown command {shown!r}",
                         f"known commands: {', '.join(COMMANDS)}", req_id)
    extra = set(obj) - {"v", "id", "cmd", "args"}
    if extra:
        raise BadRequest("malformed", f"unknown keys {sorted(extra)!r}", id=req_id)
    return Request(req_id, cmd, _check_args(cmd, obj.get("args", {}), req_id))


def parse_message(line: bytes) -> Response | Event:
    """What a client reads: a response to one of its requests, or an event."""
    obj = _load_object(line)
    if obj.get("v") != VERSION:
        raise ProtocolError(f"the daemon speaks protocol version {obj.get('v')!r}, this client {VERSION}",
                            "restart the daemon after an upgrade: `dbtunneld stop`")
    if "event" in obj:
        if not isinstance(obj["event"], str):
            raise ProtocolError("event name must be a string")
        return Event(obj["event"], obj.get("data"))
    if not isinstance(obj.get("ok"), bool):
        raise ProtocolError("a response needs ok: true or false")
    error = obj.get("error")
    if not obj["ok"] and not (isinstance(error, dict) and isinstance(error.get("kind"), str)):
        raise ProtocolError("an error response needs error.kind")
    return Response(obj.get("id"), obj["ok"], obj.get("result"), error)


# ----------------------------------------------------------------------------- framing

class Oversized:
    """Stands in for a line that was longer than the limit (its bytes are dropped)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __repr__(self) -> str:
        return f"Oversized({self.size})"


class LineBuffer:
    """Splits a byte stream into lines of at most ``limit`` bytes (newline excluded).

    A longer line is reported once as ``Oversized`` and skipped up to its newline, so a
    flood without newlines never grows memory past the limit.
    """

    def __init__(self, limit: int = MAX_REQUEST_BYTES) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._skipping = 0          # > 0: inside an oversized line, bytes dropped so far

    def feed(self, data: bytes) -> list[bytes | Oversized]:
        out: list[bytes | Oversized] = []
        start = 0
        while start < len(data):
            nl = data.find(b"\n", start)
            chunk = data[start:] if nl < 0 else data[start:nl]
            self._take(chunk, complete=nl >= 0, out=out)
            start = len(data) if nl < 0 else nl + 1
        return out

    def _take(self, chunk: bytes, complete: bool, out: list[bytes | Oversized]) -> None:
        if self._skipping:
            self._skipping += len(chunk)
        elif len(self._buf) + len(chunk) > self.limit:
            self._skipping = len(self._buf) + len(chunk)
            self._buf.clear()
        else:
            self._buf += chunk
        if complete:
            self._end_line(out)

    def _end_line(self, out: list[bytes | Oversized]) -> None:
        if self._skipping:
            out.append(Oversized(self._skipping))
            self._skipping = 0
        elif self._buf.strip():
            out.append(bytes(self._buf))
        self._buf.clear()

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line (a peer that closes with pending > 0 sent a truncated line)."""
        return len(self._buf) or self._skipping


def iter_lines(buffer: LineBuffer, chunks: Iterator[bytes]) -> Iterator[bytes | Oversized]:
    for chunk in chunks:
        yield from buffer.feed(chunk)


# ----------------------------------------------------------------------------- errors

KIND_OF: tuple[tuple[type[errors.DbtunneldError], str], ...] = (   # most specific first
    (errors.SignInNeededError, "sign_in_needed"),
    (errors.PortInUseError, "port_in_use"),
    (errors.HostKeyError, "host_key"),
    (errors.PermissionDeniedError, "permission_denied"),
    (errors.NeedsUserError, "needs_user"),
    (errors.TransientError, "transient"),
    (errors.ConfigError, "config"),
    (errors.UnknownNameError, "not_found"),
    (errors.ClosedError, "closed"),
    (errors.ProtocolError, "protocol"),
)
CLASS_OF = {kind: cls for cls, kind in KIND_OF}


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, BadRequest):
        return exc.kind
    for cls, kind in KIND_OF:
        if isinstance(exc, cls):
            return kind
    return "internal"


def error_payload(exc: BaseException) -> dict[str, Any]:
    """The ``error`` object for an exception (no traceback: that goes to the daemon log)."""
    payload: dict[str, Any]
    if isinstance(exc, errors.DbtunneldError):
        payload = {"kind": error_kind(exc), "message": exc.message, "hint": exc.hint}
    else:
        payload = {"kind": "internal", "message": f"internal error: {type(exc).__name__}: {exc}"[:500],
                   "hint": "see the daemon log (`dbtunneld doctor --report FILE` collects it)"}
    if isinstance(exc, errors.ConfigError):
        payload["source"] = exc.source
        payload["problems"] = [{"path": p.path, "message": p.message, "fix": p.fix} for p in exc.problems]
    if isinstance(exc, errors.PortInUseError):
        payload["port"], payload["holder"] = exc.port, exc.holder
    return payload


class RemoteError(errors.DbtunneldError):
    """An error the daemon reported whose kind has no class of its own here."""

    def __init__(self, kind: str, message: str, hint: str = "") -> None:
        super().__init__(message, hint)
        self.kind = kind


def error_from_payload(error: dict[str, Any]) -> errors.DbtunneldError:
    """Rebuild the exception a daemon reply describes (the client raises it)."""
    kind = str(error.get("kind", "internal"))
    message, hint = str(error.get("message", "")), str(error.get("hint", ""))
    if kind == "config":
        problems = [errors.Problem(str(p.get("path", "")), str(p.get("message", "")), str(p.get("fix", "")))
                    for p in error.get("problems", []) if isinstance(p, dict)]
        return errors.ConfigError(str(error.get("source", "config")), problems or [errors.Problem("", message)])
    if kind == "port_in_use" and isinstance(error.get("port"), int):
        return errors.PortInUseError(error["port"], str(error.get("holder", "")))
    cls = CLASS_OF.get(kind)
    if cls is None or cls is errors.PortInUseError:
        return RemoteError(kind, message, hint)
    exc = cls.__new__(cls)
    errors.DbtunneldError.__init__(exc, message, hint)
    return exc
