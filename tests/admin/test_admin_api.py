"""The admin server's JSON API and limits, driven with real curl against a running proxy."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from support import LOOPBACK, TestCA, async_test, curl, free_port

from smartroute import ConfigError, PortInUseError, SmartRoute
from smartroute.admin.server import MAX_BODY

TOKEN = "t0ken-for-the-admin-api"
AUTH = ("-H", f"Authorization: Bearer {TOKEN}")


def static(port: int, text: str, name: str = "site") -> dict[str, Any]:
    return {
        "name": name,
        "match": {"ports": port},
        "action": {"type": "static", "static": {"content": text}},
    }


def proxy(routes: list[dict[str, Any]], **admin: Any) -> SmartRoute:
    return SmartRoute(
        routes,
        bind_address=LOOPBACK,
        graceful_shutdown_timeout=1,
        admin={"port": 0, "token": TOKEN, **admin},
    )


def url(p: SmartRoute, path: str) -> str:
    return f"http://{LOOPBACK}:{p.admin_port}{path}"


async def call(*args: str) -> tuple[int, dict[str, str], str]:
    """curl with the response head: (status, headers by lower-cased name, body)."""
    code, out, err = await curl("-i", *args)
    assert code == 0, err
    head, _, body = out.partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


async def site(port: int) -> str:
    code, out, err = await curl(f"http://{LOOPBACK}:{port}/")
    assert code == 0, err
    return out


@async_test()
async def test_token_missing_or_wrong_is_401() -> None:
    async with proxy([static(free_port(), "one\n")]) as p:
        for extra in ((), ("-H", "Authorization: Bearer wrong-token-0123456789")):
            status, headers, body = await call(*extra, url(p, "/api/stats"))
            assert status == 401
            assert headers["www-authenticate"].startswith("Bearer")
            assert "error" in json.loads(body)
        # an unknown path says nothing more without the token
        status, _, _ = await call(url(p, "/nope"))
        assert status == 401
        status, headers, body = await call(*AUTH, url(p, "/api/stats"))
        assert status == 200 and headers["content-type"] == "application/json"
        assert json.loads(body)["connections"]["active"] == 0


@async_test()
async def test_no_token_setting_needs_no_header() -> None:
    p = SmartRoute([static(free_port(), "one\n")], bind_address=LOOPBACK, admin={"port": 0})
    async with p:
        status, _, body = await call(url(p, "/api/routes"))
        assert status == 200
        assert json.loads(body)["routes"][0]["name"] == "site"


@async_test()
async def test_put_replaces_routes_and_traffic_follows() -> None:
    port, other = free_port(), free_port()
    async with proxy([static(port, "one\n")]) as p:
        assert await site(port) == "one\n"
        body = json.dumps({"routes": [static(port, "two\n"), static(other, "three\n", "b")]})
        status, _, answer = await call(
            *AUTH, "-X", "PUT", "--data-binary", body, url(p, "/api/routes")
        )
        assert status == 200, answer
        assert [r["name"] for r in json.loads(answer)["routes"]] == ["site", "b"]
        assert await site(port) == "two\n"
        assert await site(other) == "three\n"
        assert p.listening_ports == {port: 1, other: 1}


@async_test()
async def test_put_invalid_is_400_with_path_and_old_routes_stay() -> None:
    port = free_port()
    async with proxy([static(port, "one\n")]) as p:
        before = p.routes
        bad = {"routes": [{"match": {"ports": 70000}, "action": {"type": "block"}}]}
        status, _, body = await call(
            *AUTH, "-X", "PUT", "--data-binary", json.dumps(bad), url(p, "/api/routes")
        )
        assert status == 400
        error = json.loads(body)
        assert error["path"] == "routes[0].match.ports"
        assert "70000 is not a port" in error["error"]
        for broken, where in (
            ("{not json", ""),
            ('{"routes": [], "extra": 1}', "extra"),
            ("[]", ""),
        ):
            status, _, body = await call(
                *AUTH, "-X", "PUT", "--data-binary", broken, url(p, "/api/routes")
            )
            assert status == 400 and json.loads(body)["path"] == where, body
        assert p.routes == before
        assert await site(port) == "one\n"


@async_test()
async def test_put_of_an_unnamed_callable_is_a_clear_400() -> None:
    async with proxy([static(free_port(), "one\n")]) as p:
        route = {
            "match": {"ports": free_port()},
            "action": {"type": "socket-handler", "socket_handler": "<callable mod.<lambda>>"},
        }
        status, _, body = await call(
            *AUTH,
            "-X",
            "PUT",
            "--data-binary",
            json.dumps({"routes": [route]}),
            url(p, "/api/routes"),
        )
        assert status == 400
        error = json.loads(body)
        assert error["path"] == "routes[0].action.socket_handler"
        assert "has no import path" in error["error"]


@async_test()
async def test_put_body_too_large_is_413(tmp_path: Path) -> None:
    async with proxy([static(free_port(), "one\n")]) as p:
        big = tmp_path / "big.json"
        big.write_bytes(b" " * (MAX_BODY + 1))
        status, _, body = await call(
            *AUTH, "-X", "PUT", "--data-binary", f"@{big}", url(p, "/api/routes")
        )
        assert status == 413 and "error" in json.loads(body)
        status, _, body = await call(
            *AUTH, "-X", "PUT", "-H", "Transfer-Encoding: chunked", "--data-binary", "{}",
            url(p, "/api/routes"),
        )  # fmt: skip
        assert status == 411


@async_test()
async def test_unknown_path_404_wrong_method_405_bad_head_400() -> None:
    async with proxy([static(free_port(), "one\n")]) as p:
        status, headers, body = await call(*AUTH, url(p, "/api/nothing"))
        assert status == 404 and headers["content-type"] == "application/json"
        assert "no such path" in json.loads(body)["error"]
        status, headers, body = await call(*AUTH, "-X", "DELETE", url(p, "/api/routes"))
        assert status == 405 and headers["allow"] == "GET, PUT"
        assert "error" in json.loads(body)
        # a malformed head and an oversized one, on a raw socket
        for raw, expected in ((b"GET /\x01 HTTP/1.1\r\n\r\n", 400), (b"GET /" + b"a" * 20000, 431)):
            reader, writer = await asyncio.open_connection(LOOPBACK, p.admin_port)
            writer.write(raw)
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert answer.startswith(f"HTTP/1.1 {expected} ".encode()), answer[:100]
            assert b'{"error":' in answer


@async_test()
async def test_get_routes_round_trip(tmp_path: Path, ca: TestCA) -> None:
    cert, key = ca.issue("a.example.com").write(tmp_path, "a")
    port, tls_port = free_port(), free_port()
    routes: list[dict[str, Any]] = [
        static(port, "one\n"),
        {
            "match": {"ports": tls_port, "domains": ["a.example.com"]},
            "action": {
                "type": "forward",
                "protocol": "http",
                "targets": [{"host": ["127.0.0.1", "127.0.0.2"], "port": 8080, "weight": 3}],
                "health_check": {"type": "http", "path": "/healthz"},
                "tls": {"mode": "terminate", "certificate": {"cert": str(cert), "key": str(key)}},
            },
            "security": {"ip_allow_list": ["127.0.0.0/8"], "max_connections": 10},
            "timeouts": {"idle": 0, "connect": 2},
        },
        {
            "name": "echo",
            "match": {"ports": [free_port()]},
            "action": {
                "type": "socket-handler",
                "socket_handler": "smartroute.helpers:SocketHandlers.echo",
            },
        },
    ]
    async with proxy(routes) as p:
        before = p.routes
        status, _, body = await call(*AUTH, url(p, "/api/routes"))
        assert status == 200
        exported = json.loads(body)
        assert "PRIVATE KEY" not in body
        status, _, answer = await call(
            *AUTH, "-X", "PUT", "--data-binary", body, url(p, "/api/routes")
        )
        assert status == 200, answer
        assert json.loads(answer) == exported
        assert p.routes == before


@async_test()
async def test_inline_key_is_hidden_and_must_be_sent_again(ca: TestCA) -> None:
    pair = ca.issue("b.example.com")
    route = {
        "match": {"ports": free_port(), "domains": "b.example.com"},
        "action": {
            "type": "static",
            "static": {"content": "b\n"},
            "tls": {
                "mode": "terminate",
                "certificate": {"cert": pair.cert_pem, "key": pair.key_pem},
            },
        },
    }
    async with proxy([route]) as p:
        status, _, body = await call(*AUTH, url(p, "/api/routes"))
        assert "PRIVATE KEY" not in body
        assert json.loads(body)["routes"][0]["action"]["tls"]["certificate"]["key"] == (
            "(inline key, not shown)"
        )
        status, _, answer = await call(
            *AUTH, "-X", "PUT", "--data-binary", body, url(p, "/api/routes")
        )
        assert status == 400
        assert json.loads(answer)["path"] == "routes[0].action.tls.certificate.key"


@async_test()
async def test_a_route_on_the_admin_port_is_refused() -> None:
    async with proxy([static(free_port(), "one\n")]) as p:
        assert p.admin_port
        route = static(p.admin_port, "shadow\n")
        status, _, body = await call(
            *AUTH,
            "-X",
            "PUT",
            "--data-binary",
            json.dumps({"routes": [route]}),
            url(p, "/api/routes"),
        )
        assert status == 400
        error = json.loads(body)
        assert error["path"] == "routes[0].match.ports"
        assert "admin server" in error["error"]
        with pytest.raises(ConfigError, match="admin server"):
            await p.add_route(static(p.admin_port, "x", "other"))
        status, _, _ = await call(*AUTH, url(p, "/api/stats"))
        assert status == 200
    fixed = free_port()
    with pytest.raises(ConfigError, match=r"routes\[0\]\.match\.ports: port \d+ is the admin"):
        proxy([static(fixed, "x")], port=fixed)


@async_test()
async def test_admin_port_held_elsewhere_fails_start_cleanly() -> None:
    blocker = await asyncio.start_server(lambda r, w: None, LOOPBACK, 0)
    taken = blocker.sockets[0].getsockname()[1]
    route_port = free_port()
    try:
        p = proxy([static(route_port, "x")], port=taken)
        with pytest.raises(PortInUseError, match="admin"):
            await p.start()
        assert not p.is_running and p.listening_ports == {}
    finally:
        blocker.close()
        await blocker.wait_closed()


def test_non_loopback_without_token_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"settings\.admin\.token: required to bind 0\.0\.0\.0"):
        SmartRoute([], admin={"port": 0, "bind": "0.0.0.0"})


@async_test()
async def test_metrics_certificates_and_status(tmp_path: Path, ca: TestCA) -> None:
    cert, key = ca.issue("c.example.com").write(tmp_path, "c")
    route = {
        "match": {"ports": free_port(), "domains": "c.example.com"},
        "action": {
            "type": "static",
            "static": {"content": "c\n"},
            "tls": {"mode": "terminate", "certificate": {"cert": str(cert), "key": str(key)}},
        },
    }
    async with proxy([route]) as p:
        status, headers, body = await call(*AUTH, url(p, "/metrics"))
        assert status == 200
        assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert 'smartroute_certificate_expiry_timestamp_seconds{name="c.example.com"' in body
        status, _, body = await call(*AUTH, url(p, "/api/certificates"))
        assert status == 200
        data = json.loads(body)
        (served,) = data["certificates"]
        assert served["names"] == ["c.example.com"]
        assert served["cert_path"] == str(cert)
        assert served["days_left"] in (6, 7)  # the test CA issues for 7 days
        assert data["acme"] == {}
        # the page: with the token in the query, then without it (a browser gets the
        # small page that brings back a token kept in the tab)
        status, headers, body = await call(url(p, f"/status?token={TOKEN}"))
        assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
        assert "script-src 'sha256-" in headers["content-security-policy"]
        assert "<title>smartroute status</title>" in body
        status, headers, body = await call("-H", "Accept: text/html", url(p, "/status"))
        assert status == 401 and "text/html" in headers["content-type"]
        status, _, _ = await call(url(p, "/status?token=wrong-token-0123456789"))
        assert status == 401
    assert p.admin_port is None


@async_test(60)
async def test_with_workers_the_admin_server_runs_in_the_parent_only() -> None:
    port = free_port()
    p = SmartRoute(
        [static(port, "one\n")],
        bind_address=LOOPBACK,
        workers=2,
        graceful_shutdown_timeout=1,
        admin={"port": 0, "token": TOKEN},
    )
    async with p:
        for _ in range(4):
            assert await site(port) == "one\n"
        status, _, body = await call(*AUTH, url(p, "/api/stats"))
        assert status == 200 and json.loads(body)["workers"] == 2
        # a route change through the API reaches the worker too
        body = json.dumps({"routes": [static(port, "two\n")]})
        status, _, answer = await call(
            *AUTH, "-X", "PUT", "--data-binary", body, url(p, "/api/routes")
        )
        assert status == 200, answer
        for _ in range(6):
            assert await site(port) == "two\n"
