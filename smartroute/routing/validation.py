"""Route validation: dicts or schema dataclasses in, frozen :class:`CompiledRoute` objects out.

One mechanism: a dataclass from :mod:`smartroute.routing.schema` is first turned into the dict
shape it stands for (shallowly; fields left at their defaults are omitted), then everything goes
through the one dict validator below. Every error is a :class:`ConfigError` whose path names the
field exactly: ``routes[2].match.ports[1]: 70000 is not a port (1-65535)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
import os
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, TypeVar, cast

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from smartroute.errors import ConfigError
from smartroute.routing import schema
from smartroute.routing.model import (
    REDIRECT_STATUSES,
    TLS_VERSIONS,
    Action,
    BasicAuthPolicy,
    BlockAction,
    CertificatePair,
    CompiledRoute,
    ForwardAction,
    ForwardProtocol,
    HostFunction,
    MatchCriteria,
    PortFunction,
    RateLimitPolicy,
    RedirectAction,
    SecurityPolicy,
    SocketHandler,
    SocketHandlerAction,
    StaticAction,
    TargetSpec,
    TlsMode,
    TlsSettings,
)
from smartroute.routing.patterns import (
    DomainPattern,
    HeaderRule,
    IpRule,
    PathPattern,
    compile_domain,
    compile_header_rule,
    compile_ip_rule,
    compile_path,
)

__all__ = ["validate_route", "validate_routes"]

_T = TypeVar("_T")
_Raw = Mapping[str, object]
_LISTS = (list, tuple, set, frozenset)


def _keys(typed_dict: Any) -> frozenset[str]:
    return frozenset(typed_dict.__required_keys__ | typed_dict.__optional_keys__)


# The TypedDicts of the schema are the one list of allowed keys.
_ROUTE_KEYS = _keys(schema.RouteDict)
_MATCH_KEYS = _keys(schema.MatchDict)
_RANGE_KEYS = _keys(schema.PortRangeDict)
_TARGET_KEYS = _keys(schema.TargetDict)
_TLS_KEYS = _keys(schema.TlsDict)
_CERT_KEYS = _keys(schema.CertificateDict)
_REDIRECT_KEYS = _keys(schema.RedirectDict)
_STATIC_KEYS = _keys(schema.StaticDict)
_SECURITY_KEYS = _keys(schema.SecurityDict)
_RATE_KEYS = _keys(schema.RateLimitDict)
_AUTH_KEYS = _keys(schema.BasicAuthDict)
_ACTION_KEYS: Final = {
    "forward": _keys(schema.ForwardActionDict),
    "redirect": _keys(schema.RedirectActionDict),
    "block": _keys(schema.BlockActionDict),
    "static": _keys(schema.StaticActionDict),
    "socket-handler": _keys(schema.SocketHandlerActionDict),
}
_ANY_ACTION_KEY = frozenset().union(*_ACTION_KEYS.values())
_ACTION_TYPES = tuple(_ACTION_KEYS)
_TLS_MODES: tuple[TlsMode, ...] = ("passthrough", "terminate", "terminate-and-reencrypt")
_BACKEND_KEYS = ("backend_verify", "backend_ca", "backend_server_name")
_PROTOCOLS: tuple[ForwardProtocol, ...] = ("auto", "tcp", "http")
_TLS_ALIASES = {"TLSv1.0": "TLSv1"}
_TEMPLATE_NAMES = ("domain", "port", "path", "query")
_TEMPLATE_VAR = re.compile(r"\{([^{}]*)\}")
_PORT_RANGE = re.compile(r"([0-9]{1,6}) *- *([0-9]{1,6})")
_PEM_KEY = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")

# Where each key of the route-level sections lives, relative to the route: the "did you mean"
# hint for a key written at the wrong level ("domains" at route level -> "match.domains").
_LOCATIONS: dict[str, str] = {key: key for key in sorted(_ROUTE_KEYS)}
for _section, _section_keys in (
    ("match", _MATCH_KEYS),
    ("action", _ANY_ACTION_KEY),
    ("action.tls", _TLS_KEYS),
    ("action.tls.certificate", _CERT_KEYS),
    ("security", _SECURITY_KEYS),
    ("security.rate_limit", _RATE_KEYS),
    ("security.basic_auth", _AUTH_KEYS),
    ("action.redirect", _REDIRECT_KEYS),
    ("action.static", _STATIC_KEYS),
):
    for _key in sorted(_section_keys):
        _LOCATIONS.setdefault(_key, f"{_section}.{_key}")


# -- messages and small checks -------------------------------------------------------------------


def _got(value: object) -> str:
    if value is None or isinstance(value, bool | int | float | str | bytes):
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return type(value).__name__


def _quoted(items: Iterable[object]) -> str:
    return ", ".join(f'"{item}"' for item in items)


def _one_of(choices: Collection[object]) -> str:
    *head, last = [f'"{item}"' if isinstance(item, str) else str(item) for item in choices]
    return f"{', '.join(head)} or {last}" if head else last


def _unknown(what: str, value: object, choices: Collection[str]) -> str:
    """``unknown TLS mode "pasthrough" (did you mean "passthrough"?)``, case-insensitively."""
    if not isinstance(value, str):
        return f"unknown {what} {_got(value)} (expected {_one_of(choices)})"
    lowered = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(value.lower(), list(lowered), n=1)
    hint = f'did you mean "{lowered[close[0]]}"?' if close else f"expected {_one_of(choices)}"
    return f'unknown {what} "{value}" ({hint})'


def _check_keys(
    raw: _Raw,
    allowed: frozenset[str],
    path: str,
    level: str | None = None,
    route: str = "",
    skip: tuple[str, ...] = (),
) -> None:
    """Unknown keys are errors; ``level`` (route-relative, "" for the route) enables hints
    for keys that belong elsewhere in the route, except at locations starting with ``skip``."""
    if raw.keys() <= allowed:
        return
    for key in raw:
        if key not in allowed:
            raise ConfigError(path, _unknown_key(key, allowed, level, route, skip))


def _unknown_key(
    key: object, allowed: frozenset[str], level: str | None, route: str, skip: tuple[str, ...]
) -> str:
    listed = f"allowed: {_quoted(sorted(allowed))}"
    if not isinstance(key, str):
        return f"unknown key {key!r} ({listed})"
    candidates = {name: name for name in allowed}
    if level is not None:
        for name, where in _LOCATIONS.items():
            here = name if level == "" else f"{level}.{name}"
            if name in candidates or where == here or where.startswith(skip):
                continue
            if level == "":
                candidates[name] = where
            elif where.startswith(level + "."):
                candidates[name] = where[len(level) + 1 :]
            else:
                candidates[name] = f"{route}.{where}"
    close = difflib.get_close_matches(key, list(candidates), n=1)
    hint = f'did you mean "{candidates[close[0]]}"?' if close else listed
    return f'unknown key "{key}" ({hint})'


def _require(raw: _Raw, path: str, *keys: str) -> None:
    for key in keys:
        if raw.get(key) is None:
            raise ConfigError(path, f'missing required key "{key}"')


def _int(value: object, path: str, minimum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ConfigError(path, f"expected an int{bound}, got {_got(value)}")
    if minimum is not None and value < minimum:
        raise ConfigError(path, f"expected an int >= {minimum}, got {value}")
    return value


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(path, f"expected a bool, got {_got(value)}")
    return value


def _text(value: object, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(path, f"expected a non-empty str, got {_got(value)}")
    return value


def _choice(value: object, path: str, choices: tuple[str, ...], what: str) -> str:
    if isinstance(value, str) and value in choices:
        return value
    raise ConfigError(path, _unknown(what, value, choices))


def _strings(value: object, path: str, convert: Callable[[str, str], _T]) -> tuple[_T, ...]:
    """A str or a non-empty list of str, each passed through ``convert(text, path)``."""
    if isinstance(value, str):
        return (convert(value, path),)
    if not isinstance(value, _LISTS):
        raise ConfigError(path, f"expected a str or a list of str, got {_got(value)}")
    if not value:
        raise ConfigError(path, "empty list (use None or omit it)")
    items: list[_T] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigError(f"{path}[{i}]", f"expected a str, got {_got(item)}")
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


_domain: Callable[[str, str], DomainPattern] = _compiler(compile_domain)
_ip_rule: Callable[[str, str], IpRule] = _compiler(compile_ip_rule)
_path_pattern: Callable[[str, str], PathPattern] = _compiler(compile_path)
_header_rule = functools.lru_cache(maxsize=1024)(compile_header_rule)


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


def _mapping(value: object, path: str, kind: type | None = None) -> _Raw:
    if type(value) is dict or isinstance(value, Mapping):
        return value
    if kind is not None and isinstance(value, kind):
        return _shallow(value)
    expected = "a mapping" if kind is None else f"a mapping or a {kind.__name__}"
    raise ConfigError(path, f"expected {expected}, got {_got(value)}")


_ACTION_CLASSES = (
    schema.Forward,
    schema.Redirect,
    schema.Block,
    schema.Static,
    schema.SocketHandler,
)


def _action_mapping(value: object, path: str) -> _Raw:
    if type(value) is dict or isinstance(value, Mapping):
        return value
    if not isinstance(value, _ACTION_CLASSES):
        names = ", ".join(kind.__name__ for kind in _ACTION_CLASSES)
        raise ConfigError(path, f"expected a mapping or one of {names}, got {_got(value)}")
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


# -- match -----------------------------------------------------------------------------------


def _port(value: object, path: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(path, f"expected an int, got {_got(value)}")
    if not 1 <= value <= 65535:
        raise ConfigError(path, f"{value} is not a port (1-65535)")
    return value


def _port_span(value: object, path: str, *, top: bool = False) -> range:
    """One port, a "from-to" string or a {"from", "to"} mapping, as a range."""
    if isinstance(value, int) and not isinstance(value, bool):
        port = _port(value, path)
        return range(port, port + 1)
    if isinstance(value, str):
        found = _PORT_RANGE.fullmatch(value.strip())
        if found is None:
            hint = (
                f"write a single port as an int: {value}"
                if value.strip().isdigit()
                else 'expected "from-to" such as "9000-9005"'
            )
            raise ConfigError(path, f"{value!r} is not a port range ({hint})")
        low, high = _port(int(found[1]), path), _port(int(found[2]), path)
    elif isinstance(value, Mapping):
        _check_keys(value, _RANGE_KEYS, path)
        _require(value, path, "from", "to")
        low, high = _port(value["from"], f"{path}.from"), _port(value["to"], f"{path}.to")
    else:
        several = " or a list of them" if top else ""
        raise ConfigError(
            path,
            f'expected a port, a "from-to" range string, {{"from": a, "to": b}}{several}, '
            f"got {_got(value)}",
        )
    if low > high:
        raise ConfigError(path, f"{low}-{high} is a backwards range (from must be <= to)")
    return range(low, high + 1)


def _ports(value: object, path: str) -> frozenset[int]:
    if type(value) is int and 1 <= value <= 65535:  # the common case, fast
        return frozenset((value,))
    if not isinstance(value, _LISTS):
        return frozenset(_port_span(value, path, top=True))
    if not value:
        raise ConfigError(path, "empty list (give at least one port)")
    ports: set[int] = set()
    for i, item in enumerate(value):
        ports.update(_port_span(item, f"{path}[{i}]"))
    return frozenset(ports)


def _tls_version(text: str, path: str) -> str:
    name = _TLS_ALIASES.get(text, text)
    if name not in TLS_VERSIONS:
        raise ConfigError(path, _unknown("TLS version", text, TLS_VERSIONS))
    return name


def _headers(value: object, path: str) -> tuple[HeaderRule, ...]:
    raw = _mapping(value, path)
    if not raw:
        raise ConfigError(path, "empty mapping (use None or omit it)")
    rules: list[HeaderRule] = []
    for name, want in raw.items():
        if not isinstance(name, str):
            raise ConfigError(path, f"expected str header names, got {_got(name)}")
        if not isinstance(want, str):
            raise ConfigError(f"{path}[{name!r}]", f"expected a str, got {_got(want)}")
        try:
            rules.append(_header_rule(name, want))
        except ValueError as exc:
            raise ConfigError(f"{path}[{name!r}]", str(exc)) from None
    return tuple(rules)


def _match(value: object, path: str, route: str) -> MatchCriteria:
    raw = _mapping(value, path, schema.Match)
    _check_keys(raw, _MATCH_KEYS, path, "match", route)
    _require(raw, path, "ports")
    get = raw.get
    domains = get("domains")
    url_path = get("path")
    client_ip = get("client_ip")
    versions = get("tls_version")
    alpn = get("alpn")
    headers = get("headers")
    return MatchCriteria(
        ports=_ports(raw["ports"], f"{path}.ports"),
        domains=() if domains is None else _strings(domains, f"{path}.domains", _domain),
        path=None
        if url_path is None
        else _path_pattern(_text(url_path, f"{path}.path"), f"{path}.path"),
        client_ip=() if client_ip is None else _strings(client_ip, f"{path}.client_ip", _ip_rule),
        tls_version=frozenset(
            () if versions is None else _strings(versions, f"{path}.tls_version", _tls_version)
        ),
        alpn=frozenset(() if alpn is None else _strings(alpn, f"{path}.alpn", _text)),
        headers=() if headers is None else _headers(headers, f"{path}.headers"),
    )


# -- actions ---------------------------------------------------------------------------------


def _host(value: object, path: str) -> tuple[str, ...] | HostFunction:
    if type(value) is str and value and value == value.strip() and " " not in value:
        return (value,)
    if isinstance(value, str | list | tuple):
        if not value and not isinstance(value, str):
            raise ConfigError(path, "empty list (give at least one host)")
        hosts = _strings(value, path, _text)
        for i, host in enumerate(hosts):
            if host != host.strip() or " " in host:
                where = path if isinstance(value, str) else f"{path}[{i}]"
                raise ConfigError(where, f"{host!r} is not a host name (it contains spaces)")
        return hosts
    if callable(value):
        return cast(HostFunction, value)
    raise ConfigError(
        path, f"expected a host name, a list of host names or a callable, got {_got(value)}"
    )


def _target_port(value: object, path: str) -> int | Literal["preserve"] | PortFunction:
    if type(value) is int and 1 <= value <= 65535:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return _port(value, path)
    if value == "preserve":
        return "preserve"
    if callable(value):
        return cast(PortFunction, value)
    raise ConfigError(
        path, f'expected a port (1-65535), "preserve" or a callable, got {_got(value)}'
    )


def _target(value: object, path: str) -> TargetSpec:
    raw = _mapping(value, path, schema.Target)
    _check_keys(raw, _TARGET_KEYS, path)
    host, port = raw.get("host"), raw.get("port")
    if host is None or port is None:
        _require(raw, path, "host", "port")
    return TargetSpec(_host(host, f"{path}.host"), _target_port(port, f"{path}.port"))


def _forward(raw: _Raw, path: str) -> ForwardAction:
    _require(raw, path, "targets")
    value, where = raw["targets"], f"{path}.targets"
    if type(value) is list or isinstance(value, tuple):
        if not value:
            raise ConfigError(where, "empty list (give at least one target)")
        targets = tuple([_target(item, f"{where}[{i}]") for i, item in enumerate(value)])
    elif isinstance(value, Mapping | schema.Target):
        targets = (_target(value, where),)
    else:
        raise ConfigError(where, f"expected a list of targets, got {_got(value)}")
    protocol = raw.get("protocol")
    if protocol is not None:
        protocol = _choice(protocol, f"{path}.protocol", _PROTOCOLS, "protocol")
    return ForwardAction(targets, cast(ForwardProtocol, protocol or "auto"))


def _redirect(raw: _Raw, path: str, route: str) -> RedirectAction:
    _require(raw, path, "redirect")
    where = f"{path}.redirect"
    inner = _mapping(raw["redirect"], where)
    _check_keys(inner, _REDIRECT_KEYS, where, "action.redirect", route)
    _require(inner, where, "to")
    to = _text(inner["to"], f"{where}.to")
    for found in _TEMPLATE_VAR.finditer(to):
        if found[1] not in _TEMPLATE_NAMES:
            allowed = ", ".join(f"{{{name}}}" for name in _TEMPLATE_NAMES)
            raise ConfigError(
                f"{where}.to", f"unknown template variable {found[0]} (allowed: {allowed})"
            )
    status = inner.get("status")
    if status is None:
        return RedirectAction(to)
    if _int(status, f"{where}.status") not in REDIRECT_STATUSES:
        raise ConfigError(
            f"{where}.status",
            f"{status} is not a redirect status (expected {_one_of(sorted(REDIRECT_STATUSES))})",
        )
    return RedirectAction(to, cast(int, status))


def _static(raw: _Raw, path: str, route: str) -> StaticAction:
    _require(raw, path, "static")
    where = f"{path}.static"
    inner = _mapping(raw["static"], where)
    _check_keys(inner, _STATIC_KEYS, where, "action.static", route)
    get = inner.get
    root, content = get("root"), get("content")
    if (root is None) == (content is None):
        both = ", not both" if root is not None else ""
        raise ConfigError(where, f'give either "root" (a directory) or "content"{both}')
    index: tuple[str, ...] = ("index.html",)
    if get("index") is not None:
        if root is None:
            raise ConfigError(f"{where}.index", 'only applies with "root"')
        index = _strings(get("index"), f"{where}.index", _text)
    body: bytes | None = None
    if root is not None:
        if isinstance(root, os.PathLike):
            root = os.fspath(root)
        if not isinstance(root, str) or not root:
            raise ConfigError(f"{where}.root", f"expected a directory path, got {_got(root)}")
        if not os.path.isdir(root):
            problem = "is not a directory" if os.path.exists(root) else "does not exist"
            raise ConfigError(f"{where}.root", f"{root!r} {problem}")
        root = os.path.abspath(root)
    elif isinstance(content, str):
        body = content.encode("utf-8")
    elif isinstance(content, bytes | bytearray):
        body = bytes(content)
    else:
        raise ConfigError(f"{where}.content", f"expected a str or bytes, got {_got(content)}")
    content_type = "text/plain; charset=utf-8"
    if get("content_type") is not None:
        content_type = _text(get("content_type"), f"{where}.content_type")
    status = 200
    if get("status") is not None:
        status = _int(get("status"), f"{where}.status")
        if not 100 <= status <= 599:
            raise ConfigError(f"{where}.status", f"{status} is not an HTTP status (100-599)")
    return StaticAction(root, index, body, content_type, status)


def _import(spec: str, path: str) -> object:
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


def _is_async(handler: object) -> bool:
    while isinstance(handler, functools.partial):
        handler = handler.func
    if inspect.iscoroutinefunction(handler):
        return True
    if inspect.isroutine(handler) or inspect.isclass(handler):
        return False
    # an object whose class defines ``async def __call__``
    return inspect.iscoroutinefunction(type(handler).__call__)


def _socket_handler(raw: _Raw, path: str) -> SocketHandlerAction:
    _require(raw, path, "socket_handler")
    where = f"{path}.socket_handler"
    handler = raw["socket_handler"]
    if isinstance(handler, str):
        handler = _import(handler, where)
        if not callable(handler):
            raise ConfigError(
                where, f"{raw['socket_handler']!r} is not callable (got {_got(handler)})"
            )
    if not callable(handler):
        raise ConfigError(
            where,
            'expected an async function or a "package.module:function" string, '
            f"got {_got(handler)}",
        )
    if not _is_async(handler):
        name = getattr(handler, "__qualname__", type(handler).__name__)
        raise ConfigError(
            where,
            f"{name} is not async (expected async def handler(reader, writer, ctx) -> None)",
        )
    return SocketHandlerAction(cast(SocketHandler, handler))


def _action(value: object, path: str, route: str) -> tuple[Action, object]:
    """The action and its raw ``tls`` value (validated later, with the route around it)."""
    raw = _action_mapping(value, path)
    kind = raw.get("type")
    if kind is None:
        raise ConfigError(path, f'missing required key "type" ({_one_of(_ACTION_TYPES)})')
    kind = _choice(kind, f"{path}.type", _ACTION_TYPES, "action type")
    allowed = _ACTION_KEYS[kind]
    if not raw.keys() <= allowed:
        for key in raw:
            if key not in allowed and key in _ANY_ACTION_KEY:
                listed = _quoted(sorted(allowed))
                raise ConfigError(
                    path, f'unknown key "{key}" for a "{kind}" action (allowed: {listed})'
                )
        # a block action with "status" should not hear about redirect.status
        skip = tuple(f"action.{other}." for other in ("redirect", "static") if other != kind)
        _check_keys(raw, allowed, path, "action", route, skip)
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


# -- tls -------------------------------------------------------------------------------------


def _pem(value: object, path: str) -> tuple[str, str | None]:
    """PEM text as given, or read from a file path: (text, absolute path or None)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bytes) and b"-----BEGIN" in value:
        value = value.decode("ascii", errors="replace")
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(path, f"expected PEM text or a file path, got {_got(value)}")
    if "-----BEGIN" in value or "\n" in value:
        return value, None
    try:
        text = Path(value).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, f"file {value!r} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(
            path, f"{value!r} is not a PEM file (binary; DER must be converted)"
        ) from None
    except OSError as exc:
        raise ConfigError(path, f"cannot read {value!r} ({exc.strerror or exc})") from None
    return text, os.path.abspath(value)


