"""Classify a connection from its first bytes: a TLS ClientHello, an HTTP/1.x head, or other.

Pure: takes the bytes read so far and returns a :class:`Detection`, or ``None`` while more
bytes are needed to decide. Malformed TLS or HTTP is reported as ``other`` with the error kept,
so the caller can still route the connection by port and client IP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from smartroute.errors import ProtocolError
from smartroute.protocols.http import RequestHead, looks_like_http, parse_request_head
from smartroute.protocols.tls import ClientHello, looks_like_tls, parse_client_hello

Kind = Literal["tls", "http", "other"]


@dataclass(frozen=True, slots=True)
class Detection:
    kind: Kind
    hello: ClientHello | None = None
    head: RequestHead | None = None
    error: ProtocolError | None = None


OTHER = Detection("other")


def detect(data: bytes | bytearray | memoryview, *, max_http_head: int = 16384) -> Detection | None:
    """Decide what the first bytes of a connection are, or return ``None`` to wait for more."""
    tls = looks_like_tls(data)
    if tls:
        try:
            hello = parse_client_hello(data)
        except ProtocolError as exc:
            return Detection("other", error=exc)
        return None if hello is None else Detection("tls", hello=hello)
    http = looks_like_http(data)
    if http:
        try:
            head = parse_request_head(data, max_http_head)
        except ProtocolError as exc:
            return Detection("other", error=exc)
        return None if head is None else Detection("http", head=head)
    if tls is None or http is None:
        return None
    return OTHER
