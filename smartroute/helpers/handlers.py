"""Ready-made socket handlers: ``SocketHandlers.echo``, ``.proxy``, ``.line_protocol``, ...

Each is an ``async def handler(reader, writer, ctx)`` (or a factory that returns one) for a
``socket-handler`` route.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from smartroute.context import RouteContext
from smartroute.routing.model import SocketHandler

LineFunction = Callable[[str, RouteContext], "str | None | Awaitable[str | None]"]

_CHUNK = 65536


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy ``reader`` to ``writer`` until EOF, then half-close the writer."""
    while chunk := await reader.read(_CHUNK):
        writer.write(chunk)
        await writer.drain()
    if writer.can_write_eof() and not writer.is_closing():
        writer.write_eof()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


class SocketHandlers:
    """Factories and ready handlers for common socket-handler routes."""

    @staticmethod
    async def echo(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: RouteContext
    ) -> None:
        """Send every byte back until the client half-closes."""
        await _pipe(reader, writer)
        await _close(writer)

    @staticmethod
    def proxy(host: str, port: int) -> SocketHandler:
        """Relay the connection to ``host:port`` (with streams; for a fast path use ``forward``)."""

        async def handler(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: RouteContext
        ) -> None:
            upstream_reader, upstream_writer = await asyncio.open_connection(host, port)
            try:
                await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
            finally:
                await _close(upstream_writer)
                await _close(writer)

        return handler

    @staticmethod
    def line_protocol(fn: LineFunction, *, max_line: int = _CHUNK) -> SocketHandler:
        """Call ``fn(line, ctx)`` for each line (without its newline); send back what it returns.

        ``fn`` may be sync or async; ``None`` sends nothing. A line longer than ``max_line``
        closes the connection.
        """

        async def handler(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: RouteContext
        ) -> None:
            try:
                while True:
                    try:
                        raw = await reader.readuntil(b"\n")
                    except asyncio.IncompleteReadError as exc:
                        raw = exc.partial
                        if not raw:
                            break
                    if len(raw) > max_line:
                        break
                    line = raw.decode("utf-8", "replace").rstrip("\r\n")
                    reply = fn(line, ctx)
                    if inspect.isawaitable(reply):
                        reply = await reply
                    if reply is not None:
                        writer.write(reply.encode() + (b"" if reply.endswith("\n") else b"\n"))
                        await writer.drain()
            except asyncio.LimitOverrunError:
                pass  # a line longer than the stream limit: close
            await _close(writer)

        return handler

    @staticmethod
    def http_response(
        status: int, body: str | bytes, *, content_type: str = "text/plain; charset=utf-8"
    ) -> SocketHandler:
        """Answer one HTTP request with ``status`` and ``body``, then close."""
        payload = body.encode() if isinstance(body, str) else body
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Status"
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        ).encode("latin-1")

        async def handler(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: RouteContext
        ) -> None:
            request = b""
            with contextlib.suppress(asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                request = await reader.readuntil(b"\r\n\r\n")
            writer.write(head if request.startswith(b"HEAD ") else head + payload)
            await _close(writer)

        return handler

    @staticmethod
    def block(message: str | None = None) -> SocketHandler:
        """Close at once, after sending ``message`` when one is given."""

        async def handler(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: RouteContext
        ) -> None:
            if message:
                writer.write(message.encode())
            await _close(writer)

        return handler
