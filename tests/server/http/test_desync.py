"""Request smuggling and desync: hostile framing against a real SmartRoute HTTP reverse proxy.

Every case runs on its own proxy and recording backend (tests/desync_peers.py) on loopback and
asserts both sides: the responses the client got (status, and body or headers where they
matter), whether its connection was closed, and the exact requests the backend framed (head
bytes exactly, body de-chunked). Then:

- if the client's connection stayed open, a probe request on it must get its own answer;
- a second client must get its own answer too, never one smuggled into a kept-alive backend
  connection, and the backend connection it uses says what the proxy did with the first one:
  ``same`` (a clean exchange, reused), ``new`` (a connection left out of step, closed, never
  reused) or ``first`` (nothing of the case reached the backend at all).

Cases are tables per category; the ids say what each one sends.
"""

from __future__ import annotations

import asyncio
import gzip
import re
from dataclasses import dataclass
from typing import Any, Literal

import pytest
from desync_peers import WAIT, RawClient, RecordingBackend, Reply, Response, Seen
from support import LOOPBACK, async_test, free_port

from smartroute import SmartRoute

# -- what is sent and what is expected --------------------------------------------------------

HOST = "site.test"
GET = b"GET /first HTTP/1.1\r\nHost: site.test\r\n"
POST = b"POST /up HTTP/1.1\r\nHost: site.test\r\n"
ADMIN = b"GET /admin HTTP/1.1\r\nHost: site.test\r\n\r\n"  # the request a smuggler hides
PROBE = b"GET /probe HTTP/1.1\r\nHost: site.test\r\n\r\n"
NEXT = b"GET /next HTTP/1.1\r\nHost: site.test\r\n\r\n"
GZ = gzip.compress(b"compressed, opaque to the proxy " * 4, mtime=0)
NO_BODY = b"\x00no body\x00"  # a Want.body that is not checked


@dataclass(frozen=True)
class Up:
    """A request the backend must frame: its head exactly (or a pattern it must fullmatch)
    and its payload (de-chunked) and trailers."""

    head: bytes | re.Pattern[bytes]
    body: bytes = b""
    trailers: bytes = b""

    def matches(self, seen: Seen) -> bool:
        if isinstance(self.head, bytes):
            head_ok = seen.head == self.head
        else:
            head_ok = self.head.fullmatch(seen.head) is not None
        return head_ok and (seen.body, seen.trailers) == (self.body, self.trailers)


@dataclass(frozen=True)
class Want:
    """A response the client must get. ``headers``: (name, value) that must be there with
    exactly that value (all its lines joined), or with any value when it is None."""

    status: int | frozenset[int]
    body: bytes = NO_BODY
    headers: tuple[tuple[str, str | None], ...] = ()
    absent: tuple[str, ...] = ()
    head: bool = False  # the answer to a HEAD request
    complete: bool = True

    def problems(self, got: Response) -> list[str]:
        wrong = []
        statuses = {self.status} if isinstance(self.status, int) else self.status
        if got.status not in statuses:
            wrong.append(f"status {got.status}, not {sorted(statuses)}")
        if self.body != NO_BODY and got.body != self.body:
            wrong.append(f"body {got.body[:200]!r}, not {self.body[:200]!r}")
        for name, value in self.headers:
            have = got.header(name)
            if have is None or value is not None and have != value:
                wrong.append(f"{name}: {have!r}, not {value!r}")
        wrong += [f"{name} present" for name in self.absent if got.header(name) is not None]
        if got.complete != self.complete:
            wrong.append("cut short" if self.complete else "complete, yet should be cut short")
        return wrong


NextConn = Literal["same", "new", "first"]


@dataclass(frozen=True)
class Case:
    """``send`` goes in one write on one client connection; ``want`` are the responses it
    gets; ``closed`` whether the proxy then closes it (None: as the last response says);
    ``upstream`` the requests the backend frames; ``script`` replaces the backend's answers
    by request number; ``partial`` a head of which the backend may get a prefix but never a
    whole request (a body that turns out bad after the head went on); ``next_conn`` how the
    second client is served (by default: ``new`` after a script or ``partial``, ``first``
    when nothing went upstream, else ``same``)."""

    id: str
    send: bytes
    want: tuple[Want, ...]
    closed: bool | None = None
    upstream: tuple[Up, ...] = ()
    script: tuple[tuple[int, Reply], ...] = ()
    partial: bytes | None = None
    next_conn: NextConn | None = None
    half_close: bool = False

    @property
    def next_mode(self) -> NextConn:
        if self.next_conn is not None:
            return self.next_conn
        if self.script or self.partial is not None:
            return "new"
        return "same" if self.upstream else "first"


