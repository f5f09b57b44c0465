"""The fast lane: connections relayed on bare sockets, without an asyncio transport or task.

:func:`relay_plan` decides which routes qualify (plain forwards to IP-literal targets);
:class:`SocketRelay` then moves the bytes as the lane's epoll set reports its sockets ready,
and each port's :class:`Listener` accepts connections itself. The end-to-end tests hold the
lane to the promises of the transport relay over real loopback sockets: bytes exact both ways,
failover and connect timeouts, backpressure, half-close, resets, security and time limits.
Each checks what the client and the backend see and the connection's record, and (with
``settled``) that nothing is left open; the last relay tests pile a second failure onto a first
one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import logging
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from leaks import rss_bytes, settled
from support import (
    LOOPBACK,
    MIB,
    PARTIAL,
    Behaviour,
    Connection,
    Finished,
    ScriptedBackend,
    TestCA,
    async_test,
    flushed,
    free_port,
    free_ports,
    named_handler,
    read_to_end,
    reset,
    serve,
)

from smartroute import RouteContext, SmartRoute
from smartroute.routing.matcher import RouteTable
from smartroute.routing.model import CompiledRoute
from smartroute.routing.validation import validate_route
from smartroute.server import lane as lane_module
from smartroute.server import port_manager, socket_relay
from smartroute.server.backends.book import Backends
from smartroute.server.backends.group import Address, TargetGroup, literal_address
from smartroute.server.epoll_set import IN, OUT
from smartroute.server.lane import RelayLane
from smartroute.server.port_manager import Listener
from smartroute.server.relay_plan import relay_plan
from smartroute.server.socket_relay import CHUNK, SocketRelay
from smartroute.server.stats import ConnectionRecord

FAST = {"connect_timeout": 0.5, "graceful_shutdown_timeout": 1}

# -- routes ----------------------------------------------------------------------------------


def target(port: Any, host: Any = LOOPBACK, **extra: Any) -> dict[str, Any]:
    """A forward target: an int, "preserve" or a function for the port; host(s) or a function."""
    return {"host": host, "port": port, **extra}


def forward(
    port: int, *targets: dict[str, Any], name: str = "lane", **extra: Any
) -> dict[str, Any]:
    """A port-only forward route (``extra`` adds route keys: security, timeouts, ...)."""
    return {
        "name": name,
        "match": {"ports": port},
        "action": {"type": "forward", "targets": list(targets)},
        **extra,
    }


def addresses(group: TargetGroup | None) -> tuple[Address | None, ...] | None:
    return None if group is None else tuple(member.address for member in group.members)


def plan(route: dict[str, Any], port: int = 8000) -> tuple[Address | None, ...] | None:
    """The lane's plan for a route validated the public way, on ``port``: its members'
    addresses."""
    compiled = validate_route(route, 0)
    book = Backends()
    book.prepare([compiled])
    return addresses(relay_plan(compiled, book.group(compiled, port)))


# -- spies -----------------------------------------------------------------------------------


@pytest.fixture
def relays(monkeypatch: pytest.MonkeyPatch) -> list[SocketRelay]:
    """Every :class:`SocketRelay` made while the test runs: the lane was taken."""
    made: list[SocketRelay] = []
    original = SocketRelay.__init__

    def init(self: SocketRelay, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(SocketRelay, "__init__", init)
    return made


# -- proxy, backends, clients ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(*routes: dict[str, Any], **settings: Any) -> AsyncIterator[SmartRoute]:
    options = {"bind_address": LOOPBACK, **FAST, **settings}
    async with SmartRoute(list(routes), **options) as proxy:
        yield proxy


@contextlib.asynccontextmanager
async def backend(
    *script: Behaviour, host: str = LOOPBACK
) -> AsyncIterator[tuple[int, ScriptedBackend]]:
    server = ScriptedBackend(*script)
    async with serve(server.handle, host) as port:
        yield port, server


@contextlib.asynccontextmanager
async def connect(port: int, host: str = LOOPBACK) -> AsyncIterator[Connection]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def drain_to_end(reader: asyncio.StreamReader) -> tuple[int, str]:
    """Read until the peer is gone: (bytes read, "eof" or "reset")."""
    count = 0
    try:
        while chunk := await reader.read(65536):
            count += len(chunk)
    except ConnectionError:
        return count, "reset"
    return count, "eof"


async def ping(connection: Connection, payload: bytes = b"ping\n") -> bytes:
    """One echo round trip: what came back (b"" when the connection ended)."""
    reader, writer = connection
    writer.write(payload)
    try:
        return await asyncio.wait_for(reader.readexactly(len(payload)), 5)
    except (ConnectionError, asyncio.IncompleteReadError):
        return b""


async def ping_works(port: int) -> bool:
    """The proxy still relays on ``port`` (to an echoing backend)."""
    async with connect(port) as connection:
        return await ping(connection) == b"ping\n"


async def until(condition: Callable[[], bool], what: str, timeout: float = 5) -> None:
    """Wait for a state no event announces (the proxy pausing a socket), polling briefly."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.01)


async def only_relay(relays: list[SocketRelay]) -> SocketRelay:
    await until(lambda: bool(relays), "the lane took the connection")
    assert len(relays) == 1
    return relays[0]


@contextlib.asynccontextmanager
async def unanswered_port() -> AsyncIterator[int]:
    """A port whose accept queue is full: the kernel drops SYNs to it, so a connect hangs.

    ``listen(0)`` queues one connection; once a filler holds that place, further connections
    stay unanswered. A probe checks the trick works on this kernel before a test relies on it.
    """
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []

    def new_socket() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        socks.append(sock)
        sock.setblocking(False)
        return sock

    try:
        listener = new_socket()
        listener.bind((LOOPBACK, 0))
        listener.listen(0)
        address = listener.getsockname()
        await asyncio.wait_for(loop.sock_connect(new_socket(), address), 2)  # the filler
        try:
            await asyncio.wait_for(loop.sock_connect(new_socket(), address), 0.3)  # the probe
        except TimeoutError:
            pass
        else:
            pytest.skip("this kernel answers connections beyond a full accept queue")
        yield address[1]
    finally:
        for sock in socks:
            sock.close()


def require_ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")


