"""What users write: the dict form of a route (TypedDicts) and the equivalent dataclasses.

Both forms are plain input; :mod:`smartroute.routing.validation` checks either one and turns it
into the frozen objects of :mod:`smartroute.routing.model`. Every field of a dataclass may hold
the dataclass or the dict form of the nested thing: ``Route(match={"ports": 80}, action=...)``.

This module deliberately does not use ``from __future__ import annotations``: with real
annotations the TypedDicts keep correct ``__required_keys__`` at runtime, which validation reads
as the one list of allowed keys. Definitions therefore go leaf first.
"""

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NotRequired, Required, TypeAlias, TypedDict

from smartroute.routing.model import (
    ClientAuth,
    ForwardProtocol,
    HostFunction,
    PortFunction,
    Strategy,
    TlsMode,
)
from smartroute.routing.model import SocketHandler as SocketHandlerFunction

PemOrPath: TypeAlias = str | os.PathLike[str]
TlsVersionName: TypeAlias = Literal["TLSv1", "TLSv1.0", "TLSv1.1", "TLSv1.2", "TLSv1.3"]

# -- match -------------------------------------------------------------------------------------

# "from" is a keyword, hence the functional syntax.
PortRangeDict = TypedDict("PortRangeDict", {"from": int, "to": int})
PortSpec: TypeAlias = int | str | PortRangeDict | Sequence[int | str | PortRangeDict]


class MatchDict(TypedDict, total=False):
    ports: Required[PortSpec]
    domains: str | Sequence[str]
    path: str
    client_ip: str | Sequence[str]
    tls_version: TlsVersionName | Sequence[TlsVersionName]
    alpn: str | Sequence[str]
    headers: Mapping[str, str]
    protocol: str | Sequence[str]


@dataclass(slots=True)
class Match:
    """The conditions of a route; see :class:`MatchDict` for what each field takes."""

    ports: PortSpec
    domains: str | Sequence[str] | None = None
    path: str | None = None
    client_ip: str | Sequence[str] | None = None
    tls_version: TlsVersionName | Sequence[TlsVersionName] | None = None
    alpn: str | Sequence[str] | None = None
    headers: Mapping[str, str] | None = None
    protocol: str | Sequence[str] | None = None


MatchInput: TypeAlias = MatchDict | Match

# -- tls ---------------------------------------------------------------------------------------


class CertificateDict(TypedDict):
    cert: PemOrPath  # PEM text or a file path
    key: PemOrPath


@dataclass(slots=True)
class Certificate:
    """A certificate chain and its key, each as PEM text or a file path."""

    cert: PemOrPath
    key: PemOrPath


class TlsDict(TypedDict, total=False):
    mode: Required[TlsMode]
    certificate: Literal["auto", "on-demand"] | CertificateDict | Certificate
    backend_verify: bool
    backend_ca: PemOrPath
    backend_server_name: str
    backend_client_certificate: CertificateDict | Certificate
    client_ca: PemOrPath
    client_auth: ClientAuth


@dataclass(slots=True)
class Tls:
    """The ``tls`` block of an action."""

    mode: TlsMode
    certificate: Literal["auto", "on-demand"] | CertificateDict | Certificate | None = None
    backend_verify: bool = True
    backend_ca: PemOrPath | None = None
    backend_server_name: str | None = None
    backend_client_certificate: CertificateDict | Certificate | None = None
    client_ca: PemOrPath | None = None
    client_auth: ClientAuth | None = None


TlsInput: TypeAlias = TlsDict | Tls

# -- actions -----------------------------------------------------------------------------------


class TargetDict(TypedDict):
    host: str | Sequence[str] | HostFunction
    port: int | Literal["preserve"] | PortFunction
    send_proxy_protocol: NotRequired[Literal["v1", "v2"]]
    weight: NotRequired[int]  # 1-256, under round-robin and random
    backup: NotRequired[bool]  # only while no primary target is up
    initial: NotRequired[Literal["up", "down"]]  # "down": no traffic before a check passes


@dataclass(slots=True)
class Target:
    """Where a forward action connects: host(s) or a callable, port or ``"preserve"``."""

    host: str | Sequence[str] | HostFunction
    port: int | Literal["preserve"] | PortFunction
    send_proxy_protocol: Literal["v1", "v2"] | None = None
    weight: int = 1
    backup: bool = False
    initial: Literal["up", "down"] = "up"


