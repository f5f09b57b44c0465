"""SmartRoute keyword arguments are validated like routes: bad ones name themselves."""

from __future__ import annotations

from typing import Any

import pytest

from smartroute import ConfigError, Settings, SmartRoute
from smartroute.settings import validate_settings


def test_defaults_and_accepted_forms() -> None:
    assert validate_settings({}) == Settings()
    settings = validate_settings(
        {
            "bind_address": "127.0.0.1",
            "initial_data_timeout": 2,
            "connect_timeout": 0.5,
            "idle_timeout": None,
            "max_connection_lifetime": 60,
            "graceful_shutdown_timeout": 1,
            "accept_proxy_protocol": True,
            "proxy_ips": "10.0.0.0/8",
            "acme": {"email": "ops@example.test"},
            "backlog": 16,
        }
    )
    assert settings.initial_data_timeout == 2.0 and isinstance(settings.initial_data_timeout, float)
    assert settings.idle_timeout is None and settings.proxy_ips == ("10.0.0.0/8",)
    assert SmartRoute([], connect_timeout=3).settings.connect_timeout == 3.0


def test_zero_switches_an_optional_limit_off_and_timeouts_use_route_names() -> None:
    settings = validate_settings(
        {"idle_timeout": 0, "half_close_timeout": 0, "http_header_timeout": 2.5}
    )
    assert settings.idle_timeout is None and settings.half_close_timeout is None
    timeouts = settings.timeouts
    assert (timeouts.idle, timeouts.half_close, timeouts.http_header) == (None, None, 2.5)
    assert timeouts.max_lifetime == settings.max_connection_lifetime == 86400.0
    assert timeouts.connect == settings.connect_timeout == 10.0


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"conect_timeout": 1}, 'settings.conect_timeout: unknown setting (did you mean "connect_timeout"?)'),
        ({"zzz": 1}, "settings.zzz: unknown setting"),
        ({"connect_timeout": "5"}, "settings.connect_timeout: expected a number of seconds, got '5'"),
        ({"connect_timeout": True}, "settings.connect_timeout: expected a number of seconds, got True"),
        ({"connect_timeout": None}, "settings.connect_timeout: expected a number of seconds, got None"),
        ({"initial_data_timeout": 0}, "settings.initial_data_timeout: must be a finite number greater than 0, got 0"),
        ({"idle_timeout": -1}, "settings.idle_timeout: must be a finite number greater than 0, got -1"),
        ({"idle_timeout": "x"}, "settings.idle_timeout: expected a number of seconds (0 or None: no limit), got 'x'"),
        ({"http_header_timeout": float("inf")}, "settings.http_header_timeout: must be a finite number greater than 0, got inf"),
        ({"security": {"max_connections": 0}}, "settings.security.max_connections: expected an int >= 1, got 0"),
        ({"security": {"ip_alow_list": ["10.0.0.0/8"]}}, 'settings.security: unknown key "ip_alow_list" (did you mean "ip_allow_list"?)'),
        ({"bind_address": ""}, "settings.bind_address: expected an address, got ''"),
        ({"accept_proxy_protocol": 1}, "settings.accept_proxy_protocol: expected True or False, got 1"),
        ({"proxy_ips": ["10.0.0.1", "nope"]}, "settings.proxy_ips[1]: 'nope' is not an IP address or network"),
        ({"proxy_ips": 5}, "settings.proxy_ips: expected a list of IPs, got 5"),
        ({"acme": "yes"}, "settings.acme: expected a dict, got str"),
        ({"backlog": 0}, "settings.backlog: expected an int >= 1, got 0"),
        ({"workers": 0}, "settings.workers: expected an int from 1 to 64, got 0"),
        ({"workers": 65}, "settings.workers: expected an int from 1 to 64, got 65"),
        ({"workers": "2"}, "settings.workers: expected an int from 1 to 64, got '2'"),
        ({"workers": True}, "settings.workers: expected an int from 1 to 64, got True"),
        ({"workers": 2.0}, "settings.workers: expected an int from 1 to 64, got 2.0"),
    ],
)  # fmt: skip
def test_bad_settings_name_the_setting(given: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate_settings(given)
    assert str(caught.value) == message
    with pytest.raises(ConfigError):
        SmartRoute([], **given)


def test_workers_default_to_one_and_accept_up_to_64() -> None:
    assert validate_settings({}).workers == 1
    assert validate_settings({"workers": 64}).workers == 64
    assert validate_settings({"workers": 1, "acme": {"email": "ops@example.test"}}).workers == 1


def test_workers_need_so_reuseport(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    monkeypatch.delattr(socket, "SO_REUSEPORT")
    assert validate_settings({"workers": 1}).workers == 1
    with pytest.raises(ConfigError) as caught:
        validate_settings({"workers": 2})
    assert str(caught.value) == (
        "settings.workers: workers=2 needs SO_REUSEPORT and fork, which this platform lacks: "
        "the workers bind the same ports and the kernel spreads connections among them"
    )
