"""The client's socket of HTTP on the fast lane: events, reads and writes, TLS, the timer, the end.

:class:`LaneClient` adds to a lane session's state
(:class:`~smartroute.server.http.lane_exchange.LaneExchange`) what touches the client's
connection: the lane's epoll set reports its events here; bytes are
read into the session's inbox (through :class:`~smartroute.server.http.lane_tls.LaneTls` on a
terminated connection, whose handshake, alerts and ``close_notify`` go out with the rest) and
written with backpressure (a side whose destination has bytes pending is not read); one timer
serves every wait; after an upgrade (``101``) the connection becomes a lane relay, or a tunnel
through the session when either side is TLS; and the connection ends here, its backend
connection pooled when clean.
The requests themselves are :class:`~smartroute.server.http.lane_session.LaneSession`'s.
"""

from __future__ import annotations

import logging
import socket
import ssl

from smartroute.server.epoll_set import IN, OUT, TROUBLE
from smartroute.server.http.lane_exchange import (
    _RETRY,
    CONNECT,
    DISCARD,
    HEAD,
    HELD,
    SEND,
    TUNNEL,
    LaneExchange,
)
from smartroute.server.http.lane_pool import LaneBackend
from smartroute.server.http.session import log_request
from smartroute.server.socket_relay import SocketRelay
from smartroute.server.tls import handshake_reason, tls_reason

log = logging.getLogger("smartroute")


