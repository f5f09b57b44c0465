"""Connection records and the counters behind ``SmartRoute.stats()``.

The hot path only adds to two integers on a :class:`ConnectionRecord`; totals per route and
per client IP are folded in once, when the connection ends. An HTTP connection's requests are
accounted one by one (:meth:`StatsBook.request`): the bytes moved since the last answered
request go to that request's route, with its method, status class and duration; only the rest
is folded under the connection's route at its end. Per-client totals are kept for at
most :data:`MAX_CLIENT_IPS` addresses (the busiest survive a prune), and a sample of the
running totals taken once a second gives the throughput over recent windows.
"""

from __future__ import annotations

import itertools
import time
from bisect import bisect_left
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from smartroute.context import RouteContext
from smartroute.routing.model import Hooks, Timeouts
from smartroute.server.access_log import AccessLog

if TYPE_CHECKING:
    from smartroute.protocols.http import RequestHead
    from smartroute.server.bandwidth import Limits
    from smartroute.server.observe import Observation

_ids = itertools.count(1)
_id_prefix = "c"


def set_id_prefix(prefix: str) -> None:
    """Name this process's connections ``<prefix><n>`` (worker processes: ``w2-c17``)."""
    global _id_prefix
    _id_prefix = prefix


class ConnectionRecord:
    """What one client connection did: where it went and how many bytes it moved."""

    __slots__ = (
        "id",
        "client_ip",
        "client_port",
        "port",
        "started",
        "route",
        "domain",
        "target",
        "bytes_in",
        "bytes_out",
        "outcome",
        "error",
        "seen_bytes",
        "seen_at",
        "closer",
        "admitted",
        "timeouts",
        "half_closed",
        "hooks",
        "context",
        "observation",
        "bandwidth",
        "book",
        "mark_in",
        "mark_out",
        "requests",
    )

    def __init__(self, client_ip: str, client_port: int, port: int, timeouts: Timeouts) -> None:
        self.id = f"{_id_prefix}{next(_ids)}"
        self.client_ip = client_ip
        self.client_port = client_port
        self.port = port
        self.started = time.monotonic()
        self.route: str | None = None
        self.domain: str | None = None
        self.target: str | None = None
        self.bytes_in = 0  # client -> proxy
        self.bytes_out = 0  # proxy -> client
        self.outcome = "open"
        self.error: str | None = None
        self.seen_bytes = 0  # bytes moved when the idle sweep last saw a change ...
        self.seen_at = self.started  # ... and when that was
        self.closer: Any = None  # callable that closes the connection (set by the pipeline)
        self.admitted: str | None = None  # the route whose security limits count it
        self.timeouts = timeouts  # the limits in force: the settings', then the route's
        self.half_closed = False  # one side sent EOF: the half_close limit applies
        # The hooks to tell when the connection ends (``on_disconnect``), with its context.
        self.hooks: Hooks | None = None
        self.context: RouteContext | None = None
        self.observation: Observation | None = None  # on_data observers see its bytes
        self.bandwidth: Limits | None = None  # its speed limits
        self.book: StatsBook | None = None  # the book that counts it (set when it opens)
        # Bytes already counted under the routes of its HTTP requests; the rest is folded
        # under ``route`` when the connection ends.
        self.mark_in = 0
        self.mark_out = 0
        self.requests = 0  # HTTP requests answered on it

    def fail(self, outcome: str, error: str) -> None:
        """Remember the first failure only, so each connection's error is logged once."""
        if self.error is None:
            self.outcome = outcome
            self.error = error


@dataclass(slots=True)
class _Totals:
    active: int = 0
    total: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "active": self.active,
            "total": self.total,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }


MAX_CLIENT_IPS = 10_000  # client addresses whose totals are kept
WINDOWS = (10, 60, 300)  # seconds: the throughput windows of stats()
TOP_CLIENTS = 20  # client addresses listed by stats(), busiest first

# HTTP requests are counted by method and status class, their durations in fixed buckets.
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "other")
_METHOD_INDEX = {method: index for index, method in enumerate(METHODS[:-1])}
# "none": no HTTP status was sent (a hook dropped the request, or it handed the connection to
# a raw pipe or a socket handler).
STATUSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "none")
_NO_STATUS = len(STATUSES) - 1
_WIDTH = len(STATUSES)
_OTHER = len(METHODS) - 1
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds
UNROUTED = ""  # the key of requests no route matched, in stats()["requests"]


