"""A buffered byte stream on protocol callbacks, for the HTTP layer.

Unlike StreamReader, the read buffer is the caller's to inspect: the session parses request
heads straight out of it and, when a connection changes hands (an upgrade, a socket handler),
gives the unread bytes to the next owner. Reading pauses above ``HIGH_WATER`` buffered bytes
and writing callers wait in :meth:`Stream.drain` while the transport's buffer is full, so
memory stays bounded whatever either peer does.

Waits can carry a deadline (:meth:`Stream.fill`). A stream keeps one timer for them that is
not cancelled when a wait ends early: the next wait moves the deadline, and the timer, when it
fires, either ends a wait that is over time or sets itself for the current deadline. A
kept-alive connection therefore costs no timer operation per request, where a timeout context
per wait would schedule and cancel one each time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from smartroute.server.bandwidth import Pacer, Throttle
from smartroute.server.observe import Observation
from smartroute.server.stats import ConnectionRecord

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


class Stream(asyncio.Protocol):
    """One side of an HTTP exchange; counts bytes on ``record`` when it is the client side."""

    def __init__(
        self, record: ConnectionRecord | None = None, on_lost: Callable[[], None] | None = None
    ) -> None:
        self.record = record
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.closed = False
        self.error: Exception | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._half_close = True
        self._data_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._client: Stream | None = None  # see serve()
        # A backend stream serving an observed or limited client: where its bytes are shown,
        # and the client's download limit (see serve).
        self.observation: Observation | None = None
        self.throttle: Throttle | None = None
        self._held = False  # not reading: over a speed limit, until its pacer says
        self._pacer: Pacer | None = None
        self._served: Stream | None = None  # the backend stream serving this client now
        self._deadline: float | None = None  # loop time at which the current wait fails
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # -- protocol callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        # TLS has no half-close: after the peer's close_notify the transport closes.
        self._half_close = transport.get_extra_info("sslcontext") is None

    def data_received(self, data: bytes) -> None:
        record = self.record
        if record is not None:
            record.bytes_in += len(data)
            if record.observation is not None:
                record.observation.push("in", data)
            limits = record.bandwidth
            throttle = None if limits is None else limits.upload
        else:
            if self.observation is not None:
                self.observation.push("out", data)
            throttle = self.throttle
        if throttle is not None:
            pacer = self._pacer
            if pacer is None or pacer.throttle is not throttle:
                self._flush_held()
                pacer = self._pacer = Pacer(throttle, self._take, self._hold, self._go_on)
            pacer.feed(data)
            return
        self._take(data)

    def _take(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > HIGH_WATER and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def _hold(self) -> None:
        """Over the speed limit: stop reading until the pacer says."""
        self._held = True
        if self.transport is not None:
            self.transport.pause_reading()

    def _go_on(self) -> None:
        self._held = False
        if not self._reading_paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def _flush_held(self) -> None:
        """What a pacer still holds goes into the buffer now (the stream ends, or its limit
        changes): no byte is lost."""
        pacer = self._pacer
        if pacer is not None:
            pending = pacer.pending
            pacer.cancel()
            self._pacer = None
            if pending:
                self._take(pending)
            if self._held:
                self._go_on()

    def eof_received(self) -> bool:
        self._flush_held()
        self.eof = True
        self._wake_reader()
        return self._half_close  # half-close: answers may still be written

    def connection_lost(self, exc: Exception | None) -> None:
        self._flush_held()
        self.closed = True
        self.eof = True
        self.error = exc
        if self._timer is not None:  # a cancelled handle lets go of this stream at once
            self._timer.cancel()
            self._timer = None
        self._wake_reader()
        self._wake_writer()
        served = self._served
        if served is not None:  # the exchange for this client must end now
            served._wake_reader()
            served._wake_writer()
        if self.on_lost is not None:
            self.on_lost()

    @property
    def blocked(self) -> bool:
        """True when a writer must wait in :meth:`drain` (or learn there that the peer left)."""
        return self._writing_paused or self.closed

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_writer()

    def serve(self, client: Stream | None) -> None:
        """Tie this backend stream to the ``client`` it answers (``None`` unties it).

        While tied, losing the client's connection ends any wait for this stream's bytes or
        drain with :class:`ConnectionResetError`: an exchange must not outlive its client while
        the backend is slow to answer or stalls mid-body.
        """
        if self._client is not None:
            self._client._served = None
        self._client = client
        self.observation = self.throttle = None
        if client is not None:
            client._served = self
            record = client.record
            if record is not None:
                self.observation = record.observation
                if record.bandwidth is not None:
                    self.throttle = record.bandwidth.download

    def _check_client(self) -> None:
        if self._client is not None and self._client.closed:
            raise ConnectionResetError("the client closed the connection")

    # -- reading ---------------------------------------------------------------------------

    async def fill(self, deadline: float | None = None) -> bool:
        """Wait for more bytes; False when none will come (EOF or connection lost).

        ``deadline`` (in the event loop's time) bounds the wait: past it, ``TimeoutError``.
        """
        if self.eof:
            return False
        if self._client is not None and self._client.closed:
            raise ConnectionResetError("the client closed the connection")
        if self._reading_paused:
            self._resume_reading()
        loop = asyncio.get_running_loop()
        waiter = self._data_waiter = loop.create_future()
        if deadline is not None:
            self._deadline = deadline
            timer = self._timer
            if timer is None or self._timer_at > deadline:
                if timer is not None:
                    timer.cancel()
                self._timer_at = deadline
                self._timer = loop.call_at(deadline, self._on_timer)
        try:
            await waiter
        finally:
            self._data_waiter = None
            self._deadline = None
        if self._client is not None and self._client.closed:
            raise ConnectionResetError("the client closed the connection")
        return not (self.eof and not self.buffer)

    def _on_timer(self) -> None:
        self._timer = None
        deadline, waiter = self._deadline, self._data_waiter
        if deadline is None or waiter is None or waiter.done():
            return  # no bounded wait now; the next one sets the timer again
        if deadline <= self._timer_at:
            waiter.set_exception(TimeoutError())
            return
        self._timer_at = deadline
        self._timer = asyncio.get_running_loop().call_at(deadline, self._on_timer)

    def consume(self, count: int) -> bytes:
        """Take ``count`` bytes (or fewer, if fewer are buffered) off the front of the buffer."""
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        if self._reading_paused and len(self.buffer) < LOW_WATER:
            self._resume_reading()
        return data

    def skip(self, count: int) -> None:
        """Drop ``count`` bytes off the front of the buffer (already parsed, not needed)."""
        del self.buffer[:count]
        if self._reading_paused and len(self.buffer) < LOW_WATER:
            self._resume_reading()

    def detach(self) -> bytes:
        """Everything buffered, for the next owner of the connection."""
        if self._timer is not None:  # this stream will not wait again
            self._timer.cancel()
            self._timer = None
        return self.consume(len(self.buffer))

    # -- writing ---------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the peer closed the connection")
        if self.record is not None:
            self.record.bytes_out += len(data)
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark."""
        if self.closed:
            raise ConnectionResetError("the peer closed the connection")
        if not self._writing_paused:
            return
        self._check_client()
        waiter = self._drain_waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._drain_waiter = None
        if self.closed:
            raise ConnectionResetError("the peer closed the connection")
        self._check_client()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- internals -------------------------------------------------------------------------

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            if not self._held:
                self.transport.resume_reading()

    def _wake_reader(self) -> None:
        waiter = self._data_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_writer(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Handover(Exception):
    """The connection left the HTTP layer (an upgrade, a raw pipe, a socket handler)."""
