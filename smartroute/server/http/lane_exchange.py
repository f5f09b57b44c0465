"""The backend half of HTTP on the fast lane: one request's exchange with a backend.

:class:`LaneExchange` holds the state of a lane session
(:class:`~smartroute.server.http.lane_session.LaneSession`; the client's socket is
:class:`~smartroute.server.http.lane_client.LaneClient`'s) and
carries a routed request out: it reuses the session's kept connection, takes one from the
:class:`~smartroute.server.http.lane_pool.LanePool` or connects a new one (trying the route's
addresses in turn), sends the head rewritten by :mod:`smartroute.server.http.rewrite` and the
body (by Content-Length, or decoded and re-chunked), reads the response head (passing interim
answers on), and sends the response on, re-framed as the transport path would. A kept
connection the backend had closed meanwhile is replaced once, for idempotent requests without
a body; an
upgrade (``101``) turns a plain connection into a byte relay
(:class:`~smartroute.server.socket_relay.SocketRelay`) and a terminated one into a tunnel
through the session.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from typing import TYPE_CHECKING

from smartroute.errors import CertificateLoadError, HttpParseError
from smartroute.protocols.chunked import LAST_CHUNK, ChunkedDecoder, encode_chunk
from smartroute.protocols.http import IDEMPOTENT_METHODS, RequestHead
from smartroute.protocols.http_response import (
    BodyFraming,
    parse_response_head,
)
from smartroute.routing.facts import RouteMatch
from smartroute.routing.model import CompiledRoute
from smartroute.server.backends.group import Member, TargetGroup, next_to_try
from smartroute.server.decision import FirstRequest, TlsInfo
from smartroute.server.epoll_set import IN, OUT, TROUBLE
from smartroute.server.http.headers import connection_tokens
from smartroute.server.http.lane_pool import LaneBackend, connect, pool_key
from smartroute.server.http.lane_tls import HTTP_ALPN, LaneTls
from smartroute.server.http.messages import Response
from smartroute.server.http.rewrite import (
    ResponsePlan,
    backend_request_head,
    interim_head,
    plan_response,
    upgraded_head,
)
from smartroute.server.http.session import log_request
from smartroute.server.socket_relay import established
from smartroute.server.stats import ConnectionRecord
from smartroute.server.tls import backend_context, backend_server_name, tls_reason

if TYPE_CHECKING:
    from smartroute.routing.facts import ConnectionFacts
    from smartroute.server.runtime import Runtime

log = logging.getLogger("smartroute")

HELD = 256 * 1024  # the most read ahead of need: pipelined requests, a backend's early bytes
_RETRY = (BlockingIOError, InterruptedError)
_LOST = "the connection closed before the end of the body"

# Phases of a session: what it waits for.
HEAD = 0  # a request head (or the client's first bytes, or the end of the last response)
CONNECT = 1  # a backend connection under way
SEND = 2  # the request's body, going to the backend
WAIT = 3  # the backend's response head
RELAY = 4  # the response's body, going to the client
DISCARD = 5  # a request body to drop before an answer of the proxy's own
TUNNEL = 6  # switched protocols on a terminated connection: plaintext both ways


class LaneExchange:
    """A lane session's state, and its exchanges with backends (see the module's docstring).

    The client's half - reading requests, answers of the proxy's own, time limits, ending -
    is :class:`~smartroute.server.http.lane_session.LaneSession`'s; the methods it provides
    are declared at the end of this class."""

    # fmt: off
    __slots__ = (
        "runtime", "lane", "sock", "fd", "mask", "record", "inbox", "eof", "out", "first", "phase",
        "closing", "done", "head", "facts", "found", "framing", "tokens", "keep_alive", "upgrade",
        "started", "backend", "to_backend", "reused", "members", "next_member", "failures",
        "group", "member",
        "prefix", "left", "decoder", "plan", "answer", "waiting", "deadline",
        "timer", "loop", "tls", "tls_info", "shut", "planned",
    )
    # fmt: on

    def __init__(
        self,
        runtime: Runtime,
        sock: socket.socket,
        record: ConnectionRecord,
        facts: ConnectionFacts,
        first: FirstRequest | None,
        tls: LaneTls | None = None,
    ) -> None:
        self.runtime = runtime
        self.lane = runtime.lane
        self.sock = sock
        self.fd = sock.fileno()
        self.mask = 0  # what the lane's epoll set watches on the client's socket
        self.record = record
        self.inbox = bytearray()  # read from the client, not yet used
        self.eof = False  # the client ended its side
        self.out: bytes | None = None  # for the client, not taken by its socket yet
        # The connection's first request, parsed and matched by the accept step: its bytes
        # are still in the socket (peeked at), and the session reads them as any others.
        self.first = first
        self.phase = HEAD
        self.closing = False  # close once ``out`` is delivered
        self.done = False  # closed, or given to a transport or a relay
        # The exchange in progress.
        self.head: RequestHead | None = None
        self.facts = facts
        self.found: RouteMatch | None = None
        self.framing = BodyFraming("none")
        self.tokens: set[str] = set()
        self.keep_alive = False
        self.upgrade: str | None = None
        self.started = 0.0
        self.backend: LaneBackend | None = None  # kept between requests while it is clean
        self.to_backend: bytes | None = None  # for the backend, not taken by its socket yet
        self.reused = False
        self.group: TargetGroup | None = None  # the request's route's targets
        self.members: tuple[Member, ...] = ()  # to try, in order (see TargetGroup.order)
        self.next_member = 0
        self.member: Member | None = None  # the one this request went to (counted as active)
        self.failures: list[str] = []
        self.prefix = b""  # a head to send before the body bytes that follow it
        self.left = 0  # body bytes still to come (Content-Length framing)
        self.decoder: ChunkedDecoder | None = None
        self.plan: ResponsePlan | None = None
        self.answer: tuple[Response, bool] | None = None  # sent once DISCARD has dropped the body
        # One timer per session, moved lazily: see _wait.
        self.waiting = ""  # what the deadline is for ("": nothing)
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()
        self.tls = tls  # the client's TLS, when the lane terminates it
        self.tls_info: TlsInfo | None = None  # what the handshake settled
        self.shut = False  # TUNNEL: the client's end was passed on to the backend
        # The last request's route and its group (http_plan), reused while it repeats.
        self.planned: tuple[CompiledRoute | None, TargetGroup | None] = (None, None)
        record.closer = self.abort

    def _read_backend(self, backend: LaneBackend) -> None:
        backend.read(self.lane)

    def _send_backend(self, backend: LaneBackend, data: bytes) -> None:
        try:
            data = backend.wire(data)
        except ssl.SSLError as exc:
            backend.eof, backend.error = True, exc
            return
        if self.to_backend is not None:
            self.to_backend += data
        else:
            self.to_backend = backend.send(data)

    def _flush_backend(self, backend: LaneBackend) -> None:
        pending = self.to_backend
        assert pending is not None
        self.to_backend = backend.send(pending)

    # -- the backend connection --------------------------------------------------------------

    def _open_backend(self, *, reuse: bool) -> bool:
        """Use the kept, a pooled or a new connection to the next member that takes one."""
        pooled = reuse and self.upgrade is None
        record = self.record
        found = self.found
        assert found is not None
        tls = found.route.tls
        context = None
        if tls is not None and tls.mode == "terminate-and-reencrypt":
            try:
                context = backend_context(tls, alpn=HTTP_ALPN)
            except CertificateLoadError as exc:  # a backend_ca that does not load
                return self._fail(502, f"backend unreachable: {exc}", unread=True)
        members = self.members
        while (index := next_to_try(members, self.next_member)) < len(members):
            member = members[index]
            self.next_member = index + 1
            address = member.address
            assert address is not None
            record.target = member.state.key
            self._settle()
            self.member = member
            member.state.active += 1
            sni = None
            if context is not None:
                assert tls is not None
                sni = backend_server_name(tls, self.facts.domain, address[1][0])
            key = pool_key(address, context, sni)
            backend = self.backend
            if backend is not None:
                if pooled and backend.key == key and backend.clean:
                    self.reused = True
                    return self._begin()
                self._let_go_backend()
            if pooled:
                backend = self.runtime.lane_pool.take(key)
                if backend is not None:
                    self.lane.watch(backend.fd, backend.mask, backend.mask, self)  # ours now
                    self.backend, self.reused = backend, True
                    return self._begin()
            try:
                backend, up = connect(address, context, sni)
            except OSError as exc:
                self._target_failed(exc.strerror or str(exc))
                continue
            self.backend, self.reused = backend, False
            if up and backend.ready:
                return self._begin()
            self.phase = CONNECT
            self._wait("connect", record.timeouts.connect)
            return self._set_up(backend) if up else False
        self.phase = HEAD  # no exchange: the answer is the proxy's own
        self._settle()
        if not self.failures:  # every target went down since the route was chosen
            return self._fail(503, "no target is up", unread=True)
        return self._fail(502, "backend unreachable: " + "; ".join(self.failures), unread=True)

    def _connect_reported(self, backend: LaneBackend, events: int) -> bool:
        """An event while connecting: the TCP connect's outcome, or the TLS handshake's."""
        if backend.connected:
            if events & (OUT | TROUBLE) and self.to_backend is not None:
                self._flush_backend(backend)
            if events & (IN | TROUBLE):
                backend.read(self.lane)
            if backend.eof and not backend.ready:
                why = "closed the connection during the TLS handshake"
                if backend.error is not None:
                    why = backend.error.strerror or str(backend.error)
                return self._connect_failed(backend, why)
            return self._set_up(backend)
        code = backend.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            return self._connect_failed(backend, os.strerror(code))
        if not established(backend.sock):
            return False  # a stale event, the connect is still under way
        backend.connected = True
        return self._set_up(backend)

    def _set_up(self, backend: LaneBackend) -> bool:
        """The TCP connection is up: go on with its TLS handshake, if any, then the request."""
        if not backend.ready:
            try:
                done = backend.handshake()
                self._send_backend(backend, b"")  # what the handshake has to send
            except ssl.SSLError as exc:
                return self._connect_failed(backend, f"TLS: {tls_reason(exc)}")
            if not done:
                return False
        self.waiting = ""
        return self._begin()

    def _connect_failed(self, backend: LaneBackend, why: str) -> bool:
        self._target_failed(why)
        self._close_backend()
        return self._open_backend(reuse=False)

    def _target_failed(self, why: str) -> None:
        """The request's member failed it (connect, reset, 5xx, timeout): noted for passive
        health and in the failures a 502 lists."""
        member = self.member
        if member is None:
            return
        self.failures.append(f"{member.state.key} {why}")
        group = self.group
        member.state.failed(why, None if group is None else group.passive)

    def _settle(self) -> None:
        """The request is done with its member (or moves to another): no longer active."""
        member = self.member
        if member is not None:
            self.member = None
            member.state.active -= 1

    def _begin(self) -> bool:
        """The backend connection is ready: send the request's head (and body) to it."""
        head, backend = self.head, self.backend
        assert head is not None and backend is not None
        self.prefix = backend_request_head(
            head,
            self.framing,
            self.tokens,
            client_ip=self.record.client_ip,
            tls=self.tls is not None,
            domain=self.facts.domain,
            target=backend.target,
            upgrade=self.upgrade,
        )
        framing = self.framing
        self.left = framing.length
        self.decoder = ChunkedDecoder() if framing.kind == "chunked" else None
        self.phase = SEND
        return True

    def _let_go_backend(self) -> None:
        """The kept connection is not for this request: to the pool (if clean) it goes."""
        backend = self.backend
        assert backend is not None
        self.backend = None
        self.to_backend = None
        self.runtime.lane_pool.release(backend)

    def _close_backend(self) -> None:
        backend = self.backend
        if backend is not None:
            self.backend = None
            self.to_backend = None
            backend.close(self.lane)

    # -- the request -------------------------------------------------------------------------

    def _send_body(self) -> bool:
        if self.to_backend is not None:
            return False
        backend = self.backend
        assert backend is not None
        if backend.eof:
            return self._backend_gone(backend)
        prefix = self.prefix
        self.prefix = b""
        try:
            data, done = self._body_piece(self.inbox, prefix, self.framing.kind, rechunk=True)
        except HttpParseError as exc:
            # A malformed body: the backend never sees the request complete, and the client is
            # told why before its connection ends.
            self._close_backend()
            return self._fail(exc.status, str(exc), broken=True)
        if data:
            self._send_backend(backend, data)
        if done:
            self.phase = WAIT
            self._wait("backend", self.record.timeouts.backend)
            return bool(backend.inbox) or backend.eof  # else the answer is still to come
        if self.eof and not self.inbox:
            self.record.fail("error", f"http: {_LOST}")
            self.finish()
        return False

    # -- the response ------------------------------------------------------------------------

    def _await_response(self) -> bool:
        backend, head = self.backend, self.head
        assert backend is not None and head is not None
        inbox = backend.inbox
        try:
            response = parse_response_head(inbox) if inbox else None
        except HttpParseError as exc:
            self._target_failed(f"invalid response: {exc}")
            return self._fail(502, f"the backend sent an invalid response: {exc}")
        if response is None:
            if backend.eof:
                return self._backend_gone(backend)
            return False
        del inbox[: response.length]
        status = response.status
        if status < 200 and status != 101:
            interim = interim_head(head, response)
            if interim is not None:
                self._send_client(interim)
            self._wait("backend", self.record.timeouts.backend)
            return True
        self.waiting = ""
        if status >= 500:
            self._target_failed(f"HTTP {status}")
        tokens = connection_tokens(response.headers)
        if status == 101:
            if self.upgrade is None:
                return self._fail(502, "the backend switched protocols unasked (101)")
            return self._switch(backend, upgraded_head(response, tokens, self.upgrade))
        keep_alive = self.keep_alive and self.runtime.accepting  # a stopping proxy: "go"
        try:
            plan = self.plan = plan_response(head, response, tokens, keep_alive)
        except HttpParseError as exc:
            return self._fail(exc.status, str(exc))
        out = plan.framing
        self.left, self.prefix = out.length, plan.head
        self.decoder = ChunkedDecoder(error_status=502) if out.kind == "chunked" else None
        self.phase = RELAY
        return True

    def _backend_gone(self, backend: LaneBackend) -> bool:
        """The backend closed or lost the connection before its response head."""
        head = self.head
        assert head is not None
        if (
            self.reused
            and self.framing.kind == "none"
            and not backend.inbox
            and head.method in IDEMPOTENT_METHODS
        ):
            # A kept connection the backend had closed meanwhile: once more, on a new one
            # (never a request that must not happen twice: RFC 9112, 9.3.1).
            self._close_backend()
            self.next_member -= 1
            return self._open_backend(reuse=False)
        why = "closed the connection without answering"
        if backend.error is not None:
            why = f"connection failed: {backend.error.strerror or backend.error}"
        self._target_failed(why)
        return self._fail(502, f"the backend {why}", broken=self.phase == SEND)

    def _body_piece(
        self, inbox: bytearray, prefix: bytes, kind: str, *, rechunk: bool
    ) -> tuple[bytes, bool]:
        """What ``inbox`` holds of a body framed by ``kind`` (none, length, chunked), taken
        from it and sent after ``prefix`` (a head not sent yet), and whether the body ended.
        A chunked body is decoded and sent re-chunked, or plain unless ``rechunk``; broken
        chunk framing raises :class:`HttpParseError`."""
        if kind == "none":
            return prefix, True
        if kind == "length":
            count = min(self.left, len(inbox))
            data = prefix + inbox[:count]
            del inbox[:count]
            self.left -= count
            return data, self.left == 0
        decoder = self.decoder
        assert decoder is not None
        pieces, used = decoder.feed(inbox)
        parts = [prefix] if prefix else []
        parts += [encode_chunk(piece) if rechunk else bytes(piece) for piece in pieces if piece]
        done = decoder.done
        if done and rechunk:
            parts.append(LAST_CHUNK)
        del inbox[:used]
        return b"".join(parts), done

    def _relay_body(self) -> bool:
        if self.out is not None:
            return False
        backend, plan = self.backend, self.plan
        assert backend is not None and plan is not None
        inbox, prefix, kind = backend.inbox, self.prefix, plan.framing.kind
        self.prefix = b""
        if kind != "close":
            try:
                data, done = self._body_piece(inbox, prefix, kind, rechunk=plan.rechunk)
            except HttpParseError as exc:
                if prefix:  # nothing of the response is out yet: the client can be told
                    return self._fail(502, f"the backend sent an invalid body: {exc}")
                self.record.fail("error", f"http: {exc}")
                self.finish()
                return False
        else:  # until the backend closes
            data = bytes(inbox)
            inbox.clear()
            if data and plan.rechunk:
                data = encode_chunk(data)
            data = prefix + data
            done = backend.eof
            if done and backend.error is None and plan.rechunk:
                data += LAST_CHUNK
        if data:
            self._send_client(data)
        if self.done:
            return False
        if done and not (kind == "close" and backend.error is not None):
            return self._exchange_done()
        if backend.eof:
            # Only an orderly close ends a body read until close: a lost connection may have
            # cut it, as may any end before the promised length or the last chunk.
            error = backend.error
            cut = (
                _LOST
                if error is None
                else f"the connection was lost before the end of the body: {error}"
            )
            self.record.fail("error", f"http: {cut}")
            self.closing = True
            if self.out is None:
                self.finish()
        return False

    def _exchange_done(self) -> bool:
        plan, head = self.plan, self.head
        assert plan is not None and head is not None
        self._settle()
        found = self.found
        log_request(
            self.record, head, found.route.name if found else None, plan.status, self.started
        )
        backend = self.backend
        if backend is not None and not (plan.backend_keep and backend.clean):
            self._close_backend()
        self.plan = None
        self.phase = HEAD
        if not plan.client_keep:
            self.closing = True
            if self.out is None:
                self.finish()
            return False
        return True

    # -- provided by the client's half (LaneClient, LaneSession) ---------------------------

    def _send_client(self, data: bytes) -> None:
        raise NotImplementedError

    def _fail(
        self, status: int, message: str, *, unread: bool = False, broken: bool = False
    ) -> bool:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError

    def _give_up(self) -> None:
        raise NotImplementedError

    def _wait(self, what: str, seconds: float) -> None:
        raise NotImplementedError

    def event(self, fd: int, events: int) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def _advance(self) -> None:
        raise NotImplementedError

    def _waits(self) -> tuple[float, float]:
        raise NotImplementedError

    def _on_timer(self) -> None:
        raise NotImplementedError

    def _switch(self, backend: LaneBackend, head: bytes) -> bool:
        raise NotImplementedError
