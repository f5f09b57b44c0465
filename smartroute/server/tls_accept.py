"""TLS handshakes on asyncio transports whose first bytes were already read.

The proxy reads the ClientHello before it decides to terminate (it routes by SNI), so those
bytes are no longer on the socket. :func:`accept_tls` still uses the public
``loop.start_tls``, on asyncio's loop and on uvloop alike, and hands the consumed bytes to the
TLS protocol that ``start_tls`` installs before the socket is read again. (Routes that verify
client certificates use :mod:`smartroute.server.tls_transport` instead: ``start_tls`` drops
the alert of a failed handshake.)
"""

from __future__ import annotations

import asyncio
import ssl
from typing import cast

from smartroute.errors import TlsHandshakeError

SHUTDOWN_TIMEOUT = 10.0
"""Seconds a closing TLS connection waits for the peer's close_notify before it is dropped."""

AppProtocol = asyncio.Protocol | asyncio.BufferedProtocol


async def accept_tls(
    transport: asyncio.Transport,
    app_protocol: AppProtocol,
    context: ssl.SSLContext,
    initial: bytes,
    *,
    handshake_timeout: float,
    shutdown_timeout: float = SHUTDOWN_TIMEOUT,
) -> asyncio.Transport:
    """Run the server side of a TLS handshake whose first bytes were already read.

    ``transport`` must be paused (no byte may reach its current protocol any more). ``initial``
    (the ClientHello and anything after it) is replayed into the TLS layer, then the socket is
    read again. On success ``app_protocol.connection_made`` has been called with the returned
    transport, and decrypted data may follow at once. On failure the connection is closed and
    :class:`TlsHandshakeError` raised.

    How the replay works, the same on asyncio's loop and on uvloop: ``loop.start_tls`` sets its
    TLS protocol on the transport *before* its first ``await`` and only then queues (with
    ``call_soon``) the handshake start and ``resume_reading``. A callback queued before calling
    it therefore runs after the protocol is installed and before the socket is polled again,
    and gives that protocol the consumed bytes as if it had just read them.
    """
    loop = asyncio.get_running_loop()
    if transport.is_closing():
        raise TlsHandshakeError("connection closed before the TLS handshake")
    transport.pause_reading()  # the caller should have; nothing may reach the old protocol
    handover = Handover()
    loop.call_soon(_replay, transport, transport.get_protocol(), initial)
    try:
        secure = await loop.start_tls(
            transport,
            handover,
            context,
            server_side=True,
            ssl_handshake_timeout=handshake_timeout,
            ssl_shutdown_timeout=shutdown_timeout,
        )
    except asyncio.CancelledError:
        transport.abort()
        raise
    except Exception as exc:
        transport.abort()  # usually closed by the TLS layer already; abort is idempotent
        raise TlsHandshakeError(handshake_reason(exc, handshake_timeout)) from None
    if secure is None or secure.get_extra_info("ssl_object") is None:
        # connection_lost(None) during the handshake wakes start_tls without an error (and
        # asyncio's then returns None).
        transport.abort()
        raise TlsHandshakeError("connection closed during the TLS handshake")
    secure.set_protocol(app_protocol)
    app_protocol.connection_made(secure)
    handover.hand_over(app_protocol)
    return secure


def _replay(transport: asyncio.Transport, peeking: asyncio.BaseProtocol, data: bytes) -> None:
    """Give ``data`` to the TLS protocol ``start_tls`` has just set on ``transport``."""
    if transport.is_closing():
        return  # start_tls failed or was cancelled; it has closed the transport
    protocol = transport.get_protocol()
    if protocol is peeking:
        # start_tls did not install its protocol synchronously (no asyncio or uvloop version
        # does this): the bytes have nowhere to go, so the handshake cannot succeed.
        transport.abort()
        return
    deliver(protocol, data)


class Handover(asyncio.Protocol):
    """The protocol given to ``start_tls``: keeps what arrives until the handover.

    ``start_tls`` never calls ``connection_made`` on its protocol, and asyncio's TLS layer
    passes the first decrypted bytes (and EOF, or the connection's loss) to it as soon as the
    handshake completes, before :func:`accept_tls` runs again. They wait here; ``hand_over``
    then passes them on, after ``connection_made``, in their order. Anything that still reaches
    this object after the handover (a ``connection_lost`` queued before it) is passed on.
    """

    def __init__(self) -> None:
        self._target: AppProtocol | None = None
        self._chunks: list[bytes] = []
        self._eof = False
        self._lost: tuple[Exception | None] | None = None

    def data_received(self, data: bytes) -> None:
        if self._target is not None:
            deliver(self._target, data)
        else:
            self._chunks.append(data)

    def eof_received(self) -> bool | None:
        if self._target is not None:
            return self._target.eof_received()
        self._eof = True
        return None  # TLS closes after close_notify whatever the protocol answers

    def connection_lost(self, exc: Exception | None) -> None:
        if self._target is not None:
            self._target.connection_lost(exc)
        else:
            self._lost = (exc,)

    def hand_over(self, protocol: AppProtocol) -> None:
        """Make ``protocol`` the receiver and give it what arrived so far."""
        self._target = protocol
        chunks, self._chunks = self._chunks, []
        for chunk in chunks:
            deliver(protocol, chunk)
        if self._eof:
            protocol.eof_received()
        if self._lost is not None:
            protocol.connection_lost(self._lost[0])


def deliver(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Deliver ``data`` to ``protocol`` as a transport that had just read it would."""
    if isinstance(protocol, asyncio.Protocol):
        if data:
            protocol.data_received(data)
        return
    # A buffered protocol: asyncio's own, or uvloop's TLS protocol, which has the same methods
    # without being an asyncio class (the loops themselves recognise it by its methods).
    buffered = cast(asyncio.BufferedProtocol, protocol)
    view = memoryview(data)
    while view:
        buffer = memoryview(buffered.get_buffer(len(view)))
        size = min(len(buffer), len(view))
        if not size:
            raise RuntimeError(f"{protocol!r} offered an empty buffer")
        buffer[:size] = view[:size]
        buffered.buffer_updated(size)
        view = view[size:]


def handshake_reason(exc: BaseException, timeout: float) -> str:
    """Why a TLS handshake failed, for the connection's record (no key material)."""
    if isinstance(exc, ssl.SSLEOFError):
        return "connection closed during the TLS handshake"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {tls_reason(exc)}"
    if isinstance(exc, ConnectionAbortedError):  # SSLProtocol's handshake timer
        return f"TLS handshake timed out after {timeout:g}s"
    if isinstance(exc, OSError):
        return "connection closed during the TLS handshake"
    return f"TLS handshake failed: {type(exc).__name__}"


def tls_reason(exc: BaseException) -> str:
    """A short reason that cannot carry key material (OpenSSL's reason code, or the type)."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__
