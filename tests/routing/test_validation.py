"""Route validation: dict and dataclass forms agree, and every bad input names its field."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import functools
import json
import tomllib
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from smartroute.context import RouteContext
from smartroute.errors import ConfigError
from smartroute.routing import schema
from smartroute.routing.model import (
    STRATEGIES,
    BlockAction,
    CertificatePair,
    ForwardAction,
    HealthCheck,
    PassiveHealth,
    RedirectAction,
    RetryPolicy,
    SocketHandlerAction,
    StaticAction,
    TargetSpec,
)
from smartroute.routing.patterns import parse_ip
from smartroute.routing.schema import (
    BasicAuth,
    Block,
    Certificate,
    Forward,
    Match,
    RateLimit,
    Redirect,
    Route,
    RouteDict,
    Security,
    SocketHandler,
    Static,
    Target,
    Tls,
)
from smartroute.routing.validation import validate_route, validate_routes
from smartroute.routing.validation.backends import forward_targets
from smartroute.routing.validation.security import compile_security

# -- helpers -----------------------------------------------------------------------------------


@functools.cache
def make_pair(common_name: str = "localhost") -> tuple[str, str]:
    """A self-signed EC P-256 certificate and its key, as PEM text."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()


async def echo_handler(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: RouteContext
) -> None:
    writer.write(await reader.read(100))


def sync_handler(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: RouteContext
) -> None:
    writer.close()


def pick_host(ctx: RouteContext) -> str:
    return "10.0.0.1"


def pick_port(ctx: RouteContext) -> int:
    return ctx.port + 1000


def error_of(routes: object) -> str:
    """The message validate_routes raises for ``routes``."""
    with pytest.raises(ConfigError) as caught:
        validate_routes(cast(Any, routes))
    return str(caught.value)


# The builders return Any: they also build the invalid routes of the error table.
def block(**fields: object) -> Any:
    """A valid block route on port 80, with ``fields`` replacing or adding route keys."""
    return {"match": {"ports": 80}, "action": {"type": "block"}, **fields}


def on(action: object, **fields: object) -> Any:
    return block(action=action, **fields)


def matching(**match: object) -> Any:
    return block(match={"ports": 80, **match})


def forward(**extra: object) -> Any:
    return {"type": "forward", "targets": [{"host": "127.0.0.1", "port": 9000}], **extra}


def with_security(security: object, action: object = None) -> Any:
    return block(action=action or {"type": "block"}, security=security)


def terminate(**extra: object) -> Any:
    cert, key = make_pair()
    return {"mode": "terminate", "certificate": {"cert": cert, "key": key}, **extra}


# -- dict and dataclass forms agree ------------------------------------------------------------


def rich_dicts(root: Path) -> list[RouteDict]:
    cert, key = make_pair()
    ca, _ = make_pair("backend-ca")
    return [
        {
            "name": "api",
            "priority": 10,
            "enabled": False,
            "match": {
                "ports": [443, "9000-9002", {"from": 10000, "to": 10001}],
                "domains": ["Example.COM.", "*.example.com"],
                "path": "/api/:version/*",
                "client_ip": ["10.0.0.0/8", "192.168.1.*", "::1"],
                "tls_version": ["TLSv1.3", "TLSv1.0"],
                "alpn": ["h2", "http/1.1"],
                "headers": {"X-Env": "prod*"},
            },
            "action": {
                "type": "forward",
                "targets": [
                    {"host": ["10.0.0.5", "10.0.0.6"], "port": 8080, "weight": 3},
                    {"host": pick_host, "port": pick_port},
                    {"host": "backend", "port": "preserve", "backup": True},
                ],
                "protocol": "http",
                "load_balancing": "least-connections",
                "retry": {"attempts": 2, "any_method": True},
                "tls": {
                    "mode": "terminate-and-reencrypt",
                    "certificate": {"cert": cert, "key": key},
                    "backend_verify": False,
                    "backend_ca": ca,
                    "backend_server_name": "backend.internal",
                },
            },
            "security": {
                "ip_allow_list": ["10.0.0.0/8"],
                "ip_block_list": "10.0.0.66",
                "max_connections": 1000,
                "max_connections_per_ip": 100,
                "rate_limit": {"connections_per_minute": 300},
                "basic_auth": {"users": {"alice": "secret"}, "realm": "api"},
            },
        },
        {
            "match": {"ports": 80, "domains": "example.com"},
            "action": {
                "type": "redirect",
                "redirect": {"to": "https://{domain}:{port}{path}?{query}", "status": 308},
            },
        },
        {
            "name": "files",
            "match": {"ports": 8080},
            "action": {
                "type": "static",
                "static": {"root": str(root), "index": "home.html"},
                "tls": {"mode": "terminate", "certificate": "auto"},
            },
        },
        {
            "name": "ok",
            "match": {"ports": 8081, "path": "/health"},
            "action": {
                "type": "static",
                "static": {"content": "ok\n", "content_type": "text/plain", "status": 201},
            },
        },
        {
            "name": "echo",
            "match": {"ports": "7000-7001"},
            "action": {"type": "socket-handler", "socket_handler": echo_handler},
        },
        {"name": "deny", "match": {"ports": 81}, "action": {"type": "block"}},
    ]


def rich_dataclasses(root: Path) -> list[Route]:
    cert, key = make_pair()
    ca, _ = make_pair("backend-ca")
    return [
        Route(
            name="api",
            priority=10,
            enabled=False,
            match=Match(
                ports=[443, "9000-9002", {"from": 10000, "to": 10001}],
                domains=["Example.COM.", "*.example.com"],
                path="/api/:version/*",
                client_ip=["10.0.0.0/8", "192.168.1.*", "::1"],
                tls_version=["TLSv1.3", "TLSv1.0"],
                alpn=["h2", "http/1.1"],
                headers={"X-Env": "prod*"},
            ),
            action=Forward(
                targets=[
                    Target(host=["10.0.0.5", "10.0.0.6"], port=8080, weight=3),
                    {"host": pick_host, "port": pick_port},  # dict form inside a dataclass
                    Target("backend", "preserve", backup=True),
                ],
                protocol="http",
                load_balancing="least-connections",
                retry={"attempts": 2, "any_method": True},
                tls=Tls(
                    mode="terminate-and-reencrypt",
                    certificate=Certificate(cert=cert, key=key),
                    backend_verify=False,
                    backend_ca=ca,
                    backend_server_name="backend.internal",
                ),
            ),
            security=Security(
                ip_allow_list=["10.0.0.0/8"],
                ip_block_list="10.0.0.66",
                max_connections=1000,
                max_connections_per_ip=100,
                rate_limit=RateLimit(300),
                basic_auth=BasicAuth({"alice": "secret"}, realm="api"),
            ),
        ),
        Route(
            match={"ports": 80, "domains": "example.com"},
            action=Redirect("https://{domain}:{port}{path}?{query}", status=308),
        ),
        Route(
            Match(8080),
            Static(
                root=str(root), index="home.html", tls={"mode": "terminate", "certificate": "auto"}
            ),
            name="files",
        ),
        Route(
            Match(8081, path="/health"),
            Static(content="ok\n", content_type="text/plain", status=201),
            name="ok",
        ),
        Route(Match("7000-7001"), SocketHandler(echo_handler), name="echo"),
        Route(Match(81), Block(), name="deny"),
    ]


def test_dict_and_dataclass_forms_validate_to_equal_routes(tmp_path: Path) -> None:
    from_dicts = validate_routes(rich_dicts(tmp_path))
    from_dataclasses = validate_routes(rich_dataclasses(tmp_path))
    assert from_dicts == from_dataclasses
    mixed = validate_routes([*rich_dicts(tmp_path)[:3], *rich_dataclasses(tmp_path)[3:]])
    assert mixed == from_dicts


def test_rich_route_contents(tmp_path: Path) -> None:
    api, redirect, files, ok, echo, deny = validate_routes(rich_dicts(tmp_path))
    cert, key = make_pair()
    ca, _ = make_pair("backend-ca")

    assert (api.name, api.priority, api.enabled, api.named, api.index) == (
        "api",
        10,
        False,
        True,
        0,
    )
    assert api.match.ports == {443, 9000, 9001, 9002, 10000, 10001}
    assert [d.text for d in api.match.domains] == ["example.com", "*.example.com"]
    assert api.match.path is not None and api.match.path.kind == "params"
    assert [rule.text for rule in api.match.client_ip] == ["10.0.0.0/8", "192.168.1.*", "::1"]
    assert api.match.tls_version == {"TLSv1.3", "TLSv1"}
    assert api.match.alpn == {"h2", "http/1.1"}
    assert [(h.name, h.value) for h in api.match.headers] == [("x-env", "prod*")]
    assert isinstance(api.action, ForwardAction)
    assert api.action.protocol == "http"
    hosts = [target.host for target in api.action.targets]
    assert hosts == [("10.0.0.5", "10.0.0.6"), pick_host, ("backend",)]
    assert [target.port for target in api.action.targets] == [8080, pick_port, "preserve"]
    assert [target.weight for target in api.action.targets] == [3, 1, 1]
    assert [target.backup for target in api.action.targets] == [False, False, True]
    assert api.action.load_balancing == "least-connections"
    assert api.action.retry == RetryPolicy(attempts=2, any_method=True)
    assert api.action.health_check is None and api.action.passive_health is None
    assert api.tls is not None and api.terminates_tls
    assert api.tls.mode == "terminate-and-reencrypt"
    assert api.tls.certificate == CertificatePair(cert, key)
    assert (api.tls.backend_verify, api.tls.backend_ca) == (False, ca)
    assert api.tls.backend_server_name == "backend.internal"
    assert api.security is not None
    assert [rule.text for rule in api.security.ip_block_list] == ["10.0.0.66"]
    assert (api.security.max_connections, api.security.max_connections_per_ip) == (1000, 100)
    assert api.security.rate_limit is not None
    assert api.security.rate_limit.connections_per_minute == 300
    assert api.security.basic_auth is not None
    assert dict(api.security.basic_auth.users) == {"alice": "secret"}
    assert api.security.basic_auth.realm == "api"

    assert (redirect.name, redirect.named) == ("route-1", False)
    assert redirect.action == RedirectAction("https://{domain}:{port}{path}?{query}", 308)
    assert redirect.tls is None and redirect.security is None

    assert files.action == StaticAction(root=str(tmp_path.resolve()), index=("home.html",))
    assert files.tls is not None and files.tls.certificate == "auto"
    assert ok.action == StaticAction(content=b"ok\n", content_type="text/plain", status=201)
    assert echo.action == SocketHandlerAction(echo_handler)
    assert echo.match.ports == {7000, 7001}
    assert deny.action == BlockAction()


