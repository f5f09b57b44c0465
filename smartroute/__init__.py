"""smartroute: an asyncio connection-routing proxy.

Describe routes as plain dicts (or the dataclasses exported here), give them to
:class:`SmartRoute`, and start it::

    async with SmartRoute(routes=[...]) as proxy:
        ...
"""

from __future__ import annotations

__version__ = "0.1.0"

from smartroute.context import RouteContext
from smartroute.errors import (
    AcmeError,
    BodyCut,
    CertificateLoadError,
    CertificateStoreError,
    ConfigError,
    ConnectFailed,
    Disconnected,
    FrameError,
    HttpParseError,
    PortInUseError,
    ProtocolError,
    ProxyProtocolError,
    RequestTimeout,
    ServiceError,
    SmartRouteError,
    TargetError,
    TlsHandshakeError,
    TlsParseError,
    WorkerGone,
)
from smartroute.proxy import SmartRoute
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
    Timeouts,
    Tls,
)
from smartroute.routing.validation import validate_routes
from smartroute.settings import Settings

__all__ = [
    "AcmeError",
    "BasicAuth",
    "Block",
    "BodyCut",
    "Certificate",
    "CertificateLoadError",
    "CertificateStoreError",
    "ConfigError",
    "ConnectFailed",
    "Disconnected",
    "Forward",
    "FrameError",
    "HttpParseError",
    "Match",
    "PortInUseError",
    "ProtocolError",
    "ProxyProtocolError",
    "RateLimit",
    "Redirect",
    "RequestTimeout",
    "Route",
    "RouteContext",
    "RouteDict",
    "Security",
    "ServiceError",
    "Settings",
    "SmartRoute",
    "SocketHandler",
    "SmartRouteError",
    "Static",
    "Target",
    "TargetError",
    "Timeouts",
    "Tls",
    "TlsHandshakeError",
    "TlsParseError",
    "WorkerGone",
    "__version__",
    "validate_routes",
]
