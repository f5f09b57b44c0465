"""The ``match`` block of a route: ports and port ranges, TLS versions, headers."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping

from smartroute.errors import ConfigError
from smartroute.routing import schema
from smartroute.routing.model import TLS_VERSIONS, CompiledRoute, MatchCriteria
from smartroute.routing.patterns import HeaderRule
from smartroute.routing.validation._fields import (
    LISTS,
    MATCH_KEYS,
    RANGE_KEYS,
    check_keys,
    domain,
    expect_port,
    expect_strings,
    expect_text,
    got,
    header_rule,
    ip_rule,
    mapping,
    path_pattern,
    require,
    unknown,
)

_TLS_ALIASES = {"TLSv1.0": "TLSv1"}
_PORT_RANGE = re.compile(r"([0-9]{1,6}) *- *([0-9]{1,6})")


def _port_span(value: object, path: str, *, top: bool = False) -> range:
    """One port, a "from-to" string or a {"from", "to"} mapping, as a range."""
    if isinstance(value, int) and not isinstance(value, bool):
        port = expect_port(value, path)
        return range(port, port + 1)
    if isinstance(value, str):
        found = _PORT_RANGE.fullmatch(value.strip())
        if found is None:
            hint = (
                f"write a single port as an int: {value}"
                if value.strip().isdigit()
                else 'expected "from-to" such as "9000-9005"'
            )
            raise ConfigError(path, f"{value!r} is not a port range ({hint})")
        low, high = expect_port(int(found[1]), path), expect_port(int(found[2]), path)
    elif isinstance(value, Mapping):
        check_keys(value, RANGE_KEYS, path)
        require(value, path, "from", "to")
        low, high = (
            expect_port(value["from"], f"{path}.from"),
            expect_port(value["to"], f"{path}.to"),
        )
    else:
        several = " or a list of them" if top else ""
        raise ConfigError(
            path,
            f'expected a port, a "from-to" range string, {{"from": a, "to": b}}{several}, '
            f"got {got(value)}",
        )
    if low > high:
        raise ConfigError(path, f"{low}-{high} is a backwards range (from must be <= to)")
    return range(low, high + 1)


def _ports(value: object, path: str) -> frozenset[int]:
    if type(value) is int and 1 <= value <= 65535:  # the common case, fast
        return frozenset((value,))
    if not isinstance(value, LISTS):
        return frozenset(_port_span(value, path, top=True))
    if not value:
        raise ConfigError(path, "empty list (give at least one port)")
    ports: set[int] = set()
    for i, item in enumerate(value):
        ports.update(_port_span(item, f"{path}[{i}]"))
    return frozenset(ports)


def _tls_version(text: str, path: str) -> str:
    name = _TLS_ALIASES.get(text, text)
    if name not in TLS_VERSIONS:
        raise ConfigError(path, unknown("TLS version", text, TLS_VERSIONS))
    return name


def _headers(value: object, path: str) -> tuple[HeaderRule, ...]:
    raw = mapping(value, path)
    if not raw:
        raise ConfigError(path, "empty mapping (use None or omit it)")
    rules: list[HeaderRule] = []
    for name, want in raw.items():
        if not isinstance(name, str):
            raise ConfigError(path, f"expected str header names, got {got(name)}")
        if not isinstance(want, str):
            raise ConfigError(f"{path}[{name!r}]", f"expected a str, got {got(want)}")
        try:
            rules.append(header_rule(name, want))
        except ValueError as exc:
            raise ConfigError(f"{path}[{name!r}]", str(exc)) from None
    return tuple(rules)


def compile_match(value: object, path: str, route: str) -> MatchCriteria:
    raw = mapping(value, path, schema.Match)
    check_keys(raw, MATCH_KEYS, path, "match", route)
    require(raw, path, "ports")
    get = raw.get
    domains = get("domains")
    url_path = get("path")
    client_ip = get("client_ip")
    versions = get("tls_version")
    alpn = get("alpn")
    headers = get("headers")
    protocol = get("protocol")
    return MatchCriteria(
        ports=_ports(raw["ports"], f"{path}.ports"),
        domains=() if domains is None else expect_strings(domains, f"{path}.domains", domain),
        path=None
        if url_path is None
        else path_pattern(expect_text(url_path, f"{path}.path"), f"{path}.path"),
        client_ip=()
        if client_ip is None
        else expect_strings(client_ip, f"{path}.client_ip", ip_rule),
        tls_version=frozenset(
            ()
            if versions is None
            else expect_strings(versions, f"{path}.tls_version", _tls_version)
        ),
        alpn=frozenset(() if alpn is None else expect_strings(alpn, f"{path}.alpn", expect_text)),
        headers=() if headers is None else _headers(headers, f"{path}.headers"),
        protocols=frozenset(
            () if protocol is None else expect_strings(protocol, f"{path}.protocol", expect_text)
        ),
    )


def check_protocols(
    routes: Iterable[CompiledRoute], known: Collection[str], path: str = "routes"
) -> None:
    """Every ``match.protocol`` names a probe (built in or given in ``protocols``)."""
    for i, route in enumerate(routes):
        for name in sorted(route.match.protocols):
            if name not in known:
                where = (
                    f"{path}[{i}].match.protocol" if path == "routes" else f"{path}.match.protocol"
                )
                raise ConfigError(where, unknown("protocol", name, sorted(known)))
