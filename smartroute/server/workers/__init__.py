"""``workers=N``: shared-nothing worker processes on the same ports, statistics summed.

The proxy that :meth:`~smartroute.SmartRoute.start` is called on (the *parent*) binds its ports
with ``SO_REUSEPORT`` and forks ``N - 1`` workers. Each worker runs a fresh event loop with its
own proxy built from the parent's routes and settings; it binds the same ports, and the kernel
spreads new connections among the processes. Nothing is shared at run time: each process has
its own connections, backend pool, security counters and statistics. A worker whose control
channel closes (the parent died, or dropped it) stops gracefully and exits; a worker that exits
on its own is logged and replaced by a new fork of the parent.

* :mod:`.pool`: the parent's side (fork, route changes, restarts);
* :mod:`.process`: the worker's side (the forked child);
* :mod:`.wire`: the control channel between them (frames, route sets, errors);
* :mod:`.snapshots`: the statistics of every process, summed.
"""

from __future__ import annotations

from smartroute.errors import WorkerGone
from smartroute.server.workers.pool import WorkerPool, describe_status
from smartroute.server.workers.snapshots import WORKER_TOP_CLIENTS, merge_snapshots
from smartroute.server.workers.wire import decode_routes, encode_routes

__all__ = [
    "WORKER_TOP_CLIENTS",
    "WorkerGone",
    "WorkerPool",
    "decode_routes",
    "describe_status",
    "encode_routes",
    "merge_snapshots",
]
