"""Speed limits, measured on real transfers of a few seconds: per connection, per client IP, per
route and per hook group, each way, on raw forwards, HTTP and socket handlers; an unlimited
neighbour is not slowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from http_backend import http_backend, unused_port
from support import LOOPBACK, async_test, serve

from smartroute import ConfigError, SmartRoute
from smartroute.context import RouteContext

WINDOW = 2.5  # seconds each rate is measured over ...
WARM_UP = 0.5  # ... after this long: the steady rate, not the first burst
# Connections sharing one budget, counted over one window: scheduling on a loaded machine
# moves bytes across the window's edges for each of them (an unlimited connection moves more
# than 10 times the limit).
SUM_SHARE = 0.15
CHUNK = b"x" * 65536


async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A backend that sends as fast as it may until the client goes."""
    with contextlib.suppress(ConnectionError):
        while True:
            writer.write(CHUNK)
            await writer.drain()


class Sink:
    """A backend that counts what it receives."""

    def __init__(self) -> None:
        self.received = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                self.received += len(data)
        writer.close()


def tcp_route(port: int, target: int, **extra: Any) -> dict[str, Any]:
    return {
        "match": {"ports": port},
        "action": {
            "type": "forward",
            "protocol": "tcp",
            "targets": [{"host": LOOPBACK, "port": target}],
        },
        **extra,
    }