class _Requests:
    """One route's HTTP requests: counts by method and status class, durations by bucket."""

    __slots__ = ("counts", "buckets", "seconds")

    def __init__(self) -> None:
        self.counts = [0] * (len(METHODS) * len(STATUSES))  # method-major
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)  # not cumulative; the last is +Inf
        self.seconds = 0.0

    def by_status(self) -> dict[str, int]:
        width = len(STATUSES)
        sums = [sum(self.counts[m * width + s] for m in range(len(METHODS))) for s in range(width)]
        return {name: n for name, n in zip(STATUSES, sums, strict=True) if n}

    def report(self) -> dict[str, Any]:
        width = len(STATUSES)
        methods: dict[str, dict[str, int]] = {}
        for m, method in enumerate(METHODS):
            row = self.counts[m * width : (m + 1) * width]
            if any(row):
                methods[method] = {name: n for name, n in zip(STATUSES, row, strict=True) if n}
        cumulative, running = {}, 0
        for bound, n in zip((*DURATION_BUCKETS, "+Inf"), self.buckets, strict=True):
            running += n
            cumulative[str(bound)] = running
        return {
            "methods": methods,
            "duration": {"buckets": cumulative, "sum": self.seconds, "count": running},
        }


@dataclass(slots=True)
class StatsBook:
    """Active connections and closed-connection totals."""

    active: set[ConnectionRecord] = field(default_factory=set)
    closed: _Totals = field(default_factory=_Totals)
    routes: defaultdict[str, _Totals] = field(default_factory=lambda: defaultdict(_Totals))
    ips: defaultdict[str, _Totals] = field(default_factory=lambda: defaultdict(_Totals))
    on_release: Callable[[str, str], None] | None = None  # gives back a security admission
    on_end: Callable[[ConnectionRecord], None] | None = None  # runs on_disconnect hooks
    # (monotonic time, connections, bytes in, bytes out), one per second, oldest first
    samples: deque[tuple[float, int, int, int]] = field(
        default_factory=lambda: deque(maxlen=WINDOWS[-1] + 2)
    )
    max_ips: int = MAX_CLIENT_IPS
    access: AccessLog = field(default_factory=AccessLog)  # where access-log lines go
    requests: dict[str, _Requests] = field(default_factory=dict)  # by route name

    def opened(self, record: ConnectionRecord) -> None:
        record.book = self
        self.active.add(record)
        self.closed.total += 1
        self.ips[record.client_ip].total += 1

    def moved(self, record: ConnectionRecord, client_ip: str, client_port: int) -> None:
        """The connection came through a trusted proxy: count it for the real client."""
        self.ips[record.client_ip].total -= 1
        if not self.ips[record.client_ip].total:
            del self.ips[record.client_ip]
        record.client_ip, record.client_port = client_ip, client_port
        self.ips[client_ip].total += 1

    def routed(self, record: ConnectionRecord, route: str, timeouts: Timeouts | None) -> None:
        """The connection (or its latest HTTP request) went to ``route``, under its limits."""
        record.route = route
        if timeouts is not None:
            record.timeouts = timeouts
        self.routes[route].total += 1

    def request(
        self,
        record: ConnectionRecord,
        head: RequestHead,
        route: str | None,
        status: int | str,
        seconds: float,
    ) -> None:
        """Account for one answered HTTP request and write its access-log line.

        The bytes the connection moved since its last answered request go to this request's
        route (a request no route matched leaves them to the next one, or to the connection's
        route at its end). The hot path of every HTTP request: a few lookups and additions.
        """
        bytes_in, bytes_out = record.bytes_in, record.bytes_out
        moved_in, moved_out = bytes_in - record.mark_in, bytes_out - record.mark_out
        record.requests += 1
        key = UNROUTED
        if route is not None:
            key = route
            totals = self.routes[route]
            totals.bytes_in += moved_in
            totals.bytes_out += moved_out
            record.mark_in, record.mark_out = bytes_in, bytes_out
            if status == 101 or status == "handover":
                record.route = route  # the rest of the connection is this route's tunnel
        counters = self.requests.get(key)
        if counters is None:
            counters = self.requests[key] = _Requests()
        status_index = (
            status // 100 - 1 if isinstance(status, int) and 100 <= status < 600 else _NO_STATUS
        )
        counters.counts[_METHOD_INDEX.get(head.method, _OTHER) * _WIDTH + status_index] += 1
        counters.buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        counters.seconds += seconds
        access = self.access
        if access.enabled:
            access.request(record, head, route, status, seconds, moved_in, moved_out)

    def finished(self, record: ConnectionRecord) -> None:
        """Fold a finished connection into the totals and write its access-log line."""
        if record not in self.active:
            return
        self.active.discard(record)
        if record.admitted is not None and self.on_release is not None:
            self.on_release(record.admitted, record.client_ip)
            record.admitted = None
        if record.outcome == "open":
            record.outcome = "ok"
        if record.hooks is not None and self.on_end is not None:
            self.on_end(record)
        if record.bandwidth is not None:
            record.bandwidth.release()
        bytes_in, bytes_out = record.bytes_in, record.bytes_out
        for totals in (self.closed, self.ips[record.client_ip]):
            totals.bytes_in += bytes_in
            totals.bytes_out += bytes_out
        if record.route is not None:  # what its requests did not count already
            totals = self.routes[record.route]
            totals.bytes_in += bytes_in - record.mark_in
            totals.bytes_out += bytes_out - record.mark_out
            record.mark_in, record.mark_out = bytes_in, bytes_out
        if len(self.ips) > self.max_ips:
            self._prune_ips()
        access = self.access
        if access.enabled:
            access.connection(record, time.monotonic() - record.started)

    def _prune_ips(self) -> None:
        """Forget the quietest clients without a live connection, down to 90 % of the cap.

        Runs once per 10 % of growth, so its sort is paid rarely; the overall totals are kept
        apart and lose nothing.
        """
        live = {record.client_ip for record in self.active}
        idle = [ip for ip in self.ips if ip not in live]
        excess = len(self.ips) - self.max_ips * 9 // 10
        idle.sort(key=lambda ip: _volume(self.ips[ip]))
        for ip in idle[:excess]:
            del self.ips[ip]

    def sample(self, now: float) -> None:
        """Record the running totals (called about once a second) for the throughput windows."""
        connections, bytes_in, bytes_out = self._running()
        self.samples.append((now, connections, bytes_in, bytes_out))

    def _running(self) -> tuple[int, int, int]:
        """Connections ever opened and bytes ever moved, live connections included."""
        bytes_in, bytes_out = self.closed.bytes_in, self.closed.bytes_out
        for record in self.active:
            bytes_in += record.bytes_in
            bytes_out += record.bytes_out
        return self.closed.total, bytes_in, bytes_out

    def throughput(self, now: float) -> dict[str, dict[str, float]]:
        """Per window: connections/s and bytes/s in and out, over the samples in it."""
        connections, bytes_in, bytes_out = self._running()
        rates: dict[str, dict[str, float]] = {}
        for window in WINDOWS:
            since = next((s for s in self.samples if s[0] >= now - window), None)
            span = now - since[0] if since is not None else 0.0
            if since is None or span <= 0:
                rates[f"{window}s"] = {"connections": 0.0, "bytes_in": 0.0, "bytes_out": 0.0}
                continue
            rates[f"{window}s"] = {
                "connections": round((connections - since[1]) / span, 3),
                "bytes_in": round((bytes_in - since[2]) / span, 1),
                "bytes_out": round((bytes_out - since[3]) / span, 1),
            }
        return rates

    def snapshot(self, top_clients: int = TOP_CLIENTS) -> dict[str, Any]:
        """A plain dict: totals, per route, the busiest client IPs (active ones included) and
        the throughput over the last 10, 60 and 300 seconds."""
        overall = _Totals(total=self.closed.total)
        routes: dict[str, _Totals] = {
            name: _Totals(total=t.total, bytes_in=t.bytes_in, bytes_out=t.bytes_out)
            for name, t in self.routes.items()
        }
        ips: dict[str, _Totals] = {
            ip: _Totals(total=t.total, bytes_in=t.bytes_in, bytes_out=t.bytes_out)
            for ip, t in self.ips.items()
        }
        overall.bytes_in, overall.bytes_out = self.closed.bytes_in, self.closed.bytes_out
        for record in self.active:
            for totals in (overall, ips.setdefault(record.client_ip, _Totals())):
                totals.active += 1
                totals.bytes_in += record.bytes_in
                totals.bytes_out += record.bytes_out
            if record.route is not None:  # what its requests did not count already
                totals = routes.setdefault(record.route, _Totals())
                totals.active += 1
                totals.bytes_in += record.bytes_in - record.mark_in
                totals.bytes_out += record.bytes_out - record.mark_out
        busiest = sorted(ips.items(), key=lambda item: _volume(item[1]), reverse=True)
        route_dicts: dict[str, dict[str, Any]] = {}
        for name, t in sorted(routes.items()):
            route_dicts[name] = t.as_dict()
            counters = self.requests.get(name)
            if counters is not None:  # a route that answered HTTP requests
                route_dicts[name]["requests"] = counters.by_status()
        return {
            "connections": {"active": overall.active, "total": overall.total},
            "bytes": {"in": overall.bytes_in, "out": overall.bytes_out},
            "routes": route_dicts,
            "requests": {name: c.report() for name, c in sorted(self.requests.items())},
            "client_ips": {ip: t.as_dict() for ip, t in busiest[:top_clients]},
            "client_ips_tracked": len(ips),
            "throughput": self.throughput(time.monotonic()),
        }


def _volume(totals: _Totals) -> tuple[int, int, int]:
    """How busy a client is: live connections, then bytes moved, then connections made."""
    return (totals.active, totals.bytes_in + totals.bytes_out, totals.total)
