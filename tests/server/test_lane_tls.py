"""HTTPS with TLS terminated by the proxy, seen from outside: the oracle for moving TLS
termination onto the fast lane (bare sockets, ``ssl.MemoryBIO``, an epoll set).

Every test runs a real SmartRoute on loopback that terminates TLS for ``site.test`` (and
``other.test``) and forwards plain HTTP to a backend of its own on a free loopback port. The
client is :class:`TlsClient`: a plain socket driven through ``ssl.MemoryBIO``, so a test decides
how its TLS bytes are written and sees exactly what the proxy sent (an alert, a close_notify, a
bare FIN, a reset). Only the ``lane_only`` fixture looks inside: it says whether a connection
was handed to an asyncio transport instead of staying on the fast lane.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import re
import socket
import ssl
import warnings
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
from support import LOOPBACK, MIB, CertPair, Finished, TestCA, async_test, free_port, require_tool

from smartroute import SmartRoute

BIG = 8 * MIB


LANE = "handed to an asyncio transport, not kept on the fast lane"


@pytest.fixture(scope="module")
def site(ca: TestCA) -> CertPair:
    return ca.issue("site.test")


@pytest.fixture(scope="module")
def other(ca: TestCA) -> CertPair:
    return ca.issue("other.test")


# -- the proxy and its routes -----------------------------------------------------------------


def tls_route(
    port: int,
    backend: int,
    pair: CertPair,
    *,
    name: str = "site",
    domain: str = "site.test",
    security: dict[str, Any] | None = None,
    **match: Any,
) -> dict[str, Any]:
    """A forward that terminates TLS for ``domain`` with ``pair`` and speaks HTTP to the
    backend's IP literal."""
    route: dict[str, Any] = {
        "name": name,
        "match": {"ports": port, "domains": [domain], **match},
        "action": {
            "type": "forward",
            "targets": [{"host": LOOPBACK, "port": backend}],
            "protocol": "http",
            "tls": {
                "mode": "terminate",
                "certificate": {"cert": pair.cert_pem, "key": pair.key_pem},
            },
        },
    }
    if security is not None:
        route["security"] = security
    return route


def proxy(routes: list[dict[str, Any]], **settings: Any) -> SmartRoute:
    settings.setdefault("bind_address", LOOPBACK)
    settings.setdefault("graceful_shutdown_timeout", 1)
    settings.setdefault("initial_data_timeout", 5)
    return SmartRoute(routes, **settings)


# -- the client -------------------------------------------------------------------------------


def get(path: str, *extra: str, host: str = "site.test") -> bytes:
    return ("\r\n".join([f"GET {path} HTTP/1.1", f"Host: {host}", *extra]) + "\r\n\r\n").encode()


async def still_serving(port: int, ca: TestCA) -> None:
    """A well-behaved client is served after whatever the test did to the proxy."""
    client = await TlsClient.open(port, ca.client_context())
    try:
        response = await exchange(client, get("/still-here"))
        assert (response.status, response.body) == (200, b"GET /still-here")
    finally:
        client.close()


# -- 1, 2: keep-alive and pipelining ----------------------------------------------------------


@async_test()
async def test_fifty_kept_alive_https_requests_ride_one_backend_connection(
    ca: TestCA, site: CertPair, lane_only: list[int]
) -> None:
    async with RecordingBackend() as backend:
        port = free_port()
        async with proxy([tls_route(port, backend.port, site)]):
            client = await TlsClient.open(port, ca.client_context())
            try:
                for i in range(50):
                    response = await exchange(client, get(f"/{i}"))
                    assert (response.status, response.body) == (200, f"GET /{i}".encode())
                    assert "close" not in response.tokens("connection")
            finally:
                client.close()
    assert [seen.target for seen in backend.requests] == [f"/{i}".encode() for i in range(50)]
    assert len(backend.connections) == 1, "every request on the one kept-alive connection"
    assert {header(seen.head, b"x-forwarded-proto") for seen in backend.requests} == {b"https"}
    assert lane_only == [], LANE


@async_test()
async def test_a_terminated_connection_counts_its_http_bytes_not_tls_records(
    ca: TestCA, site: CertPair, finished: Finished, lane_only: list[int]
) -> None:
    # As on the transport path: stats() and the access log count what the client's HTTP
    # exchange carried, so a route's figures do not depend on which path served it.
    request = get("/counted", "Connection: close")
    async with RecordingBackend() as backend:
        port = free_port()
        async with proxy([tls_route(port, backend.port, site)]):
            client = await TlsClient.open(port, ca.client_context())
            try:
                await client.send(request)
                answer = await client.rest()
            finally:
                client.close()
            record = await finished.next()
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"GET /counted")
    assert (record.bytes_in, record.bytes_out) == (len(request), len(answer))
    assert lane_only == [], LANE


