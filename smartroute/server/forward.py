"""Raw byte pipes: resolve targets, connect, and hand a client transport to a relay.

Used by the ``forward`` action when it pipes bytes (TCP, TLS passthrough, ``protocol: "tcp"``,
non-HTTP bytes after TLS termination) and by HTTP upgrades, which end as a tunnel.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import ssl
from collections.abc import Callable

from smartroute.context import RouteContext
from smartroute.errors import CertificateLoadError
from smartroute.errors import TargetError as TargetError  # lives in smartroute.errors now
from smartroute.routing.model import ForwardAction, TlsSettings
from smartroute.server.backends.group import Member, next_to_try, retry_delay
from smartroute.server.backends.state import connect_reason
from smartroute.server.http.stream import Stream
from smartroute.server.relay import RelaySide
from smartroute.server.stats import ConnectionRecord
from smartroute.server.tls import backend_context, backend_server_name, connect_target

log = logging.getLogger("smartroute")


async def resolve_targets(action: ForwardAction, ctx: RouteContext) -> tuple[Member, ...]:
    """Every place an action with target callables offers for ``ctx``, rotated so that
    successive calls round-robin. Such targets are resolved per connection: they have no
    shared health state (their members' states are their own)."""
    members: list[Member] = []
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
            members.append(Member(host, port, target.send_proxy_protocol))
    start = action.rotation.next() % len(members)
    return tuple(members[start:] + members[:start])


class Tries:
    """How a connection or request goes through its members: each at most once, skipping
    those that went down meanwhile, up to the route's ``retry.attempts`` (every member when it
    has no retry policy) and, with a policy, waiting a growing backoff before each new try
    while the total stays within ``connect_timeout`` x ``attempts``."""

    __slots__ = ("members", "passive", "retry", "next", "count", "deadline", "failures")

    def __init__(
        self, members: tuple[Member, ...], action: ForwardAction, connect_timeout: float
    ) -> None:
        self.members = members
        self.passive = action.passive_health
        self.retry = retry = action.retry
        self.next = 0
        self.count = 0  # tries made
        self.deadline = (
            None
            if retry is None
            else asyncio.get_running_loop().time() + connect_timeout * retry.attempts
        )
        self.failures: list[str] = []

    async def another(self) -> Member | None:
        """The member to try next (after the backoff), or None when the tries are over."""
        members, retry = self.members, self.retry
        index = next_to_try(members, self.next)
        if index < len(members):
            member = members[index]
            self.next = index + 1
            if retry is not None and self.count:
                if self.count >= retry.attempts:
                    return None
                await asyncio.sleep(retry_delay(retry, self.count))
            self.count += 1
            return member
        return None

    def left(self, connect_timeout: float) -> float:
        """The time the next connect may take: ``connect_timeout``, or less near the end."""
        if self.deadline is None:
            return connect_timeout
        return max(0.0, min(connect_timeout, self.deadline - asyncio.get_running_loop().time()))

    def failed(self, member: Member, why: str) -> None:
        """``member`` failed the try: noted for passive health and for the error message."""
        self.failures.append(f"{member.state.key} {why}")
        member.state.failed(why, self.passive)

    def why(self) -> str:
        """What went wrong, for the record and a 502."""
        return "; ".join(self.failures) or "no target is up"


async def connect_relay(
    client: asyncio.Transport,
    record: ConnectionRecord,
    tries: Tries,
    connect_timeout: float,
    done: Callable[[], None],
    ctx: RouteContext,
    *,
    reencrypt: TlsSettings | None = None,
) -> RelaySide | None:
    """Connect to the first member of ``tries`` that answers and return the client's relay
    side; the member counts the connection as active until it ends.

    The client transport is not switched to the relay here; :func:`splice` does that once the
    caller has decided the connection is still wanted. ``reencrypt`` opens TLS to the target
    (after the member's PROXY header, if it asks for one). Returns ``None`` when no member
    answered.
    """
    chosen: list[Member] = []

    def ended() -> None:
        if chosen:
            member = chosen.pop()
            member.state.active -= 1
            error = record.error
            if error is not None and error.startswith("backend:") and not record.bytes_out:
                tries.failed(member, error)  # reset before its first byte: a failure too
        done()

    client_side = RelaySide(record, inbound=True, done=ended)
    backend_side = RelaySide(record, inbound=False, done=ended)
    client_side.peer, backend_side.peer = backend_side, client_side
    client_side.connection_made(client)
    try:
        context = backend_context(reencrypt) if reencrypt is not None else None
    except CertificateLoadError as exc:  # a backend_ca or client certificate that does not load
        record.fail("backend-unreachable", str(exc))
        return None
    while (member := await tries.another()) is not None:
        host, port = member.host, member.port
        sni = backend_server_name(reencrypt, ctx.domain, host) if reencrypt is not None else None
        header = member.proxy_header(ctx)
        timeout = tries.left(connect_timeout)
        try:
            async with asyncio.timeout(timeout):
                await connect_target(
                    lambda: backend_side, host, port, context=context, sni=sni, header=header
                )
        except TimeoutError:
            tries.failed(member, f"timed out after {timeout:g}s")
        except (OSError, ssl.SSLError) as exc:
            tries.failed(member, connect_reason(exc))
        else:
            record.target = member.state.key
            member.state.active += 1
            chosen.append(member)
            return client_side
    record.fail("backend-unreachable", tries.why())
    return None


def splice(client: asyncio.Transport, client_side: RelaySide, initial: bytes, eof: bool) -> None:
    """Switch ``client`` to its relay side and pass on what was read before."""
    backend = client_side.peer
    assert backend is not None and backend.transport is not None
    client_side.record.closer = client_side.abort
    client.set_protocol(client_side)
    if initial:
        backend.transport.write(initial)
    if eof:
        client_side.eof = True
        client_side.record.half_closed = True
        if backend.lost or backend.eof:
            client_side.close()
        else:
            backend.transport.write_eof()
    client.resume_reading()


def tunnel(
    client: Stream, backend: Stream, record: ConnectionRecord, done: Callable[[], None]
) -> None:
    """Turn two HTTP streams into a byte tunnel (after a 101), keeping what each had buffered."""
    assert client.transport is not None and backend.transport is not None
    client_side = RelaySide(record, inbound=True, done=done)
    backend_side = RelaySide(record, inbound=False, done=done)
    client_side.peer, backend_side.peer = backend_side, client_side
    client_side.connection_made(client.transport)
    backend_side.connection_made(backend.transport)
    pending_in, pending_out = client.detach(), backend.detach()
    record.closer = client_side.abort
    client.transport.set_protocol(client_side)
    backend.transport.set_protocol(backend_side)
    if pending_out:
        record.bytes_out += len(pending_out)
        client.transport.write(pending_out)
    if pending_in:
        backend.transport.write(pending_in)
    for stream, side in ((client, client_side), (backend, backend_side)):
        if stream.closed:
            side.connection_lost(stream.error)
        elif stream.eof:
            side.eof_received()
    client.transport.resume_reading()
    backend.transport.resume_reading()
