"""``workers=N``: shared-nothing worker processes on the same ports, statistics summed.

The proxy that :meth:`~smartroute.SmartRoute.start` is called on (the *parent*) binds its ports
with ``SO_REUSEPORT`` and forks ``N - 1`` workers. Each worker leaves the parent's event loop
alone, drops every socket, pipe and event descriptor it inherited, and runs a fresh event loop
with its own proxy built from the parent's routes and settings; it binds the same ports, and the
kernel spreads new connections among the processes. Nothing is shared at run time: each process
has its own connections, backend pool, security counters and statistics.

Each worker keeps a control channel to the parent (a socketpair carrying length-prefixed
pickled messages):

* parent -> worker: ``("routes", id, entries)`` (a new route set: routes the worker already has
  are named by position, new or changed ones are pickled), ``("rollback", id)`` (go back to the
  set before the last change) and ``("stop",)``;
* worker -> parent: ``("ready",)`` or ``("failed", error)`` after starting, ``("done", id,
  error_or_None)`` for each route change, ``("stats", snapshot)`` about once a second and
  once more after stopping, and ``("leaving", why)`` when it stops on its own (SIGTERM).

A worker whose channel closes (the parent died, or dropped it) stops gracefully and exits. A
worker that exits on its own is logged and replaced by a new fork of the parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import io
import itertools
import logging
import os
import pickle
import signal
import socket
import stat
import struct
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

from smartroute.errors import ConfigError, PortInUseError, SmartRouteError
from smartroute.routing.model import CompiledRoute, RoundRobin
from smartroute.server.port_manager import forget_inherited_ports
from smartroute.server.stats import set_id_prefix
from smartroute.settings import Settings

if TYPE_CHECKING:
    from smartroute.proxy import SmartRoute

log = logging.getLogger("smartroute")

STATS_INTERVAL = 1.0  # seconds between two stats snapshots of a worker
WORKER_TOP_CLIENTS = 1000  # client addresses each worker reports, busiest first
REPLY_TIMEOUT = 10.0  # a worker that takes longer to apply a route change is replaced
START_TIMEOUT = 30.0  # a worker must listen within this after the fork
EXIT_TIMEOUT = 5.0  # a worker whose channel closed must have exited within this
STOP_MARGIN = 5.0  # stop() waits graceful_shutdown_timeout plus this, then kills
RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # after 1, 2, 3, ... crashes in a row
STABLE_AFTER = 30.0  # a worker that ran this long resets its slot's crash count

_HEADER = struct.Struct("!I")

# One route of a route change: (position in the worker's current set, new index), or the
# route pickled.
Entry: TypeAlias = tuple[int, int] | bytes
Snapshot: TypeAlias = dict[str, Any]
StateFn: TypeAlias = Callable[[], tuple[tuple[CompiledRoute, ...], Settings]]


class WorkerGone(SmartRouteError):
    """A worker ended (or was killed) while the parent waited for it."""


# -- the control channel ---------------------------------------------------------------------


def _frame(message: object) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


async def _receive(reader: asyncio.StreamReader) -> Any:
    """The next message, or None once the other end closed the channel."""
    try:
        header = await reader.readexactly(_HEADER.size)
        return pickle.loads(await reader.readexactly(_HEADER.unpack(header)[0]))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


# -- route changes on the wire ---------------------------------------------------------------


class _RoutePickler(pickle.Pickler):
    """Pickles compiled routes: read-only dict views as dicts, round-robin counters afresh."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, MappingProxyType):
            return _read_only, (dict(obj),)
        if isinstance(obj, RoundRobin):
            return RoundRobin, ()  # each process rotates on its own
        return NotImplemented


def _read_only(items: dict[Any, Any]) -> MappingProxyType[Any, Any]:
    return MappingProxyType(items)


def _pickle_route(route: CompiledRoute) -> bytes:
    buffer = io.BytesIO()
    try:
        _RoutePickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(route)
    except Exception as exc:  # PicklingError, TypeError, AttributeError: all "cannot send"
        raise ConfigError(
            f"route {route.name!r}",
            f"cannot be sent to the worker processes (workers > 1): {exc}; callables in a "
            "route must be module-level functions that can be imported by name, not lambdas, "
            "closures or functions defined in a .py config file",
        ) from None
    return buffer.getvalue()


