"""Which routes the fast lane can carry: the fixed addresses a route pipes bytes or sends HTTP
requests to, if any.

Pure: a compiled route and a port in, addresses (or None) out. The lane
(:class:`~smartroute.server.lane.RelayLane`) keeps one plan of each kind per route and port of
the current route table.
"""

from __future__ import annotations

import ipaddress
import socket

from smartroute.routing.model import CompiledRoute, ForwardAction

# One target address: (family, socket address, "host:port" for records and errors).
Address = tuple[int, tuple[str, int], str]


def literal_address(host: str, port: int) -> Address | None:
    """The address of an IP-literal host, or None for a name (names need a resolver)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return family, (str(ip), port), f"{host}:{port}"


def relay_plan(route: CompiledRoute, port: int) -> tuple[Address, ...] | None:
    """The fixed addresses a route pipes to on ``port``, or None when it needs more than that.

    None for anything but a plain byte forward (HTTP, TLS termination or re-encryption), for
    target callables, host names and PROXY protocol headers: those take the transport path.
    """
    action = route.action
    if not isinstance(action, ForwardAction) or action.protocol == "http":
        return None
    if route.tls is not None and route.tls.mode != "passthrough":
        return None
    return fixed_addresses(action, port)


def http_plan(route: CompiledRoute, port: int) -> tuple[Address, ...] | None:
    """The fixed addresses an HTTP reverse-proxy route sends requests to on ``port``, or None
    when its requests need the transport path (target callables, host names, PROXY protocol
    headers) or it is no HTTP forward. A route that terminates TLS (and perhaps re-encrypts
    to its targets) qualifies when it forwards HTTP only (``protocol: "http"``)."""
    action = route.action
    if not isinstance(action, ForwardAction) or action.protocol == "tcp":
        return None
    tls = route.tls
    if tls is not None and (tls.mode == "passthrough" or action.protocol != "http"):
        return None
    return fixed_addresses(action, port)


def fixed_addresses(action: ForwardAction, port: int) -> tuple[Address, ...] | None:
    """The addresses of ``action``'s targets when they are all IP literals without PROXY
    headers, in order; else None."""
    addresses: list[Address] = []
    for target in action.targets:
        if callable(target.host) or callable(target.port) or target.send_proxy_protocol:
            return None
        target_port = port if target.port == "preserve" else target.port
        for host in target.host:
            address = literal_address(host, target_port)
            if address is None:
                return None
            addresses.append(address)
    return tuple(addresses) if addresses else None
