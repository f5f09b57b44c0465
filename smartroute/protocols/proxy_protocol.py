"""A sans-I/O parser and encoder for the HAProxy PROXY protocol, versions 1 and 2.

The PROXY protocol prefixes a connection with the addresses of the real client, as seen by the
load balancer in front of us (https://www.haproxy.org/download/2.4/doc/proxy-protocol.txt).
:func:`parse_proxy_header` takes the bytes read so far and returns a :class:`ProxyHeader`,
``None`` while more bytes are needed, or raises :class:`ProxyProtocolError`. It keeps no state:
call it again with the longer buffer. Bytes after the header belong to the client and are left
alone; :attr:`ProxyHeader.length` says where the header ended.

Only accept the header from trusted peers: whoever may send it can claim any address.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

# ProxyProtocolError lives in smartroute.errors now; re-exported here.
from smartroute.errors import ProxyProtocolError

__all__ = [
    "MAX_V1_LINE",
    "MAX_V2_HEADER",
    "V1_PREFIX",
    "V2_SIGNATURE",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_UNIQUE_ID",
    "PP2_TYPE_SSL",
    "PP2_TYPE_NETNS",
    "ProxyHeader",
    "ProxyProtocolError",
    "encode_v1",
    "encode_v2",
    "encode_v2_local",
    "looks_like_proxy_protocol",
    "parse_proxy_header",
]

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

MAX_V1_LINE = 107
"""Longest version 1 line, CRLF included (spec section 2.1, the "worst case" UNKNOWN line)."""

MAX_V2_HEADER = 4096
"""Largest version 2 header accepted, the 16 fixed bytes included; bounds what we buffer."""

# TLV types registered by the spec (section 2.2).
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_TYPE_NETNS = 0x30

_V2_FIXED = 16
_V2_VERSION = 0x20
_CMD_LOCAL = 0x0
_CMD_PROXY = 0x1
_FAM_UNSPEC = 0x00
_FAM_TCP4 = 0x11
_FAM_TCP6 = 0x21
_FAM_UNIX_STREAM = 0x31

# The family/transport bytes the spec lists as valid, with the size of their address block and
# the family name we report. Datagram transports fall back to UNSPEC, as the spec allows for
# combinations a receiver does not implement: this proxy relays streams only.
_V2_FAMILIES: dict[int, tuple[int, str]] = {
    _FAM_UNSPEC: (0, "UNSPEC"),
    _FAM_TCP4: (12, "TCP4"),
    0x12: (12, "UNSPEC"),  # UDP over IPv4
    _FAM_TCP6: (36, "TCP6"),
    0x22: (36, "UNSPEC"),  # UDP over IPv6
    _FAM_UNIX_STREAM: (216, "UNIX"),
    0x32: (216, "UNSPEC"),  # UNIX datagram
}

_V2_HEAD = struct.Struct("!BBH")  # ver_cmd, fam, len (after the 12-byte signature)
_V2_INET4 = struct.Struct("!4s4sHH")
_V2_INET6 = struct.Struct("!16s16sHH")
_V2_TLV = struct.Struct("!BH")

_V1_PROTOCOLS = (b"TCP4 ", b"TCP6 ", b"UNKNOWN")
_V1_UNKNOWN = b"PROXY UNKNOWN"
_V1_UNKNOWN_ARGS = _V1_UNKNOWN + b" "
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")  # decimal, no sign, no heading zeroes
# Four decimal octets 0-255 without heading zeroes (the spec's rule, and what ipaddress
# accepts): text that matches is already canonical, so no conversion is needed.
_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_V1_IPV4 = re.compile(rb"(?:" + _OCTET + rb"\.){3}" + _OCTET)
_V1_IPV6_CHARS = re.compile(rb"[0-9A-Fa-f:.]{2,45}")  # no '%scope': not an address


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What a PROXY protocol header says about the connection it precedes."""

    version: int  # 1 or 2
    command: str  # "PROXY", or "LOCAL": use the real connection endpoints
    family: str  # "TCP4" | "TCP6" | "UNIX" | "UNSPEC"
    source: tuple[str, int] | None  # the real client; None unless family is TCP4/TCP6
    destination: tuple[str, int] | None  # the address the client connected to
    tlvs: tuple[tuple[int, bytes], ...]  # v2 (type, value) in order, unparsed; () for v1
    length: int  # bytes of the header; the client's data starts here


