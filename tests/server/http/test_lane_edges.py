"""Edge paths of HTTP on the fast lane, seen from outside: upgrades on terminated (and
re-encrypted) connections, unreachable backends, a silent TLS handshake, interim answers, HEAD,
the lane's own answers over TLS and ``Expect: 100-continue``.

Every test runs a real SmartRoute on loopback in front of backends of its own and checks what
the peers see (bytes, statuses, closes) and the records of the ``finished`` fixture; each also
asserts that the connection stayed on the fast lane (``lane_only``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
from desync_peers import (
    WAIT,
    RawClient,
    RecordingBackend,
    Reply,
    TlsClient,
    ended,
    exchange,
    header,
)
from support import LOOPBACK, MIB, CertPair, Finished, TestCA, async_test, free_port, serve

from smartroute import SmartRoute

LANE = "handed to an asyncio transport, not kept on the fast lane"
UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: site.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
)
SWITCHED = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
GREETING = b"greeting sent with the 101;"


@pytest.fixture(scope="module")
def site(ca: TestCA) -> CertPair:
    return ca.issue("site.test")


# -- the proxy and its routes -----------------------------------------------------------------


def http_route(port: int, backend: int, name: str, **match: Any) -> dict[str, Any]:
    """A plain-HTTP forward to the backend's IP literal."""
    return {
        "name": name,
        "match": {"ports": port, **match},
        "action": {
            "type": "forward",
            "targets": [{"host": LOOPBACK, "port": backend}],
            "protocol": "http",
        },
    }


def tls_route(
    port: int, backend: int, pair: CertPair, *, mode: str = "terminate", **tls: Any
) -> dict[str, Any]:
    """A forward that terminates TLS for ``site.test`` (``mode``, and ``tls`` settings)."""
    route = http_route(port, backend, "site", domains=["site.test"])
    certificate = {"cert": pair.cert_pem, "key": pair.key_pem}
    route["action"]["tls"] = {"mode": mode, "certificate": certificate, **tls}
    return route


def proxy(routes: list[dict[str, Any]], **settings: Any) -> SmartRoute:
    settings.setdefault("bind_address", LOOPBACK)
    settings.setdefault("graceful_shutdown_timeout", 1)
    settings.setdefault("initial_data_timeout", 5)
    return SmartRoute(routes, **settings)


# -- clients ----------------------------------------------------------------------------------


def client_hello(context: ssl.SSLContext, name: str = "site.test") -> bytes:
    """The bytes of a real ClientHello, from an ``SSLObject`` over memory BIOs."""
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def switching_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer an upgrade with 101 and a greeting in one write, then echo until EOF."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert header(head, b"upgrade") == b"websocket", head
        writer.write(SWITCHED + GREETING)
        await writer.drain()
        while data := await asyncio.wait_for(reader.read(65536), WAIT):
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError):
        pass
    finally:
        writer.close()


# -- 1, 2: upgrades on a terminated connection ------------------------------------------------


@pytest.mark.parametrize("backend_tls", [False, True], ids=["plain-backend", "tls-backend"])
@async_test()
async def test_an_upgrade_over_terminated_tls_tunnels_both_ways_and_ends_cleanly(
    backend_tls: bool,
    ca: TestCA,
    site: CertPair,
    tmp_path: Path,
    finished: Finished,
    lane_only: list[int],
) -> None:
    context = ca.server_context(site, tmp_path, "backend") if backend_tls else None
    async with serve(switching_echo, ssl_context=context) as backend:
        port = free_port()
        if backend_tls:
            cafile = tmp_path / "ca.pem"
            cafile.write_text(ca.pem)
            mode = "terminate-and-reencrypt"
            route = tls_route(port, backend, site, mode=mode, backend_ca=str(cafile))
        else:
            route = tls_route(port, backend, site)
        async with proxy([route]):
            client = await TlsClient.open(port, ca.client_context())
            try:
                response = await exchange(client, UPGRADE + b"early bytes;")
                assert response.status == 101, response.summary()
                assert response.header("upgrade") == "websocket", response.summary()
                want = GREETING + b"early bytes;"
                assert await client.exactly(len(want)) == want
                for i in range(5):
                    message = b"message %d;" % i * (1 + 1000 * i)
                    await client.send(message)
                    assert await client.exactly(len(message)) == message
                await client.send(b"", half_close=True)  # close_notify: the client's end
                await ended(client)
                assert not client.reset
            finally:
                client.close()
            record = await finished.next()
    assert (record.outcome, record.error) == ("upgraded", None)
    assert lane_only == [], LANE


