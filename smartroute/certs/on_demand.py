"""On-demand certificates: who may get one at its first handshake, and how many, how fast.

A name gets an on-demand certificate only when the ``on_demand_permission`` callable says
yes. The callable is bounded in time; one that raises, hangs or answers anything but True
refuses that name (logged), and the refusal is remembered for a while so a client that
retries does not hammer the permission service. New orders are limited per minute, across
all names, so a flood of made-up names cannot exhaust the CA's rate limits.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("smartroute.certs")

Permission = Callable[[str], Awaitable[object]]

_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$)({_LABEL}\.)+[a-z][a-z0-9-]*[a-z0-9]")
REFUSAL_MEMORY = 60.0  # seconds a refused name is not asked about again


def orderable_name(name: str) -> bool:
    """Whether ``name`` is a DNS name a CA can issue for (no IP address, no wildcard)."""
    return _HOSTNAME.fullmatch(name) is not None


class OnDemandGate:
    """The permission callable, its refusals and the per-minute limit on new orders."""

    def __init__(self, permission: Permission | None, timeout: float, per_minute: int) -> None:
        self.permission = permission
        self.timeout = timeout
        self.per_minute = per_minute
        self._refused: dict[str, float] = {}  # name -> monotonic time the refusal ends
        self._orders: collections.deque[float] = collections.deque()

    async def allows(self, name: str) -> bool:
        """Ask the permission callable about ``name`` (remembering a refusal for a while)."""
        now = time.monotonic()
        until = self._refused.get(name)
        if until is not None:
            if now < until:
                return False
            del self._refused[name]
        if not orderable_name(name):
            log.info("on-demand certificate for %r refused: not a DNS name", name)
            return self._refuse(name, now)
        if self.permission is None:
            return self._refuse(name, now)
        try:
            async with asyncio.timeout(self.timeout):
                answer = await self.permission(name)
        except TimeoutError:
            log.warning(
                "on_demand_permission(%r) did not answer within %gs: no certificate",
                name,
                self.timeout,
            )
            return self._refuse(name, now)
        except Exception as exc:  # a user hook: its failure refuses this name only
            log.error("on_demand_permission(%r) failed: no certificate", name, exc_info=exc)
            return self._refuse(name, now)
        if answer is not True:
            log.info("on-demand certificate for %s refused by on_demand_permission", name)
            return self._refuse(name, now)
        return True

    def take_order(self) -> bool:
        """Count one new order against the per-minute limit; False when it is used up."""
        now = time.monotonic()
        while self._orders and now - self._orders[0] >= 60.0:
            self._orders.popleft()
        if len(self._orders) >= self.per_minute:
            log.warning(
                "on-demand certificates: %d orders in the last minute (on_demand_per_minute);"
                " refusing more for now",
                len(self._orders),
            )
            return False
        self._orders.append(now)
        return True

    def _refuse(self, name: str, now: float) -> bool:
        if len(self._refused) > 10_000:  # a flood of names: forget the oldest refusals
            for stale in [n for n, t in self._refused.items() if t <= now][:5_000]:
                del self._refused[stale]
        self._refused[name] = now + REFUSAL_MEMORY
        return False
