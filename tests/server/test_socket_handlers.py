"""Socket-handler routes and the SocketHandlers helpers, over real sockets."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from support import LOOPBACK, async_test, echo_handler, free_port, read_line, serve

from smartroute import RouteContext, SmartRoute
from smartroute.helpers import SocketHandlers, create_socket_handler_route


async def talk(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(payload)
    if writer.can_write_eof():
        writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


def route(port: int, handler: Any, **match: Any) -> dict[str, Any]:
    return create_socket_handler_route(match.pop("domains", None), port, handler, **match)


@async_test()
async def test_echo_handler_returns_every_byte() -> None:
    port = free_port()
    payload = bytes(range(256)) * 1000
    async with SmartRoute([route(port, SocketHandlers.echo)], bind_address=LOOPBACK) as proxy:
        assert await talk(port, payload) == payload
        await asyncio.sleep(0.05)
        stats = proxy.stats()
    assert stats["bytes"] == {"in": len(payload), "out": len(payload)}


@async_test()
async def test_handler_sees_peeked_bytes_and_the_context() -> None:
    port = free_port()
    contexts: list[RouteContext] = []

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: RouteContext
    ) -> None:
        contexts.append(ctx)
        writer.write(await reader.read())
        writer.close()

    request = b"GET /hello?x=1 HTTP/1.1\r\nHost: Site.Example.\r\nX-Env: prod\r\n\r\nbody"
    routes = [route(port, handler, domains="site.example", name="site")]
    async with SmartRoute(routes, bind_address=LOOPBACK):
        assert await talk(port, request) == request  # the bytes read for routing come first
    ctx = contexts[0]
    assert (ctx.domain, ctx.path, ctx.query, ctx.method) == ("site.example", "/hello", "x=1", "GET")
    assert ctx.headers is not None and ctx.headers["x-env"] == "prod"
    assert ctx.route_name == "site" and ctx.port == port and not ctx.is_tls
    assert ctx.client_ip == LOOPBACK and ctx.server_ip == LOOPBACK and ctx.connection_id


@async_test()
async def test_a_raising_handler_closes_only_its_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()

    async def flaky(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: RouteContext
    ) -> None:
        line = await reader.readline()
        if line == b"boom\n":
            raise RuntimeError("user bug")
        writer.write(b"ok\n")
        await writer.drain()
        writer.close()

    async with SmartRoute([route(port, flaky, name="flaky")], bind_address=LOOPBACK) as proxy:
        r1, w1 = await asyncio.open_connection(LOOPBACK, port)
        with caplog.at_level(logging.ERROR, logger="smartroute"):
            assert await talk(port, b"boom\n") == b""
        assert any("user bug" in str(r.exc_info) for r in caplog.records)
        w1.write(b"fine\n")
        assert await read_line(r1) == b"ok\n"  # the other connection is unaffected
        assert await talk(port, b"again\n") == b"ok\n"  # and new ones still work
        w1.close()
        assert proxy.is_running


@async_test()
async def test_line_protocol_sync_and_async() -> None:
    port, port2 = free_port(), free_port()

    def upper(line: str, ctx: RouteContext) -> str | None:
        return None if line == "skip" else line.upper()

    async def count(line: str, ctx: RouteContext) -> str:
        return str(len(line))

    routes = [
        route(port, SocketHandlers.line_protocol(upper)),
        route(port2, SocketHandlers.line_protocol(count)),
    ]
    async with SmartRoute(routes, bind_address=LOOPBACK):
        assert await talk(port, b"hello\r\nskip\nworld") == b"HELLO\nWORLD\n"
        assert await talk(port2, b"abc\n") == b"3\n"


@async_test()
async def test_proxy_http_response_and_block_helpers() -> None:
    p_proxy, p_http, p_block, p_silent = (free_port() for _ in range(4))
    async with serve(echo_handler) as backend:
        routes = [
            route(p_proxy, SocketHandlers.proxy(LOOPBACK, backend)),
            route(p_http, SocketHandlers.http_response(200, "hi\n")),
            route(p_block, SocketHandlers.block("go away\n")),
            route(p_silent, SocketHandlers.block()),
        ]
        async with SmartRoute(routes, bind_address=LOOPBACK):
            assert await talk(p_proxy, b"through the helper") == b"through the helper"
            answer = await talk(p_http, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nhi\n")
            assert b"Content-Length: 3\r\n" in answer
            head = await talk(p_http, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert head.endswith(b"\r\n\r\n")
            assert await talk(p_block, b"") == b"go away\n"
            assert await talk(p_silent, b"") == b""
