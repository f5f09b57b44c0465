"""PROXY protocol through the proxy: trusted load balancers name the real client."""

from __future__ import annotations

import asyncio
from typing import Any

from support import LOOPBACK, async_test, free_port

from smartroute import RouteContext, SmartRoute
from smartroute.protocols.proxy_protocol import encode_v2, parse_proxy_header


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


@async_test()
async def test_send_proxy_protocol_tells_targets_who_the_client_is() -> None:
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def capture(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        while True:  # the PROXY header, then at least one line of the client's bytes
            chunk = await reader.read(4096)
            data += chunk
            header = parse_proxy_header(data)
            if not chunk or (header is not None and b"\n" in data[header.length :]):
                break
        await received.put(data)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(capture, LOOPBACK, 0)
    backend = server.sockets[0].getsockname()[1]
    tcp_port, http_port = free_port(), free_port()
    routes = [
        {"match": {"ports": tcp_port}, "action": {"type": "forward", "protocol": "tcp",
         "targets": [{"host": LOOPBACK, "port": backend, "send_proxy_protocol": "v1"}]}},
        {"match": {"ports": http_port}, "action": {"type": "forward", "protocol": "http",
         "targets": [{"host": LOOPBACK, "port": backend, "send_proxy_protocol": "v2"}]}},
    ]  # fmt: skip
    try:
        async with SmartRoute(routes, bind_address=LOOPBACK):
            await send(tcp_port, b"raw bytes\n", source="127.0.0.2")
            data = await asyncio.wait_for(received.get(), 5)
            header = parse_proxy_header(data)
            assert header is not None and header.version == 1
            assert header.source is not None and header.source[0] == "127.0.0.2"
            assert header.destination == (LOOPBACK, tcp_port)
            assert data[header.length :] == b"raw bytes\n"
            answer = await send(
                http_port,
                b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
                source="127.0.0.3",
            )
            assert answer.endswith(b"ok\n")
            data = await asyncio.wait_for(received.get(), 5)
            header = parse_proxy_header(data)
            assert header is not None and header.version == 2
            assert header.source is not None and header.source[0] == "127.0.0.3"
            assert data[header.length :].startswith(b"GET /x HTTP/1.1\r\n")
    finally:
        server.close()
