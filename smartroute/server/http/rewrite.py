"""What the reverse proxy sends on: a request's head for the backend, a response's for the client.

Pure: the parsed messages and what the proxy knows go in, bytes and decisions come out. Both
HTTP paths - the transport session (:mod:`smartroute.server.http.reverse_proxy`) and the fast
lane (:mod:`smartroute.server.http.lane`) - build every head they forward here, so a request
and its response are rewritten the same way whichever path carries them.
"""

from __future__ import annotations

from dataclasses import dataclass

from smartroute.errors import HttpParseError
from smartroute.protocols.http import RequestHead
from smartroute.protocols.http_response import BodyFraming, ResponseHead, response_framing
from smartroute.server.http.headers import connection_tokens, request_lines, response_lines
from smartroute.server.http.messages import status_line

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def chunked_after(codings: str) -> str:
    """The Transfer-Encoding value for a body chunked after ``codings``."""
    return f"{codings}, chunked" if codings else "chunked"


def authority_of(host: str, port: int | None) -> str:
    """``host[:port]`` as a Host value (an IPv6 literal in brackets)."""
    if ":" in host:
        host = f"[{host}]"
    return host if port is None else f"{host}:{port}"


def backend_request_head(
    head: RequestHead,
    framing: BodyFraming,
    tokens: set[str],
    *,
    client_ip: str,
    tls: bool,
    domain: str | None,
    target: tuple[str, int],
    upgrade: str | None,
) -> bytes:
    """The head of ``head``'s request as the backend at ``target`` gets it.

    ``tokens`` are the request's ``Connection`` options, ``domain`` the name the client asked
    for (SNI, for a request without Host), ``upgrade`` the protocol it asks to switch to.
    Hop-by-hop headers go, the forwarding headers are the proxy's own, the body's framing is
    restated, and the target is the path the routes matched, normalised, in origin form: what
    the backend resolves is what the proxy checked.
    """
    host = None if head.target[0] in "/*" else authority_of(head.host or "", head.port)
    if head.host is None and host is None and head.header("host") is None:
        # An HTTP/1.0 request without Host goes on as HTTP/1.1, which needs one: the name the
        # client connected to (SNI), else the backend's address.
        host = domain or authority_of(*target)
    lines = request_lines(
        head.headers, tokens, client_ip=client_ip, proto="https" if tls else "http", host=host
    )
    if framing.kind == "length":
        lines += f"Content-Length: {framing.length}\r\n"
    elif framing.kind == "chunked":
        lines += f"Transfer-Encoding: {chunked_after(framing.codings)}\r\n"
    if upgrade is not None:
        lines += f"Connection: upgrade\r\nUpgrade: {upgrade}\r\n"
    return f"{head.method} {head.origin} HTTP/1.1\r\n{lines}\r\n".encode("latin-1")


def interim_head(request: RequestHead, response: ResponseHead) -> bytes | None:
    """What a backend's interim (1xx, not 101) answer becomes for the client: passed on to an
    HTTP/1.1 client, except ``100 Continue``, which the proxy answered itself."""
    if request.version != "HTTP/1.1" or response.status == 100:
        return None
    lines = response_lines(response.headers, connection_tokens(response.headers), keep_length=True)
    return f"{status_line(response.status)}{lines}\r\n".encode("latin-1")


def upgraded_head(response: ResponseHead, tokens: set[str], upgrade: str) -> bytes:
    """The ``101 Switching Protocols`` head for the client (``upgrade``: what it asked for)."""
    upgraded = response.header("upgrade") or upgrade
    lines = response_lines(response.headers, tokens, keep_length=True)
    lines += f"Connection: upgrade\r\nUpgrade: {upgraded}\r\n"
    return f"{status_line(101)}{lines}\r\n".encode("latin-1")


@dataclass(slots=True)  # not frozen: made per response, and a frozen __init__ costs more
class ResponsePlan:
    """How a backend's final response goes to the client: its ``status`` and ``head``, its
    body's ``framing``, whether the body is re-chunked (``rechunk``), and which connection may
    carry another exchange."""

    status: int
    head: bytes
    framing: BodyFraming
    rechunk: bool
    client_keep: bool
    backend_keep: bool


def plan_response(
    request: RequestHead, response: ResponseHead, tokens: set[str], keep_alive: bool
) -> ResponsePlan:
    """Plan the final response to ``request``; ``tokens`` are the response's ``Connection``
    options, ``keep_alive`` whether the client may stay (it asked to, and the proxy is not
    stopping).

    An HTTP/1.1 client gets a body of unknown length chunked; an HTTP/1.0 client, which cannot
    read chunked, gets it plain and delimited by the end of the connection. A response that
    cannot reach this client (broken framing, a transfer coding an HTTP/1.0 client cannot
    read) raises :class:`HttpParseError` with status 502, before anything of it is sent.
    """
    try:
        out = response_framing(request.method, response)
    except HttpParseError as exc:
        raise HttpParseError(f"the backend sent an invalid response: {exc}", status=502) from None
    if out.codings and request.version == "HTTP/1.0":
        raise HttpParseError(
            f"the response's transfer coding {out.codings!r} cannot reach an HTTP/1.0 client",
            status=502,
        )
    kind = out.kind
    backend_keep = kind != "close" and response.version == "HTTP/1.1" and "close" not in tokens
    rechunk = kind in ("chunked", "close") and request.version == "HTTP/1.1"
    client_keep = keep_alive and (kind in ("none", "length") or rechunk)
    # A body-less answer (HEAD, 304) keeps the Content-Length the backend stated.
    lines = response_lines(response.headers, tokens, keep_length=kind == "none")
    if kind == "length":
        lines += f"Content-Length: {out.length}\r\n"
    elif rechunk and request.method != "HEAD":
        lines += f"Transfer-Encoding: {chunked_after(out.codings)}\r\n"
    connection = "keep-alive" if client_keep else "close"
    head = f"{status_line(response.status)}{lines}Connection: {connection}\r\n\r\n"
    return ResponsePlan(
        response.status, head.encode("latin-1"), out, rechunk, client_keep, backend_keep
    )
