"""FramedService behind a real SmartRoute (plain and TLS-terminated), with raw peers on the wire:
dispatch, every bad input's error frame and close, auth, sessions that survive reconnection and
expire, pings and dead peers, broadcast, and the outbox bound against a peer that never reads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import pytest
from support import LOOPBACK, MIB, TestCA, async_test, free_port

from smartroute import RouteContext, SmartRoute
from smartroute.errors import ConfigError
from smartroute.helpers import (
    Frame,
    FrameDecoder,
    FramedService,
    ServiceError,
    Session,
    create_socket_handler_route,
    encode_frame,
)
from smartroute.helpers.frames import Framing

NAME = "framed.test"
PASSWORDS = {"ann": "a-pass", "ben": "b-pass"}


def check(credentials: Any, ctx: RouteContext) -> str | None:
    if isinstance(credentials, dict) and PASSWORDS.get(
        credentials.get("user", "")
    ) == credentials.get("password"):
        return str(credentials["user"])
    return None


@contextlib.asynccontextmanager
async def serving(service: FramedService, ca: TestCA | None = None) -> AsyncIterator[int]:
    """A SmartRoute on a free port whose route hands connections to ``service``."""
    port = free_port()
    route = create_socket_handler_route(None, port, service.handler, name="framed")
    if ca is not None:
        pair = ca.issue(NAME)
        route["match"]["domains"] = NAME
        route["action"]["tls"] = {
            "mode": "terminate",
            "certificate": {"cert": pair.cert_pem, "key": pair.key_pem},
        }
    async with SmartRoute([route], bind_address=LOOPBACK, graceful_shutdown_timeout=1):
        try:
            yield port
        finally:
            await service.close()


class Peer:
    """A raw client: writes bytes or frames, reads frames (answering nothing on its own)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, framing: Framing
    ) -> None:
        self.reader, self.writer, self.framing = reader, writer, framing
        self.decoder = FrameDecoder(framing, 1 << 20)

    @classmethod
    async def open(
        cls, port: int, *, ssl_context: ssl.SSLContext | None = None, framing: Framing = "lines"
    ) -> Peer:
        if ssl_context is None:
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
        else:
            reader, writer = await asyncio.open_connection(
                LOOPBACK, port, ssl=ssl_context, server_hostname=NAME
            )
        return cls(reader, writer, framing)

    def send(self, kind: str, body: Any = None, **header: Any) -> None:
        self.writer.write(encode_frame({"type": kind, **header}, body, framing=self.framing))

    async def frame(self, *, pings: bool = False, timeout: float = 5) -> Frame:
        """The next frame (pings skipped unless ``pings``); fails at EOF."""
        async with asyncio.timeout(timeout):
            while True:
                frame = self.decoder.next_frame()
                if frame is None:
                    data = await self.reader.read(65536)
                    assert data, "connection closed while a frame was expected"
                    self.decoder.feed(data)
                elif pings or frame.type != "ping":
                    return frame

    async def rest(self, timeout: float = 5) -> list[Frame]:
        """Every frame until the server closes (pings left out)."""
        frames = []
        async with asyncio.timeout(timeout):
            while data := await self.reader.read(65536):
                self.decoder.feed(data)
                while (frame := self.decoder.next_frame()) is not None:
                    if frame.type != "ping":
                        frames.append(frame)
        return frames

    async def auth(self, credentials: Any, **header: Any) -> dict[str, Any]:
        self.send("auth", credentials, **header)
        welcome = await self.frame()
        assert welcome.type == "welcome", welcome
        body: dict[str, Any] = welcome.body
        return body

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def error(frame: Frame) -> tuple[str, str, int | None]:
    assert frame.type == "error", frame
    return frame.body["code"], frame.body["message"], frame.reply_to


