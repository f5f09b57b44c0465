"""``on_data`` observers: every byte of an observed connection, in order, both directions,
without the relay ever waiting for them; a slow observer loses chunks (counted), never memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from typing import Any

import pytest
from http_backend import http_backend, unused_port
from support import LOOPBACK, async_test, echo_handler, serve

from smartroute import SmartRoute
from smartroute.context import RouteContext
from smartroute.server import observe


class Recorder:
    """Keeps what it is shown, per direction; tells ``on_disconnect``'s info."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.seen: dict[str, bytearray] = {"in": bytearray(), "out": bytearray()}
        self.order: list[str] = []
        self.threads: set[str] = set()
        self.ended: list[dict[str, Any]] = []

    def on_data(self, ctx: RouteContext, direction: str, data: bytes) -> None:
        self.threads.add(threading.current_thread().name)
        if self.delay:
            time.sleep(self.delay)
        self.seen[direction] += data
        self.order.append(direction)

    async def on_disconnect(self, ctx: RouteContext, info: dict[str, Any]) -> None:
        self.ended.append(info)


async def until(condition: Any, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def raw_route(port: int, target: int, hook: object) -> dict[str, Any]:
    return {
        "match": {"ports": port},
        "action": {
            "type": "forward",
            "protocol": "tcp",
            "targets": [{"host": LOOPBACK, "port": target}],
        },
        "hooks": [hook],
    }


@async_test()
async def test_an_observer_sees_every_byte_in_order_both_ways() -> None:
    recorder = Recorder()
    port = unused_port()
    payload = bytes(range(256)) * 4096  # 1 MiB
    async with serve(echo_handler) as echo:
        async with SmartRoute([raw_route(port, echo, recorder)], bind_address=LOOPBACK):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write(payload)
            await writer.drain()
            echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 10)
            writer.close()
            assert echoed == payload
            await until(lambda: len(recorder.seen["out"]) == len(payload) and recorder.ended)
    assert bytes(recorder.seen["in"]) == payload
    assert bytes(recorder.seen["out"]) == payload
    assert recorder.threads == {"smartroute-observers"}  # never on the event loop's thread
    observed = recorder.ended[0]["observed"]
    assert observed["bytes"] == 2 * len(payload) and observed["dropped"] == 0


@async_test()
async def test_an_http_exchange_is_observed_as_the_peers_sent_it() -> None:
    recorder = Recorder()
    port = unused_port()
    with http_backend("web") as backend:
        route = {
            "match": {"ports": port},
            "action": {
                "type": "forward",
                "protocol": "http",
                "targets": [{"host": LOOPBACK, "port": backend.port}],
            },
            "hooks": [recorder],
        }
        async with SmartRoute([route], bind_address=LOOPBACK):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            request = b"POST /form HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            writer.close()
            await until(lambda: b'"backend": "web"' in recorder.seen["out"])
    assert bytes(recorder.seen["in"]) == request  # the client's bytes, as sent
    assert recorder.seen["out"].startswith(b"HTTP/1.")  # the backend's, as it sent them


@async_test()
async def test_a_slow_observer_loses_chunks_not_memory_and_never_slows_the_relay(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(observe, "QUEUE_LIMIT", 256 * 1024)
    caplog.set_level(logging.WARNING, "smartroute.hooks")
    recorder = Recorder(delay=0.05)  # 20 chunks a second at most
    port = unused_port()
    payload = b"x" * (16 * 1024 * 1024)
    async with serve(echo_handler) as echo:
        async with SmartRoute([raw_route(port, echo, recorder)], bind_address=LOOPBACK):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            started = time.monotonic()

            async def send() -> None:
                writer.write(payload)
                await writer.drain()

            sending = asyncio.create_task(send())
            echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 20)
            took = time.monotonic() - started
            await sending
            writer.close()
            await until(lambda: bool(recorder.ended))
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    observed = recorder.ended[0]["observed"]
    # Hundreds of chunks went by; the observer could take a few dozen in that time.
    assert observed["dropped"] > 0 and observed["dropped_bytes"] > 0
    assert observed["bytes"] + observed["dropped_bytes"] == 2 * len(payload)
    assert took < 10  # an observer that waited on each chunk would need minutes
    warnings = [r for r in caplog.records if "fall behind" in r.getMessage()]
    assert len(warnings) == 1  # once per connection


@async_test()
async def test_an_observer_that_raises_is_logged_once_and_the_connection_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "smartroute.hooks")

    class Broken:
        def on_data(self, ctx: RouteContext, direction: str, data: bytes) -> None:
            raise RuntimeError("observer bug")

    port = unused_port()
    async with serve(echo_handler) as echo:
        async with SmartRoute([raw_route(port, echo, Broken())], bind_address=LOOPBACK):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            for _ in range(5):
                writer.write(b"ping\n")
                assert await asyncio.wait_for(reader.readline(), 5) == b"ping\n"
            writer.close()
            await until(lambda: any("observer bug" in r.getMessage() for r in caplog.records))
    assert sum("observer bug" in r.getMessage() for r in caplog.records) == 1
