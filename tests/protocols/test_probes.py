"""The protocol probes against first bytes captured from real clients, near misses and any bytes."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import FIXTURES

from smartroute.errors import ConfigError
from smartroute.protocols.http import looks_like_http
from smartroute.protocols.probes import (
    BUILTIN_FIRST_BYTES,
    BUILTIN_PROBES,
    Probe,
    Probes,
    probe_http,
    probe_http2,
    probe_mqtt,
    probe_postgres,
    probe_redis,
    probe_socks5,
    probe_ssh,
    probe_tls,
)
from smartroute.protocols.tls import looks_like_tls

FIRST_BYTES = FIXTURES / "first_bytes"
HELLOS = FIXTURES / "clienthello"

# fixture file -> the protocol it is (README.md in each folder says how it was captured)
EXPECTED = {
    "first_bytes/curl-h2c.bin": "http2",
    "first_bytes/curl-http.bin": "http",
    "first_bytes/mosquitto_pub.bin": "mqtt",
    "first_bytes/mosquitto_pub-v5.bin": "mqtt",
    "first_bytes/psql.bin": "postgres",
    "first_bytes/psql-nossl.bin": "postgres",
    "first_bytes/redis-cli.bin": "redis",
    "first_bytes/socks5-curl.bin": "socks5",
    "first_bytes/ssh.bin": "ssh",
    "first_bytes/tls-openssl.bin": "tls",
    **{f"clienthello/{path.name}": "tls" for path in sorted(HELLOS.glob("*.bin"))},
}
DATA = {name: (FIXTURES / name).read_bytes() for name in EXPECTED}
NAMES = sorted(EXPECTED)

# What a client may send right after its first bytes (the probe must still say True), and junk
# that only a SOCKS5 greeting, which a client sends alone, is judged by.
NEXT = {
    "tls": [b"\x17\x03\x03\x00\x05hello", b"\x16\x03\x03\x00\x01\x01"],
    "http": [b"body", b"GET / HTTP/1.1\r\n"],
    "http2": [b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"],
    "ssh": [b"\x00\x00\x05\xdc\x0a\x14"],
    "socks5": [b"\x05\x01\x00\x03\x0bexample.com\x00P", b"\x05\x01\x00\x01\x7f\x00\x00\x01"],
    "postgres": [b"\x16\x03\x01\x02\x00\x01", b"p\x00\x00\x00\x08pw\x00"],
    "redis": [b"*1\r\n$4\r\nPING\r\n"],
    "mqtt": [b"\x30\x04\x00\x01tm", b"\xe0\x00"],
}
JUNK = [b"\x00", b"\xff\xfe\xfd", b"\r\n\r\n", b"\x16\x03\x01"]


def trailing(protocol: str) -> list[bytes]:
    return NEXT[protocol] + ([] if protocol == "socks5" else JUNK)


def by_hand(data: bytes, final: bool = False) -> str | bool | None:
    """What Probes().identify must say: every built-in probe asked in order, no shortcuts."""
    for name, probe in BUILTIN_PROBES.items():
        answer = probe(data)
        if answer is True:
            return name
        if answer is None and not final:
            return None
    return False


# -- real first bytes ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_fixture_byte_by_byte(name: str) -> None:
    data = DATA[name]
    protocol = EXPECTED[name]
    own = BUILTIN_PROBES[protocol]
    others = {other: probe for other, probe in BUILTIN_PROBES.items() if other != protocol}
    probes = Probes()
    for end in range(len(data)):
        prefix = data[:end]
        assert own(prefix) is not False, f"{protocol} said False on {end} bytes"
        for other, probe in others.items():
            assert probe(prefix) is not True, f"{other} said True on {end} bytes"
        assert probes.identify(prefix) in (None, protocol), f"{end} bytes"
    assert own(data) is True
    assert own(bytearray(data)) is True  # type: ignore[arg-type]  # a bytearray reads the same
    for other, probe in others.items():
        assert probe(data) is False, other
    assert probes.identify(data) == protocol
    assert probes.identify(data, final=True) == protocol


@pytest.mark.parametrize("name", NAMES)
def test_fixture_with_trailing_data(name: str) -> None:
    data = DATA[name]
    protocol = EXPECTED[name]
    for extra in trailing(protocol):
        assert BUILTIN_PROBES[protocol](data + extra) is True, extra
        assert Probes().identify(data + extra) == protocol, extra


@pytest.mark.parametrize("name", NAMES)
def test_fixture_decided_as_soon_as_its_probe_is(name: str) -> None:
    """identify() names the protocol on the first prefix the own probe says True to."""
    data = DATA[name]
    protocol = EXPECTED[name]
    first = next(end for end in range(len(data) + 1) if BUILTIN_PROBES[protocol](data[:end]))
    assert Probes().identify(data[: first - 1]) is None
    assert Probes().identify(data[:first]) == protocol


def test_fixtures_are_first_bytes_only() -> None:
    """The captures stay small: a client's first flight, nothing after."""
    for path in FIRST_BYTES.glob("*.bin"):
        assert 0 < path.stat().st_size <= 1024, path.name
    assert {path.name for path in FIRST_BYTES.glob("*.bin")} == {
        name.removeprefix("first_bytes/") for name in EXPECTED if name.startswith("first_bytes/")
    }