def echo_service(**settings: Any) -> FramedService:
    service = FramedService(**settings)

    @service.on("echo")
    async def echo(session: Session, body: Any) -> Any:
        return body

    @service.on("join")
    def join(session: Session, body: Any) -> list[str]:  # a plain function works too
        session.join(body)
        session.data.setdefault("joined", []).append(body)
        return sorted(session.groups)

    @service.on("boom")
    async def boom(session: Session, body: Any) -> Any:
        raise RuntimeError("handler bug")

    @service.on("refuse")
    async def refuse(session: Session, body: Any) -> Any:
        raise ServiceError("not-allowed", "you may not")

    @service.on("unjsonable")
    async def unjsonable(session: Session, body: Any) -> Any:
        return {1, 2}

    @service.on("tell")
    async def tell(session: Session, body: Any) -> None:
        await session.send("told", body)

    return service


@async_test()
async def test_requests_get_replies_over_tls(ca: TestCA) -> None:
    service = echo_service(authenticate=check)
    async with serving(service, ca) as port:
        peer = await Peer.open(port, ssl_context=ca.client_context())
        welcome = await peer.auth({"user": "ann", "password": "a-pass"}, id=1)
        assert welcome["resumed"] is False and welcome["dropped"] == 0
        assert welcome["ping_interval"] == 15.0 and welcome["dead_after"] == 45.0
        [session] = list(service.sessions)
        assert (session.id, session.identity, session.connected) == (
            welcome["session"],
            "ann",
            True,
        )
        assert session.ctx is not None and session.ctx.is_tls and session.ctx.domain == NAME
        peer.send("echo", {"x": [1, "é"]}, id=2)
        reply = await peer.frame()
        assert reply.header == {"type": "echo", "reply_to": 2} and reply.body == {"x": [1, "é"]}
        peer.send("echo", "no id, no reply")
        peer.send("tell", "pushed")
        peer.send("join", "room", id=3)
        assert (await peer.frame()).header == {"type": "told"}
        joined = await peer.frame()
        assert (joined.reply_to, joined.body) == (3, ["room"])
        peer.send("ping", id=4)
        assert (await peer.frame()).header == {"type": "pong", "reply_to": 4}
        await peer.close()


@pytest.mark.parametrize("framing", ["lines", "length"])
@async_test()
async def test_bad_input_gets_an_error_frame_and_the_connection_goes_on(framing: Framing) -> None:
    service = echo_service(authenticate=check, framing=framing)
    async with serving(service) as port:
        peer = await Peer.open(port, framing=framing)
        await peer.auth({"user": "ann", "password": "a-pass"})
        bad = [
            b"{not json" + (b"\n" if framing == "lines" else b""),
            b'{"header":{"id":5}}' + (b"\n" if framing == "lines" else b""),
        ]
        for raw in bad:
            peer.writer.write(raw if framing == "lines" else len(raw).to_bytes(4, "big") + raw)
        assert error(await peer.frame())[:1] == ("invalid-json",)
        assert error(await peer.frame()) == ("bad-frame", 'header has no "type"', 5)
        peer.send("dance", id=6)
        assert error(await peer.frame()) == ("unknown-type", 'no handler for frame type "dance"', 6)
        peer.send("auth", {"user": "ben", "password": "b-pass"}, id=7)
        assert error(await peer.frame()) == (
            "already-authenticated",
            "this connection is authenticated",
            7,
        )
        peer.send("refuse", id=8)
        assert error(await peer.frame()) == ("not-allowed", "you may not", 8)
        peer.send("unjsonable", id=9)
        assert error(await peer.frame()) == (
            "internal",
            'the reply to "unjsonable" cannot be sent (bad-frame)',
            9,
        )
        peer.send("dance")
        assert error(await peer.frame()) == (
            "unknown-type",
            'no handler for frame type "dance"',
            None,
        )
        peer.send("echo", "still here", id=10)
        assert (await peer.frame()).body == "still here"
        await peer.close()


