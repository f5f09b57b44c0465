"""The reverse proxy's backend pool: idle connections are reused, aged out, and dropped with
the last route that names their target."""

from __future__ import annotations

import time
from typing import Any

from support import LOOPBACK, stream

from smartroute.routing.validation import validate_routes
from smartroute.server.http.pool import BackendPool, targets_named_by


def forward(*targets: dict[str, Any]) -> dict[str, Any]:
    return {
        "match": {"ports": 8080},
        "action": {"type": "forward", "protocol": "http", "targets": list(targets)},
    }


def test_idle_connections_are_reused_then_aged_out() -> None:
    pool = BackendPool(idle_seconds=30)
    key = pool.key(LOOPBACK, 9000, None, None)
    first, first_transport = stream()
    pool.release(key, first)
    assert pool.take(key) is first
    pool.release(key, first)
    pool.prune(time.monotonic() + 10)
    assert not first_transport.closed
    pool.prune(time.monotonic() + 31)
    assert first_transport.closed and pool.take(key) is None


def test_connections_to_targets_no_route_names_are_closed() -> None:
    pool = BackendPool()
    kept_key, dropped_key = (pool.key(LOOPBACK, port, None, None) for port in (9000, 9001))
    kept, kept_transport = stream()
    dropped, dropped_transport = stream()
    pool.release(kept_key, kept)
    pool.release(dropped_key, dropped)
    routes = validate_routes([forward({"host": LOOPBACK, "port": 9000})])
    pool.retain(targets_named_by(routes))
    assert dropped_transport.closed and not kept_transport.closed
    late, late_transport = stream()  # a request to the old target ends after the update
    pool.release(dropped_key, late)
    assert late_transport.closed and pool.take(dropped_key) is None
    assert pool.take(kept_key) is kept


def test_target_filter_knows_preserved_ports_and_gives_up_on_callables() -> None:
    routes = validate_routes(
        [
            forward(
                {"host": ["a.test", "b.test"], "port": 80}, {"host": "c.test", "port": "preserve"}
            )
        ]
    )
    wanted = targets_named_by(routes)
    assert wanted is not None
    assert wanted("a.test", 80) and wanted("b.test", 80) and wanted("c.test", 12345)
    assert not wanted("a.test", 81) and not wanted("d.test", 80)
    dynamic = validate_routes([forward({"host": lambda ctx: "x.test", "port": 80})])
    assert targets_named_by(dynamic) is None
