"""Routes change at runtime: ports are diffed, live connections on kept ports are untouched."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from support import (
    LOOPBACK,
    async_test,
    echo_handler,
    free_ports,
    named_handler,
    read_exactly,
    read_line,
    serve,
)

from smartroute import ConfigError, SmartRoute


def forward(name: str, port: int, target: int) -> dict[str, Any]:
    return {
        "name": name,
        "match": {"ports": port},
        "action": {"type": "forward", "targets": [{"host": LOOPBACK, "port": target}]},
    }


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(LOOPBACK, port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


@async_test()
async def test_update_routes_keeps_a_live_connection_byte_exact() -> None:
    kept, removed, added = free_ports(3)
    async with serve(echo_handler) as echo, serve(named_handler("new")) as new:
        routes = [forward("kept", kept, echo), forward("removed", removed, echo)]
        async with SmartRoute(routes, bind_address=LOOPBACK) as proxy:
            reader, writer = await asyncio.open_connection(LOOPBACK, kept)
            sent = bytearray()
            for round_ in range(4):
                chunk = os.urandom(50_000)
                sent += chunk
                writer.write(chunk)
                assert await read_exactly(reader, len(chunk)) == chunk
                if round_ == 1:
                    await proxy.update_routes(
                        [forward("kept", kept, echo), forward("added", added, new)]
                    )
                    assert proxy.listening_ports == {kept: 1, added: 1}
                    assert await refused(removed)
                    r2, w2 = await asyncio.open_connection(LOOPBACK, added)
                    assert await read_line(r2) == b"new\n"
                    w2.close()
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            await asyncio.sleep(0.05)
            assert proxy.stats()["routes"]["kept"]["bytes_in"] == len(sent)


@async_test()
async def test_add_and_remove_route_count_references_per_port() -> None:
    port, other = free_ports(2)
    async with serve(named_handler("x")) as backend:
        async with SmartRoute([forward("a", port, backend)], bind_address=LOOPBACK) as proxy:
            assert proxy.listening_ports == {port: 1}
            await proxy.add_route(forward("b", port, backend))
            await proxy.add_route(forward("c", other, backend))
            assert proxy.listening_ports == {port: 2, other: 1}
            await proxy.remove_route("a")
            assert proxy.listening_ports == {port: 1, other: 1}
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            assert await read_line(reader) == b"x\n"  # still served: the port was never rebound
            writer.close()
            await proxy.remove_route("c")
            assert proxy.listening_ports == {port: 1}
            assert await refused(other)
            with pytest.raises(ConfigError, match="no route named 'zzz'"):
                await proxy.remove_route("zzz")
            with pytest.raises(ConfigError, match="duplicate route name"):
                await proxy.add_route(forward("b", port, backend))


@async_test()
async def test_concurrent_updates_are_serialised() -> None:
    ports = free_ports(6)
    async with serve(named_handler("x")) as backend:
        async with SmartRoute([], bind_address=LOOPBACK) as proxy:
            await asyncio.gather(
                *(proxy.add_route(forward(f"r{i}", p, backend)) for i, p in enumerate(ports))
            )
            assert proxy.listening_ports == {p: 1 for p in sorted(ports)}
            assert sorted(r.name for r in proxy.routes) == [f"r{i}" for i in range(6)]
            await asyncio.gather(*(proxy.remove_route(f"r{i}") for i in range(6)))
            assert proxy.listening_ports == {}


@async_test()
async def test_failed_update_leaves_the_previous_routes_in_force() -> None:
    port, taken = free_ports(2)
    blocker = await asyncio.start_server(echo_handler, LOOPBACK, taken)
    try:
        async with serve(named_handler("x")) as backend:
            async with SmartRoute([forward("a", port, backend)], bind_address=LOOPBACK) as proxy:
                with pytest.raises(OSError, match=f"port {taken}"):
                    await proxy.update_routes([forward("b", taken, backend)])
                assert proxy.listening_ports == {port: 1}
                assert [r.name for r in proxy.routes] == ["a"]
                reader, writer = await asyncio.open_connection(LOOPBACK, port)
                assert await read_line(reader) == b"x\n"
                writer.close()
    finally:
        blocker.close()


@async_test()
async def test_routes_given_before_start_bind_nothing_until_start() -> None:
    port = free_ports(1)[0]
    async with serve(named_handler("x")) as backend:
        proxy = SmartRoute([], bind_address=LOOPBACK)
        await proxy.update_routes([forward("a", port, backend)])
        assert proxy.listening_ports == {}
        assert await refused(port)
        await proxy.start()
        try:
            assert proxy.listening_ports == {port: 1}
        finally:
            await proxy.stop()
        assert proxy.listening_ports == {}
        assert await refused(port)
