"""The fast lane's client session (LaneSession) over real sockets: hand-overs, time limits,
the lane pool, route changes and the records it leaves.

Every test runs a real SmartRoute on loopback in front of backends of its own, and checks what
the peers see (bytes, closes), the records the ``finished`` fixture collects and the lane pool.
The ``lane_only`` fixture lists connections handed to accept.adopt (so not kept on the lane) and
``handovers`` the lane's hand-overs to the transport session (actions.serve_http).
"""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from desync_peers import WAIT, LoopbackServer, RawClient, exchange
from support import LOOPBACK, MIB, Finished, async_test, free_port, reset

from smartroute import SmartRoute
from smartroute.server import actions
from smartroute.server.decision import FirstRequest
from smartroute.server.http.lane_pool import LanePool, PoolKey
from smartroute.server.runtime import Runtime
from smartroute.server.stats import ConnectionRecord

Answer = Callable[[int, bytes], bytes]  # (backend connection index, request head) -> reply


@pytest.fixture
def handovers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """The bytes each lane hand-over to the transport session gave it (still called through)."""
    calls: list[bytes] = []
    original = actions.serve_http  # which the lane session imported by name

    def counting(
        runtime: Runtime,
        sock: socket.socket,
        record: ConnectionRecord,
        initial: bytes,
        eof: bool,
        first: FirstRequest | None,
    ) -> None:
        calls.append(initial)
        original(runtime, sock, record, initial, eof, first)

    monkeypatch.setattr("smartroute.server.http.lane_session.serve_http", counting)
    yield calls


# -- the proxy, its routes and backends -------------------------------------------------------


def forward(name: str, port: int, *backends: int, **extra: Any) -> dict[str, Any]:
    """A plain-HTTP ``forward`` to IP-literal targets (a lane route); ``extra``: ``match``
    keys, and ``security``."""
    targets = [{"host": LOOPBACK, "port": backend} for backend in backends]
    route: dict[str, Any] = {
        "name": name,
        "match": {"ports": port},
        "action": {"type": "forward", "targets": targets, "protocol": "http"},
    }
    if "security" in extra:
        route["security"] = extra.pop("security")
    route["match"].update(extra)
    return route


def redirect(port: int, path: str) -> dict[str, Any]:
    return {
        "name": "old",
        "match": {"ports": port, "path": path},
        "action": {"type": "redirect", "redirect": {"to": "/new{path}", "status": 308}},
    }


def proxy(routes: list[dict[str, Any]], **settings: Any) -> SmartRoute:
    settings.setdefault("bind_address", LOOPBACK)
    settings.setdefault("graceful_shutdown_timeout", 1)
    return SmartRoute(routes, **settings)


def pool_of(server: SmartRoute) -> LanePool:
    pool: LanePool = server._runtime.lane_pool
    return pool


def pooled(server: SmartRoute) -> int:
    """How many idle backend connections the lane pool holds."""
    return sum(len(idle) for idle in pool_of(server)._idle.values())


def ok(seen: bytes) -> bytes:
    """The backends' usual answer: 200 with ``METHOD target`` as the body."""
    body = b" ".join(seen.split(b" ", 2)[:2])
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def target_of(head: bytes) -> bytes:
    return head.split(b" ", 2)[1]


class Backend(LoopbackServer):
    """An HTTP/1.1 backend on a free loopback port answering each request (bodiless) with
    ``answer(connection index, head)``; it notes the requests by connection and counts the
    connections it accepted and saw end."""

    def __init__(self, answer: Answer = lambda _conn, head: ok(head)) -> None:
        super().__init__()
        self.answer = answer
        self.closed = 0
        self.requests: list[tuple[int, bytes]] = []  # (connection index, target)

    def targets(self) -> list[bytes]:
        return [target for _, target in self.requests]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.accepted - 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append((index, target_of(head)))
                writer.write(self.answer(index, head))
                await writer.drain()
        finally:
            self.closed += 1


# -- clients ----------------------------------------------------------------------------------


