"""The one exception tree of smartroute.

Everything smartroute raises on purpose derives from :class:`SmartRouteError`, so callers can
catch the whole family at once, or one branch of it.
"""

from __future__ import annotations


class SmartRouteError(Exception):
    """Base class of every error smartroute raises on purpose."""


class ConfigError(SmartRouteError, ValueError):
    """A route or setting is invalid; ``path`` names the bad field (``routes[2].match.ports``)."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path else problem)


class PortInUseError(SmartRouteError, OSError):
    """A port could not be bound; ``holder`` says who holds it (another process or this proxy)."""

    def __init__(self, port: int, address: str, holder: str, detail: str = "") -> None:
        self.port = port
        self.address = address
        self.holder = holder
        message = f"port {port} on {address} is already in use by {holder}"
        if detail:
            message += f" ({detail})"
        super().__init__(message)


class ProtocolError(SmartRouteError):
    """Bytes from a peer do not follow the protocol; ``status`` hints an HTTP answer (400, 431)."""

    status: int = 400

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class TlsParseError(ProtocolError):
    """A TLS record or ClientHello is malformed."""


class HttpParseError(ProtocolError):
    """An HTTP/1.x request head is malformed (400) or too large (431)."""


class AcmeError(SmartRouteError):
    """An ACME operation failed; wraps the acme library's error at the boundary."""


class CertificateStoreError(SmartRouteError, ValueError):
    """A certificate, key or account cannot be stored or read; never quotes key material."""


class WorkerGone(SmartRouteError):
    """A worker process (``workers=N``) ended, or was killed, while the parent waited for it."""