def encode_routes(current: Sequence[CompiledRoute], routes: Iterable[CompiledRoute]) -> list[Entry]:
    """Describe ``routes`` to a worker whose route set is ``current``.

    A route the worker already has (same name, equal apart from its position) is sent as its
    position, so only new or changed routes are pickled; one that cannot be pickled raises a
    :class:`ConfigError` naming it.
    """
    known = {route.name: (position, route) for position, route in enumerate(current)}
    entries: list[Entry] = []
    for route in routes:
        found = known.get(route.name)
        if found is not None:
            position, old = found
            if old is route or _moved(old, route.index) == route:
                entries.append((position, route.index))
                continue
        entries.append(_pickle_route(route))
    return entries


def decode_routes(
    current: Sequence[CompiledRoute], entries: Iterable[Entry]
) -> tuple[CompiledRoute, ...]:
    """The route set described by ``entries`` (see :func:`encode_routes`)."""
    routes: list[CompiledRoute] = []
    for entry in entries:
        if isinstance(entry, bytes):
            route = pickle.loads(entry)
            if not isinstance(route, CompiledRoute):
                raise SmartRouteError(f"expected a route, got {type(route).__name__}")
            routes.append(route)
        else:
            position, index = entry
            routes.append(_moved(current[position], index))
    return tuple(routes)


def _moved(route: CompiledRoute, index: int) -> CompiledRoute:
    return route if route.index == index else dataclasses.replace(route, index=index)


# -- errors on the wire ----------------------------------------------------------------------


def _wire_error(exc: BaseException) -> tuple[str, tuple[Any, ...]]:
    if isinstance(exc, PortInUseError):
        return "port", (exc.port, exc.address, exc.holder)
    if isinstance(exc, ConfigError):
        return "config", (exc.path, exc.problem)
    return "other", (type(exc).__name__, str(exc))


def _rebuild_error(where: str, wire: tuple[str, tuple[Any, ...]]) -> SmartRouteError:
    kind, args = wire
    if kind == "port":
        port, address, holder = args
        return PortInUseError(port, address, holder, detail=f"seen by {where}")
    if kind == "config":
        path, problem = args
        return ConfigError(path, f"{problem} (in {where})")
    name, message = args
    return SmartRouteError(f"{where}: {name}: {message}")


# -- statistics ------------------------------------------------------------------------------


def _add(into: dict[str, Any], values: Mapping[str, Any]) -> None:
    for key, value in values.items():
        into[key] = into.get(key, 0) + value


def _busy(totals: Mapping[str, int]) -> tuple[int, int, int]:
    """The order of ``client_ips`` (as in :mod:`smartroute.server.stats`): live connections,
    then bytes moved, then connections made."""
    return totals["active"], totals["bytes_in"] + totals["bytes_out"], totals["total"]


def merge_snapshots(snapshots: Iterable[Mapping[str, Any]], top_clients: int) -> Snapshot:
    """Sum ``stats()`` snapshots field by field; ``client_ips`` is cut to ``top_clients``."""
    connections: dict[str, int] = {"active": 0, "total": 0}
    moved: dict[str, int] = {"in": 0, "out": 0}
    routes: dict[str, dict[str, int]] = {}
    ips: dict[str, dict[str, int]] = {}
    tracked = 0
    throughput: dict[str, dict[str, float]] = {}
    for snapshot in snapshots:
        _add(connections, snapshot["connections"])
        _add(moved, snapshot["bytes"])
        for name, totals in snapshot["routes"].items():
            _add(routes.setdefault(name, {}), totals)
        for ip, totals in snapshot["client_ips"].items():
            _add(ips.setdefault(ip, {}), totals)
        tracked += snapshot["client_ips_tracked"]
        for window, rates in snapshot["throughput"].items():
            _add(throughput.setdefault(window, {}), rates)
    for rates in throughput.values():
        for key, value in rates.items():
            rates[key] = round(value, 3 if key == "connections" else 1)
    busiest = sorted(ips.items(), key=lambda item: _busy(item[1]), reverse=True)
    return {
        "connections": connections,
        "bytes": moved,
        "routes": dict(sorted(routes.items())),
        "client_ips": dict(busiest[:top_clients]),
        "client_ips_tracked": tracked,
        "throughput": throughput,
    }


def _retired(snapshot: Mapping[str, Any]) -> Snapshot:
    """The totals of a worker that ended: nothing of it is active or has a rate any more."""

    def settled(totals: Mapping[str, int]) -> dict[str, int]:
        return {**totals, "active": 0}

    return {
        "connections": settled(snapshot["connections"]),
        "bytes": dict(snapshot["bytes"]),
        "routes": {name: settled(t) for name, t in snapshot["routes"].items()},
        "client_ips": {ip: settled(t) for ip, t in snapshot["client_ips"].items()},
        "client_ips_tracked": snapshot["client_ips_tracked"],
        "throughput": {},
    }


