"""Event loops: the CLI picks uvloop when installed, and TLS termination works on both loops.

The rest of the suite runs on one loop per run (``SMARTROUTE_TEST_LOOP=uvloop`` chooses
uvloop); the tests here create asyncio's loop and uvloop's explicitly, in the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import ssl
import sys
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from support import (
    LOOPBACK,
    TestCA,
    async_test,
    echo_handler,
    free_port,
    free_port_range,
    read_exactly,
    read_line,
    run_on_loop,
    serve,
)

from smartroute import SmartRoute
from smartroute.cli import LOOP_ENV, _run_loop, choose_loop
from smartroute.errors import SmartRouteError
from smartroute.protocols.tls import parse_client_hello
from smartroute.routing.model import CertificatePair
from smartroute.server.tls import CertificateIndex, accept_tls

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def require_uvloop() -> LoopFactory:
    """uvloop's loop factory; missing uvloop is a failure in CI and a skip elsewhere."""
    if importlib.util.find_spec("uvloop") is None:
        message = "uvloop is not installed (pip install -e '.[test]' installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    import uvloop

    return uvloop.new_event_loop


def loop_factory(name: str) -> LoopFactory:
    return asyncio.new_event_loop if name == "asyncio" else require_uvloop()


def loop_kind() -> str:
    """Which loop runs this code: ``uvloop`` or ``asyncio``."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


@contextlib.contextmanager
def uvloop_missing() -> Iterator[None]:
    """``import uvloop`` fails inside the block, whether or not uvloop is installed."""
    saved = sys.modules.get("uvloop")
    sys.modules["uvloop"] = cast(Any, None)  # None in sys.modules makes the import fail
    try:
        yield
    finally:
        if saved is None:
            del sys.modules["uvloop"]
        else:
            sys.modules["uvloop"] = saved


# -- choosing the CLI's loop -------------------------------------------------------------------


def test_the_cli_picks_uvloop_when_installed_unless_told_otherwise() -> None:
    factory = require_uvloop()
    assert choose_loop({}) == ("uvloop", factory)
    assert choose_loop({LOOP_ENV: "uvloop"}) == ("uvloop", factory)
    assert choose_loop({LOOP_ENV: "asyncio"}) == ("asyncio", None)
    assert choose_loop({LOOP_ENV: " AsyncIO "}) == ("asyncio", None)


def test_without_uvloop_the_cli_uses_asyncio_and_refuses_to_pretend() -> None:
    with uvloop_missing():
        assert choose_loop({}) == ("asyncio", None)
        assert choose_loop({LOOP_ENV: "asyncio"}) == ("asyncio", None)
        with pytest.raises(SmartRouteError, match="uvloop is not installed"):
            choose_loop({LOOP_ENV: "uvloop"})


def test_an_unknown_loop_name_is_an_error() -> None:
    with pytest.raises(SmartRouteError, match="SMARTROUTE_LOOP='trio': expected"):
        choose_loop({LOOP_ENV: "trio"})


@pytest.mark.parametrize("setting", ["", "asyncio"])
def test_the_cli_runs_on_the_loop_it_chose(
    setting: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if setting:
        monkeypatch.setenv(LOOP_ENV, setting)
    else:
        monkeypatch.delenv(LOOP_ENV, raising=False)
        require_uvloop()
    expected = setting or "uvloop"

    async def which() -> str:
        return loop_kind()

    with caplog.at_level("INFO", logger="smartroute"):
        assert _run_loop(which) == expected
    assert f"event loop: {expected}" in caplog.text


async def _demo(port: int, env: dict[str, str]) -> tuple[bytes, bytes]:
    """Start ``smartroute run`` (the demo), use its three services, stop it with SIGTERM."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "smartroute", "run", "--demo-port", str(port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        seen = b""
        while f"listening on port {port + 2}".encode() not in seen:
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert line, seen.decode(errors="replace")
            seen += line
        for offset, send, expect in (  # echo, shout, and a TCP forward to the echo
            (0, b"which loop?\n", b"which loop?\n"),
            (1, b"hello\n", b"HELLO\n"),
            (2, b"via forward\n", b"via forward\n"),
        ):
            reader, writer = await asyncio.open_connection(LOOPBACK, port + offset)
            writer.write(send)  # at once: before the proxy has connected to the target
            assert await read_line(reader) == expect
            writer.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode(errors="replace")
    return seen + out, err


@async_test(90)
async def test_smartroute_run_logs_uvloop_by_default_and_asyncio_when_asked() -> None:
    require_uvloop()
    base = {k: v for k, v in os.environ.items() if k != LOOP_ENV}
    base["PYTHONUNBUFFERED"] = "1"
    for setting, expected in (("", b"event loop: uvloop"), ("asyncio", b"event loop: asyncio")):
        env = {**base, LOOP_ENV: setting} if setting else base
        out, err = await _demo(free_port_range(3), env)
        assert expected in err, err.decode(errors="replace")
        assert b"stopping" in out


# -- TLS termination on both loops -------------------------------------------------------------


def certificate(ca: TestCA, *names: str) -> dict[str, str]:
    pair = ca.issue(*names)
    return {"cert": pair.cert_pem, "key": pair.key_pem}


