"""Choosing a route's target: the strategies, backups, and the order to try targets in.

A :class:`TargetGroup` is one route's targets (on one port, when a target preserves the port)
as :class:`Member` objects, each with the shared :class:`~.state.TargetState` of its
``host:port``. :meth:`TargetGroup.order` gives, per connection (raw forwards) or per request
(HTTP), the members to try: the strategy's pick first, then the other up members as
fallbacks, then the up backups (which take traffic only when every primary failed or is down).

An order is a precomputed tuple picked in O(1) (round-robin, random, first), O(log n)
(ip-hash) or O(n) (least-connections), with no allocation. While a target is down the same
is done over a set of the members still up, built once per change of a target's state.

- round-robin: a smooth weighted schedule (each member spread evenly over one cycle of
  ``sum(weights)`` picks), walked by a counter;
- random: a uniform position in the same schedule (weighted);
- least-connections: the fewest requests or connections under way, ties taken in turn;
- ip-hash: a consistent-hash ring (``VNODES`` points per member, placed by its
  ``host:port``): removing or adding one target moves only the clients that were, or will
  be, its own;
- first: the first member in the route's order (ordered failover).
"""

from __future__ import annotations

import bisect
import hashlib
import ipaddress
import itertools
import math
import random
import socket
from collections.abc import Callable, Sequence

from smartroute.context import RouteContext
from smartroute.protocols.proxy_protocol import encode_v1, encode_v2, encode_v2_local
from smartroute.routing.model import PassiveHealth, RetryPolicy, Strategy
from smartroute.server.backends.state import TargetState

VNODES = 100  # ring points per member (ip-hash)

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


