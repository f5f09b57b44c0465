"""Routes change while the proxy runs: ports come and go, live connections stay up.

A client keeps one connection open to the echo route while routes are added and removed.
The shared port is never rebound, so that connection carries on byte for byte.

Run it: ``python examples/runtime_updates.py``
"""

from __future__ import annotations

import asyncio

from smartroute import SmartRoute
from smartroute.helpers import SocketHandlers, create_socket_handler_route

ECHO, EXTRA = 9501, 9502


async def main() -> None:
    echo = create_socket_handler_route(None, ECHO, SocketHandlers.echo, name="echo")
    async with SmartRoute([echo], bind_address="127.0.0.1") as proxy:
        print("start:   ", proxy.listening_ports)
        reader, writer = await asyncio.open_connection("127.0.0.1", ECHO)

        async def ping(text: str) -> str:
            writer.write(text.encode() + b"\n")
            return (await reader.readline()).decode().strip()

        print("echo:    ", await ping("before any update"))

        hello = create_socket_handler_route(
            None, EXTRA, SocketHandlers.http_response(200, "hi\n"), name="hello"
        )
        await proxy.add_route(hello)
        print("added:   ", proxy.listening_ports)
        second = create_socket_handler_route("never.localhost", ECHO, SocketHandlers.block())
        await proxy.update_routes([echo, hello, {**second, "name": "second"}])
        print("shared:  ", proxy.listening_ports)
        await proxy.remove_route("hello")
        await proxy.remove_route("second")
        print("removed: ", proxy.listening_ports)

        print("echo:    ", await ping("after every update, same connection"))
        writer.close()


if __name__ == "__main__":
    asyncio.run(main())
