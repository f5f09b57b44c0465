"""Leak checks for the fault and abuse suite: connections, tasks and file descriptors.

``async with settled(proxy):`` records the process's open file descriptors and running
asyncio tasks when the block starts; when it ends it waits (bounded) until the proxy has no
active connection and no connection task, and until descriptors and tasks are back to what
they were, then fails the test naming what is still open.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator

from smartroute import SmartRoute


def open_fds() -> set[int]:
    """The file descriptors this process has open right now (Linux: /proc/self/fd)."""
    return {int(name) for name in os.listdir("/proc/self/fd")}


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def _describe_fd(fd: int) -> str:
    try:
        return f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}"
    except OSError:
        return str(fd)


async def wait_settled(
    proxy: SmartRoute,
    fds_before: set[int],
    tasks_before: set[asyncio.Task[object]],
    timeout: float = 5.0,
) -> None:
    """Wait until the proxy and the process are back to the recorded state, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        active = proxy.stats()["connections"]["active"]
        running = len(proxy._runtime.tasks)
        extra_fds = open_fds() - fds_before
        current = asyncio.current_task()
        extra_tasks = {t for t in asyncio.all_tasks() if t not in tasks_before and t is not current}
        if not active and not running and not extra_fds and not extra_tasks:
            return
        if time.monotonic() >= deadline:
            details = [
                f"{active} active connection(s)" if active else "",
                f"{running} connection task(s)" if running else "",
                "fds still open: " + ", ".join(_describe_fd(fd) for fd in sorted(extra_fds))
                if extra_fds
                else "",
                "tasks still running: " + ", ".join(repr(t) for t in extra_tasks)
                if extra_tasks
                else "",
            ]
            raise AssertionError("proxy did not settle: " + "; ".join(d for d in details if d))
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def settled(proxy: SmartRoute, timeout: float = 5.0) -> AsyncIterator[None]:
    """Assert that everything opened inside the block is closed again afterwards."""
    fds_before = open_fds()
    tasks_before = set(asyncio.all_tasks())
    yield
    await wait_settled(proxy, fds_before, tasks_before, timeout)
