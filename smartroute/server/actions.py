"""Acting on a routed connection: raw forward, socket handler, HTTP session, TLS termination.

The pipeline decides *which* route; these functions take the client transport over and run
the route's action on it. The HTTP session calls the same functions when a request hands its
connection to a raw pipe or a socket handler.

On a proxy that accepts PROXY protocol headers, a connection routed before its first bytes
were seen gets a :class:`FirstBytesGuard` in front of the action's protocol: only a trusted
load balancer may say who the client is, so a header from anyone else must not reach a target.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from dataclasses import replace
from typing import TYPE_CHECKING, cast

from smartroute.context import RouteContext
from smartroute.errors import TargetError, TlsHandshakeError
from smartroute.protocols.detect import detect
from smartroute.protocols.proxy_protocol import looks_like_proxy_protocol
from smartroute.protocols.tls import ClientHello
from smartroute.routing.model import (
    CompiledRoute,
    ForwardAction,
    SocketHandlerAction,
    speaks_http,
)
from smartroute.routing.patterns import client_address, normalize_host
from smartroute.server.backends.group import Member
from smartroute.server.client_certs import peer_certificate
from smartroute.server.decision import FirstRequest, Heard, TlsInfo
from smartroute.server.forward import Tries, connect_relay, resolve_targets, splice
from smartroute.server.handler import start_handler
from smartroute.server.http.session import HttpSession
from smartroute.server.http.stream import Stream
from smartroute.server.stats import ConnectionRecord
from smartroute.server.tls import accept_tls
from smartroute.server.tls_transport import accept_tls_in_memory

if TYPE_CHECKING:
    from smartroute.server.runtime import Runtime

log = logging.getLogger("smartroute")

HTTP_ALPN = ("http/1.1",)
UNTRUSTED_HEADER = "PROXY header from a client: only a proxy in proxy_ips may send one, first"


class FirstBytesGuard(asyncio.Protocol):
    """Stands before an action's protocol until the client's first bytes are known not to
    start a PROXY protocol header; then steps aside, so later bytes cost nothing.

    A header closes the connection (outcome ``untrusted-proxy-header``) before any of it is
    passed on. Bytes that may still become one (at most 11: the signatures are 6 and 12 bytes
    long) are held until the next read or the client's EOF decides.
    """

    __slots__ = ("transport", "inner", "record", "held")

    def __init__(
        self,
        transport: asyncio.Transport,
        inner: asyncio.Protocol,
        record: ConnectionRecord,
        held: bytes,
    ) -> None:
        self.transport = transport
        self.inner = inner
        self.record = record
        self.held = held  # already counted as bytes in

    def data_received(self, data: bytes) -> None:
        self.record.bytes_in += len(data)
        held = self.held + data
        verdict = looks_like_proxy_protocol(held)
        if verdict is None:
            self.held = held
        elif verdict:
            self.held = b""
            self.record.fail("untrusted-proxy-header", UNTRUSTED_HEADER)
            self.record.closer()  # ends the action too (the relay's backend, a handler's task)
        else:
            self._step_aside(held)

    def eof_received(self) -> bool | None:
        self._step_aside(self.held)  # a beginning that ended there: the client's own bytes
        return self.inner.eof_received()

    def _step_aside(self, held: bytes) -> None:
        self.transport.set_protocol(self.inner)
        if held:
            self.record.bytes_in -= len(held)  # the action's protocol counts them again
            self.inner.data_received(held)

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class Connection:
    """A routed client connection and what the actions need to take it over."""

    # Its ``finish`` stays referenced by a relay for the connection's whole life.
    __slots__ = (
        "runtime", "transport", "record", "port", "server_ip", "unchecked", "target", "heard",
    )  # fmt: skip

    def __init__(
        self,
        runtime: Runtime,
        transport: asyncio.Transport,
        record: ConnectionRecord,
        *,
        port: int,
        server_ip: str,
        unchecked: bytes | None = None,
        target: tuple[str, int] | None = None,
        heard: Heard | None = None,
    ) -> None:
        self.runtime = runtime
        self.transport = transport
        self.record = record
        self.port = port
        self.server_ip = server_ip
        # The client's first bytes, held back from the action until they show they are not a
        # PROXY header (possibly none yet); None when there is nothing to check.
        self.unchecked = unchecked
        self.target = target  # where an on_connect hook sent the connection, if it did
        self.heard = heard  # what on_connect hooks said of it so far (HTTP: per route)

    def finish(self) -> None:
        self.runtime.stats.finished(self.record)

    def _guard(self, transport: asyncio.Transport) -> None:
        """Put a :class:`FirstBytesGuard` before the protocol an action just gave
        ``transport``, if the first bytes are unchecked. Actions call this once their protocol
        is in place and before the loop runs again, so no byte reaches them unchecked."""
        if self.unchecked is not None:
            inner = cast(asyncio.Protocol, transport.get_protocol())
            transport.set_protocol(FirstBytesGuard(transport, inner, self.record, self.unchecked))
            self.unchecked = None

    # -- raw pipe and socket handler -------------------------------------------------------

    async def forward_raw(
        self,
        action: ForwardAction,
        route: CompiledRoute,
        ctx: RouteContext,
        initial: bytes,
        eof: bool,
        transport: asyncio.Transport | None = None,
    ) -> None:
        """Pipe the connection to the action's targets, ``initial`` bytes first."""
        transport = transport or self.transport
        record = self.record
        group = self.runtime.backends.group(route, ctx.port)
        members: tuple[Member, ...]
        if self.target is not None:
            members = (Member(*self.target),)
        elif group is not None:
            members = group.order(record.client_ip)
        else:
            try:
                members = await resolve_targets(action, ctx)
            except Exception as exc:  # a user callable must not take the proxy down
                record.fail("target-error", f"{type(exc).__name__}: {exc}")
                if not isinstance(exc, TargetError):
                    log.error("target callable of route %r raised", ctx.route_name, exc_info=exc)
                transport.close()
                return
        reencrypt = route.tls if route.tls and route.tls.mode == "terminate-and-reencrypt" else None
        client_side = await connect_relay(
            transport,
            record,
            Tries(members, action, record.timeouts.connect),
            record.timeouts.connect,
            self.finish,
            ctx,
            reencrypt=reencrypt,
        )
        if client_side is None:
            log.warning("route %r: %s; closing %s", ctx.route_name, record.error, record.id)
            transport.close()
            return
        if transport.is_closing():
            client_side.close()
            return
        splice(transport, client_side, initial, eof)
        self._guard(transport)

    def run_handler(
        self,
        action: SocketHandlerAction,
        ctx: RouteContext,
        initial: bytes,
        eof: bool,
        transport: asyncio.Transport | None = None,
    ) -> None:
        transport = transport or self.transport
        coro = start_handler(action.handler, transport, initial, eof, ctx, self.record, self.finish)
        self._guard(transport)
        self.runtime.spawn(coro)

    # -- HTTP ------------------------------------------------------------------------------

    def run_http(
        self,
        stream: Stream,
        tls: TlsInfo | None,
        transport: asyncio.Transport | None = None,
        first: FirstRequest | None = None,
    ) -> None:
        """Serve HTTP requests on ``stream`` (already the transport's protocol) until it closes;
        ``first``: its first request, already parsed and routed."""
        transport = transport or self.transport
        session = HttpSession(
            self.runtime,
            stream,
            self.record,
            port=self.port,
            server_ip=self.server_ip,
            tls=tls,
            first=first,
            heard=self.heard,
        )
        session.connection = self
        task = self.runtime.spawn(session.run())

        def close() -> None:
            transport.abort()
            task.cancel()

        self.record.closer = close

    def http_stream(self, initial: bytes, eof: bool) -> Stream:
        """Move the plain transport onto a fresh HTTP stream holding ``initial``."""
        stream = Stream(self.record, on_lost=self.finish)
        self.transport.set_protocol(stream)
        stream.connection_made(self.transport)
        stream.buffer += initial
        stream.eof = eof
        self._guard(self.transport)
        self.transport.resume_reading()
        return stream

    # -- TLS termination -------------------------------------------------------------------

    async def terminate(
        self, route: CompiledRoute, ctx: RouteContext, hello: ClientHello, initial: bytes
    ) -> None:
        """Complete the TLS handshake with the certificate for the SNI, then run the action.

        A route with ``client_ca`` is terminated by :mod:`~smartroute.server.tls_transport`,
        which sends the alert of a refused client certificate before it closes (the loop's TLS
        layer would close silently); the verified certificate reaches the action as
        ``ctx.client_cert``."""
        runtime, record, action = self.runtime, self.record, route.action
        tls = route.tls
        assert tls is not None
        pair = runtime.certificates.select(hello.sni, tls.certificate)
        if pair is None and tls.certificate == "on-demand" and runtime.on_demand and hello.sni:
            pair = await runtime.on_demand(normalize_host(hello.sni))
        if pair is None:
            record.fail(
                "no-certificate", f"no certificate for {hello.sni or 'a client without SNI'}"
            )
            log.warning("route %r: %s; closing %s", route.name, record.error, record.id)
            self.transport.close()
            return
        alpn = HTTP_ALPN if speaks_http(action) else ()
        try:
            context = runtime.certificates.server_context(
                pair, alpn=alpn, client_ca=tls.client_ca, client_auth=tls.client_auth
            )
        except Exception as exc:
            record.fail("certificate-error", str(exc))
            log.error("route %r: %s", route.name, exc)
            self.transport.close()
            return
        stream = Stream(record, on_lost=self.finish)
        wait = record.timeouts.initial_data
        try:
            if tls.client_ca is not None:
                secure: asyncio.Transport = await accept_tls_in_memory(
                    self.transport, stream, context, hello, initial, handshake_timeout=wait
                )
            else:
                secure = await accept_tls(
                    self.transport, stream, context, initial, handshake_timeout=wait
                )
        except TlsHandshakeError as exc:
            record.fail("tls-handshake", str(exc))
            self.finish()
            return
        ssl_object = secure.get_extra_info("ssl_object")
        version = client_cert = None
        if isinstance(ssl_object, ssl.SSLObject):
            version = ssl_object.version()
            client_cert = peer_certificate(ssl_object)
        info = TlsInfo(
            sni=hello.sni,
            version=version,
            alpn=hello.alpn,
            terminated=True,
            client_cert=client_cert,
            client_ca=tls.client_ca,
        )
        ctx = replace(ctx, tls_version=version or ctx.tls_version, client_cert=client_cert)
        if record.context is not None:  # on_disconnect hooks see the certificate too
            record.context = replace(record.context, client_cert=client_cert)
        if isinstance(action, SocketHandlerAction):
            self.run_handler(action, ctx, stream.detach(), stream.eof, secure)
            return
        if isinstance(action, ForwardAction) and action.protocol != "http":
            if action.protocol == "tcp" or not await self._http_follows(stream):
                secure.pause_reading()
                await self.forward_raw(action, route, ctx, stream.detach(), stream.eof, secure)
                return
        self.run_http(stream, info, secure)

    async def answer_alpn_challenge(self, context: ssl.SSLContext, initial: bytes) -> None:
        """Complete the handshake with the validation certificate; the CA then closes."""
        stream = Stream(self.record, on_lost=self.finish)
        try:
            secure = await accept_tls(
                self.transport,
                stream,
                context,
                initial,
                handshake_timeout=self.record.timeouts.initial_data,
            )
        except TlsHandshakeError as exc:
            self.record.fail("tls-handshake", str(exc))
            self.finish()
            return
        self.record.outcome = "acme-challenge"
        secure.close()

    async def _http_follows(self, stream: Stream) -> bool:
        """Peek at the decrypted bytes: True when they are an HTTP/1.x request."""
        try:
            async with asyncio.timeout(self.record.timeouts.initial_data):
                while True:
                    found = detect(stream.buffer)
                    if found is not None:
                        return found.kind == "http"
                    if not await stream.fill():
                        return False
        except TimeoutError:
            return False


