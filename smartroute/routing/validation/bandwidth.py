"""The ``bandwidth`` block of a route (and the proxy-wide ``bandwidth`` setting)."""

from __future__ import annotations

from smartroute.errors import ConfigError
from smartroute.routing.model import BandwidthPolicy, Rate
from smartroute.routing.validation._fields import check_keys, got, mapping

SCOPES = ("per_connection", "per_ip", "per_route")
DIRECTIONS = ("download", "upload")


def compile_bandwidth(value: object, path: str) -> BandwidthPolicy:
    raw = mapping(value, path)
    check_keys(raw, frozenset(SCOPES), path)
    if not raw:
        raise ConfigError(path, f"empty (give at least one of {', '.join(SCOPES)})")
    rates = {scope: compile_rate(raw[scope], f"{path}.{scope}") for scope in SCOPES if scope in raw}
    return BandwidthPolicy(**rates)


def compile_rate(value: object, path: str) -> Rate:
    """``{"download": bytes_per_s, "upload": bytes_per_s}``, at least one of them."""
    raw = mapping(value, path)
    check_keys(raw, frozenset(DIRECTIONS), path)
    if not raw:
        raise ConfigError(path, "empty (give download, upload or both, in bytes per second)")
    return Rate(**{way: bytes_per_second(raw[way], f"{path}.{way}") for way in raw})


def bytes_per_second(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(path, f"expected bytes per second (a number > 0), got {got(value)}")
    if value != value or value == float("inf"):
        raise ConfigError(path, f"expected a finite number of bytes per second, got {value!r}")
    return float(value)
