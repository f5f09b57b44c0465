"""The ``plugins`` setting: what to start, for which routes, how long a call may take and what
a failing plugin means."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, cast

from smartroute.errors import ConfigError
from smartroute.routing.validation._fields import (
    check_keys,
    expect_choice,
    expect_seconds,
    expect_strings,
    expect_text,
    got,
    mapping,
)

PLUGIN_KEYS = frozenset({"name", "command", "routes", "timeout", "fail", "env", "cwd"})


@dataclass(frozen=True, slots=True)
class PluginSpec:
    name: str
    command: tuple[str, ...]
    routes: tuple[str, ...] | None = None  # None: every route
    timeout: float = 1.0  # seconds one hook call may take
    fail: Literal["closed", "open"] = "closed"  # calls while it fails: refuse, or skip it
    env: Mapping[str, str] | None = None  # added to smartroute's environment
    cwd: str | None = None


def compile_plugins(value: object, path: str) -> tuple[PluginSpec, ...]:
    if not isinstance(value, list | tuple):
        raise ConfigError(path, f"expected a list of plugins, got {got(value)}")
    plugins = tuple(_plugin(item, f"{path}[{i}]") for i, item in enumerate(value))
    names = [plugin.name for plugin in plugins]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"{path}[{i}].name", f"duplicate plugin name {name!r}")
    return plugins


def _plugin(value: object, path: str) -> PluginSpec:
    raw = mapping(value, path)
    check_keys(raw, PLUGIN_KEYS, path)
    for key in ("name", "command"):
        if key not in raw:
            raise ConfigError(path, f"missing {key!r}")
    name = expect_text(raw["name"], f"{path}.name")
    command = raw["command"]
    if isinstance(command, str) or not isinstance(command, list | tuple) or not command:
        raise ConfigError(
            f"{path}.command", f'expected a list like ["node", "auth.js"], got {got(command)}'
        )
    routes = raw.get("routes")
    env = raw.get("env")
    if env is not None:
        pairs = mapping(env, f"{path}.env")
        for key, item in pairs.items():
            if not isinstance(key, str) or not isinstance(item, str):
                raise ConfigError(f"{path}.env", "expected names and values that are str")
    timeout = raw.get("timeout")
    fail = raw.get("fail")
    cwd = raw.get("cwd")
    return PluginSpec(
        name=name,
        command=expect_strings(command, f"{path}.command", expect_text),
        routes=None if routes is None else expect_strings(routes, f"{path}.routes", expect_text),
        timeout=1.0 if timeout is None else float(expect_seconds(timeout, f"{path}.timeout") or 0),
        fail=cast(
            Literal["closed", "open"],
            "closed"
            if fail is None
            else expect_choice(fail, f"{path}.fail", ("closed", "open"), "fail mode"),
        ),
        env=None if env is None else dict(cast(Mapping[str, str], env)),
        cwd=None if cwd is None else expect_text(cwd, f"{path}.cwd"),
    )
