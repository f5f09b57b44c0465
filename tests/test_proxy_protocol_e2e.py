"""PROXY protocol through the proxy: trusted load balancers name the real client."""

from __future__ import annotations

import asyncio
from typing import Any

from support import LOOPBACK, async_test, free_port

from smartroute import RouteContext, SmartRoute
from smartroute.protocols.proxy_protocol import encode_v2


def whoami_routes(port: int, seen: list[RouteContext]) -> list[dict[str, Any]]:
    async def whoami(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: RouteContext
    ) -> None:
        seen.append(ctx)
        line = await reader.readline()
        writer.write(
            f"{ctx.route_name} {ctx.client_ip}:{ctx.client_port} {line.decode().strip()}\n".encode()
        )
        writer.close()

    return [
        {"name": "partners", "match": {"ports": port, "client_ip": "203.0.113.0/24"},
         "action": {"type": "socket-handler", "socket_handler": whoami}},
        {"name": "everyone", "match": {"ports": port},
         "action": {"type": "socket-handler", "socket_handler": whoami}},
    ]  # fmt: skip


async def send(port: int, data: bytes, source: str = LOOPBACK) -> bytes:
    reader, writer = await asyncio.open_connection(LOOPBACK, port, local_addr=(source, 0))
    writer.write(data)
    try:
        answer = await asyncio.wait_for(reader.read(), 5)
    except ConnectionError:
        answer = b""
    writer.close()
    return answer


@async_test()
async def test_v1_and_v2_headers_from_a_trusted_proxy_drive_matching_and_stats() -> None:
    port = free_port()
    seen: list[RouteContext] = []
    settings: dict[str, Any] = {"accept_proxy_protocol": True, "proxy_ips": ["127.0.0.1/32"]}
    async with SmartRoute(whoami_routes(port, seen), bind_address=LOOPBACK, **settings) as proxy:
        v1 = f"PROXY TCP4 203.0.113.7 127.0.0.1 40000 {port}\r\n".encode()
        assert await send(port, v1 + b"hello\n") == b"partners 203.0.113.7:40000 hello\n"
        v2 = encode_v2(("2001:db8::5", 41000), ("::1", port))
        assert await send(port, v2 + b"again\n") == b"everyone 2001:db8::5:41000 again\n"
        for _ in range(100):
            if proxy.stats()["connections"]["active"] == 0:
                break
            await asyncio.sleep(0.02)
        assert set(proxy.stats()["client_ips"]) == {"203.0.113.7", "2001:db8::5"}


@async_test()
async def test_headers_from_others_are_refused_and_trusted_peers_must_send_one() -> None:
    port = free_port()
    seen: list[RouteContext] = []
    settings: dict[str, Any] = {
        "accept_proxy_protocol": True, "proxy_ips": ["127.0.0.1"], "initial_data_timeout": 0.3,
    }  # fmt: skip
    routes = whoami_routes(port, seen)
    routes[1]["match"]["domains"] = "never.test"  # the port now reads the first bytes
    async with SmartRoute(routes, bind_address=LOOPBACK, **settings):
        forged = f"PROXY TCP4 203.0.113.7 127.0.0.1 40000 {port}\r\nhello\n".encode()
        assert await send(port, forged, source="127.0.0.2") == b""  # not in proxy_ips
        assert await send(port, b"hello\n") == b""  # trusted, but no header: refused
        assert await send(port, b"PROXY TCP4 999.1.1.1 127.0.0.1 1 2\r\n") == b""  # malformed
    assert seen == []
