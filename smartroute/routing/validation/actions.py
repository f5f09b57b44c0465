"""The ``action`` block of a route: forward targets and their backend settings (load balancing,
health checks, retries), redirect, static, socket handlers (imported from
"package.module:function" strings), and the dispatch on the action type."""

from __future__ import annotations

import os
import re
from typing import cast

from smartroute.errors import ConfigError
from smartroute.routing.model import (
    REDIRECT_STATUSES,
    Action,
    BlockAction,
    ForwardAction,
    ForwardProtocol,
    RedirectAction,
    SocketHandler,
    SocketHandlerAction,
    StaticAction,
)
from smartroute.routing.validation._fields import (
    ACTION_KEYS,
    ANY_ACTION_KEY,
    BACKEND_KEYS,
    REDIRECT_KEYS,
    STATIC_KEYS,
    Raw,
    action_mapping,
    check_keys,
    expect_choice,
    expect_int,
    expect_strings,
    expect_text,
    got,
    import_object,
    is_async,
    mapping,
    one_of,
    quoted,
    require,
)
from smartroute.routing.validation.backends import forward_action, validate_targets

_ACTION_TYPES = tuple(ACTION_KEYS)
_PROTOCOLS: tuple[ForwardProtocol, ...] = ("auto", "tcp", "http")
_TEMPLATE_NAMES = ("domain", "port", "path", "query")
_TEMPLATE_VAR = re.compile(r"\{([^{}]*)\}")


def _forward(raw: Raw, path: str) -> ForwardAction:
    require(raw, path, "targets")
    targets = validate_targets(raw["targets"], f"{path}.targets")
    protocol = raw.get("protocol")
    if protocol is not None:
        protocol = expect_choice(protocol, f"{path}.protocol", _PROTOCOLS, "protocol")
    return forward_action(targets, cast(ForwardProtocol, protocol or "auto"), raw, path)


def _redirect(raw: Raw, path: str, route: str) -> RedirectAction:
    require(raw, path, "redirect")
    where = f"{path}.redirect"
    inner = mapping(raw["redirect"], where)
    check_keys(inner, REDIRECT_KEYS, where, "action.redirect", route)
    require(inner, where, "to")
    to = expect_text(inner["to"], f"{where}.to")
    for found in _TEMPLATE_VAR.finditer(to):
        if found[1] not in _TEMPLATE_NAMES:
            allowed = ", ".join(f"{{{name}}}" for name in _TEMPLATE_NAMES)
            raise ConfigError(
                f"{where}.to", f"unknown template variable {found[0]} (allowed: {allowed})"
            )
    status = inner.get("status")
    if status is None:
        return RedirectAction(to)
    if expect_int(status, f"{where}.status") not in REDIRECT_STATUSES:
        raise ConfigError(
            f"{where}.status",
            f"{status} is not a redirect status (expected {one_of(sorted(REDIRECT_STATUSES))})",
        )
    return RedirectAction(to, cast(int, status))


def _static(raw: Raw, path: str, route: str) -> StaticAction:
    require(raw, path, "static")
    where = f"{path}.static"
    inner = mapping(raw["static"], where)
    check_keys(inner, STATIC_KEYS, where, "action.static", route)
    get = inner.get
    root, content = get("root"), get("content")
    if (root is None) == (content is None):
        both = ", not both" if root is not None else ""
        raise ConfigError(where, f'give either "root" (a directory) or "content"{both}')
    index: tuple[str, ...] = ("index.html",)
    if get("index") is not None:
        if root is None:
            raise ConfigError(f"{where}.index", 'only applies with "root"')
        index = expect_strings(get("index"), f"{where}.index", expect_text)
    body: bytes | None = None
    if root is not None:
        if isinstance(root, os.PathLike):
            root = os.fspath(root)
        if not isinstance(root, str) or not root:
            raise ConfigError(f"{where}.root", f"expected a directory path, got {got(root)}")
        if not os.path.isdir(root):
            problem = "is not a directory" if os.path.exists(root) else "does not exist"
            raise ConfigError(f"{where}.root", f"{root!r} {problem}")
        root = os.path.abspath(root)
    elif isinstance(content, str):
        body = content.encode("utf-8")
    elif isinstance(content, bytes | bytearray):
        body = bytes(content)
    else:
        raise ConfigError(f"{where}.content", f"expected a str or bytes, got {got(content)}")
    content_type = "text/plain; charset=utf-8"
    if get("content_type") is not None:
        content_type = expect_text(get("content_type"), f"{where}.content_type")
    status = 200
    if get("status") is not None:
        status = expect_int(get("status"), f"{where}.status")
        if not 100 <= status <= 599:
            raise ConfigError(f"{where}.status", f"{status} is not an HTTP status (100-599)")
    return StaticAction(root, index, body, content_type, status)


def _socket_handler(raw: Raw, path: str) -> SocketHandlerAction:
    require(raw, path, "socket_handler")
    where = f"{path}.socket_handler"
    handler = raw["socket_handler"]
    if isinstance(handler, str):
        handler = import_object(handler, where)
        if not callable(handler):
            raise ConfigError(
                where, f"{raw['socket_handler']!r} is not callable (got {got(handler)})"
            )
    if not callable(handler):
        raise ConfigError(
            where,
            f'expected an async function or a "package.module:function" string, got {got(handler)}',
        )
    if not is_async(handler):
        name = getattr(handler, "__qualname__", type(handler).__name__)
        raise ConfigError(
            where,
            f"{name} is not async (expected async def handler(reader, writer, ctx) -> None)",
        )
    return SocketHandlerAction(cast(SocketHandler, handler))


def compile_action(value: object, path: str, route: str) -> tuple[Action, object]:
    """The action and its raw ``tls`` value (validated later, with the route around it)."""
    raw = action_mapping(value, path)
    kind = raw.get("type")
    if kind is None:
        raise ConfigError(path, f'missing required key "type" ({one_of(_ACTION_TYPES)})')
    kind = expect_choice(kind, f"{path}.type", _ACTION_TYPES, "action type")
    allowed = ACTION_KEYS[kind]
    if not raw.keys() <= allowed:
        for key in raw:
            if key not in allowed and key in BACKEND_KEYS:
                raise ConfigError(
                    f"{path}.{key}",
                    f"{key} applies to forward actions only (this action is {kind!r})",
                )
            if key not in allowed and key in ANY_ACTION_KEY:
                listed = quoted(sorted(allowed))
                raise ConfigError(
                    path, f'unknown key "{key}" for a "{kind}" action (allowed: {listed})'
                )
        # a block action with "status" should not hear about redirect.status
        skip = tuple(f"action.{other}." for other in ("redirect", "static") if other != kind)
        check_keys(raw, allowed, path, "action", route, skip)
    action: Action
    if kind == "forward":
        action = _forward(raw, path)
    elif kind == "redirect":
        action = _redirect(raw, path, route)
    elif kind == "static":
        action = _static(raw, path, route)
    elif kind == "socket-handler":
        action = _socket_handler(raw, path)
    else:
        action = BlockAction()
    return action, raw.get("tls")
