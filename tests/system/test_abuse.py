"""The abuse half of the fault and abuse suite: hostile clients against a real proxy on loopback.

Every test asserts what the abusive client sees, that the proxy still serves a normal client
on the same port afterwards, and (with :func:`leaks.settled`) that no connection, task or file
descriptor is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import resource
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from leaks import rss_bytes, settled
from support import FIXTURES, LOOPBACK, async_test, free_port

from smartroute import RouteContext, SmartRoute
from smartroute.routing.model import SocketHandler

HELLOS = FIXTURES / "clienthello"
HELLO = (HELLOS / "python.bin").read_bytes()  # one record, SNI python.example.test
CURL_HELLO = (HELLOS / "curl.bin").read_bytes()  # one record, SNI curl.example.test

# -- helpers -----------------------------------------------------------------------------------


def proxy(routes: list[dict[str, Any]], **settings: Any) -> SmartRoute:
    settings.setdefault("bind_address", LOOPBACK)
    return SmartRoute(routes, **settings)


def sni_route(port: int, backend: int) -> dict[str, Any]:
    """TLS passthrough by SNI: the proxy must peek at the ClientHello."""
    return {
        "name": "sni",
        "match": {"ports": port, "domains": ["*.example.test"]},
        "action": {
            "type": "forward",
            "targets": [{"host": LOOPBACK, "port": backend}],
            "tls": {"mode": "passthrough"},
        },
    }


def http_route(port: int, backend: int) -> dict[str, Any]:
    return {
        "name": "web",
        "match": {"ports": port},
        "action": {
            "type": "forward",
            "protocol": "http",
            "targets": [{"host": LOOPBACK, "port": backend}],
        },
    }


def handler_route(port: int, handler: SocketHandler) -> dict[str, Any]:
    return {
        "name": "handler",
        "match": {"ports": port},
        "action": {"type": "socket-handler", "socket_handler": handler},
    }


class Backend:
    """A loopback backend that records every connection and every byte it receives.

    ``http``: answer one request (head, then a Content-Length or complete chunked body) with
    ``200 ok`` and close; a request cut short gets no answer. Otherwise: echo until EOF.
    """

    OK = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"

    def __init__(self, *, http: bool = False) -> None:
        self.http = http
        self.received: list[bytearray] = []  # one per connection
        self.answered = 0  # HTTP requests received whole and answered

    @property
    def connections(self) -> int:
        return len(self.received)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = bytearray()
        self.received.append(data)
        try:
            if self.http:
                await self._answer_one(reader, writer, data)
            else:
                while chunk := await reader.read(65536):
                    data += chunk
                    writer.write(chunk)
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _answer_one(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytearray
    ) -> None:
        async def more() -> bool:
            chunk = await reader.read(65536)
            data.extend(chunk)
            return bool(chunk)

        while b"\r\n\r\n" not in data:
            if not await more():
                return
        head, _, _ = bytes(data).partition(b"\r\n\r\n")
        lines = head.lower().split(b"\r\n")
        end = len(head) + 4
        if b"transfer-encoding: chunked" in lines:
            while not data.endswith(b"0\r\n\r\n"):
                if not await more():
                    return
        for line in lines:
            if line.startswith(b"content-length:"):
                while len(data) < end + int(line.split(b":")[1]):
                    if not await more():
                        return
        self.answered += 1
        writer.write(self.OK)
        await writer.drain()


@contextlib.asynccontextmanager
async def backend(*, http: bool = False) -> AsyncIterator[tuple[Backend, int]]:
    recorder = Backend(http=http)
    server = await asyncio.start_server(recorder.handle, LOOPBACK, 0)
    try:
        yield recorder, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


async def exchange(
    port: int, payload: bytes, *, half_close: bool = True, timeout: float = 10.0
) -> tuple[bytes, str]:
    """Send ``payload`` (then half-close), read until the proxy closes the connection.

    Returns what was received and how it ended (``"eof"`` or ``"reset"``); fails when the
    connection is still open after ``timeout`` seconds. A plain socket is used so that bytes
    the proxy sent before a reset are still read (the kernel hands them out first).
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    received = bytearray()
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (LOOPBACK, port))
            with contextlib.suppress(OSError):  # the proxy may close before it read everything
                await loop.sock_sendall(sock, payload)
                if half_close:
                    sock.shutdown(socket.SHUT_WR)
            while True:
                try:
                    data = await loop.sock_recv(sock, 65536)
                except ConnectionResetError:
                    return bytes(received), "reset"
                if not data:
                    return bytes(received), "eof"
                received += data
    except TimeoutError:
        raise AssertionError(
            f"connection still open after {timeout}s; received {bytes(received[:200])!r}"
        ) from None
    finally:
        sock.close()


