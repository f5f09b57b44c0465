"""One listening socket per port, shared by every route that names the port.

The port manager keeps a reference count per port. :meth:`PortManager.sync` diffs the wanted
counts against what is bound: new ports are bound, ports no route uses any more are released,
and ports that stay are never touched, so their live connections carry on. Updates are
serialised with a lock; the manager never binds a port it already holds.

With ``reuse_port`` (``workers=N``) every worker process binds the same ports with
``SO_REUSEPORT`` and the kernel spreads new connections among them. The first process to bind
a port (``check_free``) still makes sure no other program holds it: a probe bound without
``SO_REUSEPORT`` fails while anyone listens there, so two proxies never share a port by
accident.

Each port is served by a :class:`Listener`: the listening socket is watched by the event loop
and every accepted socket goes to the proxy's handler as a plain socket, which either relays it
on the socket itself or wraps it in an asyncio transport (:mod:`smartroute.server.pipeline`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable, Mapping
from typing import Any

from smartroute.errors import PortInUseError, SmartRouteError

log = logging.getLogger("smartroute")

SocketHandler = Callable[[socket.socket, Any, int], None]
"""Takes an accepted socket (non-blocking), its peer address and the port it came in on."""

ACCEPT_BATCH = 64  # connections taken per readiness event, so one port cannot starve others
ACCEPT_RETRY = 1.0  # seconds to stop accepting after running out of file descriptors
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

# Ports bound by any PortManager of this process, to tell "this process" from "another process".
_PROCESS_PORTS: dict[tuple[str, int], int] = {}


class PortManager:
    """Binds, shares and releases listening ports for one proxy."""

    def __init__(
        self,
        bind_address: str,
        on_socket: SocketHandler,
        *,
        backlog: int = 1024,
        reuse_port: bool = False,
        check_free: bool = True,
    ) -> None:
        self._address = bind_address
        self._on_socket = on_socket
        self._backlog = backlog
        self._reuse_port = reuse_port
        self._check_free = check_free
        self._probe_now = True  # False during a sync(check_free=False)
        self._listeners: dict[int, Listener] = {}
        self._counts: dict[int, int] = {}
        self._lock = asyncio.Lock()

    @property
    def counts(self) -> dict[int, int]:
        """Bound ports and the number of routes using each."""
        return dict(self._counts)

    async def sync(self, wanted: Mapping[int, int], *, check_free: bool = True) -> None:
        """Bind ports that are new in ``wanted``, release those absent from it.

        If any new port cannot be bound, the ports bound by this call are released again and
        the error is raised: the manager is left as it was. ``check_free=False`` skips the
        probe of a ``reuse_port`` manager (a rollback to ports its own workers still hold).
        """
        async with self._lock:
            new = sorted(port for port in wanted if port not in self._listeners)
            bound: list[int] = []
            self._probe_now = check_free
            try:
                for port in new:
                    self._listeners[port] = await self._bind(port)
                    bound.append(port)
            except BaseException:
                for port in bound:
                    self._release(port)
                raise
            finally:
                self._probe_now = True
            for port in [port for port in self._listeners if port not in wanted]:
                self._release(port)
            self._counts = {port: wanted[port] for port in sorted(wanted)}

    async def close(self) -> None:
        """Stop listening on every port; live connections are not touched."""
        async with self._lock:
            for port in list(self._listeners):
                self._release(port)
            self._counts = {}

    async def _bind(self, port: int) -> Listener:
        key = (self._address, port)
        if key in _PROCESS_PORTS:
            raise PortInUseError(port, self._address, "another SmartRoute in this process")
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            self._address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            if self._reuse_port and self._check_free and self._probe_now:
                _probe(family, kind, proto, sockaddr)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self._reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            # Accepted sockets inherit it: no setsockopt per connection.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind(sockaddr)
            sock.setblocking(False)
            sock.listen(self._backlog)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                ours = any(held == port for _, held in _PROCESS_PORTS)
                holder = "another SmartRoute in this process" if ours else "another process"
                raise PortInUseError(port, self._address, holder) from exc
            raise SmartRouteError(f"cannot listen on {self._address}:{port}: {exc}") from exc
        _PROCESS_PORTS[key] = id(self)
        log.debug("listening on %s:%d", self._address, port)
        return Listener(sock, port, self._on_socket)

    def _release(self, port: int) -> None:
        listener = self._listeners.pop(port)
        listener.close()
        _PROCESS_PORTS.pop((self._address, port), None)
        self._counts.pop(port, None)
        log.debug("released %s:%d", self._address, port)


class Listener:
    """Accepts connections on one listening socket and hands each to ``on_socket``."""

    def __init__(self, sock: socket.socket, port: int, on_socket: SocketHandler) -> None:
        self._sock = sock
        self._port = port
        self._on_socket = on_socket
        self._loop = asyncio.get_running_loop()
        self._retry: asyncio.TimerHandle | None = None
        self._loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        sock, port, on_socket = self._sock, self._port, self._on_socket
        for _ in range(ACCEPT_BATCH):
            try:
                conn, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    # Waiting connections stay queued in the kernel until descriptors free up.
                    log.warning(
                        "port %d: cannot accept (%s); retrying in %gs", port, exc, ACCEPT_RETRY
                    )
                    self._loop.remove_reader(sock.fileno())
                    self._retry = self._loop.call_later(ACCEPT_RETRY, self._resume)
                    return
                continue  # the client went away before it was accepted (ECONNABORTED, ...)
            try:
                conn.setblocking(False)
                on_socket(conn, address, port)
            except Exception:  # one connection's failure must not stop the port
                log.exception("port %d: could not take a connection", port)
                conn.close()

    def _resume(self) -> None:
        self._retry = None
        self._loop.add_reader(self._sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop listening; connections already accepted are not touched."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        else:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()


def _probe(family: int, kind: int, proto: int, sockaddr: Any) -> None:
    """Bind (without SO_REUSEPORT, never listening) to see whether anyone holds the port."""
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        probe.bind(sockaddr)


def forget_inherited_ports() -> None:
    """In a forked worker: the parent's ports are the parent's, not this process's."""
    _PROCESS_PORTS.clear()
