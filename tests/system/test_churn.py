"""Route churn under traffic: ``update_routes`` every 50 ms while clients keep transferring.

The stable routes stay in every update (only their target list changes, between two
equivalent backends); around them the updates add and remove routes on other ports and on
the same ports (domain, path, header and client-IP routes that never capture the stable
traffic). Every transfer on a stable port is byte-exact and nothing is cut; churned ports
serve while they are in the set and refuse connections once removed; ``listening_ports`` is
checked after every update; at the end the proxy settles with no leak. A wrongly routed
connection or request lands on a backend that answers differently, so misrouting shows up
as corruption rather than passing silently. A last test checks that pooled backend
connections do not outlive the routes that named their target.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from http_backend import http_backend
from leaks import settled
from support import LOOPBACK, async_test, echo_handler, free_ports, named_handler, serve

from smartroute import SmartRoute
from smartroute.helpers import SocketHandlers

CHURN_SECONDS = 5.0
UPDATE_INTERVAL = 0.05
IO_TIMEOUT = 20.0  # per read/connect: generous, the machine is shared

Route = dict[str, Any]


# -- ports -----------------------------------------------------------------------------------


def quiet_ports(count: int) -> list[int]:
    """``count`` free ports below the ephemeral range.

    Churned ports are released and bound again many times. Inside the ephemeral range the
    kernel may give a released port number to one of the thousands of client sockets this
    test opens (or leave one in TIME_WAIT on it), and binding it again would then fail for a
    reason that has nothing to do with the proxy.
    """
    with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
        low = int(ranges.read().split()[0])
    candidates = list(range(10000, min(low, 32768)))
    random.shuffle(candidates)
    found: list[int] = []
    for port in candidates:
        with socket.socket() as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise RuntimeError("no free port below the ephemeral range")


async def until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Wait (bounded) until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), IO_TIMEOUT)
    except ConnectionRefusedError:
        return True
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return False


def connections_to(port: int) -> int:
    """Open IPv4 TCP connections from this host to ``port`` (ESTABLISHED or CLOSE_WAIT)."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.read().splitlines()[1:]]
    return sum(1 for row in rows if row[3] in ("01", "08") and int(row[2][-4:], 16) == port)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


# -- routes ----------------------------------------------------------------------------------


def forward(
    name: str,
    port: int,
    targets: Iterable[int],
    *,
    priority: int = 0,
    protocol: str | None = None,
    **match: Any,
) -> Route:
    action: dict[str, Any] = {
        "type": "forward",
        "targets": [{"host": LOOPBACK, "port": target} for target in targets],
    }
    if protocol is not None:
        action["protocol"] = protocol
    return {
        "name": name,
        "priority": priority,
        "match": {"ports": port, **match},
        "action": action,
    }


def static(name: str, port: int, text: str, *, priority: int = 0, **match: Any) -> Route:
    return {
        "name": name,
        "priority": priority,
        "match": {"ports": port, **match},
        "action": {"type": "static", "static": {"content": text, "content_type": "text/plain"}},
    }


def block(name: str, port: int) -> Route:
    """A top-priority route for addresses the test never connects from."""
    return {
        "name": name,
        "priority": 1000,
        "match": {"ports": port, "client_ip": ["10.0.0.0/8", "192.0.2.*"]},
        "action": {"type": "block"},
    }


def port_counts(routes: Iterable[Route]) -> dict[int, int]:
    counts: Counter[int] = Counter(route["match"]["ports"] for route in routes)
    return dict(sorted(counts.items()))


def bystanders(rng: random.Random, port: int, wrong: int, *, http: bool, tag: str) -> list[Route]:
    """A random set of routes on ``port`` that must never take the stable traffic.

    Domain routes (exact and wildcard, any priority) need a name the stable clients never
    send; path and header routes need a request the raw clients never make (and the HTTP
    clients never send those paths or headers); the client-IP routes name other networks.
    """
    routes: list[Route] = []
    for k in range(8):
        if rng.random() < 0.5:
            continue
        name = f"{tag}-{k}"
        priority = rng.randint(-10, 100)
        kind = k % 4
        if kind == 0:
            domains = [f"d{k}.churn.test", f"*.w{k}.churn.test"]
            routes.append(forward(name, port, [wrong], priority=priority, domains=domains))
        elif kind == 1:
            path = f"/other{k}/*"
            if http:
                routes.append(static(name, port, "wrong\n", priority=priority, path=path))
            else:
                routes.append(forward(name, port, [wrong], priority=priority, path=path))
        elif kind == 2:
            headers = {"x-churn-other": f"v{k}"}
            routes.append(forward(name, port, [wrong], priority=priority, headers=headers))
        else:
            routes.append(block(name, port))
    return routes


