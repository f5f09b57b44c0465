"""State shared by every connection of one proxy: settings, the current route table, stats."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from smartroute.routing.matcher import RouteTable
from smartroute.server.access_log import AccessLog
from smartroute.server.backends.book import Backends
from smartroute.server.bandwidth import BandwidthBook
from smartroute.server.hooks import run_disconnect_hooks
from smartroute.server.http.lane_pool import LanePool
from smartroute.server.http.pool import BackendPool
from smartroute.server.lane import RelayLane
from smartroute.server.observe import ObserverThread
from smartroute.server.security import SecurityGate
from smartroute.server.stats import ConnectionRecord, StatsBook
from smartroute.server.tls import CertificateIndex

if TYPE_CHECKING:
    from smartroute.certs.tls_alpn import TlsAlpnResponder
    from smartroute.routing.model import CertificatePair
from smartroute.settings import Settings

log = logging.getLogger("smartroute")


class Closable(Protocol):
    def close(self) -> None: ...


class Runtime:
    """The one object the connection pipeline reads; the proxy swaps ``table`` atomically."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.timeouts = settings.timeouts  # proxy-wide; routes carry their own
        self.table = RouteTable(())
        self.gate = SecurityGate()
        self.stats = StatsBook(
            on_release=self.gate.release,
            on_end=self._ended,
            access=AccessLog(settings.access_log),  # each worker process opens its own
        )
        self.tasks: set[asyncio.Task[Any]] = set()
        self.pool = BackendPool()
        self.backends = Backends()  # target groups, target health
        self.observers = ObserverThread()  # calls on_data observers, off the event loop
        self.bandwidth = BandwidthBook()  # the speed-limit buckets connections share
        self.lane = RelayLane(self)
        self.certificates = CertificateIndex()
        self.alpn_responder: TlsAlpnResponder | None = None  # pending TLS-ALPN-01 challenges
        # The certificate for a name on a "certificate": "on-demand" route, obtained if allowed
        self.on_demand: Callable[[str], Awaitable[CertificatePair | None]] | None = None
        self._proxies = [ipaddress.ip_network(n, strict=False) for n in settings.proxy_ips]
        self.accepting = True
        self.lane_pool = LanePool(self.lane)
        # HTTP clients between two requests on a kept-alive connection (their Stream objects,
        # see HttpSession, or the lane's sessions): a graceful stop closes them at once
        # instead of waiting for them.
        self.between_requests: set[Closable] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def stop_accepting(self) -> None:
        """Refuse new connections from now on; kept-alive HTTP clients are told to go (the
        idle ones closed now, the busy ones get ``Connection: close`` on their response)."""
        self.accepting = False
        for client in list(self.between_requests):
            client.close()

    def trusts(self, client_ip: str) -> bool:
        """True when ``client_ip`` is a proxy allowed to send PROXY protocol headers."""
        address = ipaddress.ip_address(client_ip)
        return any(address in network for network in self._proxies)

    def _ended(self, record: ConnectionRecord) -> None:
        """A connection whose route has ``on_disconnect`` hooks ended: tell them, off the
        connection's own path."""
        hooks, ctx = record.hooks, record.context
        assert hooks is not None and ctx is not None
        record.hooks = None
        info: dict[str, Any] = {
            "bytes_in": record.bytes_in,
            "bytes_out": record.bytes_out,
            "duration": time.monotonic() - record.started,
            "target": record.target,
            "error": record.error,
        }
        if record.observation is not None:
            info["observed"] = record.observation.report()
        self.spawn(run_disconnect_hooks(hooks, ctx, info))

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a connection task, keeping a strong reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("connection task failed", exc_info=exc)

    def start_sweeper(self) -> None:
        """Start the housekeeping task: idle, half-close and lifetime limits, stats samples."""
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def stop_sweeper(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None

    def sweep_interval(self) -> float:
        """A few checks per shortest limit in force (settings or any route), 50 ms to 1 s."""
        shortest = self.timeouts.shortest_limit(self.table.shortest_limit)
        return max(0.05, min(1.0, (shortest or 4.0) / 4))

    async def _sweep(self) -> None:
        """Close connections over their limits; once a second, sample the stats, close
        backend connections idle in the pool for too long.

        Runs a few times per timeout rather than touching a timer per chunk: the hot path only
        counts bytes, and this compares the counts between sweeps. A connection is idle when
        no byte moved either way; once one side sent EOF the (shorter) half-close limit
        applies too.
        """
        next_sample = 0.0
        while True:
            await asyncio.sleep(self.sweep_interval())
            now = time.monotonic()
            if now >= next_sample:
                self.stats.sample(now)
                self.pool.prune(now)
                self.lane_pool.prune(now)
                next_sample = now + 1.0
            for record in list(self.stats.active):
                self._check(record, now)

    def _check(self, record: ConnectionRecord, now: float) -> None:
        limits = record.timeouts
        moved = record.bytes_in + record.bytes_out
        if moved != record.seen_bytes:
            record.seen_bytes, record.seen_at = moved, now
            idle_for = 0.0
        else:
            idle_for = now - record.seen_at
        idle, half, lifetime = limits.idle, limits.half_close, limits.max_lifetime
        if idle is not None and idle_for >= idle:
            self._expire(record, "idle", f"no data for {idle:g}s")
        elif record.half_closed and half is not None and idle_for >= half:
            self._expire(record, "half-closed", f"half-closed with no data for {half:g}s")
        elif lifetime is not None and now - record.started >= lifetime:
            self._expire(record, "lifetime", f"open longer than {lifetime:g}s")

    @staticmethod
    def _expire(record: ConnectionRecord, outcome: str, why: str) -> None:
        record.fail(outcome, why)
        if record.closer is not None:
            record.closer()
