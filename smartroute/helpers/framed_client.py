"""The client of a :class:`~smartroute.helpers.FramedService`: requests, broadcasts, reconnection.

::

    async with FramedClient([("chat.example.com", 443), ("backup.example.com", 443)],
                            ssl=ssl.create_default_context(), credentials={"token": "..."},
                            on_broadcast=show) as client:
        print(await client.request("join", {"room": "lobby"}))

The client authenticates with an ``auth`` frame on every connection, presenting the session id
it got in the last ``welcome`` so the server resumes the session. When the connection drops it
reconnects in the background, at once to the primary endpoint; each failed attempt *n* (from 0)
is followed by ``min(max_backoff, backoff * 2**n)`` seconds spread by ``+-jitter`` (a fraction)
and an attempt at the next endpoint, round the list. ``max_attempts`` attempts in a row
failing (``None``: never give up) end the client with :class:`ConnectFailed`; so does an error
that no retry can mend (a refused ``auth``, a host name that is not one). Requests wait for a
connection within their timeout; a request whose connection drops before its reply fails with
:class:`Disconnected` and is not sent again (it may have been carried out).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import ssl as _ssl
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any

from smartroute.errors import (
    ConfigError,
    ConnectFailed,
    Disconnected,
    FrameError,
    RequestTimeout,
    ServiceError,
)
from smartroute.helpers.frames import (
    DEFAULT_MAX_FRAME,
    Frame,
    FrameDecoder,
    Framing,
    check_framing,
    encode_frame,
)

log = logging.getLogger("smartroute.framed")

OnBroadcast = Callable[[str, Any], "Awaitable[None] | None"]
Endpoint = tuple[str, int]
_CHUNK = 65536
_CALLBACK_QUEUE = 256  # broadcasts waiting for on_broadcast before the client stops reading


class _Link:
    """One live connection and the requests waiting on it."""

    def __init__(
        self, endpoint: Endpoint, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.endpoint = endpoint
        self.reader = reader
        self.writer = writer
        self.pending: dict[int, tuple[asyncio.Future[Any], str]] = {}
        self.last_error: str | None = None  # the last error frame that answered no request

    @property
    def name(self) -> str:
        return f"{self.endpoint[0]}:{self.endpoint[1]}"

    def drop(self, reason: str) -> None:
        for request, (future, kind) in self.pending.items():
            if not future.done():
                future.set_exception(
                    Disconnected(
                        f"connection to {self.name} lost before the reply to "
                        f'"{kind}" (id {request}): {reason}'
                    )
                )
        self.pending.clear()
        self.writer.transport.abort()


class FramedClient:
    """A reconnecting client; use ``async with`` or ``connect()`` / ``close()``."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        ssl: _ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        framing: Framing = "lines",
        max_frame: int = DEFAULT_MAX_FRAME,
        credentials: Any = None,
        session_id: str | None = None,
        max_attempts: int | None = None,
        backoff: float = 0.1,
        max_backoff: float = 5.0,
        jitter: float = 0.2,
        on_broadcast: OnBroadcast | None = None,
        request_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        rng: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        check_framing(framing, max_frame, "FramedClient")
        self.endpoints = _endpoints(endpoints)
        if max_attempts is not None and (not isinstance(max_attempts, int) or max_attempts < 1):
            raise ConfigError(
                "FramedClient.max_attempts", f"expected None or >= 1, got {max_attempts!r}"
            )
        if not 0 <= jitter <= 1:
            raise ConfigError("FramedClient.jitter", f"expected a fraction in 0-1, got {jitter!r}")
        if not 0 <= backoff <= max_backoff:
            raise ConfigError("FramedClient.backoff", "expected 0 <= backoff <= max_backoff")
        self.ssl = ssl
        self.server_hostname = server_hostname
        self.framing: Framing = framing
        self.max_frame = max_frame
        self.credentials = credentials
        self.session_id = session_id
        self.resumed = False  # the last welcome resumed the session
        self.max_attempts = max_attempts
        self.backoff, self.max_backoff, self.jitter = backoff, max_backoff, jitter
        self.on_broadcast = on_broadcast
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self._rng, self._sleep = rng, sleep
        self._link: _Link | None = None
        self._changed = asyncio.Event()  # connected, failed or closed
        self._failure: Exception | None = None
        self._closed = False
        self._next_id = 0
        self._dead_after: float | None = None
        self._runner: asyncio.Task[None] | None = None
        self._first: asyncio.Future[None] | None = None
        self._callbacks: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(_CALLBACK_QUEUE)
        self._caller: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> FramedClient:
        await self.connect()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._link is not None

    @property
    def endpoint(self) -> Endpoint | None:
        """The endpoint of the live connection."""
        return self._link.endpoint if self._link is not None else None

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (from 0)."""
        base = min(self.max_backoff, self.backoff * 2.0 ** min(attempt, 64))
        return base * (1 + self.jitter * (2 * self._rng() - 1))

    async def connect(self) -> None:
        """Connect (trying endpoints with backoff) and authenticate; then stay connected."""
        if self._closed:
            raise Disconnected("the client is closed")
        if self._runner is None:
            self._first = asyncio.get_running_loop().create_future()
            self._runner = asyncio.create_task(self._run())
            if self.on_broadcast is not None:
                self._caller = asyncio.create_task(self._call_back())
        assert self._first is not None
        await asyncio.shield(self._first)

    async def close(self) -> None:
        """Close the connection and stop reconnecting; waiting requests get Disconnected."""
        self._closed = True
        self._changed.set()
        link = self._link
        if link is not None:  # a clean close (TLS close_notify, FIN), briefly waited for
            link.writer.close()
            with contextlib.suppress(TimeoutError, OSError):
                async with asyncio.timeout(1.0):
                    await link.writer.wait_closed()
        tasks = [t for t in (self._runner, self._caller) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._first is not None and not self._first.done():
            self._first.set_exception(Disconnected("the client was closed while connecting"))
            self._first.exception()  # retrieved: nobody may be waiting

    # -- requests ----------------------------------------------------------------------------

    async def request(self, type: str, body: Any = None, *, timeout: float | None = None) -> Any:
        """Send a request and return its reply's body; ServiceError for an error frame."""
        timeout = self.request_timeout if timeout is None else timeout
        self._next_id += 1
        request = self._next_id
        frame = encode_frame(
            {"type": type, "id": request}, body, framing=self.framing, max_frame=self.max_frame
        )
        link: _Link | None = None
        try:
            async with asyncio.timeout(timeout):
                link = await self._ready()
                future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                link.pending[request] = (future, type)
                await self._write(link, frame)
                return await future
        except TimeoutError:
            message = f'no reply to "{type}" (id {request}) within {timeout:g} s'
            raise RequestTimeout(message) from None
        finally:
            if link is not None:
                link.pending.pop(request, None)

    async def send(self, type: str, body: Any = None, *, timeout: float | None = None) -> None:
        """Send a frame that asks for no reply (waits for a connection within ``timeout``)."""
        timeout = self.request_timeout if timeout is None else timeout
        frame = encode_frame({"type": type}, body, framing=self.framing, max_frame=self.max_frame)
        try:
            async with asyncio.timeout(timeout):
                await self._write(await self._ready(), frame)
        except TimeoutError:
            raise RequestTimeout(f'"{type}" not sent: no connection within {timeout:g} s') from None

    async def _ready(self) -> _Link:
        while True:
            if self._failure is not None:
                raise self._failure
            if self._closed:
                raise Disconnected("the client is closed")
            if self._runner is None:
                raise Disconnected("not connected: call connect() first")
            if self._link is not None:
                return self._link
            self._changed.clear()
            await self._changed.wait()

    @staticmethod
    async def _write(link: _Link, frame: bytes) -> None:
        try:
            link.writer.write(frame)
            await link.writer.drain()
        except OSError as exc:
            raise Disconnected(f"connection to {link.name} lost: {exc}") from exc

    # -- the connection ----------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._first is not None
        while not self._closed:
            try:
                link, decoder = await self._establish()
            except Exception as exc:  # ConnectFailed, a refused auth, or a bad host name
                self._failure = exc
                self._changed.set()
                if not self._first.done():
                    self._first.set_exception(exc)
                else:
                    log.error("framed client gave up: %s", exc)
                return
            self._link = link
            self._changed.set()
            if not self._first.done():
                self._first.set_result(None)
            reason = "the client is closed"
            try:
                reason = await self._read(link, decoder)
            except Exception as exc:  # a bug must cost the connection, not the client
                log.exception("framed client failed reading from %s", link.name)
                reason = f"client error: {exc!r}"
            finally:
                self._link = None
                link.drop("the client is closed" if self._closed else reason)
            if not self._closed:
                log.info("framed connection to %s lost (%s); reconnecting", link.name, reason)

    async def _establish(self) -> tuple[_Link, FrameDecoder]:
        """Connect and authenticate, trying endpoints in turn; raises ConnectFailed."""
        attempt = 0
        tried: list[str] = []
        while True:
            host, port = self.endpoints[attempt % len(self.endpoints)]
            name = f"{host}:{port}"
            if name not in tried:
                tried.append(name)
            try:
                async with asyncio.timeout(self.connect_timeout):
                    return await self._handshake((host, port))
            except ServiceError as exc:
                if exc.code == "auth-failed":
                    raise
                error: str = f"{name}: {exc}"
            except TimeoutError:
                error = f"{name}: no welcome within {self.connect_timeout:g} s"
            except (OSError, FrameError, Disconnected) as exc:
                error = f"{name}: {exc or type(exc).__name__}"
            attempt += 1
            log.debug("framed connection attempt %d failed: %s", attempt, error)
            if self.max_attempts is not None and attempt >= self.max_attempts:
                raise ConnectFailed(
                    f"gave up after {attempt} attempt(s) to {', '.join(tried)}; last error: {error}"
                )
            await self._sleep(self.delay(attempt - 1))

    async def _handshake(self, endpoint: Endpoint) -> tuple[_Link, FrameDecoder]:
        host, port = endpoint
        if self.ssl is not None:
            reader, writer = await asyncio.open_connection(
                host, port, ssl=self.ssl, server_hostname=self.server_hostname or host
            )
        else:
            reader, writer = await asyncio.open_connection(host, port)
        link = _Link(endpoint, reader, writer)
        try:
            header: dict[str, Any] = {"type": "auth"}
            if self.session_id is not None:
                header["session"] = self.session_id
            await self._write(link, encode_frame(header, self.credentials, framing=self.framing))
            decoder = FrameDecoder(self.framing, self.max_frame)
            while (frame := decoder.next_frame()) is None:
                data = await reader.read(_CHUNK)
                if not data:
                    raise Disconnected("closed before the welcome")
                decoder.feed(data)
            if frame.type == "error":
                raise _service_error(frame.body)
            if frame.type != "welcome" or not isinstance(frame.body, dict):
                raise Disconnected(f'expected a "welcome" frame, got "{frame.type}"')
        except BaseException:
            writer.transport.abort()
            raise
        welcome = frame.body
        self.session_id = str(welcome.get("session"))
        self.resumed = bool(welcome.get("resumed"))
        dead_after = welcome.get("dead_after")
        self._dead_after = float(dead_after) if isinstance(dead_after, int | float) else None
        if welcome.get("dropped"):
            log.warning("%s frames for this session were dropped", welcome["dropped"])
        return link, decoder

    async def _read(self, link: _Link, decoder: FrameDecoder) -> str:
        """Read frames until the connection ends; returns why it did."""
        while True:
            while True:
                try:
                    frame = decoder.next_frame()
                except FrameError as exc:
                    if exc.fatal:
                        return f"bad frame from the server: {exc}"
                    log.warning("bad frame from %s ignored: %s", link.name, exc)
                    continue
                if frame is None:
                    break
                await self._frame(link, frame)
            try:
                async with asyncio.timeout(self._dead_after):
                    data = await link.reader.read(_CHUNK)
            except TimeoutError:
                return f"nothing received for {self._dead_after:g} s"
            except OSError as exc:
                return str(exc) or type(exc).__name__
            if not data:
                last = f" ({link.last_error})" if link.last_error else ""
                return "closed by the server" + last
            decoder.feed(data)

    async def _frame(self, link: _Link, frame: Frame) -> None:
        kind, reply_to = frame.type, frame.reply_to
        if kind == "ping":
            header: dict[str, Any] = {"type": "pong"}
            if frame.id is not None:
                header["reply_to"] = frame.id
            link.writer.write(encode_frame(header, framing=self.framing))
            return
        if reply_to is not None:
            future, _ = link.pending.pop(reply_to, (None, ""))
            if future is None or future.done():
                return  # a late reply: its request timed out
            if kind == "error":
                future.set_exception(_service_error(frame.body))
            else:
                future.set_result(frame.body)
            return
        if kind == "pong":
            return
        if kind == "error":
            error = _service_error(frame.body)
            link.last_error = str(error)
            log.warning("error frame from %s: %s", link.name, error)
        if self.on_broadcast is not None:
            await self._callbacks.put((kind, frame.body))  # full: stop reading (backpressure)

    async def _call_back(self) -> None:
        assert self.on_broadcast is not None
        while True:
            kind, body = await self._callbacks.get()
            try:
                result = self.on_broadcast(kind, body)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("on_broadcast raised for %r", kind)


def _service_error(body: Any) -> ServiceError:
    if isinstance(body, dict):
        return ServiceError(str(body.get("code", "error")), str(body.get("message", "")))
    return ServiceError("error", repr(body))


def _endpoints(endpoints: Sequence[Endpoint]) -> tuple[Endpoint, ...]:
    checked = []
    for index, endpoint in enumerate(endpoints):
        ok = isinstance(endpoint, tuple | list) and len(endpoint) == 2
        if not ok or not isinstance(endpoint[0], str) or not isinstance(endpoint[1], int):
            raise ConfigError(
                f"FramedClient.endpoints[{index}]", f"expected (host, port), got {endpoint!r}"
            )
        checked.append((endpoint[0], endpoint[1]))
    if not checked:
        raise ConfigError("FramedClient.endpoints", "expected at least one (host, port)")
    return tuple(checked)
