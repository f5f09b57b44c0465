"""The HTTP ``forward`` action: one request to a backend and its response back.

Backend connections come from a pool per target and go back to it when the exchange ended
cleanly; a pooled connection the backend closed meanwhile is replaced once, for idempotent
requests without a body (and others the route's ``retry`` allows); with a ``retry`` policy a
request the backend dropped unanswered goes on to another target. Bodies stream both ways
with backpressure. ``Upgrade`` requests (WebSocket) become a two-way byte tunnel after the
backend's 101; a connection whose protocol changed is never pooled, and a 101 nobody asked
for is a 502. ``CONNECT`` is refused (405): this is a reverse proxy, not a tunnel to anywhere.
A response whose framing is broken or ambiguous gets 502 while nothing of it has reached the
client yet.

This runs once per proxied request, so it keeps to one pass over each message's headers, one
write per head (with the body bytes already there) and no work for what a request does not
use: the :class:`RouteContext` is only built for target callables and PROXY headers.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING, Protocol

from smartroute.context import RouteContext
from smartroute.errors import BodyCut, CertificateLoadError, HttpParseError
from smartroute.protocols.http import IDEMPOTENT_METHODS, RequestHead
from smartroute.protocols.http_response import (
    BodyFraming,
    ResponseHead,
    parse_response_head,
)
from smartroute.routing.facts import ConnectionFacts, RouteMatch
from smartroute.routing.model import ForwardAction
from smartroute.server.backends.group import Member
from smartroute.server.backends.state import connect_reason
from smartroute.server.decision import TlsInfo
from smartroute.server.forward import Tries, resolve_targets, tunnel
from smartroute.server.hooks import HookFailed, consult_response
from smartroute.server.http.body import CHUNK, copy_body
from smartroute.server.http.headers import connection_tokens
from smartroute.server.http.messages import Response, text_response
from smartroute.server.http.pool import PoolKey
from smartroute.server.http.rewrite import (
    CONTINUE,
    ResponsePlan,
    backend_request_head,
    interim_head,
    plan_response,
    upgraded_head,
)
from smartroute.server.http.stream import Handover, Stream
from smartroute.server.tls import backend_context, backend_server_name

if TYPE_CHECKING:
    from smartroute.server.runtime import Runtime
    from smartroute.server.stats import ConnectionRecord

NO_BODY = BodyFraming("none")
CONNECT_REFUSED = text_response(
    405,
    "CONNECT is not supported: this is a reverse proxy",
    [("Allow", "GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH, TRACE")],
)


class Requester(Protocol):
    """What an exchange needs of the HTTP session whose request it forwards."""

    runtime: Runtime
    client: Stream
    record: ConnectionRecord
    port: int
    tls: TlsInfo | None
    loop: asyncio.AbstractEventLoop

    def context(self, head: RequestHead, facts: ConnectionFacts, found: RouteMatch) -> RouteContext:
        """The request's RouteContext (for target callables and PROXY headers)."""

    async def answer_locally(
        self, response: Response, head: RequestHead, framing: BodyFraming, keep_alive: bool
    ) -> tuple[int, bool]:
        """Answer the request without a backend; (status, whether the client stays)."""

    def finish(self) -> None:
        """Account for the connection once it is gone (after an upgrade)."""


