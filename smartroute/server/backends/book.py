"""Every route's target group and every target's state, for one proxy.

:meth:`Backends.prepare` runs with each new route table: a forward route whose targets have a
fixed host and port gets one :class:`~.group.TargetGroup` (kept while the route's action is the
same object, so its strategy's state survives unrelated route changes); a route with a target
that preserves the connection's port gets one group per port, made when first needed; a route
with target callables gets none (its targets are resolved per connection, see
:func:`smartroute.server.forward.resolve_targets`). Targets are shared by ``host:port``: one
state, and one health checker per distinct check, however many routes list them. Checkers
start with the first route that asks for them and stop with the last.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Mapping
from typing import Any

from smartroute.routing.model import (
    CompiledRoute,
    ForwardAction,
    HealthCheck,
    TargetSpec,
    TlsSettings,
)
from smartroute.server.backends.group import Member, TargetGroup
from smartroute.server.backends.health import HealthChecker
from smartroute.server.backends.state import TargetState

# One health checker per target, check and TLS: (target "host:port", check, TLS or None).
_CheckKey = tuple[str, HealthCheck, "TlsSettings | None"]


class _PerPort:
    """The groups of a route whose targets preserve the connection's port: one per port."""

    __slots__ = ("action", "book", "groups")

    def __init__(self, action: ForwardAction, book: Backends) -> None:
        self.action = action
        self.book = book
        self.groups: dict[int, TargetGroup] = {}

    def at(self, port: int) -> TargetGroup:
        group = self.groups.get(port)
        if group is None:
            group = self.groups[port] = self.book.make_group(self.action, port)
        return group

    def close(self) -> None:
        for group in self.groups.values():
            group.close()


# A forward action, its group(s), and the TLS its targets speak (re-encrypting routes): the
# health checks speak it too.
_Entry = tuple[ForwardAction, "TargetGroup | _PerPort | None", TlsSettings | None]


