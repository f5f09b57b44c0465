"""Load a route configuration from a ``.py``, ``.toml`` or ``.json`` file.

Every form has the same shape: ``routes`` (a list of routes) and optionally ``settings`` (a dict
of :class:`~smartroute.SmartRoute` keyword arguments). In TOML and JSON, socket handlers are
named by import path (``"package.module:function"``).
"""

from __future__ import annotations

import json
import runpy
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smartroute.errors import ConfigError


@dataclass(slots=True)
class LoadedConfig:
    routes: list[Any]
    settings: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None


def load_config(path: str | Path) -> LoadedConfig:
    """Read ``path`` and return its routes and settings (not yet validated)."""
    source = Path(path)
    where = str(source)
    if not source.is_file():
        raise ConfigError(where, "no such file")
    suffix = source.suffix.lower()
    data: Mapping[str, Any]
    try:
        if suffix == ".py":
            data = runpy.run_path(str(source), run_name="smartroute_config")
            data = {k: v for k, v in data.items() if k in ("routes", "settings")}
        elif suffix == ".toml":
            data = tomllib.loads(source.read_text(encoding="utf-8"))
        elif suffix == ".json":
            data = json.loads(source.read_text(encoding="utf-8"))
        else:
            raise ConfigError(
                where, f"unsupported config type {suffix!r} (use .py, .toml or .json)"
            )
    except ConfigError:
        raise
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, SyntaxError, UnicodeDecodeError) as exc:
        raise ConfigError(where, f"cannot parse: {exc}") from exc
    except Exception as exc:  # a .py config that raises while it runs
        raise ConfigError(where, f"raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ConfigError(where, f"expected a table/object at the top, got {type(data).__name__}")
    unknown = sorted(set(data) - {"routes", "settings"})
    if unknown and suffix != ".py":
        raise ConfigError(
            where, f"unknown top-level key {unknown[0]!r} (expected routes, settings)"
        )
    routes = data.get("routes")
    if not isinstance(routes, list | tuple):
        raise ConfigError(f"{where}: routes", "expected a list of routes")
    settings = data.get("settings") or {}
    if not isinstance(settings, Mapping):
        raise ConfigError(f"{where}: settings", "expected a dict of SmartRoute keyword arguments")
    return LoadedConfig(list(routes), dict(settings), source)
