"""PROXY protocol through the proxy: trusted load balancers name the real client."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import Callable
from typing import Any

import pytest
from support import LOOPBACK, Finished, async_test, free_port, read_line, read_to_end, serve

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


# -- forged headers on ports dispatched at once ------------------------------------------------

FORGED_V1 = b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 443\r\n"
FORGED_V2 = encode_v2(("203.0.113.7", 40000), ("127.0.0.1", 443))
UNTRUSTING: dict[str, Any] = {"accept_proxy_protocol": True, "proxy_ips": ["192.0.2.1"]}


class Recorder:
    """A backend that greets at once (the server speaks first), echoes, and keeps what it read."""

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = bytearray()
        try:
            if self.greeting:
                writer.write(self.greeting)
            while chunk := await reader.read(65536):
                data += chunk
                writer.write(chunk)
        except ConnectionError:
            pass
        finally:
            self.received.put_nowait(bytes(data))
            writer.close()

    async def next(self) -> bytes:
        """Everything one connection sent, once it ended."""
        return await asyncio.wait_for(self.received.get(), 5)


async def until(condition: Callable[[], bool], what: str, timeout: float = 5) -> None:
    """Wait for a state no event announces (the proxy having read some bytes), polling briefly."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.005)


async def send_in_pieces(proxy: SmartRoute, port: int, pieces: list[bytes]) -> bytes:
    """Send ``pieces``, each read by the proxy before the next goes; then EOF and read all."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    sent = proxy.stats()["bytes"]["in"]  # the proxy counts bytes in as it reads them

    def read() -> bool:
        return bool(proxy.stats()["bytes"]["in"] >= sent)

    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            sent += len(piece)
            await until(read, f"the proxy read {sent} bytes")
        with contextlib.suppress(OSError):
            writer.write_eof()
        answer, _ = await read_to_end(reader, timeout=5)
    finally:
        writer.close()
    return answer


def raw_forward(port: int, backend: int, **target: Any) -> dict[str, Any]:
    return {"name": "raw", "match": {"ports": port}, "action": {
        "type": "forward", "targets": [{"host": LOOPBACK, "port": backend, **target}]}}  # fmt: skip


@pytest.mark.parametrize(
    "pieces",
    [
        [FORGED_V1 + b"hello\n"],
        [FORGED_V2 + b"hello\n"],
        [FORGED_V1[:4], FORGED_V1[4:] + b"hello\n"],  # "PROX", then the rest
        [FORGED_V2[:5], FORGED_V2[5:] + b"hello\n"],
        [FORGED_V2[:11], FORGED_V2[11:]],  # one byte short of the signature, then the rest
    ],
    ids=["v1", "v2", "v1-split", "v2-split", "v2-split-late"],
)
@async_test()
async def test_forged_headers_never_reach_a_port_only_raw_forward(
    pieces: list[bytes], finished: Finished
) -> None:
    recorder = Recorder()
    async with serve(recorder.handle) as backend:
        port = free_port()
        async with SmartRoute(
            [raw_forward(port, backend)], bind_address=LOOPBACK, **UNTRUSTING
        ) as proxy:
            answer = await send_in_pieces(proxy, port, pieces)
            record = await finished.next()
            # Routed at once, the backend is connected before the header is complete (always
            # when it comes in pieces); a header read before that is refused without one.
            assert record.target is not None or len(pieces) == 1
            if record.target is not None:
                assert await recorder.next() == b""
    assert recorder.received.empty()
    assert answer == b""
    assert record.outcome == "untrusted-proxy-header"
    assert record.bytes_in == sum(map(len, pieces))


@async_test()
async def test_forged_headers_never_reach_a_port_only_socket_handler(finished: Finished) -> None:
    read: asyncio.Queue[bytes] = asyncio.Queue()

    async def greeter(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: RouteContext
    ) -> None:
        line = b""
        try:
            writer.write(b"hi\n")
            line = await reader.readline()
        finally:
            read.put_nowait(line)

    port = free_port()
    routes = [{"match": {"ports": port},
               "action": {"type": "socket-handler", "socket_handler": greeter}}]  # fmt: skip
    async with SmartRoute(routes, bind_address=LOOPBACK, **UNTRUSTING) as proxy:
        answer = await send_in_pieces(proxy, port, [FORGED_V1[:3], FORGED_V1[3:] + b"x\n"])
        assert await asyncio.wait_for(read.get(), 5) == b""
        record = await finished.next()
    assert answer in (b"", b"hi\n")  # the greeting may have gone out before the header came
    assert record.outcome == "untrusted-proxy-header"


@async_test()
async def test_forged_headers_never_reach_a_port_only_http_route(finished: Finished) -> None:
    port = free_port()
    routes = [{"match": {"ports": port},
               "action": {"type": "redirect", "redirect": {"to": "https://site.test/"}}}]  # fmt: skip
    async with SmartRoute(routes, bind_address=LOOPBACK, **UNTRUSTING) as proxy:
        assert await send_in_pieces(proxy, port, [FORGED_V2[:2], FORGED_V2[2:]]) == b""
        assert (await finished.next()).outcome == "untrusted-proxy-header"
        request = b"GET / HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n"
        answer = await send_in_pieces(proxy, port, [request[:3], request[3:]])
        assert answer.startswith(b"HTTP/1.1 301 ")
        assert (await finished.next()).outcome == "ok"


@async_test()
async def test_ordinary_clients_of_a_port_with_accept_proxy_protocol_still_flow(
    finished: Finished,
) -> None:
    recorder = Recorder(greeting=b"220 ready\r\n")
    async with serve(recorder.handle) as backend:
        port = free_port()
        async with SmartRoute(
            [raw_forward(port, backend)], bind_address=LOOPBACK, **UNTRUSTING
        ) as proxy:
            # The server speaks first: its greeting comes before the client sends anything.
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            assert await read_line(reader) == b"220 ready\r\n"
            writer.write(b"PRO")  # the start of "PROXY " ... and of other things
            await writer.drain()
            await until(lambda: proxy.stats()["bytes"]["in"] >= 3, "the first bytes were read")
            writer.write(b"FILE\n")
            assert await read_line(reader) == b"PROFILE\n"
            writer.write(b"PROXY later bytes are not looked at\n")
            assert await read_line(reader) == b"PROXY later bytes are not looked at\n"
            writer.write_eof()
            assert await read_to_end(reader) == (b"", False)
            writer.close()
            assert await recorder.next() == b"PROFILE\nPROXY later bytes are not looked at\n"
            # First bytes that cannot start a header go on at once, a lone CRLF included.
            answer = await send_in_pieces(proxy, port, [b"\r\nhello\n"])
            assert answer == b"220 ready\r\n\r\nhello\n"
            assert await recorder.next() == b"\r\nhello\n"
            # Bytes that start like a header and end before saying so are the client's too.
            assert await send_in_pieces(proxy, port, [b"\r\n\r\n"]) == b"220 ready\r\n\r\n\r\n"
            assert await recorder.next() == b"\r\n\r\n"
    records = [await finished.next() for _ in range(3)]
    assert [r.outcome for r in records] == ["ok"] * 3
    assert records[0].bytes_in == len(b"PROFILE\nPROXY later bytes are not looked at\n")


@async_test()
async def test_a_trusted_proxy_header_is_consumed_and_a_second_one_refused(
    finished: Finished,
) -> None:
    recorder = Recorder()
    async with serve(recorder.handle) as backend:
        port = free_port()
        settings: dict[str, Any] = {"accept_proxy_protocol": True, "proxy_ips": [LOOPBACK]}
        async with SmartRoute(
            [raw_forward(port, backend)], bind_address=LOOPBACK, **settings
        ) as proxy:
            assert await send_in_pieces(proxy, port, [FORGED_V1 + b"hello\n"]) == b"hello\n"
            assert await recorder.next() == b"hello\n"
            record = await finished.next()
            assert (record.client_ip, record.client_port, record.outcome) == (
                "203.0.113.7",
                40000,
                "ok",
            )
            # The load balancer passes on what its client sent: a header of the client's own,
            # with the balancer's (mostly refused before a route is chosen) or after it (the
            # backend is connected at once, and gets nothing).
            for pieces in ([FORGED_V1 + FORGED_V2 + b"hi\n"], [FORGED_V1, FORGED_V2 + b"hi\n"]):
                assert await send_in_pieces(proxy, port, pieces) == b""
                record = await finished.next()
                assert (record.client_ip, record.client_port) == ("203.0.113.7", 40000)
                assert record.outcome == "untrusted-proxy-header"
                assert record.target is not None or len(pieces) == 1
                if record.target is not None:
                    assert await recorder.next() == b""
    assert recorder.received.empty()


# -- PROXY headers to targets, across address families -----------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
@async_test()
async def test_an_ipv6_client_behind_an_ipv4_load_balancer_is_named_to_the_target(
    version: str,
) -> None:
    recorder = Recorder()
    async with serve(recorder.handle) as backend:
        port = free_port()
        route = raw_forward(port, backend, send_proxy_protocol=version)
        settings: dict[str, Any] = {"accept_proxy_protocol": True, "proxy_ips": [LOOPBACK]}
        async with SmartRoute([route], bind_address=LOOPBACK, **settings) as proxy:
            announced = f"PROXY TCP6 2001:db8::7 2001:db8::1 40000 {port}\r\n".encode()
            echoed = await send_in_pieces(proxy, port, [announced + b"hello\n"])
            data = await recorder.next()
    assert echoed == data  # the backend echoes: what it read, the proxy's header first
    header = parse_proxy_header(data)
    assert header is not None and header.version == int(version[1])
    assert (header.command, header.family) == ("PROXY", "TCP6")
    assert header.source == ("2001:db8::7", 40000)
    assert header.destination is not None and header.destination[1] == port
    # The proxy's own IPv4 address, in the IPv6 form of the header.
    assert ipaddress.ip_address(header.destination[0]) == ipaddress.ip_address("::ffff:127.0.0.1")
    assert data[header.length :] == b"hello\n"
