"""How long a large route set takes to validate, index and start.

Run: ``python bench/load_bench.py`` (prints medians of 5 runs for 10 / 1,000 / 10,000 routes).

Routes are spread over 50 ports on 127.0.0.1, mostly exact domains with some wildcards and
domain-less fallbacks, like a multi-tenant TLS front. "start" binds the 50 ports and returns.
"""

from __future__ import annotations

import asyncio
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smartroute import SmartRoute  # noqa: E402
from smartroute.routing.matcher import RouteTable  # noqa: E402
from smartroute.routing.validation import validate_routes  # noqa: E402

PORT_BASE = 47000
PORTS = 50
RUNS = 5


def make_routes(count: int) -> list[dict[str, Any]]:
    routes: list[dict[str, Any]] = []
    for i in range(count):
        if i % 100 == 99:
            domains: list[str] | None = None
        elif i % 10 == 9:
            domains = [f"*.w{i}.example.test"]
        else:
            domains = [f"h{i}.example.test"]
        match: dict[str, Any] = {"ports": PORT_BASE + i % PORTS}
        if domains:
            match["domains"] = domains
        routes.append(
            {
                "name": f"r{i}",
                "match": match,
                "action": {
                    "type": "forward",
                    "targets": [{"host": "127.0.0.1", "port": 9000 + i % 7}],
                    "tls": {"mode": "passthrough"},
                },
            }
        )
    return routes


async def start_stop(routes: list[dict[str, Any]]) -> tuple[float, float]:
    began = time.perf_counter()
    proxy = SmartRoute(routes, bind_address="127.0.0.1")
    await proxy.start()
    elapsed = time.perf_counter() - began
    await proxy.stop()
    return elapsed, float(len(proxy.routes))


def main() -> None:
    print(f"# python {platform.python_version()} on {platform.machine()}")
    print(f"{'routes':>7} {'validate ms':>12} {'index ms':>9} {'start ms':>9}")
    for count in (10, 1_000, 10_000):
        raw = make_routes(count)
        validate, index, start = [], [], []
        for _ in range(RUNS):
            t0 = time.perf_counter()
            compiled = validate_routes(raw)
            t1 = time.perf_counter()
            RouteTable(compiled)
            t2 = time.perf_counter()
            validate.append(t1 - t0)
            index.append(t2 - t1)
            start.append(asyncio.run(start_stop(raw))[0])
        print(
            f"{count:>7} {statistics.median(validate) * 1e3:>12.1f} "
            f"{statistics.median(index) * 1e3:>9.1f} {statistics.median(start) * 1e3:>9.1f}"
        )


if __name__ == "__main__":
    main()
