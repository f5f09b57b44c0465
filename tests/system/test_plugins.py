"""Plugins end to end: real plugin processes, a real proxy and real backends on loopback.

The two example plugins run as they ship (``examples/plugins/api_key.py`` under this Python,
``examples/plugins/tenant_router.js`` under node): their hooks refuse, allow and change what
reaches the backend; ``routes`` limits where they serve; a plugin killed with SIGKILL is
restarted while its hooks fail as ``fail`` says; its ``set_targets``, ``set_speed`` and ``log``
pushes take effect. Misbehaving plugins (one small Python script, written into the test's
folder, with a behaviour per run) write garbage, never say ready, answer broken or oversized
frames, hang, exit at once or write an endless line: the proxy goes on answering as ``fail``
says, holds bounded memory, and on ``stop()`` returns promptly leaving no plugin process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from http_backend import http_backend
from support import (
    EXAMPLES,
    LOOPBACK,
    async_test,
    free_ports,
    named_handler,
    read_to_end,
    require_tool,
    serve,
)

import smartroute.proxy
from smartroute import SmartRoute
from smartroute.plugins import host
from smartroute.routing.model import ForwardAction

PLUGIN_FAILED = b"refused: a hook failed\n"
KEY = {"X-Api-Key": "secret"}
STOPS_WITHIN = 1.5  # seconds stop() may take with well-behaved plugins (they exit on SIGTERM)
QUICK_READY = 0.5  # READY_TIMEOUT while bad plugins run


def api_key(folder: Path, **options: Any) -> dict[str, Any]:
    """The Python example plugin (on_request: 401 without ``X-Api-Key: secret``), making its
    socket's folder in ``folder``."""
    command = [sys.executable, str(EXAMPLES / "plugins" / "api_key.py")]
    return example_plugin("api-key", command, folder, **options)


def tenants(folder: Path, **options: Any) -> dict[str, Any]:
    """The Node.js example plugin (``X-Tenant``: seen, or 403 for "blocked")."""
    command = [require_tool("node"), str(EXAMPLES / "plugins" / "tenant_router.js")]
    return example_plugin("tenants", command, folder, **options)


def example_plugin(name: str, command: list[str], folder: Path, **options: Any) -> dict[str, Any]:
    # Both examples make their socket's folder in TMPDIR; a plugin killed (or the Python
    # example, at any exit) leaves it behind: in the test's own folder, removed with it.
    env = {"TMPDIR": str(folder), **options.pop("env", {})}
    return {"name": name, "command": command, "env": env, **options}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a short path, for Unix sockets (their paths are limited to ~100 bytes)."""
    with tempfile.TemporaryDirectory(prefix="sr-") as folder:
        yield Path(folder)


def http_route(name: str, port: int, target: int) -> dict[str, Any]:
    return {
        "name": name,
        "match": {"ports": port},
        "action": {
            "type": "forward",
            "protocol": "http",
            "targets": [{"host": LOOPBACK, "port": target}],
        },
    }


# -- clients ---------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def sent(self) -> dict[str, Any]:
        """What the describing backend said it got."""
        info: dict[str, Any] = json.loads(self.body)
        return info

    def sent_headers(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for name, value in self.sent()["headers"]:
            found.setdefault(name.lower(), []).append(value)
        return found


async def get(port: int, path: str = "/", headers: dict[str, str] | None = None) -> Reply:
    """One request on its own connection (``Connection: close``), read to its end."""
    lines = [f"GET {path} HTTP/1.1", "Host: plugins.test", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        raw, _ = await read_to_end(reader)
    finally:
        writer.close()
    assert raw, "the connection closed without an answer"
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    found = {}
    for field in fields:
        name, _, value = field.partition(":")
        found[name.lower()] = value.strip()
    return Reply(int(status_line.split()[1]), found, body)


async def eventually(check: Callable[[], bool], what: str, timeout: float = 5) -> None:
    """Wait (bounded) until ``check()`` holds: for what a plugin pushes, there is no event."""
    try:
        async with asyncio.timeout(timeout):
            while not check():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"not {what} within {timeout}s") from None


# -- proxies and processes ---------------------------------------------------------------------


def gone(pids: Iterable[int]) -> None:
    """Every process of ``pids`` has ended and was reaped."""
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@contextlib.asynccontextmanager
async def running(
    routes: list[dict[str, Any]], plugins: list[dict[str, Any]], stops_within: float = STOPS_WITHIN
) -> AsyncIterator[SmartRoute]:
    """A started proxy; when the block ends, ``stop()`` must return within ``stops_within``
    seconds and leave none of the plugin processes it ran last."""
    proxy = SmartRoute(routes, bind_address=LOOPBACK, plugins=plugins)
    await proxy.start()
    try:
        yield proxy
    except BaseException:
        await proxy.stop()
        raise
    pids = [process.pid for process in proxy._plugins.processes if process.pid is not None]
    began = time.monotonic()
    await proxy.stop()
    assert time.monotonic() - began < stops_within
    gone(pids)


def plugin_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "smartroute.plugins"]


def moved(proxy: SmartRoute, port: int) -> bool:
    """The proxy's first route forwards to ``port`` now."""
    action = proxy.routes[0].action
    assert isinstance(action, ForwardAction)
    return action.targets[0].port == port


