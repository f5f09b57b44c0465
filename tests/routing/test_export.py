"""export_route: validated routes back to their dict form, and through JSON to the same routes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from support import TestCA

from smartroute.context import RouteContext
from smartroute.errors import ConfigError
from smartroute.routing.export import (
    INLINE_KEY,
    export_route,
    import_target_callables,
    placeholder_problem,
)
from smartroute.routing.validation import validate_routes


def pick_host(ctx: RouteContext) -> str:
    return "127.0.0.1"


def pick_port(ctx: RouteContext) -> int:
    return 8080


async def handler(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: RouteContext
) -> None:
    writer.close()


class Audit:
    async def on_connect(self, ctx: RouteContext) -> None:
        return None


AUDIT = Audit()


def through_json(routes: list[Any]) -> list[Any]:
    """Validate, export, send through JSON and read back as the admin API does."""
    exported = [export_route(route) for route in validate_routes(routes)]
    return import_target_callables(json.loads(json.dumps(exported)))  # type: ignore[return-value]


def readme_routes(tmp_path: Path, ca: TestCA) -> list[dict[str, Any]]:
    """The route examples of the README (files made here where they name files)."""
    cert, key = ca.issue("api.example.com", "*.example.com").write(tmp_path, "site")
    client_ca = tmp_path / "clients-ca.pem"
    client_ca.write_text(ca.pem)
    public = tmp_path / "public"
    public.mkdir()
    target = {"host": "10.0.0.5", "port": 8080}
    return [
        {
            "name": "site-a",
            "match": {"ports": 443, "domains": ["a.example.com", "*.a.example.com"]},
            "action": {"type": "forward", "targets": [{"host": "10.0.0.5", "port": 8443}],
                       "tls": {"mode": "passthrough"}},
        },
        {
            "name": "ssh",
            "match": {"ports": 2222, "client_ip": ["10.0.0.0/8"]},
            "action": {"type": "forward", "targets": [{"host": "10.0.0.9", "port": 22}]},
        },
        {"match": {"ports": 443, "protocol": ["redis"]},
         "action": {"type": "forward", "targets": [{"host": "10.0.0.7", "port": 6379}]}},
        {"match": {"ports": [80, 443, {"from": 9000, "to": 9005}], "path": "/users/:id",
                   "headers": {"x-env": "prod*"}, "alpn": ["h2", "http/1.1"],
                   "tls_version": ["TLSv1.3"]},
         "action": {"type": "forward",
                    "targets": [{"host": ["10.0.0.5", "10.0.0.6"], "port": 8080},
                                {"host": pick_host, "port": "preserve"},
                                {"host": "10.0.0.8", "port": pick_port,
                                 "send_proxy_protocol": "v2"}]}},
        {"name": "echo", "match": {"ports": 7000},
         "action": {"type": "socket-handler",
                    "socket_handler": "smartroute.helpers:SocketHandlers.echo"}},
        {"name": "mine", "match": {"ports": 7001},
         "action": {"type": "socket-handler", "socket_handler": handler}},
        {"match": {"ports": 80}, "action": {"type": "block"}},
        {"match": {"ports": 80, "domains": "old.example.com"},
         "action": {"type": "redirect",
                    "redirect": {"to": "https://{domain}{path}{query}", "status": 308}}},
        {"match": {"ports": 8081},
         "action": {"type": "static", "static": {"root": str(public), "index": ["index.htm"]}}},
        {"match": {"ports": 8082},
         "action": {"type": "static", "static": {"content": "back soon\n", "status": 503,
                                                  "content_type": "text/plain"}}},
        {"name": "app", "match": {"ports": 80, "domains": "app.example.com"}, "priority": 10,
         "action": {
             "type": "forward", "protocol": "http",
             "targets": [{"host": "10.0.0.5", "port": 8080, "weight": 3},
                         {"host": "10.0.0.6", "port": 8080, "initial": "down"},
                         {"host": "10.0.0.9", "port": 8080, "backup": True}],
             "load_balancing": "least-connections",
             "health_check": {"type": "http", "path": "/healthz", "expect_status": [200, 299],
                              "interval": 5, "timeout": 2, "rise": 2, "fall": 3,
                              "host": "app.internal"},
             "passive_health": {"max_fails": 3, "fail_timeout": 10},
             "retry": {"attempts": 3, "backoff": 0.05, "max_backoff": 1.0, "jitter": 0.2}}},
        {"match": {"ports": 81}, "enabled": False,
         "action": {"type": "forward", "targets": [target],
                    "health_check": {"interval": 1}}},
        {"name": "api", "match": {"ports": 443, "domains": "api.example.com"},
         "action": {"type": "forward", "protocol": "http", "targets": [target],
                    "tls": {"mode": "terminate",
                            "certificate": {"cert": str(cert), "key": str(key)},
                            "client_ca": str(client_ca), "client_auth": "optional"}}},
        {"name": "to-core", "match": {"ports": 443, "domains": ["*.example.com"]},
         "action": {"type": "forward", "protocol": "http",
                    "targets": [{"host": "core.internal", "port": 8443,
                                 "send_proxy_protocol": "v2"}],
                    "tls": {"mode": "terminate-and-reencrypt",
                            "certificate": {"cert": str(cert), "key": str(key)},
                            "backend_ca": ca.pem, "backend_verify": False,
                            "backend_server_name": "core.internal",
                            "backend_client_certificate": {"cert": str(cert), "key": str(key)}}}},
        {"match": {"ports": 8443, "domains": "auto.example.com"},
         "action": {"type": "forward", "targets": [target],
                    "tls": {"mode": "terminate", "certificate": "auto"}}},
        {"match": {"ports": 8080},
         "action": {"type": "forward", "protocol": "http", "targets": [target]},
         "security": {"ip_allow_list": ["10.0.0.0/8", "192.168.1.*"],
                      "ip_block_list": ["10.0.0.66"], "max_connections": 1000,
                      "max_connections_per_ip": 100,
                      "rate_limit": {"connections_per_minute": 300},
                      "basic_auth": {"users": {"bob": "sha256:" + "ab" * 32,
                                               "carol": "pbkdf2_sha256$1000$salt$" + "cd" * 32},
                                     "realm": "staff"}},
         "timeouts": {"idle": 0, "connect": 2, "http_header": 5},
         "hooks": [AUDIT, "test_export:AUDIT"], "hooks_fail": "open",
         "bandwidth": {"per_connection": {"download": 1_000_000, "upload": 250_000},
                       "per_ip": {"download": 2_000_000},
                       "per_route": {"download": 50_000_000}}},
    ]  # fmt: skip


def test_readme_routes_round_trip(tmp_path: Path, ca: TestCA) -> None:
    routes = readme_routes(tmp_path, ca)
    compiled = validate_routes(routes)
    again = validate_routes(through_json(routes))
    for before, after in zip(compiled, again, strict=True):
        assert after == before, before.name
    # and the export of the export is the export
    assert [export_route(r) for r in again] == [export_route(r) for r in compiled]


def test_readable_forms(tmp_path: Path, ca: TestCA) -> None:
    exported = [export_route(r) for r in validate_routes(readme_routes(tmp_path, ca))]
    assert exported[0] == {
        "name": "site-a",
        "match": {"ports": 443, "domains": ["a.example.com", "*.a.example.com"]},
        "action": {
            "type": "forward",
            "targets": [{"host": "10.0.0.5", "port": 8443}],
            "tls": {"mode": "passthrough"},
        },
    }
    assert "name" not in exported[2]  # generated names are not written
    assert exported[3]["match"]["ports"] == [80, 443, {"from": 9000, "to": 9005}]
    targets = exported[3]["action"]["targets"]
    assert targets[1] == {"host": "test_export:pick_host", "port": "preserve"}
    assert targets[2]["port"] == "test_export:pick_port"
    assert exported[4]["action"]["socket_handler"] == (
        "smartroute.helpers.handlers:SocketHandlers.echo"
    )
    assert exported[5]["action"]["socket_handler"] == "test_export:handler"
    assert exported[15]["hooks"] == ["test_export:AUDIT", "test_export:AUDIT"]
    assert exported[15]["timeouts"] == {"idle": 0, "connect": 2.0, "http_header": 5.0}
    api = exported[12]["action"]["tls"]
    assert api["certificate"] == {
        "cert": str(tmp_path / "site.crt"),
        "key": str(tmp_path / "site.key"),
    }
    assert api["client_ca"].startswith("-----BEGIN CERTIFICATE-----")  # public: as text


def test_inline_key_is_never_exported(ca: TestCA) -> None:
    pair = ca.issue("x.example.com")
    (route,) = validate_routes(
        [
            {
                "match": {"ports": 443},
                "action": {
                    "type": "static",
                    "static": {"content": "x"},
                    "tls": {
                        "mode": "terminate",
                        "certificate": {"cert": pair.cert_pem, "key": pair.key_pem},
                    },
                },
            }
        ]
    )
    exported = export_route(route)
    assert "PRIVATE KEY" not in json.dumps(exported)
    certificate = exported["action"]["tls"]["certificate"]
    assert certificate == {"cert": pair.cert_pem, "key": INLINE_KEY}
    problem = placeholder_problem([exported])
    assert problem is not None
    assert problem.path == "routes[0].action.tls.certificate.key"
    assert "send it again with its key" in problem.problem


def test_plain_passwords_are_exported_hashed() -> None:
    (route,) = validate_routes(
        [
            {
                "match": {"ports": 80},
                "action": {"type": "static", "static": {"content": "x"}},
                "security": {"basic_auth": {"users": {"alice": "secret"}}},
            }
        ]
    )
    users = export_route(route)["security"]["basic_auth"]["users"]
    assert users == {
        "alice": "sha256:2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
    }


def test_unnamed_callables_get_a_placeholder_a_put_refuses() -> None:
    async def local(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: RouteContext
    ) -> None:
        writer.close()

    routes = validate_routes(
        [
            {"match": {"ports": 1}, "action": {"type": "socket-handler", "socket_handler": local}},
            {
                "match": {"ports": 2},
                "action": {"type": "forward", "targets": [{"host": lambda ctx: "h", "port": 1}]},
            },
        ]
    )
    exported = [export_route(route) for route in routes]
    handler_name = exported[0]["action"]["socket_handler"]
    assert handler_name.startswith("<callable test_export.")
    assert handler_name.endswith("local>")
    assert exported[1]["action"]["targets"][0]["host"] == (
        "<callable test_export.test_unnamed_callables_get_a_placeholder_a_put_refuses."
        "<locals>.<lambda>>"
    )
    problem = placeholder_problem(exported)
    assert problem is not None and problem.path == "routes[0].action.socket_handler"
    assert "has no import path" in problem.problem
    problem = placeholder_problem(exported[1:])
    assert problem is not None and problem.path == "routes[0].action.targets[0].host"


def test_import_paths_of_targets() -> None:
    assert import_target_callables(
        [
            {
                "match": {"ports": 1},
                "action": {
                    "type": "forward",
                    "targets": [
                        {"host": "test_export:pick_host", "port": "test_export:pick_port"},
                        {"host": "::1", "port": 80},
                        {"host": "example.com", "port": 80},
                    ],
                },
            }
        ]  # fmt: skip
    ) == [
        {
            "match": {"ports": 1},
            "action": {
                "type": "forward",
                "targets": [
                    {"host": pick_host, "port": pick_port},
                    {"host": "::1", "port": 80},
                    {"host": "example.com", "port": 80},
                ],
            },
        }
    ]
    with pytest.raises(ConfigError) as caught:
        import_target_callables(
            [{"action": {"targets": [{"host": "no_such_module:f", "port": 1}]}}]
        )
    assert caught.value.path == "routes[0].action.targets[0].host"
    assert import_target_callables("not a list") == "not a list"
