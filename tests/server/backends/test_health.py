"""Active health checks against real loopback servers: TCP and HTTP probes, the request an
HTTP check sends, rise and fall, and stopping a checker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support import LOOPBACK, Handler, TestCA, async_test, echo_handler, free_port, serve

from smartroute.routing.model import HealthCheck, TlsSettings
from smartroute.server.backends.health import HealthChecker
from smartroute.server.backends.state import TargetState

FAST = {"interval": 0.1, "timeout": 0.1}  # quick checks, each bounded (timeout <= interval)


def tcp(**options: object) -> HealthCheck:
    return HealthCheck("tcp", **{**FAST, **options})  # type: ignore[arg-type]


def http(**options: object) -> HealthCheck:
    return HealthCheck("http", **{**FAST, **options})  # type: ignore[arg-type]


class Watch:
    """Stands in for a target group: notes, at each change of the target, its ``up`` flag and
    how many checks the checker had run."""

    def __init__(self, checker: HealthChecker) -> None:
        self.checker = checker
        self.seen: list[tuple[bool, int]] = []
        self._told = asyncio.Event()
        checker.state.groups.append(self)

    def target_changed(self) -> None:
        self.seen.append((self.checker.state.up, self.checker.checks))
        self._told.set()

    async def told(self, timeout: float = 5) -> None:
        async with asyncio.timeout(timeout):
            await self._told.wait()
        self._told.clear()


@contextlib.asynccontextmanager
async def running(
    port: int, spec: HealthCheck, *, initially_up: bool, host: str = LOOPBACK
) -> AsyncIterator[tuple[HealthChecker, Watch]]:
    """A started checker of ``host:port`` for the block, stopped after it."""
    checker = HealthChecker(TargetState(host, port), spec, initially_up=initially_up)
    watch = Watch(checker)
    checker.start()
    try:
        yield checker, watch
    finally:
        await checker.stop()


def answering(*answers: bytes, heads: list[bytes] | None = None) -> Handler:
    """Answer each connection's request with the next of ``answers`` (the last one once they
    run out), noting each request head in ``heads``."""
    script = list(answers)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answer = script.pop(0) if len(script) > 1 else script[0]
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if heads is not None:
                heads.append(head)
            writer.write(answer)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return handler


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accept, read the request, never answer (until the checker hangs up)."""
    try:
        await reader.read()
    except ConnectionError:
        pass
    finally:
        writer.close()  # also when the test ends first and cancels the handler


OK = b"HTTP/1.1 204 No Content\r\n\r\n"
UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"


# -- one probe ---------------------------------------------------------------------------------


@async_test()
async def test_tcp_probe_passes_on_a_listening_port_and_fails_on_a_closed_one() -> None:
    async with serve(echo_handler) as port:
        checker = HealthChecker(TargetState(LOOPBACK, port), tcp(), initially_up=True)
        assert await checker.probe() is None
    closed = HealthChecker(TargetState(LOOPBACK, free_port()), tcp(), initially_up=True)
    error = await closed.probe()
    assert error is not None and error.startswith("health check: ")


@pytest.mark.parametrize(
    ("answer", "expect_status", "verdict"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", (200, 399), None),
        (b"HTTP/1.1 399 Whatever\r\n\r\n", (200, 399), None),
        (OK, (204, 204), None),
        (b"HTTP/1.0 302 Found\r\nLocation: /\r\n\r\n", (200, 399), None),
        (b"HTTP/1.1 200\r\n\r\n", (200, 299), None),  # no reason phrase
        (UNAVAILABLE, (200, 399), "health check: status 503 (expected 200-399)"),
        (b"HTTP/1.1 200 OK\r\n\r\n", (300, 302), "health check: status 200 (expected 300-302)"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", (200, 399), "health check: not an HTTP response"),
        (b"HTTP/2 200\r\n\r\n", (200, 399), "health check: not an HTTP response"),
        (b"", (200, 399), "health check: no answer"),
    ],
)
@async_test()
async def test_http_probe_verdicts(
    answer: bytes, expect_status: tuple[int, int], verdict: str | None
) -> None:
    async with serve(answering(answer)) as port:
        spec = http(expect_status=expect_status)
        checker = HealthChecker(TargetState(LOOPBACK, port), spec, initially_up=True)
        assert await checker.probe() == verdict


@async_test()
async def test_http_probe_reads_a_status_line_sent_in_pieces() -> None:
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            for piece in (b"HTTP/1.", b"1 2", b"04 No Content\r", b"\n\r\n"):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.005)
        finally:
            writer.close()

    async with serve(trickle) as port:
        checker = HealthChecker(TargetState(LOOPBACK, port), http(), initially_up=True)
        assert await checker.probe() is None


@async_test()
async def test_http_probe_of_a_server_that_never_answers_times_out() -> None:
    async with serve(silent) as port:
        checker = HealthChecker(TargetState(LOOPBACK, port), http(), initially_up=True)
        loop = asyncio.get_running_loop()
        began = loop.time()
        assert await checker.probe() == "health check timed out after 0.1s"
        assert loop.time() - began < 2


