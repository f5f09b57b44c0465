"""Child processes for the benchmark: started in their own process group, always cleaned up.

Also the few /proc readings the benchmark needs: listening ports, established connections,
a process's resident memory and CPU time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ProcessError(RuntimeError):
    """A child did not come up, or a load generator failed."""


class Procs:
    """Every process the benchmark starts; :meth:`stop_all` ends each one's process group."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs = logs
        self.env = env
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start a long-running child; its output goes to ``logs/NAME.log``."""
        if name in self.running:
            raise ProcessError(f"{name} is already running")
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # its own process group: nginx's worker goes with it
            )
        self.running[name] = proc
        return proc

    def stop(self, name: str) -> None:
        proc = self.running.pop(name, None)
        if proc is not None:
            _end_group(proc)

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name)

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.logs / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def run(self, argv: Sequence[str], timeout: float) -> str:
        """Run a bounded client (wrk, iperf3) to completion and return its stdout."""
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            _end_group(proc)
            raise
        if proc.returncode != 0:
            message = (err or out).decode(errors="replace").strip()[-600:]
            raise ProcessError(f"{argv[0]} exited with {proc.returncode}: {message}")
        return out.decode(errors="replace")


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child's process group, then SIGKILL what is left after 5 s."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; a straggler in its group (an nginx worker) gets the same end.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


def _tcp_rows() -> list[tuple[int, int, int, int]]:
    """(local port, remote port, state, inode) for every IPv4 TCP socket on 127.0.0.1."""
    rows = []
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local, remote, state = fields[1], fields[2], int(fields[3], 16)
            if not local.startswith("0100007F:"):
                continue
            rows.append((int(local[9:], 16), int(remote[9:], 16), state, int(fields[9])))
    return rows


LISTEN, ESTABLISHED = 0x0A, 0x01


def listening(ports: Sequence[int]) -> set[int]:
    """Which of ``ports`` have a listener on 127.0.0.1."""
    wanted = set(ports)
    return {row[0] for row in _tcp_rows() if row[2] == LISTEN and row[0] in wanted}


def wait_listening(procs: Procs, name: str, ports: Sequence[int], timeout: float = 30.0) -> None:
    """Wait until every port of ``name`` listens; fail with its log if it exits or is late."""
    deadline = time.monotonic() + timeout
    proc = procs.running[name]
    while True:
        missing = set(ports) - listening(ports)
        if not missing:
            return
        if proc.poll() is not None:
            raise ProcessError(f"{name} exited ({proc.returncode}):\n{procs.log_tail(name)}")
        if time.monotonic() > deadline:
            raise ProcessError(f"{name} is not listening on {sorted(missing)}")
        time.sleep(0.05)


def established_to(port: int) -> int:
    """How many connections a server on 127.0.0.1:``port`` has accepted and holds."""
    return sum(1 for row in _tcp_rows() if row[0] == port and row[2] == ESTABLISHED)


def port_free(port: int) -> bool:
    """True when nothing on 127.0.0.1 uses ``port`` at all (no listener, no connection)."""
    return all(row[0] != port for row in _tcp_rows())


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (VmRSS in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ProcessError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` so far (all its threads)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # Fields 14 and 15 of stat(5); the slice starts at field 3.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
