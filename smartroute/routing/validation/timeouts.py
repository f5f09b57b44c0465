"""The ``timeouts`` block of a route: its own time limits, each overriding the setting."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from smartroute.routing import schema
from smartroute.routing.model import OPTIONAL_TIMEOUTS
from smartroute.routing.validation._fields import TIMEOUT_KEYS, check_keys, expect_seconds, mapping


def compile_timeouts(value: object, path: str, route: str) -> Mapping[str, float | None]:
    """Name -> seconds for every limit the block gives (None: the limit is off)."""
    raw = mapping(value, path, schema.Timeouts)
    check_keys(raw, TIMEOUT_KEYS, path, "timeouts", route)
    overrides = {
        name: expect_seconds(given, f"{path}.{name}", can_be_off=name in OPTIONAL_TIMEOUTS)
        for name, given in raw.items()
        if given is not None
    }
    return MappingProxyType(overrides)
