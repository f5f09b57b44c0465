"""The first decision for every accepted socket: the fast lane, or a transport.

:func:`accept_socket` opens the connection's record and tries to route the connection without
an asyncio transport. When no route on the port needs the first bytes, the port and the client
address decide at once; when routes need them (SNI, say), :class:`SocketPeek` looks at them
with ``MSG_PEEK``, so nothing is consumed. If the winning route pipes bytes to fixed addresses
(:func:`~smartroute.server.socket_relay.relay_plan`), a
:class:`~smartroute.server.socket_relay.SocketRelay` takes the socket: no transport, no task,
and no byte of the client's copied before the backend is connected.

Everything else - HTTP, TLS termination, socket handlers, every connection of a proxy that
accepts PROXY protocol headers (whose first bytes must be checked for one: see
:mod:`smartroute.server.pipeline`), first bytes that do not arrive in one piece - is adopted
by an asyncio transport whose protocol is
:class:`~smartroute.server.pipeline.InboundConnection`, with the same record; bytes only
peeked at are still in the socket for it to read.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Any

from smartroute.certs.tls_alpn import ACME_TLS_ALPN
from smartroute.protocols.detect import Detection, detect
from smartroute.routing.facts import ConnectionFacts
from smartroute.routing.model import needs_http
from smartroute.routing.patterns import IPAddress, client_address
from smartroute.server.decision import (
    FirstRequest,
    Peeked,
    Refusal,
    decide_connection,
    detected_facts,
)
from smartroute.server.epoll_set import IN
from smartroute.server.http.lane_session import LaneSession
from smartroute.server.http.lane_tls import LaneTls, lane_context
from smartroute.server.pipeline import MAX_PEEK, InboundConnection
from smartroute.server.stats import ConnectionRecord

if TYPE_CHECKING:
    from smartroute.server.runtime import Runtime

log = logging.getLogger("smartroute")


def accept_socket(runtime: Runtime, sock: socket.socket, address: Any, port: int) -> None:
    """Open the record of a just-accepted socket and start routing it."""
    client_ip, client_text = client_address(address[0])
    record = ConnectionRecord(client_text, address[1], port, runtime.timeouts)
    runtime.stats.opened(record)
    settings = runtime.settings
    if not runtime.accepting or not runtime.lane.serves(port) or settings.accept_proxy_protocol:
        # The pipeline refuses, serves a port whose routes all need a transport (TLS
        # termination, HTTP, handlers, host names), or reads a trusted proxy's PROXY header
        # and refuses anyone else's, even on routes that pipe bytes without looking at them.
        adopt(runtime, sock, record)
    elif not runtime.table.needs_data(port):
        route_socket(runtime, sock, record, ConnectionFacts(port, client_ip))
    else:
        SocketPeek(runtime, sock, record, client_ip)


def route_socket(
    runtime: Runtime,
    sock: socket.socket,
    record: ConnectionRecord,
    facts: ConnectionFacts,
    detection: Detection | None = None,
    peeked: int = 0,
    waited: float = 0.0,
) -> None:
    """Decide the connection known by ``facts``; relay it on the fast lane if its route
    allows, else hand it, decided, to a transport (``detection`` and ``peeked``: what its
    first bytes are and how many were peeked at)."""
    verdict = decide_connection(runtime, record, facts)
    found = verdict.found if isinstance(verdict, Refusal) else verdict
    lane = runtime.lane
    head = None if detection is None else detection.head
    if (
        found is not None
        and found is verdict
        and (head is not None or (detection is None and needs_http(found.route.action)))
        and lane.http_plan(found.route, facts.port) is not None
    ):
        # Plain HTTP to fixed addresses: served on the lane, request by request.
        first = None if head is None else FirstRequest(head, facts, found)
        LaneSession(runtime, sock, record, facts, first).start()
        return
    hello = None if detection is None else detection.hello
    if (
        hello is not None
        and found is verdict
        and found is not None
        and found.route.terminates_tls
        and lane.terminates(facts.port)
        and lane.http_plan(found.route, facts.port) is not None
    ):
        context = lane_context(runtime, found.route, hello)
        if context is not None:  # else the transport path says what is wrong
            tls = found.route.tls
            assert tls is not None
            lane_tls = LaneTls(context, hello, tls.client_ca)
            LaneSession(runtime, sock, record, facts, None, lane_tls).start()
            return
    addresses = None if head is not None or found is None else lane.plan(found.route, facts.port)
    if addresses is None:
        adopt(runtime, sock, record, waited, Peeked(detection, peeked, True, verdict, facts))
    elif isinstance(verdict, Refusal):  # a byte pipe has no answer to give
        sock.close()
        runtime.stats.finished(record)
    else:
        assert found is not None
        runtime.lane.start(sock, record, found.route, addresses)


def adopt(
    runtime: Runtime,
    sock: socket.socket,
    record: ConnectionRecord,
    waited: float = 0.0,
    peeked: Peeked | None = None,
) -> None:
    """Hand ``sock`` to an asyncio transport and :class:`InboundConnection`.

    ``waited`` is how long the connection already waited for its first bytes; ``peeked``
    what the accept step learned of them, and its verdict if it made one.
    """
    record.closer = sock.close  # until the transport exists
    runtime.spawn(_adopt(runtime, sock, record, waited, peeked))


async def _adopt(
    runtime: Runtime,
    sock: socket.socket,
    record: ConnectionRecord,
    waited: float,
    peeked: Peeked | None,
) -> None:
    if sock.fileno() < 0:  # closed meanwhile (the proxy is stopping)
        runtime.stats.finished(record)
        return
    try:
        await asyncio.get_running_loop().connect_accepted_socket(
            lambda: InboundConnection(runtime, record, waited, peeked), sock
        )
    except OSError as exc:  # the client left before the transport was made
        record.fail("error", f"client: {exc}")
        sock.close()
        runtime.stats.finished(record)


class SocketPeek:
    """Waits for a connection's first bytes and routes on them without reading them."""

    __slots__ = ("runtime", "sock", "fd", "record", "client_ip", "timer", "started", "watched")

    def __init__(
        self, runtime: Runtime, sock: socket.socket, record: ConnectionRecord, client_ip: IPAddress
    ) -> None:
        self.runtime = runtime
        self.sock = sock
        self.fd = sock.fileno()
        self.record = record
        self.client_ip = client_ip
        loop = asyncio.get_running_loop()
        self.started = loop.time()
        waits = runtime.table.waits(record.port)
        wait = runtime.timeouts.initial_data if waits is None else waits[0]
        self.timer: asyncio.TimerHandle | None = loop.call_later(wait, self._timeout)
        record.closer = self.abort
        self.watched = False
        try:
            runtime.lane.watch(self.fd, 0, IN, self)
        except OSError:  # the lane cannot watch it (out of memory): a transport may
            self._hand_over()
            return
        self.watched = True

    def event(self, fd: int, events: int) -> None:
        """The socket is readable (or failed): look at what it holds."""
        try:
            data = self.sock.recv(MAX_PEEK, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._hand_over()  # the pipeline sees the error again and records it
            return
        table = self.runtime.table
        probes = self.runtime.settings.protocols if table.probing(self.record.port) else None
        detection = detect(data, probes=probes) if data else None
        # First bytes that do not decide yet go to the pipeline, which keeps reading them (the
        # socket stays readable while peeked bytes wait, so waiting here would spin).
        if detection is None:
            self._hand_over()
            return
        hello = detection.hello
        if detection.error is not None or (
            hello is not None and self.runtime.alpn_responder and ACME_TLS_ALPN in hello.alpn
        ):
            # The pipeline answers what was wrong, or answers a TLS-ALPN-01 validation; it
            # reads these bytes without looking at them again.
            self._hand_over(Peeked(detection, len(data)))
            return
        self._stop()
        facts = detected_facts(self.record.port, self.client_ip, detection)
        route_socket(
            self.runtime, self.sock, self.record, facts, detection, len(data), self._waited()
        )

    def _timeout(self) -> None:
        self.timer = None
        self._hand_over()  # with the whole wait spent, the pipeline routes what it has

    def _waited(self) -> float:
        return asyncio.get_running_loop().time() - self.started

    def _stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.watched:
            self.watched = False
            self.runtime.lane.watch(self.fd, IN, 0, self)

    def _hand_over(self, peeked: Peeked | None = None) -> None:
        self._stop()
        adopt(self.runtime, self.sock, self.record, self._waited(), peeked)

    def abort(self) -> None:
        """Close the connection while it is still being looked at (the proxy is stopping)."""
        self._stop()
        self.sock.close()
        self.runtime.stats.finished(self.record)