@functools.cache
def pattern_block() -> bytes:
    """1 MiB that is not a repetition of anything shorter than 32 bytes (catches reordering)."""
    return b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(MIB // 32))


def pattern_digest(blocks: int) -> str:
    digest = hashlib.sha256()
    for _ in range(blocks):
        digest.update(pattern_block())
    return digest.hexdigest()


async def send_blocks(writer: asyncio.StreamWriter, blocks: int, progress: dict[str, int]) -> None:
    """Send ``blocks`` pattern blocks as the peer takes them, counting in ``progress``."""
    for _ in range(blocks):
        writer.write(pattern_block())
        await writer.drain()
        progress["sent"] += MIB


async def held_back(paused: Callable[[], bool], progress: dict[str, int]) -> None:
    """Wait until the proxy paused a direction and the sender made no progress for a while."""
    await until(paused, "the proxy paused reading")
    last, still_since = progress["sent"], time.monotonic()
    while time.monotonic() - still_since < 0.3:
        await asyncio.sleep(0.02)
        if progress["sent"] != last:
            last, still_since = progress["sent"], time.monotonic()


async def until_held(relays: list[SocketRelay], writer: asyncio.StreamWriter) -> SocketRelay:
    """Send from the client until the proxy holds bytes its backend does not take; the relay.

    The kernel's socket buffers on the way take in tens of MiB first (more when the stream is
    spliced), so the client writes as long as its own buffer drains, a MiB at a time.
    """
    relay = await only_relay(relays)
    block = b"u" * MIB
    deadline = time.monotonic() + 5
    while not relay.up.held:
        assert time.monotonic() < deadline, "timed out waiting until the proxy paused"
        if writer.transport.get_write_buffer_size() < MIB:
            writer.write(block)
        await asyncio.sleep(0.005)
    return relay


# -- relay_plan and literal_address ----------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", (socket.AF_INET, ("127.0.0.1", 80), "127.0.0.1:80")),
        ("10.1.2.3", (socket.AF_INET, ("10.1.2.3", 80), "10.1.2.3:80")),
        ("::1", (socket.AF_INET6, ("::1", 80), "::1:80")),
        ("0:0:0:0:0:0:0:1", (socket.AF_INET6, ("::1", 80), "0:0:0:0:0:0:0:1:80")),
        ("localhost", None),
        ("backend.example", None),
        ("127.0.0", None),
        ("", None),
    ],
)
def test_literal_address_of_ip_literals_and_not_of_names(
    host: str, expected: Address | None
) -> None:
    assert literal_address(host, 80) == expected


V4 = socket.AF_INET
V6 = socket.AF_INET6


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        pytest.param([target(9001)], ((V4, ("127.0.0.1", 9001), "127.0.0.1:9001"),), id="ipv4"),
        pytest.param([target(9001, "::1")], ((V6, ("::1", 9001), "::1:9001"),), id="ipv6"),
        pytest.param(
            [target(9001, ["127.0.0.2", "::1"]), target(9002, "10.0.0.1")],
            (
                (V4, ("127.0.0.2", 9001), "127.0.0.2:9001"),
                (V6, ("::1", 9001), "::1:9001"),
                (V4, ("10.0.0.1", 9002), "10.0.0.1:9002"),
            ),
            id="several-hosts-and-targets-in-order",
        ),
        pytest.param(
            [target("preserve"), target(9002, "::1")],
            ((V4, ("127.0.0.1", 8000), "127.0.0.1:8000"), (V6, ("::1", 9002), "::1:9002")),
            id="preserve-is-the-listening-port",
        ),
    ],
)
def test_relay_plan_of_plain_forwards_to_ip_literals(
    targets: list[dict[str, Any]], expected: tuple[Address, ...]
) -> None:
    assert plan(forward(8000, *targets), 8000) == expected


def test_relay_plan_keeps_tcp_forwards_and_tls_passthrough() -> None:
    expected = ((V4, ("127.0.0.1", 9001), "127.0.0.1:9001"),)
    tcp = forward(8000, target(9001))
    tcp["action"]["protocol"] = "tcp"
    assert plan(tcp) == expected
    passthrough = forward(8000, target(9001))
    passthrough["action"]["tls"] = {"mode": "passthrough"}
    assert plan(passthrough) == expected
    # The plan follows the port it is asked for: each port of a range preserves its own.
    ranged = forward(8000, target("preserve"))
    ranged["match"]["ports"] = "8000-8001"
    assert plan(ranged, 8001) == ((V4, ("127.0.0.1", 8001), "127.0.0.1:8001"),)


def _host_function(ctx: RouteContext) -> str:
    return LOOPBACK


def _port_function(ctx: RouteContext) -> int:
    return 9001


def _terminating(mode: str) -> dict[str, Any]:
    route = forward(8000, target(9001))
    route["match"]["domains"] = "a.example.test"
    route["action"]["tls"] = {"mode": mode, "certificate": "auto"}
    return route


def _http() -> dict[str, Any]:
    route = forward(8000, target(9001))
    route["action"]["protocol"] = "http"
    return route


@pytest.mark.parametrize(
    "route",
    [
        pytest.param(_http(), id="protocol-http"),
        pytest.param(_terminating("terminate"), id="tls-terminate"),
        pytest.param(_terminating("terminate-and-reencrypt"), id="tls-reencrypt"),
        pytest.param(forward(8000, target(9001, _host_function)), id="callable-host"),
        pytest.param(forward(8000, target(_port_function)), id="callable-port"),
        pytest.param(
            forward(8000, target(9001, send_proxy_protocol="v1")), id="send-proxy-protocol"
        ),
        pytest.param(forward(8000, target(9001, "localhost")), id="host-name"),
        pytest.param(
            forward(8000, target(9001), target(9002, [LOOPBACK, "backend.example"])),
            id="one-host-name-among-literals",
        ),
        pytest.param({"match": {"ports": 8000}, "action": {"type": "block"}}, id="not-a-forward"),
    ],
)
def test_relay_plan_is_none_when_a_route_needs_more_than_a_pipe(route: dict[str, Any]) -> None:
    assert plan(route) is None


def test_the_lane_plans_once_per_route_and_port_until_the_routes_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    computed: list[int] = []

    def counting(route: CompiledRoute, group: TargetGroup | None) -> TargetGroup | None:
        assert group is not None
        computed.append(group.members[0].port)
        return relay_plan(route, group)

    monkeypatch.setattr(lane_module, "relay_plan", counting)
    runtime = SimpleNamespace(table=object(), backends=Backends())
    lane = RelayLane(cast(Any, runtime))
    route = validate_route(forward(8000, target("preserve")), 0)
    runtime.backends.prepare([route])
    assert addresses(lane.plan(route, 8000)) == ((V4, ("127.0.0.1", 8000), "127.0.0.1:8000"),)
    assert lane.plan(route, 8000) is lane.plan(route, 8000)
    assert addresses(lane.plan(route, 8001)) == ((V4, ("127.0.0.1", 8001), "127.0.0.1:8001"),)
    assert computed == [8000, 8001]
    runtime.table = object()  # a route update: plans are keyed by id(route), which may be reused
    lane.plan(route, 8000)
    assert computed == [8000, 8001, 8000]


def test_the_lane_serves_a_port_only_when_some_route_there_can_be_relayed() -> None:
    terminate = forward(443, target(8443))
    terminate["match"]["domains"] = "a.example.test"
    terminate["action"]["tls"] = {"mode": "terminate", "certificate": "auto"}
    passthrough = forward(443, target(9443))
    passthrough["match"]["domains"] = "b.example.test"
    passthrough["action"]["tls"] = {"mode": "passthrough"}
    named = forward(80, target(8080, "localhost"))
    routes = [validate_route(r, i) for i, r in enumerate([terminate, named])]
    backends = Backends()
    runtime = SimpleNamespace(table=RouteTable(routes, backends.prepare(routes)), backends=backends)
    lane = RelayLane(cast(Any, runtime))
    # Nothing on these ports could be relayed: no peeking, the pipeline takes them at once.
    assert (lane.serves(443), lane.serves(80), lane.serves(81)) == (False, False, False)
    routes.append(validate_route(passthrough, 2))
    runtime.table = RouteTable(routes, backends.prepare(routes))  # a route update
    assert (lane.serves(443), lane.serves(80)) == (True, False)


# -- the lane is taken, and only when it should be -------------------------------------------


