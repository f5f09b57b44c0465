"""A static site: files under a folder, with index pages, types, caching headers and ranges.

Run it: ``python examples/static_site.py`` (writes a small site to a temporary folder, serves
it, fetches two pages and exits). Paths that try to leave the folder get 404.
"""

from __future__ import annotations

import asyncio
import http.client
import tempfile
from pathlib import Path

from smartroute import SmartRoute
from smartroute.helpers import create_static_route

PORT = 9180


def fetch() -> None:
    client = http.client.HTTPConnection("127.0.0.1", PORT, timeout=10)
    for path in ("/", "/style.css", "/../etc/passwd"):
        client.request("GET", path, headers={"Host": "docs.localhost"})
        answer = client.getresponse()
        body = answer.read()
        kind = answer.getheader("Content-Type")
        print(f"{path:15} {answer.status} {kind} {body.splitlines()[0].decode()}")


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp)
        (site / "index.html").write_text("<h1>smartroute docs</h1>\n")
        (site / "style.css").write_text("h1 { color: teal }\n")
        routes = [create_static_route("docs.localhost", str(site), ports=PORT, name="docs")]
        async with SmartRoute(routes, bind_address="127.0.0.1"):
            await asyncio.to_thread(fetch)


if __name__ == "__main__":
    asyncio.run(main())
