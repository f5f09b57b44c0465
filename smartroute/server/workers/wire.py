"""The control channel between the parent and a worker: frames, route sets and errors.

A socketpair carries length-prefixed pickled messages:

* parent -> worker: ``("routes", id, entries)`` (a new route set: routes the worker already has
  are named by position, new or changed ones are pickled), ``("rollback", id)`` (go back to the
  set before the last change) and ``("stop",)``;
* worker -> parent: ``("ready",)`` or ``("failed", error)`` after starting, ``("done", id,
  error_or_None)`` for each route change, ``("stats", snapshot)`` about once a second and
  once more after stopping, and ``("leaving", why)`` when it stops on its own (SIGTERM).

Errors travel as plain values (:func:`encode_error`) and are rebuilt, naming the worker, on the
other side (:func:`decode_error`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import pickle
import struct
from collections.abc import Iterable, Sequence
from types import MappingProxyType
from typing import Any, TypeAlias

from smartroute.errors import ConfigError, PortInUseError, SmartRouteError
from smartroute.routing.model import CompiledRoute, RoundRobin

_HEADER = struct.Struct("!I")

# One route of a route change: (position in the worker's current set, new index), or the
# route pickled.
Entry: TypeAlias = tuple[int, int] | bytes
# An error as it crosses the channel: a kind ("port", "config", "other") and its fields.
WireError: TypeAlias = tuple[str, tuple[Any, ...]]


# -- frames --------------------------------------------------------------------------------------


def frame(message: object) -> bytes:
    """``message`` pickled, behind its length."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


async def receive(reader: asyncio.StreamReader) -> Any:
    """The next message, or None once the other end closed the channel."""
    try:
        header = await reader.readexactly(_HEADER.size)
        return pickle.loads(await reader.readexactly(_HEADER.unpack(header)[0]))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


# -- route changes -----------------------------------------------------------------------------


class _RoutePickler(pickle.Pickler):
    """Pickles compiled routes: read-only dict views as dicts, round-robin counters afresh."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, MappingProxyType):
            return _read_only, (dict(obj),)
        if isinstance(obj, RoundRobin):
            return RoundRobin, ()  # each process rotates on its own
        return NotImplemented


def _read_only(items: dict[Any, Any]) -> MappingProxyType[Any, Any]:
    return MappingProxyType(items)


def _pickle_route(route: CompiledRoute) -> bytes:
    buffer = io.BytesIO()
    try:
        _RoutePickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(route)
    except Exception as exc:  # PicklingError, TypeError, AttributeError: all "cannot send"
        raise ConfigError(
            f"route {route.name!r}",
            f"cannot be sent to the worker processes (workers > 1): {exc}; callables in a "
            "route must be module-level functions that can be imported by name, not lambdas, "
            "closures or functions defined in a .py config file",
        ) from None
    return buffer.getvalue()


def encode_routes(current: Sequence[CompiledRoute], routes: Iterable[CompiledRoute]) -> list[Entry]:
    """Describe ``routes`` to a worker whose route set is ``current``.

    A route the worker already has (same name, equal apart from its position) is sent as its
    position, so only new or changed routes are pickled; one that cannot be pickled raises a
    :class:`ConfigError` naming it.
    """
    known = {route.name: (position, route) for position, route in enumerate(current)}
    entries: list[Entry] = []
    for route in routes:
        found = known.get(route.name)
        if found is not None:
            position, old = found
            if old is route or _moved(old, route.index) == route:
                entries.append((position, route.index))
                continue
        entries.append(_pickle_route(route))
    return entries


def decode_routes(
    current: Sequence[CompiledRoute], entries: Iterable[Entry]
) -> tuple[CompiledRoute, ...]:
    """The route set described by ``entries`` (see :func:`encode_routes`)."""
    routes: list[CompiledRoute] = []
    for entry in entries:
        if isinstance(entry, bytes):
            route = pickle.loads(entry)
            if not isinstance(route, CompiledRoute):
                raise SmartRouteError(f"expected a route, got {type(route).__name__}")
            routes.append(route)
        else:
            position, index = entry
            routes.append(_moved(current[position], index))
    return tuple(routes)


def _moved(route: CompiledRoute, index: int) -> CompiledRoute:
    return route if route.index == index else dataclasses.replace(route, index=index)


# -- errors ------------------------------------------------------------------------------------


def encode_error(exc: BaseException) -> WireError:
    """``exc`` as plain values: a port or config error keeps its fields, others their text."""
    if isinstance(exc, PortInUseError):
        return "port", (exc.port, exc.address, exc.holder)
    if isinstance(exc, ConfigError):
        return "config", (exc.path, exc.problem)
    return "other", (type(exc).__name__, str(exc))


def decode_error(where: str, wire: WireError) -> SmartRouteError:
    """The error :func:`encode_error` described, saying it happened in ``where``."""
    kind, args = wire
    if kind == "port":
        port, address, holder = args
        return PortInUseError(port, address, holder, detail=f"seen by {where}")
    if kind == "config":
        path, problem = args
        return ConfigError(path, f"{problem} (in {where})")
    name, message = args
    return SmartRouteError(f"{where}: {name}: {message}")