@async_test()
async def test_a_raising_handler_costs_one_error_frame_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = echo_service()
    async with serving(service) as port:
        peers = [await Peer.open(port) for _ in range(2)]
        with caplog.at_level(logging.ERROR, "smartroute.framed"):
            peers[0].send("boom", id=1)
            assert error(await peers[0].frame()) == ("internal", 'the handler for "boom" failed', 1)
        assert (
            "handler for framed type 'boom' raised" in caplog.text and "handler bug" in caplog.text
        )
        for n, peer in enumerate(peers):
            peer.send("echo", n, id=2)
            assert (await peer.frame()).body == n
        fresh = await Peer.open(port)  # the proxy still takes connections
        fresh.send("echo", "new", id=1)
        assert (await fresh.frame()).body == "new"
        for peer in (*peers, fresh):
            await peer.close()


@pytest.mark.parametrize(
    ("first", "code", "message"),
    [
        (
            b'{"header":{"type":"echo","id":1},"body":1}\n',
            "auth-required",
            'the first frame must be {"header": {"type": "auth"}, ...}, got "echo"',
        ),
        (
            b'{"header":{"type":"auth"},"body":{"user":"ann","password":"wrong"}}\n',
            "auth-failed",
            "authentication refused",
        ),
        (b'{"header":{"type":"auth"},"body":"raise"}\n', "auth-failed", "authentication refused"),
        (
            b'{"header":{"type":"auth","session":5},"body":{"user":"ann","password":"a-pass"}}\n',
            "bad-frame",
            "header.session must be a string (a session id)",
        ),
        (
            b"garbage\n",
            "invalid-json",
            "frame is not valid JSON: Expecting value: line 1 column 1 (char 0)",
        ),
        (
            b'{"header":{"type":"auth"},"body":"' + b"x" * 70000 + b'"}\n',
            "too-large",
            "line longer than the limit of 65536 bytes",
        ),
    ],
    ids=[
        "not-auth",
        "wrong-password",
        "authenticate-raises",
        "bad-session-id",
        "not-json",
        "too-large",
    ],
)
@async_test()
async def test_refused_before_authentication_get_an_error_frame_then_a_close(
    first: bytes, code: str, message: str
) -> None:
    async def authenticate(credentials: Any, ctx: RouteContext) -> str | None:
        if credentials == "raise":
            raise RuntimeError("auth backend down")
        return check(credentials, ctx)

    service = echo_service(authenticate=authenticate)
    async with serving(service) as port:
        peer = await Peer.open(port)
        peer.writer.write(first)
        frames = await peer.rest()
        assert [error(f)[:2] for f in frames] == [(code, message)]
        assert len(service.sessions) == 0
        await peer.close()


@pytest.mark.parametrize("framing", ["lines", "length"])
@async_test()
async def test_a_frame_over_the_limit_closes_after_an_error_frame(framing: Framing) -> None:
    service = echo_service(framing=framing, max_frame=1000)
    async with serving(service) as port:
        peer = await Peer.open(port, framing=framing)
        peer.send("echo", "fine", id=1)
        peer.send("echo", "x" * 2000, id=2)
        frames = await peer.rest()
        assert frames[0].body == "fine"
        assert error(frames[1])[0] == "too-large" and "limit of 1000" in error(frames[1])[1]
        assert len(frames) == 2
        [session] = list(service.sessions)
        assert not session.connected  # detached, still resumable
        await peer.close()


@async_test()
async def test_without_authenticate_the_first_frame_starts_a_session_and_auth_resumes() -> None:
    service = echo_service(session_lifespan=30)
    async with serving(service) as port:
        anonymous = await Peer.open(port)
        anonymous.send("echo", 1, id=1)
        assert (await anonymous.frame()).body == 1
        bad = await Peer.open(port)
        bad.writer.write(b"nope\n")
        assert error(await bad.frame())[0] == "invalid-json"  # no auth needed: it goes on
        first = await Peer.open(port)
        welcome = await first.auth(None)
        first.send("join", "g", id=1)
        await first.frame()
        await first.close()
        again = await Peer.open(port)
        resumed = await again.auth("anything", session=welcome["session"])
        assert resumed["resumed"] is True and resumed["session"] == welcome["session"]
        assert service.sessions.get(welcome["session"]) is not None
        assert service.sessions.get(welcome["session"]).groups == {"g"}  # type: ignore[union-attr]
        for peer in (anonymous, bad, again):
            await peer.close()


