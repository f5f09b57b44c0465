"""Medians, ratios, goals and the Markdown the benchmark prints (and records)."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from bench_loads import Sample

SYSTEMS = ("direct", "haproxy", "smartroute")
LABELS = {"direct": "direct", "haproxy": "HAProxy", "smartroute": "smartroute"}


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    unit: str
    work_unit: str  # what CPU time is divided by: "request", "connection", "GB"
    systems: tuple[str, ...] = SYSTEMS
    lower_is_better: bool = False


WORKLOADS = (
    Workload("bulk", "TCP passthrough bulk (iperf3, 1 stream)", "Gbit/s", "GB"),
    Workload("relay", "small request relay, kept-alive (wrk -c50, L4)", "requests/s", "request"),
    Workload("newconn", "new connections (wrk Connection: close, L4)", "conn/s", "connection"),
    Workload("sni", "SNI-routed TLS passthrough, new connections", "conn/s", "connection"),
    Workload("tls", "TLS termination handshakes (ECDSA P-256)", "handshakes/s", "connection"),
    Workload("http", "HTTP reverse proxy, kept-alive (wrk -c50)", "requests/s", "request"),
    Workload("https", "HTTPS terminated, kept-alive (wrk -c50)", "requests/s", "request"),
)
MEMORY = Workload(
    "memory",
    "memory per idle proxied connection",
    "bytes",
    "connection",
    systems=("haproxy", "smartroute"),
    lower_is_better=True,
)

Results = dict[tuple[str, str], list[Sample]]


def median(samples: Sequence[Sample]) -> float:
    return statistics.median(s.value for s in samples)


def median_cpu(samples: Sequence[Sample]) -> float | None:
    values = [v for v in (s.cpu_per_work for s in samples) if v is not None]
    return statistics.median(values) if values else None


def spread(samples: Sequence[Sample]) -> float:
    """(max - min) / median of the runs, as a fraction."""
    values = [s.value for s in samples]
    middle = statistics.median(values)
    return (max(values) - min(values)) / middle if middle else 0.0


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cpu_scale(work_unit: str) -> tuple[float, str]:
    return (1e3, "ms/GB") if work_unit == "GB" else (1e6, f"µs/{work_unit}")


def ratio(results: Results, key: str, base: str) -> float | None:
    mine, theirs = results.get((key, "smartroute")), results.get((key, base))
    if not mine or not theirs:
        return None
    return median(mine) / median(theirs)


def routing_key(count: int) -> tuple[str, str]:
    return ("routing", str(count))


def main_table(results: Results) -> list[str]:
    lines = [
        "| workload | unit | direct | HAProxy | smartroute | smartroute / HAProxy "
        "| smartroute / direct | spread d / h / s |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for workload in (*WORKLOADS, MEMORY):
        cells = [workload.title, workload.unit]
        spreads = []
        for system in SYSTEMS:
            samples = results.get((workload.key, system))
            cells.append(_fmt(median(samples)) if samples else "—")
            spreads.append(f"{spread(samples):.0%}" if samples else "—")
        for base in ("haproxy", "direct"):
            value = ratio(results, workload.key, base)
            cells.append(f"{value:.2f}" if value is not None else "—")
        cells.append(" / ".join(spreads))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def cpu_table(results: Results) -> list[str]:
    lines = [
        "| workload | proxy CPU per unit | HAProxy | smartroute | smartroute / HAProxy |",
        "|---|---|--:|--:|--:|",
    ]
    for workload in WORKLOADS:
        scale, label = _cpu_scale(workload.work_unit)
        theirs = median_cpu(results.get((workload.key, "haproxy"), []))
        mine = median_cpu(results.get((workload.key, "smartroute"), []))
        if theirs is None or mine is None:
            continue
        lines.append(
            f"| {workload.title} | {label} | {_fmt(theirs * scale)} | {_fmt(mine * scale)} "
            f"| {mine / theirs:.2f} |"
        )
    return lines


def routing_table(results: Results, counts: Sequence[int]) -> list[str]:
    lines = [
        "| routes on the port | conn/s | µs per connection (1e6 / rate) "
        "| smartroute CPU µs per connection | spread |",
        "|--:|--:|--:|--:|--:|",
    ]
    rows: list[tuple[float, float | None]] = []
    for count in counts:
        samples = results.get(routing_key(count), [])
        if not samples:
            continue
        rate, cpu = median(samples), median_cpu(samples)
        rows.append((rate, cpu))
        cpu_text = _fmt(cpu * 1e6) if cpu is not None else "—"
        lines.append(
            f"| {count:,} | {_fmt(rate)} | {1e6 / rate:.1f} | {cpu_text} | {spread(samples):.0%} |"
        )
    if len(rows) == 2:
        (rate_a, cpu_a), (rate_b, cpu_b) = rows
        cpu_ratio = f"{cpu_b / cpu_a:.2f}" if cpu_a and cpu_b else "—"
        lines.append(
            f"| {counts[-1]:,} / {counts[0]:,} | {rate_b / rate_a:.2f} | {rate_a / rate_b:.2f} "
            f"| {cpu_ratio} | |"
        )
    return lines


def errors_lines(results: Results) -> list[str]:
    lines = []
    for (key, system), samples in sorted(results.items()):
        failed = sum(s.errors for s in samples)
        done = sum(s.work for s in samples)
        if failed:
            lines.append(f"- {key} / {system}: {failed} errors in {done:,.0f} (wrk socket errors)")
    return lines


def _verdict(value: float | None, goal: float, *, at_most: bool = False) -> str:
    if value is None:
        return "not measured"
    met = value <= goal if at_most else value >= goal
    return "**met**" if met else "**not met**"


def goal_lines(results: Results, counts: Sequence[int]) -> list[str]:
    lines = []
    for key, base, goal, text in (
        ("bulk", "haproxy", 1.2, "bulk throughput >= 1.2x HAProxy"),
        ("bulk", "direct", 0.6, "bulk throughput >= 0.6x direct"),
        ("relay", "haproxy", 0.9, "kept-alive relay requests/s >= 0.9x HAProxy"),
        ("newconn", "haproxy", 0.6, "new connections/s >= 0.6x HAProxy"),
        ("tls", "haproxy", 0.85, "TLS handshakes/s >= 0.85x HAProxy"),
        ("http", "haproxy", 0.5, "HTTP reverse proxy, kept-alive, requests/s >= 0.5x HAProxy"),
        ("https", "haproxy", 0.5, "terminated HTTPS, kept-alive, requests/s >= 0.5x HAProxy"),
    ):
        value = ratio(results, key, base)
        shown = f"{value:.2f}x" if value is not None else "—"
        line = f"- {text}: {_verdict(value, goal)} (measured {shown}"
        if base == "haproxy":
            mine = median_cpu(results.get((key, "smartroute"), []))
            theirs = median_cpu(results.get((key, "haproxy"), []))
            if mine and theirs:
                line += f"; proxy CPU per unit of work, HAProxy / smartroute: {theirs / mine:.2f}x"
        lines.append(line + ")")
    memory = results.get(("memory", "smartroute"))
    per_conn = median(memory) if memory else None
    shown = f"{per_conn:,.0f} bytes" if per_conn is not None else "—"
    lines.append(
        f"- <= 4 KB (4,096 bytes) per idle connection: "
        f"{_verdict(per_conn, 4096, at_most=True)} (measured {shown})"
    )
    low, high = results.get(routing_key(counts[0])), results.get(routing_key(counts[-1]))
    wall = median(low) / median(high) if low and high else None
    low_cpu = median_cpu(low) if low else None
    high_cpu = median_cpu(high) if high else None
    cost = high_cpu / low_cpu if low_cpu and high_cpu else None
    shown = f"{cost:.2f}" if cost is not None else "—"
    wall_shown = f"{wall:.2f}" if wall is not None else "—"
    lines.append(
        f"- routing cost flat within 20% from {counts[0]:,} to {counts[-1]:,} routes "
        f"(smartroute CPU µs per connection, {counts[-1]:,} / {counts[0]:,} <= 1.20): "
        f"{_verdict(cost, 1.2, at_most=True)} (measured {shown}; wall-clock µs per "
        f"connection {wall_shown})"
    )
    return lines


def _first_line(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{argv[0]}: {exc}"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0].strip() if text else f"{argv[0]}: no output"


def cpu_model() -> str:
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_line() -> str:
    haproxy = _first_line(["haproxy", "-v"]).split(" - ")[0]
    return (
        f"nproc {os.cpu_count()}; {cpu_model()}; Linux {platform.release()}; "
        f"Python {platform.python_version()}; {haproxy}; {_first_line(['nginx', '-v'])}; "
        f"{_first_line(['wrk', '-v']).split(' Copyright')[0]}; {_first_line(['iperf3', '-v'])}"
    )


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())