# -- traffic ---------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the clients of the stable ports did; every failure is kept with its reason."""

    transfers: Counter[str] = field(default_factory=Counter)  # per client
    failures: list[str] = field(default_factory=list)
    sent: Counter[int] = field(default_factory=Counter)  # bytes per proxy port
    received: Counter[int] = field(default_factory=Counter)
    connections: Counter[int] = field(default_factory=Counter)
    # client -> (monotonic time of its first and of its last verified exchange)
    span: dict[str, tuple[float, float]] = field(default_factory=dict)

    def ok(self, client: str, count: int = 1) -> None:
        self.transfers[client] += count
        now = time.monotonic()
        first = self.span.get(client, (now, now))[0]
        self.span[client] = (first, now)

    def fail(self, client: str, what: str) -> None:
        self.failures.append(f"{client}: {what}")


def payload(rng: random.Random, *, first: bool) -> bytes:
    """Random bytes of a random size (1 B to 512 KiB, mostly small).

    The first payload of a connection starts with a byte that is neither a TLS record type
    nor an HTTP method letter: while bystander routes with domains or paths exist, the
    stable port peeks at the first bytes, and a client whose first byte(s) could still start
    a ClientHello would be held (by design) until ``initial_data_timeout``.
    """
    size = rng.choice(
        (
            rng.randint(1, 64),
            rng.randint(1, 2048),
            rng.randint(2048, 65536),
            rng.randint(65536, 512 * 1024),
        )
    )
    data = bytearray(rng.randbytes(size))
    if first:
        data[0] = rng.randint(0x80, 0xFF)
    return bytes(data)


async def echo_client(name: str, port: int, tally: Tally, stop: asyncio.Event, seed: int) -> None:
    """Open, do 1-4 byte-exact echo transfers, half-close, read EOF, close; repeat."""
    rng = random.Random(seed)
    while not stop.is_set():
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(LOOPBACK, port), IO_TIMEOUT
            )
        except (OSError, TimeoutError) as exc:
            tally.fail(name, f"connect: {exc!r}")
            return
        tally.connections[port] += 1
        try:
            for round_ in range(rng.randint(1, 4)):
                data = payload(rng, first=round_ == 0)
                writer.write(data)
                tally.sent[port] += len(data)
                got = await asyncio.wait_for(reader.readexactly(len(data)), IO_TIMEOUT)
                tally.received[port] += len(got)
                if got != data:
                    tally.fail(name, f"corrupted echo of {len(data)} bytes")
                    return
                tally.ok(name)
            writer.write_eof()
            rest = await asyncio.wait_for(reader.read(), IO_TIMEOUT)
            tally.received[port] += len(rest)
            if rest:
                tally.fail(name, f"{len(rest)} unexpected bytes before EOF")
                return
        except (OSError, EOFError, TimeoutError) as exc:
            tally.fail(name, f"cut: {exc!r}")
            return
        finally:
            await close(writer)