TargetInput: TypeAlias = TargetDict | Target


class HealthCheckDict(TypedDict, total=False):
    """Active checks of every target: a TCP connect, or (``"http"``) a request whose status
    must fall in ``expect_status``; times in seconds."""

    type: Literal["tcp", "http"]  # default "tcp"
    interval: float  # default 5
    timeout: float  # default 2 (at most interval)
    rise: int  # passes in a row that bring a target back (default 2)
    fall: int  # failures in a row that take it out (default 3)
    path: str  # http only, default "/"
    expect_status: int | Sequence[int]  # http only: [low, high] inclusive, default [200, 399]
    host: str  # http only: the Host header (default: the target's host)


class PassiveHealthDict(TypedDict, total=False):
    """``max_fails`` failures of real traffic within ``fail_timeout`` seconds take a target out
    for ``fail_timeout`` seconds."""

    max_fails: int  # default 3
    fail_timeout: float  # default 10


class RetryDict(TypedDict, total=False):
    """Another target for a connection or request that failed before the client got a byte."""

    attempts: int  # tries in all, 1-10 (default 3)
    backoff: float  # seconds, doubled each time (default 0.05)
    max_backoff: float  # default 1
    jitter: float  # 0-1, a fraction of the wait (default 0.2)
    any_method: bool  # retry non-idempotent requests too (default False)


class ForwardActionDict(TypedDict, total=False):
    type: Required[Literal["forward"]]
    targets: Required[TargetInput | Sequence[TargetInput]]
    protocol: ForwardProtocol
    load_balancing: Strategy
    health_check: HealthCheckDict
    passive_health: PassiveHealthDict
    retry: RetryDict
    tls: TlsInput


@dataclass(slots=True)
class Forward:
    targets: TargetInput | Sequence[TargetInput]
    protocol: ForwardProtocol = "auto"
    tls: TlsInput | None = None
    load_balancing: Strategy = "round-robin"
    health_check: HealthCheckDict | None = None
    passive_health: PassiveHealthDict | None = None
    retry: RetryDict | None = None


class RedirectDict(TypedDict, total=False):
    to: Required[str]  # template: {domain} {port} {path} {query}
    status: Literal[301, 302, 303, 307, 308]


class RedirectActionDict(TypedDict, total=False):
    type: Required[Literal["redirect"]]
    redirect: Required[RedirectDict]
    tls: TlsInput


@dataclass(slots=True)
class Redirect:
    """Same as ``{"type": "redirect", "redirect": {"to": to, "status": status}}``."""

    to: str
    status: Literal[301, 302, 303, 307, 308] = 301
    tls: TlsInput | None = None


class BlockActionDict(TypedDict, total=False):
    type: Required[Literal["block"]]
    tls: TlsInput


@dataclass(slots=True)
class Block:
    tls: TlsInput | None = None


class StaticDict(TypedDict, total=False):
    root: str | os.PathLike[str]
    index: str | Sequence[str]
    content: str | bytes
    content_type: str
    status: int


class StaticActionDict(TypedDict, total=False):
    type: Required[Literal["static"]]
    static: Required[StaticDict]
    tls: TlsInput


@dataclass(slots=True)
class Static:
    """Files under ``root`` or one inline ``content`` response (exactly one of the two)."""

    root: str | os.PathLike[str] | None = None
    index: str | Sequence[str] | None = None
    content: str | bytes | None = None
    content_type: str | None = None
    status: int = 200
    tls: TlsInput | None = None


class SocketHandlerActionDict(TypedDict, total=False):
    type: Required[Literal["socket-handler"]]
    socket_handler: Required[SocketHandlerFunction | str]  # or "package.module:function"
    tls: TlsInput


@dataclass(slots=True)
class SocketHandler:
    """Same as ``{"type": "socket-handler", "socket_handler": handler}``."""

    handler: SocketHandlerFunction | str
    tls: TlsInput | None = None


ActionDict: TypeAlias = (
    ForwardActionDict
    | RedirectActionDict
    | BlockActionDict
    | StaticActionDict
    | SocketHandlerActionDict
)
ActionInput: TypeAlias = ActionDict | Forward | Redirect | Block | Static | SocketHandler

# -- security ----------------------------------------------------------------------------------


class RateLimitDict(TypedDict):
    connections_per_minute: int


