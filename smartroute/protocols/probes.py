"""Name a connection's protocol from its first bytes: the probes behind ``match.protocol``.

A probe is a pure function ``probe(data) -> True | False | None`` over all the first bytes
read so far: ``True`` "these bytes are mine", ``False`` "they cannot be", ``None`` "too few
bytes to say". The built-in probes below say ``False`` as soon as one byte rules their protocol
out, say ``True`` only on what their protocol's client must send first, never raise, and copy
nothing: they run on each read of an undecided connection. :class:`Probes` asks the built-in
ones, then the user's, and names the first protocol whose probe says ``True`` once every probe
before it said ``False``.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Literal, TypeAlias, cast

from smartroute.errors import ConfigError
from smartroute.protocols.http import HTTP_METHODS
from smartroute.protocols.tls import MAX_RECORD_SIZE

__all__ = [
    "BUILTIN_FIRST_BYTES",
    "BUILTIN_PROBES",
    "HTTP2_PREFACE",
    "Probe",
    "Probes",
    "probe_http",
    "probe_http2",
    "probe_mqtt",
    "probe_postgres",
    "probe_redis",
    "probe_socks5",
    "probe_ssh",
    "probe_tls",
]

log = logging.getLogger("smartroute")

Probe: TypeAlias = Callable[[bytes], bool | None]


# -- TLS ----------------------------------------------------------------------------------------

_HANDSHAKE = 0x16
_CLIENT_HELLO = 1


def probe_tls(data: bytes) -> bool | None:
    """A TLS handshake record (0x16, version 3.0-3.4, length 1..2^14+2048) that starts a
    ClientHello (handshake type 1). SSLv2-style hellos are not TLS here."""
    # The first three bytes are looks_like_tls's test, inlined: this runs on every read.
    size = len(data)
    if size == 0:
        return None
    if data[0] != _HANDSHAKE or (size > 1 and data[1] != 3) or (size > 2 and data[2] > 4):
        return False
    if size < 5:
        return None
    if not 0 < (data[3] << 8 | data[4]) <= MAX_RECORD_SIZE:
        return False
    return None if size == 5 else data[5] == _CLIENT_HELLO


# -- HTTP/2 with prior knowledge, HTTP/1.x -------------------------------------------------------

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_PREFACE_LINE = b"PRI * HTTP/2.0"


def probe_http2(data: bytes) -> bool | None:
    """The whole 24-byte client connection preface of HTTP/2 (RFC 9113 section 3.4)."""
    if data and data[0] != 0x50:  # "P"
        return False
    if data.startswith(HTTP2_PREFACE):
        return True
    if len(data) < len(HTTP2_PREFACE) and HTTP2_PREFACE.startswith(data):
        return None
    return False


_HTTP_STARTS = tuple(f"{method} ".encode("ascii") for method in sorted(HTTP_METHODS - {"PRI"}))
_PRI = b"PRI "
_HTTP_FIRST = frozenset(start[0] for start in (*_HTTP_STARTS, _PRI))
_HTTP_LONGEST = max(len(start) for start in _HTTP_STARTS)


def probe_http(data: bytes) -> bool | None:
    """An HTTP/1.x request line's start: a known method (``HTTP_METHODS``) and a space, like
    :func:`~smartroute.protocols.http.looks_like_http`; but ``PRI * HTTP/2.0``, the start of
    HTTP/2's preface, is not HTTP/1.x (a ``PRI`` request line is, once it differs from it)."""
    if not data:
        return None
    if data[0] not in _HTTP_FIRST:
        return False
    if data.startswith(_HTTP_STARTS):
        return True
    if data.startswith(_PRI):
        if len(data) < len(_PREFACE_LINE) and _PREFACE_LINE.startswith(data):
            return None
        return not data.startswith(_PREFACE_LINE)
    if len(data) < _HTTP_LONGEST:
        for start in _HTTP_STARTS:
            if start.startswith(data):
                return None
        if _PRI.startswith(data):
            return None
    return False


# -- SSH ----------------------------------------------------------------------------------------

_SSH_2 = b"SSH-2.0-"
_SSH_199 = b"SSH-1.99-"


def probe_ssh(data: bytes) -> bool | None:
    """An SSH identification string (RFC 4253 section 4.2): ``SSH-2.0-`` (or ``SSH-1.99-``,
    which only old servers speaking 1.x too should send), then the first character of the
    software version (printable ASCII, not a space or ``-``). SSH 1.x (``SSH-1.5-``) is not
    claimed."""
    if not data:
        return None
    if data[0] != 0x53:  # "S"
        return False
    if data.startswith(_SSH_2):
        end = len(_SSH_2)
    elif data.startswith(_SSH_199):
        end = len(_SSH_199)
    else:
        short = len(data) < len(_SSH_199)
        return None if short and (_SSH_2.startswith(data) or _SSH_199.startswith(data)) else False
    if len(data) == end:
        return None
    first = data[end]
    return 0x21 <= first <= 0x7E and first != 0x2D


