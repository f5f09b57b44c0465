"""Runs smartroute with the routes of a JSON file until SIGTERM or SIGINT (for bench/run.py).

    python bench/smartroute_server.py ROUTES.json

One process, the default asyncio event loop, default settings except the bind address; no
logging handler is installed, so the access log costs nothing (as in a quiet deployment).
"""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import sys
from pathlib import Path
from typing import Any

from smartroute import SmartRoute


def raise_fd_limit() -> None:
    """Allow as many open files as the hard limit (idle-connection runs hold thousands)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(routes: list[dict[str, Any]]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    proxy = SmartRoute(routes, bind_address="127.0.0.1", graceful_shutdown_timeout=1.0)
    await proxy.start()
    print(f"ready {sorted(proxy.listening_ports)}", flush=True)
    await stop.wait()
    await proxy.stop()


def main() -> None:
    raise_fd_limit()
    routes = json.loads(Path(sys.argv[1]).read_text())
    asyncio.run(serve(routes))


if __name__ == "__main__":
    main()