def _cert_problem(pem: str, source: str | None) -> str | None:
    where = "" if source is None else f" in {source!r}"
    if "-----BEGIN CERTIFICATE-----" not in pem:
        return f'no PEM certificate found{where} (expected a "-----BEGIN CERTIFICATE-----" block)'
    try:
        x509.load_pem_x509_certificates(pem.encode())
    except ValueError:
        return f"the PEM certificate{where} is malformed"
    return None


@functools.lru_cache(maxsize=128)
def _pair_problem(
    cert_pem: str, key_pem: str, cert_path: str | None, key_path: str | None
) -> tuple[str, str] | None:
    """(field, problem) when the pair does not load or does not belong together; cached because
    many routes often share one certificate."""
    problem = _cert_problem(cert_pem, cert_path)
    if problem is not None:
        return "cert", problem
    where = "" if key_path is None else f" in {key_path!r}"
    if _PEM_KEY.search(key_pem) is None:
        block = '"-----BEGIN PRIVATE KEY-----"'
        return "key", f"no PEM private key found{where} (expected a {block} block)"
    try:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except TypeError:
        return "key", f"the private key{where} is encrypted (give an unencrypted key)"
    except (ValueError, UnsupportedAlgorithm):
        return "key", f"the PEM private key{where} is malformed"
    cert = x509.load_pem_x509_certificates(cert_pem.encode())[0]
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        return "", "the key does not match the certificate"
    return None