async def until(condition: Callable[[], bool], what: str, wait: float = WAIT) -> None:
    deadline = asyncio.get_running_loop().time() + wait
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"not within {wait}s: {what}"
        await asyncio.sleep(0.005)


def get(path: str, *extra: str) -> bytes:
    return ("\r\n".join([f"GET {path} HTTP/1.1", "Host: site.test", *extra]) + "\r\n\r\n").encode()


def auth(user: str, password: str) -> str:
    return "Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class CountingClient(RawClient):
    """A RawClient that counts every byte it sent and received."""

    given = 0
    taken = 0

    async def send(self, data: bytes, *, half_close: bool = False) -> None:
        await super().send(data, half_close=half_close)
        self.given += len(data)

    async def _fill(self) -> bool:
        before = len(self.buffer)
        more = await super()._fill()
        self.taken += len(self.buffer) - before
        return more


# -- 1, 2, 11: hand-over to the transport session mid-connection ------------------------------

USERS = {"alice": "wonderland"}


@pytest.mark.parametrize("second", ["redirect", "no-route", "basic-auth"])
@async_test(10)
async def test_a_request_the_lane_does_not_carry_hands_the_connection_over_in_order(
    second: str, lane_only: list[int], handovers: list[bytes]
) -> None:
    async with Backend() as backend:
        port = free_port()
        routes = [
            redirect(port, "/old/*"),
            forward("private", port, backend.port, path="/private/*", security={
                "basic_auth": {"users": USERS, "realm": "staff"}
            }),
            forward("web", port, backend.port, path="/app/*"),
        ]  # fmt: skip
        request, status = {
            "redirect": (get("/old/x"), 308),
            "no-route": (get("/missing"), 404),
            "basic-auth": (get("/private/x"), 401),
        }[second]
        async with proxy(routes):
            client = await RawClient.connect(port)
            try:
                first = await exchange(client, get("/app/1"))
                assert (first.status, first.body) == (200, b"GET /app/1"), first.summary()
                assert handovers == [], "the first request was handed over"
                middle = await exchange(client, request)
                assert middle.status == status, middle.summary()
                assert "close" not in middle.tokens("connection"), middle.summary()
                if second == "redirect":
                    assert middle.header("location") == "/new/old/x", middle.summary()
                if second == "basic-auth":
                    challenge = middle.header("www-authenticate") or ""
                    assert challenge.startswith('Basic realm="staff"'), middle.summary()
                last = await exchange(client, get("/app/3"))
                assert (last.status, last.body) == (200, b"GET /app/3"), last.summary()
            finally:
                client.close()
            assert len(handovers) == 1 and handovers[0].startswith(request), handovers
            if second == "basic-auth":
                fresh = await RawClient.connect(port)
                try:
                    answer = await exchange(fresh, get("/private/x", auth("alice", "wonderland")))
                    assert (answer.status, answer.body) == (200, b"GET /private/x")
                finally:
                    fresh.close()
                assert len(handovers) == 1, "the request with credentials left the lane"
    expected = [b"/app/1", b"/app/3"] + ([b"/private/x"] if second == "basic-auth" else [])
    assert backend.targets() == expected
    assert lane_only == []


@async_test(10)
async def test_a_pipelined_request_needing_a_hand_over_is_answered_in_order(
    handovers: list[bytes],
) -> None:
    async with Backend() as backend:
        port = free_port()
        routes = [redirect(port, "/old/*"), forward("web", port, backend.port, path="/app/*")]
        async with proxy(routes):
            client = await RawClient.connect(port)
            try:
                await client.send(get("/app/1") + get("/old/x") + get("/app/3"))
                got = await client.responses([False] * 3)
            finally:
                client.close()
    assert [(r.status, r.body) for r in got[::2]] == [(200, b"GET /app/1"), (200, b"GET /app/3")]
    assert got[1].status == 308 and got[1].header("location") == "/new/old/x", got[1].summary()
    assert backend.targets() == [b"/app/1", b"/app/3"]
    assert handovers == [get("/old/x") + get("/app/3")]


# -- 3, 4: clients and backends that misbehave ------------------------------------------------

