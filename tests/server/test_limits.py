"""Timeouts (global and per route), the default security block, and the statistics."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from http_backend import http_backend
from support import LOOPBACK, async_test, echo_handler, free_port, free_ports, serve

from smartroute import ConfigError, Route, SmartRoute, Timeouts
from smartroute.routing.defaults import apply, merge_security
from smartroute.routing.matcher import RouteTable
from smartroute.routing.model import Timeouts as Limits
from smartroute.routing.validation import validate_routes
from smartroute.server.stats import ConnectionRecord, StatsBook

DEFAULTS = Limits()


def tcp(port: int, backend: int, name: str = "tcp", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "match": {"ports": port},
        "action": {"type": "forward", "targets": [{"host": LOOPBACK, "port": backend}]},
        **extra,
    }


def one(route: dict[str, Any]) -> Any:
    return validate_routes([route])[0]


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    """Seconds until the proxy closed the connection (EOF or reset), failing after ``seconds``."""
    started = time.monotonic()
    try:
        while await asyncio.wait_for(reader.read(65536), seconds):
            pass
    except ConnectionError:
        pass
    return time.monotonic() - started


async def still_open(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """True when an echo round trip still works on the connection."""
    writer.write(b"ping\n")
    try:
        return await asyncio.wait_for(reader.readline(), 5) == b"ping\n"
    except ConnectionError:
        return False


# -- validation ------------------------------------------------------------------------------


def test_route_timeouts_validate_into_overrides() -> None:
    route = one(tcp(80, 81, timeouts={"idle": 30, "connect": 2.5, "max_lifetime": 0}))
    assert dict(route.timeout_overrides) == {"idle": 30.0, "connect": 2.5, "max_lifetime": None}
    assert route.timeouts is None  # filled in when a proxy installs the route
    as_dataclass = validate_routes(
        [
            Route(
                match={"ports": 80},
                action={"type": "forward", "targets": [{"host": LOOPBACK, "port": 81}]},
                name="tcp",
                timeouts=Timeouts(idle=30, connect=2.5),
            )
        ]
    )[0]
    assert dict(as_dataclass.timeout_overrides) == {"idle": 30.0, "connect": 2.5}


@pytest.mark.parametrize(
    ("timeouts", "message"),
    [
        ({"idel": 3}, 'routes[0].timeouts: unknown key "idel" (did you mean "idle"?)'),
        ({"connect": 0}, "routes[0].timeouts.connect: must be a finite number greater than 0, got 0"),
        ({"idle": -1}, "routes[0].timeouts.idle: must be a finite number greater than 0, got -1"),
        ({"backend": "5s"}, "routes[0].timeouts.backend: expected a number of seconds, got '5s'"),
        ({"half_close": True}, "routes[0].timeouts.half_close: expected a number of seconds (0 or None: no limit), got True"),
        (5, "routes[0].timeouts: expected a mapping or a Timeouts, got 5"),
    ],
)  # fmt: skip
def test_bad_route_timeouts_name_the_field(timeouts: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate_routes([tcp(80, 81, timeouts=timeouts)])
    assert str(caught.value) == message


def test_timeouts_key_at_the_wrong_level_gets_a_hint() -> None:
    route = tcp(80, 81)
    route["action"]["timeouts"] = {"idle": 1}
    with pytest.raises(ConfigError, match=r'did you mean "routes\[0\].timeouts"'):
        validate_routes([route])


# -- defaults applied to routes -----------------------------------------------------------------


def test_route_overrides_win_over_the_settings_one_limit_at_a_time() -> None:
    settings = Limits(idle=100.0, connect=3.0)
    mine = apply(one(tcp(80, 81, timeouts={"idle": 5, "half_close": 0})), settings, None)
    assert mine.timeouts == Limits(idle=5.0, connect=3.0, half_close=None)
    plain = apply(one(tcp(80, 81)), settings, None)
    assert plain.timeouts is settings


def test_security_defaults_merge_field_by_field_and_block_lists_add_up() -> None:
    defaults = one(
        tcp(
            80,
            81,
            security={
                "ip_allow_list": ["10.0.0.0/8"],
                "ip_block_list": ["10.0.0.66"],
                "max_connections_per_ip": 5,
                "basic_auth": {"users": {"ops": "pw"}},
            },
        )
    ).security
    own = one(tcp(80, 81, security={"ip_block_list": ["10.0.0.7"], "max_connections": 9})).security
    merged = merge_security(defaults, own, serves_http=False)
    assert merged is not None
    assert [r.text for r in merged.ip_block_list] == ["10.0.0.66", "10.0.0.7"]
    assert [r.text for r in merged.ip_allow_list] == ["10.0.0.0/8"]
    assert (merged.max_connections, merged.max_connections_per_ip) == (9, 5)
    assert merged.basic_auth is None  # a raw TCP route never sees HTTP
    assert merge_security(defaults, None, serves_http=True).basic_auth is not None  # type: ignore[union-attr]
    assert merge_security(None, own, serves_http=True) is own


def test_port_waits_follow_the_most_patient_route() -> None:
    routes = validate_routes(
        [
            tcp(80, 81, name="a", timeouts={"initial_data": 2, "http_header": 1}),
            tcp(80, 81, name="b", timeouts={"initial_data": 0.5, "http_header": 7}),
            tcp(90, 81, name="c", timeouts={"initial_data": 0.25}),
        ]
    )
    table = RouteTable([apply(r, DEFAULTS, None) for r in routes])
    assert table.waits(80) == (2.0, 7.0)
    assert table.waits(90) == (0.25, DEFAULTS.http_header)
    assert table.waits(1) is None
    assert RouteTable(routes).waits(80) is None  # routes never installed carry no timeouts


# -- timeouts over real sockets ------------------------------------------------------------


@async_test()
async def test_route_idle_timeout_closes_its_connections_only() -> None:
    async with serve(echo_handler) as backend:
        quick_port, calm_port = free_ports(2)
        routes = [
            tcp(quick_port, backend, name="quick", timeouts={"idle": 0.3}),
            tcp(calm_port, backend, name="calm"),
        ]
        async with SmartRoute(routes, bind_address=LOOPBACK, idle_timeout=60) as proxy:
            quick = await asyncio.open_connection(LOOPBACK, quick_port)
            calm = await asyncio.open_connection(LOOPBACK, calm_port)
            assert await still_open(*quick) and await still_open(*calm)
            waited = await closed_within(quick[0], 5)
            assert 0.2 <= waited < 3
            assert await still_open(*calm)
            stats = proxy.stats()
            calm[1].close()
            quick[1].close()
    assert stats["connections"] == {"active": 1, "total": 2}


@async_test()
async def test_route_can_switch_the_idle_limit_off_for_long_quiet_tunnels() -> None:
    async with serve(echo_handler) as backend:
        port = free_port()
        route = tcp(port, backend, timeouts={"idle": 0})
        async with SmartRoute([route], bind_address=LOOPBACK, idle_timeout=0.2):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            await asyncio.sleep(0.8)
            assert await still_open(reader, writer)
            writer.close()


@async_test()
async def test_traffic_keeps_a_connection_alive_past_the_idle_limit() -> None:
    async with serve(echo_handler) as backend:
        port = free_port()
        async with SmartRoute([tcp(port, backend)], bind_address=LOOPBACK, idle_timeout=0.4):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            for _ in range(10):  # 1.5 s in all, never 0.4 s quiet
                assert await still_open(reader, writer)
                await asyncio.sleep(0.15)
            writer.close()


@async_test()
async def test_route_max_lifetime_closes_even_a_busy_connection() -> None:
    async with serve(echo_handler) as backend:
        port = free_port()
        route = tcp(port, backend, timeouts={"max_lifetime": 0.5})
        async with SmartRoute([route], bind_address=LOOPBACK):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            started = time.monotonic()
            while await still_open(reader, writer):
                assert time.monotonic() - started < 4
                await asyncio.sleep(0.05)
            assert time.monotonic() - started >= 0.4
            writer.close()


async def never_closes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A backend that reads to EOF and then just stays there, never answering or closing."""
    try:
        await reader.read()
        await asyncio.sleep(30)
    finally:
        writer.close()