def _certificate(value: object, path: str, route: str) -> CertificatePair:
    if isinstance(value, str):
        raise ConfigError(
            path, f'expected "auto" or {{"cert": ..., "key": ...}}, got {_got(value)}'
        )
    raw = _mapping(value, path, schema.Certificate)
    _check_keys(raw, _CERT_KEYS, path, "action.tls.certificate", route)
    _require(raw, path, "cert", "key")
    cert_pem, cert_path = _pem(raw["cert"], f"{path}.cert")
    key_pem, key_path = _pem(raw["key"], f"{path}.key")
    problem = _pair_problem(cert_pem, key_pem, cert_path, key_path)
    if problem is not None:
        field, message = problem
        raise ConfigError(f"{path}.{field}" if field else path, message)
    return CertificatePair(cert_pem, key_pem, cert_path, key_path)


def _tls(value: object, path: str, action: Action, route: str) -> TlsSettings:
    raw = _mapping(value, path, schema.Tls)
    _check_keys(raw, _TLS_KEYS, path, "action.tls", route)
    _require(raw, path, "mode")
    mode = cast(TlsMode, _choice(raw["mode"], f"{path}.mode", _TLS_MODES, "TLS mode"))
    if mode != "terminate" and action.type != "forward":
        raise ConfigError(
            f"{path}.mode",
            f'"{mode}" only works with forward actions, not "{action.type}" (use "terminate")',
        )
    certificate = raw.get("certificate")
    if mode == "passthrough" and certificate is not None:
        raise ConfigError(
            f"{path}.certificate", 'not allowed with mode "passthrough" (nothing is decrypted)'
        )
    for key in _BACKEND_KEYS:
        if mode != "terminate-and-reencrypt" and raw.get(key) is not None:
            raise ConfigError(f"{path}.{key}", 'only applies with mode "terminate-and-reencrypt"')
    if mode == "passthrough":
        return TlsSettings(mode)
    if certificate is None:
        raise ConfigError(
            path, f'mode "{mode}" needs a "certificate" ("auto" or {{"cert": ..., "key": ...}})'
        )
    pair: CertificatePair | Literal["auto"] = "auto"
    if certificate != "auto":
        pair = _certificate(certificate, f"{path}.certificate", route)
    verify, ca, server_name = (raw.get(key) for key in _BACKEND_KEYS)
    ca_pem: str | None = None
    if ca is not None:
        ca_pem, ca_path = _pem(ca, f"{path}.backend_ca")
        problem = _cert_problem(ca_pem, ca_path)
        if problem is not None:
            raise ConfigError(f"{path}.backend_ca", problem)
    return TlsSettings(
        mode,
        pair,
        backend_verify=True if verify is None else _bool(verify, f"{path}.backend_verify"),
        backend_ca=ca_pem,
        backend_server_name=None
        if server_name is None
        else _text(server_name, f"{path}.backend_server_name"),
    )


