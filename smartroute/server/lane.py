"""The fast lane: connections on bare sockets, watched by one epoll set, without transports.

:class:`RelayLane` belongs to one proxy. It knows, per route and port of the current route
table, whether the lane can carry a connection: as a byte pipe to the route's target group
(:func:`~smartroute.server.relay_plan.relay_plan`, carried out by
:class:`~smartroute.server.socket_relay.SocketRelay`) or as plain HTTP/1.1 requests to it
(:func:`~smartroute.server.relay_plan.http_plan`, served by
:class:`~smartroute.server.http.lane_session.LaneSession`). It holds the buffer those share, so
moving a chunk allocates nothing.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Protocol

from smartroute.routing.matcher import RouteTable
from smartroute.routing.model import CompiledRoute
from smartroute.server.backends.book import Backends
from smartroute.server.backends.group import TargetGroup
from smartroute.server.epoll_set import AVAILABLE, EpollSet
from smartroute.server.relay_plan import http_plan, relay_plan
from smartroute.server.socket_relay import CHUNK, SocketRelay
from smartroute.server.stats import ConnectionRecord, StatsBook

log = logging.getLogger("smartroute")

Planner = Callable[[CompiledRoute, "TargetGroup | None"], "TargetGroup | None"]


class LaneRuntime(Protocol):
    """What the lane reads of the proxy's runtime, which makes the lane and passes itself."""

    table: RouteTable  # the current route table, swapped whole when the routes change
    stats: StatsBook  # where a relayed connection is counted as ended
    backends: Backends  # each route's target group


class RelayLane(EpollSet):
    """Per proxy: the epoll set, the shared buffer, and each route's plan for the route table."""

    def __init__(self, runtime: LaneRuntime) -> None:
        super().__init__()
        self.runtime = runtime
        self.buffer = bytearray(CHUNK)
        self.view = memoryview(self.buffer)
        self._table: object = None
        # Per route (by id) and port of the current table, each planner's answer; per port,
        # what the lane can do there. Both are dropped when the table changes.
        self._plans: dict[tuple[Planner, int, int], TargetGroup | None] = {}
        self._ports: dict[tuple[str, int], bool] = {}

    def plan(self, route: CompiledRoute, port: int) -> TargetGroup | None:
        """:func:`relay_plan`, computed once per route and port of the current table."""
        return self._planned(relay_plan, route, port)

    def http_plan(self, route: CompiledRoute, port: int) -> TargetGroup | None:
        """:func:`http_plan`, computed once per route and port of the current table."""
        return self._planned(http_plan, route, port)

    def _planned(self, planner: Planner, route: CompiledRoute, port: int) -> TargetGroup | None:
        self._follow_table()
        key = (planner, id(route), port)
        try:
            return self._plans[key]
        except KeyError:
            plan = self._plans[key] = planner(route, self.runtime.backends.group(route, port))
            return plan

    def terminates(self, port: int) -> bool:
        """True when the lane can terminate TLS on ``port``: every route on it forwards HTTP
        to fixed addresses, so whatever a request on a terminated connection matches, the
        lane serves it or answers it itself (404, a refusal) - it cannot hand a TLS session
        to a transport."""
        return self._port_fact("terminates", port)

    def serves(self, port: int) -> bool:
        """True when some route on ``port`` can be relayed or served as HTTP here (else the
        lane is no use)."""
        return self._port_fact("serves", port)

    def _port_fact(self, fact: str, port: int) -> bool:
        self._follow_table()
        key = (fact, port)
        try:
            return self._ports[key]
        except KeyError:
            routes = self.runtime.table.ordered(port)
            if fact == "serves":
                known = any(
                    self.plan(r, port) is not None or self.http_plan(r, port) is not None
                    for r in routes
                )
            else:
                known = all(self.http_plan(r, port) is not None for r in routes)
            self._ports[key] = answer = AVAILABLE and known
            return answer

    def _follow_table(self) -> None:
        table = self.runtime.table
        if table is not self._table:  # routes changed: the table holds the routes we key by
            self._table, self._plans, self._ports = table, {}, {}

    def open(self) -> None:
        """Create the epoll set and have the running loop watch it (the proxy starts)."""
        if AVAILABLE:
            super().open()

    def start(
        self,
        client: socket.socket,
        record: ConnectionRecord,
        route: CompiledRoute,
        group: TargetGroup,
    ) -> None:
        """Relay ``client`` to the first target of ``group``'s order that accepts."""
        relay = SocketRelay(self, client, record, route.name, group.order(record.client_ip), group)
        try:
            relay.connect()
        except Exception as exc:  # out of resources (epoll, memory) or a bug: this one ends
            record.fail("error", f"proxy: {exc}")
            log.error("route %r: cannot relay %s: %s", route.name, record.id, exc)
            relay.finish()
