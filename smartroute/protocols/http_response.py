"""A sans-I/O parser for an HTTP/1.x response head, and body framing for both directions.

:func:`parse_response_head` reads a backend's status line and headers: it returns a
:class:`ResponseHead`, ``None`` while the head is incomplete, or raises :class:`HttpParseError`
with status 502, since a malformed answer is the backend's fault. Line endings are read as the
request head parser reads them (CRLF or bare LF).

:func:`request_framing` and :func:`response_framing` decide how the body after a head is
delimited (RFC 9112 section 6.3). They refuse the ambiguous framings that request smuggling and
response splitting rely on, with 400 for a request and 502 for a response.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from smartroute.errors import HttpParseError

# The request head parser owns the grammar of a head's lines; responses share it.
from smartroute.protocols.http import (
    _BAD_BYTES,
    _END_OF_HEAD,
    _FIELD_LINES,
    _HEADER_LINE,
    _NEWLINE,
    _OWS,
    _VERSIONS,
    RequestHead,
    field_lines,
    valid_coding,
)

__all__ = [
    "DEFAULT_MAX_RESPONSE_HEAD",
    "BodyFraming",
    "ResponseHead",
    "parse_response_head",
    "request_framing",
    "response_framing",
]

DEFAULT_MAX_RESPONSE_HEAD = 65536
_BAD_GATEWAY = 502
_BAD_REQUEST = 400
# Body lengths must fit a signed 64-bit integer, as they do in every peer we talk to.
_MAX_BODY_LENGTH = 2**63 - 1

_REASON = rb"[\t\x20-\x7e\x80-\xff]"
# "HTTP/1.1 204" without a reason (and without the space before it) is common enough to accept.
_STATUS_LINE = re.compile(rb"(HTTP/[0-9]\.[0-9]) ([0-9]{3})(?: (" + _REASON + rb"*))?\r?")
# A whole head of the common form (HTTP/1.x, status 100-599, clean lines), see parse_response_head.
_FAST_RESPONSE = re.compile(
    rb"(HTTP/1\.[01]) ([1-5][0-9][0-9])(?: (" + _REASON + rb"*))?\r?\n" + _FIELD_LINES
)


def _prefixes_of(*parts: bytes) -> re.Pattern[bytes]:
    """A pattern matching every prefix of ``parts`` joined (each part consumed whole or not)."""
    pattern = b""
    for part in reversed(parts):
        pattern = b"(?:" + part + pattern + b")?"
    return re.compile(pattern)


# What the status line may be while its end has not arrived.
_STATUS_LINE_PREFIX = _prefixes_of(
    *(re.escape(bytes([byte])) for byte in b"HTTP/"),
    b"[0-9]",
    rb"\.",
    b"[0-9]",
    b" ",
    *[b"[0-9]"] * 3,
    rb"(?: " + _REASON + rb"*)?\r?",
)
# One element of a comma-separated list; commas inside a quoted string do not split it.
_LIST_ELEMENT = re.compile(r'(?:"(?:[^"\\]|\\.)*"?|[^,"])+')


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A parsed response head; ``length`` is its size in bytes, final blank line included."""

    version: str  # "HTTP/1.1" or "HTTP/1.0"
    status: int  # 100-599
    reason: str  # as sent, possibly empty
    headers: tuple[tuple[str, str], ...]  # in order, names as sent, values without OWS
    length: int

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or ``None``."""
        wanted = name.lower()
        size = len(wanted)
        for key, value in self.headers:
            if len(key) == size and key.lower() == wanted:
                return value
        return None

    def header_values(self, name: str) -> list[str]:
        """Every element of list header ``name`` across its lines, split on commas outside
        quoted strings, stripped, empty elements dropped (RFC 9110 section 5.6.1).

        Not for ``Set-Cookie``, whose values are not lists; use :attr:`headers` for that.
        """
        wanted = name.lower()
        return [
            element
            for key, value in self.headers
            if key.lower() == wanted
            for found in _LIST_ELEMENT.finditer(value)
            if (element := found.group().strip(_OWS))
        ]


@dataclass(frozen=True, slots=True)
class BodyFraming:
    """How a message body is delimited: absent, ``length`` bytes, chunked, or until the
    connection closes (responses only).

    ``codings`` are the transfer codings applied before ``chunked`` (or, for a response read
    until close, all of them), as a list header value: ``"gzip"`` for
    ``Transfer-Encoding: gzip, chunked``. They belong to the body's bytes and are sent on
    with them; only the chunked framing is the proxy's to remake.
    """

    kind: Literal["none", "length", "chunked", "close"]
    length: int = 0  # the Content-Length for kind "length", else 0
    codings: str = ""


_NO_BODY = BodyFraming("none")
_CHUNKED = BodyFraming("chunked")
_UNTIL_CLOSE = BodyFraming("close")


def parse_response_head(
    data: bytes | bytearray | memoryview, max_size: int = DEFAULT_MAX_RESPONSE_HEAD
) -> ResponseHead | None:
    """Parse the response head at the start of ``data``; ``None`` means "need more bytes".

    A head that has not ended within ``max_size`` bytes raises at once; a status line that can
    no longer become valid raises as soon as it is seen.
    """
    found = _END_OF_HEAD.search(data, 0, max_size)
    if found is not None:
        # The common head is checked by one regular expression and its fields taken in one
        # pass; any other goes line by line, which has the last word on errors.
        fast = _FAST_RESPONSE.match(data, 0, found.end())
        if fast is not None and fast.end() == found.end():
            reason = fast.group(3)
            return ResponseHead(
                version=fast.group(1).decode("ascii"),
                status=int(fast.group(2)),
                reason="" if reason is None else reason.decode("latin-1"),
                headers=field_lines(fast.group(4)),
                length=found.end(),
            )
    return _parse_response_head(data, max_size)


def _parse_response_head(
    data: bytes | bytearray | memoryview, max_size: int = DEFAULT_MAX_RESPONSE_HEAD
) -> ResponseHead | None:
    """:func:`parse_response_head` line by line: every form, every error."""
    found = _END_OF_HEAD.search(data, 0, max_size)
    if found is None:
        _check_partial_status_line(data, max_size)
        if len(data) > max_size:
            raise HttpParseError(f"response head exceeds {max_size} bytes", status=_BAD_GATEWAY)
        return None
    head = bytes(data[: found.start()])  # up to the newline that ends the last line
    bad = _BAD_BYTES.search(head)
    if bad is not None:
        raise HttpParseError(
            f"invalid byte {bad.group()[:1]!r} in response head", status=_BAD_GATEWAY
        )
    lines = head.split(b"\n")
    version, status, reason = _parse_status_line(lines[0])
    headers: list[tuple[str, str]] = []
    for raw in lines[1:]:
        line = raw[:-1] if raw.endswith(b"\r") else raw
        match = _HEADER_LINE.fullmatch(line)
        if match is None:
            if line[:1] in (b" ", b"\t"):
                # RFC 9112 section 5.2 lets a proxy answer 502 rather than unfold.
                raise HttpParseError("obsolete line folding in header", status=_BAD_GATEWAY)
            raise HttpParseError(f"malformed header line {line[:64]!r}", status=_BAD_GATEWAY)
        name = match.group(1).decode("ascii")
        headers.append((name, match.group(2).decode("latin-1").strip(_OWS)))
    return ResponseHead(
        version=version, status=status, reason=reason, headers=tuple(headers), length=found.end()
    )


def _check_partial_status_line(data: bytes | bytearray | memoryview, max_size: int) -> None:
    """Fail early on a status line that can no longer become valid."""
    end = min(len(data), max_size + 1)
    newline = _NEWLINE.search(data, 0, end)
    if newline is not None:
        _parse_status_line(bytes(data[: newline.start()]))
    elif _STATUS_LINE_PREFIX.fullmatch(data, 0, end) is None:
        raise HttpParseError("malformed status line", status=_BAD_GATEWAY)


def _parse_status_line(line: bytes) -> tuple[str, int, str]:
    match = _STATUS_LINE.fullmatch(line)
    if match is None:
        raise HttpParseError(f"malformed status line {line[:64]!r}", status=_BAD_GATEWAY)
    version = match.group(1).decode("ascii")
    if version not in _VERSIONS:
        raise HttpParseError(f"unsupported HTTP version {version}", status=_BAD_GATEWAY)
    status = int(match.group(2))
    if not 100 <= status <= 599:
        raise HttpParseError(f"status code {status} out of range 100-599", status=_BAD_GATEWAY)
    reason = match.group(3)
    return version, status, "" if reason is None else reason.decode("latin-1")


def request_framing(head: RequestHead) -> BodyFraming:
    """How the body of a request is delimited: chunked, Content-Length, or no body.

    Raises 400 where :func:`~smartroute.protocols.http.parse_request_head` does (both headers,
    differing or malformed Content-Length, Transfer-Encoding not ending in one ``chunked``) and
    also for Transfer-Encoding in an HTTP/1.0 request and a Content-Length beyond 2**63 - 1.
    """
    framing = _message_framing(head.version, head.headers, _BAD_REQUEST, request=True)
    return _NO_BODY if framing is None else framing


def response_framing(request_method: str, head: ResponseHead) -> BodyFraming:
    """How the body of a response to ``request_method`` is delimited (RFC 9112 section 6.3).

    No body after HEAD, 1xx, 204 and 304, nor after a 2xx to CONNECT (a tunnel follows), whatever
    the headers say; then chunked, Content-Length, or until the connection closes. A
    Transfer-Encoding without ``chunked`` also means "until close". Ambiguous framing raises
    502: Content-Length with Transfer-Encoding, an invalid Content-Length, Transfer-Encoding in
    HTTP/1.0, and ``chunked`` anywhere but once at the end.
    """
    status = head.status
    if request_method == "HEAD" or status < 200 or status in (204, 304):
        return _NO_BODY
    if request_method == "CONNECT" and status < 300:
        return _NO_BODY
    framing = _message_framing(head.version, head.headers, _BAD_GATEWAY, request=False)
    return _UNTIL_CLOSE if framing is None else framing


def _message_framing(
    version: str, headers: tuple[tuple[str, str], ...], error_status: int, *, request: bool
) -> BodyFraming | None:
    """The framing that headers announce, ``None`` when they announce none."""
    lengths: list[str] = []
    encodings: list[str] = []
    for name, value in headers:
        size = len(name)  # most names are neither: no need to lower-case them
        if size == 14 and name.lower() == "content-length":
            lengths.append(value)
        elif size == 17 and name.lower() == "transfer-encoding":
            encodings.append(value)
    if encodings:
        if lengths:
            raise HttpParseError("both Content-Length and Transfer-Encoding", status=error_status)
        if version == "HTTP/1.0":  # RFC 9112 section 6.1: treat the framing as faulty
            raise HttpParseError("Transfer-Encoding in an HTTP/1.0 message", status=error_status)
        codings = [c.strip(_OWS) for value in encodings for c in value.split(",")]
        for coding in codings:
            if not valid_coding(coding):
                raise HttpParseError(
                    f"invalid transfer coding {coding[:32]!r}", status=error_status
                )
        chunked = [coding.lower() == "chunked" for coding in codings]
        if not request and not any(chunked):
            # RFC 9112 section 6.3, item 4: the body ends when the connection does.
            return BodyFraming("close", codings=", ".join(codings))
        if not chunked[-1] or chunked.count(True) != 1:
            raise HttpParseError("Transfer-Encoding must end in one chunked", status=error_status)
        if len(codings) == 1:
            return _CHUNKED
        return BodyFraming("chunked", codings=", ".join(codings[:-1]))
    if lengths:
        return BodyFraming("length", _content_length(lengths, error_status))
    return None


def _content_length(values: list[str], error_status: int) -> int:
    """The one length that Content-Length values agree on ("5, 5" is 5, RFC 9110 8.6)."""
    if len(values) == 1:
        text = values[0]
        if len(text) <= 18 and text.isascii() and text.isdigit():
            return int(text)  # one plain number below 2**63
    items = {item.strip(_OWS) for value in values for item in value.split(",")}
    if len(items) != 1:
        raise HttpParseError("invalid Content-Length: differing values", status=error_status)
    (text,) = items
    if not (text.isascii() and text.isdigit()):
        raise HttpParseError(f"invalid Content-Length {text[:32]!r}", status=error_status)
    # Checked before int(), which refuses very long digit strings with ValueError.
    if len(text.lstrip("0")) > 19 or int(text) > _MAX_BODY_LENGTH:
        raise HttpParseError("invalid Content-Length: too large", status=error_status)
    return int(text)
