"""The response head parser (a table replayed whole, byte by byte and with trailing data) and the
body framing decision for requests and responses."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from replay import replay_error as replay_fails
from replay import replay_ok

from smartroute.errors import HttpParseError
from smartroute.protocols.http import RequestHead, parse_request_head
from smartroute.protocols.http_response import (
    DEFAULT_MAX_RESPONSE_HEAD,
    BodyFraming,
    ResponseHead,
    parse_response_head,
    request_framing,
    response_framing,
)

# Whatever follows the head must not change it: a body, the next response, binary junk.
TRAILING = [b"body", b"HTTP/1.1 200 OK\r\n\r\n", b"\r\n\r\n", b"\x00\xff\n\n"]


def replay(data: bytes, max_size: int = DEFAULT_MAX_RESPONSE_HEAD) -> ResponseHead:
    return replay_ok(lambda d: parse_response_head(d, max_size), data, TRAILING)


def replay_error(data: bytes, max_size: int = DEFAULT_MAX_RESPONSE_HEAD) -> HttpParseError:
    return replay_fails(lambda d: parse_response_head(d, max_size), data, TRAILING, HttpParseError)


GOOD: dict[str, tuple[bytes, dict[str, Any]]] = {
    "200 with headers": (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n",
        {
            "version": "HTTP/1.1",
            "status": 200,
            "reason": "OK",
            "headers": (("Content-Type", "text/plain"), ("Content-Length", "5")),
        },
    ),
    "no headers": (b"HTTP/1.1 200 OK\r\n\r\n", {"status": 200, "headers": ()}),
    "HTTP/1.0": (b"HTTP/1.0 404 Not Found\r\n\r\n", {"version": "HTTP/1.0", "status": 404}),
    "reason with spaces, tab and obs-text": (
        b"HTTP/1.1 418 I'm a  tea\tpot \xe9\r\n\r\n",
        {"status": 418, "reason": "I'm a  tea\tpot \xe9"},
    ),
    "empty reason after the space": (b"HTTP/1.1 204 \r\n\r\n", {"status": 204, "reason": ""}),
    "no reason, no space": (b"HTTP/1.1 304\r\n\r\n", {"status": 304, "reason": ""}),
    "reason made of spaces": (b"HTTP/1.1 200   \r\n\r\n", {"reason": "  "}),
    "lowest status": (b"HTTP/1.1 100 Continue\r\n\r\n", {"status": 100}),
    "highest status": (b"HTTP/1.1 599 Whatever\r\n\r\n", {"status": 599}),
    "LF only": (
        b"HTTP/1.1 200 OK\nServer: x\nX-A: 1\n\n",
        {"reason": "OK", "headers": (("Server", "x"), ("X-A", "1"))},
    ),
    "mixed line endings": (
        b"HTTP/1.1 200 OK\nA: 1\r\nB: 2\n\r\n",
        {"headers": (("A", "1"), ("B", "2"))},
    ),
    "CRLF then LF ends the head": (b"HTTP/1.1 200 OK\r\n\n", {"headers": ()}),
    "repeated headers, names as sent": (
        b"HTTP/1.1 200 OK\r\nVary: Accept\r\nset-cookie: a=1\r\nVARY: Origin\r\n"
        b"Set-Cookie: b=2; Expires=Wed, 21 Oct 2015 07:28:00 GMT\r\n\r\n",
        {
            "headers": (
                ("Vary", "Accept"),
                ("set-cookie", "a=1"),
                ("VARY", "Origin"),
                ("Set-Cookie", "b=2; Expires=Wed, 21 Oct 2015 07:28:00 GMT"),
            )
        },
    ),
    "OWS stripped, inner spaces kept": (
        b"HTTP/1.1 200 OK\r\nX-Sp: \t  a  b \t\r\nX-Empty:\r\nX-Blank:   \r\n\r\n",
        {"headers": (("X-Sp", "a  b"), ("X-Empty", ""), ("X-Blank", ""))},
    ),
    "latin-1 header value": (
        b"HTTP/1.1 200 OK\r\nX-Name: caf\xe9\r\n\r\n",
        {"headers": (("X-Name", "caf\xe9"),)},
    ),
    "framing headers are not judged by the head parser": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        {"status": 200},
    ),
}


@pytest.mark.parametrize("case", list(GOOD), ids=list(GOOD))
def test_good(case: str) -> None:
    data, expected = GOOD[case]
    head = replay(data)
    assert {name: getattr(head, name) for name in expected} == expected


def test_header_lookup() -> None:
    head = replay(GOOD["repeated headers, names as sent"][0])
    assert head.header("vary") == "Accept"
    assert head.header("SET-COOKIE") == "a=1"
    assert head.header("x-missing") is None
    assert head.header_values("Vary") == ["Accept", "Origin"]
    assert head.header_values("x-missing") == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a", ["a"]),
        ("a,b", ["a", "b"]),
        (" a ,\tb\t, c ", ["a", "b", "c"]),
        ("a,,b, ,", ["a", "b"]),  # empty elements are ignored (RFC 9110 section 5.6.1)
        ("", []),
        ('W/"x,y", "z"', ['W/"x,y"', '"z"']),  # no split inside a quoted string
        ('a="q\\",r", b', ['a="q\\",r"', "b"]),  # an escaped quote does not end it
        ('"open, never closed', ['"open, never closed']),
        ("trailing\\", ["trailing\\"]),
    ],
)
def test_header_values(value: str, expected: list[str]) -> None:
    head = ResponseHead("HTTP/1.1", 200, "OK", (("Cache-Control", value), ("X", "1")), 0)
    assert head.header_values("cache-control") == expected


def test_header_values_joins_lines_in_order() -> None:
    headers = (("Connection", "keep-alive, Upgrade"), ("X", "y"), ("connection", "close"))
    head = ResponseHead("HTTP/1.1", 101, "", headers, 0)
    assert head.header_values("CONNECTION") == ["keep-alive", "Upgrade", "close"]


def test_size_limit_is_exact() -> None:
    data = b"HTTP/1.1 200 OK\r\nX: " + b"a" * 40 + b"\r\n\r\n"
    assert replay(data, max_size=len(data)).length == len(data)
    with pytest.raises(HttpParseError) as info:
        parse_response_head(data, max_size=len(data) - 1)
    assert info.value.status == 502


def test_502_as_soon_as_the_buffer_exceeds_max_size() -> None:
    data = b"HTTP/1.1 200 OK\r\nX: " + b"a" * 200
    assert parse_response_head(data[:100], max_size=100) is None
    with pytest.raises(HttpParseError) as info:
        parse_response_head(data[:101], max_size=100)
    assert info.value.status == 502
    with pytest.raises(HttpParseError, match="exceeds 65536 bytes"):
        parse_response_head(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 12000)


@pytest.mark.parametrize(
    "data", [b"X", b"HTTP/1.1 20x", b"HTTP/1.1 200 OK\x00", b"http", b"HTTP/1.1\r\n"]
)
def test_a_bad_status_line_fails_before_the_head_ends(data: bytes) -> None:
    with pytest.raises(HttpParseError) as info:
        parse_response_head(data)
    assert info.value.status == 502


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"H",
        b"HTTP/1.1 2",
        b"HTTP/1.1 200",
        b"HTTP/1.1 200 OK\r",
        b"HTTP/1.1 200\nServer: x\r\n",
    ],
)
def test_a_partial_head_needs_more(data: bytes) -> None:
    assert parse_response_head(data) is None


BAD: dict[str, tuple[bytes, str]] = {  # input, a piece of the error message; always 502
    "empty line first": (b"\r\nHTTP/1.1 200 OK\r\n\r\n", "malformed status line"),
    "empty head": (b"\n\n", "malformed status line"),
    "a request line": (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", "malformed status line"),
    "binary junk": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc", "malformed status line"),
    "lower-case version": (b"http/1.1 200 OK\r\n\r\n", "malformed status line"),
    "HTTP/2 without minor": (b"HTTP/2 200\r\n\r\n", "malformed status line"),
    "HTTP/2.0": (b"HTTP/2.0 200 OK\r\n\r\n", "unsupported HTTP version"),
    "HTTP/1.2": (b"HTTP/1.2 200 OK\r\n\r\n", "unsupported HTTP version"),
    "two digits": (b"HTTP/1.1 99 Odd\r\n\r\n", "malformed status line"),
    "four digits": (b"HTTP/1.1 2000 OK\r\n\r\n", "malformed status line"),
    "status below 100": (b"HTTP/1.1 099 Odd\r\n\r\n", "out of range"),
    "status above 599": (b"HTTP/1.1 600 Odd\r\n\r\n", "out of range"),
    "letter in status": (b"HTTP/1.1 2O0 OK\r\n\r\n", "malformed status line"),
    "two spaces before status": (b"HTTP/1.1  200 OK\r\n\r\n", "malformed status line"),
    "tab before reason": (b"HTTP/1.1 200\tOK\r\n\r\n", "malformed status line"),
    "leading space": (b" HTTP/1.1 200 OK\r\n\r\n", "malformed status line"),
    "NUL in reason": (b"HTTP/1.1 200 O\x00K\r\n\r\n", "invalid byte"),
    "DEL in reason": (b"HTTP/1.1 200 O\x7fK\r\n\r\n", "invalid byte"),
    "bare CR in reason": (b"HTTP/1.1 200 O\rK\r\n\r\n", "invalid byte"),
    "CR CR LF": (b"HTTP/1.1 200 OK\r\r\nA: 1\r\n\r\n", "invalid byte"),
    "header without colon": (b"HTTP/1.1 200 OK\r\nServer x\r\n\r\n", "malformed header line"),
    "space before colon": (b"HTTP/1.1 200 OK\r\nServer : x\r\n\r\n", "malformed header line"),
    "empty header name": (b"HTTP/1.1 200 OK\r\n: x\r\n\r\n", "malformed header line"),
    "invalid header name": (b"HTTP/1.1 200 OK\r\nX(y): z\r\n\r\n", "malformed header line"),
    "obs-fold": (b"HTTP/1.1 200 OK\r\nX: a\r\n  b\r\n\r\n", "obsolete line folding"),
    "obs-fold with tab": (b"HTTP/1.1 200 OK\nX: a\n\tb\n\n", "obsolete line folding"),
    "NUL in value": (b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n", "invalid byte"),
    "too large, no end of head": (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 200, "exceeds 128 bytes"),
    "too large, end of head too late": (
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * 200 + b"\r\n\r\n",
        "exceeds 128 bytes",
    ),
    "too large status line": (b"HTTP/1.1 200 " + b"O" * 200 + b"\r\n\r\n", "exceeds 128 bytes"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad(case: str) -> None:
    data, message = BAD[case]
    error = replay_error(data, max_size=128)
    assert (error.status, message in str(error)) == (502, True), error


# --- body framing ----------------------------------------------------------------------------

Headers = tuple[tuple[str, str], ...]
NONE = BodyFraming("none")
CHUNKED = BodyFraming("chunked")
CLOSE = BodyFraming("close")


def length(n: int) -> BodyFraming:
    return BodyFraming("length", n)


def chunked_after(codings: str) -> BodyFraming:
    return BodyFraming("chunked", codings=codings)


def request(headers: Headers, version: str = "HTTP/1.1") -> RequestHead:
    return RequestHead("POST", "/", "/", None, version, headers, "a", None, 0)


def response(status: int, headers: Headers, version: str = "HTTP/1.1") -> ResponseHead:
    return ResponseHead(version, status, "", headers, 0)


CL = "Content-Length"
TE = "Transfer-Encoding"

# (headers, version, expected framing or a piece of the error message)
REQUEST_FRAMING: dict[str, tuple[Headers, str, BodyFraming | str]] = {
    "no body": ((("Host", "a"),), "HTTP/1.1", NONE),
    "Content-Length": (((CL, "13"),), "HTTP/1.1", length(13)),
    "Content-Length 0": (((CL, "0"),), "HTTP/1.1", length(0)),
    "Content-Length leading zeros": (((CL, "007"),), "HTTP/1.1", length(7)),
    "Content-Length lower-case name": ((("content-length", "5"),), "HTTP/1.1", length(5)),
    "Content-Length largest": (((CL, str(2**63 - 1)),), "HTTP/1.1", length(2**63 - 1)),
    "Content-Length in HTTP/1.0": (((CL, "5"),), "HTTP/1.0", length(5)),
    "identical Content-Length values": (((CL, "5, 5"), (CL, "5")), "HTTP/1.1", length(5)),
    "chunked": (((TE, "chunked"),), "HTTP/1.1", CHUNKED),
    "chunked, any case": (((TE, "Chunked"),), "HTTP/1.1", CHUNKED),
    "gzip, chunked: gzip kept": (((TE, "gzip, chunked"),), "HTTP/1.1", chunked_after("gzip")),
    "gzip then chunked on two lines": (
        ((TE, "gzip"), (TE, "chunked")),
        "HTTP/1.1",
        chunked_after("gzip"),
    ),
    "two codings kept in order": (
        ((TE, "gzip,deflate , chunked"),),
        "HTTP/1.1",
        chunked_after("gzip, deflate"),
    ),
    "empty coding": (((TE, "gzip, , chunked"),), "HTTP/1.1", "invalid transfer coding"),
    "coding with a parameter": (((TE, "gzip;q=1, chunked"),), "HTTP/1.1", "invalid transfer"),
    "chunked, gzip": (((TE, "chunked, gzip"),), "HTTP/1.1", "must end in one chunked"),
    "gzip alone": (((TE, "gzip"),), "HTTP/1.1", "must end in one chunked"),
    "chunked twice": (((TE, "chunked, chunked"),), "HTTP/1.1", "must end in one chunked"),
    "chunked and Content-Length": (((CL, "5"), (TE, "chunked")), "HTTP/1.1", "both"),
    "different Content-Length values": (((CL, "5"), (CL, "6")), "HTTP/1.1", "differing"),
    "different values in one list": (((CL, "5, 6"),), "HTTP/1.1", "differing"),
    "empty list element": (((CL, "5,"),), "HTTP/1.1", "differing"),
    "Content-Length not a number": (((CL, "1e3"),), "HTTP/1.1", "invalid Content-Length"),
    "Content-Length negative": (((CL, "-1"),), "HTTP/1.1", "invalid Content-Length"),
    "Content-Length with plus": (((CL, "+5"),), "HTTP/1.1", "invalid Content-Length"),
    "Content-Length empty": (((CL, ""),), "HTTP/1.1", "invalid Content-Length"),
    "Content-Length non-ASCII digit": (((CL, "\u0665"),), "HTTP/1.1", "invalid Content-Length"),
    "Content-Length beyond 2**63 - 1": (((CL, str(2**63)),), "HTTP/1.1", "too large"),
    "Content-Length of 5000 digits": (((CL, "9" * 5000),), "HTTP/1.1", "too large"),
    "Transfer-Encoding in HTTP/1.0": (((TE, "chunked"),), "HTTP/1.0", "HTTP/1.0 message"),
}


@pytest.mark.parametrize("case", list(REQUEST_FRAMING), ids=list(REQUEST_FRAMING))
def test_request_framing(case: str) -> None:
    headers, version, expected = REQUEST_FRAMING[case]
    head = request(headers, version)
    if isinstance(expected, BodyFraming):
        assert request_framing(head) == expected
    else:
        with pytest.raises(HttpParseError) as info:
            request_framing(head)
        assert (info.value.status, expected in str(info.value)) == (400, True), info.value


@pytest.mark.parametrize("case", list(REQUEST_FRAMING), ids=list(REQUEST_FRAMING))
def test_request_framing_agrees_with_the_head_parser(case: str) -> None:
    """What the head parser accepts frames the same way; what it refuses, framing refuses."""
    headers, version, expected = REQUEST_FRAMING[case]
    lines = b"".join(f"{name}: {value}\r\n".encode() for name, value in headers)
    host = b"" if any(name.lower() == "host" for name, _ in headers) else b"Host: a\r\n"
    data = f"POST / {version}\r\n".encode() + host + lines + b"\r\n"
    try:
        head = parse_request_head(data, max_size=len(data))
    except HttpParseError as error:
        assert error.status == 400
        assert not isinstance(expected, BodyFraming), f"parser refused: {error}"
        return
    assert head is not None
    if isinstance(expected, BodyFraming):
        assert request_framing(head) == expected
    else:  # framing is stricter than the parser only here
        assert expected in ("too large", "HTTP/1.0 message"), expected
        with pytest.raises(HttpParseError):
            request_framing(head)


# (request method, status, headers, version, expected framing or a piece of the error message)
RESPONSE_FRAMING: dict[str, tuple[str, int, Headers, str, BodyFraming | str]] = {
    "Content-Length": ("GET", 200, ((CL, "5"),), "HTTP/1.1", length(5)),
    "identical Content-Lengths": ("GET", 200, ((CL, "5,5"), (CL, "5")), "HTTP/1.1", length(5)),
    "chunked": ("GET", 200, ((TE, "chunked"),), "HTTP/1.1", CHUNKED),
    "gzip, chunked": ("GET", 200, ((TE, "gzip, chunked"),), "HTTP/1.1", chunked_after("gzip")),
    "nothing said: until close": ("GET", 200, (), "HTTP/1.1", CLOSE),
    "HTTP/1.0 until close": ("GET", 200, (("Server", "x"),), "HTTP/1.0", CLOSE),
    "HTTP/1.0 Content-Length": ("GET", 200, ((CL, "3"),), "HTTP/1.0", length(3)),
    "chunked, gzip": ("GET", 200, ((TE, "chunked, gzip"),), "HTTP/1.1", "one chunked"),
    "gzip alone: until close": (
        "GET",
        200,
        ((TE, "gzip"),),
        "HTTP/1.1",
        BodyFraming("close", codings="gzip"),
    ),
    "POST answered with Content-Length": ("POST", 201, ((CL, "2"),), "HTTP/1.1", length(2)),
    "error status with a body": ("GET", 500, ((CL, "9"),), "HTTP/1.1", length(9)),
    "HEAD with Content-Length": ("HEAD", 200, ((CL, "5"),), "HTTP/1.1", NONE),
    "HEAD with chunked": ("HEAD", 200, ((TE, "chunked"),), "HTTP/1.1", NONE),
    "HEAD with nothing": ("HEAD", 404, (), "HTTP/1.1", NONE),
    "100 Continue": ("POST", 100, (), "HTTP/1.1", NONE),
    "101 Switching Protocols": ("GET", 101, (("Upgrade", "websocket"),), "HTTP/1.1", NONE),
    "103 Early Hints": ("GET", 103, (("Link", "</a>"),), "HTTP/1.1", NONE),
    "204 with Content-Length": ("GET", 204, ((CL, "5"),), "HTTP/1.1", NONE),
    "204 with bad framing": ("GET", 204, ((CL, "5"), (TE, "chunked")), "HTTP/1.1", NONE),
    "304 with Content-Length": ("GET", 304, ((CL, "1234"),), "HTTP/1.1", NONE),
    "CONNECT 200": ("CONNECT", 200, (), "HTTP/1.1", NONE),
    "CONNECT 200 with Content-Length": ("CONNECT", 200, ((CL, "5"),), "HTTP/1.1", NONE),
    "CONNECT 299": ("CONNECT", 299, (), "HTTP/1.1", NONE),
    "CONNECT refused with a body": ("CONNECT", 407, ((CL, "5"),), "HTTP/1.1", length(5)),
    "CONNECT redirected": ("CONNECT", 302, (), "HTTP/1.1", CLOSE),
    "method is case-sensitive": ("head", 200, ((CL, "5"),), "HTTP/1.1", length(5)),
    "chunked and Content-Length": ("GET", 200, ((CL, "5"), (TE, "chunked")), "HTTP/1.1", "both"),
    "length and a close coding": ("GET", 200, ((CL, "5"), (TE, "gzip")), "HTTP/1.1", "both"),
    "chunked twice": ("GET", 200, ((TE, "chunked"), (TE, "chunked")), "HTTP/1.1", "one chunked"),
    "different Content-Lengths": ("GET", 200, ((CL, "5"), (CL, "6")), "HTTP/1.1", "differing"),
    "Content-Length not a number": ("GET", 200, ((CL, "five"),), "HTTP/1.1", "invalid"),
    "Content-Length too large": ("GET", 200, ((CL, "1" + "0" * 30),), "HTTP/1.1", "too large"),
    "Transfer-Encoding in HTTP/1.0": ("GET", 200, ((TE, "chunked"),), "HTTP/1.0", "HTTP/1.0"),
}


@pytest.mark.parametrize("case", list(RESPONSE_FRAMING), ids=list(RESPONSE_FRAMING))
def test_response_framing(case: str) -> None:
    method, status, headers, version, expected = RESPONSE_FRAMING[case]
    head = response(status, headers, version)
    if isinstance(expected, BodyFraming):
        assert response_framing(method, head) == expected
    else:
        with pytest.raises(HttpParseError) as info:
            response_framing(method, head)
        assert (info.value.status, expected in str(info.value)) == (502, True), info.value


def test_response_framing_of_a_parsed_head() -> None:
    head = parse_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip,  Chunked\r\n\r\n")
    assert head is not None
    assert response_framing("GET", head) == chunked_after("gzip")


# --- properties ----------------------------------------------------------------------------


def check_outcome(data: bytes, max_size: int = DEFAULT_MAX_RESPONSE_HEAD) -> ResponseHead | None:
    """Any input gives a ResponseHead, None or HttpParseError(502); a result is stable and
    minimal, and its framing is decided or refused with 502."""
    try:
        result = parse_response_head(data, max_size)
    except HttpParseError as error:
        assert error.status == 502
        return None
    if result is not None:
        assert isinstance(result, ResponseHead)
        assert 100 <= result.status <= 599
        assert 0 < result.length <= min(len(data), max_size)
        assert parse_response_head(data[: result.length], max_size) == result
        for end in range(result.length):
            assert parse_response_head(data[:end], max_size) is None
        for method in ("GET", "HEAD", "CONNECT"):
            try:
                framing = response_framing(method, result)
            except HttpParseError as error:
                assert error.status == 502
            else:
                assert framing.kind in ("none", "length", "chunked", "close")
    return result


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_property_any_bytes(data: bytes) -> None:
    check_outcome(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_property_after_a_status_line(data: bytes) -> None:
    check_outcome(b"HTTP/1.1 200 OK\r\n" + data)
    check_outcome(b"HTTP/1.1 200 OK\r\n" + data, max_size=40)


PIECES = [
    b"HTTP/1.1",
    b"HTTP/1.0",
    b"HTTP/",
    b" ",
    b"200",
    b"204",
    b"1",
    b"OK",
    b"\r\n",
    b"\n",
    b"\r",
    b"\t",
    b"Content-Length",
    b"Transfer-Encoding",
    b"chunked",
    b"gzip",
    b": ",
    b":",
    b",",
    b"5",
    b"\x00",
    b"\xe9",
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=40))
def test_property_structured(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    check_outcome(data)
    check_outcome(b"HTTP/1.1 200 OK\r\n" + data)
    check_outcome(b"HTTP/1.1 200 OK\r\n" + data + b"\r\n\r\n")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=30), st.sampled_from(["HTTP/1.1", "HTTP/1.0"]))
def test_property_request_framing(pieces: list[bytes], version: str) -> None:
    """For any request head the parser accepts, framing is decided, or refused with 400."""
    data = f"POST / {version}\r\nHost: a\r\n".encode() + b"".join(pieces) + b"\r\n\r\n"
    try:
        head = parse_request_head(data)
    except HttpParseError:
        return
    if head is None:
        return
    try:
        framing = request_framing(head)
    except HttpParseError as error:
        assert error.status == 400
    else:
        assert framing.kind in ("none", "length", "chunked")
