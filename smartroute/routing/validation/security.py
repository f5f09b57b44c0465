"""The ``security`` block of a route: IP lists, connection limits, rate limit, basic auth."""

from __future__ import annotations

from types import MappingProxyType

from smartroute.errors import ConfigError
from smartroute.routing import schema
from smartroute.routing.model import (
    Action,
    BasicAuthPolicy,
    ForwardAction,
    RateLimitPolicy,
    SecurityPolicy,
    SocketHandlerAction,
    TlsSettings,
)
from smartroute.routing.validation._fields import (
    AUTH_KEYS,
    RATE_KEYS,
    SECURITY_KEYS,
    check_keys,
    expect_int,
    expect_strings,
    expect_text,
    got,
    ip_rule,
    mapping,
    require,
)


def _user_name(name: object, path: str) -> str:
    if not isinstance(name, str) or not name:
        raise ConfigError(path, f"expected non-empty str user names, got {got(name)}")
    if ":" in name:
        raise ConfigError(path, f'user name {name!r} contains ":" (Basic auth splits on it)')
    return name


def _basic_auth(value: object, path: str, route: str) -> BasicAuthPolicy:
    raw = mapping(value, path, schema.BasicAuth)
    check_keys(raw, AUTH_KEYS, path, "security.basic_auth", route)
    require(raw, path, "users")
    users = mapping(raw["users"], f"{path}.users")
    if not users:
        raise ConfigError(f"{path}.users", "empty mapping (give at least one user)")
    checked: dict[str, str] = {}
    for name, password in users.items():
        _user_name(name, f"{path}.users")
        if not isinstance(password, str):
            raise ConfigError(f"{path}.users[{name!r}]", f"expected a str, got {got(password)}")
        checked[name] = password
    if raw.get("realm") is None:
        return BasicAuthPolicy(MappingProxyType(checked))
    realm = expect_text(raw["realm"], f"{path}.realm")
    if '"' in realm or not realm.isprintable():
        raise ConfigError(f"{path}.realm", f"{realm!r} cannot be a realm (no quotes or controls)")
    return BasicAuthPolicy(MappingProxyType(checked), realm)


def http_blocker(action: Action, tls: TlsSettings | None) -> str | None:
    """Why this route can never see HTTP, or None when it can."""
    if isinstance(action, SocketHandlerAction):
        return 'a "socket-handler" action gets the raw connection'
    if isinstance(action, ForwardAction) and action.protocol == "tcp":
        return 'the forward action has "protocol": "tcp"'
    if tls is not None and tls.mode == "passthrough":
        return 'TLS "passthrough" never decrypts the connection'
    return None


def compile_security(
    value: object,
    path: str,
    route: str,
    action: Action | None = None,
    tls: TlsSettings | None = None,
) -> SecurityPolicy | None:
    """The policy of a route's ``security`` block, or None when it sets nothing.

    Without ``action`` (the proxy-wide defaults) ``basic_auth`` is accepted as is: it then
    applies to the routes that serve HTTP.
    """
    raw = mapping(value, path, schema.Security)
    check_keys(raw, SECURITY_KEYS, path, "security", route)
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
        rate_raw = mapping(rate, where, schema.RateLimit)
        check_keys(rate_raw, RATE_KEYS, where, "security.rate_limit", route)
        require(rate_raw, where, "connections_per_minute")
        per_minute = expect_int(
            rate_raw["connections_per_minute"], f"{where}.connections_per_minute", 1
        )
        rate_policy = RateLimitPolicy(per_minute)
    auth_policy: BasicAuthPolicy | None = None
    if auth is not None:
        auth_policy = _basic_auth(auth, f"{path}.basic_auth", route)
        blocker = None if action is None else http_blocker(action, tls)
        if blocker is not None:
            raise ConfigError(f"{path}.basic_auth", f"needs an HTTP route, but {blocker}")
    policy = SecurityPolicy(
        ip_allow_list=()
        if allow is None
        else expect_strings(allow, f"{path}.ip_allow_list", ip_rule),
        ip_block_list=()
        if block is None
        else expect_strings(block, f"{path}.ip_block_list", ip_rule),
        max_connections=None if limit is None else expect_int(limit, f"{path}.max_connections", 1),
        max_connections_per_ip=None
        if per_ip is None
        else expect_int(per_ip, f"{path}.max_connections_per_ip", 1),
        rate_limit=rate_policy,
        basic_auth=auth_policy,
    )
    return None if policy == _NO_SECURITY else policy


_NO_SECURITY = SecurityPolicy()
