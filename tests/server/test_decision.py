"""The one decision point: every connection is matched once, and every HTTP request once.

A spy counts ``RouteTable.match`` calls while real clients go through a real proxy: by port on
a route the fast lane cannot carry (a host-name target), by a ClientHello peeked at for such a
route, and HTTP requests on a kept-alive connection, whose first request the pipeline parsed
and routed before the session took it over.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from http_backend import http_backend
from support import FIXTURES, LOOPBACK, Finished, async_test, echo_handler, free_port, serve

from smartroute import SmartRoute
from smartroute.protocols import http as http_parser
from smartroute.routing.facts import ConnectionFacts, RouteMatch
from smartroute.routing.matcher import RouteTable
from smartroute.server import pipeline

HELLO = (FIXTURES / "clienthello" / "python.bin").read_bytes()


class Calls:
    def __init__(self) -> None:
        self.matches: list[ConnectionFacts] = []
        self.heads = 0


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[Calls]:
    seen = Calls()
    match = RouteTable.match

    def counted_match(self: RouteTable, facts: ConnectionFacts) -> RouteMatch | None:
        seen.matches.append(facts)
        return match(self, facts)

    parse = http_parser.parse_request_head

    def counted_parse(data: Any, max_size: int = http_parser.DEFAULT_MAX_HEAD_SIZE) -> Any:
        head = parse(data, max_size)
        if head is not None:
            seen.heads += 1
        return head

    monkeypatch.setattr(RouteTable, "match", counted_match)
    # The parser is looked up where it is called: by detection and by the sessions.
    monkeypatch.setattr("smartroute.protocols.detect.parse_request_head", counted_parse)
    monkeypatch.setattr("smartroute.server.http.session.parse_request_head", counted_parse)
    monkeypatch.setattr("smartroute.server.http.lane_session.parse_request_head", counted_parse)
    yield seen


def forward(port: int, target_port: int, **match: Any) -> dict[str, Any]:
    target = {"host": "localhost", "port": target_port}  # a name: not for the fast lane
    return {"match": {"ports": port, **match}, "action": {"type": "forward", "targets": [target]}}


@async_test()
async def test_a_port_only_connection_off_the_lane_is_matched_once(
    calls: Calls, finished: Finished
) -> None:
    async with serve(echo_handler) as backend:
        port = free_port()
        async with SmartRoute([forward(port, backend)], bind_address=LOOPBACK):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write(b"ping\n")
            assert await asyncio.wait_for(reader.readline(), 5) == b"ping\n"
            writer.close()
            assert (await finished.next()).outcome == "ok"
    assert len(calls.matches) == 1


@async_test()
async def test_a_connection_routed_by_a_peeked_hello_off_the_lane_is_matched_once(
    calls: Calls, finished: Finished
) -> None:
    async with serve(echo_handler) as backend:
        port = free_port()
        route = forward(port, backend, domains="*.example.test")
        route["action"]["tls"] = {"mode": "passthrough"}
        async with SmartRoute([route], bind_address=LOOPBACK):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write(HELLO)  # relayed whole, then echoed: the backend got every byte
            echoed = await asyncio.wait_for(reader.readexactly(len(HELLO)), 5)
            assert echoed == HELLO
            writer.close()
            record = await finished.next()
    assert record.domain == "python.example.test" and record.route == "route-0"
    assert len(calls.matches) == 1 and calls.matches[0].domain == "python.example.test"


@pytest.mark.parametrize("host", [LOOPBACK, "localhost"], ids=["on-the-lane", "on-a-transport"])
@async_test()
async def test_each_http_request_is_parsed_and_matched_once(calls: Calls, host: str) -> None:
    with http_backend("b") as backend:
        port = free_port()
        route = {
            "match": {"ports": port, "domains": "site.test"},  # the accept step peeks
            "action": {"type": "forward", "targets": [{"host": host, "port": backend.port}]},
        }
        async with SmartRoute([route], bind_address=LOOPBACK):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            for path in ("/one", "/two", "/three"):
                writer.write(f"GET {path} HTTP/1.1\r\nHost: site.test\r\n\r\n".encode())
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200")
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                await asyncio.wait_for(reader.readexactly(length), 5)
            writer.close()
    assert [facts.path for facts in calls.matches] == ["/one", "/two", "/three"]
    assert calls.heads == 3


def test_the_pipeline_builds_no_facts_of_its_own() -> None:
    # Facts come from smartroute.server.decision only (hello, first bytes, request head).
    assert "ConnectionFacts(" not in Path(pipeline.__file__).read_text()