def forwarding(host: str | None) -> list[str]:
    """The forwarding headers the proxy appends for a loopback client."""
    lines = ["X-Forwarded-For: 127.0.0.1", "X-Forwarded-Proto: http"]
    if host is None:
        return [*lines, "Forwarded: for=127.0.0.1;proto=http"]
    return [
        *lines,
        f"X-Forwarded-Host: {host}",
        f'Forwarded: for=127.0.0.1;proto=http;host="{host}"',
    ]


def up(
    line: str,
    *headers: str,
    host: str | None = HOST,
    cl: int | None = None,
    te: str | None = None,
    body: bytes = b"",
    trailers: bytes = b"",
) -> Up:
    """The request the backend must get: ``line``, ``Host`` (first, as the cases send it),
    ``headers``, the forwarding headers, then the framing header the proxy writes."""
    lines = [line, *([f"Host: {host}"] if host is not None else []), *headers, *forwarding(host)]
    if cl is not None:
        lines.append(f"Content-Length: {cl}")
    if te is not None:
        lines.append(f"Transfer-Encoding: {te}")
    return Up(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), body, trailers)


def ok(line: str) -> Want:
    """The backend's usual answer to a request whose line (method and target) was ``line``."""
    return Want(200, line.encode("latin-1"))


def refused(status: int | frozenset[int] = 400) -> Want:
    return Want(status)


def chunked(*chunks: bytes) -> bytes:
    """``chunks`` framed as a chunked body, last chunk included."""
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


BAD = frozenset({400})
BAD_VERSION = frozenset({400, 505})
TOO_BIG = frozenset({400, 431})


def head_of(request: Up) -> bytes:
    assert isinstance(request.head, bytes)
    return request.head


UP_POST_CHUNKED = head_of(up("POST /up HTTP/1.1", te="chunked"))


def rejected(case_id: str, send: bytes, status: int | frozenset[int] = 400) -> Case:
    """The proxy answers ``status`` and closes; nothing reaches the backend."""
    return Case(case_id, send, (refused(status),), closed=True)


def bad_chunked_body(case_id: str, body: bytes, *, te: bytes = b"chunked") -> Case:
    """A good head, then a chunked body that goes wrong: 400, closed, never a whole request
    upstream (the head, and chunks before the bad one, may have gone on)."""
    send = POST + b"Transfer-Encoding: " + te + b"\r\n\r\n" + body + ADMIN
    return Case(case_id, send, (refused(),), closed=True, partial=UP_POST_CHUNKED)


# -- 1. Content-Length / Transfer-Encoding conflicts and obfuscations -------------------------

CL_TE: list[Case] = [
    rejected(
        "cl-and-te-smuggling-admin",
        POST + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + ADMIN,
    ),
    rejected(
        "te-space-before-colon-with-cl",
        POST + b"Transfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n" + ADMIN,
    ),
    Case(
        "te-htab-before-value-is-ows",
        POST + b"Transfer-Encoding:\tchunked\r\n\r\n" + chunked(b"hello"),
        (ok("POST /up"),),
        closed=False,
        upstream=(up("POST /up HTTP/1.1", te="chunked", body=b"hello"),),
    ),
    Case(
        "te-upper-case-chunked",
        POST + b"Transfer-Encoding: CHUNKED\r\n\r\n" + chunked(b"hello"),
        (ok("POST /up"),),
        closed=False,
        upstream=(up("POST /up HTTP/1.1", te="chunked", body=b"hello"),),
    ),
    rejected("te-xchunked", POST + b"Transfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    rejected(
        "te-chunked-identity", POST + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"
    ),
    # identity is no transfer coding (RFC 9112 section 7): refusing it keeps a backend that
    # would honour "identity" (and so read no body) from ever seeing the chunked body as requests.
    rejected(
        "te-identity-chunked",
        POST + b"Transfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n" + ADMIN,
        frozenset({400, 501}),
    ),
    rejected(
        "te-chunked-chunked-one-line",
        POST + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
    ),
    rejected(
        "te-two-lines-chunked-then-identity",
        POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
    ),
    rejected("te-trailing-vertical-tab", POST + b"Transfer-Encoding: chunked\x0b\r\n\r\n0\r\n\r\n"),
    rejected("te-form-feed-before-value", POST + b"Transfer-Encoding:\x0cchunked\r\n\r\n0\r\n\r\n"),
    rejected("cl-plus-sign", POST + b"Content-Length: +5\r\n\r\nhello" + ADMIN),
    rejected("cl-minus-one", POST + b"Content-Length: -1\r\n\r\n" + ADMIN),
    Case(
        "cl-padded-with-spaces",
        POST + b"Content-Length:  5 \r\n\r\nhello",
        (ok("POST /up"),),
        closed=False,
        upstream=(up("POST /up HTTP/1.1", cl=5, body=b"hello"),),
    ),
    rejected("cl-list-differing", POST + b"Content-Length: 5, 6\r\n\r\nhello!" + ADMIN),
    Case(
        "cl-list-equal-is-5",
        POST + b"Content-Length: 5, 5\r\n\r\nhello",
        (ok("POST /up"),),
        closed=False,
        upstream=(up("POST /up HTTP/1.1", cl=5, body=b"hello"),),
    ),
    Case(
        "cl-two-equal-lines-is-5",
        POST + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        (ok("POST /up"),),
        closed=False,
        upstream=(up("POST /up HTTP/1.1", cl=5, body=b"hello"),),
    ),
    rejected(
        "cl-two-differing-lines",
        POST + b"Content-Length: 5\r\nContent-Length: 50\r\n\r\nhello" + ADMIN,
    ),
    Case(
        "cl-leading-zeros-forwarded-as-5",
        POST + b"Content-Length: 0005\r\n\r\nhello",
        (ok("POST /up"),),
        closed=False,
        upstream=(up("POST /up HTTP/1.1", cl=5, body=b"hello"),),
    ),
    rejected("cl-2-pow-63", POST + b"Content-Length: 9223372036854775808\r\n\r\nhello"),
    rejected("cl-hex-0x10", POST + b"Content-Length: 0x10\r\n\r\nhello world12345"),
    rejected("cl-empty", POST + b"Content-Length: \r\n\r\n" + ADMIN),
    rejected("cl-trailing-comma", POST + b"Content-Length: 5,\r\n\r\nhello"),
    Case(
        "cl-then-pipelined-admin-is-a-second-request",
        POST + b"Content-Length: 5\r\n\r\nhello" + ADMIN,
        (ok("POST /up"), ok("GET /admin")),
        closed=False,
        upstream=(up("POST /up HTTP/1.1", cl=5, body=b"hello"), up("GET /admin HTTP/1.1")),
    ),
]

