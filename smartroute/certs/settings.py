"""The ``acme`` setting of SmartRoute, validated into :class:`AcmeSettings`."""

from __future__ import annotations

import difflib
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from smartroute.errors import ConfigError
from smartroute.routing.model import CompiledRoute
from smartroute.routing.validation._fields import import_object, is_async

DIRECTORIES = {
    "production": "https://acme-v02.api.letsencrypt.org/directory",
    "staging": "https://acme-staging-v02.api.letsencrypt.org/directory",
}


@dataclass(frozen=True, slots=True)
class AcmeSettings:
    directory_url: str = DIRECTORIES["production"]
    email: str | None = None
    ca_bundle: str | None = None
    port: int = 80
    challenge: Literal["http-01", "tls-alpn-01", "dns-01"] = "http-01"
    renew_threshold_days: float = 30.0
    certificate_store: str = "./certs"
    eab_kid: str | None = None
    eab_hmac_key: str | None = None
    renew_check_interval: float = 3600.0  # seconds between looks at what needs renewing
    retry_min: float = 60.0  # first retry after a failure; doubles up to retry_max
    retry_max: float = 6 * 3600.0
    order_timeout: float = 90.0  # how long one order may take at the CA
    dns_provider: Any = None  # a DnsProvider (dns-01): async set_txt(name, value), clear_txt(name)
    on_demand_permission: Any = None  # async (domain) -> bool: may this name get a certificate?
    on_demand_timeout: float = 10.0  # how long the permission callable may take
    on_demand_per_minute: int = 10  # new on-demand certificates ordered per minute, at most
    lock_lease: float = 60.0  # seconds an issuance lock lives unless its holder renews it


_PATH = "settings.acme"


