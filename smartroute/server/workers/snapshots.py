"""Statistics across processes: the snapshots of the parent and its workers, summed.

Each worker sends a ``stats()`` snapshot of its own about once a second; the parent sums the
latest of each with its own, field by field (nested counters too: the request counts and
duration histograms of ``routes`` and ``requests``), and keeps the totals of workers that ended.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeAlias

WORKER_TOP_CLIENTS = 1000  # client addresses each worker reports, busiest first

Snapshot: TypeAlias = dict[str, Any]


def _add(into: dict[str, Any], values: Mapping[str, Any]) -> None:
    """Add ``values`` into ``into``, key by key; nested mappings are summed the same way."""
    for key, value in values.items():
        if isinstance(value, Mapping):
            _add(into.setdefault(key, {}), value)
        else:
            into[key] = into.get(key, 0) + value


def _busy(totals: Mapping[str, int]) -> tuple[int, int, int]:
    """The order of ``client_ips`` (as in :mod:`smartroute.server.stats`): live connections,
    then bytes moved, then connections made."""
    return totals["active"], totals["bytes_in"] + totals["bytes_out"], totals["total"]


def merge_snapshots(snapshots: Iterable[Mapping[str, Any]], top_clients: int) -> Snapshot:
    """Sum ``stats()`` snapshots field by field; ``client_ips`` is cut to ``top_clients``."""
    connections: dict[str, int] = {"active": 0, "total": 0}
    moved: dict[str, int] = {"in": 0, "out": 0}
    routes: dict[str, dict[str, int]] = {}
    ips: dict[str, dict[str, int]] = {}
    tracked = 0
    throughput: dict[str, dict[str, float]] = {}
    targets: dict[str, dict[str, Any]] = {}
    requests: dict[str, Any] = {}
    for snapshot in snapshots:
        _add(requests, snapshot.get("requests", {}))
        for key, state in snapshot.get("targets", {}).items():
            _add_target(targets, key, state)
        _add(connections, snapshot["connections"])
        _add(moved, snapshot["bytes"])
        for name, totals in snapshot["routes"].items():
            _add(routes.setdefault(name, {}), totals)
        for ip, totals in snapshot["client_ips"].items():
            _add(ips.setdefault(ip, {}), totals)
        tracked += snapshot["client_ips_tracked"]
        for window, rates in snapshot["throughput"].items():
            _add(throughput.setdefault(window, {}), rates)
    for rates in throughput.values():
        for key, value in rates.items():
            rates[key] = round(value, 3 if key == "connections" else 1)
    busiest = sorted(ips.items(), key=lambda item: _busy(item[1]), reverse=True)
    return {
        "connections": connections,
        "bytes": moved,
        "routes": dict(sorted(routes.items())),
        "requests": dict(sorted(requests.items())),
        "client_ips": dict(busiest[:top_clients]),
        "client_ips_tracked": tracked,
        "throughput": throughput,
        "targets": dict(sorted(targets.items())),
    }


def _add_target(targets: dict[str, dict[str, Any]], key: str, state: Mapping[str, Any]) -> None:
    """One process's view of a target: up only if up for every process that knows it."""
    known = targets.get(key)
    if known is None:
        targets[key] = dict(state)
        return
    known["up"] = known["up"] and state["up"]
    known["active"] += state["active"]
    known["fails"] += state["fails"]
    known["last_error"] = state["last_error"] or known["last_error"]


def retired(snapshot: Mapping[str, Any]) -> Snapshot:
    """The totals of a worker that ended: nothing of it is active or has a rate any more."""

    def settled(totals: Mapping[str, Any]) -> dict[str, Any]:
        return {**totals, "active": 0}

    return {
        "connections": settled(snapshot["connections"]),
        "bytes": dict(snapshot["bytes"]),
        "routes": {name: settled(t) for name, t in snapshot["routes"].items()},
        "requests": snapshot.get("requests", {}),
        "client_ips": {ip: settled(t) for ip, t in snapshot["client_ips"].items()},
        "client_ips_tracked": snapshot["client_ips_tracked"],
        "throughput": {},
        "targets": {key: settled(t) for key, t in snapshot.get("targets", {}).items()},
    }