def looks_like_proxy_protocol(data: bytes | bytearray | memoryview) -> bool | None:
    """True if ``data`` starts with ``"PROXY "`` or the v2 signature, False if it cannot,
    None while it is a proper prefix of one of them (empty included)."""
    size = len(data)
    if size >= len(V1_PREFIX) and bytes(data[: len(V1_PREFIX)]) == V1_PREFIX:
        return True
    head = bytes(data[: len(V2_SIGNATURE)])
    if size >= len(V2_SIGNATURE):
        return head == V2_SIGNATURE
    if V2_SIGNATURE.startswith(head) or V1_PREFIX.startswith(head):
        return None
    return False


def parse_proxy_header(data: bytes | bytearray | memoryview) -> ProxyHeader | None:
    """Parse the PROXY header (v1 or v2) at the start of ``data``; ``None`` means "need more".

    Anything that is not a PROXY header raises :class:`ProxyProtocolError` as soon as the
    first bytes rule it out, so a peer cannot make us wait for a header that will never come.
    """
    size = len(data)
    if size >= len(V2_SIGNATURE) and bytes(data[: len(V2_SIGNATURE)]) == V2_SIGNATURE:
        return _parse_v2(data, size)
    if size >= len(V1_PREFIX) and bytes(data[: len(V1_PREFIX)]) == V1_PREFIX:
        return _parse_v1(bytes(data[:MAX_V1_LINE]))
    if looks_like_proxy_protocol(data) is None:
        return None
    raise ProxyProtocolError("not a PROXY protocol header")


# -- version 1 ---------------------------------------------------------------------------------


def _parse_v1(head: bytes) -> ProxyHeader | None:
    """Parse a v1 line from ``head``, the first (at most 107) bytes of the buffer."""
    newline = head.find(b"\n")
    if newline < 0:
        if len(head) >= MAX_V1_LINE:
            raise ProxyProtocolError(f"PROXY v1 line has no CRLF in its first {MAX_V1_LINE} bytes")
        rest = head[len(V1_PREFIX) :]
        if not any(rest.startswith(p) or p.startswith(rest) for p in _V1_PROTOCOLS):
            raise ProxyProtocolError(f"PROXY v1 protocol is not TCP4, TCP6 or UNKNOWN: {rest!r}")
        return None
    if head[newline - 1] != 0x0D:  # newline >= 6: the prefix holds no LF
        raise ProxyProtocolError("PROXY v1 line ends with a bare LF instead of CRLF")
    line = head[: newline - 1]
    length = newline + 1
    if line == _V1_UNKNOWN or line.startswith(_V1_UNKNOWN_ARGS):
        # The receiver must ignore whatever follows UNKNOWN and use the real endpoints.
        return ProxyHeader(1, "LOCAL", "UNSPEC", None, None, (), length)
    fields = line.split(b" ")
    protocol = fields[1]
    if protocol not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError(f"PROXY v1 protocol is not TCP4, TCP6 or UNKNOWN: {protocol!r}")
    if len(fields) != 6:
        raise ProxyProtocolError(
            "PROXY v1 line needs protocol, two addresses and two ports, each after one space"
        )
    v6 = protocol == b"TCP6"
    source = (_v1_address(fields[2], v6), _v1_port(fields[4]))
    destination = (_v1_address(fields[3], v6), _v1_port(fields[5]))
    return ProxyHeader(1, "PROXY", protocol.decode("ascii"), source, destination, (), length)


def _v1_address(field: bytes, v6: bool) -> str:
    """The canonical text of a v1 address of the announced family."""
    if not v6:
        if _V1_IPV4.fullmatch(field) is not None:
            return field.decode("ascii")
    elif _V1_IPV6_CHARS.fullmatch(field) is not None:
        try:
            return str(ipaddress.IPv6Address(field.decode("ascii")))
        except ValueError:
            pass
    family = "IPv6" if v6 else "IPv4"
    raise ProxyProtocolError(f"PROXY v1 address {field[:45]!r} is not an {family} address")


