"""Proxy-wide settings: the keyword arguments of :class:`smartroute.SmartRoute`, validated."""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from smartroute.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Settings:
    """Every duration is in seconds; ``None`` turns a limit off."""

    bind_address: str = "0.0.0.0"
    initial_data_timeout: float = 10.0
    connect_timeout: float = 10.0
    idle_timeout: float | None = 3600.0
    max_connection_lifetime: float | None = 86400.0
    graceful_shutdown_timeout: float = 30.0
    http_keepalive_timeout: float = 60.0
    backend_timeout: float = 60.0
    acme: Mapping[str, Any] | None = None
    accept_proxy_protocol: bool = False
    proxy_ips: tuple[str, ...] = field(default=())
    backlog: int = 1024
    # async (domain) -> (cert_pem, key_pem) | {"cert", "key"} | None, asked before ACME
    certificate_provider: Any = None


_DURATIONS = (
    "initial_data_timeout",
    "connect_timeout",
    "graceful_shutdown_timeout",
    "http_keepalive_timeout",
    "backend_timeout",
)
_OPTIONAL_DURATIONS = ("idle_timeout", "max_connection_lifetime")


def _duration(name: str, value: object, *, optional: bool) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        expected = "a number of seconds or None" if optional else "a number of seconds"
        raise ConfigError(f"settings.{name}", f"expected {expected}, got {value!r}")
    if value <= 0:
        raise ConfigError(f"settings.{name}", f"must be greater than 0, got {value!r}")
    return float(value)


def validate_settings(raw: Mapping[str, object]) -> Settings:
    """Check every keyword argument and return frozen :class:`Settings`."""
    known = [f.name for f in fields(Settings)]
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise ConfigError(f"settings.{name}", f"unknown setting{hint}")
        if name in _DURATIONS:
            values[name] = _duration(name, value, optional=False)
        elif name in _OPTIONAL_DURATIONS:
            values[name] = _duration(name, value, optional=True)
        elif name == "bind_address":
            if not isinstance(value, str) or not value:
                raise ConfigError("settings.bind_address", f"expected an address, got {value!r}")
            values[name] = value
        elif name == "accept_proxy_protocol":
            if not isinstance(value, bool):
                raise ConfigError(f"settings.{name}", f"expected True or False, got {value!r}")
            values[name] = value
        elif name == "proxy_ips":
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list | tuple):
                raise ConfigError("settings.proxy_ips", f"expected a list of IPs, got {value!r}")
            for i, item in enumerate(items):
                try:
                    ipaddress.ip_network(str(item), strict=False)
                except ValueError:
                    raise ConfigError(
                        f"settings.proxy_ips[{i}]", f"{item!r} is not an IP address or network"
                    ) from None
            values[name] = tuple(str(item) for item in items)
        elif name == "acme":
            if value is not None and not isinstance(value, Mapping):
                raise ConfigError("settings.acme", f"expected a dict, got {type(value).__name__}")
            values[name] = value
        elif name == "certificate_provider":
            if value is not None and not callable(value):
                raise ConfigError(
                    "settings.certificate_provider",
                    f"expected an async function (domain) -> certificate, got {value!r}",
                )
            values[name] = value
        elif name == "backlog":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError("settings.backlog", f"expected an int >= 1, got {value!r}")
            values[name] = value
    return Settings(**values)