async def streamer(name: str, port: int, tally: Tally, stop: asyncio.Event, seed: int) -> None:
    """One connection that streams random chunks from before the churn until after it.

    The sender queues each chunk before writing it; the receiver takes chunks off the queue
    and reads exactly that many bytes back, so memory stays bounded and every byte is
    compared.
    """
    rng = random.Random(seed)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), IO_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        tally.fail(name, f"connect: {exc!r}")
        return
    tally.connections[port] += 1
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=8)

    async def send() -> None:
        first = True
        while not stop.is_set():
            chunk = bytearray(rng.randbytes(rng.randint(1, 65536)))
            if first:
                chunk[0], first = 0xFF, False
            await queue.put(bytes(chunk))
            writer.write(chunk)
            tally.sent[port] += len(chunk)
            await writer.drain()
            await asyncio.sleep(0)
        writer.write_eof()
        await queue.put(b"")

    async def receive() -> None:
        while chunk := await queue.get():
            got = await asyncio.wait_for(reader.readexactly(len(chunk)), IO_TIMEOUT)
            tally.received[port] += len(got)
            if got != chunk:
                raise AssertionError(f"corrupted stream chunk of {len(chunk)} bytes")
            tally.ok(name)
        rest = await asyncio.wait_for(reader.read(), IO_TIMEOUT)
        tally.received[port] += len(rest)
        if rest:
            raise AssertionError(f"{len(rest)} unexpected bytes before EOF")

    sender = asyncio.create_task(send())
    try:
        await receive()
        await sender
    except (OSError, EOFError, TimeoutError, AssertionError) as exc:
        tally.fail(name, f"stream cut or corrupted: {exc!r}")
    finally:
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender
        await close(writer)


def counting(handler: Callable[..., Awaitable[None]], counter: Counter[str], key: str) -> Any:
    """Wrap a backend handler to count the connections it gets."""

    async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counter[key] += 1
        await handler(reader, writer)

    return wrapped


# -- the churn loop --------------------------------------------------------------------------


@dataclass
class Churn:
    updates: int = 0
    probed_added: int = 0
    probed_removed: int = 0
    errors: list[str] = field(default_factory=list)
    ever_bound: set[int] = field(default_factory=set)


async def churn(
    proxy: SmartRoute,
    make_routes: Callable[[random.Random], list[Route]],
    probe: Callable[[int], Awaitable[bool]],
    seconds: float,
    rng: random.Random,
    record: Churn,
) -> None:
    """Replace the routes every UPDATE_INTERVAL; check the ports after each update."""
    previous = set(proxy.listening_ports)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        tick = time.monotonic()
        routes = make_routes(rng)
        await proxy.update_routes(routes)
        record.updates += 1
        wanted = port_counts(routes)
        if proxy.listening_ports != wanted:
            record.errors.append(f"update {record.updates}: {proxy.listening_ports} != {wanted}")
        now_bound = set(wanted)
        record.ever_bound |= now_bound
        added, removed = sorted(now_bound - previous), sorted(previous - now_bound)
        if added:
            port = rng.choice(added)
            record.probed_added += 1
            if not await probe(port):
                record.errors.append(f"update {record.updates}: added port {port} not served")
        if removed:
            port = rng.choice(removed)
            record.probed_removed += 1
            if not await refused(port):
                record.errors.append(f"update {record.updates}: removed port {port} listens")
        previous = now_bound
        await asyncio.sleep(max(0.0, tick + UPDATE_INTERVAL - time.monotonic()))


# -- L4: raw forward and socket handler ------------------------------------------------------


