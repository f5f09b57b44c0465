"""Proxy-wide defaults applied to routes: the timeouts, the default ``security`` block, the
proxy-wide hooks and the default ``bandwidth`` block.

A validated route only carries what its author wrote. When the proxy installs a route set it
passes every route through :func:`apply`, which gives the route its effective time limits
(settings, then the route's ``timeouts`` block) and its effective security policy (the
``security`` setting, then the route's own block). The connection code reads only the result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

from smartroute.routing.model import BandwidthPolicy, CompiledRoute, SecurityPolicy, Timeouts
from smartroute.routing.validation.hooks import hook_chain
from smartroute.routing.validation.security import http_blocker

_T = TypeVar("_T")
_UNSET = SecurityPolicy()


def merge_security(
    defaults: SecurityPolicy | None, own: SecurityPolicy | None, *, serves_http: bool
) -> SecurityPolicy | None:
    """The route's policy over the defaults, field by field.

    A field the route sets replaces the default, except ``ip_block_list``: blocked addresses
    add up, so a route cannot unblock what the proxy blocks everywhere. The default
    ``basic_auth`` only reaches routes that serve HTTP.
    """
    if defaults is None:
        return own
    mine = own or _UNSET
    merged = SecurityPolicy(
        ip_allow_list=mine.ip_allow_list or defaults.ip_allow_list,
        ip_block_list=defaults.ip_block_list
        + tuple(rule for rule in mine.ip_block_list if rule not in defaults.ip_block_list),
        max_connections=_first(mine.max_connections, defaults.max_connections),
        max_connections_per_ip=_first(mine.max_connections_per_ip, defaults.max_connections_per_ip),
        rate_limit=_first(mine.rate_limit, defaults.rate_limit),
        basic_auth=_first(mine.basic_auth, defaults.basic_auth if serves_http else None),
    )
    return None if merged == _UNSET else merged


def _first(value: _T | None, default: _T | None) -> _T | None:
    return value if value is not None else default


def apply(
    route: CompiledRoute,
    timeouts: Timeouts,
    security: SecurityPolicy | None,
    hooks: tuple[object, ...] = (),
    hook_timeout: float = 1.0,
    bandwidth: BandwidthPolicy | None = None,
) -> CompiledRoute:
    """``route`` with its effective timeouts, security policy, hooks (``hooks``, the
    proxy-wide ones, run first) and speed limits (``bandwidth`` for a route without its own
    block) filled in."""
    effective = (
        dataclasses.replace(timeouts, **cast(dict[str, Any], route.timeout_overrides))
        if route.timeout_overrides
        else timeouts
    )
    policy = route.security
    if security is not None:
        serves_http = http_blocker(route.action, route.tls) is None
        policy = merge_security(security, route.security, serves_http=serves_http)
    chain = (
        hook_chain((*hooks, *route.hooks), route.hooks_fail, hook_timeout)
        if hooks or route.hooks
        else None
    )
    return dataclasses.replace(
        route,
        timeouts=effective,
        security=policy,
        chain=chain,
        bandwidth=route.bandwidth or bandwidth,
    )


def apply_all(
    routes: Iterable[CompiledRoute],
    timeouts: Timeouts,
    security: SecurityPolicy | None,
    hooks: Callable[[str], tuple[object, ...]] | None = None,
    hook_timeout: float = 1.0,
    bandwidth: BandwidthPolicy | None = None,
) -> list[CompiledRoute]:
    """Each route through :func:`apply`; ``hooks`` gives the proxy-wide hooks of a route by
    name (the setting's, then the plugins' that serve it)."""
    return [
        apply(
            route,
            timeouts,
            security,
            () if hooks is None else hooks(route.name),
            hook_timeout,
            bandwidth,
        )
        for route in routes
    ]
