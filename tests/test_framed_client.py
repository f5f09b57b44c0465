"""FramedClient against a FramedService behind a real SmartRoute (TLS-terminated), with a relay
the test can cut: requests and broadcasts, errors and timeouts, reconnection with backoff and
jitter across fallback endpoints, session resumption, pings both ways, giving up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from typing import Any

import pytest
from support import LOOPBACK, TestCA, async_test, free_port, free_ports, serve

from smartroute import RouteContext, SmartRoute
from smartroute.errors import ConfigError
from smartroute.helpers import (
    ConnectFailed,
    Disconnected,
    FramedClient,
    FramedService,
    FrameError,
    RequestTimeout,
    ServiceError,
    Session,
    create_socket_handler_route,
    encode_frame,
)

NAME = "framed.test"


def make_service(**settings: Any) -> FramedService:
    service = FramedService(
        authenticate=lambda body, ctx: body if body in ("ann", "ben") else None, **settings
    )
    release, entered = asyncio.Event(), asyncio.Event()

    @service.on("echo")
    async def echo(session: Session, body: Any) -> Any:
        return body

    @service.on("join")
    async def join(session: Session, body: Any) -> list[str]:
        session.join(body)
        return sorted(session.groups)

    @service.on("shout")
    async def shout(session: Session, body: Any) -> int:
        return await service.broadcast("shouted", {"from": session.identity, "text": body})

    @service.on("hang")
    async def hang(session: Session, body: Any) -> str:
        entered.set()
        await release.wait()
        return "late"

    service.release, service.entered = release, entered  # type: ignore[attr-defined]
    return service


@contextlib.asynccontextmanager
async def serving(service: FramedService, ca: TestCA, **settings: Any) -> AsyncIterator[int]:
    port = free_port()
    pair = ca.issue(NAME)
    route = create_socket_handler_route(NAME, port, service.handler, name="framed")
    route["action"]["tls"] = {
        "mode": "terminate",
        "certificate": {"cert": pair.cert_pem, "key": pair.key_pem},
    }
    async with SmartRoute([route], bind_address=LOOPBACK, graceful_shutdown_timeout=1, **settings):
        try:
            yield port
        finally:
            service.release.set()  # type: ignore[attr-defined]
            await service.close()


class Relay:
    """A TCP relay in front of the proxy; ``cut()`` resets every connection through it."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.writers: list[asyncio.StreamWriter] = []
        self.accepted = 0
        self.refusing = False

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.close()
            return
        self.accepted += 1
        up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.target)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()


def client(ca: TestCA, port: int, **settings: Any) -> FramedClient:
    settings.setdefault("credentials", "ann")
    return FramedClient(
        [(LOOPBACK, port)], ssl=ca.client_context(), server_hostname=NAME, **settings
    )


