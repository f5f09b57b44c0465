"""Raw forwards on bare sockets: the fast lane for connections routed by port and client alone.

When no route on a port needs the first bytes, the route is known the moment a connection is
accepted. If it pipes bytes to fixed IP-literal targets, the connection never gets an asyncio
transport: :class:`SocketRelay` connects a non-blocking socket to the target and moves bytes
with ``recv_into``/``send`` from ``loop.add_reader``/``add_writer`` callbacks, through one
buffer shared by the proxy's connections, so relaying a chunk allocates nothing. The client's
first bytes are never read before the backend answers: they wait in the kernel.

Semantics are the transport relay's (:mod:`smartroute.server.relay`): a direction whose
destination cannot take more stops reading its source until the rest is sent (memory per
connection is bounded by one chunk per direction); an EOF is passed on with
``shutdown(SHUT_WR)``; both sockets close after both EOFs, or when either side fails, after
what the other side already sent is delivered. Records, statistics and limits are the same.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import select
import socket
from typing import TYPE_CHECKING

from smartroute.routing.model import CompiledRoute, ForwardAction
from smartroute.server.stats import ConnectionRecord

if TYPE_CHECKING:
    from smartroute.server.runtime import Runtime

log = logging.getLogger("smartroute")

CHUNK = 256 * 1024  # the most one read takes, as asyncio's transports read
_RETRY = (BlockingIOError, InterruptedError)
# A read that fills the buffer is followed by more, until the socket says EAGAIN, up to this
# many per event. Besides saving loop passes on long streams, this matters on uvloop: for an
# error event (a reset, say) uvloop runs the callback once and then stops watching the socket,
# so bytes queued before the reset must be read in that one call (the sweep's revive catches
# the rest).
READS_PER_EVENT = 16

# One target address: (family, socket address, "host:port" for records and errors).
Address = tuple[int, tuple[str, int], str]


def literal_address(host: str, port: int) -> Address | None:
    """The address of an IP-literal host, or None for a name (names need a resolver)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return family, (str(ip), port), f"{host}:{port}"


def relay_plan(route: CompiledRoute, port: int) -> tuple[Address, ...] | None:
    """The fixed addresses a route pipes to on ``port``, or None when it needs more than that.

    None for anything but a plain byte forward (HTTP, TLS termination or re-encryption), for
    target callables, host names and PROXY protocol headers: those take the transport path.
    """
    action = route.action
    if not isinstance(action, ForwardAction) or action.protocol == "http":
        return None
    if route.tls is not None and route.tls.mode != "passthrough":
        return None
    addresses: list[Address] = []
    for target in action.targets:
        if callable(target.host) or callable(target.port) or target.send_proxy_protocol:
            return None
        target_port = port if target.port == "preserve" else target.port
        for host in target.host:
            address = literal_address(host, target_port)
            if address is None:
                return None
            addresses.append(address)
    return tuple(addresses) if addresses else None


