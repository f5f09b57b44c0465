"""Plain HTTP/1.1 reverse proxying as seen from outside: the oracle for moving it to the lane.

Every test runs a real SmartRoute on loopback in front of a backend of its own on a free
loopback port, and checks only what the peers see: the bytes the backend received, the bytes
the client received, and whether each connection was closed. Nothing here depends on whether
a connection is carried by an asyncio transport or by the fast lane (bare sockets in an epoll
set), except the ``lane_only`` fixture, which says which of the two carried it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from desync_peers import (
    WAIT,
    LoopbackServer,
    RawClient,
    RecordingBackend,
    Reply,
    ended,
    exchange,
    header,
)
from support import LOOPBACK, MIB, async_test, free_port, reset

from smartroute import SmartRoute

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

BIG = 32 * MIB


# -- the proxy and its routes -----------------------------------------------------------------


def route(
    port: int, backend: int, *, protocol: str = "http", name: str = "web", **match: Any
) -> dict[str, Any]:
    """A ``forward`` to the backend's IP literal (the default protocol when ``protocol`` is
    ``"auto"``)."""
    action: dict[str, Any] = {"type": "forward", "targets": [{"host": LOOPBACK, "port": backend}]}
    if protocol != "auto":
        action["protocol"] = protocol
    return {"name": name, "match": {"ports": port, **match}, "action": action}


def proxy(routes: list[dict[str, Any]], **settings: Any) -> SmartRoute:
    settings.setdefault("bind_address", LOOPBACK)
    settings.setdefault("graceful_shutdown_timeout", 1)
    return SmartRoute(routes, **settings)


# -- backends ---------------------------------------------------------------------------------


class Backend(LoopbackServer):
    """A backend on a free loopback port that runs ``handler`` for every connection."""

    def __init__(self, handler: Handler) -> None:
        super().__init__()
        self.handler = handler

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.handler(reader, writer)


async def read_head(reader: asyncio.StreamReader) -> bytes:
    """A request head as the backend received it, the blank line included."""
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)


async def read_body(
    reader: asyncio.StreamReader, head: bytes, sink: Callable[[bytes], None]
) -> None:
    """Feed the request body (Content-Length or chunked, de-chunked) to ``sink``."""
    length = header(head, b"content-length")
    if length is not None:
        left = int(length)
        while left:
            data = await asyncio.wait_for(reader.read(min(left, 1 << 16)), WAIT)
            if not data:
                raise asyncio.IncompleteReadError(b"", left)
            sink(data)
            left -= len(data)
        return
    while size := int((await asyncio.wait_for(reader.readline(), WAIT)).split(b";")[0], 16):
        sink((await asyncio.wait_for(reader.readexactly(size + 2), WAIT))[:-2])
    while (await asyncio.wait_for(reader.readline(), WAIT)) != b"\r\n":
        pass  # trailers


def payload(size: int) -> bytes:
    """``size`` bytes that are not all alike, made quickly."""
    block = os.urandom(1 << 16)
    return (block * (size // len(block) + 1))[:size]


# -- clients ----------------------------------------------------------------------------------


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait (bounded) for something a peer does that the test can only observe by looking."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"not within {WAIT}s: {what}"
        await asyncio.sleep(0.005)


def get(path: str, *extra: str, version: str = "1.1") -> bytes:
    lines = [f"GET {path} HTTP/{version}", "Host: site.test", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# -- 1, 2: keep-alive and pipelining ----------------------------------------------------------


@pytest.mark.parametrize("shape", ["http", "auto-with-domains"])
@async_test()
async def test_fifty_sequential_requests_ride_one_backend_connection(
    shape: str, lane_only: list[int]
) -> None:
    async with RecordingBackend() as backend:
        port = free_port()
        if shape == "http":
            routes = [route(port, backend.port)]
        else:  # the port must look at the request to pick the route
            routes = [route(port, backend.port, protocol="auto", domains="site.test")]
        async with proxy(routes):
            client = await RawClient.connect(port)
            try:
                for i in range(50):
                    response = await exchange(client, get(f"/{i}"))
                    assert (response.status, response.body) == (200, f"GET /{i}".encode())
                    assert "close" not in response.tokens("connection")
            finally:
                client.close()
    assert [seen.target for seen in backend.requests] == [f"/{i}".encode() for i in range(50)]
    assert len(backend.connections) == 1, "every request on the one kept-alive connection"
    assert lane_only == [], "handed to an asyncio transport, not kept on the fast lane"


@async_test()
async def test_ten_pipelined_requests_with_bodies_are_answered_in_order(
    lane_only: list[int],
) -> None:
    chunks = [b"chunked ", b"body, ", os.urandom(3000)]
    sent: list[tuple[bytes, bytes, bytes]] = []
    data = b""
    for i in range(10):
        if i == 6:
            body = b"".join(chunks)
            data += b"POST /6 HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            data += b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
            sent.append((b"POST", b"/6", body))
        elif i % 3 == 1:
            body = os.urandom(100 * i)
            head = b"POST /%d HTTP/1.1\r\nHost: site.test\r\nContent-Length: %d\r\n\r\n"
            data += head % (i, len(body)) + body
            sent.append((b"POST", b"/%d" % i, body))
        else:
            data += get(f"/{i}")
            sent.append((b"GET", b"/%d" % i, b""))
    async with RecordingBackend() as backend:
        port = free_port()
        async with proxy([route(port, backend.port)]):
            client = await RawClient.connect(port)
            try:
                await client.send(data)
                got = await client.responses([False] * 10)
            finally:
                client.close()
    assert [(r.status, r.body) for r in got] == [(200, m + b" " + t) for m, t, _ in sent]
    assert [(s.method, s.target, s.body) for s in backend.requests] == sent
    assert lane_only == [], "handed to an asyncio transport, not kept on the fast lane"


# -- 3, 4: bodies larger than any buffer ------------------------------------------------------


@async_test(60)
async def test_a_32_mib_upload_to_a_backend_slow_to_start_arrives_whole() -> None:
    body = payload(BIG)
    received = hashlib.sha256()
    size = 0

    def take(data: bytes) -> None:
        nonlocal size
        received.update(data)
        size += len(data)

    sent = 0  # bytes of the request the client managed to send so far
    sent_while_paused = -1

    async def slow_reader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent_while_paused
        await asyncio.sleep(0.5)  # the proxy must hold the client back meanwhile
        sent_while_paused = sent
        head = await read_head(reader)
        await read_body(reader, head, take)
        digest = received.hexdigest().encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(digest), digest))
        await writer.drain()
        await reader.read()

    async with Backend(slow_reader) as backend:
        port = free_port()
        async with proxy([route(port, backend.port)]):
            client = await RawClient.connect(port)
            try:
                head = b"POST /up HTTP/1.1\r\nHost: site.test\r\nContent-Length: %d\r\n\r\n" % BIG
                loop = asyncio.get_running_loop()
                data = memoryview(head + body)
                async with asyncio.timeout(30):
                    for start in range(0, len(data), 1 << 18):
                        await loop.sock_sendall(client.sock, data[start : start + (1 << 18)])
                        sent = start + len(data[start : start + (1 << 18)])
                response = await client.response()
            finally:
                client.close()
    assert size == BIG
    assert response is not None and response.status == 200
    # Without backpressure the proxy would take the whole upload while the backend waits (the
    # socket buffers on the way hold about 10 MiB here).
    assert 0 <= sent_while_paused < 24 * MIB, f"{sent_while_paused / MIB:.1f} MiB taken"
    assert response.body == hashlib.sha256(body).hexdigest().encode()


@async_test(60)
async def test_a_32_mib_download_to_a_client_slow_to_start_arrives_whole(
    lane_only: list[int],
) -> None:
    body = payload(BIG)

    async def download(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG)
        view = memoryview(body)
        for start in range(0, BIG, MIB):
            writer.write(view[start : start + MIB])
            await writer.drain()
        await reader.read()

    async with Backend(download) as backend:
        port = free_port()
        async with proxy([route(port, backend.port)]):
            client = await RawClient.connect(port)
            try:
                await client.send(get("/big"))
                await asyncio.sleep(0.5)  # a client that does not read for a while
                response = await client.response()
            finally:
                client.close()
    assert response is not None and response.status == 200 and response.complete
    assert len(response.body) == BIG
    assert hashlib.sha256(response.body).digest() == hashlib.sha256(body).digest()
    assert lane_only == [], "handed to an asyncio transport, not kept on the fast lane"


# -- 5: response framings ---------------------------------------------------------------------

CHUNKED_REPLY = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n"
)
UNTIL_CLOSE = b"body framed by closing\n" * 100


async def framings(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """``/chunked`` gets a chunked answer; ``/close`` one without length, ended by closing."""
    while True:
        head = await read_head(reader)
        if head.split(b" ")[1] == b"/chunked":
            writer.write(CHUNKED_REPLY)
            await writer.drain()
            continue
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + UNTIL_CLOSE)
        await writer.drain()
        return


@async_test()
async def test_chunked_and_close_framed_responses_reach_a_1_1_client_chunked(
    lane_only: list[int],
) -> None:
    async with Backend(framings) as backend:
        port = free_port()
        async with proxy([route(port, backend.port)]):
            client = await RawClient.connect(port)
            try:
                response = await exchange(client, get("/chunked"))
                assert (response.status, response.body) == (200, b"hello, world")
                assert response.tokens("transfer-encoding") == ["chunked"]
                response = await exchange(client, get("/close"))
                assert (response.status, response.body) == (200, UNTIL_CLOSE)
                assert response.tokens("transfer-encoding") == ["chunked"], "re-chunked"
                assert "close" not in response.tokens("connection")
                response = await exchange(client, get("/chunked"))  # the client stays
                assert (response.status, response.body) == (200, b"hello, world")
            finally:
                client.close()
    assert lane_only == [], "handed to an asyncio transport, not kept on the fast lane"


@async_test()
async def test_a_close_framed_response_reaches_a_1_0_client_plain_then_eof() -> None:
    async with Backend(framings) as backend:
        port = free_port()
        async with proxy([route(port, backend.port)]):
            client = await RawClient.connect(port)
            try:
                response = await exchange(client, get("/close", version="1.0"))
                assert (response.status, response.body) == (200, UNTIL_CLOSE)
                assert response.header("transfer-encoding") is None
                # The body is read until the connection ends: a FIN, not a reset.
                assert client.eof and not client.reset
            finally:
                client.close()


# -- 6, 7: slow and malformed request heads ---------------------------------------------------


@async_test()
async def test_a_head_trickled_byte_by_byte_is_served() -> None:
    request = get("/slowly", "User-Agent: trickle")
    assert len(request) >= 60
    async with RecordingBackend() as backend:
        port = free_port()
        async with proxy([route(port, backend.port)]):
            client = await RawClient.connect(port)
            try:
                for byte in request:
                    await client.send(bytes([byte]))
                    await asyncio.sleep(0.01)
                response = await client.response()
            finally:
                client.close()
    assert response is not None and (response.status, response.body) == (200, b"GET /slowly")
    assert [seen.target for seen in backend.requests] == [b"/slowly"]


@async_test()
async def test_a_head_that_stops_halfway_gets_408_after_the_header_timeout() -> None:
    async with RecordingBackend() as backend:
        port = free_port()
        async with proxy([route(port, backend.port)], http_header_timeout=0.5):
            client = await RawClient.connect(port)
            try:
                started = asyncio.get_running_loop().time()
                await client.send(b"GET /never-ends HTTP/1.1\r\nHost: site.test\r\nX-A:")
                response = await client.response()
                waited = asyncio.get_running_loop().time() - started
                if response is not None:  # or closed without an answer
                    assert response.status == 408
                    await ended(client)
            finally:
                client.close()
    assert 0.4 < waited < 3, f"closed after {waited:.2f}s"
    assert backend.connections == [], "nothing reached the backend"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"garbage\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: site.test\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n", 431),
        (
            b"POST /up HTTP/1.1\r\nHost: site.test\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: site.test\r\n\r\n",
            400,
        ),
    ],
    ids=["garbage-request-line", "head-over-16-kib", "content-length-and-chunked"],
)
@async_test()
async def test_a_malformed_request_is_answered_and_closed(
    request_bytes: bytes, status: int
) -> None:
    async with RecordingBackend() as backend:
        port = free_port()
        async with proxy([route(port, backend.port)]):
            client = await RawClient.connect(port)
            try:
                response = await exchange(client, request_bytes)
                assert response.status == status, response.summary()
                assert "close" in response.tokens("connection")
                await ended(client)
            finally:
                client.close()
    assert backend.connections == [], "nothing reached the backend"


# -- 8, 9: protocol upgrades ------------------------------------------------------------------

UPGRADE = get("/ws", "Connection: Upgrade", "Upgrade: websocket")
SWITCHED = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


async def switching_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer an upgrade with 101 and a greeting in the same write, then echo every byte."""
    head = await read_head(reader)
    assert header(head, b"upgrade") == b"websocket", head
    writer.write(SWITCHED + b"greeting from the backend;")
    await writer.drain()
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