class LaneClient(LaneExchange):
    """A lane session's client connection (see the module's docstring)."""

    __slots__ = ()

    def start(self) -> None:
        if self.tls is not None:  # the handshake must end within the first bytes' wait
            self._wait("handshake", self._waits()[0])
        self._advance()

    # -- events ------------------------------------------------------------------------------

    def event(self, fd: int, events: int) -> None:
        """The lane's epoll set reports ``events`` on ``fd``."""
        if fd == self.fd:
            if events & (OUT | TROUBLE) and self.out is not None:
                self._flush_client()
            if events & (IN | TROUBLE) and not self.done:
                self._read_client(events)
        else:
            backend = self.backend
            if backend is None or fd != backend.fd or self.done:
                return  # a stale event
            if self.phase == CONNECT:
                self._connect_reported(backend, events)
            else:
                if events & (OUT | TROUBLE) and self.to_backend is not None:
                    self._flush_backend(backend)
                if events & (IN | TROUBLE) and not self.done:
                    self._read_backend(backend)
        if not self.done:
            self._advance()

    def _read_client(self, events: int) -> None:
        lane = self.lane
        try:
            count = self.sock.recv_into(lane.buffer)
        except _RETRY:
            return
        except OSError as exc:
            self._client_lost(exc)
            return
        if not count:
            if events & TROUBLE and not events & IN:
                self._client_lost(ConnectionResetError("the client closed the connection"))
                return
            if self.tls is None:
                self.eof = True
                return
        tls = self.tls
        if tls is None:
            self.record.bytes_in += count
            self.inbox += lane.view[:count]
            return
        ready = tls.ready
        try:
            plain, ended = tls.feed(lane.view[:count])
        except ssl.SSLError as exc:
            # A failed handshake or a broken record: its alert goes out, then the connection.
            if ready:
                self.record.fail("error", f"client: TLS {tls_reason(exc)}")
            else:
                self.record.fail("tls-handshake", handshake_reason(exc, self._waits()[0]))
            self._send_raw(tls.pending())
            self.closing = True
            if self.out is None:
                self.finish()
            return
        if not ready and tls.ready:
            self.tls_info = tls.info()
            if self.waiting == "handshake":
                self.waiting = ""
        sealed = tls.pending()
        if sealed:
            self._send_raw(sealed)
        if plain:  # counted as the transport path counts it: the HTTP bytes, not TLS's
            self.record.bytes_in += len(plain)
            self.inbox += plain
        if ended:
            self.eof = True

    def _send_client(self, data: bytes) -> None:
        tls = self.tls
        if tls is not None:
            self.record.bytes_out += len(data)  # the HTTP bytes (see _read_client)
            try:
                data = tls.seal(data)
            except ssl.SSLError as exc:
                self._client_lost(ConnectionError(f"TLS {tls_reason(exc)}"))
                return
        self._send_raw(data)

    def _send_raw(self, data: bytes) -> None:
        """Send bytes as they go on the wire (sealed already, on a TLS connection)."""
        if not data:
            return
        if self.out is not None:
            self.out += data
            return
        try:
            sent = self.sock.send(data)
        except _RETRY:
            sent = 0
        except OSError as exc:
            self._client_lost(exc)
            return
        if self.tls is None:
            self.record.bytes_out += sent
        if sent < len(data):
            self.out = data[sent:]

    def _flush_client(self) -> None:
        out = self.out
        assert out is not None
        try:
            sent = self.sock.send(out)
        except _RETRY:
            return
        except OSError as exc:
            self._client_lost(exc)
            return
        if self.tls is None:
            self.record.bytes_out += sent
        self.out = out[sent:] if sent < len(out) else None
        if self.out is None and self.closing:
            self.finish()

    def _rearm(self) -> None:
        """Watch for what the session waits on now: bytes to read, room to write."""
        phase, backend = self.phase, self.backend
        reading = not self.eof and not self.closing
        if reading:
            if phase == SEND:
                reading = self.to_backend is None
            elif phase != DISCARD:
                reading = len(self.inbox) < HELD
        client = (IN if reading else 0) | (OUT if self.out is not None else 0)
        lane = self.lane
        if client != self.mask:
            lane.watch(self.fd, self.mask, client, self)
            self.mask = client
        if backend is not None:
            if phase == CONNECT and not backend.connected:
                wanted = OUT  # the TCP connect's outcome
            else:
                wanted = OUT if self.to_backend is not None else 0
                if phase == CONNECT or (
                    not backend.eof and self.out is None and len(backend.inbox) < HELD
                ):
                    wanted |= IN
            if wanted != backend.mask:
                lane.watch(backend.fd, backend.mask, wanted, self)
                backend.mask = wanted

    def _wait(self, what: str, seconds: float) -> None:
        """Wait for ``what`` at most ``seconds``. The session's one timer is not moved when a
        wait ends early or a later deadline replaces an earlier one: it fires, finds the
        deadline moved or the wait over, and sets itself again or ends. A kept-alive
        connection therefore costs no timer operation per request."""
        loop = self.loop
        self.waiting = what
        self.deadline = deadline = loop.time() + seconds
        timer = self.timer
        if timer is None:
            self.timer = loop.call_at(deadline, self._on_timer)
        elif timer.when() > deadline:  # only a shorter wait moves the timer
            timer.cancel()
            self.timer = loop.call_at(deadline, self._on_timer)

    # -- after an upgrade -------------------------------------------------------------------

    def _switch(self, backend: LaneBackend, head: bytes) -> bool:
        """The backend switched protocols: from here on, a byte relay between the two."""
        record = self.record
        record.outcome = "upgraded"
        found = self.found
        assert found is not None and self.head is not None
        log_request(record, self.head, found.route.name, 101, self.started)
        if self.tls is not None or backend.tls is not None:
            # The relay moves bytes, not TLS records: the session tunnels them itself.
            self._send_client(head)
            self.phase = TUNNEL
            return True
        to_client = (self.out or b"") + head + bytes(backend.inbox)
        to_backend = (self.to_backend or b"") + bytes(self.inbox)
        member = self.member
        assert member is not None
        self._give_up()
        if backend.mask:
            self.lane.forget(backend.fd)
            backend.mask = 0
        self.backend = None
        relay = SocketRelay(self.lane, self.sock, record, found.route.name, (member,), self.group)
        relay.join(backend.sock, to_backend, to_client)
        return False

    def _tunnel(self) -> bool:
        """Switched protocols on a terminated connection: the client's plaintext to the
        backend and the backend's bytes sealed for the client, until either side ends."""
        backend = self.backend
        assert backend is not None
        inbox = self.inbox
        if inbox and self.to_backend is None:
            data = bytes(inbox)
            inbox.clear()
            self._send_backend(backend, data)
        if backend.inbox and self.out is None:
            data = bytes(backend.inbox)
            backend.inbox.clear()
            self._send_client(data)
        if self.done:
            return False
        if self.eof and not inbox and self.to_backend is None and not self.shut:
            self.shut = True
            try:
                backend.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the backend is gone too: its end shows next
        if backend.eof and not backend.inbox:
            if backend.error is not None:
                self.record.fail("error", f"backend: {backend.error.strerror or backend.error}")
            self.closing = True
            if self.out is None:
                self.finish()
        return False

    # -- ending ------------------------------------------------------------------------------

    def _client_lost(self, exc: OSError) -> None:
        self.record.fail("error", f"client: {exc.strerror or exc}")
        self.finish()

    def close(self) -> None:
        """End a kept-alive connection between two requests (the proxy is stopping)."""
        self.finish()

    def abort(self) -> None:
        """Close both connections now, dropping whatever is pending (limits and shutdown)."""
        self.finish()

    def finish(self) -> None:
        """Close the client's connection (and the backend's, unless it may serve another
        client) and count the connection as ended."""
        if self.done:
            return
        backend = self.backend
        clean = self.phase == HEAD and self.plan is None and self.to_backend is None
        tls = self.tls
        if tls is not None and tls.ready and self.out is None and self.record.error is None:
            try:  # end the TLS session in order: close_notify, if the socket takes it
                self.sock.send(tls.close_notify())
            except OSError:
                pass
        self._give_up()
        if backend is not None:
            self.backend = None
            if clean:
                self.runtime.lane_pool.release(backend)
            else:
                backend.close(self.lane)
        self.sock.close()
        self.runtime.stats.finished(self.record)

    def _give_up(self) -> None:
        """Stop serving the client's connection: no more events, no timer, no stop notice."""
        self.done = True
        self._settle()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.runtime.between_requests.discard(self)
        if self.mask:
            self.lane.forget(self.fd)
            self.mask = 0
