"""The ClientHello parser against real captured hellos, re-cut records and malformed input."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable
from typing import TypedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import FIXTURES

from smartroute.errors import TlsParseError
from smartroute.protocols.tls import (
    MAX_HELLO_SIZE,
    MAX_RECORD_SIZE,
    ClientHello,
    looks_like_tls,
    parse_client_hello,
)


class Expected(TypedDict):
    client: str
    sni: str | None
    alpn: list[str]
    versions: list[str]
    bytes: int


HELLOS = FIXTURES / "clienthello"
EXPECTED: dict[str, Expected] = json.loads((HELLOS / "expected.json").read_text())
FIXTURE_NAMES = sorted(EXPECTED)
FIXTURE_BYTES = {name: (HELLOS / name).read_bytes() for name in FIXTURE_NAMES}

# Whatever follows the hello must not change it: early data, the start of another record, junk.
TRAILING = [b"\x17\x03\x03\x00\x05hello", b"\x16", b"\x16\x03\x03\x00\x01\x01", b"\x00\xff"]


def u8(value: int) -> bytes:
    return value.to_bytes(1, "big")


def u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def to_records(message: bytes, sizes: Iterable[int], version: bytes = b"\x03\x01") -> bytes:
    """Wrap a handshake message into handshake records carrying ``sizes`` bytes each."""
    out = bytearray()
    pos = 0
    for size in sizes:
        if pos >= len(message):
            break
        fragment = message[pos : pos + size]
        out += b"\x16" + version + u16(len(fragment)) + fragment
        pos += size
    assert pos >= len(message), "sizes ran out before the message did"
    return bytes(out)


def record(message: bytes) -> bytes:
    """One handshake record holding the whole message."""
    return to_records(message, [len(message)])


def message_of(fixture: bytes) -> bytes:
    """The handshake message of a single-record fixture."""
    assert fixture[0] == 0x16 and int.from_bytes(fixture[3:5], "big") == len(fixture) - 5
    return fixture[5:]


def hello(
    extensions: list[tuple[int, bytes]] | None = None,
    *,
    version: bytes = b"\x03\x03",
    session_id: bytes = b"",
    suites: bytes = b"\x13\x01\x13\x02",
    compression: bytes = b"\x00",
    raw_extensions: bytes | None = None,
    msg_type: int = 1,
) -> bytes:
    """A ClientHello handshake message; ``raw_extensions`` replaces the extension block."""
    body = version + bytes(range(32)) + u8(len(session_id)) + session_id
    body += u16(len(suites)) + suites + u8(len(compression)) + compression
    if extensions is not None:
        block = b"".join(u16(kind) + u16(len(data)) + data for kind, data in extensions)
        body += u16(len(block)) + block
    if raw_extensions is not None:
        body += raw_extensions
    return handshake(body, msg_type)


def handshake(body: bytes, msg_type: int = 1) -> bytes:
    """A handshake message: type, 24-bit length, body."""
    return u8(msg_type) + len(body).to_bytes(3, "big") + body


def sni(*names: bytes, name_type: int = 0) -> tuple[int, bytes]:
    entries = b"".join(u8(name_type) + u16(len(name)) + name for name in names)
    return 0, u16(len(entries)) + entries


def alpn(*names: bytes) -> tuple[int, bytes]:
    entries = b"".join(u8(len(name)) + name for name in names)
    return 16, u16(len(entries)) + entries


def versions(*codes: int) -> tuple[int, bytes]:
    return 43, u8(2 * len(codes)) + b"".join(u16(code) for code in codes)


def replay(data: bytes) -> ClientHello:
    """Every proper prefix needs more bytes; the whole gives the result, also with trailing data
    and as bytearray or memoryview."""
    for end in range(len(data)):
        assert parse_client_hello(data[:end]) is None, f"prefix of {end} bytes"
    result = parse_client_hello(data)
    assert result is not None
    assert result.length == len(data)
    for trailing in TRAILING:
        assert parse_client_hello(data + trailing) == result
    assert parse_client_hello(bytearray(data)) == result
    assert parse_client_hello(memoryview(data)) == result
    return result


def replay_error(data: bytes) -> TlsParseError:
    """No prefix gives a result, and the whole raises (also with trailing data)."""
    for end in range(len(data)):
        try:
            assert parse_client_hello(data[:end]) is None, f"prefix of {end} bytes"
        except TlsParseError:
            pass
    for trailing in [b"", *TRAILING]:
        with pytest.raises(TlsParseError):
            parse_client_hello(data + trailing)
    with pytest.raises(TlsParseError) as info:
        parse_client_hello(data)
    return info.value


def check_expected(result: ClientHello | None, name: str) -> None:
    """sni, alpn and versions as expected.json has them for fixture ``name``."""
    expected = EXPECTED[name]
    assert result is not None
    assert result.sni == expected["sni"]
    assert list(result.alpn) == expected["alpn"]
    assert list(result.versions) == expected["versions"]


# --- real captured hellos ------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture(name: str) -> None:
    result = replay(FIXTURE_BYTES[name])
    check_expected(result, name)
    assert result.length == EXPECTED[name]["bytes"] == len(FIXTURE_BYTES[name])


# How to re-cut a handshake message into records: fragment sizes, given the message length.
CUTS: dict[str, Callable[[int], Iterable[int]]] = {
    "2 records": lambda size: [size // 2, size],
    "3 records": lambda size: [size // 3, size // 3, size],
    "7-byte records": lambda size: itertools.repeat(7),
    "100-byte records": lambda size: itertools.repeat(100),
    "1, then 7, then the rest": lambda size: [1, 7, size],
}


@pytest.mark.parametrize("cut", list(CUTS))
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_recut_into_records(name: str, cut: str) -> None:
    message = message_of(FIXTURE_BYTES[name])
    data = to_records(message, CUTS[cut](len(message)), version=b"\x03\x03")
    assert data.count(b"\x16\x03\x03") >= 2
    check_expected(replay(data), name)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_in_one_byte_records_fed_record_by_record(name: str) -> None:
    # Byte-by-byte over ~3 KB of 1-byte records is slow; feed every record boundary and the
    # middle of each record header instead.
    message = message_of(FIXTURE_BYTES[name])
    data = to_records(message, itertools.repeat(1))
    for end in range(0, len(data), 6):
        assert parse_client_hello(data[:end]) is None
        assert parse_client_hello(data[: end + 3]) is None
    result = parse_client_hello(data + TRAILING[0])
    check_expected(result, name)
    assert result is not None and result.length == len(data) == 6 * len(message)


def test_fixtures_fed_in_tcp_reads_across_records() -> None:
    # A caller appending each read to a bytearray and reparsing, reads not aligned to records.
    message = message_of(FIXTURE_BYTES["curl.bin"])
    data = to_records(message, itertools.repeat(100))
    buffer = bytearray()
    results = []
    for start in range(0, len(data), 37):
        buffer += data[start : start + 37]
        results.append(parse_client_hello(buffer))
    assert results[:-1] == [None] * (len(results) - 1)
    assert results[-1] is not None and results[-1].sni == "curl.example.test"


# --- hand-built hellos ---------------------------------------------------------------------

GOOD: dict[str, tuple[bytes, str | None, tuple[str, ...], tuple[str, ...]]] = {
    "no extensions (old client)": (hello(None, version=b"\x03\x01"), None, (), ("TLSv1",)),
    "empty extension block": (hello([]), None, (), ("TLSv1.2",)),
    "SSLv3 legacy version only": (hello([], version=b"\x03\x00"), None, (), ()),
    "GREASE everywhere": (
        hello(
            [
                (0x0A0A, b""),
                sni(b"grease.example"),
                versions(0x3A3A, 0x0304, 0x7F1C, 0x0303, 0xFAFA),
                alpn(b"h2"),
                (0xDADA, b"\x00"),
            ]
        ),
        "grease.example",
        ("h2",),
        ("TLSv1.3", "TLSv1.2"),
    ),
    "SNI normalised": (hello([sni(b"WWW.Example.COM.")]), "www.example.com", (), ("TLSv1.2",)),
    "SNI with underscore and digits": (
        hello([sni(b"_acme.1-a.test")]),
        "_acme.1-a.test",
        (),
        ("TLSv1.2",),
    ),
    "ALPN order kept": (
        hello([alpn(b"http/1.1", b"h2", b"acme-tls/1")]),
        None,
        ("http/1.1", "h2", "acme-tls/1"),
        ("TLSv1.2",),
    ),
    "only unknown versions": (hello([versions(0x7F1C, 0x2A2A)]), None, (), ()),
    "session id 32 bytes": (hello([], session_id=bytes(32)), None, (), ("TLSv1.2",)),
}


@pytest.mark.parametrize("case", list(GOOD), ids=list(GOOD))
def test_hand_built(case: str) -> None:
    message, want_sni, want_alpn, want_versions = GOOD[case]
    for data in (record(message), to_records(message, [3, 1, 40, 1000])):
        result = replay(data)
        assert (result.sni, result.alpn, result.versions) == (want_sni, want_alpn, want_versions)


def test_highest_version() -> None:
    def with_versions(*names: str) -> ClientHello:
        return ClientHello(sni=None, alpn=(), versions=names, length=0)

    assert with_versions("TLSv1.2", "TLSv1.3", "TLSv1").highest_version == "TLSv1.3"
    assert with_versions("TLSv1", "TLSv1.1").highest_version == "TLSv1.1"
    assert with_versions().highest_version is None
    parsed = parse_client_hello(FIXTURE_BYTES["openssl12.bin"])
    assert parsed is not None and parsed.highest_version == "TLSv1.2"


BIG = MAX_RECORD_SIZE + 1
BAD: dict[str, tuple[bytes, str]] = {  # input, and a piece of the error message
    "application data record": (b"\x17\x03\x03\x00\x05hello", "content type 23"),
    "alert record": (b"\x15\x03\x03\x00\x02\x02\x28", "content type 21"),
    "HTTP request": (b"GET / HTTP/1.1\r\n\r\n", "content type 71"),
    "record version 2.0": (b"\x16\x02\x00\x00\x05" + hello([])[:5], "version major 2"),
    "record version 3.5": (b"\x16\x03\x05\x00\x05" + hello([])[:5], "version 3.5"),
    "empty record": (b"\x16\x03\x01\x00\x00", "empty TLS handshake record"),
    "record too long": (b"\x16\x03\x01" + u16(BIG) + b"\x01", "18433 bytes exceeds"),
    "handshake type 2 (ServerHello)": (record(hello([], msg_type=2)), "got type 2"),
    "hello too long": (
        b"\x16\x03\x01\x00\x04\x01" + (MAX_HELLO_SIZE + 1).to_bytes(3, "big"),
        "65537 bytes exceeds",
    ),
    "change cipher spec between fragments": (
        (
            to_records(hello([sni(b"a.test")])[:10], [10])
            + b"\x14\x03\x03\x00\x01\x01"
            + to_records(hello([sni(b"a.test")])[10:], [1000])
        ),
        "content type 20",
    ),
    "data after the hello in its record": (
        record(hello([]) + b"\x02\x00\x00\x00"),
        "unexpected data after the ClientHello",
    ),
    "handshake length too short": (
        record(b"\x01\x00\x00\x0a" + bytes(10)),
        "truncated before the session id",
    ),
    "hello version 2.0": (record(hello([], version=b"\x02\x00")), "version 2.0"),
    "ends after the session id": (
        record(handshake(b"\x03\x03" + bytes(32) + b"\x00")),
        "truncated before the cipher suites",
    ),
    "ends after the cipher suites": (
        record(handshake(b"\x03\x03" + bytes(32) + b"\x00" + u16(2) + b"\x13\x01")),
        "truncated before the compression methods",
    ),
    "session id 33 bytes": (record(hello([], session_id=bytes(33))), "session id of 33"),
    "odd cipher suites length": (
        record(hello([], suites=b"\x13\x01\x13")),
        "cipher suites length 3",
    ),
    "no cipher suites": (record(hello([], suites=b"")), "cipher suites length 0"),
    "no compression methods": (record(hello([], compression=b"")), "no compression methods"),
    "compression runs past the end": (
        record(handshake(b"\x03\x03" + bytes(32) + b"\x00" + u16(2) + b"\x13\x01" + b"\x05\x00")),
        "truncated in the compression methods",
    ),
    "extensions length one byte": (
        record(hello(None, raw_extensions=b"\x00")),
        "truncated in the extensions length",
    ),
    "extensions length too long": (
        record(hello(None, raw_extensions=u16(10) + bytes(8))),
        "extensions length 10",
    ),
    "extensions length too short": (
        record(hello(None, raw_extensions=u16(4) + bytes(8))),
        "extensions length 4",
    ),
    "truncated extension header": (
        record(hello(None, raw_extensions=u16(3) + b"\x00\x17\x00")),
        "truncated extension header",
    ),
    "truncated extension": (
        record(hello(None, raw_extensions=u16(7) + u16(0x17) + u16(10) + b"abc")),
        "extension 23 runs past",
    ),
    "duplicate extension": (
        record(hello([alpn(b"h2"), alpn(b"h2")])),
        "extension 16 appears twice",
    ),
    "SNI non-ASCII": (record(hello([sni("bücher.example".encode())])), "not a valid host name"),
    "SNI with space": (record(hello([sni(b"a b.example")])), "not a valid host name"),
    "SNI empty name": (record(hello([sni(b"")])), "not a valid host name"),
    "SNI empty label": (record(hello([sni(b"a..example")])), "not a valid host name"),
    "SNI only a dot": (record(hello([sni(b".")])), "not a valid host name"),
    "SNI label of 64": (record(hello([sni(b"a" * 64 + b".example")])), "not a valid host name"),
    "SNI name of 300": (record(hello([sni(b"abcdefghi." * 30)])), "not a valid host name"),
    "SNI NUL byte": (record(hello([sni(b"a.example\x00.evil")])), "not a valid host name"),
    "SNI name type 1": (record(hello([sni(b"a.example", name_type=1)])), "server_name type 1"),
    "SNI two host names": (
        record(hello([sni(b"a.example", b"b.example")])),
        "more than one host_name",
    ),
    "SNI empty extension": (record(hello([(0, b"")])), "server_name extension too short"),
    "SNI empty list": (record(hello([(0, u16(0))])), "server_name list length"),
    "SNI list length wrong": (
        record(hello([(0, u16(20) + b"\x00" + u16(1) + b"a")])),
        "server_name list length",
    ),
    "SNI name runs past list": (
        record(hello([(0, u16(4) + b"\x00" + u16(9) + b"a")])),
        "runs past its list",
    ),
    "SNI truncated entry": (
        record(hello([(0, u16(2) + b"\x00\x00")])),
        "truncated server_name entry",
    ),
    "ALPN empty name": (record(hello([alpn(b"h2", b"")])), "empty ALPN protocol name"),
    "ALPN empty list": (record(hello([(16, u16(0))])), "ALPN list length"),
    "ALPN one byte": (record(hello([(16, b"\x00")])), "ALPN extension too short"),
    "ALPN list length wrong": (record(hello([(16, u16(9) + b"\x02h2")])), "ALPN list length"),
    "ALPN name runs past list": (record(hello([(16, u16(3) + b"\x05h2")])), "runs past its list"),
    "supported_versions empty": (
        record(hello([(43, b"")])),
        "supported_versions extension too short",
    ),
    "supported_versions zero": (record(hello([(43, b"\x00")])), "supported_versions list length"),
    "supported_versions odd": (
        record(hello([(43, b"\x03\x03\x04\x03")])),
        "supported_versions list length",
    ),
    "supported_versions length wrong": (
        record(hello([(43, b"\x04\x03\x04")])),
        "supported_versions list length",
    ),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_malformed(case: str) -> None:
    data, message = BAD[case]
    error = replay_error(data)
    assert message in str(error)
    assert error.status == 400


def test_malformed_fixture_truncated_inside_record() -> None:
    # The record claims fewer bytes than the handshake header promises: the hello ends early.
    data = FIXTURE_BYTES["node.bin"]
    cut = data[:3] + u16(100) + data[5:105]
    assert parse_client_hello(cut) is None  # still waiting for the next record...
    with pytest.raises(TlsParseError):  # ...which is not a handshake record
        parse_client_hello(cut + b"\x17\x03\x03\x00\x01\x00")


def test_errors_release_the_callers_buffer() -> None:
    # A bytearray the caller keeps appending to must stay resizable after an error.
    # The parser keeps no memoryview of it, even in the traceback that is still alive here.
    for data in (record(hello([sni(b"bad name")])), BAD["empty record"][0], BAD["SNI NUL byte"][0]):
        buffer = bytearray(data)
        with pytest.raises(TlsParseError) as info:
            parse_client_hello(buffer)
        buffer += b"more"
        assert info.value is not None


LOOKS: list[tuple[bytes, bool | None]] = [
    (b"", None),
    (b"\x16", None),
    (b"\x16\x03", None),
    (b"\x16\x03\x01", True),
    (b"\x16\x03\x00\x00", True),
    (b"\x16\x03\x04", True),
    (b"\x16\x03\x05", False),
    (b"\x16\x02", False),
    (b"\x17\x03\x03", False),
    (b"G", False),
    (b"GET / HTTP/1.1\r\n", False),
]


@pytest.mark.parametrize(("data", "expected"), LOOKS)
def test_looks_like_tls(data: bytes, expected: bool | None) -> None:
    assert looks_like_tls(data) is expected
    assert looks_like_tls(bytearray(data)) is expected
    assert looks_like_tls(memoryview(data)) is expected


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_looks_like_tls_on_fixtures(name: str) -> None:
    assert looks_like_tls(FIXTURE_BYTES[name]) is True


# --- properties ----------------------------------------------------------------------------


def check_outcome(data: bytes) -> ClientHello | None:
    """Any input gives a ClientHello, None or TlsParseError; a result is stable and minimal."""
    try:
        result = parse_client_hello(data)
    except TlsParseError:
        return None
    if result is not None:
        assert isinstance(result, ClientHello)
        assert 0 < result.length <= len(data)
        assert parse_client_hello(data[: result.length]) == result
        assert parse_client_hello(data[: result.length - 1]) is None
    return result


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_property_any_bytes(data: bytes) -> None:
    check_outcome(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFF), st.binary(max_size=600))
def test_property_after_a_plausible_header(
    record_size: int, hello_size: int, payload: bytes
) -> None:
    header = b"\x16\x03\x01" + u16(record_size) + b"\x01" + hello_size.to_bytes(3, "big")
    check_outcome(header + payload)
    body = b"\x01" + u16(len(payload)).rjust(3, b"\x00") + payload
    check_outcome(b"\x16\x03\x01" + u16(len(body)) + body)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(FIXTURE_NAMES),
    st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_property_mutated_fixture(name: str, changes: list[tuple[int, int]]) -> None:
    data = bytearray(FIXTURE_BYTES[name])
    for index, value in changes:
        data[index % len(data)] = value
    check_outcome(bytes(data))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(FIXTURE_NAMES), st.lists(st.integers(1, 600), min_size=1, max_size=50))
def test_property_any_record_cut(name: str, sizes: list[int]) -> None:
    message = message_of(FIXTURE_BYTES[name])
    data = to_records(message, itertools.chain(sizes, [len(message)]))
    result = parse_client_hello(data)
    check_expected(result, name)
    assert result is not None and result.length == len(data)