@async_test(timeout=10)
async def test_port_only_forward_to_an_ip_literal_is_relayed_on_the_lane(
    relays: list[SocketRelay], finished: Finished
) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, every byte value
    async with backend() as (echo, _):
        port = free_port()
        async with running(forward(port, target(echo))) as proxy:
            async with settled(proxy), connect(port) as (reader, writer):
                assert await ping((reader, writer)) == b"ping\n"
                # Open and relaying: a SocketRelay, and no connection task at all.
                assert len(relays) == 1
                assert proxy._runtime.tasks == set()
                assert proxy.stats()["connections"]["active"] == 1
                writer.write(payload)
                writer.write_eof()
                assert await read_to_end(reader) == (payload, False)
            record = await finished.next()
    assert (record.route, record.target) == ("lane", f"{LOOPBACK}:{echo}")
    assert (record.outcome, record.error) == ("ok", None)
    assert (record.bytes_in, record.bytes_out) == (len(payload) + 5, len(payload) + 5)
    assert len(relays) == 1


@async_test(timeout=10)
async def test_ipv6_literal_target_is_relayed_on_the_lane(
    relays: list[SocketRelay], finished: Finished
) -> None:
    require_ipv6_loopback()
    payload = b"over v6 " * 50_000
    async with backend(host="::1") as (echo, _):
        port = free_port()
        async with running(forward(port, target(echo, "::1"))) as proxy:
            async with settled(proxy), connect(port) as (reader, writer):
                writer.write(payload)
                writer.write_eof()
                assert await read_to_end(reader) == (payload, False)
            record = await finished.next()
    assert (
        len(relays) == 1
        and relays[0].members[0].address is not None
        and relays[0].members[0].address[0] == socket.AF_INET6
    )
    assert (record.target, record.outcome) == (f"[::1]:{echo}", "ok")


@async_test(timeout=10)
async def test_forward_to_a_host_name_takes_the_transport_path(
    relays: list[SocketRelay], finished: Finished
) -> None:
    payload = b"by name " * 50_000
    async with backend() as (echo, _):
        port = free_port()
        async with running(forward(port, target(echo, "localhost"))) as proxy:
            async with settled(proxy), connect(port) as (reader, writer):
                writer.write(payload)
                writer.write_eof()
                assert await read_to_end(reader) == (payload, False)
            record = await finished.next()
    assert relays == []
    assert (record.target, record.outcome) == (f"localhost:{echo}", "ok")


@async_test(timeout=10)
async def test_http_on_a_port_whose_routes_need_the_first_bytes_takes_the_transport_path(
    relays: list[SocketRelay], finished: Finished
) -> None:
    request = b"GET / HTTP/1.1\r\nHost: other.example.test\r\n\r\n" + b"body " * 10_000
    async with (
        backend(named_handler("sni")) as (by_name, sni),
        backend(named_handler("port")) as (by_port, _),
    ):
        port = free_port()
        sni_route = forward(port, target(by_name), name="sni")
        sni_route["match"]["domains"] = "a.example.test"
        raw = forward(port, target(by_port))
        raw["action"]["protocol"] = "tcp"  # relayed as bytes, not proxied as HTTP
        async with running(sni_route, raw) as proxy:
            async with settled(proxy), connect(port) as (reader, writer):
                writer.write(request)
                writer.write_eof()
                assert await read_to_end(reader) == (b"port\n" + request, False)
            record = await finished.next()
    assert relays == [] and sni.accepted == 0
    assert (record.route, record.target) == ("lane", f"{LOOPBACK}:{by_port}")


@async_test(timeout=10)
async def test_first_bytes_peeked_for_routing_still_reach_the_backend_on_the_lane(
    relays: list[SocketRelay], finished: Finished
) -> None:
    payload = b"\x00\x01 neither TLS nor HTTP " * 10_000
    async with (
        backend(named_handler("sni")) as (by_name, sni),
        backend(named_handler("port")) as (by_port, _),
    ):
        port = free_port()
        sni_route = forward(port, target(by_name), name="sni")
        sni_route["match"]["domains"] = "a.example.test"
        async with running(sni_route, forward(port, target(by_port))) as proxy:
            async with settled(proxy), connect(port) as (reader, writer):
                writer.write(payload)
                writer.write_eof()
                assert await read_to_end(reader) == (b"port\n" + payload, False)
            record = await finished.next()
    assert len(relays) == 1 and sni.accepted == 0
    assert (record.route, record.bytes_in) == ("lane", len(payload))


async def through_sni_passthrough(
    ca: TestCA, tmp_path: Path, finished: Finished
) -> tuple[ConnectionRecord, int]:
    """One TLS session to a.example.test through a port with an SNI passthrough route: the
    backend's greeting and an echo pass; the record of the connection and the backend's port."""
    context = ca.server_context(ca.issue("a.example.test"), tmp_path, "a")
    async with serve(named_handler("secret"), ssl_context=context) as tls_backend:
        port = free_port()
        route = forward(port, target(tls_backend))
        route["match"]["domains"] = "a.example.test"
        route["action"]["tls"] = {"mode": "passthrough"}
        async with running(route) as proxy:
            async with settled(proxy):
                reader, writer = await asyncio.open_connection(
                    LOOPBACK, port, ssl=ca.client_context(), server_hostname="a.example.test"
                )
                assert await asyncio.wait_for(reader.readline(), 5) == b"secret\n"
                writer.write(b"ping\n")
                assert await asyncio.wait_for(reader.readline(), 5) == b"ping\n"
                writer.close()
                with contextlib.suppress(ssl.SSLError, ConnectionError):
                    await writer.wait_closed()
                return await finished.next(), tls_backend


@async_test(timeout=10)
async def test_tls_passthrough_chosen_by_sni_is_relayed_on_the_lane(
    ca: TestCA, tmp_path: Path, relays: list[SocketRelay], finished: Finished
) -> None:
    record, tls_backend = await through_sni_passthrough(ca, tmp_path, finished)
    assert len(relays) == 1
    assert (record.route, record.domain, record.target) == (
        "lane",
        "a.example.test",
        f"{LOOPBACK}:{tls_backend}",
    )


@async_test(timeout=10)
async def test_route_updates_change_where_new_lane_connections_go(
    relays: list[SocketRelay],
) -> None:
    async with (
        backend(named_handler("old")) as (old, _),
        backend(*[named_handler("new")] * 2) as (new, _),
    ):
        port = free_port()
        async with running(forward(port, target(old))) as proxy:
            async with connect(port) as (reader, _writer):
                assert await asyncio.wait_for(reader.readline(), 5) == b"old\n"
            # Same port and route name, another target: no plan is kept from the old table.
            await proxy.update_routes([forward(port, target(new))])
            async with connect(port) as (reader, _writer):
                assert await asyncio.wait_for(reader.readline(), 5) == b"new\n"
            await proxy.update_routes([forward(port, target(new, "localhost"))])
            async with connect(port) as (reader, _writer):
                assert await asyncio.wait_for(reader.readline(), 5) == b"new\n"
    assert len(relays) == 2  # the third connection went to a host name: not on the lane


# -- targets: rotation, failover, unreachable, connect timeout -------------------------------


@async_test(timeout=10)
async def test_round_robin_and_failover_keep_the_targets_order(finished: Finished) -> None:
    dead = free_port()
    behaviours = [named_handler("a")] * 4
    async with backend(*behaviours) as (a, _), backend(*[named_handler("b")] * 4) as (b, _):
        port = free_port()
        route = forward(port, target(a), target(dead), target(b))
        async with running(route) as proxy:
            seen = []
            async with settled(proxy):
                for _ in range(4):
                    async with connect(port) as (reader, writer):
                        seen.append(await asyncio.wait_for(reader.readline(), 5))
                        assert await ping((reader, writer)) == b"ping\n"
                records = [await finished.next() for _ in range(4)]
    # Starts rotate a, dead, b, a; the start at the dead target fails over to the next one.
    assert seen == [b"a\n", b"b\n", b"b\n", b"a\n"]
    assert [r.target for r in records] == [f"{LOOPBACK}:{p}" for p in (a, b, b, a)]
    assert all((r.outcome, r.error) == ("ok", None) for r in records)


