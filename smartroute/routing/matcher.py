"""Route matching: pick the winning route for what is known about a connection.

Pure and synchronous. :class:`RouteTable` indexes the enabled routes once: by port, then by exact
domain (a dict), wildcard suffix (a dict walked with the connection domain's label suffixes, ``*``
under the empty suffix) and "no domain". Every bucket is pre-sorted by the winner ordering, so a
match looks at a handful of buckets and stops at the first full match in each. A bucket of more
than a few routes (many paths under one domain, say) is indexed in turn by its routes' paths and
exact header values (:class:`_IndexedBucket`), so only the routes that can match the request's
path and headers are checked: a match costs about the same with 10 routes or 10,000.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from operator import itemgetter
from typing import Protocol, TypeAlias, cast

from smartroute.routing.facts import (
    NO_PARAMS,
    ConnectionFacts,
    RouteMatch,
    conditions,
    has_conditions,
)
from smartroute.routing.model import (
    CompiledRoute,
    MatchCriteria,
    Timeouts,
    needs_http,
    speaks_http,
)
from smartroute.routing.patterns import DomainPattern, PathPattern

# The winner ordering, smallest first:
# (-priority, domain class, -wildcard suffix length, path rank, definition index).
# "*" is a wildcard with an empty suffix: after every other wildcard, before "no domain".
Key: TypeAlias = tuple[int, int, int, int, int]
# A bucket entry: the key, the answer when the route wins without path params (built once, so
# that most matches allocate nothing), and the criteria left to check once port and domain are
# known (None when there are none).
# (ordering key, answer, conditions to check or None, TLS layer the route needs, gate or None)
_Entry: TypeAlias = tuple[Key, "RouteMatch", MatchCriteria | None, int, "Gate | None"]
_Found: TypeAlias = tuple[Key, "RouteMatch"]

_EXACT, _WILDCARD, _NO_DOMAIN = 0, 1, 2
# What a route's `tls` block asks of the connection: nothing, a TLS connection (passthrough),
# or a TLS connection the proxy terminates.
_ANY_LAYER, _TLS, _TERMINATED = 0, 1, 2
_by_key = itemgetter(0)


class Gate(Protocol):
    """What can take a route out of matching: its targets' group, down while none is up."""

    up: bool


def path_rank(path: PathPattern | None) -> int:
    """Exact paths first, then a longer literal path prefix first, then no path at all.

    An exact path that matches equals the request path, so no pattern can be more specific
    (``/api`` beats ``/api/*`` for the request ``/api``).
    """
    if path is None:
        return 0
    return -(1 << 20) if path.kind == "exact" else -1 - len(path.literal_prefix)


def specificity(criteria: MatchCriteria) -> int:
    """The path's rank, then a route that names protocols before one that takes any."""
    return 2 * path_rank(criteria.path) - (1 if criteria.protocols else 0)


def domain_rank(pattern: DomainPattern | None) -> tuple[int, int]:
    """(class, -suffix length) of the domain pattern that matched (None: a route without
    domains): exact names first, then longer wildcard suffixes, ``*``, no domain."""
    if pattern is None:
        return _NO_DOMAIN, 0
    return (_EXACT, 0) if pattern.exact else (_WILDCARD, -len(pattern.suffix))


def winner_key(route: CompiledRoute, pattern: DomainPattern | None) -> Key:
    """Where ``route`` stands in the winner ordering (smallest wins) when ``pattern`` matched:
    priority, domain, path and protocols, definition order."""
    return (-route.priority, *domain_rank(pattern), specificity(route.match), route.index)


def _first(
    bucket: list[_Entry] | _IndexedBucket, facts: ConnectionFacts, bound: Key | None, live: bool
) -> _Found | None:
    """The first full match in a sorted bucket, if it orders before ``bound``; ``live``: skip
    the routes whose gate is down."""
    if isinstance(bucket, _IndexedBucket):
        bucket = bucket.candidates(facts)
    terminated = facts.terminated
    for key, found, criteria, layer, gate in bucket:
        if bound is not None and key >= bound:
            return None
        if live and gate is not None and not gate.up:
            continue
        # Inside a terminated session only terminating routes apply; outside, a route with a
        # `tls` block needs a TLS connection and a route without one takes any connection.
        if (layer != _TERMINATED) if terminated else (layer and not facts.is_tls):
            continue
        if criteria is None:
            return key, found
        params = conditions(criteria, facts)
        if params is not None:
            return key, (RouteMatch(found.route, params) if params else found)
    return None


