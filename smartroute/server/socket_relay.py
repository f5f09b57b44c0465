"""Raw forwards on bare sockets: the fast lane for connections that only need a byte pipe.

When a connection's route pipes bytes to fixed IP-literal targets (its plan:
:mod:`smartroute.server.relay_plan`), the connection never gets an asyncio transport:
:class:`SocketRelay` connects a non-blocking socket to the target and moves bytes with
``recv_into``/``send`` through one buffer shared by the proxy's connections, so relaying a
chunk allocates nothing. The client's first bytes are never read before the backend answers:
they wait in the kernel. A backend on the same host usually accepts during ``connect`` itself;
the relay checks with ``getpeername`` and skips waiting for the connect to be reported. The
lane (:class:`~smartroute.server.lane.RelayLane`) watches the sockets with an epoll set of its
own (:mod:`smartroute.server.epoll_set`). An HTTP exchange on the lane that switches protocols
(a WebSocket upgrade) goes on as a relay between its two sockets (:meth:`SocketRelay.join`).

Semantics are the transport relay's (:mod:`smartroute.server.relay`): a direction whose
destination cannot take more stops reading its source until the rest is sent (memory per
connection is bounded by one chunk per direction); an EOF is passed on with
``shutdown(SHUT_WR)``; both sockets close after both EOFs, or when either side fails, after
what the other side already sent is delivered. Records, statistics and limits are the same.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import socket
from typing import TYPE_CHECKING, Protocol

from smartroute.server.backends.group import Member, TargetGroup, next_to_try
from smartroute.server.epoll_set import IN, OUT, TROUBLE
from smartroute.server.stats import ConnectionRecord

if TYPE_CHECKING:
    from smartroute.server.epoll_set import Watcher
    from smartroute.server.stats import StatsBook


class _Counted(Protocol):
    @property
    def stats(self) -> StatsBook: ...


class RelayLane(Protocol):
    """What a relay needs of the lane that runs it (:class:`smartroute.server.lane.RelayLane`,
    which imports this module): the shared buffer, the epoll set, and where ends are counted."""

    buffer: bytearray
    view: memoryview

    @property
    def runtime(self) -> _Counted: ...

    def watch(self, fd: int, old: int, new: int, watcher: Watcher) -> None: ...


log = logging.getLogger("smartroute")

CHUNK = 256 * 1024  # the most one read takes, as asyncio's transports read
_RETRY = (BlockingIOError, InterruptedError)
# A read that fills the buffer is followed by more, until the socket says EAGAIN, up to this
# many per event; a longer stream goes on at the next event, after the loop's other callbacks.
READS_PER_EVENT = 16
# Long streams go socket -> pipe -> socket with splice (Linux), not through the buffer.
SPLICE = hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)


class _Direction:
    """One direction of a relay: reads ``src``, writes ``dst``.

    Bytes pass through the lane's shared buffer, until a read fills it: the direction carries
    a long stream then, and where the system has ``splice`` it goes on through a pipe of its
    own, so the kernel moves the bytes from socket to socket without copying them through
    this process.
    """

    __slots__ = (
        "relay",
        "src",
        "dst",
        "src_fd",
        "dst_fd",
        "pending",
        "piped",
        "pipe_r",
        "pipe_w",
        "pipe_size",
        "eof",
        "inbound",
    )

    def __init__(self, relay: SocketRelay, src: socket.socket, inbound: bool) -> None:
        self.relay = relay
        self.src = src
        self.src_fd = src.fileno()
        self.dst: socket.socket | None = None
        self.dst_fd = -1
        self.pending: bytes | None = None  # read but not yet taken by dst ...
        self.piped = 0  # ... or that many bytes in the pipe
        self.pipe_r = self.pipe_w = -1
        self.pipe_size = 0  # 0: no pipe yet; -1: none to be had (copy through the buffer)
        self.eof = False
        self.inbound = inbound

    @property
    def held(self) -> int:
        """Bytes read from ``src`` that ``dst`` has not taken yet (reading waits for them)."""
        return (0 if self.pending is None else len(self.pending)) + self.piped

    def readable(self) -> None:
        relay = self.relay
        if self.pending is not None or self.piped or self.eof or relay.closing or relay.done:
            return  # a stale event: the relay's state has moved on
        lane = relay.lane
        buffer, view, src, dst = lane.buffer, lane.view, self.src, self.dst
        assert dst is not None
        piping, full = self.pipe_size > 0, self.pipe_size if self.pipe_size > 0 else CHUNK
        for reads in range(READS_PER_EVENT):
            try:
                if piping:
                    count = os.splice(self.src_fd, self.pipe_w, full, flags=_SPLICE_FLAGS)
                else:
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
            try:
                if piping:
                    sent = os.splice(self.pipe_r, self.dst_fd, count, flags=_SPLICE_FLAGS)
                else:
                    sent = dst.send(view[:count])
            except _RETRY:
                sent = 0
            except OSError as exc:
                relay.lost(relay.other(self), exc)
                return
            if sent < count:
                # The destination is full: keep the rest and stop reading until it has gone.
                if piping:
                    self.piped = count - sent
                else:
                    self.pending = bytes(view[sent:count])
                relay.rearm()
                return
            if count < full:
                if not reads:
                    return  # a message that fit: the usual case, one read per event
            elif not piping and not self.pipe_size and SPLICE and self._open_pipe():
                piping, full = True, self.pipe_size  # a long stream: on through the pipe

    def _open_pipe(self) -> bool:
        try:
            self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # out of descriptors: this direction copies through the buffer
            self.pipe_size = -1
            return False
        try:
            self.pipe_size = fcntl.fcntl(self.pipe_w, fcntl.F_SETPIPE_SZ, CHUNK)
        except OSError:  # over the system's pipe limits: the pipe keeps its default size
            self.pipe_size = fcntl.fcntl(self.pipe_w, fcntl.F_GETPIPE_SZ)
        return True

    def writable(self) -> None:
        relay = self.relay
        try:
            if self.piped:
                self.piped -= os.splice(self.pipe_r, self.dst_fd, self.piped, flags=_SPLICE_FLAGS)
                if self.piped:
                    return
            else:
                pending = self.pending
                if pending is None:
                    return  # a stale event
                assert self.dst is not None
                sent = self.dst.send(pending)
                if sent < len(pending):
                    self.pending = pending[sent:]
                    return
                self.pending = None
        except _RETRY:
            return
        except OSError as exc:
            relay.lost(relay.other(self), exc)
            return
        if relay.closing:
            relay.finish()
        else:  # reading was paused while data was pending, so no EOF was seen meanwhile
            relay.rearm()

    def drop(self) -> None:
        """Forget what is held for ``dst`` (it failed)."""
        self.pending = None
        self.piped = 0

    def close_pipe(self) -> None:
        if self.pipe_r >= 0:
            os.close(self.pipe_r)
            os.close(self.pipe_w)
            self.pipe_r = self.pipe_w = -1

    def _ended(self) -> None:
        """The source sent EOF: stop reading it and pass the EOF on."""
        relay = self.relay
        self.eof = True
        relay.record.half_closed = True  # from now on the half_close limit applies too
        if relay.other(self).eof:
            # Both ends are done. (A direction reads no further while it has data pending,
            # so one that saw its EOF has delivered everything.)
            relay.finish()
            return
        relay.rearm()
        try:
            assert self.dst is not None
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            relay.lost(relay.other(self), exc)


class SocketRelay:
    """A client socket piped to a backend socket, both watched by the lane's epoll set."""

    __slots__ = (
        "lane",
        "client",
        "client_fd",
        "client_mask",
        "backend",
        "backend_fd",
        "backend_mask",
        "record",
        "route_name",
        "members",
        "group",
        "member",
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
        members: tuple[Member, ...],
        group: TargetGroup | None,
    ) -> None:
        self.lane = lane
        self.client = client
        self.client_fd = client.fileno()
        self.client_mask = 0  # what the lane's epoll set reports for each socket
        self.backend: socket.socket | None = None
        self.backend_fd = -1
        self.backend_mask = 0
        self.record = record
        self.route_name = route_name
        self.members = members  # to try, in order (see TargetGroup.order)
        self.group = group  # their group: its passive-health rule
        self.member: Member | None = None  # the one connected to (counted as active)
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

    def event(self, fd: int, events: int) -> None:
        """The lane's epoll set reports ``events`` on ``fd``."""
        down = self.down
        if down is None:  # connecting: the backend socket is writable or failed
            if fd == self.backend_fd and not self.done:
                self._connect_reported()
            return
        if fd == self.client_fd:
            reader, writer, mask = self.up, down, self.client_mask
        else:
            reader, writer, mask = down, self.up, self.backend_mask
        if events & TROUBLE:
            events |= mask  # an error or hang-up: the call that is waiting finds out which
        if events & OUT and mask & OUT:
            writer.writable()
        if events & IN and mask & IN and not self.done:
            reader.readable()

    def rearm(self) -> None:
        """Watch for what the directions wait on now: data to read, room to write."""
        up, down, lane = self.up, self.down, self.lane
        assert down is not None
        closing = self.closing
        up_held, down_held = up.held, down.held
        client = (0 if closing or up.eof or up_held else IN) | (OUT if down_held else 0)
        backend = (0 if closing or down.eof or down_held else IN) | (OUT if up_held else 0)
        if client != self.client_mask:
            lane.watch(self.client_fd, self.client_mask, client, self)
            self.client_mask = client
        if backend != self.backend_mask:
            lane.watch(self.backend_fd, self.backend_mask, backend, self)
            self.backend_mask = backend

    # -- connecting --------------------------------------------------------------------------

    def connect(self) -> None:
        """Try the next member; after the last one fails, close the client."""
        members = self.members
        while (index := next_to_try(members, self.next)) < len(members):
            member = members[index]
            self.next = index + 1
            address = member.address
            assert address is not None
            family, sockaddr, name = address
            try:
                backend = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            except OSError as exc:  # out of descriptors, no IPv6 on this host, ...
                self._failed(member, exc.strerror or str(exc))
                continue
            backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = backend.connect_ex(sockaddr)
            if code in (0, errno.EINPROGRESS, errno.EAGAIN):
                self.backend, self.backend_fd = backend, backend.fileno()
                if code == 0 or established(backend):  # a local backend accepts at once
                    self._connected()
                    return
                self.lane.watch(self.backend_fd, 0, OUT, self)
                self.backend_mask = OUT
                self.timer = asyncio.get_running_loop().call_later(
                    self.record.timeouts.connect, self._connect_timeout
                )
                return
            backend.close()
            self._failed(member, os.strerror(code))
        record = self.record
        record.fail("backend-unreachable", "; ".join(self.failures) or "no target is up")
        log.warning("route %r: %s; closing %s", self.route_name, record.error, record.id)
        self.finish()

    def _connect_reported(self) -> None:
        backend = self.backend
        assert backend is not None
        code = backend.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._retry(os.strerror(code))
        elif established(backend):
            self._connected()
        # else: a stale event, the connect is still under way

    def join(self, backend: socket.socket, to_backend: bytes, to_client: bytes) -> None:
        """Relay between the client and ``backend``, connected already to the only member;
        ``to_backend`` and ``to_client`` were read from one side before, and go first."""
        self.next = len(self.members)
        self.backend, self.backend_fd = backend, backend.fileno()
        self._connected(to_backend, to_client)

    def _connected(self, to_backend: bytes = b"", to_client: bytes = b"") -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        backend = self.backend
        assert backend is not None
        member = self.member = self.members[self.next - 1]
        member.state.active += 1
        self.record.target = member.state.key
        up = self.up
        down = self.down = _Direction(self, backend, inbound=False)
        up.dst, up.dst_fd = backend, self.backend_fd
        down.dst, down.dst_fd = self.client, self.client_fd
        up.pending, down.pending = to_backend or None, to_client or None
        self.rearm()

    def _connect_timeout(self) -> None:
        self.timer = None
        self._retry(f"timed out after {self.record.timeouts.connect:g}s")

    def _retry(self, why: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._close_backend()
        self._failed(self.members[self.next - 1], why)
        self.connect()

    def _failed(self, member: Member, why: str) -> None:
        self.failures.append(f"{member.state.key} {why}")
        group = self.group
        member.state.failed(why, None if group is None else group.passive)

    def _close_backend(self) -> None:
        if self.backend_mask:
            self.lane.watch(self.backend_fd, self.backend_mask, 0, self)
            self.backend_mask = 0
        assert self.backend is not None
        self.backend.close()
        self.backend, self.backend_fd = None, -1

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
        member = self.member
        if member is not None and not direction.inbound and not self.record.bytes_out:
            # The backend failed before its first byte: a failure of the target too.
            passive = None if self.group is None else self.group.passive
            member.state.failed(self.record.error or side, passive)
        self.closing = True
        # What the failed side sent and the other could not take yet is still delivered;
        # what was on its way to the failed side is dropped with it.
        self.other(direction).drop()
        if not direction.held:
            self.finish()
        else:
            self.rearm()

    def abort(self) -> None:
        """Close both sockets now, dropping whatever is pending (limits and shutdown)."""
        self.finish()

    def finish(self) -> None:
        """Stop watching and close both sockets, and count the connection as ended."""
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.backend is not None:
            self._close_backend()
        if self.member is not None:
            self.member.state.active -= 1
            self.member = None
        if self.client_mask:
            self.lane.watch(self.client_fd, self.client_mask, 0, self)
            self.client_mask = 0
        self.client.close()
        self.up.close_pipe()
        if self.down is not None:
            self.down.close_pipe()
        self.lane.runtime.stats.finished(self.record)


def established(sock: socket.socket) -> bool:
    """True when ``sock``'s connect has completed (it has a peer)."""
    try:
        sock.getpeername()
    except OSError:
        return False
    return True
