"""In-process hooks: what one ``on_request`` hook and one ``on_data`` observer cost, and what
routes without hooks pay.

    python bench/hooks_bench.py                           # about 2 minutes on 2 cores
    python bench/hooks_bench.py --quick                   # under a minute
    python bench/hooks_bench.py --baseline-rev 0ba5ea8~1  # also the code before: 3 minutes
    python bench/hooks_bench.py --rev cdb54fc             # a commit, not the working tree

Two parts, printed as Markdown:

1. Micro (no sockets), on the chosen event loop: ``run_hooks`` with one ``on_request`` hook
   that returns None and one that returns ``{"set_headers": {...}}``, the hook alone,
   ``asyncio.timeout`` alone (``run_hooks`` puts one around each call), and
   ``consult_request`` (what the HTTP session calls per request: the hook's request object
   and context, then ``run_hooks``) with ``rewrite_request`` for the header case. With
   ``--baseline-rev``, ``RouteTable.match`` against that revision's matcher too
   (``balance_micro.matcher_micro``).
2. Whole proxy: one nginx backend (``/ok``) behind smartroute on 127.0.0.1, each
   configuration a route in a smartroute process of its own (``bench_hooks.py``, on uvloop
   when installed), ``wrk -t1 -c50`` kept-alive. HTTP (``"protocol": "http"``): no hook on the
   fast lane (the reference), no hook on the transport path (target host ``localhost``: not
   an IP literal, so the route leaves the lane), one proxy-wide ``on_request`` hook returning
   None, one returning ``set_headers``. Raw TCP (``"protocol": "tcp"``, the same kept-alive
   requests relayed as bytes, about one chunk each way per request): no hook on the lane, no
   hook on the transport path, one ``on_data`` observer that does nothing. With
   ``--baseline-rev REV`` the four no-hook configurations also run on the code of ``REV``
   (``git archive``, read-only). Every configuration runs once per round, in turns (the
   first one moves each round), after a 1 s warm-up; medians of the rounds, ratios and
   differences paired within each round, proxy CPU per request from ``/proc/PID/stat`` (all
   threads: the observer thread included), p99 latency (wrk).

Before the rounds each server reports whether the lane serves its port and which hooks its
route runs, and a request through each HTTP configuration checks whether ``X-Hooked``
reached nginx (it echoes it): the run stops if a configuration is not what it claims.
``--rev REV`` measures the code of git revision ``REV`` instead of the working tree (useful
while others edit ``smartroute/``): the servers run a ``git archive`` of it, and the micro part
runs in a child process with it first on ``PYTHONPATH``; each checks which ``smartroute`` it
loaded. ``--only http-pass,tcp-observer`` runs some configurations (the reference of each kind
stays); ``--micro-only`` and ``--proxy-only`` run one part. Every process started here runs
in its own process group and is ended on exit, error, Ctrl-C and SIGTERM; every load is
bounded in time. Needs nginx and wrk: ``bash scripts/install-bench-tools.sh``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import gc
import inspect
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, cast

from balance_bench import LAUNCHER, Run, code_line, extract, resolve, stub_status
from balance_micro import matcher_micro
from bench_hooks import HEADER, PASS
from bench_procs import ProcessError, Procs, cpu_seconds, wait_listening
from bench_report import load_average, machine_line
from bench_setup import Ports, nginx_main_conf
from run import LOOPS, default_loop, loop_description, uvloop_installed

from smartroute import RouteContext
from smartroute.protocols.http import RequestHead, parse_request_head
from smartroute.routing.facts import ConnectionFacts, RouteMatch
from smartroute.routing.model import Hooks
from smartroute.routing.patterns import parse_ip
from smartroute.routing.validation import validate_routes
from smartroute.routing.validation.hooks import hook_chain
from smartroute.server import decision
from smartroute.server.hooks import REQUEST_KEYS, HookRequest, Verdict, rewrite_request, run_hooks

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# -- whole proxy -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """One route, served by a smartroute process of its own."""

    key: str
    title: str
    kind: str  # "http": "protocol": "http"; "tcp": "protocol": "tcp" (bytes relayed)
    host: str = "127.0.0.1"  # "localhost" is no IP literal: the route leaves the lane
    hooks: tuple[str, ...] = ()  # proxy-wide hooks (setting "hooks"), by import path
    before: bool = False  # run the code of --baseline-rev
    plugin: bool = False  # one plugin (bench_plugin.py: on_request -> {}) for every route

    @property
    def lane(self) -> bool:
        """Whether the fast lane should serve the route."""
        return self.host == "127.0.0.1" and not self.hooks and not self.plugin

    @property
    def path(self) -> str:
        return "fast lane" if self.lane else "transport"


LANE, TRANSPORT = "no hook (reference)", 'no hook, target "localhost"'
CONFIGS = [
    Config("http-lane", LANE, "http"),
    Config("http-transport", TRANSPORT, "http", host="localhost"),
    Config("http-pass", "one `on_request` hook -> None", "http", hooks=("bench_hooks:PASS",)),
    Config(
        "http-header",
        "one `on_request` hook -> `set_headers`",
        "http",
        hooks=("bench_hooks:HEADER",),
    ),
    Config(
        "http-plugin",
        "one plugin `on_request` hook -> {} (external process, Unix socket)",
        "http",
        plugin=True,
    ),
    Config("tcp-lane", LANE, "tcp"),
    Config("tcp-transport", TRANSPORT, "tcp", host="localhost"),
    Config("tcp-observer", "one `on_data` observer", "tcp", hooks=("bench_hooks:OBSERVER",)),
]


def proxy_configs(rev: str | None, only: str) -> list[Config]:
    configs = list(CONFIGS)
    if rev is not None:
        for config in CONFIGS:
            if not config.hooks:
                title = f"{config.title.removesuffix(' (reference)')}, code before ({rev})"
                key = f"{config.key}-before"
                configs.append(dataclasses.replace(config, key=key, title=title, before=True))
    if only:  # the reference of each kind stays
        wanted = set(only.split(","))
        kinds = {key.split("-")[0] for key in wanted}
        keep = wanted | {f"{kind}-lane" for kind in kinds}
        configs = [c for c in configs if c.key in keep]
    return configs


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


class Proxy:
    """The backend, the smartroute processes and how to run one configuration."""

    def __init__(
        self,
        procs: Procs,
        root: Path,
        loop: str,
        source: Path,
        rev: str | None,
        port_base: int,
        only: str,
    ) -> None:
        self.procs, self.root, self.loop, self.source, self.rev = procs, root, loop, source, rev
        self.configs = proxy_configs(rev, only)
        ports = Ports(port_base)
        self.backend = ports.take()
        self.ports = {config.key: ports.take() for config in self.configs}
        self.pids: dict[str, int] = {}

    def start(self) -> None:
        root = self.root / "nginx"
        root.mkdir()
        server = (
            f"    server {{ listen 127.0.0.1:{self.backend} backlog=4096;\n"
            "        location = /ok { add_header X-Seen-Hooked $http_x_hooked;\n"
            '            return 200 "ok"; }\n'
            "        location = /nginx-status { stub_status; } }\n"
        )
        (root / "nginx.conf").write_text(nginx_main_conf(root, server))
        argv = ["nginx", "-p", str(root), "-e", str(root / "error.log")]
        self.procs.start("nginx", [*argv, "-c", str(root / "nginx.conf")])
        wait_listening(self.procs, "nginx", [self.backend])
        before = self.root / "before"
        if any(c.before for c in self.configs):
            assert self.rev is not None
            extract(self.rev, before)
        for config in self.configs:
            path = self.root / f"{config.key}.json"
            path.write_text(self._server_config(config))
            source = before if config.before else self.source
            argv = [sys.executable, "-c", LAUNCHER, str(source), self.loop]
            script = [str(HERE / "bench_hooks.py"), str(path)]
            self.pids[config.key] = self.procs.start(config.key, [*argv, *script]).pid
        for config in self.configs:
            wait_listening(self.procs, config.key, [self.ports[config.key]])
            self._check(config, before if config.before else self.source)

    def _server_config(self, config: Config) -> str:
        target = {"host": config.host, "port": self.backend}
        action = {"type": "forward", "protocol": config.kind, "targets": [target]}
        route = {"name": config.key, "match": {"ports": self.ports[config.key]}, "action": action}
        settings: dict[str, Any] = {"hooks": list(config.hooks)} if config.hooks else {}
        if config.plugin:
            command = [sys.executable, str(HERE / "bench_plugin.py")]
            settings["plugins"] = [{"name": "bench", "command": command}]
        return json.dumps({"routes": [route], "settings": settings})

    def _check(self, config: Config, source: Path) -> None:
        """The server loaded the right smartroute, the lane serves the port or not as the
        configuration says, its hooks are in place, and (HTTP) the header hook's header
        reaches nginx and no other configuration's does."""
        log = self.procs.log_tail(config.key, 50)
        if f"smartroute from {source}/smartroute/" not in log:
            raise ProcessError(f"{config.key} did not load smartroute from {source}:\n{log}")
        hooks = {
            "bench_hooks:PASS": "on_request 1",
            "bench_hooks:HEADER": "on_request 1",
            "bench_hooks:OBSERVER": "on_data 1",
        }
        expected = "; hooks: " + (", ".join(hooks[h] for h in config.hooks) or "none")
        if config.plugin:  # a plugin's hook object has every hook method
            expected = "; hooks: on_connect 1, on_request 1, on_response 1, on_disconnect 1"
        line = f"port {self.ports[config.key]}: lane {config.lane}{expected}"
        if line not in log:
            raise ProcessError(f"{config.key}: expected {line!r} in its log:\n{log}")
        url = f"http://127.0.0.1:{self.ports[config.key]}/ok"
        with urllib.request.urlopen(url, timeout=10) as answer:
            seen = answer.headers.get("X-Seen-Hooked")
        if seen != ("1" if "bench_hooks:HEADER" in config.hooks else None):
            raise ProcessError(f"{config.key}: nginx saw X-Hooked {seen!r}")

    def measure(self, config: Config, duration: int) -> Run:
        url = f"http://127.0.0.1:{self.ports[config.key]}/ok"
        argv = ["wrk", "-t1", "-c50", f"-d{duration}s", "--timeout", "5s", "--latency", url]
        pid = self.pids[config.key]
        before, cpu = stub_status(self.backend), cpu_seconds(pid)
        out = self.procs.run(argv, timeout=duration + 30)
        spent, after = cpu_seconds(pid) - cpu, stub_status(self.backend)
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
            served=[after[1] - before[1] - 1],
            accepted=[after[0] - before[0] - 1],
        )