def test_defaults() -> None:
    (route,) = validate_routes([{"match": {"ports": 80}, "action": forward()}])
    assert (route.name, route.priority, route.enabled, route.named) == ("route-0", 0, True, False)
    assert route.tls is None and route.security is None
    assert route.match.ports == {80}
    assert not route.match.needs_data
    assert isinstance(route.action, ForwardAction) and route.action.protocol == "auto"
    (static,) = validate_routes([on({"type": "static", "static": {"content": b"\x00"}})])
    assert static.action == StaticAction(content=b"\x00")
    (redirect,) = validate_routes([on({"type": "redirect", "redirect": {"to": "/x"}})])
    assert redirect.action == RedirectAction("/x", 301)


def test_accepted_shorthands() -> None:
    (route,) = validate_routes(
        [
            {
                "match": {"ports": {"from": 1, "to": 3}, "tls_version": "TLSv1.2", "alpn": "h2"},
                "action": {"type": "forward", "targets": {"host": "a", "port": 1}},
                "security": {"max_connections": 5},
            }
        ]
    )
    assert route.match.ports == {1, 2, 3}
    assert route.match.tls_version == {"TLSv1.2"}
    assert isinstance(route.action, ForwardAction)
    assert route.action.targets[0].host == ("a",)
    (empty,) = validate_routes([block(security={}, name="x")])
    assert empty.security is None  # nothing set means no policy
    (nones,) = validate_routes([matching(domains=None, path=None)])
    assert nones.match.domains == () and nones.match.path is None


def test_socket_handler_by_import_path() -> None:
    (route,) = validate_routes(
        [on({"type": "socket-handler", "socket_handler": f"{__name__}:echo_handler"})]
    )
    assert route.action == SocketHandlerAction(echo_handler)
    partial = functools.partial(echo_handler)
    (route,) = validate_routes([on({"type": "socket-handler", "socket_handler": partial})])
    assert isinstance(route.action, SocketHandlerAction)


def test_schema_dataclasses_mirror_typed_dicts() -> None:
    pairs: list[tuple[Any, Any]] = [
        (schema.RouteDict, Route),
        (schema.MatchDict, Match),
        (schema.TargetDict, Target),
        (schema.TlsDict, Tls),
        (schema.CertificateDict, Certificate),
        (schema.SecurityDict, Security),
        (schema.RateLimitDict, RateLimit),
        (schema.BasicAuthDict, BasicAuth),
    ]
    for typed_dict, dataclass in pairs:
        fields = [f for f in dataclasses.fields(dataclass)]
        assert {f.name for f in fields} == set(typed_dict.__annotations__), dataclass
        required = {f.name for f in fields if f.default is dataclasses.MISSING}
        assert required == typed_dict.__required_keys__, dataclass


# -- names ---------------------------------------------------------------------------------------


def test_generated_names_skip_given_ones() -> None:
    routes = validate_routes([block(), block(name="route-0"), block(), block(name="route-2-2")])
    assert [r.name for r in routes] == ["route-0-2", "route-0", "route-2", "route-2-2"]
    assert [r.named for r in routes] == [False, True, False, True]


def test_validate_route_against_taken_names() -> None:
    route = validate_route(Route(Match(80), Block()), 3, taken_names=["route-3"])
    assert (route.name, route.index, route.named) == ("route-3-2", 3, False)
    with pytest.raises(ConfigError) as caught:
        validate_route(block(name="api"), 4, taken_names={"api"})
    assert str(caught.value) == 'route.name: duplicate route name "api" (already taken)'
    with pytest.raises(ConfigError) as caught:
        validate_route(cast(Any, block(nme="x")), 0, path="add_route")
    assert str(caught.value) == 'add_route: unknown key "nme" (did you mean "name"?)'


def test_ten_thousand_routes() -> None:
    routes: list[RouteDict] = [
        {
            "name": f"r{i}",
            "match": {"ports": 8000 + i % 50, "domains": f"h{i}.example.com"},
            "action": {"type": "forward", "targets": [{"host": "127.0.0.1", "port": 9000}]},
        }
        for i in range(10_000)
    ]
    compiled = validate_routes(routes)
    assert len(compiled) == 10_000
    assert [route.name for route in compiled] == [f"r{i}" for i in range(10_000)]
    assert compiled[-1].index == 9_999
    assert compiled[-1].match.domains[0].text == "h9999.example.com"


# -- certificates --------------------------------------------------------------------------------


def test_certificate_from_pem_text_and_from_files(tmp_path: Path) -> None:
    cert, key = make_pair()
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_text(cert)
    key_file.write_text(key)
    text_route, path_route, pathlike_route = validate_routes(
        [
            on({"type": "block", "tls": terminate()}),
            on(
                {
                    "type": "block",
                    "tls": {
                        "mode": "terminate",
                        "certificate": {"cert": str(cert_file), "key": str(key_file)},
                    },
                }
            ),
            on(Block(tls=Tls("terminate", Certificate(cert_file, key_file)))),
        ]
    )
    assert text_route.tls is not None
    assert text_route.tls.certificate == CertificatePair(cert, key)
    from_file = CertificatePair(cert, key, str(cert_file), str(key_file))
    assert path_route.tls is not None and path_route.tls.certificate == from_file
    assert pathlike_route.tls is not None and pathlike_route.tls.certificate == from_file


def test_certificate_errors(tmp_path: Path) -> None:
    cert, key = make_pair()
    _, other_key = make_pair("other")
    garbage = "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"
    encrypted = (
        serialization.load_pem_private_key(key.encode(), None)
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
        .decode()
    )
    key_file = tmp_path / "key.pem"
    key_file.write_text(other_key)
    where = "routes[0].action.tls.certificate"

    def error_for(certificate: object) -> str:
        tls = {"mode": "terminate", "certificate": certificate}
        return error_of([on({"type": "block", "tls": tls})])

    assert error_for({"cert": cert, "key": other_key}) == (
        f"{where}: the key does not match the certificate"
    )
    assert error_for({"cert": cert, "key": str(key_file)}) == (
        f"{where}: the key does not match the certificate"
    )
    missing = tmp_path / "missing.pem"
    assert error_for({"cert": str(missing), "key": key}) == (
        f"{where}.cert: file {str(missing)!r} does not exist"
    )
    assert error_for({"cert": key, "key": key}) == (
        f'{where}.cert: no PEM certificate found (expected a "-----BEGIN CERTIFICATE-----" block)'
    )
    assert (
        error_for({"cert": garbage, "key": key})
        == f"{where}.cert: the PEM certificate is malformed"
    )
    assert error_for({"cert": cert, "key": cert}) == (
        f'{where}.key: no PEM private key found (expected a "-----BEGIN PRIVATE KEY-----" block)'
    )
    assert error_for({"cert": cert, "key": encrypted}) == (
        f"{where}.key: the private key is encrypted (give an unencrypted key)"
    )
    key_file.write_text("nothing here")
    assert error_for({"cert": cert, "key": str(key_file)}) == (
        f"{where}.key: no PEM private key found in {str(key_file)!r} "
        '(expected a "-----BEGIN PRIVATE KEY-----" block)'
    )
    assert error_for({"cert": cert}) == f'{where}: missing required key "key"'
    assert error_for({"cert": 5, "key": key}) == (
        f"{where}.cert: expected PEM text or a file path, got 5"
    )
    assert error_for({"cert": str(tmp_path), "key": key}).startswith(
        f"{where}.cert: cannot read {str(tmp_path)!r} ("
    )


def test_backend_ca_from_file(tmp_path: Path) -> None:
    ca, _ = make_pair("ca")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(ca)
    tls = terminate(mode="terminate-and-reencrypt", backend_ca=str(ca_file))
    (route,) = validate_routes([on(forward(tls=tls))])
    assert route.tls is not None and route.tls.backend_ca == ca
    tls = terminate(mode="terminate-and-reencrypt", backend_ca="-----BEGIN NOTHING-----")
    assert error_of([on(forward(tls=tls))]) == (
        "routes[0].action.tls.backend_ca: no PEM certificate found "
        '(expected a "-----BEGIN CERTIFICATE-----" block)'
    )


