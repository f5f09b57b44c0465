"""An HTTPS site with a provided certificate, and the HTTP -> HTTPS redirect beside it.

``create_complete_https_server`` returns both routes: TLS is terminated at the proxy with the
given certificate, requests go on as plain HTTP to the backend, and plain-HTTP visitors are
sent to the same URL over HTTPS. Here the "backend" is another smartroute route (a socket
handler answering HTTP), so the example needs nothing else.

Run it: ``python examples/https_site.py``
"""

from __future__ import annotations

import asyncio
import http.client
import socket
import ssl

from _selfsigned import self_signed

from smartroute import SmartRoute
from smartroute.helpers import (
    SocketHandlers,
    create_complete_https_server,
    create_socket_handler_route,
)

HTTP_PORT, HTTPS_PORT, BACKEND_PORT = 9080, 9480, 9081
CERT, KEY = self_signed("site.localhost")

routes = [
    *create_complete_https_server(
        "site.localhost",
        {"host": "127.0.0.1", "port": BACKEND_PORT},
        certificate={"cert": CERT, "key": KEY},
        http_port=HTTP_PORT,
        https_port=HTTPS_PORT,
        name="site",
    ),
    create_socket_handler_route(
        None, BACKEND_PORT, SocketHandlers.http_response(200, "hello over HTTPS\n"), name="app"
    ),
]


def fetch() -> None:
    """Visit the site as a browser would: plain HTTP first, then the HTTPS it points to."""
    plain = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=10)
    plain.request("GET", "/welcome?lang=en", headers={"Host": "site.localhost"})
    answer = plain.getresponse()
    print("http: ", answer.status, answer.getheader("Location"))
    # Connect to 127.0.0.1 but ask for site.localhost (SNI and Host), trusting our certificate.
    context = ssl.create_default_context(cadata=CERT)
    secure = http.client.HTTPSConnection("site.localhost", HTTPS_PORT, timeout=10, context=context)
    raw = socket.create_connection(("127.0.0.1", HTTPS_PORT), timeout=10)
    secure.sock = context.wrap_socket(raw, server_hostname="site.localhost")
    secure.request("GET", "/welcome?lang=en")
    answer = secure.getresponse()
    print("https:", answer.status, answer.read().decode().strip())


async def main() -> None:
    async with SmartRoute(routes, bind_address="127.0.0.1"):
        await asyncio.to_thread(fetch)


if __name__ == "__main__":
    asyncio.run(main())