@async_test()
async def test_a_resumed_session_keeps_identity_groups_data_and_queued_frames(ca: TestCA) -> None:
    service = echo_service(authenticate=check, queue_frames=3)
    ann = {"user": "ann", "password": "a-pass"}
    async with serving(service, ca) as port:
        peer = await Peer.open(port, ssl_context=ca.client_context())
        welcome = await peer.auth(ann)
        peer.send("join", "red", id=1)
        peer.send("join", "blue", id=2)
        assert (await peer.frame()).body == ["red"] and (await peer.frame()).body == ["blue", "red"]
        await peer.close()
        session = service.sessions.get(welcome["session"])
        assert session is not None
        async with asyncio.timeout(5):
            while session.connected:
                await asyncio.sleep(0.01)
        sent = [await service.broadcast("news", n, group="red") for n in range(5)]
        assert sent == [1, 1, 1, 0, 0]  # three fit in the outbox, two dropped and counted
        assert await service.broadcast("news", "other", group="green") == 0

        back = await Peer.open(port, ssl_context=ca.client_context())
        resumed = await back.auth(ann, session=welcome["session"], id=9)
        assert resumed == {**welcome, "resumed": True, "dropped": 2}
        assert [(await back.frame()).body for _ in range(3)] == [0, 1, 2]
        assert session.groups == {"red", "blue"} and session.data == {"joined": ["red", "blue"]}
        assert session.identity == "ann" and session.connected

        ben = await Peer.open(port, ssl_context=ca.client_context())
        other = await ben.auth({"user": "ben", "password": "b-pass"}, session=welcome["session"])
        assert other["resumed"] is False and other["session"] != welcome["session"]
        assert session.connected  # someone else's identity cannot take ann's session
        for p in (back, ben):
            await p.close()


@async_test()
async def test_resuming_a_connected_session_replaces_the_old_connection() -> None:
    service = echo_service()
    async with serving(service) as port:
        old = await Peer.open(port)
        welcome = await old.auth(None)
        new = await Peer.open(port)
        assert (await new.auth(None, session=welcome["session"]))["resumed"] is True
        frames = await old.rest()
        assert [error(f)[:2] for f in frames] == [
            ("replaced", "this session was resumed by another connection")
        ]
        new.send("echo", "mine", id=1)
        assert (await new.frame()).body == "mine"
        assert service.sessions.get(welcome["session"]).connected  # type: ignore[union-attr]
        for p in (old, new):
            await p.close()


@async_test()
async def test_a_session_expires_after_its_lifespan() -> None:
    service = echo_service(session_lifespan=0.2)
    async with serving(service) as port:
        peer = await Peer.open(port)
        welcome = await peer.auth(None)
        peer.send("join", "g", id=1)
        await peer.frame()
        session = service.sessions.get(welcome["session"])
        assert session is not None
        await peer.close()
        async with asyncio.timeout(5):
            while session.connected:
                await asyncio.sleep(0.01)
        detached = time.monotonic()
        assert service.sessions.get(session.id) is session  # within its lifespan
        async with asyncio.timeout(5):
            while service.sessions.get(session.id) is not None:
                await asyncio.sleep(0.02)
        assert time.monotonic() - detached >= 0.15
        assert session.expired and session.groups == frozenset()
        assert service.sessions.members("g") == []
        assert await session.send("late", 1) is False
        again = await Peer.open(port)
        assert (await again.auth(None, session=session.id))["resumed"] is False
        await again.close()

    ends_with_connection = echo_service(session_lifespan=0)
    async with serving(ends_with_connection) as port:
        peer = await Peer.open(port)
        await peer.auth(None)
        await peer.close()
        async with asyncio.timeout(5):
            while len(ends_with_connection.sessions):
                await asyncio.sleep(0.01)


