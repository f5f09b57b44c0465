"""The HTTP ``forward`` action: one request to a backend and its response back.

Backend connections come from a small pool per target and go back to it when the exchange
ended cleanly; a pooled connection the backend closed meanwhile is replaced once, for
requests without a body. Bodies stream both ways with backpressure. ``Upgrade`` requests
(WebSocket) become a two-way byte tunnel after the backend's 101.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING

from smartroute.context import RouteContext
from smartroute.errors import HttpParseError
from smartroute.protocols.http import RequestHead
from smartroute.protocols.http_response import (
    BodyFraming,
    ResponseHead,
    parse_response_head,
    response_framing,
)
from smartroute.routing.matcher import RouteMatch
from smartroute.routing.model import ForwardAction
from smartroute.server.forward import resolve_targets, tunnel
from smartroute.server.http.body import BodyCut, copy_body
from smartroute.server.http.headers import connection_tokens, end_to_end, forwarding_headers
from smartroute.server.http.messages import render_head, text_response
from smartroute.server.http.pool import PoolKey
from smartroute.server.http.stream import Handover, Stream
from smartroute.server.tls import backend_context, backend_server_name

if TYPE_CHECKING:
    from smartroute.server.http.session import HttpSession

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
NO_BODY = BodyFraming("none")


class _Failed(Exception):
    """The exchange failed before the response head reached the client: answer ``status``."""

    def __init__(self, status: int, message: str, *, broken_request: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.body_consumed = broken_request
        # The client's own request was malformed mid-body: its connection cannot be reused.
        self.broken_request = broken_request


class _Stale(Exception):
    """A pooled connection turned out closed before it answered; the request can be resent."""


async def forward_request(
    session: HttpSession,
    head: RequestHead,
    framing: BodyFraming,
    keep_alive: bool,
    found: RouteMatch,
    ctx: RouteContext,
) -> tuple[int | str, bool]:
    """Proxy one request; returns the status for the log and whether the client stays."""
    action = found.route.action
    assert isinstance(action, ForwardAction)
    exchange = _Exchange(session, head, framing, keep_alive, found, action, ctx)
    try:
        try:
            return await exchange.run(reuse=True)
        except _Stale:
            return await exchange.run(reuse=False)
    except _Failed as failure:
        session.record.fail("backend-error", str(failure))
        response = text_response(failure.status, str(failure))
        left = NO_BODY if failure.body_consumed else framing
        keep = keep_alive and not failure.broken_request
        return await session.answer_locally(response, head, left, keep)


class _Exchange:
    """One request/response exchange with a backend."""

    def __init__(
        self,
        session: HttpSession,
        head: RequestHead,
        framing: BodyFraming,
        keep_alive: bool,
        found: RouteMatch,
        action: ForwardAction,
        ctx: RouteContext,
    ) -> None:
        self.session = session
        self.head = head
        self.framing = framing
        self.keep_alive = keep_alive
        self.found = found
        self.action = action
        self.ctx = ctx
        self.private = False  # True: the backend connection must not be pooled
        tokens = connection_tokens(head.headers)
        self.upgrade = head.header("upgrade") if "upgrade" in tokens else None

    async def connect(self, reuse: bool) -> tuple[Stream, PoolKey, bool]:
        """A backend connection (pooled if possible) to the first target that answers."""
        session = self.session
        try:
            candidates = await resolve_targets(self.action, self.ctx)
        except Exception as exc:  # a user callable must not take the proxy down
            raise _Failed(502, f"no usable target: {exc}") from None
        tls = self.found.route.tls
        pool = session.runtime.pool
        timeout = session.record.timeouts.connect
        failures = []
        for candidate in candidates:
            host, port = candidate.host, candidate.port
            header = candidate.proxy_header(self.ctx)
            context: ssl.SSLContext | None = None
            sni = None
            if tls is not None and tls.mode == "terminate-and-reencrypt":
                context = backend_context(tls, alpn=("http/1.1",))
                sni = backend_server_name(tls, self.ctx.domain, host)
            key = pool.key(host, port, context, sni)
            session.record.target = f"{host}:{port}"
            # A connection that announced one client by PROXY header serves that client only.
            if header and context is not None:
                failures.append(f"{host}:{port} send_proxy_protocol cannot precede re-encryption")
                continue
            pooled = reuse and self.upgrade is None and not header
            stream = pool.take(key) if pooled else None
            if stream is not None:
                return stream, key, True
            try:
                stream = await pool.connect(host, port, timeout=timeout, context=context, sni=sni)
            except TimeoutError:
                failures.append(f"{host}:{port} timed out")
            except (OSError, ssl.SSLError) as exc:
                failures.append(f"{host}:{port} {getattr(exc, 'strerror', None) or exc}")
            else:
                if header:
                    stream.write(header)
                    self.private = True
                return stream, key, False
        raise _Failed(502, "backend unreachable: " + "; ".join(failures))

    def request_head(self) -> bytes:
        head, framing, session = self.head, self.framing, self.session
        headers = end_to_end(head.headers, drop=frozenset({"expect", "content-length"}))
        headers = forwarding_headers(
            headers,
            client_ip=session.record.client_ip,
            proto="https" if session.tls is not None else "http",
            host=head.header("host"),
        )
        if framing.kind == "length":
            headers.append(("Content-Length", str(framing.length)))
        elif framing.kind == "chunked":
            headers.append(("Transfer-Encoding", "chunked"))
        if self.upgrade is not None:
            headers += [("Connection", "upgrade"), ("Upgrade", self.upgrade)]
        lines = [f"{head.method} {head.target} HTTP/1.1\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers]
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    async def run(self, *, reuse: bool) -> tuple[int | str, bool]:
        session, head, framing = self.session, self.head, self.framing
        client = session.client
        backend, key, reused = await self.connect(reuse)
        backend.serve(client)  # losing the client ends the exchange, whatever it waits for
        try:
            request_head = self.request_head()
            if framing.kind == "none":
                backend.write(request_head)
            else:
                if (head.header("expect") or "").lower() == "100-continue":
                    client.write(CONTINUE)
                try:
                    await copy_body(
                        client,
                        backend,
                        framing,
                        chunked_out=framing.kind == "chunked",
                        prefix=request_head,
                    )
                except BodyCut:
                    backend.abort()
                    raise
                except HttpParseError as exc:
                    # A malformed body (bad chunk size, ...): the backend never sees the
                    # request complete, and the client is told why before its connection ends.
                    backend.abort()
                    raise _Failed(exc.status, str(exc), broken_request=True) from None
            response = await self.response(backend, reused)
            if response.status == 101 and self.upgrade is not None:
                upgraded = response.header("upgrade") or self.upgrade
                headers = [*end_to_end(response.headers), ("Connection", "upgrade")]
                client.write(render_head(101, [*headers, ("Upgrade", upgraded)]))
                session.record.outcome = "upgraded"
                tunnel(client, backend, session.record, session.finish)
                raise Handover
            keep, backend_keep = await self.relay_response(backend, response)
        except Handover:
            raise
        except BaseException:
            backend.close()
            raise
        finally:
            backend.serve(None)
        if backend_keep and not self.private:
            session.runtime.pool.release(key, backend)
        else:
            backend.close()
        return response.status, keep

    async def response(self, backend: Stream, reused: bool) -> ResponseHead:
        """The backend's final response head; interim 1xx answers are passed on."""
        timeout = self.session.record.timeouts.backend
        while True:
            try:
                response = await _read_response(backend, timeout)
            except _Failed as failure:
                if reused and self.framing.kind == "none" and backend.eof and not backend.buffer:
                    raise _Stale from None
                failure.body_consumed = True
                raise
            if response.status >= 200 or response.status == 101:
                return response
            if self.head.version == "HTTP/1.1" and response.status != 100:
                self.session.client.write(
                    render_head(response.status, end_to_end(response.headers))
                )

    async def relay_response(self, backend: Stream, response: ResponseHead) -> tuple[bool, bool]:
        """Send the response to the client; returns (client stays, backend reusable)."""
        head, client = self.head, self.session.client
        out = response_framing(head.method, response)
        backend_keep = (
            out.kind != "close"
            and response.version == "HTTP/1.1"
            and "close" not in connection_tokens(response.headers)
        )
        rechunk = out.kind == "chunked" or (out.kind == "close" and head.version == "HTTP/1.1")
        client_keep = self.keep_alive and (out.kind != "close" or rechunk)
        # A body-less answer (HEAD, 304) keeps the Content-Length the backend stated.
        drop = frozenset() if out.kind == "none" else frozenset({"content-length"})
        headers = end_to_end(response.headers, drop=drop)
        if out.kind == "length":
            headers.append(("Content-Length", str(out.length)))
        elif rechunk and head.method != "HEAD":
            headers.append(("Transfer-Encoding", "chunked"))
        headers.append(("Connection", "keep-alive" if client_keep else "close"))
        # The head goes out with the body bytes already here: one send for a small answer.
        await copy_body(
            backend, client, out, chunked_out=rechunk, prefix=render_head(response.status, headers)
        )
        if client.blocked:
            await client.drain()
        return client_keep, backend_keep


async def _read_response(backend: Stream, timeout: float) -> ResponseHead:
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        while True:
            response = parse_response_head(backend.buffer) if backend.buffer else None
            if response is not None:
                backend.skip(response.length)
                return response
            if not await backend.fill(deadline):
                raise _Failed(502, "the backend closed the connection without answering")
    except TimeoutError:
        raise _Failed(504, f"the backend did not answer within {timeout:g}s") from None
    except HttpParseError as exc:
        raise _Failed(502, f"the backend sent an invalid response: {exc}") from None
