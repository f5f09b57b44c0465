"""The built-in demo that ``smartroute run`` serves when no config is given."""

from __future__ import annotations

import datetime
from typing import Any

from smartroute.context import RouteContext
from smartroute.helpers import SocketHandlers, create_socket_handler_route, create_tcp_forward_route


def _shout(line: str, ctx: RouteContext) -> str | None:
    """The demo line protocol: ``time``, ``whoami``, ``quit`` or any text to upper-case."""
    command = line.strip().lower()
    if command == "time":
        return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    if command == "whoami":
        return f"{ctx.client_ip}:{ctx.client_port} via route {ctx.route_name}"
    return line.upper()


def demo_routes(port_base: int = 8081) -> list[dict[str, Any]]:
    """An echo service, a line-protocol service and a TCP forward to the echo service."""
    echo, shout, forward = port_base, port_base + 1, port_base + 2
    return [
        create_socket_handler_route(None, echo, SocketHandlers.echo, name="echo"),
        create_socket_handler_route(
            None, shout, SocketHandlers.line_protocol(_shout), name="shout"
        ),
        create_tcp_forward_route(forward, {"host": "127.0.0.1", "port": echo}, name="forward"),
    ]


def describe_demo(port_base: int, host: str) -> list[str]:
    echo, shout, forward = port_base, port_base + 1, port_base + 2
    return [
        f"echo     {host}:{echo}     sends back every byte    try: nc {host} {echo}",
        f"shout    {host}:{shout}     line protocol: 'time', 'whoami', or text to upper-case",
        f"forward  {host}:{forward}     TCP forward to the echo service on port {echo}",
    ]
