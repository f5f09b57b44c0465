"""The smartroute command: check, run with a config, run the demo; SIGTERM stops it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from support import EXAMPLES, LOOPBACK, async_test, free_port, free_port_range, read_line

from smartroute.cli import main


def write_toml(folder: Path, port: int, target: int, spare: int) -> Path:
    config = folder / "proxy.toml"
    config.write_text(
        f"""
[settings]
bind_address = "127.0.0.1"
initial_data_timeout = 2

[[routes]]
name = "echo"
match = {{ ports = {port}, domains = ["echo.test"] }}
action = {{ type = "socket-handler", socket_handler = "smartroute.helpers:SocketHandlers.echo" }}

[[routes]]
name = "fallback"
priority = 0
match = {{ ports = {port} }}
action = {{ type = "forward", targets = [{{ host = "127.0.0.1", port = {target} }}] }}

[[routes]]
name = "other"
match = {{ ports = "{spare}-{spare + 1}" }}
action = {{ type = "block" }}
"""
    )
    return config


def test_check_lists_routes_per_port_in_match_order(tmp_path: Path, capsys: object) -> None:
    config = write_toml(tmp_path, 7001, 7100, 7002)
    assert main(["check", str(config)]) == 0
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert "3 routes" in out
    port_block = out.split("port 7001 (reads first bytes):")[1].split("port 7002")[0]
    assert port_block.index("1. echo domains=echo.test") < port_block.index("2. fallback")
    assert "port 7002 (dispatches at once):" in out and "port 7003" in out


def test_check_reports_the_bad_field(tmp_path: Path, capsys: object) -> None:
    config = tmp_path / "bad.json"
    config.write_text(
        json.dumps({"routes": [{"match": {"ports": [80, 70000]}, "action": {"type": "block"}}]})
    )
    assert main(["check", str(config)]) == 2
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert "routes[0].match.ports[1]: 70000 is not a port (1-65535)" in err


def test_check_refuses_missing_and_unknown_files(tmp_path: Path, capsys: object) -> None:
    assert main(["check", str(tmp_path / "none.toml")]) == 2
    (tmp_path / "x.yaml").write_text("routes: []")
    assert main(["check", str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert "no such file" in err and "unsupported config type '.yaml'" in err


async def _start(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "smartroute",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def _wait_for_line(proc: asyncio.subprocess.Process, needle: bytes) -> list[bytes]:
    assert proc.stdout is not None
    lines: list[bytes] = []
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert line, f"process ended before printing {needle!r}: {lines}"
        lines.append(line)
        if needle in line:
            return lines


async def _stop(proc: asyncio.subprocess.Process) -> tuple[int, bytes]:
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode is not None
    return proc.returncode, err


@async_test(60)
async def test_run_serves_a_toml_config_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()

    async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"from backend\n")
        writer.close()

    backend = await asyncio.start_server(hello, LOOPBACK, 0)
    target = backend.sockets[0].getsockname()[1]
    config = write_toml(tmp_path, port, target, free_port_range(2))
    proc = await _start("run", str(config))
    try:
        await _wait_for_line(proc, f"listening on port {port}".encode())
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(b"GET / HTTP/1.1\r\nHost: echo.test\r\n\r\n")
        assert await read_line(reader) == b"GET / HTTP/1.1\r\n"
        writer.close()
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        assert await read_line(reader) == b"from backend\n"  # no Host: fallback after 2 s
        writer.close()
    finally:
        code, err = await _stop(proc)
        backend.close()
    assert code == 0
    assert b"smartroute.access" in err and b"route=echo" in err and b"route=fallback" in err


@async_test(60)
async def test_run_without_config_serves_the_demo() -> None:
    base = free_port_range(3)
    proc = await _start("run", "--demo-port", str(base))
    try:
        lines = await _wait_for_line(proc, f"listening on port {base + 2}".encode())
        banner = b"".join(lines)
        assert b"echo" in banner and b"shout" in banner and b"forward" in banner
        for port, send, expect in (
            (base, b"ping\n", b"ping\n"),
            (base + 1, b"hello\n", b"HELLO\n"),
            (base + 2, b"via forward\n", b"via forward\n"),
        ):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write(send)
            assert await read_line(reader) == expect
            writer.close()
    finally:
        code, _ = await _stop(proc)
    assert code == 0


def test_examples_run_and_show_what_they_promise() -> None:
    expected = {
        "echo_service.py": ["echoed: hello, smartroute"],
        "sni_passthrough.py": [
            "alpha.localhost: hello from the alpha.localhost backend",
            "beta.localhost: hello from the beta.localhost backend",
        ],
        "https_site.py": [
            "http:  301 https://site.localhost:9480/welcome?lang=en",
            "https: 200 hello over HTTPS",
        ],
        "static_site.py": [
            "/               200 text/html; charset=utf-8 <h1>smartroute docs</h1>",
            "/style.css      200 text/css; charset=utf-8",
            "/../etc/passwd  400",
        ],
        "api_gateway.py": [
            '/api/users   200 {"users": []}',
            "/index.html  200 <h1>home</h1>",
            '/api         200 {"users": []}',
        ],
        "load_balancing.py": [
            "weights 3:1:        blue=6 green=2",
            "green unhealthy:    blue=4",
            "blue stopped:       spare=4",
            "targets up:         ['spare']",
        ],
        "chat.py": [
            "alice: joined lobby, members ['alice']",
            "carol: joined lobby, members ['alice', 'bob', 'carol']",
            "mallory: refused (auth-failed: authentication refused)",
            "carol: away",
            "carol: back, resumed=True, same session=True, rooms ['lobby']",
            'bob: dance -> unknown-type: no handler for frame type "dance"',
            "[alice] bob: hi alice",
            "[bob] alice: hello everyone",
            "[carol] alice: carol, are you there?",  # sent while she was away
            "[alice] carol: back!",
        ],
        "relay_chain.py": [  # tests/system/test_relay_chain.py runs a chain of two processes
            "SNI a.localhost, edge certificate CN=edge-1.localhost",
            "same client address: True",
            "app b got Host b.localhost:9643, X-Forwarded-For 127.0.0.1, 127.0.0.1",
        ],
        "runtime_updates.py": [
            "echo:     before any update",
            "added:    {9501: 1, 9502: 1}",
            "shared:   {9501: 2, 9502: 1}",
            "removed:  {9501: 1}",
            "echo:     after every update, same connection",
        ],
    }
    programs = [p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")]
    assert sorted(programs) == sorted(expected)
    for name, lines in expected.items():
        done = subprocess.run(
            [sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        for line in lines:
            assert line in done.stdout, (name, done.stdout)


@async_test(60)
async def test_sighup_reloads_the_config_and_a_broken_file_keeps_the_running_routes(
    tmp_path: Path,
) -> None:
    first, second = free_port(), free_port()
    config = tmp_path / "proxy.json"

    def write(ports: list[int]) -> None:
        routes = [
            {
                "name": f"echo-{p}",
                "match": {"ports": p},
                "action": {
                    "type": "socket-handler",
                    "socket_handler": "smartroute.helpers:SocketHandlers.echo",
                },
            }
            for p in ports
        ]
        config.write_text(json.dumps({"settings": {"bind_address": "127.0.0.1"}, "routes": routes}))

    async def echoes(port: int) -> bool:
        try:
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
        except ConnectionRefusedError:
            return False
        writer.write(b"hi\n")
        ok = await read_line(reader) == b"hi\n"
        writer.close()
        return ok

    async def until(condition: Any) -> None:
        for _ in range(200):  # bounded: the reload runs right after the signal
            if await condition():
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the reload did not take effect")

    write([first])
    proc = await _start("run", str(config))
    try:
        await _wait_for_line(proc, f"listening on port {first}".encode())
        assert await echoes(first) and not await echoes(second)
        write([first, second])
        proc.send_signal(signal.SIGHUP)
        await until(lambda: echoes(second))
        config.write_text("{ not json")
        proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.3)
        assert await echoes(first) and await echoes(second)  # still serving the last good set
    finally:
        code, err = await _stop(proc)
    assert code == 0
    assert b"reloaded" in err and b"rejected, the running routes stay" in err


def test_check_explains_a_route_s_backends(tmp_path: Path, capsys: object) -> None:
    config = tmp_path / "backends.json"
    targets = [
        {"host": "10.0.0.5", "port": 8080, "weight": 3},
        {"host": "10.0.0.6", "port": 8080, "backup": True},
    ]
    action = {
        "type": "forward",
        "protocol": "http",
        "targets": targets,
        "load_balancing": "least-connections",
        "health_check": {"type": "http", "path": "/healthz", "interval": 2},
    }
    route = {"name": "app", "match": {"ports": 8080}, "action": action}
    config.write_text(json.dumps({"routes": [route]}))
    assert main(["check", str(config)]) == 0
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert (
        "app -> forward http 10.0.0.5:8080 weight=3, 10.0.0.6:8080 backup (least-connections)"
        " health=http /healthz every 2s"
    ) in out
