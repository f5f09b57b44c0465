"""HTTP/1.1 reverse proxying on the fast lane: no transport, task or stream per connection.

A :class:`LaneSession` serves one client connection whose requests go to routes with fixed
IP-literal targets (:func:`~smartroute.server.relay_plan.http_plan`), in plain HTTP or inside
TLS the lane terminates. The lane's epoll set reports the client's and the backend's socket
events to it, and each event moves the exchange on as far as it can: read the request head,
route it (:mod:`smartroute.server.decision`), carry the exchange with a backend out
(:mod:`smartroute.server.http.lane_exchange`), then the next request (pipelined ones in
order). This module holds the requests and the answers of the proxy's own; the client's
socket, its TLS, the timer and the end are :mod:`smartroute.server.http.lane_client`'s.

Backpressure as on the lane's relays: a side whose destination has bytes pending is not read
until they are gone, so a connection holds at most one chunk per direction, plus at most
``HELD`` bytes of pipelined requests or of a backend's early bytes.

Requests the lane does not carry - no route (404), a refusal, a redirect, static files, a
socket handler or raw forward, targets that need a resolver, TLS or a PROXY header, CONNECT,
a malformed head - go, with the connection, to the transport session
(:func:`~smartroute.server.actions.serve_http`) before anything of them is answered: it
answers them exactly as it answers every request it serves. A terminated connection cannot
change hands (its TLS state is here), so the lane terminates TLS only on ports where every
route forwards HTTP to fixed addresses, and answers a request without a route (404), a
refused one, CONNECT or a malformed one itself.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from smartroute.errors import HttpParseError
from smartroute.protocols.http import RequestHead, parse_request_head
from smartroute.protocols.http_response import BodyFraming, request_framing
from smartroute.routing.facts import RouteMatch
from smartroute.server.actions import serve_http
from smartroute.server.decision import (
    FirstRequest,
    Refusal,
    Verdict,
    decide_request,
    request_facts,
)
from smartroute.server.http.headers import connection_tokens
from smartroute.server.http.lane_client import LaneClient
from smartroute.server.http.lane_exchange import (
    DISCARD,
    HEAD,
    RELAY,
    SEND,
    TUNNEL,
    WAIT,
)
from smartroute.server.http.messages import Response, response_head, text_response
from smartroute.server.http.reverse_proxy import CONNECT_REFUSED
from smartroute.server.http.rewrite import (
    CONTINUE,
)
from smartroute.server.http.session import DISCARD_LIMIT, keeps_alive, log_request

if TYPE_CHECKING:
    from smartroute.routing.facts import ConnectionFacts


log = logging.getLogger("smartroute")


class LaneSession(LaneClient):
    """Serves the HTTP requests of one client connection on the lane."""

    __slots__ = ()

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
            elif phase == TUNNEL:
                going = self._tunnel()
            else:
                going = False  # CONNECT: the connect's event moves it on
            if not going:
                break
        if not self.done:
            self._rearm()

    def _next_request(self) -> bool:
        if self.out is not None or self.closing:
            return False  # the last response is still going out
        if self.tls is not None and not self.tls.ready:
            return False  # the handshake comes first, within its own wait
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
                    wait = self.record.timeouts.http_keepalive if self.head else self._waits()[0]
                    self._wait("idle", wait)
                    runtime.between_requests.add(self)
                return False
            runtime.between_requests.discard(self)
            try:
                parsed = parse_request_head(inbox)
            except HttpParseError as exc:
                if self.tls is None:
                    self._hand_over(None)  # the transport session answers what is wrong
                else:
                    self.record.fail("bad-request", str(exc))
                    self._answer_closing(text_response(exc.status, str(exc)))
                return False
            if parsed is None:
                if self.eof:
                    self.finish()
                elif self.waiting != "header":
                    self._wait("header", self._waits()[1])
                return False
            head = parsed
            facts = request_facts(self.record.port, self.facts.client_ip, head, self.tls_info)
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
        if found is None:
            group = None
        elif found.route is self.planned[0]:  # as for the last request: the usual case
            group = self.planned[1]
        else:
            group = self.lane.http_plan(found.route, port)
            self.planned = (found.route, group)
        try:
            framing = request_framing(head)
        except HttpParseError as exc:
            group, framing = None, None  # answered 400, and the connection closes
            error: HttpParseError | None = exc
        else:
            error = None
        if group is None or head.method == "CONNECT":
            if self.tls is not None:  # a terminated connection stays here: answer it
                return self._refuse(head, facts, found, None, framing, error)
            if found is None:
                record.fail("no-route", "no route matches")
                self._hand_over(FirstRequest(head, facts, None, decided=True))
            else:
                self._hand_over(FirstRequest(head, facts, found))
            return False
        assert found is not None and framing is not None
        verdict = decide_request(runtime, record, facts, head, found)
        if verdict is not found:
            if self.tls is not None:
                return self._refuse(head, facts, found, verdict, framing, None)
            self._hand_over(FirstRequest(head, facts, found, decided=True, verdict=verdict))
            return False
        self._take(head, facts, found)
        self.framing = framing
        self.upgrade = head.header("upgrade") if "upgrade" in self.tokens else None
        self.group, self.members, self.next_member = group, group.order(record.client_ip), 0
        if self.failures:
            self.failures = []
        if framing.kind != "none" and (head.header("expect") or "").lower() == "100-continue":
            self._send_client(CONTINUE)
        return self._open_backend(reuse=True)

    def _take(self, head: RequestHead, facts: ConnectionFacts, found: RouteMatch | None) -> None:
        """The request is this session's to answer from now on: its head leaves the inbox."""
        del self.inbox[: head.length]
        tokens = connection_tokens(head.headers)
        self.head, self.facts, self.found, self.tokens = head, facts, found, tokens
        self.keep_alive = keeps_alive(head.version, tokens) and self.runtime.accepting
        self.started = time.monotonic()

    # -- answers of the proxy's own ----------------------------------------------------------

    def _refuse(
        self,
        head: RequestHead,
        facts: ConnectionFacts,
        found: RouteMatch | None,
        verdict: Verdict,
        framing: BodyFraming | None,
        error: HttpParseError | None,
    ) -> bool:
        """Answer a request the lane does not forward on a connection it cannot hand over (a
        terminated one): no route, a refusal, CONNECT, broken framing (``error``, and then no
        ``framing``)."""
        self._take(head, facts, found)
        record = self.record
        if error is not None:
            record.fail("bad-request", str(error))
            return self._answer(text_response(error.status, str(error)), False)
        assert framing is not None
        self.framing = framing
        if head.method == "CONNECT":
            record.fail("refused", "CONNECT is not served by a reverse proxy route")
            return self._answer(CONNECT_REFUSED, False)
        if isinstance(verdict, Refusal):
            response = text_response(verdict.status, verdict.reason, list(verdict.headers))
        elif found is None:
            response = text_response(404, "no route for this request")
        else:  # a route the lane does not carry on a port it serves: not expected
            record.fail("refused", f"route {found.route.name!r} is not served over this TLS")
            return self._answer(text_response(502, "not served on this connection"), False)
        return self._reply(response, unread=True)

    def _fail(
        self, status: int, message: str, *, unread: bool = False, broken: bool = False
    ) -> bool:
        """Answer the request with ``status``: its exchange failed before the response head
        reached the client. ``unread``: the request body is still the client's to send (it is
        dropped if small); ``broken``: the client's connection cannot carry another request."""
        self.record.fail("backend-error", message)
        self._close_backend()
        self._settle()
        return self._reply(text_response(status, message), unread=unread, broken=broken)

    def _reply(self, response: Response, *, unread: bool = False, broken: bool = False) -> bool:
        """Answer the request with ``response`` (see :meth:`_fail` for the flags)."""
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
        if what == "handshake":
            self.record.fail(
                "tls-handshake", f"TLS handshake timed out after {self._waits()[0]:g}s"
            )
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
            self._target_failed(f"no answer within {timeouts.backend:g}s")
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

    def _hand_over(self, first: FirstRequest | None) -> None:
        """Give the connection to the transport session, at a request boundary."""
        backend = self.backend
        self._give_up()
        if backend is not None:
            self.backend = None
            self.runtime.lane_pool.release(backend)
        serve_http(self.runtime, self.sock, self.record, bytes(self.inbox), self.eof, first)
