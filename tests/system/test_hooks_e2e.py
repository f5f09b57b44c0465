"""In-process hooks end to end: real clients, a real proxy and real backends on loopback.

Each verdict key of each hook kind is checked by what the client and the backend see (the
backend of ``http_backend`` answers with a description of the request it got), together with
the order the hooks run in, what a failing hook does under ``hooks_fail`` "closed" and "open",
``on_disconnect``'s byte counts, and that routes without hooks stay on the fast lane while a
hooked route takes the transport path. The verdict checks themselves are unit-tested in
``tests/server/test_hooks.py``.

(This file is not named ``test_hooks.py``: test basenames must stay unique across folders.)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from http_backend import http_backend
from support import (
    LOOPBACK,
    TestCA,
    async_test,
    free_port,
    free_ports,
    named_handler,
    read_line,
    read_to_end,
    serve,
)

from smartroute import SmartRoute
from smartroute.context import RouteContext
from smartroute.errors import ConfigError
from smartroute.server.hooks import HookRequest, HookResponse

Answer = dict[str, Any] | None
HOOK_FAILED = b"refused: a hook failed\n"

# -- hooks ---------------------------------------------------------------------------------------


class Script:
    """What a hook does when called: note the call (in ``calls``, shared between hooks to see
    their order), then wait ``sleeps`` seconds, raise ``raises`` or answer ``answer`` (a
    verdict, or a function of the hook's arguments giving one)."""

    def __init__(
        self,
        answer: Answer | Callable[..., Answer] = None,
        *,
        name: str = "hook",
        calls: list[str] | None = None,
        raises: BaseException | None = None,
        sleeps: float = 0.0,
    ) -> None:
        self.answer = answer
        self.name = name
        self.calls = [] if calls is None else calls
        self.raises = raises
        self.sleeps = sleeps
        self.seen: list[tuple[Any, ...]] = []

    async def run(self, *args: Any) -> Answer:
        self.calls.append(self.name)
        self.seen.append(args)
        if self.sleeps:
            await asyncio.sleep(self.sleeps)
        if self.raises is not None:
            raise self.raises
        return self.answer(*args) if callable(self.answer) else self.answer


class ConnectHook(Script):
    async def on_connect(self, ctx: RouteContext) -> Answer:
        return await self.run(ctx)


class RequestHook(Script):
    async def on_request(self, ctx: RouteContext, request: HookRequest) -> Answer:
        return await self.run(ctx, request)


class ResponseHook(Script):
    async def on_response(
        self, ctx: RouteContext, request: HookRequest, response: HookResponse
    ) -> Answer:
        return await self.run(ctx, request, response)


HOOK_KINDS: dict[str, type[Script]] = {"on_connect": ConnectHook, "on_request": RequestHook}


class DisconnectHook:
    """Keeps every ``info`` its ``on_disconnect`` is given."""

    def __init__(self) -> None:
        self.infos: list[dict[str, Any]] = []
        self.contexts: list[RouteContext] = []
        self.called = asyncio.Event()

    async def on_disconnect(self, ctx: RouteContext, info: dict[str, Any]) -> None:
        self.contexts.append(ctx)
        self.infos.append(info)
        self.called.set()

    async def first(self, timeout: float = 5) -> dict[str, Any]:
        await self.calls(1, timeout)
        return self.infos[0]

    async def calls(self, count: int, timeout: float = 5) -> None:
        """Wait until it was called ``count`` times."""
        async with asyncio.timeout(timeout):
            while len(self.infos) < count:
                self.called.clear()
                await self.called.wait()


# -- routes and clients ----------------------------------------------------------------------


def http_route(
    port: int,
    target: int,
    *hooks: object,
    name: str = "web",
    fail: str | None = None,
    priority: int | None = None,
    protocol: str = "http",
    **match: Any,
) -> dict[str, Any]:
    """A forward route on ``port`` to ``127.0.0.1:target`` (an IP literal: a route the fast
    lane could carry, were it not for its hooks)."""
    route: dict[str, Any] = {
        "name": name,
        "match": {"ports": port, **match},
        "action": {
            "type": "forward",
            "protocol": protocol,
            "targets": [{"host": LOOPBACK, "port": target}],
        },
    }
    if hooks:
        route["hooks"] = list(hooks)
    if fail is not None:
        route["hooks_fail"] = fail
    if priority is not None:
        route["priority"] = priority
    return route


def tcp_route(port: int, target: int, *hooks: object, **options: Any) -> dict[str, Any]:
    return http_route(port, target, *hooks, protocol="tcp", **options)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes
    raw: bytes

    def sent(self) -> dict[str, Any]:
        """What the describing backend said it got."""
        info: dict[str, Any] = json.loads(self.body)
        return info

    def sent_headers(self) -> dict[str, list[str]]:
        """The headers the backend got, by lower-cased name."""
        found: dict[str, list[str]] = {}
        for name, value in self.sent()["headers"]:
            found.setdefault(name.lower(), []).append(value)
        return found


def request_bytes(
    path: str = "/",
    *,
    method: str = "GET",
    host: str = "example.test",
    headers: dict[str, str] | None = None,
    close: bool = True,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += ["Connection: close"] if close else []
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def exchange(port: int, data: bytes, *, eof: bool = False) -> tuple[bytes, bool]:
    """Send ``data`` on a new connection (then end our side if ``eof``) and read to its end:
    (what came, whether it was reset)."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(data)
        if eof:
            writer.write_eof()
        return await read_to_end(reader)
    finally:
        writer.close()


def parse_reply(raw: bytes) -> Reply:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    return Reply(int(lines[0].split()[1]), headers, body, raw)


class Client:
    """One kept-alive client connection: a request at a time, each answer read whole."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Client:
        return cls(*await asyncio.open_connection(LOOPBACK, port))

    async def send(self, path: str = "/", host: str = "example.test") -> Reply | None:
        """The answer to one request (framed by Content-Length), or None when the proxy
        ended the connection instead."""
        self.writer.write(request_bytes(path, host=host, close=False))
        try:
            async with asyncio.timeout(5):
                head = await self.reader.readuntil(b"\r\n\r\n")
                reply = parse_reply(head)
                length = int(reply.headers.get("content-length", "0"))
                body = await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        return Reply(reply.status, reply.headers, body, head + body)

    def close(self) -> None:
        self.writer.close()


async def get(
    port: int, path: str = "/", *, method: str = "GET", headers: dict[str, str] | None = None
) -> Reply:
    """One request on its own connection (``Connection: close``)."""
    raw, _ = await exchange(port, request_bytes(path, method=method, headers=headers))
    assert raw, "the connection closed without an answer"
    return parse_reply(raw)


def hook_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "smartroute.hooks"]


# -- refusals: allow, status, body, headers ------------------------------------------------


@pytest.mark.parametrize("kind", HOOK_KINDS)
@async_test()
async def test_a_refusal_answers_403_or_the_answer_the_hook_gives(kind: str) -> None:
    plain, custom = free_ports(2)
    hook = HOOK_KINDS[kind]
    with http_backend() as backend:
        refuse = hook({"allow": False})
        answer = {
            "allow": False,
            "status": 451,
            "body": "not here\n",
            "headers": {"X-Why": "policy", "Retry-After": "60"},
        }
        routes = [
            http_route(plain, backend.port, refuse, name="plain"),
            http_route(custom, backend.port, hook(answer), name="custom"),
        ]
        async with SmartRoute(routes, bind_address=LOOPBACK):
            reply = await get(plain)
            assert reply.status == 403
            reply = await get(custom)
            assert (reply.status, reply.body) == (451, b"not here\n")
            assert reply.headers["x-why"] == "policy"
            assert reply.headers["retry-after"] == "60"
            assert reply.headers["content-length"] == "9"
            # A hook that lets the request go (allow True, or nothing to say) changes nothing.
            refuse.answer = {"allow": True}
            assert (await get(plain)).status == 200
            refuse.answer = None
            assert (await get(plain)).status == 200
        assert backend.connections, "the allowed requests reached the backend"
        assert len(refuse.calls) == 3


@async_test()
async def test_a_refused_request_leaves_the_connection_usable() -> None:
    port = free_port()
    with http_backend() as backend:
        hook = RequestHook(lambda ctx, request: {"allow": False} if request.path == "/no" else None)
        async with SmartRoute([http_route(port, backend.port, hook)], bind_address=LOOPBACK):
            client = await Client.open(port)
            try:
                replies = [await client.send("/no"), await client.send("/yes")]
            finally:
                client.close()
    refused, served = replies
    assert refused is not None and refused.status == 403
    assert served is not None and (served.status, served.sent()["path"]) == (200, "/yes")


@pytest.mark.parametrize("kind", HOOK_KINDS)
@async_test()
async def test_proxy_wide_hooks_run_first_and_the_first_refusal_wins(kind: str) -> None:
    port = free_port()
    hook = HOOK_KINDS[kind]
    calls: list[str] = []
    with http_backend() as backend:
        wide = hook(name="wide", calls=calls)
        first = hook({"set_headers": {"X-A": "1"}} if kind == "on_request" else None)
        first.name, first.calls = "route-1", calls
        second = hook({"allow": False, "status": 401}, name="route-2", calls=calls)
        third = hook({"allow": False, "status": 402}, name="route-3", calls=calls)
        route = http_route(port, backend.port, first, second, third)
        async with SmartRoute([route], bind_address=LOOPBACK, hooks=[wide]):
            assert (await get(port)).status == 401
            assert calls == ["wide", "route-1", "route-2"]
            calls.clear()
            wide.answer = {"allow": False, "status": 429}  # the proxy-wide one refuses first
            assert (await get(port)).status == 429
            assert calls == ["wide"]
        assert not backend.connections


# -- on_request: headers and paths -------------------------------------------------------------


@async_test()
async def test_set_and_removed_headers_reach_the_backend() -> None:
    port = free_port()
    with http_backend() as backend:
        hook = RequestHook(
            {
                "set_headers": {"X-User": "alice", "x-client": "from the hook"},
                "remove_headers": ["X-Secret", "x-also-secret"],
            }
        )
        async with SmartRoute([http_route(port, backend.port, hook)], bind_address=LOOPBACK):
            reply = await get(
                port,
                headers={
                    "X-Secret": "s1",
                    "X-Also-Secret": "s2",
                    "X-Client": "from the client",
                    "X-Kept": "kept",
                },
            )
    assert reply.status == 200
    sent = reply.sent_headers()
    assert sent["x-user"] == ["alice"]
    assert sent["x-client"] == ["from the hook"]  # replaced, not added to
    assert sent["x-kept"] == ["kept"]
    assert "x-secret" not in sent and "x-also-secret" not in sent
    # What the hook saw is the request as the client sent it.
    _, request = hook.seen[0]
    assert isinstance(request, HookRequest)
    assert (request.method, request.path, request.query) == ("GET", "/", None)
    assert request.headers["x-secret"] == "s1"


@pytest.mark.parametrize(
    "verdict, name",
    [
        ({"set_headers": {"Content-Length": "0"}}, "Content-Length"),
        ({"set_headers": {"Transfer-Encoding": "chunked"}}, "Transfer-Encoding"),
        ({"set_headers": {"Connection": "close"}}, "Connection"),
        ({"remove_headers": ["content-length"]}, "content-length"),
    ],
    ids=["content-length", "transfer-encoding", "connection", "remove-content-length"],
)
@async_test()
async def test_framing_headers_are_a_bad_verdict(
    verdict: Answer, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    with http_backend() as backend:
        hook = RequestHook(verdict)
        async with SmartRoute([http_route(port, backend.port, hook)], bind_address=LOOPBACK):
            reply = await get(port, method="POST", headers={"Content-Length": "0"})
    assert (reply.status, reply.body) == (503, HOOK_FAILED)
    assert not backend.connections
    (line,) = hook_warnings(caplog)
    assert "RequestHook.on_request" in line and "bad verdict" in line
    assert f"{name} frames the message" in line


@pytest.mark.parametrize(
    "kind, verdict",
    [
        ("on_request", {"set_headers": {"X-A": "1\r\nX-Injected: yes"}}),
        ("on_request", {"set_headers": {"X-A": "1\nX-Injected: yes"}}),
        ("on_request", {"set_headers": {"X-A\r\nX-Injected": "yes"}}),
        ("on_request", {"remove_headers": ["X-A\r\nX-Injected: yes"]}),
        ("on_request", {"rewrite_path": "/a HTTP/1.1\r\nX-Injected: yes\r\n\r\nGET /b"}),
        ("on_connect", {"allow": False, "headers": {"X-A": "1\r\nX-Injected: yes"}}),
        ("on_connect", {"target": {"host": "127.0.0.1\r\nX-Injected: yes", "port": 80}}),
    ],
    ids=[
        "value-crlf",
        "value-lf",
        "name-crlf",
        "remove-crlf",
        "path-crlf",
        "answer-header-crlf",
        "target-crlf",
    ],
)
@async_test()
async def test_header_injection_is_refused(
    kind: str, verdict: Answer, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    with http_backend() as backend:
        hook = HOOK_KINDS[kind](verdict)
        async with SmartRoute([http_route(port, backend.port, hook)], bind_address=LOOPBACK):
            reply = await get(port)
    assert (reply.status, reply.body) == (503, HOOK_FAILED)
    assert b"injected" not in reply.raw.lower()
    assert not backend.connections
    (line,) = hook_warnings(caplog)
    assert "bad verdict" in line


@pytest.mark.parametrize(
    "rewrite, sent",
    [
        ("/new/place", "/new/place?x=1&y=2"),  # no query: the request's stays
        ("/new?z=3", "/new?z=3"),  # a query: it replaces the request's
        ("/", "/?x=1&y=2"),
    ],
)
@async_test()
async def test_rewrite_path_reaches_the_backend(rewrite: str, sent: str) -> None:
    port = free_port()
    with http_backend() as backend:
        hook = RequestHook({"rewrite_path": rewrite})
        responses = ResponseHook()
        route = http_route(port, backend.port, hook, responses)
        async with SmartRoute([route], bind_address=LOOPBACK):
            reply = await get(port, "/old/path?x=1&y=2")
    assert reply.status == 200
    assert reply.sent()["path"] == sent
    _, request, _ = responses.seen[0]  # on_response sees the request as it went on
    assert request.path + (f"?{request.query}" if request.query is not None else "") == sent


# -- target ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", HOOK_KINDS)
@async_test()
async def test_a_hook_target_takes_an_http_request_elsewhere(kind: str) -> None:
    port = free_port()
    with http_backend("route") as route_backend, http_backend("chosen") as chosen:
        hook = HOOK_KINDS[kind]({"target": {"host": LOOPBACK, "port": chosen.port}})
        ends = DisconnectHook()
        route = http_route(port, route_backend.port, hook, ends)
        async with SmartRoute([route], bind_address=LOOPBACK):
            for _ in range(2):
                reply = await get(port)
                assert (reply.status, reply.sent()["backend"]) == (200, "chosen")
            assert (await ends.first())["target"] == f"{LOOPBACK}:{chosen.port}"
    assert not route_backend.connections


@async_test()
async def test_an_on_connect_target_takes_a_raw_connection_elsewhere() -> None:
    port = free_port()
    async with serve(named_handler("route")) as route_port, serve(named_handler("chosen")) as other:
        hook = ConnectHook({"target": {"host": LOOPBACK, "port": other}})
        ends = DisconnectHook()
        async with SmartRoute([tcp_route(port, route_port, hook, ends)], bind_address=LOOPBACK):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            try:
                assert await read_line(reader) == b"chosen\n"
                writer.write(b"ping\n")
                assert await read_line(reader) == b"ping\n"
            finally:
                writer.close()
            info = await ends.first()
    assert info["target"] == f"{LOOPBACK}:{other}"
    ctx, *_ = hook.seen[0]
    assert ctx.route_name == "web" and ctx.port == port


# -- fallback and drop ---------------------------------------------------------------------


@async_test()
async def test_fallback_passes_an_http_request_to_the_next_matching_route() -> None:
    port = free_port()
    calls: list[str] = []
    with http_backend("first") as first, http_backend("second") as second:
        declining = RequestHook({"fallback": True}, name="declining", calls=calls)
        taking = RequestHook({"set_headers": {"X-Took": "yes"}}, name="taking", calls=calls)
        routes = [
            http_route(port, first.port, declining, name="first", priority=10),
            http_route(port, second.port, taking, name="second"),
        ]
        async with SmartRoute(routes, bind_address=LOOPBACK) as proxy:
            reply = await get(port)
            assert (reply.status, reply.sent()["backend"]) == (200, "second")
            assert reply.sent_headers()["x-took"] == ["yes"]
            assert calls == ["declining", "taking"]  # the next route's hooks ran too
            await proxy.remove_route("second")
            reply = await get(port)  # nothing else matches
            assert reply.status == 404
    assert not first.connections


@async_test()
async def test_fallback_passes_a_raw_connection_on_or_closes_it() -> None:
    port = free_port()
    async with serve(named_handler("first")) as first, serve(named_handler("second")) as second:
        routes = [
            tcp_route(port, first, ConnectHook({"fallback": True}), name="first", priority=10),
            tcp_route(port, second, name="second"),
        ]
        async with SmartRoute(routes, bind_address=LOOPBACK) as proxy:
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            try:
                assert await read_line(reader) == b"second\n"
            finally:
                writer.close()
            await proxy.remove_route("second")
            data, _ = await exchange(port, b"hello\n", eof=True)
            assert data == b""


@async_test()
async def test_an_on_connect_fallback_holds_for_the_requests_of_an_http_connection() -> None:
    port = free_port()
    with http_backend("first") as first, http_backend("second") as second:
        routes = [
            http_route(
                port, first.port, ConnectHook({"fallback": True}), name="first", priority=10
            ),
            http_route(port, second.port, name="second"),
        ]
        async with SmartRoute(routes, bind_address=LOOPBACK):
            client = await Client.open(port)
            try:
                replies = [await client.send("/one"), await client.send("/two")]
            finally:
                client.close()
    assert [r.sent()["backend"] if r else None for r in replies] == ["second", "second"]
    assert not first.connections


@pytest.mark.parametrize("kind", HOOK_KINDS)
@async_test()
async def test_drop_closes_an_http_connection_without_an_answer(kind: str) -> None:
    port = free_port()
    with http_backend() as backend:
        hook = HOOK_KINDS[kind]({"drop": True})
        async with SmartRoute([http_route(port, backend.port, hook)], bind_address=LOOPBACK):
            data, _ = await exchange(port, request_bytes())
    assert data == b""
    assert hook.calls and not backend.connections


@async_test()
async def test_drop_closes_a_raw_connection() -> None:
    port = free_port()
    async with serve(named_handler("backend")) as target:
        hook = ConnectHook({"drop": True})
        async with SmartRoute([tcp_route(port, target, hook)], bind_address=LOOPBACK):
            data, _ = await exchange(port, b"hello\n", eof=True)
    assert data == b"" and hook.calls


# -- on_connect on kept-alive HTTP connections ------------------------------------------------


@async_test()
async def test_an_on_connect_refusal_holds_for_later_requests_of_a_kept_alive_connection() -> None:
    port = free_port()
    with http_backend("open") as open_backend, http_backend("guarded") as guarded:
        guard = ConnectHook({"allow": False})
        routes = [
            http_route(port, open_backend.port, name="open", domains="open.test"),
            http_route(port, guarded.port, guard, name="guarded", domains="guarded.test"),
        ]
        async with SmartRoute(routes, bind_address=LOOPBACK):
            client = await Client.open(port)
            try:
                first = await client.send(host="open.test")
                assert first is not None and first.status == 200
                second = await client.send(host="guarded.test")
            finally:
                client.close()
    assert second is None or second.status == 403
    assert not guarded.connections


@async_test()
async def test_a_route_whose_on_connect_refused_refuses_every_later_request_too() -> None:
    port = free_port()
    with http_backend("open") as open_backend, http_backend("guarded") as guarded:
        guard = ConnectHook({"allow": False})
        routes = [
            http_route(port, open_backend.port, name="open", domains="open.test"),
            http_route(port, guarded.port, guard, name="guarded", domains="guarded.test"),
        ]
        async with SmartRoute(routes, bind_address=LOOPBACK):
            client = await Client.open(port)
            try:
                replies = [
                    await client.send(host="open.test"),
                    await client.send(host="guarded.test"),
                    await client.send(host="guarded.test"),  # asked once, refused for good
                    await client.send(host="open.test"),
                ]
            finally:
                client.close()
    assert [r.status if r is not None else None for r in replies] == [200, 403, 403, 200]
    assert not guarded.connections


@async_test()
async def test_an_on_connect_target_is_for_its_own_route_only() -> None:
    port = free_port()
    with (
        http_backend("open") as open_backend,
        http_backend("hooked") as hooked,
        http_backend("chosen") as chosen,
    ):
        hook = ConnectHook({"target": {"host": LOOPBACK, "port": chosen.port}})
        routes = [
            http_route(port, open_backend.port, name="open", domains="open.test"),
            http_route(port, hooked.port, hook, name="hooked", domains="hooked.test"),
        ]
        async with SmartRoute(routes, bind_address=LOOPBACK):
            client = await Client.open(port)
            try:
                replies = [
                    await client.send(host="hooked.test"),
                    await client.send(host="open.test"),
                ]
            finally:
                client.close()
    assert [r.sent()["backend"] if r else None for r in replies] == ["chosen", "open"]


@async_test()
async def test_on_request_hooks_run_on_a_port_only_auto_forward() -> None:
    port = free_port()
    with http_backend() as backend:
        hook = RequestHook({"allow": False})
        route = http_route(port, backend.port, hook, protocol="auto")
        try:
            proxy = SmartRoute([route], bind_address=LOOPBACK)
        except ConfigError:
            return  # refusing such a route up front would do too
        async with proxy:
            reply = await get(port)
    assert reply.status == 403
    assert not backend.connections


# -- failing hooks ---------------------------------------------------------------------------

FAILURES: dict[str, tuple[dict[str, Any], str]] = {
    "raises": ({"raises": RuntimeError("hook bug")}, "raised RuntimeError: hook bug"),
    "times-out": ({"sleeps": 5.0}, "did not answer within 0.2s"),
    "unknown-key": ({"answer": {"alow": False}}, "unknown key 'alow'"),
}


@pytest.mark.parametrize("mode", ["closed", "open"])
@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("kind", HOOK_KINDS)
@async_test()
async def test_a_failing_http_hook_refuses_when_closed_and_is_skipped_when_open(
    kind: str, failure: str, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    behaviour, problem = FAILURES[failure]
    with http_backend() as backend:
        hook = HOOK_KINDS[kind](**behaviour)
        route = http_route(port, backend.port, hook, fail=mode)
        async with SmartRoute([route], bind_address=LOOPBACK, hook_timeout=0.2):
            reply = await get(port)
    if mode == "closed":
        assert (reply.status, reply.body) == (503, HOOK_FAILED)
        assert not backend.connections
    else:
        assert (reply.status, reply.sent()["path"]) == (200, "/")
    (line,) = hook_warnings(caplog)
    assert f"{type(hook).__name__}.{kind}" in line
    assert problem in line
    assert f"hooks_fail: {mode}" in line


@pytest.mark.parametrize("mode", ["closed", "open"])
@async_test()
async def test_a_failing_hook_on_a_raw_route_closes_it_when_closed(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    async with serve(named_handler("backend")) as target:
        hook = ConnectHook(raises=RuntimeError("hook bug"))
        async with SmartRoute([tcp_route(port, target, hook, fail=mode)], bind_address=LOOPBACK):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            try:
                if mode == "closed":
                    assert await asyncio.wait_for(reader.read(100), 5) == b""
                else:
                    assert await read_line(reader) == b"backend\n"
            finally:
                writer.close()
    (line,) = hook_warnings(caplog)
    assert "ConnectHook.on_connect (on_connect) raised RuntimeError: hook bug" in line
    assert f"hooks_fail: {mode}" in line


@async_test()
async def test_a_proxy_wide_hook_fails_as_each_route_says() -> None:
    closed_port, open_port = free_ports(2)
    wide = RequestHook(raises=RuntimeError("hook bug"))
    with http_backend() as backend:
        routes = [
            http_route(closed_port, backend.port, name="closed"),
            http_route(open_port, backend.port, name="open", fail="open"),
        ]
        async with SmartRoute(routes, bind_address=LOOPBACK, hooks=[wide]):
            assert (await get(closed_port)).status == 503
            assert (await get(open_port)).status == 200
    assert len(wide.calls) == 2


@async_test()
async def test_a_bad_verdict_skipped_under_open_has_no_effect() -> None:
    port = free_port()
    with http_backend() as backend:
        first = RequestHook({"set_headers": {"X-First": "1"}})
        typo = RequestHook({"allow": False, "stauts": 401})  # a bad verdict: skipped
        route = http_route(port, backend.port, first, typo, fail="open")
        async with SmartRoute([route], bind_address=LOOPBACK):
            reply = await get(port)
    assert reply.status == 200
    assert reply.sent_headers()["x-first"] == ["1"]


@async_test()
async def test_a_failing_hook_answers_503_whatever_an_earlier_hook_said() -> None:
    port = free_port()
    with http_backend() as backend:
        first = RequestHook({"status": 200, "headers": {"X-First": "1"}})  # no refusal
        failing = RequestHook(raises=RuntimeError("hook bug"))
        async with SmartRoute(
            [http_route(port, backend.port, first, failing)], bind_address=LOOPBACK
        ):
            reply = await get(port)
    assert (reply.status, reply.body) == (503, HOOK_FAILED)
    assert "x-first" not in reply.headers


@async_test()
async def test_a_proxy_whose_hook_raises_keeps_serving(caplog: pytest.LogCaptureFixture) -> None:
    http_port, raw_port = free_ports(2)

    raw_calls = 0

    def boom(ctx: RouteContext, *rest: Any) -> Answer:
        nonlocal raw_calls
        if ctx.path is None:  # a raw connection: every other one fails
            raw_calls += 1
            failing = raw_calls % 2 == 1
        else:
            failing = ctx.path == "/boom"
        if failing:
            raise RuntimeError("hook bug")
        return None

    with http_backend() as backend:
        async with serve(named_handler("raw")) as raw_target:
            routes = [
                http_route(http_port, backend.port, RequestHook(boom), name="http"),
                tcp_route(raw_port, raw_target, ConnectHook(boom), name="raw"),
            ]
            async with SmartRoute(routes, bind_address=LOOPBACK):
                replies = await asyncio.gather(
                    *(get(http_port, path) for path in ["/boom", "/ok"] * 10)
                )
                assert [r.status for r in replies] == [503, 200] * 10
                raws = await asyncio.gather(
                    *(exchange(raw_port, b"x\n", eof=True) for _ in range(10))
                )
                assert sorted(data for data, _ in raws) == [b""] * 5 + [b"raw\nx\n"] * 5
                assert (await get(http_port, "/ok")).status == 200  # still serving
    assert len(hook_warnings(caplog)) == 15


@pytest.mark.parametrize("kind", HOOK_KINDS)
@async_test()
async def test_a_hook_raising_cancelled_error_costs_its_connection_only(kind: str) -> None:
    port = free_port()
    with http_backend() as backend:
        hook = HOOK_KINDS[kind](raises=asyncio.CancelledError())
        route = http_route(port, backend.port, hook)
        async with SmartRoute([route], bind_address=LOOPBACK, graceful_shutdown_timeout=1):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            try:
                writer.write(request_bytes())
                raw, _ = await read_to_end(reader, timeout=3)  # answered or closed
            finally:
                writer.close()
    assert raw == b"" or raw.startswith(b"HTTP/1.1 503 ")


# -- on_response -------------------------------------------------------------------------------


@async_test()
async def test_on_response_changes_the_status_and_headers() -> None:
    port = free_port()
    with http_backend() as backend:
        hook = ResponseHook(
            lambda ctx, request, response: {
                "status": 299,
                "set_headers": {"X-Seen-Status": str(response.status), "X-Path": request.path},
                "remove_headers": ["Content-Type"],
            }
        )
        async with SmartRoute([http_route(port, backend.port, hook)], bind_address=LOOPBACK):
            reply = await get(port, "/some/where?q=1")
            chunked = await get(port, "/chunked")
    assert reply.status == 299
    assert reply.headers["x-seen-status"] == "200"
    assert reply.headers["x-path"] == "/some/where"
    assert "content-type" not in reply.headers
    assert reply.sent()["path"] == "/some/where?q=1"  # the body came whole
    assert int(reply.headers["content-length"]) == len(reply.body)
    assert chunked.status == 299
    assert chunked.headers["transfer-encoding"] == "chunked"  # the framing is the proxy's
    assert b"first " in chunked.body and chunked.body.endswith(b"0\r\n\r\n")
    _, _, response = hook.seen[0]
    assert isinstance(response, HookResponse)
    assert response.status == 200 and response.headers["content-type"] == "application/json"


@pytest.mark.parametrize("mode", ["closed", "open"])
@async_test()
async def test_on_response_cannot_turn_a_response_into_a_204(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    with http_backend() as backend:
        hook = ResponseHook({"status": 204})
        route = http_route(port, backend.port, hook, fail=mode)
        async with SmartRoute([route], bind_address=LOOPBACK):
            reply = await get(port)
    if mode == "closed":
        assert reply.status == 503  # the response is not passed on
    else:
        assert (reply.status, reply.sent()["path"]) == (200, "/")
    (line,) = hook_warnings(caplog)
    assert "may not turn a 200 into a 204" in line


@pytest.mark.parametrize("mode", ["closed", "open"])
@pytest.mark.parametrize("failure", FAILURES)
@async_test()
async def test_a_failing_on_response_hook_withholds_the_response_when_closed(
    failure: str, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    behaviour, problem = FAILURES[failure]
    with http_backend() as backend:
        hook = ResponseHook(**behaviour)
        route = http_route(port, backend.port, hook, fail=mode)
        async with SmartRoute([route], bind_address=LOOPBACK, hook_timeout=0.2):
            reply = await get(port)
            assert (await get(port)).status == reply.status  # and the proxy goes on
    if mode == "closed":
        assert reply.status >= 500
        assert b'"backend"' not in reply.body  # nothing of the backend's answer
    else:
        assert (reply.status, reply.sent()["path"]) == (200, "/")
    lines = hook_warnings(caplog)
    assert len(lines) == 2
    assert "ResponseHook.on_response" in lines[0] and problem in lines[0]
    assert f"hooks_fail: {mode}" in lines[0]


@async_test()
async def test_an_on_response_answer_that_is_not_for_it_is_a_bad_verdict(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    with http_backend() as backend:
        hook = ResponseHook({"allow": False})
        async with SmartRoute([http_route(port, backend.port, hook)], bind_address=LOOPBACK):
            reply = await get(port)
    assert reply.status >= 500
    (line,) = hook_warnings(caplog)
    assert "unknown key 'allow'" in line


@async_test()
async def test_a_failing_on_response_hook_answers_like_the_other_hooks() -> None:
    port = free_port()
    with http_backend() as backend:
        hook = ResponseHook(raises=RuntimeError("internal detail: db password is hunter2"))
        async with SmartRoute([http_route(port, backend.port, hook)], bind_address=LOOPBACK):
            reply = await get(port)
    assert reply.status == 503  # as for the other hooks
    assert b"hunter2" not in reply.body and b"RuntimeError" not in reply.body


# -- on_disconnect ---------------------------------------------------------------------------


@async_test()
async def test_on_disconnect_tells_once_what_a_raw_connection_carried() -> None:
    port = free_port()
    async with serve(named_handler("backend")) as target:
        ends = DisconnectHook()
        async with SmartRoute([tcp_route(port, target, ends)], bind_address=LOOPBACK):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            try:
                assert await read_line(reader) == b"backend\n"
                writer.write(b"ping pong\n")
                assert await read_line(reader) == b"ping pong\n"
                assert not ends.called.is_set()  # not before the connection ended
            finally:
                writer.close()
            info = await ends.first()
        # The proxy stopped: nothing else is left to call it again.
    assert len(ends.infos) == 1
    assert set(info) == {"bytes_in", "bytes_out", "duration", "target", "error"}
    assert info["bytes_in"] == len(b"ping pong\n")
    assert info["bytes_out"] == len(b"backend\nping pong\n")
    assert info["target"] == f"{LOOPBACK}:{target}"
    assert info["error"] is None
    assert 0 < info["duration"] < 10
    assert ends.contexts[0].route_name == "web"


@async_test()
async def test_on_disconnect_tells_once_what_an_http_connection_carried() -> None:
    port = free_port()
    with http_backend() as backend:
        ends = DisconnectHook()
        async with SmartRoute([http_route(port, backend.port, ends)], bind_address=LOOPBACK):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            sent = b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n" + request_bytes("/two")
            try:
                writer.write(sent)
                raw, _ = await read_to_end(reader)
            finally:
                writer.close()
            info = await ends.first()
    assert raw.count(b"HTTP/1.1 200 ") == 2
    assert len(ends.infos) == 1  # two requests, one connection
    assert info["bytes_in"] == len(sent)
    assert info["bytes_out"] == len(raw)
    assert info["target"] == f"{LOOPBACK}:{backend.port}"
    assert info["error"] is None
    assert 0 < info["duration"] < 10


@async_test()
async def test_on_disconnect_is_told_of_a_request_an_on_request_hook_refused() -> None:
    port = free_port()
    with http_backend() as backend:
        ends = DisconnectHook()
        refuse = RequestHook({"allow": False})
        async with SmartRoute(
            [http_route(port, backend.port, refuse, ends)], bind_address=LOOPBACK
        ):
            reply = await get(port)
            info = await ends.first()
    assert reply.status == 403
    assert info["bytes_out"] == len(reply.raw)
    assert info["error"] == "refused by a hook"
    assert info["target"] is None


@pytest.mark.parametrize("verdict", [{"allow": False}, {"drop": True}], ids=["refused", "dropped"])
@async_test()
async def test_on_disconnect_is_told_of_a_connection_an_on_connect_hook_refused(
    verdict: Answer,
) -> None:
    port = free_port()
    with http_backend() as backend:
        ends = DisconnectHook()
        hook = ConnectHook(verdict)
        async with SmartRoute([http_route(port, backend.port, hook, ends)], bind_address=LOOPBACK):
            await exchange(port, request_bytes())
            info = await ends.first(timeout=2)
    assert info["error"] is not None


@async_test()
async def test_proxy_wide_on_disconnect_hooks_see_every_route() -> None:
    http_port, raw_port = free_ports(2)
    ends = DisconnectHook()
    with http_backend() as backend:
        async with serve(named_handler("raw")) as raw_target:
            routes = [
                http_route(http_port, backend.port, name="http"),
                tcp_route(raw_port, raw_target, name="raw"),
            ]
            async with SmartRoute(routes, bind_address=LOOPBACK, hooks=[ends]):
                assert (await get(http_port)).status == 200
                data, _ = await exchange(raw_port, b"x\n", eof=True)
                assert data == b"raw\nx\n"
                await ends.calls(2)
    assert sorted(ctx.route_name or "" for ctx in ends.contexts) == ["http", "raw"]


# -- the fast lane ---------------------------------------------------------------------------


@async_test()
async def test_routes_without_hooks_stay_on_the_fast_lane(lane_only: list[int]) -> None:
    plain_http, hooked_http, plain_raw, hooked_raw = free_ports(4)
    with http_backend() as backend:
        async with serve(named_handler("raw")) as raw_target:
            seen_http, seen_raw = RequestHook(), ConnectHook()
            routes = [
                http_route(plain_http, backend.port, name="plain-http"),
                http_route(hooked_http, backend.port, seen_http, name="hooked-http"),
                tcp_route(plain_raw, raw_target, name="plain-raw"),
                tcp_route(hooked_raw, raw_target, seen_raw, name="hooked-raw"),
            ]
            async with SmartRoute(routes, bind_address=LOOPBACK):
                for port in (plain_http, hooked_http):
                    reply = await get(port)
                    assert (reply.status, reply.sent()["path"]) == (200, "/")
                for port in (plain_raw, hooked_raw):
                    data, _ = await exchange(port, b"x\n", eof=True)
                    assert data == b"raw\nx\n"
    assert sorted(lane_only) == sorted([hooked_http, hooked_raw])
    assert len(seen_http.calls) == len(seen_raw.calls) == 1


# -- TLS termination -------------------------------------------------------------------------


@async_test()
async def test_hooks_run_on_a_tls_terminating_route(ca: TestCA) -> None:
    port = free_port()
    pair = ca.issue("site.test")
    with http_backend() as backend:
        connect = ConnectHook()
        request = RequestHook({"set_headers": {"X-Tls": "yes"}})
        response = ResponseHook({"set_headers": {"X-Hooked": "yes"}})
        route = http_route(port, backend.port, connect, request, response, domains="site.test")
        certificate = {"cert": pair.cert_pem, "key": pair.key_pem}
        route["action"]["tls"] = {"mode": "terminate", "certificate": certificate}
        async with SmartRoute([route], bind_address=LOOPBACK):
            reader, writer = await asyncio.open_connection(
                LOOPBACK, port, ssl=ca.client_context(), server_hostname="site.test"
            )
            try:
                writer.write(request_bytes("/secure", host="site.test"))
                raw, _ = await read_to_end(reader)
            finally:
                writer.close()
    reply = parse_reply(raw)
    assert (reply.status, reply.headers["x-hooked"]) == (200, "yes")
    assert reply.sent_headers()["x-tls"] == ["yes"]
    (ctx,) = connect.seen[0]
    assert ctx.is_tls and ctx.domain == "site.test"
    ctx, _ = request.seen[0]
    assert ctx.is_tls and ctx.path == "/secure"