# -- 2. chunk-size lines, chunk data and trailers ---------------------------------------------

CHUNKS: list[Case] = [
    bad_chunked_body("size-0x0-then-admin", b"0x0\r\n\r\n"),
    bad_chunked_body("size-leading-space", b" 5\r\nhello\r\n0\r\n\r\n"),
    Case(
        "size-trailing-space-is-5",
        POST + b"Transfer-Encoding: chunked\r\n\r\n5  \r\nhello\r\n0\r\n\r\n",
        (ok("POST /up"),),
        closed=False,
        upstream=(up("POST /up HTTP/1.1", te="chunked", body=b"hello"),),
    ),
    bad_chunked_body("size-negative-zero", b"-0\r\n\r\n"),
    bad_chunked_body("size-2-pow-63", b"8000000000000000\r\nhello\r\n0\r\n\r\n"),
    Case(
        "size-20-leading-zeros-is-5",
        POST + b"Transfer-Encoding: chunked\r\n\r\n" + b"0" * 20 + b"5\r\nhello\r\n0\r\n\r\n",
        (ok("POST /up"),),
        closed=False,
        upstream=(up("POST /up HTTP/1.1", te="chunked", body=b"hello"),),
    ),
    Case(
        "extension-accepted-and-not-forwarded",
        POST + b"Transfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0;last\r\n\r\n",
        (ok("POST /up"),),
        closed=False,
        upstream=(up("POST /up HTTP/1.1", te="chunked", body=b"hello"),),
    ),
    Case(
        "extension-quoted-string-with-semicolon",
        POST + b'Transfer-Encoding: chunked\r\n\r\n5;a="b;c"\r\nhello\r\n0\r\n\r\n',
        (ok("POST /up"),),
        closed=False,
        upstream=(up("POST /up HTTP/1.1", te="chunked", body=b"hello"),),
    ),
    bad_chunked_body("extension-ended-by-bare-lf", b"5;a=1\nhello\r\n0\r\n\r\n"),
    bad_chunked_body("data-without-crlf-then-last-chunk", b"5\r\nhello0\r\n\r\n"),
    bad_chunked_body("data-longer-than-size", b"5\r\nhello, world\r\n0\r\n\r\n"),
    bad_chunked_body("bare-lf-after-data", b"5\r\nhello\n0\r\n\r\n"),
    Case(
        "trailers-accepted-and-dropped",
        POST + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n",
        (ok("POST /up"),),
        closed=False,
        upstream=(up("POST /up HTTP/1.1", te="chunked", body=b"hello"),),
    ),
    Case(
        "trailer-content-length-is-dropped",
        POST + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nContent-Length: 60\r\n\r\n",
        (ok("POST /up"),),
        closed=False,
        upstream=(up("POST /up HTTP/1.1", te="chunked", body=b"hello"),),
    ),
    bad_chunked_body("trailer-obs-fold", b"0\r\nX-A: a\r\n folded\r\n\r\n"),
    bad_chunked_body("last-chunk-without-crlf-then-admin", b"0\r\n"),
    Case(
        "last-chunk-then-pipelined-admin",
        POST + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + ADMIN,
        (ok("POST /up"), ok("GET /admin")),
        closed=False,
        upstream=(up("POST /up HTTP/1.1", te="chunked"), up("GET /admin HTTP/1.1")),
    ),
    Case(
        "last-chunk-then-garbage-is-400-after-the-first",
        POST + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(b"hello") + b"XYZ\r\n\r\n",
        (ok("POST /up"), refused()),
        closed=True,
        upstream=(up("POST /up HTTP/1.1", te="chunked", body=b"hello"),),
    ),
]

