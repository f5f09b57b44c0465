"""The HTTP/1.x request head parser: a table replayed whole, byte by byte and with trailing data."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from replay import replay_error as replay_fails
from replay import replay_ok

from smartroute.errors import HttpParseError
from smartroute.protocols.http import (
    DEFAULT_MAX_HEAD_SIZE,
    HTTP_METHODS,
    RequestHead,
    looks_like_http,
    parse_request_head,
)

# Whatever follows the head must not change it: a body, a pipelined request, binary junk.
TRAILING = [b"body", b"GET / HTTP/1.1\r\n\r\n", b"\r\n\r\n", b"\x00\xff\n\n"]


def replay(data: bytes, max_size: int = DEFAULT_MAX_HEAD_SIZE) -> RequestHead:
    return replay_ok(lambda d: parse_request_head(d, max_size), data, TRAILING)


def replay_error(data: bytes, max_size: int = DEFAULT_MAX_HEAD_SIZE) -> HttpParseError:
    return replay_fails(lambda d: parse_request_head(d, max_size), data, TRAILING, HttpParseError)


GOOD: dict[str, tuple[bytes, dict[str, Any]]] = {
    "GET with Host and query": (
        b"GET /search?q=a+b&x=1 HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n",
        {
            "method": "GET",
            "target": "/search?q=a+b&x=1",
            "path": "/search",
            "query": "q=a+b&x=1",
            "version": "HTTP/1.1",
            "headers": (("Host", "example.com"), ("Accept", "*/*")),
            "host": "example.com",
            "port": None,
        },
    ),
    "empty query": (
        b"GET /a? HTTP/1.1\r\nHost: a\r\n\r\n",
        {"path": "/a", "query": ""},
    ),
    "POST with a body after the head": (
        b"POST /api/items HTTP/1.1\r\nHost: api.example.com\r\nContent-Type: application/json\r\n"
        b"Content-Length: 13\r\n\r\n",
        {"method": "POST", "path": "/api/items", "query": None, "host": "api.example.com"},
    ),
    "absolute-form overrides Host": (
        b"GET http://Proxy.Example:8080/p/q?x=1 HTTP/1.1\r\nHost: other.example\r\n\r\n",
        {
            "target": "http://Proxy.Example:8080/p/q?x=1",
            "path": "/p/q",
            "query": "x=1",
            "host": "proxy.example",
            "port": 8080,
        },
    ),
    "absolute-form without path": (
        b"GET https://example.com?x HTTP/1.1\r\nHost: example.com\r\n\r\n",
        {"path": "/", "query": "x", "host": "example.com", "port": None},
    ),
    "IPv6 Host with port": (
        b"GET / HTTP/1.1\r\nHost: [::1]:8443\r\n\r\n",
        {"host": "::1", "port": 8443},
    ),
    "IPv6 Host lower-cased": (
        b"GET / HTTP/1.1\r\nHost: [2001:DB8::1]\r\n\r\n",
        {"host": "2001:db8::1", "port": None},
    ),
    "Host with port, case and trailing dot": (
        b"GET / HTTP/1.1\r\nHOST: WWW.Example.COM.:8080\r\n\r\n",
        {"host": "www.example.com", "port": 8080, "headers": (("HOST", "WWW.Example.COM.:8080"),)},
    ),
    "Host with empty port": (
        b"GET / HTTP/1.1\r\nHost: example.com:\r\n\r\n",
        {"host": "example.com", "port": None},
    ),
    "IPv4 Host": (
        b"GET / HTTP/1.1\r\nHost: 10.0.0.1:80\r\n\r\n",
        {"host": "10.0.0.1", "port": 80},
    ),
    "empty Host": (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", {"host": None, "port": None}),
    "HTTP/1.0 without Host": (
        b"GET /index.html HTTP/1.0\r\n\r\n",
        {"version": "HTTP/1.0", "host": None, "port": None, "headers": ()},
    ),
    "LF only": (
        b"GET /lf HTTP/1.1\nHost: lf.example\nX-A: 1\n\n",
        {"path": "/lf", "host": "lf.example", "headers": (("Host", "lf.example"), ("X-A", "1"))},
    ),
    "mixed line endings": (
        b"GET / HTTP/1.1\nHost: a\r\nX: y\n\r\n",
        {"host": "a", "headers": (("Host", "a"), ("X", "y"))},
    ),
    "CRLF then LF ends the head": (b"GET / HTTP/1.0\r\n\n", {"headers": ()}),
    "repeated headers": (
        b"GET / HTTP/1.1\r\nHost: a\r\nAccept: text/html\r\nX-Tag: one\r\naccept: */*\r\n"
        b"X-Tag: two\r\n\r\n",
        {
            "headers": (
                ("Host", "a"),
                ("Accept", "text/html"),
                ("X-Tag", "one"),
                ("accept", "*/*"),
                ("X-Tag", "two"),
            )
        },
    ),
    "OWS stripped, inner spaces kept": (
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Sp: \t  a  b \t\r\nX-Empty:\r\nX-Blank:   \r\n\r\n",
        {"headers": (("Host", "a"), ("X-Sp", "a  b"), ("X-Empty", ""), ("X-Blank", ""))},
    ),
    "latin-1 header value": (
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Name: caf\xe9\r\n\r\n",
        {"headers": (("Host", "a"), ("X-Name", "caf\xe9"))},
    ),
    "HTTP/1.0 without Host, path kept": (b"GET /x HTTP/1.0\r\n\r\n", {"host": None, "path": "/x"}),
    "path normalised, target kept": (
        b"GET //a/./b/../%63?x=/../y HTTP/1.1\r\nHost: a\r\n\r\n",
        {"path": "/a/c", "query": "x=/../y", "target": "//a/./b/../%63?x=/../y"},
    ),
    "absolute-form path normalised": (
        b"GET http://a/x/%2e%2e/y HTTP/1.1\r\nHost: b\r\n\r\n",
        {"host": "a", "path": "/y"},
    ),
    "empty lines before the request line": (
        b"\r\n\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        {"method": "GET", "host": "a"},
    ),
    "CONNECT": (
        b"CONNECT Example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        {"method": "CONNECT", "target": "Example.com:443", "host": "example.com", "port": 443},
    ),
    "OPTIONS *": (
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
        {"method": "OPTIONS", "target": "*", "path": "*", "query": None},
    ),
    "unknown method token": (
        b"PROPFIND /dav HTTP/1.1\r\nHost: a\r\n\r\n",
        {"method": "PROPFIND", "path": "/dav"},
    ),
    "chunked": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        {"method": "POST"},
    ),
    "identical Content-Length list": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n",
        {"method": "POST"},
    ),
}


@pytest.mark.parametrize("case", list(GOOD), ids=list(GOOD))
def test_good(case: str) -> None:
    data, expected = GOOD[case]
    head = replay(data)
    assert {name: getattr(head, name) for name in expected} == expected


def test_header_lookup() -> None:
    head = replay(GOOD["repeated headers"][0])
    assert head.header("accept") == "text/html"
    assert head.header("ACCEPT") == "text/html"
    assert head.header("x-missing") is None
    assert head.header_map() == {"host": "a", "accept": "text/html, */*", "x-tag": "one, two"}


def test_size_limit_is_exact() -> None:
    data = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 40 + b"\r\n\r\n"
    assert replay(data, max_size=len(data)).length == len(data)
    with pytest.raises(HttpParseError) as info:
        parse_request_head(data, max_size=len(data) - 1)
    assert info.value.status == 431


def test_431_as_soon_as_the_buffer_exceeds_max_size() -> None:
    data = b"GET /" + b"a" * 200
    assert parse_request_head(data[:100], max_size=100) is None
    with pytest.raises(HttpParseError) as info:
        parse_request_head(data[:101], max_size=100)
    assert info.value.status == 431
    with pytest.raises(HttpParseError) as info:
        parse_request_head(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 3000)
    assert info.value.status == 431


BAD: dict[str, tuple[bytes, int, str]] = {  # input, status, a piece of the error message
    "no method": (b" / HTTP/1.1\r\n\r\n", 400, "malformed request line"),
    "not a request line": (b"HELLO\r\n\r\n", 400, "malformed request line"),
    "binary junk": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc", 400, "malformed request line"),
    "missing version": (b"GET /\r\n\r\n", 400, "malformed request line"),
    "two spaces": (b"GET  / HTTP/1.1\r\n\r\n", 400, "malformed request line"),
    "trailing space": (b"GET / HTTP/1.1 \r\n\r\n", 400, "malformed request line"),
    "lower-case version": (b"GET / http/1.1\r\n\r\n", 400, "malformed request line"),
    "HTTP/1.2": (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 400, "unsupported HTTP version"),
    "HTTP/2.0": (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 400, "unsupported HTTP version"),
    "HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "prior-knowledge"),
    "non-ASCII target": ("GET /caf\xe9 HTTP/1.1\r\n\r\n".encode(), 400, "malformed request line"),
    "tab in request line": (b"GET\t/ HTTP/1.1\r\n\r\n", 400, "malformed request line"),
    "header without colon": (b"GET / HTTP/1.1\r\nHost a\r\n\r\n", 400, "malformed header line"),
    "space before colon": (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400, "malformed header line"),
    "empty header name": (b"GET / HTTP/1.1\r\n: a\r\n\r\n", 400, "malformed header line"),
    "invalid header name": (b"GET / HTTP/1.1\r\nX(y): z\r\n\r\n", 400, "malformed header line"),
    "non-ASCII header name": (b"GET / HTTP/1.1\r\nX\xe9: z\r\n\r\n", 400, "malformed header line"),
    "obs-fold": (b"GET / HTTP/1.1\r\nX: a\r\n  b\r\n\r\n", 400, "obsolete line folding"),
    "obs-fold with tab": (b"GET / HTTP/1.1\r\nX: a\n\tb\n\n", 400, "obsolete line folding"),
    "bare CR in value": (b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", 400, "invalid byte"),
    "NUL in value": (b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400, "invalid byte"),
    "DEL in value": (b"GET / HTTP/1.1\r\nX: a\x7fb\r\n\r\n", 400, "invalid byte"),
    "CR CR LF": (b"GET / HTTP/1.1\r\r\nHost: a\r\n\r\n", 400, "invalid byte"),
    "Host with space": (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400, "bad host"),
    "Host with slash": (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400, "bad host"),
    "Host with userinfo": (b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", 400, "bad host"),
    "Host unbracketed IPv6": (b"GET / HTTP/1.1\r\nHost: ::1\r\n\r\n", 400, "bad host"),
    "Host unclosed bracket": (b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", 400, "bad host"),
    "Host bad IPv6": (b"GET / HTTP/1.1\r\nHost: [::g]\r\n\r\n", 400, "bad IPv6 literal"),
    "Host junk after bracket": (b"GET / HTTP/1.1\r\nHost: [::1]x\r\n\r\n", 400, "bad host"),
    "Host port too big": (b"GET / HTTP/1.1\r\nHost: a:65536\r\n\r\n", 400, "bad port"),
    "Host port not a number": (b"GET / HTTP/1.1\r\nHost: a:http\r\n\r\n", 400, "bad port"),
    "Host two colons": (b"GET / HTTP/1.1\r\nHost: a:1:2\r\n\r\n", 400, "bad port"),
    "Host non-ASCII": (b"GET / HTTP/1.1\r\nHost: b\xfccher.example\r\n\r\n", 400, "bad host"),
    "Host empty label": (b"GET / HTTP/1.1\r\nHost: a..b\r\n\r\n", 400, "bad host"),
    "two different Host headers": (
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        400,
        "more than one Host",
    ),
    "same host, different port": (
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: a:81\r\n\r\n",
        400,
        "more than one Host",
    ),
    # RFC 9112 section 3.2: more than one Host line is a 400 even when they agree.
    "same Host twice": (
        b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: A.example.\r\n\r\n",
        400,
        "more than one Host",
    ),
    "same Host twice in HTTP/1.0": (
        b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",
        400,
        "more than one Host",
    ),
    "HTTP/1.1 without Host": (b"GET / HTTP/1.1\r\nX: y\r\n\r\n", 400, "without a Host"),
    "HTTP/1.1 absolute-form without Host": (
        b"GET http://a/ HTTP/1.1\r\n\r\n",
        400,
        "without a Host",
    ),
    "path above the root": (b"GET /a/../../b HTTP/1.1\r\nHost: a\r\n\r\n", 400, "above"),
    "encoded slash in the path": (b"GET /a%2Fb HTTP/1.1\r\nHost: a\r\n\r\n", 400, "slash"),
    "bad percent-encoding in the path": (
        b"GET /a%G0 HTTP/1.1\r\nHost: a\r\n\r\n",
        400,
        "percent-encoding",
    ),
    "bad Host even with absolute-form": (
        b"GET http://a/ HTTP/1.1\r\nHost: a b\r\n\r\n",
        400,
        "bad host",
    ),
    "star target for GET": (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400, "only for OPTIONS"),
    "fragment in target": (b"GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n", 400, "fragment"),
    "relative target": (
        b"GET example.com/x HTTP/1.1\r\nHost: a\r\n\r\n",
        400,
        "invalid request target",
    ),
    "absolute-form without host": (
        b"GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n",
        400,
        "has no host",
    ),
    "absolute-form with userinfo": (
        b"GET http://u:p@a/ HTTP/1.1\r\nHost: a\r\n\r\n",
        400,
        "userinfo",
    ),
    "CONNECT without port": (b"CONNECT a.example HTTP/1.1\r\nHost: a\r\n\r\n", 400, "needs a port"),
    "CONNECT to a path": (b"CONNECT /x HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad host"),
    "Content-Length not a number": (
        b"POST / HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n",
        400,
        "invalid Content-Length",
    ),
    "Content-Length negative": (
        b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        400,
        "invalid Content-Length",
    ),
    "Content-Length empty": (
        b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n",
        400,
        "invalid Content-Length",
    ),
    "Content-Length differing list": (
        b"POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n",
        400,
        "invalid Content-Length",
    ),
    "Content-Length twice differing": (
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        400,
        "invalid Content-Length",
    ),
    "Content-Length and Transfer-Encoding": (
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
        "both Content-Length",
    ),
    "Transfer-Encoding not ending in chunked": (
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        400,
        "must end in one chunked",
    ),
    "Transfer-Encoding chunked twice": (
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
        "must end in one chunked",
    ),
    "too large, no end of head": (b"GET / HTTP/1.1\r\nX: " + b"a" * 200, 431, "exceeds 128 bytes"),
    "too large, end of head too late": (
        b"GET / HTTP/1.1\r\nX: " + b"a" * 200 + b"\r\n\r\n",
        431,
        "exceeds 128 bytes",
    ),
    "too large request line": (
        b"GET /" + b"a" * 200 + b" HTTP/1.1\r\n\r\n",
        431,
        "exceeds 128 bytes",
    ),
    "too many empty lines first": (
        b"\r\n" * 70 + b"GET / HTTP/1.1\r\n\r\n",
        431,
        "exceeds 128 bytes",
    ),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad(case: str) -> None:
    data, status, message = BAD[case]
    error = replay_error(data, max_size=128)
    assert (error.status, message in str(error)) == (status, True), error


LOOKS: list[tuple[bytes, bool | None]] = [
    (b"", None),
    (b"G", None),
    (b"GE", None),
    (b"GET", None),
    (b"GET ", True),
    (b"GET /", True),
    (b"OPTIONS", None),
    (b"OPTIONS *", True),
    (b"PRI * HTTP/2.0", True),
    (b"GETS", False),
    (b"get ", False),
    (b"X", False),
    (b"\x16\x03\x01", False),
    (b"\r\nGET / HTTP/1.1", False),
    (b"PROPFIND / HTTP/1.1", False),
]


@pytest.mark.parametrize(("data", "expected"), LOOKS)
def test_looks_like_http(data: bytes, expected: bool | None) -> None:
    assert looks_like_http(data) is expected
    assert looks_like_http(bytearray(data)) is expected
    assert looks_like_http(memoryview(data)) is expected


@pytest.mark.parametrize("method", sorted(HTTP_METHODS))
def test_looks_like_http_every_method(method: str) -> None:
    data = method.encode() + b" / HTTP/1.1\r\n"
    assert looks_like_http(data) is True
    for end in range(1, len(method) + 1):
        assert looks_like_http(data[:end]) is None


def test_errors_release_the_callers_buffer() -> None:
    buffer = bytearray(BAD["two different Host headers"][0])  # no view of it kept
    with pytest.raises(HttpParseError) as info:
        parse_request_head(buffer)
    buffer += b"more"
    assert info.value.status == 400


# --- properties ----------------------------------------------------------------------------


def check_outcome(data: bytes, max_size: int = DEFAULT_MAX_HEAD_SIZE) -> RequestHead | None:
    """Any input gives a RequestHead, None or HttpParseError; a result is stable and minimal."""
    try:
        result = parse_request_head(data, max_size)
    except HttpParseError as error:
        assert error.status in (400, 431)
        return None
    if result is not None:
        assert isinstance(result, RequestHead)
        assert 0 < result.length <= min(len(data), max_size)
        assert parse_request_head(data[: result.length], max_size) == result
        for end in range(result.length):
            assert parse_request_head(data[:end], max_size) is None
    return result


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_property_any_bytes(data: bytes) -> None:
    check_outcome(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_property_after_a_request_line(data: bytes) -> None:
    check_outcome(b"GET / HTTP/1.1\r\n" + data)
    check_outcome(b"GET / HTTP/1.1\r\n" + data, max_size=40)


PIECES = [
    b"GET",
    b"CONNECT",
    b"OPTIONS",
    b" ",
    b"/",
    b"?",
    b"*",
    b"http://",
    b"HTTP/1.1",
    b"HTTP/1.0",
    b"\r\n",
    b"\n",
    b"\r",
    b"\t",
    b"Host",
    b"Content-Length",
    b"Transfer-Encoding",
    b"chunked",
    b": ",
    b":",
    b",",
    b"[::1]",
    b"a.example",
    b"80",
    b"99999",
    b"\x00",
    b"\xe9",
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=40))
def test_property_structured(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    check_outcome(data)
    check_outcome(b"GET / HTTP/1.1\r\n" + data)
    check_outcome(b"GET / HTTP/1.1\r\nHost: a.example\r\n" + data + b"\r\n\r\n")
