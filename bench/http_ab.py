"""A/B: kept-alive HTTP on the fast lane, smartroute from two trees in one run.

    git worktree add /tmp/before <commit>
    python3 bench/http_ab.py /tmp/before . --rounds 10 --duration 3 --loop uvloop

nginx answers ``/ok``; one ``forward`` route with ``protocol: "http"`` to 127.0.0.1 (the fast
lane); ``wrk -t1 -c50``. For each round, each tree in turn (A B B A ...): start
``bench/smartroute_server.py`` of that tree with ``PYTHONPATH=<tree>``, read its CPU from
/proc, run wrk, read the CPU again. Prints medians of req/s and CPU µs per request and the
ratio after/before.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_procs import Procs, cpu_seconds, wait_listening  # noqa: E402
from bench_setup import nginx_main_conf  # noqa: E402
from http_floor_bench import free_ports  # noqa: E402

UVLOOP = (
    "import runpy, sys, uvloop; uvloop.install(); sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)
PLAIN = (
    "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="the tree to compare against (a git worktree)")
    parser.add_argument("after", help="the tree under test")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    trees = {"before": str(Path(args.before).resolve()), "after": str(Path(args.after).resolve())}
    root = Path(tempfile.mkdtemp(prefix="http-ab-"))
    backend, port = free_ports(2)
    server = f'    server {{ listen 127.0.0.1:{backend}; location = /ok {{ return 200 "ok"; }} }}\n'
    (root / "nginx.conf").write_text(nginx_main_conf(root, server))
    routes = [
        {
            "match": {"ports": port},
            "action": {
                "type": "forward",
                "protocol": "http",
                "targets": [{"host": "127.0.0.1", "port": backend}],
            },
        }
    ]
    (root / "routes.json").write_text(json.dumps(routes))
    rates: dict[str, list[float]] = {name: [] for name in trees}
    cpus: dict[str, list[float]] = {name: [] for name in trees}
    env = {"PATH": "/usr/sbin:/usr/bin:/bin"}
    procs = {name: Procs(root, {**env, "PYTHONPATH": tree}) for name, tree in trees.items()}
    code = UVLOOP if args.loop == "uvloop" else PLAIN
    try:
        procs["before"].start("nginx", ["nginx", "-c", str(root / "nginx.conf"), "-p", str(root)])
        wait_listening(procs["before"], "nginx", [backend])
        for round_ in range(args.rounds):
            order = list(trees.items()) if round_ % 2 == 0 else list(reversed(trees.items()))
            for name, tree in order:
                runner = procs[name]
                server_py = f"{tree}/bench/smartroute_server.py"
                proxy = runner.start(
                    "proxy", [sys.executable, "-c", code, server_py, str(root / "routes.json")]
                )
                wait_listening(runner, "proxy", [port])
                time.sleep(0.2)
                before = cpu_seconds(proxy.pid)
                url = f"http://127.0.0.1:{port}/ok"
                out = runner.run(
                    ["wrk", "-t1", "-c50", f"-d{args.duration:g}s", url],
                    timeout=args.duration + 30,
                )
                spent = cpu_seconds(proxy.pid) - before
                runner.stop("proxy")
                line = next(line for line in out.splitlines() if "requests in" in line)
                count = int(line.split()[0])
                rates[name].append(count / args.duration)
                cpus[name].append(spent / count * 1e6)
                print(name, round(count / args.duration), round(spent / count * 1e6, 1))
    finally:
        for runner in procs.values():
            runner.stop_all()
    print(f"{args.rounds} rounds of {args.duration:g} s, wrk -t1 -c50, {args.loop}, medians")
    for name in trees:
        rate, cpu = statistics.median(rates[name]), statistics.median(cpus[name])
        print(f"{name:<8} {rate:>10,.0f} req/s {cpu:>6.1f} µs CPU/request")
    ratio = statistics.median(rates["after"]) / statistics.median(rates["before"])
    print(f"after/before req/s: {ratio:.3f}")


if __name__ == "__main__":
    main()
