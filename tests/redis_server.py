"""A real Redis on loopback for the tests of the shared certificate storage: Debian's redis-server.

``run_redis`` starts ``redis-server`` on a free loopback port with its data in the test's folder:
an append-only file fsync'd at every write, and an RDB snapshot on shutdown, so what was written
survives ``stop()`` (SIGTERM) and ``start()`` on the same port, and even ``kill()`` (SIGKILL, a
crash). ``pause()`` (SIGSTOP) makes a Redis that accepts connections and never answers; ``resume()``
ends that. Waits are bounded; a server that does not answer is an error with the tail of its log.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from support import LOOPBACK, free_port

REDIS_SERVER = "redis-server"
READY_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
_LOG_TAIL = 4000  # characters of the log quoted in an error


class RedisServerError(RuntimeError):
    """redis-server did not start, answer or stop as expected."""


@dataclass
class RedisServer:
    """A running redis-server. ``stop()``/``start()`` is an outage, ``kill()`` a crash and
    ``pause()``/``resume()`` a hang."""

    port: int
    folder: Path  # its data: dump.rdb and appendonlydir/
    log_path: Path  # its output, appended to across restarts
    password: str | None = None
    _command: list[str] = field(default_factory=list, repr=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """``redis://[:PASSWORD@]127.0.0.1:PORT/0``."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{LOOPBACK}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start redis-server on the same port with the same data; return once it answers PING
        (after it loaded what it had saved)."""
        if self.running:
            raise RedisServerError("redis-server is already running")
        with self.log_path.open("ab") as log:
            offset = log.tell()
            self._process = subprocess.Popen(
                self._command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        try:
            self._wait_ready(self._process, offset)
        except BaseException:
            self.kill()
            raise

    def stop(self) -> None:
        """SIGTERM: Redis saves its data and exits; wait for it (SIGKILL after STOP_TIMEOUT)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)  # a paused server would not see the SIGTERM
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise RedisServerError(
                f"redis-server did not stop within {STOP_TIMEOUT} s of SIGTERM (killed)"
                f"{self._log_tail(0)}"
            ) from None

    def kill(self) -> None:
        """SIGKILL: a crash; what was fsync'd to the append-only file survives."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
        if process is not None:
            process.wait()

    def pause(self) -> None:
        """SIGSTOP: connections are still accepted (by the kernel), nothing is answered."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: answer again, including what was asked while paused."""
        self._signal(signal.SIGCONT)

    def _signal(self, number: signal.Signals) -> None:
        if self._process is None or self._process.poll() is not None:
            raise RedisServerError("redis-server is not running")
        self._process.send_signal(number)

    def _wait_ready(self, process: subprocess.Popen[bytes], log_offset: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not self._answers_ping():
            code = process.poll()
            if code is not None or time.monotonic() > deadline:
                status = f"exited with {code}" if code is not None else f"within {READY_TIMEOUT} s"
                raise RedisServerError(
                    f"redis-server on {LOOPBACK}:{self.port} did not answer PING ({status})"
                    f"{self._log_tail(log_offset)}"
                )
            time.sleep(0.02)

    def _answers_ping(self) -> bool:
        """Whether Redis answers PING with PONG (not -LOADING, not refused)."""
        commands = [["PING"]]
        if self.password:
            commands.insert(0, ["AUTH", self.password])
        request = b"".join(_resp(c) for c in commands)
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=0.5) as sock:
                sock.sendall(request)
                reply = b""
                while reply.count(b"\r\n") < len(commands):
                    chunk = sock.recv(1024)
                    if not chunk:
                        return False
                    reply += chunk
        except OSError:
            return False
        return reply.endswith(b"+PONG\r\n")

    def _log_tail(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                output = log.read().decode(errors="replace")
        except OSError as exc:
            return f"; its log cannot be read: {exc}"
        return f"; the end of its log:\n{output[-_LOG_TAIL:]}"


@contextlib.contextmanager
def run_redis(tmp: Path, *, password: str | None = None) -> Iterator[RedisServer]:
    """Run redis-server for the block; its data and log go in ``tmp``.

    ``password`` makes it require AUTH (``requirepass``); ``url`` then carries it.
    """
    folder = tmp / "data"
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [
        REDIS_SERVER,
        "--port", str(port),
        "--bind", LOOPBACK,
        "--protected-mode", "no",
        "--daemonize", "no",
        "--dir", str(folder),
        "--save", "1 1",
        "--appendonly", "yes",
        "--appendfsync", "always",
        "--loglevel", "notice",
    ]  # fmt: skip
    if password:
        command += ["--requirepass", password]
    server = RedisServer(
        port=port,
        folder=folder,
        log_path=tmp / "redis.log",
        password=password,
        _command=command,
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _resp(command: list[str]) -> bytes:
    """``command`` in the Redis protocol (an array of bulk strings)."""
    parts = [f"*{len(command)}\r\n".encode()]
    for word in command:
        data = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)
