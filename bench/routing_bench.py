"""How the route matcher's cost grows with the number of routes (it should not).

Builds route tables of 10, 100, 1,000 and 10,000 routes, three kinds:

- domains: mostly exact domains (on ports 443 and 80), one wildcard in 20 (443 and 8443), two
  domain-less client-IP routes with a higher priority (443; the measured client never matches
  them, so every match that reaches the domain-less bucket checks them) and one domain-less
  fallback per port (443, 80, 8443, 8080);
- paths: every route under one domain, ``api.example.com``: a third exact paths
  (``/svc{i}/health``), a third globs (``/svc{i}/*``), a third params
  (``/svc{i}/users/:id``), and a catch-all for the domain;
- headers: every route under that domain with one exact header value (``x-tenant: t{i}``),
  and the catch-all.

Times ``RouteTable.match`` on port 443 for each kind's connections, and the construction.

    python bench/routing_bench.py [--loops N] [--repeat N]

Each figure is the median of ``--repeat`` runs of ``--loops`` calls, in microseconds per call
(the Python loop around the call included; it is the same for every size). Within a run the
sizes take turns in chunks of 1,000 calls, so that other load on the machine falls on all of
them alike; the garbage collector is off while timing. Construction is timed once per run.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence

from smartroute.routing.facts import ConnectionFacts
from smartroute.routing.matcher import RouteTable
from smartroute.routing.model import CompiledRoute, ForwardAction, MatchCriteria, TargetSpec
from smartroute.routing.patterns import (
    compile_domain,
    compile_header_rule,
    compile_ip_rule,
    compile_path,
    parse_ip,
)

SIZES = (10, 100, 1_000, 10_000)
PORTS = (443, 80, 8443, 8080)
FALLBACKS = len(PORTS)  # one domain-less route per port
IP_ROUTES = 2  # domain-less, client_ip, higher priority: checked (and missed) before fallbacks
PORT = 443  # every measured connection arrives here
CLIENT = parse_ip("192.0.2.10")  # matches no client_ip route
CHUNK = 1_000  # match calls timed in one go
ACTION = ForwardAction((TargetSpec(("10.0.0.5",), 8080),))


def _route(index: int, name: str, criteria: MatchCriteria, priority: int = 0) -> CompiledRoute:
    return CompiledRoute(name=name, match=criteria, action=ACTION, index=index, priority=priority)


def exact_domain(i: int) -> str:
    return f"svc{i}.tenant{i % 97}.example.com"


def wildcard_suffix(i: int) -> str:
    return f"zone{i}.example.net"


def build_routes(size: int) -> tuple[list[CompiledRoute], int, int]:
    """``size`` routes; returns them with the number of exact and wildcard routes."""
    wildcards = max(1, size // 20)
    exacts = size - wildcards - IP_ROUTES - FALLBACKS
    routes: list[CompiledRoute] = []
    for i in range(exacts):
        criteria = MatchCriteria(
            ports=frozenset({PORTS[i % 2]}),  # 443 and 80
            domains=(compile_domain(exact_domain(i)),),
        )
        routes.append(_route(len(routes), f"exact-{i}", criteria))
    for i in range(wildcards):
        criteria = MatchCriteria(
            ports=frozenset({PORT, 8443}),
            domains=(compile_domain("*." + wildcard_suffix(i)),),
        )
        routes.append(_route(len(routes), f"wild-{i}", criteria))
    for i in range(IP_ROUTES):
        criteria = MatchCriteria(
            ports=frozenset({PORT}), client_ip=(compile_ip_rule(f"10.{i}.0.0/16"),)
        )
        routes.append(_route(len(routes), f"ip-{i}", criteria, priority=1))
    for port in PORTS:
        routes.append(_route(len(routes), f"fallback-{port}", MatchCriteria(frozenset({port}))))
    assert len(routes) == size
    return routes, exacts, wildcards


API = compile_domain("api.example.com")


def build_path_routes(size: int) -> list[CompiledRoute]:
    """``size`` routes under one domain: exact, glob and params paths, then a catch-all."""
    routes: list[CompiledRoute] = []
    shapes = ("/svc{}/health", "/svc{}/*", "/svc{}/users/:id")
    for i in range(size - 1):
        path = compile_path(shapes[i % 3].format(i // 3))
        criteria = MatchCriteria(ports=frozenset({PORT}), domains=(API,), path=path)
        routes.append(_route(len(routes), f"path-{i}", criteria))
    routes.append(_route(len(routes), "api-all", MatchCriteria(frozenset({PORT}), (API,))))
    return routes


def build_header_routes(size: int) -> list[CompiledRoute]:
    """``size`` routes under one domain, each for one tenant header value, then a catch-all."""
    routes: list[CompiledRoute] = []
    for i in range(size - 1):
        rule = compile_header_rule("x-tenant", f"t{i}")
        criteria = MatchCriteria(ports=frozenset({PORT}), domains=(API,), headers=(rule,))
        routes.append(_route(len(routes), f"tenant-{i}", criteria))
    routes.append(_route(len(routes), "api-all", MatchCriteria(frozenset({PORT}), (API,))))
    return routes


def path_connections(size: int) -> dict[str, tuple[list[ConnectionFacts], str]]:
    """Requests spread over the path routes of a table of ``size``, and misses."""
    groups = (size - 1) // 3

    def request(path: str, headers: dict[str, str] | None = None) -> ConnectionFacts:
        return ConnectionFacts(PORT, CLIENT, "api.example.com", path=path, headers=headers)

    picks = [k * groups // 64 for k in range(64)]
    return {
        "path exact hit": ([request(f"/svc{i}/health") for i in picks], "path-"),
        "path glob hit": ([request(f"/svc{i}/static/app.js") for i in picks], "path-"),
        "path params hit": ([request(f"/svc{i}/users/{i}") for i in picks], "path-"),
        "path miss": ([request(f"/other/{k}/x") for k in range(64)], "api-all"),
    }


def header_connections(size: int) -> dict[str, tuple[list[ConnectionFacts], str]]:
    """Requests with a tenant header of the table, and with an unknown one."""
    picks = [k * (size - 1) // 64 for k in range(64)]

    def request(tenant: str) -> ConnectionFacts:
        headers = {"host": "api.example.com", "accept": "*/*", "x-tenant": tenant}
        return ConnectionFacts(PORT, CLIENT, "api.example.com", path="/", headers=headers)

    return {
        "header hit": ([request(f"t{i}") for i in picks], "tenant-"),
        "header miss": ([request(f"unknown{k}") for k in range(64)], "api-all"),
    }


def connections(size: int) -> dict[str, tuple[list[ConnectionFacts], str]]:
    """Per case: 64 connections spread over the table, and the prefix of the winner's name.

    Every size gets 64 distinct objects (domains repeat in small tables), so that the
    sizes differ only by the table.
    """
    _, exacts, wildcards = build_routes(size)
    on_port = [i for i in range(exacts) if PORTS[i % 2] == PORT]
    picks = [on_port[k * len(on_port) // 64] for k in range(64)]
    wild = [k * wildcards // 64 for k in range(64)]

    def facts(domain: str | None) -> ConnectionFacts:
        return ConnectionFacts(PORT, CLIENT, domain, is_tls=True)

    return {
        "exact hit": ([facts(exact_domain(i)) for i in picks], "exact-"),
        "wildcard hit": ([facts(f"www.{wildcard_suffix(i)}") for i in wild], "wild-"),
        "miss -> fallback": ([facts(f"host{k}.example.org") for k in range(64)], "fallback-"),
        "no domain": ([facts(None) for _ in range(64)], "fallback-"),
    }


def time_matches(table: RouteTable, batch: Sequence[ConnectionFacts]) -> float:
    """Seconds for one ``match`` call per item of ``batch``."""
    match = table.match
    start = time.perf_counter()
    for item in batch:
        match(item)
    return time.perf_counter() - start


def time_build(routes: Sequence[CompiledRoute]) -> float:
    """Milliseconds to build one table."""
    start = time.perf_counter()
    RouteTable(routes)
    return (time.perf_counter() - start) * 1e3


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time RouteTable.match at 10 to 10,000 routes.")
    parser.add_argument("--loops", type=int, default=50_000, help="match calls per run")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure (median)")
    args = parser.parse_args(argv)

    Builder = Callable[[int], list[CompiledRoute]]
    Requests = Callable[[int], dict[str, tuple[list[ConnectionFacts], str]]]
    kinds: dict[str, tuple[Builder, Requests]] = {
        "domains": (lambda size: build_routes(size)[0], connections),
        "paths": (build_path_routes, path_connections),
        "headers": (build_header_routes, header_connections),
    }
    routes: dict[int, list[CompiledRoute]] = {}
    tables: dict[tuple[str, int], RouteTable] = {}
    cases: dict[int, dict[str, tuple[list[ConnectionFacts], str]]] = {s: {} for s in SIZES}
    table_of: dict[str, str] = {}  # case -> the kind of table it runs against
    for kind, (build, requests) in kinds.items():
        for size in SIZES:
            built = build(size)
            if kind == "domains":
                routes[size] = built
            tables[kind, size] = RouteTable(built)
            for case, batch in requests(size).items():
                cases[size][case] = batch
                table_of[case] = kind
    for size in SIZES:  # check that every case is what it says before timing it
        for case, (facts, winner) in cases[size].items():
            for item in facts:
                found = tables[table_of[case], size].match(item)
                assert found is not None and found.route.name.startswith(winner), (size, case)

    names = list(cases[SIZES[0]])
    match_runs: dict[tuple[str, int], list[float]] = {}
    build_runs: dict[int, list[float]] = {size: [] for size in SIZES}
    # One run of a case is ``loops`` calls per size, timed in chunks of CHUNK calls that
    # alternate between the sizes: load from other processes, which comes and goes over
    # milliseconds to seconds, then falls on every size alike instead of on whichever size
    # happened to be running.
    chunks = max(1, args.loops // CHUNK)
    batches = {
        (case, size): [facts[i % len(facts)] for i in range(CHUNK)]
        for size in SIZES
        for case, (facts, _) in cases[size].items()
    }
    gc.disable()
    try:
        for run in range(args.repeat):
            order = SIZES if run % 2 == 0 else SIZES[::-1]
            for size in order:
                build_runs[size].append(time_build(routes[size]))
            for case in names:
                spent = dict.fromkeys(SIZES, 0.0)
                for chunk in range(chunks):
                    for size in order if chunk % 2 == 0 else order[::-1]:
                        table = tables[table_of[case], size]
                        spent[size] += time_matches(table, batches[case, size])
                for size in SIZES:
                    calls = chunks * CHUNK
                    match_runs.setdefault((case, size), []).append(spent[size] / calls * 1e6)
    finally:
        gc.enable()

    print(
        f"nproc {os.cpu_count()}, Python {platform.python_version()} "
        f"({platform.python_implementation()}), {platform.machine()} {platform.system()}"
    )
    calls = max(1, args.loops // CHUNK) * CHUNK
    print(f"median of {args.repeat} runs x {calls} calls, microseconds per match call\n")
    header = "".join(f"{size:>10,}" for size in SIZES)
    print(f"{'case':<18}{header}{'10,000/10':>12}{'(best runs)':>12}")
    # Build times are of the domains tables.
    for case in names:
        medians = [statistics.median(match_runs[case, size]) for size in SIZES]
        ratio = medians[-1] / medians[0]
        # The ratio of the fastest runs too: less sensitive to other load on the machine.
        best = min(match_runs[case, SIZES[-1]]) / min(match_runs[case, SIZES[0]])
        cells = "".join(f"{m:>10.3f}" for m in medians)
        print(f"{case:<18}{cells}{ratio:>12.2f}{best:>12.2f}")
    builds = [statistics.median(build_runs[size]) for size in SIZES]
    print(f"{'build (ms)':<18}{''.join(f'{b:>10.3f}' for b in builds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
