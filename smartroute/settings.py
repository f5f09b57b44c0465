"""Proxy-wide settings: the keyword arguments of :class:`smartroute.SmartRoute`, validated."""

from __future__ import annotations

import difflib
import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, cast

from smartroute.errors import ConfigError
from smartroute.plugins.spec import PluginSpec, compile_plugins
from smartroute.protocols.probes import Probes
from smartroute.routing.model import (
    OPTIONAL_TIMEOUTS,
    BandwidthPolicy,
    SecurityPolicy,
    Timeouts,
)
from smartroute.routing.validation._fields import expect_seconds, import_object
from smartroute.routing.validation.bandwidth import compile_bandwidth
from smartroute.routing.validation.hooks import compile_hooks
from smartroute.routing.validation.security import compile_security

_DEFAULT = Timeouts()
AccessLogFormat = Literal["text", "json", "combined"]
ACCESS_LOG_FORMATS: tuple[AccessLogFormat, ...] = ("text", "json", "combined")


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """The ``admin`` setting: where the admin server listens and the token it asks for."""

    port: int
    bind: str = "127.0.0.1"
    token: str | None = None


@dataclass(frozen=True, slots=True)
class AccessLogSettings:
    """The ``access_log`` setting: the line format, and a file (None: the
    ``smartroute.access`` logger); a file is reopened on SIGUSR1."""

    format: AccessLogFormat = "text"
    path: str | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    """Every duration is in seconds; ``None`` turns a limit off.

    The timeouts are the proxy-wide defaults; a route's ``timeouts`` block overrides them and
    ``security`` is the default security block of every route (see the README).
    """

    bind_address: str = "0.0.0.0"
    initial_data_timeout: float = _DEFAULT.initial_data
    connect_timeout: float = _DEFAULT.connect
    idle_timeout: float | None = _DEFAULT.idle
    max_connection_lifetime: float | None = _DEFAULT.max_lifetime
    half_close_timeout: float | None = _DEFAULT.half_close
    http_header_timeout: float = _DEFAULT.http_header
    http_keepalive_timeout: float = _DEFAULT.http_keepalive
    backend_timeout: float = _DEFAULT.backend
    graceful_shutdown_timeout: float = 30.0
    security: SecurityPolicy | None = None
    acme: Mapping[str, Any] | None = None
    accept_proxy_protocol: bool = False
    proxy_ips: tuple[str, ...] = field(default=())
    backlog: int = 1024
    # async (domain) -> (cert_pem, key_pem) | {"cert", "key"} | None, asked before ACME
    certificate_provider: Any = None
    # processes serving the ports: 1 is this one; N > 1 forks N - 1 workers (SO_REUSEPORT)
    workers: int = 1
    hooks: tuple[object, ...] = ()  # hooks of every route, run before each route's own
    hook_timeout: float = 1.0  # seconds a hook call may take
    bandwidth: BandwidthPolicy | None = None  # for routes without a bandwidth block
    plugins: tuple[PluginSpec, ...] = ()  # external programs asked as hooks
    # what match.protocol can name: the built-in probes, then the user's (setting "protocols")
    protocols: Probes = field(default_factory=Probes)
    admin: AdminSettings | None = None  # the admin server (metrics, API, status page): off
    access_log: AccessLogSettings = AccessLogSettings()

    @property
    def timeouts(self) -> Timeouts:
        """The proxy-wide time limits, under their route-level names."""
        return Timeouts(
            **{name: getattr(self, setting) for name, setting in TIMEOUT_SETTINGS.items()}
        )


# Route-level timeout name -> the setting that gives its proxy-wide value.
TIMEOUT_SETTINGS = {
    "initial_data": "initial_data_timeout",
    "connect": "connect_timeout",
    "idle": "idle_timeout",
    "max_lifetime": "max_connection_lifetime",
    "half_close": "half_close_timeout",
    "http_header": "http_header_timeout",
    "http_keepalive": "http_keepalive_timeout",
    "backend": "backend_timeout",
}
_DURATIONS = {setting: name in OPTIONAL_TIMEOUTS for name, setting in TIMEOUT_SETTINGS.items()}
_DURATIONS["graceful_shutdown_timeout"] = False

MAX_WORKERS = 64


