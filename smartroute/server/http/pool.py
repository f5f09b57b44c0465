"""Kept-alive backend connections for the reverse proxy, reused per target.

Only idle connections are counted against a cap (``max_idle`` per target); connections in use
are not limited here, so the pool grows to the concurrency the clients bring instead of closing
and reopening connections under load. Idle ones age out after ``idle_seconds``.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable

from smartroute.routing.model import CompiledRoute, ForwardAction
from smartroute.server.http.stream import Stream
from smartroute.server.tls import connect_target

PoolKey = tuple[str, int, int, str | None]  # host, port, id of the TLS context (0: none), SNI
TargetFilter = Callable[[str, int], bool]  # (host, port) -> still named by some route


class BackendPool:
    """Idle backend connections by target; a connection is reused only if it is quiet.

    A connection that received bytes or EOF while idle is discarded: the backend closed it
    or is out of step, and reusing it would mix responses. Idle connections are closed after
    ``idle_seconds`` (by :meth:`prune`, which the runtime calls every second) and as soon as
    no route names their target any more (:meth:`retain`).
    """

    def __init__(self, *, max_idle: int = 256, idle_seconds: float = 30.0) -> None:
        self._idle: dict[PoolKey, deque[tuple[Stream, float]]] = {}
        self._max_idle = max_idle
        self._idle_seconds = idle_seconds
        self._wanted: TargetFilter | None = None  # None: every target may be pooled

    @staticmethod
    def key(host: str, port: int, context: ssl.SSLContext | None, sni: str | None) -> PoolKey:
        return (host, port, 0 if context is None else id(context), sni)

    def take(self, key: PoolKey) -> Stream | None:
        """A reusable idle connection for ``key``, or None."""
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            stream, since = idle.pop()
            if stream.closed or stream.eof or stream.buffer or now - since > self._idle_seconds:
                stream.close()
                continue
            return stream
        return None

    async def connect(
        self,
        host: str,
        port: int,
        *,
        timeout: float,
        context: ssl.SSLContext | None = None,
        sni: str | None = None,
        header: bytes = b"",
    ) -> Stream:
        """A new connection (TLS when ``context`` is given), bounded by ``timeout``; a PROXY
        ``header`` goes first (before the TLS handshake too). A connection that carried one
        speaks for one client: the caller must not pool it."""
        async with asyncio.timeout(timeout):
            _, protocol = await connect_target(
                Stream,
                host,
                port,
                context=context,
                sni=(sni or host) if context is not None else None,
                header=header,
                handshake_timeout=timeout if context is not None else None,
            )
        return protocol

    def release(self, key: PoolKey, stream: Stream) -> None:
        """Keep ``stream`` for the next request to the same target, if it is clean."""
        dropped = self._wanted is not None and not self._wanted(key[0], key[1])
        if stream.closed or stream.eof or stream.buffer or dropped:
            stream.close()
            return
        idle = self._idle.get(key)
        if idle is None:
            idle = self._idle[key] = deque()
        idle.append((stream, time.monotonic()))
        if len(idle) > self._max_idle:
            idle.popleft()[0].close()  # the longest idle one goes

    def retain(self, wanted: TargetFilter | None) -> None:
        """From now on pool only targets for which ``wanted(host, port)`` is true (None: all);
        idle connections to other targets are closed now."""
        self._wanted = wanted
        if wanted is not None:
            self._drop(lambda key, since: not wanted(key[0], key[1]))

    def prune(self, now: float) -> None:
        """Close connections idle for longer than the limit, or closed by their backend."""
        limit = self._idle_seconds
        self._drop(lambda key, since: now - since > limit, check_streams=True)

    def _drop(
        self, doomed: Callable[[PoolKey, float], bool], *, check_streams: bool = False
    ) -> None:
        for key in list(self._idle):
            kept: deque[tuple[Stream, float]] = deque()
            for stream, since in self._idle[key]:
                gone = check_streams and (stream.closed or stream.eof or bool(stream.buffer))
                if gone or doomed(key, since):
                    stream.close()
                else:
                    kept.append((stream, since))
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]

    def close(self) -> None:
        for idle in self._idle.values():
            for stream, _ in idle:
                stream.close()
        self._idle.clear()


def targets_named_by(routes: Iterable[CompiledRoute]) -> TargetFilter | None:
    """Which (host, port) backends ``routes`` can send requests to; None when a target is
    computed per connection (a callable host or port), so any backend may still be asked."""
    exact: set[tuple[str, int]] = set()
    any_port: set[str] = set()  # targets with "port": "preserve"
    for route in routes:
        action = route.action
        if not isinstance(action, ForwardAction):
            continue
        for target in action.targets:
            if callable(target.host) or callable(target.port):
                return None
            if target.port == "preserve":
                any_port.update(target.host)
            else:
                exact.update((host, target.port) for host in target.host)
    return lambda host, port: (host, port) in exact or host in any_port