@async_test()
async def test_half_closed_quiet_connection_gets_a_bounded_grace() -> None:
    async with serve(never_closes) as backend:
        port = free_port()
        settings: dict[str, Any] = {"idle_timeout": 60, "half_close_timeout": 0.3}
        async with SmartRoute([tcp(port, backend)], bind_address=LOOPBACK, **settings) as proxy:
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write(b"request")
            writer.write_eof()
            waited = await closed_within(reader, 5)
            assert 0.2 <= waited < 3
            writer.close()
            for _ in range(100):
                if not proxy.stats()["connections"]["active"]:
                    break
                await asyncio.sleep(0.02)
            assert proxy.stats()["connections"]["active"] == 0


@async_test()
async def test_half_closed_connection_that_still_carries_data_is_not_cut() -> None:
    async def slow_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # the client half-closes first
        for _ in range(8):  # 8 x 0.1 s: longer than the grace, never quiet for it
            writer.write(b"x" * 1000)
            await writer.drain()
            await asyncio.sleep(0.1)
        writer.close()

    async with serve(slow_answer) as backend:
        port = free_port()
        async with SmartRoute([tcp(port, backend)], bind_address=LOOPBACK, half_close_timeout=0.3):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write_eof()
            assert len(await asyncio.wait_for(reader.read(), 5)) == 8000
            writer.close()