# -- SOCKS5 -------------------------------------------------------------------------------------

_SOCKS5 = 5
_NO_AUTH = 0x00
_PASSWORD = 0x02
_NO_ACCEPTABLE = b"\xff"  # the server's answer, never a method a client offers
_SOCKS5_COMMANDS = (1, 2, 3)  # CONNECT, BIND, UDP ASSOCIATE
_SOCKS5_ADDRESS_TYPES = (1, 3, 4)  # IPv4, domain name, IPv6


def probe_socks5(data: bytes) -> bool | None:
    """A SOCKS5 greeting (RFC 1928 section 3): version 5, NMETHODS >= 1, then that many
    methods (never 0xFF). A client waits for the server's choice, so a greeting comes alone;
    bytes after it are accepted only as a pipelined next message the offered methods allow: a
    request (5, command 1-3, 0, address type 1/3/4) after "no authentication", or an RFC 1929
    username/password request (1, name length >= 1) after "username/password"."""
    size = len(data)
    if size == 0:
        return None
    if data[0] != _SOCKS5:
        return False
    if size == 1:
        return None
    end = 2 + data[1]
    if end == 2 or data.find(_NO_ACCEPTABLE, 2, end) >= 0:
        return False
    if size <= end:
        return None if size < end else True
    nxt = data[end]
    if nxt == _SOCKS5 and data.find(_NO_AUTH, 2, end) >= 0:
        return (
            (size <= end + 1 or data[end + 1] in _SOCKS5_COMMANDS)
            and (size <= end + 2 or data[end + 2] == 0)
            and (size <= end + 3 or data[end + 3] in _SOCKS5_ADDRESS_TYPES)
        )
    if nxt == 1 and data.find(_PASSWORD, 2, end) >= 0:
        return size <= end + 1 or data[end + 1] > 0
    return False


# -- PostgreSQL ---------------------------------------------------------------------------------

_PG_MAX_STARTUP = 10000  # the server's MAX_STARTUP_PACKET_LENGTH
_PG_MAX_CANCEL = 12 + 256  # protocol 3.2 (PostgreSQL 18): secret keys of 4 to 256 bytes
_PG_MAJOR = 3
_PG_SPECIAL = (0x04, 0xD2, 0x16)  # the high bytes of 80877102..80877104 (1234 << 16 | 5678..5680)
_PG_CANCEL = 0x2E  # 80877102
_PG_SSL = 0x2F  # 80877103
_PG_GSSENC = 0x30  # 80877104
_PG_CODES_8: tuple[int, ...] = (_PG_SSL, _PG_GSSENC)  # the requests of length 8
_PG_CODES_CANCEL: tuple[int, ...] = (_PG_CANCEL,)


def probe_postgres(data: bytes) -> bool | None:
    """The first message of a PostgreSQL client (protocol 3): an int32 length and an int32 code.

    - StartupMessage: length 9..10000, protocol major 3 (3.0 = 196608; any minor below 256,
      the server negotiates newer ones down);
    - SSLRequest / GSSENCRequest: length 8, code 80877103 / 80877104;
    - CancelRequest: length 16 (up to 268 with protocol 3.2's longer keys), code 80877102.

    Decided on the 8 bytes of length and code; what follows is not looked at.
    """
    size = len(data)
    if size == 0:
        return None
    # Every sane length is below 2^16: the first two bytes are zero, the third at most 0x27.
    if data[0] != 0 or (size > 1 and data[1] != 0) or (size > 2 and data[2] > 0x27):
        return False
    if size < 4:
        return None
    length = data[2] << 8 | data[3]
    if length < 8 or length > _PG_MAX_STARTUP:
        return False
    if size == 4:
        return None
    if data[4] == 0:  # StartupMessage: int16 major, int16 minor
        if length == 8 or (size > 5 and data[5] != _PG_MAJOR) or (size > 6 and data[6] != 0):
            return False
        return None if size < 8 else True
    if length == 8:
        codes = _PG_CODES_8
    elif 16 <= length <= _PG_MAX_CANCEL:
        codes = _PG_CODES_CANCEL
    else:
        return False
    high = _PG_SPECIAL
    if data[4] != high[0] or (size > 5 and data[5] != high[1]) or (size > 6 and data[6] != high[2]):
        return False
    return None if size < 8 else data[7] in codes


# -- Redis --------------------------------------------------------------------------------------