class Sleeps:
    """An injected ``sleep``: records each delay, waits for none."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.gate: asyncio.Event | None = None  # when set: hold every sleep until it is set

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)
        if self.gate is not None:
            await self.gate.wait()


@async_test()
async def test_requests_sends_and_broadcasts(ca: TestCA) -> None:
    service = make_service()
    heard: list[tuple[str, Any]] = []
    got = asyncio.Event()

    async def on_broadcast(kind: str, body: Any) -> None:  # async callbacks work too
        heard.append((kind, body))
        got.set()

    async with serving(service, ca) as port:
        async with client(ca, port, on_broadcast=lambda k, b: heard.append((k, b))) as ann, \
                client(ca, port, credentials="ben", on_broadcast=on_broadcast) as ben:  # fmt: skip
            assert ann.connected and ann.endpoint == (LOOPBACK, port) and ann.session_id
            assert ann.resumed is False and ann.session_id != ben.session_id
            assert await ann.request("echo", {"a": [1, 2]}) == {"a": [1, 2]}
            assert await ann.request("join", "room") == ["room"]
            assert await ann.request("shout", "hey") == 2
            async with asyncio.timeout(5):
                while len(heard) < 2:
                    got.clear()
                    await got.wait()
            assert heard == [("shouted", {"from": "ann", "text": "hey"})] * 2
            await ben.send("echo", "no reply expected")
            with pytest.raises(ServiceError) as caught:
                await ben.request("dance", 1)
            assert (caught.value.code, caught.value.message) == (
                "unknown-type",
                'no handler for frame type "dance"',
            )
            assert await ben.request("echo", "still fine") == "still fine"
        assert not ann.connected
        with pytest.raises(Disconnected, match="the client is closed"):
            await ann.request("echo", 1)


@async_test()
async def test_timeouts_and_a_late_reply_leave_the_connection_usable(ca: TestCA) -> None:
    service = make_service()
    async with serving(service, ca) as port:
        async with client(ca, port, request_timeout=0.1) as ann:
            with pytest.raises(RequestTimeout, match=r'no reply to "hang" \(id 1\) within 0.1 s'):
                await ann.request("hang")
            service.release.set()  # type: ignore[attr-defined]
            assert (
                await ann.request("echo", "after", timeout=5) == "after"
            )  # the late reply is dropped
            with pytest.raises(FrameError, match="over the limit of 65536 bytes"):
                await ann.request("echo", "x" * 70000)


@async_test()
async def test_a_dropped_connection_fails_pending_requests_then_resumes_the_session(
    ca: TestCA,
) -> None:
    service = make_service(session_lifespan=30)
    heard: list[Any] = []
    async with serving(service, ca) as port:
        relay = Relay(port)
        async with serve(relay.handle) as relay_port:
            sleeps = Sleeps()
            async with client(
                ca, relay_port, on_broadcast=lambda k, b: heard.append(b), sleep=sleeps
            ) as ann:
                first = ann.session_id
                assert await ann.request("join", "room") == ["room"]
                pending = asyncio.create_task(ann.request("hang"))
                await service.entered.wait()  # type: ignore[attr-defined]
                relay.cut()
                with pytest.raises(Disconnected) as lost:
                    await pending
                assert (
                    f'connection to {LOOPBACK}:{relay_port} lost before the reply to "hang" (id 2)'
                    in str(lost.value)
                )
                assert await ann.request("echo", "again") == "again"  # waited for the reconnection
                assert ann.session_id == first and ann.resumed is True
                assert relay.accepted == 2 and sleeps.delays == []  # the first retry is at once
                assert await ann.request("join", "other") == ["other", "room"]  # groups kept
                service.release.set()  # type: ignore[attr-defined]

                # Away for longer: the relay refuses, the client backs off (held in its sleep).
                sleeps.gate = asyncio.Event()
                relay.refusing = True
                relay.cut()
                [session] = list(service.sessions)
                async with asyncio.timeout(5):
                    while session.connected or not sleeps.delays:
                        await asyncio.sleep(0.01)
                assert await service.broadcast("news", "while away", group="room") == 1
                relay.refusing = False
                sleeps.gate.set()
                assert await ann.request("echo", "back") == "back"
                assert ann.session_id == first and "while away" in heard
                assert 0.08 <= sleeps.delays[0] <= 0.12  # backoff 0.1 +- 20 %
            relay.cut()


@async_test()
async def test_the_fallback_endpoint_takes_over_with_backoff_and_jitter(ca: TestCA) -> None:
    service = make_service()
    dead = free_port()
    async with serving(service, ca) as port:
        sleeps = Sleeps()
        ann = FramedClient(
            [(LOOPBACK, dead), (LOOPBACK, dead), (LOOPBACK, port)],
            ssl=ca.client_context(),
            server_hostname=NAME,
            credentials="ann",
            backoff=0.5,
            jitter=0.2,
            sleep=sleeps,
        )
        async with ann:
            assert ann.endpoint == (LOOPBACK, port)
            assert await ann.request("echo", 1) == 1
        assert len(sleeps.delays) == 2
        for attempt, delay in enumerate(sleeps.delays):
            base = 0.5 * 2**attempt
            assert base * 0.8 <= delay <= base * 1.2


@async_test()
async def test_max_attempts_gives_up_naming_the_endpoints_and_the_last_error() -> None:
    first, second = free_ports(2)
    sleeps = Sleeps()
    values = iter([0.0, 1.0, 0.5, 0.0, 1.0])
    doomed = FramedClient(
        [(LOOPBACK, first), (LOOPBACK, second)],
        max_attempts=5,
        backoff=0.1,
        max_backoff=0.3,
        jitter=0.5,
        rng=lambda: next(values),
        sleep=sleeps,
    )
    with pytest.raises(ConnectFailed) as caught:
        await doomed.connect()
    message = str(caught.value)
    assert message.startswith(
        f"gave up after 5 attempt(s) to {LOOPBACK}:{first}, {LOOPBACK}:{second}; last error: {LOOPBACK}:{first}: "
    )
    assert "Connect call failed" in message or "refused" in message.lower()
    # backoff x 2**n capped at max_backoff, then spread by +-jitter: rng 0 -> -50 %, 1 -> +50 %
    assert sleeps.delays == pytest.approx([0.05, 0.3, 0.3, 0.15])
    with pytest.raises(ConnectFailed):
        await doomed.request("echo", 1)
    await doomed.close()


def test_delay_grows_then_stays_within_the_jitter_bounds() -> None:
    spread = FramedClient([(LOOPBACK, 1)], backoff=0.1, max_backoff=5.0, jitter=0.2)
    for attempt in range(200):
        base = min(5.0, 0.1 * 2**attempt)
        assert base * 0.8 <= spread.delay(attempt) <= base * 1.2
    exact = FramedClient([(LOOPBACK, 1)], backoff=1.0, max_backoff=8.0, jitter=0.0)
    assert [exact.delay(n) for n in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


@async_test()
async def test_a_refused_authentication_is_final(ca: TestCA) -> None:
    service = make_service()
    async with serving(service, ca) as port:
        sleeps = Sleeps()
        mallory = client(ca, port, credentials="mallory", sleep=sleeps)
        with pytest.raises(ServiceError) as caught:
            await mallory.connect()
        assert (caught.value.code, caught.value.message) == (
            "auth-failed",
            "authentication refused",
        )
        assert sleeps.delays == []
        with pytest.raises(ServiceError):
            await mallory.request("echo", 1)
        await mallory.close()


@async_test()
async def test_pings_keep_an_idle_client_connected(ca: TestCA) -> None:
    service = make_service(ping_interval=0.05, dead_after=0.2)
    async with serving(service, ca) as port:
        async with client(ca, port) as ann:
            [session] = list(service.sessions)
            link = session.link
            await asyncio.sleep(0.7)  # idle for over three times dead_after
            assert session.link is link and ann.connected
            assert await ann.request("echo", "awake") == "awake"


@async_test()
async def test_a_silent_server_is_left_and_odd_handshakes_are_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    conversations: list[str] = []

    async def fake(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: RouteContext
    ) -> None:
        """First a wrong greeting, then a server that goes silent after its welcome."""
        auth = await reader.readline()
        conversations.append(auth.decode())
        if len(conversations) == 1:
            writer.write(encode_frame({"type": "hello"}))
        else:
            welcome = {"session": f"s{len(conversations)}", "resumed": False, "dead_after": 0.2}
            writer.write(encode_frame({"type": "welcome"}, welcome))
            writer.write(b"this is not json\n")
            writer.write(encode_frame({"type": "error"}, {"code": "x", "message": "unasked"}))
        await reader.read()  # never answers anything else
        writer.close()

    route = create_socket_handler_route(None, port, fake, name="fake")
    async with SmartRoute([route], bind_address=LOOPBACK, graceful_shutdown_timeout=1):
        sleeps = Sleeps()
        heard: list[tuple[str, Any]] = []
        with caplog.at_level(logging.WARNING, "smartroute.framed"):
            async with FramedClient(
                [(LOOPBACK, port)],
                credentials={"k": 1},
                sleep=sleeps,
                on_broadcast=lambda k, b: heard.append((k, b)),
            ) as dumb:
                assert dumb.session_id == "s2" and len(sleeps.delays) == 1
                async with asyncio.timeout(5):
                    while dumb.session_id != "s3":  # left after 0.2 s of silence
                        await asyncio.sleep(0.01)
                assert '{"header":{"type":"auth","session":"s2"},"body":{"k":1}}\n' in conversations
        assert ("error", {"code": "x", "message": "unasked"}) in heard
        assert "bad frame from" in caplog.text and "error frame from" in caplog.text


@async_test()
async def test_a_new_client_resumes_a_session_by_id_and_callbacks_may_fail(
    ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    service = make_service()

    def broken(kind: str, body: Any) -> None:
        raise RuntimeError("callback bug")

    async with serving(service, ca) as port:
        async with client(ca, port, on_broadcast=broken) as first:
            await first.request("join", "room")
            session_id = first.session_id
            with caplog.at_level(logging.ERROR, "smartroute.framed"):
                await service.broadcast("news", 1)
                assert await first.request("echo", "alive") == "alive"
        async with client(ca, port, session_id=session_id) as second:
            assert second.resumed and second.session_id == session_id
            assert await second.request("join", "more") == ["more", "room"]
        async with client(ca, port, credentials="ben", session_id=session_id) as other:
            assert not other.resumed and other.session_id != session_id
    assert "on_broadcast raised for 'news'" in caplog.text


@async_test()
async def test_requests_before_connect_and_close_while_connecting() -> None:
    lonely = FramedClient([(LOOPBACK, free_port())], sleep=Sleeps())
    with pytest.raises(Disconnected, match=r"not connected: call connect\(\) first"):
        await lonely.request("echo", 1)
    connecting = asyncio.create_task(lonely.connect())
    await asyncio.sleep(0.05)
    await lonely.close()
    with pytest.raises(Disconnected, match="closed while connecting"):
        await connecting
    with pytest.raises(Disconnected, match="the client is closed"):
        await lonely.connect()


@pytest.mark.parametrize(
    ("endpoints", "settings", "message"),
    [
        ([], {}, "FramedClient.endpoints: expected at least one (host, port)"),
        ([("h", "80")], {}, "FramedClient.endpoints[0]: expected (host, port), got ('h', '80')"),
        (
            [("h", 1)],
            {"max_attempts": 0},
            "FramedClient.max_attempts: expected None or >= 1, got 0",
        ),
        ([("h", 1)], {"jitter": 2}, "FramedClient.jitter: expected a fraction in 0-1, got 2"),
        ([("h", 1)], {"backoff": 9}, "FramedClient.backoff: expected 0 <= backoff <= max_backoff"),
        (
            [("h", 1)],
            {"framing": "csv"},
            'FramedClient.framing: expected "lines" or "length", got \'csv\'',
        ),
    ],
)
def test_settings_are_checked(endpoints: Any, settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        FramedClient(endpoints, **settings)
    assert str(caught.value) == message


@async_test()
async def test_length_framing_end_to_end(ca: TestCA) -> None:
    service = make_service(framing="length")
    async with serving(service, ca) as port:
        async with client(ca, port, framing="length") as ann:
            assert await ann.request("echo", "é" * 1000) == "é" * 1000


@async_test()
async def test_an_untrusted_certificate_is_retried_then_reported(ca: TestCA) -> None:
    service = make_service()
    async with serving(service, ca) as port:
        sleeps = Sleeps()
        wary = FramedClient(
            [(LOOPBACK, port)],
            ssl=ssl.create_default_context(),
            server_hostname=NAME,
            max_attempts=2,
            sleep=sleeps,
        )
        with pytest.raises(ConnectFailed, match="CERTIFICATE_VERIFY_FAILED"):
            await wary.connect()
        assert len(sleeps.delays) == 1
        await wary.close()


@async_test()
async def test_giving_up_after_a_drop_fails_later_requests(
    ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    service = make_service()
    async with serving(service, ca) as port:
        relay = Relay(port)
        async with serve(relay.handle) as relay_port:
            ann = client(ca, relay_port, max_attempts=2, sleep=Sleeps())
            await ann.connect()
            relay.refusing = True
            with caplog.at_level(logging.ERROR, "smartroute.framed"):
                relay.cut()
                async with asyncio.timeout(5):
                    while ann.connected:
                        await asyncio.sleep(0.01)
                with pytest.raises(
                    ConnectFailed,
                    match=rf"gave up after 2 attempt\(s\) to {LOOPBACK}:{relay_port}; last error: {LOOPBACK}:{relay_port}: ",
                ):
                    await ann.request("echo", 1)
            assert "framed client gave up" in caplog.text
            await ann.close()


@async_test()
async def test_a_service_that_shuts_down_is_retried_like_a_lost_connection(ca: TestCA) -> None:
    service = make_service()
    async with serving(service, ca) as port:
        await service.close()
        late = client(ca, port, max_attempts=2, sleep=Sleeps())
        with pytest.raises(
            ConnectFailed, match="last error: .*: shutdown: the service is shutting down"
        ):
            await late.connect()
        await late.close()


def test_an_error_no_retry_can_mend_ends_the_client_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def broken_connect(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("not a network error")

    monkeypatch.setattr(asyncio, "open_connection", broken_connect)

    @async_test()
    async def run() -> None:
        sleeps = Sleeps()
        broken = FramedClient([(LOOPBACK, 1)], sleep=sleeps)
        with pytest.raises(RuntimeError, match="not a network error"):
            await broken.connect()
        assert sleeps.delays == []
        with pytest.raises(RuntimeError):
            await broken.send("echo", 1)
        await broken.close()

    run()