@async_test(timeout=10)
async def test_unreachable_targets_close_the_client_and_are_logged_once(
    caplog: pytest.LogCaptureFixture, relays: list[SocketRelay], finished: Finished
) -> None:
    dead, also_dead = free_ports(2)
    # 255.255.255.255 fails at once (no TCP to a broadcast address), the others once refused.
    unroutable = "255.255.255.255"
    route = forward(port := free_port(), target(dead), target(also_dead, [unroutable, LOOPBACK]))
    with caplog.at_level(logging.WARNING, logger="smartroute"):
        async with running(route) as proxy:
            async with settled(proxy), connect(port) as (reader, writer):
                started = time.monotonic()
                assert await read_to_end(reader) == (b"", False)
                assert time.monotonic() - started < 0.4  # refusals, not the connect timeout
            record = await finished.next()
    assert len(relays) == 1
    assert record.outcome == "backend-unreachable"
    assert record.error is not None
    failures = record.error.split("; ")
    assert [f.split(" ", 1)[0] for f in failures] == [
        f"{LOOPBACK}:{dead}",
        f"{unroutable}:{also_dead}",
        f"{LOOPBACK}:{also_dead}",
    ]
    assert failures[0].endswith("Connection refused")
    assert failures[2].endswith("Connection refused")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "'lane'" in message and record.error in message and record.id in message


@async_test(timeout=10)
async def test_connect_timeout_closes_the_client_after_connect_timeout(
    finished: Finished,
) -> None:
    async with unanswered_port() as hanging:
        port = free_port()
        async with running(forward(port, target(hanging))) as proxy:
            async with settled(proxy), connect(port) as (reader, writer):
                writer.write(b"hello?")
                started = time.monotonic()
                data, _ = await read_to_end(reader)
                waited = time.monotonic() - started
            record = await finished.next()
    assert data == b""
    assert 0.4 <= waited < 2, waited
    assert record.outcome == "backend-unreachable"
    assert record.error == f"{LOOPBACK}:{hanging} timed out after 0.5s"


@async_test(timeout=10)
async def test_connect_timeout_fails_over_to_the_next_target(finished: Finished) -> None:
    async with unanswered_port() as hanging, backend(named_handler("live")) as (live, _):
        port = free_port()
        async with running(forward(port, target(hanging), target(live))) as proxy:
            async with settled(proxy), connect(port) as (reader, writer):
                started = time.monotonic()
                assert await asyncio.wait_for(reader.readline(), 5) == b"live\n"
                assert 0.4 <= time.monotonic() - started < 2
                assert await ping((reader, writer)) == b"ping\n"
            record = await finished.next()
    assert (record.target, record.outcome, record.error) == (f"{LOOPBACK}:{live}", "ok", None)


# -- the lane's epoll set --------------------------------------------------------------------


class Watches:
    """Every change of what the lane's epoll set reports, as (fd, old mask, new mask)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.changes: list[tuple[int, int, int]] = []
        original = RelayLane.watch

        def spy(lane: RelayLane, fd: int, old: int, new: int, watcher: Any) -> None:
            original(lane, fd, old, new, watcher)
            self.changes.append((fd, old, new))

        monkeypatch.setattr(RelayLane, "watch", spy)

    def of(self, fd: int) -> list[tuple[int, int]]:
        return [(old, new) for each, old, new in self.changes if each == fd]


@async_test(timeout=10)
async def test_a_backend_that_accepts_during_connect_is_relayed_at_once(
    relays: list[SocketRelay], monkeypatch: pytest.MonkeyPatch
) -> None:
    watches = Watches(monkeypatch)
    async with backend() as (echo, _):
        port = free_port()
        async with running(forward(port, target(echo))):
            async with connect(port) as connection:
                assert await ping(connection) == b"ping\n"
                relay = await only_relay(relays)
                # A loopback backend has accepted when connect() returns: the relay watched
                # the backend for reading straight away, never for the connect's completion.
                assert watches.of(relay.backend_fd) == [(0, IN)]
                assert relay.timer is None
                assert watches.of(relay.client_fd) == [(0, IN)]


@async_test(timeout=10)
async def test_a_connect_under_way_is_watched_and_a_stray_wakeup_does_not_end_it(
    relays: list[SocketRelay], finished: Finished, monkeypatch: pytest.MonkeyPatch
) -> None:
    watches = Watches(monkeypatch)
    async with unanswered_port() as hanging:
        port = free_port()
        async with running(forward(port, target(hanging))):
            async with connect(port) as (reader, writer):
                relay = await only_relay(relays)
                assert watches.of(relay.backend_fd) == [(0, OUT)]
                relay.event(relay.backend_fd, OUT)  # as if a stale event reached it
                assert relay.down is None and not relay.done and relay.failures == []
                data, _ = await read_to_end(reader)
            record = await finished.next()
    assert data == b""
    assert record.error == f"{LOOPBACK}:{hanging} timed out after 0.5s"


@async_test(timeout=10)
async def test_a_connection_whose_handling_fails_unexpectedly_is_closed_and_logged(
    relays: list[SocketRelay],
    finished: Finished,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    original = SocketRelay.event
    failures = [RuntimeError("a bug in the relay")]

    def flawed(relay: SocketRelay, fd: int, events: int) -> None:
        if failures:
            raise failures.pop()
        original(relay, fd, events)

    monkeypatch.setattr(SocketRelay, "event", flawed)
    async with backend() as (echo, _):
        port = free_port()
        async with running(forward(port, target(echo))) as proxy:
            with caplog.at_level(logging.ERROR, "smartroute"):
                async with settled(proxy), connect(port) as (reader, writer):
                    writer.write(b"ping\n")
                    data, _ = await read_to_end(reader)
                record = await finished.next()
            assert data == b""
            assert await ping_works(port), "the next connection is served"
    assert record is relays[0].record
    assert (record.outcome, record.error) == ("error", "internal error: a bug in the relay")
    assert f"fast lane: closing {record.id} after an unexpected error" in caplog.text
    assert "a bug in the relay" in caplog.text


@async_test(timeout=10)
async def test_without_epoll_every_connection_takes_the_transport_path(
    relays: list[SocketRelay], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lane_module, "AVAILABLE", False)
    async with backend() as (echo, _):
        port = free_port()
        async with running(forward(port, target(echo))) as proxy:
            assert await ping_works(port)
            assert proxy._runtime.lane._epoll is None
    assert relays == []


@async_test(timeout=10)
async def test_the_lane_epoll_set_lives_while_the_proxy_runs() -> None:
    async with backend() as (echo, _):
        port = free_port()
        async with running(forward(port, target(echo))) as proxy:
            lane = proxy._runtime.lane
            epoll = lane._epoll
            assert epoll is not None and not epoll.closed
            assert await ping_works(port)
        assert epoll.closed and lane._epoll is None
        async with running(forward(port, target(echo))) as proxy:  # started again
            assert await ping_works(port)


def failing_watch(monkeypatch: pytest.MonkeyPatch, times: int = 1) -> list[int]:
    """The lane's epoll set refuses the next ``times`` new sockets (ENOMEM); fds refused."""
    original = RelayLane.watch
    refused: list[int] = []

    def watch(lane: RelayLane, fd: int, old: int, new: int, watcher: Any) -> None:
        if not old and new and len(refused) < times:
            refused.append(fd)
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        original(lane, fd, old, new, watcher)

    monkeypatch.setattr(RelayLane, "watch", watch)
    return refused


