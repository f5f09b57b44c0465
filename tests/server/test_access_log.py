"""The ``access_log`` setting: text (the old lines, to the ``smartroute.access`` logger), json
and combined lines, written to a file that :func:`reopen_files` reopens after a rotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from support import LOOPBACK, async_test, curl, echo_handler, free_port, http_answer

from smartroute import SmartRoute
from smartroute.server.access_log import reopen_files

_http_backend = http_answer(b"hello")


@contextlib.asynccontextmanager
async def proxy_with(
    access_log: dict[str, Any] | None,
) -> AsyncIterator[tuple[SmartRoute, int, int]]:
    """A proxy with an HTTP route (port 1) and a TCP route (port 2)."""
    http_port, tcp_port = free_port(), free_port()
    web = await asyncio.start_server(_http_backend, LOOPBACK, 0)
    echo = await asyncio.start_server(echo_handler, LOOPBACK, 0)
    routes = [
        {
            "name": "web",
            "match": {"ports": http_port},
            "action": {
                "type": "forward",
                "protocol": "http",
                "targets": [{"host": LOOPBACK, "port": web.sockets[0].getsockname()[1]}],
            },
        },
        {
            "name": "tcp",
            "match": {"ports": tcp_port},
            "action": {
                "type": "forward",
                "targets": [{"host": LOOPBACK, "port": echo.sockets[0].getsockname()[1]}],
            },
        },
    ]
    settings = {} if access_log is None else {"access_log": access_log}
    try:
        async with SmartRoute(routes, bind_address=LOOPBACK, **settings) as proxy:
            yield proxy, http_port, tcp_port
    finally:
        for server in (web, echo):
            server.close()
            await server.wait_closed()


async def traffic(proxy: SmartRoute, http_port: int, tcp_port: int, requests: int = 2) -> None:
    """``requests`` GETs on one kept-alive curl connection, then one TCP echo connection;
    returns once both connections were accounted."""
    url = f"http://{LOOPBACK}:{http_port}/p?q=1"
    args = [arg for _ in range(requests) for arg in ("-o", "/dev/null", url)]
    code, _, err = await curl("-A", 'agent "x"', "-e", "http://ref.test/", *args)
    assert code == 0, err
    reader, writer = await asyncio.open_connection(LOOPBACK, tcp_port)
    writer.write(b"abc")
    await asyncio.wait_for(reader.readexactly(3), 5)
    writer.close()
    total = proxy.stats()["connections"]["total"]
    deadline = asyncio.get_running_loop().time() + 5
    while proxy.stats()["connections"] != {"active": 0, "total": total}:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)


@async_test(30)
async def test_text_lines_go_to_the_logger_as_before(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="smartroute.access")
    async with proxy_with(None) as (proxy, http_port, tcp_port):
        await traffic(proxy, http_port, tcp_port)
    lines = [r.getMessage() for r in caplog.records if r.name == "smartroute.access"]
    request = re.compile(
        r"^c\d+ 127\.0\.0\.1:\d+ GET 127\.0\.0\.1(:\d+)?/p\?q=1 route=web status=200 time=\d+\.\d{3}s$"
    )
    connection = re.compile(
        r"^c\d+ 127\.0\.0\.1:\d+ -> :\d+ route=(web|tcp) domain=- target=127\.0\.0\.1:\d+ "
        r"in=\d+ out=\d+ time=\d+\.\d{3}s ok$"
    )
    assert sum(bool(request.match(line)) for line in lines) == 2, lines
    assert sum(bool(connection.match(line)) for line in lines) == 2, lines
    assert len(lines) == 4, lines


@async_test(30)
async def test_json_lines_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    async with proxy_with({"format": "json", "path": str(path)}) as (proxy, http_port, tcp_port):
        await traffic(proxy, http_port, tcp_port)
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    requests = [e for e in entries if e["type"] == "request"]
    connections = [e for e in entries if e["type"] == "connection"]
    assert len(requests) == 2 and len(connections) == 2, entries
    first = requests[0]
    assert (first["method"], first["target"], first["version"]) == ("GET", "/p?q=1", "HTTP/1.1")
    assert (first["route"], first["status"]) == ("web", 200)
    assert first["user_agent"] == 'agent "x"' and first["referer"] == "http://ref.test/"
    assert first["bytes_out"] > 5 and first["bytes_in"] > 0 and first["duration"] >= 0
    by_route = {e["route"]: e for e in connections}
    assert by_route["web"]["requests"] == 2 and by_route["tcp"]["requests"] == 0
    assert by_route["tcp"]["bytes_in"] == by_route["tcp"]["bytes_out"] == 3
    # Each request's bytes add up to its connection's.
    assert sum(e["bytes_in"] for e in requests) == by_route["web"]["bytes_in"]
    assert sum(e["bytes_out"] for e in requests) == by_route["web"]["bytes_out"]


COMBINED = re.compile(
    r"^127\.0\.0\.1 - - \[\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} \+0000\] "
    r'"GET /p\?q=1 HTTP/1\.1" 200 \d+ "http://ref\.test/" "agent \\x22x\\x22"$'
)
CONNECTION = re.compile(
    r'^127\.0\.0\.1 - - \[[^]]+\] "CONN :\d+ tcp" ok 3 "-" "-" in=3 '
    r"target=127\.0\.0\.1:\d+ time=\d+\.\d{3}s$"
)


@async_test(30)
async def test_combined_lines_and_a_rotation_loses_nothing(tmp_path: Path) -> None:
    path, rotated = tmp_path / "access.log", tmp_path / "access.log.1"
    settings = {"format": "combined", "path": str(path)}
    async with proxy_with(settings) as (proxy, http_port, tcp_port):
        await traffic(proxy, http_port, tcp_port, requests=3)
        path.rename(rotated)  # what logrotate does, then it sends SIGUSR1
        await traffic(proxy, http_port, tcp_port, requests=1)  # still to the renamed file
        assert reopen_files() >= 1
        await traffic(proxy, http_port, tcp_port, requests=2)
    old, new = rotated.read_text().splitlines(), path.read_text().splitlines()
    # HTTP connections get their request lines only; the TCP one its connection line.
    assert [bool(COMBINED.match(line)) for line in old] == [True] * 3 + [False, True, False], old
    assert all(COMBINED.match(line) or CONNECTION.match(line) for line in old + new), old + new
    assert sum(bool(COMBINED.match(line)) for line in new) == 2, new
    assert sum(bool(CONNECTION.match(line)) for line in new) == 1, new
    assert len(new) == 3


@async_test(30)
async def test_text_lines_in_a_file_match_the_logger_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "access.log"
    async with proxy_with({"format": "text", "path": str(path)}) as (proxy, http_port, tcp_port):
        caplog.set_level(logging.INFO, logger="smartroute.access")
        await traffic(proxy, http_port, tcp_port)
    assert not [r for r in caplog.records if r.name == "smartroute.access"]  # the file only
    lines = path.read_text().splitlines()
    assert len(lines) == 4
    assert sum(" route=web status=200 time=" in line for line in lines) == 2, lines
    assert sum(" route=tcp domain=- target=" in line for line in lines) == 1, lines


@async_test(60)
async def test_every_worker_reopens_its_file_after_a_rotation(tmp_path: Path) -> None:
    """``workers=2``: both processes append to one file; after a rename, ``reopen_logs()``
    has the worker reopen it too (SIGUSR1), so lines from both processes reach the new file."""
    path = tmp_path / "access.log"
    http_port = free_port()
    web = await asyncio.start_server(_http_backend, LOOPBACK, 0)
    route = {
        "name": "web",
        "match": {"ports": http_port},
        "action": {
            "type": "forward",
            "protocol": "http",
            "targets": [{"host": LOOPBACK, "port": web.sockets[0].getsockname()[1]}],
        },
    }
    access = {"format": "json", "path": str(path)}
    url = f"http://{LOOPBACK}:{http_port}/"

    async def writers(file: Path) -> set[str]:
        """The processes (connection id prefixes) that wrote request lines to ``file``."""
        if not file.exists():
            return set()
        lines = [json.loads(line) for line in file.read_text().splitlines()]
        return {e["id"].rpartition("c")[0] or "parent" for e in lines if e["type"] == "request"}

    async def until_both_wrote(file: Path) -> None:
        deadline = asyncio.get_running_loop().time() + 30
        while len(await writers(file)) < 2:  # new connections spread over both processes
            assert asyncio.get_running_loop().time() < deadline, await writers(file)
            code, _, err = await curl(url, "-o", "/dev/null")
            assert code == 0, err

    try:
        async with SmartRoute(
            [route], bind_address=LOOPBACK, workers=2, access_log=access
        ) as proxy:
            await until_both_wrote(path)
            rotated = tmp_path / "access.log.1"
            path.rename(rotated)
            assert proxy.reopen_logs() == 1  # the parent's own file; the worker is signalled
            await until_both_wrote(path)
    finally:
        web.close()
        await web.wait_closed()
    assert len(await writers(rotated)) == 2


@async_test(30)
async def test_the_file_is_open_only_while_the_proxy_runs(tmp_path: Path) -> None:
    import os

    path = tmp_path / "access.log"

    def holding() -> bool:
        fds = Path("/proc/self/fd")
        return any(os.path.realpath(fd) == str(path) for fd in fds.iterdir() if fd.exists())

    async with proxy_with({"format": "text", "path": str(path)}) as (proxy, http_port, tcp_port):
        assert holding()
        await traffic(proxy, http_port, tcp_port)
        assert proxy.reopen_logs() == 1
    assert not holding() and proxy.reopen_logs() == 0
    assert "route=web" in path.read_text()