def _admin(value: object) -> AdminSettings:
    """``{"port": 9901, "bind": "127.0.0.1", "token": None}``; a token is required to bind
    anything but a loopback address."""
    path = "settings.admin"
    if not isinstance(value, Mapping):
        raise ConfigError(
            path, f'expected {{"port": ..., "bind": ..., "token": ...}}, got {value!r}'
        )
    _known_keys(value, ("port", "bind", "token"), path)
    if "port" not in value:
        raise ConfigError(path, 'missing "port" (the admin server\'s port)')
    port = value["port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"{path}.port", f"{port!r} is not a port (0-65535; 0 picks a free one)")
    bind = value.get("bind", "127.0.0.1")
    try:
        address = ipaddress.ip_address(bind) if isinstance(bind, str) else None
    except ValueError:
        address = None
    if address is None and bind != "localhost":
        raise ConfigError(f"{path}.bind", f"expected an IP address, got {bind!r}")
    token = value.get("token")
    if token is not None and (not isinstance(token, str) or len(token) < 16):
        raise ConfigError(f"{path}.token", "expected a str of at least 16 characters")
    if token is None and bind != "localhost" and not (address is not None and address.is_loopback):
        raise ConfigError(
            f"{path}.token",
            f"required to bind {bind} (not a loopback address): anyone who reaches it could "
            "change the routes",
        )
    return AdminSettings(port, str(bind), token)


def _access_log(value: object) -> AccessLogSettings:
    """``{"format": "text" | "json" | "combined", "path": None | FILE}``."""
    path = "settings.access_log"
    if not isinstance(value, Mapping):
        raise ConfigError(path, f'expected {{"format": ..., "path": ...}}, got {value!r}')
    _known_keys(value, ("format", "path"), path)
    form = value.get("format", "text")
    if form not in ACCESS_LOG_FORMATS:
        choices = ", ".join(repr(f) for f in ACCESS_LOG_FORMATS)
        raise ConfigError(f"{path}.format", f"expected one of {choices}, got {form!r}")
    file = value.get("path")
    if file is not None and (not isinstance(file, str | os.PathLike) or not os.fspath(file)):
        raise ConfigError(f"{path}.path", f"expected a file path or None, got {file!r}")
    return AccessLogSettings(cast(AccessLogFormat, form), None if file is None else os.fspath(file))


def _known_keys(value: Mapping[Any, Any], known: tuple[str, ...], path: str) -> None:
    for key in value:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f'did you mean "{close[0]}"?' if close else "expected " + ", ".join(known)
            raise ConfigError(path, f'unknown key "{key}" ({hint})')


def _probes(value: object) -> Probes:
    """The ``protocols`` setting: ``{name: probe}``, asked after the built-in probes; in
    TOML and JSON configs a probe is named by import path (``"package.module:function"``)."""
    if value is None:
        return Probes()
    if not isinstance(value, Mapping):
        raise ConfigError(
            "settings.protocols",
            f"expected a dict of name -> probe function, got {type(value).__name__}",
        )
    probes = {
        name: import_object(probe, f"settings.protocols.{name}")
        if isinstance(probe, str)
        else probe
        for name, probe in value.items()
    }
    return Probes(probes, path="settings.protocols")


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
            values[name] = expect_seconds(value, f"settings.{name}", can_be_off=_DURATIONS[name])
        elif name == "security":
            values[name] = (
                None if value is None else compile_security(value, "settings.security", "")
            )
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
        elif name == "workers":
            values[name] = _check_workers(value)
        elif name == "hooks":
            values[name] = compile_hooks(value, "settings.hooks")
        elif name == "hook_timeout":
            values[name] = expect_seconds(value, "settings.hook_timeout")
        elif name == "plugins":
            values[name] = compile_plugins(value, "settings.plugins")
        elif name == "bandwidth":
            values[name] = None if value is None else compile_bandwidth(value, "settings.bandwidth")
        elif name == "protocols":
            values[name] = _probes(value)
        elif name == "admin":
            values[name] = None if value is None else _admin(value)
        elif name == "access_log":
            values[name] = AccessLogSettings() if value is None else _access_log(value)
    if values.get("workers", 1) > 1 and values.get("plugins"):
        raise ConfigError(
            "settings.workers",
            "workers > 1 cannot be combined with plugins yet: run one process with plugins",
        )
    return Settings(**values)


def _check_workers(value: object) -> int:
    """An int 1..MAX_WORKERS; more than 1 needs SO_REUSEPORT and fork."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ConfigError(
            "settings.workers", f"expected an int from 1 to {MAX_WORKERS}, got {value!r}"
        )
    if value > 1 and not (hasattr(socket, "SO_REUSEPORT") and hasattr(os, "fork")):
        raise ConfigError(
            "settings.workers",
            f"workers={value} needs SO_REUSEPORT and fork, which this platform lacks: "
            "the workers bind the same ports and the kernel spreads connections among them",
        )
    return value
