"""The PROXY protocol parser and encoders against case tables, malformed input and hypothesis."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smartroute.errors import ProtocolError
from smartroute.protocols.proxy_protocol import (
    MAX_V1_LINE,
    MAX_V2_HEADER,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_NOOP,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    encode_v1,
    encode_v2,
    encode_v2_local,
    looks_like_proxy_protocol,
    parse_proxy_header,
)

Buffer = bytes | bytearray | memoryview
AS_TYPES: list[Callable[[bytes], Buffer]] = [bytes, bytearray, memoryview]

# Whatever the client sends after the header must not change it: a TLS record, an HTTP
# request, another PROXY header, stray CR/LF, a lone NUL.
TRAILING = [
    b"\x16\x03\x01\x00\x05hello",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"PROXY TCP4 1.1.1.1 2.2.2.2 1 2\r\n",
    V2_SIGNATURE + b"\x21\x11\x00\x0c",
    b"\r\n",
    b"\n",
    b"\x00",
]


def u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def v2(ver_cmd: int, fam: int, body: bytes, *, length: int | None = None) -> bytes:
    """A v2 header built by hand (not with the encoder under test)."""
    size = len(body) if length is None else length
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + u16(size) + body


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + u16(len(value)) + value


IP4_BLOCK = bytes([192, 168, 0, 1, 192, 168, 0, 11]) + u16(56324) + u16(443)
IP6_BLOCK = (
    bytes.fromhex("20010db8000000000000000000000001")
    + bytes.fromhex("20010db8000000000000000000000002")
    + u16(1234)
    + u16(443)
)
UNIX_BLOCK = b"/run/src.sock".ljust(108, b"\x00") + b"/run/dst.sock".ljust(108, b"\x00")
IPV6_MAX = ":".join(["ffff"] * 8)

# (id, header bytes, version, command, family, source, destination, tlvs)
Case = tuple[
    str,
    bytes,
    int,
    str,
    str,
    tuple[str, int] | None,
    tuple[str, int] | None,
    tuple[tuple[int, bytes], ...],
]

V1_CASES: list[Case] = [
    ("v1-tcp4-spec-example", b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n", 1, "PROXY", "TCP4", ("192.168.0.1", 56324), ("192.168.0.11", 443), ()),
    ("v1-tcp4-longest", b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n", 1, "PROXY", "TCP4", ("255.255.255.255", 65535), ("255.255.255.255", 65535), ()),
    ("v1-tcp4-zero-ports", b"PROXY TCP4 0.0.0.0 10.0.0.1 0 0\r\n", 1, "PROXY", "TCP4", ("0.0.0.0", 0), ("10.0.0.1", 0), ()),
    ("v1-tcp6", b"PROXY TCP6 2001:db8::1 2001:db8::2 1234 443\r\n", 1, "PROXY", "TCP6", ("2001:db8::1", 1234), ("2001:db8::2", 443), ()),
    ("v1-tcp6-longest-uppercase", f"PROXY TCP6 {IPV6_MAX.upper()} {IPV6_MAX} 65535 65535\r\n".encode(), 1, "PROXY", "TCP6", (IPV6_MAX, 65535), (IPV6_MAX, 65535), ()),
    ("v1-tcp6-uncompressed", b"PROXY TCP6 2001:0db8:0000:0000:0000:0000:0000:0001 ::1 80 8080\r\n", 1, "PROXY", "TCP6", ("2001:db8::1", 80), ("::1", 8080), ()),
    ("v1-tcp6-mapped", b"PROXY TCP6 ::ffff:192.0.2.1 ::ffff:192.0.2.2 5 6\r\n", 1, "PROXY", "TCP6", ("::ffff:c000:201", 5), ("::ffff:c000:202", 6), ()),
    ("v1-unknown-short", b"PROXY UNKNOWN\r\n", 1, "LOCAL", "UNSPEC", None, None, ()),
    ("v1-unknown-worst-case", f"PROXY UNKNOWN {IPV6_MAX} {IPV6_MAX} 65535 65535\r\n".encode(), 1, "LOCAL", "UNSPEC", None, None, ()),
    ("v1-unknown-ignores-rest", b"PROXY UNKNOWN whatever \xff\x00 is here\r\n", 1, "LOCAL", "UNSPEC", None, None, ()),
]  # fmt: skip

V2_CASES: list[Case] = [
    ("v2-tcp4", v2(0x21, 0x11, IP4_BLOCK), 2, "PROXY", "TCP4", ("192.168.0.1", 56324), ("192.168.0.11", 443), ()),
    ("v2-tcp4-alpn-authority", v2(0x21, 0x11, IP4_BLOCK + tlv(PP2_TYPE_ALPN, b"h2") + tlv(PP2_TYPE_AUTHORITY, b"example.com")), 2, "PROXY", "TCP4", ("192.168.0.1", 56324), ("192.168.0.11", 443), ((0x01, b"h2"), (0x02, b"example.com"))),
    ("v2-tcp6", v2(0x21, 0x21, IP6_BLOCK), 2, "PROXY", "TCP6", ("2001:db8::1", 1234), ("2001:db8::2", 443), ()),
    ("v2-tcp6-empty-noop-and-custom-tlv", v2(0x21, 0x21, IP6_BLOCK + tlv(PP2_TYPE_NOOP, b"") + tlv(0xE0, b"\x00" * 300)), 2, "PROXY", "TCP6", ("2001:db8::1", 1234), ("2001:db8::2", 443), ((0x04, b""), (0xE0, b"\x00" * 300))),
    ("v2-tcp4-zero-addresses", v2(0x21, 0x11, bytes(12)), 2, "PROXY", "TCP4", ("0.0.0.0", 0), ("0.0.0.0", 0), ()),
    ("v2-udp4-falls-back-to-unspec", v2(0x21, 0x12, IP4_BLOCK + tlv(PP2_TYPE_ALPN, b"h3")), 2, "PROXY", "UNSPEC", None, None, ((0x01, b"h3"),)),
    ("v2-udp6-falls-back-to-unspec", v2(0x21, 0x22, IP6_BLOCK), 2, "PROXY", "UNSPEC", None, None, ()),
    ("v2-unix-stream", v2(0x21, 0x31, UNIX_BLOCK + tlv(PP2_TYPE_AUTHORITY, b"local")), 2, "PROXY", "UNIX", None, None, ((0x02, b"local"),)),
    ("v2-unix-dgram", v2(0x21, 0x32, UNIX_BLOCK), 2, "PROXY", "UNSPEC", None, None, ()),
    ("v2-proxy-unspec-ignores-block", v2(0x21, 0x00, b"\xff" * 5), 2, "PROXY", "UNSPEC", None, None, ()),
    ("v2-local", v2(0x20, 0x00, b""), 2, "LOCAL", "UNSPEC", None, None, ()),
    ("v2-local-discards-addresses-and-tlvs", v2(0x20, 0x11, IP4_BLOCK + tlv(PP2_TYPE_ALPN, b"h2")), 2, "LOCAL", "UNSPEC", None, None, ()),
    ("v2-local-family-without-addresses", v2(0x20, 0x21, b""), 2, "LOCAL", "UNSPEC", None, None, ()),
    ("v2-local-any-valid-nibbles", v2(0x20, 0x10, b"\x01\x02\x03"), 2, "LOCAL", "UNSPEC", None, None, ()),
    ("v2-largest-header", v2(0x21, 0x11, IP4_BLOCK + tlv(PP2_TYPE_NOOP, bytes(MAX_V2_HEADER - 16 - 12 - 3))), 2, "PROXY", "TCP4", ("192.168.0.1", 56324), ("192.168.0.11", 443), ((0x04, bytes(MAX_V2_HEADER - 31)),)),
]  # fmt: skip

CASES = V1_CASES + V2_CASES
CASE_IDS = [case[0] for case in CASES]


def expected(case: Case) -> ProxyHeader:
    _, data, version, command, family, source, destination, tlvs = case
    return ProxyHeader(version, command, family, source, destination, tlvs, len(data))


def test_largest_cases_are_at_the_limits() -> None:
    lengths = {case[0]: len(case[1]) for case in CASES}
    assert lengths["v1-unknown-worst-case"] == MAX_V1_LINE == 107
    assert lengths["v1-tcp6-longest-uppercase"] == 104  # the spec's TCP6 maximum
    assert lengths["v1-tcp4-longest"] == 56  # the spec's TCP4 maximum
    assert lengths["v2-largest-header"] == MAX_V2_HEADER


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("as_type", AS_TYPES, ids=["bytes", "bytearray", "memoryview"])
def test_case_whole(case: Case, as_type: Callable[[bytes], Buffer]) -> None:
    data = as_type(case[1])
    assert parse_proxy_header(data) == expected(case)
    assert looks_like_proxy_protocol(data) is True


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_case_byte_by_byte(case: Case) -> None:
    data = case[1]
    for end in range(len(data)):
        assert parse_proxy_header(data[:end]) is None, f"prefix of {end} bytes"
        assert looks_like_proxy_protocol(data[:end]) in (None, True)
    assert parse_proxy_header(data) == expected(case)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("trailing", TRAILING)
def test_case_with_trailing_data(case: Case, trailing: bytes) -> None:
    header = parse_proxy_header(case[1] + trailing)
    assert header == expected(case)
    assert header.length == len(case[1])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_bytearray_can_grow_after_parsing(case: Case) -> None:
    # No view of the caller's buffer may outlive the call, or the bytearray could not grow.
    buffer = bytearray(case[1][:-1])
    assert parse_proxy_header(buffer) is None
    buffer += case[1][-1:]
    assert parse_proxy_header(buffer) == expected(case)
    buffer += b"more"
    del buffer[:4]


MALFORMED: list[tuple[str, bytes]] = [
    # not a PROXY header at all
    ("http-request", b"GET / HTTP/1.1\r\n\r\n"),
    ("tls-hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
    ("proxy-without-space", b"PROXY\r\n"),
    ("lowercase-proxy", b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("bad-signature-after-magic", b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c" + IP4_BLOCK),
    ("signature-cut-by-lf", b"\r\n\r\n\x00\n"),
    # v1 framing
    ("v1-bare-lf", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"),
    ("v1-bare-lf-unknown", b"PROXY UNKNOWN\n"),
    ("v1-bare-cr-then-crlf", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r2\r\n"),
    ("v1-no-crlf-in-107-bytes", b"PROXY UNKNOWN " + b"f" * 93),
    ("v1-crlf-after-107-bytes", f"PROXY UNKNOWN {IPV6_MAX} {IPV6_MAX} 65535 655355\r\n".encode()),
    ("v1-tcp6-line-too-long", f"PROXY TCP6 {IPV6_MAX} {IPV6_MAX} 65535 65535".encode() + b" " * 4 + b"\r\n"),
    # v1 fields
    ("v1-unknown-protocol", b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1-lowercase-protocol", b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1-udp4", b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1-unknown-glued", b"PROXY UNKNOWNX\r\n"),
    ("v1-empty-protocol", b"PROXY \r\n"),
    ("v1-protocol-only", b"PROXY TCP4\r\n"),
    ("v1-missing-port", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"),
    ("v1-extra-field", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n"),
    ("v1-double-space", b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1-trailing-space", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n"),
    ("v1-tab", b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n"),
    ("v1-port-65536", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n"),
    ("v1-port-99999", b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 2\r\n"),
    ("v1-port-six-digits", b"PROXY TCP4 1.2.3.4 5.6.7.8 100000 2\r\n"),
    ("v1-port-plus", b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 2\r\n"),
    ("v1-port-minus", b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n"),
    ("v1-port-heading-zero", b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n"),
    ("v1-port-hex", b"PROXY TCP4 1.2.3.4 5.6.7.8 0x50 2\r\n"),
    ("v1-port-underscore", b"PROXY TCP4 1.2.3.4 5.6.7.8 1_0 2\r\n"),
    ("v1-port-unicode-digit", "PROXY TCP4 1.2.3.4 5.6.7.8 \u0661 2\r\n".encode()),
    ("v1-port-empty", b"PROXY TCP4 1.2.3.4 5.6.7.8  2\r\n"),
    ("v1-ipv4-octet-256", b"PROXY TCP4 256.1.1.1 5.6.7.8 1 2\r\n"),
    ("v1-ipv4-three-octets", b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n"),
    ("v1-ipv4-heading-zero", b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1-ipv4-hostname", b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n"),
    ("v1-ipv4-empty", b"PROXY TCP4  5.6.7.8 1 2\r\n"),
    ("v1-tcp4-with-ipv6-source", b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n"),
    ("v1-tcp4-with-ipv6-destination", b"PROXY TCP4 1.2.3.4 2001:db8::1 1 2\r\n"),
    ("v1-tcp6-with-ipv4", b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n"),
    ("v1-ipv6-scope", b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n"),
    ("v1-ipv6-two-double-colons", b"PROXY TCP6 1::2::3 ::1 1 2\r\n"),
    ("v1-ipv6-five-hex-digits", b"PROXY TCP6 12345::1 ::1 1 2\r\n"),
    ("v1-ipv6-nine-groups", b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n"),
    ("v1-non-ascii-address", "PROXY TCP4 1.2.3.\u0664 5.6.7.8 1 2\r\n".encode()),
    # v2 fixed header
    ("v2-version-1", v2(0x11, 0x11, IP4_BLOCK)),
    ("v2-version-0", v2(0x01, 0x11, IP4_BLOCK)),
    ("v2-version-3", v2(0x31, 0x11, IP4_BLOCK)),
    ("v2-command-2", v2(0x22, 0x11, IP4_BLOCK)),
    ("v2-command-15", v2(0x2F, 0x00, b"")),
    ("v2-family-4", v2(0x21, 0x41, IP4_BLOCK)),
    ("v2-family-15-local", v2(0x20, 0xF0, b"")),
    ("v2-transport-3", v2(0x21, 0x13, IP4_BLOCK)),
    ("v2-transport-3-local", v2(0x20, 0x03, b"")),
    ("v2-inet-with-unspec-transport", v2(0x21, 0x10, IP4_BLOCK)),
    ("v2-unspec-with-stream-transport", v2(0x21, 0x01, b"")),
    # v2 lengths
    ("v2-tcp4-len-0", v2(0x21, 0x11, b"")),
    ("v2-tcp4-truncated-address-block", v2(0x21, 0x11, IP4_BLOCK[:8])),
    ("v2-tcp4-len-11", v2(0x21, 0x11, IP4_BLOCK[:11])),
    ("v2-tcp6-with-ipv4-block", v2(0x21, 0x21, IP4_BLOCK)),
    ("v2-tcp6-len-35", v2(0x21, 0x21, IP6_BLOCK[:35])),
    ("v2-unix-len-108", v2(0x21, 0x31, UNIX_BLOCK[:108])),
    ("v2-header-len-4097", v2(0x21, 0x11, IP4_BLOCK, length=MAX_V2_HEADER - 16 + 1)),
    ("v2-header-len-65535", v2(0x21, 0x11, IP4_BLOCK, length=0xFFFF)),
    ("v2-local-too-long", v2(0x20, 0x00, b"", length=0xFFFF)),
    # v2 TLVs
    ("v2-tlv-overruns-header", v2(0x21, 0x11, IP4_BLOCK + b"\x01\x00\x05h2")),
    ("v2-tlv-overruns-by-one", v2(0x21, 0x11, IP4_BLOCK + tlv(0x02, b"example.com")[:-1])),
    ("v2-tlv-header-cut-1", v2(0x21, 0x11, IP4_BLOCK + b"\x01")),
    ("v2-tlv-header-cut-2", v2(0x21, 0x21, IP6_BLOCK + tlv(0x01, b"h2") + b"\x01\x00")),
    ("v2-tlv-length-65535", v2(0x21, 0x11, IP4_BLOCK + b"\x04\xff\xff" + bytes(100))),
]  # fmt: skip
MALFORMED_IDS = [name for name, _ in MALFORMED]


@pytest.mark.parametrize(("name", "data"), MALFORMED, ids=MALFORMED_IDS)
@pytest.mark.parametrize("as_type", AS_TYPES, ids=["bytes", "bytearray", "memoryview"])
def test_malformed(name: str, data: bytes, as_type: Callable[[bytes], Buffer]) -> None:
    with pytest.raises(ProxyProtocolError) as info:
        parse_proxy_header(as_type(data))
    assert isinstance(info.value, ProtocolError)
    assert info.value.status in (400, 431)


@pytest.mark.parametrize(("name", "data"), MALFORMED, ids=MALFORMED_IDS)
@pytest.mark.parametrize("trailing", TRAILING)
def test_malformed_with_trailing_data(name: str, data: bytes, trailing: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(data + trailing)


@pytest.mark.parametrize(("name", "data"), MALFORMED, ids=MALFORMED_IDS)
def test_malformed_byte_by_byte(name: str, data: bytes) -> None:
    # Every prefix waits or fails; once failed, longer input fails too.
    failed = False
    for end in range(len(data) + 1):
        try:
            assert parse_proxy_header(data[:end]) is None, f"prefix of {end} bytes"
        except ProxyProtocolError:
            failed = True
        else:
            assert not failed, f"prefix of {end} bytes parsed after a shorter one failed"
    assert failed


@pytest.mark.parametrize(
    ("data", "end"),
    [
        (v2(0x11, 0x11, IP4_BLOCK), 13),  # bad version, seen at its byte
        (v2(0x23, 0x11, IP4_BLOCK), 13),  # bad command
        (v2(0x21, 0x51, IP4_BLOCK), 14),  # bad family
        (v2(0x21, 0x10, IP4_BLOCK), 14),  # invalid pair for PROXY
        (v2(0x21, 0x11, b"", length=0xFFFF), 16),  # too long: no need to wait for 64 KiB
        (b"PROXY TCP9", 10),
        (b"PROXY UNK\xff", 10),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", 31),
        (b"\r\n\r\n\x00\r\nQUIX", 11),
        (b"GET", 1),
    ],
)
def test_rejected_as_soon_as_possible(data: bytes, end: int) -> None:
    assert parse_proxy_header(data[: end - 1]) is None
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(data[:end])


def test_oversized_v2_header_hints_431() -> None:
    with pytest.raises(ProxyProtocolError) as info:
        parse_proxy_header(v2(0x21, 0x11, b"", length=MAX_V2_HEADER))
    assert info.value.status == 431


def test_malformed_error_leaves_bytearray_resizable() -> None:
    buffer = bytearray(v2(0x21, 0x11, IP4_BLOCK + b"\x01\x00\x05h2"))
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(buffer)
    buffer += b"x"
    del buffer[:16]


LOOKS_LIKE: list[tuple[bytes, bool | None]] = [
    (b"", None),
    (b"P", None),
    (b"PROXY", None),
    (b"PROXY ", True),
    (b"PROXY TCP4 garbage", True),
    (b"\r", None),
    (b"\r\n\r\n\x00\r\nQUIT", None),
    (V2_SIGNATURE, True),
    (V2_SIGNATURE + b"\x11", True),  # the signature decides; the parser judges the rest
    (b"PROXX", False),
    (b"PROXY\r\n", False),
    (b"GET / HTTP/1.1\r\n", False),
    (b"\x16\x03\x01", False),
    (b"\r\n\r\n\x00\r\nQUIX\n", False),
    (b"\r\n\r\n\x01", False),
]


@pytest.mark.parametrize(("data", "answer"), LOOKS_LIKE)
@pytest.mark.parametrize("as_type", AS_TYPES, ids=["bytes", "bytearray", "memoryview"])
def test_looks_like_proxy_protocol(
    data: bytes, answer: bool | None, as_type: Callable[[bytes], Buffer]
) -> None:
    assert looks_like_proxy_protocol(as_type(data)) is answer


# -- encoders ----------------------------------------------------------------------------------

ENCODED: list[tuple[tuple[str, int], tuple[str, int], bytes, bytes]] = [
    (("192.168.0.1", 56324), ("192.168.0.11", 443), V1_CASES[0][1], V2_CASES[0][1]),
    (("2001:db8::1", 1234), ("2001:db8::2", 443), V1_CASES[3][1], V2_CASES[2][1]),
    (("2001:DB8:0::1", 1234), ("2001:db8::2", 443), V1_CASES[3][1], V2_CASES[2][1]),
    # IPv4-mapped addresses (a dual-stack listener) go out as TCP4.
    (("::ffff:192.168.0.1", 56324), ("::ffff:192.168.0.11", 443), V1_CASES[0][1], V2_CASES[0][1]),
    (("::ffff:192.168.0.1", 56324), ("192.168.0.11", 443), V1_CASES[0][1], V2_CASES[0][1]),
    (("192.168.0.1", 56324), ("::ffff:c0a8:b", 443), V1_CASES[0][1], V2_CASES[0][1]),
]


@pytest.mark.parametrize(("source", "destination", "line", "binary"), ENCODED)
def test_encode_exact_bytes(
    source: tuple[str, int], destination: tuple[str, int], line: bytes, binary: bytes
) -> None:
    assert encode_v1(source, destination) == line
    assert encode_v2(source, destination) == binary


def test_encode_v2_with_tlvs() -> None:
    tlvs = [(PP2_TYPE_ALPN, b"h2"), (PP2_TYPE_AUTHORITY, b"example.com")]
    encoded = encode_v2(("192.168.0.1", 56324), ("192.168.0.11", 443), tlvs=tlvs)
    assert encoded == V2_CASES[1][1]


def test_encode_v2_local() -> None:
    assert encode_v2_local() == V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert parse_proxy_header(encode_v2_local()) == ProxyHeader(
        2, "LOCAL", "UNSPEC", None, None, (), 16
    )


def ip6(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


def unmapped(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


TCP4, TCP6 = 0x11, 0x21
# The client's family decides; the destination is converted to it (IPv4 into IPv6 as its mapped
# form, an IPv6 address that IPv4 cannot say as 0.0.0.0); ports are kept.
# (client, destination, v1 line, v2 family, v2 address block)
MIXED: list[tuple[tuple[str, int], tuple[str, int], bytes, int, bytes]] = [
    (("192.0.2.1", 1), ("192.0.2.2", 2), b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
     TCP4, bytes([192, 0, 2, 1, 192, 0, 2, 2]) + u16(1) + u16(2)),
    (("2001:db8::7", 1), ("2001:db8::1", 2), b"PROXY TCP6 2001:db8::7 2001:db8::1 1 2\r\n",
     TCP6, ip6("2001:db8::7") + ip6("2001:db8::1") + u16(1) + u16(2)),
    (("2001:db8::7", 40000), ("192.0.2.2", 443),
     b"PROXY TCP6 2001:db8::7 ::ffff:192.0.2.2 40000 443\r\n",
     TCP6, ip6("2001:db8::7") + ip6("::ffff:192.0.2.2") + u16(40000) + u16(443)),
    (("192.0.2.1", 40000), ("2001:db8::1", 443), b"PROXY TCP4 192.0.2.1 0.0.0.0 40000 443\r\n",
     TCP4, bytes([192, 0, 2, 1, 0, 0, 0, 0]) + u16(40000) + u16(443)),
    # Mapped forms are IPv4 addresses, on either side.
    (("::ffff:192.0.2.1", 1), ("2001:db8::1", 2), b"PROXY TCP4 192.0.2.1 0.0.0.0 1 2\r\n",
     TCP4, bytes([192, 0, 2, 1, 0, 0, 0, 0]) + u16(1) + u16(2)),
    (("::ffff:192.0.2.1", 1), ("192.0.2.2", 2), b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
     TCP4, bytes([192, 0, 2, 1, 192, 0, 2, 2]) + u16(1) + u16(2)),
    (("2001:db8::7", 1), ("::ffff:192.0.2.2", 2), b"PROXY TCP6 2001:db8::7 ::ffff:192.0.2.2 1 2\r\n",
     TCP6, ip6("2001:db8::7") + ip6("::ffff:192.0.2.2") + u16(1) + u16(2)),
    (("192.0.2.1", 1), ("::ffff:c000:202", 2), b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
     TCP4, bytes([192, 0, 2, 1, 192, 0, 2, 2]) + u16(1) + u16(2)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("source", "destination", "line", "family", "block"),
    MIXED,
    ids=["4-4", "6-6", "6-4", "4-6", "mapped-6", "mapped-4", "6-mapped", "4-mapped"],
)
def test_encoders_announce_the_clients_family(
    source: tuple[str, int], destination: tuple[str, int], line: bytes, family: int, block: bytes
) -> None:
    assert encode_v1(source, destination) == line
    assert encode_v2(source, destination) == v2(0x21, family, block)
    for header in (parse_proxy_header(line), parse_proxy_header(encode_v2(source, destination))):
        assert header is not None and header.source is not None
        assert (ipaddress.ip_address(header.source[0]), header.source[1]) == (
            unmapped(source[0]),
            source[1],
        )


def test_encode_drops_ipv6_scope() -> None:
    assert encode_v1(("fe80::1%eth0", 1), ("fe80::2%2", 2)) == b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"
    header = parse_proxy_header(encode_v2(("fe80::1%eth0", 1), ("fe80::2", 2)))
    assert header is not None and header.source == ("fe80::1", 1)


BAD_ENCODER_INPUT: list[tuple[tuple[str, int], tuple[str, int]]] = [
    (("1.2.3.4", 1), ("example.com", 2)),
    (("example.com", 1), ("1.2.3.4", 2)),
    (("1.2.3.4", -1), ("5.6.7.8", 2)),
    (("1.2.3.4", 1), ("5.6.7.8", 65536)),
]


@pytest.mark.parametrize(("source", "destination"), BAD_ENCODER_INPUT)
def test_encoders_reject_bad_input(source: tuple[str, int], destination: tuple[str, int]) -> None:
    with pytest.raises(ValueError):
        encode_v1(source, destination)
    with pytest.raises(ValueError):
        encode_v2(source, destination)


@pytest.mark.parametrize(
    "tlvs",
    [
        [(256, b"")],
        [(-1, b"")],
        [(0x04, bytes(0x10000))],
        [(0x04, bytes(MAX_V2_HEADER - 16 - 12 - 3 + 1))],  # one byte over the header limit
    ],
)
def test_encode_v2_rejects_bad_tlvs(tlvs: list[tuple[int, bytes]]) -> None:
    with pytest.raises(ValueError):
        encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs=tlvs)


# -- properties --------------------------------------------------------------------------------

ports = st.integers(0, 0xFFFF)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
tlv_lists = st.lists(st.tuples(st.integers(0, 0xFF), st.binary(max_size=64)), max_size=8)


def expected_pair(
    source: tuple[str, int], destination: tuple[str, int]
) -> tuple[str, tuple[str, int], tuple[str, int]]:
    """Family and canonical endpoints the encoders should announce for this pair."""
    src, dst = unmapped(source[0]), unmapped(destination[0])
    if src.version == 4:
        dst4 = dst if isinstance(dst, ipaddress.IPv4Address) else ipaddress.IPv4Address(0)
        return "TCP4", (str(src), source[1]), (str(dst4), destination[1])
    if isinstance(dst, ipaddress.IPv4Address):
        dst = ipaddress.IPv6Address(f"::ffff:{dst}")
    return "TCP6", (str(src), source[1]), (str(dst), destination[1])


addresses = st.one_of(ipv4, ipv6, st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"))
endpoint_pairs = st.tuples(st.tuples(addresses, ports), st.tuples(addresses, ports))


@settings(max_examples=300, deadline=None)
@given(endpoint_pairs, st.sampled_from(TRAILING + [b""]))
def test_round_trip_v1(pair: tuple[tuple[str, int], tuple[str, int]], trailing: bytes) -> None:
    source, destination = pair
    line = encode_v1(source, destination)
    assert len(line) <= MAX_V1_LINE
    family, src, dst = expected_pair(source, destination)
    assert parse_proxy_header(line + trailing) == ProxyHeader(
        1, "PROXY", family, src, dst, (), len(line)
    )


@settings(max_examples=300, deadline=None)
@given(endpoint_pairs, tlv_lists, st.sampled_from(TRAILING + [b""]))
def test_round_trip_v2(
    pair: tuple[tuple[str, int], tuple[str, int]],
    tlvs: list[tuple[int, bytes]],
    trailing: bytes,
) -> None:
    source, destination = pair
    header = encode_v2(source, destination, tlvs=tlvs)
    family, src, dst = expected_pair(source, destination)
    assert parse_proxy_header(bytearray(header + trailing)) == ProxyHeader(
        2, "PROXY", family, src, dst, tuple(tlvs), len(header)
    )


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        ipv4,
        st.text(alphabet="0123456789.", max_size=16),
        st.lists(st.integers(0, 999).map(str), min_size=4, max_size=4).map(".".join),
    )
)
def test_v1_ipv4_agrees_with_ipaddress(text: str) -> None:
    # The v1 parser checks IPv4 text with a pattern; it must accept exactly what ipaddress does.
    line = f"PROXY TCP4 {text} 127.0.0.1 1 2\r\n".encode()
    try:
        canonical = str(ipaddress.IPv4Address(text))
    except ValueError:
        with pytest.raises(ProxyProtocolError):
            parse_proxy_header(line)
    else:
        header = parse_proxy_header(line)
        assert header is not None and header.source == (canonical, 1)


def check_any_bytes(data: bytes) -> None:
    """The parser's contract on arbitrary input, and its consistency with longer input."""
    try:
        header = parse_proxy_header(data)
    except ProxyProtocolError:
        assert looks_like_proxy_protocol(data) is not None
        with pytest.raises(ProxyProtocolError):
            parse_proxy_header(data + b"\r\n" + bytes(200))
        return
    if header is None:
        assert looks_like_proxy_protocol(data) is not False
        return
    assert isinstance(header, ProxyHeader)
    assert looks_like_proxy_protocol(data) is True
    assert 0 < header.length <= len(data)
    assert header.version in (1, 2)
    assert header.command in ("PROXY", "LOCAL")
    assert header.family in ("TCP4", "TCP6", "UNIX", "UNSPEC")
    assert (header.source is None) == (header.destination is None)
    assert (header.source is not None) == (header.family in ("TCP4", "TCP6"))
    # The header is self-delimiting: what follows it never matters.
    assert parse_proxy_header(data[: header.length]) == header
    assert parse_proxy_header(memoryview(data + b"\x00\n\r")) == header


