"""The two peers of the desync battery (tests/server/http/test_desync.py), free of product code.

:class:`RecordingBackend` is an HTTP/1.1 backend on loopback that keeps every byte each
connection brought, frames the requests in them strictly (CRLF only, Content-Length or a
chunked body ending in ``chunked``) and answers each one with a scripted reply, by default
``200`` with the request line as its body. :class:`RawClient` is a plain socket that sends
bytes and reads responses with a small strict parser of its own; a plain socket, not
``asyncio.open_connection``, so that bytes the proxy sent before resetting the connection are
still read (a ``StreamReader`` raises the reset before handing out what it buffered).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
from dataclasses import dataclass, field
from typing import Self

from cryptography import x509
from cryptography.x509.oid import NameOID

LOOPBACK = "127.0.0.1"
WAIT = 5.0  # the longest any single wait on a peer may take; the cases need milliseconds

_CRLF = b"\r\n"
_TCHAR = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]"
_FIELD = re.compile(rb"(" + _TCHAR + rb"+):[ \t]*(.*?)[ \t]*")
_REQUEST_LINE = re.compile(rb"(" + _TCHAR + rb"+) ([!-~]+) HTTP/1\.1")
_STATUS_LINE = re.compile(rb"(HTTP/1\.[01]) ([0-9]{3})(?: (.*))?")
_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]+)(?:[ \t]*;.*)?")


class Unframeable(Exception):
    """The backend cannot tell where a request it received ends."""


# -- the backend ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One whole request as the backend framed it."""

    conn: int  # the backend connection it came on, in order of acceptance
    head: bytes  # request line and headers, the final blank line included
    body: bytes  # the payload, de-chunked when it came chunked
    trailers: bytes = b""  # the trailer lines of a chunked body, as sent
    chunk_lines: tuple[bytes, ...] = ()  # the chunk-size lines of a chunked body, without CRLF

    @property
    def method(self) -> bytes:
        return self.head.split(b" ", 1)[0]

    @property
    def target(self) -> bytes:
        return self.head.split(b" ", 2)[1]


@dataclass(frozen=True)
class Reply:
    """What the backend sends instead of its usual answer: ``data``, then ``then`` once
    :attr:`RecordingBackend.resume` is set (by the client, when the proxy relayed something);
    ``close`` closes the connection afterwards."""

    data: bytes
    close: bool = False
    then: bytes = b""


@dataclass
class BackendConnection:
    index: int
    raw: bytearray = field(default_factory=bytearray)  # every byte received, in order
    unframed: str | None = None  # why the backend stopped framing requests on it
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # EOF, reset or closed by us


def answer_for(seen: Seen) -> bytes:
    """The backend's usual answer: 200 with ``METHOD target`` as the body."""
    body = seen.method + b" " + seen.target
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    return head if seen.method == b"HEAD" else head + body


