"""The load generators: wrk (HTTP/HTTPS), iperf3 (bulk TCP) and idle connections (memory).

Each run returns a :class:`Sample`: the measure, the units of work it covers (requests,
connections, gigabytes) and the proxy's CPU time over the run, so that CPU per unit of work
can be compared too (less sensitive than throughput to other load on a shared machine).
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request
from dataclasses import dataclass

from bench_procs import ProcessError, Procs, cpu_seconds, established_to, rss_bytes, wait_listening


@dataclass
class Sample:
    value: float  # the measure: Gbit/s, requests/s, connections/s, bytes per connection
    work: float = 0.0  # units of work done: requests, connections, gigabytes
    cpu: float | None = None  # proxy CPU seconds over the run (None without a proxy)
    errors: int = 0  # failed requests/connections (wrk socket errors and non-2xx answers)
    backend_connections: int | None = None  # connections nginx accepted during the run

    @property
    def backend_per_work(self) -> float | None:
        if self.backend_connections is None or self.work <= 0:
            return None
        return self.backend_connections / self.work

    @property
    def cpu_per_work(self) -> float | None:
        if self.cpu is None or self.work <= 0:
            return None
        return self.cpu / self.work


def _cpu(pid: int | None) -> float | None:
    return cpu_seconds(pid) if pid is not None else None


def _number(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    if found is None:
        raise ProcessError(f"cannot find {pattern!r} in:\n{text}")
    return float(found.group(1))


def wrk(
    procs: Procs,
    url: str,
    duration: float,
    *,
    close: bool,
    pid: int | None,
    connections: int = 50,
) -> Sample:
    """``wrk -t1 -cN``; with ``close`` every request is a new connection (Connection: close)."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--timeout", "5s"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(url)
    before = _cpu(pid)
    out = procs.run(argv, timeout=duration + 30)
    after = _cpu(pid)
    requests = _number(r"(\d+) requests in", out)
    errors = 0
    found = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if found is not None:
        errors += sum(int(group) for group in found.groups())
    found = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if found is not None:
        errors += int(found.group(1))
    return Sample(
        value=_number(r"Requests/sec:\s+([\d.]+)", out),
        work=requests,
        cpu=None if before is None or after is None else after - before,
        errors=errors,
    )


def iperf3(procs: Procs, server_port: int, port: int, duration: float, pid: int | None) -> Sample:
    """One iperf3 stream for ``duration`` seconds through ``port``; a fresh one-test server."""
    procs.start("iperf3-server", ["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", str(server_port)])
    try:
        wait_listening(procs, "iperf3-server", [server_port])
        argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", f"{duration:g}", "-J"]
        before = _cpu(pid)
        out = procs.run(argv, timeout=duration + 30)
        after = _cpu(pid)
    finally:
        procs.stop("iperf3-server")
    report = json.loads(out)
    received = report["end"]["sum_received"]
    return Sample(
        value=float(received["bits_per_second"]) / 1e9,
        work=float(received["bytes"]) / 1e9,
        cpu=None if before is None or after is None else after - before,
    )


def nginx_accepts(port: int) -> int:
    """nginx's count of accepted connections so far (stub_status), this request included."""
    url = f"http://127.0.0.1:{port}/nginx-status"
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    return int(text.splitlines()[2].split()[0])


def _wait_count(port: int, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while established_to(port) != count:
        if time.monotonic() > deadline:
            held = established_to(port)
            raise ProcessError(f"backend holds {held} connections, expected {count}")
        time.sleep(0.05)


def _open(port: int, count: int) -> list[socket.socket]:
    socks = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(sock)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def idle_memory(pid: int, port: int, backend: int, count: int, batch: int = 250) -> Sample:
    """Proxy RSS growth per idle connection: ``count`` connections through ``port`` held open.

    A few connections are opened and closed first so that one-time allocations (imports,
    pools) are not counted. The backend must hold no connection before the call.
    """
    _wait_count(backend, 0, 30)
    warm = _open(port, 20)
    _wait_count(backend, 20, 30)
    for sock in warm:
        sock.close()
    _wait_count(backend, 0, 30)
    time.sleep(0.5)
    before = rss_bytes(pid)
    socks: list[socket.socket] = []
    try:
        while len(socks) < count:
            socks += _open(port, min(batch, count - len(socks)))
            _wait_count(backend, len(socks), 60)
        time.sleep(1.0)  # let the proxy finish its per-connection work before sampling
        after = rss_bytes(pid)
    finally:
        for sock in socks:
            sock.close()
    _wait_count(backend, 0, 60)
    return Sample(value=(after - before) / count, work=count)