class Member:
    """One place to connect to: a target's host and port, its shared state, and how the
    route uses it."""

    __slots__ = (
        "host", "port", "proxy_protocol", "state", "weight", "backup", "initial_up", "address",
    )  # fmt: skip

    def __init__(
        self,
        host: str,
        port: int,
        proxy_protocol: str | None = None,
        state: TargetState | None = None,
        weight: int = 1,
        backup: bool = False,
        initial_up: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.proxy_protocol = proxy_protocol
        self.state = state if state is not None else TargetState(host, port)
        self.weight = weight
        self.backup = backup
        self.initial_up = initial_up  # False: not up before a health check passed
        # The socket address of an IP-literal host (the fast lane needs no resolver), else None.
        self.address: Address | None = literal_address(host, port)

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

    def __repr__(self) -> str:
        return f"Member({self.state.key}, weight={self.weight}, backup={self.backup})"


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def smooth_schedule(weights: Sequence[int]) -> tuple[int, ...]:
    """One cycle of weighted picks, each index spread evenly over it: index ``i`` appears
    ``weights[i]`` times (divided by their common divisor), at positions as far apart as
    possible (stride scheduling)."""
    divisor = math.gcd(*weights)
    slots = []
    for index, weight in enumerate(weights):
        share = weight // divisor
        slots += [((k + 0.5) / share, index) for k in range(share)]
    slots.sort()
    return tuple(index for _, index in slots)


class _Set:
    """The primaries or the backups of a group, with what each strategy needs of them."""

    __slots__ = ("members", "schedule", "rotations", "points", "owners")

    def __init__(self, members: tuple[Member, ...], strategy: Strategy, tail: tuple[Member, ...]):
        self.members = members
        self.schedule = smooth_schedule([m.weight for m in members]) if members else ()
        # Per member: the order that starts with it (the rest in turn, then ``tail``).
        self.rotations = tuple(members[i:] + members[:i] + tail for i in range(len(members)))
        self.points: list[int] = []
        self.owners: list[int] = []
        if strategy == "ip-hash" and members:
            ring = sorted(
                (_hash(f"{member.state.key}#{v}".encode()), i)
                for i, member in enumerate(members)
                for v in range(VNODES)
            )
            self.points = [point for point, _ in ring]
            self.owners = [owner for _, owner in ring]

    def pick(self, strategy: Strategy, counter: itertools.count[int], client: str) -> int:
        """The index of the member ``strategy`` picks for ``client`` (the set has members)."""
        if strategy == "round-robin":
            schedule = self.schedule
            return schedule[next(counter) % len(schedule)]
        if strategy == "random":
            schedule = self.schedule
            return schedule[int(random.random() * len(schedule))]
        if strategy == "least-connections":
            # Two passes, no allocation: the fewest and how many have it, then the tie whose
            # turn it is (rotating from the busiest member would favour the one after it).
            members = self.members
            fewest, ties = members[0].state.active, 0
            for member in members:
                active = member.state.active
                if active < fewest:
                    fewest, ties = active, 1
                elif active == fewest:
                    ties += 1
            turn = next(counter) % ties
            for index, member in enumerate(members):
                if member.state.active == fewest:
                    if not turn:
                        return index
                    turn -= 1
            raise AssertionError("unreachable: one of the ties is found above")
        if strategy == "ip-hash":
            points = self.points
            return self.owners[bisect.bisect(points, _hash(client.encode())) % len(points)]
        return 0  # "first"


class TargetGroup:
    """One route's targets and the state its strategy keeps (see the module's docstring).

    ``up`` is False while no member is up: the route then stops matching (the matcher reads
    the flag) and the next matching route takes the connection.
    """

    __slots__ = (
        "members", "strategy", "passive", "literal", "up", "retry_after", "_primaries",
        "_backups", "_healthy", "_degraded", "_counter", "_downs", "_key",
    )  # fmt: skip

    def __init__(
        self,
        members: Sequence[Member],
        strategy: Strategy = "round-robin",
        passive: PassiveHealth | None = None,
        *,
        retry_after: int = 1,
        downs: dict[int, TargetGroup] | None = None,
        key: int = 0,
    ) -> None:
        """``downs``: where the group files itself (under ``key``) while it is down;
        ``retry_after``: the seconds a client told "no target is up" should wait."""
        self.members = tuple(members)
        self.strategy = strategy
        self.passive = passive
        # Every member can be reached on the fast lane: IP literals, no PROXY header.
        self.literal = all(m.address is not None and m.proxy_protocol is None for m in members)
        backups = tuple(m for m in members if m.backup)
        self._backups = _Set(backups, strategy, ())
        self._primaries = _Set(tuple(m for m in members if not m.backup), strategy, backups)
        self._counter = itertools.count()
        self.retry_after = retry_after
        self._downs, self._key = downs, key
        self.up = True
        self._healthy = True  # every primary is up: orders come precomputed
        self._degraded: _Set | None = None  # else: the up members, as their own set
        self.target_changed()

    def target_changed(self) -> None:
        """A member's state changed: recompute the group's flags."""
        members = self.members
        self.up = any(m.state.up for m in members)
        self._healthy = all(m.state.up for m in self._primaries.members)
        self._degraded = None  # built again when next needed
        downs = self._downs
        if downs is not None:
            if self.up:
                downs.pop(self._key, None)
            else:
                downs[self._key] = self

    def order(self, client: str) -> tuple[Member, ...]:
        """The members to try for one connection or request from ``client`` (its IP), best
        first; empty when none is up."""
        which = self._primaries if self._healthy else self._degraded or self._up_members()
        if not which.members:
            return ()
        return which.rotations[which.pick(self.strategy, self._counter, client)]

    def _up_members(self) -> _Set:
        """While a primary is down: the up primaries (then the up backups), or, with no
        primary up, the up backups, as a set of their own (kept until a member's state
        changes again). Each strategy picks among them as among all: a down target's
        share goes to the others by their weights, and on the ip-hash ring its clients
        go to the next point, so nobody else's client moves."""
        up_backups = tuple(m for m in self._backups.members if m.state.up)
        up_primaries = tuple(m for m in self._primaries.members if m.state.up)
        if up_primaries:
            degraded = _Set(up_primaries, self.strategy, up_backups)
        else:
            degraded = _Set(up_backups, self.strategy, ())
        self._degraded = degraded
        return degraded

    def close(self) -> None:
        if self._downs is not None:
            self._downs.pop(self._key, None)
        for member in self.members:
            groups = member.state.groups
            if self in groups:
                groups.remove(self)


def next_to_try(members: tuple[Member, ...], start: int) -> int:
    """The index of the member to try from ``start`` on: the next one still up (the first of
    an order was up when it was picked, and is tried whatever); ``len(members)`` when no
    member is left. Every path that connects walks an order with this."""
    for index in range(start, len(members)):
        if index == 0 or members[index].state.up:
            return index
    return len(members)


def retry_delay(
    policy: RetryPolicy, attempt: int, draw: Callable[[], float] = random.random
) -> float:
    """Seconds to wait before try number ``attempt + 1`` (``attempt`` >= 1 tries failed):
    ``backoff`` doubled per failed try, at most ``max_backoff``, spread by ``jitter``."""
    delay = min(policy.max_backoff, policy.backoff * (2 ** (attempt - 1)))
    if policy.jitter:
        delay *= 1 + policy.jitter * (2 * draw() - 1)
    return max(0.0, float(delay))
