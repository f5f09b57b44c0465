"""A worker's side of ``workers=N``: the forked child that serves its parent's routes.

The child leaves the parent's event loop alone, drops every socket, pipe and event descriptor
it inherited, and runs a fresh event loop with its own proxy (made by the ``build`` function
the parent passes down), bound to the same ports. It follows the parent's route changes, sends
its statistics, and stops when told to, on SIGTERM, or when the control channel closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import signal
import socket
import stat
import traceback
from collections.abc import Callable, Iterable
from typing import Any, NoReturn, Protocol, TypeAlias

from smartroute.errors import SmartRouteError
from smartroute.routing.model import CompiledRoute
from smartroute.server.access_log import reopen_files
from smartroute.server.port_manager import forget_inherited_ports
from smartroute.server.stats import set_id_prefix
from smartroute.server.workers.snapshots import WORKER_TOP_CLIENTS
from smartroute.server.workers.wire import (
    WireError,
    decode_routes,
    encode_error,
    frame,
    receive,
)
from smartroute.settings import Settings

log = logging.getLogger("smartroute")

STATS_INTERVAL = 1.0  # seconds between two stats snapshots of a worker
EXIT_TIMEOUT = 5.0  # a worker whose channel closed must have exited within this

_PARENTS_KINDS = ("socket:", "pipe:", "anon_inode:")  # /proc/self/fd link targets


class WorkerProxy(Protocol):
    """What a worker process runs: a proxy of its own, serving the parent's routes."""

    @property
    def routes(self) -> tuple[CompiledRoute, ...]:
        """The route set in force in this process."""

    async def start(self) -> None:
        """Bind the routes' ports (shared with the parent through ``SO_REUSEPORT``)."""

    async def stop(self) -> None:
        """Stop accepting, let live connections finish, close."""

    def stats(self, top_clients: int) -> dict[str, Any]:
        """This process's figures (a worker's proxy has no workers of its own)."""

    async def replace_routes(self, routes: tuple[CompiledRoute, ...]) -> None:
        """Make the parent's route set current here, as it is."""


# Makes a worker's proxy from the parent's routes, its settings (``workers=1``) and the slot.
BuildProxy: TypeAlias = Callable[[tuple[CompiledRoute, ...], Settings, int], WorkerProxy]


def run_worker(
    channel: socket.socket,
    build: BuildProxy,
    routes: tuple[CompiledRoute, ...],
    settings: Settings,
    slot: int,
    loop_type: type[asyncio.AbstractEventLoop],
    mask: Iterable[int],
) -> NoReturn:  # pragma: no cover - runs in the forked child (coverage is not collected there)
    """The forked child: detach from the parent's loop and descriptors, serve, exit."""
    code = 70
    try:
        gc.freeze()  # the parent's objects are never collected here: no finaliser touches them
        asyncio.events._set_running_loop(None)
        _drop_inherited(keep=channel.fileno())
        _reset_signals()
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        forget_inherited_ports()
        set_id_prefix(f"w{slot}-c")  # connection ids in the access log stay unique
        with asyncio.Runner(loop_factory=_loop_factory(loop_type)) as runner:
            code = runner.run(_serve(channel, build, routes, settings, slot))
    except BaseException:
        with contextlib.suppress(BaseException):
            log.critical(
                "worker %d (pid %d) failed:\n%s", slot, os.getpid(), traceback.format_exc()
            )
    finally:
        os._exit(code)  # never the parent's atexit handlers, never a test runner's teardown


def _drop_inherited(keep: int) -> None:
    """Point every inherited socket, pipe and event descriptor at /dev/null.

    The parent's listeners, client connections, control channels and event-loop descriptors
    must not stay open here (a connection the parent closes would stay half-alive, a sibling
    would never see its channel close). The descriptor numbers stay taken, so a stale object of
    the parent that closes "its" descriptor later only closes a /dev/null. Regular files and
    terminals (log files, stdout) are kept.
    """
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        for fd in _open_fds():
            if fd > 2 and fd not in (keep, null) and _shared_with_parent(fd):
                os.dup2(null, fd, inheritable=False)
    finally:
        os.close(null)


