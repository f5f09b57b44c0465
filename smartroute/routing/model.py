"""Validated, frozen route objects: what the engine works with after validation.

Users write routes as dicts or as the dataclasses of :mod:`smartroute.routing.schema`;
:mod:`smartroute.routing.validation` turns either into these objects once, at the edge.
The engine never sees a raw dict.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Literal, TypeAlias

from smartroute.context import RouteContext
from smartroute.routing.patterns import DomainPattern, HeaderRule, IpRule, PathPattern

SocketHandler: TypeAlias = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter, RouteContext], Awaitable[None]
]
HostResult: TypeAlias = str | Sequence[str]
HostFunction: TypeAlias = Callable[[RouteContext], HostResult | Awaitable[HostResult]]
PortFunction: TypeAlias = Callable[[RouteContext], int | Awaitable[int]]

TlsMode: TypeAlias = Literal["passthrough", "terminate", "terminate-and-reencrypt"]
ClientAuth: TypeAlias = Literal["required", "optional"]
ForwardProtocol: TypeAlias = Literal["auto", "tcp", "http"]
Strategy: TypeAlias = Literal["round-robin", "least-connections", "ip-hash", "random", "first"]
STRATEGIES: tuple[Strategy, ...] = (
    "round-robin",
    "least-connections",
    "ip-hash",
    "random",
    "first",
)
MAX_WEIGHT = 256
TLS_VERSIONS: tuple[str, ...] = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
REDIRECT_STATUSES: frozenset[int] = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True, slots=True)
class MatchCriteria:
    """Every condition of a route; empty tuples/sets and ``None`` mean "any"."""

    ports: frozenset[int]
    domains: tuple[DomainPattern, ...] = ()
    path: PathPattern | None = None
    client_ip: tuple[IpRule, ...] = ()
    tls_version: frozenset[str] = frozenset()
    alpn: frozenset[str] = frozenset()
    headers: tuple[HeaderRule, ...] = ()
    protocols: frozenset[str] = frozenset()  # names of probes (protocols/probes.py)

    @property
    def needs_data(self) -> bool:
        """True when matching needs the client's first bytes (SNI, Host, path, ...)."""
        return bool(
            self.domains
            or self.path
            or self.tls_version
            or self.alpn
            or self.headers
            or self.protocols
        )


@dataclass(frozen=True, slots=True)
class TargetSpec:
    """One forward target; ``host`` is a tuple of hosts (round-robin) or a callable."""

    host: tuple[str, ...] | HostFunction
    port: int | Literal["preserve"] | PortFunction
    send_proxy_protocol: Literal["v1", "v2"] | None = None  # tell the target who the client is
    weight: int = 1  # 1-256: its share under weighted round-robin and random
    backup: bool = False  # takes traffic only while no primary target is up
    initial: Literal["up", "down"] = "up"  # "down": no traffic before a health check passes

    @property
    def fixed(self) -> bool:
        """True when host and port are known without a connection (no callable, no
        ``"preserve"``): such a target has a health state of its own."""
        return not callable(self.host) and isinstance(self.port, int)


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Active health checks of a route's targets: a TCP connect, or an HTTP request whose
    status must fall in ``expect_status`` (inclusive)."""

    type: Literal["tcp", "http"] = "tcp"
    interval: float = 5.0
    timeout: float = 2.0
    rise: int = 2  # passes in a row that bring a target back
    fall: int = 3  # failures in a row that take it out
    path: str = "/"
    expect_status: tuple[int, int] = (200, 399)
    host: str | None = None  # the Host header (default: the target's host)


@dataclass(frozen=True, slots=True)
class PassiveHealth:
    """``max_fails`` failures of real traffic within ``fail_timeout`` seconds take a target
    out for ``fail_timeout`` seconds."""

    max_fails: int = 3
    fail_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Another target for a connection or request that failed before the client got a byte:
    up to ``attempts`` tries in all, waiting ``backoff`` x 2^n (at most ``max_backoff``,
    give or take ``jitter`` as a fraction) between them. A request that went to a backend is
    tried again only if its method is idempotent (or ``any_method``) and its body, if any, was
    held whole."""

    attempts: int = 3
    backoff: float = 0.05
    max_backoff: float = 1.0
    jitter: float = 0.2
    any_method: bool = False


