"""End to end: real loopback sockets through the proxy to real backends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from pathlib import Path
from typing import Any

import pytest
from support import (
    FIXTURES,
    LOOPBACK,
    TestCA,
    async_test,
    echo_handler,
    free_port,
    free_port_range,
    free_ports,
    named_handler,
    read_line,
    serve,
)

from smartroute import PortInUseError, RouteContext, SmartRoute


def forward(port: int, target_port: int | str, **match: Any) -> dict[str, Any]:
    return {
        "match": {"ports": port, **match},
        "action": {"type": "forward", "targets": [{"host": LOOPBACK, "port": target_port}]},
    }


def proxy(routes: list[dict[str, Any]], **settings: Any) -> SmartRoute:
    settings.setdefault("bind_address", LOOPBACK)
    return SmartRoute(routes, **settings)


async def roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(payload)
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


async def closed_by_proxy(reader: asyncio.StreamReader) -> bool:
    """True when the proxy closed the connection without sending anything."""
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionError:
        return True


@async_test()
async def test_tcp_forward_is_byte_exact_both_ways() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, every byte value
    async with serve(echo_handler) as backend:
        port = free_port()
        async with proxy([forward(port, backend)]) as p:
            assert await roundtrip(port, payload) == payload
            await asyncio.sleep(0)
            stats = p.stats()
    assert stats["connections"]["total"] == 1
    assert stats["bytes"] == {"in": len(payload), "out": len(payload)}


@async_test()
async def test_server_speaks_first_through_a_port_only_route() -> None:
    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-smartroute-test\r\n")
        await writer.drain()
        await echo_handler(reader, writer)

    async with serve(banner) as backend:
        port = free_port()
        # initial_data_timeout is long: a peek would make this test time out.
        async with proxy([forward(port, backend)], initial_data_timeout=60):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            assert await read_line(reader, 5) == b"SSH-2.0-smartroute-test\r\n"
            writer.close()


@async_test()
async def test_half_close_reaches_the_backend_and_the_answer_comes_back() -> None:
    async def count_then_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's EOF
        writer.write(f"got {len(data)} bytes\n".encode())
        await writer.drain()
        writer.close()

    async with serve(count_then_answer) as backend:
        port = free_port()
        async with proxy([forward(port, backend)]):
            assert await roundtrip(port, b"x" * 100_000) == b"got 100000 bytes\n"


@async_test()
async def test_preserve_forwards_to_the_same_port_number() -> None:
    start = free_port_range(3, LOOPBACK, "127.0.0.2")
    ports = list(range(start, start + 3))
    servers = [
        await asyncio.start_server(named_handler(f"backend {p}"), "127.0.0.2", p) for p in ports
    ]
    route = {
        "match": {"ports": f"{ports[0]}-{ports[-1]}"},
        "action": {"type": "forward", "targets": [{"host": "127.0.0.2", "port": "preserve"}]},
    }
    try:
        async with proxy([route]) as p:
            assert p.listening_ports == {port: 1 for port in ports}
            for port in ports:
                reader, writer = await asyncio.open_connection(LOOPBACK, port)
                assert await read_line(reader) == f"backend {port}\n".encode()
                writer.close()
    finally:
        for server in servers:
            server.close()


@async_test()
async def test_round_robin_and_failover_over_targets() -> None:
    dead = free_port()
    async with serve(named_handler("a")) as a, serve(named_handler("b")) as b:
        port = free_port()
        route = {
            "match": {"ports": port},
            "action": {
                "type": "forward",
                "targets": [
                    {"host": LOOPBACK, "port": a},
                    {"host": LOOPBACK, "port": dead},
                    {"host": LOOPBACK, "port": b},
                ],
            },
        }
        seen = []
        async with proxy([route]):
            for _ in range(6):
                reader, writer = await asyncio.open_connection(LOOPBACK, port)
                seen.append((await read_line(reader)).strip())
                writer.close()
    # Every connection is served although one target is down, and both live ones take turns.
    assert set(seen) == {b"a", b"b"}
    assert seen.count(b"a") >= 2 and seen.count(b"b") >= 2


@async_test()
async def test_unreachable_backend_closes_the_client_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port, dead = free_ports(2)
    with caplog.at_level(logging.WARNING, logger="smartroute"):
        async with proxy([forward(port, dead)], connect_timeout=2) as p:
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            assert await closed_by_proxy(reader)
            writer.close()
            stats = p.stats()
    failures = [
        r for r in caplog.records if "backend" in r.getMessage() or str(dead) in r.getMessage()
    ]
    assert len(failures) == 1
    assert stats["connections"]["active"] == 0


@async_test()
async def test_callable_host_and_port_get_the_context() -> None:
    seen: list[RouteContext] = []
    async with serve(named_handler("called")) as backend:
        port = free_port()

        def host(ctx: RouteContext) -> str:
            seen.append(ctx)
            return LOOPBACK

        async def target_port(ctx: RouteContext) -> int:
            return backend

        route = {
            "name": "dynamic",
            "match": {"ports": port},
            "action": {"type": "forward", "targets": [{"host": host, "port": target_port}]},
        }
        async with proxy([route]):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            assert await read_line(reader) == b"called\n"
            writer.close()
    assert seen[0].route_name == "dynamic" and seen[0].port == port
    assert seen[0].client_ip == LOOPBACK and seen[0].domain is None


def _tls_route(port: int, domains: Any, backend: int, name: str) -> dict[str, Any]:
    route = forward(port, backend, domains=domains)
    route["name"] = name
    route["action"]["tls"] = {"mode": "passthrough"}
    return route


async def _tls_hello(port: int, ca: TestCA, server_name: str | None) -> bytes:
    context = ca.client_context()
    if server_name is None:
        context.check_hostname = False
    reader, writer = await asyncio.open_connection(
        LOOPBACK, port, ssl=context, server_hostname=server_name or ""
    )
    line = await read_line(reader)
    writer.close()
    with contextlib.suppress(ssl.SSLError, ConnectionError):
        await writer.wait_closed()
    return line


@async_test()
async def test_sni_passthrough_picks_the_backend_and_exact_beats_wildcard(
    ca: TestCA, tmp_path: Path
) -> None:
    a_ctx = ca.server_context(ca.issue("a.example.test"), tmp_path, "a")
    star_ctx = ca.server_context(ca.issue("*.example.test"), tmp_path, "star")
    b_ctx = ca.server_context(ca.issue("b.example.test"), tmp_path, "b")
    async with (
        serve(named_handler("A"), ssl_context=a_ctx) as a,
        serve(named_handler("STAR"), ssl_context=star_ctx) as star,
        serve(named_handler("B"), ssl_context=b_ctx) as b,
    ):
        port = free_port()
        routes = [
            _tls_route(port, "*.example.test", star, "wildcard"),  # defined first, still loses
            _tls_route(port, "a.example.test", a, "a"),
            _tls_route(port, ["b.example.test"], b, "b"),
        ]
        async with proxy(routes) as p:
            assert p.listening_ports == {port: 3}
            assert await _tls_hello(port, ca, "a.example.test") == b"A\n"
            assert await _tls_hello(port, ca, "B.Example.Test") == b"B\n"
            assert await _tls_hello(port, ca, "other.example.test") == b"STAR\n"
            stats = p.stats()
    assert set(stats["routes"]) == {"a", "b", "wildcard"}


@async_test()
async def test_tls_without_sni_does_not_match_domain_routes(ca: TestCA, tmp_path: Path) -> None:
    ctx = ca.server_context(ca.issue("a.example.test"), tmp_path, "a")
    async with (
        serve(named_handler("A"), ssl_context=ctx) as a,
        serve(named_handler("FALLBACK"), ssl_context=ctx) as fallback,
    ):
        port = free_port()
        only_domains = [_tls_route(port, "a.example.test", a, "a")]
        async with proxy(only_domains):
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                await _tls_hello(port, ca, None)
        with_fallback = [*only_domains, forward(port, fallback)]
        async with proxy(with_fallback):
            assert await _tls_hello(port, ca, None) == b"FALLBACK\n"
            assert await _tls_hello(port, ca, "a.example.test") == b"A\n"


@async_test()
async def test_client_hello_split_over_many_writes_is_reassembled(
    ca: TestCA, tmp_path: Path
) -> None:
    hello = (FIXTURES / "clienthello" / "curl.bin").read_bytes()
    seen = asyncio.get_running_loop().create_future()

    async def capture(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.set_result(await reader.readexactly(len(hello)))
        writer.close()

    async with serve(capture) as backend:
        port = free_port()
        route = _tls_route(port, "curl.example.test", backend, "curl")
        async with proxy([route]):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            for i in range(0, len(hello), 37):
                writer.write(hello[i : i + 37])
                await writer.drain()
                await asyncio.sleep(0.002)
            assert await asyncio.wait_for(seen, 5) == hello
            writer.close()


@async_test()
async def test_initial_data_timeout_falls_back_to_a_route_without_domains() -> None:
    async with serve(named_handler("fallback")) as fallback, serve(named_handler("x")) as other:
        port = free_port()
        routes = [forward(port, other, domains="x.example.test"), forward(port, fallback)]
        async with proxy(routes, initial_data_timeout=0.2):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            assert await read_line(reader) == b"fallback\n"  # sent nothing, routed on timeout
            writer.close()
        async with proxy(routes[:1], initial_data_timeout=0.2):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            assert await closed_by_proxy(reader)
            writer.close()


@async_test()
async def test_client_ip_routes_and_ipv4_mapped_clients() -> None:
    async with serve(named_handler("local")) as local, serve(named_handler("rest")) as rest:
        port = free_port()
        routes = [
            forward(port, local, client_ip=["127.0.0.2", "::ffff:127.0.0.3"]),
            forward(port, rest),
        ]
        async with proxy(routes):
            for source, expected in (("127.0.0.2", b"local\n"), ("127.0.0.3", b"local\n")):
                reader, writer = await asyncio.open_connection(
                    LOOPBACK, port, local_addr=(source, 0)
                )
                assert await read_line(reader) == expected
                writer.close()
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            assert await read_line(reader) == b"rest\n"
            writer.close()


@async_test()
async def test_block_answers_http_with_403_and_closes_others() -> None:
    port = free_port()
    routes = [{"match": {"ports": port, "domains": "blocked.test"}, "action": {"type": "block"}}]
    async with proxy(routes, initial_data_timeout=1):
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(b"GET / HTTP/1.1\r\nHost: blocked.test\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n")
        writer.close()


@async_test()
async def test_port_held_by_another_process_names_the_port() -> None:
    port = free_port()
    holder = await asyncio.create_subprocess_exec(
        "python3",
        "-c",
        "import socket,sys;s=socket.socket();s.bind(('127.0.0.1',int(sys.argv[1])));"
        "s.listen();print('ready',flush=True);sys.stdin.read()",
        str(port),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert await read_line(holder.stdout) == b"ready\n"
        with pytest.raises(PortInUseError) as caught:
            await proxy([forward(port, 9)]).start()
        assert caught.value.port == port
        assert f"port {port}" in str(caught.value) and "another process" in str(caught.value)
    finally:
        holder.kill()
        await holder.wait()


@async_test()
async def test_two_proxies_in_one_process_say_who_holds_the_port() -> None:
    port = free_port()
    async with proxy([forward(port, 9)]):
        with pytest.raises(PortInUseError, match="another SmartRoute in this process"):
            await proxy([forward(port, 9)]).start()
