"""The benchmark suite: smartroute against HAProxy and against a direct connection, one run.

    python bench/run.py [--quick] [--record] [--loop uvloop|asyncio]

Starts nginx (the backend, plain and TLS), iperf3 servers, an idle backend, HAProxy
(``nbthread 1``) and smartroute (one Python process, ``bench/smartroute_server.py``, on
uvloop's event loop when uvloop is installed, else asyncio's; ``--loop`` chooses) on
127.0.0.1, then runs every workload round after round, the three systems taking turns
(direct, HAProxy, smartroute, direct, ...), and prints medians and the ratios
smartroute / HAProxy and smartroute / direct as Markdown. ``--record`` appends the result to
``bench/RESULTS.md``. ``--profile WORKLOAD`` runs one workload against smartroute only under
py-spy and prints where its time goes. Every process started is stopped on exit, Ctrl-C or
error. Needs haproxy, nginx, wrk and iperf3: ``bash scripts/install-bench-tools.sh``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from bench_loads import Sample, idle_memory, iperf3, nginx_accepts, wrk
from bench_procs import ProcessError, Procs, wait_listening
from bench_report import (
    MEMORY,
    SYSTEMS,
    WORKLOADS,
    Results,
    cpu_table,
    errors_lines,
    goal_lines,
    load_average,
    machine_line,
    main_table,
    routing_key,
    routing_table,
)
from bench_setup import (
    ROUTE_COUNTS,
    SNI_NAME,
    STATIC_FILE,
    Layout,
    haproxy_cfg,
    haproxy_idle_cfg,
    make_layout,
    nginx_conf,
    smartroute_idle_routes,
    smartroute_routes,
    sni_routes,
    write_json,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
TOOLS = ("haproxy", "nginx", "wrk", "iperf3")
PAUSE = 0.3  # seconds between runs, so that closing connections settle
# Waiting, not working: the event loop in epoll, the startup getaddrinfo thread on its queue.
IDLE_FRAMES = ("EpollSelector.select (selectors.py)", "_worker (concurrent/futures/thread.py)")
LOOPS = ("uvloop", "asyncio")
# Runs smartroute_server.py (argv[2:]) on uvloop: its asyncio.run() takes the policy's loop.
UVLOOP_LAUNCHER = (
    "import asyncio, runpy, sys, uvloop; "
    "asyncio.set_event_loop_policy(uvloop.EventLoopPolicy()); "
    "sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


@dataclass
class Options:
    rounds: int
    duration: float
    connections: int
    idle_connections: int
    port_base: int
    record: bool
    quick: bool
    profile: str | None
    profile_raw: Path | None
    loop: str
    argv: list[str]


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 s runs")
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    parser.add_argument("--rounds", type=int, help="rounds (default 5, --quick 2)")
    parser.add_argument("--duration", type=float, help="seconds per run (default 5, --quick 2)")
    parser.add_argument("--connections", type=int, default=50, help="wrk -c (default 50)")
    parser.add_argument("--idle-connections", type=int, default=2000)
    parser.add_argument("--port-base", type=int, default=21000, help="first port to try")
    parser.add_argument(
        "--profile",
        choices=[w.key for w in WORKLOADS],
        help="profile smartroute under one workload with py-spy instead of comparing",
    )
    parser.add_argument("--profile-raw", type=Path, help="also keep py-spy's raw stacks here")
    parser.add_argument(
        "--loop",
        choices=LOOPS,
        default=default_loop(),
        help="smartroute's event loop (default: uvloop when installed, else asyncio)",
    )
    args = parser.parse_args(argv)
    if args.loop == "uvloop" and not uvloop_installed():
        parser.error("--loop uvloop: uvloop is not installed (pip install 'smartroute[uvloop]')")
    return Options(
        rounds=args.rounds or (2 if args.quick else 5),
        duration=args.duration or (2.0 if args.quick else 5.0),
        connections=args.connections,
        idle_connections=args.idle_connections,
        port_base=args.port_base,
        record=args.record,
        quick=args.quick,
        profile=args.profile,
        profile_raw=args.profile_raw,
        loop=args.loop,
        argv=list(argv),
    )


def uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def default_loop() -> str:
    return "uvloop" if uvloop_installed() else "asyncio"


def loop_description(loop: str) -> str:
    """``uvloop 0.21.0`` or ``asyncio``, for the report."""
    if loop != "uvloop":
        return "asyncio"
    from importlib.metadata import version

    return f"uvloop {version('uvloop')}"


def smartroute_argv(loop: str, *args: str) -> list[str]:
    """The command line of a smartroute process on ``loop`` (asyncio's or uvloop's)."""
    server = str(HERE / "smartroute_server.py")
    if loop == "uvloop":
        return [sys.executable, "-c", UVLOOP_LAUNCHER, server, *args]
    return [sys.executable, server, *args]


class Bench:
    """The running backends and proxies, and how to point each workload at each system."""

    def __init__(self, procs: Procs, layout: Layout, connections: int, loop: str) -> None:
        self.procs = procs
        self.layout = layout
        self.connections = connections
        self.loop = loop

    def start(self) -> None:
        layout, procs = self.layout, self.procs
        root = layout.root
        (root / "nginx.conf").write_text(nginx_conf(layout))
        (root / "haproxy.cfg").write_text(haproxy_cfg(layout))
        error_log, conf = str(root / "nginx-error.log"), str(root / "nginx.conf")
        procs.start("nginx", ["nginx", "-p", str(root), "-e", error_log, "-c", conf])
        procs.start("haproxy", ["haproxy", "-db", "-f", str(root / "haproxy.cfg")])
        routes = write_json(root / "smartroute.json", smartroute_routes(layout))
        procs.start("smartroute", smartroute_argv(self.loop, str(routes)))
        for count in ROUTE_COUNTS:
            table = sni_routes(layout.routing[count], layout.nginx_https, count)
            path = write_json(root / f"routing-{count}.json", table)
            procs.start(f"routing-{count}", smartroute_argv(self.loop, str(path)))
        procs.start(
            "idle-backend", [sys.executable, str(HERE / "idle_backend.py"), str(layout.idle)]
        )
        wait_listening(procs, "nginx", [layout.nginx_http, layout.nginx_https])
        wait_listening(procs, "haproxy", [p for k, p in layout.haproxy.items() if k != "idle"])
        wait_listening(
            procs, "smartroute", [p for k, p in layout.smartroute.items() if k != "idle"]
        )
        for count in ROUTE_COUNTS:
            wait_listening(procs, f"routing-{count}", [layout.routing[count]], timeout=120)
        wait_listening(procs, "idle-backend", [layout.idle])

    def pid(self, system: str) -> int | None:
        return None if system == "direct" else self.procs.running[system].pid

    def port(self, key: str, system: str) -> int:
        service = {"newconn": "relay", "https": "tls"}.get(key, key)
        if system == "direct":
            return self.layout.direct()[service]
        return (self.layout.haproxy if system == "haproxy" else self.layout.smartroute)[service]

    def measure(self, key: str, system: str, duration: float) -> Sample:
        """One run; for nginx-backed workloads, also how many connections nginx accepted."""
        if key == "bulk":
            return self._measure(key, system, duration)
        before = nginx_accepts(self.layout.nginx_http)
        sample = self._measure(key, system, duration)
        sample.backend_connections = nginx_accepts(self.layout.nginx_http) - before - 1
        return sample

    def _measure(self, key: str, system: str, duration: float) -> Sample:
        port, pid = self.port(key, system), self.pid(system)
        if key == "bulk":
            return iperf3(self.procs, self.layout.iperf, port, duration, pid)
        if key in ("sni", "tls", "https"):
            url = f"https://{SNI_NAME}:{port}/ok"
            close = key != "https"  # https: kept-alive requests; the others: handshakes
            return wrk(
                self.procs, url, duration, close=close, pid=pid, connections=self.connections
            )
        path = f"/{STATIC_FILE}" if key == "http" else "/ok"
        url = f"http://127.0.0.1:{port}{path}"
        close = key == "newconn"
        return wrk(self.procs, url, duration, close=close, pid=pid, connections=self.connections)

    def measure_routing(self, count: int, duration: float) -> Sample:
        url = f"https://{SNI_NAME}:{self.layout.routing[count]}/ok"
        pid = self.procs.running[f"routing-{count}"].pid
        return wrk(self.procs, url, duration, close=True, pid=pid, connections=self.connections)

    def measure_memory(self, system: str, count: int) -> Sample:
        """A fresh proxy with only the idle service, so no earlier workload's heap is reused."""
        layout, procs = self.layout, self.procs
        name = f"{system}-idle"
        if system == "haproxy":
            cfg = layout.root / "haproxy-idle.cfg"
            cfg.write_text(haproxy_idle_cfg(layout))
            proc = procs.start(name, ["haproxy", "-db", "-f", str(cfg)])
            port = layout.haproxy["idle"]
        else:
            routes = write_json(
                layout.root / "smartroute-idle.json", smartroute_idle_routes(layout)
            )
            proc = procs.start(name, smartroute_argv(self.loop, str(routes)))
            port = layout.smartroute["idle"]
        try:
            wait_listening(procs, name, [port])
            return idle_memory(proc.pid, port, layout.idle, count)
        finally:
            procs.stop(name)