# -- the parent's side -----------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Worker:
    slot: int  # 1 .. N-1 (the parent is 0)
    pid: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    ready: asyncio.Future[None]
    born: float = dataclasses.field(default_factory=time.monotonic)
    replies: dict[int, asyncio.Future[Any]] = dataclasses.field(default_factory=dict)
    snapshot: Snapshot | None = None
    status: int | None = None  # wait status, once reaped
    stopping: bool = False  # the parent asked it to stop
    leaving: str | None = None  # why it stops on its own (it received SIGTERM)
    watcher: asyncio.Task[None] | None = None

    def __str__(self) -> str:
        return f"worker {self.slot} (pid {self.pid})"

    @property
    def served(self) -> bool:
        """It started listening (a worker that failed to start is not restarted here)."""
        return self.ready.done() and not self.ready.cancelled() and not self.ready.exception()

    def post(self, message: object) -> None:
        if not self.writer.is_closing():
            self.writer.write(_frame(message))


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
        future.exception()  # retrieved: nobody may be waiting for it any more


class WorkerPool:
    """The parent's view of its ``count - 1`` workers.

    ``state`` returns the routes and settings a new worker starts from; ``lock`` is the proxy's
    update lock: every fork (start, restart) happens under it, so a worker always starts from
    a route set that every other process has too.
    """

    def __init__(self, count: int, state: StateFn, lock: asyncio.Lock) -> None:
        self.count = count
        self._state = state
        self._lock = lock
        self._workers: dict[int, _Worker] = {}
        self._retired: Snapshot | None = None  # totals of workers that ended
        self._running = False
        self._restarts: dict[int, asyncio.Task[None]] = {}
        self._crashes: dict[int, int] = {}
        self._ids = itertools.count(1)

    @property
    def pids(self) -> list[int]:
        """The process ids of the live workers, by slot."""
        return [self._workers[slot].pid for slot in sorted(self._workers)]

    def snapshots(self) -> list[Snapshot]:
        """The latest snapshot of each live worker and the totals of the ended ones."""
        found = [w.snapshot for w in self._workers.values() if w.snapshot is not None]
        return found if self._retired is None else [self._retired, *found]

    async def start(self) -> None:
        """Fork the workers; returns once every one listens (the caller holds the lock)."""
        self._running = True
        workers = [await self._fork(slot) for slot in range(1, self.count)]
        results = await asyncio.gather(
            *(asyncio.wait_for(asyncio.shield(w.ready), START_TIMEOUT) for w in workers),
            return_exceptions=True,
        )
        for worker, result in zip(workers, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, TimeoutError):
                    self._kill(worker)
                    result = WorkerGone(f"{worker} did not listen within {START_TIMEOUT:g}s")
                raise result
        log.info("smartroute workers started: %s", ", ".join(str(w) for w in workers))

    async def install(self, entries: list[Entry]) -> None:
        """Give every worker the new route set (the caller holds the lock).

        A worker that ends meanwhile is not an error: its replacement starts from the parent's
        routes. If a worker refuses the set, those that took it go back to their previous set
        and the worker's error is raised.
        """
        workers = list(self._workers.values())
        results = await asyncio.gather(*(self._request(w, "routes", entries) for w in workers))
        failed = [error for error in results if error is not None]
        if not failed:
            return
        applied = [w for w, error in zip(workers, results, strict=True) if error is None]
        undone = await asyncio.gather(*(self._request(w, "rollback") for w in applied))
        for worker, error in zip(applied, undone, strict=True):
            if error is not None:
                log.error(
                    "%s could not go back to its previous routes (%s); replacing it", worker, error
                )
                self._kill(worker)
        raise failed[0]

    async def stop(self, grace: float) -> None:
        """Stop every worker gracefully; kill those still running after ``grace`` + a margin."""
        self._running = False
        restarts = list(self._restarts.values())
        for task in restarts:
            task.cancel()
        await asyncio.gather(*restarts, return_exceptions=True)
        workers = list(self._workers.values())
        for worker in workers:
            worker.stopping = True
            worker.post(("stop",))
        watchers = [w.watcher for w in workers if w.watcher is not None]
        if not watchers:
            return
        _, pending = await asyncio.wait(watchers, timeout=grace + STOP_MARGIN)
        if pending:
            for worker in workers:
                if worker.status is None:
                    log.warning("%s still running %gs after stop; killing it", worker, grace)
                    self._kill(worker)
            await asyncio.wait(pending, timeout=2 * EXIT_TIMEOUT)

    # -- internals ---------------------------------------------------------------------------

    async def _fork(self, slot: int) -> _Worker:
        routes, settings = self._state()
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        for stream in (sys.stdout, sys.stderr):  # or the child would write them out again
            with contextlib.suppress(Exception):
                stream.flush()
        # No signal may run a handler of the parent's loop in the child before it resets them.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _FORK_BLOCKED)
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child, which never returns
                _worker_process(theirs, routes, settings, slot, type(loop), mask)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        theirs.close()
        reader, writer = await asyncio.open_connection(sock=ours)
        worker = _Worker(slot, pid, reader, writer, loop.create_future())
        self._workers[slot] = worker
        worker.watcher = loop.create_task(self._watch(worker))
        return worker

    async def _watch(self, worker: _Worker) -> None:
        """Read the worker's messages; once its channel closes, reap it (and maybe restart)."""
        try:
            while (message := await _receive(worker.reader)) is not None:
                self._handle(worker, message)
        finally:
            worker.writer.close()
            gone = WorkerGone(f"{worker} ended")
            _fail(worker.ready, gone)
            for future in worker.replies.values():
                _fail(future, gone)
        await self._reap(worker)
        self._ended(worker)

    def _handle(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "stats":
            worker.snapshot = message[1]
        elif kind == "done":
            future = worker.replies.get(message[1])
            if future is not None and not future.done():
                error = message[2]
                future.set_result(None if error is None else _rebuild_error(str(worker), error))
        elif kind == "ready":
            if not worker.ready.done():
                worker.ready.set_result(None)
        elif kind == "leaving":
            worker.leaving = message[1]
        elif kind == "failed":
            _fail(worker.ready, _rebuild_error(str(worker), message[1]))

    async def _request(self, worker: _Worker, kind: str, *args: Any) -> BaseException | None:
        """Send one route change; the worker's error, or None (also when the worker ended)."""
        if worker.writer.is_closing():  # it is ending: its watcher is reaping it
            return None
        request = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        worker.replies[request] = future
        try:
            worker.post((kind, request, *args))
            error: BaseException | None = await asyncio.wait_for(future, REPLY_TIMEOUT)
            return error
        except WorkerGone:
            return None
        except TimeoutError:
            log.error(
                "%s did not apply a route change within %gs; replacing it", worker, REPLY_TIMEOUT
            )
            self._kill(worker)
            return None
        finally:
            worker.replies.pop(request, None)

    async def _reap(self, worker: _Worker) -> None:
        """Wait for the worker to exit (its channel is closed), killing it if it lingers."""
        deadline = time.monotonic() + EXIT_TIMEOUT
        killed = False
        while True:
            try:
                pid, status = os.waitpid(worker.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else (a process-wide child watcher)
                worker.status = 0
                return
            if pid:
                worker.status = status
                return
            if time.monotonic() >= deadline:
                if killed:
                    log.error("%s does not exit even after SIGKILL", worker)
                    return
                log.warning("%s closed its channel but did not exit; killing it", worker)
                self._kill(worker)
                killed, deadline = True, time.monotonic() + EXIT_TIMEOUT
            await asyncio.sleep(0.02)

    def _kill(self, worker: _Worker) -> None:
        if worker.status is None:  # not reaped: the pid is still ours
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)

    def _ended(self, worker: _Worker) -> None:
        if self._workers.get(worker.slot) is worker:
            del self._workers[worker.slot]
        if worker.snapshot is not None:
            parts = [_retired(worker.snapshot)]
            self._retired = merge_snapshots(
                parts if self._retired is None else [self._retired, *parts], WORKER_TOP_CLIENTS
            )
        if worker.stopping or not self._running or not worker.served:
            log.debug("%s exited (%s)", worker, describe_status(worker.status))
            return
        lived = time.monotonic() - worker.born
        crashes = (0 if lived >= STABLE_AFTER else self._crashes.get(worker.slot, 0)) + 1
        delay = self._schedule_restart(worker.slot, crashes)
        why = worker.leaving or f"unexpectedly ({describe_status(worker.status)})"
        log.log(
            logging.WARNING if worker.leaving else logging.ERROR,
            "%s exited %s after %.1fs; restarting it in %gs",
            worker,
            why,
            lived,
            delay,
        )

    def _schedule_restart(self, slot: int, crashes: int) -> float:
        self._crashes[slot] = crashes
        delay = RESTART_DELAYS[min(crashes, len(RESTART_DELAYS)) - 1]
        task = asyncio.get_running_loop().create_task(self._restart(slot, delay))
        self._restarts[slot] = task
        task.add_done_callback(lambda done: self._forget_restart(slot, done))
        return delay

    def _forget_restart(self, slot: int, task: asyncio.Task[None]) -> None:
        if self._restarts.get(slot) is task:
            del self._restarts[slot]

    async def _restart(self, slot: int, delay: float) -> None:
        await asyncio.sleep(delay)
        previous = self._workers.get(slot)
        if previous is not None and previous.watcher is not None:  # a failed start, ending
            await asyncio.wait([previous.watcher], timeout=2 * EXIT_TIMEOUT)
        async with self._lock:
            if not self._running or slot in self._workers:
                return
            try:
                worker = await self._fork(slot)
                await asyncio.wait_for(asyncio.shield(worker.ready), START_TIMEOUT)
            except Exception as exc:  # fork refused (EAGAIN, ENOMEM), or the worker failed
                failed = self._workers.get(slot)
                if failed is not None:
                    self._kill(failed)
                delay = self._schedule_restart(slot, self._crashes.get(slot, 0) + 1)
                log.error("worker %d failed to start (%s); trying again in %gs", slot, exc, delay)
                return
        log.info("%s started in place of the one that exited", worker)


def describe_status(status: int | None) -> str:
    """``exit status 1``, ``killed by SIGKILL``: what ``os.waitpid`` said."""
    if status is None:
        return "status unknown"
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(number).name}"
        except ValueError:
            return f"killed by signal {number}"
    if os.WIFEXITED(status):
        return f"exit status {os.WEXITSTATUS(status)}"
    return f"wait status {status}"


