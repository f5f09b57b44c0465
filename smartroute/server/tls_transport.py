"""TLS termination on a plain transport through an ``ssl.SSLObject`` between memory BIOs.

Routes that verify client certificates (``client_ca``) are terminated here rather than by the
loop's TLS layer. ``loop.start_tls`` (asyncio's and uvloop's alike) closes the connection when
a handshake fails without sending what OpenSSL queued, so a refused client certificate would
look like a silent close; here the alert that says why (``certificate_required``,
``unknown_ca``, ...) goes out first, then the connection closes within a bound.

The TLS work is :class:`~smartroute.server.http.lane_tls.LaneTls`'s, the same sans-I/O core the
fast lane drives from its socket events; :class:`TlsTransport` drives it from the plain
transport's callbacks and offers the decrypted stream to the action as an ordinary transport
(flow control both ways, ``pause_reading``, ``close`` with ``close_notify``). Like asyncio's
TLS transport it has no half-close of its own (``can_write_eof`` is False), and the peer's
end of the stream closes the connection unless the protocol's ``eof_received`` keeps it open.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, cast

from smartroute.errors import TlsHandshakeError
from smartroute.protocols.tls import ClientHello
from smartroute.server.http.lane_tls import LaneTls
from smartroute.server.tls_accept import SHUTDOWN_TIMEOUT, AppProtocol, deliver, handshake_reason

__all__ = ["TlsTransport", "accept_tls_in_memory"]


async def accept_tls_in_memory(
    transport: asyncio.Transport,
    app_protocol: AppProtocol,
    context: ssl.SSLContext,
    hello: ClientHello,
    initial: bytes,
    *,
    handshake_timeout: float,
    shutdown_timeout: float = SHUTDOWN_TIMEOUT,
) -> TlsTransport:
    """Run the server side of a TLS handshake whose first bytes (``initial``, the ClientHello
    ``hello`` and anything after it) were already read, as
    :func:`~smartroute.server.tls_accept.accept_tls` does, but with the TLS layer of this
    module: a failed handshake's alert reaches the client before the connection closes.

    On success ``app_protocol.connection_made`` has been called with the returned transport.
    On failure :class:`TlsHandshakeError` is raised; the connection is closed (after the
    alert, if TLS had one to send).
    """
    if transport.is_closing():
        raise TlsHandshakeError("connection closed before the TLS handshake")
    transport.pause_reading()  # nothing may reach the old protocol
    secure = TlsTransport(transport, LaneTls(context, hello), shutdown_timeout)
    transport.set_protocol(secure.wire)
    secure.wire.data_received(initial)
    if not transport.is_closing():
        transport.resume_reading()
    try:
        async with asyncio.timeout(handshake_timeout):
            await secure.handshake
    except TimeoutError:
        transport.abort()
        raise TlsHandshakeError(f"TLS handshake timed out after {handshake_timeout:g}s") from None
    except asyncio.CancelledError:
        transport.abort()
        raise
    except OSError as exc:  # ssl.SSLError included
        raise TlsHandshakeError(handshake_reason(exc, handshake_timeout)) from None
    secure.hand_over(app_protocol)
    return secure


class _Wire(asyncio.Protocol):
    """The plain transport's protocol: every callback goes to the :class:`TlsTransport`."""

    __slots__ = ("owner",)

    def __init__(self, owner: TlsTransport) -> None:
        self.owner = owner

    def data_received(self, data: bytes) -> None:
        self.owner._received(data)

    def eof_received(self) -> bool:
        self.owner._received(b"")
        return True  # the TLS layer closes the connection itself, after what it has to send

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._lost(exc)

    def pause_writing(self) -> None:
        self.owner._writing(paused=True)

    def resume_writing(self) -> None:
        self.owner._writing(paused=False)


