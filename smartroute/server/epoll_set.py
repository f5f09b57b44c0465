"""The fast lane's epoll set: the sockets it watches, and whom to tell of their events.

The lane watches its sockets with an epoll set of its own, which the event loop watches as one
descriptor. Starting or stopping to watch a socket is then one ``epoll_ctl`` call, where the
loop's ``add_reader``/``remove_reader`` cost three or four system calls and a handle each on
uvloop, and errors are reported as long as they last (level triggered) on every loop. Each
watched descriptor has a :class:`Watcher` (a relay, or a socket whose first bytes are awaited),
which the set tells of the events on it.
"""

from __future__ import annotations

import asyncio
import logging
import select
from typing import Protocol

from smartroute.server.stats import ConnectionRecord

log = logging.getLogger("smartroute")

EVENTS_PER_WAKEUP = 256  # epoll events the lane handles each time the loop wakes it
AVAILABLE = hasattr(select, "epoll")  # Linux; elsewhere every connection takes a transport

IN = select.EPOLLIN if AVAILABLE else 1
OUT = select.EPOLLOUT if AVAILABLE else 4
TROUBLE = (select.EPOLLERR | select.EPOLLHUP) if AVAILABLE else 24  # reported unasked


class Watcher(Protocol):
    """What the lane's epoll set reports to: one object per watched descriptor (``record``:
    the client connection it serves, None for backend connections idle in a pool)."""

    @property
    def record(self) -> ConnectionRecord | None: ...

    def event(self, fd: int, events: int) -> None: ...

    def abort(self) -> None: ...


class EpollSet:
    """An epoll set the running loop watches as one descriptor, created on first use."""

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchers: dict[int, Watcher] = {}

    def watch(self, fd: int, old: int, new: int, watcher: Watcher) -> None:
        """Have ``watcher`` told of ``new`` events on ``fd`` (0: none) instead of ``old`` (a
        descriptor may change hands: a pooled backend connection, say)."""
        if new == old:
            if new:
                self._watchers[fd] = watcher
            return
        epoll = self._epoll or self._create()
        if not old:
            epoll.register(fd, new)
            self._watchers[fd] = watcher
        elif new:
            epoll.modify(fd, new)
            self._watchers[fd] = watcher
        else:
            self.forget(fd)

    def forget(self, fd: int) -> None:
        """Stop watching ``fd`` (watched until now)."""
        del self._watchers[fd]
        assert self._epoll is not None
        try:
            self._epoll.unregister(fd)
        except OSError:  # already gone from the set (closed elsewhere): nothing is watched
            pass

    def open(self) -> None:
        """Create the epoll set and have the running loop watch it (the proxy starts)."""
        if self._epoll is None:
            self._create()

    def _create(self) -> select.epoll:
        epoll = self._epoll = select.epoll()
        loop = self._loop = asyncio.get_running_loop()
        loop.add_reader(epoll.fileno(), self._dispatch)
        return epoll

    def _dispatch(self) -> None:
        epoll, watchers = self._epoll, self._watchers
        assert epoll is not None
        for fd, events in epoll.poll(0, EVENTS_PER_WAKEUP):
            # An event of a descriptor given up earlier in this batch finds no watcher, or its
            # number's new watcher, which takes it as a spurious wake-up.
            watcher = watchers.get(fd)
            if watcher is None:
                continue
            try:
                watcher.event(fd, events)
            except Exception as exc:  # a bug must not stop the other connections, nor spin
                record = watcher.record
                log.exception(
                    "fast lane: closing %s after an unexpected error",
                    "idle backend connections" if record is None else record.id,
                )
                if record is not None:
                    record.fail("error", f"internal error: {exc}")
                watcher.abort()

    def close(self) -> None:
        """Stop watching (the proxy stopped; its connections are closed)."""
        epoll, self._epoll = self._epoll, None
        if epoll is not None:
            assert self._loop is not None
            self._loop.remove_reader(epoll.fileno())
            epoll.close()
        self._watchers.clear()