BIG = 16 * MIB


@async_test(10)
async def test_a_client_reset_mid_response_closes_the_backend_connection(
    finished: Finished,
) -> None:
    big = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG + b"x" * BIG

    async with Backend(lambda _conn, head: big if b"/big" in head else ok(head)) as backend:
        port = free_port()
        async with proxy([forward("web", port, backend.port)]) as server:
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            try:
                writer.write(get("/big"))
                got = 0
                async with asyncio.timeout(WAIT):
                    while got < MIB:
                        got += len(await reader.read(65536))
            finally:
                reset(writer)
            record = await finished.next()
            assert record.outcome != "ok" or record.error is not None, (record.outcome,)
            await until(lambda: backend.closed == 1, "the backend connection closed", 2)
            assert backend.accepted == 1
            assert pooled(server) == 0, "the cut exchange's connection was pooled"
            client = await RawClient.connect(port)  # the proxy still serves
            try:
                answer = await exchange(client, get("/small"))
            finally:
                client.close()
    assert (answer.status, answer.body) == (200, b"GET /small")
    assert backend.requests == [(0, b"/big"), (1, b"/small")]


@async_test(10)
async def test_bytes_after_a_complete_response_keep_the_backend_connection_from_reuse() -> None:
    def answer(conn: int, head: bytes) -> bytes:
        if target_of(head) == b"/first":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokGARBAGE"
        return ok(head)

    async with Backend(answer) as backend:
        port = free_port()
        async with proxy([forward("web", port, backend.port)]):
            client = await RawClient.connect(port)
            try:
                first = await exchange(client, get("/first"))
                assert (first.status, first.body) == (200, b"ok"), first.summary()
                second = await exchange(client, get("/second"))
                assert (second.status, second.body) == (200, b"GET /second"), second.summary()
            finally:
                client.close()
    assert backend.requests == [(0, b"/first"), (1, b"/second")], "the out-of-step one reused"


# -- 5, 6: time limits and the lane pool ------------------------------------------------------


@async_test(10)
async def test_an_idle_kept_alive_client_is_closed_after_the_keepalive_timeout(
    finished: Finished, lane_only: list[int]
) -> None:
    async with Backend() as backend:
        port = free_port()
        async with proxy([forward("web", port, backend.port)], http_keepalive_timeout=0.5):
            client = await RawClient.connect(port)
            try:
                answer = await exchange(client, get("/once"))
                assert (answer.status, answer.body) == (200, b"GET /once")
                loop = asyncio.get_running_loop()
                started = loop.time()
                rest = await client.rest()  # fails if not closed within WAIT
                waited = loop.time() - started
            finally:
                client.close()
            record = await finished.next()
    assert rest == b"" and not client.reset
    assert 0.3 < waited < 2, f"closed after {waited:.2f}s"
    assert (record.outcome, record.error) == ("ok", None)
    assert lane_only == []


