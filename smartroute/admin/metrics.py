"""``GET /metrics``: the proxy's figures in the Prometheus text exposition format (0.0.4).

Everything is read from ``proxy.stats()`` (so with ``workers=N`` one scrape sums every
process), ``proxy.certificates()`` and ``proxy.plugin_status()``. Labels are bounded: routes,
targets, methods and status classes, certificates and plugins, never client addresses.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from smartroute.routing.model import ForwardAction
from smartroute.server.stats import DURATION_BUCKETS

if TYPE_CHECKING:
    from smartroute.proxy import SmartRoute

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = tuple[tuple[str, str], ...]


class _Exposition:
    """Families written in order: HELP and TYPE once each, then their samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self, name: str, kind: str, help_text: str, samples: Iterable[tuple[str, Labels, float]]
    ) -> None:
        """One family; each sample is (name suffix, labels, value). Nothing is written for a
        family without samples but its HELP and TYPE, which Prometheus accepts."""
        self.lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self.lines.append(f"# TYPE {name} {kind}")
        for suffix, labels, value in samples:
            self.lines.append(f"{name}{suffix}{_labels(labels)} {_value(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape_label(value)}"' for key, value in labels) + "}"


def _value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def _bound(bound: float) -> str:
    """A bucket's ``le`` as the snapshot keys it (``str`` of the float, ``+Inf``)."""
    return str(bound)


def render_metrics(proxy: SmartRoute) -> str:
    """The body of ``GET /metrics`` (serve it with :data:`CONTENT_TYPE`)."""
    stats = proxy.stats()
    out = _Exposition()
    _connections(out, stats)
    _requests(out, stats)
    _targets(out, stats, proxy)
    _certificates(out, proxy.certificates())
    _plugins(out, proxy.plugin_status())
    out.family(
        "smartroute_workers",
        "gauge",
        "Processes whose figures this scrape sums.",
        [("", (), stats.get("workers", 1))],
    )
    return out.text()


def _connections(out: _Exposition, stats: Mapping[str, Any]) -> None:
    connections, moved, routes = stats["connections"], stats["bytes"], stats["routes"]
    out.family(
        "smartroute_connections_active",
        "gauge",
        "Client connections open now.",
        [("", (), connections["active"])],
    )
    out.family(
        "smartroute_connections_total",
        "counter",
        "Client connections accepted.",
        [("", (), connections["total"])],
    )
    out.family(
        "smartroute_bytes_total",
        "counter",
        'Bytes moved for clients: direction "in" is client to backend, "out" backend to client.',
        [("", (("direction", "in"),), moved["in"]), ("", (("direction", "out"),), moved["out"])],
    )
    out.family(
        "smartroute_route_connections_active",
        "gauge",
        "Client connections open now, by route (an HTTP connection under its first route).",
        [("", (("route", name),), t["active"]) for name, t in routes.items()],
    )
    out.family(
        "smartroute_route_connections_total",
        "counter",
        "Client connections routed, by route (an HTTP connection under its first route).",
        [("", (("route", name),), t["total"]) for name, t in routes.items()],
    )
    out.family(
        "smartroute_route_bytes_total",
        "counter",
        "Bytes moved, by route and direction (HTTP: each request's under its own route).",
        [
            ("", (("route", name), ("direction", direction)), t[f"bytes_{direction}"])
            for name, t in routes.items()
            for direction in ("in", "out")
        ],
    )


def _requests(out: _Exposition, stats: Mapping[str, Any]) -> None:
    requests: Mapping[str, Any] = stats.get("requests", {})
    out.family(
        "smartroute_http_requests_total",
        "counter",
        'HTTP requests answered, by route ("" when none matched), method and status class '
        '("none": no HTTP status sent).',
        [
            ("", (("route", route), ("method", method), ("status", status)), n)
            for route, report in requests.items()
            for method, by_status in report["methods"].items()
            for status, n in by_status.items()
        ],
    )
    samples: list[tuple[str, Labels, float]] = []
    for route, report in requests.items():
        duration = report["duration"]
        route_label = (("route", route),)
        buckets = duration["buckets"]
        for bound in (*(_bound(b) for b in DURATION_BUCKETS), "+Inf"):
            samples.append(("_bucket", (*route_label, ("le", bound)), buckets.get(bound, 0)))
        samples.append(("_sum", route_label, float(duration["sum"])))
        samples.append(("_count", route_label, duration["count"]))
    out.family(
        "smartroute_http_request_duration_seconds",
        "histogram",
        "Time from a request's head to the end of its answer, by route.",
        samples,
    )


def _targets(out: _Exposition, stats: Mapping[str, Any], proxy: SmartRoute) -> None:
    targets: Mapping[str, Mapping[str, Any]] = stats.get("targets", {})
    pairs: list[tuple[str, str]] = []  # (route, target) in route order, each once
    seen: set[tuple[str, str]] = set()
    claimed: set[str] = set()
    for route in proxy.routes:
        action = route.action
        if not isinstance(action, ForwardAction):
            continue
        for target in action.targets:
            if callable(target.host) or not isinstance(target.port, int):
                continue
            for host in target.host:
                key = f"[{host}]:{target.port}" if ":" in host else f"{host}:{target.port}"
                if key in targets and (route.name, key) not in seen:
                    seen.add((route.name, key))
                    pairs.append((route.name, key))
                    claimed.add(key)
    # Targets known but no longer (or never statically) named by a route: route="".
    pairs.extend(("", key) for key in targets if key not in claimed)
    out.family(
        "smartroute_target_up",
        "gauge",
        "1 when the target is up for every process (health checks, passive health), else 0.",
        [("", (("route", r), ("target", t)), 1 if targets[t]["up"] else 0) for r, t in pairs],
    )
    out.family(
        "smartroute_target_connections_active",
        "gauge",
        "Backend connections open now to the target (counted once, under each route naming it).",
        [("", (("route", r), ("target", t)), targets[t]["active"]) for r, t in pairs],
    )


def _certificates(out: _Exposition, certificates: list[dict[str, Any]]) -> None:
    samples: list[tuple[str, Labels, float]] = []
    seen: set[Labels] = set()
    for cert in sorted(certificates, key=lambda c: -float(c["not_after"])):
        names = cert.get("names") or []
        labels: Labels = (
            ("name", names[0] if names else str(cert.get("label", ""))),
            ("label", str(cert.get("label", ""))),
        )
        if labels in seen:  # the same certificate twice: keep the one expiring last
            continue
        seen.add(labels)
        samples.append(("", labels, float(cert["not_after"])))
    out.family(
        "smartroute_certificate_expiry_timestamp_seconds",
        "gauge",
        "When each served certificate expires (Unix time), by its first name and label.",
        samples,
    )


def _plugins(out: _Exposition, plugins: Mapping[str, Mapping[str, Any]]) -> None:
    out.family(
        "smartroute_plugin_ready",
        "gauge",
        "1 when the plugin process is running and ready, else 0.",
        [("", (("plugin", name),), 1 if p["ready"] else 0) for name, p in plugins.items()],
    )
    out.family(
        "smartroute_plugin_restarts_total",
        "counter",
        "Times the plugin process was started again after its first start.",
        [("", (("plugin", name),), max(0, p["starts"] - 1)) for name, p in plugins.items()],
    )