@dataclass(slots=True)
class RateLimit:
    connections_per_minute: int


class BasicAuthDict(TypedDict, total=False):
    users: Required[Mapping[str, str]]
    realm: str


@dataclass(slots=True)
class BasicAuth:
    users: Mapping[str, str]
    realm: str = "smartroute"


class SecurityDict(TypedDict, total=False):
    ip_allow_list: str | Sequence[str]
    ip_block_list: str | Sequence[str]
    max_connections: int
    max_connections_per_ip: int
    rate_limit: RateLimitDict | RateLimit
    basic_auth: BasicAuthDict | BasicAuth


@dataclass(slots=True)
class Security:
    ip_allow_list: str | Sequence[str] | None = None
    ip_block_list: str | Sequence[str] | None = None
    max_connections: int | None = None
    max_connections_per_ip: int | None = None
    rate_limit: RateLimitDict | RateLimit | None = None
    basic_auth: BasicAuthDict | BasicAuth | None = None


SecurityInput: TypeAlias = SecurityDict | Security

# -- timeouts ----------------------------------------------------------------------------------


class TimeoutsDict(TypedDict, total=False):
    """A route's own time limits in seconds; each overrides the proxy-wide setting.

    ``idle``, ``max_lifetime`` and ``half_close`` accept 0 for "no limit".
    """

    initial_data: float
    connect: float
    idle: float
    max_lifetime: float
    half_close: float
    http_header: float
    http_keepalive: float
    backend: float


@dataclass(slots=True)
class Timeouts:
    initial_data: float | None = None
    connect: float | None = None
    idle: float | None = None
    max_lifetime: float | None = None
    half_close: float | None = None
    http_header: float | None = None
    http_keepalive: float | None = None
    backend: float | None = None


TimeoutsInput: TypeAlias = TimeoutsDict | Timeouts

# -- route -------------------------------------------------------------------------------------


class RateDict(TypedDict, total=False):
    download: float  # bytes per second, backend -> client
    upload: float  # bytes per second, client -> backend


class BandwidthDict(TypedDict, total=False):
    per_connection: RateDict
    per_ip: RateDict
    per_route: RateDict


class RouteDict(TypedDict, total=False):
    name: str
    priority: int
    enabled: bool
    match: Required[MatchInput]
    action: Required[ActionInput]
    security: SecurityInput
    timeouts: TimeoutsInput
    hooks: Sequence[object]  # objects with on_connect/on_request/... or "module:attr" paths
    hooks_fail: Literal["closed", "open"]
    bandwidth: BandwidthDict


@dataclass(slots=True)
class Route:
    """One route as a dataclass; validates to the same object as the equivalent dict."""

    match: MatchInput
    action: ActionInput
    name: str | None = None
    priority: int = 0
    enabled: bool = True
    security: SecurityInput | None = None
    timeouts: TimeoutsInput | None = None
    hooks: Sequence[object] | None = None
    hooks_fail: Literal["closed", "open"] = "closed"
    bandwidth: BandwidthDict | None = None


# Routes built at run time (by a helper factory, from a config file) are plain mappings that
# a type checker cannot see as a RouteDict; validation checks them all the same.
RouteInput: TypeAlias = RouteDict | Route | Mapping[str, Any]

__all__ = [
    "BandwidthDict",
    "RateDict",
    "ActionDict",
    "ActionInput",
    "BasicAuth",
    "BasicAuthDict",
    "Block",
    "BlockActionDict",
    "Certificate",
    "CertificateDict",
    "Forward",
    "ForwardActionDict",
    "HealthCheckDict",
    "Match",
    "MatchDict",
    "MatchInput",
    "PassiveHealthDict",
    "PortRangeDict",
    "PortSpec",
    "RateLimit",
    "RateLimitDict",
    "Redirect",
    "RedirectActionDict",
    "RedirectDict",
    "RetryDict",
    "Route",
    "RouteDict",
    "RouteInput",
    "Security",
    "SecurityDict",
    "SecurityInput",
    "SocketHandler",
    "SocketHandlerActionDict",
    "Static",
    "StaticActionDict",
    "StaticDict",
    "Target",
    "TargetDict",
    "TargetInput",
    "Timeouts",
    "TimeoutsDict",
    "TimeoutsInput",
    "Tls",
    "TlsDict",
    "TlsInput",
]