class RelayLane:
    """Per proxy: the shared buffer, and each route's plan for the current route table."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.buffer = bytearray(CHUNK)
        self.view = memoryview(self.buffer)
        self._table: object = None
        self._plans: dict[tuple[int, int], tuple[Address, ...] | None] = {}
        self._ports: dict[int, bool] = {}
        # Relays to re-arm now and then, on uvloop only (see revive); None elsewhere.
        self.live: set[SocketRelay] | None = None
        self._loop_known = False

    def plan(self, route: CompiledRoute, port: int) -> tuple[Address, ...] | None:
        """:func:`relay_plan`, computed once per route and port of the current table."""
        self._follow_table()
        key = (id(route), port)
        try:
            return self._plans[key]
        except KeyError:
            plan = self._plans[key] = relay_plan(route, port)
            return plan

    def serves(self, port: int) -> bool:
        """True when some route on ``port`` can be relayed here (else the lane is no use)."""
        self._follow_table()
        try:
            return self._ports[port]
        except KeyError:
            routes = self.runtime.table.ordered(port)
            serves = self._ports[port] = any(self.plan(r, port) is not None for r in routes)
            return serves

    def _follow_table(self) -> None:
        table = self.runtime.table
        if table is not self._table:  # routes changed: the table holds the routes we key by
            self._table, self._plans, self._ports = table, {}, {}

    def start(
        self,
        client: socket.socket,
        record: ConnectionRecord,
        route: CompiledRoute,
        addresses: tuple[Address, ...],
    ) -> None:
        """Relay ``client`` to the first of ``addresses`` that accepts (round-robin start)."""
        action = route.action
        assert isinstance(action, ForwardAction)
        if not self._loop_known:
            self._loop_known = True
            if type(asyncio.get_running_loop()).__module__.startswith("uvloop"):
                self.live = set()
        if len(addresses) > 1:
            first = action.rotation.next() % len(addresses)
            addresses = addresses[first:] + addresses[:first]
        relay = SocketRelay(self, client, record, route.name, addresses)
        if self.live is not None:
            self.live.add(relay)
        relay.connect()

    def revive(self) -> None:
        """On uvloop: watch again the sockets uvloop stopped watching after an error event.

        For an error event (a reset, say) uvloop runs a socket's callbacks once and then drops
        its poll, so bytes queued before the error, and the error itself, would never be
        reported. The runtime calls this once a second: one ``poll(0)`` over the relays'
        sockets finds those with something to report, and their callbacks are registered
        afresh (harmless for a socket that was still watched).
        """
        if not self.live:
            return
        poller = select.poll()
        wanted: dict[int, list[tuple[_Direction, bool]]] = {}
        masks: dict[int, int] = {}
        for relay in self.live:
            if relay.down is None or relay.closing:
                continue
            for direction in (relay.up, relay.down):
                if direction.pending is not None:
                    fd, writing, mask = direction.dst_fd, True, select.POLLOUT
                elif not direction.eof:
                    fd, writing, mask = direction.src_fd, False, select.POLLIN
                else:
                    continue
                wanted.setdefault(fd, []).append((direction, writing))
                masks[fd] = masks.get(fd, 0) | mask
        for fd, mask in masks.items():
            poller.register(fd, mask)
        loop = asyncio.get_running_loop()
        for fd, _ in poller.poll(0):
            for direction, writing in wanted[fd]:
                if writing:
                    loop.remove_writer(fd)
                    loop.add_writer(fd, direction.writable)
                else:
                    loop.remove_reader(fd)
                    loop.add_reader(fd, direction.readable)


class _Direction:
    """One direction of a relay: reads ``src``, writes ``dst``."""

    __slots__ = ("relay", "src", "dst", "src_fd", "dst_fd", "pending", "eof", "inbound")

    def __init__(self, relay: SocketRelay, src: socket.socket, inbound: bool) -> None:
        self.relay = relay
        self.src = src
        self.src_fd = src.fileno()
        self.dst: socket.socket | None = None
        self.dst_fd = -1
        self.pending: bytes | None = None  # read but not yet taken by dst
        self.eof = False
        self.inbound = inbound

    def readable(self) -> None:
        relay = self.relay
        if self.pending is not None or self.eof or relay.done:
            return  # a continuation (call_soon) that the relay's state has overtaken
        lane = relay.lane
        buffer, view, src = lane.buffer, lane.view, self.src
        for reads in range(READS_PER_EVENT):
            try:
                count = src.recv_into(buffer)
            except _RETRY:
                return
            except OSError as exc:
                relay.lost(self, exc)
                return
            if not count:
                self._ended()
                return
            if self.inbound:
                relay.record.bytes_in += count
            else:
                relay.record.bytes_out += count
            data = view[:count]
            dst = self.dst
            assert dst is not None
            try:
                sent = dst.send(data)
            except _RETRY:
                sent = 0
            except OSError as exc:
                relay.lost(relay.other(self), exc)
                return
            if sent < count:
                # The destination is full: keep the rest and stop reading until it has gone.
                self.pending = bytes(data[sent:])
                loop = relay.loop
                loop.remove_reader(self.src_fd)
                loop.add_writer(self.dst_fd, self.writable)
                return
            if count < CHUNK and not reads:
                return  # a message that fit: the usual case, one read per event
        relay.loop.call_soon(self.readable)  # a long stream: go on after the other callbacks

    def writable(self) -> None:
        pending = self.pending
        assert pending is not None and self.dst is not None
        relay = self.relay
        try:
            sent = self.dst.send(pending)
        except _RETRY:
            return
        except OSError as exc:
            relay.lost(relay.other(self), exc)
            return
        if sent < len(pending):
            self.pending = pending[sent:]
            return
        self.pending = None
        relay.loop.remove_writer(self.dst_fd)
        if relay.closing:
            relay.finish()
        else:  # reading was paused while data was pending, so no EOF was seen meanwhile
            relay.loop.add_reader(self.src_fd, self.readable)

    def _ended(self) -> None:
        """The source sent EOF: stop reading it and pass the EOF on."""
        relay = self.relay
        self.eof = True
        relay.record.half_closed = True  # from now on the half_close limit applies too
        relay.loop.remove_reader(self.src_fd)
        self._pass_eof()

    def _pass_eof(self) -> None:
        relay = self.relay
        if relay.other(self).eof:
            # Both ends are done. (A direction reads no further while it has data pending,
            # so one that saw its EOF has delivered everything.)
            relay.finish()
            return
        try:
            assert self.dst is not None
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            relay.lost(relay.other(self), exc)


class SocketRelay:
    """A client socket piped to a backend socket, both driven by the event loop's selector."""

    __slots__ = (
        "lane",
        "loop",
        "client",
        "backend",
        "record",
        "route_name",
        "addresses",
        "next",
        "failures",
        "timer",
        "up",
        "down",
        "closing",
        "done",
    )

    def __init__(
        self,
        lane: RelayLane,
        client: socket.socket,
        record: ConnectionRecord,
        route_name: str,
        addresses: tuple[Address, ...],
    ) -> None:
        self.lane = lane
        self.loop = asyncio.get_running_loop()
        self.client = client
        self.backend: socket.socket | None = None
        self.record = record
        self.route_name = route_name
        self.addresses = addresses
        self.next = 0
        self.failures: list[str] = []
        self.timer: asyncio.TimerHandle | None = None
        self.up = _Direction(self, client, inbound=True)  # client -> backend
        self.down: _Direction | None = None  # backend -> client, once connected
        self.closing = False  # lost a side: deliver what is pending, then finish
        self.done = False
        record.closer = self.abort

    def other(self, direction: _Direction) -> _Direction:
        down = self.down
        assert down is not None
        return down if direction is self.up else self.up

    # -- connecting --------------------------------------------------------------------------

    def connect(self) -> None:
        """Try the next address; after the last one fails, close the client."""
        while self.next < len(self.addresses):
            family, sockaddr, name = self.addresses[self.next]
            self.next += 1
            try:
                backend = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            except OSError as exc:  # out of descriptors, no IPv6 on this host, ...
                self.failures.append(f"{name} {exc.strerror or exc}")
                continue
            backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = backend.connect_ex(sockaddr)
            if code in (0, errno.EINPROGRESS, errno.EAGAIN):
                self.backend = backend
                self.loop.add_writer(backend.fileno(), self._connected)
                self.timer = self.loop.call_later(
                    self.record.timeouts.connect, self._connect_timeout
                )
                return
            backend.close()
            self.failures.append(f"{name} {os.strerror(code)}")
        record = self.record
        record.fail("backend-unreachable", "; ".join(self.failures))
        log.warning("route %r: %s; closing %s", self.route_name, record.error, record.id)
        self.finish()

    def _connected(self) -> None:
        backend = self.backend
        assert backend is not None
        self.loop.remove_writer(backend.fileno())
        code = backend.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._retry(os.strerror(code))
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.record.target = self.addresses[self.next - 1][2]
        up = self.up
        down = self.down = _Direction(self, backend, inbound=False)
        up.dst, up.dst_fd = backend, down.src_fd
        down.dst, down.dst_fd = self.client, up.src_fd
        self.loop.add_reader(up.src_fd, up.readable)
        self.loop.add_reader(down.src_fd, down.readable)

    def _connect_timeout(self) -> None:
        self.timer = None
        backend = self.backend
        assert backend is not None
        self.loop.remove_writer(backend.fileno())
        self._retry(f"timed out after {self.record.timeouts.connect:g}s")

    def _retry(self, why: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        assert self.backend is not None
        self.backend.close()
        self.backend = None
        self.failures.append(f"{self.addresses[self.next - 1][2]} {why}")
        self.connect()

    # -- ending ------------------------------------------------------------------------------

    def lost(self, direction: _Direction, exc: OSError) -> None:
        """``direction``'s source failed: deliver what it already sent, then close both."""
        if self.done:
            return
        if self.closing:
            self.finish()  # the delivery of what the first failed side sent has failed too
            return
        side = "client" if direction.inbound else "backend"
        self.record.fail("error", f"{side}: {exc.strerror or exc}")
        self.closing = True
        loop = self.loop
        for each in (self.up, self.down):
            if each is not None and not each.eof:
                loop.remove_reader(each.src_fd)
        # What the failed side sent and the other could not take yet is still delivered;
        # what was on its way to the failed side is dropped with it.
        other = self.other(direction)
        if other.pending is not None:
            loop.remove_writer(other.dst_fd)
            other.pending = None
        if direction.pending is None:
            self.finish()

    def abort(self) -> None:
        """Close both sockets now, dropping whatever is pending (limits and shutdown)."""
        self.finish()

    def finish(self) -> None:
        """Unregister and close both sockets, and count the connection as ended."""
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        loop, up, down = self.loop, self.up, self.down
        # After both EOFs with nothing pending (the usual end) no callback is registered.
        registered = not (
            down is not None and up.eof and down.eof and up.pending is None and down.pending is None
        )
        for sock in (self.client, self.backend):
            if sock is not None and sock.fileno() >= 0:
                if registered:
                    loop.remove_reader(sock.fileno())
                    loop.remove_writer(sock.fileno())
                sock.close()
        if self.lane.live is not None:
            self.lane.live.discard(self)
        self.lane.runtime.stats.finished(self.record)