@dataclass(frozen=True, slots=True)
class CertificatePair:
    """A certificate chain and its private key as PEM text, with the files they came from."""

    cert_pem: str
    key_pem: str = field(repr=False)  # never in logs or error messages
    cert_path: str | None = None
    key_path: str | None = None


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """The ``tls`` block of an action."""

    mode: TlsMode
    certificate: CertificatePair | Literal["auto", "on-demand"] | None = None
    backend_verify: bool = True
    backend_ca: str | None = None  # PEM text
    backend_server_name: str | None = None
    backend_client_certificate: CertificatePair | None = None  # presented to TLS targets
    client_ca: str | None = None  # PEM text: clients must (or may) present a certificate it signed
    client_auth: ClientAuth | None = None  # set exactly when client_ca is


class RoundRobin:
    """A shared counter that hands out positions 0, 1, 2, ... (mutable state of a frozen route)."""

    __slots__ = ("_counter",)

    def __init__(self) -> None:
        self._counter = itertools.count()

    def next(self) -> int:
        return next(self._counter)

    def __repr__(self) -> str:
        return "RoundRobin()"


@dataclass(frozen=True, slots=True)
class ForwardAction:
    targets: tuple[TargetSpec, ...]
    protocol: ForwardProtocol = "auto"
    load_balancing: Strategy = "round-robin"
    health_check: HealthCheck | None = None
    passive_health: PassiveHealth | None = None
    retry: RetryPolicy | None = None
    rotation: RoundRobin = field(default_factory=RoundRobin, compare=False)
    type: Literal["forward"] = "forward"


@dataclass(frozen=True, slots=True)
class RedirectAction:
    to: str
    status: int = 301
    type: Literal["redirect"] = "redirect"


@dataclass(frozen=True, slots=True)
class BlockAction:
    type: Literal["block"] = "block"


@dataclass(frozen=True, slots=True)
class StaticAction:
    """Either files under ``root`` or one inline ``content`` response."""

    root: str | None = None
    index: tuple[str, ...] = ("index.html",)
    content: bytes | None = None
    content_type: str = "text/plain; charset=utf-8"
    status: int = 200
    type: Literal["static"] = "static"


@dataclass(frozen=True, slots=True)
class SocketHandlerAction:
    handler: SocketHandler
    type: Literal["socket-handler"] = "socket-handler"


Action: TypeAlias = (
    ForwardAction | RedirectAction | BlockAction | StaticAction | SocketHandlerAction
)


def speaks_http(action: Action) -> bool:
    """True for actions that work on HTTP requests (a forward only unless forced to TCP)."""
    if isinstance(action, ForwardAction):
        return action.protocol != "tcp"
    return action.type in ("redirect", "static", "block")


def needs_http(action: Action) -> bool:
    """True for actions that only make sense on HTTP requests."""
    if isinstance(action, ForwardAction):
        return action.protocol == "http"
    return action.type in ("redirect", "static")


@dataclass(frozen=True, slots=True)
class Rate:
    """Bytes per second each way (None: no limit that way). Download is backend -> client."""

    download: float | None = None
    upload: float | None = None


@dataclass(frozen=True, slots=True)
class BandwidthPolicy:
    """Speed limits that nest: a connection gets the smallest share of its buckets."""

    per_connection: Rate | None = None
    per_ip: Rate | None = None  # one budget per client IP, per route
    per_route: Rate | None = None  # one budget for all the route's connections


HOOK_METHODS: tuple[str, ...] = (
    "on_connect",
    "on_request",
    "on_response",
    "on_disconnect",
    "on_data",
)
HooksFail: TypeAlias = Literal["closed", "open"]
AsyncHook: TypeAlias = Callable[..., Awaitable[object]]


