"""The proxy's backends book: groups by route action, target states shared by ``host:port``,
one health checker per target and check, and what it reports."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from support import LOOPBACK, async_test, echo_handler, free_port, free_ports, serve

from smartroute.routing.model import CompiledRoute
from smartroute.routing.validation import validate_route
from smartroute.server.backends.book import Backends
from smartroute.server.backends.group import TargetGroup

CHECK = {"type": "tcp", "interval": 60, "timeout": 1}  # one probe in a test's time at most
CLIENT = "192.0.2.10"


def route(index: int, *targets: dict[str, Any], **action: Any) -> CompiledRoute:
    """A forward route (the ``index``-th) to ``targets``, with more action settings."""
    return validate_route(
        {
            "match": {"ports": 8000 + index},
            "action": {"type": "forward", "targets": list(targets), **action},
        },
        index,
    )


def target(port: Any, host: Any = LOOPBACK, **options: Any) -> dict[str, Any]:
    return {"host": host, "port": port, **options}


def fixed(book: Backends, of: CompiledRoute) -> TargetGroup:
    group = book.group(of, 0)
    assert group is not None
    return group


async def until(condition: Callable[[], bool], timeout: float = 5) -> None:
    """Wait, bounded, for what a task of the book's does next."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


# -- groups ------------------------------------------------------------------------------------


def test_each_forward_action_gets_one_group_kept_while_the_action_is_the_same() -> None:
    first, second = free_ports(2)
    a = route(0, target(first), target(second, weight=2))
    b = route(1, target(first), load_balancing="first")
    blocked = validate_route({"match": {"ports": 8009}, "action": {"type": "block"}}, 2)
    book = Backends()
    gates = book.prepare([a, b, blocked])
    group_a, group_b = fixed(book, a), fixed(book, b)
    assert gates == {id(a.action): group_a, id(b.action): group_b}
    assert [(m.port, m.weight) for m in group_a.members] == [(first, 1), (second, 2)]
    assert group_b.strategy == "first"
    assert book.group(a, 4321) is group_a  # a fixed group serves every port
    assert book.group(blocked, 0) is None
    book.prepare([a, b])
    assert fixed(book, a) is group_a
    again = route(0, target(first), target(second, weight=2))  # equal, but another action
    book.prepare([again, b])
    assert fixed(book, again) is not group_a and fixed(book, a) is group_a
    book.retain([again, b])
    assert book.group(a, 0) is None and fixed(book, b) is group_b
    assert all(group_a not in m.state.groups for m in group_a.members)


def test_targets_are_shared_by_host_and_port_across_routes() -> None:
    port = free_port()
    a = route(0, target(port))
    b = route(1, target(port, weight=3), target(free_port()))
    book = Backends()
    book.prepare([a, b])
    (in_a,), (in_b, _) = fixed(book, a).members, fixed(book, b).members
    assert in_a is not in_b and (in_a.weight, in_b.weight) == (1, 3)
    assert in_a.state is in_b.state
    assert in_a.state.groups == [fixed(book, a), fixed(book, b)]
    in_a.state.failed("Connection refused", None)
    assert book.report()[f"{LOOPBACK}:{port}"]["fails"] == 1


def test_preserved_ports_get_a_group_per_port() -> None:
    port = free_port()
    preserving = route(0, target("preserve"), target(port))
    plain = route(1, target(port))
    book = Backends()
    assert book.prepare([preserving, plain]) == {id(plain.action): fixed(book, plain)}
    at_8080 = book.group(preserving, 8080)
    assert at_8080 is not None and book.group(preserving, 8080) is at_8080
    at_8081 = book.group(preserving, 8081)
    assert at_8081 is not None and at_8081 is not at_8080
    assert [m.port for m in at_8080.members] == [8080, port]
    assert [m.port for m in at_8081.members] == [8081, port]
    (listed,) = fixed(book, plain).members
    assert at_8080.members[1].state is at_8081.members[1].state is listed.state
    assert set(book.report()) == {f"{LOOPBACK}:{p}" for p in (8080, 8081, port)}


def test_targets_given_by_callables_get_no_group() -> None:
    port = free_port()
    by_host = route(0, target(port, host=lambda ctx: LOOPBACK))
    by_port = route(1, target(lambda ctx: port))
    book = Backends()
    assert book.prepare([by_host, by_port]) == {}
    assert book.group(by_host, 80) is None and book.group(by_port, 80) is None
    assert book.report() == {}


def test_retain_drops_removed_routes_and_the_targets_only_they_listed() -> None:
    kept_port, dropped_port = free_ports(2)
    kept = route(0, target(kept_port))
    dropped = route(1, target(kept_port), target(dropped_port))
    preserving = route(2, target("preserve"))
    book = Backends()
    book.prepare([kept, dropped, preserving])
    assert book.group(preserving, 9000) is not None
    assert len(book.report()) == 3
    book.retain([kept])
    assert book.group(dropped, 0) is None and book.group(preserving, 9000) is None
    assert list(book.report()) == [f"{LOOPBACK}:{kept_port}"]
    assert fixed(book, kept).members[0].state.groups == [fixed(book, kept)]


def test_a_busy_target_stays_known_until_its_connections_end() -> None:
    port = free_port()
    listing = route(0, target(port))
    book = Backends()
    book.prepare([listing])
    fixed(book, listing).members[0].state.active = 1
    book.retain([])
    assert list(book.report()) == [f"{LOOPBACK}:{port}"]


