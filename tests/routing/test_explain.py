"""explain() and shadowed(): tables of reasons, and properties against the matcher itself."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_matcher import (
    DOMAINS,
    HEADER_SETS,
    IPS,
    PATHS_SEEN,
    R,
    build,
    connection_facts,
    route_specs,
)

from smartroute import SmartRoute
from smartroute.routing import shadowing as shadowing_module
from smartroute.routing.explain import Explanation, explain, explain_connection, facts_for
from smartroute.routing.facts import ConnectionFacts
from smartroute.routing.matcher import RouteTable
from smartroute.routing.model import (
    BlockAction,
    CompiledRoute,
    ForwardAction,
    HealthCheck,
    TargetSpec,
    TlsSettings,
)
from smartroute.routing.patterns import parse_ip
from smartroute.routing.shadowing import Shadowing, shadowed
from smartroute.routing.validation import validate_routes

PASS = TlsSettings("passthrough")
TERM = TlsSettings("terminate", "auto")


class Hook:
    """A hook that may decline (it has on_request)."""

    async def on_request(self, ctx: Any, request: Any) -> None:
        return None


class Observer:
    """A hook that cannot decline: it only watches."""

    def on_data(self, ctx: Any, direction: str, data: bytes) -> None:
        return None


def checked(action_host: str = "10.0.0.1") -> ForwardAction:
    return ForwardAction(targets=(TargetSpec((action_host,), 80),), health_check=HealthCheck())


def with_(routes: list[CompiledRoute], name: str, **changes: Any) -> list[CompiledRoute]:
    return [dataclasses.replace(r, **changes) if r.name == name else r for r in routes]


# --- facts_for ----------------------------------------------------------------------------------


def test_facts_for_normalises_like_the_engine() -> None:
    tls = facts_for(443, sni="App.Example.COM.", tls_version="TLSv1.3", alpn=["h2"])
    assert (tls.domain, tls.is_tls, tls.protocol, tls.terminated) == (
        "app.example.com",
        True,
        "tls",
        False,
    )
    assert tls.path is None and tls.headers is None and tls.alpn == ("h2",)
    http = facts_for(80, host="WWW.Test:8080", path="/a/./b/../c?x=1", headers={"X-Env": "prod"})
    assert (http.domain, http.path, http.protocol, http.is_tls) == (
        "www.test",
        "/a/c",
        "http",
        False,
    )
    assert http.headers == {"x-env": "prod"}
    assert facts_for(80, host="a.test").path == "/"  # a request always has a path
    inner = facts_for(443, sni="a.test", path="/x")
    assert (
        inner.terminated and inner.is_tls and inner.domain == "a.test" and inner.protocol == "tls"
    )
    assert facts_for(443, sni="a.test", host="b.test").domain == "b.test"  # Host first, as inside
    assert facts_for(22, client_ip="::ffff:10.1.2.3").client_ip == ipaddress.ip_address("10.1.2.3")
    bare = facts_for(22, protocol="ssh")
    assert (bare.protocol, bare.domain, bare.is_tls) == ("ssh", None, False)
    headers = facts_for(80, headers=[("A", "1"), ("a", "2")]).headers
    assert headers == {"a": "1, 2"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": 0}, "not a port"),
        ({"port": 80, "client_ip": "nope"}, "not an IP address"),
        ({"port": 80, "sni": "a.test", "protocol": "ssh"}, "contradicts"),
        ({"port": 80, "host": "a.test", "protocol": "ssh"}, "contradicts"),
        ({"port": 80, "host": "bad host"}, "bad host"),
        ({"port": 80, "path": "/../x"}, "above the root"),
        ({"port": 80, "path": "x"}, "start with"),
    ],
)
def test_facts_for_refuses_bad_inputs(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        facts_for(**kwargs)


def test_facts_for_a_request_with_protocol_tls_is_inside_tls() -> None:
    facts = facts_for(443, host="a.test", protocol="tls")
    assert facts.terminated and facts.domain == "a.test" and facts.path == "/"


# --- why a route does not match -----------------------------------------------------------------


def reasons(routes: Sequence[CompiledRoute], facts: ConnectionFacts) -> dict[str, tuple[bool, str]]:
    found = explain(routes, facts)
    return {c.route: (c.matched, c.reason) for c in found.candidates}


def test_every_failed_condition_is_named() -> None:
    routes = build(
        [
            R("catch-all", priority=-5),
            R("domain", domains=["a.test", "*.b.test"]),
            R("ip", client_ip=["10.0.0.0/8"]),
            R("version", tls_version=["TLSv1.3"]),
            R("alpn", alpn=["h2"]),
            R("path", path="/api/*"),
            R("header", headers={"x-env": "prod"}),
            R("protocol", protocols=["ssh"]),
            R("off", enabled=False),
            R("other-port", ports=[80]),
        ]
    )
    routes = [*routes, dataclasses.replace(routes[0], name="pass", tls=PASS, index=10)]
    got = reasons(routes, facts_for(443))
    assert got["domain"] == (False, "domains: no name given (SNI or Host), not a.test, *.b.test")
    assert got["ip"] == (False, "client_ip: 203.0.113.1 is not in 10.0.0.0/8")
    assert got["version"] == (False, "tls_version: no TLS version given, not TLSv1.3")
    assert got["alpn"] == (False, "alpn: no ALPN offered, it needs one of h2")
    assert got["path"] == (False, "path: no path (not an HTTP request), it needs /api/*")
    assert got["header"] == (
        False,
        "headers: no headers (not an HTTP request), it needs x-env: prod",
    )
    assert got["protocol"] == (False, "protocol: no protocol named, not ssh")
    assert got["off"] == (False, "disabled")
    assert got["pass"] == (False, "tls: its tls block (passthrough) needs a TLS connection")
    assert "other-port" not in got  # only the routes of the port
    http = reasons(routes, facts_for(443, host="c.test", path="/web", headers={"x-env": "dev"}))
    assert http["domain"] == (False, "domains: c.test, not a.test, *.b.test")
    assert http["path"] == (False, "path: /web does not match /api/*")
    assert http["header"] == (False, "headers: x-env is 'dev', it needs 'prod'")
    assert http["protocol"] == (False, "protocol: http, not ssh")
    tls = reasons(routes, facts_for(443, sni="a.test", tls_version="TLSv1.2", alpn=["http/1.1"]))
    assert tls["version"] == (False, "tls_version: TLSv1.2, not TLSv1.3")
    assert tls["alpn"] == (False, "alpn: offered http/1.1, it needs one of h2")
    inner = reasons(routes, facts_for(443, sni="a.test", path="/"))
    assert inner["ip"][1].startswith("tls: inside a terminated TLS session only routes that")
    several = reasons(build([R("two", domains=["a.test"], path="/x")]) + routes[:1], facts_for(443))
    assert several["two"][1].count("; ") == 1  # every failed condition, not only the first


@pytest.mark.parametrize(
    ("specs", "facts", "winner", "loser", "reason"),
    [
        (
            [R("low"), R("high", priority=3)],
            facts_for(443),
            "high",
            "low",
            "lower priority (0 < 3)",
        ),
        (
            [R("wild", domains=["*.a.test"]), R("exact", domains=["x.a.test"])],
            facts_for(443, sni="x.a.test"),
            "exact",
            "wild",
            "less specific domain (wildcard *.a.test; the winner's: exact x.a.test)",
        ),
        (
            [R("short", domains=["*.test"]), R("long", domains=["*.a.test"])],
            facts_for(443, sni="x.a.test"),
            "long",
            "short",
            "less specific domain (wildcard *.test; the winner's: wildcard *.a.test)",
        ),
        (
            [R("none"), R("star", domains=["*"])],
            facts_for(443, sni="x.a.test"),
            "star",
            "none",
            "less specific domain (no domain condition; the winner's: wildcard *)",
        ),
        (
            [R("api", path="/api/*"), R("v1", path="/api/v1/*")],
            facts_for(443, path="/api/v1/x"),
            "v1",
            "api",
            "less specific path (/api/*; the winner's: /api/v1/*)",
        ),
        (
            [R("any"), R("ssh", protocols=["ssh"])],
            facts_for(443, protocol="ssh"),
            "ssh",
            "any",
            "does not name a protocol (the winner names ssh)",
        ),
        (
            [R("first"), R("second")],
            facts_for(443),
            "first",
            "second",
            "later in definition order (#1 after #0)",
        ),
    ],
)
def test_why_a_matching_route_ranks_after_the_winner(
    specs: list[R], facts: ConnectionFacts, winner: str, loser: str, reason: str
) -> None:
    routes = build(specs)
    found = explain(routes, facts)
    assert found.winner is not None and found.winner.route.name == winner
    assert found.winner == RouteTable(routes).match(facts)
    assert reasons(routes, facts)[loser] == (True, reason)


def test_candidates_matched_first_in_rank_order_then_the_others() -> None:
    routes = build([R("miss", domains=["a.test"]), R("b"), R("c", priority=1), R("a", priority=2)])
    found = explain(routes, facts_for(443))
    assert [(c.route, c.matched) for c in found.candidates] == [
        ("c", True),
        ("b", True),
        ("miss", False),
    ]
    assert found.winner is not None and found.winner.route.name == "a"


def test_params_and_dict_and_text() -> None:
    routes = build([R("user", path="/users/:id"), R("rest")])
    found = explain(routes, facts_for(443, host="a.test", path="/users/7"))
    assert found.winner is not None and dict(found.winner.params) == {"id": "7"}
    data = found.to_dict()
    assert data["winner"] == "user" and data["params"] == {"id": "7"}
    assert data["layer"] == "HTTP request" and data["facts"]["path"] == "/users/7"
    assert data["candidates"] == [
        {
            "route": "rest",
            "matched": True,
            "reason": "less specific path (no path condition; the winner's: /users/:id)",
        }
    ]
    lines = found.text()
    assert lines[0] == "HTTP request on port 443 from 203.0.113.1: Host a.test, path /users/7"
    assert (
        lines[1]
        == "  winner: user (priority 0, no domain condition, path /users/:id, definition #0) params={'id': '7'}"
    )
    assert lines[2].split() == [
        "rest",
        "matched,",
        "ranks",
        "after:",
        "less",
        "specific",
        "path",
        "(no",
        "path",
        "condition;",
        "the",
        "winner's:",
        "/users/:id)",
    ]
    none = explain(routes, facts_for(9))
    assert none.winner is None and none.text()[1:] == [
        "  winner: none",
        "  note: no route uses port 9",
    ]


def test_notes_name_the_route_that_takes_over() -> None:
    routes = build([R("app", priority=1), R("sorry")])
    routes = with_(routes, "app", action=checked())
    found = explain(routes, facts_for(443))
    assert found.notes == ("while none of app's targets is up, sorry takes it",)
    hooked = with_(build([R("app"), R("next")]), "app", hooks=(Hook(),))
    assert explain(hooked, facts_for(443)).notes == (
        "if a hook of app declines (fallback), next takes it",
    )
    alone = explain(build([R("app")]), facts_for(443), hooked=lambda route: True)
    assert alone.notes == ("if a hook of app declines (fallback), no route does",)


# --- both layers of a terminated connection (what SmartRoute.explain answers) ------------------


ROUTES = [
    {
        "name": "site",
        "match": {"ports": 443, "domains": "site.test"},
        "action": {
            "type": "forward",
            "protocol": "http",
            "targets": [{"host": "10.0.0.5", "port": 8080}],
            "tls": {"mode": "terminate", "certificate": "auto"},
        },
    },
    {
        "name": "site-api",
        "match": {"ports": 443, "domains": "site.test", "path": "/api/*"},
        "action": {
            "type": "forward",
            "protocol": "http",
            "targets": [{"host": "10.0.0.6", "port": 8080}],
            "tls": {"mode": "terminate", "certificate": "auto"},
        },
    },
    {
        "name": "passthrough",
        "match": {"ports": 443, "domains": "pass.test"},
        "action": {
            "type": "forward",
            "targets": [{"host": "10.0.0.7", "port": 443}],
            "tls": {"mode": "passthrough"},
        },
    },
    {
        "name": "plain",
        "match": {"ports": 80},
        "action": {
            "type": "forward",
            "protocol": "http",
            "targets": [{"host": "10.0.0.8", "port": 80}],
        },
    },
]


def test_explain_connection_explains_the_request_inside_a_terminated_session() -> None:
    routes = validate_routes(ROUTES)
    found = explain_connection(routes, 443, sni="site.test", path="/api/users")
    assert found.winner is not None and found.winner.route.name == "site"
    assert found.inner is not None and found.final is not None
    assert found.final.route.name == "site-api"
    assert found.inner.winner == RouteTable(routes).match(
        facts_for(443, sni="site.test", path="/api/users")
    )
    assert dict(found.to_dict()["inner"])["layer"] == "request inside TLS"
    text = found.text()
    assert text[0].startswith("TLS connection on port 443") and any(
        line.startswith("request inside TLS on port 443") for line in text
    )
    passing = explain_connection(routes, 443, sni="pass.test", path="/x")
    assert passing.inner is None and passing.final is not None
    assert (
        passing.notes[-1]
        == "the request (host, path, headers) is not read: passthrough does not terminate TLS"
    )
    only_tls = explain_connection(routes, 443, sni="site.test")
    assert (
        only_tls.inner is None
        and only_tls.final is not None
        and only_tls.final.route.name == "site"
    )
    plain = explain_connection(routes, 80, host="x.test", path="/y")
    assert (
        plain.facts.protocol == "http"
        and plain.final is not None
        and plain.final.route.name == "plain"
    )
    nothing = explain_connection(routes, 443, host="site.test")  # plain HTTP on the TLS port
    assert nothing.final is None


# --- shadowing ----------------------------------------------------------------------------------


def names(findings: list[Shadowing]) -> dict[str, Shadowing]:
    return {f.route: f for f in findings}


def test_duplicates_and_catch_alls_shadow() -> None:
    routes = build(
        [
            R("web", domains=["a.test"]),
            R("web-again", domains=["a.test"]),
            R("web-lower", domains=["a.test"], priority=-1),
            R("web-higher", domains=["a.test"], priority=1),
            R("api", ports=[80], path="/api/*"),
            R("v1", ports=[80], path="/api/v1/*", priority=-1),
            R("all", ports=[80, 8080], priority=10),
            R("api-8080", ports=[8080, 9000], path="/api/*"),
        ]
    )
    found = names(shadowed(routes))
    assert found["web-again"].text() == (
        "route 'web-again' can never win: 'web-higher' has the same match and has a higher"
        " priority (1 > 0) (port 443)"
    )
    assert found["web"].by == (("web-higher", (443,)),)
    assert "web-higher" not in found
    assert found["api"].text() == (
        "route 'api' can never win: 'all' matches everything it matches and has a higher"
        " priority (10 > 0) (port 80)"
    )
    assert found["v1"].by == (("all", (80,)),)
    assert "api-8080" not in found  # port 9000 has no shadow
    assert "all" not in found and all(f.proven for f in found.values())


@pytest.mark.parametrize(
    ("specs", "shadowed_names"),
    [
        # Same priority: the shadow needs every domain pattern of the route, and to rank first.
        ([R("a", domains=["a.test", "b.test"]), R("b", domains=["b.test"])], {"b"}),
        ([R("a", domains=["*.test"]), R("b", domains=["x.test"])], set()),  # wildcard < exact
        ([R("a", domains=["*.test"], priority=1), R("b", domains=["x.test"])], {"b"}),
        ([R("a", domains=["*.test"], priority=1), R("b", domains=["*.x.test"])], {"b"}),
        ([R("a", domains=["*.x.test"], priority=1), R("b", domains=["*.test"])], set()),
        ([R("a", domains=["a.test"], priority=1), R("b")], set()),  # b takes other names
        ([R("a"), R("b", domains=["a.test"])], set()),  # b's domain ranks first
        ([R("a", path="/api/*"), R("b", path="/api/v1/*")], set()),  # b is more specific
        ([R("a", path="/api/v1/*"), R("b", path="/api/*")], set()),  # b takes /api/x
        ([R("a", path="/api/*", priority=1), R("b", path="/api/v1/*")], {"b"}),
        ([R("a", path="/api/*", priority=1), R("b", path="/api")], {"b"}),
        ([R("a", path="/api/x/*", priority=1), R("b", path="/api/*")], set()),
        ([R("a", path="/users/:id", priority=1), R("b", path="/users/7")], {"b"}),
        ([R("a", path="/*", priority=1), R("b", path="/users/:id")], {"b"}),
        ([R("a", path="/api*", priority=1), R("b", path="/api/*")], {"b"}),
        ([R("a", path="/ap/*", priority=1), R("b", path="/api/*")], set()),
        ([R("a", protocols=["ssh"]), R("b", protocols=["ssh"])], {"b"}),
        ([R("a", protocols=["ssh", "redis"]), R("b", protocols=["ssh"])], {"b"}),
        ([R("a", protocols=["ssh"]), R("b")], set()),
        ([R("a"), R("b", protocols=["ssh"])], set()),  # b names a protocol: it ranks first
        # Client IPs: only what is provably inside.
        ([R("a", client_ip=["10.0.0.0/8"]), R("b", client_ip=["10.1.0.0/16"])], {"b"}),
        ([R("a", client_ip=["10.1.0.0/16"]), R("b", client_ip=["10.0.0.0/8"])], set()),
        ([R("a", client_ip=["10.*.*.*"]), R("b", client_ip=["10.1.2.*"])], {"b"}),
        ([R("a", client_ip=["10.*.*.*"]), R("b", client_ip=["10.1.0.0/16"])], {"b"}),
        ([R("a", client_ip=["10.0.0.0/8"]), R("b", client_ip=["10.1.*.*"])], {"b"}),
        ([R("a", client_ip=["10.0.0.0/8"]), R("b", client_ip=["10.*.*.*"])], {"b"}),
        ([R("a", client_ip=["10.0.0.0/8"]), R("b", client_ip=["*.1.*.*"])], set()),
        ([R("a", client_ip=["10.0.0.0/9"]), R("b", client_ip=["10.*.*.*"])], set()),
        ([R("a", client_ip=["10.0.0.0/8"]), R("b", client_ip=["*"])], set()),
        ([R("a", client_ip=["*"]), R("b")], {"b"}),
        ([R("a", client_ip=["::/0"]), R("b", client_ip=["10.0.0.1"])], set()),
        # Headers, TLS versions, ALPN.
        (
            [R("a", headers={"x-env": "p*"}), R("b", headers={"x-env": "prod", "x-team": "web"})],
            {"b"},
        ),
        ([R("a", headers={"x-env": "prod"}), R("b", headers={"x-env": "p*"})], set()),
        ([R("a", tls_version=["TLSv1.2", "TLSv1.3"]), R("b", tls_version=["TLSv1.3"])], {"b"}),
        ([R("a", alpn=["h2"]), R("b", alpn=["h2", "http/1.1"])], set()),
        # Ports: each port of the route needs a shadow, maybe a different one.
        ([R("a", ports=[80]), R("c", ports=[443]), R("b", ports=[80, 443])], {"b"}),
        ([R("a", ports=[80]), R("b", ports=[80, 443])], set()),
        # Disabled routes neither shadow nor are checked.
        ([R("a", enabled=False), R("b")], set()),
        ([R("a"), R("b", enabled=False)], set()),
    ],
)
def test_what_shadows_and_what_does_not(specs: list[R], shadowed_names: set[str]) -> None:
    assert set(names(shadowed(build(specs)))) == shadowed_names


def test_tls_layers_hooks_and_gates() -> None:
    a, b = build([R("a", priority=1), R("b")])
    assert names(shadowed([dataclasses.replace(a, tls=PASS), b])) == {}  # b takes plain ones
    assert set(names(shadowed([a, dataclasses.replace(b, tls=PASS)]))) == {"b"}
    assert names(shadowed([a, dataclasses.replace(b, tls=TERM)])) == {}  # b serves inside
    assert set(
        names(shadowed([dataclasses.replace(a, tls=TERM), dataclasses.replace(b, tls=PASS)]))
    ) == {"b"}
    # A shadow whose hooks may decline does not shadow; one that only watches does.
    assert names(shadowed([dataclasses.replace(a, hooks=(Hook(),)), b])) == {}
    assert set(names(shadowed([dataclasses.replace(a, hooks=(Observer(),)), b]))) == {"b"}
    assert names(shadowed([a, b], hooked=lambda route: route.name == "a")) == {}
    # Targets that can go down: a fallback, reported as such.
    gated = names(shadowed([dataclasses.replace(a, action=checked()), b]))
    assert not gated["b"].proven and gated["b"].while_up == ("a",)
    assert (
        gated["b"]
        .text()
        .startswith("route 'b' wins only while no target of 'a' is up (a fallback):")
    )
    # ... also when another route checks the same target.
    plain = ForwardAction(targets=(TargetSpec(("10.0.0.1",), 80),))
    c = dataclasses.replace(
        b,
        name="c",
        index=2,
        match=dataclasses.replace(b.match, ports=frozenset({1})),
        action=checked(),
    )
    assert not names(shadowed([dataclasses.replace(a, action=plain), b, c]))["b"].proven
    assert names(shadowed([dataclasses.replace(a, action=plain), b]))["b"].proven
    # A proven shadow is preferred over one that can go down.
    d = dataclasses.replace(a, name="d", index=3, priority=2)
    both = names(shadowed([dataclasses.replace(a, action=checked()), b, d]))
    assert both["b"].proven and both["b"].by == (("d", (443,)),)


@pytest.mark.parametrize(
    ("spec", "tls", "why"),
    [
        (R("x", path="/a"), PASS, "it passes TLS through undecrypted"),
        (R("x", headers={"a": "b"}), PASS, "it passes TLS through undecrypted"),
        (
            R("x", protocols=["ssh"]),
            TERM,
            "it takes TLS connections only (protocol tls), yet names ssh",
        ),
        (
            R("x", path="/a", protocols=["ssh"]),
            None,
            "a plain request is protocol http, yet it names ssh",
        ),
        (
            R("x", path="/a", tls_version=["TLSv1.3"]),
            None,
            "a request outside TLS has no TLS version",
        ),
    ],
)
def test_routes_that_can_never_match(spec: R, tls: TlsSettings | None, why: str) -> None:
    route = dataclasses.replace(build([spec])[0], tls=tls)
    (finding,) = shadowed([route])
    assert finding.by == () and finding.reason.startswith("it can never match: " + why)
    assert finding.to_dict()["proven"] is True


def test_routes_that_can_match() -> None:
    fine = [
        dataclasses.replace(build([R("x", path="/a")])[0], tls=TERM),
        dataclasses.replace(build([R("y", protocols=["tls"])])[0], tls=PASS),
        build([R("z", path="/a", protocols=["http"])])[0],
    ]
    assert shadowed(fine) == []


def test_port_ranges_are_written_as_spans() -> None:
    routes = build(
        [R("all", ports=range(9000, 9010), priority=1), R("some", ports=[*range(9000, 9004), 9007])]
    )
    (finding,) = shadowed(routes)
    assert finding.reason.endswith("(ports 9000-9003, 9007)")


# --- properties: explain agrees with the matcher, shadowing never lies ------------------------

_LAYERS = st.sampled_from([None, None, None, PASS, TERM])
_DECLINES = st.sampled_from([False, False, False, True])
_GATED = st.sampled_from([False, False, True])
_TLS_PROTOCOLS = st.sampled_from([None, None, None, frozenset({"tls"}), frozenset({"tls", "ssh"})])


@st.composite
def engine_routes(draw: st.DrawFn) -> list[CompiledRoute]:
    """Random routes with TLS blocks, hooks that may decline and targets that can go down;
    sometimes a copy of a route (a duplicate to find)."""
    out: list[CompiledRoute] = []
    for route in build(draw(route_specs())):
        protocols = draw(_TLS_PROTOCOLS)
        match = route.match
        if protocols is not None:
            match = dataclasses.replace(match, protocols=protocols)
        out.append(
            dataclasses.replace(
                route,
                match=match,
                tls=draw(_LAYERS),
                hooks=(Hook(),) if draw(_DECLINES) else (),
                action=checked(f"10.0.0.{route.index}") if draw(_GATED) else route.action,
            )
        )
    again: bool = draw(st.booleans())
    if out and again:  # the same match again, later: a duplicate or a fallback
        copy: CompiledRoute = draw(st.sampled_from(out))
        out.append(
            dataclasses.replace(
                copy, name="copy", index=len(out) + 100, hooks=(), action=BlockAction()
            )
        )
    return out


@st.composite
def engine_facts(draw: st.DrawFn) -> ConnectionFacts:
    """Facts shaped as the engine makes them (server/decision.py)."""
    port = draw(st.sampled_from([443, 443, 80, 8080]))
    ip = parse_ip(draw(st.sampled_from(IPS)))
    shape = draw(st.sampled_from(["bare", "tls", "http", "inner"]))
    if shape == "bare":
        protocol = draw(st.sampled_from([None, "ssh", "redis", "http", "tls", "mqtt"]))
        return ConnectionFacts(port, ip, protocol=protocol)
    domain = draw(st.sampled_from(DOMAINS))
    version = draw(st.sampled_from([None, "TLSv1.2", "TLSv1.3"]))
    alpn = tuple(draw(st.lists(st.sampled_from(["h2", "http/1.1"]), max_size=2, unique=True)))
    if shape == "tls":
        return ConnectionFacts(port, ip, domain, True, version, alpn, protocol="tls")
    path = draw(st.sampled_from([p for p in PATHS_SEEN if p is not None]))
    headers = draw(st.sampled_from([h for h in HEADER_SETS if h is not None]))
    if shape == "http":
        return ConnectionFacts(port, ip, domain, path=path, headers=headers, protocol="http")
    return ConnectionFacts(
        port, ip, domain, True, version, alpn, path, headers, terminated=True, protocol="tls"
    )


def agrees(routes: list[CompiledRoute], facts: ConnectionFacts) -> Explanation:
    found = explain(routes, facts)
    assert found.winner == RouteTable(routes).match(facts)
    for candidate in found.candidates:  # each route's own verdict, by a table of it alone
        (route,) = [r for r in routes if r.name == candidate.route]
        alone = RouteTable([route]).match(facts)
        assert (alone is not None) == candidate.matched, (candidate, facts)
    listed = {c.route for c in found.candidates} | (
        {found.winner.route.name} if found.winner else set()
    )
    assert listed == {r.name for r in routes if facts.port in r.match.ports}
    return found


@settings(max_examples=300)
@given(route_specs(), st.lists(connection_facts, min_size=1, max_size=8))
def test_explain_winner_is_the_matchers(specs: list[R], connections: list[ConnectionFacts]) -> None:
    routes = build(specs)
    for facts in connections:
        agrees(routes, facts)


@settings(max_examples=300)
@given(engine_routes(), st.lists(engine_facts(), min_size=1, max_size=8))
def test_explain_winner_is_the_matchers_across_tls_layers(
    routes: list[CompiledRoute], connections: list[ConnectionFacts]
) -> None:
    for facts in connections:
        agrees(routes, facts)


class Gate:
    def __init__(self) -> None:
        self.up = True


@settings(max_examples=400)
@given(engine_routes(), st.lists(engine_facts(), min_size=1, max_size=10), st.data())
def test_a_proven_shadowed_route_never_wins(
    routes: list[CompiledRoute], connections: list[ConnectionFacts], data: st.DataObject
) -> None:
    findings = shadowed(routes)
    proven = {f.route for f in findings if f.proven}
    fallbacks = {f.route for f in findings if not f.proven}
    gates = {id(r.action): Gate() for r in routes if isinstance(r.action, ForwardAction)}
    down: dict[int, Gate] = {}
    for key, gate in gates.items():
        if data.draw(st.booleans()):
            gate.up = False
            down[key] = gate
    table = RouteTable(routes, gates, down)
    hooked = [r for r in routes if r.hooks]
    every_gate_up = RouteTable(routes)
    for facts in connections:
        for found in (
            table.match(facts),
            table.match_without(facts, hooked),
            every_gate_up.match(facts),
        ):
            assert found is None or found.route.name not in proven, (found.route.name, facts)
        found = every_gate_up.match(facts)  # with every target up, fallbacks never win either
        assert found is None or found.route.name not in fallbacks


def test_the_property_finds_shadowed_routes() -> None:
    """The random route sets above do contain shadowed routes (the property is not vacuous)."""
    seen: set[str] = set()

    @settings(max_examples=300, database=None, derandomize=True)  # the same examples each run
    @given(engine_routes())
    def collect(routes: list[CompiledRoute]) -> None:
        for finding in shadowed(routes):
            seen.add("never" if not finding.by else "proven" if finding.proven else "fallback")

    collect()
    assert seen == {"never", "proven", "fallback"}


@settings(max_examples=300)
@given(engine_routes())
def test_the_domain_index_of_shadows_misses_none(routes: list[CompiledRoute]) -> None:
    indexed = shadowed(routes)
    saved = shadowing_module._Rivals.of
    shadowing_module._Rivals.of = lambda self, route: [r for r in routes if r.enabled]  # type: ignore[method-assign]
    try:
        assert shadowed(routes) == indexed
    finally:
        shadowing_module._Rivals.of = saved  # type: ignore[method-assign]


def test_the_proxy_explains_with_its_own_routes_and_hooks() -> None:
    class Gate:
        async def on_request(self, ctx: object, request: object) -> None:
            return None

    proxy = SmartRoute(
        [
            {"name": "api", "match": {"ports": 80, "path": "/api/*"}, "action": {"type": "block"}},
            {"name": "all", "match": {"ports": 80}, "action": {"type": "block"}},
        ],
        hooks=[Gate()],
    )
    found = proxy.explain(80, host="a.test", path="/api/x")
    assert found.winner is not None and found.winner.route.name == "api"
    assert any(c[0] == "all" and c[1] for c in found.candidates)
    assert "api" in "\n".join(found.text())