async def raw_probe(port: int) -> bool:
    """A churned L4 port answers with its backend's greeting ("extra")."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), IO_TIMEOUT)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(b"\xfeprobe\n")  # the port may peek: say something first
        return await asyncio.wait_for(reader.readline(), IO_TIMEOUT) == b"extra\n"
    except (OSError, TimeoutError):
        return False
    finally:
        await close(writer)


@async_test(timeout=120)
async def test_route_churn_keeps_l4_traffic_byte_exact() -> None:
    seed = random.randrange(1 << 32)
    print(f"\nchurn seed {seed}")
    rng = random.Random(seed)
    stable, stable2 = free_ports(2)
    churned = quiet_ports(4)
    hits: Counter[str] = Counter()
    async with (
        serve(counting(echo_handler, hits, "a")) as echo_a,
        serve(counting(echo_handler, hits, "b")) as echo_b,
        serve(named_handler("wrong")) as wrong,
        serve(named_handler("extra")) as extra,
    ):

        def stable_routes(targets: list[int]) -> list[Route]:
            return [
                forward("stable", stable, targets),
                {
                    "name": "stable2",
                    "match": {"ports": stable2},
                    "action": {"type": "socket-handler", "socket_handler": SocketHandlers.echo},
                },
            ]

        def make_routes(rng: random.Random) -> list[Route]:
            targets = rng.choice([[echo_a], [echo_b], [echo_a, echo_b], [echo_b, echo_a]])
            routes = stable_routes(targets)
            routes += bystanders(rng, stable, wrong, http=False, tag="s")
            routes += bystanders(rng, stable2, wrong, http=False, tag="s2")
            for j, port in enumerate(churned):
                if rng.random() < 0.5:
                    routes.append(forward(f"churn{j}", port, [extra]))
                    if rng.random() < 0.5:
                        domains = [f"c{j}.churn.test"]
                        routes.append(forward(f"churn{j}-d", port, [wrong], domains=domains))
            rng.shuffle(routes)  # definition order must not matter to the stable traffic
            return routes

        initial = stable_routes([echo_a])
        async with SmartRoute(initial, bind_address=LOOPBACK) as proxy:
            tally, stop, record = Tally(), asyncio.Event(), Churn()
            async with settled(proxy, timeout=10):
                clients = [
                    asyncio.create_task(
                        echo_client(f"client{i}", stable, tally, stop, rng.randrange(1 << 32))
                    )
                    for i in range(6)
                ]
                clients += [
                    asyncio.create_task(
                        echo_client(f"handler{i}", stable2, tally, stop, rng.randrange(1 << 32))
                    )
                    for i in range(2)
                ]
                clients.append(
                    asyncio.create_task(
                        streamer("stream", stable, tally, stop, rng.randrange(1 << 32))
                    )
                )
                clients.append(
                    asyncio.create_task(
                        streamer("stream2", stable2, tally, stop, rng.randrange(1 << 32))
                    )
                )
                # Traffic is flowing (every client has finished an exchange) before the churn.
                await until(
                    lambda: len(tally.span) == len(clients) or bool(tally.failures), "traffic flows"
                )
                churn_start = time.monotonic()
                await churn(proxy, make_routes, raw_probe, CHURN_SECONDS, rng, record)
                await proxy.update_routes(initial)
                churn_end = time.monotonic()
                await asyncio.sleep(0.3)  # and still flows after the last one
                stop.set()
                await asyncio.wait_for(asyncio.gather(*clients), 60)
                final_ports = proxy.listening_ports
                still_listening = [port for port in churned if not await refused(port)]

            print(
                f"updates {record.updates} (+{record.probed_added} probed added,"
                f" -{record.probed_removed} probed removed);"
                f" transfers {sum(tally.transfers.values())} {dict(tally.transfers)};"
                f" connections {dict(tally.connections)}; backend hits {dict(hits)};"
                f" bytes echoed on the stable port {tally.sent[stable]}"
            )
            assert not tally.failures, tally.failures[:10]
            assert not record.errors, record.errors[:10]
            assert final_ports == {stable: 1, stable2: 1}
            assert not still_listening, f"removed ports still listening: {still_listening}"
            assert record.ever_bound >= set(churned), "some churned port was never bound"
            assert record.updates >= 20, f"only {record.updates} updates"
            assert record.probed_added >= 5 and record.probed_removed >= 5
            # Not vacuous: plenty of transfers on both stable ports, by every client.
            assert sum(tally.transfers.values()) >= 300, tally.transfers
            for name, (first, last) in tally.span.items():
                assert tally.transfers[name] >= 3, f"{name} barely ran: {tally.transfers}"
                if name.startswith("stream"):  # one connection, streaming the whole time
                    assert first < churn_start and last > churn_end, (name, first, last)
            assert set(tally.span) == {f"client{i}" for i in range(6)} | {
                "handler0",
                "handler1",
                "stream",
                "stream2",
            }
            # The stable route's target list really changed: both backends got connections.
            assert hits["a"] > 0 and hits["b"] > 0, hits
            # Every byte counted once, on the route that carried it.
            stats = proxy.stats()["routes"]
            for route, port in (("stable", stable), ("stable2", stable2)):
                assert stats[route]["active"] == 0
                assert stats[route]["total"] == tally.connections[port], (route, stats[route])
                assert stats[route]["bytes_in"] == tally.sent[port], (route, stats[route])
                assert stats[route]["bytes_out"] == tally.received[port], (route, stats[route])
                assert tally.sent[port] == tally.received[port]


# -- HTTP: kept-alive requests across updates ------------------------------------------------


async def read_http_response(
    reader: asyncio.StreamReader,
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of a Content-Length response."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" not in headers:
        raise AssertionError(f"no Content-Length in {head!r}")
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), IO_TIMEOUT)
    return status, headers, body


async def http_client(name: str, port: int, tally: Tally, stop: asyncio.Event, seed: int) -> None:
    """One kept-alive connection for the whole test: POSTs of random bodies and downloads."""
    rng = random.Random(seed)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), IO_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        tally.fail(name, f"connect: {exc!r}")
        return
    tally.connections[port] += 1
    host = f"web.churn.test:{port}"
    try:
        number = 0
        while not stop.is_set():
            number += 1
            path = f"/stable/{name}/{number}"
            if rng.random() < 0.7:
                body = rng.randbytes(rng.choice((0, rng.randint(1, 1024), rng.randint(1, 65536))))
                writer.write(
                    f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                status, headers, answer = await read_http_response(reader)
                info = json.loads(answer) if status == 200 else {}
                expected = (path, len(body), hashlib.sha256(body).hexdigest())
                if (status, info.get("backend")) not in ((200, "a"), (200, "b")) or (
                    info["path"],
                    info["body_length"],
                    info["body_sha256"],
                ) != expected:
                    tally.fail(name, f"request {number}: {status} {answer[:200]!r}")
                    return
            else:
                size = rng.randint(1, 256 * 1024)
                writer.write(
                    f"GET /big HTTP/1.1\r\nHost: {host}\r\nX-Size: {size}\r\n\r\n".encode()
                )
                status, headers, answer = await read_http_response(reader)
                if status != 200 or answer != b"x" * size:
                    tally.fail(name, f"download {number}: {status}, {len(answer)} of {size} B")
                    return
            if headers.get("connection", "").lower() == "close":
                tally.fail(name, f"request {number}: the proxy closed a kept-alive connection")
                return
            tally.ok(name)
        writer.write_eof()
        rest = await asyncio.wait_for(reader.read(), IO_TIMEOUT)
        if rest:
            tally.fail(name, f"{len(rest)} unexpected bytes before EOF")
    except (OSError, EOFError, TimeoutError, ValueError, KeyError) as exc:
        tally.fail(name, f"cut or malformed: {exc!r}")
    finally:
        await close(writer)


async def http_probe(port: int) -> bool:
    """A churned HTTP port answers with its static "extra" page."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), IO_TIMEOUT)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: probe.churn.test\r\nConnection: close\r\n\r\n")
        status, _, body = await read_http_response(reader)
        return status == 200 and body == b"extra\n"
    except (OSError, EOFError, TimeoutError, ValueError, AssertionError):
        return False
    finally:
        await close(writer)