# -- 3: an unreachable backend ----------------------------------------------------------------


def post(path: str, size: int) -> bytes:
    head = b"POST %s HTTP/1.1\r\nHost: site.test\r\nContent-Length: %d\r\n\r\n"
    return head % (path.encode(), size) + bytes(range(256)) * (size // 256)


@async_test()
async def test_an_unreachable_backend_is_a_502_kept_for_a_small_body_closed_for_a_big_one(
    finished: Finished, lane_only: list[int]
) -> None:
    with socket.socket() as unused:  # bound, never listening: connecting to it is refused
        unused.bind((LOOPBACK, 0))
        await unreachable_then_502s(unused.getsockname()[1], finished)
    assert lane_only == [], LANE


async def unreachable_then_502s(dead: int, finished: Finished) -> None:
    async with RecordingBackend() as backend:
        port = free_port()
        routes = [
            http_route(port, dead, "dead", path="/dead/*"),
            http_route(port, backend.port, "live"),
        ]
        async with proxy(routes, connect_timeout=2):
            client = await RawClient.connect(port)
            try:
                response = await exchange(client, post("/dead/small", 1024))
                assert response.status == 502, response.summary()
                assert "close" not in response.tokens("connection"), response.summary()
                response = await exchange(client, b"GET /alive HTTP/1.1\r\nHost: site.test\r\n\r\n")
                assert (response.status, response.body) == (200, b"GET /alive")
            finally:
                client.close()
            record = await finished.next()
            assert record.outcome == "backend-error", (record.outcome, record.error)
            client = await RawClient.connect(port)
            try:
                sending = asyncio.create_task(client.send(post("/dead/big", 2 * MIB)))
                big = await client.response()
                assert big is not None, "closed without an answer"
                assert big.status == 502, big.summary()
                assert "close" in big.tokens("connection"), big.summary()
                await ended(client)  # a FIN or a reset: either way, closed
                await asyncio.wait_for(sending, WAIT)
            finally:
                client.close()
            record = await finished.next()
            assert record.outcome == "backend-error", (record.outcome, record.error)
    assert [seen.target for seen in backend.requests] == [b"/alive"]


# -- 4: a ClientHello and then silence --------------------------------------------------------


@async_test()
async def test_a_client_silent_after_its_client_hello_is_closed_as_a_tls_handshake_failure(
    ca: TestCA, site: CertPair, finished: Finished, lane_only: list[int]
) -> None:
    async with RecordingBackend() as backend:
        port = free_port()
        async with proxy([tls_route(port, backend.port, site)], initial_data_timeout=0.5):
            client = await RawClient.connect(port)
            try:
                loop = asyncio.get_running_loop()
                started = loop.time()
                await client.send(client_hello(ca.client_context()))
                answer = await client.rest()  # the server's handshake flight, then the close
                waited = loop.time() - started
            finally:
                client.close()
            record = await finished.next()
    assert answer[:1] == b"\x16", f"no handshake record from the proxy: {answer[:20]!r}"
    assert 0.3 < waited < 2, f"closed after {waited:.2f}s"
    assert record.outcome == "tls-handshake", (record.outcome, record.error)
    assert backend.connections == []
    assert lane_only == [], LANE


# -- 5, 6: interim answers and HEAD -----------------------------------------------------------

EARLY = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


@async_test()
async def test_103_early_hints_reach_an_http_1_1_client_but_not_an_http_1_0_one(
    lane_only: list[int],
) -> None:
    early = Reply(EARLY, then=OK)  # the 200 only once the client got something
    async with RecordingBackend({0: early, 1: early}) as backend:
        port = free_port()
        async with proxy([http_route(port, backend.port, "web")]):
            client = await RawClient.connect(port, received=backend.resume)
            try:
                response = await exchange(client, b"GET /a HTTP/1.1\r\nHost: site.test\r\n\r\n")
                assert response.status == 103, response.summary()
                assert response.header("link") == "</a.css>; rel=preload", response.summary()
                final = await client.response()
                assert final is not None, "closed after the 103"
                assert (final.status, final.body) == (200, b"hello")
                assert "close" not in final.tokens("connection")
            finally:
                client.close()
            client = await RawClient.connect(port)
            try:
                response = await exchange(client, b"GET /b HTTP/1.0\r\nHost: site.test\r\n\r\n")
                assert (response.status, response.body) == (200, b"hello"), response.summary()
                await ended(client)
            finally:
                client.close()
    assert [seen.target for seen in backend.requests] == [b"/a", b"/b"]
    assert lane_only == [], LANE


@async_test()
async def test_a_head_answer_with_a_length_has_no_body_and_the_next_request_works(
    lane_only: list[int],
) -> None:
    bodiless = Reply(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    async with RecordingBackend({0: bodiless}) as backend:
        port = free_port()
        async with proxy([http_route(port, backend.port, "web")]):
            client = await RawClient.connect(port)
            try:
                request = b"HEAD /h HTTP/1.1\r\nHost: site.test\r\n\r\n"
                response = await exchange(client, request, head=True)
                assert response.status == 200, response.summary()
                assert response.header("content-length") == "100", response.summary()
                response = await exchange(client, b"GET /next HTTP/1.1\r\nHost: site.test\r\n\r\n")
                assert (response.status, response.body) == (200, b"GET /next")
            finally:
                client.close()
    assert [(s.method, s.target) for s in backend.requests] == [
        (b"HEAD", b"/h"),
        (b"GET", b"/next"),
    ]
    assert len(backend.connections) == 1
    assert lane_only == [], LANE


# -- 7: the lane's own answers over TLS -------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", 405),
        (b"garbage\r\n\r\n", 400),
        (b"GET /never-ends HTTP/1.1\r\nHost: site.test\r\nX-A:", 408),
    ],
    ids=["connect", "malformed-request-line", "head-stops-halfway"],
)
@async_test()
async def test_the_lane_answers_over_tls_and_closes(
    request_bytes: bytes,
    status: int,
    ca: TestCA,
    site: CertPair,
    finished: Finished,
    lane_only: list[int],
) -> None:
    async with RecordingBackend() as backend:
        port = free_port()
        async with proxy([tls_route(port, backend.port, site)], http_header_timeout=0.5):
            client = await TlsClient.open(port, ca.client_context())
            try:
                loop = asyncio.get_running_loop()
                started = loop.time()
                response = await exchange(client, request_bytes)
                waited = loop.time() - started
                assert response.status == status, response.summary()
                assert "close" in response.tokens("connection"), response.summary()
                await ended(client)
            finally:
                client.close()
            record = await finished.next()
    assert record.outcome != "ok", (record.outcome, record.error)
    if status == 408:
        assert 0.4 < waited < 3, f"answered after {waited:.2f}s"
    assert backend.connections == [], "nothing reached the backend"
    assert lane_only == [], LANE


# -- 8: Expect: 100-continue ------------------------------------------------------------------


@async_test()
async def test_expect_100_continue_is_answered_before_the_body_which_arrives_once(
    lane_only: list[int],
) -> None:
    body = bytes(range(256)) * 8
    async with RecordingBackend() as backend:
        port = free_port()
        async with proxy([http_route(port, backend.port, "web")]):
            client = await RawClient.connect(port)
            try:
                head = b"POST /up HTTP/1.1\r\nHost: site.test\r\nExpect: 100-continue\r\n"
                head += b"Content-Length: %d\r\n\r\n" % len(body)
                response = await exchange(client, head)
                assert (response.version, response.status) == ("HTTP/1.1", 100)
                assert backend.requests == [], "the request went on before its body"
                response = await exchange(client, body)
                assert (response.status, response.body) == (200, b"POST /up")
            finally:
                client.close()
    [seen] = backend.requests
    assert seen.body == body
    assert header(seen.head, b"expect") is None, seen.head
    assert len(backend.connections[0].raw) == len(seen.head) + len(body), "the body came twice"
    assert lane_only == [], LANE
