"""Route factories build valid routes of the documented shape, and they work end to end."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from http_backend import http_backend
from support import LOOPBACK, TestCA, async_test, free_ports, require_tool

from smartroute import SmartRoute, validate_routes
from smartroute.helpers import (
    SocketHandlers,
    create_complete_https_server,
    create_http_route,
    create_http_to_https_redirect,
    create_https_passthrough_route,
    create_https_terminate_route,
    create_port_range_route,
    create_socket_handler_route,
    create_static_route,
    create_tcp_forward_route,
)
from smartroute.routing.model import ForwardAction, RedirectAction, StaticAction

TARGET = {"host": "10.0.0.5", "port": 8080}


def test_every_factory_builds_a_valid_route(ca: TestCA, tmp_path: Path) -> None:
    pair = ca.issue("site.test")
    cert = {"cert": pair.cert_pem, "key": pair.key_pem}
    routes: list[dict[str, Any]] = [
        create_socket_handler_route("a.test", 7000, SocketHandlers.echo, name="sock"),
        create_tcp_forward_route(5432, TARGET, name="tcp"),
        create_https_passthrough_route(["p.test"], TARGET, name="pass"),
        create_port_range_route(
            "9000-9002", {"host": "10.0.0.7", "port": "preserve"}, name="range"
        ),
        create_http_route("h.test", TARGET, name="http", priority=5),
        create_https_terminate_route("t.test", TARGET, certificate=cert, name="term"),
        create_https_terminate_route(
            "r.test", TARGET, certificate="auto", reencrypt=True, name="re"
        ),
        create_http_to_https_redirect(None, name="redir", https_port=8443, status=308),
        create_static_route("s.test", str(tmp_path), name="static"),
        *create_complete_https_server("c.test", TARGET, certificate=cert, name="site"),
    ]
    compiled = {r.name: r for r in validate_routes(routes)}
    assert set(compiled) == {
        "sock", "tcp", "pass", "range", "http", "term", "re", "redir", "static", "site", "site-redirect",
    }  # fmt: skip
    assert compiled["range"].match.ports == frozenset({9000, 9001, 9002})
    assert compiled["http"].priority == 5
    for name in ("http", "term", "re", "site"):
        action = compiled[name].action
        assert isinstance(action, ForwardAction) and action.protocol == "http"
    assert (
        isinstance(compiled["tcp"].action, ForwardAction)
        and compiled["tcp"].action.protocol == "tcp"
    )
    tls = compiled["re"].tls
    assert tls is not None and tls.mode == "terminate-and-reencrypt" and tls.certificate == "auto"
    redirect = compiled["redir"].action
    assert isinstance(redirect, RedirectAction)
    assert (redirect.to, redirect.status) == ("https://{domain}:8443{path}{query}", 308)
    site_redirect = compiled["site-redirect"].action
    assert isinstance(site_redirect, RedirectAction)
    assert site_redirect.to == "https://{domain}{path}{query}"
    assert compiled["site-redirect"].match.ports == frozenset({80})
    assert isinstance(compiled["static"].action, StaticAction)
    assert compiled["static"].tls is None
    secured = create_static_route("s.test", str(tmp_path), ports=443, certificate=cert)
    assert validate_routes([secured])[0].terminates_tls


@async_test(60)
async def test_complete_https_server_redirects_then_serves_over_tls(
    ca: TestCA, tmp_path: Path
) -> None:
    curl = require_tool("curl")
    pair = ca.issue("site.test")
    (tmp_path / "ca.pem").write_text(ca.pem)
    http_port, https_port = free_ports(2)
    with http_backend("site") as backend:
        routes = create_complete_https_server(
            "site.test",
            {"host": LOOPBACK, "port": backend.port},
            certificate={"cert": pair.cert_pem, "key": pair.key_pem},
            http_port=http_port,
            https_port=https_port,
        )
        async with SmartRoute(routes, bind_address=LOOPBACK):
            proc = await asyncio.create_subprocess_exec(
                curl, "-sS", "-L", "-v", "--max-time", "20", "--cacert", str(tmp_path / "ca.pem"),
                "--resolve", f"site.test:{http_port}:127.0.0.1",
                "--resolve", f"site.test:{https_port}:127.0.0.1",
                f"http://site.test:{http_port}/page?x=1",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), 30)
    text = err.decode()
    assert proc.returncode == 0, text
    assert f"Location: https://site.test:{https_port}/page?x=1" in text
    info = json.loads(out)
    assert info["backend"] == "site" and info["path"] == "/page?x=1"
    assert dict((k.lower(), v) for k, v in info["headers"])["x-forwarded-proto"] == "https"