@async_test(timeout=120)
async def test_route_churn_keeps_http_keepalive_requests_flowing() -> None:
    seed = random.randrange(1 << 32)
    print(f"\nchurn seed {seed}")
    rng = random.Random(seed)
    (web,) = free_ports(1)
    churned = quiet_ports(3)
    with http_backend("a") as a, http_backend("b") as b, http_backend("wrong") as wrong:

        def stable_routes(targets: list[int]) -> list[Route]:
            return [forward("web", web, targets, protocol="http")]

        def make_routes(rng: random.Random) -> list[Route]:
            targets = rng.choice([[a.port], [b.port], [a.port, b.port], [b.port, a.port]])
            routes = stable_routes(targets)
            routes += bystanders(rng, web, wrong.port, http=True, tag="w")
            for j, port in enumerate(churned):
                if rng.random() < 0.5:
                    routes.append(static(f"churn{j}", port, "extra\n"))
                    if rng.random() < 0.5:
                        domains = [f"c{j}.churn.test"]
                        routes.append(static(f"churn{j}-d", port, "wrong\n", domains=domains))
            rng.shuffle(routes)
            return routes

        initial = stable_routes([a.port])
        proxy = SmartRoute(initial, bind_address=LOOPBACK)
        tally, stop, record = Tally(), asyncio.Event(), Churn()
        # Around the whole lifetime: idle backend connections stay pooled until stop().
        async with settled(proxy, timeout=10):
            await proxy.start()
            try:
                clients = [
                    asyncio.create_task(
                        http_client(f"http{i}", web, tally, stop, rng.randrange(1 << 32))
                    )
                    for i in range(4)
                ]
                await until(
                    lambda: len(tally.span) == len(clients) or bool(tally.failures), "requests flow"
                )
                churn_start = time.monotonic()
                await churn(proxy, make_routes, http_probe, CHURN_SECONDS, rng, record)
                await proxy.update_routes(initial)
                churn_end = time.monotonic()
                await asyncio.sleep(0.5)
                stop.set()
                await asyncio.wait_for(asyncio.gather(*clients), 60)
                final_ports = proxy.listening_ports
                still_listening = [port for port in churned if not await refused(port)]
                stats = proxy.stats()["routes"]
            finally:
                await proxy.stop()

        print(
            f"updates {record.updates} (+{record.probed_added} probed added,"
            f" -{record.probed_removed} probed removed);"
            f" requests {sum(tally.transfers.values())} {dict(tally.transfers)}"
        )
        assert not tally.failures, tally.failures[:10]
        assert not record.errors, record.errors[:10]
        assert final_ports == {web: 1}
        assert not still_listening, f"removed ports still listening: {still_listening}"
        assert record.updates >= 20, f"only {record.updates} updates"
        assert record.probed_added >= 5 and record.probed_removed >= 5
        assert sum(tally.transfers.values()) >= 60, tally.transfers
        assert set(tally.span) == {f"http{i}" for i in range(4)}
        for name, (first, last) in tally.span.items():
            # One connection per client, carrying requests from before to after the churn.
            assert first < churn_start and last > churn_end, (name, first, last)
            assert tally.transfers[name] >= 5, tally.transfers
        assert stats["web"]["total"] == 4, stats["web"]  # never reconnected
        assert not any(name.startswith("w-") for name in stats if stats[name]["total"]), stats