def status_of(answer: bytes | bytearray) -> int | None:
    """The status code of the first response in ``answer``, None when there is none."""
    if not answer.startswith(b"HTTP/1.1 "):
        return None
    return int(answer[9:12])


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting until {what}")
        await asyncio.sleep(0.02)


@contextlib.contextmanager
def open_files_limit(wanted: int) -> Iterator[None]:
    """Raise RLIMIT_NOFILE to at least ``wanted`` for the block (the hard limit too, as root)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        yield
        return
    new_hard = hard
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            new_hard = wanted
        except (ValueError, OSError):
            pytest.skip(f"needs {wanted} open files; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, new_hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))  # lowering is always allowed


# -- 1. a thousand silent connections ---------------------------------------------------------


SILENT = 1000
BATCH = 100


async def open_silent(
    port: int, count: int
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``count`` connections that never send a byte, opened in batches the backlog can take."""
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for start in range(0, count, BATCH):
            batch = min(BATCH, count - start)
            opened += await asyncio.gather(
                *(asyncio.open_connection(LOOPBACK, port) for _ in range(batch))
            )
    except BaseException:
        for _, writer in opened:
            writer.close()
        raise
    return opened


async def closed_at(reader: asyncio.StreamReader, timeout: float) -> float | None:
    """When the peer closed (EOF or reset) without sending a byte; None if it did not in time."""
    try:
        if await asyncio.wait_for(reader.read(), timeout) != b"":
            return None
    except ConnectionError:
        pass
    except TimeoutError:
        return None
    return time.monotonic()


@async_test(timeout=60)
async def test_a_thousand_silent_connections_time_out_while_a_real_client_is_served() -> None:
    initial = 2.0
    with open_files_limit(4 * SILENT + 1024):
        async with backend() as (recorder, backend_port):
            port = free_port()
            async with proxy([sni_route(port, backend_port)], initial_data_timeout=initial) as p:
                async with settled(p, timeout=15):
                    opened_at = time.monotonic()
                    silent = await open_silent(port, SILENT)
                    try:
                        # A real ClientHello is routed by its SNI at once, not after the others.
                        asked = time.monotonic()
                        answer, _ = await exchange(port, HELLO, timeout=initial + 10)
                        served_in = time.monotonic() - asked
                        assert answer == HELLO  # through the passthrough to the echo backend
                        assert served_in < initial, f"served after {served_in:.2f}s"
                        assert recorder.connections == 1
                        # After initial_data_timeout the proxy closes every one of them, and
                        # none before (they were accepted after opened_at).
                        closed = await asyncio.gather(
                            *(closed_at(reader, initial + 20) for reader, _ in silent)
                        )
                        times = [t for t in closed if t is not None]
                        assert len(times) == SILENT, f"{SILENT - len(times)} still open"
                        first = min(times) - opened_at
                        assert first >= initial, f"a silent connection closed after {first:.2f}s"
                    finally:
                        for _, writer in silent:
                            writer.close()
                assert p.stats()["connections"]["active"] == 0
                assert recorder.connections == 1  # none of the silent ones reached the backend
                # The port still serves.
                answer, _ = await exchange(port, CURL_HELLO)
                assert answer == CURL_HELLO
                assert p.stats()["connections"]["total"] == SILENT + 2


# -- 2. malformed, truncated and oversized ClientHellos ----------------------------------------


def u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def u24(value: int) -> bytes:
    return value.to_bytes(3, "big")


def records(message: bytes, size: int) -> bytes:
    """``message`` wrapped in handshake records of ``size`` bytes each."""
    return b"".join(
        b"\x16\x03\x01" + u16(len(message[i : i + size])) + message[i : i + size]
        for i in range(0, len(message), size)
    )