# -- security --------------------------------------------------------------------------------


def _user_name(name: object, path: str) -> str:
    if not isinstance(name, str) or not name:
        raise ConfigError(path, f"expected non-empty str user names, got {_got(name)}")
    if ":" in name:
        raise ConfigError(path, f'user name {name!r} contains ":" (Basic auth splits on it)')
    return name


def _basic_auth(value: object, path: str, route: str) -> BasicAuthPolicy:
    raw = _mapping(value, path, schema.BasicAuth)
    _check_keys(raw, _AUTH_KEYS, path, "security.basic_auth", route)
    _require(raw, path, "users")
    users = _mapping(raw["users"], f"{path}.users")
    if not users:
        raise ConfigError(f"{path}.users", "empty mapping (give at least one user)")
    checked: dict[str, str] = {}
    for name, password in users.items():
        _user_name(name, f"{path}.users")
        if not isinstance(password, str):
            raise ConfigError(f"{path}.users[{name!r}]", f"expected a str, got {_got(password)}")
        checked[name] = password
    if raw.get("realm") is None:
        return BasicAuthPolicy(MappingProxyType(checked))
    realm = _text(raw["realm"], f"{path}.realm")
    if '"' in realm or not realm.isprintable():
        raise ConfigError(f"{path}.realm", f"{realm!r} cannot be a realm (no quotes or controls)")
    return BasicAuthPolicy(MappingProxyType(checked), realm)


