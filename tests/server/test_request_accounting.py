"""Per-request accounting on kept-alive HTTP connections: each request's bytes, status and
duration count under its own route, and the totals stay consistent.

A raw client sends requests one at a time on one connection and reads each answer whole, so the
bytes of every request are known exactly; the backend is an asyncio server on the same loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from support import LOOPBACK, async_test, free_port

from smartroute import SmartRoute
from smartroute.server.workers import merge_snapshots

BODY = b"hello from the backend"


async def _backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every request head (no bodies) with ``BODY``, kept alive."""
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def backend() -> AsyncIterator[int]:
    server = await asyncio.start_server(_backend, LOOPBACK, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def routes(port: int, backend_port: int, host: str) -> list[dict[str, Any]]:
    def route(name: str, path: str) -> dict[str, Any]:
        return {
            "name": name,
            "match": {"ports": port, "path": path},
            "action": {
                "type": "forward",
                "protocol": "http",
                "targets": [{"host": host, "port": backend_port}],
            },
        }

    return [route("api", "/api/*"), route("web", "/web/*"), route("img", "/img/*")]


def request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: example.test\r\nUser-Agent: t\r\n\r\n".encode()


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str
) -> tuple[int, int, int]:
    """Send one request, read its whole answer: (status, bytes sent, bytes received)."""
    data = request(path)
    writer.write(data)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await asyncio.wait_for(reader.readexactly(length), 5)
    return int(head.split()[1]), len(data), len(head) + len(body)


def route_bytes(stats: dict[str, Any]) -> tuple[int, int]:
    routes = stats["routes"].values()
    return sum(r["bytes_in"] for r in routes), sum(r["bytes_out"] for r in routes)


# The fast lane serves IP-literal targets; a host name sends the connection down the transport
# path (HttpSession): both call log_request.
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"], ids=["lane", "transport"])
@async_test(30)
async def test_each_request_counts_under_its_own_route(host: str) -> None:
    port = free_port()
    async with backend() as backend_port:
        async with SmartRoute(routes(port, backend_port, host), bind_address=LOOPBACK) as proxy:
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            sent: dict[str, list[int]] = {}
            plan = ["/api/1", "/web/1", "/nothing", "/img/1", "/api/2", "/web/2"]
            # "/nothing" (404, no route) leaves its bytes to the next request's route: img.
            owner = {"/nothing": "img"}
            statuses = {}
            try:
                for path in plan:
                    status, given, taken = await exchange(reader, writer, path)
                    statuses[path] = status
                    name = owner.get(path, path.split("/")[1])
                    totals = sent.setdefault(name, [0, 0])
                    totals[0] += given
                    totals[1] += taken
                    live = proxy.stats()
                    # While the connection is open, route bytes add up to the overall bytes.
                    assert route_bytes(live) == (live["bytes"]["in"], live["bytes"]["out"])
            finally:
                writer.close()
            assert statuses["/nothing"] == 404
            assert all(s == 200 for p, s in statuses.items() if p != "/nothing")
            deadline = asyncio.get_running_loop().time() + 5
            while proxy.stats()["connections"]["active"]:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.02)
            stats = proxy.stats()
    assert stats["connections"] == {"active": 0, "total": 1}
    for name in ("api", "web", "img"):
        route = stats["routes"][name]
        assert (route["bytes_in"], route["bytes_out"]) == tuple(sent[name]), name
        assert route["requests"] == {"2xx": 1 if name == "img" else 2}, name
    # The connection counts once, under its first route.
    assert [stats["routes"][n]["total"] for n in ("api", "web", "img")] == [1, 0, 0]
    assert route_bytes(stats) == (stats["bytes"]["in"], stats["bytes"]["out"])
    assert stats["bytes"]["in"] == sum(s[0] for s in sent.values())
    requests = stats["requests"]
    assert requests[""]["methods"] == {"GET": {"4xx": 1}}
    assert requests["api"]["methods"] == {"GET": {"2xx": 2}}
    histogram = requests["api"]["duration"]
    assert histogram["count"] == 2 and histogram["buckets"]["+Inf"] == 2
    assert 0 < histogram["sum"] < 5


@async_test(30)
async def test_a_tcp_route_keeps_its_connection_totals() -> None:
    """A non-HTTP connection is folded whole under its route when it ends."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, LOOPBACK, 0)
    port = free_port()
    route = {
        "name": "tcp",
        "match": {"ports": port},
        "action": {
            "type": "forward",
            "targets": [{"host": LOOPBACK, "port": server.sockets[0].getsockname()[1]}],
        },
    }
    try:
        async with SmartRoute([route], bind_address=LOOPBACK) as proxy:
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write(b"x" * 5000)
            await writer.drain()
            assert len(await asyncio.wait_for(reader.readexactly(5000), 5)) == 5000
            writer.close()
            deadline = asyncio.get_running_loop().time() + 5
            while proxy.stats()["connections"]["active"]:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.02)
            stats = proxy.stats()
    finally:
        server.close()
        await server.wait_closed()
    assert stats["routes"]["tcp"] == {"active": 0, "total": 1, "bytes_in": 5000, "bytes_out": 5000}
    assert stats["requests"] == {}


def test_merged_snapshots_sum_request_counters() -> None:
    def snapshot(n: int, seconds: float) -> dict[str, Any]:
        requests = {"2xx": n}
        return {
            "connections": {"active": 0, "total": 1},
            "bytes": {"in": 1, "out": 2},
            "routes": {
                "r": {"active": 0, "total": 1, "bytes_in": 1, "bytes_out": 2, "requests": requests}
            },  # fmt: skip
            "requests": {
                "r": {
                    "methods": {"GET": dict(requests)},
                    "duration": {"buckets": {"0.005": n, "+Inf": n}, "sum": seconds, "count": n},
                }
            },
            "client_ips": {},
            "client_ips_tracked": 0,
            "throughput": {},
        }

    merged = merge_snapshots([snapshot(2, 0.5), snapshot(3, 0.25)], top_clients=5)
    assert merged["routes"]["r"]["requests"] == {"2xx": 5}
    assert merged["requests"]["r"] == {
        "methods": {"GET": {"2xx": 5}},
        "duration": {"buckets": {"0.005": 5, "+Inf": 5}, "sum": 0.75, "count": 5},
    }
