"""A bounded soak: thousands of short connections and a few long transfers, watched over time.

What it proves, within its bounds:

* **No failed connection.** Thousands of short connections (open, a small byte-exact echo or
  HTTP POST, close; several concurrent workers) through an L4 ``forward`` route and an HTTP
  reverse-proxy route, while long transfers (32 MiB each, byte-exact: the L4 echo compares
  SHA-256 and length both ways, the HTTP download checks every byte, the upload is checked
  by the backend's digest) run alongside. Every failure is counted; zero are allowed.
* **Exact accounting.** When the load stops, ``stats()`` shows no active connection, the
  connection totals equal the number of connections the clients made, and the byte counters
  equal what the clients sent and received, per route and overall (every byte counted once).
* **No descriptor leak.** The fd count stays bounded during the load, falls back to the
  running baseline (plus at most the backend pool's idle connections) when the load stops,
  and to exactly the baseline after ``stop()``.
* **No memory growth.** RSS is sampled every 0.5 s. After a warm-up that runs one transfer
  of every kind (so allocator high-water marks are reached), RSS at the end of the load may
  exceed the warm-up figure by less than 32 MiB, and no sample may exceed it by 48 MiB. The
  samples are printed (``pytest -s``) so the curve can be read.

Bounds: about 30 s of load (short connections are paced so that they span it), about 7,000
short connections and 6 x 32 MiB long transfers on a loopback machine; everything runs in one
process, so RSS and fds include the clients and backends (which keep no per-connection state).
A leak smaller than the tolerances over this many connections goes unnoticed: this is a guard
against leaks per connection or per transfer, not a long-haul memory profile.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from http_backend import http_backend
from leaks import fd_count, rss_bytes, settled
from support import LOOPBACK, async_test, echo_handler, free_ports, serve

from smartroute import SmartRoute

LOAD_SECONDS = 30.0
WARMUP_SECONDS = 6.0
SAMPLE_INTERVAL = 0.5
L4_WORKERS = 4
L4_RATE = 150.0  # short L4 connections per second, all workers together (at most)
HTTP_WORKERS = 6  # unpaced: the threaded test backend sets their pace
LONG_SIZE = 32 << 20
CHUNK = 256 << 10
IO_TIMEOUT = 30.0
MIN_SHORT_L4 = 2000
MIN_SHORT_HTTP = 400
RSS_GROWTH_LIMIT = 32 << 20
RSS_PEAK_LIMIT = 48 << 20
POOL_FDS = 2 * 16  # idle pooled backend connections: both ends live in this process

MiB = 1 << 20


@dataclass
class Load:
    """What the clients did, per route: connections, bytes each way, failures."""

    connections: Counter[str] = field(default_factory=Counter)
    short: Counter[str] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)
    received: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    long_done: list[str] = field(default_factory=list)


@dataclass
class Sample:
    t: float
    rss: int
    fds: int
    active: int
    short: int


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), IO_TIMEOUT)


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), IO_TIMEOUT)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status and headers (lower-case names) of a response head."""
    lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ", 2)[1]), headers


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of a whole ``Connection: close`` response."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError(f"no complete response head in {raw[:200]!r}")
    status, headers = parse_head(head)
    if headers.get("content-length") != str(len(body)):
        raise ValueError(f"{len(body)} B of body, Content-Length {headers.get('content-length')}")
    return status, headers, body


# -- short connections -----------------------------------------------------------------------


async def l4_short(port: int, load: Load, rng: random.Random) -> None:
    """Open, echo 1 B - 4 KiB byte-exact, half-close, read EOF, close."""
    reader, writer = await connect(port)
    load.connections["l4"] += 1
    try:
        data = rng.randbytes(rng.randint(1, 4096))
        writer.write(data)
        load.sent["l4"] += len(data)
        got = await asyncio.wait_for(reader.readexactly(len(data)), IO_TIMEOUT)
        load.received["l4"] += len(got)
        writer.write_eof()
        rest = await read_to_eof(reader)
        load.received["l4"] += len(rest)
        if got != data or rest:
            raise ValueError(f"echo of {len(data)} B corrupted ({len(rest)} B after it)")
    finally:
        await close(writer)


