"""The certificate manager's scheduling decisions and the acme setting, without a CA."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
from support import TestCA, async_test

from smartroute import ConfigError, SmartRoute
from smartroute.certs.manager import CertificateManager
from smartroute.certs.on_demand import OnDemandGate, orderable_name
from smartroute.certs.schedule import DomainStatus
from smartroute.certs.settings import DIRECTORIES, AcmeSettings, validate_acme
from smartroute.certs.store import CertificateStore
from smartroute.certs.wanted import auto_domains
from smartroute.routing.model import CertificatePair
from smartroute.routing.schema import RouteInput
from smartroute.routing.validation import validate_routes

NOW = datetime.datetime.now(datetime.UTC)


def auto_route(*domains: str, port: int = 443) -> dict[str, Any]:
    return {
        "name": "site",
        "match": {"ports": port, "domains": list(domains)},
        "action": {
            "type": "forward",
            "targets": [{"host": "127.0.0.1", "port": 8080}],
            "tls": {"mode": "terminate", "certificate": "auto"},
        },
    }


class Host:
    """A proxy as the manager sees it: what it was asked to serve and route."""

    def __init__(self) -> None:
        self.served: list[tuple[CertificatePair, CertificatePair | None]] = []
        self.internal: dict[str, RouteInput | None] = {}

    def serve_certificate(self, new: CertificatePair, old: CertificatePair | None) -> None:
        self.served.append((new, old))

    async def set_internal_route(self, name: str, route: RouteInput | None) -> None:
        self.internal[name] = route


def manager(tmp_path: Path, **settings: Any) -> CertificateManager:
    acme = AcmeSettings(certificate_store=str(tmp_path / "certs"), **settings)
    return CertificateManager(Host(), acme)


def test_auto_domains_are_the_exact_names_of_auto_routes() -> None:
    routes = validate_routes(
        [
            auto_route("a.test", "*.wild.test", "B.test."),
            {"match": {"ports": 80}, "action": {"type": "block"}},
        ]
    )
    assert auto_domains(routes) == {"a.test", "b.test"}


def test_due_follows_threshold_lifetime_ari_and_backoff(ca: TestCA, tmp_path: Path) -> None:
    certs = manager(tmp_path, renew_threshold_days=2, retry_min=60, retry_max=600)
    certs._routes_want = {"a.test"}  # noqa: SLF001
    status = certs._status.setdefault("a.test", DomainStatus())  # noqa: SLF001
    assert certs._due("a.test", NOW) == NOW  # nothing stored: now  # noqa: SLF001
    pair = ca.issue("a.test")  # valid 8 days (from yesterday to a week ahead)
    entry = CertificateStore(tmp_path / "certs").save(
        ["a.test"], pair.cert_pem, pair.key_pem, source="acme"
    )
    certs._install("a.test", entry, "store")  # noqa: SLF001
    due = certs._due("a.test", NOW)  # noqa: SLF001
    # A third of an 8-day lifetime is more than the 2-day threshold: the earlier one wins.
    assert due == entry.not_after - entry.lifetime / 3
    status.suggested = NOW - datetime.timedelta(minutes=1)  # the CA (ARI) says: renew now
    assert certs._due("a.test", NOW) == status.suggested  # noqa: SLF001
    status.suggested = None
    delays = []
    for _ in range(6):
        certs._failed("a.test", "CA down")  # noqa: SLF001
        assert status.next_attempt is not None
        delays.append((status.next_attempt - datetime.datetime.now(datetime.UTC)).total_seconds())
    assert 60 * 0.75 < delays[0] < 60 * 1.25 and 120 * 0.75 < delays[1] < 120 * 1.25
    assert all(d <= 600 * 1.25 for d in delays) and delays[-1] > 600 * 0.75  # capped, jittered
    assert status.state == "failed" and status.last_error == "CA down"
    assert certs._due("a.test", NOW) == status.next_attempt  # noqa: SLF001


def test_auto_routes_need_acme_or_a_provider() -> None:
    with pytest.raises(ConfigError, match='"auto" needs the acme setting'):
        SmartRoute([auto_route("a.test")])


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (
            {"directory_url": "ftp://x"},
            "settings.acme.directory_url: expected 'production', 'staging' or an http(s) URL",
        ),
        ({"email": "nobody"}, "settings.acme.email: 'nobody' is not an email address"),
        ({"port": 70000}, "settings.acme.port: 70000 is not a port (1-65535)"),
        (
            {"challenge": "dns-02"},
            "settings.acme.challenge: expected 'http-01', 'tls-alpn-01' or 'dns-01'",
        ),
        ({"challenge": "dns-01"}, 'settings.acme.dns_provider: challenge "dns-01" needs a'),
        (
            {"dns_provider": {"type": "pebble-challtestsrv", "url": "http://127.0.0.1:1"}},
            'settings.acme.dns_provider: only used with challenge "dns-01"',
        ),
        (
            {"certificate_store": "redis://127.0.0.1/0"},
            "settings.acme.certificate_store: expected",
        ),
        (
            {"certificate_store": "redis://127.0.0.1:6379/x"},
            "settings.acme.certificate_store: the database number must be an integer",
        ),
        ({"certificate_store": "s3://bucket"}, "settings.acme.certificate_store: expected a"),
        (
            {"on_demand_permission": "os:getcwd"},
            "settings.acme.on_demand_permission: expected an async function",
        ),
        (
            {"on_demand_permission": "no.such.module:allow"},
            "settings.acme.on_demand_permission: cannot import 'no.such.module:allow'",
        ),
        ({"on_demand_per_minute": 0}, "settings.acme.on_demand_per_minute: expected an int >= 1"),
        ({"lock_lease": 0.5}, "settings.acme.lock_lease: expected a number >= 1"),
        (
            {"renew_treshold_days": 3},
            'settings.acme.renew_treshold_days: unknown acme setting (did you mean "renew_threshold_days"?)',
        ),
        ({"ca_bundle": "/nonexistent.pem"}, "settings.acme.ca_bundle: no such file"),
        (
            {"eab_kid": "kid"},
            "settings.acme.eab_kid: external account binding needs both eab_kid and eab_hmac_key",
        ),
        ({"retry_min": 0}, "settings.acme.retry_min: expected a number >= 0.01"),
    ],
)
def test_bad_acme_settings_name_the_field(given: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate_acme(given)
    assert str(caught.value).startswith(message)


def test_directory_names() -> None:
    assert validate_acme({"directory_url": "staging"}).directory_url == DIRECTORIES["staging"]
    assert validate_acme({}).directory_url == DIRECTORIES["production"]


@pytest.mark.parametrize(
    ("name", "orderable"),
    [
        ("a.example.com", True),
        ("xn--bcher-kva.example", True),
        ("localhost", False),
        ("192.0.2.7", False),
        ("*.example.com", False),
        ("a..example.com", False),
        ("-a.example.com", False),
        ("a" * 64 + ".example.com", False),
    ],
)
def test_orderable_names(name: str, orderable: bool) -> None:
    assert orderable_name(name) is orderable


@async_test(10)
async def test_the_gate_asks_once_per_refusal_and_counts_orders_per_minute() -> None:
    asked: list[str] = []

    async def permission(domain: str) -> object:
        asked.append(domain)
        return "yes" if domain.startswith("truthy") else domain.startswith("ok")

    gate = OnDemandGate(permission, timeout=1, per_minute=2)
    assert await gate.allows("ok.example.com")
    assert not await gate.allows("no.example.com")
    assert not await gate.allows("no.example.com")  # remembered: not asked again
    assert not await gate.allows("truthy.example.com")  # only True allows
    assert not await gate.allows("localhost")  # never asked
    assert asked == ["ok.example.com", "no.example.com", "truthy.example.com"]
    assert gate.take_order() and gate.take_order() and not gate.take_order()


def test_a_stored_certificate_satisfies_a_due_name_only_when_newer_and_not_due(
    ca: TestCA, tmp_path: Path
) -> None:
    store = CertificateStore(tmp_path / "certs")
    pair = ca.issue("a.test")  # valid 8 days, from yesterday
    served = store.save(["a.test"], pair.cert_pem, pair.key_pem, source="acme")
    status = DomainStatus()
    settings = AcmeSettings(renew_threshold_days=1)
    assert not status.satisfied_by(served, served, settings)  # the one served was found due
    assert status.satisfied_by(served, None, settings)  # nothing served: a valid one will do
    status.forced, status.forced_at = True, served.stored_at
    assert not status.satisfied_by(served, None, settings)  # forced: only a newer one will do