class _Failed(Exception):
    """The exchange failed before the response head reached the client: answer ``status``.

    ``sent``: the request went to the backend whole (its body is no longer the client's to
    drop).
    """

    def __init__(
        self, status: int, message: str, *, broken_request: bool = False, sent: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body_consumed = broken_request or sent
        # The client's own request was malformed mid-body: its connection cannot be reused.
        self.broken_request = broken_request


class _Stale(Exception):
    """A pooled connection turned out closed before it answered; the request can be resent."""


class _Retry(Exception):
    """The member failed the request before answering, in a way another member may not:
    try the next one if the route's retry policy allows, else answer ``failure``."""

    def __init__(self, failure: _Failed) -> None:
        super().__init__(str(failure))
        self.failure = failure


REPLAY_LIMIT = 64 * 1024  # the largest request body held for a retry


async def forward_request(
    session: Requester,
    head: RequestHead,
    framing: BodyFraming,
    keep_alive: bool,
    found: RouteMatch,
    facts: ConnectionFacts,
    tokens: set[str],
    target: tuple[str, int] | None = None,
) -> tuple[int | str, bool]:
    """Proxy one request; returns the status for the log and whether the client stays.

    ``tokens`` are the request's ``Connection`` options; ``target``: where a hook sent the
    request (instead of the route's targets).
    """
    action = found.route.action
    assert isinstance(action, ForwardAction)
    if head.method == "CONNECT":
        session.record.fail("refused", "CONNECT is not served by a reverse proxy route")
        return await session.answer_locally(CONNECT_REFUSED, head, framing, False)
    exchange = _Exchange(session, head, framing, keep_alive, found, action, facts, tokens)
    if target is not None:
        exchange.tries = Tries((Member(*target),), action, session.record.timeouts.connect)
    try:
        reuse = True
        while True:
            try:
                return await exchange.run(reuse=reuse)
            except _Stale:
                reuse = False  # the same member, on a new connection
                exchange.again()
            except _Retry as retry:
                reuse = False
                if not exchange.again(retry.failure):
                    raise retry.failure from None
    except _Failed as failure:
        if exchange.replay is not None:
            failure.body_consumed = True  # held by the exchange: no longer the client's
        session.record.fail("backend-error", str(failure))
        response = text_response(failure.status, str(failure))
        left = NO_BODY if failure.body_consumed else framing
        keep = keep_alive and not failure.broken_request
        return await session.answer_locally(response, head, left, keep)


class _Exchange:
    """One request/response exchange with a backend."""

    def __init__(
        self,
        session: Requester,
        head: RequestHead,
        framing: BodyFraming,
        keep_alive: bool,
        found: RouteMatch,
        action: ForwardAction,
        facts: ConnectionFacts,
        tokens: set[str],
    ) -> None:
        self.session = session
        self.head = head
        self.framing = framing
        self.keep_alive = keep_alive
        self.found = found
        self.action = action
        self.facts = facts
        self.tokens = tokens
        self._ctx: RouteContext | None = None
        self.private = False  # True: the backend connection must not be pooled
        self.upgrade = head.header("upgrade") if "upgrade" in tokens else None
        self.tries: Tries | None = None  # made by the first connect
        self.member: Member | None = None  # the one the request is with (counted as active)
        # A request the backend dropped unanswered may go to another member when the route
        # retries and the method allows it; its body, if any, must be held whole (``replay``).
        retry = action.retry
        # Sent again at all (a pooled connection found closed, another target) only when
        # that cannot do twice what the client asked once.
        self.idempotent = head.method in IDEMPOTENT_METHODS or (
            retry is not None and retry.any_method
        )
        self.retryable = retry is not None and self.upgrade is None and self.idempotent
        self.replay: bytes | None = None
        if self.retryable and framing.kind != "none":
            buffered = session.client.buffer
            expects = (head.header("expect") or "").lower() == "100-continue"
            if framing.kind == "length" and not expects and len(buffered) >= framing.length:
                if framing.length <= REPLAY_LIMIT:
                    self.replay = session.client.consume(framing.length)
            if self.replay is None:
                self.retryable = False

    def again(self, failure: _Failed | None = None) -> bool:
        """After a failed try: whether to try once more. A stale pooled connection (no
        ``failure``) is replaced by a new one to the same member, not counted as a try."""
        tries = self.tries
        assert tries is not None
        if failure is None:
            tries.next -= 1
            tries.count -= 1
            return True
        return self.retryable

    def _hold(self, member: Member) -> None:
        self.member = member
        member.state.active += 1

    def _release(self) -> None:
        member = self.member
        if member is not None:
            self.member = None
            member.state.active -= 1

    def _member_failed(self, why: str) -> None:
        member, tries = self.member, self.tries
        if member is not None and tries is not None:
            tries.failed(member, why)

    @property
    def ctx(self) -> RouteContext:
        if self._ctx is None:
            self._ctx = self.session.context(self.head, self.facts, self.found)
        return self._ctx

    async def connect(self, reuse: bool) -> tuple[Stream, PoolKey, bool]:
        """A backend connection (pooled if possible) to the first target that answers."""
        session = self.session
        record = session.record
        tries = self.tries
        if tries is None:
            group = session.runtime.backends.group(self.found.route, session.port)
            if group is not None:
                members = group.order(record.client_ip)
            else:
                try:
                    members = await resolve_targets(self.action, self.ctx)
                except Exception as exc:  # a user callable must not take the proxy down
                    raise _Failed(502, f"no usable target: {exc}") from None
            tries = self.tries = Tries(members, self.action, record.timeouts.connect)
        tls = self.found.route.tls
        context: ssl.SSLContext | None = None
        if tls is not None and tls.mode == "terminate-and-reencrypt":
            try:
                context = backend_context(tls, alpn=("http/1.1",))
            except CertificateLoadError as exc:  # a backend_ca or client certificate
                raise _Failed(502, f"backend unreachable: {exc}") from None
        pool = session.runtime.pool
        while (member := await tries.another()) is not None:
            host, port = member.host, member.port
            header = b"" if member.proxy_protocol is None else member.proxy_header(self.ctx)
            sni = None
            if tls is not None and context is not None:
                sni = backend_server_name(tls, self.facts.domain, host)
            key = pool.key(host, port, context, sni)
            record.target = member.state.key
            # A connection that announced one client by PROXY header serves that client only.
            pooled = reuse and self.upgrade is None and not header
            stream = pool.take(key) if pooled else None
            if stream is not None:
                self._hold(member)
                return stream, key, True
            timeout = tries.left(record.timeouts.connect)
            try:
                stream = await pool.connect(
                    host, port, timeout=timeout, context=context, sni=sni, header=header
                )
            except TimeoutError:
                tries.failed(member, f"timed out after {timeout:g}s")
            except (OSError, ssl.SSLError) as exc:
                tries.failed(member, connect_reason(exc))
            else:
                if header:
                    self.private = True
                self._hold(member)
                return stream, key, False
        if not tries.failures:
            raise _Failed(503, "no target is up")
        raise _Failed(502, "backend unreachable: " + tries.why())

    def request_head(self, target_host: str, target_port: int) -> bytes:
        return backend_request_head(
            self.head,
            self.framing,
            self.tokens,
            client_ip=self.session.record.client_ip,
            tls=self.session.tls is not None,
            domain=self.facts.domain,
            target=(target_host, target_port),
            upgrade=self.upgrade,
        )

    async def run(self, *, reuse: bool) -> tuple[int | str, bool]:
        session, head, framing = self.session, self.head, self.framing
        client = session.client
        backend, key, reused = await self.connect(reuse)
        backend.serve(client)  # losing the client ends the exchange, whatever it waits for
        try:
            request_head = self.request_head(key[0], key[1])
            if framing.kind == "none":
                backend.write(request_head)
            elif self.replay is not None:
                backend.write(request_head + self.replay)
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
            if response.status >= 500:
                self._member_failed(f"HTTP {response.status}")
            chain = self.found.route.chain
            if chain is not None and chain.on_response and response.status != 101:
                try:
                    response = await consult_response(chain, self.ctx, head, response)
                except HookFailed as exc:
                    session.record.fail("refused", str(exc))  # the log says why, not the client
                    raise _Failed(503, "refused: a hook failed", sent=True) from None
            response_tokens = connection_tokens(response.headers)
            if response.status == 101:
                if self.upgrade is None:
                    raise _Failed(502, "the backend switched protocols unasked (101)", sent=True)
                client.write(upgraded_head(response, response_tokens, self.upgrade))
                session.record.outcome = "upgraded"
                tunnel(client, backend, session.record, session.finish)
                raise Handover
            # A stopping proxy tells the client to go.
            keep_alive = self.keep_alive and session.runtime.accepting
            try:
                plan = plan_response(head, response, response_tokens, keep_alive)
            except HttpParseError as exc:
                raise _Failed(exc.status, str(exc), sent=True) from None
            keep, backend_keep = await self.relay_response(backend, plan)
        except Handover:
            raise
        except BaseException:
            backend.close()
            raise
        finally:
            backend.serve(None)
            self._release()
        if backend_keep and not self.private:
            session.runtime.pool.release(key, backend)
        else:
            backend.close()
        return response.status, keep

    async def response(self, backend: Stream, reused: bool) -> ResponseHead:
        """The backend's final response head; interim 1xx answers are passed on.

        Each head must arrive within the route's ``backend`` timeout.
        """
        session = self.session
        timeout = session.record.timeouts.backend
        while True:
            deadline = session.loop.time() + timeout
            try:
                try:
                    response = parse_response_head(backend.buffer) if backend.buffer else None
                    while response is None:
                        if not await backend.fill(deadline):
                            raise _Failed(
                                502, "the backend closed the connection without answering"
                            )
                        response = parse_response_head(backend.buffer)
                except TimeoutError:
                    raise _Failed(504, f"the backend did not answer within {timeout:g}s") from None
                except HttpParseError as exc:
                    raise _Failed(502, f"the backend sent an invalid response: {exc}") from None
            except _Failed as failure:
                dropped = backend.eof and not backend.buffer  # closed or reset, nothing said
                if reused and self.framing.kind == "none" and dropped and self.idempotent:
                    raise _Stale from None
                failure.body_consumed = True
                self._member_failed(str(failure))
                if dropped and self.retryable:
                    raise _Retry(failure) from None
                raise
            backend.skip(response.length)
            if response.status >= 200 or response.status == 101:
                return response
            interim = interim_head(self.head, response)
            if interim is not None:
                session.client.write(interim)

    async def relay_response(self, backend: Stream, plan: ResponsePlan) -> tuple[bool, bool]:
        """Send the planned response to the client; returns (client stays, backend reusable)."""
        client = self.session.client
        out = plan.framing
        kind = out.kind
        prefix = plan.head
        # The head goes out with the body bytes already here: one send for a small answer.
        if kind == "none":
            client.write(prefix)
        elif kind == "length" and out.length <= len(backend.buffer) and out.length <= CHUNK:
            client.write(prefix + backend.consume(out.length))
        else:
            record = self.session.record
            sent = record.bytes_out
            try:
                await copy_body(backend, client, out, chunked_out=plan.rechunk, prefix=prefix)
            except HttpParseError as exc:
                if record.bytes_out != sent:
                    raise  # the head is out: all that is left is to end the connection
                # The body broke before a byte of the response left: the client can still be
                # told (the head goes out with the first body bytes, see copy_body).
                raise _Failed(502, f"the backend sent an invalid body: {exc}", sent=True) from None
        if client.blocked:
            await client.drain()
        return plan.client_keep, plan.backend_keep
