"""Backends on the ``forward`` action with real processes: several nginx, curl and wrk.

Each nginx answers ``/`` with its name (body and ``X-Backend`` header) and ``/health`` with 503
while the file ``down`` exists in its folder, else 200; it runs as one process, so it can be
killed and started again on the same port (a paced one holds requests a while, unanswered).
One curl process fetches thousands of URLs (a URL glob on one kept-alive connection) and prints
each answer's status and backend; wrk loads the proxy for a few seconds, a Lua script counting
the answers of each backend. HTTP routes to
IP-literal targets without ``retry`` run on the epoll fast lane; with ``retry`` they take the
asyncio transport path: the tests that pick targets run on both (``path``). Every wait polls
its condition, bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import (
    LOOPBACK,
    async_test,
    curl,
    free_port,
    free_ports,
    read_to_end,
    require_tool,
    serve,
    start_nginx,
    stop_process,
)

from smartroute import SmartRoute

RETRY = {"attempts": 3, "backoff": 0.01}
PATHS = pytest.mark.parametrize("path", ["fast-lane", "transport"])
FAST_CHECK = {"type": "http", "path": "/health", "interval": 0.2, "rise": 1, "fall": 1}


class Nginx:
    """One named nginx backend (see the module's docstring)."""

    def __init__(self, root: Path, name: str, port: int, pace: int | None = None) -> None:
        """``pace``: answer at most that many requests a second, holding the others
        (read, unanswered) until their turn."""
        self.name = name
        self.port = port
        self.pace = pace
        self.folder = root / name
        self.folder.mkdir()
        self.flag = self.folder / "down"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def target(self) -> dict[str, Any]:
        return {"host": LOOPBACK, "port": self.port}

    @property
    def key(self) -> str:
        """Its name in ``stats()["targets"]``."""
        return f"{LOOPBACK}:{self.port}"

    async def start(self) -> None:
        page = self.folder / "name.txt"
        page.write_text(f"{self.name}\n")
        held = http = ""
        if self.pace is not None:  # limit_req holds requests that a "return" would answer first
            http = f"limit_req_zone $server_port zone=pace:1m rate={self.pace}r/s;"
            held = "limit_req zone=pace burst=10000;"
        block = f"""location /health {{ if (-f {self.flag}) {{ return 503; }} return 200 "ok\\n"; }}
    location / {{
      {held}
      root {self.folder};
      try_files /name.txt =404;
      add_header X-Backend {self.name};
    }}"""
        self.proc = await start_nginx(self.folder, block, self.port, http)

    async def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        await asyncio.wait_for(self.proc.wait(), 5)

    async def stop(self) -> None:
        if self.proc is not None:
            await stop_process(self.proc)


@contextlib.asynccontextmanager
async def nginxes(root: Path, *names: str, pace: int | None = None) -> AsyncIterator[list[Nginx]]:
    """One running nginx per name, each on its own port and in its own folder."""
    ports = free_ports(len(names))
    backends = [Nginx(root, name, port, pace) for name, port in zip(names, ports, strict=True)]
    try:
        await asyncio.gather(*(b.start() for b in backends))
        yield backends
    finally:
        await asyncio.gather(*(b.stop() for b in backends))


def web(port: int, targets: list[dict[str, Any]], path: str, **action: Any) -> dict[str, Any]:
    """An HTTP forward route on ``port``; ``path="transport"`` adds a retry policy (which
    takes the route off the fast lane) unless ``action`` has its own."""
    if path == "transport":
        action.setdefault("retry", RETRY)
    name = action.pop("name", "web")
    priority = action.pop("priority", 0)
    return {
        "name": name,
        "priority": priority,
        "match": {"ports": port},
        "action": {"type": "forward", "protocol": "http", "targets": targets, **action},
    }


async def served_by(port: int, count: int, *args: str) -> Counter[str]:
    """How many of ``count`` GETs through the proxy each backend answered, all by one curl
    (one connection, kept alive; ``args`` are more of its options); every one must be a 200."""
    url = f"http://{LOOPBACK}:{port}/[1-{count}]"
    code, out, err = await curl(
        "-o", "/dev/null", "-w", "%{http_code} %header{x-backend}\\n", *args, url
    )
    assert code == 0, err
    answers = out.splitlines()
    assert len(answers) == count, out
    assert {a.split(" ")[0] for a in answers} == {"200"}, Counter(answers)
    return Counter(a.split(" ")[1] for a in answers)


async def backend_for(port: int, source: str) -> str:
    """One GET from the client address ``source``: the backend that answered."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port, local_addr=(source, 0))
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data, _ = await read_to_end(reader, 5)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), data
    return body.decode().strip()


async def until(condition: Callable[[], bool], what: str, timeout: float = 5) -> float:
    """Poll ``condition`` until it holds (failing after ``timeout``); the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            pytest.fail(f"not within {timeout:g}s: {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def target(proxy: SmartRoute, key: str) -> dict[str, Any]:
    state: dict[str, Any] = proxy.stats()["targets"][key]
    return state


def is_up(proxy: SmartRoute, key: str, up: bool = True) -> Callable[[], bool]:
    return lambda: target(proxy, key)["up"] is up


async def checks_run(proxy: SmartRoute, count: int) -> None:
    """Wait until every health checker ran ``count`` more checks."""
    checkers = proxy._runtime.backends.checkers()  # noqa: SLF001
    wanted = [(c, c.checks + count) for c in checkers]
    await until(lambda: all(c.checks >= n for c, n in wanted), f"{count} more checks")


def logged(caplog: pytest.LogCaptureFixture, text: str) -> int:
    """How many "smartroute" log records contain ``text``."""
    return sum(text in r.getMessage() for r in caplog.records if r.name == "smartroute")


@contextlib.contextmanager
def blackhole() -> Iterator[int]:
    """A port whose listener never accepts and whose backlog (0) is full: the kernel drops
    further SYNs, so connecting to it hangs until the connector gives up."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind((LOOPBACK, 0))
        listener.listen(0)
        port: int = listener.getsockname()[1]
        for _ in range(3):
            filler = socket.socket()
            fillers.append(filler)
            filler.setblocking(False)
            filler.connect_ex((LOOPBACK, port))
        yield port
    finally:
        for sock in [listener, *fillers]:
            sock.close()


def shares(counts: Counter[str]) -> dict[str, float]:
    total = sum(counts.values())
    return {name: count / total for name, count in counts.items()}


# -- 1. distribution per strategy --------------------------------------------------------------


@PATHS
@async_test()
async def test_round_robin_follows_the_weights(
    path: str, tmp_path: Path, lane_only: list[int]
) -> None:
    port = free_port()
    async with nginxes(tmp_path, "b1", "b2", "b3") as (b1, b2, b3):
        targets = [{**b1.target, "weight": 3}, b2.target, b3.target]
        async with SmartRoute([web(port, targets, path)], bind_address=LOOPBACK):
            counts = await served_by(port, 2000)
    share = shares(counts)
    assert set(share) == {"b1", "b2", "b3"}
    for name, expected in {"b1": 0.6, "b2": 0.2, "b3": 0.2}.items():
        assert abs(share[name] - expected) < 0.02, counts
    # The route ran on the path it was meant to test.
    assert (lane_only == []) is (path == "fast-lane"), lane_only


@PATHS
@async_test()
async def test_random_follows_the_weights_loosely(path: str, tmp_path: Path) -> None:
    port = free_port()
    async with nginxes(tmp_path, "b1", "b2", "b3") as (b1, b2, b3):
        targets = [{**b1.target, "weight": 3}, b2.target, b3.target]
        route = web(port, targets, path, load_balancing="random")
        async with SmartRoute([route], bind_address=LOOPBACK):
            counts = await served_by(port, 2000)
    share = shares(counts)
    for name, expected in {"b1": 0.6, "b2": 0.2, "b3": 0.2}.items():
        assert abs(share[name] - expected) < 0.05, counts  # over 4 standard deviations


@PATHS
@async_test()
async def test_first_sends_everything_to_the_first_target(path: str, tmp_path: Path) -> None:
    port = free_port()
    async with nginxes(tmp_path, "b1", "b2", "b3") as backends:
        route = web(port, [b.target for b in backends], path, load_balancing="first")
        async with SmartRoute([route], bind_address=LOOPBACK):
            assert await served_by(port, 300) == {"b1": 300}


@PATHS
@async_test()
async def test_ip_hash_keeps_each_client_ip_on_one_backend(path: str, tmp_path: Path) -> None:
    port = free_port()
    clients = [f"127.0.0.{i}" for i in range(2, 14)]
    async with nginxes(tmp_path, "b1", "b2", "b3") as backends:
        route = web(port, [b.target for b in backends], path, load_balancing="ip-hash")
        async with SmartRoute([route], bind_address=LOOPBACK):
            seen = await asyncio.gather(
                *(served_by(port, 100, "--interface", ip) for ip in clients)
            )
    for ip, counts in zip(clients, seen, strict=True):
        assert len(counts) == 1, (ip, counts)
    # 12 clients on one backend of three by chance: 3 ** -11.
    assert len({name for counts in seen for name in counts}) > 1, seen


@PATHS
@async_test()
async def test_ip_hash_moves_only_the_new_targets_share_of_clients(
    path: str, tmp_path: Path
) -> None:
    port = free_port()
    clients = [f"127.0.1.{i}" for i in range(1, 101)]
    async with nginxes(tmp_path, "b1", "b2", "b3", "b4") as backends:
        route = web(port, [b.target for b in backends[:3]], path, load_balancing="ip-hash")
        async with SmartRoute([route], bind_address=LOOPBACK) as proxy:
            before = [await backend_for(port, ip) for ip in clients]
            again = [await backend_for(port, ip) for ip in clients]
            await proxy.set_targets("web", [b.target for b in backends])
            after = [await backend_for(port, ip) for ip in clients]
    assert before == again
    assert set(before) == {"b1", "b2", "b3"}
    moved = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert {new for _, new in moved} == {"b4"}, moved  # only to the new target
    # About a quarter (25 expected; the bounds are over 3 standard deviations away).
    assert 10 <= len(moved) <= 42, len(moved)


# -- 2. least-connections under uneven latency -------------------------------------------------


# Counts the answers of each backend (its X-Backend header) over all of wrk's threads.
COUNT_BACKENDS = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) counts = {} end
function response(status, headers, body)
  local name = "status-" .. status
  for key, value in pairs(headers) do
    if string.lower(key) == "x-backend" then name = value end
  end
  counts[name] = (counts[name] or 0) + 1
end
function done(summary, latency, requests)
  for _, thread in ipairs(threads) do
    for name, count in pairs(thread:get("counts")) do
      io.write(string.format("backend %s %d\\n", name, count))
    end
  end
end
"""


async def wrk_run(
    folder: Path, url: str, *args: str, timeout: float = 30
) -> tuple[str, Counter[str]]:
    """Run wrk against ``url``; its report and how many answers each backend gave."""
    script = folder / "count-backends.lua"
    script.write_text(COUNT_BACKENDS)
    run = await asyncio.create_subprocess_exec(
        require_tool("wrk"), "-s", str(script), *args, url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(run.communicate(), timeout)
    finally:
        if run.returncode is None:
            run.kill()
            await run.wait()
    report = out.decode()
    assert run.returncode == 0, (report, err.decode())
    counts: Counter[str] = Counter()
    for name, count in re.findall(r"(?m)^backend (\S+) (\d+)$", report):
        counts[name] += int(count)
    return report, counts


async def slow_backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An HTTP backend that takes 200 ms per answer (kept alive)."""
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        while True:
            await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(0.2)
            writer.write(b"HTTP/1.1 200 OK\r\nX-Backend: slow\r\nContent-Length: 5\r\n\r\nslow\n")
            await writer.drain()
    writer.close()


@PATHS
@async_test()
async def test_least_connections_sends_less_to_a_slow_backend(path: str, tmp_path: Path) -> None:
    port = free_port()
    async with nginxes(tmp_path, "b1", "b2") as (b1, b2), serve(slow_backend) as slow:
        targets = [b1.target, {"host": LOOPBACK, "port": slow}, b2.target]
        route = web(port, targets, path, load_balancing="least-connections")
        async with SmartRoute([route], bind_address=LOOPBACK):
            # Six clients at once for the whole run (one alone would find every backend idle
            # between its requests, and take them in turn).
            report, counts = await wrk_run(
                tmp_path, f"http://{LOOPBACK}:{port}/", "-t2", "-c6", "-d2s"
            )
    assert set(counts) == {"b1", "b2", "slow"}, report  # slow is in rotation, only less loaded
    assert counts["slow"] * 10 < min(counts["b1"], counts["b2"]), counts


# -- 3. active health checks -------------------------------------------------------------------


@PATHS
@async_test(timeout=40)
async def test_http_health_checks_take_a_target_out_and_bring_it_back(
    path: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    caplog.set_level(logging.WARNING, "smartroute")
    async with nginxes(tmp_path, "b1", "b2", "b3") as (b1, b2, b3):
        route = web(port, [b1.target, b2.target, b3.target], path, health_check=FAST_CHECK)
        async with SmartRoute([route], bind_address=LOOPBACK) as proxy:
            assert set(await served_by(port, 30)) == {"b1", "b2", "b3"}

            # A failing check (503) takes b2 out: no more traffic, logged once.
            b2.flag.touch()
            took = await until(is_up(proxy, b2.key, False), "b2 down")
            assert took < 1.5
            assert "status 503" in target(proxy, b2.key)["last_error"]
            assert set(await served_by(port, 60)) == {"b1", "b3"}
            await checks_run(proxy, 3)
            assert logged(caplog, f"target {b2.key} is down") == 1

            # Passing again brings it back, logged once.
            b2.flag.unlink()
            assert await until(is_up(proxy, b2.key), "b2 up") < 1.5
            assert set(await served_by(port, 30)) == {"b1", "b2", "b3"}
            await checks_run(proxy, 3)
            assert logged(caplog, f"target {b2.key} is up again") == 1
            assert logged(caplog, f"target {b2.key} is down") == 1

            # A killed nginx fails its checks; the same nginx again on its port passes them.
            await b3.kill(signal.SIGTERM)
            await until(is_up(proxy, b3.key, False), "b3 down")
            assert set(await served_by(port, 30)) == {"b1", "b2"}
            await b3.start()
            await until(is_up(proxy, b3.key), "b3 up again")
            assert set(await served_by(port, 30)) == {"b1", "b2", "b3"}
            assert target(proxy, b1.key) == {
                "up": True, "active": 0, "fails": 0, "last_error": None,
            }  # fmt: skip
    assert logged(caplog, f"target {b3.key} is down") == 1
    assert logged(caplog, f"target {b3.key} is up again") == 1
    assert logged(caplog, f"target {b1.key} is") == 0


@async_test()
async def test_tcp_health_checks_time_out_on_a_blackholed_target(tmp_path: Path) -> None:
    port = free_port()
    check = {"type": "tcp", "interval": 0.3, "timeout": 0.2, "fall": 1}
    async with nginxes(tmp_path, "b1") as (b1,):
        with blackhole() as hole:
            targets = [{"host": LOOPBACK, "port": hole}, b1.target]
            route = web(port, targets, "fast-lane", health_check=check)
            async with SmartRoute([route], bind_address=LOOPBACK, connect_timeout=5) as proxy:
                key = f"{LOOPBACK}:{hole}"
                await until(is_up(proxy, key, False), "the blackholed target down")
                assert "timed out after 0.2s" in target(proxy, key)["last_error"]
                started = time.monotonic()
                assert await served_by(port, 20) == {"b1": 20}
                assert time.monotonic() - started < 2  # no request waited on the blackhole


@async_test()
async def test_stopping_the_proxy_does_not_log_a_dead_target_up_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    caplog.set_level(logging.WARNING, "smartroute")
    check = {"type": "tcp", "interval": 0.2, "fall": 1}
    async with nginxes(tmp_path, "b1", "b2") as (b1, b2):
        route = web(port, [b1.target, b2.target], "fast-lane", health_check=check)
        async with SmartRoute([route], bind_address=LOOPBACK) as proxy:
            await b2.kill()
            await until(is_up(proxy, b2.key, False), "b2 down")
    assert logged(caplog, f"target {b2.key} is down") == 1
    assert logged(caplog, f"target {b2.key} is up again") == 0  # it never came back


# -- 4. passive health -------------------------------------------------------------------------


@PATHS
@pytest.mark.parametrize("dead", ["refused", "blackhole"])
@async_test()
async def test_passive_health_stops_trying_a_dead_target_after_its_failure(
    path: str, dead: str, tmp_path: Path
) -> None:
    port = free_port()
    connect_timeout = 0.5
    async with nginxes(tmp_path, "b1") as (b1,):
        with blackhole() as hole:
            dead_port = hole if dead == "blackhole" else free_port()
            targets = [{"host": LOOPBACK, "port": dead_port}, b1.target]
            passive = {"max_fails": 1, "fail_timeout": 30}
            route = web(port, targets, path, passive_health=passive)
            async with SmartRoute(
                [route], bind_address=LOOPBACK, connect_timeout=connect_timeout
            ) as proxy:
                code, out, err = await curl(
                    "-o", "/dev/null", "-w", "%{http_code} %{time_total}\\n",
                    f"http://{LOOPBACK}:{port}/[1-40]",
                )  # fmt: skip
                assert code == 0, err
                answers = [line.split() for line in out.splitlines()]
                dead_state = target(proxy, f"{LOOPBACK}:{dead_port}")
                live_state = target(proxy, b1.key)
    assert len(answers) == 40 and {status for status, _ in answers} == {"200"}, out
    slow = [float(t) for _, t in answers if float(t) >= connect_timeout]
    assert len(slow) <= 1, out  # only the request that found the target dead waited on it
    if dead == "blackhole":
        assert len(slow) == 1, out
    assert dead_state["up"] is False and dead_state["fails"] == 1, dead_state
    assert live_state["up"] is True and live_state["fails"] == 0, live_state


# -- 5. fallback -------------------------------------------------------------------------------


@PATHS
@async_test()
async def test_a_route_without_an_up_target_falls_back_then_answers_503(
    path: str, tmp_path: Path
) -> None:
    port = free_port()
    dead = free_ports(2)
    check = {"type": "tcp", "interval": 0.2, "fall": 1}
    async with nginxes(tmp_path, "b1") as (b1,):
        down = [{"host": LOOPBACK, "port": p} for p in dead]
        routes = [
            web(port, down, path, name="main", priority=10, health_check=check),
            web(port, [b1.target], path, name="spare"),
        ]
        async with SmartRoute(routes, bind_address=LOOPBACK) as proxy:
            for p in dead:
                await until(is_up(proxy, f"{LOOPBACK}:{p}", False), f"{p} down")
            assert await served_by(port, 50) == {"b1": 50}
            await proxy.remove_route("spare")
            code, out, err = await curl("-i", f"http://{LOOPBACK}:{port}/")
    assert code == 0, err
    head = out.split("\r\n\r\n")[0]
    assert head.startswith("HTTP/1.1 503"), out
    retry_after = re.search(r"(?im)^retry-after: *(\d+)\r?$", head)
    assert retry_after is not None and int(retry_after.group(1)) >= 1, head


@async_test()
async def test_a_raw_tcp_route_without_an_up_target_falls_back_then_closes(
    tmp_path: Path,
) -> None:
    port = free_port()
    dead = free_ports(2)
    check = {"type": "tcp", "interval": 0.2, "fall": 1}

    def tcp(name: str, targets: list[dict[str, Any]], priority: int, **action: Any) -> Any:
        action = {"type": "forward", "targets": targets, **action}
        return {"name": name, "priority": priority, "match": {"ports": port}, "action": action}

    async def get() -> bytes:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        try:
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            data, _ = await read_to_end(reader, 5)
        finally:
            writer.close()
        return data

    async with nginxes(tmp_path, "b1") as (b1,):
        down = [{"host": LOOPBACK, "port": p} for p in dead]
        routes = [tcp("main", down, 10, health_check=check), tcp("spare", [b1.target], 0)]
        async with SmartRoute(routes, bind_address=LOOPBACK) as proxy:
            for p in dead:
                await until(is_up(proxy, f"{LOOPBACK}:{p}", False), f"{p} down")
            assert (await get()).endswith(b"\r\n\r\nb1\n")
            await proxy.remove_route("spare")
            assert await get() == b""  # closed (or reset) without a byte


# -- 6. no failed request while a backend dies -------------------------------------------------


@async_test(timeout=40)
async def test_wrk_sees_no_failure_when_a_backend_is_killed(tmp_path: Path) -> None:
    port = free_port()
    # Paced backends hold requests for a while: the killed one takes some unanswered with it.
    async with nginxes(tmp_path, "b1", "b2", "b3", pace=1000) as (b1, b2, b3):
        route = web(
            port,
            [b1.target, b2.target, b3.target],
            "transport",
            retry={"attempts": 3, "backoff": 0.01},
            passive_health={"max_fails": 1, "fail_timeout": 60},
        )
        async with SmartRoute([route], bind_address=LOOPBACK) as proxy:
            load = asyncio.create_task(
                wrk_run(tmp_path, f"http://{LOOPBACK}:{port}/", "-t2", "-c20", "-d4s")
            )
            try:
                await until(lambda: proxy.stats()["connections"]["active"] >= 20, "wrk's load")
                await asyncio.sleep(1)  # under load for a while: the kill lands mid-run
                await until(lambda: target(proxy, b2.key)["active"] >= 2, "requests held by b2")
                await b2.kill()
                report, counts = await load
            finally:
                load.cancel()
            killed = target(proxy, b2.key)
            backends = (b1, b2, b3)
            await until(
                lambda: all(target(proxy, b.key)["active"] == 0 for b in backends),
                "no request counted as under way once wrk is gone",
            )
    done = re.search(r"(\d+) requests in", report)
    assert done is not None and int(done.group(1)) > 1000, report
    assert "Socket errors" not in report, report
    assert "Non-2xx or 3xx responses" not in report, report
    assert set(counts) == {"b1", "b2", "b3"}, counts  # every answer came from a backend
    assert killed["up"] is False and killed["fails"] >= 1, killed


# -- 7. a new target that starts down ----------------------------------------------------------


@PATHS
@async_test()
async def test_a_target_set_initially_down_gets_no_traffic_until_its_check_passes(
    path: str, tmp_path: Path
) -> None:
    port = free_port()
    # fall 3: a target that started up would take traffic for a few checks before going down.
    check = {"type": "http", "path": "/health", "interval": 0.2, "rise": 2, "fall": 3}
    async with nginxes(tmp_path, "b1", "b2") as (b1, b2):
        b2.flag.touch()
        async with SmartRoute([web(port, [b1.target], path, health_check=check)],
                              bind_address=LOOPBACK) as proxy:  # fmt: skip
            await proxy.set_targets("web", [b1.target, {**b2.target, "initial": "down"}])
            assert target(proxy, b2.key)["up"] is False
            assert await served_by(port, 100) == {"b1": 100}
            await checks_run(proxy, 4)
            assert await served_by(port, 100) == {"b1": 100}
            b2.flag.unlink()
            await until(is_up(proxy, b2.key), "b2 up once its checks pass")
            counts = await served_by(port, 100)
    assert counts == {"b1": 50, "b2": 50}, counts
