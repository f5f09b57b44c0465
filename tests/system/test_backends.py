"""Backends end to end, in one process: failover, passive health, fallback routes, 503 with
``Retry-After``, retries and what ``stats()["targets"]`` says, on both paths a request can take
(the fast lane for IP-literal targets without a retry policy, the transport path otherwise).

The real-process counterparts (nginx backends, curl, wrk) are in ``test_backends_real.py``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from typing import Any

import pytest
from http_backend import http_backend, unused_port
from support import LOOPBACK, async_test, named_handler, read_line, serve

from smartroute import SmartRoute

# A lane route (IP literal, no retry) and a transport route (a host name).
PATHS = pytest.mark.parametrize("host", [LOOPBACK, "localhost"], ids=["fast-lane", "transport"])


def route(port: int, targets: list[dict[str, Any]], name: str = "web", **action: Any) -> Any:
    """A forward route on ``port``; HTTP unless ``protocol`` says otherwise."""
    action.setdefault("protocol", "http")
    return {
        "name": name,
        "match": {"ports": port},
        "action": {"type": "forward", "targets": targets, **action},
    }


async def request(
    port: int, method: str = "GET", body: bytes = b"", path: str = "/"
) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection: (status, headers, body)."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        if body or method in ("POST", "PUT"):
            head += f"Content-Length: {len(body)}\r\n"
        writer.write(head.encode() + b"\r\n" + body)
        data = await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()
    raw_head, _, rest = data.partition(b"\r\n\r\n")
    lines = raw_head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, rest


def backend_of(body: bytes) -> str:
    name: str = json.loads(body)["backend"]
    return name


async def dropper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A backend that reads a request and closes without a byte of answer."""
    try:
        await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()


def targets_state(proxy: SmartRoute) -> dict[str, dict[str, Any]]:
    state: dict[str, dict[str, Any]] = proxy.stats()["targets"]
    return state


async def idle_targets(proxy: SmartRoute) -> dict[str, dict[str, Any]]:
    """The targets' state once nothing is under way (the proxy may see a close after the
    client did); fails if something stays active."""
    for _ in range(100):
        state = targets_state(proxy)
        if all(target["active"] == 0 for target in state.values()):
            return state
        await asyncio.sleep(0.02)
    raise AssertionError(f"targets still active: {state}")


@PATHS
@async_test()
async def test_a_dead_target_is_failed_over_and_then_left_out(host: str) -> None:
    dead = unused_port()
    port = unused_port()
    with http_backend("live") as live:
        targets = [{"host": host, "port": dead}, {"host": host, "port": live.port}]
        config = route(port, targets, passive_health={"max_fails": 1, "fail_timeout": 30})
        async with SmartRoute([config], bind_address=LOOPBACK) as proxy:
            status, _, body = await request(port)
            assert (status, backend_of(body)) == (200, "live")  # the dead one was tried first
            key = f"{host}:{dead}"
            dead_state = targets_state(proxy)[key]
            assert dead_state["up"] is False and dead_state["fails"] == 1
            error = dead_state["last_error"].lower()
            assert "refused" in error or "connect call failed" in error
            for _ in range(6):  # round-robin would start at the dead one every other time
                status, _, body = await request(port)
                assert (status, backend_of(body)) == (200, "live")
            assert targets_state(proxy)[key]["fails"] == 1  # never tried again
            await idle_targets(proxy)  # every request settled


@PATHS
@async_test()
async def test_raw_connections_fail_over_and_count_as_active_while_open(host: str) -> None:
    dead = unused_port()
    port = unused_port()
    async with serve(named_handler("echo")) as echo:
        targets = [{"host": host, "port": dead}, {"host": host, "port": echo}]
        passive = {"max_fails": 1, "fail_timeout": 30}
        config = route(port, targets, protocol="tcp", passive_health=passive)
        async with SmartRoute([config], bind_address=LOOPBACK) as proxy:
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            assert await read_line(reader) == b"echo\n"
            assert targets_state(proxy)[f"{host}:{echo}"]["active"] == 1
            assert targets_state(proxy)[f"{host}:{dead}"]["up"] is False
            writer.close()
            await idle_targets(proxy)


@PATHS
@async_test()
async def test_no_target_up_falls_back_to_the_next_route_then_503(host: str) -> None:
    dead = unused_port()
    port = unused_port()
    with http_backend("fallback") as fallback:
        passive = {"max_fails": 1, "fail_timeout": 7}
        primary = route(port, [{"host": host, "port": dead}], "primary", passive_health=passive)
        primary["priority"] = 10
        second = route(port, [{"host": host, "port": fallback.port}], name="second")
        async with SmartRoute([primary, second], bind_address=LOOPBACK) as proxy:
            status, _, _ = await request(port)
            assert status == 502  # the one target failed: now it is out
            status, _, body = await request(port)
            assert (status, backend_of(body)) == (200, "fallback")
            await proxy.remove_route("second")
            status, headers, body = await request(port)
            assert status == 503
            assert headers["retry-after"] == "7"  # the passive time out
            assert b"no target of route 'primary' is up" in body