@async_test()
async def test_an_upgrade_becomes_a_tunnel_keeping_early_bytes_both_ways(
    lane_only: list[int],
) -> None:
    async with Backend(switching_echo) as backend:
        port = free_port()
        async with proxy([route(port, backend.port)]):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            try:
                writer.write(UPGRADE + b"early bytes;")  # sent with the head, before any 101
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
                assert head.startswith(b"HTTP/1.1 101 "), head
                assert header(head, b"upgrade") == b"websocket", head
                want = b"greeting from the backend;early bytes;"
                assert await asyncio.wait_for(reader.readexactly(len(want)), WAIT) == want
                for i in range(3):
                    message = b"message %d;" % i
                    writer.write(message)
                    assert await asyncio.wait_for(reader.readexactly(len(message)), WAIT) == message
                big = payload(2 * MIB)
                writer.write(big)
                assert await asyncio.wait_for(reader.readexactly(len(big)), WAIT) == big
                writer.write_eof()  # a half-close goes through; the backend's echo loop ends
                assert await asyncio.wait_for(reader.read(), WAIT) == b""
            finally:
                writer.close()
    assert backend.accepted == 1
    assert lane_only == [], "handed to an asyncio transport, not kept on the fast lane"


@async_test()
async def test_a_101_nobody_asked_for_is_a_502() -> None:
    async with RecordingBackend({0: Reply(SWITCHED)}) as backend:
        port = free_port()
        async with proxy([route(port, backend.port)]):
            client = await RawClient.connect(port)
            try:
                response = await exchange(client, get("/plain"))
            finally:
                client.close()
    assert response.status == 502, response.summary()
    assert [seen.target for seen in backend.requests] == [b"/plain"]


