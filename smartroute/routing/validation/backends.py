"""The backends of a ``forward`` action: its targets, its strategy, health checks (active and
passive) and retry policy, and the checks that tie them together."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal, cast

from smartroute.errors import ConfigError
from smartroute.routing import schema
from smartroute.routing.model import (
    MAX_WEIGHT,
    STRATEGIES,
    ForwardAction,
    ForwardProtocol,
    HealthCheck,
    HostFunction,
    PassiveHealth,
    PortFunction,
    RetryPolicy,
    Strategy,
    TargetSpec,
)
from smartroute.routing.validation._fields import (
    HEALTH_CHECK_KEYS,
    PASSIVE_HEALTH_KEYS,
    RETRY_KEYS,
    TARGET_KEYS,
    Raw,
    check_keys,
    expect_bool,
    expect_choice,
    expect_delay,
    expect_fraction,
    expect_int,
    expect_int_between,
    expect_port,
    expect_request_text,
    expect_seconds,
    expect_status_range,
    expect_strings,
    expect_text,
    got,
    mapping,
    require,
)

_INITIAL_STATES = ("up", "down")
_CHECK_TYPES = ("tcp", "http")
_HTTP_ONLY = ("path", "expect_status", "host")  # health check keys of type "http" only
_MAX_ATTEMPTS = 10


def _host(value: object, path: str) -> tuple[str, ...] | HostFunction:
    if type(value) is str and value and value == value.strip() and " " not in value:
        return (value,)
    if isinstance(value, str | list | tuple):
        if not value and not isinstance(value, str):
            raise ConfigError(path, "empty list (give at least one host)")
        hosts = expect_strings(value, path, expect_text)
        for i, host in enumerate(hosts):
            if host != host.strip() or " " in host:
                where = path if isinstance(value, str) else f"{path}[{i}]"
                raise ConfigError(where, f"{host!r} is not a host name (it contains spaces)")
        return hosts
    if callable(value):
        return cast(HostFunction, value)
    raise ConfigError(
        path, f"expected a host name, a list of host names or a callable, got {got(value)}"
    )


def _target_port(value: object, path: str) -> int | Literal["preserve"] | PortFunction:
    if type(value) is int and 1 <= value <= 65535:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return expect_port(value, path)
    if value == "preserve":
        return "preserve"
    if callable(value):
        return cast(PortFunction, value)
    raise ConfigError(
        path, f'expected a port (1-65535), "preserve" or a callable, got {got(value)}'
    )


def _target(value: object, path: str) -> TargetSpec:
    raw = mapping(value, path, schema.Target)
    check_keys(raw, TARGET_KEYS, path)
    host, port = raw.get("host"), raw.get("port")
    if host is None or port is None:
        require(raw, path, "host", "port")
    version = raw.get("send_proxy_protocol")
    if version not in (None, "v1", "v2"):
        raise ConfigError(f"{path}.send_proxy_protocol", f"expected 'v1' or 'v2', got {version!r}")
    weight, backup, initial = raw.get("weight"), raw.get("backup"), raw.get("initial")
    if weight is not None:
        weight = expect_int_between(weight, f"{path}.weight", 1, MAX_WEIGHT, "a weight")
    if backup is not None:
        backup = expect_bool(backup, f"{path}.backup")
    if initial is not None:
        initial = expect_choice(initial, f"{path}.initial", _INITIAL_STATES, "initial state")
    return TargetSpec(
        _host(host, f"{path}.host"),
        _target_port(port, f"{path}.port"),
        version,
        weight or 1,
        backup or False,
        cast(Literal["up", "down"], initial or "up"),
    )


def validate_targets(value: object, where: str) -> tuple[TargetSpec, ...]:
    """A forward action's ``targets`` (a list of targets, or one), checked; errors name
    ``where`` and the item."""
    if type(value) is list or isinstance(value, tuple):
        if not value:
            raise ConfigError(where, "empty list (give at least one target)")
        return tuple([_target(item, f"{where}[{i}]") for i, item in enumerate(value)])
    if isinstance(value, Mapping | schema.Target):
        return (_target(value, where),)
    raise ConfigError(where, f"expected a list of targets, got {got(value)}")


# -- backends: load balancing, health, retries ---------------------------------------------------


def forward_action(
    targets: tuple[TargetSpec, ...], protocol: ForwardProtocol, raw: Raw, path: str
) -> ForwardAction:
    """The forward action of ``targets`` with the backend settings ``raw`` gives (the action
    block at ``path``), checked against each other."""
    get = raw.get
    strategy = get("load_balancing")
    if strategy is not None:
        strategy = expect_choice(
            strategy, f"{path}.load_balancing", STRATEGIES, "load balancing strategy"
        )
    health_check, passive_health, retry = get("health_check"), get("passive_health"), get("retry")
    action = ForwardAction(
        targets,
        protocol,
        cast(Strategy, strategy or "round-robin"),
        None if health_check is None else _health_check(health_check, f"{path}.health_check"),
        None
        if passive_health is None
        else _passive_health(passive_health, f"{path}.passive_health"),
        None if retry is None else _retry(retry, f"{path}.retry"),
    )
    _check_targets(action, targets, f"{path}.targets", listed=True)
    return action


def forward_targets(action: ForwardAction, value: object, where: str) -> ForwardAction:
    """``action`` with new targets (given as a route's ``targets``), checked like a route's and
    against the action's other settings; errors name ``where`` and the item
    (``set_targets('web').targets[1].port``)."""
    targets = validate_targets(value, where)
    listed = type(value) is list or isinstance(value, tuple)
    _check_targets(action, targets, where, listed=listed)
    return dataclasses.replace(action, targets=targets)


def _check_targets(
    action: ForwardAction, targets: tuple[TargetSpec, ...], where: str, *, listed: bool
) -> None:
    """What the targets must be for the action's settings: one primary at least; a fixed
    host and port for health checks; a health check for targets that start down."""
    if all(target.backup for target in targets):
        raise ConfigError(where, "every target is a backup: at least one must be a primary")
    blocks = [
        key
        for key, block in (
            ("health_check", action.health_check),
            ("passive_health", action.passive_health),
        )
        if block is not None
    ]
    for i, target in enumerate(targets):
        item = f"{where}[{i}]" if listed else where
        unfixed = _unfixed(target)
        if blocks and unfixed is not None:
            field, why = unfixed
            raise ConfigError(
                f"{item}.{field}",
                f"the route has a {blocks[0]}, which needs targets with a fixed host and port"
                f" (this one has {why})",
            )
        if target.initial == "down" and action.health_check is None:
            raise ConfigError(
                f"{item}.initial",
                '"down" needs a health_check on the route: nothing else would bring the target up',
            )


def _unfixed(target: TargetSpec) -> tuple[str, str] | None:
    """The field that keeps ``target`` from a health state of its own, and why (None: it has
    one: see :attr:`TargetSpec.fixed`)."""
    if callable(target.host):
        return "host", "a callable host"
    if callable(target.port):
        return "port", "a callable port"
    if target.port == "preserve":
        return "port", 'port "preserve"'
    return None


def _seconds(value: object, path: str) -> float:
    return cast(float, expect_seconds(value, path))


def _health_check(value: object, path: str) -> HealthCheck:
    raw = mapping(value, path)
    check_keys(raw, HEALTH_CHECK_KEYS, path)
    get = raw.get
    kind = get("type")
    if kind is None:
        kind = "tcp"
    else:
        kind = expect_choice(kind, f"{path}.type", _CHECK_TYPES, "health check type")
    if kind == "tcp":
        for key in _HTTP_ONLY:
            if get(key) is not None:
                raise ConfigError(f"{path}.{key}", "only for type 'http' (this check is 'tcp')")
    given_interval, given_timeout = get("interval"), get("timeout")
    interval = 5.0 if given_interval is None else _seconds(given_interval, f"{path}.interval")
    if given_timeout is None:
        timeout = min(2.0, interval)  # a short interval shortens the default timeout with it
    else:
        timeout = _seconds(given_timeout, f"{path}.timeout")
        if timeout > interval:
            default = ", the default" if given_interval is None else ""
            raise ConfigError(
                f"{path}.timeout",
                f"must not exceed interval ({interval:g}{default}), got {given_timeout!r}",
            )
    rise, fall, check_path, status, host = (
        get(key) for key in ("rise", "fall", "path", "expect_status", "host")
    )
    return HealthCheck(
        cast(Literal["tcp", "http"], kind),
        interval,
        timeout,
        2 if rise is None else expect_int(rise, f"{path}.rise", 1),
        3 if fall is None else expect_int(fall, f"{path}.fall", 1),
        "/" if check_path is None else _request_path(check_path, f"{path}.path"),
        (200, 399) if status is None else expect_status_range(status, f"{path}.expect_status"),
        None if host is None else expect_request_text(host, f"{path}.host", "a Host header"),
    )


def _request_path(value: object, path: str) -> str:
    text = expect_request_text(value, path, "a request path")
    if not text.startswith("/"):
        raise ConfigError(path, f'{text!r} is not a request path (it must start with "/")')
    return text


def _passive_health(value: object, path: str) -> PassiveHealth:
    raw = mapping(value, path)
    check_keys(raw, PASSIVE_HEALTH_KEYS, path)
    max_fails, fail_timeout = raw.get("max_fails"), raw.get("fail_timeout")
    return PassiveHealth(
        3 if max_fails is None else expect_int(max_fails, f"{path}.max_fails", 1),
        10.0 if fail_timeout is None else _seconds(fail_timeout, f"{path}.fail_timeout"),
    )


def _retry(value: object, path: str) -> RetryPolicy:
    raw = mapping(value, path)
    check_keys(raw, RETRY_KEYS, path)
    get = raw.get
    attempts, given_backoff, given_max = get("attempts"), get("backoff"), get("max_backoff")
    if attempts is not None:
        what = "a number of attempts"
        attempts = expect_int_between(attempts, f"{path}.attempts", 1, _MAX_ATTEMPTS, what)
    backoff = 0.05 if given_backoff is None else expect_delay(given_backoff, f"{path}.backoff")
    max_backoff = 1.0 if given_max is None else expect_delay(given_max, f"{path}.max_backoff")
    if max_backoff < backoff:
        if given_max is None:  # name the field the user wrote
            raise ConfigError(
                f"{path}.backoff",
                f"{given_backoff!r} is more than max_backoff (1, the default): "
                "raise max_backoff too",
            )
        raise ConfigError(
            f"{path}.max_backoff", f"must be at least backoff ({backoff:g}), got {given_max!r}"
        )
    jitter, any_method = get("jitter"), get("any_method")
    return RetryPolicy(
        attempts or 3,
        backoff,
        max_backoff,
        0.2 if jitter is None else expect_fraction(jitter, f"{path}.jitter"),
        False if any_method is None else expect_bool(any_method, f"{path}.any_method"),
    )