class Backends:
    """Target groups by route action, target states by ``host:port``, health checkers."""

    def __init__(self) -> None:
        self.running = False  # health checks run while the proxy does
        self._groups: dict[int, _Entry] = {}
        self._states: dict[str, TargetState] = {}
        self._checkers: dict[_CheckKey, HealthChecker] = {}
        self._stopping: set[asyncio.Task[None]] = set()  # checkers of dropped routes stopping
        # The groups with no target up, by ``id(action)``: empty (and so free to test) while
        # every route has a target up.
        self.down: dict[int, TargetGroup] = {}

    # -- routes ----------------------------------------------------------------------------

    def prepare(self, routes: Iterable[CompiledRoute]) -> Mapping[int, TargetGroup]:
        """Make the groups of ``routes`` (keeping those of actions already known); returns
        the groups that can go down, by ``id(action)``, for the route table: it skips a route
        whose group is not up. Nothing is dropped until :meth:`retain`."""
        groups = self._groups
        gates: dict[int, TargetGroup] = {}
        for route in routes:
            action = route.action
            if not isinstance(action, ForwardAction):
                continue
            entry = groups.get(id(action))
            if entry is None or entry[0] is not action:
                if entry is not None and entry[1] is not None:
                    entry[1].close()  # an action gone and its id reused
                tls = route.tls
                speaks = tls if tls is not None and tls.mode == "terminate-and-reencrypt" else None
                entry = groups[id(action)] = (action, self._build(action), speaks)
            if type(entry[1]) is TargetGroup:
                gates[id(action)] = entry[1]
        return gates

    def retain(self, routes: Iterable[CompiledRoute]) -> None:
        """``routes`` are current: drop the groups of other routes, start and stop health
        checkers to match (when running), forget targets no route lists."""
        wanted = {id(route.action) for route in routes}
        for key in [key for key in self._groups if key not in wanted]:
            group = self._groups.pop(key)[1]
            if group is not None:
                group.close()
        self._sync_checkers()

    def _build(self, action: ForwardAction) -> TargetGroup | _PerPort | None:
        targets = action.targets
        if any(callable(t.host) or callable(t.port) for t in targets):
            return None
        if all(t.fixed for t in targets):
            return self.make_group(action, 0)
        return _PerPort(action, self)

    def make_group(self, action: ForwardAction, port: int) -> TargetGroup:
        """The group of ``action``'s targets (``"preserve"`` ports become ``port``)."""
        members = []
        for target in action.targets:
            target_port = target.port if isinstance(target.port, int) else port
            assert isinstance(target.host, tuple)
            for host in target.host:
                state = self._state(host, target_port)
                members.append(_member(host, target_port, target, state))
        check, passive = action.health_check, action.passive_health
        if check is not None:
            wait = check.interval * check.rise
        else:
            wait = passive.fail_timeout if passive is not None else 1.0
        group = TargetGroup(
            members,
            action.load_balancing,
            passive,
            retry_after=max(1, math.ceil(wait)),
            downs=self.down if port == 0 else None,
            key=id(action),
        )
        for member in group.members:
            member.state.groups.append(group)
        return group

    def _state(self, host: str, port: int) -> TargetState:
        fresh = TargetState(host, port)
        return self._states.setdefault(fresh.key, fresh)

    def group(self, route: CompiledRoute, port: int) -> TargetGroup | None:
        """The group ``route`` picks its target from on ``port``; None when its targets are
        resolved per connection (callables) or it is no installed forward route."""
        entry = self._groups.get(id(route.action))
        if entry is None:
            return None
        group = entry[1]
        if type(group) is _PerPort:
            return group.at(port)
        return group  # type: ignore[return-value]

    # -- health checks ---------------------------------------------------------------------

    def start(self) -> None:
        """The proxy started: run the health checks its routes ask for."""
        self.running = True
        for state in self._states.values():
            state.resume()  # a target taken out when the proxy last stopped
        self._sync_checkers()

    def _sync_checkers(self) -> None:
        wanted: dict[_CheckKey, tuple[TargetState, bool]] = {}
        for action, group, tls in self._groups.values() if self.running else ():
            spec = action.health_check
            if spec is None or type(group) is not TargetGroup:
                continue
            for member in group.members:
                key = (member.state.key, spec, tls)
                initially_up = member.initial_up
                if key not in wanted or not initially_up:
                    wanted[key] = (member.state, initially_up)
        for key in list(self._checkers):
            if key not in wanted:
                task = asyncio.get_running_loop().create_task(self._checkers.pop(key).stop())
                self._stopping.add(task)
                task.add_done_callback(self._stopping.discard)
        for key, (state, initially_up) in wanted.items():
            if key not in self._checkers:
                checker = self._checkers[key] = HealthChecker(
                    state, key[1], initially_up=initially_up, tls=key[2]
                )
                checker.start()
        referenced = {m.state.key for g in self._fixed_groups() for m in g.members}
        for name in list(self._states):
            if name not in referenced and not self._states[name].active:
                self._states.pop(name).close()

    def _fixed_groups(self) -> Iterable[TargetGroup]:
        for _, group, _ in self._groups.values():
            if type(group) is TargetGroup:
                yield group
            elif type(group) is _PerPort:
                yield from group.groups.values()

    def checkers(self) -> list[HealthChecker]:
        return list(self._checkers.values())

    # -- reporting and shutdown ------------------------------------------------------------

    def report(self) -> dict[str, dict[str, Any]]:
        """``stats()["targets"]``: each known target's state by ``host:port``."""
        return {key: state.report() for key, state in sorted(self._states.items())}

    async def close(self) -> None:
        """The proxy stopped: stop every health check."""
        self.running = False
        checkers, self._checkers = list(self._checkers.values()), {}
        await asyncio.gather(*(c.stop(quiet=True) for c in checkers), *self._stopping)
        for state in self._states.values():
            state.close()


def _member(host: str, port: int, target: TargetSpec, state: TargetState) -> Member:
    return Member(
        host,
        port,
        target.send_proxy_protocol,
        state,
        target.weight,
        target.backup,
        initial_up=target.initial == "up",
    )
