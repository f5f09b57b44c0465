"""How the route matcher's cost grows with the number of routes (it should not).

Builds route tables of 10, 100, 1,000 and 10,000 routes: mostly exact domains (on ports 443
and 80), one wildcard in 20 (443 and 8443), two domain-less client-IP routes with a higher
priority (443; the measured client never matches them, so every match that reaches the
domain-less bucket checks them) and one domain-less fallback per port (443, 80, 8443, 8080).
Times ``RouteTable.match`` on port 443 for four kinds of connection, and the construction.

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
from collections.abc import Sequence

from smartroute.routing.matcher import ConnectionFacts, RouteTable
from smartroute.routing.model import CompiledRoute, ForwardAction, MatchCriteria, TargetSpec
from smartroute.routing.patterns import compile_domain, compile_ip_rule, parse_ip

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

    routes = {size: build_routes(size)[0] for size in SIZES}
    tables = {size: RouteTable(routes[size]) for size in SIZES}
    cases = {size: connections(size) for size in SIZES}
    for size in SIZES:  # check that every case is what it says before timing it
        for case, (facts, winner) in cases[size].items():
            for item in facts:
                found = tables[size].match(item)
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
                        spent[size] += time_matches(tables[size], batches[case, size])
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
