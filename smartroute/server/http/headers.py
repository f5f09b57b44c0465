"""Header rewriting for the reverse proxy: hop-by-hop removal and the forwarding headers.

Incoming ``X-Forwarded-*`` and ``Forwarded`` values are never trusted: the proxy appends the
client it saw to the ``X-Forwarded-For`` / ``Forwarded`` chains and overwrites
``X-Forwarded-Proto`` and ``X-Forwarded-Host`` with what it knows itself.
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


def connection_tokens(headers: Iterable[tuple[str, str]]) -> set[str]:
    """The lower-cased options named in every ``Connection`` header."""
    tokens: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
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
