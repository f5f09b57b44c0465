"""A sans-I/O parser for an HTTP/1.x request head: request line, headers and Host.

The caller hands in the bytes read so far; the parser returns a :class:`RequestHead`, ``None``
while the head is incomplete, or raises :class:`HttpParseError` with a status hint (400 for a
malformed head, 431 for one larger than ``max_size``). Bare LF line endings are accepted as
real servers do; everything else is checked strictly, since the proxy frames requests with it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from smartroute.errors import HttpParseError
from smartroute.protocols.paths import normalize_path
from smartroute.routing.patterns import normalize_host

__all__ = [
    "DEFAULT_MAX_HEAD_SIZE",
    "HTTP_METHODS",
    "RequestHead",
    "looks_like_http",
    "parse_request_head",
]

DEFAULT_MAX_HEAD_SIZE = 16384

HTTP_METHODS: frozenset[str] = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT", "PRI"}
)

# Methods a client (or a proxy) may send again without changing what one request did
# (RFC 9110, 9.2.2): a proxy retries nothing else on its own (RFC 9112, 9.3.1).
IDEMPOTENT_METHODS: frozenset[str] = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_METHOD_PREFIXES = tuple(method.encode("ascii") + b" " for method in sorted(HTTP_METHODS))
_PROBE_SIZE = max(len(prefix) for prefix in _METHOD_PREFIXES)

_TCHAR = rb"!#$%&'*+.^_`|~0-9A-Za-z-"
_LEADING_NEWLINES = re.compile(rb"(?:\r?\n)*")
# The first blank line ends the head; LF and CRLF may be mixed.
_END_OF_HEAD = re.compile(rb"\n\r?\n")
_NEWLINE = re.compile(rb"\n")
_REQUEST_LINE = re.compile(rb"([" + _TCHAR + rb"]+) ([\x21-\x7e]+) (HTTP/[0-9]\.[0-9])\r?")
# What the request line may be while its end has not arrived (a lone CR may still become one
# more empty line before it).
_REQUEST_LINE_PREFIX = re.compile(
    rb"[" + _TCHAR + rb"]*(?: [\x21-\x7e]*(?: [HTP/0-9.]{0,8}\r?)?)?|\r"
)
_HEADER_LINE = re.compile(rb"([" + _TCHAR + rb"]+):(.*)", re.DOTALL)
# Controls other than HTAB, and a CR that does not end a line, are invalid anywhere in a head.
_BAD_BYTES = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n|\Z)")
_VERSIONS = frozenset({"HTTP/1.1", "HTTP/1.0"})
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_AUTHORITY_END = re.compile(r"[/?]")
_HOST_NAME = re.compile(r"(?:[A-Za-z0-9_-]{1,63}\.)*[A-Za-z0-9_-]{1,63}\.?")
_PORT = re.compile(r"[0-9]{0,5}")
_OWS = " \t"
# Header lines as the line-by-line parsers accept them (no control bytes, no bare CR), each
# ending in LF or CRLF; the empty line after them ends the head.
_FIELD_LINES = rb"((?:[" + _TCHAR + rb"]+:[\t\x20-\x7e\x80-\xff]*\r?\n)*)\r?\n"
_FAST_REQUEST = re.compile(
    rb"([" + _TCHAR + rb"]+) (/[\x21\x22\x24-\x7e]*) (HTTP/1\.[01])\r?\n" + _FIELD_LINES
)
_CODING = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HOSTS_SEEN: dict[str, tuple[str | None, int | None]] = {}
_HOSTS_SEEN_MAX = 512


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A parsed request head; ``length`` is its size in bytes, final blank line included.

    ``path`` is in the normal form of :func:`~smartroute.protocols.paths.normalize_path`:
    routes match it and the reverse proxy forwards it (:attr:`origin`); ``target`` is kept as
    sent, for logs.
    """

    method: str
    target: str  # the request-target as sent
    path: str  # normalised, before "?"; "/" for an absolute-form URL without one;
    # "*" for OPTIONS *; the target for CONNECT
    query: str | None  # after "?", None without "?"
    version: str  # "HTTP/1.1" or "HTTP/1.0"
    headers: tuple[tuple[str, str], ...]  # in order, names as sent, values without OWS
    host: str | None  # normalised, port removed, IPv6 without brackets
    port: int | None
    length: int

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or ``None``."""
        wanted = name.lower()
        size = len(wanted)
        for key, value in self.headers:
            if len(key) == size and key.lower() == wanted:
                return value
        return None

    @property
    def origin(self) -> str:
        """The request-target to send on: the normal path and the query (origin form), or
        ``*`` / the CONNECT authority as sent."""
        if self.query is None:
            return self.path
        return f"{self.path}?{self.query}"

    def header_map(self) -> dict[str, str]:
        """Headers by lower-cased name; repeated headers joined with ``", "`` in order."""
        return header_map(self.headers)


def header_map(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """``(name, value)`` pairs by lower-cased name; repeated names joined with ``", "`` in
    order (a request's or a response's headers)."""
    result: dict[str, str] = {}
    for key, value in headers:
        lower = key.lower()
        if lower in result:
            result[lower] += ", " + value
        else:
            result[lower] = value
    return result


def looks_like_http(data: bytes | bytearray | memoryview) -> bool | None:
    """True if data starts with a known method followed by a space, False if it cannot be,
    None if too short to say."""
    if len(data) == 0:
        return None
    probe = bytes(data[:_PROBE_SIZE])
    if probe.startswith(_METHOD_PREFIXES):
        return True
    if len(probe) < _PROBE_SIZE and any(prefix.startswith(probe) for prefix in _METHOD_PREFIXES):
        return None
    return False


def parse_request_head(
    data: bytes | bytearray | memoryview, max_size: int = DEFAULT_MAX_HEAD_SIZE
) -> RequestHead | None:
    """Parse the request head at the start of ``data``; ``None`` means "need more bytes".

    Empty lines before the request line are skipped (RFC 9112 section 2.2) and counted in
    ``length``. A head that has not ended within ``max_size`` bytes raises 431 at once.
    """
    # The common head (origin-form target, HTTP/1.x, clean lines) is checked by one regular
    # expression and its fields taken in one pass; anything else, every malformed head
    # included, goes line by line, which has the last word. Only a head whose end has arrived
    # is tried, so a head sent a byte at a time costs no more than it did.
    end = _END_OF_HEAD.search(data, 0, max_size)
    if end is not None:
        fast = _FAST_REQUEST.match(data, 0, end.end())
        if fast is not None and fast.end() == end.end():
            head = _fast_request_head(fast)
            if head is not None:
                return head
    return _parse_request_head(data, max_size)


def _fast_request_head(found: re.Match[bytes]) -> RequestHead | None:
    """The head that :func:`_parse_request_head` would return for this match, or None when
    it is a case left to that function (CONNECT, several Host headers, no Host)."""
    method = found.group(1).decode("ascii")
    if method == "CONNECT":
        return None
    headers = field_lines(found.group(4))
    host_value: str | None = None
    lengths: list[str] = []
    encodings: list[str] = []
    for name, value in headers:
        lower = name.lower()
        if lower == "host":
            if host_value is not None:
                return None  # two Host headers: the long way refuses them
            host_value = value
        elif lower == "content-length":
            lengths.append(value)
        elif lower == "transfer-encoding":
            encodings.append(value)
    if lengths or encodings:
        _check_framing(lengths, encodings)
    version = found.group(3).decode("ascii")
    if host_value is None:
        if version == "HTTP/1.1":
            return None  # the long way refuses it
        host, port = None, None
    else:
        host, port = split_host(host_value)
    target = found.group(2).decode("ascii")
    path, question, query = target.partition("?")
    return RequestHead(
        method=method,
        target=target,
        path=normalize_path(path),
        query=query if question else None,
        version=version,
        headers=headers,
        host=host,
        port=port,
        length=found.end(),
    )


def field_lines(block: bytes) -> tuple[tuple[str, str], ...]:
    """(name, value) pairs of header lines that :data:`_FIELD_LINES` matched whole, values
    without surrounding whitespace, as the line-by-line parsers give them."""
    lines = block.decode("latin-1").split("\n")
    lines.pop()  # the block ends with a line end
    # Names hold no ":", values no CR but the one before LF.
    fields = [line.partition(":") for line in lines]
    return tuple([(name, value.strip(" \t\r")) for name, _, value in fields])


def split_host(value: str) -> tuple[str | None, int | None]:
    """:func:`_split_authority` of a Host value, remembered (clients repeat theirs)."""
    known = _HOSTS_SEEN.get(value)
    if known is None:
        known = _split_authority(value)
        if len(_HOSTS_SEEN) >= _HOSTS_SEEN_MAX:
            _HOSTS_SEEN.clear()
        _HOSTS_SEEN[value] = known
    return known


def _parse_request_head(
    data: bytes | bytearray | memoryview, max_size: int = DEFAULT_MAX_HEAD_SIZE
) -> RequestHead | None:
    """:func:`parse_request_head` line by line: every form, every error."""
    leading = _LEADING_NEWLINES.match(data, 0, max_size)
    first = 0 if leading is None else leading.end()
    found = _END_OF_HEAD.search(data, first, max_size)
    if found is None:
        _check_partial_request_line(data, first, max_size)
        if len(data) > max_size:
            raise HttpParseError(f"request head exceeds {max_size} bytes", status=431)
        return None
    head = bytes(data[first : found.start()])  # up to the newline that ends the last line
    bad = _BAD_BYTES.search(head)
    if bad is not None:
        raise HttpParseError(f"invalid byte {bad.group()[:1]!r} in request head", status=400)
    lines = head.split(b"\n")
    method, target, version = _parse_request_line(lines[0])

    headers: list[tuple[str, str]] = []
    hosts: list[str] = []
    content_lengths: list[str] = []
    transfer_encodings: list[str] = []
    for raw in lines[1:]:
        line = raw[:-1] if raw.endswith(b"\r") else raw
        match = _HEADER_LINE.fullmatch(line)
        if match is None:
            if line[:1] in (b" ", b"\t"):
                raise HttpParseError("obsolete line folding in header", status=400)
            raise HttpParseError(f"malformed header line {line[:64]!r}", status=400)
        name = match.group(1).decode("ascii")
        value = match.group(2).decode("latin-1").strip(_OWS)
        headers.append((name, value))
        lower = name.lower()
        if lower == "host":
            hosts.append(value)
        elif lower == "content-length":
            content_lengths.append(value)
        elif lower == "transfer-encoding":
            transfer_encodings.append(value)
    _check_framing(content_lengths, transfer_encodings)

    # RFC 9112 section 3.2: exactly one Host line in HTTP/1.1, at most one in HTTP/1.0.
    if len(hosts) > 1:
        raise HttpParseError("more than one Host header", status=400)
    if not hosts and version == "HTTP/1.1":
        raise HttpParseError("HTTP/1.1 request without a Host header", status=400)
    host, port = _split_authority(hosts[0]) if hosts else (None, None)

    path, query, authority = _split_target(method, target)
    if authority is not None:
        # The authority of an absolute-form or CONNECT target overrides Host (RFC 9112 3.2.2).
        host, port = _target_authority(method, target, authority)
    return RequestHead(
        method=method,
        target=target,
        path=path,
        query=query,
        version=version,
        headers=tuple(headers),
        host=host,
        port=port,
        length=found.end(),
    )


def _check_partial_request_line(
    data: bytes | bytearray | memoryview, first: int, max_size: int
) -> None:
    """Fail early on a request line that can no longer become valid."""
    end = min(len(data), max_size + 1)
    newline = _NEWLINE.search(data, first, end)
    if newline is not None:
        _parse_request_line(bytes(data[first : newline.start()]))
    elif _REQUEST_LINE_PREFIX.fullmatch(data, first, end) is None:
        raise HttpParseError("malformed request line", status=400)


def _parse_request_line(line: bytes) -> tuple[str, str, str]:
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        raise HttpParseError(f"malformed request line {line[:64]!r}", status=400)
    method, target, version = (part.decode("ascii") for part in match.groups())
    if version not in _VERSIONS:
        if method == "PRI" and version == "HTTP/2.0":
            raise HttpParseError("HTTP/2 prior-knowledge preface is not supported", status=400)
        raise HttpParseError(f"unsupported HTTP version {version}", status=400)
    return method, target, version


def _split_target(method: str, target: str) -> tuple[str, str | None, str | None]:
    """Return (path, query, authority) of a request-target, checking its form fits the method.

    ``authority`` is set for absolute-form and CONNECT (authority-form) targets only.
    """
    if "#" in target:
        raise HttpParseError("fragment in request target", status=400)
    if method == "CONNECT":
        return target, None, target
    if target.startswith("/"):
        path, question, query = target.partition("?")
        return normalize_path(path), query if question else None, None
    if target == "*":
        if method != "OPTIONS":
            raise HttpParseError(f"request target * is only for OPTIONS, not {method}", status=400)
        return "*", None, None
    scheme = _SCHEME.match(target)
    if scheme is None:
        raise HttpParseError(f"invalid request target {target[:64]!r}", status=400)
    rest = target[scheme.end() :]
    stop = _AUTHORITY_END.search(rest)
    cut = len(rest) if stop is None else stop.start()
    path, question, query = rest[cut:].partition("?")
    return normalize_path(path or "/"), query if question else None, rest[:cut]


def _target_authority(method: str, target: str, authority: str) -> tuple[str, int | None]:
    """Host and port of an absolute-form or CONNECT target's authority."""
    if "@" in authority:
        raise HttpParseError("userinfo in request target", status=400)
    host, port = _split_authority(authority)
    if host is None:
        raise HttpParseError(f"request target {target[:64]!r} has no host", status=400)
    if method == "CONNECT" and port is None:
        raise HttpParseError("CONNECT target needs a port", status=400)
    return host, port