async def download_rate(port: int, window: float = WINDOW) -> float:
    """Bytes per second read from ``port`` over ``window`` seconds, after ``WARM_UP``."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        warm_until = time.monotonic() + WARM_UP
        while time.monotonic() < warm_until:
            assert await asyncio.wait_for(reader.read(65536), 5)
        got, started = 0, time.monotonic()
        while (elapsed := time.monotonic() - started) < window:
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, "the connection ended early"
            got += len(data)
        return got / elapsed
    finally:
        writer.close()


async def shared_rate(*ports: int) -> tuple[float, list[int]]:
    """Bytes per second read from one connection to each of ``ports``, all counted over one
    window of ``WINDOW`` seconds after ``WARM_UP`` (every connection is read all along, and
    none ends before the window does); also the bytes each one got in it."""
    links = [await asyncio.open_connection(LOOPBACK, port) for port in ports]
    counts = [0] * len(links)
    counting = False

    async def pump(index: int, reader: asyncio.StreamReader) -> None:
        while True:
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, "the connection ended early"
            if counting:
                counts[index] += len(data)

    pumps = [asyncio.create_task(pump(i, reader)) for i, (reader, _) in enumerate(links)]
    try:
        await asyncio.sleep(WARM_UP)  # a measurement's span, not a wait for readiness
        counting, started = True, time.monotonic()
        await asyncio.sleep(WINDOW)
        counting, elapsed = False, time.monotonic() - started
        for task in pumps:
            assert not task.done(), task.exception()
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for _, writer in links:
            writer.close()
    return sum(counts) / elapsed, counts


def within(rate: float, limit: float, share: float = 0.10) -> bool:
    return abs(rate - limit) <= share * limit


@contextlib.asynccontextmanager
async def proxy(routes: list[dict[str, Any]], **settings: Any) -> AsyncIterator[SmartRoute]:
    async with SmartRoute(routes, bind_address=LOOPBACK, **settings) as running:
        yield running


@async_test(60)
async def test_a_connection_downloads_at_its_limit_and_an_unlimited_neighbour_does_not() -> None:
    limited, free = unused_port(), unused_port()
    limit = 400_000.0
    async with serve(firehose) as source:
        bandwidth = {"per_connection": {"download": limit}}
        routes = [tcp_route(limited, source, bandwidth=bandwidth), tcp_route(free, source)]
        async with proxy(routes):
            rate, neighbour = await asyncio.gather(download_rate(limited), download_rate(free))
    assert within(rate, limit), rate
    assert neighbour > 10 * limit, neighbour


@async_test(60)
async def test_an_upload_is_held_to_its_limit_without_buffering() -> None:
    port = unused_port()
    limit = 300_000.0
    sink = Sink()
    async with serve(sink) as target:
        bandwidth = {"per_connection": {"upload": limit}}
        async with proxy([tcp_route(port, target, bandwidth=bandwidth)]) as running:
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            started = time.monotonic()
            while time.monotonic() - started < WINDOW:
                writer.write(CHUNK)
                await writer.drain()
            sent_at = sink.received
            elapsed = time.monotonic() - started
            # Backpressure, not buffering: what the proxy read is what the sink got, give or
            # take a chunk or two in flight.
            record = next(iter(running._runtime.stats.active))
            assert record.bytes_in - sink.received < 4 * 65536 + 300_000
            writer.close()
    assert within(sent_at / elapsed, limit, 0.15), sent_at / elapsed


@async_test(60)
async def test_connections_of_one_client_ip_share_its_budget() -> None:
    port = unused_port()
    limit = 600_000.0
    async with serve(firehose) as source:
        bandwidth = {"per_ip": {"download": limit}}
        async with proxy([tcp_route(port, source, bandwidth=bandwidth)]):
            rate, counts = await shared_rate(port, port)
    assert within(rate, limit, share=SUM_SHARE), (rate, counts)
    assert all(counts), counts  # both connections moved bytes within the one budget


@async_test(60)
async def test_a_route_budget_is_shared_and_nested_limits_take_the_smallest() -> None:
    port = unused_port()
    async with serve(firehose) as source:
        bandwidth = {
            "per_route": {"download": 600_000},
            "per_connection": {"download": 200_000},
        }
        async with proxy([tcp_route(port, source, bandwidth=bandwidth)]):
            alone = await download_rate(port)
            assert within(alone, 200_000), alone  # the connection's own limit is smaller
            rates = await asyncio.gather(*(download_rate(port) for _ in range(4)))
    assert within(sum(rates), 600_000), rates  # four of them: the route's budget binds


@async_test(60)
async def test_a_hook_group_shares_one_budget_across_routes() -> None:
    class Grouped:
        async def on_connect(self, ctx: RouteContext) -> dict[str, Any]:
            return {"speed_limit": {"download": 500_000, "group": "team"}}

    first, second = unused_port(), unused_port()
    async with serve(firehose) as source:
        routes = [
            tcp_route(first, source, hooks=[Grouped()]),
            tcp_route(second, source, hooks=[Grouped()]),
        ]
        async with proxy(routes) as running:
            rate, counts = await shared_rate(first, second)
            async with asyncio.timeout(5):  # the group's buckets go with its connections
                while len(running._runtime.bandwidth):
                    await asyncio.sleep(0.02)
    assert within(rate, 500_000, share=SUM_SHARE), (rate, counts)


@async_test(60)
async def test_an_http_download_is_limited_and_the_settings_default_applies() -> None:
    port = unused_port()
    limit = 500_000.0
    with http_backend("big") as backend:
        route = {
            "match": {"ports": port},
            "action": {
                "type": "forward",
                "protocol": "http",
                "targets": [{"host": LOOPBACK, "port": backend.port}],
            },
        }
        default = {"per_connection": {"download": limit}}
        async with proxy([route], bandwidth=default):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            size = int(limit * 3)
            writer.write(f"GET /big HTTP/1.1\r\nHost: x\r\nX-Size: {size}\r\n\r\n".encode())
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            started = time.monotonic()
            await asyncio.wait_for(reader.readexactly(size), 30)
            took = time.monotonic() - started
            writer.close()
    assert within(size / took, limit), size / took


@async_test(60)
async def test_a_socket_handler_that_drains_is_limited() -> None:
    limit = 300_000.0

    async def talker(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: RouteContext
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                writer.write(CHUNK)
                await writer.drain()

    port = unused_port()
    route = {
        "match": {"ports": port},
        "action": {"type": "socket-handler", "socket_handler": talker},
        "bandwidth": {"per_connection": {"download": limit}},
    }
    async with proxy([route]):
        rate = await download_rate(port)
    assert within(rate, limit, 0.15), rate


@pytest.mark.parametrize(
    ("bandwidth", "message"),
    [
        ({}, "route.bandwidth: empty"),
        ({"per_conn": {"download": 1}}, "route.bandwidth: unknown key"),
        ({"per_ip": {}}, "route.bandwidth.per_ip: empty"),
        ({"per_ip": {"down": 5}}, "route.bandwidth.per_ip: unknown key"),
        ({"per_route": {"upload": 0}}, "route.bandwidth.per_route.upload: expected bytes"),
        ({"per_route": {"upload": "1M"}}, "route.bandwidth.per_route.upload: expected bytes"),
        ({"per_route": {"upload": True}}, "route.bandwidth.per_route.upload: expected bytes"),
    ],
)
def test_bad_bandwidth_blocks_name_the_field(bandwidth: Any, message: str) -> None:
    from smartroute.routing.validation import validate_route

    route = tcp_route(8000, 9000, bandwidth=bandwidth)
    with pytest.raises(ConfigError) as caught:
        validate_route(route, 0)
    assert str(caught.value).startswith(message), str(caught.value)
