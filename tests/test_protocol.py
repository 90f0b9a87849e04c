"""Unit tests for the control protocol: framing, validation, error mapping (pure, no sockets)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from dbtunneld.core import errors
from dbtunneld.process import protocol as P


def req(**obj) -> bytes:
    base = {"v": 1, "id": 1, "cmd": "status", "args": {}}
    base.update(obj)
    return json.dumps(base).encode()


# ------------------------------------------------------------------ requests

def test_valid_request_round_trips():
    line = P.encode_request(7, "connect", {"name": "orders", "wait": 5})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    r = P.parse_request(line.rstrip(b"\n"))
    assert r == P.Request(7, "connect", {"name": "orders", "wait": 5})


def test_args_may_be_omitted():
    assert P.parse_request(b'{"v":1,"id":"a","cmd":"status"}').args == {}


@pytest.mark.parametrize("line,kind", [
    (b"not json", "malformed"),
    (b"\xff\xfe\x00", "malformed"),
    (b"[1,2]", "malformed"),
    (b"[" * 5000, "malformed"),
    (req(id=True), "malformed"),
    (req(id=[1]), "malformed"),
    (req(id="x" * 65), "malformed"),
    (req(v=2), "version"),
    (req(v="1"), "version"),
    (req(cmd="format_disk"), "unknown_command"),
    (req(cmd=None), "unknown_command"),
    (req(extra=1), "malformed"),
    (req(args=[]), "bad_args"),
    (req(args={"x": 1}), "bad_args"),
    (req(cmd="connect", args={}), "bad_args"),
    (req(cmd="connect", args={"name": "a", "all": True}), "bad_args"),
    (req(cmd="connect", args={"name": 3}), "bad_args"),
    (req(cmd="connect", args={"all": 1}), "bad_args"),
    (req(cmd="connect", args={"name": "a", "wait": True}), "bad_args"),
    (req(cmd="creds", args={}), "bad_args"),
    (req(cmd="creds", args={"name": "a", "field": "token"}), "bad_args"),
])
def test_bad_requests_are_classified(line, kind):
    with pytest.raises(P.BadRequest) as info:
        P.parse_request(line)
    assert info.value.kind == kind
    assert info.value.message


def test_bad_request_keeps_the_id_when_readable():
    with pytest.raises(P.BadRequest) as info:
        P.parse_request(req(id=42, cmd="nope"))
    assert info.value.id == 42


def test_connect_all_is_accepted():
    assert P.parse_request(req(cmd="connect", args={"all": True})).args == {"all": True}


def test_oversized_request_cannot_be_encoded():
    with pytest.raises(errors.ProtocolError):
        P.encode_request(1, "connect", {"name": "x" * P.MAX_REQUEST_BYTES})


# ------------------------------------------------------------------ responses and events

def test_result_and_event_parse_back():
    assert P.parse_message(P.encode_result(3, {"a": 1})) == P.Response(3, True, {"a": 1}, None)
    assert P.parse_message(P.encode_event("status", {"x": []})) == P.Event("status", {"x": []})


def test_error_response_parses_back():
    msg = P.parse_message(P.encode_error(4, "not_found", "no cluster", "see status"))
    assert isinstance(msg, P.Response) and not msg.ok
    assert msg.error == {"kind": "not_found", "message": "no cluster", "hint": "see status"}


@pytest.mark.parametrize("line", [b'{"v":1,"id":1}', b'{"v":1,"id":1,"ok":false}', b'{"v":9,"ok":true}',
                                  b'{"v":1,"event":5}'])
def test_malformed_daemon_messages_raise(line):
    with pytest.raises(errors.ProtocolError):
        P.parse_message(line)


def test_nan_is_not_sent():
    with pytest.raises(ValueError):
        P.encode_result(1, float("nan"))


# ------------------------------------------------------------------ framing

def test_line_buffer_splits_and_joins_chunks():
    b = P.LineBuffer(limit=100)
    assert b.feed(b'{"a"') == []
    assert b.feed(b':1}\n{"b":2}\n{"c"') == [b'{"a":1}', b'{"b":2}']
    assert b.pending == 4
    assert b.feed(b":3}\n") == [b'{"c":3}']
    assert b.pending == 0


def test_blank_lines_are_ignored():
    assert P.LineBuffer(10).feed(b"\n\r\n  \nab\n") == [b"ab"]


def test_oversized_line_is_reported_once_and_skipped():
    b = P.LineBuffer(limit=10)
    out = b.feed(b"x" * 8) + b.feed(b"y" * 8) + b.feed(b"z" * 1000) + b.feed(b"\nok\n")
    assert len(out) == 2 and isinstance(out[0], P.Oversized) and out[0].size == 1016
    assert out[1] == b"ok"
    assert len(b._buf) == 0


def test_line_at_exact_limit_passes():
    assert P.LineBuffer(limit=5).feed(b"12345\n123456\n")[0] == b"12345"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=20), st.integers(1, 30))
def test_framing_matches_split_whatever_the_chunking(chunks, limit):
    data = b"".join(chunks)
    b = P.LineBuffer(limit=limit)
    got = [x for c in chunks for x in b.feed(c)]
    complete = data.split(b"\n")[:-1]
    want = [ln if len(ln) <= limit else "big" for ln in complete if len(ln) > limit or ln.strip()]
    assert [x if isinstance(x, bytes) else "big" for x in got] == want
    assert len(b._buf) <= limit


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_but_bad_request(data):
    for line in P.LineBuffer().feed(data + b"\n"):
        try:
            P.parse_request(line)
        except P.BadRequest:
            pass


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("exc,kind", [
    (errors.SignInNeededError("sso expired"), "sign_in_needed"),
    (errors.PortInUseError(13306, "pid 4 (nc)"), "port_in_use"),
    (errors.HostKeyError("bad key", "check"), "host_key"),
    (errors.PermissionDeniedError("denied", "ask"), "permission_denied"),
    (errors.NeedsUserError("do it", "how"), "needs_user"),
    (errors.TransientError("down", "wait"), "transient"),
    (errors.UnknownNameError('no cluster "x"'), "not_found"),
    (errors.ClosedError("closed"), "closed"),
])
def test_errors_map_to_kinds_and_back(exc, kind):
    payload = P.error_payload(exc)
    assert payload["kind"] == kind
    again = P.error_from_payload(json.loads(json.dumps(payload)))
    assert type(again) is type(exc)
    assert again.message == exc.message and again.hint == exc.hint


def test_config_error_keeps_every_problem():
    exc = errors.ConfigError("c.toml", [errors.Problem("vault.address", "is required", "add it"),
                                        errors.Problem("clusters[0].name", "bad", "")])
    again = P.error_from_payload(P.error_payload(exc))
    assert isinstance(again, errors.ConfigError)
    assert again.problems == exc.problems and again.source == "c.toml"


def test_unexpected_exception_is_internal_without_traceback():
    payload = P.error_payload(ZeroDivisionError("division by zero"))
    assert payload["kind"] == "internal" and "ZeroDivisionError" in payload["message"]
    assert "Traceback" not in json.dumps(payload)
    again = P.error_from_payload(payload)
    assert isinstance(again, P.RemoteError) and again.kind == "internal"


def test_unknown_kind_from_a_newer_daemon_is_kept():
    again = P.error_from_payload({"kind": "martian", "message": "m", "hint": "h"})
    assert isinstance(again, P.RemoteError) and again.kind == "martian" and again.hint == "h"
