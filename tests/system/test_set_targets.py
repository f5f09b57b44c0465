"""``await proxy.set_targets(route, targets)``: one route's targets change at runtime, nothing else.

New connections and new HTTP requests (also on a kept-alive connection) go to the new targets;
connections under way keep theirs; the port is not rebound; bad input is a ConfigError naming
the field, and then nothing changes.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from http_backend import http_backend
from support import (
    LOOPBACK,
    async_test,
    echo_handler,
    free_port,
    named_handler,
    read_exactly,
    read_line,
    serve,
)

from smartroute import ConfigError, SmartRoute
from smartroute.server import port_manager


def forward(name: str, port: int, target: int, host: str = LOOPBACK, **action: Any) -> Any:
    return {
        "name": name,
        "match": {"ports": port},
        "action": {"type": "forward", "targets": [{"host": host, "port": target}], **action},
    }


async def get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str
) -> dict[str, Any]:
    """One GET on a kept-alive connection; the JSON the backend answered."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200"), head
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    answer: dict[str, Any] = json.loads(await asyncio.wait_for(reader.readexactly(length), 5))
    return answer


@pytest.mark.parametrize("host", [LOOPBACK, "localhost"], ids=["fast-lane", "transport"])
@async_test()
async def test_http_requests_go_to_the_new_targets_even_on_a_kept_alive_connection(
    host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bound: list[int] = []
    original = port_manager.PortManager._bind

    async def counting(self: Any, port: int, *rest: Any) -> Any:
        bound.append(port)
        return await original(self, port, *rest)

    monkeypatch.setattr(port_manager.PortManager, "_bind", counting)
    port = free_port()
    with http_backend("a") as a, http_backend("b") as b:
        route = forward("web", port, a.port, host, protocol="http")
        async with SmartRoute([route], bind_address=LOOPBACK) as proxy:
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            try:
                assert (await get(reader, writer, "/1"))["backend"] == "a"
                await proxy.set_targets("web", [{"host": host, "port": b.port}])
                assert (await get(reader, writer, "/2"))["backend"] == "b"  # same connection
            finally:
                writer.close()
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            try:
                assert (await get(reader, writer, "/3"))["backend"] == "b"
            finally:
                writer.close()
            assert proxy.listening_ports == {port: 1}
            assert [r.name for r in proxy.routes] == ["web"]
    assert bound == [port]  # bound once, at start: set_targets rebinds nothing


@async_test()
async def test_a_relayed_connection_keeps_its_backend_and_new_ones_go_to_the_new_target() -> None:
    port = free_port()
    async with serve(named_handler("old")) as old, serve(named_handler("new")) as new:
        async with SmartRoute([forward("tcp", port, old)], bind_address=LOOPBACK) as proxy:
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            assert await read_line(reader) == b"old\n"
            await proxy.set_targets("tcp", {"host": LOOPBACK, "port": new})  # one target
            writer.write(b"still here\n")  # the live connection is untouched
            assert await read_exactly(reader, 11) == b"still here\n"
            r2, w2 = await asyncio.open_connection(LOOPBACK, port)
            assert await read_line(r2) == b"new\n"
            w2.close()
            writer.close()


@async_test()
async def test_set_targets_closes_idle_backend_connections_to_a_target_no_route_names() -> None:
    port = free_port()
    closed = asyncio.Event()

    async def watched(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answers requests until the proxy closes its connection, then says so."""
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            closed.set()
        finally:
            writer.close()

    async with serve(watched) as old, serve(echo_handler) as other:
        route = forward("web", port, old, protocol="http")
        async with SmartRoute([route], bind_address=LOOPBACK) as proxy:
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await asyncio.wait_for(reader.readuntil(b"ok"), 5)).startswith(b"HTTP/1.1 200")
            writer.close()  # the backend connection goes to the pool
            await asyncio.sleep(0.1)
            assert not closed.is_set()
            await proxy.set_targets("web", [{"host": LOOPBACK, "port": other}])
            await asyncio.wait_for(closed.wait(), 2)


@async_test()
async def test_bad_input_names_what_is_wrong_and_changes_nothing() -> None:
    port, other = free_port(), free_port()
    with http_backend("a") as a:
        routes = [
            forward("web", port, a.port, protocol="http"),
            {"name": "moved", "match": {"ports": other}, "action": {"type": "redirect",
             "redirect": {"to": "https://example.test{path}"}}},
        ]  # fmt: skip
        async with SmartRoute(routes, bind_address=LOOPBACK) as proxy:
            with pytest.raises(ConfigError) as unknown:
                await proxy.set_targets("nope", [{"host": LOOPBACK, "port": a.port}])
            assert unknown.value.path == "set_targets"
            assert "'nope'" in str(unknown.value) and "'web'" in str(unknown.value)
            with pytest.raises(ConfigError) as redirect:
                await proxy.set_targets("moved", [{"host": LOOPBACK, "port": a.port}])
            assert "only forward routes have targets" in str(redirect.value)
            with pytest.raises(ConfigError) as bad_port:
                await proxy.set_targets("web", [{"host": LOOPBACK, "port": 70000}])
            assert bad_port.value.path == "set_targets('web').targets[0].port"
            with pytest.raises(ConfigError) as empty:
                await proxy.set_targets("web", [])
            assert empty.value.path == "set_targets('web').targets"
            with pytest.raises(ConfigError) as unknown_key:
                await proxy.set_targets("web", [{"host": LOOPBACK, "port": a.port, "wieght": 2}])
            assert unknown_key.value.path.startswith("set_targets('web').targets[0]")
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            try:
                assert (await get(reader, writer, "/after"))["backend"] == "a"
            finally:
                writer.close()