@PATHS
@async_test()
async def test_a_raw_connection_with_no_target_up_is_closed(host: str) -> None:
    dead = unused_port()
    port = unused_port()
    passive = {"max_fails": 1, "fail_timeout": 30}
    config = route(port, [{"host": host, "port": dead}], protocol="tcp", passive_health=passive)
    async with SmartRoute([config], bind_address=LOOPBACK) as proxy:
        for _ in range(2):  # the failing connect takes it out, then nothing is tried
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            assert await asyncio.wait_for(reader.read(100), 5) == b""
            writer.close()
        assert targets_state(proxy)[f"{host}:{dead}"]["fails"] == 1
        assert proxy.stats()["connections"]["active"] == 0


@async_test()
async def test_retries_send_idempotent_requests_dropped_unanswered_to_another_target() -> None:
    port = unused_port()
    async with serve(dropper) as drops:
        with http_backend("live") as live:
            targets = [{"host": LOOPBACK, "port": drops}, {"host": LOOPBACK, "port": live.port}]
            retry = {"attempts": 2, "backoff": 0.01, "jitter": 0}
            config = route(port, targets, load_balancing="first", retry=retry)
            async with SmartRoute([config], bind_address=LOOPBACK) as proxy:
                status, _, body = await request(port)
                assert (status, backend_of(body)) == (200, "live")
                # A PUT with its body held whole goes again, body and all.
                status, _, body = await request(port, "PUT", b"payload")
                info = json.loads(body)
                assert (status, info["backend"], info["body_length"]) == (200, "live", 7)
                # A POST is not idempotent: the backend may have acted on it.
                status, _, body = await request(port, "POST", b"payload")
                assert status == 502 and b"without answering" in body
                assert targets_state(proxy)[f"{LOOPBACK}:{drops}"]["fails"] == 3
                await proxy.set_targets("web", targets)  # the same targets ...
                config["action"]["retry"] = {**retry, "any_method": True}
                await proxy.update_routes([config])  # ... and a route that says so
                status, _, body = await request(port, "POST", b"payload")
                assert (status, backend_of(body)) == (200, "live")


@async_test()
async def test_retries_stop_after_the_attempts_and_back_off_in_between() -> None:
    port = unused_port()
    dead = [unused_port() for _ in range(4)]
    targets = [{"host": "localhost", "port": p} for p in dead]
    retry = {"attempts": 3, "backoff": 0.1, "max_backoff": 1, "jitter": 0}
    async with SmartRoute(
        [route(port, targets, load_balancing="first", retry=retry)], bind_address=LOOPBACK
    ) as proxy:
        started = time.monotonic()
        status, _, body = await request(port)
        took = time.monotonic() - started
        assert status == 502
        assert body.count(b"localhost:") == 3  # three tries, the fourth target never asked
        assert took >= 0.1 + 0.2  # backoff 0.1, then 0.2
        fails = [targets_state(proxy)[f"localhost:{p}"]["fails"] for p in dead]
        assert fails == [1, 1, 1, 0]


@async_test()
async def test_backup_targets_take_traffic_only_when_no_primary_is_up() -> None:
    port = unused_port()
    with http_backend("primary") as primary, http_backend("backup") as backup:
        targets = [
            {"host": LOOPBACK, "port": primary.port},
            {"host": LOOPBACK, "port": backup.port, "backup": True},
        ]
        config = route(port, targets, passive_health={"max_fails": 1, "fail_timeout": 30})
        async with SmartRoute([config], bind_address=LOOPBACK) as proxy:
            seen = {backend_of((await request(port))[2]) for _ in range(6)}
            assert seen == {"primary"}
            await proxy.set_targets("web", [{"host": LOOPBACK, "port": unused_port()}, targets[1]])
            statuses = [(await request(port))[0] for _ in range(2)]
            # The new primary refuses: the backup answers this request, and the next.
            assert statuses == [200, 200]
            assert {backend_of((await request(port))[2]) for _ in range(3)} == {"backup"}


async def resetter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A backend that resets every connection before sending a byte."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await asyncio.sleep(0.05)  # the client's bytes arrive first
    writer.transport.abort()


@PATHS
@async_test()
async def test_a_reset_before_the_first_byte_counts_as_a_failure(host: str) -> None:
    port = unused_port()
    async with serve(resetter) as resets:
        passive = {"max_fails": 1, "fail_timeout": 30}
        config = route(
            port, [{"host": host, "port": resets}], protocol="tcp", passive_health=passive
        )
        async with SmartRoute([config], bind_address=LOOPBACK) as proxy:
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write(b"hello")
            assert await asyncio.wait_for(reader.read(100), 5) == b""
            writer.close()
            state = (await idle_targets(proxy))[f"{host}:{resets}"]
            assert (state["up"], state["fails"]) == (False, 1)
            assert "reset" in state["last_error"].lower()