@async_test(timeout=60)
async def test_route_churn_closes_pooled_connections_to_dropped_targets() -> None:
    """Idle kept-alive backend connections must not outlive the last route naming their target.

    The reverse proxy pools idle backend connections per target. Once an update leaves no
    route that names a target, no request can ever reuse them; they must be closed instead
    of being held (with the backend's resources) until ``stop()``. Without that, every
    target a route ever named keeps up to a pool's worth of idle connections open, so target
    churn (blue/green deployments, changing backend ports) grows descriptors without bound.
    """
    seed = random.randrange(1 << 32)
    print(f"\nchurn seed {seed}")
    rng = random.Random(seed)
    (web,) = free_ports(1)
    with http_backend("a") as a, http_backend("b") as b:
        proxy = SmartRoute([forward("web", web, [b.port], protocol="http")], bind_address=LOOPBACK)
        tally, stop = Tally(), asyncio.Event()
        async with settled(proxy, timeout=10):
            await proxy.start()
            try:
                clients = [
                    asyncio.create_task(
                        http_client(f"http{i}", web, tally, stop, rng.randrange(1 << 32))
                    )
                    for i in range(4)
                ]
                await until(lambda: len(tally.span) == 4 or bool(tally.failures), "requests flow")
                for _ in range(30):
                    targets = rng.choice([[b.port], [a.port, b.port], [b.port, a.port]])
                    await proxy.update_routes([forward("web", web, targets, protocol="http")])
                    await asyncio.sleep(UPDATE_INTERVAL)
                pooled_to_b = connections_to(b.port)
                await proxy.update_routes([forward("web", web, [a.port], protocol="http")])
                await asyncio.sleep(0.3)  # requests go on, to a only
                stop.set()
                await asyncio.wait_for(asyncio.gather(*clients), 60)
                deadline = time.monotonic() + 5
                while connections_to(b.port) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                left_to_b, to_a = connections_to(b.port), connections_to(a.port)
            finally:
                await proxy.stop()

        print(
            f"requests {sum(tally.transfers.values())}; connections to b before the last update"
            f" {pooled_to_b}, 5 s after it {left_to_b}; to a {to_a}"
        )
        assert not tally.failures, tally.failures[:10]
        assert pooled_to_b > 0, "the test never had connections to b: it proves nothing"
        assert left_to_b == 0, (
            f"{left_to_b} idle pooled connection(s) to {b.port} still open 5 s after the last"
            " route naming that target was removed (kept until stop())"
        )
