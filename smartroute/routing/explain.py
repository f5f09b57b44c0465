"""Why a route wins, why the others lose, and which routes can never win.

Pure and synchronous, like the matcher whose decisions it explains. :func:`explain` evaluates
every route of a port on its own (a second opinion: its winner is the matcher's, which the
tests check against random route sets) and says, for each route that lost, which condition
failed or what ranked it after the winner. Which routes can never win is
:mod:`smartroute.routing.shadowing`'s.

A TLS connection the proxy terminates is routed twice: by its SNI when it arrives, then each
HTTP request inside it by Host and path (only routes that terminate TLS apply there).
:func:`explain_connection` explains both layers; :func:`explain` explains one set of facts.
Both assume every target up and every hook silent: they say which route takes the connection,
and in notes which one would take it while the winner's targets are down or its hook declines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from smartroute.errors import HttpParseError
from smartroute.protocols.http import header_map, split_host
from smartroute.protocols.paths import normalize_path
from smartroute.routing.facts import ConnectionFacts, RouteMatch
from smartroute.routing.matcher import Key, domain_rank, path_rank, winner_key
from smartroute.routing.model import CompiledRoute, ForwardAction, MatchCriteria
from smartroute.routing.patterns import (
    DomainPattern,
    HeaderRule,
    normalize_host,
    parse_ip,
)

__all__ = [
    "Candidate",
    "Explanation",
    "explain",
    "explain_connection",
    "can_decline",
    "facts_for",
]

# What a route's `tls` block asks of the connection, as the matcher reads it: nothing (plain
# and TLS connections, never inside a terminated session), a TLS connection (passthrough), or
# a TLS connection, also inside the session once terminated.
_ANY, _TLS, _TERMINATED = 0, 1, 2
# The layers each kind accepts: "plain" (not TLS), "outer" (a TLS connection by its SNI),
# "inner" (a request inside a terminated session).
_ACCEPTS = {_ANY: {"plain", "outer"}, _TLS: {"outer"}, _TERMINATED: {"outer", "inner"}}
_DOMAIN_CLASSES = ("exact", "wildcard", "none")
# Ordering key, smallest first: (-priority, domain class, -suffix length, path rank,
# protocol rank, index), the matcher's with its path rank split in two.


# -- facts -------------------------------------------------------------------------------------


def facts_for(
    port: int,
    sni: str | None = None,
    host: str | None = None,
    path: str | None = None,
    client_ip: str = "203.0.113.1",
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    protocol: str | None = None,
    tls_version: str | None = None,
    alpn: Iterable[str] = (),
) -> ConnectionFacts:
    """The facts the engine would match for a connection described by plain values,
    normalised as the engine normalises them; ``ValueError`` names a bad input.

    With ``sni`` (or ``tls_version``, ``alpn``, ``protocol="tls"``) the connection is TLS;
    with ``host``, ``path`` or ``headers`` it is an HTTP request (path ``/`` unless given);
    with both, it is a request inside a TLS session the proxy terminated, matched by Host
    (else SNI) and path. ``protocol`` is what the first bytes are; it defaults to ``"tls"`` or
    ``"http"`` accordingly and must agree with them.
    """
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is not a port (1-65535)")
    try:
        address = parse_ip(client_ip)
    except ValueError:
        raise ValueError(f"client IP {client_ip!r} is not an IP address") from None
    offered = tuple(alpn)
    tls = sni is not None or tls_version is not None or bool(offered) or protocol == "tls"
    http = host is not None or path is not None or headers is not None
    wanted = "tls" if tls else "http" if http else None
    if protocol is not None and wanted is not None and protocol != wanted:
        raise ValueError(f"protocol {protocol!r} contradicts the other inputs ({wanted})")
    domain = normalize_host(sni) if sni is not None else None
    if not http:
        if tls:
            return ConnectionFacts(
                port, address, domain, True, tls_version, offered, protocol="tls"
            )
        return ConnectionFacts(port, address, protocol=protocol)
    name = None
    try:
        if host is not None:
            name = split_host(host)[0]
        normal = normalize_path((path or "/").partition("?")[0])
    except HttpParseError as exc:
        raise ValueError(str(exc)) from None
    if not normal.startswith("/"):
        raise ValueError(f"path {path!r} must start with '/'")
    pairs = headers.items() if isinstance(headers, Mapping) else headers or ()
    fields = header_map(pairs)
    if not tls:
        return ConnectionFacts(port, address, name, path=normal, headers=fields, protocol="http")
    return ConnectionFacts(
        port,
        address,
        name or domain,
        is_tls=True,
        tls_version=tls_version,
        alpn=offered,
        path=normal,
        headers=fields,
        terminated=True,
        protocol="tls",
    )


# -- one route against the facts ---------------------------------------------------------------


def _layer(route: CompiledRoute) -> int:
    tls = route.tls
    return _ANY if tls is None else _TLS if tls.mode == "passthrough" else _TERMINATED


def _best_pattern(criteria: MatchCriteria, domain: str | None) -> DomainPattern | None:
    """The most specific of the route's domain patterns that matches ``domain`` (None when
    none does, or the route has no domains)."""
    if domain is None:
        return None
    matching = [p for p in criteria.domains if p.matches(domain)]
    return min(matching, key=domain_rank, default=None)


def _listing(items: Iterable[str]) -> str:
    return ", ".join(items) or "-"


def _misses(route: CompiledRoute, facts: ConnectionFacts) -> list[str]:
    """Every condition of ``route`` that ``facts`` fail, in words (empty: it matches)."""
    criteria = route.match
    out: list[str] = []
    if not route.enabled:
        out.append("disabled")
    if facts.port not in criteria.ports:
        out.append(f"port: {facts.port} is not one of its ports")
    layer = _layer(route)
    if facts.terminated and layer != _TERMINATED:
        out.append("tls: inside a terminated TLS session only routes that terminate TLS apply")
    elif not facts.terminated and layer != _ANY and not facts.is_tls:
        assert route.tls is not None
        out.append(f"tls: its tls block ({route.tls.mode}) needs a TLS connection")
    if criteria.domains and _best_pattern(criteria, facts.domain) is None:
        wanted = _listing(p.text for p in criteria.domains)
        given = "no name given (SNI or Host)" if facts.domain is None else facts.domain
        out.append(f"domains: {given}, not {wanted}")
    rules = criteria.client_ip
    if rules and not any(rule.matches(facts.client_ip) for rule in rules):
        out.append(f"client_ip: {facts.client_ip} is not in {_listing(r.text for r in rules)}")
    if criteria.tls_version and facts.tls_version not in criteria.tls_version:
        given = facts.tls_version or "no TLS version given"
        out.append(f"tls_version: {given}, not {_listing(sorted(criteria.tls_version))}")
    if criteria.alpn and criteria.alpn.isdisjoint(facts.alpn):
        given = f"offered {_listing(facts.alpn)}" if facts.alpn else "no ALPN offered"
        out.append(f"alpn: {given}, it needs one of {_listing(sorted(criteria.alpn))}")
    for rule in criteria.headers:
        if not _header_holds(rule, facts.headers):
            out.append(_header_miss(rule, facts.headers))
    if criteria.path is not None:
        if facts.path is None:
            out.append(f"path: no path (not an HTTP request), it needs {criteria.path.text}")
        elif criteria.path.match(facts.path) is None:
            out.append(f"path: {facts.path} does not match {criteria.path.text}")
    if criteria.protocols and facts.protocol not in criteria.protocols:
        given = facts.protocol or "no protocol named"
        out.append(f"protocol: {given}, not {_listing(sorted(criteria.protocols))}")
    return out


def _header_holds(rule: HeaderRule, headers: Mapping[str, str] | None) -> bool:
    return headers is not None and rule.matches(headers)


def _header_miss(rule: HeaderRule, headers: Mapping[str, str] | None) -> str:
    wanted = f"{rule.name}: {rule.value}"
    if headers is None:
        return f"headers: no headers (not an HTTP request), it needs {wanted}"
    got = headers.get(rule.name)
    if got is None:
        return f"headers: no {rule.name} header, it needs {wanted}"
    return f"headers: {rule.name} is {got!r}, it needs {rule.value!r}"


def _key(route: CompiledRoute, facts: ConnectionFacts) -> tuple[Key, DomainPattern | None]:
    """The ordering key of a route that matches ``facts``, and the domain pattern it used."""
    pattern = _best_pattern(route.match, facts.domain)
    return winner_key(route, pattern), pattern


def _domain_words(pattern: DomainPattern | None) -> str:
    if pattern is None:
        return "no domain condition"
    return f"{'exact' if pattern.exact else 'wildcard'} {pattern.text}"


def _lost(
    route: CompiledRoute,
    key: Key,
    pattern: DomainPattern | None,
    winner: CompiledRoute,
    best: Key,
    best_pattern: DomainPattern | None,
) -> str:
    """Why a matching route ranks after the winner: the first part of the key that differs."""
    if key[0] != best[0]:
        return f"lower priority ({route.priority} < {winner.priority})"
    if key[1:3] != best[1:3]:
        return (
            f"less specific domain ({_domain_words(pattern)}; "
            f"the winner's: {_domain_words(best_pattern)})"
        )
    if path_rank(route.match.path) != path_rank(winner.match.path):
        mine = route.match.path.text if route.match.path else "no path condition"
        assert winner.match.path is not None
        return f"less specific path ({mine}; the winner's: {winner.match.path.text})"
    if key[3] != best[3]:
        names = _listing(sorted(winner.match.protocols))
        return f"does not name a protocol (the winner names {names})"
    return f"later in definition order (#{route.index} after #{winner.index})"


# -- explanations ------------------------------------------------------------------------------


class Candidate(NamedTuple):
    """A route of the port other than the winner: did it match, and why it did not win."""

    route: str
    matched: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Explanation:
    """Which route takes ``facts`` (``winner``, as the matcher answers) and why every other
    route of the port does not (``candidates``: the matching ones in rank order, then the
    others in definition order). ``inner`` explains the request inside a TLS session the
    winner terminates (see :func:`explain_connection`)."""

    facts: ConnectionFacts
    winner: RouteMatch | None
    why: str  # what the winner won by
    candidates: list[Candidate]
    notes: tuple[str, ...] = ()
    inner: Explanation | None = None

    @property
    def final(self) -> RouteMatch | None:
        """The route that serves the request in the end (the inner layer's, if explained)."""
        return self.inner.final if self.inner is not None else self.winner

    def to_dict(self) -> dict[str, Any]:
        facts = self.facts
        winner = self.winner
        return {
            "layer": _layer_name(facts),
            "facts": {
                "port": facts.port,
                "client_ip": str(facts.client_ip),
                "domain": facts.domain,
                "is_tls": facts.is_tls,
                "terminated": facts.terminated,
                "tls_version": facts.tls_version,
                "alpn": list(facts.alpn),
                "path": facts.path,
                "headers": None if facts.headers is None else dict(facts.headers),
                "protocol": facts.protocol,
            },
            "winner": None if winner is None else winner.route.name,
            "params": {} if winner is None else dict(winner.params),
            "why": self.why,
            "candidates": [c._asdict() for c in self.candidates],
            "notes": list(self.notes),
            "inner": None if self.inner is None else self.inner.to_dict(),
        }

    def text(self) -> list[str]:
        """The explanation as lines a person reads."""
        lines = [_describe(self.facts)]
        if self.winner is None:
            lines.append("  winner: none")
        else:
            params = dict(self.winner.params)
            extra = f" params={params}" if params else ""
            lines.append(f"  winner: {self.winner.route.name} ({self.why}){extra}")
        width = max((len(c.route) for c in self.candidates), default=0)
        for candidate in self.candidates:
            state = "matched, ranks after:" if candidate.matched else "no match:"
            lines.append(f"  {candidate.route:<{width}}  {state} {candidate.reason}")
        lines += [f"  note: {note}" for note in self.notes]
        if self.inner is not None:
            lines += self.inner.text()
        return lines


def _layer_name(facts: ConnectionFacts) -> str:
    if facts.terminated:
        return "request inside TLS"
    if facts.is_tls:
        return "TLS connection"
    return "HTTP request" if facts.path is not None else "connection"


def _describe(facts: ConnectionFacts) -> str:
    """``TLS connection on port 443 from 203.0.113.1: SNI a.test, TLSv1.3``."""
    bits: list[str] = []
    if facts.is_tls and not facts.terminated:
        bits.append(f"SNI {facts.domain or '(none)'}")
    elif facts.path is not None:
        bits += [f"Host {facts.domain or '(none)'}", f"path {facts.path}"]
        bits += [f"{name}: {value}" for name, value in (facts.headers or {}).items()]
    elif facts.protocol is not None:
        bits.append(f"protocol {facts.protocol}")
    if facts.tls_version and not facts.terminated:
        bits.append(facts.tls_version)
    if facts.alpn and not facts.terminated:
        bits.append(f"ALPN {_listing(facts.alpn)}")
    what = f"{_layer_name(facts)} on port {facts.port} from {facts.client_ip}"
    return what + (": " + ", ".join(bits) if bits else "")


def explain(
    routes: Sequence[CompiledRoute],
    facts: ConnectionFacts,
    hooked: Callable[[CompiledRoute], bool] | None = None,
) -> Explanation:
    """Explain the match of ``facts``: the winner and, for every other route on the port,
    why it lost. ``hooked``: True for routes that proxy-wide hooks or plugins apply to (a
    route's own hooks are seen without it), for the note on a hook's fallback."""
    on_port = [r for r in routes if facts.port in r.match.ports]
    matched: list[tuple[Key, DomainPattern | None, CompiledRoute]] = []
    missed: list[Candidate] = []
    for route in sorted(on_port, key=lambda r: r.index):
        misses = _misses(route, facts)
        if misses:
            missed.append(Candidate(route.name, False, "; ".join(misses)))
        else:
            key, pattern = _key(route, facts)
            matched.append((key, pattern, route))
    notes: list[str] = []
    if not on_port:
        notes.append(f"no route uses port {facts.port}")
    if not matched:
        return Explanation(facts, None, "", missed, tuple(notes))
    matched.sort(key=lambda entry: entry[0])
    best, best_pattern, winner = matched[0]
    assert winner.match.path is None or facts.path is not None
    params = {} if winner.match.path is None else winner.match.path.match(facts.path or "")
    found = RouteMatch(winner, params or {})
    lost = [
        Candidate(route.name, True, _lost(route, key, pattern, winner, best, best_pattern))
        for key, pattern, route in matched[1:]
    ]
    after = matched[1][2].name if len(matched) > 1 else None
    if _may_go_down(winner, _watched_targets(routes)):
        notes.append(
            f"while none of {winner.name}'s targets is up, "
            + (f"{after} takes it" if after else "no route does (HTTP 503, else closed)")
        )
    if _declines(winner, hooked):
        notes.append(
            f"if a hook of {winner.name} declines (fallback), "
            + (f"{after} takes it" if after else "no route does")
        )
    return Explanation(facts, found, _won(winner, best_pattern), lost + missed, tuple(notes))


def _won(route: CompiledRoute, pattern: DomainPattern | None) -> str:
    bits = [f"priority {route.priority}", _domain_words(pattern)]
    if route.match.path is not None:
        bits.append(f"path {route.match.path.text}")
    if route.match.protocols:
        bits.append(f"protocol {_listing(sorted(route.match.protocols))}")
    bits.append(f"definition #{route.index}")
    return ", ".join(bits)


def explain_connection(
    routes: Sequence[CompiledRoute],
    port: int,
    *,
    sni: str | None = None,
    host: str | None = None,
    path: str | None = None,
    client_ip: str = "203.0.113.1",
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    protocol: str | None = None,
    tls_version: str | None = None,
    alpn: Iterable[str] = (),
    hooked: Callable[[CompiledRoute], bool] | None = None,
) -> Explanation:
    """Explain a connection described by plain values (see :func:`facts_for`), layer by
    layer: a TLS connection by its SNI; when its winner terminates TLS and a request is
    described (host, path or headers), that request inside the session too (``inner``)."""
    offered = tuple(alpn)
    inputs: dict[str, Any] = {"client_ip": client_ip, "tls_version": tls_version}
    outer = facts_for(port, sni=sni, protocol=protocol, alpn=offered, **inputs)
    if not outer.is_tls:  # plain: one layer
        request = facts_for(port, None, host, path, client_ip, headers, protocol)
        return explain(routes, request, hooked)
    first = explain(routes, outer, hooked)
    if host is None and path is None and headers is None:
        return first
    request = facts_for(port, sni, host, path, client_ip, headers, "tls", tls_version, offered)
    if first.winner is not None and first.winner.route.terminates_tls:
        return replace(first, inner=explain(routes, request, hooked))
    name = first.winner.route.name if first.winner is not None else "no route"
    unread = f"the request (host, path, headers) is not read: {name} does not terminate TLS"
    return replace(first, notes=(*first.notes, unread))


# -- hooks and gates ---------------------------------------------------------------------------


def can_decline(hooks: Iterable[object]) -> bool:
    """True when one of ``hooks`` may answer ``fallback`` (it has ``on_connect`` or
    ``on_request``): the route may then pass a connection on to the next matching route."""
    return any(
        getattr(hook, "on_connect", None) is not None
        or getattr(hook, "on_request", None) is not None
        for hook in hooks
    )


def _declines(route: CompiledRoute, hooked: Callable[[CompiledRoute], bool] | None) -> bool:
    return can_decline(route.hooks) or (hooked is not None and hooked(route))


def _watched_targets(routes: Iterable[CompiledRoute]) -> set[tuple[str, int]]:
    """``(host, port)`` of every fixed target some route checks (active or passive health):
    only those can ever be down (a target's health is shared by every route listing it)."""
    watched: set[tuple[str, int]] = set()
    for route in routes:
        action = route.action
        if isinstance(action, ForwardAction) and (action.health_check or action.passive_health):
            for target in action.targets:
                if isinstance(target.host, tuple) and isinstance(target.port, int):
                    watched.update((host, target.port) for host in target.host)
    return watched


def _may_go_down(route: CompiledRoute, watched: set[tuple[str, int]]) -> bool:
    """True when the route can stop matching because none of its targets is up: a forward
    whose targets are all fixed (it has a target group) and one of them is watched."""
    action = route.action
    if not isinstance(action, ForwardAction):
        return False
    fixed: list[tuple[str, int]] = []
    for target in action.targets:
        if not isinstance(target.host, tuple) or not isinstance(target.port, int):
            return False  # resolved per connection: no group, never down
        fixed += [(host, target.port) for host in target.host]
    return any(pair in watched for pair in fixed)