# -- near misses --------------------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
STARTUP = b"\x00\x00\x00\x31\x00\x03\x00\x00user\x00u\x00"
CANCEL = b"\x04\xd2\x16\x2e"


def u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def mqtt_connect(name: bytes, level: int, flags: int = 2, remaining: bytes = b"\x13") -> bytes:
    return b"\x10" + remaining + name + bytes([level, flags]) + b"\x00\x3c\x00\x07capture"


CASES: list[tuple[str, Probe, bytes, bool | None]] = [
    # TLS
    ("tls alert record", probe_tls, b"\x15\x03\x01\x00\x02\x02\x28", False),
    ("tls version 2.0 record", probe_tls, b"\x16\x02\x00", False),
    ("tls record version 3.5", probe_tls, b"\x16\x03\x05\x00\x10\x01", False),
    ("tls empty record", probe_tls, b"\x16\x03\x01\x00\x00\x01", False),
    ("tls record too long", probe_tls, b"\x16\x03\x01\x48\x01", False),
    ("tls record longest", probe_tls, b"\x16\x03\x01\x48\x00\x01", True),
    ("tls ServerHello", probe_tls, b"\x16\x03\x03\x00\x4a\x02\x00\x00\x46", False),
    ("tls no handshake type yet", probe_tls, b"\x16\x03\x01\x02\x00", None),
    ("tls SSL 3.0 record", probe_tls, b"\x16\x03\x00\x00\x30\x01", True),
    ("tls SSLv2 hello", probe_tls, b"\x80\x2e\x01\x00\x02", False),
    # HTTP/2
    ("h2 preface but HTTP/1.1", probe_http2, b"PRI * HTTP/1.1\r\n\r\nSM\r\n\r\n", False),
    ("h2 preface with a wrong byte", probe_http2, PREFACE[:-3] + b"X\r\n", False),
    ("h2 preface one byte short", probe_http2, PREFACE[:-1], None),
    ("h2 a GET", probe_http2, b"GET / HTTP/1.1\r\n", False),
    ("h2 lower case", probe_http2, b"pri * HTTP/2.0", False),
    # HTTP/1.x
    ("http PRI with HTTP/1.1", probe_http, b"PRI * HTTP/1.1\r\n", True),
    ("http PRI other target", probe_http, b"PRI / HTTP/1.1\r\n", True),
    ("http h2 preface", probe_http, PREFACE, False),
    ("http h2 preface line only", probe_http, b"PRI * HTTP/2.0", False),
    ("http h2 preface line cut", probe_http, b"PRI * HTTP/2", None),
    ("http PRI", probe_http, b"PRI", None),
    ("http lower-case method", probe_http, b"get / HTTP/1.1\r\n", False),
    ("http method without space", probe_http, b"GETX / HTTP/1.1", False),
    ("http method cut", probe_http, b"OPTIO", None),
    ("http CONNECT", probe_http, b"CONNECT a.example:443 HTTP/1.1\r\n", True),
    ("http unknown method", probe_http, b"PROPFIND / HTTP/1.1\r\n", False),
    ("http leading empty line", probe_http, b"\r\nGET / HTTP/1.1\r\n", False),
    ("http PROXY protocol v1", probe_http, b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", False),
    ("http a response", probe_http, b"HTTP/1.1 200 OK\r\n", False),
    # SSH
    ("ssh version 3.0", probe_ssh, b"SSH-3.0-OpenSSH_9.2\r\n", False),
    ("ssh version 1.5", probe_ssh, b"SSH-1.5-OpenSSH_9.2\r\n", False),
    ("ssh version 1.99", probe_ssh, b"SSH-1.99-OpenSSH_3.9\r\n", True),
    ("ssh 1.99 cut", probe_ssh, b"SSH-1.9", None),
    ("ssh 1.99 no software yet", probe_ssh, b"SSH-1.99-", None),
    ("ssh no software yet", probe_ssh, b"SSH-2.0-", None),
    ("ssh software starts with -", probe_ssh, b"SSH-2.0--x\r\n", False),
    ("ssh software starts with space", probe_ssh, b"SSH-2.0- x\r\n", False),
    ("ssh empty software", probe_ssh, b"SSH-2.0-\r\n", False),
    ("ssh lower case", probe_ssh, b"ssh-2.0-OpenSSH\r\n", False),
    ("ssh other S word", probe_ssh, b"STARTTLS\r\n", False),
    ("ssh software with a space later", probe_ssh, b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n", True),
    # SOCKS5
    ("socks4 connect", probe_socks5, b"\x04\x01\x00\x50\x7f\x00\x00\x01u\x00", False),
    ("socks5 no methods", probe_socks5, b"\x05\x00", False),
    ("socks5 method 0xff", probe_socks5, b"\x05\x02\x00\xff", False),
    ("socks5 methods cut", probe_socks5, b"\x05\x03\x00\x01", None),
    ("socks5 one method", probe_socks5, b"\x05\x01\x00", True),
    ("socks5 private method", probe_socks5, b"\x05\x01\x80", True),
    ("socks5 pipelined request", probe_socks5, b"\x05\x01\x00\x05\x01\x00\x03", True),
    ("socks5 pipelined request cut", probe_socks5, b"\x05\x01\x00\x05", True),
    ("socks5 pipelined bad command", probe_socks5, b"\x05\x01\x00\x05\x04\x00\x01", False),
    ("socks5 pipelined bad reserved", probe_socks5, b"\x05\x01\x00\x05\x01\x01\x01", False),
    ("socks5 pipelined bad address type", probe_socks5, b"\x05\x01\x00\x05\x01\x00\x02", False),
    ("socks5 request without no-auth", probe_socks5, b"\x05\x01\x02\x05\x01\x00\x01", False),
    ("socks5 pipelined password", probe_socks5, b"\x05\x01\x02\x01\x04user", True),
    ("socks5 password empty name", probe_socks5, b"\x05\x01\x02\x01\x00", False),
    ("socks5 password not offered", probe_socks5, b"\x05\x01\x00\x01\x04user", False),
    ("socks5 junk after greeting", probe_socks5, b"\x05\x01\x00GET", False),
    # PostgreSQL
    ("pg length 7", probe_postgres, b"\x00\x00\x00\x07\x04\xd2\x16\x2f", False),
    ("pg startup too long", probe_postgres, u32(10001) + b"\x00\x03\x00\x00", False),
    ("pg startup longest", probe_postgres, u32(10000) + b"\x00\x03\x00\x00", True),
    ("pg length above 2^16", probe_postgres, u32(65544) + b"\x00\x03\x00\x00", False),
    ("pg length third byte", probe_postgres, b"\x00\x00\x28", False),
    ("pg length cut", probe_postgres, b"\x00\x00\x00", None),
    ("pg SSLRequest length 16", probe_postgres, u32(16) + b"\x04\xd2\x16\x2f", False),
    ("pg SSLRequest", probe_postgres, u32(8) + u32(80877103), True),
    ("pg GSSENCRequest", probe_postgres, u32(8) + u32(80877104), True),
    ("pg code 80877105", probe_postgres, u32(8) + u32(80877105), False),
    ("pg code 80877102 length 8", probe_postgres, u32(8) + CANCEL, False),
    ("pg CancelRequest", probe_postgres, u32(16) + CANCEL + u32(1234) + u32(5678), True),
    ("pg CancelRequest 3.2 long key", probe_postgres, u32(268) + CANCEL, True),
    ("pg CancelRequest key too long", probe_postgres, u32(269) + CANCEL, False),
    ("pg CancelRequest too short", probe_postgres, u32(12) + CANCEL, False),
    ("pg special code cut", probe_postgres, u32(8) + b"\x04\xd2\x16", None),
    ("pg special code wrong 2nd byte", probe_postgres, u32(8) + b"\x04\xd3", False),
    ("pg special code wrong 3rd byte", probe_postgres, u32(8) + b"\x04\xd2\x17", False),
    ("pg code starts 0x05", probe_postgres, u32(8) + b"\x05", False),
    ("pg startup 2.0", probe_postgres, u32(296) + b"\x00\x02\x00\x00", False),
    ("pg startup 3.2", probe_postgres, u32(49) + b"\x00\x03\x00\x02", True),
    ("pg startup minor 256", probe_postgres, u32(49) + b"\x00\x03\x01\x00", False),
    ("pg startup length 8", probe_postgres, u32(8) + b"\x00\x03\x00\x00", False),
    ("pg startup cut", probe_postgres, STARTUP[:6], None),
    ("pg startup", probe_postgres, STARTUP, True),
    # Redis
    ("redis empty array", probe_redis, b"*0\r\n", False),
    ("redis null array", probe_redis, b"*-1\r\n", False),
    ("redis leading zero", probe_redis, b"*01\r\n$4\r\n", False),
    ("redis count of 8 digits", probe_redis, b"*12345678\r\n$", False),
    ("redis count of 7 digits", probe_redis, b"*1234567\r\n$4", True),
    ("redis bare LF", probe_redis, b"*1\n$4\r\nPING\r\n", False),
    ("redis integer element", probe_redis, b"*1\r\n:1\r\n", False),
    ("redis empty bulk name", probe_redis, b"*1\r\n$0\r\n", False),
    ("redis array cut", probe_redis, b"*2\r\n", None),
    ("redis array cut after $", probe_redis, b"*2\r\n$", None),
    ("redis simple string", probe_redis, b"+OK\r\n", False),
    ("redis inline PING", probe_redis, b"PING\r\n", True),
    ("redis inline ping LF", probe_redis, b"ping\n", True),
    ("redis inline PING message", probe_redis, b"PING hello\r\n", True),
    ("redis inline AUTH", probe_redis, b"AUTH secret\r\n", True),
    ("redis inline HELLO", probe_redis, b"HELLO 3\r\n", True),
    ("redis inline HeLlO tab", probe_redis, b"HeLlO\t3\r\n", True),
    ("redis inline PING cut", probe_redis, b"PING\r", None),
    ("redis inline PIN", probe_redis, b"PIN", None),
    ("redis inline PINGX", probe_redis, b"PINGX\r\n", False),
    ("redis inline SET not claimed", probe_redis, b"SET a b\r\n", False),
    ("redis not HEAD", probe_redis, b"HEAD / HTTP/1.1\r\n", False),
    ("redis not POST", probe_redis, b"POST / HTTP/1.1\r\n", False),
    ("redis not PATCH", probe_redis, b"PATCH / HTTP/1.1\r\n", False),
    # MQTT
    ("mqtt 3.1.1", probe_mqtt, mqtt_connect(b"\x00\x04MQTT", 4), True),
    ("mqtt bad name", probe_mqtt, mqtt_connect(b"\x00\x04MQTX", 4), False),
    ("mqtt bad name length", probe_mqtt, mqtt_connect(b"\x00\x05MQTT", 4), False),
    ("mqtt MQTT level 3", probe_mqtt, mqtt_connect(b"\x00\x04MQTT", 3), False),
    (
        "mqtt MQIsdp level 3",
        probe_mqtt,
        mqtt_connect(b"\x00\x06MQIsdp", 3, remaining=b"\x15"),
        True,
    ),
    (
        "mqtt MQIsdp level 4",
        probe_mqtt,
        mqtt_connect(b"\x00\x06MQIsdp", 4, remaining=b"\x15"),
        False,
    ),
    ("mqtt reserved flag", probe_mqtt, mqtt_connect(b"\x00\x04MQTT", 4, flags=3), False),
    ("mqtt remaining 11", probe_mqtt, mqtt_connect(b"\x00\x04MQTT", 4, remaining=b"\x0b"), False),
    (
        "mqtt remaining 2 bytes",
        probe_mqtt,
        mqtt_connect(b"\x00\x04MQTT", 5, remaining=b"\x80\x01"),
        True,
    ),
    (
        "mqtt remaining 4 bytes",
        probe_mqtt,
        mqtt_connect(b"\x00\x04MQTT", 5, remaining=b"\xff\xff\xff\x7f"),
        True,
    ),
    ("mqtt remaining 5 bytes", probe_mqtt, b"\x10\xff\xff\xff\xff\x01\x00\x04MQTT\x04\x02", False),
    ("mqtt remaining 4th byte goes on", probe_mqtt, b"\x10\xff\xff\xff\xff", False),
    ("mqtt remaining not minimal", probe_mqtt, b"\x10\x93\x00\x00\x04MQTT\x04\x02", False),
    ("mqtt remaining cut", probe_mqtt, b"\x10\x80\x80", None),
    ("mqtt flags not yet", probe_mqtt, b"\x10\x13\x00\x04MQTT\x04", None),
    ("mqtt name cut", probe_mqtt, b"\x10\x13\x00\x06MQIs", None),
    ("mqtt CONNECT with flags", probe_mqtt, b"\x12\x13\x00\x04MQTT\x04\x02", False),
    ("mqtt CONNACK", probe_mqtt, b"\x20\x02\x00\x00", False),
    ("mqtt PUBLISH", probe_mqtt, b"\x30\x13\x00\x04MQTT\x04\x02", False),
]


@pytest.mark.parametrize(
    ("probe", "data", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_near_misses(probe: Probe, data: bytes, expected: bool | None) -> None:
    assert probe(data) is expected


@pytest.mark.parametrize("first", range(256))
def test_first_byte_gates(first: int) -> None:
    """Each built-in probe says False to every first byte outside its gate, which is what
    lets Probes.identify skip it."""
    for name, probe in BUILTIN_PROBES.items():
        if first in BUILTIN_FIRST_BYTES[name]:
            continue
        for rest in (b"", b"\x00" * 8, b"\x03\x01\x02\x00\x01", b"ET / HTTP/1.1\r\n", b"\xff" * 9):
            assert probe(bytes([first]) + rest) is False, (name, first, rest)


def test_every_probe_waits_on_no_bytes() -> None:
    for probe in BUILTIN_PROBES.values():
        assert probe(b"") is None


def test_builtin_order() -> None:
    assert list(BUILTIN_PROBES) == [
        "tls",
        "http2",
        "http",
        "ssh",
        "socks5",
        "postgres",
        "redis",
        "mqtt",
    ]
    assert list(BUILTIN_FIRST_BYTES) == list(BUILTIN_PROBES)
    with pytest.raises(TypeError):
        BUILTIN_PROBES["x"] = probe_tls  # type: ignore[index]


# -- any bytes ----------------------------------------------------------------------------------

SEEDS = [data[:cut] for data in DATA.values() for cut in (1, 4, 6, 9, 12)]
SEEDS += [b"GET ", b"PRI ", b"PRI * HTTP/2.0", b"\x05\x01\x00", b"\x05\x01\x02", b"PING", b"*1"]
SEEDS += [u32(8), u32(16) + b"\x04\xd2\x16", u32(49) + b"\x00\x03", b"\x10\x80\x80"]
# Random bytes, and the start of some protocol's first bytes followed by random bytes.
ANY_BYTES = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda seed, rest: seed + rest, st.sampled_from(SEEDS), st.binary(max_size=32)),
)


@settings(max_examples=2000, deadline=None)
@given(ANY_BYTES)
def test_any_bytes_give_true_false_or_none(data: bytes) -> None:
    for name, probe in BUILTIN_PROBES.items():
        answer = probe(data)
        assert answer is True or answer is False or answer is None, name
        if data and data[0] not in BUILTIN_FIRST_BYTES[name]:
            assert answer is False, name
    # At most one built-in probe claims any bytes, so their order only decides when to wait.
    assert sum(probe(data) is True for probe in BUILTIN_PROBES.values()) <= 1
    probes = Probes()
    assert probes.identify(data) == by_hand(data)
    assert probes.identify(data, final=True) == by_hand(data, final=True)


# The Redis rule as regular expressions: the whole claim, and what may still become one.
REDIS = re.compile(rb"\*[1-9][0-9]{0,6}\r\n\$[1-9]|(?i:PING|AUTH|HELLO)(?:[ \t]|\r?\n)")
REDIS_START = re.compile(
    rb"\*(?:[1-9][0-9]{0,6}(?:\r(?:\n\$?)?)?)?"
    rb"|(?i:P(?:I(?:N(?:G\r?)?)?)?|A(?:U(?:T(?:H\r?)?)?)?|H(?:E(?:L(?:L(?:O\r?)?)?)?)?)"
)
REDIS_SEEDS = [b"*", b"*1", b"*1234567", b"*1\r\n", b"*1\r\n$", b"P", b"pInG", b"auth", b"HeLlO"]


@settings(max_examples=1000, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=16),
        st.builds(
            lambda seed, rest: seed + rest,
            st.sampled_from(REDIS_SEEDS),
            st.lists(st.sampled_from(list(b"\r\n$ \t*0123456789xIiNnGg")), max_size=6).map(bytes),
        ),
    )
)
def test_redis_probe_follows_its_rule(data: bytes) -> None:
    if REDIS.match(data):
        expected: bool | None = True
    elif not data or REDIS_START.fullmatch(data):
        expected = None
    else:
        expected = False
    assert probe_redis(data) is expected


