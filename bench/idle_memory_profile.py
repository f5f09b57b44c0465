"""Where smartroute's memory per idle connection goes, by allocation site (tracemalloc).

    python bench/idle_memory_profile.py [--connections 1000]

Runs smartroute in this process with one port-only forward route to ``idle_backend.py``
(another process); a client process opens the connections and holds them, so that only the
proxy's allocations are in this process. Prints the growth of RSS and of the Python heap per
connection, and the allocation sites that grew most, in bytes per connection. tracemalloc
itself slows allocation and adds its own memory to RSS, so RSS here is higher than in run.py.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tracemalloc
from pathlib import Path

from bench_procs import established_to, port_free, rss_bytes

from smartroute import SmartRoute

HERE = Path(__file__).resolve().parent
CLIENT = """
import socket, sys
socks = [socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
         for _ in range(int(sys.argv[2]))]
print("open", flush=True)
sys.stdin.read()
"""


def free_port(start: int) -> int:
    port = start
    while not port_free(port):
        port += 1
    return port


async def wait_held(port: int, count: int) -> None:
    async with asyncio.timeout(60):
        while established_to(port) != count:
            await asyncio.sleep(0.05)


async def hold(proxy_port: int, backend: int, count: int) -> asyncio.subprocess.Process:
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLIENT,
        str(proxy_port),
        str(count),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert client.stdout is not None
    await client.stdout.readline()
    await wait_held(backend, count)
    return client


async def release(client: asyncio.subprocess.Process, backend: int) -> None:
    assert client.stdin is not None
    client.stdin.close()
    await client.wait()
    await wait_held(backend, 0)


async def measure(count: int, top: int) -> None:
    backend, proxy_port = free_port(23000), free_port(23100)
    server = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "idle_backend.py"), str(backend), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert server.stdout is not None
        await server.stdout.readline()
        route = {
            "match": {"ports": proxy_port},
            "action": {"type": "forward", "targets": [{"host": "127.0.0.1", "port": backend}]},
        }
        async with SmartRoute([route], bind_address="127.0.0.1"):
            await release(await hold(proxy_port, backend, 20), backend)  # one-time allocations
            gc.collect()
            tracemalloc.start(1)
            rss_before, before = rss_bytes(os.getpid()), tracemalloc.take_snapshot()
            client = await hold(proxy_port, backend, count)
            await asyncio.sleep(1.0)
            gc.collect()
            rss_after, after = rss_bytes(os.getpid()), tracemalloc.take_snapshot()
            tracemalloc.stop()
            await release(client, backend)
    finally:
        server.terminate()
        await server.wait()
    stats = after.compare_to(before, "lineno")
    heap = sum(stat.size_diff for stat in stats)
    print(f"{count} idle connections through smartroute (tracemalloc on):")
    print(f"  RSS growth          {(rss_after - rss_before) / count:8.0f} bytes per connection")
    print(f"  Python heap growth  {heap / count:8.0f} bytes per connection (tracemalloc)")
    print("by file, bytes per connection:")
    for stat in after.compare_to(before, "filename")[:8]:
        where = "/".join(Path(stat.traceback[0].filename).parts[-3:])
        print(f"  {stat.size_diff / count:7.0f}  {where}")
    print(f"top {top} allocation sites, bytes per connection (blocks per connection):")
    for stat in stats[:top]:
        frame = stat.traceback[0]
        where = "/".join(Path(frame.filename).parts[-3:])
        per = stat.size_diff / count
        print(f"  {per:7.0f}  ({stat.count_diff / count:4.1f})  {where}:{frame.lineno}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(measure(args.connections, args.top))


if __name__ == "__main__":
    main()
