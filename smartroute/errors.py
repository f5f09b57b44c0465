"""The one exception tree of smartroute.

Everything smartroute raises on purpose derives from :class:`SmartRouteError`, so callers can
catch the whole family at once, or one branch of it. Some errors also derive from the built-in
exception that code outside smartroute would catch for them (``ValueError``, ``OSError``,
``ConnectionError``)::

    SmartRouteError
    ├── ConfigError                 also ValueError: a bad route or setting, with its path
    ├── PortInUseError              also OSError: a port cannot be bound, and who holds it
    ├── ProtocolError               a peer's bytes break the protocol; ``status`` hints 400/431
    │   ├── TlsParseError           a malformed TLS record or ClientHello
    │   ├── HttpParseError          a malformed or too large HTTP/1.x request head
    │   ├── ProxyProtocolError      a malformed PROXY protocol header
    │   ├── TlsHandshakeError       a client's TLS handshake failed, timed out or was cut
    │   └── FrameError              a framed-protocol frame is malformed, not JSON or too large
    ├── BodyCut                     also ConnectionError: a peer closed before a body's end
    ├── TargetError                 a target callable failed or returned something unusable
    ├── CertificateLoadError        also ValueError: a certificate or key cannot be used
    ├── CertificateStoreError       also ValueError: a certificate cannot be stored or read
    ├── AcmeError                   an ACME operation failed
    ├── WorkerGone                  a worker process ended while the parent waited for it
    ├── ServiceError                a framed service answered a request with an error frame
    ├── Disconnected                also ConnectionError: a framed client's connection dropped
    │   └── ConnectFailed           a framed client gave up reconnecting
    └── RequestTimeout              also TimeoutError: a framed request got no reply in time
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


# -- misbehaving peers ---------------------------------------------------------------------------


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


class ProxyProtocolError(ProtocolError):
    """A PROXY protocol header is malformed; the connection should be closed."""


class TlsHandshakeError(ProtocolError):
    """A client's TLS handshake failed, timed out or was cut short; the connection is closed."""


class BodyCut(SmartRouteError, ConnectionError):
    """The sender closed its connection before the body's end."""


# -- forwarding ----------------------------------------------------------------------------------


class TargetError(SmartRouteError):
    """A target callable failed or returned something unusable."""


# -- certificates --------------------------------------------------------------------------------


class CertificateLoadError(SmartRouteError, ValueError):
    """A certificate or key cannot be used. The message names the certificate, never the key."""


class CertificateStoreError(SmartRouteError, ValueError):
    """A certificate, key or account cannot be stored or read; never quotes key material."""


class AcmeError(SmartRouteError):
    """An ACME operation failed; wraps the acme library's error at the boundary."""


# -- worker processes ----------------------------------------------------------------------------


class WorkerGone(SmartRouteError):
    """A worker process (``workers=N``) ended, or was killed, while the parent waited for it."""


# -- the framed-protocol kit (smartroute.helpers) -------------------------------------------


class FrameError(ProtocolError):
    """A frame is malformed, not JSON or over the size limit: the one error the codecs raise.

    ``code`` is what an error frame tells the peer (``too-large``, ``invalid-json``,
    ``bad-frame``); ``fatal`` says the byte stream cannot be read on after it; ``reply_to`` is
    the id of the request it answers, when the frame was readable enough to carry one.
    """

    def __init__(
        self, code: str, message: str, *, fatal: bool = False, reply_to: int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.fatal = fatal
        self.reply_to = reply_to


class ServiceError(SmartRouteError):
    """An error frame. A handler raises it to answer with its own ``code`` and ``message``;
    :class:`~smartroute.helpers.FramedClient` raises it when a request is answered by one."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Disconnected(SmartRouteError, ConnectionError):
    """The connection dropped before a request's reply came, or the client is closed."""


class ConnectFailed(Disconnected):
    """``max_attempts`` connection attempts failed; names the endpoints and the last error."""


class RequestTimeout(SmartRouteError, TimeoutError):
    """No reply came within the request's timeout."""
