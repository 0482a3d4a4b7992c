"""JSON-RPC 2.0 framing for the daemon: lines in, requests or errors out (no I/O).

One JSON object per line, in both directions (the socket and ``--stdio``).
Requests take their parameters by name (an object) or none; positional
parameters and batches are refused with ``INVALID_REQUEST``, so every method
has one documented shape. A notification (no ``id``) gets no answer, as the
specification says; the daemon's own notifications are events
(``{"jsonrpc": "2.0", "method": "event", "params": {...}}``).

Error codes: the specification's (-32700 to -32603), a few of the daemon's own
(-32000 to -32099, the range the specification leaves to servers), and every
:class:`~securechat.errors.SecureChatError` as its exit code (2 usage, 4 trust,
7 transport, ...), so a command that goes through the daemon exits with the code
it would have had on its own. ``data`` carries the error's class name and hint.

Everything a local client sends is bounded before it is parsed: a line longer
than :data:`MAX_REQUEST_BYTES` is refused (the server reads at most that much).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from securechat.core import envelope
from securechat.errors import SecureChatError

VERSION: Final = "2.0"  # spec-fixed

# Spec-fixed error codes (JSON-RPC 2.0, section 5.1).
PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
# Chosen, in the server range: the daemon's own refusals.
BUSY: Final = -32000  # too many requests in flight on this connection
TOO_MANY_SUBSCRIBERS: Final = -32001
SLOW_SUBSCRIBER: Final = -32002  # in an error event: the subscription ended, resume
NOT_SUBSCRIBED: Final = -32003

# Chosen: a text is at most MAX_TEXT_BYTES of UTF-8; JSON may escape each byte as
# \\uXXXX (six bytes), plus room for the envelope of the request.
MAX_REQUEST_BYTES: Final = 6 * envelope.MAX_TEXT_BYTES + 4096
MAX_ID_CHARS: Final = 64  # a request id (string) longer than this is refused
MAX_METHOD_CHARS: Final = 64


@dataclass(frozen=True, slots=True)
class Request:
    """A well-formed request; ``id`` None and ``notify`` True for a notification."""

    method: str
    params: dict[str, Any]
    id: str | int | None
    notify: bool


class RpcError(Exception):
    """A JSON-RPC error to send back (code, message, optional data)."""

    def __init__(self, code: int, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    @classmethod
    def of(cls, exc: SecureChatError) -> RpcError:
        """Our error as its exit code, its message, and its class and hint as data."""
        data: dict[str, Any] = {"type": type(exc).__name__, "exitCode": exc.exit_code}
        if exc.hint:
            data["hint"] = exc.hint
        return cls(exc.exit_code, str(exc), data)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse(line: bytes) -> Request:
    """One line -> a :class:`Request`; :class:`RpcError` (with the id if known) otherwise.

    The caller bounds the line to :data:`MAX_REQUEST_BYTES` before it gets here.
    """
    try:
        value = json.loads(line, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise RpcError(PARSE_ERROR, "not valid JSON (one object per line, UTF-8)") from exc
    if isinstance(value, list):
        raise RpcError(INVALID_REQUEST, "batches are not supported: send one request per line")
    if not isinstance(value, dict):
        raise RpcError(INVALID_REQUEST, "a request is a JSON object")
    has_id = "id" in value
    req_id = value.get("id")
    if not _valid_id(req_id):
        raise RpcError(INVALID_REQUEST, f"id must be a string (at most {MAX_ID_CHARS}) or integer")
    if value.get("jsonrpc") != VERSION:
        raise _with_id(RpcError(INVALID_REQUEST, 'jsonrpc must be "2.0"'), req_id)
    method = value.get("method")
    if not isinstance(method, str) or not 0 < len(method) <= MAX_METHOD_CHARS:
        raise _with_id(RpcError(INVALID_REQUEST, "method must be a short string"), req_id)
    params = value.get("params", {})
    if not isinstance(params, dict):
        raise _with_id(
            RpcError(INVALID_REQUEST, "params must be an object (by name); none is {}"), req_id
        )
    return Request(method, params, req_id, notify=not has_id)


def _valid_id(req_id: object) -> bool:
    if req_id is None or (isinstance(req_id, int) and not isinstance(req_id, bool)):
        return req_id is None or abs(req_id) < 2**53  # exact in every JSON implementation
    return isinstance(req_id, str) and len(req_id) <= MAX_ID_CHARS


class _IdError(RpcError):
    """An error that knows the id of the request it answers."""

    req_id: str | int | None = None


def _with_id(error: RpcError, req_id: str | int | None) -> RpcError:
    tagged = _IdError(error.code, error.message, error.data)
    tagged.req_id = req_id
    return tagged


def request_id(error: RpcError) -> str | int | None:
    """The id an error answers (None when the request was not readable that far)."""
    return error.req_id if isinstance(error, _IdError) else None


def encode(message: dict[str, Any]) -> bytes:
    """One line of compact JSON (UTF-8, no raw newline inside: JSON escapes them)."""
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def result(req_id: str | int | None, value: Any) -> dict[str, Any]:
    return {"jsonrpc": VERSION, "id": req_id, "result": value}


def error(req_id: str | int | None, err: RpcError) -> dict[str, Any]:
    body: dict[str, Any] = {"code": err.code, "message": err.message}
    if err.data is not None:
        body["data"] = err.data
    return {"jsonrpc": VERSION, "id": req_id, "error": body}


def notification(method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": VERSION, "method": method, "params": params}


def request(req_id: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": VERSION, "id": req_id, "method": method, "params": params}


# --- parameters --------------------------------------------------------------------------


def invalid(message: str) -> RpcError:
    return RpcError(INVALID_PARAMS, message)


def check_known(params: dict[str, Any], allowed: frozenset[str]) -> None:
    """Refuse a parameter the method does not take (a typo must not pass silently)."""
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise invalid(f"unknown parameter {unknown[0]!r}; this method takes {sorted(allowed)}")


def get_str(
    params: dict[str, Any], name: str, *, max_chars: int, default: str | None = None
) -> str:
    value = params.get(name, default)
    if not isinstance(value, str):
        raise invalid(f"{name} must be a string")
    if len(value) > max_chars:
        raise invalid(f"{name} is longer than {max_chars} characters")
    return value


def get_int(params: dict[str, Any], name: str, *, low: int, high: int, default: int) -> int:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise invalid(f"{name} must be an integer from {low} to {high}")
    return value


def get_str_list(params: dict[str, Any], name: str, *, max_items: int, max_chars: int) -> list[str]:
    value = params.get(name)
    if not isinstance(value, list) or not 0 < len(value) <= max_items:
        raise invalid(f"{name} must be a list of 1 to {max_items} strings")
    for item in value:
        if not isinstance(item, str) or not 0 < len(item) <= max_chars:
            raise invalid(f"each item of {name} must be a string of at most {max_chars}")
    return value
