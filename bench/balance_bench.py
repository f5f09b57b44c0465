"""Load-balancing strategies on ``forward``: what each costs per request and per connection.

    python bench/balance_bench.py                    # about 3.5 minutes on 2 cores
    python bench/balance_bench.py --quick            # under a minute
    python bench/balance_bench.py --baseline-rev REV # also the code of git revision REV

Two parts, printed as Markdown:

1. Micro (no sockets, ``balance_micro.py``): ``TargetGroup.order()`` per call for every
   strategy with 2, 4 and 16 targets, every target up, one primary down, and every primary
   down so that a backup serves, against the per-request rotation used before the
   strategies; and ``RouteTable.match`` with and without gates.
2. Whole proxy: three nginx backends (one process each) behind smartroute on 127.0.0.1, each
   configuration a route in a smartroute process of its own; ``wrk -t1 -c50`` kept-alive HTTP
   (``"protocol": "http"``, ``order()`` once per request) for each strategy and for
   round-robin with an HTTP health check every 0.1 s on every target; and ``-H "Connection:
   close"`` through a raw TCP forward (``"protocol": "tcp"``, ``order()`` once per
   connection). Every configuration runs once per round, in turns (the starting one moves
   each round), after a 1 s warm-up; medians of the rounds, ratios to round-robin paired
   within each round, proxy CPU per request from ``/proc/PID/stat``, p99 latency (wrk), and
   each backend's share (nginx ``stub_status``).

``--baseline-rev REV`` adds the code of git revision ``REV`` (before the feature) to both
parts: its matcher (``git show REV:smartroute/routing/matcher.py``) and round-robin rows run
by a smartroute extracted with ``git archive REV`` (read-only git commands). ``--only
http-lc,tcp-ip`` runs some configurations (the round-robin reference of each kind stays);
``--micro-only`` and ``--proxy-only`` run one part. Every process started here runs in its own
process group and is ended on exit, error, Ctrl-C and SIGTERM; every load is bounded in time.
Needs nginx and wrk: ``bash scripts/install-bench-tools.sh``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from balance_micro import matcher_micro, order_micro
from bench_procs import ProcessError, Procs, cpu_seconds, wait_listening
from bench_report import load_average, machine_line
from bench_setup import Ports, nginx_main_conf, write_json
from run import LOOPS, default_loop, loop_description, uvloop_installed

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

BACKENDS = 3
WEIGHTS = (3, 2, 1)  # the weighted random configuration
HEALTH = {"type": "http", "interval": 0.1, "path": "/ok"}  # timeout: min(2, interval)
# Runs smartroute_server.py with the smartroute package of a given folder on a given loop;
# prints where smartroute came from so that the run can check it.
LAUNCHER = """\
import asyncio, runpy, sys
sys.path.insert(0, sys.argv[1])
import smartroute
print("smartroute from", smartroute.__file__, flush=True)
if sys.argv[2] == "uvloop":
    import uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclasses.dataclass(frozen=True)
class Config:
    """One route, served by a smartroute process of its own."""

    key: str
    title: str
    kind: str  # "http": kept-alive requests; "tcp": a new connection per request
    strategy: str | None = None  # load_balancing (None: the default, round-robin)
    weights: tuple[int, ...] = (1, 1, 1)
    health: bool = False  # an HTTP health check of every target (HEALTH)
    before: bool = False  # run the code of --baseline-rev


def proxy_configs(rev: str | None) -> list[Config]:
    health = "round-robin + HTTP health checks every 0.1 s"
    configs = [
        Config("http-rr", "round-robin (default)", "http"),
        Config("http-lc", "least-connections", "http", "least-connections"),
        Config("http-ip", "ip-hash", "http", "ip-hash"),
        Config("http-rnd", "random, weights 3/2/1", "http", "random", WEIGHTS),
        Config("http-first", "first", "http", "first"),
        Config("http-health", health, "http", health=True),
        Config("tcp-rr", "round-robin (default)", "tcp"),
        Config("tcp-lc", "least-connections", "tcp", "least-connections"),
        Config("tcp-ip", "ip-hash", "tcp", "ip-hash"),
    ]
    if rev is not None:
        title = f"round-robin, code before the strategies ({rev})"
        configs.insert(6, Config("http-before", title, "http", before=True))
        configs.append(Config("tcp-before", title, "tcp", before=True))
    return configs


@dataclasses.dataclass
class Run:
    rate: float  # requests (or connections) per second
    requests: int
    cpu: float  # proxy CPU seconds
    p99: float  # ms
    errors: int
    served: list[int]  # requests each backend served
    accepted: list[int]  # connections each backend accepted

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.requests * 1e6