def patched(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def server_name_offset(hello: bytes) -> int:
    """Where the server_name extension of a one-record ClientHello starts (its type field)."""
    assert int.from_bytes(hello[3:5], "big") + 5 == len(hello), "one record expected"
    p = 5 + 4 + 2 + 32  # record header, handshake header, legacy_version, random
    p += 1 + hello[p]  # session id
    p += 2 + int.from_bytes(hello[p : p + 2], "big")  # cipher suites
    p += 1 + hello[p]  # compression methods
    p += 2  # extensions length
    while p < len(hello):
        if hello[p : p + 2] == b"\x00\x00":
            return p
        p += 4 + int.from_bytes(hello[p + 2 : p + 4], "big")
    raise AssertionError("the fixture has no server_name extension")


def bad_server_names(hello: bytes) -> list[tuple[str, bytes]]:
    """The hello with its server_name lengths (and name) broken, every outer length intact."""
    ext = server_name_offset(hello)
    ext_size = int.from_bytes(hello[ext + 2 : ext + 4], "big")
    data = ext + 4  # server_name_list length (2), name type (1), name length (2), name
    list_size = int.from_bytes(hello[data : data + 2], "big")
    name_size = int.from_bytes(hello[data + 3 : data + 5], "big")
    return [
        ("extension length +1", patched(hello, ext + 2, u16(ext_size + 1))),
        ("extension length 0", patched(hello, ext + 2, u16(0))),
        ("extension length 0xffff", patched(hello, ext + 2, u16(0xFFFF))),
        ("list length +1", patched(hello, data, u16(list_size + 1))),
        ("list length -1", patched(hello, data, u16(list_size - 1))),
        ("list length 0", patched(hello, data, u16(0))),
        ("name length +1", patched(hello, data + 3, u16(name_size + 1))),
        ("name length -1", patched(hello, data + 3, u16(name_size - 1))),
        ("name length 0xffff", patched(hello, data + 3, u16(0xFFFF))),
        ("name type 1", patched(hello, data + 2, b"\x01")),
        ("name with a slash", patched(hello, data + 5, b"/")),
        ("name with a NUL", patched(hello, data + 5, b"\x00")),
    ]


def truncations(hello: bytes) -> list[tuple[str, bytes]]:
    cuts = sorted({*range(1, 12), 42, 43, 44, 76, 77, 100, 200, 300, 400, 500, len(hello) - 1})
    return [(f"cut at {cut}", hello[:cut]) for cut in cuts if cut < len(hello)]


def garbage_after_header(seed: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    out = []
    for i in range(12):
        size = rng.choice([1, 4, 40, 300, 5000])
        body = bytes(rng.getrandbits(8) for _ in range(size))
        if i % 2:  # half of them claim to be a ClientHello, to get past the first check
            body = b"\x01" + u24(size - 4 if size >= 4 else 0) + body[4:]
        out.append((f"garbage record {i} ({size} bytes)", b"\x16\x03\x01" + u16(size) + body))
    return out


def lying_handshake_lengths(hello: bytes) -> list[tuple[str, bytes]]:
    body = int.from_bytes(hello[6:9], "big")
    return [
        ("handshake longer than sent", patched(hello, 6, u24(body + 100))),
        ("handshake shorter than its record", patched(hello, 6, u24(body - 100))),
        ("handshake of 16 MiB", patched(hello, 6, u24(0xFFFFFF))),
        ("handshake length 0", patched(hello, 6, u24(0))),
        ("record longer than sent", patched(hello, 3, u16(len(hello) - 5 + 100))),
        ("record shorter than the handshake", patched(hello, 3, u16(len(hello) - 5 - 100))),
        ("not a ClientHello", patched(hello, 5, b"\x02")),
    ]


def hundred_kib_hello() -> bytes:
    """A "ClientHello" declaring 100 KiB, sent whole in 16 KiB records."""
    size = 100 * 1024
    message = b"\x01" + u24(size) + b"\x03\x03" + bytes(size - 2)
    return records(message, 2**14)


def tiny_records_beyond_the_peek_limit() -> bytes:
    """A hello of almost 64 KiB in records of one byte each: ~390 KiB of framing."""
    size = 65000
    message = b"\x01" + u24(size) + b"\x03\x03" + bytes(size - 2)
    return records(message, 1)


@async_test(timeout=60)
async def test_malformed_truncated_and_oversized_client_hellos_are_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Each entry: (name, bytes, half-close after sending). Without a half-close the proxy must
    # see from the bytes alone that they can never become a ClientHello.
    cases: list[tuple[str, bytes, bool]] = []
    for name, data in truncations(HELLO) + truncations(CURL_HELLO):
        cases.append((name, data, True))
    for name, data in garbage_after_header(1):
        cases.append((name, data, True))
    for name, data in lying_handshake_lengths(HELLO):
        cases.append((name, data, name.endswith("than sent")))
    for name, data in bad_server_names(HELLO):
        cases.append((name, data, False))
    cases += [
        ("record of 16 KiB + 2049", b"\x16\x03\x01" + u16(2**14 + 2049) + b"\x01", False),
        ("record of 64 KiB", b"\x16\x03\x03\xff\xff" + bytes(0xFFFF), False),
        ("empty record", b"\x16\x03\x01\x00\x00", False),
        ("record version 3.9", b"\x16\x03\x09\x00\x04\x01\x00\x00\x00", False),
        ("SSLv2 hello", b"\x80\x2e\x01\x00\x02" + bytes(45), False),
        ("hello of 100 KiB", hundred_kib_hello(), False),
        ("1-byte records past the peek limit", tiny_records_beyond_the_peek_limit(), False),
        ("alert record", b"\x15\x03\x03\x00\x02\x02\x28", False),
        ("valid hello then garbage in its record", patched(HELLO, 3, u16(512 + 3)) + b"xyz", False),
    ]
    async with backend() as (recorder, backend_port):
        port = free_port()
        async with proxy([sni_route(port, backend_port)], initial_data_timeout=20) as p:
            with caplog.at_level(logging.WARNING, logger="smartroute"):
                async with settled(p, timeout=10):
                    for name, data, half_close in cases:
                        # initial_data_timeout is long: closing must come from the bytes.
                        answer, _ = await exchange(port, data, half_close=half_close, timeout=8)
                        assert answer == b"", f"{name}: the proxy answered {answer[:100]!r}"
                assert recorder.connections == 0, "a malformed hello reached the backend"
                stats = p.stats()
                assert stats["connections"]["total"] == len(cases)
                assert stats["routes"].get("sni", {}).get("total", 0) == 0  # no route matched
            problems = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert not problems, [r.getMessage() for r in problems]
            assert p.is_running
            # A valid hello still passes, also when spread over 1-byte records.
            async with settled(p):
                for hello in (HELLO, records(HELLO[5:], 1), records(CURL_HELLO[5:], 7)):
                    answer, _ = await exchange(port, hello)
                    assert answer == hello
            assert recorder.connections == 3
            assert bytes(recorder.received[1]) == records(HELLO[5:], 1)


# -- 3. malformed and oversized HTTP heads -----------------------------------------------------

GET = b"GET / HTTP/1.1\r\nHost: site.test\r\n"
POST = b"POST /upload HTTP/1.1\r\nHost: site.test\r\n"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: site.test\r\n\r\n"

BAD_HEADS: list[tuple[str, bytes, set[int]]] = [
    ("not a request line", b"HELLO WORLD\r\n\r\n", {400}),
    ("request line with 4 parts", b"GET / HTTP/1.1 x\r\nHost: a\r\n\r\n", {400}),
    ("request line without version", b"GET /\r\nHost: a\r\n\r\n", {400}),
    ("unknown version", b"GET / HTTP/7.1\r\nHost: a\r\n\r\n", {400}),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {400}),
    ("space in target", b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    ("NUL in target", b"GET /\x00 HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    ("NUL in header value", GET + b"X-A: a\x00b\r\n\r\n", {400}),
    ("NUL in header name", GET + b"X\x00A: b\r\n\r\n", {400}),
    ("bare CR in header", GET + b"X-A: a\rb\r\n\r\n", {400}),
    ("header line without colon", GET + b"no colon here\r\n\r\n", {400}),
    ("space before colon", GET + b"X-A : b\r\n\r\n", {400}),
    ("obsolete line folding", GET + b"X-A: b\r\n  folded\r\n\r\n", {400}),
    ("two different hosts", GET + b"Host: other.test\r\n\r\n", {400}),
    ("bad host", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", {400}),
    ("userinfo in target", b"GET http://u@a/ HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    ("header of 100 KiB", GET + b"X-Big: " + b"a" * 100 * 1024 + b"\r\n\r\n", {400, 431}),
    ("10,000 headers", GET + b"X-H: v\r\n" * 10_000 + b"\r\n", {400, 431}),
    ("head of 100 KiB of blank lines", b"\r\n" * 50 * 1024 + GET + b"\r\n", {400, 431}),
    (
        "differing Content-Lengths",
        POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        {400},
    ),
    ("Content-Length list", POST + b"Content-Length: 5, 6\r\n\r\nhello!", {400}),
    ("negative Content-Length", POST + b"Content-Length: -5\r\n\r\nhello", {400}),
    ("signed Content-Length", POST + b"Content-Length: +5\r\n\r\nhello", {400}),
    ("hex Content-Length", POST + b"Content-Length: 0x5\r\n\r\nhello", {400}),
    ("huge Content-Length", POST + b"Content-Length: 99999999999999999999999\r\n\r\n", {400}),
    (
        "CL + TE smuggling",
        POST + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
        {400},
    ),
    (
        "TE + CL smuggling",
        POST + b"Transfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\n" + SMUGGLED,
        {400},
    ),
    (
        "TE chunked twice",
        POST
        + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        + SMUGGLED,
        {400},
    ),
    (
        "TE not ending in chunked",
        POST + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n" + SMUGGLED,
        {400},
    ),
    ("TE xchunked", POST + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUGGLED, {400}),
    (
        "TE with a vertical tab",
        POST + b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
        {400},
    ),
    (
        "TE in HTTP/1.0",
        b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        {400},
    ),
]

# The head is fine, so it may be forwarded before the body is read; the body is not.
BAD_CHUNKS: list[tuple[str, bytes]] = [
    ("chunk size not hex", b"zz\r\nhello\r\n0\r\n\r\n"),
    ("negative chunk size", b"-5\r\nhello\r\n0\r\n\r\n"),
    ("0x chunk size", b"0x5\r\nhello\r\n0\r\n\r\n"),
    ("chunk size overflowing 64 bits", b"1" + b"0" * 17 + b"\r\nhello\r\n0\r\n\r\n"),
    ("chunk size with bare LF", b"5\nhello\n0\n\n"),
    ("chunk data longer than its size", b"3\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size line of 100 KiB", b"5" + b" " * 100 * 1024 + b"\r\nhello\r\n0\r\n\r\n"),
    ("smuggled request after a short chunk", b"1\r\nhGET /smuggled HTTP/1.1\r\n\r\n0\r\n\r\n"),
]


@async_test(timeout=60)
async def test_malformed_http_heads_get_an_error_and_never_reach_the_backend() -> None:
    async with backend(http=True) as (recorder, backend_port):
        port = free_port()
        async with proxy([http_route(port, backend_port)], initial_data_timeout=20) as p:
            async with settled(p, timeout=10):
                for name, data, statuses in BAD_HEADS:
                    answer, _ = await exchange(port, data, half_close=False, timeout=8)
                    status = status_of(answer)
                    assert status in statuses, f"{name}: got {answer[:200]!r}"
                    assert b"Connection: close\r\n" in answer, f"{name}: {answer[:200]!r}"
                    assert recorder.connections == 0, f"{name}: the backend received it"
            assert p.is_running
            # A well-formed request through the same port still works.
            async with settled(p):
                answer, _ = await exchange(port, GET + b"Connection: close\r\n\r\n")
            assert status_of(answer) == 200 and answer.endswith(b"\r\n\r\nok\n")
            assert recorder.answered == 1
            assert b"X-Forwarded-For: 127.0.0.1\r\n" in bytes(recorder.received[0])


@async_test(timeout=40)
async def test_invalid_chunked_bodies_get_400_and_are_never_completed_upstream() -> None:
    wrong_answers: list[str] = []
    async with backend(http=True) as (recorder, backend_port):
        port = free_port()
        async with proxy([http_route(port, backend_port)], initial_data_timeout=20) as p:
            async with settled(p, timeout=10):
                for name, body in BAD_CHUNKS:
                    request = POST + b"Transfer-Encoding: chunked\r\n\r\n" + body
                    seen = len(recorder.received)
                    answer, _ = await exchange(port, request, half_close=False, timeout=8)
                    # The head may have gone upstream, but never a whole request, nor anything
                    # from the bad chunk on (a smuggled request least of all).
                    assert recorder.answered == 0, f"{name}: the backend answered"
                    upstream = b"".join(recorder.received[seen:])
                    assert b"smuggled" not in upstream and b"hello" not in upstream, upstream
                    if status_of(answer) != 400:
                        wrong_answers.append(f"{name}: {answer[:100]!r}")
            assert p.is_running
            async with settled(p):
                answer, _ = await exchange(port, GET + b"\r\n")
            assert status_of(answer) == 200
    # The client is owed an answer: no response had started when the body turned out bad.
    assert not wrong_answers, "expected 400, got: " + "; ".join(wrong_answers)


def slow_head_settings(limit: float) -> dict[str, float]:
    """Settings that bound how long a request head may take to arrive to about ``limit``."""
    return {"initial_data_timeout": limit, "http_header_timeout": limit}


async def read_until_closed(sock: socket.socket, into: bytearray) -> None:
    """Collect what arrives on ``sock`` until EOF or a reset."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(ConnectionResetError):
        while data := await loop.sock_recv(sock, 65536):
            into += data


@async_test(timeout=30)
async def test_a_trickled_head_is_closed_by_a_timeout() -> None:
    initial = 1.0
    head = b"GET / HTTP/1.1\r\nHost: site.test\r\nX-Slow: " + b"a" * 1000  # never ends
    async with backend(http=True) as (recorder, backend_port):
        port = free_port()
        async with proxy([http_route(port, backend_port)], **slow_head_settings(initial)) as p:
            async with settled(p):
                loop = asyncio.get_running_loop()
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                answer = bytearray()
                try:
                    started = time.monotonic()
                    await loop.sock_connect(sock, (LOOPBACK, port))
                    reading = asyncio.ensure_future(read_until_closed(sock, answer))
                    try:
                        for byte in head:  # one byte per 100 ms
                            if reading.done():
                                break
                            with contextlib.suppress(OSError):
                                sock.send(bytes([byte]))
                            await asyncio.sleep(0.1)
                        else:
                            raise AssertionError("the whole trickled head was waited for")
                        await asyncio.wait_for(reading, 10)
                    finally:
                        reading.cancel()
                    elapsed = time.monotonic() - started
                finally:
                    sock.close()
            assert status_of(answer) == 408, bytes(answer[:200])
            assert elapsed >= initial, f"closed after {elapsed:.2f}s, before the timeout"
            assert recorder.connections == 0
            async with settled(p):
                ok, _ = await exchange(port, GET + b"\r\n")
            assert status_of(ok) == 200


# -- 4. misbehaving socket handlers ------------------------------------------------------------


@async_test(timeout=30)
async def test_raising_handlers_close_their_connection_and_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    plan = ["raise at once", "raise after writing", "echo"]

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: RouteContext
    ) -> None:
        mode = plan.pop(0)
        if mode == "raise at once":
            raise RuntimeError("handler bug at once")
        if mode == "raise after writing":
            writer.write(b"partial answer\n")
            await writer.drain()
            raise RuntimeError("handler bug after writing")
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    port = free_port()
    async with proxy([handler_route(port, handler)]) as p:
        with caplog.at_level(logging.ERROR, logger="smartroute"):
            async with settled(p):
                answer, _ = await exchange(port, b"hello\n", half_close=False, timeout=5)
                assert answer == b""
                answer, _ = await exchange(port, b"hello\n", half_close=False, timeout=5)
                assert answer == b"partial answer\n"
        logged = [str(r.exc_info[1]) for r in caplog.records if r.exc_info is not None]
        assert "handler bug at once" in logged and "handler bug after writing" in logged
        async with settled(p):
            answer, _ = await exchange(port, b"still here\n", timeout=5)
        assert answer == b"still here\n"
        assert not plan and p.is_running


def hanging_handler(events: dict[str, asyncio.Event]) -> SocketHandler:
    """``hang``: never return; ``drip``: write a byte every 100 ms forever; else echo a line.

    ``events`` records what happened: "<mode> started" and "<mode> cancelled".
    """

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: RouteContext
    ) -> None:
        line = await reader.readline()
        mode = line.strip().decode()
        if mode not in ("hang", "drip"):
            writer.write(line)
            await writer.drain()
            writer.close()
            return
        events[f"{mode} started"].set()
        try:
            while True:
                if mode == "drip":
                    writer.write(b".")
                    await writer.drain()
                await asyncio.sleep(0.1)
        except asyncio.CancelledError:
            events[f"{mode} cancelled"].set()
            raise

    return handler


def new_events() -> dict[str, asyncio.Event]:
    return {
        f"{mode} {what}": asyncio.Event()
        for mode in ("hang", "drip")
        for what in ("started", "cancelled")
    }


@async_test(timeout=40)
async def test_handlers_that_never_return_end_at_idle_timeout_and_lifetime() -> None:
    idle, lifetime = 1.0, 3.0
    events = new_events()
    port = free_port()
    settings = {"idle_timeout": idle, "max_connection_lifetime": lifetime}
    async with proxy([handler_route(port, hanging_handler(events))], **settings) as p:
        async with settled(p, timeout=10):
            started = time.monotonic()
            hang, drip = await asyncio.gather(
                exchange(port, b"hang\n", half_close=False, timeout=idle + 15),
                exchange(port, b"drip\n", half_close=False, timeout=lifetime + 15),
            )
            elapsed = time.monotonic() - started
            assert hang[0] == b""  # closed for being idle
            assert drip[0] and set(drip[0]) == {ord(".")}  # it kept moving bytes...
            assert elapsed >= lifetime  # ...so only the lifetime limit could close it
            # The proxy closed the connections; the handlers must not go on running.
            for mode in ("hang", "drip"):
                assert events[f"{mode} started"].is_set()
                await asyncio.wait_for(events[f"{mode} cancelled"].wait(), 5)
        assert p.stats()["connections"]["active"] == 0
        async with settled(p):
            answer, _ = await exchange(port, b"echo\n", timeout=5)
        assert answer == b"echo\n"


@async_test(timeout=30)
async def test_a_handler_that_never_returns_is_cancelled_at_stop() -> None:
    grace = 0.5
    events = new_events()
    port = free_port()
    p = proxy(
        [handler_route(port, hanging_handler(events))],
        idle_timeout=None,
        max_connection_lifetime=None,
        graceful_shutdown_timeout=grace,
    )
    await p.start()
    try:
        async with settled(p, timeout=10):
            hung = asyncio.ensure_future(exchange(port, b"hang\n", half_close=False, timeout=20))
            await asyncio.wait_for(events["hang started"].wait(), 5)
            answer, _ = await exchange(port, b"echo\n", timeout=5)  # still serving meanwhile
            assert answer == b"echo\n"
            assert not hung.done()
            started = time.monotonic()
            await p.stop()
            stopped_in = time.monotonic() - started
            assert (await asyncio.wait_for(hung, 5))[0] == b""
            assert events["hang cancelled"].is_set()
            assert grace * 0.9 <= stopped_in < grace + 5, stopped_in
    finally:
        await p.stop()


FLOOD_CHUNK = b"x" * 65536


def flooding_handler(done: asyncio.Event, written: list[int]) -> SocketHandler:
    """Writes forever (with drain) to whoever connects; sets ``done`` when it ends."""

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: RouteContext
    ) -> None:
        try:
            while True:
                writer.write(FLOOD_CHUNK)
                written[0] += len(FLOOD_CHUNK)
                await writer.drain()
        finally:
            done.set()

    return handler


async def watch_rss(stop: asyncio.Event, peak: list[int]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], rss_bytes())
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("ending", ["idle timeout", "client closes"])
@async_test(timeout=40)
async def test_a_handler_writing_to_a_client_that_never_reads_stays_bounded(ending: str) -> None:
    done = asyncio.Event()
    written = [0]
    port = free_port()
    idle = 1.0 if ending == "idle timeout" else None
    async with proxy(
        [handler_route(port, flooding_handler(done, written))], idle_timeout=idle
    ) as p:
        async with settled(p, timeout=10):
            rss_before = rss_bytes()
            peak = [rss_before]
            watcher = asyncio.ensure_future(watch_rss(done, peak))
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, (LOOPBACK, port))
                # Let the flood fill every buffer on the way: the handler then waits in drain.
                await wait_until(lambda: written[0] > 0, 5, "the handler writes")
                await asyncio.sleep(1.5 if ending == "client closes" else 0)
                if ending == "client closes":
                    assert not done.is_set(), "the handler ended while the client was there"
                    sock.close()
                await asyncio.wait_for(done.wait(), 15)
            finally:
                sock.close()
                await watcher
            growth = peak[0] - rss_before
            assert growth < 64 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"
            # Written but never read: bounded by the socket buffers, not by how long it ran.
            assert written[0] < 64 * 2**20, written[0]
        done.clear()
        async with settled(p):
            # The port still serves: a client that reads gets the flood.
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            try:
                assert len(await asyncio.wait_for(reader.readexactly(2**20), 10)) == 2**20
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
            await asyncio.wait_for(done.wait(), 10)