def frame_request(data: bytes) -> tuple[Seen, int] | None:
    """The first whole request in ``data`` (with ``conn`` 0) and its size; None: incomplete."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = data[: end + 4]
    lines = data[:end].split(_CRLF)
    if _REQUEST_LINE.fullmatch(lines[0]) is None:
        raise Unframeable(f"request line {lines[0][:80]!r}")
    lengths: list[bytes] = []
    codings: list[bytes] = []
    for line in lines[1:]:
        match = _FIELD.fullmatch(line)
        if match is None:
            raise Unframeable(f"header line {line[:80]!r}")
        name = match.group(1).lower()
        if name == b"content-length":
            lengths.append(match.group(2))
        elif name == b"transfer-encoding":
            codings += [c.strip(b" \t").lower() for c in match.group(2).split(b",")]
    if lengths and codings:
        raise Unframeable("both Content-Length and Transfer-Encoding")
    if codings:
        if codings[-1] != b"chunked" or codings.count(b"chunked") != 1:
            raise Unframeable(f"Transfer-Encoding {b', '.join(codings)!r}")
        return _frame_chunked(data, head)
    if lengths:
        if len(lengths) != 1 or not lengths[0].isdigit():
            raise Unframeable(f"Content-Length {lengths!r}")
        size = int(lengths[0])
        if len(data) < len(head) + size:
            return None
        return Seen(0, head, data[len(head) : len(head) + size]), len(head) + size
    return Seen(0, head, b""), len(head)


def _frame_chunked(data: bytes, head: bytes) -> tuple[Seen, int] | None:
    pos = len(head)
    body = bytearray()
    sizes: list[bytes] = []
    while True:
        end = data.find(_CRLF, pos)
        if end < 0:
            return None
        line = data[pos:end]
        match = _SIZE_LINE.fullmatch(line)
        if match is None:
            raise Unframeable(f"chunk-size line {line[:80]!r}")
        sizes.append(line)
        size = int(match.group(1), 16)
        pos = end + 2
        if size == 0:
            break
        if len(data) < pos + size + 2:
            return None
        if data[pos + size : pos + size + 2] != _CRLF:
            raise Unframeable("chunk data not followed by CRLF")
        body += data[pos : pos + size]
        pos += size + 2
    start = pos
    while True:
        end = data.find(_CRLF, pos)
        if end < 0:
            return None
        if end == pos:
            trailers = data[start:pos]
            return Seen(0, head, bytes(body), trailers, tuple(sizes)), end + 2
        pos = end + 2


class LoopbackServer:
    """A server on a free loopback port for an ``async with`` block: ``serve`` runs for every
    connection; it counts them (``accepted``) and closes whatever is still open at the end."""

    def __init__(self) -> None:
        self.port = 0
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._handle, LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        self.drop()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=WAIT)
            for task in pending:
                task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), WAIT)

    def drop(self) -> None:
        """Close every connection from the server's side."""
        for writer in self._writers:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        self.accepted += 1
        try:
            await self.serve(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass  # the proxy closed or reset it; the test checks what the client saw
        finally:
            writer.close()


class RecordingBackend(LoopbackServer):
    """An HTTP/1.1 backend on 127.0.0.1 (port 0) recording what every connection brought.

    ``script`` maps the number of a request (0 for the first the backend receives, counted
    over all its connections) to the :class:`Reply` it gets instead of :func:`answer_for`.
    A connection on which a request cannot be framed stays open and is only recorded.
    """

    def __init__(self, script: dict[int, Reply] | None = None) -> None:
        super().__init__()
        self.script = dict(script or {})
        self.connections: list[BackendConnection] = []
        self.requests: list[Seen] = []
        self.resume = asyncio.Event()  # see Reply.then

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = BackendConnection(len(self.connections))
        self.connections.append(conn)
        pending = b""
        try:
            while data := await reader.read(65536):
                conn.raw += data
                if conn.unframed is not None:
                    continue
                pending += data
                while True:
                    try:
                        framed = frame_request(pending)
                    except Unframeable as exc:
                        conn.unframed = str(exc)
                        break
                    if framed is None:
                        break
                    seen, used = framed
                    seen = Seen(conn.index, seen.head, seen.body, seen.trailers, seen.chunk_lines)
                    pending = pending[used:]
                    reply = self.script.get(len(self.requests))
                    self.requests.append(seen)
                    writer.write(answer_for(seen) if reply is None else reply.data)
                    await writer.drain()
                    if reply is not None and reply.then:
                        with contextlib.suppress(TimeoutError):  # then the failure shows
                            await asyncio.wait_for(self.resume.wait(), WAIT)
                        writer.write(reply.then)
                        await writer.drain()
                    if reply is not None and reply.close:
                        return
        finally:
            conn.closed.set()


# -- the client -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    """One response as the client read it; ``complete`` is False when the connection ended
    inside its body."""

    version: str
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    complete: bool

    def header(self, name: str) -> str | None:
        """Every value of header ``name`` joined with ", ", None when it is absent."""
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return ", ".join(values) if values else None

    def tokens(self, name: str) -> list[str]:
        value = self.header(name) or ""
        return [t.strip().lower() for t in value.split(",") if t.strip()]

    def summary(self) -> str:
        cut = "" if self.complete else " (cut short)"
        return f"{self.status} {dict(self.headers)} {self.body[:120]!r}{cut}"


class RawClient:
    """A client connection on a plain non-blocking socket; every wait is bounded by WAIT."""

    def __init__(self, sock: socket.socket, received: asyncio.Event | None = None) -> None:
        self.sock = sock
        self.received = received  # set whenever bytes arrive
        self.buffer = bytearray()
        self.eof = False
        self.reset = False

    @classmethod
    async def connect(cls, port: int, received: asyncio.Event | None = None) -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(sock, (LOOPBACK, port)), WAIT
            )
        except BaseException:
            sock.close()
            raise
        return cls(sock, received)

    def close(self) -> None:
        self.sock.close()

    async def send(self, data: bytes, *, half_close: bool = False) -> None:
        """Send ``data`` in one call; the proxy may close before it has read it all."""
        with contextlib.suppress(OSError):
            await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(self.sock, data), WAIT)
            if half_close:
                self.sock.shutdown(socket.SHUT_WR)

    async def _fill(self) -> bool:
        """Read more; False at EOF or reset."""
        if self.eof:
            return False
        loop = asyncio.get_running_loop()
        try:
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), WAIT)
        except TimeoutError:
            raise AssertionError(
                f"nothing more from the proxy within {WAIT}s; have {bytes(self.buffer[:300])!r}"
            ) from None
        except ConnectionResetError:
            self.eof = self.reset = True
            return False
        if not data:
            self.eof = True
            return False
        self.buffer += data
        if self.received is not None:
            self.received.set()
        return True

    async def rest(self) -> bytes:
        """Everything until the proxy closes the connection (fails if it stays open)."""
        while await self._fill():
            pass
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    async def responses(self, heads: list[bool]) -> list[Response]:
        """Up to ``len(heads)`` responses, fewer if the connection ends first; ``heads[i]``
        says whether the i-th answers a HEAD request (so has no body)."""
        got: list[Response] = []
        for head_request in heads:
            response = await self.response(head_request=head_request)
            if response is None:
                break
            got.append(response)
            if not response.complete:
                break
        return got

    async def response(self, *, head_request: bool = False) -> Response | None:
        """The next response; None when the connection ended before one began."""
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            if not await self._fill():
                if self.buffer:
                    raise AssertionError(f"closed inside a response head: {bytes(self.buffer)!r}")
                return None
        lines = bytes(self.buffer[:end]).split(_CRLF)
        del self.buffer[: end + 4]
        status_line = _STATUS_LINE.fullmatch(lines[0])
        assert status_line is not None, f"bad status line from the proxy: {lines[0]!r}"
        headers = []
        for line in lines[1:]:
            match = _FIELD.fullmatch(line)
            assert match is not None, f"bad header line from the proxy: {line!r}"
            headers.append((match.group(1).decode(), match.group(2).decode("latin-1")))
        version, status = status_line.group(1).decode(), int(status_line.group(2))
        bodiless = head_request or status < 200 or status in (204, 304)
        response = Response(version, status, tuple(headers), b"", True)
        if bodiless:
            return response
        codings, length = response.tokens("transfer-encoding"), response.header("content-length")
        if codings and codings[-1] == "chunked":
            body, complete = await self._chunked()
        elif codings or length is None:
            body, complete = await self.rest(), True
        else:
            assert length.isdigit(), f"bad Content-Length from the proxy: {length!r}"
            body, complete = await self._exactly(int(length))
        return Response(version, status, tuple(headers), body, complete)

    async def _exactly(self, size: int) -> tuple[bytes, bool]:
        while len(self.buffer) < size:
            if not await self._fill():
                break
        body = bytes(self.buffer[:size])
        del self.buffer[:size]
        return body, len(body) == size

    async def _line(self) -> bytes | None:
        while (end := self.buffer.find(_CRLF)) < 0:
            if not await self._fill():
                return None
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return line

    async def _chunked(self) -> tuple[bytes, bool]:
        body = bytearray()
        while True:
            line = await self._line()
            if line is None:
                return bytes(body), False
            assert re.fullmatch(rb"[0-9A-Fa-f]+", line), f"bad chunk size from the proxy {line!r}"
            size = int(line, 16)
            if size == 0:
                break
            data, complete = await self._exactly(size + 2)
            if not complete:
                return bytes(body + data[:size]), False
            assert data.endswith(_CRLF), f"chunk data without CRLF from the proxy: {data!r}"
            body += data[:size]
        while (line := await self._line()) != b"":
            if line is None:
                return bytes(body), False
        return bytes(body), True


class TlsClient(RawClient):
    """A :class:`RawClient` whose bytes go through TLS (an ``SSLObject`` over memory BIOs):
    ``send``, ``response``, ``responses`` and ``rest`` speak HTTP inside the TLS session."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, name: str | None) -> None:
        super().__init__(sock)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=name)
        self.error: ssl.SSLError | None = None  # what ended it otherwise, TLS-wise

    @classmethod
    async def open(
        cls,
        port: int,
        context: ssl.SSLContext,
        name: str | None = "site.test",
        *,
        pieces: int = 1,
        gap: float = 0.0,
    ) -> TlsClient:
        """Connect and complete the handshake; the ClientHello goes in ``pieces`` writes
        ``gap`` seconds apart."""
        raw = await RawClient.connect(port)
        client = cls(raw.sock, context, name)
        try:
            await client.handshake(pieces, gap)
        except BaseException:
            client.close()
            raise
        return client

    async def handshake(self, pieces: int = 1, gap: float = 0.0) -> None:
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.do_handshake()
        hello = self.outgoing.read()
        assert hello, "the client context produced no ClientHello"
        cuts = [len(hello) * i // pieces for i in range(pieces + 1)]
        for i in range(pieces):
            if i:
                await asyncio.sleep(gap)
            await self._raw_send(hello[cuts[i] : cuts[i + 1]])
        ended = False
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if ended:
                    raise ConnectionResetError("closed during the handshake") from None
                await self._flush()
                if not await self._pull():
                    ended = True
                    self.incoming.write_eof()  # the next do_handshake says what ended it
        await self._flush()

    async def _raw_send(self, data: bytes) -> None:
        await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(self.sock, data), WAIT)

    async def _flush(self) -> None:
        if data := self.outgoing.read():
            await self._raw_send(data)

    async def _pull(self) -> bool:
        """Read what the socket holds into the TLS layer; False at EOF (reset raises)."""
        loop = asyncio.get_running_loop()
        try:
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 16), WAIT)
        except TimeoutError:
            raise AssertionError(f"nothing from the proxy within {WAIT}s") from None
        if not data:
            return False
        self.incoming.write(data)
        return True

    async def send(self, data: bytes, *, half_close: bool = False) -> None:
        """Encrypt and send ``data``; ``half_close`` then sends close_notify."""
        view = memoryview(data)
        with contextlib.suppress(OSError):
            while view:
                written = self.tls.write(view[: 1 << 18])
                view = view[written:]
                await self._flush()
            if half_close:
                with contextlib.suppress(ssl.SSLWantReadError):
                    self.tls.unwrap()  # then waits for the proxy's close_notify
                await self._flush()

    async def _fill(self) -> bool:
        """Decrypt more into ``buffer``; False once the session or the connection ended."""
        if self.eof:
            return False
        while True:
            try:
                data = self.tls.read(1 << 16)
            except ssl.SSLWantReadError:
                await self._flush()
                try:
                    more = await self._pull()
                except ConnectionResetError:
                    self.eof = self.reset = True
                    return False
                if not more:
                    self.eof = True
                    return False
                continue
            except ssl.SSLZeroReturnError:
                data = b""
            except ssl.SSLError as exc:
                self.eof, self.error = True, exc
                return False
            if not data:  # close_notify
                self.eof = True
                return False
            self.buffer += data
            if self.received is not None:
                self.received.set()
            return True

    def peer_names(self) -> tuple[str, list[str]]:
        """The served certificate's CN and DNS names (verified against the test CA)."""
        der = self.tls.getpeercert(binary_form=True)
        assert der, "no peer certificate"
        cert = x509.load_der_x509_certificate(der)
        [cn] = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return str(cn.value), names.get_values_for_type(x509.DNSName)

    async def exactly(self, size: int) -> bytes:
        """``size`` more bytes of the session's plaintext (fails if it ends first)."""
        data, complete = await self._exactly(size)
        assert complete, f"the connection ended after {data!r}"
        return data


async def exchange(client: RawClient, request: bytes, *, head: bool = False) -> Response:
    """Send ``request`` and read its answer (``head``: it answers a HEAD request)."""
    await client.send(request)
    response = await client.response(head_request=head)
    assert response is not None, f"the proxy closed without answering {request[:80]!r}"
    return response


async def ended(client: RawClient) -> None:
    """The connection ends with nothing more after the last response."""
    rest = await client.rest()
    assert rest == b"", f"bytes after the last response: {rest[:300]!r}"


def header(head: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` (lower-case) in a raw head, or None."""
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None