def stub_status(port: int) -> tuple[int, int]:
    """nginx's (accepted connections, requests) so far, this request included."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/nginx-status", timeout=10) as answer:
        numbers = answer.read().decode().splitlines()[2].split()
    return int(numbers[0]), int(numbers[2])


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


class Proxy:
    """The backends, the smartroute processes and how to run one configuration."""

    def __init__(
        self, procs: Procs, root: Path, loop: str, rev: str | None, port_base: int, only: str
    ) -> None:
        self.procs, self.root, self.loop, self.rev = procs, root, loop, rev
        self.configs = proxy_configs(rev)
        if only:  # the round-robin reference of each kind stays
            keys = {*only.split(","), "http-rr", "tcp-rr"}
            kinds = {key.split("-")[0] for key in keys if key in only.split(",")}
            self.configs = [c for c in self.configs if c.key in keys and c.kind in kinds]
        ports = Ports(port_base)
        self.backends = [ports.take() for _ in range(BACKENDS)]
        self.ports = {config.key: ports.take() for config in self.configs}
        self.pids: dict[str, int] = {}

    def start(self) -> None:
        for i, port in enumerate(self.backends):
            root = self.root / f"nginx{i}"
            root.mkdir()
            server = (
                f"    server {{ listen 127.0.0.1:{port} backlog=4096;\n"
                '        location = /ok { return 200 "ok"; }\n'
                "        location = /nginx-status { stub_status; } }\n"
            )
            (root / "nginx.conf").write_text(nginx_main_conf(root, server))
            argv = ["nginx", "-p", str(root), "-e", str(root / "error.log")]
            self.procs.start(f"nginx{i}", [*argv, "-c", str(root / "nginx.conf")])
        for i, port in enumerate(self.backends):
            wait_listening(self.procs, f"nginx{i}", [port])
        before = self.root / "before"
        if any(c.before for c in self.configs):
            assert self.rev is not None
            extract(self.rev, before)
        for config in self.configs:
            path = write_json(self.root / f"{config.key}.json", [self._route(config)])
            source = before if config.before else REPO
            argv = [sys.executable, "-c", LAUNCHER, str(source), self.loop]
            script = [str(HERE / "smartroute_server.py"), str(path)]
            self.pids[config.key] = self.procs.start(config.key, [*argv, *script]).pid
        for config in self.configs:
            wait_listening(self.procs, config.key, [self.ports[config.key]])
            source = before if config.before else REPO
            loaded = self.procs.log_tail(config.key, 50)
            if f"smartroute from {source}/smartroute/" not in loaded:
                raise ProcessError(f"{config.key} did not load smartroute from {source}:\n{loaded}")

    def _route(self, config: Config) -> dict[str, Any]:
        targets = [
            {"host": "127.0.0.1", "port": port, **({"weight": w} if w != 1 else {})}
            for port, w in zip(self.backends, config.weights, strict=True)
        ]
        action: dict[str, Any] = {"type": "forward", "protocol": config.kind, "targets": targets}
        if config.strategy is not None:
            action["load_balancing"] = config.strategy
        if config.health:
            action["health_check"] = HEALTH
        return {"name": config.key, "match": {"ports": self.ports[config.key]}, "action": action}

    def counts(self) -> list[tuple[int, int]]:
        return [stub_status(port) for port in self.backends]

    def idle_checks(self, seconds: float) -> tuple[float, float]:
        """With no traffic: health checks per second the backends saw, and the CPU seconds
        per second the health-checked proxy spent (all its threads, from schedstat: clock
        ticks are too coarse for this little)."""
        pid = self.pids["http-health"]
        before, cpu = self.counts(), on_cpu(pid)
        time.sleep(seconds)
        spent, after = on_cpu(pid) - cpu, self.counts()
        checks = sum(a[1] - b[1] - 1 for a, b in zip(after, before, strict=True))
        return checks / seconds, spent / seconds

    def measure(self, config: Config, duration: int) -> Run:
        url = f"http://127.0.0.1:{self.ports[config.key]}/ok"
        argv = ["wrk", "-t1", "-c50", f"-d{duration}s", "--timeout", "5s", "--latency"]
        if config.kind == "tcp":
            argv += ["-H", "Connection: close"]
        pid = self.pids[config.key]
        before, cpu = self.counts(), cpu_seconds(pid)
        out = self.procs.run([*argv, url], timeout=duration + 30)
        spent, after = cpu_seconds(pid) - cpu, self.counts()
        found = re.search(r"(\d+) requests in", out)
        rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
        p99 = re.search(r"^\s+99%\s+(\S+)", out, re.MULTILINE)
        if found is None or rate is None or p99 is None:
            raise ProcessError(f"unexpected wrk output:\n{out}")
        errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        return Run(
            rate=float(rate.group(1)),
            requests=int(found.group(1)),
            cpu=spent,
            p99=_ms(p99.group(1)),
            errors=errors + (int(non2xx.group(1)) if non2xx else 0),
            served=[a[1] - b[1] - 1 for a, b in zip(after, before, strict=True)],
            accepted=[a[0] - b[0] - 1 for a, b in zip(after, before, strict=True)],
        )


def on_cpu(pid: int) -> float:
    """Seconds every thread of ``pid`` has run so far (``/proc/PID/task/*/schedstat``)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
    return total / 1e9


def extract(rev: str, folder: Path) -> None:
    """The ``smartroute`` package as it was at ``rev`` (git archive: reads the repository)."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", rev, "smartroute"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    folder.mkdir()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")


def run_proxy(proxy: Proxy, rounds: int, duration: int, warm: bool) -> dict[str, list[Run]]:
    configs = proxy.configs
    warming = configs if warm else [c for c in configs if c.key.endswith("-rr")]
    print(f"warm-up: 1 s of {len(warming)} configuration(s)", file=sys.stderr, flush=True)
    for config in warming:
        proxy.measure(config, 1)
    runs: dict[str, list[Run]] = {c.key: [] for c in configs}
    for number in range(rounds):
        shift = number % len(configs)
        for config in configs[shift:] + configs[:shift]:
            run = proxy.measure(config, duration)
            runs[config.key].append(run)
            shares = "/".join(f"{s / max(1, sum(run.served)):.0%}" for s in run.served)
            print(
                f"[{number + 1}/{rounds}] {config.key:12} {run.rate:10,.0f}/s "
                f"CPU {run.cpu_us:6.1f} µs  p99 {run.p99:6.2f} ms  backends {shares}"
                + (f"  errors {run.errors}" if run.errors else ""),
                file=sys.stderr,
                flush=True,
            )
            time.sleep(0.3)  # closing connections settle
    return runs


def proxy_tables(proxy: Proxy, runs: dict[str, list[Run]]) -> list[str]:
    lines: list[str] = []
    for kind, unit, per in (("http", "requests/s", "request"), ("tcp", "conn/s", "connection")):
        if f"{kind}-rr" not in runs:
            continue
        base = runs[f"{kind}-rr"]
        title = (
            'Kept-alive HTTP (`"protocol": "http"`, `order()` per request)'
            if kind == "http"
            else 'New connections through a raw TCP forward (`"protocol": "tcp"`, '
            "wrk `Connection: close`, `order()` per connection)"
        )
        lines += [
            f"{title}:",
            "",
            f"| configuration | {unit} | / round-robin | proxy CPU µs/{per} | / round-robin "
            f"| p99 latency ms | {per}s per backend | new backend conns / 1k {per}s | spread |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for config in (c for c in proxy.configs if c.kind == kind):
            mine = runs[config.key]
            rates = [r.rate for r in mine]
            rate = statistics.median(rates)
            ratio = statistics.median(r.rate / b.rate for r, b in zip(mine, base, strict=True))
            cpu = statistics.median(r.cpu_us for r in mine)
            cpu_ratio = statistics.median(
                r.cpu_us / b.cpu_us for r, b in zip(mine, base, strict=True)
            )
            p99 = statistics.median(r.p99 for r in mine)
            served = [sum(r.served[i] for r in mine) for i in range(BACKENDS)]
            shares = " / ".join(f"{s / max(1, sum(served)):.0%}" for s in served)
            fresh = sum(sum(r.accepted) for r in mine) / sum(r.requests for r in mine) * 1e3
            spread = (max(rates) - min(rates)) / rate
            lines.append(
                f"| {config.title} | {rate:,.0f} | {ratio:.2f} | {cpu:.1f} | {cpu_ratio:.2f} "
                f"| {p99:.2f} | {shares} | {fresh:.1f} | {spread:.0%} |"
            )
        errors = {c.key: sum(r.errors for r in runs[c.key]) for c in proxy.configs}
        if any(errors[c.key] for c in proxy.configs if c.kind == kind):
            listed = ", ".join(f"{k}: {n}" for k, n in errors.items() if n and k.startswith(kind))
            lines += ["", f"wrk errors (socket errors and non-2xx), all rounds: {listed}."]
        lines.append("")
    return lines


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def resolve(rev: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", rev],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()


def code_line() -> str:
    """The commit measured, and whether smartroute/ has uncommitted changes."""
    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain", "smartroute"], capture_output=True)
    changes = " plus uncommitted changes in smartroute/" if dirty.stdout.strip() else ""
    return f"Code: {head.stdout.strip() or 'unknown'}{changes}."


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="about a minute in all")
    parser.add_argument("--rounds", type=int, help="proxy rounds (default 4, --quick 2)")
    parser.add_argument("--duration", type=int, help="seconds per wrk run (default 3, --quick 1)")
    parser.add_argument("--baseline-rev", help="also measure the code of this git revision")
    parser.add_argument("--loop", choices=LOOPS, default=default_loop(), help="smartroute's loop")
    parser.add_argument("--port-base", type=int, default=23000, help="first port tried")
    parser.add_argument("--only", default="", help="configurations to run, as http-lc,tcp-ip")
    part = parser.add_mutually_exclusive_group()
    part.add_argument("--micro-only", action="store_true")
    part.add_argument("--proxy-only", action="store_true")
    args = parser.parse_args(argv)
    if args.loop == "uvloop" and not uvloop_installed():
        parser.error("--loop uvloop: uvloop is not installed")
    if not args.micro_only and not all(shutil.which(tool) for tool in ("nginx", "wrk")):
        print("missing nginx or wrk: run bash scripts/install-bench-tools.sh", file=sys.stderr)
        return 2
    rounds = args.rounds or (2 if args.quick else 4)
    duration = args.duration or (1 if args.quick else 3)
    repeat, budget = (3, 0.002) if args.quick else (7, 0.02)
    rev = resolve(args.baseline_rev) if args.baseline_rev else None
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    started = time.monotonic()
    machine, load_before, code = machine_line(), load_average(), code_line()
    lines: list[str] = []
    if not args.proxy_only:
        print("micro: TargetGroup.order() and RouteTable.match", file=sys.stderr, flush=True)
        lines += ["### Per call (no sockets)", "", *order_micro(repeat, budget), ""]
        lines += [*matcher_micro(repeat, budget, rev), ""]
    if not args.micro_only:
        with tempfile.TemporaryDirectory(prefix="smartroute-balance-") as folder:
            root = Path(folder)
            (root / "logs").mkdir()
            procs = Procs(root / "logs", dict(os.environ, PYTHONUNBUFFERED="1"))
            try:
                proxy = Proxy(procs, root, args.loop, rev, args.port_base, args.only)
                proxy.start()
                checks, idle_cpu, changes = 0.0, 0.0, 0
                if "http-health" in proxy.pids:
                    checks, idle_cpu = proxy.idle_checks(1.0 if args.quick else 2.0)
                runs = run_proxy(proxy, rounds, duration, warm=not args.quick)
                if "http-health" in proxy.pids:
                    log = procs.log_tail("http-health", 100_000)
                    changes = log.count(" is down") + log.count(" is up again")
            finally:
                procs.stop_all()
        lines += [
            "### Whole proxy",
            "",
            f"{rounds} rounds of {duration} s per configuration, in turns; wrk -t1 -c50 to "
            f"`/ok` of three nginx backends (one process each) through smartroute on "
            f"{loop_description(args.loop)}; medians of the rounds; ratios to round-robin are "
            "medians of each round's ratio; spread = (max - min) / median of requests/s; "
            "shares from nginx `stub_status` over all rounds.",
            "",
            *proxy_tables(proxy, runs),
        ]
        if "http-health" in proxy.pids:
            lines += [
                f"Health checks with no traffic: {checks:.1f} checks/s reached the backends; "
                f"the health-checked proxy used {idle_cpu:.2%} of a core "
                f"({idle_cpu / max(checks, 1e-9) * 1e6:.0f} µs of CPU per check). Target "
                f"state changes it logged during the whole run: {changes}.",
                "",
            ]
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python bench/balance_bench.py", *argv])
    header = [
        f"## Load-balancing strategies: cost per request and per connection ({when})",
        "",
        "Command (from the repository root):",
        "",
        f"    {command}",
        "",
        f"Machine: {machine}. Load average (1/5/15 min) before {load_before}, after "
        f"{load_average()}. {code} Whole script: {time.monotonic() - started:.0f} s.",
        "",
    ]
    print("\n".join(header + lines).rstrip("\n"))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        print("interrupted; every process started here is stopped", file=sys.stderr)
        sys.exit(130)