@async_test()
async def test_route_initial_data_timeout_bounds_a_silent_client() -> None:
    async with serve(echo_handler) as backend:
        port = free_port()
        route = tcp(port, backend, timeouts={"initial_data": 0.3})
        route["match"]["domains"] = "example.test"
        async with SmartRoute([route], bind_address=LOOPBACK, initial_data_timeout=30):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            waited = await closed_within(reader, 5)
            assert 0.2 <= waited < 3
            writer.close()


def http(port: int, backend: int, **extra: Any) -> dict[str, Any]:
    route = tcp(port, backend, name="web", **extra)
    route["action"]["protocol"] = "http"
    return route


async def exchange(writer: asyncio.StreamWriter, reader: asyncio.StreamReader) -> bytes:
    writer.write(b"GET /a HTTP/1.1\r\nHost: web.test\r\n\r\n")
    status = await asyncio.wait_for(reader.readline(), 5)
    length = 0
    while (line := await asyncio.wait_for(reader.readline(), 5)) != b"\r\n":
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await asyncio.wait_for(reader.readexactly(length), 5)
    return status


@async_test()
async def test_http_header_timeout_answers_408_to_a_trickled_head() -> None:
    with http_backend() as backend:
        port = free_port()
        settings: dict[str, Any] = {"http_header_timeout": 0.4, "http_keepalive_timeout": 30}
        async with SmartRoute([http(port, backend.port)], bind_address=LOOPBACK, **settings):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            assert (await exchange(writer, reader)).startswith(b"HTTP/1.1 200")
            started = time.monotonic()
            answer = b""
            for byte in b"GET /slow HTTP/1.1\r\nHost: web.test\r\nX-Pad: aaaaaaaaaaaaaaa":
                writer.write(bytes([byte]))
                try:  # read(n): a read to EOF cut by the timeout would lose what it had read
                    answer = await asyncio.wait_for(reader.read(65536), 0.05)
                except TimeoutError:
                    continue
                break
            assert answer.startswith(b"HTTP/1.1 408"), answer
            assert 0.3 <= time.monotonic() - started < 3
            writer.close()


@async_test()
async def test_route_keepalive_limit_closes_an_idle_http_connection() -> None:
    with http_backend() as backend:
        port = free_port()
        route = http(port, backend.port, timeouts={"http_keepalive": 0.3})
        async with SmartRoute([route], bind_address=LOOPBACK, http_keepalive_timeout=30):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            assert (await exchange(writer, reader)).startswith(b"HTTP/1.1 200")
            waited = await closed_within(reader, 5)
            assert 0.2 <= waited < 3
            writer.close()