# -- the example plugins ---------------------------------------------------------------------


@async_test()
async def test_both_example_plugins_answer_their_hooks(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (port,) = free_ports(1)
    caplog.set_level(logging.INFO, logger="smartroute.plugins")
    with http_backend() as backend:
        async with running(
            [http_route("api", port, backend.port)], [api_key(short_dir), tenants(short_dir)]
        ):
            refused = await get(port, headers={"X-Tenant": "acme"})
            assert (refused.status, refused.body) == (401, b"an API key is needed\n")
            reply = await get(port, headers={**KEY, "X-Tenant": "acme"})
            assert reply.status == 200
            sent = reply.sent_headers()
            assert sent["x-checked-by"] == ["api-key-plugin"]
            assert sent["x-tenant-seen"] == ["acme"]
            assert "x-api-key" not in sent
            blocked = await get(port, headers={**KEY, "X-Tenant": "blocked"})
            assert (blocked.status, blocked.body) == (403, b"this tenant is blocked\n")
            reply = await get(port, headers=KEY)  # no tenant: the tenant plugin says nothing
            assert reply.status == 200
            assert "x-tenant-seen" not in reply.sent_headers()
            # The Node plugin counts every connection that ended (refused ones too).
            ended = "plugin tenants: connections ended: 4"
            await eventually(lambda: ended in plugin_log(caplog), "4 disconnects logged")
    log = plugin_log(caplog)
    assert "plugin api-key: checking API keys for api" in log
    assert "plugin tenants: routing tenants for api" in log
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@async_test()
async def test_routes_limits_the_routes_a_plugin_serves(
    short_dir: Path, lane_only: list[int]
) -> None:
    private, public, plain = free_ports(3)
    with http_backend() as backend:
        routes = [
            http_route("private", private, backend.port),
            http_route("public", public, backend.port),
            http_route("plain", plain, backend.port),
        ]
        plugins = [api_key(short_dir, routes=["private"]), tenants(short_dir, routes=["public"])]
        async with running(routes, plugins):
            assert (await get(private, headers={"X-Tenant": "acme"})).status == 401
            sent = (await get(private, headers={**KEY, "X-Tenant": "acme"})).sent_headers()
            assert "x-checked-by" in sent and "x-tenant-seen" not in sent
            sent = (await get(public, headers={"X-Tenant": "acme"})).sent_headers()
            assert "x-checked-by" not in sent and sent["x-tenant-seen"] == ["acme"]
            assert (await get(public, headers={"X-Tenant": "blocked"})).status == 403
            sent = (await get(plain, headers={"X-Tenant": "blocked"})).sent_headers()
            assert "x-checked-by" not in sent and "x-tenant-seen" not in sent
    # Routes with plugins take the asyncio path, like any hooked route; the others do not.
    assert sorted(set(lane_only)) == sorted([private, public])


REFUSED_BY = {"api-key": ({}, 401), "tenants": ({"X-Tenant": "blocked"}, 403)}


@pytest.mark.parametrize("fail", ["closed", "open"])
@pytest.mark.parametrize("make", [api_key, tenants], ids=["api-key", "tenants"])
@async_test()
async def test_a_killed_plugin_fails_as_told_then_is_restarted(
    make: Callable[..., dict[str, Any]],
    fail: str,
    short_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(host, "BACKOFF", 0.5)  # down long enough to be seen down
    plugin = make(short_dir, fail=fail)
    headers, refused = REFUSED_BY[plugin["name"]]
    down = 503 if fail == "closed" else 200
    (port,) = free_ports(1)
    with http_backend() as backend:
        async with running([http_route("web", port, backend.port)], [plugin]) as proxy:
            process = proxy._plugins.processes[0]
            first = process.pid
            assert first is not None and process.starts == 1
            statuses: list[int] = []
            done = asyncio.Event()

            async def traffic() -> None:
                while not done.is_set():
                    statuses.append((await get(port, headers=headers)).status)

            load = asyncio.create_task(traffic())
            await eventually(lambda: len(statuses) >= 3, "traffic flowing")
            os.kill(first, signal.SIGKILL)
            await eventually(lambda: not process.ready, "the plugin seen down")
            reply = await get(port, headers=headers)
            assert reply.status == down
            if fail == "closed":
                assert reply.body == PLUGIN_FAILED
            assert await process.wait_ready(5)
            assert process.pid != first and process.starts == 2
            seen = len(statuses)
            await eventually(lambda: len(statuses) >= seen + 3, "traffic after the restart")
            done.set()
            await load
            assert (await get(port, headers=headers)).status == refused
        # Every request was answered: by the plugin, or as ``fail`` says while it was down.
        assert set(statuses) <= {refused, down}, statuses
        assert down in statuses and statuses[-1] == refused
        gone([first])


@async_test()
async def test_set_targets_pushed_by_a_plugin_moves_traffic(short_dir: Path) -> None:
    (port,) = free_ports(1)
    with http_backend("first") as first, http_backend("pushed") as pushed:
        plugin = tenants(short_dir, env={"PUSH_TARGETS": f"web:{LOOPBACK}:{pushed.port}"})
        began = time.monotonic()
        async with running([http_route("web", port, first.port)], [plugin]) as proxy:
            assert time.monotonic() - began < 3  # a push right after ready does not stall start
            await eventually(lambda: moved(proxy, pushed.port), "the pushed targets in force")
            reply = await get(port)
            assert (reply.status, reply.sent()["backend"]) == (200, "pushed")
        assert not first.connections


@async_test()
async def test_set_speed_pushed_by_a_plugin_limits_downloads(short_dir: Path) -> None:
    limited, free = free_ports(2)
    size, rate = 600_000, 200_000
    with http_backend() as backend:
        routes = [http_route("slow", limited, backend.port), http_route("fast", free, backend.port)]
        plugin = tenants(short_dir, routes=["slow", "fast"], env={"PUSH_SPEED": f"slow:{rate}"})
        async with running(routes, [plugin]) as proxy:
            process = proxy._plugins.processes[0]
            await eventually(lambda: "slow" in process.speeds, "the pushed speed known")
            timings = {}
            for port in (limited, free):
                began = time.monotonic()
                reply = await get(port, "/big", headers={"X-Size": str(size)})
                timings[port] = time.monotonic() - began
                assert (reply.status, len(reply.body)) == (200, size)
    assert 2.0 < timings[limited] < 10, timings  # 600 KB at 200 KB/s: about 3 s
    assert timings[free] < 1.0, timings


@pytest.mark.parametrize("make", [api_key, tenants], ids=["api-key", "tenants"])
@async_test()
async def test_an_example_plugin_exits_when_its_stdin_closes(
    make: Callable[..., dict[str, Any]], short_dir: Path
) -> None:
    plugin = make(short_dir)
    proc = await asyncio.create_subprocess_exec(
        *plugin["command"],
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, **plugin["env"]},
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(b'{"method": "configure", "params": {"routes": [{"name": "web"}]}}\n')
        async with asyncio.timeout(5):
            while (message := json.loads(await proc.stdout.readline()))["method"] != "ready":
                assert message["method"] == "log"
            socket_path = message["params"]["socket"]
            assert os.path.exists(socket_path)
            proc.stdin.close()
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if make is tenants:  # it removes its folder (the Python example leaves it)
        assert not os.path.exists(os.path.dirname(socket_path))


# -- misbehaving plugins ---------------------------------------------------------------------

BAD_PLUGIN = r'''
"""A plugin that misbehaves as argv[1] says (any other word: it behaves, answering every call
with an X-Bad-Plugin header). It notes its pid in the file argv[2] (and each SIGTERM in
argv[2] + ".term" when env DEAF has it ignore them), serves the hooks env HOOKS names (default
on_request) on the socket argv[3], and first pushes set_targets when env PUSH_TARGETS
(route:port) says so."""
import json, os, signal, socket, struct, sys, threading

behaviour, pids, path = sys.argv[1:4]
hooks = os.environ.get("HOOKS", "on_request").split(",")
with open(pids, "a") as notes:
    notes.write(f"{os.getpid()}\n")
if os.environ.get("DEAF"):
    signal.signal(signal.SIGTERM, lambda *_: open(pids + ".term", "a").write("TERM\n"))
REPLIES = {"frame-not-json": b"{not json", "frame-not-object": b"[1, 2]"}


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def answer(conn):
    with conn:
        while len(head := conn.recv(4, socket.MSG_WAITALL)) == 4:
            conn.recv(struct.unpack(">I", head)[0], socket.MSG_WAITALL)
            if behaviour == "hangs":
                continue
            verdict = json.dumps({"set_headers": {"X-Bad-Plugin": "answered"}}).encode()
            reply = REPLIES.get(behaviour, verdict)
            size = 1024 * 1024 + 1 if behaviour == "frame-too-big" else len(reply)
            conn.sendall(struct.pack(">I", size) + reply)


def serve():
    server = socket.socket(socket.AF_UNIX)
    if os.path.exists(path):
        os.unlink(path)
    server.bind(path)
    server.listen()

    def accept():
        while True:
            threading.Thread(target=answer, args=(server.accept()[0],), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


sys.stdin.readline()  # configure
if behaviour == "never-ready":
    sys.stdin.read()
    sys.exit()
if behaviour == "garbage-then-ready":
    for line in ("not json", "[1, 2]", '{"params": {}}', '{"method": "ready", "params": [1]}',
                 '{"method": "ready"}', '{"method": "nonsense"}', ""):
        say(line)
    sys.stdout.buffer.write(b"\xff\xfe not UTF-8\n")
    sys.stdout.flush()
if behaviour == "line-too-long":
    for _ in range(64):
        sys.stdout.write("x" * (1024 * 1024))  # 64 MiB, one line
    say("")
if "PUSH_TARGETS" in os.environ:
    route, port = os.environ["PUSH_TARGETS"].split(":")
    targets = [{"host": "127.0.0.1", "port": int(port)}]
    say(json.dumps({"method": "set_targets", "params": {"route": route, "targets": targets}}))
if behaviour == "exits-after-ready":  # and serves nothing meanwhile
    say(json.dumps({"method": "ready", "params": {"socket": path, "hooks": hooks}}))
    sys.exit()
serve()
say(json.dumps({"method": "ready", "params": {"socket": path, "hooks": hooks}}))
sys.stdin.read()  # until smartroute goes
if os.environ.get("DEAF"):  # deaf to its stdin's end too: only SIGKILL ends it
    threading.Event().wait()
'''

# behaviour -> (it answers hooks, it is restarted, what the proxy logs about it)
BAD_BEHAVIOURS = {
    "garbage-then-ready": (True, False, "not a message on stdout"),
    "never-ready": (False, True, f"no 'ready' within {QUICK_READY:g}s"),
    "frame-not-json": (False, False, "the plugin sent a frame that is not JSON"),
    "frame-too-big": (False, False, "a frame of 1048577 bytes, over 1048576"),
    "hangs": (False, False, "no answer in time"),
    "exits-after-ready": (False, True, "exited (code 0)"),
    "line-too-long": (False, True, "a line over 1048576 bytes on stdout"),
}


def bad_plugin(tmp_path: Path, socket_dir: Path, behaviour: str, **options: Any) -> dict[str, Any]:
    script = tmp_path / "bad_plugin.py"
    script.write_text(BAD_PLUGIN)
    pids = tmp_path / "pids"
    command = [sys.executable, str(script), behaviour, str(pids), str(socket_dir / "bad.sock")]
    return {"name": "bad", "command": command, "timeout": 0.3, **options}


def pids_of(tmp_path: Path) -> list[int]:
    """Every process the bad plugin's runs started."""
    return [int(line) for line in (tmp_path / "pids").read_text().split()]


@pytest.mark.parametrize("fail", ["closed", "open"])
@pytest.mark.parametrize("behaviour", BAD_BEHAVIOURS)
@async_test()
async def test_a_misbehaving_plugin_neither_crashes_nor_stalls_the_proxy(
    behaviour: str,
    fail: str,
    tmp_path: Path,
    short_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(host, "READY_TIMEOUT", QUICK_READY)
    monkeypatch.setattr(smartroute.proxy, "READY_TIMEOUT", QUICK_READY)
    answers, restarts, logged = BAD_BEHAVIOURS[behaviour]
    caplog.set_level(logging.WARNING, logger="smartroute.plugins")
    plugin = bad_plugin(tmp_path, short_dir, behaviour, fail=fail)
    (port,) = free_ports(1)
    with http_backend() as backend:
        tracemalloc.start()
        try:
            async with running([http_route("web", port, backend.port)], [plugin]) as proxy:
                process = proxy._plugins.processes[0]
                for _ in range(3):
                    began = time.monotonic()
                    reply = await get(port)
                    assert time.monotonic() - began < 1.0  # the per-call timeout is 0.3 s
                    if answers:
                        assert reply.sent_headers()["x-bad-plugin"] == ["answered"]
                    elif fail == "closed":
                        assert (reply.status, reply.body) == (503, PLUGIN_FAILED)
                    else:
                        assert reply.status == 200
                        assert "x-bad-plugin" not in reply.sent_headers()
                if restarts:
                    await eventually(lambda: process.starts >= 3, "restarted twice", 5)
                else:
                    assert process.starts == 1
                await eventually(
                    lambda: any(logged in line for line in plugin_log(caplog)), "the log line"
                )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    gone(pids_of(tmp_path))
    assert peak < 16 * 1024 * 1024  # whatever the plugin writes (64 MiB on one line, say)
    if restarts:
        waits = [line for line in plugin_log(caplog) if "restarting in" in line]
        assert waits[:2] == ["plugin bad: restarting in 0.1s", "plugin bad: restarting in 0.2s"]


@async_test()
async def test_a_plugin_deaf_to_sigterm_is_killed_on_stop(
    tmp_path: Path, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host, "STOP_GRACE", 0.5)
    (port,) = free_ports(1)
    with http_backend() as backend:
        plugin = bad_plugin(tmp_path, short_dir, "answers", env={"DEAF": "1"})
        async with running([http_route("web", port, backend.port)], [plugin], stops_within=2):
            assert (await get(port)).sent_headers()["x-bad-plugin"] == ["answered"]
            began = time.monotonic()
    assert time.monotonic() - began >= 0.5  # SIGTERM, the grace period, then SIGKILL
    assert (tmp_path / "pids.term").read_text() == "TERM\n"
    gone(pids_of(tmp_path))


# -- bugs found while this file was written (fixed since) -----------------------------------


@async_test()
async def test_a_plugin_may_push_set_targets_before_it_is_ready(
    tmp_path: Path, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host, "READY_TIMEOUT", 1.0)
    monkeypatch.setattr(smartroute.proxy, "READY_TIMEOUT", 1.0)
    (port,) = free_ports(1)
    with http_backend("first") as first, http_backend("pushed") as pushed:
        env = {"PUSH_TARGETS": f"web:{pushed.port}"}
        plugin = bad_plugin(tmp_path, short_dir, "answers", env=env)
        async with running([http_route("web", port, first.port)], [plugin]) as proxy:
            process = proxy._plugins.processes[0]
            assert process.ready and process.starts == 1  # start() waited for its 'ready'
            await eventually(lambda: moved(proxy, pushed.port), "the pushed targets in force")
            assert (await get(port)).sent()["backend"] == "pushed"


@async_test()
async def test_a_restarting_plugin_does_not_fail_the_response_of_a_request_it_let_through(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host, "BACKOFF", 3.0)  # down until the response comes
    arrived, release = asyncio.Event(), asyncio.Event()

    async def slow_backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            arrived.set()
            await release.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
            await writer.drain()
        finally:
            writer.close()

    (port,) = free_ports(1)
    async with serve(slow_backend) as target:
        async with running([http_route("web", port, target)], [api_key(short_dir)]) as proxy:
            process = proxy._plugins.processes[0]
            request = asyncio.create_task(get(port, headers=KEY))  # on_request lets it go
            async with asyncio.timeout(5):
                await arrived.wait()
            assert process.pid is not None
            os.kill(process.pid, signal.SIGKILL)
            await eventually(lambda: not process.ready, "the plugin seen down")
            release.set()
            reply = await request
            assert (reply.status, reply.body) == (200, b"ok\n")  # api_key serves no on_response


@async_test()
async def test_a_restarting_plugin_does_not_refuse_connections_it_never_hooks(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host, "BACKOFF", 3.0)
    (port,) = free_ports(1)
    async with serve(named_handler("raw")) as target:
        route = http_route("raw", port, target)
        route["action"]["protocol"] = "tcp"  # on_request never applies: api_key never answers
        async with running([route], [api_key(short_dir)]) as proxy:
            process = proxy._plugins.processes[0]
            assert process.pid is not None
            os.kill(process.pid, signal.SIGKILL)
            await eventually(lambda: not process.ready, "the plugin seen down")
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write(b"hello\n")
            writer.write_eof()
            try:
                assert await read_to_end(reader) == (b"raw\nhello\n", False)
            finally:
                writer.close()


@async_test()
async def test_a_failing_on_response_plugin_refuses_when_its_fail_is_closed(
    tmp_path: Path, short_dir: Path
) -> None:
    (port,) = free_ports(1)
    with http_backend() as backend:
        plugin = bad_plugin(tmp_path, short_dir, "hangs", env={"HOOKS": "on_response"})
        route = {**http_route("web", port, backend.port), "hooks_fail": "open"}
        async with running([route], [{**plugin, "fail": "closed"}]):
            reply = await get(port)
            assert (reply.status, reply.body) == (503, PLUGIN_FAILED)


@async_test()
async def test_an_answer_that_is_not_an_object_fails_as_the_plugin_says(
    tmp_path: Path, short_dir: Path
) -> None:
    (port,) = free_ports(1)
    with http_backend() as backend:
        plugin = bad_plugin(tmp_path, short_dir, "frame-not-object", fail="open")
        async with running([http_route("web", port, backend.port)], [plugin]):
            reply = await get(port)
            assert reply.status == 200  # the plugin is skipped


@async_test()
async def test_stop_leaves_no_process_while_a_plugin_is_being_ended(
    tmp_path: Path, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host, "READY_TIMEOUT", QUICK_READY)
    monkeypatch.setattr(smartroute.proxy, "READY_TIMEOUT", QUICK_READY)
    monkeypatch.setattr(host, "STOP_GRACE", 0.5)
    (port,) = free_ports(1)
    plugin = bad_plugin(tmp_path, short_dir, "never-ready", env={"DEAF": "1"})
    proxy = SmartRoute([http_route("web", port, 9)], bind_address=LOOPBACK, plugins=[plugin])
    await proxy.start()
    term = tmp_path / "pids.term"
    try:
        await eventually(term.exists, "SIGTERM sent (no 'ready' in time)")
        await proxy.stop()  # during the grace period of that SIGTERM
        gone(pids_of(tmp_path))
    finally:
        await proxy.stop()
        left = proxy._plugins.processes[0]._proc
        if left is not None and left.returncode is None:  # the bug: end it here
            left.kill()
            await left.wait()