# RESP: "*<count>\r\n$<length>", a count of 1 to 7 digits (up to 9,999,999 arguments).
_RESP = re.compile(rb"\*[1-9][0-9]{0,6}\r\n\$[1-9]")
_RESP_START = re.compile(rb"\*(?:[1-9][0-9]{0,6}(?:\r(?:\n\$?)?)?)?")  # may still become one
# Inline commands a connection may open with (health checks, telnet), by lower-cased first byte.
_INLINE_WORDS = {word[0]: word for word in (b"ping", b"auth", b"hello")}
_REDIS_FIRST = frozenset(b"*" + bytes(_INLINE_WORDS) + bytes(_INLINE_WORDS).upper())


def probe_redis(data: bytes) -> bool | None:
    """A Redis command: a RESP array of bulk strings (``*<count>\\r\\n$<length>``, count 1 to
    7 digits without a leading zero, length not starting with 0: what every client library
    and redis-cli send), or one of the inline commands a connection may open with, ``PING``,
    ``AUTH``, ``HELLO`` (any case), followed by a space, a tab or the line end (LF or CR LF).
    Other inline commands are not claimed: they are bare words any text protocol could send.
    No HTTP method starts like these three words, so HTTP is never taken."""
    size = len(data)
    if size == 0:
        return None
    first = data[0]
    if first not in _REDIS_FIRST:
        return False
    if first == 0x2A:  # "*"
        if _RESP.match(data) is not None:
            return True
        return None if _RESP_START.fullmatch(data) is not None else False
    word = _INLINE_WORDS[first | 0x20]
    end = len(word)
    pos = 1
    while pos < size and pos < end:
        if data[pos] | 0x20 != word[pos]:  # ASCII letters compared without case
            return False
        pos += 1
    if size <= end:
        return None
    after = data[end]
    if after == 0x0D:  # CR, then LF
        return None if size == end + 1 else data[end + 1] == 0x0A
    return after == 0x20 or after == 0x09 or after == 0x0A


# -- MQTT ---------------------------------------------------------------------------------------

_MQTT_CONNECT = 0x10  # packet type 1, flags 0
_MQTT_MIN_REMAINING = 12  # variable header of 10 bytes and an empty client id
# Protocol name and level: MQTT 3.1.1 (4) and 5.0 (5), MQIsdp 3.1 (3).
_MQTT_NAMES = (b"\x00\x04MQTT\x04", b"\x00\x04MQTT\x05", b"\x00\x06MQIsdp\x03")


def probe_mqtt(data: bytes) -> bool | None:
    """An MQTT CONNECT packet: byte 0x10, the remaining length (1-4 bytes, minimal, at least
    12), the protocol name and level (``MQTT`` 4 or 5, ``MQIsdp`` 3), then the connect flags
    with the reserved bit clear."""
    size = len(data)
    if size == 0:
        return None
    if data[0] != _MQTT_CONNECT:
        return False
    if size == 1:
        return None
    byte = data[1]
    remaining = byte & 0x7F
    pos = 2
    while byte & 0x80:  # the remaining length goes on
        if pos == 5:
            return False  # a fifth length byte
        if pos == size:
            return None
        byte = data[pos]
        remaining |= (byte & 0x7F) << (7 * (pos - 1))
        pos += 1
    if (byte == 0 and pos > 2) or remaining < _MQTT_MIN_REMAINING:
        return False
    for name in _MQTT_NAMES:
        if data.startswith(name, pos):
            flags = pos + len(name)
            if size == flags:
                return None
            return not data[flags] & 1
    if size - pos < len(_MQTT_NAMES[2]):
        tail = data[pos:]
        for name in _MQTT_NAMES:
            if name.startswith(tail):
                return None
    return False


# -- the built-in set and the user's ------------------------------------------------------------

BUILTIN_PROBES: Mapping[str, Probe] = MappingProxyType(
    {
        "tls": probe_tls,
        "http2": probe_http2,  # before http: the preface starts like a request line
        "http": probe_http,
        "ssh": probe_ssh,
        "socks5": probe_socks5,
        "postgres": probe_postgres,
        "redis": probe_redis,
        "mqtt": probe_mqtt,
    }
)
"""The built-in probes, in the order they are asked."""

# The first bytes each built-in probe can say anything but False to (tests hold them to it).
# Probes.identify asks only the built-in probes that the first byte leaves in the running.
BUILTIN_FIRST_BYTES: Mapping[str, bytes] = MappingProxyType(
    {
        "tls": b"\x16",
        "http2": b"P",
        "http": bytes(sorted(_HTTP_FIRST)),
        "ssh": b"S",
        "socks5": b"\x05",
        "postgres": b"\x00",
        "redis": bytes(sorted(_REDIS_FIRST)),
        "mqtt": b"\x10",
    }
)

