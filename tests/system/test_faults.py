"""Fault suite: backends and clients that misbehave, on a TCP forward and an HTTP reverse proxy.

Every test checks three things: what the client sees, that the proxy still serves on the same
port afterwards, and (with ``settled``) that the fault left no connection, connection task,
file descriptor or asyncio task behind. Backends are asyncio servers in the test's own loop,
so their sockets and handler tasks count in the leak check too: a backend connection the
proxy forgets to close shows up as a leak.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from leaks import rss_bytes, settled
from support import (
    LOOPBACK,
    MIB,
    PARTIAL,
    Connection,
    Notes,
    ScriptedBackend,
    async_test,
    echo_handler,
    flushed,
    free_port,
    read_to_end,
    reset,
    serve,
)

from smartroute import SmartRoute
from smartroute.protocols.http_response import ResponseHead, parse_response_head

FAST = {"connect_timeout": 1, "initial_data_timeout": 2}


# -- helpers: sockets ----------------------------------------------------------------------


async def read_body_until(
    reader: asyncio.StreamReader, marker: bytes, timeout: float = 10
) -> bytes:
    """Read until the data ends with ``marker`` (a complete body) or the connection ends."""
    data = bytearray()
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(timeout):
            while not data.endswith(marker) and (chunk := await reader.read(65536)):
                data += chunk
    return bytes(data)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


@contextlib.asynccontextmanager
async def connect(port: int) -> AsyncIterator[Connection]:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        yield reader, writer
    finally:
        await close(writer)


async def echo_works(port: int) -> None:
    """The proxy still forwards on ``port``: a payload comes back whole from the echo backend."""
    payload = b"still serving " * 1000
    async with connect(port) as (reader, writer):
        writer.write(payload)
        writer.write_eof()
        data, was_reset = await read_to_end(reader)
    assert (data, was_reset) == (payload, False)


async def drain_to_end(reader: asyncio.StreamReader) -> tuple[int, str]:
    """Read until the peer is gone: (bytes read, "eof" or "reset")."""
    count = 0
    try:
        while chunk := await reader.read(65536):
            count += len(chunk)
    except ConnectionError:
        return count, "reset"
    return count, "eof"


def tcp_route(port: int, target: int) -> dict[str, Any]:
    return {
        "name": "tcp",
        "match": {"ports": port},
        "action": {
            "type": "forward",
            "protocol": "tcp",
            "targets": [{"host": LOOPBACK, "port": target}],
        },
    }


@contextlib.asynccontextmanager
async def tcp_proxy(**settings: Any) -> AsyncIterator[tuple[SmartRoute, int, ScriptedBackend]]:
    """A TCP forward on a fresh port to a scripted backend: (proxy, port, backend)."""
    backend = ScriptedBackend()
    async with serve(backend.handle) as target:
        port = free_port()
        options = {**FAST, **settings}
        async with SmartRoute([tcp_route(port, target)], bind_address=LOOPBACK, **options) as p:
            yield p, port, backend


# -- helpers: HTTP -------------------------------------------------------------------------


class HttpBackend(Notes):
    """A raw HTTP/1.1 backend that misbehaves on purpose, by request path.

    ``/ok`` answers ``ok`` and closes (so no backend connection is left in the proxy's pool
    when a leak check runs); every other path is a fault. ``ended`` records how the fault
    paths that watch their connection saw it end.
    """

    BIG = 50 * MIB

    def __init__(self) -> None:
        super().__init__()
        self.progress = {"sent": 0}  # of /flood

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            await self.answer(head, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def answer(
        self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        path = head.split(b" ", 2)[1].decode()
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if path == "/ok":
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
            await flushed(writer)
        elif path == "/reset-head":
            reset(writer)
        elif path in ("/reset-body", "/close-body"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + PARTIAL)
            await flushed(writer)
            if path == "/reset-body":
                reset(writer)
        elif path == "/reset-until-close":  # a body framed by closing, cut by a reset
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + PARTIAL)
            await flushed(writer)
            reset(writer)
        elif path == "/cut-chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(b"%x\r\n%s\r\n" % (len(PARTIAL), PARTIAL))
            await flushed(writer)
        elif path == "/stall-body":  # part of the body, then nothing
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + PARTIAL)
            await flushed(writer)
            self.note(await _watch(reader))
        elif path == "/late":  # answers after a while
            await asyncio.sleep(0.3)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nlate\n")
            await flushed(writer)
        elif path == "/hang":
            self.note(await _watch(reader))
        elif path == "/flood":  # Content-Length, then FLOOD_BLOCKS pattern blocks
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                % (FLOOD_BLOCKS * MIB)
            )
            await flood(writer, self.progress)
        elif path == "/big":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.BIG)
            self.note(await _send(writer, self.BIG))
        elif path == "/upload":
            received = 0
            try:
                while received < length:
                    chunk = await reader.read(min(65536, length - received))
                    if not chunk:
                        break
                    received += len(chunk)
            except ConnectionError:
                self.note(f"reset after {received}")
                return
            if received < length:
                self.note(f"eof after {received}")
                return
            self.note("complete")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await flushed(writer)


async def _watch(reader: asyncio.StreamReader) -> str:
    """Never answer; return how the connection ended ("eof" or "reset")."""
    return (await drain_to_end(reader))[1]


async def _send(writer: asyncio.StreamWriter, total: int) -> str:
    """Send ``total`` bytes; "complete", or "failed after N" when the peer went away."""
    block, sent = b"d" * MIB, 0
    try:
        while sent < total:
            writer.write(block)
            await writer.drain()
            sent += len(block)
    except ConnectionError:
        return f"failed after {sent}"
    return "complete"


def http_routes(port: int, live: int, dead: int) -> list[dict[str, Any]]:
    """``/dead/*`` goes to a port where nothing listens, everything else to ``live``."""

    def route(name: str, target: int, **match: Any) -> dict[str, Any]:
        return {
            "name": name,
            "match": {"ports": port, **match},
            "action": {
                "type": "forward",
                "protocol": "http",
                "targets": [{"host": LOOPBACK, "port": target}],
            },
        }

    return [route("dead", dead, path="/dead/*"), route("live", live)]


@contextlib.asynccontextmanager
async def http_proxy(**settings: Any) -> AsyncIterator[tuple[SmartRoute, int, HttpBackend]]:
    backend = HttpBackend()
    async with serve(backend.handle) as live:
        port, dead = free_port(), free_port()
        options = {**FAST, **settings}
        routes = http_routes(port, live, dead)
        async with SmartRoute(routes, bind_address=LOOPBACK, **options) as proxy:
            yield proxy, port, backend


def request(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: faults.test\r\n{extra}\r\n".encode()


async def read_head(
    reader: asyncio.StreamReader, timeout: float = 10
) -> tuple[ResponseHead, bytes]:
    """A response head and the body bytes that arrived with it."""
    buffer = b""
    async with asyncio.timeout(timeout):
        while (head := parse_response_head(buffer)) is None:
            chunk = await reader.read(65536)
            assert chunk, f"connection closed before a response head: {buffer!r}"
            buffer += chunk
    return head, buffer[head.length :]


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """A whole Content-Length response: (status, body)."""
    head, body = await read_head(reader)
    length = int(head.header("content-length") or 0)
    return head.status, body + await asyncio.wait_for(reader.readexactly(length - len(body)), 10)


async def http_ok(port: int, connection: Connection | None = None) -> None:
    """GET /ok answers 200 ``ok`` (on a new connection, or on the one given)."""
    if connection is None:
        async with connect(port) as opened:
            await http_ok(port, opened)
        return
    reader, writer = connection
    writer.write(request("/ok"))
    assert await read_response(reader) == (200, b"ok\n")


# -- backend refuses -----------------------------------------------------------------------


@async_test(timeout=30)
async def test_tcp_backend_refuses_client_is_closed_without_data() -> None:
    dead = free_port()
    port = free_port()
    async with SmartRoute([tcp_route(port, dead)], bind_address=LOOPBACK, **FAST) as proxy:
        async with settled(proxy):
            async with connect(port) as (reader, writer):
                writer.write(b"hello?")
                data, _ = await read_to_end(reader)
                assert data == b""
        # The same route works again as soon as something listens on its target.
        async with serve(echo_handler, port=dead):
            await echo_works(port)


@async_test(timeout=30)
async def test_http_backend_refuses_502_and_the_connection_stays_usable() -> None:
    async with http_proxy() as (proxy, port, _):
        async with settled(proxy):
            async with connect(port) as (reader, writer):
                writer.write(request("/dead/x"))
                status, body = await read_response(reader)
                assert status == 502, body
                await http_ok(port, (reader, writer))  # same kept-alive client connection
        await http_ok(port)


# -- backend resets mid-stream -------------------------------------------------------------


@async_test(timeout=30)
async def test_tcp_backend_reset_midstream_client_gets_partial_bytes_then_end() -> None:
    async def send_then_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(PARTIAL)
        await flushed(writer)
        reset(writer)

    async with tcp_proxy() as (proxy, port, backend):
        backend.script.append(send_then_reset)
        async with settled(proxy):
            async with connect(port) as (reader, writer):
                data, _ = await read_to_end(reader)
        assert data == PARTIAL
        await echo_works(port)


@async_test(timeout=30)
async def test_http_backend_reset_before_the_head_is_502() -> None:
    async with http_proxy() as (proxy, port, _):
        async with settled(proxy):
            async with connect(port) as (reader, writer):
                writer.write(request("/reset-head"))
                status, body = await read_response(reader)
                assert status == 502, body
        await http_ok(port)


@pytest.mark.parametrize("path", ["/reset-body", "/close-body"])
@async_test(timeout=30)
async def test_http_backend_cut_mid_body_client_never_sees_a_complete_response(
    path: str,
) -> None:
    async with http_proxy() as (proxy, port, _):
        async with settled(proxy):
            async with connect(port) as (reader, writer):
                writer.write(request(path))
                head, body = await read_head(reader)
                rest, _ = await read_to_end(reader)
        body += rest
        assert head.status == 200
        assert head.header("content-length") == "100000"
        # What the backend sent arrives, then the connection ends short of the length.
        assert body == PARTIAL
        await http_ok(port)


@async_test(timeout=30)
async def test_http_backend_reset_in_a_body_framed_by_closing_is_not_a_complete_response() -> None:
    # The backend frames its body by closing; an HTTP/1.1 client gets it chunked. A reset is
    # not a close: the client must not receive the last chunk that says the body is whole.
    async with http_proxy() as (proxy, port, _):
        async with settled(proxy):
            async with connect(port) as (reader, writer):
                writer.write(request("/reset-until-close"))
                head, body = await read_head(reader)
                body += await read_body_until(reader, b"\r\n0\r\n\r\n")
        assert head.status == 200
        assert (head.header("transfer-encoding") or "").lower() == "chunked"
        assert body == b"%x\r\n%s\r\n" % (len(PARTIAL), PARTIAL), "not a cut chunked body"
        await http_ok(port)


@async_test(timeout=30)
async def test_http_backend_closes_inside_a_chunked_body_client_gets_no_last_chunk() -> None:
    async with http_proxy() as (proxy, port, _):
        async with settled(proxy):
            async with connect(port) as (reader, writer):
                writer.write(request("/cut-chunked"))
                head, body = await read_head(reader)
                rest, _ = await read_to_end(reader)
        body += rest
        assert head.status == 200
        assert body == b"%x\r\n%s\r\n" % (len(PARTIAL), PARTIAL)  # no "0\r\n\r\n"
        await http_ok(port)


# -- backend accepts, then never answers ---------------------------------------------------


@async_test(timeout=30)
async def test_tcp_silent_backend_is_closed_after_idle_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backend.note(await _watch(reader))

    async with tcp_proxy(idle_timeout=0.5) as (proxy, port, backend):
        backend.script.append(silent)
        async with settled(proxy):
            async with connect(port) as (reader, writer):
                writer.write(b"anyone there?")
                started = time.monotonic()
                data, _ = await read_to_end(reader)
                waited = time.monotonic() - started
            assert data == b""
            assert 0.4 <= waited < 8, waited
            assert await backend.outcome() in ("eof", "reset")  # the backend side is closed too
        await echo_works(port)


@async_test(timeout=30)
async def test_http_silent_backend_is_504_after_backend_timeout() -> None:
    async with http_proxy(backend_timeout=0.5) as (proxy, port, backend):
        async with settled(proxy):
            async with connect(port) as (reader, writer):
                writer.write(request("/hang"))
                started = time.monotonic()
                status, body = await read_response(reader)
                waited = time.monotonic() - started
                assert status == 504, body
                assert 0.4 <= waited < 8, waited
                assert await backend.outcome() in ("eof", "reset")
                await http_ok(port, (reader, writer))
        await http_ok(port)


@async_test(timeout=30)
async def test_http_client_reset_while_the_backend_thinks_frees_everything() -> None:
    # backend_timeout is long: the proxy must notice the client is gone, not wait it out.
    async with http_proxy(backend_timeout=60) as (proxy, port, backend):
        async with settled(proxy):
            async with connect(port) as (reader, writer):
                writer.write(request("/hang"))
                await asyncio.sleep(0.3)
                reset(writer)
            assert await backend.outcome() in ("eof", "reset")
        await http_ok(port)


@async_test(timeout=30)
async def test_http_client_reset_while_the_body_stalls_frees_everything() -> None:
    # Nothing moves and no timeout is near: only the client's reset can end this exchange.
    async with http_proxy(backend_timeout=60) as (proxy, port, backend):
        async with settled(proxy):
            async with connect(port) as (reader, writer):
                writer.write(request("/stall-body"))
                head, body = await read_head(reader)
                body += await asyncio.wait_for(reader.readexactly(len(PARTIAL) - len(body)), 10)
                assert (head.status, body) == (200, PARTIAL)
                reset(writer)
            assert await backend.outcome() in ("eof", "reset")
        await http_ok(port)


@async_test(timeout=30)
async def test_http_client_half_close_after_the_request_still_gets_the_answer() -> None:
    async with http_proxy() as (proxy, port, _):
        async with settled(proxy):
            async with connect(port) as (reader, writer):
                writer.write(request("/late"))
                writer.write_eof()
                assert await read_response(reader) == (200, b"late\n")
                assert await read_to_end(reader) == (b"", False)  # then the proxy closes
        await http_ok(port)


# -- backend closes half-way ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["write_eof", "close"])
@async_test(timeout=30)
async def test_tcp_backend_closes_half_way_client_gets_exactly_the_bytes_then_eof(
    how: str,
) -> None:
    async def send_then_stop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(PARTIAL)
        if how == "write_eof":
            writer.write_eof()
            await drain_to_end(reader)
        else:
            await flushed(writer)

    async with tcp_proxy() as (proxy, port, backend):
        backend.script.append(send_then_stop)
        async with settled(proxy):
            async with connect(port) as (reader, writer):
                assert await read_to_end(reader) == (PARTIAL, False)
        await echo_works(port)


# -- half-close in each direction ----------------------------------------------------------


@async_test(timeout=30)
async def test_tcp_client_half_close_backend_sees_eof_and_still_answers() -> None:
    async def count_then_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        count, how = await drain_to_end(reader)
        writer.write(f"got {count} bytes after {how}".encode())
        await flushed(writer)

    async with tcp_proxy() as (proxy, port, backend):
        backend.script.append(count_then_answer)
        async with settled(proxy):
            async with connect(port) as (reader, writer):
                writer.write(b"q" * 300_000)
                writer.write_eof()
                assert await read_to_end(reader) == (b"got 300000 bytes after eof", False)
        await echo_works(port)


@async_test(timeout=30)
async def test_tcp_backend_half_close_client_sees_eof_and_can_still_send() -> None:
    heard: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def banner_then_listen(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"banner")
        writer.write_eof()
        heard.set_result(await reader.read())

    async with tcp_proxy() as (proxy, port, backend):
        backend.script.append(banner_then_listen)
        async with settled(proxy):
            async with connect(port) as (reader, writer):
                assert await read_to_end(reader) == (b"banner", False)
                writer.write(b"x" * 200_000 + b"after your eof")
                writer.write_eof()
                got = await asyncio.wait_for(heard, 10)
                assert got == b"x" * 200_000 + b"after your eof"
                assert await read_to_end(reader) == (b"", False)
        await echo_works(port)


# -- client aborts mid-upload and mid-download ---------------------------------------------


async def abort(writer: asyncio.StreamWriter, how: str) -> None:
    if how == "reset":
        reset(writer)
    else:
        await close(writer)


@pytest.mark.parametrize("how", ["close", "reset"])
@async_test(timeout=30)
async def test_tcp_client_aborts_mid_upload_backend_connection_closes(how: str) -> None:
    async def tally(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        count, ended = await drain_to_end(reader)
        backend.note(f"{count} {ended}")

    async with tcp_proxy() as (proxy, port, backend):
        backend.script.append(tally)
        async with settled(proxy):
            async with connect(port) as (reader, writer):
                writer.write(b"u" * (4 * MIB))
                await flushed(writer)
                await abort(writer, how)
            received, ended = (await backend.outcome()).split()
            assert ended in ("eof", "reset")
            assert int(received) <= 4 * MIB
        await echo_works(port)


@pytest.mark.parametrize("how", ["close", "reset"])
@async_test(timeout=30)
async def test_http_client_aborts_mid_upload_backend_connection_closes(how: str) -> None:
    async with http_proxy() as (proxy, port, backend):
        async with settled(proxy):
            async with connect(port) as (reader, writer):
                size = 64 * MIB
                writer.write(
                    request("/upload", f"Content-Length: {size}\r\n").replace(b"GET", b"POST")
                )
                writer.write(b"u" * (4 * MIB))
                await flushed(writer)
                await abort(writer, how)
            outcome = await backend.outcome()
            assert outcome.startswith(("eof after", "reset after")), outcome
            assert int(outcome.rsplit(" ", 1)[1]) <= 4 * MIB
        await http_ok(port)


@pytest.mark.parametrize("how", ["close", "reset"])
@async_test(timeout=30)
async def test_tcp_client_aborts_mid_download_backend_connection_closes(how: str) -> None:
    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backend.note(await _send(writer, 50 * MIB))

    async with tcp_proxy() as (proxy, port, backend):
        backend.script.append(big)
        async with settled(proxy):
            async with connect(port) as (reader, writer):
                await asyncio.wait_for(reader.readexactly(MIB), 10)
                await abort(writer, how)
            outcome = await backend.outcome()
            assert outcome.startswith("failed after"), outcome
        await echo_works(port)


@pytest.mark.parametrize("how", ["close", "reset"])
@async_test(timeout=30)
async def test_http_client_aborts_mid_download_backend_connection_closes(how: str) -> None:
    async with http_proxy() as (proxy, port, backend):
        async with settled(proxy):
            async with connect(port) as (reader, writer):
                writer.write(request("/big"))
                head, _ = await read_head(reader)
                assert head.status == 200
                await asyncio.wait_for(reader.readexactly(MIB), 10)
                await abort(writer, how)
            outcome = await backend.outcome()
            assert outcome.startswith("failed after"), outcome
        await http_ok(port)


# -- slow reader ---------------------------------------------------------------------------

FLOOD_BLOCKS = 256  # of 1 MiB


@functools.cache
def pattern_block() -> bytes:
    """1 MiB that is not a repetition of anything shorter than 32 bytes (catches reordering)."""
    return b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(MIB // 32))


async def flood(writer: asyncio.StreamWriter, progress: dict[str, int]) -> None:
    """Send FLOOD_BLOCKS pattern blocks as fast as the peer takes them, counting in ``progress``."""
    block = pattern_block()
    for _ in range(FLOOD_BLOCKS):
        writer.write(block)
        await writer.drain()
        progress["sent"] += len(block)
    await flushed(writer)


async def read_slowly(reader: asyncio.StreamReader, first: bytes, progress: dict[str, int]) -> None:
    """Trickle, pause, then read to the end; memory bounded, and the bytes exactly the flood's.

    ``first`` is what already arrived (after an HTTP head). During the pause the sender must be
    held back by backpressure, and the process's RSS must not grow by what it sends.
    """
    baseline = peak = rss_bytes()
    expected = hashlib.sha256()
    for _ in range(FLOOD_BLOCKS):
        expected.update(pattern_block())
    got = hashlib.sha256(first)
    received = len(first)
    for _ in range(40):  # a trickle: small reads with short sleeps
        data = await asyncio.wait_for(reader.read(4096), 10)
        assert data
        got.update(data)
        received += len(data)
        await asyncio.sleep(0.01)
    await asyncio.sleep(1.5)  # then a long pause
    peak = max(peak, rss_bytes())
    assert progress["sent"] < 64 * MIB, f"the sender was not held back: {progress}"
    total = FLOOD_BLOCKS * MIB
    while received < total and (data := await asyncio.wait_for(reader.read(1 << 18), 10)):
        got.update(data)
        received += len(data)
        if received % (16 * MIB) < len(data):
            peak = max(peak, rss_bytes())
    assert received == total
    assert got.hexdigest() == expected.hexdigest(), "the bytes differ from what was sent"
    assert peak - baseline < 64 * MIB, f"RSS grew by {(peak - baseline) / MIB:.0f} MiB"


@async_test(timeout=60)
async def test_tcp_slow_reader_memory_stays_bounded_and_bytes_arrive_exactly() -> None:
    pattern_block()
    progress = {"sent": 0}

    async def flooder(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await flood(writer, progress)

    async with tcp_proxy() as (proxy, port, backend):
        backend.script.append(flooder)
        async with settled(proxy, timeout=10):
            async with connect(port) as (reader, writer):
                await read_slowly(reader, b"", progress)
                assert await read_to_end(reader) == (b"", False)
        await echo_works(port)


@async_test(timeout=60)
async def test_http_slow_reader_memory_stays_bounded_and_bytes_arrive_exactly() -> None:
    pattern_block()
    async with http_proxy() as (proxy, port, backend):
        async with settled(proxy, timeout=10):
            async with connect(port) as (reader, writer):
                writer.write(request("/flood"))
                head, first = await read_head(reader)
                assert head.status == 200
                assert head.header("content-length") == str(FLOOD_BLOCKS * MIB)
                await read_slowly(reader, first, backend.progress)
        await http_ok(port)
