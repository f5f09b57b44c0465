"""TLS passthrough by SNI: one port, two TLS backends, chosen by the name the client asks for.

The proxy never decrypts anything: it reads the server name from the ClientHello and pipes
the encrypted stream to the backend that owns that name. The example makes throwaway
certificates, starts two TLS backends, routes to them and connects once to each.

Run it: ``python examples/sni_passthrough.py``
"""

from __future__ import annotations

import asyncio
import ssl
import tempfile
from pathlib import Path

from _selfsigned import self_signed

from smartroute import SmartRoute
from smartroute.helpers import create_https_passthrough_route

PROXY_PORT = 9443
NAMES = {"alpha.localhost": 9444, "beta.localhost": 9445}

routes = [
    create_https_passthrough_route(name, {"host": "127.0.0.1", "port": port}, ports=PROXY_PORT)
    for name, port in NAMES.items()
]


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        servers, pems = [], {}
        for name, port in NAMES.items():
            cert, key = self_signed(name)
            pems[name] = Path(tmp) / f"{name}.pem"
            pems[name].write_text(cert + key)
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(pems[name])

            async def greet(
                reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str = name
            ) -> None:
                writer.write(f"hello from the {name} backend\n".encode())
                await writer.drain()
                writer.close()

            servers.append(await asyncio.start_server(greet, "127.0.0.1", port, ssl=context))

        async with SmartRoute(routes, bind_address="127.0.0.1"):
            for name in NAMES:
                client = ssl.create_default_context(cafile=str(pems[name]))
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", PROXY_PORT, ssl=client, server_hostname=name
                )
                print(f"{name}: {(await reader.readline()).decode().strip()}")
                writer.close()
        for server in servers:
            server.close()


if __name__ == "__main__":
    asyncio.run(main())