def _v1_port(field: bytes) -> int:
    if _V1_PORT.fullmatch(field) is None or int(field) > 0xFFFF:
        raise ProxyProtocolError(f"PROXY v1 port {field[:8]!r} is not a port (0-65535)")
    return int(field)


# -- version 2 ---------------------------------------------------------------------------------


def _parse_v2(data: bytes | bytearray | memoryview, size: int) -> ProxyHeader | None:
    """Parse a v2 header; ``data`` starts with the signature and holds ``size`` bytes."""
    if size > 12:
        _check_ver_cmd(data[12])
    if size > 13:
        _check_family(data[12] & 0x0F, data[13])
    if size < _V2_FIXED:
        return None
    # Released on the way out, even on error: a bytearray passed in can still be resized.
    with memoryview(data) as view:
        ver_cmd, fam, block = _V2_HEAD.unpack_from(view, 12)
        length = _V2_FIXED + block
        if length > MAX_V2_HEADER:
            raise ProxyProtocolError(
                f"PROXY v2 header of {length} bytes exceeds {MAX_V2_HEADER}", status=431
            )
        if size < length:
            return None
        if ver_cmd & 0x0F == _CMD_LOCAL:
            # Health checks and the like: the receiver must use the real endpoints and discard
            # the whole block, family included, whatever it holds.
            return ProxyHeader(2, "LOCAL", "UNSPEC", None, None, (), length)
        address_size, family = _V2_FAMILIES[fam]
        if fam == _FAM_UNSPEC:
            # Unknown address information: ignored, so what follows cannot be located either.
            return ProxyHeader(2, "PROXY", family, None, None, (), length)
        if block < address_size:
            raise ProxyProtocolError(
                f"PROXY v2 family 0x{fam:02x} needs {address_size} address bytes, "
                f"the header holds {block}"
            )
        source: tuple[str, int] | None = None
        destination: tuple[str, int] | None = None
        if fam == _FAM_TCP4:
            src, dst, sport, dport = _V2_INET4.unpack_from(view, _V2_FIXED)
            source = (socket.inet_ntoa(src), sport)
            destination = (socket.inet_ntoa(dst), dport)
        elif fam == _FAM_TCP6:
            src, dst, sport, dport = _V2_INET6.unpack_from(view, _V2_FIXED)
            source = (str(ipaddress.IPv6Address(src)), sport)
            destination = (str(ipaddress.IPv6Address(dst)), dport)
        tlvs = _parse_tlvs(view, _V2_FIXED + address_size, length)
    return ProxyHeader(2, "PROXY", family, source, destination, tlvs, length)


def _check_ver_cmd(ver_cmd: int) -> None:
    if ver_cmd & 0xF0 != _V2_VERSION:
        raise ProxyProtocolError(f"PROXY v2 header announces version {ver_cmd >> 4}, not 2")
    if ver_cmd & 0x0F not in (_CMD_LOCAL, _CMD_PROXY):
        raise ProxyProtocolError(f"PROXY v2 command {ver_cmd & 0x0F} is neither LOCAL nor PROXY")


def _check_family(command: int, fam: int) -> None:
    if fam >> 4 > 3:
        raise ProxyProtocolError(f"PROXY v2 address family {fam >> 4} is not defined")
    if fam & 0x0F > 2:
        raise ProxyProtocolError(f"PROXY v2 transport protocol {fam & 0x0F} is not defined")
    if command == _CMD_PROXY and fam not in _V2_FAMILIES:
        raise ProxyProtocolError(f"PROXY v2 family/transport 0x{fam:02x} is not a valid pair")


def _parse_tlvs(view: memoryview, pos: int, end: int) -> tuple[tuple[int, bytes], ...]:
    """The TLVs between ``pos`` and ``end``; they must fill the space exactly."""
    tlvs: list[tuple[int, bytes]] = []
    while pos < end:
        if end - pos < _V2_TLV.size:
            raise ProxyProtocolError("PROXY v2 header ends inside a TLV header")
        kind, size = _V2_TLV.unpack_from(view, pos)
        pos += _V2_TLV.size
        if pos + size > end:
            raise ProxyProtocolError(f"PROXY v2 TLV 0x{kind:02x} runs past the end of the header")
        tlvs.append((kind, bytes(view[pos : pos + size])))
        pos += size
    return tuple(tlvs)


