"""Route factories: each returns a plain route dict that the proxy validates like any other."""

from __future__ import annotations

from typing import Any

from smartroute.routing.model import SocketHandler

Domains = str | list[str] | None
Ports = int | str | list[Any]


def _route(
    match: dict[str, Any], action: dict[str, Any], name: str | None, priority: int | None
) -> dict[str, Any]:
    route: dict[str, Any] = {"match": match, "action": action}
    if name is not None:
        route["name"] = name
    if priority is not None:
        route["priority"] = priority
    return route


def _match(ports: Ports, domains: Domains) -> dict[str, Any]:
    match: dict[str, Any] = {"ports": ports}
    if domains is not None:
        match["domains"] = domains
    return match


def create_socket_handler_route(
    domains: Domains,
    ports: Ports,
    handler: SocketHandler | str,
    *,
    name: str | None = None,
    priority: int | None = None,
) -> dict[str, Any]:
    """A route that hands matching connections to ``handler(reader, writer, ctx)``."""
    action = {"type": "socket-handler", "socket_handler": handler}
    return _route(_match(ports, domains), action, name, priority)


def create_tcp_forward_route(
    ports: Ports,
    target: dict[str, Any],
    *,
    domains: Domains = None,
    name: str | None = None,
    priority: int | None = None,
) -> dict[str, Any]:
    """A raw TCP forward (``protocol: "tcp"``): bytes are piped to ``target`` unchanged."""
    action = {"type": "forward", "targets": [target], "protocol": "tcp"}
    return _route(_match(ports, domains), action, name, priority)


def create_https_passthrough_route(
    domains: Domains,
    target: dict[str, Any],
    *,
    ports: Ports = 443,
    name: str | None = None,
    priority: int | None = None,
) -> dict[str, Any]:
    """TLS passthrough by SNI: the encrypted stream goes to ``target`` untouched."""
    action = {"type": "forward", "targets": [target], "tls": {"mode": "passthrough"}}
    return _route(_match(ports, domains), action, name, priority)


def create_port_range_route(
    ports: Ports,
    target: dict[str, Any],
    *,
    domains: Domains = None,
    name: str | None = None,
    priority: int | None = None,
) -> dict[str, Any]:
    """Forward a range of ports (``"9000-9005"``); use ``"port": "preserve"`` to keep each port."""
    action = {"type": "forward", "targets": [target]}
    return _route(_match(ports, domains), action, name, priority)
