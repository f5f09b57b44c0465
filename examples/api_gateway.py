"""A path-based API gateway: ``/api/*`` to one backend, everything else to another.

Each request on a kept-alive connection is routed on its own, so one browser connection can
reach both backends. The two backends here are socket-handler routes on internal ports
answering HTTP, which keeps the example self-contained; in real use they are your services.

Run it: ``python examples/api_gateway.py``
"""

from __future__ import annotations

import asyncio
import http.client

from smartroute import SmartRoute
from smartroute.helpers import SocketHandlers, create_socket_handler_route

GATEWAY, API, WEB = 9280, 9281, 9282


def to(port: int) -> dict[str, object]:
    return {"type": "forward", "targets": [{"host": "127.0.0.1", "port": port}], "protocol": "http"}


routes = [
    {"name": "api", "match": {"ports": GATEWAY, "path": "/api/*"}, "action": to(API)},
    {"name": "web", "match": {"ports": GATEWAY}, "action": to(WEB)},
    create_socket_handler_route(None, API, SocketHandlers.http_response(200, '{"users": []}\n')),
    create_socket_handler_route(None, WEB, SocketHandlers.http_response(200, "<h1>home</h1>\n")),
]


def fetch() -> None:
    client = http.client.HTTPConnection("127.0.0.1", GATEWAY, timeout=10)  # one connection
    for path in ("/api/users", "/index.html", "/api"):
        client.request("GET", path)
        answer = client.getresponse()
        print(f"{path:12} {answer.status} {answer.read().decode().strip()}")


async def main() -> None:
    async with SmartRoute(routes, bind_address="127.0.0.1"):
        await asyncio.to_thread(fetch)


if __name__ == "__main__":
    asyncio.run(main())