def serve_http(
    runtime: Runtime,
    sock: socket.socket,
    record: ConnectionRecord,
    initial: bytes,
    eof: bool,
    first: FirstRequest | None,
) -> None:
    """Serve a plain HTTP connection the fast lane gives up (at a request boundary) on a
    transport: ``initial`` are the bytes it read and did not answer (``first``'s head begins
    them), ``eof`` whether the client had ended its side."""
    record.closer = sock.close  # until the transport exists
    runtime.spawn(_serve_http(runtime, sock, record, initial, eof, first))


async def _serve_http(
    runtime: Runtime,
    sock: socket.socket,
    record: ConnectionRecord,
    initial: bytes,
    eof: bool,
    first: FirstRequest | None,
) -> None:
    stream = Stream(record, on_lost=lambda: runtime.stats.finished(record))
    stream.buffer += initial
    stream.eof = eof
    if sock.fileno() < 0:  # closed meanwhile (the proxy is stopping)
        runtime.stats.finished(record)
        return
    try:
        server_ip = client_address(sock.getsockname()[0])[1]
        transport, _ = await asyncio.get_running_loop().connect_accepted_socket(
            lambda: stream, sock
        )
    except OSError as exc:  # the client left meanwhile
        record.fail("error", f"client: {exc}")
        sock.close()
        runtime.stats.finished(record)
        return
    connection = Connection(runtime, transport, record, port=record.port, server_ip=server_ip)
    connection.run_http(stream, None, first=first)