def run_proxy(proxy: Proxy, rounds: int, duration: int, warm: bool) -> dict[str, list[Run]]:
    configs = proxy.configs
    warming = configs if warm else [c for c in configs if c.key.endswith("-lane")]
    print(f"warm-up: 1 s of {len(warming)} configuration(s)", file=sys.stderr, flush=True)
    for config in warming:
        proxy.measure(config, 1)
    runs: dict[str, list[Run]] = {c.key: [] for c in configs}
    for number in range(rounds):
        shift = number % len(configs)
        for config in configs[shift:] + configs[:shift]:
            run = proxy.measure(config, duration)
            runs[config.key].append(run)
            print(
                f"[{number + 1}/{rounds}] {config.key:22} {run.rate:10,.0f}/s "
                f"CPU {run.cpu_us:6.1f} µs  p99 {run.p99:6.2f} ms"
                + (f"  errors {run.errors}" if run.errors else ""),
                file=sys.stderr,
                flush=True,
            )
            time.sleep(0.3)  # closing connections settle
    return runs


def _paired(mine: list[Run], base: list[Run], value: Callable[[Run, Run], float]) -> float:
    return statistics.median(value(r, b) for r, b in zip(mine, base, strict=True))


def proxy_tables(proxy: Proxy, runs: dict[str, list[Run]]) -> list[str]:
    lines: list[str] = []
    for kind in ("http", "tcp"):
        if f"{kind}-lane" not in runs:
            continue
        base, bare = runs[f"{kind}-lane"], runs.get(f"{kind}-transport")
        lines += [
            'Kept-alive HTTP through `"protocol": "http"`:'
            if kind == "http"
            else 'The same kept-alive requests relayed as bytes by `"protocol": "tcp"`:',
            "",
            "| configuration | path | requests/s | / reference | proxy CPU µs/request "
            "| / reference | CPU µs over the transport path without hook | p99 latency ms "
            "| new backend conns / 1k requests | spread |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for config in (c for c in proxy.configs if c.kind == kind and not c.before):
            mine = runs[config.key]
            rates = [r.rate for r in mine]
            rate = statistics.median(rates)
            over = "—"
            if bare is not None and config.key not in (f"{kind}-lane", f"{kind}-transport"):
                over = f"{_paired(mine, bare, lambda r, b: r.cpu_us - b.cpu_us):+.1f}"
            fresh = sum(sum(r.accepted) for r in mine) / sum(r.requests for r in mine) * 1e3
            lines.append(
                f"| {config.title} | {config.path} | {rate:,.0f} "
                f"| {_paired(mine, base, lambda r, b: r.rate / b.rate):.2f} "
                f"| {statistics.median(r.cpu_us for r in mine):.1f} "
                f"| {_paired(mine, base, lambda r, b: r.cpu_us / b.cpu_us):.2f} | {over} "
                f"| {statistics.median(r.p99 for r in mine):.2f} | {fresh:.1f} "
                f"| {(max(rates) - min(rates)) / rate:.0%} |"
            )
        errors = {c.key: sum(r.errors for r in runs[c.key]) for c in proxy.configs}
        if any(n for key, n in errors.items() if key.startswith(kind)):
            listed = ", ".join(f"{k}: {n}" for k, n in errors.items() if n and k.startswith(kind))
            lines += ["", f"wrk errors (socket errors and non-2xx), all rounds: {listed}."]
        lines.append("")
    befores = [c for c in proxy.configs if c.before]
    if befores:
        lines += [
            f"Routes without hooks, this code against the code before the hooks ({proxy.rev}), "
            "paired within each round:",
            "",
            "| route | path | CPU µs/request now | before | now / before | requests/s now "
            "| before | now / before |",
            "|---|---|--:|--:|--:|--:|--:|--:|",
        ]
        for config in befores:
            now, old = runs[config.key.removesuffix("-before")], runs[config.key]
            lines.append(
                f'| `"protocol": "{config.kind}"`, target {config.host} | {config.path} '
                f"| {statistics.median(r.cpu_us for r in now):.1f} "
                f"| {statistics.median(r.cpu_us for r in old):.1f} "
                f"| {_paired(now, old, lambda r, b: r.cpu_us / b.cpu_us):.2f} "
                f"| {statistics.median(r.rate for r in now):,.0f} "
                f"| {statistics.median(r.rate for r in old):,.0f} "
                f"| {_paired(now, old, lambda r, b: r.rate / b.rate):.2f} |"
            )
        lines.append("")
    return lines


# -- micro -------------------------------------------------------------------------------------

AsyncCase = Callable[[], Awaitable[object]]
BATCH = 100  # calls in a row; then the loop runs once (timed: it drops cancelled timers)


async def time_async(cases: dict[str, AsyncCase], repeat: int, budget: float) -> dict[str, float]:
    """Median ns per awaited call of each case (the ``await`` and the loop around it
    included). Each case gets about ``budget`` seconds per repeat (its call count fixed once,
    from a short calibration); cases take turns, in a rotated order from one repeat to the
    next; the garbage collector is off. After every :data:`BATCH` calls the event loop runs
    once, as it does between requests in the proxy, and that is timed too: the timer each
    ``asyncio.timeout`` leaves, cancelled, is dropped there (the floor includes the loop's
    own pass)."""
    counts: dict[str, int] = {}
    for name, call in cases.items():
        start = time.perf_counter()
        for _ in range(200):
            await call()
        per_call = (time.perf_counter() - start) / 200
        counts[name] = max(BATCH, min(500_000, int(budget / max(per_call, 1e-9))))
        await asyncio.sleep(0)
    runs: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    gc.disable()
    try:
        for run in range(repeat):
            shift = run * 3 % len(names)
            for name in names[shift:] + names[:shift]:
                call, left = cases[name], counts[name]
                start = time.perf_counter()
                while left > 0:
                    for _ in range(min(BATCH, left)):
                        await call()
                    left -= BATCH
                    await asyncio.sleep(0)
                runs[name].append((time.perf_counter() - start) / counts[name] * 1e9)
    finally:
        gc.enable()
    return {name: statistics.median(values) for name, values in runs.items()}


def _request() -> tuple[RequestHead, ConnectionFacts]:
    """The request wrk sends here, parsed, and its facts (as ``request_facts`` makes them)."""
    head = parse_request_head(b"GET /ok HTTP/1.1\r\nHost: 127.0.0.1:23001\r\n\r\n")
    assert head is not None
    client = parse_ip("127.0.0.1")
    facts = ConnectionFacts(23001, client, head.host, path=head.path, headers=head.header_map())
    return head, facts


def _context(head: RequestHead, facts: ConnectionFacts, found: RouteMatch) -> RouteContext:
    """What ``HttpSession.context`` builds for a hook, field for field."""
    return RouteContext(
        port=facts.port,
        client_ip="127.0.0.1",
        client_port=40000,
        server_ip="127.0.0.1",
        connection_id="c1",
        timestamp=time.time(),
        domain=facts.domain,
        path=head.path,
        query=head.query,
        method=head.method,
        headers=facts.headers,
        is_tls=facts.is_tls,
        tls_version=facts.tls_version,
        alpn=None,
        route_name=found.route.name,
        params=dict(found.params),
    )


def micro_cases() -> dict[str, AsyncCase]:
    head, facts = _request()
    chains: dict[str, Hooks] = {}
    found: dict[str, RouteMatch] = {}
    for name, hook in (("None", PASS), ("set_headers", HEADER)):
        chain = hook_chain((hook,), "closed", 1.0)
        assert chain is not None
        route = validate_routes(
            [{"name": name, "match": {"ports": 23001}, "action": {"type": "forward",
              "protocol": "http", "targets": [{"host": "127.0.0.1", "port": 8080}]}}]
        )[0]  # fmt: skip
        chains[name] = chain
        found[name] = RouteMatch(dataclasses.replace(route, chain=chain), {})
    ctx = _context(head, facts, found["None"])
    request = HookRequest(head.method, head.path, head.query, head.header_map())
    nobody = cast(Any, None)  # runtime and record: read only on a fallback or a refusal

    async def noop() -> None:
        return None

    async def timeout() -> None:
        async with asyncio.timeout(1.0):
            pass

    # Newer code keeps what a connection's hooks heard in a per-connection ``heard`` (one per
    # case here: one connection's requests); the code of 0ba5ea8-cdb54fc has no such argument.
    code: Any = decision
    consult_any = code.consult_request
    takes_heard = "heard" in inspect.signature(consult_any).parameters
    heard = {name: code.Heard() for name in found} if takes_heard else {}

    async def consult(name: str) -> object:
        extra = {"heard": heard[name]} if takes_heard else {}
        verdict, _, said = await consult_any(
            nobody, nobody, facts, head, found[name], partial(_context, head, facts), **extra
        )
        assert isinstance(verdict, RouteMatch) and verdict.route is found[name].route
        if said is not None:  # as the session does with a verdict that lets the request on
            return rewrite_request(head, said)
        return verdict

    async def hook_request() -> object:
        return HookRequest(head.method, head.path, head.query, head.header_map())

    async def context() -> object:
        return _context(head, facts, found["None"])

    said = Verdict(set_headers={"X-Hooked": "1"})

    async def rewrite() -> object:
        return rewrite_request(head, said)

    def run(name: str) -> Awaitable[Verdict | None]:
        return run_hooks(chains[name], "on_request", REQUEST_KEYS, ctx, request)

    return {
        "an `async def` that returns at once (the floor)": noop,
        "`asyncio.timeout(1.0)` around nothing": timeout,
        "the hook alone -> None": partial(PASS.on_request, ctx, request),
        "the hook alone -> set_headers": partial(HEADER.on_request, ctx, request),
        "`HookRequest` for the hook (`header_map()`)": hook_request,
        "`RouteContext` for the hook (as `HttpSession.context`)": context,
        "`run_hooks`, one hook -> None": partial(run, "None"),
        "`run_hooks`, one hook -> set_headers": partial(run, "set_headers"),
        "`rewrite_request` with one set header": rewrite,
        "`consult_request`, one hook -> None": partial(consult, "None"),
        "`consult_request` + `rewrite_request`, one hook -> set_headers": partial(
            consult, "set_headers"
        ),
    }


def loop_factory(loop: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def hooks_micro(loop: str, repeat: int, budget: float) -> list[str]:
    cases = micro_cases()
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        ns = runner.run(time_async(cases, repeat, budget))
    floor = ns[next(iter(cases))]
    lines = [
        f"Per awaited call on {loop_description(loop)}, one `on_request` hook (`hooks_fail` "
        "closed, `hook_timeout` 1 s), the request wrk sends (`GET /ok`, one `Host` header). "
        "µs per call; net = minus the floor (an `await` of a coroutine that returns at once, "
        "and the loop around it).",
        "",
        "| case | µs per call | net µs |",
        "|---|--:|--:|",
    ]
    for name in cases:
        net = "—" if ns[name] is floor else f"{(ns[name] - floor) / 1e3:.2f}"
        lines.append(f"| {name} | {ns[name] / 1e3:.2f} | {net} |")
    return lines


# -- main --------------------------------------------------------------------------------------


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def micro(args: argparse.Namespace, source: Path, rev: str | None) -> list[str]:
    """The micro part, here (the working tree) or in a child whose ``smartroute`` is
    ``source`` (``--rev``: PYTHONPATH comes before the editable install)."""
    repeat, budget = (3, 0.005) if args.quick else (7, 0.03)
    if source == REPO:
        import smartroute

        print(f"micro: smartroute from {smartroute.__file__}", file=sys.stderr, flush=True)
        lines = ["### Per call (no sockets)", "", *hooks_micro(args.loop, repeat, budget), ""]
        if rev is not None:
            lines += [*matcher_micro(repeat, min(budget, 0.02), rev), ""]
        return lines
    argv = [sys.executable, str(HERE / "hooks_bench.py"), "--micro-only", "--loop", args.loop]
    argv += ["--quick"] if args.quick else []
    argv += ["--baseline-rev", rev] if rev is not None else []
    env = dict(os.environ, PYTHONPATH=str(source))
    child = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    if child.returncode != 0 or f"smartroute from {source}/smartroute/" not in child.stderr:
        raise ProcessError(f"micro part on {source} failed:\n{child.stderr[-2000:]}")
    print(child.stderr, end="", file=sys.stderr, flush=True)
    found = child.stdout.index("### Per call (no sockets)")
    return [*child.stdout[found:].rstrip("\n").splitlines(), ""]


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="under a minute in all")
    parser.add_argument("--rounds", type=int, help="proxy rounds (default 4, --quick 2)")
    parser.add_argument("--duration", type=int, help="seconds per wrk run (default 3, --quick 1)")
    parser.add_argument("--rev", help="measure the code of this git revision, not the working tree")
    parser.add_argument("--baseline-rev", help="also measure the code of this git revision")
    parser.add_argument("--loop", choices=LOOPS, default=default_loop(), help="smartroute's loop")
    parser.add_argument("--port-base", type=int, default=24000, help="first port tried")
    parser.add_argument("--only", default="", help="configurations to run, as http-pass,tcp-lane")
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
    rev = resolve(args.baseline_rev) if args.baseline_rev else None
    measured = resolve(args.rev) if args.rev else None
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    started = time.monotonic()
    machine, load_before = machine_line(), load_average()
    code = (
        code_line()
        if measured is None
        else f"Code: {measured} (`git archive`; the working tree's smartroute/ is not used)."
    )
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="smartroute-hooks-") as folder:
        root = Path(folder)
        source = REPO
        if measured is not None:
            source = root / "code"
            extract(measured, source)
        if not args.proxy_only:
            lines += micro(args, source, rev)
        if not args.micro_only:
            (root / "logs").mkdir()
            procs = Procs(root / "logs", dict(os.environ, PYTHONUNBUFFERED="1"))
            try:
                proxy = Proxy(procs, root, args.loop, source, rev, args.port_base, args.only)
                proxy.start()
                runs = run_proxy(proxy, rounds, duration, warm=not args.quick)
                complaints = [
                    f"{key}: {line}"
                    for key in proxy.pids
                    for line in procs.log_tail(key, 100_000).splitlines()
                    if "WARNING" in line or "ERROR" in line or "Traceback" in line
                ]
            finally:
                procs.stop_all()
            lines += [
                "### Whole proxy",
                "",
                f"{rounds} round{'s' * (rounds != 1)} of {duration} s per configuration, in "
                "turns; wrk -t1 -c50 "
                f"kept-alive to `/ok` of one nginx (one process) through smartroute on "
                f"{loop_description(args.loop)}, one route per smartroute process; medians of "
                "the rounds; ratios and differences are medians of each round's own; spread = "
                "(max - min) / median of requests/s. Hooks are proxy-wide (setting `hooks`, by "
                "import path `bench_hooks:...`).",
                "",
                *proxy_tables(proxy, runs),
            ]
            if complaints:
                lines += ["Warnings or errors the proxies logged:", "", *complaints[:20], ""]
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python bench/hooks_bench.py", *argv])
    header = [
        f"## In-process hooks: cost per request ({when})",
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