@settings(max_examples=500, deadline=None)
@given(ANY_BYTES)
def test_tls_probe_agrees_with_looks_like_tls(data: bytes) -> None:
    """probe_tls inlines looks_like_tls's test of the first three bytes, then asks more."""
    start = looks_like_tls(data)
    if start is False:
        assert probe_tls(data) is False
    elif start is None:
        assert probe_tls(data) is None
    else:
        assert probe_tls(data) is not True or len(data) >= 6


@settings(max_examples=500, deadline=None)
@given(ANY_BYTES)
def test_http_probe_agrees_with_looks_like_http(data: bytes) -> None:
    """Except for PRI, which probe_http leaves to http2 while it is the preface's."""
    if not data.startswith(b"PR"):
        assert probe_http(data) is looks_like_http(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(NAMES), st.data())
def test_fixture_cut_anywhere_never_misnamed(name: str, draw: st.DataObject) -> None:
    data = DATA[name]
    end = draw.draw(st.integers(0, len(data)))
    assert Probes().identify(data[:end]) in (None, EXPECTED[name])
    assert Probes().identify(data[:end], final=True) in (False, EXPECTED[name])


# -- Probes -------------------------------------------------------------------------------------


def always(answer: bool | None) -> Probe:
    def probe(data: bytes) -> bool | None:
        return answer

    return probe


