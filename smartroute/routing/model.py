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
ForwardProtocol: TypeAlias = Literal["auto", "tcp", "http"]
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

    @property
    def needs_data(self) -> bool:
        """True when matching needs the client's first bytes (SNI, Host, path, ...)."""
        return bool(self.domains or self.path or self.tls_version or self.alpn or self.headers)


@dataclass(frozen=True, slots=True)
class TargetSpec:
    """One forward target; ``host`` is a tuple of hosts (round-robin) or a callable."""

    host: tuple[str, ...] | HostFunction
    port: int | Literal["preserve"] | PortFunction
    send_proxy_protocol: Literal["v1", "v2"] | None = None  # tell the target who the client is


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
    certificate: CertificatePair | Literal["auto"] | None = None
    backend_verify: bool = True
    backend_ca: str | None = None  # PEM text
    backend_server_name: str | None = None


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

    @property
    def terminates_tls(self) -> bool:
        return self.tls is not None and self.tls.mode != "passthrough"