v2_heads = st.tuples(st.integers(0, 0xFF), st.integers(0, 0xFF), st.integers(0, 300)).map(
    lambda t: V2_SIGNATURE + bytes(t[:2]) + u16(t[2])
)
v2_plausible = st.tuples(
    st.sampled_from([0x20, 0x21]),
    st.sampled_from([0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32]),
    st.integers(0, 300),
).map(lambda t: V2_SIGNATURE + bytes(t[:2]) + u16(t[2]))
v1_words = st.lists(
    st.sampled_from(
        [b"TCP4", b"TCP6", b"UNKNOWN", b"1.2.3.4", b"::1", b"0", b"65535", b"65536", b"01"]
    )
    | st.binary(max_size=6),
    max_size=7,
).map(lambda words: b"PROXY " + b" ".join(words))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes(data: bytes) -> None:
    check_any_bytes(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_after_v2_signature(rest: bytes) -> None:
    check_any_bytes(V2_SIGNATURE + rest)


@settings(max_examples=300, deadline=None)
@given(st.one_of(v2_heads, v2_plausible), st.binary(max_size=400))
def test_any_bytes_after_v2_fixed_header(head: bytes, rest: bytes) -> None:
    check_any_bytes(head + rest)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=150))
def test_any_bytes_after_v1_prefix(rest: bytes) -> None:
    check_any_bytes(b"PROXY " + rest)


@settings(max_examples=300, deadline=None)
@given(v1_words, st.sampled_from([b"\r\n", b"\n", b"\r", b""]), st.binary(max_size=20))
def test_any_v1_words(line: bytes, end: bytes, rest: bytes) -> None:
    check_any_bytes(line + end + rest)