_BUILTIN_BY_FIRST: tuple[tuple[tuple[str, Probe], ...], ...] = tuple(
    tuple(
        (name, probe)
        for name, probe in BUILTIN_PROBES.items()
        if first in BUILTIN_FIRST_BYTES[name]
    )
    for first in range(256)
)

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
_NAME_RULE = "lower-case letters, digits, '.', '_' and '-', starting with a letter or digit"


class Probes:
    """The built-in probes, then the user's in the order given: what ``match.protocol`` names.

    ``user`` maps a name to a probe; names follow ``[a-z0-9][a-z0-9._-]*`` and may not be a
    built-in protocol's. ``path`` is where the mapping came from, for :class:`ConfigError`.
    """

    __slots__ = ("_by_first", "_probes", "names")

    def __init__(
        self,
        user: Mapping[str, Probe] | Mapping[str, object] | None = None,
        *,
        path: str = "protocols",
    ) -> None:
        added = _check_user_probes(user, path)
        self._probes: tuple[tuple[str, Probe], ...] = (*BUILTIN_PROBES.items(), *added)
        # Per first byte: the built-in probes it leaves in the running, then every user probe.
        self._by_first = tuple(builtin + added for builtin in _BUILTIN_BY_FIRST)
        self.names: frozenset[str] = frozenset(name for name, _ in self._probes)

    def identify(self, data: bytes, final: bool = False) -> str | Literal[False] | None:
        """The protocol the first bytes ``data`` are, ``False`` when no probe claims them,
        ``None`` to wait for more bytes.

        A probe's ``True`` names the protocol once every probe before it said ``False``; a
        ``None`` before it means wait. With ``final`` (no more bytes will come) ``None`` counts
        as ``False``. A probe that raises or answers anything but ``True``, ``False`` or
        ``None`` is logged and counts as ``False``.
        """
        for name, probe in self._by_first[data[0]] if data else self._probes:
            try:
                answer = probe(data)
            except Exception:
                log.error("protocol probe %r failed: it raised", name, exc_info=True)
                continue
            if answer is True:
                return name
            if answer is None:
                if not final:
                    return None
            elif answer is not False:
                log.error(
                    "protocol probe %r failed: it returned a %s, not True, False or None",
                    name,
                    f"value of type {type(answer).__name__}",
                )
        return False

    def names_for_error(self) -> list[str]:
        """Every protocol name, sorted: for messages such as "unknown protocol, expected ..."."""
        return sorted(self.names)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Probes):
            return NotImplemented
        return self._probes == other._probes

    def __hash__(self) -> int:
        return hash(self._probes)

    def __repr__(self) -> str:
        added = [name for name, _ in self._probes[len(BUILTIN_PROBES) :]]
        return f"Probes(user={added!r})"


def _check_user_probes(
    user: Mapping[str, Probe] | Mapping[str, object] | None, path: str
) -> tuple[tuple[str, Probe], ...]:
    """The user's probes as ``(name, probe)`` pairs in order, or :class:`ConfigError`."""
    if user is None:
        return ()
    if not isinstance(user, Mapping):
        raise ConfigError(
            path, f"expected a dict of protocol name -> probe function, got {type(user).__name__}"
        )
    checked: list[tuple[str, Probe]] = []
    for name, probe in user.items():
        if not isinstance(name, str) or _NAME.fullmatch(name) is None:
            what = "a str" if isinstance(name, str) else f"a {type(name).__name__}"
            raise ConfigError(
                f"{path}[{name!r}]", f"a protocol name is {_NAME_RULE}; got {what} {name!r}"
            )
        where = f"{path}.{name}"
        if name in BUILTIN_PROBES:
            raise ConfigError(
                where, f'"{name}" is a built-in protocol; give your probe another name'
            )
        checked.append((name, _check_probe(probe, where)))
    return tuple(checked)


def _check_probe(probe: object, where: str) -> Probe:
    """A probe is a plain function of one argument (the first bytes)."""
    if not callable(probe):
        raise ConfigError(
            where,
            f"expected a function probe(data: bytes) -> bool | None, got {type(probe).__name__}",
        )
    if inspect.iscoroutinefunction(probe) or inspect.isasyncgenfunction(probe):
        raise ConfigError(where, "a probe is a plain function (not async): it runs on each read")
    try:
        signature = inspect.signature(probe)
    except (TypeError, ValueError):  # some built-in callables have none: trust them
        return cast(Probe, probe)
    try:
        signature.bind(b"")
    except TypeError:
        raise ConfigError(
            where, f"a probe takes one argument, the first bytes; it takes {signature}"
        ) from None
    return cast(Probe, probe)
