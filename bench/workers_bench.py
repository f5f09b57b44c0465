"""New connections per second through a plain TCP forward: ``workers=1`` against ``workers=2``.

    python bench/workers_bench.py                   # 5 rounds of 5 s runs, about a minute
    python bench/workers_bench.py --rounds 2 --duration 2

The workload is bench/run.py's "new connections": ``wrk -t1 -c50 -H "Connection: close"``
against nginx's ``location = /ok { return 200 "ok"; }``, through a port-only ``forward`` route.
Three systems run in turn in every round (direct nginx, smartroute with one process,
smartroute with two), after one unrecorded 1 s warm-up of each; the report gives the medians,
the ratio workers=2 / workers=1, the spread of the rounds and the proxy's CPU time per
connection, summed over its processes (from ``/proc/PID/stat``). Everything listens on
127.0.0.1 and every process started here runs in its own process group, ended on exit.

Internally ``--serve WORKERS PORT TARGET`` runs one smartroute (no logging handler, like
bench/smartroute_server.py) and prints the ids of its processes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench_loads import Sample, wrk
from bench_procs import Procs, cpu_seconds, port_free, wait_listening
from bench_setup import nginx_main_conf

SYSTEMS = ("direct", "workers=1", "workers=2")


def nginx_conf(root: Path, port: int) -> str:
    return nginx_main_conf(
        root,
        f"""\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /ok {{ return 200 "ok"; }}
    }}
""",
    )


async def serve(workers: int, port: int, target: int) -> None:
    from smartroute import SmartRoute

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    route = {
        "name": "relay",
        "match": {"ports": port},
        "action": {"type": "forward", "targets": [{"host": "127.0.0.1", "port": target}]},
    }
    proxy = SmartRoute(
        [route], bind_address="127.0.0.1", graceful_shutdown_timeout=1.0, workers=workers
    )
    await proxy.start()
    children = proxy._workers.pids if proxy._workers is not None else []
    print("pids", os.getpid(), *children, flush=True)
    await stop.wait()
    await proxy.stop()


def free_ports(base: int, count: int) -> list[int]:
    ports: list[int] = []
    port = base
    while len(ports) < count:
        if port_free(port):
            ports.append(port)
        port += 1
    return ports


def proxy_pids(procs: Procs, name: str) -> list[int]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in procs.log_tail(name, 50).splitlines():
            if line.startswith("pids "):
                return [int(pid) for pid in line.split()[1:]]
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not report its processes:\n{procs.log_tail(name)}")


def measure(procs: Procs, port: int, pids: list[int], duration: float, conns: int) -> Sample:
    before = sum(cpu_seconds(pid) for pid in pids)
    sample = wrk(
        procs, f"http://127.0.0.1:{port}/ok", duration, close=True, pid=None, connections=conns
    )
    if pids:
        sample.cpu = sum(cpu_seconds(pid) for pid in pids) - before
    return sample


def report(results: dict[str, list[Sample]], rounds: int, duration: float, conns: int) -> str:
    medians = {
        name: statistics.median(s.value for s in samples) for name, samples in results.items()
    }
    lines = [
        f"workers_bench: new connections/s, wrk -t1 -c{conns} Connection: close, "
        f"{rounds} rounds of {duration:g} s, medians (spread = (max - min) / median)",
        "",
        "| system | connections/s | spread | proxy CPU per connection | errors |",
        "|---|---|---|---|---|",
    ]
    for name, samples in results.items():
        values = [s.value for s in samples]
        spread = (max(values) - min(values)) / medians[name] if medians[name] else 0.0
        cpus = [s.cpu_per_work for s in samples if s.cpu_per_work is not None]
        cpu = f"{statistics.median(cpus) * 1e6:,.0f} µs" if cpus else "—"
        errors = sum(s.errors for s in samples)
        lines.append(f"| {name} | {medians[name]:,.0f} | {spread:.0%} | {cpu} | {errors} |")
    ratio = medians["workers=2"] / medians["workers=1"] if medians["workers=1"] else 0.0
    lines += ["", f"workers=2 / workers=1: {ratio:.2f}x"]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--port-base", type=int, default=23000)
    parser.add_argument("--serve", nargs=3, type=int, metavar=("WORKERS", "PORT", "TARGET"))
    options = parser.parse_args(argv)
    if options.serve:
        asyncio.run(serve(*options.serve))
        return 0
    missing = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]
    if missing:
        print(f"missing {', '.join(missing)}: run bash scripts/install-bench-tools.sh")
        return 2
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory(prefix="smartroute-workers-bench-") as folder:
        root = Path(folder)
        (root / "logs").mkdir()
        nginx, one, two = free_ports(options.port_base, 3)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        procs = Procs(root / "logs", env)
        try:
            (root / "nginx.conf").write_text(nginx_conf(root, nginx))
            procs.start(
                "nginx",
                [
                    "nginx",
                    "-p",
                    str(root),
                    "-c",
                    str(root / "nginx.conf"),
                    "-e",
                    str(root / "nginx-error.log"),
                ],
            )
            me = str(Path(__file__).resolve())
            for name, workers, port in (("workers=1", 1, one), ("workers=2", 2, two)):
                argv = [sys.executable, me, "--serve", str(workers), str(port), str(nginx)]
                procs.start(name, argv)
            wait_listening(procs, "nginx", [nginx])
            pids = {
                "direct": [],
                "workers=1": proxy_pids(procs, "workers=1"),
                "workers=2": proxy_pids(procs, "workers=2"),
            }
            ports = {"direct": nginx, "workers=1": one, "workers=2": two}
            for name in SYSTEMS:  # warm-up, not recorded
                measure(procs, ports[name], pids[name], 1.0, options.connections)
            results: dict[str, list[Sample]] = {name: [] for name in SYSTEMS}
            for round_ in range(options.rounds):
                for name in SYSTEMS:
                    sample = measure(
                        procs, ports[name], pids[name], options.duration, options.connections
                    )
                    results[name].append(sample)
                    print(
                        f"round {round_ + 1} {name:10} {sample.value:10,.0f} conn/s",
                        file=sys.stderr,
                    )
        finally:
            procs.stop_all()
    print(report(results, options.rounds, options.duration, options.connections))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
