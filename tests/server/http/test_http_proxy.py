"""The HTTP layer end to end: real clients (curl, raw sockets) -> proxy -> real backends."""

from __future__ import annotations

import asyncio
import json
import os
import resource
from typing import Any

from http_backend import Backend, http_backend, unused_port
from support import LOOPBACK, async_test, curl, free_port, nginx_server

from smartroute import SmartRoute
from smartroute.protocols.http_response import ResponseHead, parse_response_head


def http_route(port: int, backend: int, *, name: str, **match: Any) -> dict[str, Any]:
    return {
        "name": name,
        "match": {"ports": port, **match},
        "action": {
            "type": "forward",
            "targets": [{"host": LOOPBACK, "port": backend}],
            "protocol": "http",
        },
    }


def proxy(routes: list[dict[str, Any]], **settings: Any) -> SmartRoute:
    settings.setdefault("bind_address", LOOPBACK)
    settings.setdefault("initial_data_timeout", 5)
    return SmartRoute(routes, **settings)


async def read_response(reader: asyncio.StreamReader) -> tuple[ResponseHead, bytes]:
    """One response (Content-Length, chunked or until close), with a test-only reader that
    never reads past it (pipelined responses may arrive in one segment)."""
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    head = parse_response_head(raw)
    assert head is not None and head.length == len(raw), f"not a response head: {raw!r}"
    length = head.header("content-length")
    if length is not None:
        return head, await asyncio.wait_for(reader.readexactly(int(length)), 10)
    if (head.header("transfer-encoding") or "").lower() == "chunked":
        body = b""
        while True:
            line = await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)
            size = int(line[:-2], 16)
            chunk = await asyncio.wait_for(reader.readexactly(size + 2), 10)
            body += chunk[:size]
            if size == 0:
                return head, body
    if head.status in (101, 204, 304):
        return head, b""
    return head, await asyncio.wait_for(reader.read(), 10)


async def exchange(port: int, request: bytes) -> tuple[ResponseHead, bytes]:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(request)
    try:
        return await read_response(reader)
    finally:
        writer.close()


def described(body: bytes) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(body)
    info["header_map"] = {k.lower(): v for k, v in info["headers"]}
    return info


@async_test()
async def test_each_request_on_one_kept_alive_connection_is_routed_on_its_own() -> None:
    with http_backend("api") as api, http_backend("web") as web:
        port = free_port()
        routes = [
            http_route(port, api.port, name="api", path="/api/*"),
            http_route(port, web.port, name="web"),
        ]
        async with proxy(routes):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            seen = []
            for path in ("/api/users", "/index.html", "/api", "/about"):
                writer.write(f"GET {path} HTTP/1.1\r\nHost: site.test\r\n\r\n".encode())
                head, body = await read_response(reader)
                assert head.status == 200
                seen.append((described(body)["backend"], described(body)["path"]))
            writer.close()
    assert seen == [
        ("api", "/api/users"),
        ("web", "/index.html"),
        ("api", "/api"),
        ("web", "/about"),
    ]


@async_test()
async def test_curl_reuses_the_connection_for_two_urls_routed_by_host() -> None:
    with http_backend("one") as one, http_backend("two") as two:
        port = free_port()
        routes = [
            http_route(port, one.port, name="one", domains="one.test"),
            http_route(port, two.port, name="two", domains="two.test"),
        ]
        async with proxy(routes):
            code, out, err = await curl(
                "-v", f"http://{LOOPBACK}:{port}/a", f"http://{LOOPBACK}:{port}/b",
                "-H", "Host: one.test",
            )  # fmt: skip
            assert code == 0, err
            assert "Re-using existing connection" in err or "Reusing existing" in err
            assert out.count('"backend": "one"') == 2
            code, out, _ = await curl(f"http://{LOOPBACK}:{port}/x", "-H", "Host: TWO.test.")
            assert '"backend": "two"' in out


