"""The daemon's JSON-RPC framing (no I/O): what a local client may send, and our errors."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from securechat import errors
from securechat.daemon import remote, rpc


def _code(line: bytes) -> int:
    with pytest.raises(rpc.RpcError) as info:
        rpc.parse(line)
    return info.value.code


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{", rpc.PARSE_ERROR),
        (b"\xff\xfe", rpc.PARSE_ERROR),
        (b'{"a": NaN}', rpc.PARSE_ERROR),
        (b"[" * 100_000, rpc.PARSE_ERROR),  # deep nesting: an error, not a crash
        (b"[]", rpc.INVALID_REQUEST),
        (b'[{"jsonrpc": "2.0", "id": 1, "method": "version"}]', rpc.INVALID_REQUEST),
        (b'"version"', rpc.INVALID_REQUEST),
        (b'{"id": 1, "method": "version"}', rpc.INVALID_REQUEST),
        (b'{"jsonrpc": "1.0", "id": 1, "method": "version"}', rpc.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": 1}', rpc.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": 1, "method": ""}', rpc.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "' + b"m" * 65 + b'"}', rpc.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "send", "params": [1]}', rpc.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": true, "method": "version"}', rpc.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": 1.5, "method": "version"}', rpc.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": 9007199254740993, "method": "v"}', rpc.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": "' + b"i" * 65 + b'", "method": "v"}', rpc.INVALID_REQUEST),
    ],
)
def test_malformed_requests_are_refused_with_their_code(line: bytes, code: int) -> None:
    assert _code(line) == code


def test_the_error_keeps_the_id_once_it_was_readable() -> None:
    with pytest.raises(rpc.RpcError) as info:
        rpc.parse(b'{"jsonrpc": "2.0", "id": "abc", "method": 5}')
    assert rpc.request_id(info.value) == "abc"
    with pytest.raises(rpc.RpcError) as info:
        rpc.parse(b"{")
    assert rpc.request_id(info.value) is None


def test_requests_and_notifications() -> None:
    req = rpc.parse(b'{"jsonrpc": "2.0", "id": 3, "method": "send", "params": {"text": "x"}}')
    assert req == rpc.Request("send", {"text": "x"}, 3, notify=False)
    note = rpc.parse(b'{"jsonrpc": "2.0", "method": "version"}')
    assert note.notify and note.params == {}
    assert rpc.parse(b'{"jsonrpc": "2.0", "id": null, "method": "v"}').notify is False


@given(st.binary(max_size=200))
def test_any_bytes_give_a_request_or_our_error(data: bytes) -> None:
    with contextlib.suppress(rpc.RpcError):
        rpc.parse(data)


@given(st.text(max_size=200))
def test_an_encoded_message_is_one_line(text: str) -> None:
    line = rpc.encode(rpc.notification("event", {"text": text}))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line)["params"]["text"] == text


def test_our_errors_go_out_with_their_exit_code_and_come_back_as_their_class() -> None:
    exc = errors.PeerKeyChangedError("the key for 'bob' has CHANGED", hint="trust bob")
    wire = rpc.error(1, rpc.RpcError.of(exc))
    assert wire["error"]["code"] == 4
    assert wire["error"]["data"] == {
        "type": "PeerKeyChangedError",
        "exitCode": 4,
        "hint": "trust bob",
    }
    back = remote.error_from(json.loads(json.dumps(wire))["error"])
    assert isinstance(back, errors.PeerKeyChangedError) and back.exit_code == 4
    assert str(back) == str(exc) and back.hint == "trust bob"


def test_unknown_or_odd_error_types_still_map_to_a_sane_error() -> None:
    auth = remote.error_from({"code": 6, "message": "m", "data": {"type": "AuthenticationError"}})
    assert isinstance(auth, errors.AuthenticationError)
    not_ours = remote.error_from({"code": 5, "message": "m", "data": {"type": "OSError"}})
    assert isinstance(not_ours, errors.InternalError)
    usage = remote.error_from({"code": rpc.INVALID_PARAMS, "message": "text must be a string"})
    assert isinstance(usage, errors.UsageError) and usage.exit_code == 2


def test_parameter_checks() -> None:
    with pytest.raises(rpc.RpcError, match="unknown parameter 'txet'"):
        rpc.check_known({"txet": 1}, frozenset({"text"}))
    for bad in (True, -1, 2**70, "3", 1.0):
        with pytest.raises(rpc.RpcError):
            rpc.get_int({"since": bad}, "since", low=0, high=2**62, default=0)
    with pytest.raises(rpc.RpcError):
        rpc.get_str_list({"to": ["a"] * 100}, "to", max_items=63, max_chars=10)
    with pytest.raises(rpc.RpcError):
        rpc.get_str({"text": "x" * 11}, "text", max_chars=10)
