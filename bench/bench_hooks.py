"""The hooks bench/hooks_bench.py measures, and a smartroute server that takes settings.

The hooks are module attributes, so that a configuration names them by import path
(``"bench_hooks:PASS"``) as a JSON or TOML configuration would:

- ``PASS``: ``on_request`` that says nothing (returns None);
- ``HEADER``: ``on_request`` that sets one request header (``X-Hooked: 1``);
- ``OBSERVER``: an ``on_data`` observer that does nothing with the bytes.

Run as a script (through bench/balance_bench.py's launcher, which picks the smartroute source
and the event loop), it serves a JSON file ``{"routes": [...], "settings": {...}}`` until
SIGTERM or SIGINT, like bench/smartroute_server.py with settings added, and first prints, per
port, whether the fast lane serves it and which hooks its routes carry (read from the proxy's
private runtime: the benchmark checks that each configuration is what it claims to be).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smartroute import RouteContext, SmartRoute

if TYPE_CHECKING:  # not at run time: the code before the hooks (--baseline-rev) has no such module
    from smartroute.server.hooks import HookRequest

HERE = Path(__file__).resolve().parent
KINDS = ("on_connect", "on_request", "on_response", "on_disconnect", "on_data")


class PassHook:
    """``on_request`` with nothing to say: the request goes on as it came."""

    async def on_request(self, ctx: RouteContext, request: HookRequest) -> None:
        return None


class HeaderHook:
    """``on_request`` that adds ``X-Hooked: 1`` to every request (a new dict each time, as a
    real hook would build it)."""

    async def on_request(self, ctx: RouteContext, request: HookRequest) -> dict[str, Any]:
        return {"set_headers": {"X-Hooked": "1"}}


class NullObserver:
    """``on_data`` that looks at nothing: what observing costs by itself."""

    def on_data(self, ctx: RouteContext, direction: str, data: bytes) -> None:
        return None


PASS = PassHook()
HEADER = HeaderHook()
OBSERVER = NullObserver()


def describe(proxy: SmartRoute) -> list[str]:
    """Per port: does the fast lane serve it, and how many hooks of each kind its routes run."""
    runtime = proxy._runtime
    lines = []
    for port in sorted(proxy.listening_ports):
        kinds: dict[str, int] = {}
        for route in runtime.table.ordered(port):
            chain = getattr(route, "chain", None)  # absent before the hooks
            for kind in KINDS if chain is not None else ():
                kinds[kind] = kinds.get(kind, 0) + len(getattr(chain, kind))
        hooks = ", ".join(f"{kind} {n}" for kind, n in kinds.items() if n) or "none"
        lines.append(f"port {port}: lane {runtime.lane.serves(port)}; hooks: {hooks}")
    return lines


async def serve(routes: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    proxy = SmartRoute(routes, bind_address="127.0.0.1", graceful_shutdown_timeout=1.0, **settings)
    await proxy.start()
    for line in describe(proxy):
        print(line, flush=True)
    print(f"ready {sorted(proxy.listening_ports)}", flush=True)
    await stop.wait()
    await proxy.stop()


def main() -> None:
    # Started through runpy, which does not put this folder on sys.path: the hooks' import
    # paths and smartroute_server need it (after the chosen smartroute source).
    if str(HERE) not in sys.path:
        sys.path.append(str(HERE))
    from smartroute_server import raise_fd_limit

    raise_fd_limit()
    config = json.loads(Path(sys.argv[1]).read_text())
    asyncio.run(serve(config["routes"], config.get("settings", {})))


if __name__ == "__main__":
    main()