class TlsTransport(asyncio.Transport):
    """The decrypted side of a TLS connection carried by a plain transport (see the module)."""

    def __init__(self, raw: asyncio.Transport, tls: LaneTls, shutdown_timeout: float) -> None:
        super().__init__()
        self.raw = raw
        self.tls = tls
        self.wire = _Wire(self)
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._protocol: AppProtocol | None = None  # set by hand_over
        self._shutdown_timeout = shutdown_timeout
        self._held = bytearray()  # plaintext not delivered yet (before hand_over, or paused)
        self._ended = False  # the peer ended its side; not told to the protocol yet
        self._paused = False  # the protocol paused reading
        self._writing_paused = False  # the plain transport's buffer is over its high mark
        self._closing = False
        self._gone: tuple[Exception | None] | None = None  # the connection was lost (why)
        self._error: Exception | None = None  # what broke the TLS stream, for connection_lost
        self._timer: asyncio.TimerHandle | None = None  # bounds a close

    # -- from the plain transport -----------------------------------------------------------

    def _received(self, data: bytes) -> None:
        """Ciphertext (empty: the peer's end) in: handshake, plaintext, the peer's end."""
        tls = self.tls
        ready = tls.ready
        try:
            plain, ended = tls.feed(data)
        except ssl.SSLError as exc:
            # A failed handshake or a broken record: its alert goes out, then the connection.
            self._send(tls.pending())
            self._error = exc
            if not self.handshake.done():
                self.handshake.set_exception(exc)
            self._close_raw()
            return
        self._send(tls.pending())
        if not ready and tls.ready and not self.handshake.done():
            self.handshake.set_result(None)
        if plain:
            if self._protocol is None or self._paused or self._held:
                self._held += plain
            else:
                deliver(self._protocol, plain)
        if ended:
            self._ended = True
            if self._protocol is not None and not self._paused and not self._held:
                self._end(self._protocol)

    def _lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._closing = True
        why = exc or self._error
        if not self.handshake.done():
            self.handshake.set_exception(why or ConnectionResetError("connection closed"))
            return
        if self._protocol is None:
            self._gone = (why,)  # told at hand_over
            return
        self._protocol.connection_lost(why)

    def _writing(self, *, paused: bool) -> None:
        self._writing_paused = paused
        protocol = self._protocol
        if protocol is not None:
            if paused:
                protocol.pause_writing()
            else:
                protocol.resume_writing()

    # -- towards the protocol ----------------------------------------------------------------

    def hand_over(self, protocol: AppProtocol) -> None:
        """Make ``protocol`` the receiver (``connection_made``), then give it what arrived
        since the handshake ended."""
        self._protocol = protocol
        protocol.connection_made(self)
        if self._writing_paused:
            protocol.pause_writing()
        self._flush()
        if self._gone is not None and self._protocol is protocol:
            protocol.connection_lost(self._gone[0])

    def _flush(self) -> None:
        """Deliver held plaintext, then the peer's end, while the protocol reads."""
        protocol = self._protocol
        if protocol is None:
            return
        if self._held and not self._paused:
            held = bytes(self._held)
            self._held.clear()
            deliver(protocol, held)
        if self._ended and not self._held and not self._paused:
            self._end(protocol)

    def _end(self, protocol: AppProtocol) -> None:
        self._ended = False
        if not protocol.eof_received():
            self.close()

    # -- the transport's methods -------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        obj = self.tls.obj
        if name == "ssl_object":
            return obj
        if name == "sslcontext":
            return obj.context
        if name == "peercert":
            return obj.getpeercert() if self.tls.ready else default
        if name == "cipher":
            return obj.cipher()
        if name == "compression":
            return obj.compression()
        return self.raw.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = cast(AppProtocol, protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing or self.raw.is_closing()

    def is_reading(self) -> bool:
        return not self._paused and not self._closing

    def pause_reading(self) -> None:
        self._paused = True
        if not self.raw.is_closing():
            self.raw.pause_reading()

    def resume_reading(self) -> None:
        self._paused = False
        self._flush()
        if not self._paused and not self.raw.is_closing():
            self.raw.resume_reading()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data or self._closing:
            return  # as asyncio's TLS transport: nothing goes out once closing
        try:
            sealed = self.tls.seal(bytes(data))
        except ssl.SSLError as exc:
            self._error = exc
            self.abort()
            return
        self._send(sealed)

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close")

    def get_write_buffer_size(self) -> int:
        return self.raw.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.raw.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.raw.set_write_buffer_limits(high, low)

    def close(self) -> None:
        """End the TLS session in order (``close_notify``), then the connection, once what
        is buffered went out or ``shutdown_timeout`` passed."""
        if self._closing:
            return
        if self.tls.ready:
            self._send(self.tls.close_notify())
        self._close_raw()

    def abort(self) -> None:
        self._closing = True
        self.raw.abort()

    # -- helpers -----------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if data and not self.raw.is_closing():
            self.raw.write(data)

    def _close_raw(self) -> None:
        """Close the plain transport after its buffer (an alert, a close_notify), bounded."""
        self._closing = True
        raw = self.raw
        if raw.is_closing():
            return
        raw.close()
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._shutdown_timeout, raw.abort)
