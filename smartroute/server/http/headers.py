"""Header rewriting for the reverse proxy: hop-by-hop removal and the forwarding headers.

Incoming ``X-Forwarded-*`` and ``Forwarded`` values are never trusted: the proxy appends the
client it saw to the ``X-Forwarded-For`` / ``Forwarded`` chains and overwrites
``X-Forwarded-Proto`` and ``X-Forwarded-Host`` with what it knows itself.

:func:`end_to_end` and :func:`forwarding_headers` say what the rewriting is;
:func:`request_lines` and :func:`response_lines` do the same in one pass per message, giving
the rendered ``Name: value`` lines that the proxy sends.
"""

from __future__ import annotations

from collections.abc import Iterable

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
# The forwarding headers the proxy writes itself.
_FORWARDING = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded"})
_END_TO_END_DROP = HOP_BY_HOP | {"expect", "content-length"}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}
_SUFFIXES: dict[tuple[str, str, str | None], str] = {}  # see request_lines
_SUFFIXES_MAX = 1024


def connection_tokens(headers: Iterable[tuple[str, str]]) -> set[str]:
    """The lower-cased options named in every ``Connection`` header."""
    tokens: set[str] = set()
    for name, value in headers:
        if len(name) == 10 and name.lower() == "connection":
            tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def end_to_end(
    headers: Iterable[tuple[str, str]], *, drop: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """The headers without hop-by-hop ones, those named in ``Connection``, and ``drop``."""
    headers = list(headers)
    skip = HOP_BY_HOP | connection_tokens(headers) | drop
    return [(name, value) for name, value in headers if name.lower() not in skip]


def _forwarded_node(ip: str) -> str:
    return f'"[{ip}]"' if ":" in ip else ip


def forwarding_headers(
    headers: list[tuple[str, str]], *, client_ip: str, proto: str, host: str | None
) -> list[tuple[str, str]]:
    """``headers`` with the client appended to the forwarding chains and our own proto/host."""
    previous_xff = [v for n, v in headers if n.lower() == "x-forwarded-for"]
    previous_fwd = [v for n, v in headers if n.lower() == "forwarded"]
    replaced = {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded"}
    kept = [(n, v) for n, v in headers if n.lower() not in replaced]
    kept.append(("X-Forwarded-For", ", ".join([*previous_xff, client_ip])))
    kept.append(("X-Forwarded-Proto", proto))
    element = f"for={_forwarded_node(client_ip)};proto={proto}"
    if host:
        kept.append(("X-Forwarded-Host", host))
        if all(c not in host for c in '";,\\'):
            element += f';host="{host}"'
    kept.append(("Forwarded", ", ".join([*previous_fwd, element])))
    return kept


def render_lines(headers: Iterable[tuple[str, str]]) -> str:
    return "".join([f"{name}: {value}\r\n" for name, value in headers])


def request_lines(
    headers: Iterable[tuple[str, str]],
    tokens: set[str],
    *,
    client_ip: str,
    proto: str,
    host: str | None = None,
) -> str:
    """The header lines of a request going to a backend: ``forwarding_headers`` of
    ``end_to_end`` of ``headers`` (``expect`` and ``content-length`` dropped too), rendered,
    with the ``Host`` as the forwarded host. ``tokens`` are the request's
    :func:`connection_tokens`. ``host`` replaces the client's ``Host`` (for an absolute-form
    target, whose authority wins over Host: RFC 9112 section 3.2.2)."""
    lines = []
    replace_host = host is not None
    if replace_host:
        lines.append(f"Host: {host}\r\n")
    previous: list[tuple[str, str]] = []  # the forwarding chains the client sent
    for name, value in headers:
        lower = name.lower()
        if lower == "host":
            if replace_host:
                continue
            if host is None:
                host = value
        if lower in _END_TO_END_DROP or tokens and lower in tokens:
            continue
        if lower in _FORWARDING:
            previous.append((name, value))
            continue
        lines.append(f"{name}: {value}\r\n")
    if previous:
        forwarding = forwarding_headers(previous, client_ip=client_ip, proto=proto, host=host)
        lines.append(render_lines(forwarding))
        return "".join(lines)
    # The usual case: no chain to extend, so these lines depend on the client, proto and Host
    # only, which a connection repeats.
    key = (client_ip, proto, host)
    suffix = _SUFFIXES.get(key)
    if suffix is None:
        suffix = render_lines(forwarding_headers([], client_ip=client_ip, proto=proto, host=host))
        if len(_SUFFIXES) >= _SUFFIXES_MAX:
            _SUFFIXES.clear()
        _SUFFIXES[key] = suffix
    lines.append(suffix)
    return "".join(lines)


def response_lines(
    headers: Iterable[tuple[str, str]], tokens: set[str], *, keep_length: bool = False
) -> str:
    """``end_to_end`` of a response's ``headers`` (``content-length`` dropped too unless
    ``keep_length``), rendered; ``tokens`` are its :func:`connection_tokens`."""
    drop = HOP_BY_HOP if keep_length else _RESPONSE_DROP
    if tokens:
        drop = drop | tokens
    return "".join([f"{name}: {value}\r\n" for name, value in headers if name.lower() not in drop])
