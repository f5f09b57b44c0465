"""The admin server's edge: its own listener, bounded HTTP/1.1 requests, the token check.

It is not a route: it listens on a port of its own (``settings.admin``), which routes may not
use, and answers one request per connection (``Connection: close``). Request heads are parsed
by the proxy's own strict parser (:mod:`smartroute.protocols.http`) and bounded in size and
time, bodies by ``Content-Length`` only, up to :data:`MAX_BODY`. What each path answers is in
:mod:`smartroute.admin.api`.

With a token every request needs ``Authorization: Bearer TOKEN``; ``GET /status`` also takes
``?token=TOKEN`` so that a person can open the page in a browser, which then keeps the token
in its ``sessionStorage`` and sends it as a header (see :mod:`smartroute.admin.api`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from smartroute.admin.api import AdminApi, Request, Response, error_response
from smartroute.errors import ConfigError, HttpParseError, PortInUseError
from smartroute.protocols.http import RequestHead, parse_request_head
from smartroute.routing.model import CompiledRoute
from smartroute.settings import AdminSettings

if TYPE_CHECKING:
    from smartroute.proxy import SmartRoute

log = logging.getLogger("smartroute.admin")

MAX_HEAD = 16 * 1024  # a request head (431 beyond)
MAX_BODY = 1 << 20  # a PUT body (413 beyond)
HEAD_TIMEOUT = 10.0  # from the connection to the end of the head (408 after)
BODY_TIMEOUT = 30.0  # to read a whole body
WRITE_TIMEOUT = 30.0  # to hand a response to a client that reads it
LINGER = 2.0  # after the response: how long to read what the client still sends
LINGER_BYTES = 4 * MAX_BODY  # and how much of it
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    411: "Length Required",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def check_admin_port(routes: Sequence[CompiledRoute], port: int | None, path: str) -> None:
    """No route may use the admin server's port: the admin server is never shadowed."""
    if not port:
        return
    for i, route in enumerate(routes):
        if port in route.match.ports:
            where = f"{path}[{i}].match.ports" if path == "routes" else f"{path}.match.ports"
            raise ConfigError(
                where,
                f"port {port} is the admin server's (settings.admin.port): routes cannot use it",
            )


class _Refusal(Exception):
    """A request answered before it reaches the API (no token, a body too large)."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


class AdminServer:
    """Serves :class:`AdminApi` on ``settings.bind``:``settings.port`` (0: a free port)."""

    def __init__(self, settings: AdminSettings, proxy: SmartRoute) -> None:
        self.settings = settings
        self.api = AdminApi(proxy, token=settings.token)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port: int | None = None

    async def start(self) -> None:
        host, port = self.settings.bind, self.settings.port
        try:
            self._server = await asyncio.start_server(
                self._serve, host, port, limit=MAX_HEAD, reuse_address=True
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(
                    port, host, "another process", "the admin server's port (settings.admin)"
                ) from exc
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("admin server listening on %s:%d", host, self.port)

    async def stop(self) -> None:
        """Close the listener, then end the requests under way (they are short)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await server.wait_closed()
        self.port = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            response = await self._answer(reader)
            if response is not None:
                writer.write(_encode(response))
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await writer.drain()
                await _linger(reader, writer)
        except (ConnectionError, TimeoutError):
            pass  # the client left or does not read: nothing to tell it
        except Exception:  # a bug here costs this request only
            log.exception("admin server: request failed")
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _answer(self, reader: asyncio.StreamReader) -> Response | None:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                found = await _read_head(reader)
        except TimeoutError:
            return error_response(408, "the request head took too long")
        except HttpParseError as exc:
            return error_response(exc.status, str(exc))
        if found is None:
            return None  # closed before a request
        head, rest = found
        query = parse_qs(head.query or "", keep_blank_values=True)
        try:
            self._authorize(head, query)
            body = await _read_body(reader, head, rest)
        except _Refusal as refusal:
            return refusal.response
        return await self.api.handle(
            Request(head.method, head.path, query, head.header_map(), body)
        )

    def _authorize(self, head: RequestHead, query: dict[str, list[str]]) -> None:
        token = self.settings.token
        if token is None:
            return
        wanted = token.encode()
        header = head.header("authorization") or ""
        scheme, _, given = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), wanted):
            return
        # A browser cannot send a header when a person opens the page: the page takes the
        # token once from its URL (then keeps it, see api.py).
        if head.method == "GET" and head.path == "/status":
            for given in query.get("token", []):
                if hmac.compare_digest(given.encode(), wanted):
                    return
        raise _Refusal(self.api.unauthorized(head))


async def _read_head(reader: asyncio.StreamReader) -> tuple[RequestHead, bytes] | None:
    """The request head and the bytes read after it; None if the client sent nothing."""
    data = bytearray()
    while True:
        head = parse_request_head(data, MAX_HEAD)
        if head is not None:
            return head, bytes(data[head.length :])
        chunk = await reader.read(MAX_HEAD)
        if not chunk:
            if data.strip():
                raise HttpParseError("the request head was cut off")
            return None
        data += chunk


async def _read_body(reader: asyncio.StreamReader, head: RequestHead, rest: bytes) -> bytes:
    """The body framed by ``Content-Length`` (none without it), at most :data:`MAX_BODY`."""
    if head.header("transfer-encoding") is not None:
        raise _Refusal(error_response(411, "send the body with Content-Length (no chunked)"))
    length_text = head.header("content-length")
    if length_text is None:
        if head.method in ("PUT", "POST"):
            raise _Refusal(error_response(411, "a body needs Content-Length"))
        return b""
    length = int(length_text)  # the head parser checked it is one decimal number
    if length > MAX_BODY:
        raise _Refusal(error_response(413, f"the body is over {MAX_BODY} bytes"))
    if len(rest) >= length:
        return rest[:length]
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            return rest + await reader.readexactly(length - len(rest))
    except TimeoutError:
        raise _Refusal(error_response(408, "the request body took too long")) from None
    except asyncio.IncompleteReadError:
        raise _Refusal(error_response(400, "the request body was cut off")) from None


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then read what the client still sends (a body refused unread) for a
    moment: closing with unread bytes would reset the connection, and the client could lose
    the answer it was sent."""
    if writer.can_write_eof():
        writer.write_eof()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(LINGER):
            discarded = 0
            while discarded < LINGER_BYTES and (chunk := await reader.read(65536)):
                discarded += len(chunk)


def _encode(response: Response) -> bytes:
    reason = _REASONS.get(response.status, "")
    lines = [
        f"HTTP/1.1 {response.status} {reason}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Connection: close",
        "Cache-Control: no-store",
        "X-Content-Type-Options: nosniff",
        *(f"{name}: {value}" for name, value in response.headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + response.body


__all__ = ["MAX_BODY", "AdminServer", "check_admin_port"]
