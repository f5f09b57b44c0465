"""Route validation: dicts or schema dataclasses in, frozen :class:`CompiledRoute` objects out.

One mechanism: a dataclass from :mod:`smartroute.routing.schema` is first turned into the dict
shape it stands for (shallowly; fields left at their defaults are omitted), then everything goes
through the one dict validator below. Every error is a :class:`ConfigError` whose path names the
field exactly: ``routes[2].match.ports[1]: 70000 is not a port (1-65535)``.

One module per part of a route (:mod:`.match`, :mod:`.actions`, :mod:`.tls`, :mod:`.security`,
:mod:`.timeouts`) over the shared keys, messages and small checks of :mod:`._fields`; this
module puts a route together and holds the public entry points.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Collection, Iterable, Mapping
from types import MappingProxyType

from smartroute.errors import ConfigError
from smartroute.routing import schema
from smartroute.routing.model import CompiledRoute
from smartroute.routing.validation._fields import (
    ROUTE_KEYS,
    Raw,
    check_keys,
    expect_bool,
    expect_int,
    expect_text,
    got,
    mapping,
    require,
)
from smartroute.routing.validation.actions import compile_action
from smartroute.routing.validation.bandwidth import compile_bandwidth
from smartroute.routing.validation.hooks import compile_hooks, hooks_fail
from smartroute.routing.validation.match import compile_match
from smartroute.routing.validation.security import compile_security
from smartroute.routing.validation.timeouts import compile_timeouts
from smartroute.routing.validation.tls import compile_tls

__all__ = ["validate_route", "validate_routes"]

# (given name or None, route index, path of the name) -> (name, whether it was given)
_NO_OVERRIDES: Mapping[str, float | None] = MappingProxyType({})

_NameResolver = Callable[[str | None, int, str], tuple[str, bool]]


def _generated_name(index: int, taken: Collection[str]) -> str:
    name, extra = f"route-{index}", 1
    while name in taken:
        extra += 1
        name = f"route-{index}-{extra}"
    return name


def _compile_route(raw: Raw, index: int, path: str, resolve_name: _NameResolver) -> CompiledRoute:
    check_keys(raw, ROUTE_KEYS, path, "", path)
    require(raw, path, "match", "action")
    given, priority, enabled = raw.get("name"), raw.get("priority"), raw.get("enabled")
    if given is not None:
        given = expect_text(given, f"{path}.name")
    name, named = resolve_name(given, index, f"{path}.name")
    match = compile_match(raw["match"], f"{path}.match", path)
    action, tls_value = compile_action(raw["action"], f"{path}.action", path)
    tls = None if tls_value is None else compile_tls(tls_value, f"{path}.action.tls", action, path)
    security, timeouts = raw.get("security"), raw.get("timeouts")
    hooks, fail, bandwidth = raw.get("hooks"), raw.get("hooks_fail"), raw.get("bandwidth")
    return CompiledRoute(
        name=name,
        match=match,
        action=action,
        index=index,
        priority=0 if priority is None else expect_int(priority, f"{path}.priority"),
        enabled=True if enabled is None else expect_bool(enabled, f"{path}.enabled"),
        tls=tls,
        security=None
        if security is None
        else compile_security(security, f"{path}.security", path, action, tls),
        named=named,
        timeout_overrides=_NO_OVERRIDES
        if timeouts is None
        else compile_timeouts(timeouts, f"{path}.timeouts", path),
        hooks=() if hooks is None else compile_hooks(hooks, f"{path}.hooks"),
        hooks_fail="closed" if fail is None else hooks_fail(fail, f"{path}.hooks_fail"),
        bandwidth=None if bandwidth is None else compile_bandwidth(bandwidth, f"{path}.bandwidth"),
    )


def validate_route(
    route: schema.RouteInput,
    index: int,
    *,
    path: str = "route",
    taken_names: Collection[str] = (),
) -> CompiledRoute:
    """Validate one route (dict or :class:`~smartroute.routing.schema.Route`).

    ``index`` becomes the route's definition order; ``taken_names`` are the names of the routes
    it joins: a given name among them is an error, a generated name (``route-<index>``) avoids
    them.
    """

    def resolve(given: str | None, index: int, name_path: str) -> tuple[str, bool]:
        if given is None:
            return _generated_name(index, taken_names), False
        if given in taken_names:
            raise ConfigError(name_path, f'duplicate route name "{given}" (already taken)')
        return given, True

    return _compile_route(mapping(route, path, schema.Route), index, path, resolve)


def validate_routes(
    routes: Iterable[schema.RouteInput], *, path: str = "routes"
) -> tuple[CompiledRoute, ...]:
    """Validate a whole route set: names unique, unnamed routes named ``route-<index>``."""
    if isinstance(routes, str | bytes | Mapping | schema.Route) or not isinstance(routes, Iterable):
        hint = (
            " (wrap a single route in a list)" if isinstance(routes, Mapping | schema.Route) else ""
        )
        raise ConfigError(path, f"expected a list of routes, got {got(routes)}{hint}")
    items = list(routes)
    # Names given anywhere in the set are reserved before any name is generated.
    first_use: dict[str, int] = {}
    for i, route in enumerate(items):
        if type(route) is dict or isinstance(route, Mapping):
            given = route.get("name")
        else:
            given = getattr(route, "name", None)
        if isinstance(given, str):
            first_use.setdefault(given, i)

    def resolve(given: str | None, index: int, name_path: str) -> tuple[str, bool]:
        if given is None:
            return _generated_name(index, first_use), False
        first = first_use[given]
        if first != index:
            raise ConfigError(name_path, f'duplicate route name "{given}" (also {path}[{first}])')
        return given, True

    compiled: list[CompiledRoute] = []
    # The compiled objects form no reference cycles, yet allocating tens of thousands of them
    # triggers full collections that scan everything alive: a third of the time of a large set.
    pause_gc = len(items) > 1000 and gc.isenabled()
    if pause_gc:
        gc.disable()
    try:
        for i, route in enumerate(items):
            route_path = f"{path}[{i}]"
            raw = mapping(route, route_path, schema.Route)
            compiled.append(_compile_route(raw, i, route_path, resolve))
    finally:
        if pause_gc:
            gc.enable()
    return tuple(compiled)
