"""What every part of route validation shares: the allowed keys (read from the schema's
TypedDicts), error messages with "did you mean" hints, small typed checks, and the step that
turns a schema dataclass into the dict shape it stands for.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, Final, TypeVar

from smartroute.errors import ConfigError
from smartroute.routing import schema
from smartroute.routing.patterns import (
    DomainPattern,
    IpRule,
    PathPattern,
    compile_domain,
    compile_header_rule,
    compile_ip_rule,
    compile_path,
)

_T = TypeVar("_T")
Raw = Mapping[str, object]
LISTS = (list, tuple, set, frozenset)


def _keys(typed_dict: Any) -> frozenset[str]:
    return frozenset(typed_dict.__required_keys__ | typed_dict.__optional_keys__)


# The TypedDicts of the schema are the one list of allowed keys.
ROUTE_KEYS = _keys(schema.RouteDict)
MATCH_KEYS = _keys(schema.MatchDict)
RANGE_KEYS = _keys(schema.PortRangeDict)
TARGET_KEYS = _keys(schema.TargetDict)
HEALTH_CHECK_KEYS = _keys(schema.HealthCheckDict)
PASSIVE_HEALTH_KEYS = _keys(schema.PassiveHealthDict)
RETRY_KEYS = _keys(schema.RetryDict)
TLS_KEYS = _keys(schema.TlsDict)
CERT_KEYS = _keys(schema.CertificateDict)
REDIRECT_KEYS = _keys(schema.RedirectDict)
STATIC_KEYS = _keys(schema.StaticDict)
SECURITY_KEYS = _keys(schema.SecurityDict)
RATE_KEYS = _keys(schema.RateLimitDict)
AUTH_KEYS = _keys(schema.BasicAuthDict)
TIMEOUT_KEYS = _keys(schema.TimeoutsDict)
ACTION_KEYS: Final = {
    "forward": _keys(schema.ForwardActionDict),
    "redirect": _keys(schema.RedirectActionDict),
    "block": _keys(schema.BlockActionDict),
    "static": _keys(schema.StaticActionDict),
    "socket-handler": _keys(schema.SocketHandlerActionDict),
}
ANY_ACTION_KEY = frozenset().union(*ACTION_KEYS.values())
# Keys only a forward action has, beyond the ones every action has (its targets excepted).
BACKEND_KEYS = frozenset({"load_balancing", "health_check", "passive_health", "retry"})

# Where each key of a route's blocks belongs, relative to the route ("status" belongs in two
# places). Only an exact key is placed: "tls" at route level -> "action.tls". A near-miss is only
# ever compared with the keys of its own block, so a typo never points into another block.
_PLACES: dict[str, tuple[str, ...]] = {key: (key,) for key in ROUTE_KEYS}
for _block, _block_keys in (
    ("match", MATCH_KEYS),
    ("action", ANY_ACTION_KEY),
    ("action.tls", TLS_KEYS),
    ("action.tls.certificate", CERT_KEYS),
    ("action.redirect", REDIRECT_KEYS),
    ("action.static", STATIC_KEYS),
    ("security", SECURITY_KEYS),
    ("security.rate_limit", RATE_KEYS),
    ("security.basic_auth", AUTH_KEYS),
    ("timeouts", TIMEOUT_KEYS),
):
    for _key in _block_keys:
        _PLACES[_key] = (*_PLACES.get(_key, ()), f"{_block}.{_key}")


# -- messages and small checks -------------------------------------------------------------------


def got(value: object) -> str:
    if value is None or isinstance(value, bool | int | float | str | bytes):
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return type(value).__name__


def quoted(items: Iterable[object]) -> str:
    return ", ".join(f'"{item}"' for item in items)


def one_of(choices: Collection[object]) -> str:
    *head, last = [f'"{item}"' if isinstance(item, str) else str(item) for item in choices]
    return f"{', '.join(head)} or {last}" if head else last


def unknown(what: str, value: object, choices: Collection[str]) -> str:
    """``unknown TLS mode "pasthrough" (did you mean "passthrough"?)``, case-insensitively."""
    if not isinstance(value, str):
        return f"unknown {what} {got(value)} (expected {one_of(choices)})"
    lowered = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(value.lower(), list(lowered), n=1)
    hint = f'did you mean "{lowered[close[0]]}"?' if close else f"expected {one_of(choices)}"
    return f'unknown {what} "{value}" ({hint})'


def check_keys(
    raw: Raw,
    allowed: frozenset[str],
    path: str,
    level: str | None = None,
    route: str = "",
    skip: tuple[str, ...] = (),
) -> None:
    """Unknown keys are errors, with a hint from the keys of this block only.

    ``level`` (route-relative, "" for the route itself) also places a key that belongs to
    another block of the route (not at places starting with ``skip``); ``route`` is the
    route's path, "" outside a route (then only keys of blocks inside this one are placed).
    """
    if raw.keys() <= allowed:
        return
    for key in raw:
        if key not in allowed:
            raise ConfigError(path, _unknown_key(key, allowed, level, route, skip))


def _unknown_key(
    key: object, allowed: frozenset[str], level: str | None, route: str, skip: tuple[str, ...]
) -> str:
    listed = f"allowed: {quoted(sorted(allowed))}"
    if not isinstance(key, str):
        return f"unknown key {key!r} ({listed})"
    places = () if level is None else _placed(key, level, route, skip)
    if not places:
        places = tuple(difflib.get_close_matches(key, sorted(allowed), n=1))
    if not places and level is not None:
        places = _near_below(key, level, skip)
    if not places:
        return f'unknown key "{key}" ({listed})'
    either = " or ".join(f'"{place}"' for place in places)
    return f'unknown key "{key}" (did you mean {either}?)'


def _near_below(key: str, level: str, skip: tuple[str, ...]) -> tuple[str, ...]:
    """A near-miss among the keys of the blocks inside the one at ``level``, as a path relative
    to it ("domain" at route level -> "match.domains"); never a key of a block above or
    beside it."""
    prefix = f"{level}." if level else ""
    below: dict[str, str] = {}
    for name, wheres in _PLACES.items():
        for where in wheres:
            inner = where[len(prefix) :]
            if where.startswith(prefix) and "." in inner and not where.startswith(skip):
                below.setdefault(name, inner)
    close = difflib.get_close_matches(key, sorted(below), n=1)
    return (below[close[0]],) if close else ()


def _placed(key: str, level: str, route: str, skip: tuple[str, ...]) -> tuple[str, ...]:
    """Where ``key``, written in the block at ``level``, belongs in the route: as a path
    relative to the block when it is inside it, to the route at its top, else in full."""
    places: list[str] = []
    here = key if level == "" else f"{level}.{key}"
    for where in _PLACES.get(key, ()):
        if where == here or where.startswith(skip):
            continue
        if level == "":
            places.append(where)
        elif where.startswith(level + "."):
            places.append(where[len(level) + 1 :])
        elif route:
            places.append(f"{route}.{where}")
    return tuple(places)


def require(raw: Raw, path: str, *keys: str) -> None:
    for key in keys:
        if raw.get(key) is None:
            raise ConfigError(path, f'missing required key "{key}"')


def expect_int(value: object, path: str, minimum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ConfigError(path, f"expected an int{bound}, got {got(value)}")
    if minimum is not None and value < minimum:
        raise ConfigError(path, f"expected an int >= {minimum}, got {value}")
    return value


def expect_int_between(value: object, path: str, low: int, high: int, what: str) -> int:
    """An int from ``low`` to ``high``: ``0 is not a weight (1-256)``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(path, f"expected an int ({low}-{high}), got {got(value)}")
    if not low <= value <= high:
        raise ConfigError(path, f"{value} is not {what} ({low}-{high})")
    return value