@async_test()
async def test_five_pipelined_requests_over_tls_are_answered_in_order(
    ca: TestCA, site: CertPair
) -> None:
    posted, chunks = os.urandom(5000), [b"chunked ", b"body, ", os.urandom(3000)]
    data = get("/0")
    data += b"POST /1 HTTP/1.1\r\nHost: site.test\r\nContent-Length: %d\r\n\r\n" % len(posted)
    data += posted + get("/2")
    data += b"POST /3 HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    data += b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n" + get("/4")
    sent = [
        (b"GET", b"/0", b""),
        (b"POST", b"/1", posted),
        (b"GET", b"/2", b""),
        (b"POST", b"/3", b"".join(chunks)),
        (b"GET", b"/4", b""),
    ]
    async with RecordingBackend() as backend:
        port = free_port()
        async with proxy([tls_route(port, backend.port, site)]):
            client = await TlsClient.open(port, ca.client_context())
            try:
                await client.send(data)  # one write: the five requests in as few records
                got = await client.responses([False] * 5)
            finally:
                client.close()
    assert [(r.status, r.body) for r in got] == [(200, m + b" " + t) for m, t, _ in sent]
    assert [(s.method, s.target, s.body) for s in backend.requests] == sent


# -- 3, 4: SNI and ALPN -----------------------------------------------------------------------


@async_test()
async def test_sni_selects_the_certificate_and_the_backend(
    ca: TestCA, site: CertPair, other: CertPair, lane_only: list[int]
) -> None:
    async with RecordingBackend() as one, RecordingBackend() as two:
        port = free_port()
        routes = [
            tls_route(port, one.port, site),
            tls_route(port, two.port, other, name="other", domain="other.test"),
        ]
        async with proxy(routes):
            for name, backend in (("site.test", one), ("other.test", two), ("site.test", one)):
                client = await TlsClient.open(port, ca.client_context(), name)
                try:
                    assert client.peer_names() == (name, [name])
                    before = len(backend.requests)
                    response = await exchange(client, get(f"/for-{name}", host=name))
                    assert (response.status, response.body) == (200, f"GET /for-{name}".encode())
                    assert len(backend.requests) == before + 1, f"{name} reached the wrong backend"
                finally:
                    client.close()
    assert [s.target for s in one.requests] == [b"/for-site.test"] * 2
    assert [s.target for s in two.requests] == [b"/for-other.test"]
    assert lane_only == [], LANE


@pytest.mark.parametrize("offered", [["h2", "http/1.1"], None], ids=["h2-and-http1.1", "none"])
@async_test()
async def test_alpn_negotiates_http_1_1_or_nothing(
    offered: list[str] | None, ca: TestCA, site: CertPair, lane_only: list[int]
) -> None:
    context = ca.client_context()
    if offered is not None:
        context.set_alpn_protocols(offered)
    async with RecordingBackend() as backend:
        port = free_port()
        async with proxy([tls_route(port, backend.port, site)]):
            client = await TlsClient.open(port, context)
            try:
                expected = None if offered is None else "http/1.1"
                assert client.tls.selected_alpn_protocol() == expected
                response = await exchange(client, get("/alpn"))
                assert (response.status, response.body) == (200, b"GET /alpn")
            finally:
                client.close()
    assert lane_only == [], LANE


# -- 5: large bodies --------------------------------------------------------------------------


@async_test(60)
async def test_8_mib_each_way_over_tls_arrive_whole_to_a_client_slow_to_read(
    ca: TestCA, site: CertPair
) -> None:
    upload, download = os.urandom(BIG), os.urandom(BIG)
    reply = Reply(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG + download)
    async with RecordingBackend({1: reply}) as backend:
        port = free_port()
        async with proxy([tls_route(port, backend.port, site)]):
            client = await TlsClient.open(port, ca.client_context())
            try:
                head = b"POST /up HTTP/1.1\r\nHost: site.test\r\nContent-Length: %d\r\n\r\n" % BIG
                await client.send(head + upload)
                await asyncio.sleep(0.3)  # the answer waits for a client that does not read
                response = await client.response()
                assert response is not None, "closed without an answer"
                assert (response.status, response.body) == (200, b"POST /up")
                await client.send(get("/down"))
                await asyncio.sleep(0.3)
                response = await client.response()
            finally:
                client.close()
    [up, _] = backend.requests
    assert len(up.body) == BIG and sha(up.body) == sha(upload)
    assert response is not None and response.status == 200 and response.complete
    assert len(response.body) == BIG and sha(response.body) == sha(download)
    assert len(backend.connections) == 1


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# -- 6, 7, 8: refused handshakes, garbage, renegotiation --------------------------------------


