"""Compiled match patterns: domains, client IP rules, paths and header values.

Pure functions and small frozen objects; validation builds them once, the matcher only calls
their ``matches`` methods. Compile functions raise ``ValueError`` with a message that names
what was expected; validation turns that into a :class:`ConfigError` with the field's path.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

from smartroute.errors import HttpParseError
from smartroute.protocols.paths import normalize_path

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def normalize_host(name: str) -> str:
    """Lower-case a host name and drop one trailing dot (``Example.COM.`` -> ``example.com``)."""
    name = name.strip().lower()
    return name[:-1] if name.endswith(".") else name


@dataclass(frozen=True, slots=True)
class DomainPattern:
    """An exact domain (``example.com``), a wildcard (``*.example.com``) or ``*`` (any domain)."""

    text: str
    exact: bool
    suffix: str  # for wildcards: the part after "*." ("" for "*")

    def matches(self, domain: str) -> bool:
        """``domain`` must already be normalised with :func:`normalize_host`."""
        if self.exact:
            return domain == self.text
        if not self.suffix:
            return True
        return domain.endswith("." + self.suffix)


def compile_domain(raw: str) -> DomainPattern:
    """Compile one domain pattern; wildcards are allowed only as a whole leftmost label."""
    text = normalize_host(raw)
    if text == "*":
        return DomainPattern("*", exact=False, suffix="")
    wildcard = text.startswith("*.")
    body = text[2:] if wildcard else text
    if not body or "*" in body:
        raise ValueError(
            f"{raw!r} is not a domain (expected 'example.com', '*.example.com' or '*')"
        )
    for label in body.split("."):
        if not _LABEL.match(label):
            raise ValueError(f"{raw!r} is not a domain (bad label {label!r})")
    if wildcard:
        return DomainPattern(text, exact=False, suffix=body)
    return DomainPattern(text, exact=True, suffix="")


def parse_ip(text: str) -> IPAddress:
    """Parse a client address, unwrapping IPv4-mapped IPv6 (``::ffff:10.0.0.1`` -> 10.0.0.1)."""
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=4096)
def client_address(text: str) -> tuple[IPAddress, str]:
    """:func:`parse_ip` and its text, as connections want them (clients come back: cached)."""
    address = parse_ip(text)
    return address, str(address)


@dataclass(frozen=True, slots=True)
class IpRule:
    """A client IP rule: an address or CIDR network, or IPv4 octets with ``*`` wildcards."""

    text: str
    network: IPNetwork | None
    octets: tuple[int | None, ...] | None = None  # None entries are "*"

    def matches(self, address: IPAddress) -> bool:
        if self.network is not None:
            return address in self.network
        if self.text == "*":  # any client, IPv6 included
            return True
        if self.octets is None or not isinstance(address, ipaddress.IPv4Address):
            return False
        packed = address.packed
        pairs = zip(self.octets, packed, strict=True)
        return all(want is None or want == got for want, got in pairs)


def compile_ip_rule(raw: str) -> IpRule:
    """Compile ``10.0.0.1``, ``10.0.0.0/8``, ``192.168.1.*``, ``::1``, ``::ffff:1.2.3.4``, ``*``."""
    text = raw.strip()
    if text == "*":
        return IpRule(text, None, (None, None, None, None))
    if "*" in text:
        parts = text.split(".")
        if len(parts) != 4:
            raise ValueError(f"{raw!r} is not an IP rule (wildcards need four IPv4 octets)")
        octets: list[int | None] = []
        for part in parts:
            if part == "*":
                octets.append(None)
            elif part.isdigit() and int(part) <= 255:
                octets.append(int(part))
            else:
                raise ValueError(f"{raw!r} is not an IP rule (bad octet {part!r})")
        return IpRule(text, None, tuple(octets))
    try:
        if "/" in text:
            network: IPNetwork = ipaddress.ip_network(text, strict=False)
            if isinstance(network, ipaddress.IPv6Network):
                mapped = network.network_address.ipv4_mapped
                if mapped is not None and network.prefixlen >= 96:
                    network = ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}", False)
        else:
            address = parse_ip(text)
            network = ipaddress.ip_network(address)
    except ValueError:
        raise ValueError(
            f"{raw!r} is not an IP rule (expected an address, a CIDR network such as "
            "'10.0.0.0/8', or octets with '*' such as '192.168.1.*')"
        ) from None
    return IpRule(text, network)


def ip_allowed(rules: tuple[IpRule, ...], address: IPAddress) -> bool:
    """True when any rule matches ``address``."""
    return any(rule.matches(address) for rule in rules)


_PARAM = re.compile(r":([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True, slots=True)
class PathPattern:
    """An HTTP path pattern: exact (``/health``), glob (``/api/*``) or params (``/users/:id``)."""

    text: str
    kind: str  # "exact" | "glob" | "params"
    literal_prefix: str
    regex: re.Pattern[str] | None

    def match(self, path: str) -> dict[str, str] | None:
        """Return the captured params (empty for exact/glob) or ``None`` when it does not match."""
        if self.regex is None:
            return {} if path == self.text else None
        found = self.regex.fullmatch(path)
        return None if found is None else found.groupdict()


def compile_path(raw: str) -> PathPattern:
    """Compile a path pattern; ``*`` matches any run of characters, ``:name`` one segment.

    A trailing ``/*`` also matches the bare prefix, so ``/api/*`` takes ``/api`` too.
    """
    if not raw.startswith("/"):
        raise ValueError(f"{raw!r} is not a path pattern (it must start with '/')")
    # Requests are matched in the normal form of their path, so a pattern in any other form
    # could never match what it seems to say.
    try:
        normal = normalize_path(raw)
    except HttpParseError as exc:
        raise ValueError(f"{raw!r} can never match: {exc}") from None
    if normal != raw:
        raise ValueError(
            f"{raw!r} is not a normal path (requests are matched as {normal!r}); write {normal!r}"
        )
    if "*" not in raw and ":" not in raw:
        return PathPattern(raw, "exact", raw, None)
    pieces: list[str] = []
    position = 0
    names: set[str] = set()
    tokens = re.finditer(r"\*|:([A-Za-z_][A-Za-z0-9_]*)", raw)
    for token in tokens:
        pieces.append(re.escape(raw[position : token.start()]))
        if token.group(0) == "*":
            pieces.append(".*")
        else:
            name = token.group(1)
            if name in names:
                raise ValueError(f"{raw!r} is not a path pattern (param :{name} appears twice)")
            names.add(name)
            pieces.append(f"(?P<{name}>[^/]+)")
        position = token.end()
    pieces.append(re.escape(raw[position:]))
    pattern = "".join(pieces)
    if raw.endswith("/*"):
        pattern = pattern[: -len(re.escape("/") + ".*")] + "(?:/.*)?"
    first = min(i for i in (raw.find("*"), raw.find(":")) if i >= 0)
    kind = "params" if names else "glob"
    return PathPattern(raw, kind, raw[:first], re.compile(pattern, re.DOTALL))


@dataclass(frozen=True, slots=True)
class HeaderRule:
    """A header condition: lower-cased name and a value that is exact or a ``*`` glob."""

    name: str
    value: str
    regex: re.Pattern[str] | None

    def matches(self, headers: Mapping[str, str]) -> bool:
        got = headers.get(self.name)
        if got is None:
            return False
        if self.regex is None:
            return got == self.value
        return self.regex.fullmatch(got) is not None


def compile_header_rule(name: str, value: str) -> HeaderRule:
    """Compile one ``headers`` entry; header names compare case-insensitively."""
    if not name or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
        raise ValueError(f"{name!r} is not an HTTP header name")
    if "*" not in value:
        return HeaderRule(name.lower(), value, None)
    pattern = ".*".join(re.escape(part) for part in value.split("*"))
    return HeaderRule(name.lower(), value, re.compile(pattern, re.DOTALL))