# -- bad inputs ----------------------------------------------------------------------------------

R0 = "routes[0]"
BAD: list[tuple[str, object, str]] = [
    # the route list and route level
    (
        "single-route",
        block(),
        "routes: expected a list of routes, got dict (wrap a single route in a list)",
    ),
    ("route-not-mapping", ["x"], f"{R0}: expected a mapping or a Route, got 'x'"),
    (
        "port-in-third-route",
        [block(), block(), matching(ports=[80, 70000])],
        "routes[2].match.ports[1]: 70000 is not a port (1-65535)",
    ),
    ("missing-match", [{"action": {"type": "block"}}], f'{R0}: missing required key "match"'),
    ("missing-action", [{"match": {"ports": 1}}], f'{R0}: missing required key "action"'),
    (
        "key-of-match",
        [block(domains="x")],
        f'{R0}: unknown key "domains" (did you mean "match.domains"?)',
    ),
    ("key-typo", [block(priorty=1)], f'{R0}: unknown key "priorty" (did you mean "priority"?)'),
    ("key-of-tls", [block(tls={})], f'{R0}: unknown key "tls" (did you mean "action.tls"?)'),
    (
        "key-unknown",
        [block(zzz=1)],
        f'{R0}: unknown key "zzz" '
        '(allowed: "action", "bandwidth", "enabled", "hooks", "hooks_fail", "match", "name", "priority", "security", "timeouts")',
    ),
    (
        "key-of-action-in-match",
        [matching(targets=[])],
        f'{R0}.match: unknown key "targets" (did you mean "routes[0].action.targets"?)',
    ),
    (
        "key-of-two-blocks",
        [matching(status=301)],
        f'{R0}.match: unknown key "status" (did you mean "routes[0].action.redirect.status" '
        'or "routes[0].action.static.status"?)',
    ),
    ("name-empty", [block(name="")], f"{R0}.name: expected a non-empty str, got ''"),
    ("name-type", [block(name=5)], f"{R0}.name: expected a non-empty str, got 5"),
    (
        "name-duplicate",
        [block(name="a"), block(name="api"), block(), block(name="api")],
        'routes[3].name: duplicate route name "api" (also routes[1])',
    ),
    ("priority-str", [block(priority="80")], f"{R0}.priority: expected an int, got '80'"),
    ("priority-bool", [block(priority=True)], f"{R0}.priority: expected an int, got True"),
    ("enabled-int", [block(enabled=1)], f"{R0}.enabled: expected a bool, got 1"),
    # match
    ("match-list", [block(match=[80])], f"{R0}.match: expected a mapping or a Match, got list"),
    (
        "ports-missing",
        [block(match={"domains": "a.b"})],
        f'{R0}.match: missing required key "ports"',
    ),
    ("ports-zero", [matching(ports=0)], f"{R0}.match.ports: 0 is not a port (1-65535)"),
    ("ports-empty", [matching(ports=[])], f"{R0}.match.ports: empty list (give at least one port)"),
    (
        "ports-digit-str",
        [matching(ports="80")],
        f"{R0}.match.ports: '80' is not a port range (write a single port as an int: 80)",
    ),
    (
        "ports-bad-str",
        [matching(ports=["a-b"])],
        f"{R0}.match.ports[0]: 'a-b' is not a port range "
        '(expected "from-to" such as "9000-9005")',
    ),
    (
        "ports-backwards",
        [matching(ports="9005-9000")],
        f"{R0}.match.ports: 9005-9000 is a backwards range (from must be <= to)",
    ),
    (
        "ports-range-big",
        [matching(ports="1-65536")],
        f"{R0}.match.ports: 65536 is not a port (1-65535)",
    ),
    (
        "ports-dict-missing",
        [matching(ports=[{"from": 10}])],
        f'{R0}.match.ports[0]: missing required key "to"',
    ),
    (
        "ports-dict-key",
        [matching(ports=[{"from": 1, "to": 2, "step": 1}])],
        f'{R0}.match.ports[0]: unknown key "step" (allowed: "from", "to")',
    ),
    (
        "ports-dict-type",
        [matching(ports=[{"from": "1", "to": 2}])],
        f"{R0}.match.ports[0].from: expected an int, got '1'",
    ),
    (
        "ports-float",
        [matching(ports=8.5)],
        f'{R0}.match.ports: expected a port, a "from-to" range string, '
        '{"from": a, "to": b} or a list of them, got 8.5',
    ),
    (
        "ports-bool-item",
        [matching(ports=[True])],
        f'{R0}.match.ports[0]: expected a port, a "from-to" range string, '
        '{"from": a, "to": b}, got True',
    ),
    (
        "domains-empty",
        [matching(domains=[])],
        f"{R0}.match.domains: empty list (use None or omit it)",
    ),
    (
        "domains-bad",
        [matching(domains=["ok.com", "a..b"])],
        f"{R0}.match.domains[1]: 'a..b' is not a domain (bad label '')",
    ),
    ("domains-type", [matching(domains=[5])], f"{R0}.match.domains[0]: expected a str, got 5"),
    (
        "domains-dict",
        [matching(domains={"a": 1})],
        f"{R0}.match.domains: expected a str or a list of str, got dict",
    ),
    (
        "domains-typo",
        [matching(domain="a.com")],
        f'{R0}.match: unknown key "domain" (did you mean "domains"?)',
    ),
    (
        "path-relative",
        [matching(path="api")],
        f"{R0}.match.path: 'api' is not a path pattern (it must start with '/')",
    ),
    (
        "path-not-normal",
        [matching(path="/api//v1/./*")],
        f"{R0}.match.path: '/api//v1/./*' is not a normal path (requests are matched as"
        " '/api/v1/*'); write '/api/v1/*'",
    ),
    (
        "path-never-matches",
        [matching(path="/files/a%2Fb")],
        f"{R0}.match.path: '/files/a%2Fb' can never match: the request path holds an encoded"
        " slash (%2F)",
    ),
    (
        "client-ip-bad",
        [matching(client_ip="10.0.0.300")],
        f"{R0}.match.client_ip: '10.0.0.300' is not an IP rule (expected an address, a CIDR "
        "network such as '10.0.0.0/8', or octets with '*' such as '192.168.1.*')",
    ),
    (
        "tls-version",
        [matching(tls_version=["TLSv1.4"])],
        f'{R0}.match.tls_version[0]: unknown TLS version "TLSv1.4" (did you mean "TLSv1.3"?)',
    ),
    (
        "tls-version-far",
        [matching(tls_version="SSLv3")],
        f'{R0}.match.tls_version: unknown TLS version "SSLv3" '
        '(expected "TLSv1", "TLSv1.1", "TLSv1.2" or "TLSv1.3")',
    ),
    (
        "alpn-empty-str",
        [matching(alpn=[""])],
        f"{R0}.match.alpn[0]: expected a non-empty str, got ''",
    ),
    (
        "headers-empty",
        [matching(headers={})],
        f"{R0}.match.headers: empty mapping (use None or omit it)",
    ),
    (
        "headers-name",
        [matching(headers={"bad name": "x"})],
        f"{R0}.match.headers['bad name']: 'bad name' is not an HTTP header name",
    ),
    (
        "headers-value",
        [matching(headers={"x-env": 1})],
        f"{R0}.match.headers['x-env']: expected a str, got 1",
    ),
    # action
    (
        "action-str",
        [on("block")],
        f"{R0}.action: expected a mapping or one of Forward, Redirect, Block, Static, "
        "SocketHandler, got 'block'",
    ),
    (
        "action-no-type",
        [on({"targets": []})],
        f'{R0}.action: missing required key "type" '
        '("forward", "redirect", "block", "static" or "socket-handler")',
    ),
    (
        "action-type-typo",
        [on({"type": "foward"})],
        f'{R0}.action.type: unknown action type "foward" (did you mean "forward"?)',
    ),
    (
        "action-type-underscore",
        [on({"type": "socket_handler"})],
        f'{R0}.action.type: unknown action type "socket_handler" (did you mean "socket-handler"?)',
    ),
    (
        "action-type-unknown",
        [on({"type": "proxy"})],
        f'{R0}.action.type: unknown action type "proxy" '
        '(expected "forward", "redirect", "block", "static" or "socket-handler")',
    ),
    (
        "action-key-of-other-type",
        [on({"type": "redirect", "targets": []})],
        f'{R0}.action: unknown key "targets" for a "redirect" action '
        '(allowed: "redirect", "tls", "type")',
    ),
    (
        "action-key-of-tls",
        [on({"type": "block", "certificate": "auto"})],
        f'{R0}.action: unknown key "certificate" (did you mean "tls.certificate"?)',
    ),
    (
        "block-extra",
        [on({"type": "block", "status": 403})],
        f'{R0}.action: unknown key "status" (allowed: "tls", "type")',
    ),
    # forward
    (
        "targets-missing",
        [on({"type": "forward"})],
        f'{R0}.action: missing required key "targets"',
    ),
    (
        "targets-empty",
        [on(forward(targets=[]))],
        f"{R0}.action.targets: empty list (give at least one target)",
    ),
    (
        "targets-str",
        [on(forward(targets="10.0.0.1:80"))],
        f"{R0}.action.targets: expected a list of targets, got '10.0.0.1:80'",
    ),
    (
        "target-not-mapping",
        [on(forward(targets=["10.0.0.1:80"]))],
        f"{R0}.action.targets[0]: expected a mapping or a Target, got '10.0.0.1:80'",
    ),
    (
        "target-host-type",
        [on(forward(targets=[{"host": 5, "port": 80}]))],
        f"{R0}.action.targets[0].host: expected a host name, a list of host names or a callable, "
        "got 5",
    ),
    (
        "target-host-empty-list",
        [on(forward(targets=[{"host": [], "port": 80}]))],
        f"{R0}.action.targets[0].host: empty list (give at least one host)",
    ),
    (
        "target-host-space",
        [on(forward(targets=[{"host": ["a", "b c"], "port": 80}]))],
        f"{R0}.action.targets[0].host[1]: 'b c' is not a host name (it contains spaces)",
    ),
    (
        "target-port-str",
        [on(forward(targets=[{"host": "a", "port": "80"}]))],
        f'{R0}.action.targets[0].port: expected a port (1-65535), "preserve" or a callable, '
        "got '80'",
    ),
    (
        "target-port-range",
        [on(forward(targets=[{"host": "a", "port": 70000}]))],
        f"{R0}.action.targets[0].port: 70000 is not a port (1-65535)",
    ),
    (
        "target-missing-port",
        [on(forward(targets=[{"host": "a"}]))],
        f'{R0}.action.targets[0]: missing required key "port"',
    ),
    (
        "target-key-typo",
        [on(forward(targets=[{"hots": "a", "port": 1}]))],
        f'{R0}.action.targets[0]: unknown key "hots" (did you mean "host"?)',
    ),
    (
        "protocol",
        [on(forward(protocol="https"))],
        f'{R0}.action.protocol: unknown protocol "https" (did you mean "http"?)',
    ),
    # redirect
    (
        "redirect-missing",
        [on({"type": "redirect"})],
        f'{R0}.action: missing required key "redirect"',
    ),
    (
        "redirect-to-missing",
        [on({"type": "redirect", "redirect": {"status": 301}})],
        f'{R0}.action.redirect: missing required key "to"',
    ),
    (
        "redirect-to-empty",
        [on({"type": "redirect", "redirect": {"to": ""}})],
        f"{R0}.action.redirect.to: expected a non-empty str, got ''",
    ),
    (
        "redirect-template",
        [on({"type": "redirect", "redirect": {"to": "https://{host}{path}"}})],
        f"{R0}.action.redirect.to: unknown template variable {{host}} "
        "(allowed: {domain}, {port}, {path}, {query})",
    ),
    (
        "redirect-status",
        [on({"type": "redirect", "redirect": {"to": "/", "status": 304}})],
        f"{R0}.action.redirect.status: 304 is not a redirect status "
        "(expected 301, 302, 303, 307 or 308)",
    ),
    (
        "redirect-inner-typo",
        [on({"type": "redirect", "redirect": {"url": "/"}})],
        f'{R0}.action.redirect: unknown key "url" (allowed: "status", "to")',
    ),
    # static
    (
        "static-neither",
        [on({"type": "static", "static": {}})],
        f'{R0}.action.static: give either "root" (a directory) or "content"',
    ),
    (
        "static-both",
        [on({"type": "static", "static": {"root": ".", "content": "x"}})],
        f'{R0}.action.static: give either "root" (a directory) or "content", not both',
    ),
    (
        "static-index-with-content",
        [on({"type": "static", "static": {"content": "x", "index": "a.html"}})],
        f'{R0}.action.static.index: only applies with "root"',
    ),
    (
        "static-root-missing",
        [on({"type": "static", "static": {"root": "/no/such/dir"}})],
        f"{R0}.action.static.root: '/no/such/dir' does not exist",
    ),
    (
        "static-content-type",
        [on({"type": "static", "static": {"content": 5}})],
        f"{R0}.action.static.content: expected a str or bytes, got 5",
    ),
    (
        "static-status",
        [on({"type": "static", "static": {"content": "x", "status": 700}})],
        f"{R0}.action.static.status: 700 is not an HTTP status (100-599)",
    ),
    (
        "static-dataclass-empty",
        [on(Static())],
        f'{R0}.action.static: give either "root" (a directory) or "content"',
    ),
    # socket handler
    (
        "handler-missing",
        [on({"type": "socket-handler"})],
        f'{R0}.action: missing required key "socket_handler"',
    ),
    (
        "handler-not-callable",
        [on({"type": "socket-handler", "socket_handler": 5})],
        f'{R0}.action.socket_handler: expected an async function or a "package.module:function" '
        "string, got 5",
    ),
    (
        "handler-sync",
        [on(SocketHandler(cast(Any, sync_handler)))],
        f"{R0}.action.socket_handler: sync_handler is not async "
        "(expected async def handler(reader, writer, ctx) -> None)",
    ),
    (
        "handler-no-colon",
        [on({"type": "socket-handler", "socket_handler": "json.dumps"})],
        f"{R0}.action.socket_handler: 'json.dumps' is not an import path "
        '(expected "package.module:function")',
    ),
    (
        "handler-no-module",
        [on({"type": "socket-handler", "socket_handler": "no_such_mod_xyz:run"})],
        f"{R0}.action.socket_handler: cannot import 'no_such_mod_xyz:run' "
        "(ModuleNotFoundError: No module named 'no_such_mod_xyz')",
    ),
    (
        "handler-no-attribute",
        [on({"type": "socket-handler", "socket_handler": "json:nothing"})],
        f"{R0}.action.socket_handler: cannot import 'json:nothing' "
        "(AttributeError: module 'json' has no attribute 'nothing')",
    ),
    (
        "handler-import-not-callable",
        [on({"type": "socket-handler", "socket_handler": "json:__name__"})],
        f"{R0}.action.socket_handler: 'json:__name__' is not callable (got 'json')",
    ),
    # tls
    (
        "tls-no-mode",
        [on({"type": "block", "tls": {}})],
        f'{R0}.action.tls: missing required key "mode"',
    ),
    (
        "tls-mode-typo",
        [on(forward(tls={"mode": "pasthrough"}))],
        f'{R0}.action.tls.mode: unknown TLS mode "pasthrough" (did you mean "passthrough"?)',
    ),
    (
        "tls-passthrough-not-forward",
        [on({"type": "redirect", "redirect": {"to": "/"}, "tls": {"mode": "passthrough"}})],
        f'{R0}.action.tls.mode: "passthrough" only works with forward actions, '
        'not "redirect" (use "terminate")',
    ),
    (
        "tls-passthrough-certificate",
        [on(forward(tls={"mode": "passthrough", "certificate": "auto"}))],
        f'{R0}.action.tls.certificate: not allowed with mode "passthrough" (nothing is decrypted)',
    ),
    (
        "tls-passthrough-backend",
        [on(forward(tls={"mode": "passthrough", "backend_verify": False}))],
        f'{R0}.action.tls.backend_verify: only applies with mode "terminate-and-reencrypt"',
    ),
    (
        "tls-terminate-backend",
        [on(forward(tls={"mode": "terminate", "certificate": "auto", "backend_ca": "x"}))],
        f'{R0}.action.tls.backend_ca: only applies with mode "terminate-and-reencrypt"',
    ),
    (
        "tls-terminate-no-certificate",
        [on({"type": "block", "tls": {"mode": "terminate"}})],
        f'{R0}.action.tls: mode "terminate" needs a "certificate" '
        '("auto", "on-demand" or {"cert": ..., "key": ...})',
    ),
    (
        "tls-certificate-str",
        [on({"type": "block", "tls": {"mode": "terminate", "certificate": "manual"}})],
        f"""{R0}.action.tls.certificate: expected "auto", "on-demand" or {{"cert": ..., "key": ...}}, """
        "got 'manual'",
    ),
    (
        "tls-certificate-key-typo",
        [on({"type": "block", "tls": {"mode": "terminate", "certificate": {"crt": "x"}}})],
        f'{R0}.action.tls.certificate: unknown key "crt" (did you mean "cert"?)',
    ),
    (
        "tls-verify-type",
        [on(forward(tls=terminate(mode="terminate-and-reencrypt", backend_verify="no")))],
        f"{R0}.action.tls.backend_verify: expected a bool, got 'no'",
    ),
    # security
    (
        "security-list",
        [with_security([])],
        f"{R0}.security: expected a mapping or a Security, got list",
    ),
    (
        "security-key-typo",
        [with_security({"ip_allowlist": "10.0.0.1"})],
        f'{R0}.security: unknown key "ip_allowlist" (did you mean "ip_allow_list"?)',
    ),
    (
        "security-allow-empty",
        [with_security({"ip_allow_list": []})],
        f"{R0}.security.ip_allow_list: empty list (use None or omit it)",
    ),
    (
        "security-block-bad",
        [with_security({"ip_block_list": ["10.0.0.1", "nope"]})],
        f"{R0}.security.ip_block_list[1]: 'nope' is not an IP rule (expected an address, a CIDR "
        "network such as '10.0.0.0/8', or octets with '*' such as '192.168.1.*')",
    ),
    (
        "security-max-zero",
        [with_security({"max_connections": 0})],
        f"{R0}.security.max_connections: expected an int >= 1, got 0",
    ),
    (
        "security-per-ip-str",
        [with_security({"max_connections_per_ip": "5"})],
        f"{R0}.security.max_connections_per_ip: expected an int >= 1, got '5'",
    ),
    (
        "security-rate-missing",
        [with_security({"rate_limit": {}})],
        f'{R0}.security.rate_limit: missing required key "connections_per_minute"',
    ),
    (
        "security-rate-zero",
        [with_security(Security(rate_limit=RateLimit(0)))],
        f"{R0}.security.rate_limit.connections_per_minute: expected an int >= 1, got 0",
    ),
    (
        "security-auth-users-empty",
        [with_security({"basic_auth": {"users": {}}})],
        f"{R0}.security.basic_auth.users: empty mapping (give at least one user)",
    ),
    (
        "security-auth-colon",
        [with_security({"basic_auth": {"users": {"a:b": "x"}}})],
        f"""{R0}.security.basic_auth.users: user name 'a:b' contains ":" """
        "(Basic auth splits on it)",
    ),
    (
        "security-auth-password",
        [with_security({"basic_auth": {"users": {"alice": 1}}})],
        f"{R0}.security.basic_auth.users['alice']: expected a str, got 1",
    ),
    (
        "security-wrong-dataclass",
        [with_security(BasicAuth({"a": "b"}))],
        f"{R0}.security: expected a mapping or a Security, got BasicAuth",
    ),
    (
        "security-auth-on-socket-handler",
        [
            with_security(
                {"basic_auth": {"users": {"a": "b"}}},
                {"type": "socket-handler", "socket_handler": echo_handler},
            )
        ],
        f'{R0}.security.basic_auth: needs an HTTP route, but a "socket-handler" action '
        "gets the raw connection",
    ),
    (
        "security-auth-on-tcp",
        [with_security({"basic_auth": {"users": {"a": "b"}}}, forward(protocol="tcp"))],
        f'{R0}.security.basic_auth: needs an HTTP route, but the forward action has "protocol": '
        '"tcp"',
    ),
    (
        "security-auth-on-passthrough",
        [
            with_security(
                {"basic_auth": {"users": {"a": "b"}}}, forward(tls={"mode": "passthrough"})
            )
        ],
        f'{R0}.security.basic_auth: needs an HTTP route, but TLS "passthrough" never decrypts '
        "the connection",
    ),
    (
        "security-auth-realm",
        [with_security({"basic_auth": {"users": {"a": "b"}, "realm": 'say "hi"'}})],
        f"""{R0}.security.basic_auth.realm: 'say "hi"' cannot be a realm """
        "(no quotes or controls)",
    ),
]