@async_test()
async def test_pings_keep_a_live_peer_and_a_silent_one_is_closed() -> None:
    service = echo_service(ping_interval=0.05, dead_after=0.3)
    async with serving(service) as port:
        live = await Peer.open(port)
        await live.auth(None)
        silent = await Peer.open(port)
        await silent.auth(None)
        quiet = time.monotonic()
        closing = asyncio.create_task(silent.rest())
        while time.monotonic() - quiet < 0.8:  # over twice dead_after, answering pings
            ping = await live.frame(pings=True)
            assert ping.header == {"type": "ping"} and ping.body is None
            live.send("pong")
        frames = await closing
        waited = time.monotonic() - quiet
        assert [error(f) for f in frames] == [("timeout", "nothing received for 0.3 s", None)]
        assert 0.25 <= waited < 3
        live.send("echo", "alive", id=1)
        assert (await live.frame()).body == "alive"
        for p in (live, silent):
            await p.close()


@async_test()
async def test_broadcast_reaches_everyone_a_group_or_all_but_one() -> None:
    service = echo_service()
    async with serving(service) as port:
        peers = [await Peer.open(port) for _ in range(3)]
        for n, peer in enumerate(peers):
            await peer.auth(None)
            if n:
                peer.send("join", "odd" if n % 2 else "even", id=1)
                await peer.frame()
        sessions = {s.groups: s for s in service.sessions}
        assert await service.broadcast("all", 1) == 3
        assert await service.broadcast("odd", 2, group="odd") == 1
        assert await service.broadcast("most", 3, exclude=sessions[frozenset({"odd"})]) == 2
        assert [(await p.frame()).type for p in peers[0:1]] == ["all"]
        assert [(await peers[0].frame()).type] == ["most"]
        assert [(await peers[1].frame()).type for _ in range(2)] == ["all", "odd"]
        assert [(await peers[2].frame()).type for _ in range(2)] == ["all", "most"]
        for p in peers:
            await p.close()


@async_test(timeout=60)
async def test_a_peer_that_never_reads_cannot_make_broadcast_grow_memory(ca: TestCA) -> None:
    queue_bytes = 1 * MIB
    service = echo_service(ping_interval=None, queue_bytes=queue_bytes)
    body = "x" * 60_000
    total = 64 * MIB
    async with serving(service, ca) as port:
        slow = await Peer.open(port, ssl_context=ca.client_context())
        fast = await Peer.open(port, ssl_context=ca.client_context())
        await slow.auth(None)
        await fast.auth(None)
        stuck = next(
            s
            for s in service.sessions
            if s.ctx and s.ctx.client_port == slow.writer.get_extra_info("sockname")[1]
        )
        received = 0
        progress = asyncio.Event()

        async def read_fast() -> None:
            nonlocal received
            while True:
                frame = await fast.frame(timeout=20)
                assert frame.type == "bulk"
                received += 1
                progress.set()

        reader = asyncio.create_task(read_fast())
        tracemalloc.start()
        try:
            sent, worst = 0, 0
            while sent * len(body) < total:
                while sent - received > 8:  # the fast reader keeps up; nobody waits for the slow
                    progress.clear()
                    await progress.wait()
                await service.broadcast("bulk", body)
                sent += 1
                worst = max(worst, stuck.queued[1])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        async with asyncio.timeout(20):
            while received < sent:
                progress.clear()
                await progress.wait()
        reader.cancel()
        assert worst <= queue_bytes
        assert not stuck.connected and stuck.dropped > 0
        assert peak < 24 * MIB, (
            f"peak {peak / MIB:.1f} MiB while broadcasting {total / MIB:.0f} MiB"
        )
        frames = await slow.rest(timeout=10)  # what the slow peer gets once it reads at last
        code, message, _ = error(frames[-1])
        assert code == "too-slow" and "reads too slowly" in message
        assert all(f.type == "bulk" for f in frames[:-1]) and len(frames) < 200
        for p in (slow, fast):
            await p.close()


