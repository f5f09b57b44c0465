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


Certificate = str | dict[str, str]


def _forward_http(target: dict[str, Any], tls: dict[str, Any] | None = None) -> dict[str, Any]:
    action: dict[str, Any] = {"type": "forward", "targets": [target], "protocol": "http"}
    if tls is not None:
        action["tls"] = tls
    return action


def create_http_route(
    domains: Domains,
    target: dict[str, Any],
    *,
    ports: Ports = 80,
    name: str | None = None,
    priority: int | None = None,
) -> dict[str, Any]:
    """A plain HTTP reverse proxy to ``target``: each request routed and forwarded on its own."""
    return _route(_match(ports, domains), _forward_http(target), name, priority)


def create_https_terminate_route(
    domains: Domains,
    target: dict[str, Any],
    *,
    certificate: Certificate = "auto",
    ports: Ports = 443,
    reencrypt: bool = False,
    name: str | None = None,
    priority: int | None = None,
) -> dict[str, Any]:
    """HTTPS ended at the proxy with ``certificate`` ("auto", "on-demand" or {"cert", "key"}),
    then HTTP to ``target`` (TLS again with ``reencrypt=True``)."""
    mode = "terminate-and-reencrypt" if reencrypt else "terminate"
    tls = {"mode": mode, "certificate": certificate}
    return _route(_match(ports, domains), _forward_http(target, tls), name, priority)


def create_http_to_https_redirect(
    domains: Domains,
    *,
    ports: Ports = 80,
    https_port: int = 443,
    status: int = 301,
    name: str | None = None,
    priority: int | None = None,
) -> dict[str, Any]:
    """Send every plain HTTP request to the same host, path and query over HTTPS."""
    authority = "{domain}" if https_port == 443 else "{domain}:" + str(https_port)
    redirect = {"to": f"https://{authority}{{path}}{{query}}", "status": status}
    action = {"type": "redirect", "redirect": redirect}
    return _route(_match(ports, domains), action, name, priority)


def create_complete_https_server(
    domains: Domains,
    target: dict[str, Any],
    *,
    certificate: Certificate = "auto",
    http_port: int = 80,
    https_port: int = 443,
    name: str | None = None,
    priority: int | None = None,
) -> list[dict[str, Any]]:
    """An HTTPS site for ``target`` plus the HTTP -> HTTPS redirect for the same domains."""
    return [
        create_https_terminate_route(
            domains, target, certificate=certificate, ports=https_port, name=name, priority=priority
        ),
        create_http_to_https_redirect(
            domains,
            ports=http_port,
            https_port=https_port,
            name=None if name is None else f"{name}-redirect",
            priority=priority,
        ),
    ]


def create_static_route(
    domains: Domains,
    root: str,
    *,
    ports: Ports = 80,
    certificate: Certificate | None = None,
    name: str | None = None,
    priority: int | None = None,
) -> dict[str, Any]:
    """Files under ``root`` (``index.html`` for directories); over HTTPS when given a
    ``certificate``."""
    action: dict[str, Any] = {"type": "static", "static": {"root": root}}
    if certificate is not None:
        action["tls"] = {"mode": "terminate", "certificate": certificate}
    return _route(_match(ports, domains), action, name, priority)