@async_test(10)
async def test_a_pooled_connection_the_backend_closed_is_not_handed_out(
    finished: Finished, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Backend() as backend:
        port = free_port()
        async with proxy([forward("web", port, backend.port)]) as server:
            client = await RawClient.connect(port)
            try:
                answer = await exchange(client, get("/one"))
                assert (answer.status, answer.body) == (200, b"GET /one")
            finally:
                client.close()
            await finished.next()
            assert pooled(server) == 1, "the clean connection went to the lane pool"
            backend.drop()  # the backend closes the idle connection
            await until(lambda: pooled(server) == 0, "the pool let the closed one go", 2)
            pool = pool_of(server)
            taken: list[object] = []
            original = pool.take

            def spy(key: PoolKey) -> Any:
                taken.append(result := original(key))
                return result

            monkeypatch.setattr(pool, "take", spy)
            client = await RawClient.connect(port)
            try:
                answer = await exchange(client, get("/two"))
            finally:
                client.close()
    assert (answer.status, answer.body) == (200, b"GET /two")
    assert taken == [None], "the pool handed out a connection"
    assert backend.requests == [(0, b"/one"), (1, b"/two")]
    assert backend.accepted == 2


# -- 7, 8: targets ----------------------------------------------------------------------------


@async_test(10)
async def test_two_targets_share_requests_from_separate_connections(lane_only: list[int]) -> None:
    async with Backend() as one, Backend() as two:
        port = free_port()
        async with proxy([forward("web", port, one.port, two.port)]):
            for i in range(10):
                client = await RawClient.connect(port)
                try:
                    answer = await exchange(client, get(f"/{i}"))
                    assert (answer.status, answer.body) == (200, f"GET /{i}".encode())
                finally:
                    client.close()
    assert one.requests and two.requests, (one.targets(), two.targets())
    assert (len(one.requests), len(two.requests)) == (5, 5), "not used in turn"
    assert lane_only == []


@async_test(10)
async def test_a_route_change_closes_idle_connections_to_a_dropped_target(
    finished: Finished,
) -> None:
    async with Backend() as old, Backend() as new:
        port = free_port()
        async with proxy([forward("web", port, old.port)]) as server:
            client = await RawClient.connect(port)
            try:
                answer = await exchange(client, get("/before"))
                assert (answer.status, answer.body) == (200, b"GET /before")
            finally:
                client.close()
            await finished.next()
            assert pooled(server) == 1 and old.closed == 0
            await server.update_routes([forward("web", port, new.port)])
            await until(lambda: old.closed == 1, "the old backend's connection closed", 2)
            assert pooled(server) == 0
            client = await RawClient.connect(port)
            try:
                answer = await exchange(client, get("/after"))
            finally:
                client.close()
    assert (answer.status, answer.body) == (200, b"GET /after")
    assert old.targets() == [b"/before"] and new.targets() == [b"/after"]


# -- 9: an upgrade the backend refuses --------------------------------------------------------


@async_test(10)
async def test_an_upgrade_refused_with_400_leaves_the_connection_usable() -> None:
    def answer(conn: int, head: bytes) -> bytes:
        if target_of(head) == b"/ws":
            return b"HTTP/1.1 400 Bad Request\r\nContent-Length: 6\r\n\r\nno ws\n"
        return ok(head)

    async with Backend(answer) as backend:
        port = free_port()
        async with proxy([forward("web", port, backend.port)]):
            client = await RawClient.connect(port)
            try:
                refused = await exchange(
                    client, get("/ws", "Connection: Upgrade", "Upgrade: websocket")
                )
                assert (refused.status, refused.body) == (400, b"no ws\n"), refused.summary()
                assert "close" not in refused.tokens("connection"), refused.summary()
                after = await exchange(client, get("/after"))
                assert (after.status, after.body) == (200, b"GET /after"), after.summary()
            finally:
                client.close()
    assert backend.targets() == [b"/ws", b"/after"]


# -- 10: statistics ---------------------------------------------------------------------------


@async_test(10)
async def test_five_requests_on_one_connection_count_once_with_every_byte(
    finished: Finished, lane_only: list[int]
) -> None:
    async with Backend() as backend:
        port = free_port()
        async with proxy([forward("web", port, backend.port)]) as server:
            client = await CountingClient.connect(port)
            assert isinstance(client, CountingClient)
            try:
                for i in range(5):
                    answer = await exchange(client, get(f"/{i}"))
                    assert (answer.status, answer.body) == (200, f"GET /{i}".encode())
            finally:
                client.close()
            record = await finished.next()
            stats = server.stats()
    assert client.given == sum(len(get(f"/{i}")) for i in range(5))
    assert (record.bytes_in, record.bytes_out) == (client.given, client.taken)
    assert (record.route, record.outcome, record.error) == ("web", "ok", None)
    assert stats["routes"]["web"] == {
        "active": 0,
        "total": 1,
        "bytes_in": client.given,
        "bytes_out": client.taken,
        "requests": {"2xx": 5},
    }
    assert stats["connections"] == {"active": 0, "total": 1}
    assert len(backend.requests) == 5 and backend.accepted == 1
    assert lane_only == []