def _describe(key: str, system: str, sample: Sample, unit: str) -> str:
    text = f"{key:8} {system:10} {sample.value:12,.2f} {unit}"
    if sample.cpu is not None and sample.work:
        per = sample.cpu / sample.work
        text += f"   proxy CPU {per * (1e3 if key == 'bulk' else 1e6):8.1f}"
        text += " ms/GB" if key == "bulk" else " µs/unit"
    if sample.backend_per_work is not None:
        text += f"   backend conns/unit {sample.backend_per_work:.3f}"
    if sample.errors:
        text += f"   errors {sample.errors}"
    return text


def run_rounds(bench: Bench, options: Options) -> Results:
    results: Results = {}
    duration = options.duration

    def keep(where: tuple[str, str], sample: Sample, unit: str, round_no: int) -> None:
        results.setdefault(where, []).append(sample)
        print(
            f"[{round_no}/{options.rounds}] {_describe(*where, sample, unit)}",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(PAUSE)

    print("warm-up (1 s per workload and system, not counted)", file=sys.stderr, flush=True)
    for workload in WORKLOADS[1:]:
        for system in SYSTEMS:
            bench.measure(workload.key, system, 1)
    for count in ROUTE_COUNTS:
        bench.measure_routing(count, 1)
    for round_no in range(1, options.rounds + 1):
        for workload in WORKLOADS:
            for system in SYSTEMS:
                sample = bench.measure(workload.key, system, duration)
                keep((workload.key, system), sample, workload.unit, round_no)
        for system in MEMORY.systems:
            sample = bench.measure_memory(system, options.idle_connections)
            keep((MEMORY.key, system), sample, "bytes/connection", round_no)
        for count in ROUTE_COUNTS:
            sample = bench.measure_routing(count, duration)
            keep(routing_key(count), sample, "conn/s (routes)", round_no)
    return results


def report(results: Results, options: Options, machine: str, loads: tuple[str, str]) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python bench/run.py", *options.argv])
    if "--loop" not in options.argv:
        command += f"  # smartroute on {options.loop} (the default here)"
    lines = [
        f"## Proxy comparison: smartroute, HAProxy and direct ({when})",
        "",
        "Command (from the repository root, after `bash scripts/install-bench-tools.sh`):",
        "",
        f"    {command}",
        "",
        f"Machine: {machine}. Load average (1/5/15 min) before {loads[0]}, after {loads[1]}.",
        f"smartroute's event loop: {loop_description(options.loop)}.",
        "",
        f"{options.rounds} rounds{' (--quick)' if options.quick else ''}; each run "
        f"{options.duration:g} s; within a round every workload runs on direct, HAProxy and "
        "smartroute in turn. "
        f"wrk -t1 -c{options.connections}; iperf3 one stream; "
        f"{options.idle_connections:,} idle connections per memory run (a fresh proxy each "
        "time). TLS: ECDSA P-256, TLS 1.3, full handshakes (no tickets, no session cache). "
        "Medians of the rounds; spread = (max - min) / median per system.",
        "",
        *main_table(results),
        "",
        "Proxy CPU time per unit of work (user + system, from /proc/PID/stat; median of the "
        "rounds). Less sensitive to other load than throughput is:",
        "",
        *cpu_table(results),
        "",
        "Routing cost: smartroute alone, TLS passthrough by SNI, new connections (as above); "
        "the measured name is the last-defined route on the port, the others are exact "
        "names with one wildcard in twenty:",
        "",
        *routing_table(results, ROUTE_COUNTS),
        "",
    ]
    errors = errors_lines(results)
    if errors:
        lines += ["Errors reported by wrk:", "", *errors, ""]
    lines += ["Goals:", "", *goal_lines(results, ROUTE_COUNTS), ""]
    return "\n".join(lines)


def record(text: str) -> None:
    existing = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    RESULTS.write_text(existing.rstrip("\n") + "\n\n" + text)


def profile(bench: Bench, options: Options) -> None:
    """Run one workload against smartroute under py-spy and print the top functions."""
    key = options.profile
    assert key is not None
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise ProcessError("py-spy is not installed (pip install py-spy)")
    raw = bench.layout.root / "profile.txt"
    pid = bench.procs.running["smartroute"].pid
    seconds = options.duration
    argv = [
        py_spy,
        "record",
        "--nonblocking",
        "-r",
        "250",
        "-f",
        "raw",
        "-o",
        str(raw),
        "-d",
        f"{seconds + 1:g}",
        "-p",
        str(pid),
    ]
    spy = bench.procs.start("py-spy", argv)
    time.sleep(0.5)
    sample = bench.measure(key, "smartroute", seconds)
    spy.wait(timeout=seconds + 30)
    print(_describe(key, "smartroute", sample, ""))
    print(summarize_profile(raw.read_text(), expected=250 * (seconds + 1)))
    if options.profile_raw is not None:
        shutil.copyfile(raw, options.profile_raw)


def summarize_profile(raw: str, expected: float, top: int = 15) -> str:
    """Self and inclusive shares of the busy samples, per function (py-spy raw stacks)."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(frame) for frame in stack.split(";")]
        if frames[-1] in IDLE_FRAMES:
            continue  # py-spy's idle detection misses these waits
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
    if not total:
        return "no samples"
    lines = [f"busy samples: {total} (~{total / expected:.0%} of the run, main thread)"]
    for title, table in (("self", own), ("inclusive", inclusive)):
        lines.append(f"top {top} by {title} time (share of busy samples):")
        for name, count in sorted(table.items(), key=lambda item: -item[1])[:top]:
            lines.append(f"  {count / total:6.1%}  {name}")
    return "\n".join(lines)


def _frame(frame: str) -> str:
    """``func (path/file.py:123)`` -> ``func (path/file.py)``: one entry per function."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rstrip(')').rsplit(':', 1)[0]})"


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def raise_fd_limit(needed: int) -> int:
    """Raise RLIMIT_NOFILE to the hard limit; return the soft limit children will see."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    shown = subprocess.run(["sh", "-c", "ulimit -n"], capture_output=True, text=True).stdout
    limit = int(shown.strip()) if shown.strip().isdigit() else hard
    if limit < needed:
        raise ProcessError(f"ulimit -n is {limit}; {needed} open files are needed")
    return limit


def main(argv: Sequence[str]) -> int:
    options = parse_args(argv)
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        print(
            f"missing {', '.join(missing)}: run bash scripts/install-bench-tools.sh",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    limit = raise_fd_limit(options.idle_connections + 500)
    print(f"ulimit -n: {limit}; smartroute on {options.loop}", file=sys.stderr)
    machine = machine_line()
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="smartroute-bench-") as folder:
        root = Path(folder)
        (root / "logs").mkdir()
        layout = make_layout(root, options.port_base)
        env = dict(os.environ, OPENSSL_CONF=str(root / "openssl.cnf"), PYTHONUNBUFFERED="1")
        procs = Procs(root / "logs", env)
        bench = Bench(procs, layout, options.connections, options.loop)
        try:
            bench.start()
            if options.profile is not None:
                profile(bench, options)
                return 0
            results = run_rounds(bench, options)
        finally:
            procs.stop_all()
    text = report(results, options, machine, (load_before, load_average()))
    print(text)
    if options.record:
        record(text)
        print(f"appended to {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        print("interrupted; every process the suite started is stopped", file=sys.stderr)
        sys.exit(130)