@pytest.mark.parametrize(("routes", "message"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input(routes: object, message: str) -> None:
    assert error_of(routes) == message


# -- backends: weights, backups, load balancing, health checks, retries --------------------------


STATIC = {"type": "static", "static": {"content": "hi"}}
SOCKET = {"type": "socket-handler", "socket_handler": echo_handler}


def forward_action(action: object) -> ForwardAction:
    (route,) = validate_routes([on(action)])
    assert isinstance(route.action, ForwardAction)
    return route.action


def test_backend_defaults() -> None:
    action = forward_action(forward())
    assert action.targets == (TargetSpec(("127.0.0.1",), 9000),)
    target = action.targets[0]
    assert (target.weight, target.backup, target.initial, target.fixed) == (1, False, "up", True)
    assert action.load_balancing == "round-robin"
    assert (action.health_check, action.passive_health, action.retry) == (None, None, None)
    # an empty block turns the feature on with its defaults; None is the same as leaving it out
    action = forward_action(forward(health_check={}, passive_health={}, retry={}))
    assert action.health_check == HealthCheck("tcp", 5.0, 2.0, 2, 3, "/", (200, 399), None)
    assert action.passive_health == PassiveHealth(3, 10.0)
    assert action.retry == RetryPolicy(3, 0.05, 1.0, 0.2, False)
    action = forward_action(forward(load_balancing=None, health_check=None, retry=None))
    assert (action.load_balancing, action.health_check, action.retry) == ("round-robin", None, None)


def test_backend_settings_validate_to_model_objects() -> None:
    action = forward_action(
        forward(
            targets=[
                {"host": "10.0.0.5", "port": 8080, "weight": 256, "initial": "down"},
                {"host": ["10.0.0.6", "10.0.0.7"], "port": 8080, "weight": 1, "initial": "up"},
                {"host": "10.0.0.9", "port": 8080, "backup": True, "send_proxy_protocol": "v2"},
            ],
            load_balancing="ip-hash",
            health_check={
                "type": "http",
                "interval": 10,  # ints are seconds too
                "timeout": 10,  # as long as the interval is fine
                "rise": 1,
                "fall": 5,
                "path": "/healthz?full=1",
                "expect_status": (200, 204),
                "host": "api.example.com:8443",
            },
            passive_health={"max_fails": 1, "fail_timeout": 2.5},
            retry={
                "attempts": 10,
                "backoff": 0,
                "max_backoff": 0,
                "jitter": 1,
                "any_method": False,
            },
        )
    )
    assert action.targets == (
        TargetSpec(("10.0.0.5",), 8080, weight=256, initial="down"),
        TargetSpec(("10.0.0.6", "10.0.0.7"), 8080),
        TargetSpec(("10.0.0.9",), 8080, send_proxy_protocol="v2", backup=True),
    )
    assert action.load_balancing == "ip-hash"
    assert action.health_check == HealthCheck(
        "http", 10.0, 10.0, 1, 5, "/healthz?full=1", (200, 204), "api.example.com:8443"
    )
    assert action.passive_health == PassiveHealth(1, 2.5)
    assert action.retry == RetryPolicy(10, 0.0, 0.0, 1.0, False)
    assert action.health_check is not None and action.retry is not None
    assert type(action.health_check.interval) is float and type(action.retry.jitter) is float


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_load_balancing_strategy(strategy: str) -> None:
    assert forward_action(forward(load_balancing=strategy)).load_balancing == strategy


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (204, (204, 204)),
        ([200, 299], (200, 299)),
        ((100, 599), (100, 599)),
        ([302, 302], (302, 302)),
    ],
)
def test_expect_status_forms(given: object, expected: tuple[int, int]) -> None:
    check = forward_action(forward(health_check={"type": "http", "expect_status": given}))
    assert check.health_check is not None and check.health_check.expect_status == expected


