"""Route security: IP lists, connection and rate limits, basic auth — over real sockets."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
from typing import Any

from http_backend import http_backend
from support import LOOPBACK, async_test, echo_handler, free_port, nginx_server, serve

from smartroute import SmartRoute
from smartroute.routing.validation import validate_routes
from smartroute.server.security import SecurityGate, basic_auth_refusal


def tcp_route(port: int, backend: int, **policy: Any) -> dict[str, Any]:
    return {
        "name": "tcp",
        "match": {"ports": port},
        "action": {"type": "forward", "targets": [{"host": LOOPBACK, "port": backend}]},
        "security": policy,
    }


def http_route(port: int, backend: int, **policy: Any) -> dict[str, Any]:
    route = tcp_route(port, backend, **policy)
    route["name"] = "web"
    route["action"]["protocol"] = "http"
    return route


async def echo_works(port: int, source: str = LOOPBACK) -> bool:
    """True when a connection from ``source`` is served; False when the proxy closes it."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port, local_addr=(source, 0))
    writer.write(b"ping\n")
    try:
        answer = await asyncio.wait_for(reader.readline(), 5)
    except ConnectionError:
        answer = b""
    writer.close()
    return answer == b"ping\n"


async def http_status(port: int, *, source: str = LOOPBACK, headers: str = "") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(LOOPBACK, port, local_addr=(source, 0))
    writer.write(f"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n".encode())
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return int(answer.split(b" ", 2)[1]), answer


@async_test()
async def test_ip_allow_and_block_lists_block_wins() -> None:
    async with serve(echo_handler) as backend:
        port = free_port()
        policy = {
            "ip_allow_list": ["127.0.0.0/29", "::ffff:127.0.0.9"],
            "ip_block_list": ["127.0.0.3"],
        }
        async with SmartRoute([tcp_route(port, backend, **policy)], bind_address=LOOPBACK) as proxy:
            assert await echo_works(port, "127.0.0.2")
            assert await echo_works(port, "127.0.0.9")  # allowed through its IPv4-mapped form
            assert not await echo_works(port, "127.0.0.3")  # allowed by the CIDR, but blocked
            assert not await echo_works(port, "127.0.0.10")  # not on the allow list
            await asyncio.sleep(0.05)
            assert proxy.stats()["connections"]["active"] == 0
    with http_backend() as web:
        port = free_port()
        async with SmartRoute(
            [http_route(port, web.port, ip_block_list=["127.0.0.4"])], bind_address=LOOPBACK
        ):
            assert (await http_status(port, source="127.0.0.5"))[0] == 200
            status, body = await http_status(port, source="127.0.0.4")
            assert status == 403 and b"client IP is blocked" in body


@async_test()
async def test_connection_limits_per_route_and_per_ip_are_released_when_connections_end() -> None:
    async with serve(echo_handler) as backend:
        port = free_port()
        route = tcp_route(port, backend, max_connections=3, max_connections_per_ip=2)
        async with SmartRoute([route], bind_address=LOOPBACK) as proxy:
            held = []
            for source in ("127.0.0.2", "127.0.0.2"):
                reader, writer = await asyncio.open_connection(
                    LOOPBACK, port, local_addr=(source, 0)
                )
                writer.write(b"hold\n")
                assert await asyncio.wait_for(reader.readline(), 5) == b"hold\n"
                held.append(writer)
            assert not await echo_works(port, "127.0.0.2")  # a third from the same client
            reader, writer = await asyncio.open_connection(
                LOOPBACK, port, local_addr=("127.0.0.3", 0)
            )
            writer.write(b"hold\n")
            assert await asyncio.wait_for(reader.readline(), 5) == b"hold\n"
            held.append(writer)
            assert not await echo_works(port, "127.0.0.4")  # the route is full
            for writer in held:
                writer.close()
            for _ in range(100):
                if proxy.stats()["connections"]["active"] == 0:
                    break
                await asyncio.sleep(0.02)
            assert await echo_works(port, "127.0.0.2")  # released: admitted again
            for _ in range(100):
                if proxy.stats()["connections"]["active"] == 0:
                    break
                await asyncio.sleep(0.02)
            assert proxy._runtime.gate.tracked == 0  # per-client entries go with their connections  # noqa: SLF001


@async_test()
async def test_rate_limit_per_client_per_minute() -> None:
    with http_backend() as web:
        port = free_port()
        route = http_route(port, web.port, rate_limit={"connections_per_minute": 3})
        async with SmartRoute([route], bind_address=LOOPBACK):
            statuses = [(await http_status(port, source="127.0.0.2"))[0] for _ in range(5)]
            assert statuses == [200, 200, 200, 429, 429]
            assert (await http_status(port, source="127.0.0.3"))[0] == 200  # another client


