"""The ``forward`` action as a byte pipe: pick targets, connect, hand the client to a relay."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable

from smartroute.context import RouteContext
from smartroute.routing.model import ForwardAction
from smartroute.server.relay import RelaySide
from smartroute.server.stats import ConnectionRecord

log = logging.getLogger("smartroute")


class TargetError(Exception):
    """A target callable failed or returned something unusable."""


async def resolve_targets(action: ForwardAction, ctx: RouteContext) -> list[tuple[str, int]]:
    """Every (host, port) the action offers, rotated so that successive calls round-robin."""
    candidates: list[tuple[str, int]] = []
    for target in action.targets:
        hosts: object = target.host
        if callable(hosts):
            hosts = hosts(ctx)
            if inspect.isawaitable(hosts):
                hosts = await hosts
        if isinstance(hosts, str):
            hosts = (hosts,)
        if not isinstance(hosts, list | tuple) or not hosts:
            raise TargetError(f"target host must be a host name or a list of them, got {hosts!r}")
        port: object = target.port
        if port == "preserve":
            port = ctx.port
        elif callable(port):
            port = port(ctx)
            if inspect.isawaitable(port):
                port = await port
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise TargetError(f"target port must be an int in 1-65535, got {port!r}")
        for host in hosts:
            if not isinstance(host, str) or not host:
                raise TargetError(f"target host must be a non-empty str, got {host!r}")
            candidates.append((host, port))
    start = action.rotation.next() % len(candidates)
    return candidates[start:] + candidates[:start]


async def connect_relay(
    client: asyncio.Transport,
    record: ConnectionRecord,
    candidates: list[tuple[str, int]],
    connect_timeout: float,
    done: Callable[[], None],
) -> RelaySide | None:
    """Connect to the first reachable candidate and return the client's relay side.

    The client transport is not switched to the relay here; the caller does that once it has
    decided the connection is still wanted. Returns ``None`` when no candidate answered.
    """
    loop = asyncio.get_running_loop()
    client_side = RelaySide(record, inbound=True, done=done)
    backend_side = RelaySide(record, inbound=False, done=done)
    client_side.peer, backend_side.peer = backend_side, client_side
    client_side.transport = client
    failures: list[str] = []
    for host, port in candidates:
        try:
            async with asyncio.timeout(connect_timeout):
                await loop.create_connection(lambda: backend_side, host, port)
        except TimeoutError:
            failures.append(f"{host}:{port} timed out after {connect_timeout:g}s")
        except OSError as exc:
            failures.append(f"{host}:{port} {exc.strerror or exc}")
        else:
            record.target = f"{host}:{port}"
            return client_side
    record.fail("backend-unreachable", "; ".join(failures))
    return None