@async_test()
async def test_close_ends_every_connection_and_refuses_new_ones() -> None:
    service = echo_service()
    async with serving(service) as port:
        peer = await Peer.open(port)
        await peer.auth(None)
        await service.close()
        assert [error(f)[0] for f in await peer.rest()] == ["shutdown"]
        assert len(service.sessions) == 0
        late = await Peer.open(port)
        assert [error(f)[0] for f in await late.rest()] == ["shutdown"]
        for p in (peer, late):
            await p.close()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"framing": "xml"}, 'FramedService.framing: expected "lines" or "length", got \'xml\''),
        ({"max_frame": 3}, "FramedService.max_frame: expected bytes in 16-2**31, got 3"),
        ({"session_lifespan": -1}, "FramedService.session_lifespan: expected seconds >= 0, got -1"),
        (
            {"session_lifespan": None},
            "FramedService.session_lifespan: expected seconds >= 0, got None",
        ),
        ({"ping_interval": "5"}, "FramedService.ping_interval: expected seconds >= 0, got '5'"),
        (
            {"ping_interval": 10, "dead_after": 10},
            "FramedService.dead_after: 10 must be longer than ping_interval (10), or a live idle client would be taken for dead",
        ),
        ({"queue_frames": 0}, "FramedService.queue_frames: expected >= 1, got 0"),
        (
            {"queue_bytes": 1000},
            "FramedService.queue_bytes: expected at least max_frame + 4 (65540), got 1000",
        ),
        ({"authenticate": "yes"}, "FramedService.authenticate: expected a function or None"),
    ],
)
def test_settings_are_checked(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        FramedService(**settings)
    assert str(caught.value) == message


@pytest.mark.parametrize("kind", ["auth", "ping", "pong", "welcome", "error", ""])
def test_reserved_types_cannot_get_handlers(kind: str) -> None:
    with pytest.raises(ConfigError, match="is not a usable frame type"):
        FramedService().on(kind)


def test_the_handler_is_a_valid_socket_handler_and_sessions_print_well() -> None:
    from smartroute import validate_routes

    service = FramedService()
    validate_routes([create_socket_handler_route(None, 9000, service.handler)])
    session = service.sessions.create("ann")
    assert repr(session) == f"<Session {session.id[:8]}… 'ann' detached>"
    service.sessions.expire(session)
    assert repr(session).endswith("expired>")


@async_test()
async def test_the_default_handler_takes_every_other_type() -> None:
    service = echo_service()

    @service.default
    async def anything(session: Session, kind: str, body: Any) -> dict[str, Any]:
        return {"type": kind, "body": body}

    async with serving(service) as port:
        peer = await Peer.open(port)
        peer.send("dance", [1], id=1)
        assert (await peer.frame()).body == {"type": "dance", "body": [1]}
        peer.send("echo", "own handler first", id=2)
        assert (await peer.frame()).body == "own handler first"
        await peer.close()


@async_test()
async def test_stopping_the_proxy_ends_framed_connections_and_keeps_sessions() -> None:
    service = echo_service()
    port = free_port()
    route = create_socket_handler_route(None, port, service.handler)
    async with SmartRoute([route], bind_address=LOOPBACK, graceful_shutdown_timeout=0.1):
        peer = await Peer.open(port)
        welcome = await peer.auth(None)
    assert await peer.rest() == []
    session = service.sessions.get(welcome["session"])
    assert session is not None and not session.connected  # resumable on the next start
    await peer.close()
    await service.close()
