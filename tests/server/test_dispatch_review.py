"""The pipeline's own answers: counted in the statistics, and 403 for blocked HTTP clients."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from support import LOOPBACK, async_test, free_port, read_to_end

from smartroute import SmartRoute


async def exchange(port: int, request: bytes) -> tuple[bytes, bool]:
    """Send ``request`` and read until the proxy closes: (answer, reset instead of a FIN)."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        if request:
            writer.write(request)
            await writer.drain()
        return await read_to_end(reader, timeout=5)
    finally:
        writer.close()


def http_forward(port: int, **match: Any) -> dict[str, Any]:
    return {"name": "site", "match": {"ports": port, **match}, "action": {
        "type": "forward", "protocol": "http", "targets": [{"host": LOOPBACK, "port": 1}]}}  # fmt: skip


def block(port: int, **match: Any) -> dict[str, Any]:
    return {"name": "deny", "match": {"ports": port, **match}, "action": {"type": "block"}}


@async_test()
async def test_answers_written_while_peeking_count_as_bytes_out() -> None:
    port = free_port()
    malformed = b"GET / HTTP/1.1\r\nHost: site.test\r\nBad Header\r\n\r\n"
    unknown = b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n"
    routes = [http_forward(port, domains="site.test")]
    async with SmartRoute(routes, bind_address=LOOPBACK) as proxy:
        bad, _ = await exchange(port, malformed)
        assert bad.startswith(b"HTTP/1.1 400 ")
        stats = proxy.stats()
        assert stats["bytes"] == {"in": len(malformed), "out": len(bad)}
        assert stats["client_ips"][LOOPBACK]["bytes_out"] == len(bad)
        missing, _ = await exchange(port, unknown)
        assert missing.startswith(b"HTTP/1.1 404 ")
        stats = proxy.stats()
        assert stats["bytes"] == {
            "in": len(malformed) + len(unknown),
            "out": len(bad) + len(missing),
        }


@async_test()
async def test_a_block_on_a_port_of_http_routes_answers_http_clients_403() -> None:
    port = free_port()
    # No route on the port needs the first bytes: the block wins at once, by client address.
    routes = [block(port, client_ip=LOOPBACK), http_forward(port)]
    request = b"GET / HTTP/1.1\r\nHost: site.test\r\n\r\n"
    async with SmartRoute(routes, bind_address=LOOPBACK, initial_data_timeout=0.5) as proxy:
        forbidden, was_reset = await exchange(port, request)
        assert forbidden.startswith(b"HTTP/1.1 403 ") and not was_reset
        assert b"\r\nconnection: close\r\n" in forbidden.lower()
        # What the request still sends is read and dropped; the close stays orderly.
        answer, was_reset = await exchange(port, b"POST / HTTP/1.1\r\n" + b"x" * 300_000)
        assert answer == forbidden and not was_reset
        assert await exchange(port, b"\x00not http\r\n") == (b"", False)
        started = time.monotonic()
        assert await exchange(port, b"") == (b"", False)  # nothing sent: closed after the wait
        assert time.monotonic() - started >= 0.4
        stats = proxy.stats()
        assert stats["routes"]["deny"]["total"] == 4 and "site" not in stats["routes"]
        assert stats["bytes"]["out"] == 2 * len(forbidden)


@async_test()
async def test_a_block_only_port_still_closes_at_once() -> None:
    port = free_port()
    async with SmartRoute([block(port)], bind_address=LOOPBACK, initial_data_timeout=30):
        started = time.monotonic()
        assert await exchange(port, b"") == (b"", False)
        assert time.monotonic() - started < 5  # not the 30 s wait for first bytes
