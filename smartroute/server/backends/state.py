"""The health of one backend target ("host:port"), shared by every route that lists it.

A target is up while every active health check of it passes (:mod:`.health`) and real traffic
has not taken it out (passive health: ``max_fails`` failures within ``fail_timeout`` take it
out for ``fail_timeout``). Whoever changes its state tells the target groups that list it
(:class:`~smartroute.server.backends.group.TargetGroup`), so that picking a target reads one
flag. A target that goes down is logged once, and once when it is back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections import deque
from typing import Any, Protocol

from smartroute.routing.model import PassiveHealth


class Listener(Protocol):
    """Told when a target's ``up`` changes: the groups that list it."""

    def target_changed(self) -> None: ...


log = logging.getLogger("smartroute")


def connect_reason(exc: OSError | ssl.SSLError) -> str:
    """Why a connect to a target failed, worded the same on every path and event loop
    (asyncio says "Connect call failed (...)" where the system says "Connection refused")."""
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if exc.errno:
        return os.strerror(exc.errno)
    return str(exc.strerror or exc)


class TargetState:
    """One target's health and load: what ``stats()["targets"]`` shows of it."""

    __slots__ = (
        "key", "host", "port", "up", "active", "fails", "last_error", "checks", "out_until",
        "recent", "groups", "_back",
    )  # fmt: skip

    def __init__(self, host: str, port: int) -> None:
        self.key = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.host = host
        self.port = port
        self.up = True  # every check passes and traffic has not taken it out
        self.active = 0  # connections (raw) or requests (HTTP) under way to it
        self.fails = 0  # failures of real traffic, ever
        self.last_error: str | None = None
        # Each active check's verdict (by checker); empty: no active checks.
        self.checks: dict[object, bool] = {}
        self.out_until = 0.0  # taken out by passive health until then (monotonic)
        self.recent: deque[float] = deque()  # times of recent failures (passive health)
        self.groups: list[Listener] = []  # the groups listing it, told of changes
        self._back: asyncio.TimerHandle | None = None

    def failed(self, why: str, passive: PassiveHealth | None) -> None:
        """Real traffic failed on this target (a refused or timed-out connect, a reset before
        the response, an HTTP 5xx or timeout); ``passive``: the route's rule for taking it
        out."""
        self.fails += 1
        self.last_error = why
        if passive is None or self.out_until:
            return
        now = time.monotonic()
        recent = self.recent
        recent.append(now)
        while recent and recent[0] <= now - passive.fail_timeout:
            recent.popleft()
        if len(recent) >= passive.max_fails:
            recent.clear()
            self.out_until = now + passive.fail_timeout
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # pragma: no cover - traffic runs on a loop
                loop = None
            if loop is not None:
                self._back = loop.call_later(passive.fail_timeout, self._return)
            self._update(
                f"{passive.max_fails} failure(s) within {passive.fail_timeout:g}s, out for"
                f" {passive.fail_timeout:g}s (last: {why})"
            )

    def _return(self) -> None:
        self._back = None
        self.out_until = 0.0
        self._update("its passive-health time out is over")

    def checked(self, checker: object, ok: bool, why: str) -> None:
        """An active checker's verdict changed (or was first given)."""
        self.checks[checker] = ok
        if not ok:
            self.last_error = why
        self._update(why)

    def forget(self, checker: object, *, quiet: bool = False) -> None:
        """A checker stopped (its last route went; ``quiet``: the proxy stops, which is no
        news of the target): its verdict no longer counts."""
        if self.checks.pop(checker, None) is not None:
            self._update("its health check was removed", quiet=quiet)

    def _update(self, why: str, *, quiet: bool = False) -> None:
        up = not self.out_until and all(self.checks.values())
        if up == self.up:
            return
        self.up = up
        if quiet:
            pass
        elif up:
            log.warning("target %s is up again (%s)", self.key, why)
        else:
            log.warning("target %s is down: %s", self.key, why)
        for group in self.groups:
            group.target_changed()

    def resume(self) -> None:
        """The proxy started again: a target still taken out comes back when its time out
        ends (:meth:`close` cancelled the timer that would have brought it back)."""
        if self.out_until and self._back is None:
            delay = max(0.0, self.out_until - time.monotonic())
            self._back = asyncio.get_running_loop().call_later(delay, self._return)

    def close(self) -> None:
        if self._back is not None:
            self._back.cancel()
            self._back = None

    def report(self) -> dict[str, Any]:
        return {
            "up": self.up,
            "active": self.active,
            "fails": self.fails,
            "last_error": self.last_error,
        }