def test_identify_without_user_probes() -> None:
    probes = Probes()
    assert probes.identify(b"") is None
    assert probes.identify(b"", final=True) is False
    assert probes.identify(b"\x99\x00") is False
    assert probes.identify(b"SSH-2.0-") is None  # ssh waits for the software version
    assert probes.identify(b"SSH-2.0-", final=True) is False
    assert probes.identify(b"SSH-2.0-x") == "ssh"


def test_user_probes_come_after_builtins_in_their_order() -> None:
    probes = Probes({"first": always(True), "second": always(True)})
    assert probes.identify(DATA["first_bytes/ssh.bin"]) == "ssh"
    assert probes.identify(DATA["clienthello/curl.bin"]) == "tls"
    assert probes.identify(b"\x99") == "first"
    assert Probes({"no": always(False), "yes": always(True)}).identify(b"\x99") == "yes"


def test_an_earlier_none_means_wait() -> None:
    probes = Probes({"mine": always(True)})
    assert probes.identify(b"S") is None  # ssh may still say True
    assert probes.identify(b"S", final=True) == "mine"
    assert probes.identify(b"") is None
    assert probes.identify(b"", final=True) == "mine"
    waiting = Probes({"slow": always(None), "quick": always(True)})
    assert waiting.identify(b"\x99") is None
    assert waiting.identify(b"\x99", final=True) == "quick"
    assert Probes({"slow": always(None)}).identify(b"\x99", final=True) is False


