"""A backend that accepts connections and holds them, reading and sending nothing.

    python bench/idle_backend.py PORT

Used by bench/run.py to measure proxy memory per idle connection; runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import resource
import signal
import sys


class Hold(asyncio.Protocol):
    """Keeps the connection open; whatever arrives is dropped."""

    def data_received(self, data: bytes) -> None:
        pass


async def serve(port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(Hold, "127.0.0.1", port, backlog=4096)
    print(f"ready {port}", flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