@async_test(timeout=10)
async def test_a_connection_the_lane_cannot_watch_is_closed_and_the_port_serves_on(
    relays: list[SocketRelay],
    finished: Finished,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    refused = failing_watch(monkeypatch)
    async with backend() as (echo, _):
        port = free_port()
        async with running(forward(port, target(echo))) as proxy:
            async with settled(proxy):
                async with connect(port) as (reader, writer):
                    data, _ = await read_to_end(reader)
                record = await finished.next()
                assert await ping_works(port)
    assert data == b"" and len(refused) == 1
    assert record is relays[0].record
    assert (record.outcome, record.error) == ("error", "proxy: [Errno 12] Cannot allocate memory")
    assert f"route 'lane': cannot relay {record.id}" in caplog.text


@async_test(timeout=10)
async def test_a_hello_the_lane_cannot_watch_for_goes_to_a_transport(
    ca: TestCA,
    tmp_path: Path,
    relays: list[SocketRelay],
    finished: Finished,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refused = failing_watch(monkeypatch)
    record, _ = await through_sni_passthrough(ca, tmp_path, finished)
    assert len(refused) == 1 and relays == []  # routed by the pipeline on a transport
    assert (record.route, record.domain, record.outcome) == ("lane", "a.example.test", "ok")


# -- backpressure ----------------------------------------------------------------------------

# MiB sent each way: far more than the proxy may hold, and more than the kernel's socket
# buffers between the two peers take in (two receive buffers that grow up to tcp_rmem's 32 MiB
# here, two send buffers; spliced streams reach them fastest).
BLOCKS = 128
RSS_SLACK = 16 * MIB  # growth allowed while that much passes through


@pytest.fixture(params=["splice", "copy"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How long streams pass: through a pipe with splice, or copied through the buffer."""
    if request.param == "copy":
        monkeypatch.setattr(socket_relay, "SPLICE", False)
    return cast(str, request.param)


def assert_passed(direction: Any, way: str) -> None:
    """``direction`` carried its long stream the ``way`` the test asked for."""
    assert (direction.pipe_size > 0) == (way == "splice"), direction.pipe_size


@async_test(timeout=20)
async def test_a_backend_that_stops_reading_holds_the_client_back_and_loses_nothing(
    relays: list[SocketRelay], finished: Finished, way: str
) -> None:
    pattern_block()
    go = asyncio.Event()

    async def read_later(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await go.wait()
        digest, count = hashlib.sha256(), 0
        while chunk := await reader.read(1 << 18):
            digest.update(chunk)
            count += len(chunk)
        writer.write(f"{count} {digest.hexdigest()}".encode())

    async with backend(read_later) as (slow, _):
        port = free_port()
        async with running(forward(port, target(slow))) as proxy:
            async with settled(proxy, timeout=10), connect(port) as (reader, writer):
                baseline = rss_bytes()
                progress = {"sent": 0}
                sending = asyncio.create_task(send_blocks(writer, BLOCKS, progress))
                relay = await only_relay(relays)
                await held_back(lambda: relay.up.held > 0, progress)
                assert progress["sent"] < BLOCKS * MIB, "the client was not held back"
                assert 0 < relay.up.held <= CHUNK
                peak = rss_bytes()
                go.set()
                await asyncio.wait_for(sending, 10)
                writer.write_eof()
                answer, was_reset = await read_to_end(reader, 10)
                peak = max(peak, rss_bytes())
            record = await finished.next()
    assert (answer, was_reset) == (f"{BLOCKS * MIB} {pattern_digest(BLOCKS)}".encode(), False)
    assert (record.outcome, record.bytes_in) == ("ok", BLOCKS * MIB)
    assert_passed(relay.up, way)
    assert peak - baseline < RSS_SLACK, f"RSS grew by {(peak - baseline) / MIB:.0f} MiB"


@async_test(timeout=20)
async def test_a_client_that_stops_reading_holds_the_backend_back_and_loses_nothing(
    relays: list[SocketRelay], finished: Finished, way: str
) -> None:
    pattern_block()
    progress = {"sent": 0}

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await send_blocks(writer, BLOCKS, progress)

    async with backend(flood) as (flooding, _):
        port = free_port()
        async with running(forward(port, target(flooding))) as proxy:
            async with settled(proxy, timeout=10), connect(port) as (reader, writer):
                baseline = rss_bytes()
                relay = await only_relay(relays)
                await held_back(lambda: relay.down is not None and relay.down.held > 0, progress)
                assert progress["sent"] < BLOCKS * MIB, "the backend was not held back"
                assert relay.down is not None and relay.down.held
                assert relay.down.held <= CHUNK
                peak = rss_bytes()
                digest, count = hashlib.sha256(), 0
                async with asyncio.timeout(10):
                    while chunk := await reader.read(1 << 18):
                        digest.update(chunk)
                        count += len(chunk)
                        if count % (8 * MIB) < len(chunk):
                            peak = max(peak, rss_bytes())
            record = await finished.next()
    assert (count, digest.hexdigest()) == (BLOCKS * MIB, pattern_digest(BLOCKS))
    assert (record.outcome, record.bytes_out) == ("ok", BLOCKS * MIB)
    assert relay.down is not None
    assert_passed(relay.down, way)
    assert peak - baseline < RSS_SLACK, f"RSS grew by {(peak - baseline) / MIB:.0f} MiB"


# -- half-close ------------------------------------------------------------------------------


@async_test(timeout=10)
async def test_client_half_close_reaches_the_backend_and_its_answer_comes_back(
    relays: list[SocketRelay], finished: Finished
) -> None:
    async def count_then_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        count, how = await drain_to_end(reader)
        writer.write(f"got {count} bytes, then {how}".encode())
        await flushed(writer)

    async with backend(count_then_answer) as (answering, _):
        port = free_port()
        async with running(forward(port, target(answering))) as proxy:
            async with settled(proxy), connect(port) as (reader, writer):
                writer.write(b"q" * 300_000)
                writer.write_eof()
                assert await read_to_end(reader) == (b"got 300000 bytes, then eof", False)
            record = await finished.next()
    assert len(relays) == 1
    assert (record.outcome, record.error, record.half_closed) == ("ok", None, True)


@async_test(timeout=10)
async def test_backend_half_close_reaches_the_client_which_can_still_send(
    relays: list[SocketRelay], finished: Finished
) -> None:
    heard: asyncio.Queue[bytes] = asyncio.Queue()

    async def banner_then_listen(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"banner")
        writer.write_eof()
        heard.put_nowait(await reader.readexactly(200_014))
        heard.put_nowait(await reader.read())

    async with backend(banner_then_listen) as (listening, _):
        port = free_port()
        async with running(forward(port, target(listening))) as proxy:
            async with settled(proxy), connect(port) as (reader, writer):
                assert await asyncio.wait_for(reader.read(), 5) == b"banner"  # then EOF
                writer.write(b"x" * 200_000 + b"after your eof")
                assert await asyncio.wait_for(heard.get(), 5) == b"x" * 200_000 + b"after your eof"
                writer.write_eof()  # on its own (the next test sends both at once)
                assert await asyncio.wait_for(heard.get(), 5) == b""
                assert await read_to_end(reader) == (b"", False)
            record = await finished.next()
    assert len(relays) == 1
    assert (record.outcome, record.bytes_in, record.bytes_out) == ("ok", 200_014, 6)


@async_test(timeout=10)
async def test_data_and_eof_arriving_together_after_the_backend_half_closed(
    relays: list[SocketRelay], finished: Finished
) -> None:
    heard: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def banner_then_listen(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"banner")
        writer.write_eof()
        heard.set_result(await reader.read())

    loop = asyncio.get_running_loop()
    async with backend(banner_then_listen) as (listening, _):
        port = free_port()
        async with running(forward(port, target(listening))) as proxy:
            async with settled(proxy):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
                    client.setblocking(False)
                    await loop.sock_connect(client, (LOOPBACK, port))
                    received = b""
                    async with asyncio.timeout(5):
                        while chunk := await loop.sock_recv(client, 1024):
                            received += chunk
                    assert received == b"banner"  # and the proxy shut the client's side
                    # Bytes and EOF at once: the proxy's socket is then shut both ways (EPOLLHUP).
                    client.send(b"after your eof")
                    client.shutdown(socket.SHUT_WR)
                    assert await asyncio.wait_for(heard, 3) == b"after your eof"
                    assert await asyncio.wait_for(loop.sock_recv(client, 1024), 3) == b""
                record = await finished.next()
    assert len(relays) == 1
    assert (record.outcome, record.bytes_in) == ("ok", 14)


# -- resets ----------------------------------------------------------------------------------


@async_test(timeout=10)
async def test_client_reset_mid_transfer_ends_the_backend_connection(
    relays: list[SocketRelay], finished: Finished
) -> None:
    async def tally(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ready\n")
        count, how = await drain_to_end(reader)
        sink.note(how)

    async with backend(tally) as (counting, sink):
        port = free_port()
        async with running(forward(port, target(counting))) as proxy:
            async with settled(proxy):
                async with connect(port) as (reader, writer):
                    assert await asyncio.wait_for(reader.readline(), 5) == b"ready\n"
                    writer.write(b"u" * 100_000)
                    relay = await only_relay(relays)
                    await until(lambda: relay.record.bytes_in == 100_000, "all was relayed")
                    reset(writer)
                assert await sink.outcome() in ("eof", "reset")
                record = await finished.next()
            assert await ping_works(port)
    assert record.outcome == "error"
    assert record.error is not None and record.error.startswith("client: "), record.error


@async_test(timeout=10)
async def test_client_reset_behind_unread_data_ends_the_backend_connection(
    relays: list[SocketRelay], finished: Finished
) -> None:
    go = asyncio.Event()

    async def read_later(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await go.wait()
        count, how = await drain_to_end(reader)
        sink.note(f"{count} {how}")

    async with backend(read_later) as (slow, sink):
        port = free_port()
        async with running(forward(port, target(slow))) as proxy:
            async with settled(proxy):
                async with connect(port) as (reader, writer):
                    await until_held(relays, writer)
                    reset(writer)  # the reset waits at the proxy behind unread bytes
                go.set()
                count, how = (await sink.outcome(timeout=3)).split()
                record = await finished.next()
    assert int(count) <= record.bytes_in and how in ("eof", "reset")
    assert record.outcome == "error"
    assert record.error is not None and record.error.startswith("client: "), record.error


@async_test(timeout=10)
async def test_what_a_failed_client_sent_is_still_delivered_to_the_backend(
    relays: list[SocketRelay], finished: Finished
) -> None:
    poke, go = asyncio.Event(), asyncio.Event()

    async def poke_then_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await poke.wait()
        writer.write(b"poke")  # the proxy finds the client gone when it passes this on
        await go.wait()
        count, how = await drain_to_end(reader)
        sink.note(f"{count} {how}")

    async with backend(poke_then_read) as (slow, sink):
        port = free_port()
        async with running(forward(port, target(slow))) as proxy:
            async with settled(proxy):
                async with connect(port) as (reader, writer):
                    relay = await until_held(relays, writer)
                    reset(writer)
                poke.set()
                await until(lambda: relay.closing, "the proxy saw the client go")
                go.set()
                count, how = (await sink.outcome()).split()
                record = await finished.next()
    # Everything the proxy read from the client reaches the backend, then the end.
    assert (int(count), how) == (record.bytes_in, "eof")
    assert record.outcome == "error"
    assert record.error is not None and record.error.startswith("client: "), record.error


@async_test(timeout=10)
async def test_backend_reset_mid_transfer_client_gets_what_was_sent_then_the_end(
    finished: Finished,
) -> None:
    delivered = asyncio.Event()

    async def send_then_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(PARTIAL)
        await delivered.wait()
        reset(writer)

    async with backend(send_then_reset) as (resetting, _):
        port = free_port()
        async with running(forward(port, target(resetting))) as proxy:
            async with settled(proxy):
                async with connect(port) as (reader, writer):
                    data = await asyncio.wait_for(reader.readexactly(len(PARTIAL)), 5)
                    delivered.set()
                    rest, _ = await read_to_end(reader)
                record = await finished.next()
            assert await ping_works(port)
    assert (data, rest) == (PARTIAL, b"")
    assert record.outcome == "error"
    assert record.error is not None and record.error.startswith("backend: "), record.error


@async_test(timeout=10)
async def test_backend_reset_while_the_proxy_holds_client_bytes_for_it(
    relays: list[SocketRelay], finished: Finished
) -> None:
    paused = asyncio.Event()

    async def stall_then_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await paused.wait()
        reset(writer)

    async with backend(stall_then_reset) as (stalling, _):
        port = free_port()
        async with running(forward(port, target(stalling))) as proxy:
            async with settled(proxy):
                async with connect(port) as (reader, writer):
                    await until_held(relays, writer)
                    paused.set()  # the bytes held for the backend have nowhere to go now
                    data, _ = await read_to_end(reader)
                record = await finished.next()
    assert data == b""
    assert record.outcome == "error"
    assert record.error is not None and record.error.startswith("backend: "), record.error


@async_test(timeout=10)
async def test_backend_reset_after_the_client_half_closed_ends_the_connection(
    finished: Finished,
) -> None:
    async def read_all_then_reset(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        sink.note(f"{len(await reader.read())}")  # up to the client's EOF
        reset(writer)

    async with backend(read_all_then_reset) as (resetting, sink):
        port = free_port()
        async with running(forward(port, target(resetting))) as proxy:
            async with settled(proxy), connect(port) as (reader, writer):
                writer.write(b"question")
                writer.write_eof()
                assert await sink.outcome() == "8"
                assert await read_to_end(reader) == (b"", False)
            record = await finished.next()
    assert (record.outcome, record.half_closed) == ("error", True)
    assert record.error is not None and record.error.startswith("backend: "), record.error


@async_test(timeout=10)
async def test_backend_reset_behind_unread_data_ends_the_client_connection(
    relays: list[SocketRelay], finished: Finished
) -> None:
    progress = {"sent": 0}
    paused = asyncio.Event()

    async def flood_then_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        flooding = asyncio.create_task(send_blocks(writer, BLOCKS, progress))
        await paused.wait()  # held back: the client is not reading
        flooding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flooding
        reset(writer)
        sink.note("reset")

    pattern_block()
    async with backend(flood_then_reset) as (flooding, sink):
        port = free_port()
        async with running(forward(port, target(flooding))) as proxy:
            async with settled(proxy):
                async with connect(port) as (reader, writer):
                    relay = await only_relay(relays)
                    await until(
                        lambda: relay.down is not None and relay.down.held > 0,
                        "the proxy paused",
                    )
                    paused.set()
                    assert await sink.outcome() == "reset"  # behind what the proxy did not read
                    received, was_reset = await read_to_end(reader, 3)
                record = await finished.next()
    # What reached the proxy before the reset is delivered, in order; then the connection ends.
    assert 0 < len(received) <= progress["sent"] + MIB and not was_reset
    assert received == (pattern_block() * (len(received) // MIB + 1))[: len(received)]
    assert record.outcome == "error"
    assert record.error is not None and record.error.startswith("backend: "), record.error


# -- security --------------------------------------------------------------------------------


@async_test(timeout=10)
async def test_a_blocked_client_is_closed_at_once_and_the_backend_never_contacted(
    relays: list[SocketRelay], finished: Finished
) -> None:
    # A bare listening socket as the backend: any connection attempt would wait in its queue.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as untouched:
        untouched.bind((LOOPBACK, 0))
        untouched.listen(8)
        untouched.setblocking(False)
        port = free_port()
        route = forward(
            port, target(untouched.getsockname()[1]), security={"ip_block_list": [LOOPBACK]}
        )
        async with running(route) as proxy:
            async with settled(proxy), connect(port) as (reader, writer):
                writer.write(b"let me in")
                data, _ = await read_to_end(reader)
            record = await finished.next()
        with pytest.raises(BlockingIOError):
            untouched.accept()
    assert data == b""
    assert relays == []
    assert (record.outcome, record.error) == ("refused", "client IP is blocked")


@async_test(timeout=10)
async def test_max_connections_refuses_a_second_connection_until_the_first_ends(
    finished: Finished,
) -> None:
    async with backend() as (echo, server):
        port = free_port()
        route = forward(port, target(echo), security={"max_connections": 1})
        async with running(route) as proxy:
            async with settled(proxy):
                async with connect(port) as first:
                    assert await ping(first) == b"ping\n"
                    async with connect(port) as (reader, writer):
                        assert await read_to_end(reader) == (b"", False)
                    refused = await finished.next()
                    assert await ping(first) == b"ping\n"
                await finished.next()  # the first connection ended: its place is free again
                async with connect(port) as third:
                    assert await ping(third) == b"ping\n"
                await finished.next()
    assert refused.outcome == "refused"
    assert refused.error == "route 'lane' is at its limit of 1 connections"
    assert server.accepted == 2


# -- time limits and shutdown ----------------------------------------------------------------


@async_test(timeout=10)
async def test_idle_timeout_closes_a_quiet_lane_connection(
    relays: list[SocketRelay], finished: Finished
) -> None:
    async def watch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hi\n")
        sink.note((await drain_to_end(reader))[1])

    async with backend(watch) as (watching, sink):
        port = free_port()
        route = forward(port, target(watching), timeouts={"idle": 0.5})
        async with running(route) as proxy:
            async with settled(proxy), connect(port) as (reader, writer):
                assert await asyncio.wait_for(reader.readline(), 5) == b"hi\n"
                started = time.monotonic()
                assert await read_to_end(reader) == (b"", False)
                waited = time.monotonic() - started
                assert await sink.outcome() in ("eof", "reset")  # the backend side too
            record = await finished.next()
    assert len(relays) == 1
    assert 0.4 <= waited < 2, waited
    assert (record.outcome, record.error) == ("idle", "no data for 0.5s")


@async_test(timeout=10)
async def test_idle_timeout_also_ends_a_connect_that_hangs(finished: Finished) -> None:
    async with unanswered_port() as hanging:
        port = free_port()
        route = forward(port, target(hanging), timeouts={"idle": 0.5})
        async with running(route, connect_timeout=5) as proxy:
            async with settled(proxy), connect(port) as (reader, writer):
                started = time.monotonic()
                assert await read_to_end(reader) == (b"", False)
                waited = time.monotonic() - started
            record = await finished.next()
    assert 0.4 <= waited < 2, waited
    assert (record.outcome, record.error, record.target) == ("idle", "no data for 0.5s", None)


@async_test(timeout=10)
async def test_stop_serves_lane_connections_through_the_grace_period_then_closes_them(
    relays: list[SocketRelay], finished: Finished
) -> None:
    async with backend() as (echo, _):
        port = free_port()
        proxy = SmartRoute(
            [forward(port, target(echo))], bind_address=LOOPBACK, graceful_shutdown_timeout=0.5
        )
        await proxy.start()
        try:
            async with connect(port) as connection:
                reader, writer = connection
                assert await ping(connection) == b"ping\n"
                started = time.monotonic()
                stopping = asyncio.create_task(proxy.stop())
                await until(lambda: not proxy.is_running, "the proxy stops accepting")
                with pytest.raises(ConnectionRefusedError):
                    await asyncio.open_connection(LOOPBACK, port)
                assert await ping(connection, b"still served\n") == b"still served\n"
                assert await read_to_end(reader) == (b"", False)
                await asyncio.wait_for(stopping, 5)
                assert 0.4 <= time.monotonic() - started < 2
        finally:
            await proxy.stop()
    record = await finished.next()
    assert len(relays) == 1
    assert (record.outcome, record.error) == ("shutdown", "still open when the grace period ended")
    assert proxy.stats()["connections"]["active"] == 0


# -- failures after failures ----------------------------------------------------------------


@async_test(timeout=10)
async def test_a_failed_delivery_after_the_other_side_failed_still_ends_the_connection(
    relays: list[SocketRelay], finished: Finished
) -> None:
    poke, die = asyncio.Event(), asyncio.Event()

    async def stall_poke_die(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await poke.wait()
        writer.write(b"poke")  # the proxy finds the client gone when it passes this on
        await die.wait()
        reset(writer)  # ... and then the backend it still delivers the client's bytes to

    async with backend(stall_poke_die) as (stalling, _):
        port = free_port()
        async with running(forward(port, target(stalling))):
            async with connect(port) as (reader, writer):
                relay = await until_held(relays, writer)
                reset(writer)
            poke.set()
            await until(lambda: relay.closing, "the proxy saw the client go")
            assert relay.record.error is not None and relay.record.error.startswith("client: ")
            die.set()
            cpu = time.process_time()
            record = await finished.next(timeout=2)  # both peers are gone: nothing is left to do
            assert time.process_time() - cpu < 1.0, "the loop spun"
    assert record is relay.record and record.outcome == "error"


class _SocketsRunOut:
    """``socket_relay``'s socket module, whose first new socket fails: no descriptor left."""

    def __init__(self) -> None:
        self.failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(socket, name)

    def socket(self, *args: Any, **kwargs: Any) -> socket.socket:
        if not self.failed:
            self.failed = True
            raise OSError(errno.EMFILE, "Too many open files")
        return socket.socket(*args, **kwargs)


@async_test(timeout=10)
async def test_running_out_of_descriptors_for_the_backend_socket_ends_the_connection(
    monkeypatch: pytest.MonkeyPatch, finished: Finished
) -> None:
    monkeypatch.setattr(socket_relay, "socket", _SocketsRunOut())
    async with backend() as (echo, _):
        port = free_port()
        route = forward(port, target(echo), security={"max_connections": 1})
        async with running(route) as proxy:
            async with connect(port) as (reader, writer):
                data, _ = await read_to_end(reader)
            assert data == b""  # the client is closed, but ...
            await until(
                lambda: proxy.stats()["connections"]["active"] == 0, "it is counted as ended", 1
            )
            assert await ping_works(port), "the route's only place was never given back"
    record = await finished.next(timeout=0)
    assert record.outcome in ("backend-unreachable", "error")


class _PipesRunOut:
    """``socket_relay``'s os module, whose pipes fail: no descriptor left."""

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    @staticmethod
    def pipe2(flags: int) -> tuple[int, int]:
        raise OSError(errno.EMFILE, "Too many open files")


@async_test(timeout=20)
async def test_a_long_stream_without_a_pipe_is_copied_and_loses_nothing(
    relays: list[SocketRelay], finished: Finished, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(socket_relay, "os", _PipesRunOut())
    blocks = 16
    async with backend() as (echo, _):
        port = free_port()
        async with running(forward(port, target(echo))) as proxy:
            async with settled(proxy), connect(port) as (reader, writer):
                sending = asyncio.create_task(send_blocks(writer, blocks, {"sent": 0}))
                digest, count = hashlib.sha256(), 0
                async with asyncio.timeout(10):
                    while count < blocks * MIB:
                        chunk = await reader.read(1 << 18)
                        assert chunk, "the echo ended early"
                        digest.update(chunk)
                        count += len(chunk)
                await sending
            record = await finished.next()
    assert (count, digest.hexdigest()) == (blocks * MIB, pattern_digest(blocks))
    assert (record.outcome, record.bytes_in, record.bytes_out) == ("ok", count, count)
    assert relays[0].up.pipe_size == -1  # it tried, found no pipe, and copied on


# -- Listener --------------------------------------------------------------------------------


class ScriptedListening(socket.socket):
    """A listening socket on 127.0.0.1 whose ``accept`` raises the scripted errors first."""

    def __init__(self, *errors: OSError) -> None:
        super().__init__(socket.AF_INET, socket.SOCK_STREAM)
        self.bind((LOOPBACK, 0))
        self.listen(16)
        self.setblocking(False)
        self.port: int = self.getsockname()[1]
        self.errors = list(errors)
        self.raised = asyncio.Event()

    def accept(self) -> tuple[socket.socket, Any]:
        if self.errors:
            self.raised.set()
            raise self.errors.pop(0)
        return super().accept()


class Taken:
    """An ``on_socket`` handler that keeps what it is given, failing on the calls listed."""

    def __init__(self, *failing: int) -> None:
        self.failing = set(failing)
        self.calls = 0
        self.queue: asyncio.Queue[tuple[socket.socket, Any, int]] = asyncio.Queue()

    def __call__(self, sock: socket.socket, address: Any, port: int) -> None:
        self.calls += 1
        if self.calls in self.failing:
            raise RuntimeError(f"handler failure {self.calls}")
        self.queue.put_nowait((sock, address, port))

    async def next(self, timeout: float = 3) -> socket.socket:
        sock, _, _ = await asyncio.wait_for(self.queue.get(), timeout)
        return sock


async def served(taken: Taken, connection: Connection, port: int) -> None:
    """The listener handed the connection over: a non-blocking socket that reaches the client."""
    loop = asyncio.get_running_loop()
    sock, address, given_port = await asyncio.wait_for(taken.queue.get(), 3)
    with sock:
        assert sock.getblocking() is False
        assert given_port == port
        assert address == connection[1].get_extra_info("sockname")
        await loop.sock_sendall(sock, b"served\n")
        assert await asyncio.wait_for(connection[0].readline(), 3) == b"served\n"


@async_test(timeout=10)
async def test_listener_hands_each_connection_over_and_close_stops_accepting() -> None:
    taken = Taken()
    with ScriptedListening() as sock:
        listener = Listener(sock, sock.port, taken)
        for _ in range(2):
            async with connect(sock.port) as connection:
                await served(taken, connection, sock.port)
        listener.close()
        assert sock.fileno() == -1
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(LOOPBACK, sock.port)


@async_test(timeout=10)
async def test_listener_out_of_descriptors_pauses_then_serves_the_waiting_connection(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(port_manager, "ACCEPT_RETRY", 0.3)
    taken = Taken()
    with ScriptedListening(OSError(errno.EMFILE, "Too many open files")) as sock:
        listener = Listener(sock, sock.port, taken)
        with caplog.at_level(logging.WARNING, logger="smartroute"):
            async with connect(sock.port) as connection:
                started = time.monotonic()
                await served(taken, connection, sock.port)  # it waited in the kernel's queue
                waited = time.monotonic() - started
        listener.close()
    assert 0.25 <= waited < 2, waited
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        f"port {sock.port}: cannot accept ([Errno 24] Too many open files); retrying in 0.3s"
    ]


@async_test(timeout=10)
async def test_listener_closed_while_paused_stays_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(port_manager, "ACCEPT_RETRY", 0.1)
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    taken = Taken()
    with ScriptedListening(OSError(errno.ENFILE, "Too many open files in system")) as sock:
        listener = Listener(sock, sock.port, taken)
        async with connect(sock.port):
            await asyncio.wait_for(sock.raised.wait(), 3)
            listener.close()  # during the pause: the retry must not start accepting again
        await asyncio.sleep(0.3)  # past the retry: nothing may happen
    assert errors == [] and taken.calls == 0
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(LOOPBACK, sock.port)


@async_test(timeout=10)
async def test_listener_skips_a_connection_aborted_before_accept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    taken = Taken()
    with ScriptedListening(OSError(errno.ECONNABORTED, "Software caused connection abort")) as sock:
        listener = Listener(sock, sock.port, taken)
        with caplog.at_level(logging.DEBUG, logger="smartroute"):
            async with connect(sock.port) as connection:
                started = time.monotonic()
                await served(taken, connection, sock.port)  # in the same pass, no pause
                assert time.monotonic() - started < 0.5
        listener.close()
    assert sock.raised.is_set()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


@async_test(timeout=10)
async def test_a_handler_that_raises_closes_its_connection_and_the_next_is_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    taken = Taken(1)
    with ScriptedListening() as sock:
        listener = Listener(sock, sock.port, taken)
        with caplog.at_level(logging.ERROR, logger="smartroute"):
            async with connect(sock.port) as (reader, writer):
                assert await read_to_end(reader) == (b"", False)
            async with connect(sock.port) as connection:
                await served(taken, connection, sock.port)
        listener.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [f"port {sock.port}: could not take a connection"]
    assert errors[0].exc_info is not None and "handler failure 1" in str(errors[0].exc_info[1])


@async_test(timeout=10)
async def test_listener_takes_at_most_a_batch_per_wakeup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(port_manager, "ACCEPT_BATCH", 2)
    taken = Taken()
    with ScriptedListening() as sock, contextlib.ExitStack() as clients:
        for _ in range(5):  # queued in the kernel before the listener starts
            clients.enter_context(socket.create_connection((LOOPBACK, sock.port), timeout=2))
        listener = Listener(sock, sock.port, taken)
        listener._accept()  # one readiness event
        assert taken.queue.qsize() == 2
        for _ in range(5):  # the loop takes the rest on later events
            (await taken.next()).close()
        listener.close()
    assert taken.calls == 5
