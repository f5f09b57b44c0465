"""DNS-01: the TXT records a CA looks up, and the providers that publish them.

A :class:`DnsProvider` is whatever talks to the DNS host: two coroutines, ``set_txt`` and
``clear_txt``. :func:`dns_provider_from` turns the ``dns_provider`` setting (an object, a dict
naming a built-in provider, or an import path) into one, checked once at the edge.
"""

from __future__ import annotations

import asyncio
import difflib
import inspect
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Protocol, cast

from smartroute.errors import AcmeError, ConfigError
from smartroute.routing.validation._fields import import_object, is_async

_EXPECTED = (
    "expected an object with async set_txt(name, value) and clear_txt(name), "
    '{"type": "pebble-challtestsrv", "url": ...} or an import path "package.module:attr"'
)
_TYPES = ["pebble-challtestsrv"]
_KEYS = ["type", "url"]


class DnsProvider(Protocol):
    """Publishes the TXT records of DNS-01 challenges at a DNS host.

    ``name`` is the full record name without a trailing dot (``_acme-challenge.example.com``).
    One name can carry several values at once: an order for ``example.com`` and
    ``*.example.com`` validates both through ``_acme-challenge.example.com``, so ``set_txt``
    must add a value next to those already there, never replace them.
    """

    async def set_txt(self, name: str, value: str) -> None:
        """Add the TXT ``value`` at ``name``; return once the CA can see it (propagated)."""

    async def clear_txt(self, name: str) -> None:
        """Remove the TXT values this provider published at ``name``."""


def txt_record_name(domain: str) -> str:
    """The record the CA looks up for ``domain``: a wildcard is validated at its base name."""
    return "_acme-challenge." + domain.removeprefix("*.").rstrip(".")


class ChallTestSrvDns:
    """DNS-01 through pebble-challtestsrv's management API, for tests against Pebble.

    What challtestsrv (Debian's 2.4) does, observed: ``set-txt`` appends, so repeated calls
    for one host serve every value (duplicates included) and a base name and its wildcard can
    be validated at once; ``clear-txt`` drops every value of the host. Hosts are matched
    exactly, trailing dot and case included (DNS questions end with a dot, so one is added
    here). The record is served as soon as the call returns: nothing to wait for.
    """

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"ChallTestSrvDns({self.url!r})"

    async def set_txt(self, name: str, value: str) -> None:
        await asyncio.to_thread(self._post, "set-txt", name, {"value": value})

    async def clear_txt(self, name: str) -> None:
        await asyncio.to_thread(self._post, "clear-txt", name, {})

    def _post(self, command: str, name: str, extra: dict[str, str]) -> None:
        url = f"{self.url}/{command}"
        body = json.dumps({"host": name.rstrip(".") + ".", **extra}).encode()
        request = urllib.request.Request(
            url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        # No proxies: challtestsrv sits next to the tests, and an inherited http_proxy
        # would send loopback traffic astray.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=self.timeout) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            raise AcmeError(f"{command} {name} at {url}: HTTP {exc.code} {exc.reason}") from exc
        except (OSError, ValueError) as exc:  # URLError, timeouts, refused, a malformed URL
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            detail = str(reason) or type(exc).__name__
            raise AcmeError(f"{command} {name} at {url}: {detail}") from exc


def dns_provider_from(value: object, path: str) -> DnsProvider:
    """The ``dns_provider`` setting as a provider; ``path`` names the setting in errors."""
    if isinstance(value, str):
        found = import_object(value, path)
        if inspect.isclass(found):
            try:
                found = found()
            except Exception as exc:  # whatever a user's constructor raises
                raise ConfigError(
                    path, f"cannot create {value} with no arguments ({type(exc).__name__}: {exc})"
                ) from exc
        return _checked(found, path, f"{value!r} names {_kind(found)}, which")
    if isinstance(value, Mapping):
        return _from_mapping(value, path)
    if value is None:
        raise ConfigError(path, f"the dns-01 challenge needs a DNS provider: {_EXPECTED}")
    if inspect.isclass(value):
        raise ConfigError(path, f"{value.__qualname__} is a class: pass an instance of it")
    return _checked(value, path, _kind(value))


def _kind(value: object) -> str:
    return f"an object of type {type(value).__qualname__}"


def _checked(value: object, path: str, what: str) -> DnsProvider:
    for method in ("set_txt", "clear_txt"):
        found = getattr(value, method, None)
        if found is None or not callable(found):
            raise ConfigError(path, f"{what} has no {method} method; {_EXPECTED}")
        if not is_async(found):
            raise ConfigError(path, f"{what} has a {method} that is not async; {_EXPECTED}")
    return cast(DnsProvider, value)


def _from_mapping(raw: Mapping[object, object], path: str) -> DnsProvider:
    for key in raw:
        if key not in _KEYS:
            close = difflib.get_close_matches(str(key), _KEYS, n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise ConfigError(f"{path}.{key}", f"unknown dns_provider key{hint}")
    kind = raw.get("type")
    if kind not in _TYPES:
        close = difflib.get_close_matches(str(kind), _TYPES, n=1) if kind is not None else []
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        known = ", ".join(repr(t) for t in _TYPES)
        got = "missing" if kind is None else f"{kind!r} is not a known provider type"
        raise ConfigError(f"{path}.type", f"{got}{hint}; expected one of {known}")
    url = raw.get("url")
    if not isinstance(url, str) or not _is_http_url(url):
        got = "missing" if url is None else f"{url!r} is not an http(s) URL"
        raise ConfigError(
            f"{path}.url", f"{got}; expected challtestsrv's management URL (http://host:port)"
        )
    return ChallTestSrvDns(url)


def _is_http_url(url: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a bad port or an unbalanced IPv6 bracket
        return False
