"""Backend connections of HTTP on the fast lane: bare non-blocking sockets, kept alive per target.

A :class:`LaneBackend` is one connection to a backend address, with the bytes read from it and
not used yet. While a client's exchange uses it, the lane reports its events to that client's
:class:`~smartroute.server.http.lane_session.LaneSession`; between two requests of the same
client it stays with that session; when the session ends or turns to another target, it goes
to the :class:`LanePool`, which watches its idle connections itself: a byte or an EOF from an
idle backend means it closed the connection or is out of step, so the connection is closed
at once and never handed out. The pool's caps are the transport path's
(:class:`~smartroute.server.http.pool.BackendPool`): ``max_idle`` per target, ``idle_seconds``
of rest, and only targets some route still names.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from smartroute.server.backends.group import Address
from smartroute.server.epoll_set import IN
from smartroute.server.http.pool import TargetFilter
from smartroute.server.socket_relay import established
from smartroute.server.stats import ConnectionRecord
from smartroute.server.tls_records import decrypt

if TYPE_CHECKING:
    from smartroute.server.lane import RelayLane

Target = tuple[str, int]  # (IP, port) as the socket address names it
PoolKey = tuple[Target, int, str | None]  # the target, id of the TLS context (0: none), SNI
_RETRY = (BlockingIOError, InterruptedError)


class LaneBackend:
    """One backend connection; ``mask``: the events the lane's epoll set watches on it.

    With a client ``context`` (``terminate-and-reencrypt``) the connection speaks TLS through
    an ``ssl.SSLObject`` between memory BIOs: :meth:`handshake` runs once the TCP connection
    is up, :meth:`read` decrypts into ``inbox`` and :meth:`wire` seals what is sent.
    """

    __slots__ = (
        "sock", "fd", "address", "target", "key", "mask", "inbox", "eof", "error", "since",
        "connected", "tls", "tls_in", "tls_out", "ready",
    )  # fmt: skip

    def __init__(
        self,
        sock: socket.socket,
        address: Address,
        context: ssl.SSLContext | None = None,
        sni: str | None = None,
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.address = address
        self.target: Target = address[1]
        self.key: PoolKey = pool_key(address, context, sni)
        self.mask = 0
        self.inbox = bytearray()  # read from the backend (decrypted), not yet passed on
        self.eof = False
        self.error: OSError | None = None  # the connection was lost, not closed in order
        self.since = 0.0  # when it went idle
        self.connected = False  # the TCP connection is up
        self.tls: ssl.SSLObject | None = None
        self.ready = context is None  # nothing left to set up (TLS: the handshake is done)
        if context is not None:
            self.tls_in, self.tls_out = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = context.wrap_bio(self.tls_in, self.tls_out, server_hostname=sni)

    @property
    def clean(self) -> bool:
        """True when the connection may carry another exchange: open, nothing unread."""
        return not self.eof and not self.inbox

    def read(self, lane: RelayLane) -> None:
        """Read what the backend sent into ``inbox`` (through the lane's shared buffer); an
        end or an error sets ``eof`` (and ``error``)."""
        try:
            count = self.sock.recv_into(lane.buffer)
        except _RETRY:
            return
        except OSError as exc:
            self.eof, self.error = True, exc
            return
        if self.tls is None:
            if count:
                self.inbox += lane.view[:count]
            else:
                self.eof = True
            return
        if count:
            self.tls_in.write(lane.view[:count])
        else:
            self.tls_in.write_eof()
        if self.ready:  # (during the handshake, handshake() takes the bytes)
            self._decrypt()

    def _decrypt(self) -> None:
        assert self.tls is not None
        try:
            plain, ended = decrypt(self.tls, self.tls_in)
        except ssl.SSLError as exc:
            self.eof, self.error = True, exc
            return
        self.inbox += plain
        if ended:
            self.eof = True

    def handshake(self) -> bool:
        """Go on with the TLS handshake: True once it is done; raises ``ssl.SSLError`` when
        it fails (a certificate that does not verify, say). What it has to send is in
        :meth:`wire`'s output (call ``wire(b"")``)."""
        tls = self.tls
        assert tls is not None
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        self.ready = True
        self._decrypt()  # application data that came with the handshake's end
        return True

    def wire(self, data: bytes) -> bytes:
        """``data`` as it goes on the wire: sealed on a TLS connection (with anything TLS had
        to send, such as handshake records)."""
        tls = self.tls
        if tls is None:
            return data
        if data:
            tls.write(data)
        return self.tls_out.read()

    def send(self, data: bytes) -> bytes | None:
        """Send what the socket takes of ``data`` (wire bytes) now; the rest, or None when all
        went (or the connection failed: ``eof`` and ``error`` say so)."""
        if not data:
            return None
        try:
            sent = self.sock.send(data)
        except _RETRY:
            sent = 0
        except OSError as exc:
            self.eof, self.error = True, exc
            return None
        return data[sent:] if sent < len(data) else None

    def close(self, lane: RelayLane) -> None:
        if self.mask:
            lane.forget(self.fd)
            self.mask = 0
        self.sock.close()


def pool_key(address: Address, context: ssl.SSLContext | None, sni: str | None) -> PoolKey:
    """Which idle connections can serve a request: same address, same TLS settings and name."""
    return address[1], 0 if context is None else id(context), sni


def connect(
    address: Address, context: ssl.SSLContext | None = None, sni: str | None = None
) -> tuple[LaneBackend, bool]:
    """A new connection to ``address`` (TLS with ``context``, named ``sni``) and whether its
    TCP connection is up already (a backend on the same host usually accepts during
    ``connect`` itself); raises OSError."""
    family, sockaddr, _ = address
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex(sockaddr)
        if code not in (0, errno.EINPROGRESS, errno.EAGAIN):
            raise OSError(code, os.strerror(code))
    except OSError:
        sock.close()
        raise
    backend = LaneBackend(sock, address, context, sni)
    backend.connected = code == 0 or established(sock)
    return backend, backend.connected


class LanePool:
    """Idle backend connections of the lane's HTTP sessions, by target."""

    record: ConnectionRecord | None = None  # as a watcher of the lane: no client connection

    def __init__(self, lane: RelayLane, *, max_idle: int = 256, idle_seconds: float = 30.0) -> None:
        self.lane = lane
        self._idle: dict[PoolKey, deque[LaneBackend]] = {}
        self._by_fd: dict[int, LaneBackend] = {}
        self._max_idle = max_idle
        self._idle_seconds = idle_seconds
        self._wanted: TargetFilter | None = None

    def take(self, key: PoolKey) -> LaneBackend | None:
        """The most recently used idle connection for ``key``, or None. The caller watches
        it from now on (its ``mask`` is what the set watches)."""
        idle = self._idle.get(key)
        if not idle:
            return None
        backend = idle.pop()
        del self._by_fd[backend.fd]
        if time.monotonic() - backend.since > self._idle_seconds:
            backend.close(self.lane)
            return self.take(key)
        return backend

    def release(self, backend: LaneBackend) -> None:
        """Keep a clean connection for the next request to its target; close any other."""
        wanted = self._wanted
        if not backend.clean or (wanted is not None and not wanted(*backend.target)):
            backend.close(self.lane)
            return
        self.lane.watch(backend.fd, backend.mask, IN, self)
        backend.mask = IN
        backend.since = time.monotonic()
        idle = self._idle.get(backend.key)
        if idle is None:
            idle = self._idle[backend.key] = deque()
        idle.append(backend)
        self._by_fd[backend.fd] = backend
        if len(idle) > self._max_idle:
            self._forget(idle.popleft())

    def event(self, fd: int, events: int) -> None:
        """An idle connection is readable or failed: the backend closed it, or talks out of
        turn. Either way it is of no more use."""
        backend = self._by_fd.get(fd)
        if backend is not None:
            self._idle[backend.key].remove(backend)
            self._forget(backend)

    def abort(self) -> None:
        """(As a watcher of the lane, after an unexpected error:) close every idle one."""
        self.close()

    def _forget(self, backend: LaneBackend) -> None:
        self._by_fd.pop(backend.fd, None)
        backend.close(self.lane)

    def retain(self, wanted: TargetFilter | None) -> None:
        """From now on keep only targets for which ``wanted(host, port)`` is true (None:
        all); idle connections to other targets are closed now."""
        self._wanted = wanted
        if wanted is not None:
            self._drop(lambda backend: not wanted(*backend.target))

    def prune(self, now: float) -> None:
        """Close connections idle for longer than the limit (``now``: ``time.monotonic()``)."""
        limit = self._idle_seconds
        self._drop(lambda backend: now - backend.since > limit)

    def _drop(self, doomed: Callable[[LaneBackend], bool]) -> None:
        for key in list(self._idle):
            kept: deque[LaneBackend] = deque()
            for backend in self._idle[key]:
                if doomed(backend):
                    self._forget(backend)
                else:
                    kept.append(backend)
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]

    def close(self) -> None:
        for idle in self._idle.values():
            for backend in idle:
                backend.close(self.lane)
        self._idle.clear()
        self._by_fd.clear()