def test_user_probe_sees_all_first_bytes() -> None:
    seen: list[bytes] = []

    def probe(data: bytes) -> bool | None:
        seen.append(data)
        return data.endswith(b"\n")

    probes = Probes({"line": probe})
    assert probes.identify(b"hello") is None  # redis waits: it may become HELLO 3
    assert probes.identify(b"world") is False
    assert probes.identify(b"world\n") == "line"
    assert seen == [b"world", b"world\n"]


def test_a_probe_that_raises_is_logged_and_no_match(caplog: pytest.LogCaptureFixture) -> None:
    def broken(data: bytes) -> bool | None:
        raise ValueError("boom")

    probes = Probes({"broken": broken, "after": always(True)})
    with caplog.at_level(logging.ERROR, logger="smartroute"):
        assert probes.identify(b"secret-bytes") == "after"
    [record] = caplog.records
    assert record.name == "smartroute"
    assert record.levelno == logging.ERROR
    assert "'broken'" in record.getMessage()
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)
    assert "secret-bytes" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="smartroute"):
        assert Probes({"broken": broken}).identify(b"\x99") is False
    assert len(caplog.records) == 1


@pytest.mark.parametrize("answer", [1, 0, "yes", b"", [True]])
def test_a_probe_answering_something_else_is_logged_and_no_match(
    caplog: pytest.LogCaptureFixture, answer: object
) -> None:
    probes = Probes({"odd": lambda data: answer, "after": always(True)})
    with caplog.at_level(logging.ERROR, logger="smartroute"):
        assert probes.identify(b"secret-bytes") == "after"
    [record] = caplog.records
    assert "'odd'" in record.getMessage() and type(answer).__name__ in record.getMessage()
    assert "secret-bytes" not in caplog.text


