"""TLS termination on the fast lane: an ``ssl.SSLObject`` between two memory BIOs.

A lane session on a terminated connection reads ciphertext from its socket, feeds it to
:class:`LaneTls` and gets the plaintext (and whether the client ended its side); what it sends
is sealed into ciphertext here. Nothing here touches a socket: the handshake, records, alerts
and ``close_notify`` all go through :meth:`LaneTls.pending`, which the session sends with the
rest, so a failed handshake's alert reaches the client before the connection closes.

The certificate was chosen from the ClientHello the accept step peeked at
(:func:`lane_context`), so the context needs no SNI callback; renegotiation is refused by the
context (``OP_NO_RENEGOTIATION``), and TLS 1.3 has none. A route with ``client_ca`` gets a
context that asks for client certificates exactly as the transport path's does, so a refused
certificate's alert (``certificate_required``, ``unknown_ca``) goes out with the rest, and
the verified certificate is the session's ``client_cert`` (:meth:`LaneTls.info`).
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from smartroute.protocols.tls import ClientHello
from smartroute.routing.model import CompiledRoute
from smartroute.server.client_certs import peer_certificate
from smartroute.server.decision import TlsInfo
from smartroute.server.tls_records import decrypt

if TYPE_CHECKING:
    from smartroute.server.runtime import Runtime

HTTP_ALPN = ("http/1.1",)


def lane_context(
    runtime: Runtime, route: CompiledRoute, hello: ClientHello
) -> ssl.SSLContext | None:
    """The server context presenting the certificate for ``hello``'s SNI on ``route`` (and
    verifying client certificates as the route says), or None when there is none or it cannot
    be loaded (the transport path then says why)."""
    tls = route.tls
    assert tls is not None
    # None for an on-demand name without one yet: obtaining it is the transport path's job.
    pair = runtime.certificates.select(hello.sni, tls.certificate)
    if pair is None:
        return None
    try:
        return runtime.certificates.server_context(
            pair, alpn=HTTP_ALPN, client_ca=tls.client_ca, client_auth=tls.client_auth
        )
    except Exception:  # noqa: BLE001 - reported by the transport path, which tries again
        return None


class LaneTls:
    """One terminated connection's TLS state."""

    __slots__ = ("obj", "incoming", "outgoing", "ready", "hello", "client_ca")

    def __init__(
        self, context: ssl.SSLContext, hello: ClientHello, client_ca: str | None = None
    ) -> None:
        """``client_ca``: the CA ``context`` checks client certificates against, if any."""
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.ready = False  # the handshake is complete
        self.hello = hello
        self.client_ca = client_ca

    def feed(self, data: bytes | memoryview) -> tuple[bytes, bool]:
        """Ciphertext from the client (empty: its end of the connection) in; the plaintext it
        completes and whether the client ended its side out. Raises ``ssl.SSLError`` for a
        failed handshake or a broken record (then :meth:`pending` holds the alert)."""
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()
        obj = self.obj
        if not self.ready:
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                return b"", False
            self.ready = True
        return decrypt(obj, self.incoming)

    def seal(self, data: bytes) -> bytes:
        """The ciphertext carrying ``data`` (and whatever else TLS had to send)."""
        self.obj.write(data)
        return self.outgoing.read()

    def pending(self) -> bytes:
        """Ciphertext TLS produced on its own (handshake, tickets, an alert)."""
        return self.outgoing.read()

    def close_notify(self) -> bytes:
        """The ``close_notify`` alert that ends the connection in order."""
        try:
            self.obj.unwrap()
        except (ssl.SSLError, ValueError):
            pass  # the peer's answer is not awaited
        return self.outgoing.read()

    def info(self) -> TlsInfo:
        """What the completed handshake settled (with the client's verified certificate)."""
        hello, obj = self.hello, self.obj
        return TlsInfo(
            sni=hello.sni,
            version=obj.version(),
            alpn=hello.alpn,
            terminated=True,
            client_cert=peer_certificate(obj),
            client_ca=self.client_ca,
        )