def _open_fds() -> list[int]:
    for folder in ("/proc/self/fd", "/dev/fd"):
        with contextlib.suppress(OSError):
            return sorted(int(name) for name in os.listdir(folder))
    return list(range(3, 4096))  # pragma: no cover - no fd folder on this platform


def _shared_with_parent(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith(_PARENTS_KINDS)
    except OSError:
        pass
    try:  # pragma: no cover - platforms without /proc
        mode = os.fstat(fd).st_mode
    except OSError:  # pragma: no cover
        return False
    return stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode) or stat.S_IFMT(mode) == 0


def _reset_signals() -> None:
    """Signals must not reach the parent's loop (its wake-up descriptor). Ctrl-C and SIGHUP
    go to the whole process group: the parent handles them and tells the workers."""
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)
    for number in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):  # SIGUSR1: see _serve
        signal.signal(number, signal.SIG_IGN)
    for number in (signal.SIGTERM, signal.SIGCHLD):
        signal.signal(number, signal.SIG_DFL)


def _loop_factory(
    loop_type: type[asyncio.AbstractEventLoop],
) -> Callable[[], asyncio.AbstractEventLoop]:
    """A new loop of the parent's kind (asyncio's or uvloop's)."""

    def new_loop() -> asyncio.AbstractEventLoop:
        try:
            return loop_type()
        except TypeError:  # pragma: no cover - a loop class that needs arguments
            return asyncio.new_event_loop()

    return new_loop


async def _serve(
    channel: socket.socket,
    build: BuildProxy,
    routes: tuple[CompiledRoute, ...],
    settings: Settings,
    slot: int,
) -> int:
    """Run a proxy of the parent's routes until told to stop or the parent goes away."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(sock=channel)
    proxy = build(routes, dataclasses.replace(settings, workers=1), slot)
    try:
        await proxy.start()
    except Exception as exc:
        writer.write(frame(("failed", encode_error(exc))))
        await _close(writer)
        return 1
    done = asyncio.Event()

    def terminated() -> None:
        if not done.is_set():
            writer.write(frame(("leaving", "on SIGTERM")))
            done.set()

    loop.add_signal_handler(signal.SIGTERM, terminated)
    loop.add_signal_handler(signal.SIGUSR1, reopen_files)  # the parent's reopen_logs()
    writer.write(frame(("ready",)))
    tasks = [
        loop.create_task(_report(proxy, writer)),
        loop.create_task(_obey(proxy, reader, writer, done, slot)),
    ]
    await done.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await proxy.stop()
    if not writer.is_closing():
        writer.write(frame(("stats", proxy.stats(WORKER_TOP_CLIENTS))))
    await _close(writer)
    return 0


async def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.drain(), EXIT_TIMEOUT)
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), EXIT_TIMEOUT)


async def _report(proxy: WorkerProxy, writer: asyncio.StreamWriter) -> None:
    while True:
        await asyncio.sleep(STATS_INTERVAL)
        writer.write(frame(("stats", proxy.stats(WORKER_TOP_CLIENTS))))
        await writer.drain()


async def _obey(
    proxy: WorkerProxy,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    done: asyncio.Event,
    slot: int,
) -> None:
    """Apply the parent's route changes in order; stop on ``stop`` or when the parent is gone."""
    previous = proxy.routes
    while True:
        message = await receive(reader)
        if message is None:
            log.warning(
                "worker %d (pid %d): the parent closed the control channel; stopping",
                slot,
                os.getpid(),
            )
            break
        kind = message[0]
        if kind == "stop":
            break
        error: WireError | None = None
        try:
            if kind == "routes":
                current = proxy.routes
                await proxy.replace_routes(decode_routes(current, message[2]))
                previous = current
            elif kind == "rollback":
                await proxy.replace_routes(previous)
            else:
                raise SmartRouteError(f"unknown control message {kind!r}")
        except Exception as exc:
            error = encode_error(exc)
        writer.write(frame(("done", message[1], error)))
        await writer.drain()
    done.set()
