"""``on_data`` observers: every chunk of an observed connection, in order, off the data path.

A relay or HTTP stream that receives a chunk hands it to the connection's
:class:`Observation` and moves on: the chunk is queued for the proxy's observer thread
(:class:`ObserverThread`, started with the first observed connection), which calls each
observer with ``(ctx, direction, data)`` in the order the chunks arrived, ``"in"`` for bytes
from the client, ``"out"`` for bytes from the backend. The relay never waits for an observer.

Each connection may have at most ``QUEUE_LIMIT`` bytes waiting for its observers; a chunk
that would go over is not queued but counted (``dropped``, ``dropped_bytes``): memory stays
bounded whatever an observer does, and the counts reach the ``on_disconnect`` hooks
(``info["observed"]``) and the log (once per connection). An observer that raises is logged
once per connection; the connection is not affected.

Observers run in that thread, not on the event loop: one that talks to asyncio objects must
use ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

from smartroute.context import RouteContext

log = logging.getLogger("smartroute.hooks")

QUEUE_LIMIT = 4 * 1024 * 1024  # bytes of one connection waiting for its observers, at most

_Item = tuple["Observation", str, bytes]


class ObserverThread:
    """The proxy's one observer thread and its queue (unbounded in itself: each connection
    bounds what it puts in)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def put(self, item: _Item) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="smartroute-observers", daemon=True
                    )
                    self._thread.start()
        self._queue.put(item)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            observation, direction, data = item
            observation.deliver(direction, data)

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued, then stop the thread (within ``timeout``)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)


class Observation:
    """One observed connection: its context, its observers and its queue accounting.

    ``pushed``/``pushed_bytes`` are written by the event loop's thread only, ``done_bytes``
    by the observer thread only, so neither needs a lock.
    """

    __slots__ = (
        "ctx", "observers", "runner", "pushed", "pushed_bytes", "done_bytes", "dropped",
        "dropped_bytes", "failed",
    )  # fmt: skip

    def __init__(
        self,
        runner: ObserverThread,
        observers: Sequence[Callable[..., object]],
        ctx: RouteContext,
    ) -> None:
        self.ctx = ctx
        self.observers = tuple(observers)
        self.runner = runner
        self.pushed = 0  # chunks queued
        self.pushed_bytes = 0
        self.done_bytes = 0  # bytes the observers have seen
        self.dropped = 0  # chunks not queued: the connection's queue was full
        self.dropped_bytes = 0
        self.failed = False  # an observer raised (logged once)

    def push(self, direction: str, data: bytes) -> None:
        """Queue a chunk for the observers (or count it dropped); never waits."""
        size = len(data)
        if self.pushed_bytes - self.done_bytes + size > QUEUE_LIMIT:
            if not self.dropped:
                log.warning(
                    "observers of %s fall behind: chunks are dropped (queue over %d bytes)",
                    self.ctx.connection_id,
                    QUEUE_LIMIT,
                )
            self.dropped += 1
            self.dropped_bytes += size
            return
        self.pushed += 1
        self.pushed_bytes += size
        self.runner.put((self, direction, bytes(data)))

    def deliver(self, direction: str, data: bytes) -> None:
        """In the observer thread: call each observer with one chunk."""
        for observer in self.observers:
            try:
                observer(self.ctx, direction, data)
            except Exception as exc:  # an observer must not take the proxy down
                if not self.failed:
                    self.failed = True
                    name = getattr(observer, "__qualname__", type(observer).__name__)
                    log.warning(
                        "observer %s raised %s: %s (connection %s; further errors not logged)",
                        name,
                        type(exc).__name__,
                        exc,
                        self.ctx.connection_id,
                    )
        self.done_bytes += len(data)

    def report(self) -> dict[str, Any]:
        """For ``on_disconnect``: what was queued and what was dropped."""
        return {
            "chunks": self.pushed,
            "bytes": self.pushed_bytes,
            "dropped": self.dropped,
            "dropped_bytes": self.dropped_bytes,
        }
