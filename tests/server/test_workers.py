"""``workers=N``: forked worker processes on SO_REUSEPORT listeners, statistics summed.

Each test forks real worker processes. A worker never returns into pytest: it ends with
``os._exit`` whatever happens, so no fixture teardown or atexit handler runs twice. Every test
stops its proxy and checks that no worker is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from leaks import open_fds
from support import LOOPBACK, async_test, free_port, free_ports

from smartroute import ConfigError, PortInUseError, SmartRoute
from smartroute.context import RouteContext
from smartroute.errors import SmartRouteError
from smartroute.routing.validation import validate_routes
from smartroute.server.port_manager import PortManager
from smartroute.server.workers import decode_routes, encode_routes, merge_snapshots


async def pid_handler(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: RouteContext
) -> None:
    """Answer with the serving process's id and the connection's (module level: it pickles
    by reference)."""
    writer.write(f"{os.getpid()} {ctx.connection_id}\n".encode())
    await writer.drain()
    writer.close()


def pid_route(name: str, port: int, handler: Any = pid_handler) -> dict[str, Any]:
    return {
        "name": name,
        "match": {"ports": port},
        "action": {"type": "socket-handler", "socket_handler": handler},
    }


async def ask(port: int) -> tuple[int, str]:
    """The pid of the process that served a new connection, and the connection's id."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        pid, connection_id = (await asyncio.wait_for(reader.readline(), 5)).decode().split()
        return int(pid), connection_id
    finally:
        writer.close()


