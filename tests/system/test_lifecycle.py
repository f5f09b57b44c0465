"""Real clients, timeouts and shutdown."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from support import (
    LOOPBACK,
    TestCA,
    async_test,
    echo_handler,
    free_port,
    read_exactly,
    read_line,
    require_tool,
    serve,
)

from smartroute import SmartRoute


def greeter(name: str) -> Any:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"hello from {name}\n".encode())
        await writer.drain()
        writer.close()

    return handler


def passthrough(port: int, domain: str, backend: int) -> dict[str, Any]:
    return {
        "name": domain,
        "match": {"ports": port, "domains": domain},
        "action": {
            "type": "forward",
            "targets": [{"host": LOOPBACK, "port": backend}],
            "tls": {"mode": "passthrough"},
        },
    }


@async_test(60)
async def test_openssl_s_client_reaches_the_backend_named_by_sni(
    ca: TestCA, tmp_path: Path
) -> None:
    openssl = require_tool("openssl")
    (tmp_path / "ca.pem").write_text(ca.pem)
    a = ca.server_context(ca.issue("a.example.test"), tmp_path, "a")
    b = ca.server_context(ca.issue("b.example.test"), tmp_path, "b")
    async with serve(greeter("A"), ssl_context=a) as pa, serve(greeter("B"), ssl_context=b) as pb:
        port = free_port()
        routes = [passthrough(port, "a.example.test", pa), passthrough(port, "b.example.test", pb)]
        async with SmartRoute(routes, bind_address=LOOPBACK):
            for name, expected in (
                ("a.example.test", "hello from A"),
                ("b.example.test", "hello from B"),
            ):
                proc = await asyncio.create_subprocess_exec(
                    openssl, "s_client", "-connect", f"{LOOPBACK}:{port}",
                    "-servername", name, "-verify_hostname", name,
                    "-CAfile", str(tmp_path / "ca.pem"), "-verify_return_error", "-ign_eof",
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )  # fmt: skip
                out, err = await asyncio.wait_for(proc.communicate(), 20)
                assert proc.returncode == 0, err.decode()
                assert expected in out.decode()
                assert "Verify return code: 0 (ok)" in out.decode()
                assert f"CN = {name}" in out.decode()


@async_test()
async def test_idle_connections_are_closed_after_idle_timeout() -> None:
    async with serve(echo_handler) as backend:
        port = free_port()
        route = {
            "match": {"ports": port},
            "action": {"type": "forward", "targets": [{"host": LOOPBACK, "port": backend}]},
        }
        async with SmartRoute([route], bind_address=LOOPBACK, idle_timeout=0.4) as proxy:
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            started = time.monotonic()
            for _ in range(5):  # traffic keeps it alive past the timeout
                writer.write(b"x")
                assert await read_exactly(reader, 1) == b"x"
                await asyncio.sleep(0.15)
            assert await asyncio.wait_for(reader.read(), 5) == b""  # then silence closes it
            assert time.monotonic() - started >= 0.4 + 0.6
            writer.close()
            await asyncio.sleep(0.05)
            assert proxy.stats()["connections"]["active"] == 0


@async_test()
async def test_max_connection_lifetime_closes_even_busy_connections() -> None:
    async with serve(echo_handler) as backend:
        port = free_port()
        route = {
            "match": {"ports": port},
            "action": {"type": "forward", "targets": [{"host": LOOPBACK, "port": backend}]},
        }
        async with SmartRoute(
            [route], bind_address=LOOPBACK, max_connection_lifetime=0.5, idle_timeout=None
        ):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            closed = False
            for _ in range(100):
                writer.write(b"y")
                try:
                    if await asyncio.wait_for(reader.read(1), 2) == b"":
                        closed = True
                        break
                except ConnectionError:
                    closed = True
                    break
                await asyncio.sleep(0.05)
            assert closed
            writer.close()


@async_test()
async def test_stop_drains_live_connections_then_closes_the_rest() -> None:
    async with serve(echo_handler) as backend:
        port = free_port()
        route = {
            "match": {"ports": port},
            "action": {"type": "forward", "targets": [{"host": LOOPBACK, "port": backend}]},
        }
        proxy = SmartRoute([route], bind_address=LOOPBACK, graceful_shutdown_timeout=0.5)
        await proxy.start()
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(b"ping\n")
        assert await read_line(reader) == b"ping\n"
        started = time.monotonic()
        stopping = asyncio.create_task(proxy.stop())
        await asyncio.sleep(0.1)
        writer.write(b"still served while draining\n")  # the grace period lets it finish
        assert await read_line(reader) == b"still served while draining\n"
        await stopping
        assert 0.4 <= time.monotonic() - started < 5
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed at the end of grace
        writer.close()
        assert proxy.listening_ports == {} and proxy.stats()["connections"]["active"] == 0
        try:
            await asyncio.open_connection(LOOPBACK, port)
            raise AssertionError("the port should be closed")
        except ConnectionRefusedError:
            pass