# -- 10, 11: a client that half-closes, a backend that resets ---------------------------------


@async_test()
async def test_a_client_that_half_closes_after_its_request_still_gets_the_whole_answer() -> None:
    body = payload(300 * 1024)

    async def late(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await asyncio.sleep(0.2)  # the client's FIN is there well before the answer
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        await reader.read()

    async with Backend(late) as backend:
        port = free_port()
        async with proxy([route(port, backend.port)]):
            client = await RawClient.connect(port)
            try:
                await client.send(get("/half"), half_close=True)
                response = await client.response()
                assert response is not None and response.status == 200
                assert response.complete and response.body == body
                await ended(client)
                assert not client.reset
            finally:
                client.close()


@async_test()
async def test_a_backend_reset_mid_body_closes_the_client_without_another_answer() -> None:
    client_got_bytes = asyncio.Event()

    async def resets(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"0123456789")
        await writer.drain()
        await asyncio.wait_for(client_got_bytes.wait(), WAIT)  # the response is under way
        reset(writer)

    async with Backend(resets) as backend:
        port = free_port()
        async with proxy([route(port, backend.port)]):
            client = await RawClient.connect(port, received=client_got_bytes)
            try:
                await client.send(get("/cut"))
                got = await client.responses([False, False])
                await ended(client)
            finally:
                client.close()
    assert len(got) == 1, [r.summary() for r in got]
    assert got[0].status == 200 and not got[0].complete
    assert b"0123456789".startswith(got[0].body)  # what came before the reset, at most


# -- 12, 13: backends that are not there, or never answer -------------------------------------


@async_test()
async def test_an_unreachable_backend_is_a_502_and_the_client_may_go_on() -> None:
    dead = free_port()  # nothing listens there
    async with RecordingBackend() as backend:
        port = free_port()
        routes = [
            route(port, dead, name="dead", path="/dead/*"),
            route(port, backend.port, name="live"),
        ]
        async with proxy(routes, connect_timeout=2):
            client = await RawClient.connect(port)
            try:
                response = await exchange(client, get("/dead/x"))
                assert response.status == 502, response.summary()
                assert "close" not in response.tokens("connection")
                response = await exchange(client, get("/alive"))
                assert (response.status, response.body) == (200, b"GET /alive")
            finally:
                client.close()


@async_test()
async def test_a_backend_slower_than_backend_timeout_is_a_504() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await reader.read()  # never answers; ends when the proxy gives up on it

    async with Backend(silent) as backend:
        port = free_port()
        async with proxy([route(port, backend.port)], backend_timeout=0.5):
            client = await RawClient.connect(port)
            try:
                started = asyncio.get_running_loop().time()
                response = await exchange(client, get("/slow"))
                waited = asyncio.get_running_loop().time() - started
            finally:
                client.close()
    assert response.status == 504, response.summary()
    assert 0.4 < waited < 3, f"answered after {waited:.2f}s"
    assert backend.accepted == 1


# -- 14, 15: pooled connections the backend dropped; a graceful stop ---------------------------


@pytest.mark.parametrize("drops", ["after-answering", "at-the-next-request"])
@async_test()
async def test_a_backend_that_keeps_no_connection_alive_serves_every_request(drops: str) -> None:
    # Each answer is framed by its length and says nothing of closing, so the proxy pools the
    # connection. The backend closes it right after answering, or only once the next request
    # came on it (as when its keep-alive timeout strikes just then): that request, which has
    # no body, must be sent again on a new connection.
    answered: list[bytes] = []

    async def one_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target = (await read_head(reader)).split(b" ")[1]
        answered.append(target)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(target), target))
        await writer.drain()
        if drops == "at-the-next-request":
            await read_head(reader)  # then closed unanswered

    async with Backend(one_answer) as backend:
        port = free_port()
        async with proxy([route(port, backend.port)]):
            client = await RawClient.connect(port)
            try:
                for i in range(5):
                    response = await exchange(client, get(f"/{i}"))
                    assert (response.status, response.body) == (200, f"/{i}".encode())
            finally:
                client.close()
    assert answered == [f"/{i}".encode() for i in range(5)]
    assert backend.accepted == 5


