"""A framed-protocol service for socket-handler routes: JSON frames dispatched by type.

::

    service = FramedService(authenticate=check_password)

    @service.on("say")
    async def say(session, body):
        await service.broadcast("said", {"who": session.identity, "text": body}, group="lobby")
        return {"ok": True}

    route = {"match": {...}, "action": {"type": "socket-handler",
                                        "socket_handler": service.handler, "tls": {...}}}

Frames are those of :mod:`smartroute.helpers.frames`. A frame with ``header.id`` is a request
and gets exactly one reply (``header.reply_to = id``, ``type`` the request's) or one error
frame. Frames of one connection are handled in order, one at a time. Every outgoing frame goes
through the session's bounded outbox (see :mod:`~smartroute.helpers.framed_sessions`).

What the service closes on (after a last error frame): a frame over ``max_frame``
(``too-large``: the stream cannot be resynchronised), a first frame that is not ``auth`` when
``authenticate`` is set (``auth-required``), a refused ``auth`` (``auth-failed``), a full
outbox (``too-slow``), another connection resuming the session (``replaced``), nothing
received for ``dead_after`` seconds (``timeout``), :meth:`FramedService.close` (``shutdown``).
What it answers with an error frame and reads on: invalid JSON (``invalid-json``), a JSON value
that is not a frame (``bad-frame``), a type without handler (``unknown-type``), ``auth`` after
authentication (``already-authenticated``), a handler that raised (``internal``, logged) or
raised :class:`ServiceError` (its own code).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from smartroute.context import RouteContext
from smartroute.errors import ConfigError, FrameError, ServiceError
from smartroute.helpers.framed_sessions import Session, SessionBook
from smartroute.helpers.frames import (
    DEFAULT_MAX_FRAME,
    Frame,
    FrameDecoder,
    Framing,
    check_framing,
    encode_frame,
    error_frame,
)

log = logging.getLogger("smartroute.framed")

Handler = Callable[[Session, Any], "Awaitable[Any] | Any"]
DefaultHandler = Callable[[Session, str, Any], "Awaitable[Any] | Any"]
Authenticate = Callable[[Any, RouteContext], "Awaitable[Any] | Any"]
H = TypeVar("H", bound=Handler)
D = TypeVar("D", bound=DefaultHandler)

RESERVED = frozenset(("auth", "welcome", "ping", "pong", "error"))
_CHUNK = 65536  # bytes read, and written, at once
_CLOSE_GRACE = 2.0  # seconds a closing connection may take to flush its last frames


async def _result(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class FramedService:
    """Handlers, sessions and groups of one framed protocol; ``handler`` serves a route."""

    def __init__(
        self,
        *,
        framing: Framing = "lines",
        max_frame: int = DEFAULT_MAX_FRAME,
        authenticate: Authenticate | None = None,
        session_lifespan: float = 300.0,
        ping_interval: float | None = 15.0,
        dead_after: float | None = 45.0,
        queue_frames: int = 1024,
        queue_bytes: int = 1 << 20,
    ) -> None:
        check_framing(framing, max_frame, "FramedService")
        _check_seconds(session_lifespan, "session_lifespan", optional=False)
        _check_seconds(ping_interval, "ping_interval")
        _check_seconds(dead_after, "dead_after")
        if ping_interval and dead_after and dead_after <= ping_interval:
            raise ConfigError(
                "FramedService.dead_after",
                f"{dead_after} must be longer than ping_interval ({ping_interval}), or a live "
                "idle client would be taken for dead",
            )
        if not isinstance(queue_frames, int) or queue_frames < 1:
            raise ConfigError("FramedService.queue_frames", f"expected >= 1, got {queue_frames!r}")
        if not isinstance(queue_bytes, int) or queue_bytes < max_frame + 4:
            raise ConfigError(
                "FramedService.queue_bytes",
                f"expected at least max_frame + 4 ({max_frame + 4}), got {queue_bytes!r}",
            )
        if authenticate is not None and not callable(authenticate):
            raise ConfigError("FramedService.authenticate", "expected a function or None")
        self.framing: Framing = framing
        self.max_frame = max_frame
        self.authenticate = authenticate
        self.ping_interval = ping_interval or None
        self.dead_after = dead_after or None
        self.sessions = SessionBook(
            framing=framing,
            max_frame=max_frame,
            lifespan=session_lifespan,
            queue_frames=queue_frames,
            queue_bytes=queue_bytes,
        )
        self._handlers: dict[str, Handler] = {}
        self._default: DefaultHandler | None = None
        self._connections: dict[_Connection, asyncio.Task[Any]] = {}
        self._closed = False

    # -- registration ----------------------------------------------------------------------

    def on(self, type: str) -> Callable[[H], H]:
        """Decorator: ``handler(session, body)`` answers frames of ``type``."""
        if not isinstance(type, str) or not type or type in RESERVED:
            raise ConfigError(
                "FramedService.on", f"{type!r} is not a usable frame type (reserved or empty)"
            )

        def register(fn: H) -> H:
            self._handlers[type] = fn
            return fn

        return register

    def default(self, fn: D) -> D:
        """Decorator: ``fn(session, type, body)`` answers frames of every other type."""
        self._default = fn
        return fn

    # -- sending ---------------------------------------------------------------------------

    def encode(self, header: dict[str, Any], body: Any = None) -> bytes:
        return encode_frame(header, body, framing=self.framing, max_frame=self.max_frame)

    async def broadcast(
        self,
        type: str,
        body: Any = None,
        *,
        group: str | None = None,
        exclude: Session | None = None,
    ) -> int:
        """Queue one frame for every session (or every member of ``group``) but ``exclude``.

        Never waits for a reader: a session whose outbox is full misses the frame and its
        connection is closed (``too-slow``). Detached sessions get it when they resume.
        Returns how many sessions it was queued for.
        """
        frame = self.encode({"type": type}, body)  # encoded once, shared by every outbox
        targets = self.sessions.members(group) if group is not None else self.sessions
        count = sum(1 for s in targets if s is not exclude and s.enqueue(frame))
        await asyncio.sleep(0)  # let the writers run between broadcasts
        return count

    # -- serving ---------------------------------------------------------------------------

    async def handler(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: RouteContext
    ) -> None:
        """The socket handler to put in a route's action."""
        connection = _Connection(self, reader, writer, ctx)
        task = asyncio.current_task()
        assert task is not None
        self._connections[connection] = task
        try:
            if self._closed:
                connection.end("shutdown", "the service is shutting down", flush=True)
            await connection.serve()
        finally:
            del self._connections[connection]

    async def close(self, timeout: float = _CLOSE_GRACE) -> None:
        """Close every connection (``shutdown``), wait up to ``timeout``, forget every session."""
        self._closed = True
        for connection in list(self._connections):
            connection.end("shutdown", "the service is shutting down", flush=True)
        tasks = list(self._connections.values())
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        for session in self.sessions:
            self.sessions.expire(session)


