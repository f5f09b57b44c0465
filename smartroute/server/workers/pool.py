"""The parent's side of ``workers=N``: forking the workers, talking to them, replacing them.

The proxy that :meth:`~smartroute.SmartRoute.start` is called on (the *parent*) holds a
:class:`WorkerPool`. It forks the workers (each runs :func:`.process.run_worker`), sends them
route changes and collects their statistics over the control channel (:mod:`.wire`), and
restarts, with a growing delay, a worker that exits on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeAlias

from smartroute.errors import WorkerGone
from smartroute.routing.model import CompiledRoute
from smartroute.server.workers.process import EXIT_TIMEOUT, BuildProxy, run_worker
from smartroute.server.workers.snapshots import (
    WORKER_TOP_CLIENTS,
    Snapshot,
    merge_snapshots,
    retired,
)
from smartroute.server.workers.wire import Entry, decode_error, frame, receive
from smartroute.settings import Settings

log = logging.getLogger("smartroute")

REPLY_TIMEOUT = 10.0  # a worker that takes longer to apply a route change is replaced
START_TIMEOUT = 30.0  # a worker must listen within this after the fork
STOP_MARGIN = 5.0  # stop() waits graceful_shutdown_timeout plus this, then kills
RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # after 1, 2, 3, ... crashes in a row
STABLE_AFTER = 30.0  # a worker that ran this long resets its slot's crash count

# across fork()
_FORK_BLOCKED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1}

StateFn: TypeAlias = Callable[[], tuple[tuple[CompiledRoute, ...], Settings]]


@dataclasses.dataclass(eq=False)
class _Worker:
    """One forked worker as the parent sees it: its channel, its pending replies, its figures."""

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
            self.writer.write(frame(message))


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
        future.exception()  # retrieved: nobody may be waiting for it any more


class WorkerPool:
    """The parent's view of its ``count - 1`` workers.

    ``state`` returns the routes and settings a new worker starts from; ``lock`` is the proxy's
    update lock: every fork (start, restart) happens under it, so a worker always starts from
    a route set that every other process has too. ``build`` makes the proxy a worker runs (see
    :class:`~smartroute.server.workers.process.WorkerProxy`).
    """

    def __init__(self, count: int, state: StateFn, lock: asyncio.Lock, build: BuildProxy) -> None:
        self.count = count
        self._state = state
        self._lock = lock
        self._build = build
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
                run_worker(theirs, self._build, routes, settings, slot, type(loop), mask)
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
            while (message := await receive(worker.reader)) is not None:
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
                future.set_result(None if error is None else decode_error(str(worker), error))
        elif kind == "ready":
            if not worker.ready.done():
                worker.ready.set_result(None)
        elif kind == "leaving":
            worker.leaving = message[1]
        elif kind == "failed":
            _fail(worker.ready, decode_error(str(worker), message[1]))

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
            parts = [retired(worker.snapshot)]
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


def warn_per_worker_limits(settings: Settings, routes: Iterable[CompiledRoute]) -> None:
    """Connection and rate limits are counted by each process: say so when there are some."""
    policies = [settings.security, *(r.security for r in routes)]
    if any(
        p is not None and (p.max_connections or p.max_connections_per_ip or p.rate_limit)
        for p in policies
    ):
        log.warning(
            "workers=%d: connection and rate limits are counted by each process on its "
            "own, so together the processes allow up to %d times each limit",
            settings.workers,
            settings.workers,
        )