@pytest.mark.parametrize("host", [LOOPBACK, "localhost"], ids=["fast-lane", "transport"])
@async_test()
async def test_a_request_that_must_not_happen_twice_is_not_sent_again_on_a_new_connection(
    host: str,
) -> None:
    # As above, the backend closes each connection when the next request arrives on it; a
    # bodyless POST may have been acted on, so it is not sent again (RFC 9112, 9.3.1): 502.
    answered: list[bytes] = []

    async def one_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answered.append((await read_head(reader)).split(b" ")[0])
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        answered.append((await read_head(reader)).split(b" ")[0])  # then closed unanswered

    async with Backend(one_answer) as backend:
        port = free_port()
        config = route(port, backend.port)
        config["action"]["targets"][0]["host"] = host
        async with proxy([config]):
            client = await RawClient.connect(port)
            try:
                assert (await exchange(client, get("/1"))).status == 200
                post = b"POST /2 HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0\r\n\r\n"
                response = await exchange(client, post)
                assert response.status == 502
                assert b"without answering" in response.body
            finally:
                client.close()
    assert answered == [b"GET", b"POST"]  # the POST reached the backend once
    assert backend.accepted == 1


@async_test()
async def test_a_graceful_stop_closes_idle_clients_and_lets_a_request_under_way_finish() -> None:
    # Request 1 (the busy client's) is answered only once the test sets backend.resume.
    late = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate"
    async with RecordingBackend({1: Reply(b"", then=late)}) as backend:
        port = free_port()
        server = proxy([route(port, backend.port)], graceful_shutdown_timeout=20)
        await server.start()
        idle = busy = None
        try:
            idle = await RawClient.connect(port)
            response = await exchange(idle, get("/idle"))
            assert response.status == 200 and "close" not in response.tokens("connection")
            busy = await RawClient.connect(port)
            await busy.send(get("/busy"))
            await until(lambda: len(backend.requests) == 2, "the busy request reached the backend")
            loop = asyncio.get_running_loop()
            started = loop.time()
            stopping = asyncio.create_task(server.stop())
            await ended(idle)  # closed at once, not after the grace period
            assert loop.time() - started < 2
            backend.resume.set()
            answer = await busy.response()
            assert answer is not None and (answer.status, answer.body) == (200, b"late")
            assert "close" in answer.tokens("connection")
            await ended(busy)
            await asyncio.wait_for(stopping, 5)
            assert loop.time() - started < 2.5, "stop() did not wait out the 20 s of grace"
        finally:
            for client in (idle, busy):
                if client is not None:
                    client.close()
            await server.stop()
