"""The byte pipe between a client and a backend, on protocol callbacks.

Each direction is a :class:`RelaySide` whose ``data_received`` writes straight into the peer's
transport. Backpressure: when a transport's write buffer passes its high-water mark asyncio
calls ``pause_writing`` on the protocol that owns it, and the relay stops reading from the
other side until ``resume_writing``. Memory per connection is therefore bounded by the two
write buffers. A connection over a speed limit (:mod:`smartroute.server.bandwidth`) stops
reading the side whose bytes went over until its buckets are even again. Half-close is passed
on with ``write_eof``; both sides close after both EOFs or when either side is lost, and a
half-closed pipe that goes quiet for ``half_close`` seconds is closed by the runtime's sweep.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from smartroute.server.bandwidth import Pacer
from smartroute.server.stats import ConnectionRecord


class RelaySide(asyncio.Protocol):
    """One side of a relayed connection; ``inbound`` is the client side."""

    __slots__ = (
        "transport", "peer", "record", "inbound", "eof", "lost", "_done", "_half_close", "held",
        "backed_up", "pacer",
    )  # fmt: skip

    def __init__(
        self, record: ConnectionRecord, *, inbound: bool, done: Callable[[], None]
    ) -> None:
        self.record = record
        self.inbound = inbound
        self.transport: asyncio.Transport | None = None
        self.peer: RelaySide | None = None
        self.eof = False
        self.lost = False
        self._done = done
        self._half_close = True
        self.held = False  # not reading: over a speed limit, until a timer says
        self.backed_up = False  # not reading: the peer's transport has too much to write
        self.pacer: Pacer | None = None  # over a speed limit, bytes go on through it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        self._half_close = transport.get_extra_info("sslcontext") is None

    def data_received(self, data: bytes) -> None:
        record = self.record
        if self.inbound:
            record.bytes_in += len(data)
        else:
            record.bytes_out += len(data)
        if record.observation is not None:
            record.observation.push("in" if self.inbound else "out", data)
        limits = record.bandwidth
        if limits is not None:
            pacer = self.pacer
            if pacer is None:
                throttle = limits.upload if self.inbound else limits.download
                if throttle is not None:
                    pacer = self.pacer = Pacer(throttle, self._pass_on, self._hold, self._go_on)
            if pacer is not None:
                pacer.feed(data)
                return
        self._pass_on(data)

    def _pass_on(self, data: bytes) -> None:
        peer = self.peer
        assert peer is not None and peer.transport is not None
        if not peer.lost:
            peer.transport.write(data)

    def _hold(self) -> None:
        """Over the speed limit: stop reading until the pacer says."""
        self.held = True
        if self.transport is not None:
            self.transport.pause_reading()

    def _go_on(self) -> None:
        self.held = False
        if not self.lost and not self.backed_up and self.transport is not None:
            self.transport.resume_reading()

    def _flush_held(self) -> None:
        """The side ended: what the pacer still holds goes on now (no byte is lost)."""
        pacer = self.pacer
        if pacer is not None and pacer.pending:
            pending = pacer.pending
            pacer.cancel()
            self._pass_on(pending)

    def eof_received(self) -> bool:
        self._flush_held()
        self.eof = True
        self.record.half_closed = True  # from now on the half_close limit applies too
        peer = self.peer
        assert peer is not None and peer.transport is not None
        if peer.eof or peer.lost:
            self.close()
        elif peer.transport.can_write_eof():
            peer.transport.write_eof()
        else:
            peer.transport.close()
        # Keep our own write direction open (a half-close); TLS transports cannot do that.
        return self._half_close

    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.lost:
            peer.backed_up = True
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.lost:
            peer.backed_up = False
            if not peer.held:
                peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._flush_held()
        self.lost = True
        if exc is not None:
            side = "client" if self.inbound else "backend"
            self.record.fail("error", f"{side}: {exc}")
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.lost:
            peer.transport.close()  # flushes what is already buffered for the peer
        if peer is None or peer.lost or peer.transport is None:
            self._done()

    def close(self) -> None:
        """Close both sides, flushing what is buffered."""
        for side in (self, self.peer):
            if side is not None and side.transport is not None and not side.lost:
                side.transport.close()

    def abort(self) -> None:
        """Close both sides at once, dropping what is buffered."""
        for side in (self, self.peer):
            if side is not None and side.transport is not None and not side.lost:
                side.transport.abort()