@dataclass(frozen=True, slots=True)
class Hooks:
    """The hooks in force on a route, by kind, in the order they run (the proxy-wide ones
    first); built when the proxy installs the route (None on a route without any)."""

    on_connect: tuple[AsyncHook, ...] = ()
    on_request: tuple[AsyncHook, ...] = ()
    on_response: tuple[AsyncHook, ...] = ()
    on_disconnect: tuple[AsyncHook, ...] = ()
    on_data: tuple[Callable[..., object], ...] = ()
    fail: HooksFail = "closed"  # a hook that raises or times out: refuse, or skip ("open")
    timeout: float = 1.0  # seconds each call may take


@dataclass(frozen=True, slots=True)
class RateLimitPolicy:
    connections_per_minute: int


@dataclass(frozen=True, slots=True)
class BasicAuthPolicy:
    users: Mapping[str, str] = field(repr=False)  # passwords: never in logs
    realm: str = "smartroute"


@dataclass(frozen=True, slots=True)
class SecurityPolicy:
    ip_allow_list: tuple[IpRule, ...] = ()
    ip_block_list: tuple[IpRule, ...] = ()
    max_connections: int | None = None
    max_connections_per_ip: int | None = None
    rate_limit: RateLimitPolicy | None = None
    basic_auth: BasicAuthPolicy | None = None


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Every time limit of a connection, in seconds; ``None`` turns a limit off.

    The proxy-wide values come from the settings; a route's ``timeouts`` block overrides some
    of them for the connections it takes (see :func:`smartroute.routing.defaults.apply`).
    """

    initial_data: float = 10.0  # first client bytes, when routing needs them (slowloris guard)
    connect: float = 10.0  # connecting to a backend
    idle: float | None = 3600.0  # no byte in either direction
    max_lifetime: float | None = 86400.0  # whatever the traffic
    half_close: float | None = 60.0  # no byte after one side sent EOF
    http_header: float = 10.0  # a request head, from its first byte to its end
    http_keepalive: float = 60.0  # waiting for the next request on a kept-alive connection
    backend: float = 60.0  # waiting for a backend's response head

    def shortest_limit(self, so_far: float | None = None) -> float | None:
        """The shortest of the switched-on idle, half-close and lifetime limits (and
        ``so_far``): how often connections under these limits must be looked at."""
        for limit in (self.idle, self.half_close, self.max_lifetime):
            if limit is not None and (so_far is None or limit < so_far):
                so_far = limit
        return so_far


TIMEOUT_NAMES = tuple(f.name for f in fields(Timeouts))
OPTIONAL_TIMEOUTS = ("idle", "max_lifetime", "half_close")  # the limits that can be off


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    """One validated route. ``index`` is its definition order, the last tie-breaker."""

    name: str
    match: MatchCriteria
    action: Action
    index: int
    priority: int = 0
    enabled: bool = True
    tls: TlsSettings | None = None
    security: SecurityPolicy | None = None
    named: bool = True  # False when the name was generated ("route-3")
    # The route's own ``timeouts`` block: name -> seconds (None: no limit).
    timeout_overrides: Mapping[str, float | None] = field(default_factory=dict)
    # Every limit in force for the route, settings and overrides combined; the proxy fills it
    # in when it installs the route (None on a route that was only validated).
    timeouts: Timeouts | None = field(default=None, compare=False)
    # The route's own hook objects and what a failing hook does; the proxy adds its
    # proxy-wide hooks when it installs the route, into ``chain`` (None: no hook at all).
    hooks: tuple[object, ...] = ()
    hooks_fail: HooksFail = "closed"
    chain: Hooks | None = field(default=None, compare=False)
    # Speed limits (the route's ``bandwidth`` block, else the proxy-wide default once the
    # proxy installs the route).
    bandwidth: BandwidthPolicy | None = None

    @property
    def terminates_tls(self) -> bool:
        return self.tls is not None and self.tls.mode != "passthrough"
