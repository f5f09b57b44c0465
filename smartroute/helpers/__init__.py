"""Helper factories for common routes and socket handlers."""

from smartroute.helpers.handlers import SocketHandlers
from smartroute.helpers.routes import (
    create_https_passthrough_route,
    create_port_range_route,
    create_socket_handler_route,
    create_tcp_forward_route,
)

__all__ = [
    "SocketHandlers",
    "create_https_passthrough_route",
    "create_port_range_route",
    "create_socket_handler_route",
    "create_tcp_forward_route",
]
