"""Three backends behind one route: weighted round-robin, a health check, failover, backups.

Three small HTTP backends run in this process; the route gives ``blue`` three requests for
each one of ``green`` and keeps ``spare`` as a backup. ``green`` starts failing its health
check: it leaves the rotation without a failed request. Then ``blue`` is stopped too, and the
backup takes over.

Run it: ``python examples/load_balancing.py``
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable

from smartroute import SmartRoute

PROXY = 9601
BACKENDS = {"blue": 9611, "green": 9612, "spare": 9613}
healthy = {"blue": True, "green": True, "spare": True}


def backend(name: str) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """Answers ``/health`` with 200 or 503 (``healthy[name]``) and anything else with its name."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await reader.readuntil(b"\r\n\r\n"):
            path = head.split(b" ")[1]
            ok = path != b"/health" or healthy[name]
            body = name.encode() + b"\n"
            status = b"200 OK" if ok else b"503 Service Unavailable"
            writer.write(b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body))
            await writer.drain()

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handle(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return guarded


async def get(path: str = "/") -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", PROXY)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: app.localhost\r\nConnection: close\r\n\r\n".encode()
    )
    data = await reader.read(-1)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body.decode().strip()


async def spread(count: int) -> str:
    answers = Counter([(await get())[1] for _ in range(count)])
    return " ".join(f"{name}={answers[name]}" for name in sorted(answers))


async def until_down(proxy: SmartRoute, name: str) -> None:
    while proxy.stats()["targets"][f"127.0.0.1:{BACKENDS[name]}"]["up"]:
        await asyncio.sleep(0.05)


async def main() -> None:
    servers = {
        name: await asyncio.start_server(backend(name), "127.0.0.1", port)
        for name, port in BACKENDS.items()
    }
    route = {
        "name": "app",
        "match": {"ports": PROXY},
        "action": {
            "type": "forward",
            "protocol": "http",
            "targets": [
                {"host": "127.0.0.1", "port": BACKENDS["blue"], "weight": 3},
                {"host": "127.0.0.1", "port": BACKENDS["green"]},
                {"host": "127.0.0.1", "port": BACKENDS["spare"], "backup": True},
            ],
            "health_check": {"type": "http", "path": "/health", "interval": 0.1, "fall": 1},
        },
    }
    async with SmartRoute([route], bind_address="127.0.0.1") as proxy:
        print("weights 3:1:       ", await spread(8))
        healthy["green"] = False
        await until_down(proxy, "green")
        print("green unhealthy:   ", await spread(4))
        servers["blue"].close()
        await servers["blue"].wait_closed()
        await until_down(proxy, "blue")
        print("blue stopped:      ", await spread(4))
        print(
            "targets up:        ",
            sorted(
                name
                for name, port in BACKENDS.items()
                if proxy.stats()["targets"][f"127.0.0.1:{port}"]["up"]
            ),
        )
    for server in servers.values():
        server.close()


if __name__ == "__main__":
    asyncio.run(main())
