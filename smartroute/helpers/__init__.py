"""Helper factories for common routes and socket handlers."""

from smartroute.helpers.handlers import SocketHandlers
from smartroute.helpers.routes import (
    create_complete_https_server,
    create_http_route,
    create_http_to_https_redirect,
    create_https_passthrough_route,
    create_https_terminate_route,
    create_port_range_route,
    create_socket_handler_route,
    create_static_route,
    create_tcp_forward_route,
)

__all__ = [
    "SocketHandlers",
    "create_complete_https_server",
    "create_http_route",
    "create_http_to_https_redirect",
    "create_https_passthrough_route",
    "create_https_terminate_route",
    "create_port_range_route",
    "create_socket_handler_route",
    "create_static_route",
    "create_tcp_forward_route",
]
