"""The :class:`SmartRoute` proxy object: routes in, listening ports and live connections out."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from smartroute.certs.manager import CertificateManager
from smartroute.certs.settings import validate_acme
from smartroute.errors import ConfigError, SmartRouteError
from smartroute.routing.defaults import apply_all
from smartroute.routing.matcher import RouteTable
from smartroute.routing.model import CertificatePair, CompiledRoute
from smartroute.routing.schema import RouteInput
from smartroute.routing.validation import validate_route, validate_routes
from smartroute.server.http.pool import targets_named_by
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
        # Routes the proxy adds itself (the ACME HTTP-01 responder), kept across updates.
        self._internal: dict[str, CompiledRoute] = {}
        acme = validate_acme(self.settings.acme) if self.settings.acme is not None else None
        self._certs = CertificateManager(self, acme, self.settings.certificate_provider)
        self._runtime.alpn_responder = self._certs.alpn
        self._check_auto(self._routes)

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

    def stats(self, top_clients: int = 20) -> dict[str, Any]:
        """Connections active/total and bytes in/out, overall and per route; the
        ``top_clients`` busiest client IPs; throughput over the last 10, 60 and 300 s."""
        return self._runtime.stats.snapshot(top_clients)

    def certificate_status(self) -> dict[str, dict[str, Any]]:
        """Per auto-certificate domain: state (valid, pending, renewing, failed), source,
        expiry, last error and next attempt."""
        return self._certs.status()

    async def wait_for_certificates(self) -> dict[str, dict[str, Any]]:
        """Wait until every auto certificate was issued or failed; returns their status."""
        return await self._certs.settled()

    async def renew_certificates(
        self, domains: Iterable[str] | None = None
    ) -> dict[str, dict[str, Any]]:
        """Renew auto certificates now (all of them by default); returns their status."""
        if not self._started:
            raise SmartRouteError("start the proxy before renewing certificates")
        return await self._certs.renew(domains)

    async def start(self) -> None:
        """Bind every port the routes use; returns once all are listening."""
        async with self._lock:
            if self._started:
                raise SmartRouteError("the proxy is already started")
            self._runtime.accepting = True
            await self._install(self._routes, bind=True)
            self._started = True
            self._runtime.start_sweeper()
            await self._certs.start(self._routes)
        log.info("smartroute listening on %s", _describe_ports(self.listening_ports))

    async def update_routes(self, routes: Iterable[RouteInput]) -> None:
        """Replace the whole route set; ports are diffed, not rebound."""
        compiled = validate_routes(routes)
        self._check_auto(compiled)
        async with self._lock:
            await self._install(compiled, bind=self._started)
        self._certs.routes_changed(compiled)

    async def add_route(self, route: RouteInput) -> None:
        """Add one route after the existing ones."""
        async with self._lock:
            taken = [r.name for r in self._routes]
            index = max((r.index for r in self._routes), default=-1) + 1
            compiled = validate_route(route, index, path="route", taken_names=taken)
            self._check_auto((compiled,))
            await self._install((*self._routes, compiled), bind=self._started)
        self._certs.routes_changed(self._routes)

    async def remove_route(self, name: str) -> None:
        """Remove the route called ``name``; its port is released if no other route uses it."""
        async with self._lock:
            kept = tuple(r for r in self._routes if r.name != name)
            if len(kept) == len(self._routes):
                known = ", ".join(repr(r.name) for r in self._routes) or "none"
                raise ConfigError("remove_route", f"no route named {name!r} (routes: {known})")
            await self._install(kept, bind=self._started)
        self._certs.routes_changed(self._routes)

    async def stop(self) -> None:
        """Stop accepting, let live connections finish (up to the grace period), close."""
        async with self._lock:
            if not self._started:
                return
            runtime = self._runtime
        await self._certs.stop()  # outside the lock: it removes its own route
        async with self._lock:
            if not self._started:
                return
            self._started = False
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
        runtime = self._runtime
        # The proxy's own routes (ACME challenges) must stay reachable by the CA: the default
        # security block (an IP allow list, say) is for user routes only.
        effective = [
            *apply_all(self._internal.values(), runtime.timeouts, None),
            *apply_all(routes, runtime.timeouts, self.settings.security),
        ]
        table = RouteTable(effective)
        provided = [
            r.tls.certificate
            for r in routes
            if r.tls is not None and isinstance(r.tls.certificate, CertificatePair)
        ]
        self._runtime.certificates.replace([*provided, *self._certs.pairs()])
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
        runtime.pool.retain(targets_named_by(effective))  # no idle links to dropped backends

    async def _set_internal_route(self, name: str, route: RouteInput | None) -> None:
        """Add (or with None remove) a route of the proxy's own, kept across route updates."""
        async with self._lock:
            if route is None:
                if self._internal.pop(name, None) is None:
                    return
            else:
                self._internal[name] = validate_route(route, -1, path=name)
            await self._install(self._routes, bind=self._started)

    def _serve_certificate(self, new: CertificatePair, old: CertificatePair | None) -> None:
        """Serve ``new`` to new handshakes; ``old`` stays with the connections that use it."""
        self._runtime.certificates.add(new)
        if old is not None and old != new:
            self._runtime.certificates.remove(old)

    def _check_auto(self, routes: Iterable[CompiledRoute]) -> None:
        """``"certificate": "auto"`` needs the acme setting or a certificate provider."""
        if self._certs.settings is not None or self._certs.provider is not None:
            return
        for route in routes:
            if route.tls is not None and route.tls.certificate == "auto":
                raise ConfigError(
                    f"route {route.name!r}",
                    'tls.certificate "auto" needs the acme setting (or a certificate_provider)',
                )


def _describe_ports(ports: dict[int, int]) -> str:
    return ", ".join(f"{port} ({count} route{'s' * (count != 1)})" for port, count in ports.items())
