"""Responses the proxy makes itself (errors, redirects, static files) and how they are written.

A :class:`Response` is plain data; the session writes it with :func:`render_head` and streams
``body`` or ``file``. ``Content-Length`` is derived from the body unless the status forbids a
body, so builders never compute it by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from http import HTTPStatus

NO_BODY_STATUSES = frozenset({204, 304}) | frozenset(range(100, 200))


@dataclass(frozen=True, slots=True)
class FileBody:
    """A byte range of a file to stream as the response body."""

    path: str
    offset: int
    length: int


@dataclass(slots=True)
class Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    file: FileBody | None = None

    @property
    def content_length(self) -> int:
        return self.file.length if self.file is not None else len(self.body)


def reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Status"


_STATUS_LINES: dict[int, str] = {}


def status_line(status: int) -> str:
    """``HTTP/1.1 <status> <reason>`` and its CRLF (remembered: statuses are few)."""
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {reason(status)}\r\n"
    return line


def render_head(status: int, headers: list[tuple[str, str]], *, version: str = "HTTP/1.1") -> bytes:
    """The status line and headers, ending with the blank line."""
    first = (
        status_line(status) if version == "HTTP/1.1" else f"{version} {status} {reason(status)}\r\n"
    )
    lines = [first]
    lines += [f"{name}: {value}\r\n" for name, value in headers]
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


def response_head(response: Response, *, keep_alive: bool) -> bytes:
    """The head of a response the proxy makes, with Content-Length and Connection set."""
    headers = [
        (n, v) for n, v in response.headers if n.lower() not in ("content-length", "connection")
    ]
    if response.status not in NO_BODY_STATUSES:
        headers.append(("Content-Length", str(response.content_length)))
    headers.append(("Connection", "keep-alive" if keep_alive else "close"))
    return render_head(response.status, headers)


def closing_answer(
    status: int, message: str, headers: list[tuple[str, str]] | None = None
) -> bytes:
    """A whole short text answer, after which the connection closes."""
    response = text_response(status, message, headers)
    return response_head(response, keep_alive=False) + response.body


def text_response(
    status: int, message: str, headers: list[tuple[str, str]] | None = None
) -> Response:
    """A short plain-text answer such as ``404 no route for this request``."""
    body = (message.rstrip("\n") + "\n").encode()
    base = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]
    return Response(status, base + (headers or []), body)


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What the proxy's own responders (static, redirect) need to know about a request."""

    method: str
    path: str  # as sent, still percent-encoded, without the query
    query: str | None  # without the "?"; None when the target had no "?"
    headers: dict[str, str]  # lower-cased names
    host: str | None  # Host without port, normalised; None when absent
    port: int  # the local port the client connected to
    is_tls: bool