def test_probes_built_in_callables_and_objects() -> None:
    class Prefix:
        def __call__(self, data: bytes) -> bool | None:
            return data.startswith(b"HELO")

    probes = Probes({"helo": Prefix(), "anything": bool})
    assert probes.identify(b"HELO x") == "helo"
    assert probes.identify(b"\x99") == "anything"


def test_names() -> None:
    probes = Probes({"smtp-ish": always(False), "a.b_c": always(False)})
    assert probes.names == frozenset(BUILTIN_PROBES) | {"smtp-ish", "a.b_c"}
    assert Probes().names == frozenset(BUILTIN_PROBES)
    assert probes.names_for_error() == sorted(probes.names)
    assert probes.names_for_error()[:2] == ["a.b_c", "http"]


def test_equality_and_repr() -> None:
    probe = always(True)
    assert Probes() == Probes()
    assert Probes({"x": probe}) == Probes({"x": probe})
    assert hash(Probes({"x": probe})) == hash(Probes({"x": probe}))
    assert Probes({"x": probe}) != Probes({"y": probe})
    assert Probes() != "Probes()"
    assert repr(Probes({"x": probe})) == "Probes(user=['x'])"


async def _async_probe(data: bytes) -> bool | None:
    return True


def _two_arguments(data: bytes, more: bytes) -> bool | None:
    return True