def _number(raw: Mapping[str, object], key: str, default: float, minimum: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise ConfigError(f"{_PATH}.{key}", f"expected a number >= {minimum:g}, got {value!r}")
    return float(value)


def _text(raw: Mapping[str, object], key: str) -> str | None:
    value = raw.get(key)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ConfigError(f"{_PATH}.{key}", f"expected a non-empty string, got {value!r}")
    return value


def validate_acme(raw: Mapping[str, object]) -> AcmeSettings:
    """Check the ``acme`` dict: every key known, every value of the right kind."""
    known = [
        "email", "directory_url", "ca_bundle", "port", "challenge", "renew_threshold_days",
        "certificate_store", "eab_kid", "eab_hmac_key", "renew_check_interval", "retry_min",
        "retry_max", "order_timeout", "dns_provider", "on_demand_permission",
        "on_demand_timeout", "on_demand_per_minute", "lock_lease",
    ]  # fmt: skip
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise ConfigError(f"{_PATH}.{key}", f"unknown acme setting{hint}")
    directory = _text(raw, "directory_url") or "production"
    directory = DIRECTORIES.get(directory, directory)
    if not directory.startswith(("https://", "http://")):
        raise ConfigError(
            f"{_PATH}.directory_url",
            f"expected 'production', 'staging' or an http(s) URL, got {directory!r}",
        )
    email = _text(raw, "email")
    if email is not None and ("@" not in email or any(c in email for c in " \r\n,")):
        raise ConfigError(f"{_PATH}.email", f"{email!r} is not an email address")
    ca_bundle = _text(raw, "ca_bundle")
    if ca_bundle is not None and not Path(ca_bundle).is_file():
        raise ConfigError(f"{_PATH}.ca_bundle", f"no such file: {ca_bundle}")
    port = raw.get("port", 80)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{_PATH}.port", f"{port!r} is not a port (1-65535)")
    challenge = raw.get("challenge", "http-01")
    if challenge not in ("http-01", "tls-alpn-01", "dns-01"):
        raise ConfigError(
            f"{_PATH}.challenge",
            f"expected 'http-01', 'tls-alpn-01' or 'dns-01', got {challenge!r}",
        )
    dns_provider = raw.get("dns_provider")
    if dns_provider is not None:
        from smartroute.certs.dns import dns_provider_from

        dns_provider = dns_provider_from(dns_provider, f"{_PATH}.dns_provider")
    if challenge == "dns-01" and dns_provider is None:
        raise ConfigError(
            f"{_PATH}.dns_provider",
            'challenge "dns-01" needs a dns_provider: an object with async set_txt(name, value)'
            ' and clear_txt(name), an import path to one, or {"type": "pebble-challtestsrv",'
            ' "url": ...}',
        )
    if challenge != "dns-01" and dns_provider is not None:
        raise ConfigError(f"{_PATH}.dns_provider", 'only used with challenge "dns-01"')
    per_minute = raw.get("on_demand_per_minute", 10)
    if isinstance(per_minute, bool) or not isinstance(per_minute, int) or per_minute < 1:
        raise ConfigError(
            f"{_PATH}.on_demand_per_minute", f"expected an int >= 1, got {per_minute!r}"
        )
    eab_kid, eab_hmac = _text(raw, "eab_kid"), _text(raw, "eab_hmac_key")
    if (eab_kid is None) != (eab_hmac is None):
        raise ConfigError(
            f"{_PATH}.eab_kid", "external account binding needs both eab_kid and eab_hmac_key"
        )
    retry_min = _number(raw, "retry_min", 60.0, 0.01)
    return AcmeSettings(
        directory_url=directory,
        email=email,
        ca_bundle=ca_bundle,
        port=port,
        challenge=challenge,
        renew_threshold_days=_number(raw, "renew_threshold_days", 30.0, 0),
        certificate_store=_store(raw),
        eab_kid=eab_kid,
        eab_hmac_key=eab_hmac,
        renew_check_interval=_number(raw, "renew_check_interval", 3600.0, 0.01),
        retry_min=retry_min,
        retry_max=max(retry_min, _number(raw, "retry_max", 6 * 3600.0, 0.01)),
        order_timeout=_number(raw, "order_timeout", 90.0, 1),
        dns_provider=dns_provider,
        on_demand_permission=_permission(raw.get("on_demand_permission")),
        on_demand_timeout=_number(raw, "on_demand_timeout", 10.0, 0.01),
        on_demand_per_minute=per_minute,
        lock_lease=_number(raw, "lock_lease", 60.0, 1),
    )


def _store(raw: Mapping[str, object]) -> str:
    """A folder path, or ``redis://[:PASSWORD@]HOST:PORT/DB`` (``rediss://`` for TLS)."""
    location = _text(raw, "certificate_store") or "./certs"
    if "://" not in location:
        return location
    url = urllib.parse.urlsplit(location)
    where = f"{_PATH}.certificate_store"
    if url.scheme not in ("redis", "rediss"):
        raise ConfigError(
            where, f"expected a folder or a redis:// URL, got the scheme {url.scheme!r}"
        )
    try:
        port = url.port
    except ValueError:
        raise ConfigError(where, f"{url.netloc!r} has no valid port") from None
    if not url.hostname or port is None:
        raise ConfigError(where, 'expected "redis://HOST:PORT/DB" (host and port are needed)')
    db = url.path.strip("/") or "0"
    if not db.isdigit():
        raise ConfigError(where, f"the database number must be an integer, got {db!r}")
    return location


def _permission(value: object) -> object:
    """``on_demand_permission``: an async callable ``(domain) -> bool``, or its import path."""
    if value is None:
        return None
    where = f"{_PATH}.on_demand_permission"
    if isinstance(value, str):
        value = import_object(value, where)
    if not is_async(value):
        raise ConfigError(
            where,
            f"expected an async function (domain) -> bool or its import path, got {value!r}",
        )
    return value


def check_cluster(settings: AcmeSettings | None, cluster: bool) -> None:
    """TLS-ALPN-01 answers live in one process: refuse them when others share the store."""
    if settings is not None and cluster and settings.challenge == "tls-alpn-01":
        raise ConfigError(
            f"{_PATH}.challenge",
            '"tls-alpn-01" cannot be used when processes share the certificate store '
            "(workers > 1 or a Redis store): the CA may reach a process that does not hold "
            'the challenge; use "http-01" or "dns-01"',
        )


def check_certificate_sources(
    routes: Iterable[CompiledRoute], acme: AcmeSettings | None, has_provider: bool
) -> None:
    """``"certificate": "auto"`` needs the acme setting or a certificate provider;
    ``"on-demand"`` needs the acme setting with an ``on_demand_permission``."""
    for route in routes:
        wanted = route.tls.certificate if route.tls is not None else None
        if wanted == "auto" and acme is None and not has_provider:
            raise ConfigError(
                f"route {route.name!r}",
                'tls.certificate "auto" needs the acme setting (or a certificate_provider)',
            )
        if wanted == "on-demand" and (acme is None or acme.on_demand_permission is None):
            raise ConfigError(
                f"route {route.name!r}",
                'tls.certificate "on-demand" needs the acme setting with an '
                "on_demand_permission (async (domain) -> bool): without it anyone could "
                "make the proxy order certificates for made-up names",
            )