def test_a_short_interval_shortens_the_default_timeout() -> None:
    # the default timeout (2) never makes a shorter interval an error
    short = forward_action(forward(health_check={"interval": 0.5})).health_check
    assert short is not None and (short.interval, short.timeout) == (0.5, 0.5)
    long = forward_action(forward(health_check={"interval": 30})).health_check
    assert long is not None and (long.interval, long.timeout) == (30.0, 2.0)


def test_backends_from_toml_and_json() -> None:
    text = """
[[routes]]
name = "web"
match = { ports = 8080 }

[routes.action]
type = "forward"
load_balancing = "random"
targets = [
    { host = "10.0.0.5", port = 80, weight = 3 },
    { host = "10.0.0.6", port = 80, backup = true, initial = "down" },
]
health_check = { type = "http", path = "/ping", expect_status = [200, 299], interval = 2 }
passive_health = { max_fails = 2, fail_timeout = 30 }
retry = { attempts = 2, backoff = 0.1, max_backoff = 0.5, jitter = 0.0 }
"""
    from_toml = tomllib.loads(text)["routes"]
    from_json = json.loads(json.dumps(from_toml))  # lists stay lists
    for routes in (from_toml, from_json):
        (route,) = validate_routes(routes)
        assert isinstance(route.action, ForwardAction)
        assert route.action.load_balancing == "random"
        assert [t.weight for t in route.action.targets] == [3, 1]
        assert [(t.backup, t.initial) for t in route.action.targets] == [
            (False, "up"),
            (True, "down"),
        ]
        assert route.action.health_check == HealthCheck(
            "http", interval=2.0, path="/ping", expect_status=(200, 299)
        )
        assert route.action.passive_health == PassiveHealth(2, 30.0)
        assert route.action.retry == RetryPolicy(2, 0.1, 0.5, 0.0)


def test_backend_dataclass_form() -> None:
    route = validate_route(
        Route(
            Match(80),
            schema.Forward(
                targets=[schema.Target(host="127.0.0.1", port=1, weight=2)], load_balancing="first"
            ),
        ),
        0,
    )
    assert isinstance(route.action, ForwardAction)
    assert route.action.load_balancing == "first"
    assert route.action.targets == (TargetSpec(("127.0.0.1",), 1, weight=2),)
    # every field, against the dict form
    health: schema.HealthCheckDict = {"type": "http", "expect_status": [200, 204]}
    passive: schema.PassiveHealthDict = {"max_fails": 5}
    retry: schema.RetryDict = {"attempts": 4, "jitter": 0}
    dataclass_form = Route(
        Match(80),
        Forward(
            [Target("a", 1, weight=5, initial="down"), Target("b", 2, backup=True)],
            load_balancing="least-connections",
            health_check=health,
            passive_health=passive,
            retry=retry,
        ),
    )
    dict_form = block(
        action={
            "type": "forward",
            "targets": [
                {"host": "a", "port": 1, "weight": 5, "initial": "down"},
                {"host": "b", "port": 2, "backup": True},
            ],
            "load_balancing": "least-connections",
            "health_check": health,
            "passive_health": passive,
            "retry": retry,
        }
    )
    assert validate_routes([dataclass_form]) == validate_routes([dict_form])
    # a wrong type at its default value still reaches the validator
    assert error_of([Route(Match(80), Forward([Target("a", 1, weight=cast(Any, True))]))]) == (
        f"{R0}.action.targets[0].weight: expected an int (1-256), got True"
    )
    assert error_of([Route(Match(80), Forward([Target("a", 1, backup=cast(Any, 0))]))]) == (
        f"{R0}.action.targets[0].backup: expected a bool, got 0"
    )