def _split_authority(value: str) -> tuple[str | None, int | None]:
    """Split ``host[:port]`` (a Host value or a target's authority); empty means no host."""
    if not value:
        return None, None
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise HttpParseError(f"bad IPv6 literal in host {value[:64]!r}", status=400) from None
        if not bracket or rest[:1] not in ("", ":"):
            raise HttpParseError(f"bad host {value[:64]!r}", status=400)
        port_text = rest[1:]
    else:
        host, _, port_text = value.partition(":")
        if _HOST_NAME.fullmatch(host) is None:
            raise HttpParseError(f"bad host {value[:64]!r}", status=400)
    if _PORT.fullmatch(port_text) is None or port_text and int(port_text) > 65535:
        raise HttpParseError(f"bad port in host {value[:64]!r}", status=400)
    return normalize_host(host), int(port_text) if port_text else None


def valid_coding(name: str) -> bool:
    """Whether ``name`` is a transfer coding the proxy passes on: a token without parameters,
    and not ``identity``, which RFC 7230 dropped and which a peer that still honours it would
    read as "no framing" where the proxy reads ``chunked``."""
    return _CODING.fullmatch(name) is not None and name.lower() != "identity"


def _check_framing(content_lengths: list[str], transfer_encodings: list[str]) -> None:
    """Reject heads whose body length is ambiguous (RFC 9112 section 6.3): request smuggling."""
    if content_lengths:
        values = {item.strip(_OWS) for value in content_lengths for item in value.split(",")}
        if len(values) != 1 or not all(value.isascii() and value.isdigit() for value in values):
            raise HttpParseError("invalid Content-Length", status=400)
        if transfer_encodings:
            raise HttpParseError("both Content-Length and Transfer-Encoding", status=400)
    if transfer_encodings:
        codings = [c.strip(_OWS).lower() for v in transfer_encodings for c in v.split(",")]
        for coding in codings:
            if not valid_coding(coding):
                raise HttpParseError(f"invalid transfer coding {coding[:32]!r}", status=400)
        if codings[-1] != "chunked" or codings.count("chunked") != 1:
            raise HttpParseError("Transfer-Encoding must end in one chunked", status=400)