def _check_seconds(value: object, name: str, *, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"FramedService.{name}", f"expected seconds >= 0, got {value!r}")


class _Connection:
    """One client connection: reads and dispatches frames, writes its session's outbox."""

    def __init__(
        self,
        service: FramedService,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        ctx: RouteContext,
    ) -> None:
        self.service = service
        self.reader = reader
        self.writer = writer
        self.ctx = ctx
        self.session: Session | None = None
        self._ended = asyncio.Event()
        self._reading: asyncio.Task[None] | None = None
        self._busy = False  # the reading task runs a user function: let it finish
        self._tasks: list[asyncio.Task[None]] = []  # the writer and the pinger

    def end(self, code: str | None = None, message: str = "", *, flush: bool = False) -> None:
        """Close the connection, with a last error frame ``code`` when given; ``flush``: send
        what the outbox holds first (else it stays there for a resumed session)."""
        if self._ended.is_set():
            return
        self._ended.set()
        for task in self._tasks:
            task.cancel()  # at once: a pump must not take frames a new connection should get
        self._stop_reading()
        if self.writer.transport.is_closing():
            return
        session = self.session
        while flush and session is not None and session.link is self and session.queued[0]:
            self.writer.write(session.take(_CHUNK))
        if code is not None:
            self.writer.write(error_frame(code, message, framing=self.service.framing))

    def _stop_reading(self) -> None:
        reading = self._reading
        if reading is not None and not self._busy and reading is not asyncio.current_task():
            reading.cancel()

    async def serve(self) -> None:
        self._reading = reading = asyncio.create_task(self._read())
        try:
            await self._ended.wait()
            self._stop_reading()  # if end() came before the reading task began
            await asyncio.gather(reading, *self._tasks, return_exceptions=True)
        except asyncio.CancelledError:
            self._ended.set()
            self.writer.transport.abort()  # the proxy ends the connection
            for task in (reading, *self._tasks):
                task.cancel()
            raise
        finally:
            if self.session is not None:
                self.service.sessions.detach(self.session, self)
        self.writer.close()
        try:
            async with asyncio.timeout(_CLOSE_GRACE):
                await self.writer.wait_closed()
        except (TimeoutError, OSError):
            self.writer.transport.abort()  # a peer that does not read its last frames

    async def _read(self) -> None:
        service = self.service
        decoder = FrameDecoder(service.framing, service.max_frame)
        try:
            while True:
                try:
                    async with asyncio.timeout(service.dead_after):
                        data = await self.reader.read(_CHUNK)
                except TimeoutError:
                    self.end("timeout", f"nothing received for {service.dead_after:g} s")
                    return
                if not data:
                    break
                decoder.feed(data)
                while not self._ended.is_set():
                    try:
                        frame = decoder.next_frame()
                    except FrameError as exc:
                        self._bad_frame(exc)
                        continue
                    if frame is None:
                        break
                    self._busy = True
                    try:
                        await self._frame(frame)
                    finally:
                        self._busy = False
                if self._ended.is_set():
                    return
        except OSError:
            pass  # reset or broken TLS: the connection is gone
        except Exception:
            log.exception("framed connection %s failed", self.ctx.connection_id)
        self.end(flush=True)  # the peer's EOF: it may still read the replies

    def _bad_frame(self, exc: FrameError) -> None:
        if exc.fatal or (self.session is None and self.service.authenticate is not None):
            self.end(exc.code, str(exc), flush=True)
            return
        self._error(exc.code, str(exc), exc.reply_to)

    def _send(self, frame: bytes) -> None:
        if self.session is None:
            self._attach(self.service.sessions.create(None), None)
        if self.session is not None:
            self.session.enqueue(frame)

    def _error(self, code: str, message: str, reply_to: int | None = None) -> None:
        self._send(error_frame(code, message, reply_to=reply_to, framing=self.service.framing))

    async def _frame(self, frame: Frame) -> None:
        kind = frame.type
        if kind == "auth":
            if self.session is None:
                await self._authenticate(frame)
            else:
                self._error("already-authenticated", "this connection is authenticated", frame.id)
            return
        if self.session is None:
            if self.service.authenticate is not None:
                self.end(
                    "auth-required",
                    f'the first frame must be {{"header": {{"type": "auth"}}, ...}}, got "{kind}"',
                )
                return
            self._attach(self.service.sessions.create(None), None)
        if kind == "ping":
            self._send(self._encode({"type": "pong", "reply_to": frame.id}))
        elif kind != "pong":
            await self._dispatch(frame)

    def _encode(self, header: dict[str, Any], body: Any = None) -> bytes:
        return self.service.encode({k: v for k, v in header.items() if v is not None}, body)

    async def _authenticate(self, frame: Frame) -> None:
        service = self.service
        wanted = frame.header.get("session")
        if wanted is not None and not isinstance(wanted, str):
            self.end("bad-frame", "header.session must be a string (a session id)")
            return
        identity = None
        if service.authenticate is not None:
            try:
                identity = await _result(service.authenticate(frame.body, self.ctx))
            except Exception:
                log.exception("authenticate raised; connection refused")
                identity = None
            if identity is None or identity is False:
                self.end("auth-failed", "authentication refused")
                return
        if self._ended.is_set():
            return  # ended while authenticate ran (the service closed): nothing to attach
        session = service.sessions.find(wanted, identity) if wanted else None
        resumed = session is not None
        session = session or service.sessions.create(identity)
        welcome = {
            "session": session.id,
            "resumed": resumed,
            "dropped": session.dropped,
            "ping_interval": service.ping_interval,
            "dead_after": service.dead_after,
        }
        session.dropped = 0
        self._attach(session, self._encode({"type": "welcome", "reply_to": frame.id}, welcome))

    def _attach(self, session: Session, welcome: bytes | None) -> None:
        book = self.service.sessions
        if self._ended.is_set():  # too late: let the session wait for a resume, or expire
            if session.link is None:
                book.attach(session, self)
                book.detach(session, self)
            return
        replaced = book.attach(session, self)
        if replaced is not None:
            replaced.end("replaced", "this session was resumed by another connection")
        self.session = session
        if welcome is not None:
            session.enqueue(welcome, first=True)
        self._tasks.append(asyncio.create_task(self._pump(session)))
        if self.service.ping_interval:
            self._tasks.append(asyncio.create_task(self._ping(session, self.service.ping_interval)))

    async def _dispatch(self, frame: Frame) -> None:
        session, kind, request = self.session, frame.type, frame.id
        assert session is not None
        service = self.service
        handler = service._handlers.get(kind)
        if handler is None and service._default is None:
            self._error("unknown-type", f'no handler for frame type "{kind}"', request)
            return
        try:
            if handler is not None:
                reply = await _result(handler(session, frame.body))
            else:
                assert service._default is not None
                reply = await _result(service._default(session, kind, frame.body))
        except ServiceError as exc:
            self._error(exc.code, exc.message, request)
            return
        except Exception:
            log.exception("handler for framed type %r raised", kind)
            self._error("internal", f'the handler for "{kind}" failed', request)
            return
        if request is None:
            return
        try:
            self._send(self._encode({"type": kind, "reply_to": request}, reply))
        except FrameError as exc:  # not JSON, or over max_frame
            log.error("reply to %r cannot be sent: %s", kind, exc)
            self._error("internal", f'the reply to "{kind}" cannot be sent ({exc.code})', request)

    async def _pump(self, session: Session) -> None:
        """Write the session's outbox, at the pace the peer reads it."""
        writer = self.writer
        try:
            while session.link is self:
                await session.wait()
                if session.link is not self:
                    break
                if writer.transport.is_closing():  # lost: leave the frames to a resumed session
                    break
                writer.write(session.take(_CHUNK))
                await writer.drain()
        except OSError:
            pass
        self.end()

    async def _ping(self, session: Session, interval: float) -> None:
        ping = self.service.encode({"type": "ping"})
        while session.link is self:
            await asyncio.sleep(interval)
            session.enqueue(ping)