HELLO_CUT = 40  # bytes of a real ClientHello sent before the garbage


def client_hello(context: ssl.SSLContext, name: str = "site.test") -> bytes:
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@async_test()
async def test_a_tls_1_1_client_gets_a_protocol_version_alert_and_the_proxy_stays_up(
    ca: TestCA, site: CertPair
) -> None:
    old = ca.client_context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is deprecated: the point
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    try:
        client_hello(old)
    except ssl.SSLError as exc:
        pytest.skip(f"the local OpenSSL will not offer TLS 1.1 at all: {exc}")
    async with RecordingBackend() as backend:
        port = free_port()
        async with proxy([tls_route(port, backend.port, site)]):
            with pytest.raises(ssl.SSLError) as refused:
                client = await TlsClient.open(port, old)
                client.close()
            message = str(refused.value).lower()
            # An alert, not a bare EOF or reset: the proxy says why it refuses.
            assert "alert" in message and "protocol version" in message, message
            await still_serving(port, ca)
    assert [s.target for s in backend.requests] == [b"/still-here"]


@pytest.mark.parametrize("shape", ["hello-then-garbage", "hello-start-then-garbage", "not-tls"])
@async_test()
async def test_garbage_to_the_tls_port_closes_only_that_connection(
    shape: str, ca: TestCA, site: CertPair, finished: Finished
) -> None:
    first = client_hello(ca.client_context())
    if shape == "hello-then-garbage":
        data = first + b"\x17\x03\x03\x00\x05hello" + get("/")
    elif shape == "hello-start-then-garbage":
        data = first[:HELLO_CUT] + bytes(range(256)) * 16
    else:
        data = b"SSH-2.0-OpenSSH_9.6\r\n" + bytes(range(256)) * 16
    async with RecordingBackend() as backend:
        port = free_port()
        async with proxy([tls_route(port, backend.port, site)], initial_data_timeout=2):
            client = await RawClient.connect(port)
            try:
                await client.send(data)
                await client.rest()  # whatever the proxy answers, then the close
            finally:
                client.close()
            record = await finished.next()
            assert record.outcome != "ok", (record.outcome, record.error)
            await still_serving(port, ca)
    assert [s.target for s in backend.requests] == [b"/still-here"]


