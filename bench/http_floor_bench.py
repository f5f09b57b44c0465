"""How far the HTTP reverse proxy is from what Python can do: HAProxy, the floor, smartroute.

Runs the kept-alive HTTP workload of ``run.py`` (wrk -t1 -c50, GET /ok from nginx) against
four proxies in turns, ``--rounds`` times: HAProxy (``mode http``, nbthread 1), the floor of
``http_floor.py`` on a bare epoll loop and on uvloop, and smartroute on uvloop. Prints the
median requests/s and proxy CPU per request of each, and each one's ratio to HAProxy.

    python bench/http_floor_bench.py [--rounds N] [--duration S]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_procs import Procs, cpu_seconds, wait_listening
from bench_setup import nginx_main_conf

HERE = Path(__file__).resolve().parent
UVLOOP = (
    "import runpy, sys, uvloop; uvloop.install(); sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def free_ports(count: int) -> list[int]:
    import socket

    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(count)]
    ports = [s.getsockname()[1] for s in socks]
    for sock in socks:
        sock.close()
    return ports


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="http-floor-"))
    backend, port = free_ports(2)
    (root / "nginx.conf").write_text(
        nginx_main_conf(
            root,
            f'    server {{ listen 127.0.0.1:{backend}; location = /ok {{ return 200 "ok"; }} }}\n',
        )
    )
    (root / "haproxy.cfg").write_text(
        "global\n  nbthread 1\n  maxconn 4000\ndefaults\n  mode http\n  timeout connect 5s\n"
        "  timeout client 30s\n  timeout server 30s\n"
        f"frontend f\n  bind 127.0.0.1:{port}\n  default_backend b\n"
        f"backend b\n  http-reuse always\n  server s 127.0.0.1:{backend}\n"
    )
    routes = [{"match": {"ports": port}, "action": {"type": "forward", "protocol": "http",
               "targets": [{"host": "127.0.0.1", "port": backend}]}}]  # fmt: skip
    (root / "routes.json").write_text(json.dumps(routes))
    floor = [sys.executable, str(HERE / "http_floor.py"), str(port), str(backend)]
    systems = {
        "HAProxy (mode http)": ["haproxy", "-f", str(root / "haproxy.cfg")],
        "floor, bare epoll loop": floor,
        "floor, on uvloop": [*floor, "--loop", "uvloop"],
        "smartroute, on uvloop": [
            sys.executable, "-c", UVLOOP, str(HERE / "smartroute_server.py"),
            str(root / "routes.json"),
        ],
    }  # fmt: skip
    procs = Procs(root, {"PATH": "/usr/sbin:/usr/bin:/bin", "PYTHONPATH": str(HERE.parent)})
    rates: dict[str, list[float]] = {name: [] for name in systems}
    cpus: dict[str, list[float]] = {name: [] for name in systems}
    try:
        procs.start("nginx", ["nginx", "-c", str(root / "nginx.conf"), "-p", str(root)])
        wait_listening(procs, "nginx", [backend])
        for _ in range(args.rounds):
            for name, argv in systems.items():
                proxy = procs.start("proxy", argv)
                wait_listening(procs, "proxy", [port])
                time.sleep(0.2)  # the proxy's start-up CPU is not the workload's
                before = cpu_seconds(proxy.pid)
                out = procs.run(
                    ["wrk", "-t1", "-c50", f"-d{args.duration:g}s", f"http://127.0.0.1:{port}/ok"],
                    timeout=args.duration + 30,
                )
                spent = cpu_seconds(proxy.pid) - before
                procs.stop("proxy")
                summary = next(line for line in out.splitlines() if "requests in" in line)
                requests = int(summary.split()[0])
                rates[name].append(requests / args.duration)
                cpus[name].append(spent / requests * 1e6)
    finally:
        procs.stop_all()
    reference = statistics.median(rates["HAProxy (mode http)"])
    print(f"{args.rounds} rounds of {args.duration:g} s, wrk -t1 -c50, medians")
    print(f"{'proxy':<24}{'requests/s':>12}{'CPU µs/request':>16}{'/ HAProxy':>11}")
    for name in systems:
        rate, cpu = statistics.median(rates[name]), statistics.median(cpus[name])
        print(f"{name:<24}{rate:>12,.0f}{cpu:>16.1f}{rate / reference:>11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
