"""A target's shared state: passive health takes it out and brings it back, active checks'
verdicts, what it tells its groups, what it logs and reports."""

from __future__ import annotations

import asyncio
import logging
import types

import pytest
from support import LOOPBACK, async_test

from smartroute.routing.model import PassiveHealth
from smartroute.server.backends import state as state_module
from smartroute.server.backends.state import TargetState

PASSIVE = PassiveHealth(max_fails=2, fail_timeout=0.2)
PORT = 10001


class Watch:
    """Stands in for a target group: notes the target's ``up`` flag each time it is told."""

    def __init__(self, state: TargetState) -> None:
        self.state = state
        self.seen: list[bool] = []
        self._told = asyncio.Event()
        state.groups.append(self)

    def target_changed(self) -> None:
        self.seen.append(self.state.up)
        self._told.set()

    async def told(self, timeout: float = 2) -> None:
        """Wait for the next change."""
        async with asyncio.timeout(timeout):
            await self._told.wait()
        self._told.clear()


class Clock:
    """Stands in for the state module's ``time``: a monotonic clock the test moves."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        monkeypatch.setattr(state_module, "time", types.SimpleNamespace(monotonic=self.read))

    def read(self) -> float:
        return self.now


def logged(caplog: pytest.LogCaptureFixture, state: TargetState, what: str) -> list[str]:
    messages = (r.getMessage() for r in caplog.records if r.name == "smartroute")
    return [m for m in messages if m.startswith(f"target {state.key} {what}")]


@async_test()
async def test_passive_health_takes_a_target_out_then_brings_it_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "smartroute")
    state = TargetState(LOOPBACK, PORT)
    watch = Watch(state)
    loop = asyncio.get_running_loop()
    state.failed("Connection refused", PASSIVE)
    assert state.up and (state.fails, state.last_error) == (1, "Connection refused")
    state.failed("reset before the response", PASSIVE)
    out_at = loop.time()
    assert not state.up and watch.seen == [False]
    assert (state.fails, state.last_error) == (2, "reset before the response")
    state.failed("timed out", PASSIVE)  # while out: counted, changes nothing else
    assert not state.up and (state.fails, state.last_error) == (3, "timed out")
    down = logged(caplog, state, "is down")
    assert len(down) == 1 and "2 failure(s) within 0.2s" in down[0]
    assert "timed out" not in down[0]
    await watch.told()  # the first change: taken out
    await watch.told()  # the second: back by itself
    assert loop.time() - out_at >= 0.15  # the loop's clock may tick coarser than time's
    assert state.up and watch.seen == [False, True]
    assert len(logged(caplog, state, "is down")) == 1
    assert len(logged(caplog, state, "is up again")) == 1
    state.failed("Connection refused", PASSIVE)  # failures before the time out are forgotten
    assert state.up
    state.close()


@async_test()
async def test_failures_outside_the_window_do_not_add_up(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(monkeypatch)
    state = TargetState(LOOPBACK, PORT)
    state.failed("refused", PASSIVE)
    clock.now += 0.25
    state.failed("refused", PASSIVE)
    clock.now += 0.2  # exactly fail_timeout after the previous one: outside the window too
    state.failed("refused", PASSIVE)
    assert state.up and state.fails == 3
    clock.now += 0.1
    state.failed("refused", PASSIVE)
    assert not state.up and state.fails == 4
    state.close()


def test_without_passive_health_failures_are_counted_only() -> None:
    state = TargetState(LOOPBACK, PORT)
    for n in range(1, 6):
        state.failed(f"failure {n}", None)
    assert state.up and state.fails == 5 and state.last_error == "failure 5"
    assert not state.recent and not state.out_until


def test_report_holds_up_active_fails_and_last_error() -> None:
    state = TargetState(LOOPBACK, PORT)
    assert state.report() == {"up": True, "active": 0, "fails": 0, "last_error": None}
    state.active = 2
    state.failed("Connection refused", None)
    state.checked("checker", False, "health check: status 503 (expected 200-399)")
    assert state.report() == {
        "up": False,
        "active": 2,
        "fails": 1,
        "last_error": "health check: status 503 (expected 200-399)",
    }


def test_keys_bracket_ipv6_hosts() -> None:
    assert TargetState(LOOPBACK, 80).key == "127.0.0.1:80"
    assert TargetState("::1", 8443).key == "[::1]:8443"
    assert TargetState("backend.test", 80).key == "backend.test:80"


def test_every_checker_must_pass_and_a_forgotten_one_no_longer_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "smartroute")
    state = TargetState(LOOPBACK, PORT)
    watch = Watch(state)
    tcp, http = object(), object()
    state.checked(tcp, True, "")
    assert state.up and watch.seen == []  # no change, no news
    state.checked(http, False, "health check: no answer")
    assert not state.up and state.last_error == "health check: no answer"
    state.checked(tcp, True, "2 health check(s) passed")
    assert not state.up and state.last_error == "health check: no answer"
    state.forget(object())  # never checked it: nothing happens
    assert not state.up and watch.seen == [False]
    state.forget(http)
    assert state.up and watch.seen == [False, True] and state.checks == {tcp: True}
    assert logged(caplog, state, "is down") == [
        f"target {state.key} is down: health check: no answer"
    ]
    assert logged(caplog, state, "is up again") == [
        f"target {state.key} is up again (its health check was removed)"
    ]


@async_test()
async def test_a_target_needs_its_checks_and_its_time_out_both_over() -> None:
    state = TargetState(LOOPBACK, PORT)
    watch = Watch(state)
    state.checked("checker", False, "health check: no answer")
    for _ in range(PASSIVE.max_fails):
        state.failed("Connection refused", PASSIVE)
    await asyncio.sleep(PASSIVE.fail_timeout + 0.05)  # the time out ends: the check still fails
    assert not state.up and watch.seen == [False]
    state.checked("checker", True, "2 health check(s) passed")
    assert state.up and watch.seen == [False, True]


@async_test()
async def test_a_target_out_when_the_proxy_stopped_comes_back_after_a_restart() -> None:
    state = TargetState(LOOPBACK, PORT)
    watch = Watch(state)
    for _ in range(PASSIVE.max_fails):
        state.failed("Connection refused", PASSIVE)
    state.close()  # the proxy stopped: no timer left behind
    assert not state.up
    state.resume()  # and started again
    await watch.told()
    await watch.told()
    assert state.up and watch.seen == [False, True]