def test_forward_schema_mirrors_its_typed_dict() -> None:
    fields = dataclasses.fields(Forward)
    assert {f.name for f in fields} == set(schema.ForwardActionDict.__annotations__) - {"type"}
    required = {f.name for f in fields if f.default is dataclasses.MISSING}
    assert required == schema.ForwardActionDict.__required_keys__ - {"type"}
    for typed_dict in (schema.HealthCheckDict, schema.PassiveHealthDict, schema.RetryDict):
        assert not typed_dict.__required_keys__
    defaults = {f.name: f.default for f in fields}
    assert (
        defaults["load_balancing"] == ForwardAction.__dataclass_fields__["load_balancing"].default
    )


def single(**target: object) -> Any:
    """A forward route with one target on 127.0.0.1:9000, ``target`` added to it."""
    return on(forward(targets=[{"host": "127.0.0.1", "port": 9000, **target}]))


def two(first: object, second: object, **extra: object) -> Any:
    """A forward action to ``first`` and ``second``."""
    return forward(targets=[first, second], **extra)


def http_check(**check: object) -> Any:
    return on(forward(health_check={"type": "http", **check}))


A = {"host": "10.0.0.1", "port": 80}
T0, T1 = f"{R0}.action.targets[0]", f"{R0}.action.targets[1]"
HC, PH, RT = f"{R0}.action.health_check", f"{R0}.action.passive_health", f"{R0}.action.retry"
LISTED = '"round-robin", "least-connections", "ip-hash", "random" or "first"'
BACKEND_BAD: list[tuple[str, Any, str]] = [
    # targets
    ("weight-zero", single(weight=0), f"{T0}.weight: 0 is not a weight (1-256)"),
    ("weight-too-big", single(weight=257), f"{T0}.weight: 257 is not a weight (1-256)"),
    ("weight-negative", single(weight=-1), f"{T0}.weight: -1 is not a weight (1-256)"),
    ("weight-bool", single(weight=True), f"{T0}.weight: expected an int (1-256), got True"),
    ("weight-float", single(weight=1.5), f"{T0}.weight: expected an int (1-256), got 1.5"),
    ("weight-str", single(weight="2"), f"{T0}.weight: expected an int (1-256), got '2'"),
    ("backup-str", on(two(A, {**A, "backup": "yes"})), f"{T1}.backup: expected a bool, got 'yes'"),
    ("backup-int", single(backup=1), f"{T0}.backup: expected a bool, got 1"),
    ("initial-typo", single(initial="dwn"), f'{T0}.initial: unknown initial state "dwn" (did you mean "down"?)'),
    ("initial-bool", single(initial=False), f'{T0}.initial: unknown initial state False (expected "up" or "down")'),
    # load balancing
    ("strategy-typo", on(forward(load_balancing="round_robin")), f'{R0}.action.load_balancing: unknown load balancing strategy "round_robin" (did you mean "round-robin"?)'),
    ("strategy-unknown", on(forward(load_balancing="weighted")), f'{R0}.action.load_balancing: unknown load balancing strategy "weighted" (expected {LISTED})'),
    ("strategy-int", on(forward(load_balancing=1)), f"{R0}.action.load_balancing: unknown load balancing strategy 1 (expected {LISTED})"),
    # health_check
    ("check-bool", on(forward(health_check=True)), f"{HC}: expected a mapping, got True"),
    ("check-type", on(forward(health_check={"type": "udp"})), f'{HC}.type: unknown health check type "udp" (expected "tcp" or "http")'),
    ("check-type-case", on(forward(health_check={"type": "HTTP"})), f'{HC}.type: unknown health check type "HTTP" (did you mean "http"?)'),
    ("interval-zero", on(forward(health_check={"interval": 0})), f"{HC}.interval: must be a finite number greater than 0, got 0"),
    ("interval-str", on(forward(health_check={"interval": "5s"})), f"{HC}.interval: expected a number of seconds, got '5s'"),
    ("interval-inf", on(forward(health_check={"interval": float("inf")})), f"{HC}.interval: must be a finite number greater than 0, got inf"),
    ("timeout-negative", on(forward(health_check={"timeout": -1})), f"{HC}.timeout: must be a finite number greater than 0, got -1"),
    ("timeout-over-default-interval", on(forward(health_check={"timeout": 6})), f"{HC}.timeout: must not exceed interval (5, the default), got 6"),
    ("timeout-over-interval", on(forward(health_check={"interval": 2, "timeout": 2.5})), f"{HC}.timeout: must not exceed interval (2), got 2.5"),
    ("rise-zero", on(forward(health_check={"rise": 0})), f"{HC}.rise: expected an int >= 1, got 0"),
    ("rise-float", on(forward(health_check={"rise": 2.0})), f"{HC}.rise: expected an int >= 1, got 2.0"),
    ("fall-bool", on(forward(health_check={"fall": True})), f"{HC}.fall: expected an int >= 1, got True"),
    ("path-on-tcp", on(forward(health_check={"path": "/"})), f"{HC}.path: only for type 'http' (this check is 'tcp')"),
    ("status-on-tcp", on(forward(health_check={"type": "tcp", "expect_status": 200})), f"{HC}.expect_status: only for type 'http' (this check is 'tcp')"),
    ("host-on-tcp", on(forward(health_check={"host": "a"})), f"{HC}.host: only for type 'http' (this check is 'tcp')"),
    ("path-relative", http_check(path="health"), f"""{HC}.path: 'health' is not a request path (it must start with "/")"""),
    ("path-space", http_check(path="/a b"), f"{HC}.path: '/a b' is not a request path (printable ASCII without spaces)"),
    ("path-newline", http_check(path="/a\r\nX: 1"), f"{HC}.path: '/a\\r\\nX: 1' is not a request path (printable ASCII without spaces)"),
    ("path-empty", http_check(path=""), f"{HC}.path: expected a non-empty str, got ''"),
    ("path-int", http_check(path=1), f"{HC}.path: expected a non-empty str, got 1"),
    ("host-empty", http_check(host=""), f"{HC}.host: expected a non-empty str, got ''"),
    ("host-header-injection", http_check(host="a\nb"), f"{HC}.host: 'a\\nb' is not a Host header (printable ASCII without spaces)"),
    ("status-too-big", http_check(expect_status=600), f"{HC}.expect_status: 600 is not an HTTP status (100-599)"),
    ("status-high-too-big", http_check(expect_status=[200, 600]), f"{HC}.expect_status[1]: 600 is not an HTTP status (100-599)"),
    ("status-low-bool", http_check(expect_status=[True, 300]), f"{HC}.expect_status[0]: expected an int (100-599), got True"),
    ("status-empty-range", http_check(expect_status=[399, 200]), f"{HC}.expect_status: [399, 200] is an empty range (low is greater than high)"),
    ("status-one", http_check(expect_status=[200]), f"{HC}.expect_status: expected two statuses [low, high], got 1"),
    ("status-three", http_check(expect_status=(200, 300, 400)), f"{HC}.expect_status: expected two statuses [low, high], got 3"),
    ("status-str", http_check(expect_status="200-399"), f"{HC}.expect_status: expected a status or a [low, high] pair, got '200-399'"),
    ("status-bool", http_check(expect_status=True), f"{HC}.expect_status: expected a status or a [low, high] pair, got True"),
    # passive_health
    ("passive-list", on(forward(passive_health=[3])), f"{PH}: expected a mapping, got list"),
    ("max-fails-zero", on(forward(passive_health={"max_fails": 0})), f"{PH}.max_fails: expected an int >= 1, got 0"),
    ("fail-timeout-zero", on(forward(passive_health={"fail_timeout": 0})), f"{PH}.fail_timeout: must be a finite number greater than 0, got 0"),
    ("fail-timeout-str", on(forward(passive_health={"fail_timeout": "10"})), f"{PH}.fail_timeout: expected a number of seconds, got '10'"),
    # retry
    ("retry-int", on(forward(retry=3)), f"{RT}: expected a mapping, got 3"),
    ("attempts-zero", on(forward(retry={"attempts": 0})), f"{RT}.attempts: 0 is not a number of attempts (1-10)"),
    ("attempts-too-many", on(forward(retry={"attempts": 11})), f"{RT}.attempts: 11 is not a number of attempts (1-10)"),
    ("attempts-bool", on(forward(retry={"attempts": True})), f"{RT}.attempts: expected an int (1-10), got True"),
    ("backoff-negative", on(forward(retry={"backoff": -0.1})), f"{RT}.backoff: must be a finite number of at least 0, got -0.1"),
    ("backoff-nan", on(forward(retry={"backoff": float("nan")})), f"{RT}.backoff: must be a finite number of at least 0, got nan"),
    ("backoff-bool", on(forward(retry={"backoff": False})), f"{RT}.backoff: expected a number of seconds, got False"),
    ("max-backoff-str", on(forward(retry={"max_backoff": "1"})), f"{RT}.max_backoff: expected a number of seconds, got '1'"),
    ("max-backoff-below-backoff", on(forward(retry={"backoff": 0.5, "max_backoff": 0.25})), f"{RT}.max_backoff: must be at least backoff (0.5), got 0.25"),
    ("backoff-above-default-max", on(forward(retry={"backoff": 2})), f"{RT}.backoff: 2 is more than max_backoff (1, the default): raise max_backoff too"),
    ("jitter-too-big", on(forward(retry={"jitter": 1.5})), f"{RT}.jitter: 1.5 is not a fraction (0-1)"),
    ("jitter-negative", on(forward(retry={"jitter": -0.1})), f"{RT}.jitter: -0.1 is not a fraction (0-1)"),
    ("jitter-str", on(forward(retry={"jitter": "0.2"})), f"{RT}.jitter: expected a number from 0 to 1, got '0.2'"),
    ("any-method-int", on(forward(retry={"any_method": 1})), f"{RT}.any_method: expected a bool, got 1"),
    # the action as a whole
    ("all-backup", on(two({**A, "backup": True}, {**A, "backup": True})), f"{R0}.action.targets: every target is a backup: at least one must be a primary"),
    ("one-backup-alone", on(forward(targets={**A, "backup": True})), f"{R0}.action.targets: every target is a backup: at least one must be a primary"),
    ("check-callable-host", on(two(A, {"host": pick_host, "port": 80}, health_check={})), f"{R0}.action.targets[1].host: the route has a health_check, which needs targets with a fixed host and port (this one has a callable host)"),
    ("check-callable-port", on(two({"host": "a", "port": pick_port}, A, health_check={"type": "http"})), f"{R0}.action.targets[0].port: the route has a health_check, which needs targets with a fixed host and port (this one has a callable port)"),
    ("passive-preserve", on(two(A, {"host": "a", "port": "preserve"}, passive_health={})), f'{R0}.action.targets[1].port: the route has a passive_health, which needs targets with a fixed host and port (this one has port "preserve")'),
    ("check-before-passive", on(two({"host": pick_host, "port": 1}, A, passive_health={}, health_check={})), f"{R0}.action.targets[0].host: the route has a health_check, which needs targets with a fixed host and port (this one has a callable host)"),
    ("initial-down-unchecked", on(two(A, {"host": "b", "port": 1, "initial": "down"})), f'{R0}.action.targets[1].initial: "down" needs a health_check on the route: nothing else would bring the target up'),
    # forward-only keys on other actions
    ("socket-handler-check", on({**SOCKET, "health_check": {}}), f"{R0}.action.health_check: health_check applies to forward actions only (this action is 'socket-handler')"),
    ("redirect-retry", on({"type": "redirect", "redirect": {"to": "/"}, "retry": {}}), f"{R0}.action.retry: retry applies to forward actions only (this action is 'redirect')"),
    ("static-load-balancing", on({**STATIC, "load_balancing": "first"}), f"{R0}.action.load_balancing: load_balancing applies to forward actions only (this action is 'static')"),
    ("block-passive", on({"type": "block", "passive_health": None}), f"{R0}.action.passive_health: passive_health applies to forward actions only (this action is 'block')"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("routes", "message"), [c[1:] for c in BACKEND_BAD], ids=[c[0] for c in BACKEND_BAD]
)
def test_bad_backend_input(routes: Any, message: str) -> None:
    path, problem = message.split(": ", 1)
    with pytest.raises(ConfigError) as caught:
        validate_routes([routes])
    assert (caught.value.path, caught.value.problem) == (path, problem)


def test_callable_targets_without_health_settings_are_fine() -> None:
    action = forward_action(
        two({"host": pick_host, "port": "preserve"}, {**A, "backup": True}, retry={})
    )
    assert [t.fixed for t in action.targets] == [False, True]


WHERE = "set_targets('web').targets"


def test_forward_targets_replaces_targets_only() -> None:
    action = forward_action(forward(health_check={"type": "http"}, retry={"attempts": 2}))
    changed = forward_targets(
        action, [{"host": "10.0.0.2", "port": 81, "weight": 4}, {**A, "backup": True}], WHERE
    )
    assert changed.targets == (
        TargetSpec(("10.0.0.2",), 81, weight=4),
        TargetSpec(("10.0.0.1",), 80, backup=True),
    )
    assert changed == dataclasses.replace(action, targets=changed.targets)
    assert changed.rotation is action.rotation
    assert action.targets == (TargetSpec(("127.0.0.1",), 9000),)  # the original is untouched
    # one target, not in a list, is fine too
    assert forward_targets(action, Target("b", 2), WHERE).targets == (TargetSpec(("b",), 2),)
    # without health settings, callables and "preserve" are fine
    plain = forward_action(forward())
    assert forward_targets(plain, [{"host": pick_host, "port": "preserve"}], WHERE).targets == (
        TargetSpec(pick_host, "preserve"),
    )


@pytest.mark.parametrize(
    ("settings", "targets", "path", "problem"),
    [
        ({}, [{**A, "weight": 0}], f"{WHERE}[0].weight", "0 is not a weight (1-256)"),
        ({}, [], WHERE, "empty list (give at least one target)"),
        (
            {},
            [{**A, "backup": True}],
            WHERE,
            "every target is a backup: at least one must be a primary",
        ),
        (
            {"health_check": {}},
            [A, {"host": pick_host, "port": 80}],
            f"{WHERE}[1].host",
            "the route has a health_check, which needs targets with a fixed host and port "
            "(this one has a callable host)",
        ),
        (
            {"passive_health": {}},
            {"host": "a", "port": "preserve"},
            f"{WHERE}.port",
            "the route has a passive_health, which needs targets with a fixed host and port "
            '(this one has port "preserve")',
        ),
        (
            {"passive_health": {}},
            [A, A, {"host": "a", "port": pick_port}],
            f"{WHERE}[2].port",
            "the route has a passive_health, which needs targets with a fixed host and port "
            "(this one has a callable port)",
        ),
    ],
)
def test_forward_targets_errors(
    settings: dict[str, object], targets: object, path: str, problem: str
) -> None:
    action = forward_action(forward(**settings))
    with pytest.raises(ConfigError) as caught:
        forward_targets(action, targets, WHERE)
    assert (caught.value.path, caught.value.problem) == (path, problem)


# -- unknown keys: a near miss is compared with the keys of its own block only ------------------


def keys_of(typed_dict: Any) -> list[str]:
    return sorted(typed_dict.__required_keys__ | typed_dict.__optional_keys__)


def in_tls(**tls: object) -> Any:
    return on(forward(tls=terminate(**tls)))


def in_certificate(**extra: object) -> Any:
    cert, key = make_pair()
    return on(
        forward(tls={"mode": "terminate", "certificate": {"cert": cert, "key": key, **extra}})
    )


# (id, route, path of the block, its TypedDict, the unknown key, the key of that block suggested)
# Each "far" key is unlike every key of its block and of the blocks inside it, but close to a
# key of another block: it once got that one ("client_ca", before it was a tls key, in tls ->
# "routes[0].match.client_ip").
# None of these keys is a key anywhere; one that is, written in the wrong block, is placed (the
# "key-of-*" cases above).
UNKNOWN_KEYS: list[tuple[str, Any, str, Any, str, str | None]] = [
    ("route", block(priorty=1), R0, schema.RouteDict, "priorty", "priority"),
    ("route-far", block(colour="x"), R0, schema.RouteDict, "colour", None),
    ("match", matching(clientip="*"), f"{R0}.match", schema.MatchDict, "clientip", "client_ip"),
    ("match-far", matching(certificat="auto"), f"{R0}.match", schema.MatchDict, "certificat", None),
    ("port-range", matching(ports=[{"form": 1, "to": 2}]), f"{R0}.match.ports[0]", schema.PortRangeDict, "form", "from"),
    ("port-range-far", matching(ports=[{"from": 1, "to": 2, "realm": 3}]), f"{R0}.match.ports[0]", schema.PortRangeDict, "realm", None),
    ("forward", on(forward(targts=[])), f"{R0}.action", schema.ForwardActionDict, "targts", "targets"),
    ("forward-far", on(forward(idel=1)), f"{R0}.action", schema.ForwardActionDict, "idel", None),
    ("redirect-action", on({"type": "redirect", "redirct": {}}), f"{R0}.action", schema.RedirectActionDict, "redirct", "redirect"),
    ("redirect-action-far", on({"type": "redirect", "usr": {}}), f"{R0}.action", schema.RedirectActionDict, "usr", None),
    ("block-action", on({"type": "block", "typ": 1}), f"{R0}.action", schema.BlockActionDict, "typ", "type"),
    ("block-action-far", on({"type": "block", "rot": "/"}), f"{R0}.action", schema.BlockActionDict, "rot", None),
    ("static-action", on({**STATIC, "statik": {}}), f"{R0}.action", schema.StaticActionDict, "statik", "static"),
    ("static-action-far", on({**STATIC, "realms": 1}), f"{R0}.action", schema.StaticActionDict, "realms", None),
    ("socket-action", on({**SOCKET, "sockethandler": 1}), f"{R0}.action", schema.SocketHandlerActionDict, "sockethandler", "socket_handler"),
    ("socket-action-far", on({**SOCKET, "realms": 1}), f"{R0}.action", schema.SocketHandlerActionDict, "realms", None),
    ("target", on(forward(targets=[{"hots": "a", "port": 1}])), f"{R0}.action.targets[0]", schema.TargetDict, "hots", "host"),
    ("target-far", on(forward(targets=[{"host": "a", "port": 1, "contnet": 1}])), f"{R0}.action.targets[0]", schema.TargetDict, "contnet", None),
    ("target-weight", on(forward(targets=[{"host": "a", "port": 1, "wieght": 2}])), f"{R0}.action.targets[0]", schema.TargetDict, "wieght", "weight"),
    ("health-check", on(forward(health_check={"intervall": 1})), f"{R0}.action.health_check", schema.HealthCheckDict, "intervall", "interval"),
    ("health-check-status", on(forward(health_check={"type": "http", "status": 200})), f"{R0}.action.health_check", schema.HealthCheckDict, "status", "expect_status"),
    ("health-check-far", on(forward(health_check={"max_fails": 1})), f"{R0}.action.health_check", schema.HealthCheckDict, "max_fails", None),
    ("passive-health", on(forward(passive_health={"max_fail": 1})), f"{R0}.action.passive_health", schema.PassiveHealthDict, "max_fail", "max_fails"),
    ("passive-health-far", on(forward(passive_health={"interval": 1})), f"{R0}.action.passive_health", schema.PassiveHealthDict, "interval", None),
    ("retry", on(forward(retry={"attempt": 2})), f"{R0}.action.retry", schema.RetryDict, "attempt", "attempts"),
    ("retry-far", on(forward(retry={"rise": 2})), f"{R0}.action.retry", schema.RetryDict, "rise", None),
    ("redirect", on({"type": "redirect", "redirect": {"to": "/", "stats": 301}}), f"{R0}.action.redirect", schema.RedirectDict, "stats", "status"),
    ("redirect-far", on({"type": "redirect", "redirect": {"to": "/", "mod": 1}}), f"{R0}.action.redirect", schema.RedirectDict, "mod", None),
    ("static", on({"type": "static", "static": {"rot": "/"}}), f"{R0}.action.static", schema.StaticDict, "rot", "root"),
    ("static-far", on({"type": "static", "static": {"content": "x", "domain": 1}}), f"{R0}.action.static", schema.StaticDict, "domain", None),
    ("tls", in_tls(mdoe=1), f"{R0}.action.tls", schema.TlsDict, "mdoe", "mode"),
    ("tls-client-ip", in_tls(clientip="x"), f"{R0}.action.tls", schema.TlsDict, "clientip", "client_ca"),
    ("tls-far", in_tls(alpns=["h2"]), f"{R0}.action.tls", schema.TlsDict, "alpns", None),
    ("certificate", in_certificate(kye="x"), f"{R0}.action.tls.certificate", schema.CertificateDict, "kye", "key"),
    ("certificate-far", in_certificate(idel=1), f"{R0}.action.tls.certificate", schema.CertificateDict, "idel", None),
    ("security", with_security({"ip_allowlist": "*"}), f"{R0}.security", schema.SecurityDict, "ip_allowlist", "ip_allow_list"),
    ("security-far", with_security({"clientip": "*"}), f"{R0}.security", schema.SecurityDict, "clientip", None),
    ("rate-limit", with_security({"rate_limit": {"connections_per_min": 1}}), f"{R0}.security.rate_limit", schema.RateLimitDict, "connections_per_min", "connections_per_minute"),
    ("rate-limit-far", with_security({"rate_limit": {"max_connection": 1}}), f"{R0}.security.rate_limit", schema.RateLimitDict, "max_connection", None),
    ("basic-auth", with_security({"basic_auth": {"user": {}}}), f"{R0}.security.basic_auth", schema.BasicAuthDict, "user", "users"),
    ("basic-auth-far", with_security({"basic_auth": {"users": {"a": "b"}, "pathh": "/"}}), f"{R0}.security.basic_auth", schema.BasicAuthDict, "pathh", None),
    ("timeouts", block(timeouts={"idel": 1}), f"{R0}.timeouts", schema.TimeoutsDict, "idel", "idle"),
    ("timeouts-far", block(timeouts={"domain": 1}), f"{R0}.timeouts", schema.TimeoutsDict, "domain", None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("route", "path", "typed_dict", "key", "suggested"),
    [case[1:] for case in UNKNOWN_KEYS],
    ids=[case[0] for case in UNKNOWN_KEYS],
)
def test_unknown_key_hint_comes_from_its_own_block(
    route: Any, path: str, typed_dict: Any, key: str, suggested: str | None
) -> None:
    keys = keys_of(typed_dict)
    if suggested is None:
        hint = "allowed: " + ", ".join(f'"{name}"' for name in keys)
    else:
        assert suggested in keys
        hint = f'did you mean "{suggested}"?'
    assert error_of([route]) == f'{path}: unknown key "{key}" ({hint})'


def test_a_near_miss_may_point_into_a_block_inside_its_own() -> None:
    # Below the block is fine ("domain" at route level is a typo of match's "domains");
    # above it or beside it never is (see the "far" cases).
    assert error_of([block(domain="x")]) == (
        f'{R0}: unknown key "domain" (did you mean "match.domains"?)'
    )


def test_unknown_tls_key_never_points_into_match() -> None:
    message = error_of([in_tls(clientip="x")])
    assert message.startswith(f'{R0}.action.tls: unknown key "clientip" (')
    assert "match" not in message and "client_ip" not in message


def test_proxy_wide_security_places_no_key_in_a_route() -> None:
    # settings.security is not inside a route: "idle" has no route timeouts to point to
    with pytest.raises(ConfigError) as caught:
        compile_security({"idle": 1}, "settings.security", "")
    allowed = ", ".join(f'"{name}"' for name in keys_of(schema.SecurityDict))
    assert str(caught.value) == f'settings.security: unknown key "idle" (allowed: {allowed})'
    with pytest.raises(ConfigError) as caught:
        compile_security({"users": {"a": "b"}}, "settings.security", "")
    assert str(caught.value) == (
        'settings.security: unknown key "users" (did you mean "basic_auth.users"?)'
    )


def test_bad_dataclass_input_reports_the_same_paths() -> None:
    cases: list[tuple[Route, str]] = [
        (
            Route(Match([80, 70000]), Block()),
            f"{R0}.match.ports[1]: 70000 is not a port (1-65535)",
        ),
        (
            Route(Match(80), Forward([Target(cast(Any, 5), 80)])),
            f"{R0}.action.targets[0].host: expected a host name, a list of host names or a "
            "callable, got 5",
        ),
        (
            Route(Match(80), Redirect("/{nope}")),
            f"{R0}.action.redirect.to: unknown template variable {{nope}} "
            "(allowed: {domain}, {port}, {path}, {query})",
        ),
        (
            Route(Match(80), Block(), enabled=cast(Any, 1)),
            f"{R0}.enabled: expected a bool, got 1",
        ),
        (
            Route(Match(80), Block(tls=Tls("terminate"))),
            f'{R0}.action.tls: mode "terminate" needs a "certificate" '
            '("auto", "on-demand" or {"cert": ..., "key": ...})',
        ),
        (
            Route(Match(80), cast(Any, Target("a", 1))),
            f"{R0}.action: expected a mapping or one of Forward, Redirect, Block, Static, "
            "SocketHandler, got Target",
        ),
    ]
    for route, message in cases:
        assert error_of([route]) == message


def test_bad_static_root_is_a_file(tmp_path: Path) -> None:
    file = tmp_path / "file.txt"
    file.write_text("x")
    assert error_of([on({"type": "static", "static": {"root": str(file)}})]) == (
        f"{R0}.action.static.root: {str(file)!r} is not a directory"
    )


def test_not_a_list_of_routes() -> None:
    assert error_of(None) == "routes: expected a list of routes, got None"
    assert error_of("routes") == "routes: expected a list of routes, got 'routes'"
    assert error_of(Route(Match(80), Block())) == (
        "routes: expected a list of routes, got Route (wrap a single route in a list)"
    )
    with pytest.raises(ConfigError) as caught:
        validate_routes(cast(Any, [block(name=1)]), path="config.routes")
    assert str(caught.value) == "config.routes[0].name: expected a non-empty str, got 1"


def test_errors_are_config_errors_with_path() -> None:
    with pytest.raises(ConfigError) as caught:
        validate_routes(cast(Any, [block(), matching(ports=[80, 70000])]))
    assert caught.value.path == "routes[1].match.ports[1]"
    assert caught.value.problem == "70000 is not a port (1-65535)"
    assert isinstance(caught.value, ValueError)


def test_client_ip_star_matches_ipv6_too() -> None:
    # "*" once matched only IPv4 clients (patterns.IpRule.matches); it means any client.
    (route,) = validate_routes([matching(client_ip="*")])
    (rule,) = route.match.client_ip
    assert rule.matches(parse_ip("::1")) and rule.matches(parse_ip("192.0.2.1"))
