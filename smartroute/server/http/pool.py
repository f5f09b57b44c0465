"""Kept-alive backend connections for the reverse proxy, a few per target."""

from __future__ import annotations

import asyncio
import ssl
import time

from smartroute.server.http.stream import Stream

PoolKey = tuple[str, int, int, str | None]  # host, port, id of the TLS context (0: none), SNI


class BackendPool:
    """Idle backend connections by target; a connection is reused only if it is quiet.

    A connection that received bytes or EOF while idle is discarded: the backend closed it
    or is out of step, and reusing it would mix responses.
    """

    def __init__(self, *, per_target: int = 16, idle_seconds: float = 30.0) -> None:
        self._idle: dict[PoolKey, list[tuple[Stream, float]]] = {}
        self._per_target = per_target
        self._idle_seconds = idle_seconds

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
    ) -> Stream:
        """A new connection (TLS when ``context`` is given), bounded by ``timeout``."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            _, protocol = await loop.create_connection(
                Stream,
                host,
                port,
                ssl=context,
                server_hostname=(sni or host) if context is not None else None,
                ssl_handshake_timeout=timeout if context is not None else None,
            )
        return protocol

    def release(self, key: PoolKey, stream: Stream) -> None:
        """Keep ``stream`` for the next request to the same target, if it is clean."""
        if stream.closed or stream.eof or stream.buffer:
            stream.close()
            return
        idle = self._idle.setdefault(key, [])
        idle.append((stream, time.monotonic()))
        while len(idle) > self._per_target:
            idle.pop(0)[0].close()

    def close(self) -> None:
        for idle in self._idle.values():
            for stream, _ in idle:
                stream.close()
        self._idle.clear()
