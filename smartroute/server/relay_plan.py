"""Which routes the fast lane can carry: a route's target group, when the lane can reach its
targets and pipe bytes or send HTTP requests to them.

Pure: a compiled route and its group in, the group (or None) out. The lane
(:class:`~smartroute.server.lane.RelayLane`) keeps one plan of each kind per route and port of
the current route table.
"""

from __future__ import annotations

from smartroute.routing.model import CompiledRoute, ForwardAction
from smartroute.server.backends.group import TargetGroup


def relay_plan(route: CompiledRoute, group: TargetGroup | None) -> TargetGroup | None:
    """The group a route pipes bytes to, or None when it needs more than the lane does.

    None for anything but a plain byte forward (HTTP, TLS termination or re-encryption), for
    routes with hooks or speed limits and for groups the lane cannot reach
    (:func:`lane_group`).
    """
    action = route.action
    if not isinstance(action, ForwardAction) or action.protocol == "http" or _extras(route):
        return None
    if route.tls is not None and route.tls.mode != "passthrough":
        return None
    return lane_group(action, group)


def http_plan(route: CompiledRoute, group: TargetGroup | None) -> TargetGroup | None:
    """The group an HTTP reverse-proxy route sends requests to, or None when its requests
    need the transport path (hooks, limits, see :func:`lane_group`) or it is no HTTP forward. A
    route that terminates TLS (and perhaps re-encrypts to its targets) qualifies when it
    forwards HTTP only (``protocol: "http"``)."""
    action = route.action
    if not isinstance(action, ForwardAction) or action.protocol == "tcp" or _extras(route):
        return None
    tls = route.tls
    if tls is not None and (tls.mode == "passthrough" or action.protocol != "http"):
        return None
    return lane_group(action, group)


def _extras(route: CompiledRoute) -> bool:
    """The route has hooks (awaited) or speed limits (timers per chunk): the asyncio path's."""
    return route.chain is not None or route.bandwidth is not None


def lane_group(action: ForwardAction, group: TargetGroup | None) -> TargetGroup | None:
    """``group`` when the lane can carry its route's connections: targets known up front
    (no callables), IP literals (no resolver), no PROXY header, and no retry policy (retries
    wait between tries: the transport path does that)."""
    if group is None or not group.literal or action.retry is not None:
        return None
    return group