@async_test()
async def test_http_check_asks_for_its_path_with_the_targets_host() -> None:
    heads: list[bytes] = []
    async with serve(answering(OK, heads=heads)) as port:
        for spec in (http(path="/healthz?deep=1"), http(host="status.example")):
            checker = HealthChecker(TargetState(LOOPBACK, port), spec, initially_up=True)
            assert await checker.probe() is None
    first, second = (head.decode("latin-1").split("\r\n") for head in heads)
    assert first[0] == "GET /healthz?deep=1 HTTP/1.1"
    assert second[0] == "GET / HTTP/1.1"
    assert f"Host: {LOOPBACK}:{port}" in first  # a port that is not the default is named
    assert "Host: status.example" in second
    assert "Connection: close" in first


@async_test()
async def test_http_check_of_an_ipv6_target_brackets_the_host() -> None:
    heads: list[bytes] = []
    async with serve(answering(OK, heads=heads), host="::1") as port:
        checker = HealthChecker(TargetState("::1", port), http(), initially_up=True)
        assert await checker.probe() is None
    host = next(line for line in heads[0].decode().split("\r\n") if line.startswith("Host:"))
    assert host == f"Host: [::1]:{port}"


@async_test()
async def test_the_checks_of_a_re_encrypting_route_speak_tls_and_verify_the_target(
    ca: TestCA,
) -> None:
    pair = ca.issue("backend.test")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory() as folder:
        cert, key = pair.write(Path(folder), "backend")
        server.load_cert_chain(cert, key)
    heads: list[bytes] = []
    trusted = TlsSettings("terminate-and-reencrypt", backend_ca=ca.pem)
    named = TlsSettings(
        "terminate-and-reencrypt", backend_ca=ca.pem, backend_server_name="backend.test"
    )
    strange = TlsSettings("terminate-and-reencrypt", backend_ca=TestCA().pem)
    async with serve(answering(OK, heads=heads), ssl_context=server) as port:
        state = TargetState(LOOPBACK, port)
        # Verified by the route's backend_ca, under the check's Host (else the route's name).
        spec = http(host="backend.test", timeout=2, interval=2)
        assert await HealthChecker(state, spec, initially_up=True, tls=trusted).probe() is None
        assert (
            await HealthChecker(
                state, http(timeout=2, interval=2), initially_up=True, tls=named
            ).probe()
            is None
        )
        assert f"Host: {LOOPBACK}:{port}".encode() in heads[-1]
        # A certificate the route would not accept fails the check, and says why.
        why = await HealthChecker(state, spec, initially_up=True, tls=strange).probe()
        assert why is not None and "CERTIFICATE_VERIFY_FAILED" in why
        # Plain HTTP to a TLS port is no answer either.
        assert await HealthChecker(state, spec, initially_up=True).probe() is not None


# -- running checks: fall, rise, stop ----------------------------------------------------------


@async_test()
async def test_a_closed_port_goes_down_after_fall_failures_in_a_row(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "smartroute")
    async with running(free_port(), tcp(fall=3), initially_up=True) as (checker, watch):
        assert checker.state.up
        await watch.told()
        assert watch.seen == [(False, 3)]
        assert (checker.state.last_error or "").startswith("health check: ")
    downs = [r.getMessage() for r in caplog.records if " is down: health check" in r.getMessage()]
    assert len(downs) == 1


@async_test()
async def test_a_target_that_starts_down_is_up_after_rise_passes() -> None:
    async with serve(echo_handler) as port:
        async with running(port, tcp(rise=3), initially_up=False) as (checker, watch):
            assert not checker.state.up
            await watch.told()
            assert watch.seen == [(True, 3)]


@async_test()
async def test_rise_and_fall_count_results_in_a_row_only() -> None:
    statuses = [OK, UNAVAILABLE, OK, OK, UNAVAILABLE, OK, UNAVAILABLE, UNAVAILABLE]
    async with serve(answering(*statuses)) as port:
        spec = http(rise=2, fall=2)
        async with running(port, spec, initially_up=False) as (checker, watch):
            await watch.told()
            await watch.told()
            assert watch.seen == [(True, 4), (False, 8)]
    assert checker.state.last_error == "health check: status 503 (expected 200-399)"


@async_test()
async def test_a_stopped_checker_ends_its_task_and_its_verdict_no_longer_counts() -> None:
    state = TargetState(LOOPBACK, free_port())
    checker = HealthChecker(state, tcp(), initially_up=False)
    assert not state.up
    before = asyncio.all_tasks()
    checker.start()
    checker.start()  # a second start runs no second task
    assert len(asyncio.all_tasks() - before) == 1
    await checker.stop()
    assert state.up and state.checks == {}
    assert asyncio.all_tasks() == before
    await checker.stop()  # stopping again is harmless
