"""The route matcher: table-driven cases plus a property against a naive reference."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smartroute.routing import matcher
from smartroute.routing.facts import ConnectionFacts, RouteMatch
from smartroute.routing.matcher import RouteTable
from smartroute.routing.model import BlockAction, CompiledRoute, MatchCriteria, TlsSettings
from smartroute.routing.patterns import (
    compile_domain,
    compile_header_rule,
    compile_ip_rule,
    compile_path,
    normalize_host,
    parse_ip,
)


@dataclass(frozen=True)
class R:
    """A route as a test writes it; ``index`` defaults to its position in the list."""

    name: str
    ports: Iterable[int] = (443,)
    domains: Sequence[str] = ()
    path: str | None = None
    client_ip: Sequence[str] = ()
    tls_version: Iterable[str] = ()
    alpn: Iterable[str] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    protocols: Iterable[str] = ()
    priority: int = 0
    enabled: bool = True
    index: int | None = None


def build(specs: Sequence[R]) -> list[CompiledRoute]:
    return [
        CompiledRoute(
            name=spec.name,
            match=MatchCriteria(
                ports=frozenset(spec.ports),
                domains=tuple(compile_domain(d) for d in spec.domains),
                path=None if spec.path is None else compile_path(spec.path),
                client_ip=tuple(compile_ip_rule(rule) for rule in spec.client_ip),
                tls_version=frozenset(spec.tls_version),
                alpn=frozenset(spec.alpn),
                headers=tuple(compile_header_rule(k, v) for k, v in spec.headers.items()),
                protocols=frozenset(spec.protocols),
            ),
            action=BlockAction(),
            index=position if spec.index is None else spec.index,
            priority=spec.priority,
            enabled=spec.enabled,
        )
        for position, spec in enumerate(specs)
    ]


def facts(
    *,
    port: int = 443,
    ip: str = "203.0.113.9",
    domain: str | None = None,
    tls_version: str | None = None,
    alpn: tuple[str, ...] = (),
    path: str | None = None,
    headers: Mapping[str, str] | None = None,
    protocol: str | None = None,
) -> ConnectionFacts:
    return ConnectionFacts(
        port=port,
        client_ip=parse_ip(ip),
        domain=None if domain is None else normalize_host(domain),
        is_tls=tls_version is not None,
        tls_version=tls_version,
        alpn=alpn,
        path=path,
        headers=headers,
        protocol=protocol,
    )


@dataclass(frozen=True)
class Case:
    id: str
    routes: Sequence[R]
    facts: ConnectionFacts
    winner: str | None
    params: Mapping[str, str] = field(default_factory=dict)


WILD_EXACT = [R("wild", domains=["*.example.com"]), R("exact", domains=["www.example.com"])]
WILDCARDS = [R("shallow", domains=["*.example.com"]), R("deep", domains=["*.api.example.com"])]
STAR = [R("none"), R("star", domains=["*"]), R("com", domains=["*.com"])]
PORTS = [R("list", ports=[80, 443]), R("range", ports=range(9000, 9006))]
PATHS = [
    R("api", path="/api/*"),
    R("v1", path="/api/v1/*"),
    R("health", path="/health"),
    R("user", path="/users/:id/posts/:post"),
]

MUX = [R("any"), R("ssh", protocols=["ssh"]), R("kv", protocols=["redis", "mqtt"])]

CASES = [
    # Protocols: a route that names the protocol before one that takes any, whatever the order.
    Case("protocol-named", MUX, facts(protocol="ssh"), "ssh"),
    Case("protocol-in-list", MUX, facts(protocol="mqtt"), "kv"),
    Case("protocol-unnamed", MUX, facts(), "any"),
    Case("protocol-other", MUX, facts(protocol="postgres"), "any"),
    Case("protocol-only", MUX[1:], facts(protocol="postgres"), None),
    Case("protocol-priority-first", [R("any", priority=1), *MUX[1:]], facts(protocol="ssh"), "any"),
    Case(
        "protocol-after-path",
        [R("proto", protocols=["http"]), R("path", path="/api/*")],
        facts(protocol="http", path="/api/x"),
        "path",
    ),
    # Domains: exact > wildcard > none, whatever the definition order.
    Case("exact-beats-wildcard", WILD_EXACT, facts(domain="www.example.com"), "exact"),
    Case("exact-beats-wildcard-rev", WILD_EXACT[::-1], facts(domain="www.example.com"), "exact"),
    Case("wildcard-other-host", WILD_EXACT, facts(domain="api.example.com"), "wild"),
    Case("wildcard-not-apex", WILD_EXACT, facts(domain="example.com"), None),
    Case("deeper-wildcard", WILDCARDS, facts(domain="v1.api.example.com"), "deep"),
    Case("deeper-wildcard-rev", WILDCARDS[::-1], facts(domain="v1.api.example.com"), "deep"),
    Case("deeper-not-own-apex", WILDCARDS, facts(domain="api.example.com"), "shallow"),
    Case("star-any-domain", STAR, facts(domain="example.org"), "star"),
    Case("longer-suffix-than-star", STAR, facts(domain="a.b.com"), "com"),
    Case("star-needs-a-domain", STAR, facts(), "none"),
    Case("no-sni-skips-domains", WILD_EXACT + [R("any")], facts(), "any"),
    Case("no-sni-no-domainless", WILD_EXACT, facts(), None),
    Case("unknown-domain", WILD_EXACT, facts(domain="example.org"), None),
    Case(
        "case-and-trailing-dot",
        [R("a", domains=["Example.COM."])],
        facts(domain="EXAMPLE.com."),
        "a",
    ),
    Case(
        "wildcard-case-and-dot",
        [R("a", domains=["*.Example.Com"])],
        facts(domain="WWW.example.COM."),
        "a",
    ),
    Case(
        "several-domains-take-the-matching-one",
        [R("wild", domains=["*.example.com"]), R("both", domains=["*.x.org", "example.com"])],
        facts(domain="example.com"),
        "both",
    ),
    Case(
        "several-domains-wildcard-one",
        [R("wild", domains=["*.example.com"]), R("both", domains=["*.example.com", "a.org"])],
        facts(domain="www.example.com"),
        "wild",
    ),
    # Priority dominates specificity; definition order breaks the last ties.
    Case(
        "priority-beats-exact",
        [R("exact", domains=["example.com"]), R("any", priority=1)],
        facts(domain="example.com"),
        "any",
    ),
    Case(
        "priority-beats-deeper-wildcard",
        [R("deep", domains=["*.b.example.com"]), R("star", domains=["*"], priority=2)],
        facts(domain="a.b.example.com"),
        "star",
    ),
    Case(
        "negative-priority-loses",
        [R("exact", domains=["example.com"], priority=-1), R("any")],
        facts(domain="example.com"),
        "any",
    ),
    Case(
        "definition-order",
        [R("first", domains=["example.com"]), R("second", domains=["example.com"])],
        facts(domain="example.com"),
        "first",
    ),
    Case(
        "definition-order-is-index",
        [R("late", domains=["example.com"], index=7), R("early", domains=["example.com"], index=3)],
        facts(domain="example.com"),
        "early",
    ),
    # Ports.
    Case("port-list", PORTS, facts(port=80), "list"),
    Case("port-range-start", PORTS, facts(port=9000), "range"),
    Case("port-range-end", PORTS, facts(port=9005), "range"),
    Case("port-range-past-end", PORTS, facts(port=9006), None),
    Case("port-unknown", PORTS, facts(port=8080), None),
    # Client IP.
    Case("ip-exact", [R("a", client_ip=["10.1.2.3"])], facts(ip="10.1.2.3"), "a"),
    Case("ip-exact-miss", [R("a", client_ip=["10.1.2.3"])], facts(ip="10.1.2.4"), None),
    Case("ip-cidr", [R("a", client_ip=["10.0.0.0/8"])], facts(ip="10.200.0.1"), "a"),
    Case("ip-cidr-miss", [R("a", client_ip=["10.0.0.0/8"])], facts(ip="11.0.0.1"), None),
    Case("ip-mapped", [R("a", client_ip=["10.0.0.0/8"])], facts(ip="::ffff:10.1.2.3"), "a"),
    Case("ip-octets", [R("a", client_ip=["192.168.1.*"])], facts(ip="192.168.1.77"), "a"),
    Case("ip-octets-miss", [R("a", client_ip=["192.168.1.*"])], facts(ip="192.168.2.1"), None),
    Case(
        "ip-octets-mapped",
        [R("a", client_ip=["192.168.*.1"])],
        facts(ip="::ffff:192.168.9.1"),
        "a",
    ),
    Case("ip-v6-loopback", [R("a", client_ip=["::1"])], facts(ip="::1"), "a"),
    Case("ip-v6-rule-v4-client", [R("a", client_ip=["::1"])], facts(ip="127.0.0.1"), None),
    Case("ip-v4-rule-v6-client", [R("a", client_ip=["10.0.0.0/8"])], facts(ip="::1"), None),
    Case(
        "ip-any-rule",
        [R("a", client_ip=["10.0.0.0/8", "::1"]), R("b")],
        facts(ip="::1"),
        "a",
    ),
    Case(
        "ip-miss-falls-through",
        [R("a", client_ip=["10.0.0.0/8"]), R("b")],
        facts(ip="192.0.2.1"),
        "b",
    ),
    # TLS version and ALPN.
    Case("tls-version", [R("a", tls_version=["TLSv1.3"])], facts(tls_version="TLSv1.3"), "a"),
    Case("tls-version-miss", [R("a", tls_version=["TLSv1.3"])], facts(tls_version="TLSv1.2"), None),
    Case("tls-version-none", [R("a", tls_version=["TLSv1.3"])], facts(), None),
    Case("alpn-any-offered", [R("a", alpn=["h2"])], facts(alpn=("http/1.1", "h2")), "a"),
    Case("alpn-miss", [R("a", alpn=["h2"])], facts(alpn=("http/1.1",)), None),
    Case("alpn-none-offered", [R("a", alpn=["h2"])], facts(), None),
    # Paths.
    Case("path-exact", PATHS, facts(path="/health"), "health"),
    Case("path-exact-only", PATHS, facts(path="/healthz"), None),
    Case("path-glob-bare-prefix", PATHS, facts(path="/api"), "api"),
    Case(
        "path-exact-beats-glob",
        [*PATHS, R("api-exact", path="/api")],
        facts(path="/api"),
        "api-exact",
    ),
    Case("path-glob", PATHS, facts(path="/api/x/y"), "api"),
    Case("path-longer-prefix-first", PATHS, facts(path="/api/v1/users"), "v1"),
    Case("path-longer-prefix-rev", PATHS[::-1], facts(path="/api/v1/users"), "v1"),
    Case(
        "path-params",
        PATHS,
        facts(path="/users/42/posts/hello"),
        "user",
        {"id": "42", "post": "hello"},
    ),
    Case("path-param-one-segment", PATHS, facts(path="/users/4/2/posts/x"), None),
    Case("path-needs-a-path", PATHS, facts(), None),
    Case(
        "path-beats-no-path",
        [R("plain", domains=["example.com"]), R("api", domains=["example.com"], path="/api/*")],
        facts(domain="example.com", path="/api/x"),
        "api",
    ),
    Case(
        "path-miss-falls-back",
        [R("plain", domains=["example.com"]), R("api", domains=["example.com"], path="/api/*")],
        facts(domain="example.com", path="/other"),
        "plain",
    ),
    Case(
        "domain-beats-path",
        [R("path", path="/api/v1/*"), R("exact", domains=["example.com"])],
        facts(domain="example.com", path="/api/v1/x"),
        "exact",
    ),
    # Headers.
    Case(
        "header",
        [R("a", headers={"X-Env": "prod"})],
        facts(headers={"x-env": "prod"}),
        "a",
    ),
    Case("header-miss", [R("a", headers={"x-env": "prod"})], facts(headers={"x-env": "dev"}), None),
    Case("header-absent", [R("a", headers={"x-env": "prod"})], facts(headers={}), None),
    Case("header-not-http", [R("a", headers={"x-env": "prod"})], facts(), None),
    Case(
        "header-glob",
        [R("a", headers={"user-agent": "curl/*"})],
        facts(headers={"user-agent": "curl/8.5.0"}),
        "a",
    ),
    Case(
        "headers-all-must-match",
        [R("a", headers={"x-env": "prod", "x-team": "web"}), R("b")],
        facts(headers={"x-env": "prod"}),
        "b",
    ),
    # Disabled routes.
    Case(
        "disabled-ignored",
        [R("off", domains=["example.com"], enabled=False), R("wild", domains=["*.com"])],
        facts(domain="example.com"),
        "wild",
    ),
    Case("disabled-only", [R("off", enabled=False)], facts(), None),
    # Every field together.
    Case(
        "all-fields",
        [
            R(
                "all",
                ports=[443],
                domains=["example.com"],
                path="/v/:n",
                client_ip=["10.0.0.0/8"],
                tls_version=["TLSv1.3"],
                alpn=["http/1.1"],
                headers={"x-env": "prod"},
            ),
            R("rest", domains=["*"]),
        ],
        facts(
            ip="::ffff:10.9.9.9",
            domain="example.com",
            tls_version="TLSv1.3",
            alpn=("h2", "http/1.1"),
            path="/v/3",
            headers={"x-env": "prod"},
        ),
        "all",
        {"n": "3"},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_match(case: Case) -> None:
    routes = build(case.routes)
    got = RouteTable(routes).match(case.facts)
    if case.winner is None:
        assert got is None
        return
    assert got is not None
    assert got.route.name == case.winner
    assert dict(got.params) == dict(case.params)
    # The indexed matcher agrees with the naive reference on every hand-written case.
    assert got == reference(routes, case.facts)


def test_empty_table() -> None:
    table = RouteTable([])
    assert table.match(facts()) is None
    assert table.port_counts == {}
    assert not table.has_port(443)
    assert not table.needs_data(443)
    assert table.ordered(443) == []


def test_port_counts_and_has_port() -> None:
    table = RouteTable(
        build(
            [
                R("a", ports=[80, 443]),
                R("b", ports=[443]),
                R("c", ports=range(9000, 9003)),
                R("off", ports=[8080, 443], enabled=False),
            ]
        )
    )
    assert table.port_counts == {80: 1, 443: 2, 9000: 1, 9001: 1, 9002: 1}
    assert table.has_port(9002)
    assert not table.has_port(8080)
    table.port_counts.clear()  # a fresh dict every time
    assert table.port_counts[443] == 2


def test_needs_data_per_port() -> None:
    table = RouteTable(
        build(
            [
                R("ssh", ports=[22], client_ip=["10.0.0.0/8"]),
                R("web", ports=[443, 8443], domains=["example.com"]),
                R("raw", ports=[8443]),
                R("alpn", ports=[5000], alpn=["h2"]),
                R("tls", ports=[5001], tls_version=["TLSv1.3"]),
                R("path", ports=[5002], path="/x"),
                R("head", ports=[5003], headers={"x-a": "b"}),
                R("off", ports=[22], domains=["example.com"], enabled=False),
            ]
        )
    )
    assert not table.needs_data(22)
    assert table.needs_data(443)
    assert table.needs_data(8443)
    assert all(table.needs_data(port) for port in (5000, 5001, 5002, 5003))
    assert not table.needs_data(1)


def test_ordered() -> None:
    specs = [
        R("none"),
        R("wild", domains=["*.example.com"]),
        R("star", domains=["*"]),
        R("exact", domains=["www.example.com"]),
        R("deep", domains=["*.api.example.com"]),
        R("mixed", domains=["*.other.org", "mixed.org"]),
        R("path", path="/api/*"),
        R("top", priority=10),
        R("off", domains=["a.com"], enabled=False),
        R("elsewhere", ports=[80], domains=["b.com"]),
    ]
    table = RouteTable(build(specs))
    names = [route.name for route in table.ordered(443)]
    assert names == ["top", "exact", "mixed", "deep", "wild", "star", "path", "none"]
    assert [route.name for route in table.ordered(80)] == ["elsewhere"]
    assert table.ordered(1) == []


def test_params_are_per_match() -> None:
    table = RouteTable(build([R("user", path="/users/:id")]))
    first = table.match(facts(path="/users/1"))
    second = table.match(facts(path="/users/2"))
    assert first is not None and second is not None
    assert dict(first.params) == {"id": "1"}
    assert dict(second.params) == {"id": "2"}
    plain = RouteTable(build([R("plain")])).match(facts(path="/users/1"))
    assert plain is not None and dict(plain.params) == {}


def test_large_table_same_as_reference() -> None:
    specs = [R(f"h{i}", ports=[443, 80], domains=[f"h{i}.example.com"]) for i in range(500)]
    specs += [R(f"w{i}", domains=[f"*.z{i}.example.com"]) for i in range(100)]
    specs += [R("ip", client_ip=["10.0.0.0/8"], priority=1), R("fallback")]
    routes = build(specs)
    table = RouteTable(routes)
    for connection in (
        facts(domain="h7.example.com"),
        facts(domain="h7.example.com", port=80),
        facts(domain="a.z42.example.com"),
        facts(domain="h7.example.com", ip="10.0.0.1"),
        facts(domain="nowhere.example.net"),
        facts(),
        facts(port=80),
    ):
        assert table.match(connection) == reference(routes, connection)


# --- The naive reference and the property ----------------------------------------------------


def reference(routes: Sequence[CompiledRoute], facts: ConnectionFacts) -> RouteMatch | None:
    """Filter every route by a full match, then take the minimum of the ordering key."""
    best: tuple[tuple[int, ...], RouteMatch] | None = None
    for route in routes:
        criteria = route.match
        if not route.enabled or facts.port not in criteria.ports:
            continue
        if criteria.domains:
            if facts.domain is None:
                continue
            domain = facts.domain
            ranks = [
                (0, 0) if pattern.exact else (1, -len(pattern.suffix))
                for pattern in criteria.domains
                if pattern.matches(domain)
            ]
            if not ranks:
                continue
            domain_rank = min(ranks)
        else:
            domain_rank = (2, 0)
        if criteria.client_ip and not any(r.matches(facts.client_ip) for r in criteria.client_ip):
            continue
        if criteria.tls_version and facts.tls_version not in criteria.tls_version:
            continue
        if criteria.alpn and not any(p in criteria.alpn for p in facts.alpn):
            continue
        if criteria.headers:
            headers = facts.headers
            if headers is None or not all(rule.matches(headers) for rule in criteria.headers):
                continue
        if criteria.protocols and facts.protocol not in criteria.protocols:
            continue
        params: dict[str, str] = {}
        path_rank = (1, 0)
        if criteria.path is not None:
            found = None if facts.path is None else criteria.path.match(facts.path)
            if found is None:
                continue
            params = found
            exact = criteria.path.kind == "exact"
            path_rank = (0, -(1 << 20) if exact else -len(criteria.path.literal_prefix))
        protocol_rank = 0 if criteria.protocols else 1
        key = (-route.priority, *domain_rank, *path_rank, protocol_rank, route.index)
        if best is None or key < best[0]:
            best = (key, RouteMatch(route, params))
    return None if best is None else best[1]


DOMAIN_PATTERNS = [
    "a.com",
    "b.a.com",
    "x.b.a.com",
    "*.a.com",
    "*.b.a.com",
    "*.com",
    "*",
    "c.org",
    "*.c.org",
]
DOMAINS = [None, "", "a.com", "b.a.com", "x.b.a.com", "y.b.a.com", "c.org", "d.c.org", "com"]
PATH_PATTERNS = ["/", "/api", "/api/*", "/api/v1/*", "/users/:id", "/*", "/api/:v/x"]
PATHS_SEEN = [None, "/", "/api", "/api/", "/api/v1/x", "/api/v1/x", "/users/7", "/api/v2/x"]
IP_RULES = ["10.0.0.0/8", "10.1.2.3", "192.168.1.*", "::1", "*", "2001:db8::/32"]
IPS = ["10.1.2.3", "10.9.9.9", "192.168.1.5", "::1", "::ffff:10.1.2.3", "2001:db8::5", "8.8.8.8"]
VERSIONS = ["TLSv1.2", "TLSv1.3"]
PROTOCOLS = ["h2", "http/1.1"]
HEADER_RULES = [("x-env", "prod"), ("x-env", "p*"), ("x-team", "web")]
HEADER_SETS: list[Mapping[str, str] | None] = [
    None,
    {},
    {"x-env": "prod"},
    {"x-env": "preview", "x-team": "web"},
]


# Strategies built once: rebuilding them inside the composites dominates the run time.
# Conditions are usually absent, so that several routes match at once and the ordering is
# exercised, not only the filtering.
_PORT_SETS = st.sampled_from([frozenset({443}), frozenset({443}), frozenset({80, 443})])
_DOMAIN_LISTS = st.lists(st.sampled_from(DOMAIN_PATTERNS), max_size=2)
_PATH_PATTERN = st.sampled_from([None, None, *PATH_PATTERNS])
_IP_RULE_LISTS = st.just(()) | st.just(()) | st.lists(st.sampled_from(IP_RULES), max_size=2)
_VERSION_SETS = st.sampled_from([(), (), (), ("TLSv1.3",), ("TLSv1.2", "TLSv1.3")])
_PROTOCOL_SETS = st.sampled_from([(), (), (), ("h2",), ("h2", "http/1.1")])
_HEADER_RULE_LISTS: st.SearchStrategy[list[tuple[str, str]]] = (
    st.just([]) | st.just([]) | st.lists(st.sampled_from(HEADER_RULES), max_size=3)
)
_PROBED_SETS = st.sampled_from([(), (), (), ("ssh",), ("http", "redis")])
_PRIORITIES = st.sampled_from([0, 0, 0, 1, -1])
_ENABLED = st.sampled_from([True, True, True, False])
_ROUTE_COUNTS = st.integers(min_value=0, max_value=10)


@st.composite
def route_specs(draw: st.DrawFn) -> list[R]:
    count = draw(_ROUTE_COUNTS)
    indices = draw(st.permutations(range(count)))
    return [
        R(
            name=f"r{position}",
            ports=draw(_PORT_SETS),
            domains=draw(_DOMAIN_LISTS),
            path=draw(_PATH_PATTERN),
            client_ip=draw(_IP_RULE_LISTS),
            tls_version=draw(_VERSION_SETS),
            alpn=draw(_PROTOCOL_SETS),
            headers=dict(draw(_HEADER_RULE_LISTS)),
            protocols=draw(_PROBED_SETS),
            priority=draw(_PRIORITIES),
            enabled=draw(_ENABLED),
            index=indices[position],
        )
        for position in range(count)
    ]


connection_facts = st.builds(
    ConnectionFacts,
    port=st.sampled_from([443, 443, 80, 8080]),
    client_ip=st.sampled_from(IPS).map(parse_ip),
    domain=st.sampled_from(DOMAINS),
    tls_version=st.none() | st.sampled_from(VERSIONS),
    alpn=st.lists(st.sampled_from(PROTOCOLS), max_size=2, unique=True).map(tuple),
    path=st.sampled_from(PATHS_SEEN),
    headers=st.sampled_from(HEADER_SETS),
    protocol=st.sampled_from([None, "ssh", "http", "redis", "mqtt"]),
)


@settings(max_examples=250)
@given(route_specs(), st.lists(connection_facts, min_size=1, max_size=8))
def test_matches_naive_reference(specs: list[R], connections: list[ConnectionFacts]) -> None:
    routes = build(specs)
    table = RouteTable(routes)
    for connection in connections:
        assert table.match(connection) == reference(routes, connection)


@contextlib.contextmanager
def every_bucket_indexed() -> Iterator[None]:
    """Tables built inside index every bucket, however short (see _IndexedBucket)."""
    saved = matcher.INDEX_THRESHOLD
    matcher.INDEX_THRESHOLD = 0
    try:
        yield
    finally:
        matcher.INDEX_THRESHOLD = saved


@settings(max_examples=250)
@given(route_specs(), st.lists(connection_facts, min_size=1, max_size=8))
def test_indexed_buckets_match_the_naive_reference(
    specs: list[R], connections: list[ConnectionFacts]
) -> None:
    routes = build(specs)
    with every_bucket_indexed():
        table = RouteTable(routes)
    for connection in connections:
        assert table.match(connection) == reference(routes, connection)


def test_many_paths_and_headers_under_one_domain_same_as_reference() -> None:
    specs = [R(f"exact{i}", domains=["api.test"], path=f"/exact/{i}") for i in range(300)]
    specs += [R(f"glob{i}", domains=["api.test"], path=f"/svc{i}/*") for i in range(300)]
    specs += [R(f"param{i}", domains=["api.test"], path=f"/u{i}/:id/x") for i in range(300)]
    specs += [R(f"deep{i}", domains=["api.test"], path=f"/a/b{i}/c*") for i in range(100)]
    specs += [
        R(f"tenant{i}", domains=["api.test"], headers={"x-tenant": f"t{i}"}) for i in range(300)
    ]
    specs += [R("glob-header", domains=["api.test"], headers={"x-tenant": "t1*"}, priority=1)]
    specs += [R("root", domains=["api.test"], path="/*"), R("catch-all", domains=["api.test"])]
    specs += [R(f"nodomain{i}", path=f"/n{i}/*") for i in range(50)]
    routes = build(specs)
    table = RouteTable(routes)
    paths: list[str | None] = ["/exact/7", "/exact/7/", "/svc12", "/svc12/", "/svc12/a/b"]
    paths += ["/svc123x", "/u5/9/x"]
    paths += ["/u5/9/y", "/a/b7/cd", "/a/b7/c", "/a/b7", "/n3/q", "/", "/nothing", None]
    for domain in ("api.test", "other.test", None):
        for path in paths:
            for headers in (None, {}, {"x-tenant": "t7"}, {"x-tenant": "t15"}, {"x-other": "t7"}):
                connection = facts(domain=domain, path=path, headers=headers)
                assert table.match(connection) == reference(routes, connection), connection


@st.composite
def ordering_specs(draw: st.DrawFn) -> list[R]:
    """Routes with only domains, a path and a priority: many match, so the order decides."""
    count = draw(st.integers(min_value=1, max_value=10))
    indices = draw(st.permutations(range(count)))
    return [
        R(
            name=f"r{position}",
            domains=draw(_DOMAIN_LISTS),
            path=draw(_PATH_PATTERN),
            priority=draw(_PRIORITIES),
            index=indices[position],
        )
        for position in range(count)
    ]


@settings(max_examples=150)
@given(
    ordering_specs(),
    st.lists(
        st.builds(facts, domain=st.sampled_from(DOMAINS), path=st.sampled_from(PATHS_SEEN)),
        min_size=1,
        max_size=8,
    ),
)
def test_ordering_matches_naive_reference(
    specs: list[R], connections: list[ConnectionFacts]
) -> None:
    routes = build(specs)
    table = RouteTable(routes)
    for connection in connections:
        assert table.match(connection) == reference(routes, connection)


# --- TLS layers ---------------------------------------------------------------------------------


def test_tls_blocks_decide_which_layer_a_route_serves() -> None:
    plain, passthrough, terminate = build([R("plain"), R("pass"), R("term")])
    passthrough = dataclasses.replace(passthrough, tls=TlsSettings("passthrough"), priority=2)
    terminate = dataclasses.replace(terminate, tls=TlsSettings("terminate", "auto"), priority=1)
    table = RouteTable([plain, passthrough, terminate])
    client = parse_ip("203.0.113.9")

    def winner(**kw: Any) -> str | None:
        found = table.match(ConnectionFacts(port=443, client_ip=client, **kw))
        return None if found is None else found.route.name

    assert winner() == "plain"  # not TLS: routes with a tls block never take it
    assert winner(is_tls=True) == "pass"  # TLS: every route may, priority decides
    assert winner(is_tls=True, terminated=True) == "term"  # inside a terminated session
    only_tls = RouteTable([passthrough, terminate])
    assert only_tls.match(ConnectionFacts(port=443, client_ip=client)) is None


class Gate:
    """Stands in for a route's target group: ``up`` while some target is."""

    def __init__(self) -> None:
        self.up = True


def test_a_route_whose_gate_is_down_is_passed_over_for_the_next_match() -> None:
    routes = build(
        [
            R("primary", domains=["app.example.com"], priority=10),
            R("fallback", domains=["*.example.com"]),
            R("other", domains=["other.test"]),
        ]
    )
    gate = Gate()
    down: dict[int, Gate] = {}
    gates = {id(routes[0].action): gate}
    table = RouteTable(routes, gates, down)
    app = facts(domain="app.example.com")
    assert winner(table.match(app)) == "primary"
    gate.up, down[0] = False, gate
    assert winner(table.match(app)) == "fallback"
    # With no other route left, the route that is down is the answer (the caller says 503).
    alone = RouteTable(routes[:1], gates, down)
    assert winner(alone.match(app)) == "primary"
    assert alone.match(facts(domain="other.test")) is None  # no route at all: still none
    gate.up = True
    del down[0]
    assert winner(table.match(app)) == "primary"


def winner(found: RouteMatch | None) -> str | None:
    return None if found is None else found.route.name