# -- 3. bare CR, bare LF, NUL and header-line syntax ------------------------------------------

HEADER_BYTES: list[Case] = [
    rejected("bare-cr-ends-request-line", b"GET /first HTTP/1.1\rHost: site.test\r\n\r\n"),
    rejected("bare-cr-in-header-name", GET + b"X-A\r: b\r\n\r\n"),
    rejected("cr-cr-lf-line-end", GET + b"X-A: b\r\r\n\r\n"),
    Case(
        "bare-lf-line-endings-accepted",
        b"GET /lf HTTP/1.1\nHost: site.test\nX-A: b\n\n",
        (ok("GET /lf"),),
        closed=False,
        upstream=(up("GET /lf HTTP/1.1", "X-A: b"),),
    ),
    Case(
        "leading-empty-lines-skipped",
        b"\r\n\r\nGET /first HTTP/1.1\r\nHost: site.test\r\n\r\n",
        (ok("GET /first"),),
        closed=False,
        upstream=(up("GET /first HTTP/1.1"),),
    ),
    rejected("nul-in-method", b"GE\x00T /first HTTP/1.1\r\nHost: site.test\r\n\r\n"),
    rejected("del-in-header-value", GET + b"X-A: a\x7fb\r\n\r\n"),
    Case(
        "obs-text-in-value-forwarded-unchanged",
        GET + b"X-A: caf\xe9\r\n\r\n",
        (ok("GET /first"),),
        closed=False,
        upstream=(up("GET /first HTTP/1.1", "X-A: caf\xe9"),),
    ),
    rejected("obs-fold-with-htab", GET + b"X-A: b\r\n\tfolded\r\n\r\n"),
    rejected(
        "obs-fold-hides-te",
        POST
        + b"X-A: b\r\n Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"
        + ADMIN,
    ),
    rejected("obs-fold-first-header-line", b"GET /first HTTP/1.1\r\n Host: site.test\r\n\r\n"),
    rejected(
        "tab-before-colon-content-length",
        POST + b"Content-Length\t: 5\r\n\r\nhello" + ADMIN,
    ),
    rejected("space-before-colon-host", b"GET /first HTTP/1.1\r\nHost : site.test\r\n\r\n"),
    rejected("empty-header-name", GET + b": value\r\n\r\n"),
    rejected("non-token-header-name", GET + b"X@A: b\r\n\r\n"),
    rejected("space-inside-header-name", GET + b"X A: b\r\n\r\n"),
]

# -- 4. request lines -------------------------------------------------------------------------

REQUEST_LINES: list[Case] = [
    rejected("trailing-space-after-version", b"GET /first HTTP/1.1 \r\nHost: site.test\r\n\r\n"),
    rejected("double-space-after-method", b"GET  /first HTTP/1.1\r\nHost: site.test\r\n\r\n"),
    rejected("leading-space", b" GET /first HTTP/1.1\r\nHost: site.test\r\n\r\n"),
    rejected("http-0.9-no-version", b"GET /first\r\n\r\n"),
    rejected("http-1.2", b"GET /first HTTP/1.2\r\nHost: site.test\r\n\r\n", BAD_VERSION),
    rejected("http-2.0", b"GET /first HTTP/2.0\r\nHost: site.test\r\n\r\n", BAD_VERSION),
    rejected("lower-case-version", b"GET /first http/1.1\r\nHost: site.test\r\n\r\n"),
    rejected("tab-separators", b"GET\t/first\tHTTP/1.1\r\nHost: site.test\r\n\r\n"),
    rejected(
        "absolute-form-with-userinfo",
        b"GET http://user:pw@site.test/first HTTP/1.1\r\nHost: site.test\r\n\r\n",
    ),
    rejected("target-with-fragment", b"GET /first#frag HTTP/1.1\r\nHost: site.test\r\n\r\n"),
    rejected("asterisk-form-for-get", b"GET * HTTP/1.1\r\nHost: site.test\r\n\r\n"),
    rejected("relative-target", b"GET first HTTP/1.1\r\nHost: site.test\r\n\r\n"),
    rejected(
        "method-of-17-kib", b"A" * 17 * 1024 + b" / HTTP/1.1\r\nHost: site.test\r\n\r\n", TOO_BIG
    ),
    Case(
        "extension-method-forwarded",
        b"PURGE /first HTTP/1.1\r\nHost: site.test\r\n\r\n",
        (ok("PURGE /first"),),
        closed=False,
        upstream=(up("PURGE /first HTTP/1.1"),),
    ),
]

# -- 5. Host ----------------------------------------------------------------------------------