def expect_seconds(value: object, path: str, *, can_be_off: bool = False) -> float | None:
    """A duration in seconds (int or float, > 0); with ``can_be_off``, None or 0 mean "off"."""
    if can_be_off and (value is None or (value == 0 and not isinstance(value, bool))):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        off = " (0 or None: no limit)" if can_be_off else ""
        raise ConfigError(path, f"expected a number of seconds{off}, got {got(value)}")
    if not value > 0 or value == float("inf"):
        raise ConfigError(path, f"must be a finite number greater than 0, got {value!r}")
    return float(value)


def expect_delay(value: object, path: str) -> float:
    """A wait in seconds (int or float) that may be 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(path, f"expected a number of seconds, got {got(value)}")
    if not value >= 0 or value == float("inf"):
        raise ConfigError(path, f"must be a finite number of at least 0, got {value!r}")
    return float(value)


def expect_fraction(value: object, path: str) -> float:
    """A number from 0 to 1 (int or float)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(path, f"expected a number from 0 to 1, got {got(value)}")
    if not 0 <= value <= 1:
        raise ConfigError(path, f"{value!r} is not a fraction (0-1)")
    return float(value)


def expect_port(value: object, path: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(path, f"expected an int, got {got(value)}")
    if not 1 <= value <= 65535:
        raise ConfigError(path, f"{value} is not a port (1-65535)")
    return value


def expect_bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(path, f"expected a bool, got {got(value)}")
    return value


def expect_text(value: object, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(path, f"expected a non-empty str, got {got(value)}")
    return value


def expect_request_text(value: object, path: str, what: str) -> str:
    """Text that goes into a request as it is (a path, a Host header): printable ASCII
    without spaces, so that it can neither break nor extend the request."""
    text = expect_text(value, path)
    if not text.isascii() or not text.isprintable() or " " in text:
        raise ConfigError(path, f"{text!r} is not {what} (printable ASCII without spaces)")
    return text


def expect_status_range(value: object, path: str) -> tuple[int, int]:
    """HTTP statuses ``[low, high]`` (inclusive; a list or a tuple), or ``n`` for ``[n, n]``."""

    def status(item: object, where: str) -> int:
        return expect_int_between(item, where, 100, 599, "an HTTP status")

    if isinstance(value, int) and not isinstance(value, bool):
        return (status(value, path),) * 2
    if not isinstance(value, list | tuple):
        raise ConfigError(path, f"expected a status or a [low, high] pair, got {got(value)}")
    if len(value) != 2:
        raise ConfigError(path, f"expected two statuses [low, high], got {len(value)}")
    low, high = status(value[0], f"{path}[0]"), status(value[1], f"{path}[1]")
    if low > high:
        raise ConfigError(path, f"[{low}, {high}] is an empty range (low is greater than high)")
    return (low, high)


def expect_choice(value: object, path: str, choices: tuple[str, ...], what: str) -> str:
    if isinstance(value, str) and value in choices:
        return value
    raise ConfigError(path, unknown(what, value, choices))


def expect_strings(value: object, path: str, convert: Callable[[str, str], _T]) -> tuple[_T, ...]:
    """A str or a non-empty list of str, each passed through ``convert(text, path)``."""
    if isinstance(value, str):
        return (convert(value, path),)
    if not isinstance(value, LISTS):
        raise ConfigError(path, f"expected a str or a list of str, got {got(value)}")
    if not value:
        raise ConfigError(path, "empty list (use None or omit it)")
    items: list[_T] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigError(f"{path}[{i}]", f"expected a str, got {got(item)}")
        items.append(convert(item, f"{path}[{i}]"))
    return tuple(items)


def _compiler(compile_one: Callable[[str], _T]) -> Callable[[str, str], _T]:
    """Wrap a ``patterns.compile_*`` function: cached, ValueError -> ConfigError at ``path``."""
    cached = functools.lru_cache(maxsize=4096)(compile_one)

    def convert(text: str, path: str) -> _T:
        try:
            return cached(text)
        except ValueError as exc:
            raise ConfigError(path, str(exc)) from None

    return convert


domain: Callable[[str, str], DomainPattern] = _compiler(compile_domain)
ip_rule: Callable[[str, str], IpRule] = _compiler(compile_ip_rule)
path_pattern: Callable[[str, str], PathPattern] = _compiler(compile_path)
header_rule = functools.lru_cache(maxsize=1024)(compile_header_rule)


# -- dataclass input -> dict shape ---------------------------------------------------------------

_FIELDS: dict[type, tuple[tuple[str, object], ...]] = {}


def _shallow(obj: Any) -> dict[str, object]:
    """A schema dataclass as its dict form, one level deep; ``None`` and default values omitted."""
    spec = _FIELDS.get(type(obj))
    if spec is None:
        spec = _FIELDS[type(obj)] = tuple((f.name, f.default) for f in dataclasses.fields(obj))
    shape: dict[str, object] = {}
    for name, default in spec:
        value = getattr(obj, name)
        # type() guard: Route(enabled=1) must reach the validator, not pass as the default True
        if value is None or (type(value) is type(default) and value == default):
            continue
        shape[name] = value
    return shape


def mapping(value: object, path: str, kind: type | None = None) -> Raw:
    if type(value) is dict or isinstance(value, Mapping):
        return value
    if kind is not None and isinstance(value, kind):
        return _shallow(value)
    expected = "a mapping" if kind is None else f"a mapping or a {kind.__name__}"
    raise ConfigError(path, f"expected {expected}, got {got(value)}")


_ACTION_CLASSES = (
    schema.Forward,
    schema.Redirect,
    schema.Block,
    schema.Static,
    schema.SocketHandler,
)


def action_mapping(value: object, path: str) -> Raw:
    if type(value) is dict or isinstance(value, Mapping):
        return value
    if not isinstance(value, _ACTION_CLASSES):
        names = ", ".join(kind.__name__ for kind in _ACTION_CLASSES)
        raise ConfigError(path, f"expected a mapping or one of {names}, got {got(value)}")
    fields = _shallow(value)
    tls = fields.pop("tls", None)
    shape: dict[str, object]
    if isinstance(value, schema.Forward):
        shape = {"type": "forward", **fields}
    elif isinstance(value, schema.Redirect):
        shape = {"type": "redirect", "redirect": fields}
    elif isinstance(value, schema.Static):
        shape = {"type": "static", "static": fields}
    elif isinstance(value, schema.SocketHandler):
        shape = {"type": "socket-handler", "socket_handler": value.handler}
    else:
        shape = {"type": "block"}
    if tls is not None:
        shape["tls"] = tls
    return shape


def import_object(spec: str, path: str) -> object:
    """The object ``"package.module:attribute"`` names (attributes may be dotted)."""
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name.strip() or not attribute.strip():
        raise ConfigError(
            path, f'{spec!r} is not an import path (expected "package.module:function")'
        )
    try:
        found: object = importlib.import_module(module_name.strip())
        for part in attribute.strip().split("."):
            found = getattr(found, part)
    except Exception as exc:  # whatever importing user code raises, report it at this field
        raise ConfigError(path, f"cannot import {spec!r} ({type(exc).__name__}: {exc})") from exc
    return found


def is_async(handler: object) -> bool:
    """True for a coroutine function, a partial of one, or an object with ``async __call__``."""
    while isinstance(handler, functools.partial):
        handler = handler.func
    if inspect.iscoroutinefunction(handler):
        return True
    if inspect.isroutine(handler) or inspect.isclass(handler):
        return False
    # an object whose class defines ``async def __call__``
    return inspect.iscoroutinefunction(type(handler).__call__)