@async_test()
async def test_basic_auth_plain_and_hashed_passwords() -> None:
    pbkdf2 = hashlib.pbkdf2_hmac("sha256", b"s3cret", b"salty", 1000).hex()
    users = {
        "alice": "wonderland",
        "bob": "sha256:" + hashlib.sha256(b"builder").hexdigest(),
        "carol": f"pbkdf2_sha256$1000$salty${pbkdf2}",
    }

    def auth(user: str, password: str) -> str:
        return (
            "Authorization: Basic "
            + base64.b64encode(f"{user}:{password}".encode()).decode()
            + "\r\n"
        )

    with http_backend() as web:
        port = free_port()
        route = http_route(port, web.port, basic_auth={"users": users, "realm": "staff"})
        async with SmartRoute([route], bind_address=LOOPBACK):
            status, answer = await http_status(port)
            assert status == 401 and b'WWW-Authenticate: Basic realm="staff"' in answer
            assert (await http_status(port, headers=auth("alice", "wonderland")))[0] == 200
            assert (await http_status(port, headers=auth("bob", "builder")))[0] == 200
            assert (await http_status(port, headers=auth("carol", "s3cret")))[0] == 200
            assert (await http_status(port, headers=auth("alice", "wrong")))[0] == 401
            assert (await http_status(port, headers=auth("mallory", "wonderland")))[0] == 401
            assert (await http_status(port, headers="Authorization: Basic !!!\r\n"))[0] == 401


def test_basic_auth_refusals() -> None:
    route = validate_routes([http_route(80, 81, basic_auth={"users": {"a": "pa55word"}})])[0]
    assert route.security is not None and route.security.basic_auth is not None
    policy = route.security.basic_auth
    assert "pa55word" not in repr(route)  # passwords never in reprs
    ok = "Basic " + base64.b64encode(b"a:pa55word").decode()
    assert basic_auth_refusal(policy, ok) is None
    assert basic_auth_refusal(policy, None) == "credentials required"
    assert basic_auth_refusal(policy, "Bearer x") == "credentials required"
    assert basic_auth_refusal(policy, "Basic " + base64.b64encode(b"ab").decode()) is not None


def test_rate_windows_are_pruned() -> None:
    route = validate_routes([tcp_route(80, 81, rate_limit={"connections_per_minute": 5})])[0]
    clock = [1000.0]
    gate = SecurityGate(clock=lambda: clock[0])

    for i in range(999):
        address = ipaddress.ip_address(f"10.0.{i // 250}.{i % 250}")
        assert gate.admit(route, address) is None
        gate.release(route.name, str(address))
    assert gate.tracked == 999  # windows of clients seen within the last minute
    clock[0] += 61
    assert gate.admit(route, ipaddress.ip_address("10.9.9.9")) is None  # the 1,000th admit
    assert gate.tracked == 2  # only the new client's window and its live connection remain


BYPASS_PATHS = ["/admin/x", "//admin/x", "/./admin/x", "/%61dmin/x", "/public/../admin/x"]
BYPASS_PATHS += ["/admin//x", "/ADMIN/../admin/x", "/admin/y/../x", "/%2e/admin/x"]


@async_test()
async def test_path_rules_cannot_be_walked_around_with_path_tricks(tmp_path: Any) -> None:
    """basic_auth, block and allow-list rules on a path hold for every spelling of that path
    that the backend (a real nginx) resolves to it, and the backend gets the path the proxy
    matched ($request_uri is the target nginx received)."""
    port = free_port()
    block = 'location / { return 200 "uri=$uri sent=$request_uri\\n"; }'
    credentials = base64.b64encode(b"alice:secret").decode()
    async with nginx_server(tmp_path, block) as nginx:

        def route(name: str, path: str | None, **extra: Any) -> dict[str, Any]:
            match: dict[str, Any] = {"ports": port}
            if path is not None:
                match["path"] = path
            target = {"host": LOOPBACK, "port": nginx}
            action = {"type": "forward", "protocol": "http", "targets": [target]}
            return {"name": name, "match": match, "action": action, **extra}

        routes = [
            route("admin", "/admin/*", security={"basic_auth": {"users": {"alice": "secret"}}}),
            route("secret", "/secret/*", security={"ip_allow_list": ["10.0.0.0/8"]}),
            {
                "name": "gone",
                "match": {"ports": port, "path": "/gone/*"},
                "action": {"type": "block"},
            },
            route("site", None),
        ]
        async with SmartRoute(routes, bind_address=LOOPBACK):
            for path in BYPASS_PATHS:
                status, body = await get(port, path)
                assert status == 401, (path, status, body)
                status, body = await get(port, path, f"Authorization: Basic {credentials}\r\n")
                assert (status, body) == (200, "uri=/admin/x sent=/admin/x\n"), path
                for rule, expected in (("secret", 403), ("gone", 403)):
                    tricked = path.replace("admin", rule).replace("ADMIN", rule.upper())
                    tricked = tricked.replace("%61dmin", "%" + f"{ord(rule[0]):02x}" + rule[1:])
                    status, body = await get(port, tricked)
                    assert status == expected, (tricked, status, body)
            # What the proxy refuses outright, nginx would have resolved somewhere.
            for path in ("/%2fadmin/x", "/admin%2fx", "/..;/admin/x", "/%00", "/..", "/a\\b"):
                status, body = await get(port, path)
                assert status == 400, (path, status, body)
            # The public part is served, normalised the same way.
            assert await get(port, "/public/./a//b?q=/../x") == (
                200,
                "uri=/public/a/b sent=/public/a/b?q=/../x\n",
            )


async def get(port: int, path: str, extra: str = "") -> tuple[int, str]:
    """One request with a raw target (no client normalises it); the status and body."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        request = f"GET {path} HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n{extra}\r\n"
        writer.write(request.encode())
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode()