# -- encoders ----------------------------------------------------------------------------------

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def encode_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """The v1 line for a TCP connection from ``source`` (the client) to ``destination``.

    The header always names the client in its own family, whatever the destination's:
    addresses are unmapped first (``::ffff:a.b.c.d`` is IPv4), the line is TCP4 for an IPv4
    client and TCP6 for an IPv6 one, and the destination is converted to that family: an IPv4
    destination of an IPv6 client goes as its IPv4-mapped form ``::ffff:a.b.c.d``, an IPv6
    destination of an IPv4 client as ``0.0.0.0``. Ports are kept. Raises ValueError for an
    address that is not an IP address, or a bad port.
    """
    src, dst = _address_pair(source[0], destination[0])
    sport, dport = _port(source[1]), _port(destination[1])
    protocol = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {protocol} {_text(src)} {_text(dst)} {sport} {dport}\r\n".encode("ascii")


def encode_v2(
    source: tuple[str, int],
    destination: tuple[str, int],
    *,
    tlvs: Sequence[tuple[int, bytes]] = (),
) -> bytes:
    """The v2 header (PROXY command, STREAM transport) for ``source`` -> ``destination``.

    The family is the client's (``source``), with the destination converted to it, as in
    :func:`encode_v1`. Raises ValueError for an address that is not an IP address, a bad
    port or TLV, or when the header would exceed :data:`MAX_V2_HEADER`.
    """
    src, dst = _address_pair(source[0], destination[0])
    fmt, fam = (_V2_INET4, _FAM_TCP4) if src.version == 4 else (_V2_INET6, _FAM_TCP6)
    parts = [fmt.pack(src.packed, dst.packed, _port(source[1]), _port(destination[1]))]
    for kind, value in tlvs:
        if not 0 <= kind <= 0xFF or len(value) > 0xFFFF:
            raise ValueError(f"TLV type {kind} or its {len(value)}-byte value does not fit")
        parts += (_V2_TLV.pack(kind, len(value)), bytes(value))
    body = b"".join(parts)
    if _V2_FIXED + len(body) > MAX_V2_HEADER:
        raise ValueError(f"PROXY v2 header would exceed {MAX_V2_HEADER} bytes")
    return V2_SIGNATURE + _V2_HEAD.pack(_V2_VERSION | _CMD_PROXY, fam, len(body)) + body


def encode_v2_local() -> bytes:
    """The v2 header of a LOCAL connection (a health check): no addresses, no TLVs."""
    return V2_SIGNATURE + _V2_HEAD.pack(_V2_VERSION | _CMD_LOCAL, _FAM_UNSPEC, 0)


_MAPPED_PREFIX = bytes(10) + b"\xff\xff"
_IPV4_ANY = ipaddress.IPv4Address(0)


def _address_pair(source: str, destination: str) -> tuple[_Address, _Address]:
    """The client's address, unmapped, and the destination in the client's family."""
    src, dst = _unmapped(_address(source)), _unmapped(_address(destination))
    if src.version == dst.version:
        return src, dst
    if isinstance(dst, ipaddress.IPv4Address):  # an IPv6 client reached an IPv4 address
        return src, ipaddress.IPv6Address(_MAPPED_PREFIX + dst.packed)
    return src, _IPV4_ANY  # an IPv4 client reached an IPv6 address: none to name in IPv4


def _unmapped(address: _Address) -> _Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _text(address: _Address) -> str:
    """v1 text: a mapped address in its usual ``::ffff:a.b.c.d`` form (RFC 5952 section 5)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return f"::ffff:{address.ipv4_mapped}"
    return str(address)


def _address(text: str) -> _Address:
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        # The protocol has no room for a zone: the address alone is what can be carried.
        return ipaddress.IPv6Address(address.packed)
    return address


def _port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"{port!r} is not a port (0-65535)")
    return port
