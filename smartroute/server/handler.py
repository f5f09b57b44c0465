"""The ``socket-handler`` action: give the connection to the user's coroutine as streams.

The client transport is switched from the routing protocol to a StreamReaderProtocol; bytes
already read for routing are fed to the reader first, so the handler sees the stream whole.
A handler that raises closes its own connection and nothing else. When the proxy ends the
connection itself (idle or lifetime limit, shutdown), the handler's task is cancelled too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from smartroute.context import RouteContext
from smartroute.routing.model import SocketHandler
from smartroute.server.bandwidth import Pacer
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
        self._held_transport: asyncio.Transport | None = None  # to pause over a speed limit
        self._pacer: Pacer | None = None

    def data_received(self, data: bytes) -> None:
        record = self._record
        record.bytes_in += len(data)
        limits = record.bandwidth
        if limits is not None and limits.upload is not None:
            if self._pacer is None:
                self._pacer = Pacer(limits.upload, self._take, self._hold, self._go_on)
            self._pacer.feed(data)
            return
        super().data_received(data)

    def _take(self, data: bytes) -> None:
        super().data_received(data)

    def _hold(self) -> None:
        """Over the upload limit: stop reading until the pacer says (the reader's own flow
        control may resume it early; the pacer still passes bytes on at the limit)."""
        if self._held_transport is not None:
            self._held_transport.pause_reading()

    def _go_on(self) -> None:
        transport = self._held_transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def eof_received(self) -> bool:
        self._flush_held()
        return bool(super().eof_received())

    def _flush_held(self) -> None:
        pacer = self._pacer
        if pacer is not None and pacer.pending:
            pending = pacer.pending
            pacer.cancel()
            super().data_received(pending)

    def connection_lost(self, exc: Exception | None) -> None:
        self._flush_held()
        if exc is not None:
            self._record.fail("error", f"client: {exc}")
        super().connection_lost(exc)
        self._done()


class _CountingWriter(asyncio.StreamWriter):
    """A StreamWriter that adds what the handler writes to the connection's outbound bytes."""

    _record: ConnectionRecord
    _hold_until = 0.0  # over the download limit: drain() waits until then

    def write(self, data: bytes | bytearray | memoryview) -> None:
        record = self._record
        record.bytes_out += len(data)
        super().write(data)
        limits = record.bandwidth
        if limits is not None and limits.download is not None:
            delay = limits.download.charge(len(data))
            if delay:
                self._hold_until = max(self._hold_until, time.monotonic() + delay)

    async def drain(self) -> None:
        """As a StreamWriter's, and over the download limit, until the limit allows more."""
        await super().drain()
        wait = self._hold_until - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

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
    protocol._held_transport = transport
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
