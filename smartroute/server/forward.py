"""Raw byte pipes: pick targets, connect, and hand a client transport to a relay.

Used by the ``forward`` action when it pipes bytes (TCP, TLS passthrough, ``protocol: "tcp"``,
non-HTTP bytes after TLS termination) and by HTTP upgrades, which end as a tunnel.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from smartroute.context import RouteContext
from smartroute.errors import TargetError as TargetError  # lives in smartroute.errors now
from smartroute.protocols.proxy_protocol import encode_v1, encode_v2, encode_v2_local
from smartroute.routing.model import ForwardAction, TlsSettings
from smartroute.server.http.stream import Stream
from smartroute.server.relay import RelaySide
from smartroute.server.stats import ConnectionRecord
from smartroute.server.tls import backend_context, backend_server_name

log = logging.getLogger("smartroute")


@dataclass(frozen=True, slots=True)
class Candidate:
    """One place to connect to, and whether to open with a PROXY protocol header."""

    host: str
    port: int
    proxy_protocol: str | None = None

    def proxy_header(self, ctx: RouteContext) -> bytes:
        """The PROXY header naming the client of ``ctx`` (empty when not asked for).

        The header is in the client's address family whatever the proxy's own address is (an
        IPv6 client announced by a load balancer reaching us over IPv4, say): the encoders
        convert the destination to the client's family.
        """
        if self.proxy_protocol is None:
            return b""
        source = (ctx.client_ip, ctx.client_port)
        destination = (ctx.server_ip or "0.0.0.0", ctx.port)
        try:
            if self.proxy_protocol == "v1":
                return encode_v1(source, destination)
            return encode_v2(source, destination)
        except ValueError:  # not IP addresses (never for a TCP client): name no one
            return b"PROXY UNKNOWN\r\n" if self.proxy_protocol == "v1" else encode_v2_local()


async def resolve_targets(action: ForwardAction, ctx: RouteContext) -> list[Candidate]:
    """Every place the action offers, rotated so that successive calls round-robin."""
    candidates: list[Candidate] = []
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
            candidates.append(Candidate(host, port, target.send_proxy_protocol))
    start = action.rotation.next() % len(candidates)
    return candidates[start:] + candidates[:start]


async def connect_relay(
    client: asyncio.Transport,
    record: ConnectionRecord,
    candidates: list[Candidate],
    connect_timeout: float,
    done: Callable[[], None],
    ctx: RouteContext,
    *,
    reencrypt: TlsSettings | None = None,
) -> RelaySide | None:
    """Connect to the first reachable candidate and return the client's relay side.

    The client transport is not switched to the relay here; :func:`splice` does that once the
    caller has decided the connection is still wanted. ``reencrypt`` opens TLS to the target.
    Returns ``None`` when no candidate answered.
    """
    loop = asyncio.get_running_loop()
    client_side = RelaySide(record, inbound=True, done=done)
    backend_side = RelaySide(record, inbound=False, done=done)
    client_side.peer, backend_side.peer = backend_side, client_side
    client_side.connection_made(client)
    failures: list[str] = []
    for candidate in candidates:
        host, port = candidate.host, candidate.port
        context = backend_context(reencrypt) if reencrypt is not None else None
        sni = backend_server_name(reencrypt, ctx.domain, host) if reencrypt is not None else None
        header = candidate.proxy_header(ctx)
        if header and context is not None:
            failures.append(f"{host}:{port} send_proxy_protocol cannot precede re-encryption")
            continue
        try:
            async with asyncio.timeout(connect_timeout):
                await loop.create_connection(
                    lambda: backend_side,
                    host,
                    port,
                    ssl=context,
                    server_hostname=sni if context is not None else None,
                )
        except TimeoutError:
            failures.append(f"{host}:{port} timed out after {connect_timeout:g}s")
        except (OSError, ssl.SSLError) as exc:
            failures.append(f"{host}:{port} {getattr(exc, 'strerror', None) or exc}")
        else:
            record.target = f"{host}:{port}"
            if header:
                assert backend_side.transport is not None
                backend_side.transport.write(header)  # before any byte of the client's
            return client_side
    record.fail("backend-unreachable", "; ".join(failures))
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
