"""The ``acme`` setting of SmartRoute, validated into :class:`AcmeSettings`."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from smartroute.errors import ConfigError

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
    challenge: Literal["http-01", "tls-alpn-01"] = "http-01"
    renew_threshold_days: float = 30.0
    certificate_store: str = "./certs"
    eab_kid: str | None = None
    eab_hmac_key: str | None = None
    renew_check_interval: float = 3600.0  # seconds between looks at what needs renewing
    retry_min: float = 60.0  # first retry after a failure; doubles up to retry_max
    retry_max: float = 6 * 3600.0
    order_timeout: float = 90.0  # how long one order may take at the CA


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
        "retry_max", "order_timeout",
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
    if challenge not in ("http-01", "tls-alpn-01"):
        raise ConfigError(
            f"{_PATH}.challenge", f"expected 'http-01' or 'tls-alpn-01', got {challenge!r}"
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
        certificate_store=_text(raw, "certificate_store") or "./certs",
        eab_kid=eab_kid,
        eab_hmac_key=eab_hmac,
        renew_check_interval=_number(raw, "renew_check_interval", 3600.0, 0.01),
        retry_min=retry_min,
        retry_max=max(retry_min, _number(raw, "retry_max", 6 * 3600.0, 0.01)),
        order_timeout=_number(raw, "order_timeout", 90.0, 1),
    )