async def s_client_renegotiate(port: int, cafile: Path) -> tuple[str, bool]:
    """``openssl s_client -tls1_2 -msg`` that asks for a renegotiation ("R") once connected;
    returns what it printed and whether it ended by itself (in a few seconds)."""
    proc = await asyncio.create_subprocess_exec(
        require_tool("openssl"), "s_client", "-connect", f"{LOOPBACK}:{port}", "-tls1_2", "-msg",
        "-servername", "site.test", "-CAfile", str(cafile),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    seen = b""
    try:
        while b"Verify return code" not in seen:  # the session summary: the handshake is done
            line = await asyncio.wait_for(proc.stdout.readline(), WAIT)
            assert line, seen.decode(errors="replace")
            seen += line
        proc.stdin.write(b"R\n")
        await proc.stdin.drain()
        with contextlib.suppress(TimeoutError):
            seen += await asyncio.wait_for(proc.stdout.read(), WAIT)
            await asyncio.wait_for(proc.wait(), WAIT)
        on_its_own = proc.returncode is not None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        seen += await asyncio.wait_for(proc.stdout.read(), WAIT)
        await asyncio.wait_for(proc.wait(), WAIT)
    return seen.decode(errors="replace"), on_its_own


@async_test(60)
async def test_a_tls_1_2_renegotiation_is_refused_and_the_proxy_stays_up(
    ca: TestCA, site: CertPair, tmp_path: Path
) -> None:
    cafile = tmp_path / "ca.pem"
    cafile.write_text(ca.pem)
    async with RecordingBackend() as backend:
        port = free_port()
        async with proxy([tls_route(port, backend.port, site)]):
            text, on_its_own = await s_client_renegotiate(port, cafile)
            assert on_its_own, f"the renegotiation neither failed nor ended the session:\n{text}"
            assert "RENEGOTIATING" in text, text
            hellos = re.findall(r"^<<< .*Handshake .*, ServerHello$", text, re.MULTILINE)
            assert len(hellos) == 1, f"a second handshake was answered:\n{text}"
            await still_serving(port, ca)


# -- 9, 10: half-close, slow and silent handshakes --------------------------------------------


@pytest.mark.parametrize("how", ["close-notify", "close-notify-and-fin"])
@async_test()
async def test_a_client_that_ends_its_side_after_the_request_still_gets_the_whole_answer(
    how: str, ca: TestCA, site: CertPair
) -> None:
    body = os.urandom(300 * 1024)
    late = Reply(b"", then=b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    async with RecordingBackend({0: late}) as backend:
        port = free_port()
        async with proxy([tls_route(port, backend.port, site)]):
            client = await TlsClient.open(port, ca.client_context())
            try:
                await client.send(get("/half"), half_close=True)
                if how == "close-notify-and-fin":
                    client.sock.shutdown(socket.SHUT_WR)
                await asyncio.sleep(0.2)  # the client's end is there well before the answer
                backend.resume.set()
                response = await client.response()
                assert response is not None, "closed without an answer"
                assert response.status == 200 and response.complete
                assert response.body == body
            finally:
                client.close()
    assert [s.target for s in backend.requests] == [b"/half"]


@async_test()
async def test_a_client_hello_in_three_slow_pieces_completes_and_silence_is_closed(
    ca: TestCA, site: CertPair, finished: Finished
) -> None:
    async with RecordingBackend() as backend:
        port = free_port()
        async with proxy([tls_route(port, backend.port, site)], initial_data_timeout=0.5):
            client = await TlsClient.open(port, ca.client_context(), pieces=3, gap=0.05)
            try:
                response = await exchange(client, get("/slow-hello"))
                assert (response.status, response.body) == (200, b"GET /slow-hello")
            finally:
                client.close()
            assert (await finished.next()).outcome == "ok"
            silent = await RawClient.connect(port)
            try:
                loop = asyncio.get_running_loop()
                started = loop.time()
                await ended(silent)  # closed with nothing sent
                waited = loop.time() - started
            finally:
                silent.close()
            assert 0.3 < waited < 3, f"closed after {waited:.2f}s"
            assert (await finished.next()).outcome != "ok"
    assert [s.target for s in backend.requests] == [b"/slow-hello"]


# -- 11: the proxy's own answers over TLS -----------------------------------------------------


def auth(user: str, password: str) -> str:
    return "Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@async_test()
async def test_404_and_401_over_tls_keep_the_connection_and_credentials_get_200(
    ca: TestCA, site: CertPair, lane_only: list[int]
) -> None:
    # A path condition cannot match a ClientHello (no path yet): the pathless route takes the
    # TLS connection, and then every request is routed on its own, by Host and path.
    guarded = {"basic_auth": {"users": {"alice": "secret"}, "realm": "staff"}}
    async with RecordingBackend() as backend:
        port = free_port()
        routes = [
            tls_route(
                port, backend.port, site, name="private", path="/private/*", security=guarded
            ),
            tls_route(port, backend.port, site, name="app", path="/app/*"),
            tls_route(port, backend.port, site),
        ]
        async with proxy(routes):
            client = await TlsClient.open(port, ca.client_context())
            try:
                response = await exchange(client, get("/other", host="nowhere.test"))
                assert response.status == 404, response.summary()
                assert "close" not in response.tokens("connection")
                response = await exchange(client, get("/app/x"))
                assert (response.status, response.body) == (200, b"GET /app/x")
                response = await exchange(client, get("/private/x"))
                assert response.status == 401, response.summary()
                assert "staff" in (response.header("www-authenticate") or ""), response.summary()
            finally:
                client.close()
            client = await TlsClient.open(port, ca.client_context())
            try:
                response = await exchange(client, get("/private/x", auth("alice", "secret")))
                assert (response.status, response.body) == (200, b"GET /private/x")
            finally:
                client.close()
    assert [s.target for s in backend.requests] == [b"/app/x", b"/private/x"]
    assert lane_only == [], LANE


# -- 12: a graceful stop ----------------------------------------------------------------------


@async_test()
async def test_a_graceful_stop_closes_an_idle_kept_alive_tls_client_promptly(
    ca: TestCA, site: CertPair
) -> None:
    async with RecordingBackend() as backend:
        port = free_port()
        server = proxy([tls_route(port, backend.port, site)], graceful_shutdown_timeout=20)
        await server.start()
        client = None
        try:
            client = await TlsClient.open(port, ca.client_context())
            response = await exchange(client, get("/idle"))
            assert response.status == 200 and "close" not in response.tokens("connection")
            loop = asyncio.get_running_loop()
            started = loop.time()
            stopping = asyncio.create_task(server.stop())
            await ended(client)  # the session ends at once, not after the grace period
            try:  # and the TCP connection with it, whether the client answers close_notify or not
                with contextlib.suppress(ConnectionResetError):
                    while await asyncio.wait_for(loop.sock_recv(client.sock, 1 << 16), 2):
                        pass
            except TimeoutError:
                raise AssertionError("the TCP connection stayed open after the session") from None
            assert loop.time() - started < 2
            await asyncio.wait_for(stopping, 5)
            assert loop.time() - started < 2.5, "stop() waited for an idle client"
        finally:
            if client is not None:
                client.close()
            await server.stop()