# Exactly one Host line, whatever its value: an HTTP/1.0 request without Host is forwarded as
# HTTP/1.1, which must carry one (RFC 9112 section 3.2).
_ONE_HOST = rb"(?:(?!Host:)[^\r\n]*\r\n)*Host: [^\r\n]*\r\n(?:(?!Host:)[^\r\n]*\r\n)*\r\n"

HOSTS: list[Case] = [
    rejected("missing-host-http-1.1", b"GET /first HTTP/1.1\r\nX-A: b\r\n\r\n"),
    rejected("two-identical-hosts", GET + b"Host: site.test\r\n\r\n"),
    rejected("two-hosts-differing-in-port", GET + b"Host: site.test:8080\r\n\r\n"),
    rejected("host-with-userinfo", b"GET /first HTTP/1.1\r\nHost: admin@site.test\r\n\r\n"),
    rejected("host-with-slash", b"GET /first HTTP/1.1\r\nHost: site.test/admin\r\n\r\n"),
    rejected("host-list-in-one-line", b"GET /first HTTP/1.1\r\nHost: site.test, evil.test\r\n\r\n"),
    rejected("host-port-65536", b"GET /first HTTP/1.1\r\nHost: site.test:65536\r\n\r\n"),
    Case(
        "http-1.0-without-host-accepted",
        b"GET /old HTTP/1.0\r\n\r\n",
        (ok("GET /old"),),
        closed=True,
        upstream=(Up(re.compile(rb"GET /old HTTP/1\.1\r\n" + _ONE_HOST)),),
    ),
]

# -- 6. hostile backend responses -------------------------------------------------------------


def hostile(
    case_id: str,
    reply: bytes,
    want: Want,
    *,
    send: bytes = GET + b"\r\n",
    closed: bool | None = None,
    close: bool = False,
    next_conn: NextConn | None = None,
) -> Case:
    """The backend answers the client's request with ``reply``; the connection it used is
    closed by the proxy and never serves another request (unless ``next_conn`` says
    otherwise: a response that is well-formed after all)."""
    line = send.split(b"\r\n", 1)[0].decode()
    return Case(
        case_id,
        send,
        (want,),
        closed=closed,
        upstream=(up(line.replace("HTTP/1.0", "HTTP/1.1")),),
        script=((0, Reply(reply, close=close)),),
        next_conn=next_conn,
    )


def staged(case_id: str, first: bytes, then: bytes) -> Case:
    """The backend sends ``first`` (a head and a good chunk), and ``then`` (bad framing) once
    the client got something: the client gets the start of a 200, then the connection closes,
    with nothing spliced after it."""
    return Case(
        case_id,
        GET + b"\r\n",
        (Want(200, b"hello", complete=False),),
        closed=True,
        upstream=(up("GET /first HTTP/1.1"),),
        script=((0, Reply(first, then=then)),),
    )


BAD_GATEWAY = Want(502)
SPLICED = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nGET /smuggle"