def _http_blocker(action: Action, tls: TlsSettings | None) -> str | None:
    """Why this route can never see HTTP, or None when it can."""
    if isinstance(action, SocketHandlerAction):
        return 'a "socket-handler" action gets the raw connection'
    if isinstance(action, ForwardAction) and action.protocol == "tcp":
        return 'the forward action has "protocol": "tcp"'
    if tls is not None and tls.mode == "passthrough":
        return 'TLS "passthrough" never decrypts the connection'
    return None


def _security(
    value: object, path: str, route: str, action: Action, tls: TlsSettings | None
) -> SecurityPolicy | None:
    raw = _mapping(value, path, schema.Security)
    _check_keys(raw, _SECURITY_KEYS, path, "security", route)
    get = raw.get
    allow, block, limit, per_ip, rate, auth = (
        get(key)
        for key in (
            "ip_allow_list",
            "ip_block_list",
            "max_connections",
            "max_connections_per_ip",
            "rate_limit",
            "basic_auth",
        )
    )
    rate_policy: RateLimitPolicy | None = None
    if rate is not None:
        where = f"{path}.rate_limit"
        rate_raw = _mapping(rate, where, schema.RateLimit)
        _check_keys(rate_raw, _RATE_KEYS, where, "security.rate_limit", route)
        _require(rate_raw, where, "connections_per_minute")
        per_minute = _int(rate_raw["connections_per_minute"], f"{where}.connections_per_minute", 1)
        rate_policy = RateLimitPolicy(per_minute)
    auth_policy: BasicAuthPolicy | None = None
    if auth is not None:
        auth_policy = _basic_auth(auth, f"{path}.basic_auth", route)
        blocker = _http_blocker(action, tls)
        if blocker is not None:
            raise ConfigError(f"{path}.basic_auth", f"needs an HTTP route, but {blocker}")
    policy = SecurityPolicy(
        ip_allow_list=() if allow is None else _strings(allow, f"{path}.ip_allow_list", _ip_rule),
        ip_block_list=() if block is None else _strings(block, f"{path}.ip_block_list", _ip_rule),
        max_connections=None if limit is None else _int(limit, f"{path}.max_connections", 1),
        max_connections_per_ip=None
        if per_ip is None
        else _int(per_ip, f"{path}.max_connections_per_ip", 1),
        rate_limit=rate_policy,
        basic_auth=auth_policy,
    )
    return None if policy == _NO_SECURITY else policy


