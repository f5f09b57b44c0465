"""A socket-handler echo service: the smallest useful smartroute.

Run it: ``python examples/echo_service.py`` (serves, talks to itself once, and exits), or serve
it until Ctrl-C with ``smartroute run examples/echo_service.py``.
"""

from __future__ import annotations

import asyncio

from smartroute import SmartRoute
from smartroute.helpers import SocketHandlers, create_socket_handler_route

PORT = 9401

routes = [create_socket_handler_route(None, PORT, SocketHandlers.echo, name="echo")]
settings = {"bind_address": "127.0.0.1"}


async def main() -> None:
    async with SmartRoute(routes, **settings) as proxy:
        print("listening:", proxy.listening_ports)
        reader, writer = await asyncio.open_connection("127.0.0.1", PORT)
        writer.write(b"hello, smartroute\n")
        writer.write_eof()
        print("echoed:", (await reader.read()).decode().strip())
        writer.close()


if __name__ == "__main__":
    asyncio.run(main())