@async_test()
async def test_forwarding_headers_are_appended_and_hop_by_hop_headers_dropped() -> None:
    with http_backend() as backend:
        port = free_port()
        async with proxy([http_route(port, backend.port, name="b")]):
            head, body = await exchange(
                port,
                b"GET /h HTTP/1.1\r\nHost: Site.Test:8080\r\nX-Forwarded-For: 203.0.113.7\r\n"
                b"X-Forwarded-Proto: https\r\nForwarded: for=203.0.113.7\r\n"
                b"Connection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\n"
                b"Proxy-Connection: keep-alive\r\nTE: trailers\r\nX-Kept: yes\r\n\r\n",
            )
    headers = described(body)["header_map"]
    assert head.status == 200
    assert headers["host"] == "Site.Test:8080"  # preserved
    assert headers["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"  # ours, not the client's claim
    assert headers["x-forwarded-host"] == "Site.Test:8080"
    assert headers["forwarded"] == 'for=203.0.113.7, for=127.0.0.1;proto=http;host="Site.Test:8080"'
    assert headers["x-kept"] == "yes"
    for dropped in ("x-secret", "keep-alive", "proxy-connection", "te"):
        assert dropped not in headers


@async_test()
async def test_request_bodies_with_length_chunked_and_expect_continue() -> None:
    with http_backend() as backend:
        port = free_port()
        payload = os.urandom(3 * 1024 * 1024)
        async with proxy([http_route(port, backend.port, name="b")]):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write(
                b"POST /len HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(payload)
            )
            writer.write(payload)
            head, body = await read_response(reader)
            assert described(body)["body_length"] == len(payload)
            writer.write(b"PUT /chunks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            for piece in (payload[:1000], payload[1000:70000], payload[70000:]):
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            writer.write(b"0\r\n\r\n")
            head, body = await read_response(reader)
            info = described(body)
            assert info["body_length"] == len(payload) and info["method"] == "PUT"
            writer.close()
            # curl sends Expect: 100-continue for large bodies and waits for the 100.
            path = f"/tmp/smartroute-body-{port}"
            with open(path, "wb") as file:
                file.write(payload)
            try:
                code, out, err = await curl(
                    "-v", "-H", "Expect: 100-continue", "--data-binary", f"@{path}",
                    f"http://{LOOPBACK}:{port}/upload",
                )  # fmt: skip
            finally:
                os.unlink(path)
            assert code == 0, err
            assert "HTTP/1.1 100 Continue" in err
            assert json.loads(out)["body_length"] == len(payload)


@async_test()
async def test_pipelined_requests_are_answered_in_order() -> None:
    with http_backend("p") as backend:
        port = free_port()
        async with proxy([http_route(port, backend.port, name="p")]):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write(
                b"".join(f"GET /{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(5))
            )
            paths = [described((await read_response(reader))[1])["path"] for _ in range(5)]
            writer.close()
    assert paths == ["/0", "/1", "/2", "/3", "/4"]


@async_test()
async def test_http10_head_chunked_and_close_framed_responses() -> None:
    with http_backend() as backend:
        port = free_port()
        async with proxy([http_route(port, backend.port, name="b")]):
            code, out, err = await curl("--http1.0", "-v", f"http://{LOOPBACK}:{port}/old")
            assert code == 0 and json.loads(out)["path"] == "/old"
            assert "HTTP/1.1 200" in err or "HTTP/1.0 200" in err
            code, out, err = await curl("-I", f"http://{LOOPBACK}:{port}/head")
            assert code == 0 and out.startswith("HTTP/1.1 200") and "Content-Length:" in out
            head, body = await exchange(port, b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n")
            assert head.header("transfer-encoding") == "chunked" and body == b"first second third\n"
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write(b"GET /until-close HTTP/1.1\r\nHost: x\r\n\r\n")
            head, body = await read_response(reader)
            assert body == b"body framed by closing\n"  # re-chunked for the 1.1 client
            writer.write(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
            head, body = await read_response(reader)  # and the client connection stays usable
            assert described(body)["path"] == "/after"
            writer.close()


@async_test()
async def test_error_answers_400_431_404_502_504() -> None:
    dead = unused_port()
    with http_backend() as backend:
        port = free_port()
        routes = [
            http_route(port, backend.port, name="b", domains="ok.test"),
            http_route(port, dead, name="dead", domains="dead.test"),
        ]
        async with proxy(routes, backend_timeout=0.5, connect_timeout=2):
            head, body = await exchange(port, b"GET / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n")
            assert head.status == 404 and b"no route" in body
            head, body = await exchange(port, b"GET / HTTP/1.1\r\nHost: dead.test\r\n\r\n")
            assert head.status == 502 and b"unreachable" in body
            head, body = await exchange(
                port, b"GET /slow HTTP/1.1\r\nHost: ok.test\r\nX-Delay: 2\r\n\r\n"
            )
            assert head.status == 504 and b"did not answer" in body
            big = b"GET / HTTP/1.1\r\nHost: ok.test\r\n" + b"X-Pad: " + b"a" * 20000 + b"\r\n\r\n"
            head, body = await exchange(port, big)
            assert head.status == 431
            # A first request that is malformed only after the Host header routed it.
            head, body = await exchange(
                port, b"GET / HTTP/1.1\r\nHost: ok.test\r\nBad Header\r\n\r\n"
            )
            assert head.status == 400
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write(b"GET /one HTTP/1.1\r\nHost: ok.test\r\n\r\n")
            assert (await read_response(reader))[0].status == 200
            writer.write(b"GET /two HTTP/1.1\r\nHost: ok.test\r\nBad Header\r\n\r\n")
            head, body = await read_response(reader)
            assert head.status == 400 and head.header("connection") == "close"
            writer.close()


@async_test(90)
async def test_a_large_download_to_a_slow_reader_keeps_memory_bounded() -> None:
    size = 1 << 30  # 1 GiB
    with http_backend() as backend:
        port = free_port()
        async with proxy([http_route(port, backend.port, name="b")]):
            reader, writer = await asyncio.open_connection(LOOPBACK, port, limit=1 << 20)
            writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\nX-Size: %d\r\n\r\n" % size)
            head_bytes = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert b"Content-Length: %d" % size in head_bytes
            baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            received, next_pause = 0, 64 << 20
            while received < size:
                chunk = await asyncio.wait_for(reader.read(1 << 20), 20)
                assert chunk
                received += len(chunk)
                if received >= next_pause:  # a slow reader: stop for a while every 64 MiB
                    next_pause += 64 << 20
                    await asyncio.sleep(0.2)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            writer.close()
    assert received == size
    assert peak - baseline < 64 * 1024, f"RSS grew by {(peak - baseline) // 1024} MiB"


def _ws_frame(text: str) -> bytes:
    payload = text.encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


@async_test()
async def test_websocket_upgrade_is_tunnelled_both_ways_and_outlives_idle_timeouts() -> None:
    with http_backend("ws") as backend:
        port = free_port()
        routes = [http_route(port, backend.port, name="ws", path="/ws")]
        async with proxy(routes, http_keepalive_timeout=0.3, idle_timeout=0.6):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write(
                b"GET /ws HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            head_bytes = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            head = parse_response_head(head_bytes)
            assert head is not None and head.status == 101
            assert head.header("sec-websocket-accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
            for i in range(6):  # 6 x 0.25 s: longer than both timeouts, but never idle
                writer.write(_ws_frame(f"hello {i}"))
                reply = await asyncio.wait_for(reader.readexactly(2 + len(f"hello {i}")), 5)
                assert reply[2:] == f"HELLO {i}".encode()
                await asyncio.sleep(0.25)
            writer.write(bytes([0x88, 0x80]) + os.urandom(4))
            assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\x88\x00"
            writer.close()


@async_test()
async def test_nginx_backend_through_the_proxy(tmp_path: Any) -> None:
    port = free_port()
    root = tmp_path / "www"
    root.mkdir()
    (root / "hello.txt").write_text("hello from nginx\n")
    block = f"""root {root};
    location /echo-headers {{ return 200 "$http_x_forwarded_for $http_x_forwarded_proto\\n"; }}"""
    async with nginx_server(tmp_path, block) as backend_port:
        async with proxy([http_route(port, backend_port, name="nginx")]):
            code, out, err = await curl(
                f"http://{LOOPBACK}:{port}/hello.txt", f"http://{LOOPBACK}:{port}/echo-headers"
            )
            assert code == 0, err
            assert out == "hello from nginx\n127.0.0.1 http\n"


@async_test()
async def test_block_route_over_http_answers_403() -> None:
    port = free_port()
    route = {"match": {"ports": port, "path": "/admin/*"}, "action": {"type": "block"}}
    async with proxy([route]):
        head, body = await exchange(port, b"GET /admin/x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.status == 403 and head.header("connection") == "close"


def test_backend_helper_is_a_real_server() -> None:
    with http_backend("x") as backend:
        assert isinstance(backend, Backend) and backend.port > 0


@async_test()
async def test_backend_connections_are_kept_alive_and_reused() -> None:
    with http_backend("pooled") as backend:
        port = free_port()
        async with proxy([http_route(port, backend.port, name="b")]):
            for i in range(3):  # three separate client connections, one after another
                head, body = await exchange(port, f"GET /{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                assert head.status == 200
            backend_addresses = {tuple(described(body)["client"])}
    assert len(backend.connections) == 1, backend.connections
    assert backend_addresses == backend.connections


@async_test()
async def test_a_graceful_stop_tells_kept_alive_clients_to_go() -> None:
    """Stopping does not wait for kept-alive clients: one idle between requests is closed at
    once, one whose request is under way gets its answer with ``Connection: close``."""
    with http_backend("b") as backend:
        port = free_port()
        server = proxy([http_route(port, backend.port, name="b")], graceful_shutdown_timeout=20)
        await server.start()
        idle_reader, idle_writer = await asyncio.open_connection(LOOPBACK, port)
        busy_reader, busy_writer = await asyncio.open_connection(LOOPBACK, port)
        try:
            request = b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
            for reader, writer in ((idle_reader, idle_writer), (busy_reader, busy_writer)):
                writer.write(request)
                head, _ = await read_response(reader)
                assert head.status == 200 and head.header("connection") == "keep-alive"
            busy_writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Delay: 1\r\n\r\n")
            await asyncio.sleep(0.2)  # the slow request is with the backend now
            started = asyncio.get_running_loop().time()
            stopping = asyncio.create_task(server.stop())
            head, body = await read_response(busy_reader)
            assert (head.status, body, head.header("connection")) == (200, b"late\n", "close")
            assert await asyncio.wait_for(busy_reader.read(), 5) == b""
            assert await asyncio.wait_for(idle_reader.read(), 5) == b""
            await asyncio.wait_for(stopping, 10)
            assert asyncio.get_running_loop().time() - started < 5  # not the 20 s of grace
        finally:
            idle_writer.close()
            busy_writer.close()
            await server.stop()