_NO_SECURITY = SecurityPolicy()


# -- routes ----------------------------------------------------------------------------------

# (given name or None, route index, path of the name) -> (name, whether it was given)
_NameResolver = Callable[[str | None, int, str], tuple[str, bool]]


def _generated_name(index: int, taken: Collection[str]) -> str:
    name, extra = f"route-{index}", 1
    while name in taken:
        extra += 1
        name = f"route-{index}-{extra}"
    return name


def _compile_route(raw: _Raw, index: int, path: str, resolve_name: _NameResolver) -> CompiledRoute:
    _check_keys(raw, _ROUTE_KEYS, path, "", path)
    _require(raw, path, "match", "action")
    given, priority, enabled = raw.get("name"), raw.get("priority"), raw.get("enabled")
    if given is not None:
        given = _text(given, f"{path}.name")
    name, named = resolve_name(given, index, f"{path}.name")
    match = _match(raw["match"], f"{path}.match", path)
    action, tls_value = _action(raw["action"], f"{path}.action", path)
    tls = None if tls_value is None else _tls(tls_value, f"{path}.action.tls", action, path)
    security = raw.get("security")
    return CompiledRoute(
        name=name,
        match=match,
        action=action,
        index=index,
        priority=0 if priority is None else _int(priority, f"{path}.priority"),
        enabled=True if enabled is None else _bool(enabled, f"{path}.enabled"),
        tls=tls,
        security=None
        if security is None
        else _security(security, f"{path}.security", path, action, tls),
        named=named,
    )


