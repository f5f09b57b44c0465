"""The micro part of bench/balance_bench.py: choosing targets and matching, no sockets.

- ``TargetGroup.order()`` per call for every strategy with 2, 4 and 16 targets (weights 1;
  for round-robin and random also mixed weights 1-4, and one heavy target of weight 256 among
  weights 1), with every target up, with one primary down (the first, the heavy one), and
  with every primary down so that a backup serves; against the per-request cost before the
  strategies (an ``itertools.count`` rotation of a tuple).
- ``RouteTable.match`` with and without gates (a route's target group, which takes the route
  out of matching while none of its targets is up), and optionally the matcher of a git
  revision before the feature.

Timeit-style (:func:`time_cases`); each function returns Markdown lines.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import re
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from routing_bench import CLIENT, build_routes, connections

from smartroute.routing.facts import ConnectionFacts
from smartroute.routing.matcher import RouteTable
from smartroute.routing.model import ForwardAction, HealthCheck, TargetSpec
from smartroute.server.backends.book import Backends
from smartroute.server.backends.group import Member, TargetGroup

REPO = Path(__file__).resolve().parent.parent

SIZES = (2, 4, 16)
# Weights by name: every target 1; 1-4 repeated; the first target 256 (the most allowed), the
# others 1 (the one taken down in "1 primary down" is that heavy first target).
WEIGHTS = {"1": (1,), "1-4": (1, 2, 3, 4), "256, 1...": (256,) + (1,) * 15}
CLIENTS = [f"198.51.{i // 8}.{i % 8 + 10}" for i in range(64)]  # distinct client IPs
VARIANTS = (  # (strategy, weights)
    ("round-robin", "1"),
    ("round-robin", "1-4"),
    ("round-robin", "256, 1..."),
    ("random", "1"),
    ("random", "1-4"),
    ("random", "256, 1..."),
    ("least-connections", "1"),
    ("ip-hash", "1"),
    ("first", "1"),
)
STATES = ("all up", "1 primary down", "primaries down, backup serves")
BASELINE = "before: rotation of a tuple (itertools.count)"

Order = Callable[[str], object]


def make_group(strategy: str, size: int, weights: str, backups: int = 0) -> TargetGroup:
    cycle = WEIGHTS[weights]
    members = [Member(f"10.0.0.{i + 1}", 8080, weight=cycle[i % len(cycle)]) for i in range(size)]
    members += [Member(f"10.0.1.{i + 1}", 8080, backup=True) for i in range(backups)]
    for i, member in enumerate(members):
        member.state.active = (i * 7) % 5  # unequal loads for least-connections to compare
    return TargetGroup(members, strategy)  # type: ignore[arg-type]


def take_down(group: TargetGroup, members: Sequence[Member]) -> None:
    """Mark members down as a failed health check would (without the log line)."""
    for member in members:
        member.state.up = False
    group.target_changed()


def rotation(size: int) -> Order:
    """The per-request cost before the strategies: a shared counter and two tuple slices."""
    members = tuple(Member(f"10.0.0.{i + 1}", 8080) for i in range(size))
    counter = itertools.count()

    def order(client: str) -> tuple[Member, ...]:
        start = next(counter) % len(members)
        return members[start:] + members[:start]

    return order


def strategy_case(strategy: str, weights: str, state: str, size: int) -> Order:
    """``group.order`` of one case, checked to give what the state says."""
    backups = 1 if state == STATES[2] else 0
    group = make_group(strategy, size, weights, backups)
    primaries = group.members[:size]
    if state == STATES[1]:
        take_down(group, primaries[:1])
    elif state == STATES[2]:
        take_down(group, primaries)
    got = group.order(CLIENTS[0])
    assert isinstance(got, tuple)
    if state == STATES[0]:
        assert len(got) == size and not got[0].backup, (strategy, size, state)
    elif state == STATES[1]:
        assert len(got) == size - 1 and primaries[0] not in got, (strategy, size, state)
    else:
        assert len(got) == 1 and got[0].backup, (strategy, size, state)
    return group.order


def _noop(client: str) -> None:
    return None


def time_cases(
    cases: dict[str, tuple[Order, list[Any]]], repeat: int, budget: float
) -> dict[str, float]:
    """Median ns per call of each case. Each case gets about ``budget`` seconds per repeat
    (its call count fixed once, from a short calibration); the cases take turns, in a
    rotated order from one repeat to the next; the garbage collector is off."""
    counts: dict[str, int] = {}
    for name, (call, args) in cases.items():
        start = time.perf_counter()
        for arg in args[:200]:
            call(arg)
        per_call = (time.perf_counter() - start) / 200
        counts[name] = max(200, min(100_000, int(budget / max(per_call, 1e-9))))
    batches = {
        name: (call, (args * (counts[name] // len(args) + 1))[: counts[name]])
        for name, (call, args) in cases.items()
    }
    runs: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    gc.disable()
    try:
        for run in range(repeat):
            shift = run * 7 % len(names)
            for name in names[shift:] + names[:shift]:
                call, batch = batches[name]
                start = time.perf_counter()
                for arg in batch:
                    call(arg)
                runs[name].append((time.perf_counter() - start) / len(batch) * 1e9)
    finally:
        gc.enable()
    return {name: statistics.median(values) for name, values in runs.items()}


def _ns(value: float) -> str:
    return f"{value:,.0f}" if value < 10_000 else f"{value / 1e3:,.1f} µs"


def order_micro(repeat: int, budget: float) -> list[str]:
    cases: dict[str, tuple[Order, list[Any]]] = {"noop": (_noop, CLIENTS)}
    for size in (1, *SIZES):
        cases[f"base {size}"] = (rotation(size), CLIENTS)
    cases["rr 1"] = (make_group("round-robin", 1, "1").order, CLIENTS)
    for size in SIZES:
        cases[f"backup-up {size}"] = (make_group("round-robin", size, "1", 1).order, CLIENTS)
        for strategy, weights in VARIANTS:
            for state in STATES:
                call = strategy_case(strategy, weights, state, size)
                cases[f"{strategy} {weights} {state} {size}"] = (call, CLIENTS)
    ns = time_cases(cases, repeat, budget)

    def row(label: str, weights: str, state: str, key: str) -> str:
        cells = []
        for size in SIZES:
            value = ns[f"{key} {size}"]
            ratio = value / ns[f"base {size}"]
            cells.append(f"{_ns(value)} ({ratio:.1f}x)" if key != "base" else _ns(value))
        return f"| {label} | {weights} | {state} | " + " | ".join(cells) + " |"

    lines = [
        "`TargetGroup.order(client_ip)` per call, ns (ratio to the rotation before the "
        "strategies, same number of targets); the loop around the call is included: a call "
        f"to a function that returns at once costs {ns['noop']:.0f} ns here.",
        "",
        "| strategy | weights | targets | 2 | 4 | 16 |",
        "|---|---|---|--:|--:|--:|",
        row(BASELINE, "—", "—", "base"),
    ]
    for strategy, weights in VARIANTS:
        for state in STATES:
            key = f"{strategy} {weights} {state}"
            lines.append(row(strategy, weights, state, key))
        if (strategy, weights) == VARIANTS[0]:
            lines.append(row(strategy, "1", "all up, + 1 backup", "backup-up"))
    one, rr_one = ns["base 1"], ns["rr 1"]
    lines += [
        "",
        f"One target (no balancing in use): rotation before {one:.0f} ns, round-robin group "
        f"{rr_one:.0f} ns per call ({rr_one / one:.2f}x).",
    ]
    return lines


def _forward(index: int) -> ForwardAction:
    """A forward action of its own per route (a gate is per action), with health settings."""
    targets = tuple(TargetSpec((f"10.0.{index % 250}.{i}",), 8080) for i in (1, 2, 3))
    return ForwardAction(targets, health_check=HealthCheck("http", 5.0, 2.0, path="/ok"))


def load_matcher(rev: str) -> types.ModuleType:
    """``smartroute/routing/matcher.py`` as it was at git revision ``rev``."""
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{rev}:smartroute/routing/matcher.py"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    name = "matcher_at_" + re.sub(r"\W", "_", rev)
    module = types.ModuleType(name)
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:smartroute/routing/matcher.py", "exec"), module.__dict__)
    return module


def matcher_micro(repeat: int, budget: float, rev: str | None) -> list[str]:
    routes, _, _ = build_routes(100)
    # Port 8443 keeps its wildcard routes but loses its fallback: a name under none of them
    # matches no route at all.
    routes = [r for r in routes if r.name != "fallback-8443"]
    routes = [dataclasses.replace(r, action=_forward(i)) for i, r in enumerate(routes)]
    gates = Backends().prepare(routes)
    assert len(gates) == len(routes)
    tables: dict[str, Any] = {"no gates": RouteTable(routes), "gates": RouteTable(routes, gates)}
    if rev is not None:
        tables[f"before ({rev})"] = load_matcher(rev).RouteTable(routes)
    batches = {case: facts for case, (facts, _) in connections(100).items()}
    batches["no route matches"] = [
        ConnectionFacts(8443, CLIENT, f"host{k}.example.org", is_tls=True) for k in range(64)
    ]
    cases: dict[str, tuple[Order, list[Any]]] = {}
    for case, facts in batches.items():
        winners = {name: [t.match(f) for f in facts] for name, t in tables.items()}
        reference = [w and w.route.name for w in winners["no gates"]]
        for found in winners.values():
            assert [w and w.route.name for w in found] == reference, case
        for name, table in tables.items():
            cases[f"{name}|{case}"] = (table.match, facts)
    ns = time_cases(cases, repeat, budget)
    names = list(tables)
    header = "| case | " + " | ".join(f"{n}, ns" for n in names) + " | gates / no gates |"
    if rev is not None:
        header += " gates / before |"
    lines = [
        "`RouteTable.match` on 99 forward routes (bench/routing_bench.py's 100-route domains "
        "table without port 8443's fallback), each with its own action: 3 targets and an "
        "HTTP health check; gates from `Backends.prepare`, every target up. ns per call.",
        "",
        header,
        "|---|" + "--:|" * (len(names) + 1 + (rev is not None)),
    ]
    for case in batches:
        values = [ns[f"{name}|{case}"] for name in names]
        cells = " | ".join(f"{v:,.0f}" for v in values)
        line = f"| {case} | {cells} | {values[1] / values[0]:.2f} |"
        if rev is not None:
            line += f" {values[1] / values[2]:.2f} |"
        lines.append(line)
    return lines
