"""One client connection speaking HTTP/1.x: every request is routed on its own.

The session reads a request head, matches it against the current routes (Host, path,
headers), and answers it: ``block`` (403), ``redirect``, ``static``, or ``forward`` as a
reverse proxy. Requests are handled one after another, so pipelined requests are answered
in order; a request whose route is a raw pipe or a socket handler takes the whole connection
from there on. Problems get short answers: 400 malformed, 431 head too large, 404 no route,
502 backend unreachable or broken, 504 backend too slow.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Protocol

from smartroute.context import RouteContext
from smartroute.errors import HttpParseError
from smartroute.protocols.http import RequestHead, parse_request_head
from smartroute.protocols.http_response import BodyFraming, request_framing
from smartroute.routing.facts import ConnectionFacts, RouteMatch
from smartroute.routing.model import (
    CompiledRoute,
    ForwardAction,
    RedirectAction,
    SocketHandlerAction,
    StaticAction,
)
from smartroute.routing.patterns import parse_ip
from smartroute.server.access_log import log_request_text
from smartroute.server.decision import (
    DROP,
    FirstRequest,
    Heard,
    Refusal,
    TlsInfo,
    Verdict,
    consult_request,
    decide_request,
    request_facts,
    route_context,
)
from smartroute.server.hooks import rewrite_request
from smartroute.server.http.body import copy_body
from smartroute.server.http.headers import connection_tokens
from smartroute.server.http.messages import RequestInfo, Response, response_head, text_response
from smartroute.server.http.redirect import render_redirect
from smartroute.server.http.reverse_proxy import forward_request
from smartroute.server.http.static import serve_static
from smartroute.server.http.stream import Handover, Stream
from smartroute.server.observe import Observation
from smartroute.server.stats import ConnectionRecord

if TYPE_CHECKING:
    from smartroute.server.runtime import Runtime

log = logging.getLogger("smartroute")
access_log = logging.getLogger("smartroute.access")

# A body the proxy answers itself without reading (404, redirect, ...) is read and dropped when
# it is at most this large, so the connection stays usable; a larger one closes it.
DISCARD_LIMIT = 1024 * 1024
FILE_CHUNK = 256 * 1024


class Takeover(Protocol):
    """Who takes the connection over when a request's route is a raw pipe or a socket
    handler (the connection's action runner)."""

    def run_handler(
        self,
        action: SocketHandlerAction,
        ctx: RouteContext,
        initial: bytes,
        eof: bool,
        transport: asyncio.Transport | None = None,
    ) -> None:
        """Run the route's socket handler on the connection, ``initial`` bytes first."""

    async def forward_raw(
        self,
        action: ForwardAction,
        route: CompiledRoute,
        ctx: RouteContext,
        initial: bytes,
        eof: bool,
        transport: asyncio.Transport | None = None,
    ) -> None:
        """Pipe the connection to the route's targets, ``initial`` bytes first."""


class HttpSession:
    """Serves HTTP/1.x requests on one client connection until it closes."""

    def __init__(
        self,
        runtime: Runtime,
        client: Stream,
        record: ConnectionRecord,
        *,
        port: int,
        server_ip: str,
        tls: TlsInfo | None,
        first: FirstRequest | None = None,
        heard: Heard | None = None,
    ) -> None:
        self.runtime = runtime
        # The first request as the pipeline already parsed and routed it (its head starts
        # the client's buffer): it is answered without parsing or matching it again.
        self.first = first
        self.client = client
        self.record = record
        self.port = port
        self.server_ip = server_ip
        self.tls = tls
        self.client_address = parse_ip(record.client_ip)
        self.loop = asyncio.get_running_loop()
        self.requests = 0
        self.connection: Takeover | None = None  # set by whoever starts the session
        # What on_connect hooks said of this connection so far, route by route.
        self.heard = heard if heard is not None else Heard()

    def finish(self) -> None:
        """Account for the connection once it is gone (used after an upgrade)."""
        self.runtime.stats.finished(self.record)

    # -- the request loop ------------------------------------------------------------------

    async def run(self) -> None:
        """Answer requests until the client leaves or a request ends the session."""
        try:
            first, self.first = self.first, None
            while True:
                if first is None:
                    read = await self._read_head()
                    if read is None:
                        break
                    head, raw = read
                else:
                    head, raw = first.head, self.client.consume(first.head.length)
                    self.requests += 1
                if not await self._answer(head, raw, first):
                    break
                first = None
        except Handover:
            return
        except (ConnectionError, HttpParseError) as exc:
            self.record.fail("error", f"http: {exc}")
        except Exception as exc:  # a bug here must cost one connection, not the proxy
            self.record.fail("internal-error", f"{type(exc).__name__}: {exc}")
            log.error("HTTP session %s failed", self.record.id, exc_info=exc)
        self.client.close()

    async def _read_head(self) -> tuple[RequestHead, bytes] | None:
        """The next request head and its raw bytes, or None when the session should end.

        Two limits: waiting for the request to start (``initial_data`` for the first one,
        ``http_keepalive`` between requests), then ``http_header`` from its first byte to the
        end of its head (a slowloris guard). Before the first request the route is not known,
        so the most patient route on the port sets both; later the last request's route does.
        """
        client = self.client
        timeouts = self.record.timeouts
        first_wait, header_wait = timeouts.http_keepalive, timeouts.http_header
        if self.requests == 0:
            waits = self.runtime.table.waits(self.port)
            first_wait, header_wait = (
                (timeouts.initial_data, timeouts.http_header) if waits is None else waits
            )
        # Deadlines rather than a timeout context per wait: see Stream.fill.
        if not client.buffer:
            runtime = self.runtime
            if self.requests and not runtime.accepting:
                return None  # the proxy is stopping: no next request on this connection
            waiting = runtime.between_requests
            waiting.add(client)
            try:
                if not await client.fill(self.loop.time() + first_wait):
                    return None
            except TimeoutError:
                return None
            finally:
                waiting.discard(client)
        try:
            head = parse_request_head(client.buffer)
            if head is None:
                deadline = self.loop.time() + header_wait
                while head is None:
                    if not await client.fill(deadline):
                        return None
                    head = parse_request_head(client.buffer)
        except HttpParseError as exc:
            await self._reply(text_response(exc.status, str(exc)), keep_alive=False)
            self.record.fail("bad-request", str(exc))
            return None
        except TimeoutError:
            self.record.fail("timeout", f"request head not complete within {header_wait:g}s")
            await self._reply(
                text_response(408, "request head not received in time"), keep_alive=False
            )
            return None
        self.requests += 1
        return head, client.consume(head.length)

    # -- one request -----------------------------------------------------------------------

    def context(self, head: RequestHead, facts: ConnectionFacts, found: RouteMatch) -> RouteContext:
        client_cert = None if self.tls is None else self.tls.client_cert
        return route_context(self.record, self.server_ip, facts, found, head, client_cert)

    def request_info(self, head: RequestHead) -> RequestInfo:
        return RequestInfo(
            method=head.method,
            path=head.path,
            query=head.query,
            headers=head.header_map(),
            host=head.host,
            port=self.port,
            is_tls=self.tls is not None,
        )

    async def _answer(
        self, head: RequestHead, raw: bytes, first: FirstRequest | None = None
    ) -> bool:
        """Handle one request; True when the connection may carry another one."""
        started = time.monotonic()
        try:
            framing = request_framing(head)
        except HttpParseError as exc:
            await self._reply(text_response(exc.status, str(exc)), keep_alive=False)
            self.record.fail("bad-request", str(exc))
            return False
        tokens = connection_tokens(head.headers)
        # A stopping proxy tells each kept-alive client to go with its next response.
        keep_alive = keeps_alive(head.version, tokens) and self.runtime.accepting
        if first is None:
            facts = request_facts(self.port, self.client_address, head, self.tls)
            verdict = decide_request(self.runtime, self.record, facts, head)
        elif first.decided:
            facts, verdict = first.facts, first.verdict
        else:
            facts = first.facts
            verdict = (
                None
                if first.found is None
                else decide_request(self.runtime, self.record, facts, head, first.found)
            )
        target = None
        if isinstance(verdict, RouteMatch) and (
            verdict.route.chain or verdict.route.bandwidth or self.heard.declined
        ):
            consulted = await self._consult(head, raw, facts, verdict)
            if consulted is None:  # dropped by a hook
                self._log(head, None, "dropped", started)
                return False
            verdict, head, target = consulted
        found = verdict.found if isinstance(verdict, Refusal) else verdict
        route_name = found.route.name if found else None
        status: int | str
        if found is None:
            status, keep = await self.answer_locally(
                text_response(404, "no route for this request"), head, framing, keep_alive
            )
        else:
            action = found.route.action
            if isinstance(verdict, Refusal):
                refusal = verdict.response()
                status, keep = await self.answer_locally(refusal, head, framing, keep_alive)
            elif action.type == "block":
                self.record.outcome = "blocked"
                response = text_response(403, "forbidden")  # and close, as block always does
                status, keep = await self.answer_locally(response, head, framing, False)
            elif isinstance(action, RedirectAction):
                response = render_redirect(action, self.request_info(head))
                status, keep = await self.answer_locally(response, head, framing, keep_alive)
            elif isinstance(action, StaticAction):
                response = serve_static(action, self.request_info(head))
                status, keep = await self.answer_locally(response, head, framing, keep_alive)
            elif isinstance(action, SocketHandlerAction) or (
                isinstance(action, ForwardAction) and action.protocol == "tcp"
            ):
                self._log(head, route_name, "handover", started)
                await self._hand_over(found, self.context(head, facts, found), raw)
                raise Handover
            else:
                status, keep = await forward_request(
                    self, head, framing, keep_alive, found, facts, tokens, target
                )
        self._log(head, route_name, status, started)
        return keep

    async def _consult(
        self, head: RequestHead, raw: bytes, facts: ConnectionFacts, found: RouteMatch
    ) -> tuple[Verdict, RequestHead, tuple[str, int] | None] | None:
        """What the request's route adds: its hooks' say (``on_connect`` when the connection
        meets the route for the first time, then ``on_request``; None when they dropped it),
        its ``on_disconnect`` and ``on_data`` hooks and its speed limits for the connection
        from now on. Returns the verdict, the request head as the hooks changed it and the
        target they chose."""
        record, runtime = self.record, self.runtime
        chain = found.route.chain
        verdict: Verdict = found
        target = None
        if chain is not None:
            if chain.on_disconnect and record.hooks is None:
                record.hooks, record.context = chain, self.context(head, facts, found)
            if chain.on_data and record.observation is None:
                # From this request on (a connection the fast lane handed over).
                ctx = self.context(head, facts, found)
                observation = Observation(runtime.observers, chain.on_data, ctx)
                observation.push("in", raw + bytes(self.client.buffer))  # read already
                record.observation = observation
        if self.heard.declined or (chain is not None and (chain.on_connect or chain.on_request)):
            consulted, _, said = await consult_request(
                runtime,
                record,
                facts,
                head,
                found,
                lambda match: self.context(head, facts, match),
                self.heard,
            )
            if consulted == DROP:
                return None
            verdict = consulted
            if said is not None and isinstance(verdict, RouteMatch):
                head = rewrite_request(head, said)
                target = said.target
                if said.speed_limit is not None:  # for the connection, from now on
                    if record.bandwidth is not None:
                        record.bandwidth.release()
                    record.bandwidth = runtime.bandwidth.limits(
                        verdict.route, record.client_ip, said.speed_limit
                    )
        if (
            isinstance(verdict, RouteMatch)
            and verdict.route.bandwidth is not None
            and record.bandwidth is None
        ):
            record.bandwidth = runtime.bandwidth.limits(verdict.route, record.client_ip)
        return verdict, head, target

    async def _hand_over(self, found: RouteMatch, ctx: RouteContext, raw: bytes) -> None:
        """Give the connection, this request's head included, to a raw pipe or a handler."""
        client, connection = self.client, self.connection
        assert client.transport is not None and connection is not None
        transport = client.transport
        transport.pause_reading()
        initial, action = raw + client.detach(), found.route.action
        if isinstance(action, SocketHandlerAction):
            connection.run_handler(action, ctx, initial, client.eof, transport)
        elif isinstance(action, ForwardAction):
            await connection.forward_raw(action, found.route, ctx, initial, client.eof, transport)

    def _log(self, head: RequestHead, route: str | None, status: int | str, started: float) -> None:
        log_request(self.record, head, route, status, started)

    # -- answers the proxy makes itself ----------------------------------------------------

    async def answer_locally(
        self, response: Response, head: RequestHead, framing: BodyFraming, keep_alive: bool
    ) -> tuple[int, bool]:
        """Answer with ``response``; read and drop a small request body to keep the connection."""
        keep_alive = keep_alive and await self.discard_body(head, framing)
        await self._reply(response, keep_alive=keep_alive, head_only=head.method == "HEAD")
        return response.status, keep_alive

    async def discard_body(self, head: RequestHead, framing: BodyFraming) -> bool:
        """Drop the request body if that is cheap; False when the connection must close."""
        if framing.kind == "none":
            return True
        expects = (head.header("expect") or "").lower() == "100-continue"
        if expects or framing.kind != "length" or framing.length > DISCARD_LIMIT:
            return False  # the client waits for 100 or may send a lot: close instead
        await copy_body(self.client, None, framing, chunked_out=False)
        return True

    async def _reply(
        self, response: Response, *, keep_alive: bool, head_only: bool = False
    ) -> None:
        client = self.client
        if response.file is None or head_only:
            client.write(response_head(response, keep_alive=keep_alive))
            if response.body and not head_only:
                client.write(response.body)
            await client.drain()
            return
        body = response.file
        try:
            file = open(body.path, "rb")  # noqa: SIM115 - closed below
        except OSError:
            await self._reply(text_response(404, "not found"), keep_alive=keep_alive)
            return
        with file:
            client.write(response_head(response, keep_alive=keep_alive))
            file.seek(body.offset)
            left = body.length
            while left > 0:
                # Bounded reads from the page cache; the socket, not the disk, sets the pace.
                data = file.read(min(FILE_CHUNK, left))
                if not data:
                    raise ConnectionError(f"{body.path} shrank while it was being sent")
                left -= len(data)
                client.write(data)
                await client.drain()


def log_request(
    record: ConnectionRecord,
    head: RequestHead,
    route: str | None,
    status: int | str,
    started: float,
) -> None:
    """Account for a request answered (its bytes, status and duration under its route) and
    write its access-log line: the one place a finished request is counted."""
    book = record.book
    if book is not None:
        book.request(record, head, route, status, time.monotonic() - started)
    elif access_log.isEnabledFor(logging.INFO):  # a record no book counts (never opened)
        log_request_text(record, head, route, status, time.monotonic() - started)


def wants_keep_alive(head: RequestHead) -> bool:
    """HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 only when asked."""
    return keeps_alive(head.version, connection_tokens(head.headers))


def keeps_alive(version: str, tokens: set[str]) -> bool:
    """Whether a client speaking ``version`` with ``Connection`` options ``tokens`` stays."""
    if version == "HTTP/1.0":
        return "keep-alive" in tokens
    return "close" not in tokens
