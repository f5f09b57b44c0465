"""The :class:`SmartRoute` proxy object: routes in, listening ports and live connections out."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from smartroute.errors import ConfigError, SmartRouteError
from smartroute.routing.matcher import RouteTable
from smartroute.routing.model import CertificatePair, CompiledRoute
from smartroute.routing.schema import RouteInput
from smartroute.routing.validation import validate_route, validate_routes
from smartroute.server.pipeline import InboundConnection
from smartroute.server.port_manager import PortManager
from smartroute.server.runtime import Runtime
from smartroute.settings import Settings, validate_settings

log = logging.getLogger("smartroute")


class SmartRoute:
    """A connection-routing proxy.

    Routes are validated when given (a :class:`~smartroute.ConfigError` names the bad field);
    :meth:`start` binds every port they use, once each. Route updates at runtime bind new
    ports, release unused ones and leave live connections on the other ports alone.
    """

    def __init__(self, routes: Iterable[RouteInput] = (), **settings: Any) -> None:
        self.settings: Settings = validate_settings(settings)
        self._routes: tuple[CompiledRoute, ...] = validate_routes(routes)
        self._runtime = Runtime(self.settings)
        self._ports = PortManager(
            self.settings.bind_address, self._protocol_factory, backlog=self.settings.backlog
        )
        self._lock = asyncio.Lock()
        self._started = False

    # -- public surface ----------------------------------------------------------------------

    @property
    def routes(self) -> tuple[CompiledRoute, ...]:
        """The current validated routes, in definition order."""
        return self._routes

    @property
    def listening_ports(self) -> dict[int, int]:
        """Every bound port and the number of routes using it."""
        return self._ports.counts

    @property
    def is_running(self) -> bool:
        return self._started

    def stats(self) -> dict[str, Any]:
        """Connections active/total and bytes in/out, overall, per route and per client IP."""
        return self._runtime.stats.snapshot()

    async def start(self) -> None:
        """Bind every port the routes use; returns once all are listening."""
        async with self._lock:
            if self._started:
                raise SmartRouteError("the proxy is already started")
            self._runtime.accepting = True
            await self._install(self._routes, bind=True)
            self._started = True
            self._runtime.start_sweeper()
        log.info("smartroute listening on %s", _describe_ports(self.listening_ports))

    async def update_routes(self, routes: Iterable[RouteInput]) -> None:
        """Replace the whole route set; ports are diffed, not rebound."""
        compiled = validate_routes(routes)
        async with self._lock:
            await self._install(compiled, bind=self._started)

    async def add_route(self, route: RouteInput) -> None:
        """Add one route after the existing ones."""
        async with self._lock:
            taken = [r.name for r in self._routes]
            index = max((r.index for r in self._routes), default=-1) + 1
            compiled = validate_route(route, index, path="route", taken_names=taken)
            await self._install((*self._routes, compiled), bind=self._started)

    async def remove_route(self, name: str) -> None:
        """Remove the route called ``name``; its port is released if no other route uses it."""
        async with self._lock:
            kept = tuple(r for r in self._routes if r.name != name)
            if len(kept) == len(self._routes):
                known = ", ".join(repr(r.name) for r in self._routes) or "none"
                raise ConfigError("remove_route", f"no route named {name!r} (routes: {known})")
            await self._install(kept, bind=self._started)

    async def stop(self) -> None:
        """Stop accepting, let live connections finish (up to the grace period), close."""
        async with self._lock:
            if not self._started:
                return
            self._started = False
            runtime = self._runtime
            runtime.accepting = False
            await self._ports.close()
            for record in list(runtime.stats.active):
                if record.route is None and record.closer is not None:
                    record.closer()  # still being routed: nothing to drain
            deadline = time.monotonic() + self.settings.graceful_shutdown_timeout
            while runtime.stats.active and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            for record in list(runtime.stats.active):
                record.fail("shutdown", "still open when the grace period ended")
                if record.closer is not None:
                    record.closer()
            for task in list(runtime.tasks):
                task.cancel()
            await asyncio.gather(*runtime.tasks, return_exceptions=True)
            await runtime.stop_sweeper()
            runtime.pool.close()
            await asyncio.sleep(0)  # let transports deliver connection_lost
        log.info("smartroute stopped")

    async def __aenter__(self) -> SmartRoute:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- internals ---------------------------------------------------------------------------

    def _protocol_factory(self, port: int) -> Callable[[], asyncio.Protocol]:
        runtime = self._runtime
        return lambda: InboundConnection(runtime, port)

    async def _install(self, routes: tuple[CompiledRoute, ...], *, bind: bool) -> None:
        """Make ``routes`` current; on a bind failure the previous set stays in force."""
        table = RouteTable(routes)
        provided = [
            r.tls.certificate
            for r in routes
            if r.tls is not None and isinstance(r.tls.certificate, CertificatePair)
        ]
        self._runtime.certificates.replace(provided)
        if bind:
            previous = self._runtime.table
            self._runtime.table = table  # new listeners must already see the new routes
            try:
                await self._ports.sync(table.port_counts)
            except BaseException:
                self._runtime.table = previous
                raise
        else:
            self._runtime.table = table
        self._routes = routes


def _describe_ports(ports: dict[int, int]) -> str:
    return ", ".join(f"{port} ({count} route{'s' * (count != 1)})" for port, count in ports.items())