HOSTILE: list[Case] = [
    hostile(
        "cl-and-te",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked(b"hello"),
        BAD_GATEWAY,
    ),
    hostile("cl-abc", b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nhello", BAD_GATEWAY),
    hostile("cl-minus-one", b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nhello", BAD_GATEWAY),
    hostile("cl-plus-two", b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok", BAD_GATEWAY),
    hostile(
        "cl-two-differing-lines",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 14\r\n\r\nok" + SPLICED,
        BAD_GATEWAY,
    ),
    hostile(
        "cl-beyond-2-pow-63",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\nok",
        BAD_GATEWAY,
    ),
    hostile(
        "space-before-colon",
        b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
        BAD_GATEWAY,
    ),
    hostile(
        "te-chunked-in-http-1.0",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"hello"),
        BAD_GATEWAY,
    ),
    hostile(
        "te-chunked-twice",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n" + chunked(b"hello"),
        BAD_GATEWAY,
    ),
    hostile(
        "unasked-101-switching-protocols",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        BAD_GATEWAY,
    ),
    hostile(
        "extra-bytes-after-content-length",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + SPLICED,
        Want(200, b"ok"),
        closed=False,
    ),
    hostile(
        "extra-bytes-after-last-chunk",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"hello") + SPLICED,
        Want(200, b"hello"),
        closed=False,
    ),
    hostile(
        "body-in-answer-to-head",
        b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nGET /smuggle",
        Want(200, headers=(("Content-Length", "12"),), head=True),
        send=b"HEAD /first HTTP/1.1\r\nHost: site.test\r\n\r\n",
        closed=False,
    ),
    hostile(
        "body-after-204",
        b"HTTP/1.1 204 No Content\r\n\r\n" + SPLICED,
        Want(204, b""),
        closed=False,
    ),
    hostile(
        "bad-chunk-size-before-anything-relayed",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n" + SPLICED,
        BAD_GATEWAY,
    ),
    staged(
        "bad-chunk-size-mid-body",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"zz\r\n" + SPLICED,
    ),
    staged(
        "chunk-data-overrun-mid-body",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"3\r\nabc" + SPLICED,
    ),
    staged(
        "bare-lf-chunk-line-mid-body",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"3\nabc\n0\n\n" + SPLICED,
    ),
    hostile(
        "body-cut-short-by-close",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello",
        Want(200, b"hello", complete=False),
        closed=True,
        close=True,
    ),
    hostile(
        "obs-fold-in-header",
        b"HTTP/1.1 200 OK\r\nX-A: a\r\n Content-Length: 2\r\nContent-Length: 2\r\n\r\nok",
        BAD_GATEWAY,
    ),
    hostile(
        "bare-cr-in-header",
        b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 2\r\n\r\nok",
        BAD_GATEWAY,
    ),
    hostile(
        "status-code-with-letters", b"HTTP/1.1 2O0 OK\r\nContent-Length: 2\r\n\r\nok", BAD_GATEWAY
    ),
    hostile("status-600", b"HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\nok", BAD_GATEWAY),
    hostile("http-2-status-line", b"HTTP/2 200\r\ncontent-length: 2\r\n\r\nok", BAD_GATEWAY),
    hostile("not-http-at-all", b"SSH-2.0-OpenSSH_9.6\r\n\r\n", BAD_GATEWAY),
    hostile(
        "head-of-70-kib",
        b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * 1000 + b"\r\n" * 1 + b"X-Pad: b\r\n" * 7000,
        BAD_GATEWAY,
    ),
    Case(
        "bare-lf-response-accepted-and-reused",
        GET + b"\r\n",
        (Want(200, b"ok"),),
        closed=False,
        upstream=(up("GET /first HTTP/1.1"),),
        script=((0, Reply(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok")),),
        next_conn="same",
    ),
    # Beyond the policy list: a body framed by close under a transfer coding (RFC 9112 6.3
    # item 4) must reach the client with that coding, not as if it were the plain payload.
    hostile(
        "te-gzip-until-close-keeps-its-coding",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n" + GZ,
        Want(200, GZ, headers=(("Transfer-Encoding", "gzip, chunked"),)),
        close=True,
    ),
]

# -- 7. the policy being implemented ----------------------------------------------------------


def path_case(target: str, forwarded: str | None) -> Case:
    """``GET target``: forwarded as ``GET forwarded``, or refused with 400 when it is None."""
    send = f"GET {target} HTTP/1.1\r\nHost: site.test\r\n\r\n".encode("latin-1")
    if forwarded is None:
        return Case(f"path {target} refused", send, (refused(),))
    return Case(
        f"path {target} forwarded as {forwarded}",
        send,
        (ok(f"GET {forwarded}"),),
        closed=False,
        upstream=(up(f"GET {forwarded} HTTP/1.1"),),
    )


POLICY: list[Case] = [
    Case(
        "request-te-gzip-chunked-forwarded-rechunked",
        POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n" + chunked(GZ[:10], GZ[10:]),
        (ok("POST /up"),),
        closed=False,
        upstream=(up("POST /up HTTP/1.1", te="gzip, chunked", body=GZ),),
    ),
    Case(
        "request-te-two-lines-gzip-then-chunked",
        POST + b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(GZ),
        (ok("POST /up"),),
        closed=False,
        upstream=(up("POST /up HTTP/1.1", te="gzip, chunked", body=GZ),),
    ),
    rejected(
        "request-te-chunked-then-gzip",
        POST + b"Transfer-Encoding: chunked, gzip\r\n\r\n" + chunked(GZ) + ADMIN,
    ),
    hostile(
        "response-te-gzip-chunked-to-http-1.1",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n" + chunked(GZ[:7], GZ[7:]),
        Want(200, GZ, headers=(("Transfer-Encoding", "gzip, chunked"),)),
        closed=False,
        next_conn="same",
    ),
    hostile(
        "response-te-gzip-chunked-to-http-1.0-is-502",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n" + chunked(GZ),
        BAD_GATEWAY,
        send=b"GET /first HTTP/1.0\r\nHost: site.test\r\n\r\n",
        closed=True,
    ),
    hostile(
        "response-te-chunked-then-gzip-is-502",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n" + chunked(GZ),
        BAD_GATEWAY,
    ),
    hostile(
        "response-te-two-chunked-lines-is-502",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked(b"hello"),
        BAD_GATEWAY,
    ),
    Case(
        "chunked-response-to-http-1.0-client-framed-by-close",
        b"GET /first HTTP/1.0\r\nHost: site.test\r\n\r\n",
        (Want(200, b"hello, world", absent=("Transfer-Encoding", "Content-Length")),),
        closed=True,
        upstream=(up("GET /first HTTP/1.1"),),
        script=(
            (
                0,
                Reply(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + chunked(b"hello", b", world")
                ),
            ),
        ),
        next_conn="same",
    ),
    Case(
        "connect-to-forward-route-is-405",
        b"CONNECT site.test:443 HTTP/1.1\r\nHost: site.test:443\r\n\r\n",
        (Want(405, headers=(("Allow", None),)),),
        closed=True,
    ),
    path_case("/a/../b", "/b"),
    path_case("/a/./b/", "/a/b/"),
    path_case("/a/b/..", "/a/"),
    path_case("//b", "/b"),
    path_case("/%61", "/a"),
    path_case("/%7e", "/~"),
    path_case("/%3a", "/%3A"),
    path_case("/a/%2e%2e/b", "/b"),  # dots decoded first, then removed: never "/a/../b" upstream
    path_case("/a/../b?x=/../%2f&y=%zz", "/b?x=/../%2f&y=%zz"),  # the query goes unchanged
    path_case("/a%2fb", None),
    path_case("/a%5Cb", None),
    path_case("/a\\b", None),
    path_case("/%00", None),
    path_case("/a%0d%0a", None),
    path_case("/%zz", None),
    path_case("/%4", None),
    path_case("/..", None),
    path_case("/%2e%2e/admin", None),
    path_case("/a/..;/b", None),
    Case(
        "absolute-form-to-origin-form",
        b"GET http://h.test/a/./b?q HTTP/1.1\r\nHost: h.test\r\n\r\n",
        (ok("GET /a/b?q"),),
        closed=False,
        upstream=(up("GET /a/b?q HTTP/1.1", host="h.test"),),
    ),
    # RFC 9112 3.2.2: the target's authority replaces Host; the backend must not see another.
    Case(
        "absolute-form-authority-replaces-host",
        b"GET http://other.test/a HTTP/1.1\r\nHost: site.test\r\n\r\n",
        (ok("GET /a"),),
        closed=False,
        upstream=(up("GET /a HTTP/1.1", host="other.test"),),
    ),
]

# -- 0. sequences on one connection and across clients ----------------------------------------

SEQUENCES: list[Case] = [
    Case(
        "one-get",
        GET + b"\r\n",
        (ok("GET /first"),),
        closed=False,
        upstream=(up("GET /first HTTP/1.1"),),
    ),
    Case(
        "two-pipelined-gets",
        GET + b"\r\n" + ADMIN,
        (ok("GET /first"), ok("GET /admin")),
        closed=False,
        upstream=(up("GET /first HTTP/1.1"), up("GET /admin HTTP/1.1")),
    ),
    Case(
        "head-then-pipelined-get",
        b"HEAD /first HTTP/1.1\r\nHost: site.test\r\n\r\n" + ADMIN,
        (Want(200, headers=(("Content-Length", "11"),), head=True), ok("GET /admin")),
        closed=False,
        upstream=(up("HEAD /first HTTP/1.1"), up("GET /admin HTTP/1.1")),
    ),
    Case(
        "client-closes-mid-body-then-another-client",
        POST + b"Content-Length: 50\r\n\r\nhello",
        (),
        closed=True,
        partial=head_of(up("POST /up HTTP/1.1", cl=50)) + b"hello",
        half_close=True,
    ),
    Case(
        "client-closes-mid-chunked-body-then-another-client",
        POST + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        (),
        closed=True,
        partial=UP_POST_CHUNKED,
        half_close=True,
    ),
]


# -- the runner -------------------------------------------------------------------------------


def web_route(port: int, backend: int) -> dict[str, Any]:
    return {
        "name": "web",
        "match": {"ports": port},
        "action": {
            "type": "forward",
            "protocol": "http",
            "targets": [{"host": LOOPBACK, "port": backend}],
        },
    }


async def check_client(case: Case, client: RawClient) -> bool:
    """Read and check the responses; True when the probe request was sent on the connection."""
    got = await client.responses([want.head for want in case.want])
    report = "; ".join(r.summary() for r in got) or "no response"
    assert len(got) == len(case.want), f"{len(case.want)} responses wanted, got: {report}"
    for index, (want, response) in enumerate(zip(case.want, got, strict=True)):
        wrong = want.problems(response)
        assert not wrong, f"response {index + 1}: {', '.join(wrong)}; got: {report}"
    last = got[-1] if got else None
    closing = last is None or not last.complete or "close" in last.tokens("connection")
    if case.closed is not None:
        assert closing == case.closed, (
            f"the proxy {'closes' if closing else 'keeps'} the connection; got: {report}"
        )
    if closing:
        rest = await client.rest()  # fails if the connection stays open
        assert rest == b"", f"bytes after the last response: {rest[:300]!r}"
        return False
    await client.send(PROBE)
    probe = next(iter(await client.responses([False])), None)
    assert probe is not None and (probe.status, probe.body) == (200, b"GET /probe"), (
        f"the probe on the same connection got {probe and probe.summary()}"
    )
    return True


async def check_backend(case: Case, backend: RecordingBackend, probed: bool) -> None:
    expected = [
        *case.upstream,
        *([up("GET /probe HTTP/1.1")] if probed else []),
        up("GET /next HTTP/1.1"),
    ]
    seen = backend.requests
    if len(seen) != len(expected) or not all(
        want.matches(got) for want, got in zip(expected, seen, strict=False)
    ):
        shown = "\n".join(
            f"  conn {s.conn}: {s.head + s.body!r} trailers={s.trailers!r}" for s in seen
        )
        wanted = "\n".join(f"  {u.head!r} body={u.body!r}" for u in expected)
        raise AssertionError(f"the backend framed:\n{shown}\nexpected:\n{wanted}")
    for request in seen:  # re-chunked by the proxy: plain sizes, no extensions
        assert all(re.fullmatch(rb"[0-9A-Fa-f]+", line) for line in request.chunk_lines), request
    main, after = seen[: len(case.upstream)], seen[len(case.upstream) :]
    main_conns = {s.conn for s in main}
    after_conns = {s.conn for s in after}
    others = [c for c in backend.connections if c.index not in after_conns]
    for conn in backend.connections:
        assert conn.unframed is None, f"backend connection {conn.index}: {conn.unframed}"
    mode = case.next_mode
    if mode == "first":
        assert not others, f"nothing should have reached the backend: {others[0].raw[:300]!r}"
    elif mode == "same":
        assert after_conns == main_conns and len(backend.connections) == 1, (
            f"a clean exchange's backend connection is reused: {[s.conn for s in seen]}"
        )
    else:
        assert not after_conns & main_conns, (
            f"a backend connection left out of step served another request: {[s.conn for s in seen]}"
        )
        for conn in others:
            async with asyncio.timeout(WAIT):
                await conn.closed.wait()  # the proxy closed it
    if case.partial is not None:
        for conn in others:
            raw = bytes(conn.raw)
            # A prefix of the head (and body) the proxy started to forward, or all of it and
            # some body bytes that never completed a request; never the hidden request.
            size = min(len(raw), len(case.partial))
            assert raw[:size] == case.partial[:size] and b"/admin" not in raw, raw[:300]
            assert not any(s.conn == conn.index for s in seen), "a whole request went upstream"


async def run_case(case: Case) -> None:
    async with RecordingBackend(dict(case.script)) as backend:
        port = free_port()
        async with SmartRoute(
            [web_route(port, backend.port)], bind_address=LOOPBACK, graceful_shutdown_timeout=1
        ) as proxy:
            client = await RawClient.connect(port, received=backend.resume)
            try:
                await client.send(case.send, half_close=case.half_close)
                probed = await check_client(case, client)
            finally:
                client.close()
            # Another client, after it: its own answer, whatever the first one left behind.
            other = await RawClient.connect(port)
            try:
                await other.send(NEXT)
                answer = next(iter(await other.responses([False])), None)
                assert answer is not None and (answer.status, answer.body) == (200, b"GET /next"), (
                    f"the next client got {answer and answer.summary()}"
                )
            finally:
                other.close()
            await check_backend(case, backend, probed)
            assert proxy.is_running


def ids(cases: list[Case]) -> list[str]:
    names = [case.id for case in cases]
    assert len(set(names)) == len(names), "case ids must be unique"
    return names


@pytest.mark.parametrize("case", CL_TE, ids=ids(CL_TE))
@async_test(timeout=20)
async def test_content_length_and_transfer_encoding(case: Case) -> None:
    await run_case(case)


@pytest.mark.parametrize("case", CHUNKS, ids=ids(CHUNKS))
@async_test(timeout=20)
async def test_chunked_framing(case: Case) -> None:
    await run_case(case)


@pytest.mark.parametrize("case", HEADER_BYTES, ids=ids(HEADER_BYTES))
@async_test(timeout=20)
async def test_header_bytes_and_syntax(case: Case) -> None:
    await run_case(case)


@pytest.mark.parametrize("case", REQUEST_LINES, ids=ids(REQUEST_LINES))
@async_test(timeout=20)
async def test_request_lines(case: Case) -> None:
    await run_case(case)


@pytest.mark.parametrize("case", HOSTS, ids=ids(HOSTS))
@async_test(timeout=20)
async def test_host(case: Case) -> None:
    await run_case(case)


@pytest.mark.parametrize("case", HOSTILE, ids=ids(HOSTILE))
@async_test(timeout=20)
async def test_hostile_backend_responses(case: Case) -> None:
    await run_case(case)


@pytest.mark.parametrize("case", POLICY, ids=ids(POLICY))
@async_test(timeout=20)
async def test_framing_and_path_policy(case: Case) -> None:
    await run_case(case)


@pytest.mark.parametrize("case", SEQUENCES, ids=ids(SEQUENCES))
@async_test(timeout=20)
async def test_sequences_on_one_connection_and_across_clients(case: Case) -> None:
    await run_case(case)