# -- the worker's side -----------------------------------------------------------------------

_PARENTS_KINDS = ("socket:", "pipe:", "anon_inode:")  # /proc/self/fd link targets
_FORK_BLOCKED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD}


def _worker_process(
    channel: socket.socket,
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
            code = runner.run(_serve(channel, routes, settings, slot))
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
    for number in (signal.SIGINT, signal.SIGHUP):
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
    channel: socket.socket, routes: tuple[CompiledRoute, ...], settings: Settings, slot: int
) -> int:
    """Run a proxy of the parent's routes until told to stop or the parent goes away."""
    from smartroute.proxy import SmartRoute

    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(sock=channel)
    proxy = SmartRoute._worker(routes, dataclasses.replace(settings, workers=1), slot)
    try:
        await proxy.start()
    except Exception as exc:
        writer.write(_frame(("failed", _wire_error(exc))))
        await _close(writer)
        return 1
    done = asyncio.Event()

    def terminated() -> None:
        if not done.is_set():
            writer.write(_frame(("leaving", "on SIGTERM")))
            done.set()

    loop.add_signal_handler(signal.SIGTERM, terminated)
    writer.write(_frame(("ready",)))
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
        writer.write(_frame(("stats", proxy._own_snapshot(WORKER_TOP_CLIENTS))))
    await _close(writer)
    return 0


async def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.drain(), EXIT_TIMEOUT)
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), EXIT_TIMEOUT)


async def _report(proxy: SmartRoute, writer: asyncio.StreamWriter) -> None:
    while True:
        await asyncio.sleep(STATS_INTERVAL)
        writer.write(_frame(("stats", proxy._own_snapshot(WORKER_TOP_CLIENTS))))
        await writer.drain()


async def _obey(
    proxy: SmartRoute,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    done: asyncio.Event,
    slot: int,
) -> None:
    """Apply the parent's route changes in order; stop on ``stop`` or when the parent is gone."""
    previous = proxy.routes
    while True:
        message = await _receive(reader)
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
        error: tuple[str, tuple[Any, ...]] | None = None
        try:
            if kind == "routes":
                current = proxy.routes
                await proxy._replace_routes(decode_routes(current, message[2]))
                previous = current
            elif kind == "rollback":
                await proxy._replace_routes(previous)
            else:
                raise SmartRouteError(f"unknown control message {kind!r}")
        except Exception as exc:
            error = _wire_error(exc)
        writer.write(_frame(("done", message[1], error)))
        await writer.drain()
    done.set()
