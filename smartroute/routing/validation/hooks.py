"""Hooks: the objects given as a route's ``hooks`` (or the ``hooks`` setting), checked, and
the chain a route runs once the proxy-wide ones are added."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any, cast

from smartroute.errors import ConfigError
from smartroute.routing.model import HOOK_METHODS, Hooks, HooksFail
from smartroute.routing.validation._fields import expect_choice, got, import_object, is_async

_FAIL_MODES = ("closed", "open")


def compile_hooks(value: object, path: str) -> tuple[object, ...]:
    """A list of hooks (objects, or ``"package.module:attribute"`` import paths to them):
    each must have at least one hook method; the ``on_*`` ones coroutines, ``on_data`` not."""
    items = value if type(value) is list or isinstance(value, tuple) else [value]
    hooks = []
    for i, item in enumerate(items):
        where = f"{path}[{i}]" if items is value else path
        hook = import_object(item, where) if isinstance(item, str) else item
        check_hook(hook, where)
        hooks.append(hook)
    return tuple(hooks)


def check_hook(hook: object, path: str) -> None:
    if inspect.isclass(hook):
        raise ConfigError(path, f"{hook.__name__} is a class: give an instance ({hook.__name__}())")
    found = [name for name in HOOK_METHODS if getattr(hook, name, None) is not None]
    if not found:
        raise ConfigError(
            path, f"{got(hook)} has none of the hook methods ({', '.join(HOOK_METHODS)})"
        )
    for name in found:
        method = getattr(hook, name)
        if not callable(method):
            raise ConfigError(f"{path}.{name}", f"expected a method, got {got(method)}")
        if name == "on_data":
            if is_async(method) or inspect.isasyncgenfunction(method):
                raise ConfigError(
                    f"{path}.{name}",
                    "on_data must be a plain function (def, not async def): it observes bytes "
                    "off the data path and must not make them wait",
                )
        elif not is_async(method):
            raise ConfigError(f"{path}.{name}", f"{name} must be a coroutine (async def)")


def hooks_fail(value: object, path: str) -> HooksFail:
    return cast(HooksFail, expect_choice(value, path, _FAIL_MODES, "hooks_fail mode"))


def hook_chain(hooks: Iterable[object], fail: HooksFail, timeout: float) -> Hooks | None:
    """The hooks' methods by kind, in order; None when there is none."""
    kinds: dict[str, list[Any]] = {name: [] for name in HOOK_METHODS}
    for hook in hooks:
        for name in HOOK_METHODS:
            method = getattr(hook, name, None)
            if method is not None:
                kinds[name].append(method)
    if not any(kinds.values()):
        return None
    return Hooks(
        **{name: tuple(methods) for name, methods in kinds.items()}, fail=fail, timeout=timeout
    )