async def ask_pid(port: int) -> int:
    """The pid of the process that served a new connection (handlers that say only that)."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        return int((await asyncio.wait_for(reader.readline(), 5)).split()[0])
    finally:
        writer.close()


async def pids_serving(port: int, expected: set[int] | int, attempts: int = 200) -> set[int]:
    """Connect until every pid of ``expected`` (or that many pids) answered, or ``attempts``
    ran out."""
    seen: set[int] = set()
    for _ in range(attempts):
        seen.add(await ask_pid(port))
        if expected <= seen if isinstance(expected, set) else len(seen) >= expected:
            break
    return seen


def port_is_free(port: int) -> bool:
    """Nobody listens on ``port``: a bind without SO_REUSEPORT succeeds (SO_REUSEADDR: the
    connections the proxy closed first leave TIME_WAIT entries behind)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def process_gone(pid: int) -> bool:
    """``pid`` has exited and was reaped (or is a zombie of someone else's)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def wait_until(check: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def assert_reaped(pids: list[int]) -> None:
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # not a child any more: reaped by the proxy
        assert process_gone(pid)


def workers_of(proxy: SmartRoute) -> list[int]:
    assert proxy._workers is not None
    return proxy._workers.pids


@async_test(60)
async def test_workers_share_the_connections_and_stats_are_summed() -> None:
    port = free_port()
    fds, tasks = open_fds(), asyncio.all_tasks()
    proxy = SmartRoute([pid_route("pid", port)], bind_address=LOOPBACK, workers=3)
    await proxy.start()
    try:
        children = workers_of(proxy)
        assert len(children) == 2 and os.getpid() not in children
        served: dict[int, int] = {}
        ids: set[str] = set()
        answered = 0  # bytes the handlers sent
        for _ in range(150):
            pid, connection_id = await ask(port)
            served[pid] = served.get(pid, 0) + 1
            ids.add(connection_id)
            answered += len(f"{pid} {connection_id}\n")
            assert connection_id.startswith("c" if pid == os.getpid() else "w"), connection_id
        assert set(served) == {os.getpid(), *children}  # the kernel spread them over all three
        assert len(ids) == 150  # connection ids stay unique across the processes
        assert sum(served.values()) == 150
        assert await wait_until(lambda: proxy.stats()["connections"]["total"] == 150)
        stats = proxy.stats(top_clients=5)
        assert stats["workers"] == 3
        assert stats["connections"] == {"active": 0, "total": 150}
        assert stats["routes"]["pid"]["total"] == 150
        assert stats["bytes"]["out"] == answered
        assert stats["client_ips"][LOOPBACK]["total"] == 150
        assert set(stats["throughput"]) == {"10s", "60s", "300s"}
    finally:
        await proxy.stop()
    assert proxy.stats()["connections"] == {"active": 0, "total": 150}  # final snapshots
    assert_reaped(children)
    assert port_is_free(port)
    assert open_fds() == fds
    assert asyncio.all_tasks() == tasks


@async_test(60)
async def test_route_changes_reach_every_worker_and_removed_ports_are_freed() -> None:
    first, second, third = free_ports(3)
    async with SmartRoute([pid_route("first", first)], bind_address=LOOPBACK, workers=2) as proxy:
        everyone = {os.getpid(), *workers_of(proxy)}
        await proxy.update_routes([pid_route("first", first), pid_route("second", second)])
        assert proxy.listening_ports == {first: 1, second: 1}
        assert await pids_serving(second, everyone) == everyone
        await proxy.add_route(pid_route("third", third))
        assert await pids_serving(third, everyone) == everyone
        await proxy.remove_route("second")
        assert port_is_free(second)  # released by every process, not just the parent
        await proxy.update_routes([pid_route("third", third)])
        assert port_is_free(first) and proxy.listening_ports == {third: 1}
        assert await pids_serving(third, everyone) == everyone
        assert {os.getpid(), *workers_of(proxy)} == everyone  # nobody was replaced
    assert port_is_free(third)


@async_test(60)
async def test_an_unpicklable_route_is_refused_and_nothing_changes() -> None:
    kept, other = free_ports(2)

    def make_handler() -> Any:
        async def closure(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: RouteContext
        ) -> None:
            await pid_handler(reader, writer, ctx)

        return closure

    closure = make_handler()
    # At start nothing is pickled: the workers inherit the closure with the fork.
    async with SmartRoute(
        [pid_route("kept", kept, closure)], bind_address=LOOPBACK, workers=2
    ) as proxy:
        everyone = {os.getpid(), *workers_of(proxy)}
        before = proxy.routes
        new = pid_route("new", other, make_handler())
        for change in ("update_routes", "add_route"):
            with pytest.raises(ConfigError) as caught:
                if change == "update_routes":
                    await proxy.update_routes([pid_route("kept", kept, closure), new])
                else:
                    await proxy.add_route(new)
            message = str(caught.value)
            assert message.startswith("route 'new': cannot be sent to the worker processes")
            assert "module-level functions" in message
            assert proxy.routes == before and proxy.listening_ports == {kept: 1}
            assert port_is_free(other)
        # A route the workers already have is sent by position, so the closure may stay.
        await proxy.update_routes([pid_route("kept", kept, closure), pid_route("new", other)])
        assert await pids_serving(other, everyone) == everyone
        assert await pids_serving(kept, everyone) == everyone


def fail_in_one_worker(marker: Path, port: int) -> Any:
    """A PortManager._bind that fails for ``port`` in the first worker that tries it."""
    original = PortManager._bind
    parent = os.getpid()

    async def bind(self: PortManager, wanted: int) -> Any:
        if wanted == port and os.getpid() != parent:
            with contextlib.suppress(FileExistsError):
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                raise PortInUseError(wanted, LOOPBACK, "a test")
        return await original(self, wanted)

    return bind


@async_test(60)
async def test_a_worker_that_refuses_a_change_rolls_every_process_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept, added = free_ports(2)
    monkeypatch.setattr(PortManager, "_bind", fail_in_one_worker(tmp_path / "failed", added))
    routes = [pid_route("kept", kept), pid_route("gone-then-back", free_port())]
    async with SmartRoute(routes, bind_address=LOOPBACK, workers=3) as proxy:
        everyone = {os.getpid(), *workers_of(proxy)}
        before, ports = proxy.routes, proxy.listening_ports
        with pytest.raises(PortInUseError) as caught:
            await proxy.update_routes([pid_route("kept", kept), pid_route("added", added)])
        assert "already in use by a test (seen by worker" in str(caught.value)
        assert proxy.routes == before and proxy.listening_ports == ports
        assert port_is_free(added)  # the worker that bound it went back too
        back = routes[1]["match"]["ports"]
        assert await pids_serving(back, everyone) == everyone  # released, then bound again
        assert {os.getpid(), *workers_of(proxy)} == everyone
        await proxy.update_routes([pid_route("kept", kept), pid_route("added", added)])
        assert await pids_serving(added, everyone) == everyone


@async_test(60)
async def test_a_crashed_worker_is_logged_and_replaced(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="smartroute")
    port = free_port()
    async with SmartRoute([pid_route("pid", port)], bind_address=LOOPBACK, workers=2) as proxy:
        (victim,) = workers_of(proxy)
        assert await pids_serving(port, {victim}) >= {victim}
        assert await wait_until(lambda: proxy.stats()["connections"]["total"] > 0)
        served = proxy.stats()["connections"]["total"]
        os.kill(victim, signal.SIGKILL)
        assert await wait_until(lambda: workers_of(proxy) not in ([], [victim]), timeout=10)
        (replacement,) = workers_of(proxy)
        assert await pids_serving(port, {replacement}) >= {replacement}
        assert_reaped([victim])
        assert proxy.stats()["connections"]["total"] >= served  # the dead worker's count stays
        messages = [r.getMessage() for r in caplog.records]
        assert any(
            f"worker 1 (pid {victim}) exited unexpectedly (killed by SIGKILL)" in m
            for m in messages
        ), messages
        assert any(f"worker 1 (pid {replacement}) started in place" in m for m in messages)
    assert_reaped([replacement])


@async_test(60)
async def test_a_worker_stopped_with_sigterm_is_replaced_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    async with SmartRoute([pid_route("pid", port)], bind_address=LOOPBACK, workers=2) as proxy:
        (child,) = workers_of(proxy)
        os.kill(child, signal.SIGTERM)
        assert await wait_until(lambda: workers_of(proxy) not in ([], [child]), timeout=10)
        (replacement,) = workers_of(proxy)
        assert await pids_serving(port, {replacement}) >= {replacement}
    record = next(r for r in caplog.records if f"pid {child}) exited" in r.getMessage())
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(f"worker 1 (pid {child}) exited on SIGTERM after")
    assert_reaped([child, replacement])


@async_test(60)
async def test_the_proxy_starts_again_with_new_workers_after_stop() -> None:
    port = free_port()
    proxy = SmartRoute([pid_route("pid", port)], bind_address=LOOPBACK, workers=2)
    await proxy.start()
    first = workers_of(proxy)
    assert await pids_serving(port, {os.getpid(), *first}) == {os.getpid(), *first}
    await proxy.stop()
    assert port_is_free(port)
    await proxy.start()
    try:
        second = workers_of(proxy)
        assert second != first
        assert await pids_serving(port, {os.getpid(), *second}) == {os.getpid(), *second}
    finally:
        await proxy.stop()
    assert_reaped(first + second)


@async_test(60)
async def test_a_worker_exits_when_its_control_channel_closes() -> None:
    port = free_port()
    async with SmartRoute(
        [pid_route("pid", port)], bind_address=LOOPBACK, workers=2, graceful_shutdown_timeout=1
    ) as proxy:
        assert proxy._workers is not None
        (child,) = proxy._workers.pids
        proxy._workers._workers[1].writer.transport.abort()  # as if the parent had died
        assert await wait_until(lambda: process_gone(child))
        assert await wait_until(lambda: workers_of(proxy) not in ([], [child]), timeout=10)
        (replacement,) = workers_of(proxy)
        assert await pids_serving(port, {replacement}) >= {replacement}
    assert_reaped([child, replacement])


@async_test(60)
async def test_stop_waits_for_live_connections_in_the_workers_then_kills_stragglers() -> None:
    port = free_port()

    proxy = SmartRoute(
        [pid_route("pid", port)], bind_address=LOOPBACK, workers=2, graceful_shutdown_timeout=0.5
    )
    await proxy.start()
    children = workers_of(proxy)
    # A worker that ignores the stop request (stopped with SIGSTOP) is killed after the grace
    # period plus the margin, and reaped.
    os.kill(children[0], signal.SIGSTOP)
    started = time.monotonic()
    await proxy.stop()
    took = time.monotonic() - started
    assert 0.5 <= took < 15
    assert_reaped(children)
    assert port_is_free(port)


@async_test(30)
async def test_a_port_held_by_another_program_is_refused_before_any_fork() -> None:
    with socket.socket() as other:
        other.bind((LOOPBACK, 0))
        other.listen()
        port = other.getsockname()[1]
        proxy = SmartRoute([pid_route("pid", port)], bind_address=LOOPBACK, workers=2)
        with pytest.raises(PortInUseError, match="already in use by another process"):
            await proxy.start()
        assert proxy._workers is not None and proxy._workers.pids == []
        assert not proxy.is_running


@async_test(30)
async def test_a_worker_that_cannot_start_fails_start_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    monkeypatch.setattr(PortManager, "_bind", fail_in_one_worker(tmp_path / "failed", port))
    proxy = SmartRoute([pid_route("pid", port)], bind_address=LOOPBACK, workers=3)
    with pytest.raises(PortInUseError, match=r"seen by worker \d \(pid \d+\)"):
        await proxy.start()
    assert not proxy.is_running and proxy._workers is not None and proxy._workers.pids == []
    assert await wait_until(lambda: port_is_free(port))


def test_route_encoding_names_known_routes_and_pickles_the_rest() -> None:
    def closure_handler() -> Any:
        async def handler(*args: Any) -> None:
            return None

        return handler

    closure = closure_handler()
    forward = {
        "name": "b",
        "match": {"ports": 1001},
        "action": {"type": "forward", "targets": [{"host": ["h1", "h2"], "port": 80}]},
        "timeouts": {"idle": 5},  # a MappingProxyType, like basic_auth's users
        "security": {"basic_auth": {"users": {"u": "p"}}},
    }
    old = validate_routes([pid_route("a", 1000, closure), forward])
    # the same routes validated again, each moved down one place, after a new one
    new = validate_routes([pid_route("c", 1002), pid_route("a", 1000, closure), forward])
    entries = encode_routes(old, new)
    assert isinstance(entries[0], bytes) and entries[1] == (0, 1) and entries[2] == (1, 2)
    decoded = decode_routes(old, entries)
    assert decoded == new and decoded[1].action is old[0].action
    assert decode_routes((), encode_routes((), old[1:])) == old[1:]  # pickled whole
    with pytest.raises(ConfigError, match="route 'a': cannot be sent"):
        encode_routes((), old)


def test_merged_stats_sum_every_field_and_recut_the_busiest_clients() -> None:
    def snapshot(ips: dict[str, int], active: int) -> dict[str, Any]:
        return {
            "connections": {"active": active, "total": sum(ips.values())},
            "bytes": {"in": 10, "out": 20},
            "routes": {"r": {"active": active, "total": 3, "bytes_in": 10, "bytes_out": 20}},
            "client_ips": {
                ip: {"active": 0, "total": n, "bytes_in": n, "bytes_out": 0}
                for ip, n in ips.items()
            },
            "client_ips_tracked": len(ips),
            "throughput": {"10s": {"connections": 0.1, "bytes_in": 1.0, "bytes_out": 2.0}},
        }

    merged = merge_snapshots(
        [snapshot({"a": 5, "b": 1}, 1), snapshot({"b": 9, "c": 2}, 0)], top_clients=2
    )
    assert merged["connections"] == {"active": 1, "total": 17}
    assert merged["bytes"] == {"in": 20, "out": 40}
    assert merged["routes"] == {"r": {"active": 1, "total": 6, "bytes_in": 20, "bytes_out": 40}}
    assert list(merged["client_ips"]) == ["b", "a"] and merged["client_ips"]["b"]["total"] == 10
    assert merged["client_ips_tracked"] == 4
    assert merged["throughput"] == {"10s": {"connections": 0.2, "bytes_in": 2.0, "bytes_out": 4.0}}


def test_one_process_reports_workers_1() -> None:
    assert SmartRoute([]).stats()["workers"] == 1


# -- the command line ------------------------------------------------------------------------

CONFIG = """
import os

