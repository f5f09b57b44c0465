"""A sans-I/O parser for the TLS ClientHello: SNI, ALPN and offered versions.

The caller hands in the bytes read so far; the parser returns a :class:`ClientHello`, ``None``
while more bytes are needed, or raises :class:`TlsParseError`. It keeps no state: calling it again
with the longer buffer is how a hello split over several records and reads is reassembled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from smartroute.errors import TlsParseError
from smartroute.routing.patterns import normalize_host

__all__ = [
    "MAX_HELLO_SIZE",
    "MAX_RECORD_SIZE",
    "ClientHello",
    "looks_like_tls",
    "parse_client_hello",
]

MAX_HELLO_SIZE = 65536
"""Largest ClientHello body accepted; bounds what one connection may make us buffer."""

MAX_RECORD_SIZE = 2**14 + 2048
"""Largest TLS record fragment accepted (RFC 5246 section 6.2.3 limit)."""

_HANDSHAKE = 0x16
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_EXT_SUPPORTED_VERSIONS = 43

_VERSION_NAMES = {0x0301: "TLSv1", 0x0302: "TLSv1.1", 0x0303: "TLSv1.2", 0x0304: "TLSv1.3"}
_VERSION_RANK = {name: code for code, name in _VERSION_NAMES.items()}

# Letters, digits, '-' and '_' in dot-separated labels of 1..63, one optional trailing dot.
_HOST_NAME = re.compile(rb"(?:[A-Za-z0-9_-]{1,63}\.)*[A-Za-z0-9_-]{1,63}\.?")
_MAX_HOST_NAME = 254  # 253 plus a trailing dot


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What routing needs from a ClientHello; ``length`` is the bytes of the records carrying it."""

    sni: str | None  # server_name host_name, normalised; None when absent
    alpn: tuple[str, ...]  # protocols offered, in client order
    versions: tuple[str, ...]  # "TLSv1".."TLSv1.3" in client order, GREASE and unknown dropped
    length: int

    @property
    def highest_version(self) -> str | None:
        """The highest offered version (``"TLSv1.3"``), or ``None`` when none is known."""
        if not self.versions:
            return None
        return max(self.versions, key=_VERSION_RANK.__getitem__)


def looks_like_tls(data: bytes | bytearray | memoryview) -> bool | None:
    """True if data starts like a TLS handshake record (0x16, 0x03 0x00..0x04), False if it
    cannot, None if empty/too short to say."""
    size = len(data)
    if size == 0:
        return None
    if data[0] != _HANDSHAKE:
        return False
    if size == 1:
        return None
    if data[1] != 3:
        return False
    if size == 2:
        return None
    return data[2] <= 4


def parse_client_hello(data: bytes | bytearray | memoryview) -> ClientHello | None:
    """Parse the ClientHello at the start of ``data``; ``None`` means "need more bytes".

    The hello may span several handshake records; bytes after its last record (early data,
    a second flight) are left alone and :attr:`ClientHello.length` says where it ended.
    """
    total = len(data)
    pos = 0
    spans: list[tuple[int, int]] = []  # (start, end) of each fragment of the handshake message
    collected = 0
    need = -1  # 4 + body length, once the handshake header has been seen
    # Only offsets are kept while walking records: no slice of the caller's buffer survives in
    # a traceback, so a bytearray passed in can still be resized after an error.
    while True:
        avail = total - pos
        if avail == 0:
            return None
        _check_record_header(data, pos, avail)
        if avail < 5:
            return None
        size = data[pos + 3] << 8 | data[pos + 4]
        if size == 0:
            raise TlsParseError("empty TLS handshake record")
        if size > MAX_RECORD_SIZE:
            raise TlsParseError(f"TLS record of {size} bytes exceeds {MAX_RECORD_SIZE}")
        start = pos + 5
        end = start + size
        complete = end <= total
        if not complete:
            end = total
        if end > start:
            spans.append((start, end))
            collected += end - start
        if need < 0:
            need = _check_handshake_header(data, spans, collected)
        if 0 <= need < collected:
            raise TlsParseError("unexpected data after the ClientHello in its last record")
        if not complete:
            return None
        pos = end
        if collected == need:
            break
    if len(spans) == 1:
        start, end = spans[0]
        message = bytes(data[start:end])
    else:
        message = b"".join([data[start:end] for start, end in spans])
    return _parse_hello_body(message, pos)