# A bucket longer than this is indexed by path and header values; a shorter one is scanned.
INDEX_THRESHOLD = 8


class _IndexedBucket:
    """A long bucket, its entries found by the request's path and headers.

    Each entry is filed once, under the most selective condition that a lookup can find: its
    exact path, the folder part of its path pattern's literal prefix (``/api/v1/`` for
    ``/api/v1/users/*``; a pattern ending in ``/*`` also under its bare prefix, which it
    matches too), or its first exact header value; the rest (no path, a path pattern with no
    folder to file it under, only glob header values) are always candidates. A lookup gathers
    the entries filed under the request's path, each folder of it and each of its header
    values, in winner order: the same entries, in the same order, that a scan would reach,
    less the ones that cannot match.
    """

    __slots__ = ("floor", "always", "exact", "folders", "headers")

    def __init__(self, bucket: list[_Entry]) -> None:
        self.floor = bucket[0][0]  # the best key in the bucket
        self.always: list[_Entry] = []
        self.exact: dict[str, list[_Entry]] = {}
        self.folders: dict[str, list[_Entry]] = {}
        self.headers: dict[tuple[str, str], list[_Entry]] = {}
        for entry in bucket:  # sorted: every list below stays sorted
            criteria = entry[2]
            path = criteria.path if criteria is not None else None
            if path is not None and path.kind == "exact":
                self.exact.setdefault(path.text, []).append(entry)
            elif path is not None:
                prefix = path.literal_prefix
                self.folders.setdefault(prefix[: prefix.rfind("/") + 1], []).append(entry)
                if path.text.endswith("/*") and len(path.text) > 2:
                    self.exact.setdefault(path.text[:-2], []).append(entry)
            elif criteria is not None and (
                rule := next((r for r in criteria.headers if r.regex is None), None)
            ):
                self.headers.setdefault((rule.name, rule.value), []).append(entry)
            else:
                self.always.append(entry)

    def candidates(self, facts: ConnectionFacts) -> list[_Entry]:
        """The entries that may match ``facts``, in winner order."""
        found: list[_Entry] = []
        path = facts.path
        if path is not None:
            hit = self.exact.get(path)
            if hit is not None:
                found += hit
            folders = self.folders
            if folders:
                end = path.find("/")
                while end >= 0:
                    hit = folders.get(path[: end + 1])
                    if hit is not None:
                        found += hit
                    end = path.find("/", end + 1)
        headers = facts.headers
        if headers and self.headers:
            by_value = self.headers
            for pair in headers.items():
                hit = by_value.get(pair)
                if hit is not None:
                    found += hit
        if not found:
            return self.always
        found += self.always
        found.sort(key=_by_key)
        return found


class _PortIndex:
    """The buckets of one port."""

    __slots__ = (
        "exact",
        "wildcard",
        "wildcard_floor",
        "no_domain",
        "no_domain_floor",
        "routes",
        "needs_data",
        "probing",
        "serves_http",
        "waits",
    )

    def __init__(self) -> None:
        self.exact: dict[str, list[_Entry] | _IndexedBucket] = {}
        self.wildcard: dict[str, list[_Entry] | _IndexedBucket] = {}  # "*": the empty suffix
        self.wildcard_floor: Key | None = None  # the best key of any wildcard entry
        self.no_domain: list[_Entry] | _IndexedBucket = []
        self.no_domain_floor: Key | None = None
        self.routes: list[tuple[Key, CompiledRoute]] = []  # best-case key, for ordered()
        self.needs_data = False
        self.probing = False  # some route on the port matches on protocol: run the probes
        self.serves_http = False  # some route on the port only makes sense on HTTP
        # (initial data, HTTP header) timeouts before the route is known: the most patient
        # route on the port sets them; None when no route carries its effective timeouts.
        self.waits: tuple[float, float] | None = None

    def add_waits(self, timeouts: Timeouts) -> None:
        if self.waits is None:
            self.waits = (timeouts.initial_data, timeouts.http_header)
        else:
            initial, header = self.waits
            self.waits = (max(initial, timeouts.initial_data), max(header, timeouts.http_header))

    def finish(self) -> None:
        for buckets in (self.exact, self.wildcard):
            for name, bucket in buckets.items():
                buckets[name] = _finished(cast(list[_Entry], bucket))
        if self.wildcard:
            self.wildcard_floor = min(_floor(bucket) for bucket in self.wildcard.values())
        no_domain = cast(list[_Entry], self.no_domain)
        if no_domain:
            self.no_domain = _finished(no_domain)
            self.no_domain_floor = _floor(self.no_domain)