async def http_short(port: int, load: Load, rng: random.Random, number: int) -> None:
    """One POST of a small random body on its own connection; the backend's digest must match."""
    reader, writer = await connect(port)
    load.connections["web"] += 1
    try:
        body = rng.randbytes(rng.randint(0, 2048))
        path = f"/short/{number}"
        request = (
            f"POST {path} HTTP/1.1\r\nHost: soak.test\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        writer.write(request)
        load.sent["web"] += len(request)
        raw = await read_to_eof(reader)
        load.received["web"] += len(raw)
        status, _, answer = split_response(raw)
        info = json.loads(answer) if status == 200 else {}
        expected = (path, len(body), hashlib.sha256(body).hexdigest())
        if status != 200 or (info["path"], info["body_length"], info["body_sha256"]) != expected:
            raise ValueError(f"{status} {answer[:200]!r}")
    finally:
        await close(writer)


async def short_worker(
    kind: str,
    run: Callable[[int], Awaitable[None]],
    load: Load,
    deadline: float,
    interval: float,
) -> None:
    """Run short connections one after another until the deadline, at most one per interval."""
    number = 0
    start = time.monotonic()
    while time.monotonic() < deadline:
        number += 1
        try:
            await run(number)
        except (OSError, EOFError, TimeoutError, ValueError, KeyError) as exc:
            load.failures.append(f"{kind} #{number}: {exc!r}")
        else:
            load.short[kind] += 1
        await asyncio.sleep(max(0.0, start + number * interval - time.monotonic()))


# -- long transfers --------------------------------------------------------------------------


async def l4_long(port: int, load: Load, name: str) -> None:
    """Echo LONG_SIZE random bytes; both directions are hashed and compared."""
    reader, writer = await connect(port)
    load.connections["l4"] += 1
    sent_hash, got_hash = hashlib.sha256(), hashlib.sha256()

    async def send() -> None:
        left = LONG_SIZE
        while left:
            chunk = os.urandom(min(CHUNK, left))
            sent_hash.update(chunk)
            writer.write(chunk)
            load.sent["l4"] += len(chunk)
            left -= len(chunk)
            await writer.drain()
        writer.write_eof()

    async def receive() -> int:
        total = 0
        while chunk := await asyncio.wait_for(reader.read(CHUNK), IO_TIMEOUT):
            got_hash.update(chunk)
            total += len(chunk)
            load.received["l4"] += len(chunk)
        return total

    try:
        _, total = await asyncio.gather(send(), receive())
    finally:
        await close(writer)
    if total != LONG_SIZE or got_hash.digest() != sent_hash.digest():
        raise ValueError(f"{name}: {total} of {LONG_SIZE} B came back, digests differ")
    load.long_done.append(name)


async def http_download(port: int, load: Load, name: str) -> None:
    """GET LONG_SIZE bytes of b"x" from the backend; every byte and the framing are checked."""
    reader, writer = await connect(port)
    load.connections["web"] += 1
    try:
        request = (
            f"GET /big HTTP/1.1\r\nHost: soak.test\r\nX-Size: {LONG_SIZE}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        writer.write(request)
        load.sent["web"] += len(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
        load.received["web"] += len(head)
        status, headers = parse_head(head)
        if status != 200 or headers.get("content-length") != str(LONG_SIZE):
            raise ValueError(f"{name}: unexpected head {head!r}")
        total = 0
        block = b"x" * CHUNK
        while chunk := await asyncio.wait_for(reader.read(CHUNK), IO_TIMEOUT):
            load.received["web"] += len(chunk)
            if chunk != block[: len(chunk)]:
                raise ValueError(f"{name}: corrupted body after {total} B")
            total += len(chunk)
    finally:
        await close(writer)
    if total != LONG_SIZE:
        raise ValueError(f"{name}: {total} of {LONG_SIZE} B")
    load.long_done.append(name)


async def http_upload(port: int, load: Load, name: str) -> None:
    """POST LONG_SIZE random bytes; the backend's SHA-256 of what it got must match."""
    reader, writer = await connect(port)
    load.connections["web"] += 1
    digest = hashlib.sha256()
    try:
        head = (
            f"POST /upload HTTP/1.1\r\nHost: soak.test\r\nConnection: close\r\n"
            f"Content-Length: {LONG_SIZE}\r\n\r\n"
        ).encode()
        writer.write(head)
        load.sent["web"] += len(head)
        left = LONG_SIZE
        while left:
            chunk = os.urandom(min(CHUNK, left))
            digest.update(chunk)
            writer.write(chunk)
            load.sent["web"] += len(chunk)
            left -= len(chunk)
            await writer.drain()
        raw = await read_to_eof(reader)
        load.received["web"] += len(raw)
    finally:
        await close(writer)
    status, _, answer = split_response(raw)
    info = json.loads(answer) if status == 200 else {}
    if (status, info.get("body_length"), info.get("body_sha256")) != (
        200,
        LONG_SIZE,
        digest.hexdigest(),
    ):
        raise ValueError(f"{name}: {status} {answer[:200]!r}")
    load.long_done.append(name)


async def long_transfer(
    load: Load, name: str, delay: float, run: Callable[[], Awaitable[None]]
) -> None:
    await asyncio.sleep(delay)
    try:
        await run()
    except (OSError, EOFError, TimeoutError, ValueError, KeyError) as exc:
        load.failures.append(f"{name}: {exc!r}")


# -- sampling --------------------------------------------------------------------------------


async def sampler(proxy: SmartRoute, load: Load, start: float, samples: list[Sample]) -> None:
    while True:
        samples.append(
            Sample(
                time.monotonic() - start,
                rss_bytes(),
                fd_count(),
                proxy.stats()["connections"]["active"],
                sum(load.short.values()),
            )
        )
        await asyncio.sleep(SAMPLE_INTERVAL)


def show(samples: list[Sample], fd_base: int) -> None:
    print(f"{'t(s)':>6} {'RSS MiB':>8} {'fds':>5} {'+fds':>5} {'active':>6} {'short':>6}")
    for s in samples:
        print(
            f"{s.t:6.1f} {s.rss / MiB:8.1f} {s.fds:5d} {s.fds - fd_base:+5d}"
            f" {s.active:6d} {s.short:6d}"
        )


async def until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


@async_test(timeout=150)
async def test_soak_short_and_long_connections_do_not_leak() -> None:
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    l4_port, web_port = free_ports(2)
    load, samples = Load(), list[Sample]()
    with http_backend("soak") as backend:
        async with serve(echo_handler) as echo:
            routes: list[dict[str, Any]] = [
                {
                    "name": "l4",
                    "match": {"ports": l4_port},
                    "action": {"type": "forward", "targets": [{"host": LOOPBACK, "port": echo}]},
                },
                {
                    "name": "web",
                    "match": {"ports": web_port},
                    "action": {
                        "type": "forward",
                        "protocol": "http",
                        "targets": [{"host": LOOPBACK, "port": backend.port}],
                    },
                },
            ]
            proxy = SmartRoute(routes, bind_address=LOOPBACK)

            def l4_run(r: random.Random) -> Callable[[int], Awaitable[None]]:
                async def run(number: int) -> None:
                    await l4_short(l4_port, load, r)

                return run

            def web_run(r: random.Random, worker: int) -> Callable[[int], Awaitable[None]]:
                async def run(number: int) -> None:
                    await http_short(web_port, load, r, worker * 1_000_000 + number)

                return run

            fd_before = fd_count()
            async with settled(proxy, timeout=15):
                await proxy.start()
                try:
                    fd_running = fd_count()
                    start = time.monotonic()
                    sampling = asyncio.create_task(sampler(proxy, load, start, samples))
                    deadline = start + LOAD_SECONDS
                    interval = L4_WORKERS / L4_RATE
                    workers = [
                        short_worker(
                            "l4", l4_run(random.Random(rng.random())), load, deadline, interval
                        )
                        for _ in range(L4_WORKERS)
                    ]
                    workers += [
                        short_worker(
                            "web", web_run(random.Random(rng.random()), i), load, deadline, 0
                        )
                        for i in range(HTTP_WORKERS)
                    ]
                    # One long transfer of each kind during the warm-up, the rest after it.
                    longs: list[tuple[str, float, Callable[[], Awaitable[None]]]] = [
                        ("l4-long-1", 0.5, lambda: l4_long(l4_port, load, "l4-long-1")),
                        ("upload-1", 1.0, lambda: http_upload(web_port, load, "upload-1")),
                        ("download-1", 1.5, lambda: http_download(web_port, load, "download-1")),
                        ("l4-long-2", 10.0, lambda: l4_long(l4_port, load, "l4-long-2")),
                        ("download-2", 14.0, lambda: http_download(web_port, load, "download-2")),
                        ("l4-long-3", 20.0, lambda: l4_long(l4_port, load, "l4-long-3")),
                        ("download-3", 24.0, lambda: http_download(web_port, load, "download-3")),
                    ]
                    tasks = [asyncio.create_task(w) for w in workers]
                    tasks += [
                        asyncio.create_task(long_transfer(load, name, delay, run))
                        for name, delay, run in longs
                    ]
                    warm = {name for name, delay, _ in longs if delay < WARMUP_SECONDS}
                    await until(
                        lambda: warm <= set(load.long_done) or bool(load.failures),
                        LOAD_SECONDS,
                    )
                    await asyncio.sleep(max(0.0, start + WARMUP_SECONDS - time.monotonic()))
                    warm_rss, warm_t = rss_bytes(), time.monotonic() - start
                    await asyncio.wait_for(asyncio.gather(*tasks), LOAD_SECONDS + 60)
                    load_seconds = time.monotonic() - start
                    quiet = await until(lambda: not proxy.stats()["connections"]["active"], 10)
                    stats = proxy.stats()
                    pooled_ok = await until(lambda: fd_count() <= fd_running + POOL_FDS, 10)
                    fd_after_load = fd_count()
                    end_rss = rss_bytes()
                    sampling.cancel()
                    await asyncio.gather(sampling, return_exceptions=True)
                finally:
                    await proxy.stop()
                back_to_baseline = await until(lambda: fd_count() == fd_before, 10)
                fd_final = fd_count()

    after_warm = [s for s in samples if s.t >= warm_t]
    peak = max((s.rss for s in after_warm), default=warm_rss)
    show(samples, fd_running)
    print(
        f"seed {seed}; load {load_seconds:.1f}s; short connections {dict(load.short)};"
        f" connections {dict(load.connections)}; long transfers {load.long_done}\n"
        f"RSS: warm-up ({warm_t:.1f}s) {warm_rss / MiB:.1f} MiB, peak after warm-up"
        f" {peak / MiB:.1f} MiB, end {end_rss / MiB:.1f} MiB"
        f" (growth {(end_rss - warm_rss) / MiB:+.1f} MiB)\n"
        f"fds: before start {fd_before}, running {fd_running}, peak"
        f" {max(s.fds for s in samples)}, after load {fd_after_load}, after stop {fd_final}\n"
        f"stats: {stats['connections']} {stats['bytes']}"
    )

    assert not load.failures, f"{len(load.failures)} failures: {load.failures[:10]}"
    assert sorted(load.long_done) == sorted(name for name, _, _ in longs)
    assert load.short["l4"] >= MIN_SHORT_L4, load.short
    assert load.short["web"] >= MIN_SHORT_HTTP, load.short
    # Exact accounting: every connection counted, every byte counted once.
    assert quiet, f"connections still active after the load: {stats['connections']}"
    made = sum(load.connections.values())
    assert stats["connections"] == {"active": 0, "total": made}
    for route in ("l4", "web"):
        counted = dict(stats["routes"][route])
        requests = counted.pop("requests", {})
        assert counted == {
            "active": 0,
            "total": load.connections[route],
            "bytes_in": load.sent[route],
            "bytes_out": load.received[route],
        }, route
        if route == "web":  # every HTTP request answered 2xx, each connection at least one
            assert set(requests) == {"2xx"} and requests["2xx"] >= load.connections[route]
        else:
            assert requests == {}
    assert load.sent["l4"] == load.received["l4"]  # an echo
    assert stats["bytes"] == {"in": sum(load.sent.values()), "out": sum(load.received.values())}
    # Descriptors: bounded during the load, back to the baseline after it and after stop().
    concurrent = L4_WORKERS + HTTP_WORKERS + len(longs)
    fd_bound = fd_running + 4 * concurrent + POOL_FDS + 16
    assert max(s.fds for s in samples) <= fd_bound, f"fd peak over {fd_bound}"
    assert pooled_ok, f"{fd_after_load} fds after the load, running baseline {fd_running}"
    assert back_to_baseline, f"{fd_final} fds after stop(), {fd_before} before start()"
    # Memory: no growth beyond the tolerance after the warm-up, at the end or at any sample.
    assert end_rss - warm_rss < RSS_GROWTH_LIMIT, "RSS kept growing after the warm-up"
    assert peak - warm_rss < RSS_PEAK_LIMIT, "RSS peaked far above the warm-up figure"