def test_report_names_ipv4_and_ipv6_targets() -> None:
    port = free_port()
    both = route(0, target(port, host=[LOOPBACK, "::1"]))
    book = Backends()
    book.prepare([both])
    report = book.report()
    assert list(report) == [f"{LOOPBACK}:{port}", f"[::1]:{port}"]
    assert report[f"[::1]:{port}"] == {"up": True, "active": 0, "fails": 0, "last_error": None}


# -- groups going down ----------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["round-robin", "random", "least-connections", "ip-hash"])
@async_test()
async def test_a_group_sharing_a_target_taken_out_elsewhere_offers_nothing(strategy: str) -> None:
    port = free_port()
    guarded = route(0, target(port), passive_health={"max_fails": 1, "fail_timeout": 30})
    preserving = route(1, target("preserve"), load_balancing=strategy)
    book = Backends()
    book.prepare([guarded, preserving])
    per_port = book.group(preserving, port)
    assert per_port is not None
    group = fixed(book, guarded)
    group.members[0].state.failed("Connection refused", group.passive)
    assert book.down == {id(guarded.action): group}
    assert not per_port.up and per_port.order(CLIENT) == ()
    assert book.group(preserving, port + 1) is not None
    await book.close()


@async_test()
async def test_a_target_out_when_the_proxy_stopped_returns_once_it_runs_again() -> None:
    port = free_port()
    guarded = route(0, target(port), passive_health={"max_fails": 1, "fail_timeout": 0.1})
    book = Backends()
    book.prepare([guarded])
    book.start()
    group = fixed(book, guarded)
    group.members[0].state.failed("Connection refused", group.passive)
    assert book.down == {id(guarded.action): group}
    await book.close()
    book.start()
    await until(lambda: not book.down)
    assert group.up
    await book.close()


# -- health checkers -------------------------------------------------------------------------


@async_test()
async def test_one_checker_per_target_and_check_however_many_routes_share_it() -> None:
    before = asyncio.all_tasks()
    first, second = free_ports(2)
    a = route(0, target(first), target(second), health_check=CHECK)
    b = route(1, target(first), health_check=dict(CHECK))
    c = route(2, target(first), health_check={**CHECK, "fall": 1})
    unchecked = route(3, target(second))
    book = Backends()
    book.prepare([a, b, c, unchecked])
    book.retain([a, b, c, unchecked])
    assert book.checkers() == []  # not before the proxy runs
    book.start()
    checkers = book.checkers()
    assert {(k.state.port, k.spec.fall) for k in checkers} == {(first, 1), (first, 3), (second, 3)}
    assert len(checkers) == 3
    state_first, state_second = (m.state for m in fixed(book, a).members)
    assert len(state_first.checks) == 2 and len(state_second.checks) == 1
    book.prepare([b, c, unchecked])
    book.retain([b, c, unchecked])  # a's checks of ``first`` live on in b's and c's
    assert {(k.state.port, k.spec.fall) for k in book.checkers()} == {(first, 1), (first, 3)}
    await until(lambda: not state_second.checks)
    book.retain([c])
    assert [(k.state.port, k.spec.fall) for k in book.checkers()] == [(first, 1)]
    await until(lambda: len(state_first.checks) == 1)
    await book.close()
    assert book.checkers() == [] and state_first.checks == {}
    assert asyncio.all_tasks() == before


@async_test()
async def test_checks_stop_with_the_last_route_even_when_closed_at_once() -> None:
    before = asyncio.all_tasks()
    checked = route(0, target(free_port()), health_check=CHECK)
    book = Backends()
    book.prepare([checked])
    book.start()
    (checker,) = book.checkers()
    book.retain([])
    await book.close()  # also waits for the checker the retain stopped
    assert checker.state.checks == {}
    assert asyncio.all_tasks() == before


@async_test()
async def test_a_target_that_starts_down_takes_traffic_once_its_check_passes() -> None:
    async with serve(echo_handler) as port:
        check = {"type": "tcp", "interval": 0.05, "timeout": 0.05, "rise": 1}
        waiting = route(0, target(port, initial="down"), health_check=check)
        book = Backends()
        book.prepare([waiting])
        book.retain([waiting])
        group = fixed(book, waiting)
        assert group.up  # nothing checks it before the proxy runs
        book.start()
        assert not group.up and book.down == {id(waiting.action): group}
        await until(lambda: group.up)
        assert book.down == {} and group.order(CLIENT) == group.members
        await book.close()


@async_test()
async def test_the_checks_of_a_re_encrypting_route_speak_its_tls() -> None:
    port = free_port()
    plain = route(0, target(port), health_check=CHECK)
    tls = {"mode": "terminate-and-reencrypt", "certificate": "auto", "backend_verify": False}
    reencrypting = validate_route(
        {
            "match": {"ports": 8443},
            "action": {
                "type": "forward",
                "targets": [target(port)],
                "health_check": CHECK,
                "tls": tls,
            },
        },
        1,
    )
    book = Backends()
    book.prepare([plain, reencrypting])
    book.start()
    by_tls = {checker.tls is not None: checker for checker in book.checkers()}
    assert set(by_tls) == {False, True}  # the same target and check, spoken two ways
    assert by_tls[True].tls == reencrypting.tls
    await book.close()