@pytest.mark.parametrize(
    ("user", "path", "problem"),
    [
        ({"": always(True)}, "protocols['']", "lower-case letters"),
        ({"Foo": always(True)}, "protocols['Foo']", "starting with a letter or digit"),
        ({"-x": always(True)}, "protocols['-x']", "lower-case"),
        ({"a b": always(True)}, "protocols['a b']", "lower-case"),
        ({3: always(True)}, "protocols[3]", "got a int 3"),
        ({"tls": always(True)}, "protocols.tls", '"tls" is a built-in protocol'),
        ({"http2": always(True)}, "protocols.http2", "built-in"),
        ({"x": "not callable"}, "protocols.x", "expected a function probe(data: bytes)"),
        ({"x": None}, "protocols.x", "got NoneType"),
        ({"x": _async_probe}, "protocols.x", "not async"),
        ({"x": _two_arguments}, "protocols.x", "takes one argument"),
        ({"x": lambda: True}, "protocols.x", "takes one argument"),
        (["x"], "protocols", "expected a dict"),
    ],
)
def test_bad_user_probes(user: object, path: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        Probes(user)  # type: ignore[arg-type]
    assert info.value.path == path
    assert problem in info.value.problem


def test_error_path_prefix() -> None:
    with pytest.raises(ConfigError) as info:
        Probes({"ssh": always(True)}, path="settings.protocols")
    assert info.value.path == "settings.protocols.ssh"
    assert str(info.value).startswith("settings.protocols.ssh: ")


def test_user_probe_order_is_kept() -> None:
    calls: list[str] = []

    def named(name: str) -> Callable[[bytes], bool | None]:
        def probe(data: bytes) -> bool | None:
            calls.append(name)
            return False

        return probe

    Probes({name: named(name) for name in ("z", "a", "m")}).identify(b"\x99")
    assert calls == ["z", "a", "m"]