def _finished(bucket: list[_Entry]) -> list[_Entry] | _IndexedBucket:
    """``bucket`` sorted in winner order, and indexed when it is long."""
    bucket.sort(key=_by_key)
    return _IndexedBucket(bucket) if len(bucket) > INDEX_THRESHOLD else bucket


def _floor(bucket: list[_Entry] | _IndexedBucket) -> Key:
    """The best key in a finished (non-empty) bucket."""
    return bucket.floor if isinstance(bucket, _IndexedBucket) else bucket[0][0]


class RouteTable:
    """The enabled routes, indexed for matching; disabled routes are ignored entirely."""

    __slots__ = ("_ports", "shortest_limit", "_down")

    def __init__(
        self,
        routes: Sequence[CompiledRoute],
        gates: Mapping[int, Gate] | None = None,
        down: Mapping[int, Gate] | None = None,
    ) -> None:
        """``gates``: by ``id(route.action)``, what takes a route out of matching while it is
        down (its targets' group, see :mod:`smartroute.server.backends`); ``down``: a live
        view of the gates that are down now (empty while every route is up)."""
        ports: dict[int, _PortIndex] = {}
        gates = gates or {}
        shortest: float | None = None  # the shortest idle/half-close/lifetime limit
        for route in routes:
            if not route.enabled:
                continue
            if route.timeouts is not None:
                shortest = route.timeouts.shortest_limit(shortest)
            criteria = route.match
            answer = RouteMatch(route, NO_PARAMS)
            extra = criteria if has_conditions(criteria) else None
            tls = route.tls
            layer = (
                _ANY_LAYER if tls is None else _TLS if tls.mode == "passthrough" else _TERMINATED
            )
            gate = gates.get(id(route.action))
            # One entry per bucket, keyed ("exact" or "wildcard", name): with several domains,
            # the pattern that matched a connection decides the route's specificity.
            entries: dict[tuple[int, str], _Entry] = {}
            for pattern in criteria.domains:
                entry = (winner_key(route, pattern), answer, extra, layer, gate)
                if pattern.exact:
                    entries[_EXACT, pattern.text] = entry
                else:
                    entries[_WILDCARD, pattern.suffix] = entry
            if entries:
                best = min(entries.values(), key=_by_key)[0]
            else:
                best = winner_key(route, None)
            # A route with a tls block only takes TLS connections: the ClientHello must be seen.
            # A route with request hooks must see whether the connection speaks HTTP (else a
            # port-only "auto" forward would pipe it unread and the hooks never run).
            chain = route.chain
            needs_data = (
                criteria.needs_data
                or route.tls is not None
                or (
                    chain is not None
                    and bool(chain.on_request or chain.on_response)
                    and speaks_http(route.action)
                )
            )
            for port in criteria.ports:
                index = ports.get(port)
                if index is None:
                    index = ports[port] = _PortIndex()
                index.routes.append((best, route))
                if route.timeouts is not None:
                    index.add_waits(route.timeouts)
                if needs_data:
                    index.needs_data = True
                if criteria.protocols:
                    index.probing = True
                if needs_http(route.action):
                    index.serves_http = True
                if not entries:
                    cast(list[_Entry], index.no_domain).append((best, answer, extra, layer, gate))
                    continue
                for (kind, name), entry in entries.items():
                    buckets = index.exact if kind == _EXACT else index.wildcard
                    bucket = buckets.get(name)
                    if bucket is None:
                        buckets[name] = [entry]
                    else:
                        cast(list[_Entry], bucket).append(entry)
        for index in ports.values():
            index.finish()
        self._ports = ports
        self.shortest_limit = shortest
        self._down: Mapping[int, Gate] = {} if down is None else down

    @property
    def port_counts(self) -> dict[int, int]:
        """Port -> number of enabled routes using it (a fresh dict)."""
        return {port: len(index.routes) for port, index in self._ports.items()}

    def has_port(self, port: int) -> bool:
        return port in self._ports

    def needs_data(self, port: int) -> bool:
        """True when some route on ``port`` needs the client's first bytes to be matched."""
        index = self._ports.get(port)
        return index is not None and index.needs_data

    def probing(self, port: int) -> bool:
        """True when some route on ``port`` matches on ``protocol`` (the probes must run)."""
        index = self._ports.get(port)
        return index is not None and index.probing

    def serves_http(self, port: int) -> bool:
        """True when some route on ``port`` only makes sense on HTTP (a forward forced to HTTP,
        a redirect, static files)."""
        index = self._ports.get(port)
        return index is not None and index.serves_http

    def waits(self, port: int) -> tuple[float, float] | None:
        """How long to wait for the first bytes and for a first HTTP head on ``port``.

        These waits come before any route is chosen, so the most patient route on the port
        decides; None when the routes carry no effective timeouts (use the settings).
        """
        index = self._ports.get(port)
        return None if index is None else index.waits

    def match(self, facts: ConnectionFacts, live: bool = True) -> RouteMatch | None:
        """The winning route for ``facts``, or None when no route matches.

        A route whose gate is down (no target up) is passed over for the next matching route;
        when no other route matches, it is the answer all the same (``live`` False: the
        second look, made only while some gate is down), so that the caller can tell "no
        target up" (503) from "no route" (404).
        """
        index = self._ports.get(facts.port)
        if index is None:
            return None
        best: _Found | None = None
        domain = facts.domain
        if domain is not None:
            # Most specific buckets first: later ones are then usually skipped by their floor
            # (their best key) or cut short inside _first.
            bucket = index.exact.get(domain)
            if bucket is not None:
                best = _first(bucket, facts, None, live)
            floor = index.wildcard_floor
            if floor is not None and (best is None or floor < best[0]):
                wildcard = index.wildcard
                dot = domain.find(".")
                while True:
                    # Every suffix after a dot, longest first, then "" for the "*" routes.
                    bucket = wildcard.get(domain[dot + 1 :] if dot >= 0 else "")
                    if bucket is not None:
                        found = _first(bucket, facts, None if best is None else best[0], live)
                        if found is not None:
                            best = found
                            # Shorter suffixes come next: only a higher priority could win.
                            if found[0][0] <= floor[0]:
                                break
                    if dot < 0:
                        break
                    dot = domain.find(".", dot + 1)
        floor = index.no_domain_floor
        if floor is not None and (best is None or floor < best[0]):
            found = _first(index.no_domain, facts, None if best is None else best[0], live)
            if found is not None:
                best = found
        if best is None:
            if live and self._down:
                return self.match(facts, False)
            return None
        return best[1]

    def match_without(
        self, facts: ConnectionFacts, declined: Collection[CompiledRoute]
    ) -> RouteMatch | None:
        """The winner for ``facts`` once the ``declined`` routes are out (a hook's fallback):
        each bucket that applies is scanned without them. Slower than :meth:`match`, and only
        for connections and requests a route declined."""
        index = self._ports.get(facts.port)
        if index is None:
            return None
        out = {id(route) for route in declined}
        buckets: list[list[_Entry] | _IndexedBucket] = []
        domain = facts.domain
        if domain is not None:
            exact = index.exact.get(domain)
            if exact is not None:
                buckets.append(exact)
            dot = domain.find(".")
            while True:
                wildcard = index.wildcard.get(domain[dot + 1 :] if dot >= 0 else "")
                if wildcard is not None:
                    buckets.append(wildcard)
                if dot < 0:
                    break
                dot = domain.find(".", dot + 1)
        buckets.append(index.no_domain)
        best: _Found | None = None
        for bucket in buckets:
            entries = bucket.candidates(facts) if isinstance(bucket, _IndexedBucket) else bucket
            kept = [entry for entry in entries if id(entry[1].route) not in out]
            found = _first(kept, facts, None, True)
            if found is not None and (best is None or found[0] < best[0]):
                best = found
        return None if best is None else best[1]

    def ordered(self, port: int) -> list[CompiledRoute]:
        """Every route on ``port`` in match order, each at its most specific domain."""
        index = self._ports.get(port)
        if index is None:
            return []
        return [route for _, route in sorted(index.routes, key=_by_key)]
