"""The ``socket-handler`` action: give the connection to the user's coroutine as streams.

The client transport is switched from the routing protocol to a StreamReaderProtocol; bytes
already read for routing are fed to the reader first, so the handler sees the stream whole.
A handler that raises closes its own connection and nothing else. When the proxy ends the
connection itself (idle or lifetime limit, shutdown), the handler's task is cancelled too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from smartroute.context import RouteContext
from smartroute.routing.model import SocketHandler
from smartroute.server.stats import ConnectionRecord

log = logging.getLogger("smartroute")

STREAM_LIMIT = 2**16


class _HandlerProtocol(asyncio.StreamReaderProtocol):
    """Counts inbound bytes and reports the end of the connection."""

    def __init__(
        self, reader: asyncio.StreamReader, record: ConnectionRecord, done: Callable[[], None]
    ) -> None:
        super().__init__(reader)
        self._record = record
        self._done = done

    def data_received(self, data: bytes) -> None:
        self._record.bytes_in += len(data)
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self._record.fail("error", f"client: {exc}")
        super().connection_lost(exc)
        self._done()


class _CountingWriter(asyncio.StreamWriter):
    """A StreamWriter that adds what the handler writes to the connection's outbound bytes."""

    _record: ConnectionRecord

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._record.bytes_out += len(data)
        super().write(data)

    def writelines(self, data: object) -> None:
        for chunk in data:  # type: ignore[attr-defined]
            self.write(chunk)


def start_handler(
    handler: SocketHandler,
    transport: asyncio.Transport,
    initial: bytes,
    eof: bool,
    ctx: RouteContext,
    record: ConnectionRecord,
    done: Callable[[], None],
) -> Coroutine[Any, Any, None]:
    """Switch ``transport`` to streams; returns the coroutine that runs ``handler`` on them."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=STREAM_LIMIT, loop=loop)
    protocol = _HandlerProtocol(reader, record, done)
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if initial:
        reader.feed_data(initial)
    if eof:
        reader.feed_eof()
    writer = _CountingWriter(transport, protocol, reader, loop)
    writer._record = record
    transport.resume_reading()
    record.closer = transport.abort
    return _run(handler, reader, writer, ctx, record)


async def _run(
    handler: SocketHandler,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    ctx: RouteContext,
    record: ConnectionRecord,
) -> None:
    task = asyncio.current_task()
    assert task is not None

    def close() -> None:
        """The proxy ends the connection (idle, lifetime, shutdown): stop the handler too."""
        writer.transport.abort()
        task.cancel()

    record.closer = close
    try:
        await handler(reader, writer, ctx)
    except asyncio.CancelledError:
        record.fail("cancelled", "handler cancelled")
        writer.transport.abort()
        raise
    except Exception as exc:  # a user handler must never take the proxy down
        record.fail("handler-error", f"{type(exc).__name__}: {exc}")
        log.error(
            "socket handler of route %r raised on %s", ctx.route_name, record.id, exc_info=exc
        )
        writer.transport.abort()
        return
    writer.close()
