"""Helper factories for common routes and socket handlers, and the framed-protocol kit."""

from smartroute.errors import ConnectFailed, Disconnected, FrameError, RequestTimeout, ServiceError
from smartroute.helpers.framed import FramedService
from smartroute.helpers.framed_client import FramedClient
from smartroute.helpers.framed_sessions import Session
from smartroute.helpers.frames import Frame, FrameDecoder, encode_frame
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
    "ConnectFailed",
    "Disconnected",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "FramedClient",
    "FramedService",
    "RequestTimeout",
    "ServiceError",
    "Session",
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
    "encode_frame",
]
