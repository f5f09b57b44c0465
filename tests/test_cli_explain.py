"""``smartroute explain``, the shadowing warnings of ``smartroute check``, and SIGUSR1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from support import LOOPBACK, async_test, free_port, read_line

from smartroute.cli import main

ECHO = "smartroute.helpers:SocketHandlers.echo"


def forward(host: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"type": "forward", "targets": [{"host": host, "port": port}], **extra}


ROUTES: list[dict[str, Any]] = [
    {
        "name": "app",
        "priority": 10,
        "match": {"ports": 443, "domains": ["app.example.com"]},
        "action": forward("10.0.0.5", 8443, health_check={"type": "tcp"}),
    },
    {
        "name": "sorry",
        "match": {"ports": 443, "domains": ["app.example.com"]},
        "action": {"type": "static", "static": {"content": "back soon\n", "status": 503}},
    },
    {
        "name": "wild",
        "match": {"ports": 443, "domains": ["*.example.com"]},
        "action": forward("10.0.0.6", 8443),
    },
    {
        "name": "wild-again",
        "match": {"ports": 443, "domains": ["*.example.com"]},
        "action": {"type": "block"},
    },
    {
        "name": "api",
        "match": {"ports": 80, "path": "/api/*"},
        "action": forward("10.0.0.7", 8080, protocol="http"),
    },
    {
        "name": "everything",
        "priority": 10,
        "match": {"ports": [80, 8080]},
        "action": forward("10.0.0.8", 8080, protocol="http"),
    },
]


def write(folder: Path, routes: list[dict[str, Any]], **settings: Any) -> Path:
    config = folder / "proxy.json"
    config.write_text(json.dumps({"settings": settings, "routes": routes}))
    return config


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_check_warns_about_shadowed_routes_and_strict_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path, ROUTES)
    code, out, _ = run(capsys, "check", str(config))
    assert code == 0
    assert "port 443 (reads first bytes):" in out and "  1. app priority=10" in out
    assert (
        "warning: route 'wild-again' can never win: 'wild' has the same match and comes first"
        " in definition order (port 443)"
    ) in out
    assert (
        "warning: route 'api' can never win: 'everything' matches everything it matches and"
        " has a higher priority (10 > 0) (port 80)"
    ) in out
    assert (
        "note: route 'sorry' wins only while no target of 'app' is up (a fallback): 'app' has"
        " the same match and has a higher priority (10 > 0) (port 443)"
    ) in out
    code, out, err = run(capsys, "check", "--strict", str(config))
    assert code == 2
    assert "error: route 'api' can never win" in out and "note: route 'sorry'" in out
    assert "2 shadowed route(s): errors with --strict" in err


def test_check_without_findings_and_strict_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path, ROUTES[:3])
    code, out, _ = run(capsys, "check", "--strict", str(config))
    assert code == 0 and "warning" not in out and "note: route 'sorry'" in out


def test_proxy_wide_hooks_and_plugins_may_decline_so_nothing_is_shadowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "hooked.py"
    config.write_text(
        "class Hook:\n"
        "    async def on_connect(self, ctx):\n"
        "        return {'fallback': True}\n"
        f"routes = {ROUTES[2:4]!r}\n"
        "settings = {'hooks': [Hook()]}\n"
    )
    code, out, _ = run(capsys, "check", "--strict", str(config))
    assert code == 0 and "wild-again" in out and "warning" not in out
    plugin = {"name": "p", "command": ["true"], "routes": ["wild"]}
    config = write(tmp_path, ROUTES[2:4], plugins=[plugin])
    code, out, _ = run(capsys, "check", "--strict", str(config))
    assert code == 0 and "warning" not in out


def test_explain_prints_the_winner_and_why_the_others_lost(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path, ROUTES)
    code, out, _ = run(capsys, "explain", str(config), "--port", "443", "--sni", "App.Example.com")
    assert code == 0
    assert out.splitlines() == [
        "TLS connection on port 443 from 203.0.113.1: SNI app.example.com",
        "  winner: app (priority 10, exact app.example.com, definition #0)",
        "  sorry       matched, ranks after: lower priority (0 < 10)",
        "  wild        matched, ranks after: lower priority (0 < 10)",
        "  wild-again  matched, ranks after: lower priority (0 < 10)",
        "  note: while none of app's targets is up, sorry takes it",
    ]
    argv = ["explain", str(config), "--port", "80", "--host", "x.test", "--path", "/api/v1"]
    code, out, _ = run(capsys, *argv, "--header", "X-Env=prod", "--client-ip", "10.1.2.3")
    assert code == 0
    assert out.splitlines()[:3] == [
        "HTTP request on port 80 from 10.1.2.3: Host x.test, path /api/v1, x-env: prod",
        "  winner: everything (priority 10, no domain condition, definition #5)",
        "  api  matched, ranks after: lower priority (0 < 10)",
    ]
    code, out, _ = run(capsys, "explain", str(config), "--port", "443", "--json")
    data = json.loads(out)
    assert code == 1 and data["winner"] is None and data["layer"] == "connection"
    assert {c["route"]: c["matched"] for c in data["candidates"]} == dict.fromkeys(
        ["app", "sorry", "wild", "wild-again"], False
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "443", "--client-ip", "nope"], "client IP 'nope' is not an IP address"),
        (["--port", "443", "--header", "novalue"], "--header 'novalue': expected NAME=VALUE"),
        (["--port", "443", "--sni", "a.test", "--protocol", "ssh"], "contradicts"),
        (["--port", "80", "--path", "/../x"], "above the root"),
    ],
)
def test_explain_refuses_bad_inputs_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    config = write(tmp_path, ROUTES)
    code, _, err = run(capsys, "explain", str(config), *argv)
    assert code == 2 and message in err, err


def test_explain_refuses_a_bad_config_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path, [{"match": {"ports": 70000}, "action": {"type": "block"}}])
    code, _, err = run(capsys, "explain", str(config), "--port", "80")
    assert code == 2 and "routes[0].match.ports: 70000 is not a port" in err


# --- SIGUSR1 in `smartroute run` ----------------------------------------------------------------


async def _start(config: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "smartroute",
        "run",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def _wait_for(proc: asyncio.subprocess.Process, needle: bytes) -> None:
    assert proc.stdout is not None
    seen: list[bytes] = []
    while needle not in b"".join(seen[-1:]):
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert line, f"process ended before printing {needle!r}: {seen}"
        seen.append(line)


async def _echo(port: int, text: bytes) -> None:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(text)
    assert await read_line(reader) == text
    writer.close()
    await writer.wait_closed()


async def _until(condition: Any) -> None:
    for _ in range(250):  # bounded: each line is written when its connection ends
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met")


async def _stop(proc: asyncio.subprocess.Process) -> tuple[int, bytes]:
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode is not None
    return proc.returncode, err


def _echo_route(port: int) -> dict[str, Any]:
    return {
        "name": "echo",
        "match": {"ports": port},
        "action": {"type": "socket-handler", "socket_handler": ECHO},
    }


@async_test(60)
async def test_run_survives_sigusr1(tmp_path: Path) -> None:
    port = free_port()
    config = write(tmp_path, [_echo_route(port)], bind_address=LOOPBACK)
    proc = await _start(config)
    try:
        await _wait_for(proc, f"listening on port {port}".encode())
        await _echo(port, b"before\n")
        proc.send_signal(signal.SIGUSR1)
        proc.send_signal(signal.SIGUSR1)
        await _echo(port, b"after\n")
    finally:
        code, err = await _stop(proc)
    assert code == 0, err
    assert b"SIGUSR1: reopened 0 access-log file(s)" in err


@async_test(60)
async def test_sigusr1_reopens_the_access_log_file_after_a_rotation(tmp_path: Path) -> None:
    port = free_port()
    log_file = tmp_path / "access.log"
    settings = {"bind_address": LOOPBACK, "access_log": {"path": str(log_file)}}
    config = write(tmp_path, [_echo_route(port)], **settings)
    proc = await _start(config)
    try:
        await _wait_for(proc, f"listening on port {port}".encode())
        await _echo(port, b"one\n")
        await _until(lambda: log_file.exists() and log_file.read_text().count("route=echo") == 1)
        rotated = tmp_path / "access.log.1"
        log_file.rename(rotated)
        await _echo(port, b"two\n")  # still the old file: it is open until SIGUSR1
        await _until(lambda: rotated.read_text().count("route=echo") == 2)
        proc.send_signal(signal.SIGUSR1)
        await _until(log_file.exists)
        await _echo(port, b"three\n")
        await _until(lambda: log_file.read_text().count("route=echo") == 1)
    finally:
        code, err = await _stop(proc)
    assert code == 0, err
    assert rotated.read_text().count("route=echo") == 2
    assert b"SIGUSR1: reopened 1 access-log file(s)" in err