def _check_record_header(data: bytes | bytearray | memoryview, pos: int, avail: int) -> None:
    """Reject a record header from whatever of its first three bytes are present."""
    content_type = data[pos]
    if content_type != _HANDSHAKE:
        raise TlsParseError(
            f"expected a TLS handshake record (22), got content type {content_type}"
        )
    if avail >= 2 and data[pos + 1] != 3:
        raise TlsParseError(f"unknown TLS record version major {data[pos + 1]}")
    if avail >= 3 and data[pos + 2] > 4:
        raise TlsParseError(f"unknown TLS record version 3.{data[pos + 2]}")


def _check_handshake_header(
    data: bytes | bytearray | memoryview, spans: list[tuple[int, int]], collected: int
) -> int:
    """Check the handshake header as far as it has arrived; return 4 + body length, or -1."""
    if collected == 0:
        return -1
    msg_type = data[spans[0][0]]
    if msg_type != _CLIENT_HELLO:
        raise TlsParseError(f"expected a ClientHello (handshake type 1), got type {msg_type}")
    if collected < 4:
        return -1
    header = bytearray()
    for start, end in spans:  # the 4-byte header may itself be split over tiny records
        header += data[start : min(end, start + 4 - len(header))]
        if len(header) == 4:
            break
    body_size = int.from_bytes(header[1:4], "big")
    if body_size > MAX_HELLO_SIZE:
        raise TlsParseError(f"ClientHello of {body_size} bytes exceeds {MAX_HELLO_SIZE}")
    return 4 + body_size


def _parse_hello_body(msg: bytes, length: int) -> ClientHello:
    """Parse a complete ClientHello handshake message (header included) held in ``msg``."""
    end = len(msg)
    p = 4
    # legacy_version(2) random(32) session_id<0..32>
    if end - p < 35:
        raise TlsParseError("ClientHello truncated before the session id")
    if msg[p] != 3:
        raise TlsParseError(f"unknown ClientHello version {msg[p]}.{msg[p + 1]}")
    legacy_version = msg[p] << 8 | msg[p + 1]
    p += 34
    session_id_size = msg[p]
    if session_id_size > 32:
        raise TlsParseError(f"session id of {session_id_size} bytes exceeds 32")
    p += 1 + session_id_size
    # cipher_suites<2..2^16-2>
    if p + 2 > end:
        raise TlsParseError("ClientHello truncated before the cipher suites")
    suites_size = msg[p] << 8 | msg[p + 1]
    if suites_size < 2 or suites_size % 2:
        raise TlsParseError(f"bad cipher suites length {suites_size}")
    p += 2 + suites_size
    # legacy_compression_methods<1..2^8-1>
    if p + 1 > end:
        raise TlsParseError("ClientHello truncated before the compression methods")
    compression_size = msg[p]
    if compression_size == 0:
        raise TlsParseError("no compression methods offered")
    p += 1 + compression_size
    if p > end:
        raise TlsParseError("ClientHello truncated in the compression methods")

    sni: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[str, ...] | None = None
    if p < end:  # extensions are optional (pre-TLS 1.2 clients may send none)
        if p + 2 > end:
            raise TlsParseError("ClientHello truncated in the extensions length")
        extensions_size = msg[p] << 8 | msg[p + 1]
        p += 2
        if p + extensions_size != end:
            raise TlsParseError(
                f"extensions length {extensions_size} does not match the {end - p} bytes left"
            )
        seen: set[int] = set()
        while p < end:
            if p + 4 > end:
                raise TlsParseError("truncated extension header")
            ext_type = msg[p] << 8 | msg[p + 1]
            ext_end = p + 4 + (msg[p + 2] << 8 | msg[p + 3])
            p += 4
            if ext_end > end:
                raise TlsParseError(f"extension {ext_type} runs past the end of the ClientHello")
            if ext_type in seen:
                raise TlsParseError(f"extension {ext_type} appears twice")
            seen.add(ext_type)
            if ext_type == _EXT_SERVER_NAME:
                sni = _parse_server_name(msg, p, ext_end)
            elif ext_type == _EXT_ALPN:
                alpn = _parse_alpn(msg, p, ext_end)
            elif ext_type == _EXT_SUPPORTED_VERSIONS:
                versions = _parse_supported_versions(msg, p, ext_end)
            p = ext_end
    if versions is None:
        legacy_name = _VERSION_NAMES.get(legacy_version)
        versions = () if legacy_name is None else (legacy_name,)
    return ClientHello(sni=sni, alpn=alpn, versions=versions, length=length)


