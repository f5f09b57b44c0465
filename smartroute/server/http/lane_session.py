"""Plain HTTP/1.1 reverse proxying on the fast lane: no transport, task or stream per connection.

A :class:`LaneSession` serves one client connection whose requests go to routes with fixed
IP-literal targets (:func:`~smartroute.server.relay_plan.http_plan`). The lane's epoll set
reports the client's and the backend's socket events to it, and each event moves the exchange
on as far as it can: read the request head, route it (:mod:`smartroute.server.decision`),
connect or reuse a backend connection (:mod:`smartroute.server.http.lane_pool`), send the
rewritten head (:mod:`smartroute.server.http.rewrite`) and the body (by Content-Length or
re-chunked), read the response head, and send the response on, re-framed as the transport path
would. An upgrade (``101``) turns the connection into a byte relay
(:class:`~smartroute.server.socket_relay.SocketRelay`).

Backpressure as on the lane's relays: a side whose destination has bytes pending is not read
until they are gone, so a connection holds at most one chunk per direction, plus at most
``HELD`` bytes of pipelined requests or of a backend's early bytes.

Requests the lane does not carry - no route (404), a refusal, a redirect, static files, a
socket handler or raw forward, targets that need a resolver, TLS or a PROXY header, CONNECT,
a malformed head - go, with the connection, to the transport session
(:func:`~smartroute.server.actions.serve_http`) before anything of them is answered: it
answers them exactly as it answers every request it serves.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import TYPE_CHECKING

from smartroute.errors import HttpParseError
from smartroute.protocols.chunked import LAST_CHUNK, ChunkedDecoder, encode_chunk
from smartroute.protocols.http import RequestHead, parse_request_head
from smartroute.protocols.http_response import (
    BodyFraming,
    parse_response_head,
    request_framing,
    response_framing,
)
from smartroute.routing.matcher import RouteMatch
from smartroute.routing.model import ForwardAction
from smartroute.server.actions import serve_http
from smartroute.server.decision import FirstRequest, decide_request, request_facts
from smartroute.server.epoll_set import IN, OUT, TROUBLE
from smartroute.server.http.headers import connection_tokens
from smartroute.server.http.lane_pool import LaneBackend, connect
from smartroute.server.http.messages import Response, response_head, text_response
from smartroute.server.http.rewrite import (
    CONTINUE,
    ResponsePlan,
    backend_request_head,
    interim_head,
    plan_response,
    upgraded_head,
)
from smartroute.server.http.session import DISCARD_LIMIT, keeps_alive, log_request
from smartroute.server.relay_plan import Address
from smartroute.server.socket_relay import SocketRelay, established
from smartroute.server.stats import ConnectionRecord

if TYPE_CHECKING:
    from smartroute.routing.matcher import ConnectionFacts
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


class LaneSession:
    """Serves the HTTP requests of one client connection on the lane."""

    __slots__ = (
        "runtime",
        "lane",
        "sock",
        "fd",
        "mask",
        "record",
        "inbox",
        "eof",
        "out",
        "first",
        "phase",
        "closing",
        "done",
        "head",
        "facts",
        "found",
        "framing",
        "tokens",
        "keep_alive",
        "upgrade",
        "started",
        "backend",
        "to_backend",
        "reused",
        "addresses",
        "next_address",
        "failures",
        "prefix",
        "left",
        "decoder",
        "plan",
        "out_framing",
        "answer",
        "waiting",
        "deadline",
        "timer",
        "loop",
    )

    def __init__(
        self,
        runtime: Runtime,
        sock: socket.socket,
        record: ConnectionRecord,
        facts: ConnectionFacts,
        first: FirstRequest | None,
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
        self.addresses: tuple[Address, ...] = ()
        self.next_address = 0
        self.failures: list[str] = []
        self.prefix = b""  # a head to send before the body bytes that follow it
        self.left = 0  # body bytes still to come (Content-Length framing)
        self.decoder: ChunkedDecoder | None = None
        self.plan: ResponsePlan | None = None
        self.out_framing = self.framing
        self.answer: tuple[Response, bool] | None = None  # sent once DISCARD has dropped the body
        # One timer per session, moved lazily: see _wait.
        self.waiting = ""  # what the deadline is for ("": nothing)
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()
        record.closer = self.abort

    def start(self) -> None:
        self._advance()

    # -- events ------------------------------------------------------------------------------

    def event(self, fd: int, events: int) -> None:
        """The lane's epoll set reports ``events`` on ``fd``."""
        if fd == self.fd:
            if events & (OUT | TROUBLE) and self.out is not None:
                self._flush_client()
            if events & (IN | TROUBLE) and not self.done:
                self._read_client(events)
        else:
            backend = self.backend
            if backend is None or fd != backend.fd or self.done:
                return  # a stale event
            if self.phase == CONNECT:
                self._connect_reported(backend)
            else:
                if events & (OUT | TROUBLE) and self.to_backend is not None:
                    self._flush_backend(backend)
                if events & (IN | TROUBLE) and not self.done:
                    self._read_backend(backend)
        if not self.done:
            self._advance()

    def _read_client(self, events: int) -> None:
        lane = self.lane
        try:
            count = self.sock.recv_into(lane.buffer)
        except _RETRY:
            return
        except OSError as exc:
            self._client_lost(exc)
            return
        if not count:
            self.eof = True
            if events & TROUBLE and not events & IN:
                self._client_lost(ConnectionResetError("the client closed the connection"))
            return
        self.record.bytes_in += count
        self.inbox += lane.view[:count]

    def _read_backend(self, backend: LaneBackend) -> None:
        lane = self.lane
        try:
            count = backend.sock.recv_into(lane.buffer)
        except _RETRY:
            return
        except OSError as exc:
            backend.eof, backend.error = True, exc
            return
        if not count:
            backend.eof = True
            return
        backend.inbox += lane.view[:count]

    def _send_client(self, data: bytes) -> None:
        if self.out is not None:
            self.out += data
            return
        try:
            sent = self.sock.send(data)
        except _RETRY:
            sent = 0
        except OSError as exc:
            self._client_lost(exc)
            return
        self.record.bytes_out += sent
        if sent < len(data):
            self.out = data[sent:]

    def _flush_client(self) -> None:
        out = self.out
        assert out is not None
        try:
            sent = self.sock.send(out)
        except _RETRY:
            return
        except OSError as exc:
            self._client_lost(exc)
            return
        self.record.bytes_out += sent
        self.out = out[sent:] if sent < len(out) else None
        if self.out is None and self.closing:
            self.finish()

    def _send_backend(self, backend: LaneBackend, data: bytes) -> None:
        if self.to_backend is not None:
            self.to_backend += data
            return
        try:
            sent = backend.sock.send(data)
        except _RETRY:
            sent = 0
        except OSError as exc:
            backend.eof, backend.error = True, exc
            return
        if sent < len(data):
            self.to_backend = data[sent:]

    def _flush_backend(self, backend: LaneBackend) -> None:
        pending = self.to_backend
        assert pending is not None
        try:
            sent = backend.sock.send(pending)
        except _RETRY:
            return
        except OSError as exc:
            backend.eof, backend.error = True, exc
            self.to_backend = None
            return
        self.to_backend = pending[sent:] if sent < len(pending) else None

    def _rearm(self) -> None:
        """Watch for what the session waits on now: bytes to read, room to write."""
        phase, backend = self.phase, self.backend
        reading = not self.eof and not self.closing
        if reading:
            if phase == SEND:
                reading = self.to_backend is None
            elif phase != DISCARD:
                reading = len(self.inbox) < HELD
        client = (IN if reading else 0) | (OUT if self.out is not None else 0)
        lane = self.lane
        if client != self.mask:
            lane.watch(self.fd, self.mask, client, self)
            self.mask = client
        if backend is not None:
            if phase == CONNECT:
                wanted = OUT
            else:
                wanted = OUT if self.to_backend is not None else 0
                if not backend.eof and self.out is None and len(backend.inbox) < HELD:
                    wanted |= IN
            if wanted != backend.mask:
                lane.watch(backend.fd, backend.mask, wanted, self)
                backend.mask = wanted

    # -- the state machine -------------------------------------------------------------------

    def _advance(self) -> None:
        """Move the exchange on until it must wait for an event."""
        while not self.done:
            phase = self.phase
            if phase == HEAD:
                going = self._next_request()
            elif phase == SEND:
                going = self._send_body()
            elif phase == WAIT:
                going = self._await_response()
            elif phase == RELAY:
                going = self._relay_body()
            elif phase == DISCARD:
                going = self._discard()
            else:
                going = False  # CONNECT: the connect's event moves it on
            if not going:
                break
        if not self.done:
            self._rearm()

    def _next_request(self) -> bool:
        if self.out is not None or self.closing:
            return False  # the last response is still going out
        runtime, inbox = self.runtime, self.inbox
        first = self.first
        if first is not None:
            head = first.head
            if len(inbox) < head.length:
                if self.eof:
                    self.finish()
                return False
            self.first = None
            facts, found = first.facts, first.found
        else:
            if not inbox:
                if self.eof or (self.head is not None and not runtime.accepting):
                    self.finish()  # the client left, or the proxy stops: no next request
                    return False
                if self.waiting != "idle":
                    self._wait("idle", self._waits()[0])
                    runtime.between_requests.add(self)
                return False
            runtime.between_requests.discard(self)
            try:
                parsed = parse_request_head(inbox)
            except HttpParseError:
                self._hand_over(None)  # the transport session answers what is wrong
                return False
            if parsed is None:
                if self.eof:
                    self.finish()
                elif self.waiting != "header":
                    self._wait("header", self._waits()[1])
                return False
            head = parsed
            facts = request_facts(self.record.port, self.facts.client_ip, head, None)
            found = runtime.table.match(facts)
        self.waiting = ""
        return self._route(head, facts, found)

    def _waits(self) -> tuple[float, float]:
        """How long a request may take to start and to arrive whole. Before the first one the
        route is not known, so the most patient route on the port sets both; later the last
        request's route does (``http_keepalive`` and ``http_header``)."""
        timeouts = self.record.timeouts
        if self.head is not None:
            return timeouts.http_keepalive, timeouts.http_header
        waits = self.runtime.table.waits(self.record.port)
        return (timeouts.initial_data, timeouts.http_header) if waits is None else waits

    def _route(self, head: RequestHead, facts: ConnectionFacts, found: RouteMatch | None) -> bool:
        """Decide the request; go on with it here, or give the connection to a transport."""
        runtime, record = self.runtime, self.record
        port = record.port
        addresses = None if found is None else self.lane.http_plan(found.route, port)
        try:
            framing = request_framing(head)
        except HttpParseError:
            addresses = None  # the transport session answers 400 and closes
        if addresses is None or head.method == "CONNECT":
            if found is None:
                record.fail("no-route", "no route matches")
                self._hand_over(FirstRequest(head, facts, None, decided=True))
            else:
                self._hand_over(FirstRequest(head, facts, found))
            return False
        assert found is not None
        verdict = decide_request(runtime, record, facts, head, found)
        if verdict is not found:
            self._hand_over(FirstRequest(head, facts, found, decided=True, verdict=verdict))
            return False
        del self.inbox[: head.length]
        tokens = connection_tokens(head.headers)
        self.head, self.facts, self.found, self.framing, self.tokens = (
            head,
            facts,
            found,
            framing,
            tokens,
        )
        self.keep_alive = keeps_alive(head.version, tokens) and runtime.accepting
        self.upgrade = head.header("upgrade") if "upgrade" in tokens else None
        self.started = time.monotonic()
        if len(addresses) > 1:
            action = found.route.action
            assert isinstance(action, ForwardAction)
            start = action.rotation.next() % len(addresses)
            addresses = addresses[start:] + addresses[:start]
        self.addresses, self.next_address, self.failures = addresses, 0, []
        if framing.kind != "none" and (head.header("expect") or "").lower() == "100-continue":
            self._send_client(CONTINUE)
        return self._open_backend(reuse=True)

    # -- the backend connection --------------------------------------------------------------

    def _open_backend(self, *, reuse: bool) -> bool:
        """Use the kept, a pooled or a new connection to the next address that takes one."""
        pooled = reuse and self.upgrade is None
        record = self.record
        while self.next_address < len(self.addresses):
            address = self.addresses[self.next_address]
            self.next_address += 1
            record.target = address[2]
            backend = self.backend
            if backend is not None:
                if pooled and backend.target == address[1] and backend.clean:
                    self.reused = True
                    return self._begin()
                self._let_go_backend()
            if pooled:
                backend = self.runtime.lane_pool.take(address[1])
                if backend is not None:
                    self.lane.watch(backend.fd, backend.mask, backend.mask, self)  # ours now
                    self.backend, self.reused = backend, True
                    return self._begin()
            try:
                backend, ready = connect(address)
            except OSError as exc:
                self.failures.append(f"{address[2]} {exc.strerror or exc}")
                continue
            self.backend, self.reused = backend, False
            if ready:
                return self._begin()
            self.phase = CONNECT
            self._wait("connect", record.timeouts.connect)
            return False
        self.phase = HEAD  # no exchange: the answer is the proxy's own
        return self._fail(502, "backend unreachable: " + "; ".join(self.failures), unread=True)

    def _connect_reported(self, backend: LaneBackend) -> None:
        code = backend.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._connect_failed(backend, os.strerror(code))
        elif established(backend.sock):
            self.waiting = ""
            self._begin()
        # else: a stale event, the connect is still under way

    def _connect_failed(self, backend: LaneBackend, why: str) -> None:
        self.failures.append(f"{backend.address[2]} {why}")
        self._close_backend()
        self._open_backend(reuse=False)

    def _begin(self) -> bool:
        """The backend connection is ready: send the request's head (and body) to it."""
        head, backend = self.head, self.backend
        assert head is not None and backend is not None
        self.prefix = backend_request_head(
            head,
            self.framing,
            self.tokens,
            client_ip=self.record.client_ip,
            tls=False,
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
        inbox, prefix, kind = self.inbox, self.prefix, self.framing.kind
        self.prefix = b""
        if kind == "none":
            data, done = prefix, True
        elif kind == "length":
            count = min(self.left, len(inbox))
            data = prefix + inbox[:count]
            del inbox[:count]
            self.left -= count
            done = self.left == 0
        else:
            decoder = self.decoder
            assert decoder is not None
            try:
                pieces, used = decoder.feed(inbox)
            except HttpParseError as exc:
                # A malformed body: the backend never sees the request complete, and the
                # client is told why before its connection ends.
                self._close_backend()
                return self._fail(exc.status, str(exc), broken=True)
            parts = [prefix] if prefix else []
            parts += [encode_chunk(piece) for piece in pieces if piece]
            done = decoder.done
            if done:
                parts.append(LAST_CHUNK)
            del inbox[:used]
            data = b"".join(parts)
        if data:
            self._send_backend(backend, data)
        if done:
            self.phase = WAIT
            self._wait("backend", self.record.timeouts.backend)
            return True
        if self.eof and not inbox:
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
        tokens = connection_tokens(response.headers)
        if status == 101:
            if self.upgrade is None:
                return self._fail(502, "the backend switched protocols unasked (101)")
            self._switch(backend, upgraded_head(response, tokens, self.upgrade))
            return False
        try:
            out = response_framing(head.method, response)
        except HttpParseError as exc:
            return self._fail(502, f"the backend sent an invalid response: {exc}")
        if out.codings and head.version == "HTTP/1.0":
            return self._fail(
                502,
                f"the response's transfer coding {out.codings!r} cannot reach an HTTP/1.0 client",
            )
        keep_alive = self.keep_alive and self.runtime.accepting  # a stopping proxy: "go"
        plan = self.plan = plan_response(head, response, tokens, out, keep_alive)
        self.out_framing, self.left, self.prefix = out, out.length, plan.head
        self.decoder = ChunkedDecoder(error_status=502) if out.kind == "chunked" else None
        self.phase = RELAY
        return True

    def _backend_gone(self, backend: LaneBackend) -> bool:
        """The backend closed or lost the connection before its response head."""
        if self.reused and self.framing.kind == "none" and not backend.inbox:
            # A kept connection the backend had closed meanwhile: once more, on a new one.
            self._close_backend()
            self.next_address -= 1
            return self._open_backend(reuse=False)
        why = "closed the connection without answering"
        if backend.error is not None:
            why = f"connection failed: {backend.error.strerror or backend.error}"
        return self._fail(502, f"the backend {why}", broken=self.phase == SEND)

    def _relay_body(self) -> bool:
        if self.out is not None:
            return False
        backend, plan = self.backend, self.plan
        assert backend is not None and plan is not None
        inbox, prefix, kind = backend.inbox, self.prefix, self.out_framing.kind
        self.prefix = b""
        if kind == "none":
            data, done = prefix, True
        elif kind == "length":
            count = min(self.left, len(inbox))
            data = prefix + inbox[:count]
            del inbox[:count]
            self.left -= count
            done = self.left == 0
        elif kind == "chunked":
            decoder = self.decoder
            assert decoder is not None
            try:
                pieces, used = decoder.feed(inbox)
            except HttpParseError as exc:
                if prefix:  # nothing of the response is out yet: the client can be told
                    return self._fail(502, f"the backend sent an invalid body: {exc}")
                self.record.fail("error", f"http: {exc}")
                self.finish()
                return False
            rechunk = plan.rechunk
            parts = [prefix] if prefix else []
            parts += [encode_chunk(piece) if rechunk else bytes(piece) for piece in pieces if piece]
            done = decoder.done
            if done and rechunk:
                parts.append(LAST_CHUNK)
            del inbox[:used]
            data = b"".join(parts)
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

    def _switch(self, backend: LaneBackend, head: bytes) -> None:
        """The backend switched protocols: from here on, a byte relay between the two."""
        record = self.record
        record.outcome = "upgraded"
        found = self.found
        assert found is not None and self.head is not None
        log_request(record, self.head, found.route.name, 101, self.started)
        to_client = (self.out or b"") + head + bytes(backend.inbox)
        to_backend = (self.to_backend or b"") + bytes(self.inbox)
        self._give_up()
        if backend.mask:
            self.lane.forget(backend.fd)
            backend.mask = 0
        self.backend = None
        relay = SocketRelay(self.lane, self.sock, record, found.route.name, (backend.address,))
        relay.join(backend.sock, to_backend, to_client)

    # -- answers of the proxy's own ----------------------------------------------------------

    def _fail(
        self, status: int, message: str, *, unread: bool = False, broken: bool = False
    ) -> bool:
        """Answer the request with ``status``: its exchange failed before the response head
        reached the client. ``unread``: the request body is still the client's to send (it is
        dropped if small); ``broken``: the client's connection cannot carry another request."""
        self.record.fail("backend-error", message)
        self._close_backend()
        response = text_response(status, message)
        keep = self.keep_alive and not broken and self.runtime.accepting
        framing, head = self.framing, self.head
        assert head is not None
        if unread and framing.kind != "none":
            expects = (head.header("expect") or "").lower() == "100-continue"
            if (
                keep
                and framing.kind == "length"
                and framing.length <= DISCARD_LIMIT
                and not expects
            ):
                self.left, self.answer, self.phase = framing.length, (response, keep), DISCARD
                return True
            keep = False
        return self._answer(response, keep)

    def _discard(self) -> bool:
        count = min(self.left, len(self.inbox))
        del self.inbox[:count]
        self.left -= count
        if self.left:
            if self.eof:
                self.finish()
            return False
        answer = self.answer
        assert answer is not None
        self.answer = None
        return self._answer(*answer)

    def _answer(self, response: Response, keep: bool) -> bool:
        head = self.head
        assert head is not None
        data = response_head(response, keep_alive=keep)
        if head.method != "HEAD":
            data += response.body
        self._send_client(data)
        found = self.found
        log_request(
            self.record, head, found.route.name if found else None, response.status, self.started
        )
        if self.done:
            return False
        self.phase = HEAD
        if not keep:
            self.closing = True
            if self.out is None:
                self.finish()
            return False
        return True

    # -- time limits -------------------------------------------------------------------------

    def _wait(self, what: str, seconds: float) -> None:
        """Wait for ``what`` at most ``seconds``. The session's one timer is not moved when a
        wait ends early or a later deadline replaces an earlier one: it fires, finds the
        deadline moved or the wait over, and sets itself again or ends. A kept-alive
        connection therefore costs no timer operation per request."""
        loop = self.loop
        self.waiting = what
        self.deadline = deadline = loop.time() + seconds
        timer = self.timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self.timer = loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        what = self.waiting
        if self.done or not what:
            return
        loop = self.loop
        if loop.time() < self.deadline:
            self.timer = loop.call_at(self.deadline, self._on_timer)
            return
        self.waiting = ""
        timeouts = self.record.timeouts
        if what == "idle":
            self.finish()
            return
        if what == "header":
            self.record.fail("timeout", f"request head not complete in {self._waits()[1]:g}s")
            self._answer_closing(text_response(408, "request head not received in time"))
            return
        backend = self.backend
        if what == "connect" and backend is not None:
            self._connect_failed(backend, f"timed out after {timeouts.connect:g}s")
        elif what == "backend" and self.phase == WAIT:
            self._fail(504, f"the backend did not answer within {timeouts.backend:g}s")
        if not self.done:
            self._advance()

    def _answer_closing(self, response: Response) -> None:
        """An answer before any request was read whole: send it and close."""
        self._send_client(response_head(response, keep_alive=False) + response.body)
        self.closing = True
        if self.out is None:
            self.finish()
        elif not self.done:
            self._rearm()

    # -- ending ------------------------------------------------------------------------------

    def _client_lost(self, exc: OSError) -> None:
        self.record.fail("error", f"client: {exc.strerror or exc}")
        self.finish()

    def close(self) -> None:
        """End a kept-alive connection between two requests (the proxy is stopping)."""
        self.finish()

    def abort(self) -> None:
        """Close both connections now, dropping whatever is pending (limits and shutdown)."""
        self.finish()

    def finish(self) -> None:
        """Close the client's connection (and the backend's, unless it may serve another
        client) and count the connection as ended."""
        if self.done:
            return
        backend = self.backend
        clean = self.phase == HEAD and self.plan is None and self.to_backend is None
        self._give_up()
        if backend is not None:
            self.backend = None
            if clean:
                self.runtime.lane_pool.release(backend)
            else:
                backend.close(self.lane)
        self.sock.close()
        self.runtime.stats.finished(self.record)

    def _give_up(self) -> None:
        """Stop serving the client's connection: no more events, no timer, no stop notice."""
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.runtime.between_requests.discard(self)
        if self.mask:
            self.lane.forget(self.fd)
            self.mask = 0

    def _hand_over(self, first: FirstRequest | None) -> None:
        """Give the connection to the transport session, at a request boundary."""
        backend = self.backend
        self._give_up()
        if backend is not None:
            self.backend = None
            self.runtime.lane_pool.release(backend)
        serve_http(self.runtime, self.sock, self.record, bytes(self.inbox), self.eof, first)