async def pid(reader, writer, ctx):  # defined in the config: inherited by the fork
    writer.write(f"{{os.getpid()}}\\n".encode())
    await writer.drain()
    writer.close()

routes = [{{"name": "pid", "match": {{"ports": {port}}},
           "action": {{"type": "socket-handler", "socket_handler": pid}}}}]
settings = {{"bind_address": "127.0.0.1", "workers": 2, "graceful_shutdown_timeout": 1}}
"""


async def run_cli(config: Path) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "smartroute",
        "run",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    while b"listening on port" not in await asyncio.wait_for(proc.stdout.readline(), 20):
        pass
    return proc


@async_test(60)
async def test_cli_serves_with_workers_and_sigterm_stops_every_process(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "workers.py"
    config.write_text(CONFIG.format(port=port))
    proc = await run_cli(config)
    try:
        pids = await pids_serving(port, 2)
        assert proc.pid in pids and len(pids) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    assert all(process_gone(pid) for pid in pids)
    assert port_is_free(port)


@async_test(60)
async def test_workers_exit_when_the_parent_is_killed(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "workers.py"
    config.write_text(CONFIG.format(port=port))
    proc = await run_cli(config)
    try:
        pids = await pids_serving(port, 2)
        assert len(pids) == 2
    finally:
        proc.kill()
        await asyncio.wait_for(proc.communicate(), 20)
    (orphan,) = pids - {proc.pid}
    assert await wait_until(lambda: process_gone(orphan), timeout=10)
    assert await wait_until(lambda: port_is_free(port))


def test_workers_setting_errors_reach_the_constructor() -> None:
    with pytest.raises(ConfigError, match="settings.workers: expected an int from 1 to 64"):
        SmartRoute([], workers=0)
    with pytest.raises(ConfigError, match='"tls-alpn-01" cannot be used when processes share'):
        SmartRoute([], workers=2, acme={"challenge": "tls-alpn-01"})
    assert isinstance(ConfigError("x", "y"), SmartRouteError)