async def terminate_round_trip(ca: TestCA) -> dict[str, Any]:
    """Through one port: SNI picks the certificate, then a forward and a socket handler."""
    port = free_port()

    async def report(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: object
    ) -> None:
        transport = writer.transport
        name = f"{type(transport).__module__}.{type(transport).__qualname__}"
        writer.write(f"{loop_kind()} {name}\n".encode())
        await writer.drain()
        writer.close()

    async with serve(echo_handler) as backend:
        routes = [
            {
                "name": "echo",
                "match": {"ports": port, "domains": "echo.example.test"},
                "action": {
                    "type": "forward",
                    "targets": [{"host": LOOPBACK, "port": backend}],
                    "tls": {"mode": "terminate", "certificate": certificate(ca, "echo.example.test")},
                },
            },
            {
                "name": "report",
                "match": {"ports": port, "domains": "report.example.test"},
                "action": {
                    "type": "socket-handler",
                    "socket_handler": report,
                    "tls": {"mode": "terminate", "certificate": certificate(ca, "report.example.test")},
                },
            },
        ]  # fmt: skip
        async with SmartRoute(routes, bind_address=LOOPBACK, initial_data_timeout=5) as router:
            client = ca.client_context()
            client.set_alpn_protocols(["http/1.1"])
            payload = bytes(range(256)) * 1024
            reader, writer = await asyncio.open_connection(
                LOOPBACK, port, ssl=client, server_hostname="echo.example.test"
            )
            ssl_object = writer.get_extra_info("ssl_object")
            subject = dict(item[0] for item in writer.get_extra_info("peercert")["subject"])
            writer.write(payload)
            echoed = await read_exactly(reader, len(payload), 10)
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await asyncio.wait_for(writer.wait_closed(), 5)
            reader, writer = await asyncio.open_connection(
                LOOPBACK, port, ssl=ca.client_context(), server_hostname="report.example.test"
            )
            reported = await read_line(reader, 10)
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await asyncio.wait_for(writer.wait_closed(), 5)
            async with asyncio.timeout(10):
                while router.stats()["connections"]["active"]:
                    await asyncio.sleep(0.01)
    return {
        "loop": loop_kind(),
        "subject": subject["commonName"],
        "version": ssl_object.version(),
        "echo_ok": echoed == payload,
        "reported": reported.decode().split(),
    }


@pytest.mark.parametrize("name", ["asyncio", "uvloop"])
def test_tls_termination_round_trip_on_each_loop(name: str, ca: TestCA) -> None:
    factory = loop_factory(name)
    results: list[dict[str, Any]] = []

    async def main() -> None:
        results.append(await asyncio.wait_for(terminate_round_trip(ca), 60))

    run_on_loop(main(), factory)
    [result] = results
    assert result["loop"] == name
    assert result["subject"] == "echo.example.test"
    assert result["version"] in ("TLSv1.2", "TLSv1.3")
    assert result["echo_ok"]
    # The terminated connection is the loop's own TLS transport (start_tls on that loop).
    kind, transport = result["reported"]
    assert kind == name
    expected = "uvloop.loop._SSLProtocolTransport" if name == "uvloop" else "asyncio.sslproto."
    assert transport.startswith(expected), transport


class Recorder(asyncio.Protocol):
    """Records the callbacks it gets, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.events.append(("made", type(transport).__name__))

    def data_received(self, data: bytes) -> None:
        self.events.append(("data", data))

    def eof_received(self) -> bool:
        self.events.append(("eof", None))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append(("lost", exc))
        if not self.done.done():
            self.done.set_result(None)


async def data_right_after_the_handshake(ca: TestCA) -> list[tuple[str, object]]:
    """The client's Finished, a request and its close_notify arrive in one write.

    The TLS layer decrypts the request (and sees the close) as it completes the handshake,
    before accept_tls returns: the protocol must still get connection_made first, then the
    bytes, then EOF.
    """
    pair = ca.issue("a.example.test")
    index = CertificateIndex([CertificatePair(pair.cert_pem, pair.key_pem)])
    loop = asyncio.get_running_loop()
    recorder = Recorder()
    accepted: asyncio.Future[None] = loop.create_future()

    class Peek(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            if parse_client_hello(self.buffer) is not None:
                self.transport.pause_reading()
                loop.create_task(self.terminate())

        async def terminate(self) -> None:
            selected = index.select("a.example.test")
            assert selected is not None
            context = index.server_context(selected)
            await accept_tls(self.transport, recorder, context, self.buffer, handshake_timeout=5)
            accepted.set_result(None)

    server = await loop.create_server(Peek, LOOPBACK, 0)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ca.client_context().wrap_bio(incoming, outgoing, server_hostname="a.example.test")
    reader, writer = await asyncio.open_connection(LOOPBACK, server.sockets[0].getsockname()[1])
    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if flight := outgoing.read():
                    writer.write(flight)
                answer = await asyncio.wait_for(reader.read(65536), 5)
                assert answer, "the server closed during the handshake"
                incoming.write(answer)
        tls.write(b"GET / HTTP/1.1\r\n\r\n")
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.unwrap()  # sends close_notify
        writer.write(outgoing.read())  # Finished, the request and the close, together
        await asyncio.wait_for(accepted, 5)
        await asyncio.wait_for(recorder.done, 5)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        server.close()
        await server.wait_closed()
    return recorder.events


@pytest.mark.parametrize("name", ["asyncio", "uvloop"])
def test_bytes_that_arrive_with_the_handshake_follow_connection_made(name: str, ca: TestCA) -> None:
    events: list[list[tuple[str, object]]] = []

    async def main() -> None:
        events.append(await asyncio.wait_for(data_right_after_the_handshake(ca), 30))

    run_on_loop(main(), loop_factory(name))
    [seen] = events
    assert seen[0][0] == "made"
    assert b"".join(cast(bytes, d) for kind, d in seen if kind == "data") == (
        b"GET / HTTP/1.1\r\n\r\n"
    )
    kinds = [kind for kind, _ in seen]
    assert kinds[-1] == "lost" and kinds.count("made") == 1 and kinds.count("lost") == 1
    assert kinds.index("eof") > max(i for i, kind in enumerate(kinds) if kind == "data")