def _parse_server_name(msg: bytes, p: int, end: int) -> str:
    """server_name (RFC 6066 section 3): exactly one host_name entry."""
    if end - p < 2:
        raise TlsParseError("server_name extension too short")
    list_size = msg[p] << 8 | msg[p + 1]
    p += 2
    if list_size == 0 or p + list_size != end:
        raise TlsParseError("bad server_name list length")
    host: str | None = None
    while p < end:
        if end - p < 3:
            raise TlsParseError("truncated server_name entry")
        name_type = msg[p]
        name_end = p + 3 + (msg[p + 1] << 8 | msg[p + 2])
        p += 3
        if name_end > end:
            raise TlsParseError("server_name entry runs past its list")
        if name_type != 0:
            raise TlsParseError(f"unknown server_name type {name_type} (expected 0, host_name)")
        if host is not None:
            raise TlsParseError("more than one host_name in server_name")
        name = msg[p:name_end]
        if len(name) > _MAX_HOST_NAME or _HOST_NAME.fullmatch(name) is None:
            raise TlsParseError(f"server_name {name[:64]!r} is not a valid host name")
        host = normalize_host(name.decode("ascii"))
        p = name_end
    assert host is not None  # the list is non-empty and every entry sets it or raises
    return host


def _parse_alpn(msg: bytes, p: int, end: int) -> tuple[str, ...]:
    """application_layer_protocol_negotiation (RFC 7301): non-empty names, in client order.

    Names are opaque bytes; latin-1 maps them to ``str`` one to one (``h2`` stays ``"h2"``).
    """
    if end - p < 2:
        raise TlsParseError("ALPN extension too short")
    list_size = msg[p] << 8 | msg[p + 1]
    p += 2
    if list_size == 0 or p + list_size != end:
        raise TlsParseError("bad ALPN list length")
    names: list[str] = []
    while p < end:
        name_end = p + 1 + msg[p]
        p += 1
        if name_end == p:
            raise TlsParseError("empty ALPN protocol name")
        if name_end > end:
            raise TlsParseError("ALPN protocol name runs past its list")
        names.append(msg[p:name_end].decode("latin-1"))
        p = name_end
    return tuple(names)


def _parse_supported_versions(msg: bytes, p: int, end: int) -> tuple[str, ...]:
    """supported_versions (RFC 8446 section 4.2.1); GREASE and unknown values are skipped."""
    if end - p < 1:
        raise TlsParseError("supported_versions extension too short")
    list_size = msg[p]
    p += 1
    if list_size < 2 or list_size % 2 or p + list_size != end:
        raise TlsParseError("bad supported_versions list length")
    names: list[str] = []
    for i in range(p, end, 2):
        # GREASE values (RFC 8701: 0x0a0a, 0x1a1a, ... 0xfafa) are not in _VERSION_NAMES, so
        # the lookup that drops unknown versions drops them too.
        name = _VERSION_NAMES.get(msg[i] << 8 | msg[i + 1])
        if name is not None:
            names.append(name)
    return tuple(names)
