"""The :class:`SmartRoute` proxy object: routes in, listening ports and live connections out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from functools import partial
from types import TracebackType
from typing import Any

from smartroute.admin import AdminServer, check_admin_port
from smartroute.certs.manager import CertificateManager
from smartroute.certs.settings import check_certificate_sources, check_cluster, validate_acme
from smartroute.errors import ConfigError, SmartRouteError
from smartroute.plugins.host import READY_TIMEOUT, PluginHost, route_summaries
from smartroute.proxy_sides import CertificateSide, worker_side
from smartroute.routing.defaults import apply_all
from smartroute.routing.explain import Explanation, explain_connection
from smartroute.routing.matcher import RouteTable
from smartroute.routing.model import CertificatePair, CompiledRoute, ForwardAction
from smartroute.routing.schema import RouteInput
from smartroute.routing.validation import validate_route, validate_routes
from smartroute.routing.validation.backends import forward_targets
from smartroute.routing.validation.match import check_protocols
from smartroute.server.accept import accept_socket
from smartroute.server.http.pool import targets_named_by
from smartroute.server.port_manager import PortManager
from smartroute.server.runtime import Runtime
from smartroute.server.workers.pool import WorkerPool, warn_per_worker_limits
from smartroute.server.workers.snapshots import WORKER_TOP_CLIENTS, merge_snapshots
from smartroute.server.workers.wire import encode_routes
from smartroute.settings import Settings, validate_settings

log = logging.getLogger("smartroute")


class SmartRoute:
    """A connection-routing proxy.

    Routes are validated when given (a :class:`~smartroute.ConfigError` names the bad field);
    :meth:`start` binds every port they use, once each. Route updates at runtime bind new
    ports, release unused ones and leave live connections on the other ports alone.

    With ``workers=N`` (N > 1) :meth:`start` also forks N - 1 worker processes that serve the
    same ports (see :mod:`smartroute.server.workers`); route changes reach every process and
    :meth:`stats` sums them.
    """

    def __init__(self, routes: Iterable[RouteInput] = (), **settings: Any) -> None:
        self._setup(validate_settings(settings), validate_routes(routes))

    @classmethod
    def _worker(
        cls, routes: tuple[CompiledRoute, ...], settings: Settings, slot: int
    ) -> SmartRoute:
        """The proxy of a forked worker: the parent's routes, its ports bound with SO_REUSEPORT."""
        proxy = cls.__new__(cls)
        proxy._setup(settings, routes, reuse_port=True, worker=slot)
        return proxy

    def _setup(
        self,
        settings: Settings,
        routes: tuple[CompiledRoute, ...],
        *,
        reuse_port: bool = False,
        worker: int = 0,
    ) -> None:
        self.settings: Settings = settings
        self._routes: tuple[CompiledRoute, ...] = routes
        self._runtime = Runtime(self.settings)
        self._ports = PortManager(
            self.settings.bind_address,
            partial(accept_socket, self._runtime),
            backlog=self.settings.backlog,
            reuse_port=reuse_port or self.settings.workers > 1,
            check_free=not worker,  # a worker binds ports its parent already holds
        )
        self._lock = asyncio.Lock()
        self._started = False
        self._name = f"smartroute worker {worker} (pid {os.getpid()})" if worker else "smartroute"
        self._workers: WorkerPool | None = None
        if self.settings.workers > 1:
            self._workers = WorkerPool(
                self.settings.workers, self._fork_state, self._lock, worker_side(type(self))
            )
        # Routes the proxy adds itself (the ACME HTTP-01 responder), kept across updates.
        self._internal: dict[str, CompiledRoute] = {}
        acme = validate_acme(self.settings.acme) if self.settings.acme is not None else None
        self._certs = CertificateManager(
            CertificateSide(self),
            acme,
            self.settings.certificate_provider,
            cluster=self.settings.workers > 1 or worker > 0,
        )
        check_cluster(acme, self._certs.cluster)
        self._runtime.alpn_responder = self._certs.challenges.alpn
        self._runtime.on_demand = self._certs.on_demand if acme is not None else None
        self._plugins = PluginHost(
            self.settings.plugins, lambda: route_summaries(self._routes), self._pushed
        )
        # The admin server runs in the parent process only (its stats() merges the workers').
        admin = self.settings.admin
        self._admin = AdminServer(admin, self) if admin is not None and not worker else None
        self._check(self._routes)

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

    @property
    def admin_port(self) -> int | None:
        """The admin server's bound port while it runs (useful with ``port: 0``), else None."""
        return self._admin.port if self._admin is not None else None

    def stats(self, top_clients: int = 20) -> dict[str, Any]:
        """Connections active/total and bytes in/out, overall and per route; the
        ``top_clients`` busiest client IPs; throughput over the last 10, 60 and 300 s;
        ``workers``, the number of processes counted.

        With ``workers=N`` the figures are this process's plus the latest snapshot of each
        worker (sent about once a second, so up to about a second old), summed field by field.
        """
        workers = self._workers
        if workers is None:
            return {**self._own_snapshot(top_clients), "workers": 1}
        own = self._own_snapshot(max(top_clients, WORKER_TOP_CLIENTS))
        merged = merge_snapshots([own, *workers.snapshots()], top_clients)
        return {**merged, "workers": workers.count}

    def explain(self, port: int, **inputs: Any) -> Explanation:
        """Which route takes a connection or request described by ``inputs`` (``sni``,
        ``host``, ``path``, ``client_ip``, ``headers``, ``protocol``, ``tls_version``,
        ``alpn``) and why every other route on ``port`` does not (``.text()``,
        ``.to_dict()``)."""
        return explain_connection(
            self._routes, port, hooked=lambda route: bool(self._hooks_of(route.name)), **inputs
        )

    def reopen_logs(self) -> int:
        """Reopen the access-log files (after a rotation renamed them), in this process and,
        with ``workers=N``, in every worker (told by SIGUSR1); returns how many files this
        process reopened. ``smartroute run`` calls it on SIGUSR1."""
        if self._workers is not None:
            for pid in self._workers.pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGUSR1)
        return self._runtime.stats.access.reopen()

    def certificates(self) -> list[dict[str, Any]]:
        """Every certificate the proxy serves now (provided or obtained): ``names``, ``label``
        (subject and files), ``not_after`` (Unix time), ``cert_path`` (None for PEM text)."""
        return self._runtime.certificates.describe()

    def plugin_status(self) -> dict[str, dict[str, Any]]:
        """Per plugin: ``ready``, ``starts`` (processes started, restarts included), ``hooks``."""
        return {
            process.spec.name: {
                "ready": process.ready,
                "starts": process.starts,
                "hooks": sorted(process.hooks),
            }
            for process in self._plugins.processes
        }

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
        """Bind every port the routes use; returns once all are listening (in every worker
        process too, with ``workers=N``)."""
        failed: BaseException | None = None
        async with self._lock:
            if self._started:
                raise SmartRouteError("the proxy is already started")
            self._runtime.accepting = True
            self._runtime.stats.access.open()
            if self._plugins.processes:
                await self._start_plugins()
            for name, route in self._certs.standing_routes().items():
                self._internal[name] = validate_route(route, -1, path=name)
            await self._install(self._routes, bind=True)
            self._started = True
            self._runtime.start_sweeper()
            self._runtime.backends.start()
            self._runtime.lane.open()
            try:
                await self._certs.start(self._routes)  # an unreachable store fails the start
            except BaseException as exc:
                failed = exc
            if self._workers is not None and failed is None:
                warn_per_worker_limits(self.settings, self._routes)
                try:
                    await self._workers.start()
                except BaseException as exc:  # undo it all (below, outside the lock)
                    failed = exc
            if self._admin is not None and failed is None:
                try:
                    await self._admin.start()
                except BaseException as exc:
                    failed = exc
        if failed is not None:
            await self.stop()
            raise failed
        log.info("%s listening on %s", self._name, _describe_ports(self.listening_ports))

    async def update_routes(self, routes: Iterable[RouteInput]) -> None:
        """Replace the whole route set; ports are diffed, not rebound."""
        compiled = validate_routes(routes)
        self._check(compiled)
        async with self._lock:
            await self._change(compiled)
        self._certs.routes_changed(compiled)

    async def add_route(self, route: RouteInput) -> None:
        """Add one route after the existing ones."""
        async with self._lock:
            taken = [r.name for r in self._routes]
            index = max((r.index for r in self._routes), default=-1) + 1
            compiled = validate_route(route, index, path="route", taken_names=taken)
            self._check((compiled,), "route")
            await self._change((*self._routes, compiled))
        self._certs.routes_changed(self._routes)

    async def remove_route(self, name: str) -> None:
        """Remove the route called ``name``; its port is released if no other route uses it."""
        async with self._lock:
            kept = tuple(r for r in self._routes if r.name != name)
            if len(kept) == len(self._routes):
                known = ", ".join(repr(r.name) for r in self._routes) or "none"
                raise ConfigError("remove_route", f"no route named {name!r} (routes: {known})")
            await self._change(kept)
        self._certs.routes_changed(self._routes)

    async def set_targets(self, route_name: str, targets: Any) -> None:
        """Replace the targets of the ``forward`` route called ``route_name`` (given as the
        route's own ``targets``: a list of target dicts or :class:`Target` objects).

        Only the targets change: the route keeps its place, port and match, no port is
        rebound, and connections under way go on with the targets they have; new connections
        and requests go to the new ones. Checked like a route's targets, errors name the
        target (``set_targets('api').targets[1].port``); on an error nothing changes.
        """
        async with self._lock:
            routes = self._routes
            found = [i for i, route in enumerate(routes) if route.name == route_name]
            if not found:
                known = ", ".join(repr(r.name) for r in routes) or "none"
                raise ConfigError("set_targets", f"no route named {route_name!r} (routes: {known})")
            index = found[0]
            route = routes[index]
            action = route.action
            if not isinstance(action, ForwardAction):
                raise ConfigError(
                    "set_targets",
                    f"route {route_name!r} is a {action.type!r} route: only forward routes have"
                    " targets",
                )
            where = f"set_targets({route_name!r}).targets"
            changed = replace(route, action=forward_targets(action, targets, where))
            await self._change((*routes[:index], changed, *routes[index + 1 :]))

    async def stop(self) -> None:
        """Stop accepting, let live connections finish (up to the grace period), close."""
        async with self._lock:
            if not self._started:
                return
            runtime = self._runtime
        if self._admin is not None:
            await self._admin.stop()  # outside the lock: a PUT under way may wait for it
        await self._certs.stop()  # outside the lock: it removes its own route
        async with self._lock:
            if not self._started:
                return
            self._started = False
            runtime.stop_accepting()
            await self._ports.close()
            grace = self.settings.graceful_shutdown_timeout
            workers = (
                asyncio.get_running_loop().create_task(self._workers.stop(grace))
                if self._workers is not None
                else None
            )
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
            await runtime.backends.close()
            await self._plugins.stop()
            await asyncio.to_thread(runtime.observers.close)
            runtime.pool.close()
            runtime.lane_pool.close()
            runtime.lane.close()
            await asyncio.sleep(0)  # let transports deliver connection_lost
            if workers is not None:
                await workers  # every worker reaped: stopped, or killed after the grace period
            runtime.stats.access.close()  # the last connections' lines are written
        log.info("%s stopped", self._name)

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

    async def _set_internal_route(self, name: str, route: RouteInput | None) -> None:
        """Add (or with None remove) a route of the proxy's own, kept across route updates
        (the certificate manager's ACME HTTP-01 responder)."""
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

    async def _replace_routes(self, routes: tuple[CompiledRoute, ...]) -> None:
        """Make an already validated route set current in this process alone, as it is (a
        worker's side of a route change: its parent sends the set)."""
        async with self._lock:
            await self._install(routes, bind=self._started)

    def _own_snapshot(self, top_clients: int) -> dict[str, Any]:
        """This process's figures only."""
        runtime = self._runtime
        return {**runtime.stats.snapshot(top_clients), "targets": runtime.backends.report()}

    def _fork_state(self) -> tuple[tuple[CompiledRoute, ...], Settings]:
        """What a new worker starts from (called under the lock)."""
        return self._routes, self.settings

    async def _change(self, routes: tuple[CompiledRoute, ...]) -> None:
        """Make ``routes`` current here and in every worker (the caller holds the lock).

        Routes the workers do not have yet must pickle: that is checked before anything
        changes. If a worker refuses the set, every process goes back to the previous one.
        """
        workers = self._workers
        if workers is None or not self._started:
            await self._install(routes, bind=self._started)
            return
        entries = encode_routes(self._routes, routes)
        previous = self._routes
        await self._install(routes, bind=True)
        try:
            await workers.install(entries)
        except BaseException:
            # The workers that refused still hold their ports: no probe for other holders.
            await self._install(previous, bind=True, check_free=False)
            raise

    async def _install(
        self, routes: tuple[CompiledRoute, ...], *, bind: bool, check_free: bool = True
    ) -> None:
        """Make ``routes`` current; on a bind failure the previous set stays in force."""
        runtime = self._runtime
        # The proxy's own routes (ACME challenges) must stay reachable by the CA: the default
        # security block (an IP allow list, say) is for user routes only.
        effective = [
            *apply_all(self._internal.values(), runtime.timeouts, None),
            *apply_all(
                routes,
                runtime.timeouts,
                self.settings.security,
                self._hooks_of,
                self.settings.hook_timeout,
                self.settings.bandwidth,
            ),
        ]
        backends = runtime.backends
        table = RouteTable(effective, backends.prepare(effective), backends.down)
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
                await self._ports.sync(table.port_counts, check_free=check_free)
            except BaseException:
                self._runtime.table = previous
                raise
        else:
            self._runtime.table = table
        self._routes = routes
        wanted = targets_named_by(effective)
        runtime.pool.retain(wanted)  # no idle links to dropped backends
        runtime.lane_pool.retain(wanted)
        runtime.backends.retain(effective)

    def _hooks_of(self, route: str) -> tuple[object, ...]:
        """The proxy-wide hooks of ``route``: the ``hooks`` setting's, then its plugins'."""
        return self.settings.hooks + self._plugins.hooks_for(route)

    async def _start_plugins(self) -> None:
        """Start the plugins and give them until they are ready (bounded) before any port
        opens; one that is not ready by then keeps starting, its hooks failing meanwhile."""
        plugins = self._plugins
        plugins.start()
        ready = await asyncio.gather(
            *(process.wait_ready(READY_TIMEOUT) for process in plugins.processes)
        )
        for process, up in zip(plugins.processes, ready, strict=True):
            if not up:
                log.warning(
                    "plugin %s is not ready after %gs: its hooks fail until it is",
                    process.spec.name,
                    READY_TIMEOUT,
                )

    async def _pushed(self, route: str, targets: Any) -> None:
        """A plugin's ``set_targets``."""
        await self.set_targets(route, targets)

    def _check(self, routes: Sequence[CompiledRoute], path: str = "routes") -> None:
        """What validating a route alone cannot tell: the protocols its match names exist,
        and its auto certificates have a source."""
        check_protocols(routes, self.settings.protocols.names, path)
        check_certificate_sources(routes, self._certs.settings, self._certs.provider is not None)
        admin = self.settings.admin
        if admin is not None:
            check_admin_port(routes, self.admin_port or admin.port, path)


def _describe_ports(ports: dict[int, int]) -> str:
    return ", ".join(f"{port} ({count} route{'s' * (count != 1)})" for port, count in ports.items())