@async_test()
async def test_route_backend_timeout_gives_504() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.sleep(10)
        finally:
            writer.close()

    async with serve(silent) as backend:
        port = free_port()
        route = http(port, backend, timeouts={"backend": 0.3})
        async with SmartRoute([route], bind_address=LOOPBACK, backend_timeout=60):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            started = time.monotonic()
            writer.write(b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n")
            status = await asyncio.wait_for(reader.readline(), 5)
            assert status.startswith(b"HTTP/1.1 504")
            assert time.monotonic() - started < 3
            writer.close()


# -- the default security block ----------------------------------------------------------------


async def echo_works(port: int) -> bool:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        return await still_open(reader, writer)
    finally:
        writer.close()


@async_test()
async def test_default_security_applies_to_every_route_and_routes_add_their_own() -> None:
    async with serve(echo_handler) as backend:
        a, b, c = free_ports(3)
        routes = [
            tcp(a, backend, name="plain"),
            tcp(b, backend, name="own-block", security={"ip_block_list": ["10.9.9.9"]}),
            tcp(c, backend, name="own-allow", security={"ip_allow_list": ["127.0.0.1"]}),
        ]
        security = {"ip_allow_list": ["10.0.0.0/8"], "ip_block_list": ["192.0.2.1"]}
        async with SmartRoute(routes, bind_address=LOOPBACK, security=security):
            assert not await echo_works(a)  # 127.0.0.1 is not in the default allow list
            assert not await echo_works(b)  # its own block list keeps the default allow list
            assert await echo_works(c)  # its own allow list replaces the default one
        security = {"ip_block_list": ["127.0.0.1"]}
        async with SmartRoute(routes, bind_address=LOOPBACK, security=security):
            assert not await echo_works(c)  # a default block applies even where a route allows


@async_test()
async def test_default_connection_limit_per_ip() -> None:
    async with serve(echo_handler) as backend:
        port = free_port()
        security = {"max_connections_per_ip": 1}
        async with SmartRoute([tcp(port, backend)], bind_address=LOOPBACK, security=security):
            first = await asyncio.open_connection(LOOPBACK, port)
            assert await still_open(*first)
            assert not await echo_works(port)
            first[1].close()
            await first[1].wait_closed()
            for _ in range(100):
                if await echo_works(port):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the slot was not given back")


# -- statistics ---------------------------------------------------------------------------------


def test_client_ips_are_pruned_to_the_busiest_and_listed_top_first() -> None:
    book = StatsBook(max_ips=100)
    for i in range(250):
        record = ConnectionRecord(f"10.0.{i // 200}.{i % 200}", 1000, 80, DEFAULTS)
        book.opened(record)
        record.bytes_in = i  # later clients moved more
        book.finished(record)
    assert len(book.ips) <= 100
    snapshot = book.snapshot(top_clients=3)
    assert list(snapshot["client_ips"]) == ["10.0.1.49", "10.0.1.48", "10.0.1.47"]
    assert snapshot["client_ips_tracked"] == len(book.ips)
    assert snapshot["connections"] == {"active": 0, "total": 250}
    assert snapshot["bytes"]["in"] == sum(range(250))  # overall totals lose nothing


def test_clients_with_live_connections_survive_a_prune() -> None:
    book = StatsBook(max_ips=10)
    quiet = ConnectionRecord("192.0.2.1", 1, 80, DEFAULTS)
    book.opened(quiet)
    for i in range(30):
        record = ConnectionRecord(f"10.0.0.{i}", 1, 80, DEFAULTS)
        book.opened(record)
        record.bytes_out = 1000
        book.finished(record)
    assert "192.0.2.1" in book.ips
    assert book.snapshot(top_clients=1)["client_ips"] == {
        "192.0.2.1": {"active": 1, "total": 1, "bytes_in": 0, "bytes_out": 0}
    }


def test_throughput_over_windows() -> None:
    book = StatsBook()
    record = ConnectionRecord("10.0.0.1", 1, 80, DEFAULTS)
    book.opened(record)
    book.sample(100.0)
    record.bytes_in, record.bytes_out = 5000, 10000
    book.sample(105.0)
    rates = book.throughput(110.0)
    assert rates["10s"] == {"connections": 0.0, "bytes_in": 500.0, "bytes_out": 1000.0}
    assert rates["60s"] == rates["300s"] == rates["10s"]
    later = book.throughput(200.0)  # the samples left the 10 s and 60 s windows
    assert later["10s"]["bytes_in"] == later["60s"]["bytes_in"] == 0.0
    assert later["300s"]["bytes_in"] == 50.0


@async_test()
async def test_stats_show_throughput_of_live_traffic() -> None:
    async with serve(echo_handler) as backend:
        port = free_port()
        async with SmartRoute([tcp(port, backend)], bind_address=LOOPBACK) as proxy:
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            deadline = time.monotonic() + 2.5
            while time.monotonic() < deadline:
                writer.write(b"y" * 9999 + b"\n")
                await asyncio.wait_for(reader.readline(), 5)
                await asyncio.sleep(0.01)
            rates = proxy.stats()["throughput"]["10s"]
            writer.close()
    assert rates["bytes_in"] > 10_000 and rates["bytes_out"] > 10_000
