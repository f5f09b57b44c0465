"""Classify a connection from its first bytes: a TLS ClientHello, an HTTP/1.x head, or other.

Pure: takes the bytes read so far and returns a :class:`Detection`, or ``None`` while more
bytes are needed to decide. Malformed TLS or HTTP is reported as ``other`` with the error kept,
so the caller can still route the connection by port and client IP.

With ``probes`` (only on ports whose routes match on ``protocol``), bytes that are neither a
ClientHello nor an HTTP/1.x head are named by the probes (:mod:`smartroute.protocols.probes`):
an ``other`` detection then carries the probe's name in ``protocol``. Malformed TLS or HTTP
keeps its error (the probes name it "tls" or "http" all the same); bytes that only started
like HTTP and that another probe names (the HTTP/2 preface) lose it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from smartroute.errors import ProtocolError
from smartroute.protocols.http import RequestHead, looks_like_http, parse_request_head
from smartroute.protocols.probes import Probes
from smartroute.protocols.tls import ClientHello, looks_like_tls, parse_client_hello

Kind = Literal["tls", "http", "other"]


@dataclass(frozen=True, slots=True)
class Detection:
    kind: Kind
    hello: ClientHello | None = None
    head: RequestHead | None = None
    error: ProtocolError | None = None
    protocol: str | None = None  # "tls", "http" or a probe's name; None: nothing named it


OTHER = Detection("other")
_PARSED = frozenset({"tls", "http"})  # what the parsers above read: their errors stand


def detect(
    data: bytes | bytearray | memoryview,
    *,
    max_http_head: int = 16384,
    probes: Probes | None = None,
    final: bool = False,
) -> Detection | None:
    """Decide what the first bytes of a connection are, or return ``None`` to wait for more.

    ``final``: no more bytes will come (end of stream, limit or timeout): the probes decide
    with what there is.
    """
    tls = looks_like_tls(data)
    if tls:
        try:
            hello = parse_client_hello(data)
        except ProtocolError as exc:
            return _other(data, probes, final, exc)
        if hello is None:
            return _other(data, probes, final, None) if final else None
        return Detection("tls", hello=hello, protocol="tls")
    http = looks_like_http(data)
    if http:
        try:
            head = parse_request_head(data, max_http_head)
        except ProtocolError as exc:
            return _other(data, probes, final, exc)
        if head is None:
            return _other(data, probes, final, None) if final else None
        return Detection("http", head=head, protocol="http")
    if (tls is None or http is None) and not final:
        return None
    return _other(data, probes, final, None)


def settle(data: bytes | bytearray | memoryview, probes: Probes | None = None) -> Detection:
    """What the first bytes are when no more will come."""
    return detect(data, probes=probes, final=True) or OTHER


def _other(
    data: bytes | bytearray | memoryview,
    probes: Probes | None,
    final: bool,
    error: ProtocolError | None,
) -> Detection | None:
    """Neither a ClientHello nor an HTTP/1.x head: what the probes call it, if asked."""
    if probes is not None:
        name = probes.identify(bytes(data), final)
        if name is None:
            return None
        if name is not False:
            return Detection("other", error=error if name in _PARSED else None, protocol=name)
    return OTHER if error is None else Detection("other", error=error)
