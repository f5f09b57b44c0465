"""The connection pipeline on transports: accept -> peek -> classify -> match -> act.

Connections the fast lane (:mod:`smartroute.server.accept`) does not take get an asyncio
transport whose protocol is :class:`InboundConnection`. It reads the first bytes
only when some route on the port needs them (SNI, Host, ALPN, ...); otherwise it dispatches at
once, so protocols where the server speaks first work. Once a route is chosen, reading pauses
and the transport is handed to the action (a relay for ``forward``, streams for a socket
handler); every byte read while peeking is delivered to whatever takes the connection over.

With ``accept_proxy_protocol``, first bytes that are a PROXY header (after a trusted proxy's
own, if any) close the connection; when the route is chosen before they are known, the action
gets them through a :class:`~smartroute.server.actions.FirstBytesGuard`. A ``block`` chosen
before the first bytes, on a port whose other routes speak HTTP, reads them to answer an HTTP
client ``403``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

from smartroute.certs.tls_alpn import ACME_TLS_ALPN
from smartroute.context import RouteContext
from smartroute.errors import HttpParseError, ProxyProtocolError
from smartroute.protocols.detect import OTHER, Detection, detect, settle
from smartroute.protocols.http import looks_like_http
from smartroute.protocols.probes import Probes
from smartroute.protocols.proxy_protocol import looks_like_proxy_protocol, parse_proxy_header
from smartroute.protocols.tls import ClientHello
from smartroute.routing.facts import ConnectionFacts, RouteMatch
from smartroute.routing.matcher import RouteTable
from smartroute.routing.model import (
    ForwardAction,
    SocketHandlerAction,
    needs_http,
    speaks_http,
)
from smartroute.routing.patterns import client_address
from smartroute.server.actions import UNTRUSTED_HEADER, Connection
from smartroute.server.decision import (
    DROP,
    FirstRequest,
    Heard,
    Peeked,
    Refusal,
    consult_connection,
    decide_connection,
    detected_facts,
    route_context,
)
from smartroute.server.hooks import Verdict as HookVerdict
from smartroute.server.http.messages import closing_answer, response_head
from smartroute.server.observe import Observation
from smartroute.server.stats import ConnectionRecord

if TYPE_CHECKING:
    from smartroute.server.runtime import Runtime

log = logging.getLogger("smartroute")

MAX_PEEK = 65536 + 5 * 8  # the largest ClientHello we accept, spread over a few records
# Each read re-runs the parsers over the buffer; a peer trickling bytes one read at a time
# would make that quadratic, so after this many reads the connection is routed as "other".
MAX_PEEK_READS = 256

NOT_FOUND = closing_answer(404, "no route for this request")
BAD_REQUEST = closing_answer(400, "this port expects HTTP")
FORBIDDEN = closing_answer(403, "forbidden")
DRAIN_TIMEOUT = 2.0
"""Seconds a refused client that has not sent its request yet may take to close."""


class InboundConnection(asyncio.Protocol):
    """Routes one accepted connection, then hands it over to the chosen action."""

    def __init__(
        self,
        runtime: Runtime,
        record: ConnectionRecord,
        waited: float = 0.0,
        peeked: Peeked | None = None,
    ) -> None:
        self.runtime = runtime
        # What the accept step learned: the peeked bytes are read, not detected again, and a
        # connection it decided is not matched again.
        self.peeked = peeked
        self.port = record.port
        self.waited = waited  # seconds already spent waiting for the first bytes
        self.transport: asyncio.Transport | None = None
        self.record = record
        self.table: RouteTable | None = None
        self.probes: Probes | None = None  # asked only on ports with protocol routes
        self.buffer = bytearray()
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.routed = False
        self.eof = False
        self.closed = False
        self.reads = 0
        self.expect_proxy_header = False
        self.starting = False
        self.draining = False
        self.blocking = False  # a block route waits for the first bytes (see _block)

    # -- asyncio callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = transport = cast(asyncio.Transport, transport)
        runtime, record = self.runtime, self.record
        record.closer = transport.abort
        table = self.table = runtime.table
        if not runtime.accepting or not table.has_port(self.port):
            record.fail("no-route", "the proxy is stopping or no route uses this port")
            transport.close()
        elif runtime.settings.accept_proxy_protocol and runtime.trusts(record.client_ip):
            # A trusted load balancer: its PROXY header comes first and names the real client.
            self.expect_proxy_header = True
            self.timer = asyncio.get_running_loop().call_later(
                self._initial_wait(), self._on_initial_timeout
            )
        elif transport.is_reading():
            self._after_client_known()
        else:
            # uvloop starts reading only once connection_made has returned, and forgets a
            # pause_reading() made before that: decide on the next loop iteration instead,
            # when a pause holds (what arrives meanwhile is kept in the buffer).
            self.starting = True
            asyncio.get_running_loop().call_soon(self._start)

    def _start(self) -> None:
        self.starting = False
        if self.closed or self.routed:
            return
        self._after_client_known()
        if self.eof and not self.routed:
            self._dispatch(settle(self.buffer, self.probes))

    def _after_client_known(self) -> None:
        """Peek at the first bytes if some route needs them, else dispatch at once."""
        table = self.table
        assert table is not None
        if table.needs_data(self.port):
            if table.probing(self.port):
                self.probes = self.runtime.settings.protocols
            if self.timer is None:  # after a PROXY header its time counts too
                self.timer = asyncio.get_running_loop().call_later(
                    self._initial_wait(), self._on_initial_timeout
                )
            if self.buffer:
                self._peek()
        else:
            self._cancel_timer()
            self._dispatch(None)

    def _initial_wait(self) -> float:
        """Seconds to wait for the first bytes: the most patient route on the port decides."""
        assert self.table is not None
        waits = self.table.waits(self.port)
        wait = self.runtime.timeouts.initial_data if waits is None else waits[0]
        return max(0.0, wait - self.waited)

    def data_received(self, data: bytes) -> None:
        self.record.bytes_in += len(data)
        if self.draining:
            return
        self.buffer += data
        if self.blocking:
            self._blocked_bytes()
            return
        if self.routed or self.starting:
            return  # arrived before reading paused; delivered with the rest of the buffer
        if self.expect_proxy_header:
            self._read_proxy_header()
        else:
            self._peek()

    def _read_proxy_header(self) -> None:
        try:
            header = parse_proxy_header(self.buffer)
        except ProxyProtocolError as exc:
            self._refuse("bad-proxy-header", f"PROXY protocol: {exc}")
            return
        if header is None:
            return
        del self.buffer[: header.length]
        self.expect_proxy_header = False
        if header.source is not None:
            ip, port = header.source
            self.runtime.stats.moved(self.record, client_address(ip)[1], port)
        self._after_client_known()

    def _refuse(self, outcome: str, reason: str) -> None:
        assert self.transport is not None
        self.routed = True
        self._cancel_timer()
        self.record.fail(outcome, reason)
        self.transport.close()

    def _peek(self) -> None:
        peeked = self.peeked
        if peeked is not None:
            if len(self.buffer) >= peeked.length:
                self._dispatch(peeked.detection)
            return
        self.reads += 1
        detection = detect(self.buffer, probes=self.probes)
        if detection is None and (len(self.buffer) > MAX_PEEK or self.reads >= MAX_PEEK_READS):
            detection = settle(self.buffer, self.probes)
        if detection is not None:
            self._dispatch(detection)

    def eof_received(self) -> bool:
        self.eof = True
        if self.draining:
            return False  # the client has read the answer and closed: close
        if self.blocking:
            self.blocking = False
            return False  # no request to answer: close
        if self.starting:
            return True  # _start decides
        if self.expect_proxy_header and not self.routed:
            self._refuse("no-proxy-header", "the connection ended before its PROXY header")
        elif not self.routed:
            self._dispatch(settle(self.buffer, self.probes))
        return True  # a half-close: the action may still answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        # Still this protocol's transport: no action took it over (or its task was pending).
        if exc is not None:
            self.record.fail("error", f"client: {exc}")
        self.runtime.stats.finished(self.record)

    # -- routing -----------------------------------------------------------------------------

    def _on_initial_timeout(self) -> None:
        self.timer = None
        if self.expect_proxy_header:
            self._refuse("no-proxy-header", "no PROXY header in time from a proxy_ips address")
        elif not self.routed:
            self._dispatch(settle(self.buffer, self.probes) if self.probes is not None else OTHER)

    def _answer(self, answer: bytes) -> None:
        """Write one of the pipeline's own answers, counted as bytes out like any other."""
        assert self.transport is not None
        self.record.bytes_out += len(answer)
        self.transport.write(answer)

    def _answer_then_drain(self, answer: bytes) -> None:
        """Send ``answer`` and end our side, then drop what the client sends until it closes.

        The socket is closed once the client has closed its side, or after ``DRAIN_TIMEOUT``.
        """
        assert self.transport is not None
        transport = self.transport
        self.draining = True
        self._answer(answer)
        transport.write_eof()
        self.timer = asyncio.get_running_loop().call_later(DRAIN_TIMEOUT, transport.close)
        transport.resume_reading()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _context(
        self, facts: ConnectionFacts, found: RouteMatch, detection: Detection | None
    ) -> RouteContext:
        assert self.transport is not None
        sock = self.transport.get_extra_info("sockname") or ("0.0.0.0", 0)
        head = detection.head if detection is not None else None
        return route_context(self.record, client_address(sock[0])[1], facts, found, head)

    def _acme_challenge(self, hello: ClientHello) -> bool:
        """Answer a TLS-ALPN-01 validation (RFC 8737) if one is pending for this name."""
        responder = self.runtime.alpn_responder
        if not responder or ACME_TLS_ALPN not in hello.alpn:
            return False
        context = responder.context_for(hello.sni, hello.alpn)
        if context is None:
            return False
        assert self.transport is not None
        self.runtime.stats.routed(self.record, "acme-tls-alpn-01", None)
        connection = Connection(
            self.runtime, self.transport, self.record, port=self.port, server_ip=""
        )
        self.task = self.runtime.spawn(
            connection.answer_alpn_challenge(context, bytes(self.buffer))
        )
        return True

    def _dispatch(self, detection: Detection | None) -> None:
        """Match the connection and start its action; reading stays paused until handover."""
        assert self.transport is not None and self.table is not None
        self.routed = True
        self._cancel_timer()
        transport, record = self.transport, self.record
        transport.pause_reading()
        unchecked: bytes | None = None
        if self.runtime.settings.accept_proxy_protocol:
            # Only proxy_ips may say who the client is, in the header they send first: a header
            # from anyone else, or after theirs, is refused. First bytes that may still become
            # one are held back from the action until they show (see FirstBytesGuard); bytes
            # that end before are the client's own.
            header = looks_like_proxy_protocol(self.buffer)
            if header:
                self._refuse("untrusted-proxy-header", UNTRUSTED_HEADER)
                return
            if header is None and not self.eof:
                unchecked = bytes(self.buffer)
        peeked = self.peeked
        if peeked is not None:
            detection = peeked.detection
        if peeked is not None and peeked.decided and peeked.facts is not None:
            facts, verdict = peeked.facts, peeked.verdict
        else:
            hello = detection.hello if detection is not None else None
            if hello is not None and self._acme_challenge(hello):
                return
            facts = detected_facts(self.port, client_address(record.client_ip)[0], detection)
            error = detection.error if detection is not None else None
            verdict = decide_connection(
                self.runtime, record, facts, error if isinstance(error, HttpParseError) else None
            )
        kind = detection.kind if detection is not None else "none"
        if not isinstance(verdict, RouteMatch):
            self._turn_away(verdict, kind)
            return
        chain = verdict.route.chain
        if chain is not None and chain.on_connect:
            # The route's hooks have their say first; reading stays paused meanwhile.
            self.task = self.runtime.spawn(self._consult(verdict, facts, detection, unchecked))
            return
        self._act(verdict, facts, self._context(facts, verdict, detection), detection, unchecked)

    def _turn_away(self, verdict: Refusal | None, kind: str) -> None:
        """No route, or a refusal: an HTTP client is told, any other connection closed."""
        transport = self.transport
        assert transport is not None
        if isinstance(verdict, Refusal):
            response = verdict.response()
            answer = response_head(response, keep_alive=False) + response.body
            refusing = verdict.found
            if refusing is not None and kind == "none" and needs_http(refusing.route.action):
                # The request is still unread: closing now would reset the connection and
                # could destroy the answer before the client reads it.
                self._answer_then_drain(answer)
                return
            if refusing is None or kind == "http":  # a malformed request, or an HTTP refusal
                self._answer(answer)
            transport.close()
            return
        if kind == "http":  # bytes that looked like HTTP get an HTTP answer
            self._answer(NOT_FOUND)
        transport.close()

    async def _consult(
        self,
        found: RouteMatch,
        facts: ConnectionFacts,
        detection: Detection | None,
        unchecked: bytes | None,
    ) -> None:
        """Run the connection's ``on_connect`` hooks, then act as they say."""
        transport, record = self.transport, self.record
        assert transport is not None
        chain = found.route.chain
        if chain is not None and chain.on_disconnect:  # told even if the hooks refuse it
            record.hooks, record.context = chain, self._context(facts, found, detection)
        heard = Heard()
        verdict, ctx, said = await consult_connection(
            self.runtime,
            record,
            facts,
            found,
            lambda match: self._context(facts, match, detection),
            heard,
        )
        if transport.is_closing():
            return  # the client left (or a limit closed it) while the hooks ran
        if verdict == DROP:
            transport.close()
        elif not isinstance(verdict, RouteMatch):
            self._turn_away(verdict, detection.kind if detection is not None else "none")
        else:
            if ctx is None or ctx.route_name != verdict.route.name:
                ctx = self._context(facts, verdict, detection)
            self._act(verdict, facts, ctx, detection, unchecked, said, heard)

    def _act(
        self,
        found: RouteMatch,
        facts: ConnectionFacts,
        ctx: RouteContext,
        detection: Detection | None,
        unchecked: bytes | None,
        said: HookVerdict | None = None,
        heard: Heard | None = None,
    ) -> None:
        """Start the route's action on the connection (``said``: what its hooks said)."""
        transport, record = self.transport, self.record
        assert transport is not None
        kind = detection.kind if detection is not None else "none"
        route = found.route
        action = route.action
        chain = route.chain
        if chain is not None:
            if chain.on_disconnect:
                record.hooks, record.context = chain, ctx
            if chain.on_data:
                record.observation = Observation(self.runtime.observers, chain.on_data, ctx)
        speed = None if said is None else said.speed_limit
        if route.bandwidth is not None or speed is not None:
            record.bandwidth = self.runtime.bandwidth.limits(route, record.client_ip, speed)
        connection = Connection(
            self.runtime,
            transport,
            record,
            port=self.port,
            server_ip=ctx.server_ip,
            unchecked=unchecked,
            target=None if said is None else said.target,
            heard=heard,
        )
        initial = bytes(self.buffer) if unchecked is None else b""
        eof = self.eof
        observation = record.observation
        if observation is not None and initial and not route.terminates_tls:
            observation.push("in", initial)  # read while routing: the action gets them as is
        if route.terminates_tls and detection is not None and detection.hello is not None:
            self.task = self.runtime.spawn(
                connection.terminate(route, ctx, detection.hello, initial)
            )
        elif (kind == "http" and speaks_http(action)) or (kind == "none" and needs_http(action)):
            # Dispatched at once, an HTTP-only action reads the request head itself.
            head = detection.head if detection is not None else None
            first = None if head is None else FirstRequest(head, facts, found)
            connection.run_http(connection.http_stream(initial, eof), None, first=first)
        elif isinstance(action, ForwardAction) and action.protocol != "http":
            self.task = self.runtime.spawn(connection.forward_raw(action, route, ctx, initial, eof))
        elif isinstance(action, SocketHandlerAction):
            connection.run_handler(action, ctx, initial, eof)
        elif action.type == "block":
            self._block(kind)
        else:
            record.fail("not-http", f"the {action.type!r} action needs an HTTP request")
            if kind != "tls":
                self._answer(BAD_REQUEST)
            transport.close()

    # -- block -------------------------------------------------------------------------------

    def _block(self, kind: str) -> None:
        """Close; an HTTP client first gets ``403``.

        Routed before the first bytes on a port whose other routes speak HTTP, the connection
        is likely an HTTP client's that has not sent its request yet: wait for its first bytes
        (as long as the port waits for them) to tell.
        """
        assert self.transport is not None and self.table is not None
        self.record.outcome = "blocked"
        if kind == "none" and self.table.serves_http(self.port):
            self.blocking = True
            self.timer = asyncio.get_running_loop().call_later(
                self._initial_wait(), self._blocked_timeout
            )
            self.transport.resume_reading()
            if self.buffer or self.eof:
                self._blocked_bytes()
        else:
            self.transport.close()

    def _blocked_bytes(self) -> None:
        assert self.transport is not None
        is_http = looks_like_http(self.buffer)
        if is_http is None and not self.eof:
            return  # a few bytes that may still begin a method
        self.blocking = False
        self._cancel_timer()
        if is_http:
            # The request is not read whole: answer, then drain it, so that closing with
            # unread bytes does not reset the connection and destroy the answer.
            self._answer_then_drain(FORBIDDEN)
        else:
            self.transport.close()

    def _blocked_timeout(self) -> None:
        self.timer = None
        self.blocking = False
        assert self.transport is not None
        self.transport.close()