def validate_route(
    route: schema.RouteInput,
    index: int,
    *,
    path: str = "route",
    taken_names: Collection[str] = (),
) -> CompiledRoute:
    """Validate one route (dict or :class:`~smartroute.routing.schema.Route`).

    ``index`` becomes the route's definition order; ``taken_names`` are the names of the routes
    it joins: a given name among them is an error, a generated name (``route-<index>``) avoids
    them.
    """

    def resolve(given: str | None, index: int, name_path: str) -> tuple[str, bool]:
        if given is None:
            return _generated_name(index, taken_names), False
        if given in taken_names:
            raise ConfigError(name_path, f'duplicate route name "{given}" (already taken)')
        return given, True

    return _compile_route(_mapping(route, path, schema.Route), index, path, resolve)


def validate_routes(
    routes: Iterable[schema.RouteInput], *, path: str = "routes"
) -> tuple[CompiledRoute, ...]:
    """Validate a whole route set: names unique, unnamed routes named ``route-<index>``."""
    if isinstance(routes, str | bytes | Mapping | schema.Route) or not isinstance(routes, Iterable):
        hint = (
            " (wrap a single route in a list)" if isinstance(routes, Mapping | schema.Route) else ""
        )
        raise ConfigError(path, f"expected a list of routes, got {_got(routes)}{hint}")
    items = list(routes)
    # Names given anywhere in the set are reserved before any name is generated.
    first_use: dict[str, int] = {}
    for i, route in enumerate(items):
        if type(route) is dict or isinstance(route, Mapping):
            given = route.get("name")
        else:
            given = getattr(route, "name", None)
        if isinstance(given, str):
            first_use.setdefault(given, i)

    def resolve(given: str | None, index: int, name_path: str) -> tuple[str, bool]:
        if given is None:
            return _generated_name(index, first_use), False
        first = first_use[given]
        if first != index:
            raise ConfigError(name_path, f'duplicate route name "{given}" (also {path}[{first}])')
        return given, True

    compiled: list[CompiledRoute] = []
    for i, route in enumerate(items):
        route_path = f"{path}[{i}]"
        raw = _mapping(route, route_path, schema.Route)
        compiled.append(_compile_route(raw, i, route_path, resolve))
    return tuple(compiled)
