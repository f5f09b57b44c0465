"""The floor under an HTTP/1.1 reverse proxy written in Python, with smartroute's own parsers.

A measuring tool, not a proxy: one process, bare non-blocking sockets driven by callbacks from
one epoll set (the fast lane's design), every request head parsed by
:func:`~smartroute.protocols.http.parse_request_head`, matched by a real
:class:`~smartroute.routing.matcher.RouteTable`, rewritten by
:func:`~smartroute.server.http.headers.request_lines`, sent to one kept-alive backend
connection per client connection, and the response head parsed by
:func:`~smartroute.protocols.http_response.parse_response_head` and rewritten by
:func:`~smartroute.server.http.headers.response_lines`. Only what the benchmark's workload
needs is handled: GET requests without a body, responses with Content-Length. What it costs
per request is about the least a callback-driven HTTP path on the lane can cost.

    python bench/http_floor.py LISTEN_PORT BACKEND_PORT [--loop epoll|uvloop|asyncio]

``epoll`` (default) runs a bare ``epoll.poll()`` loop; ``uvloop`` and ``asyncio`` watch the same
epoll set from that event loop with one ``add_reader``, as the lane does. Stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import select
import signal
import socket
from collections.abc import Callable

from smartroute.protocols.http import parse_request_head
from smartroute.protocols.http_response import parse_response_head, response_framing
from smartroute.routing.facts import ConnectionFacts
from smartroute.routing.matcher import RouteTable
from smartroute.routing.patterns import parse_ip
from smartroute.routing.validation import validate_routes
from smartroute.server.http.headers import connection_tokens, request_lines, response_lines
from smartroute.server.http.messages import status_line

IN, OUT = select.EPOLLIN, select.EPOLLOUT
CHUNK = 256 * 1024


class Exchange:
    """One client connection and its backend connection."""

    __slots__ = ("floor", "client", "backend", "inbox", "outbox", "client_ip", "port")

    def __init__(self, floor: Floor, client: socket.socket, backend: socket.socket) -> None:
        self.floor = floor
        self.client = client
        self.backend = backend
        self.inbox = bytearray()  # from the client, not yet a whole head
        self.outbox = bytearray()  # from the backend, not yet a whole response
        self.client_ip = parse_ip(client.getpeername()[0])
        self.port = client.getsockname()[1]

    def client_readable(self) -> None:
        try:
            data = self.client.recv(CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self.inbox += data
        head = parse_request_head(self.inbox)
        if head is None:
            return
        del self.inbox[: head.length]
        facts = ConnectionFacts(
            self.port, self.client_ip, domain=head.host, path=head.path, headers=head.header_map()
        )
        if self.floor.table.match(facts) is None:
            self.close()
            return
        tokens = connection_tokens(head.headers)
        lines = request_lines(head.headers, tokens, client_ip="127.0.0.1", proto="http")
        self.backend.send(f"{head.method} {head.origin} HTTP/1.1\r\n{lines}\r\n".encode("latin-1"))

    def backend_readable(self) -> None:
        try:
            data = self.backend.recv(CHUNK)
        except BlockingIOError:
            return
        if not data:
            self.close()
            return
        self.outbox += data
        response = parse_response_head(self.outbox)
        if response is None:
            return
        framing = response_framing("GET", response)
        end = response.length + framing.length
        if len(self.outbox) < end:
            return
        tokens = connection_tokens(response.headers)
        lines = response_lines(response.headers, tokens)
        head = f"{status_line(response.status)}{lines}Content-Length: {framing.length}\r\n"
        body = bytes(self.outbox[response.length : end])
        del self.outbox[:end]
        self.client.send(f"{head}Connection: keep-alive\r\n\r\n".encode("latin-1") + body)

    def close(self) -> None:
        for sock in (self.client, self.backend):
            self.floor.forget(sock.fileno())
            sock.close()


class Floor:
    """The listening socket, the epoll set and who is told of each descriptor's events."""

    def __init__(self, port: int, backend_port: int) -> None:
        routes = [{"match": {"ports": port}, "action": {"type": "forward", "protocol": "http",
                   "targets": [{"host": "127.0.0.1", "port": backend_port}]}}]  # fmt: skip
        self.table = RouteTable(validate_routes(routes))
        self.backend_port = backend_port
        self.epoll = select.epoll()
        self.handlers: dict[int, Callable[[], None]] = {}
        self.listener = socket.create_server(("127.0.0.1", port), backlog=1024)
        self.listener.setblocking(False)
        self.watch(self.listener, self.accept)

    def watch(self, sock: socket.socket, handler: Callable[[], None]) -> None:
        self.handlers[sock.fileno()] = handler
        self.epoll.register(sock.fileno(), IN)

    def forget(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            self.epoll.unregister(fd)

    def accept(self) -> None:
        for _ in range(64):
            try:
                client, _ = self.listener.accept()
            except BlockingIOError:
                return
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            backend = socket.create_connection(("127.0.0.1", self.backend_port))
            backend.setblocking(False)
            backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            exchange = Exchange(self, client, backend)
            self.watch(client, exchange.client_readable)
            self.watch(backend, exchange.backend_readable)

    def dispatch(self, timeout: float = 0) -> None:
        handlers = self.handlers
        for fd, _ in self.epoll.poll(timeout, 64):
            handler = handlers.get(fd)
            if handler is not None:
                handler()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("backend_port", type=int)
    parser.add_argument("--loop", choices=("epoll", "uvloop", "asyncio"), default="epoll")
    args = parser.parse_args()
    floor = Floor(args.port, args.backend_port)
    print("ready", flush=True)
    if args.loop == "epoll":
        running = [True]
        signal.signal(signal.SIGTERM, lambda *_: running.__setitem__(0, False))
        while running[0]:
            floor.dispatch(1.0)
        return
    if args.loop == "uvloop":
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    loop.add_reader(floor.epoll.fileno(), floor.dispatch)
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    loop.run_forever()


if __name__ == "__main__":
    main()
