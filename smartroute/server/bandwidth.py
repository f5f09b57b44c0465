"""Speed limits: token buckets per connection, per client IP, per route and per group.

A connection's bytes each way are charged to every bucket it belongs to (its own, its IP's on
its route, its route's, a hook's group) as they are passed on, in pieces of at most ``BURST``
(a twentieth of a second) of the smallest rate (:class:`Pacer`); while a bucket is in debt
the side that read the bytes stops reading and the rest of its chunk waits. So limits nest
(the smallest share wins), a shared bucket divides its rate among the connections that use
it, and a limited connection holds at most the one chunk it read: backpressure, not
buffering. Buckets start with a small burst
(``BURST`` of their rate).

:class:`BandwidthBook` (one per proxy) keeps the shared buckets while connections use them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from smartroute.routing.model import BandwidthPolicy, CompiledRoute, Rate

BURST = 0.05  # seconds of its rate a bucket may hold (and the most passed on at a time)
MIN_BURST = 4096.0  # bytes


class Bucket:
    """Bytes per second, with a small burst; charged after the fact (it may go into debt)."""

    __slots__ = ("rate", "burst", "tokens", "stamp", "users")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(rate * BURST, MIN_BURST)
        self.tokens = self.burst
        self.stamp = time.monotonic()
        self.users = 0  # connections charging it (shared buckets are dropped at 0)

    def charge(self, count: int, now: float) -> float:
        """Take ``count`` bytes; the seconds until the bucket is out of debt (0: none)."""
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate) - count
        self.tokens, self.stamp = tokens, now
        return -tokens / self.rate if tokens < 0 else 0.0

    def debt(self, now: float) -> float:
        """The seconds until the bucket is out of debt (0: it is not in debt)."""
        tokens = self.tokens + (now - self.stamp) * self.rate
        return -tokens / self.rate if tokens < 0 else 0.0


class Throttle:
    """One direction of one connection: the buckets its bytes are charged to."""

    __slots__ = ("buckets", "piece")

    def __init__(self, buckets: tuple[Bucket, ...]) -> None:
        self.buckets = buckets
        # Bytes passed on at a time: the smallest burst, so that what goes out ahead of the
        # limit is never more than ``BURST`` seconds of it.
        self.piece = int(min(bucket.burst for bucket in buckets))

    def wait(self) -> float:
        """How long until no bucket is in debt (0: bytes may go now)."""
        now = time.monotonic()
        longest = 0.0
        for bucket in self.buckets:
            delay = bucket.debt(now)
            if delay > longest:
                longest = delay
        return longest

    def charge(self, count: int) -> float:
        """Charge ``count`` bytes to every bucket; how long to stop reading (0: not at all)."""
        now = time.monotonic()
        wait = 0.0
        for bucket in self.buckets:
            delay = bucket.charge(count, now)
            if delay > wait:
                wait = delay
        return wait


class Pacer:
    """Passes one direction's chunks on through a :class:`Throttle`, in pieces of at most
    ``throttle.piece`` bytes: a piece goes only while no bucket is in debt and is charged as
    it goes, and while a bucket is in debt the rest of the chunk waits (the one chunk a
    limited connection holds) and the source is told to stop reading (``hold``), then to go
    on (``release``)."""

    __slots__ = ("throttle", "deliver", "hold", "release", "pending", "timer")

    def __init__(
        self,
        throttle: Throttle,
        deliver: Callable[[bytes], None],
        hold: Callable[[], None],
        release: Callable[[], None],
    ) -> None:
        self.throttle = throttle
        self.deliver = deliver
        self.hold = hold
        self.release = release
        self.pending = b""
        self.timer: asyncio.TimerHandle | None = None

    def feed(self, data: bytes) -> None:
        """A chunk read from the source (which stops being read while one is held)."""
        if self.timer is not None:
            self.pending += data  # read before the source stopped: held with the rest
            return
        self._send(data)

    def _send(self, data: bytes) -> None:
        # A piece goes only while no bucket is in debt (a shared one may be, from another
        # connection's bytes): every byte is charged, none is sent on credit.
        throttle, size = self.throttle, self.throttle.piece
        while data:
            delay = throttle.wait()
            if delay:
                self.pending = data
                self.hold()
                self.timer = asyncio.get_running_loop().call_later(delay, self._go_on)
                return
            piece, data = data[:size], data[size:]
            self.deliver(piece)
            throttle.charge(len(piece))
        self.pending = b""

    def _go_on(self) -> None:
        self.timer = None
        data, self.pending = self.pending, b""
        if data:
            self._send(data)
        if self.timer is None:
            self.release()

    def cancel(self) -> None:
        """The connection ended: drop what is held."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.pending = b""


@dataclass(frozen=True, slots=True)
class SpeedLimit:
    """A hook's ``speed_limit``: its own budget, or a ``group``'s shared one."""

    download: float | None
    upload: float | None
    group: str | None = None


# A shared bucket: (way, kind, what): ("down", "ip", (route, ip)), ("up", "group", name), ...
SharedKey = tuple[str, str, object]


@dataclass(slots=True)
class Limits:
    """A connection's throttles (None: that way is free) and the shared buckets it holds."""

    download: Throttle | None
    upload: Throttle | None
    shared: tuple[SharedKey, ...]  # the book's keys, given back at the end
    book: BandwidthBook

    def release(self) -> None:
        """The connection ended: shared buckets nobody uses any more are dropped."""
        self.book.release(self.shared)
        self.shared = ()


class BandwidthBook:
    """The shared buckets of one proxy: per route, per (route, client IP), per group."""

    def __init__(self) -> None:
        self._shared: dict[SharedKey, Bucket] = {}

    def limits(
        self, route: CompiledRoute, client_ip: str, hooked: SpeedLimit | None = None
    ) -> Limits | None:
        """The throttles of a new connection on ``route`` (None when nothing limits it)."""
        policy = route.bandwidth or BandwidthPolicy()
        down: list[Bucket] = []
        up: list[Bucket] = []
        shared: list[SharedKey] = []

        def add(rate: Rate | None, key: tuple[str, object] | None) -> None:
            if rate is None:
                return
            for way, wanted, into in (("down", rate.download, down), ("up", rate.upload, up)):
                if wanted is None:
                    continue
                if key is None:
                    into.append(Bucket(wanted))
                    continue
                full = (way, key[0], key[1])
                bucket = self._shared.get(full)
                if bucket is None:
                    bucket = self._shared[full] = Bucket(wanted)
                bucket.users += 1
                shared.append(full)
                into.append(bucket)

        add(policy.per_connection, None)
        add(policy.per_ip, ("ip", (route.name, client_ip)))
        add(policy.per_route, ("route", route.name))
        if hooked is not None:
            rate = Rate(hooked.download, hooked.upload)
            add(rate, None if hooked.group is None else ("group", hooked.group))
        if not down and not up:
            return None
        return Limits(
            Throttle(tuple(down)) if down else None,
            Throttle(tuple(up)) if up else None,
            tuple(shared),
            self,
        )

    def release(self, keys: tuple[SharedKey, ...]) -> None:
        for key in keys:
            bucket = self._shared.get(key)
            if bucket is not None:
                bucket.users -= 1
                if bucket.users <= 0:
                    del self._shared[key]

    def __len__(self) -> int:
        return len(self._shared)
