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

ProtocolFactory = Callable[[int], Callable[[], asyncio.Protocol]]

# Ports bound by any PortManager of this process, to tell "this process" from "another process".
_PROCESS_PORTS: dict[tuple[str, int], int] = {}


class PortManager:
    """Binds, shares and releases listening ports for one proxy."""

    def __init__(
        self,
        bind_address: str,
        protocol_factory: ProtocolFactory,
        *,
        backlog: int = 1024,
        reuse_port: bool = False,
        check_free: bool = True,
    ) -> None:
        self._address = bind_address
        self._factory = protocol_factory
        self._backlog = backlog
        self._reuse_port = reuse_port
        self._check_free = check_free
        self._probe_now = True  # False during a sync(check_free=False)
        self._servers: dict[int, asyncio.Server] = {}
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
            new = sorted(port for port in wanted if port not in self._servers)
            bound: list[int] = []
            self._probe_now = check_free
            try:
                for port in new:
                    self._servers[port] = await self._bind(port)
                    bound.append(port)
            except BaseException:
                for port in bound:
                    self._release(port)
                raise
            finally:
                self._probe_now = True
            for port in [port for port in self._servers if port not in wanted]:
                self._release(port)
            self._counts = {port: wanted[port] for port in sorted(wanted)}

    async def close(self) -> None:
        """Stop listening on every port; live connections are not touched."""
        async with self._lock:
            for port in list(self._servers):
                self._release(port)
            self._counts = {}

    async def _bind(self, port: int) -> asyncio.Server:
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
            sock.bind(sockaddr)
            sock.setblocking(False)
            server = await loop.create_server(self._factory(port), sock=sock, backlog=self._backlog)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                ours = any(held == port for _, held in _PROCESS_PORTS)
                holder = "another SmartRoute in this process" if ours else "another process"
                raise PortInUseError(port, self._address, holder) from exc
            raise SmartRouteError(f"cannot listen on {self._address}:{port}: {exc}") from exc
        _PROCESS_PORTS[key] = id(self)
        log.debug("listening on %s:%d", self._address, port)
        return server

    def _release(self, port: int) -> None:
        server = self._servers.pop(port)
        server.close()
        _PROCESS_PORTS.pop((self._address, port), None)
        self._counts.pop(port, None)
        log.debug("released %s:%d", self._address, port)


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
