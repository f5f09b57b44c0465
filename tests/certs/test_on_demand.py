"""On-demand and wildcard certificates against a real ACME CA (Pebble), validation over loopback.

On-demand: the first handshake for an allowed name under the route's domains gets a
certificate; concurrent handshakes share one order; a refused, failing or hanging permission
callable costs that name its certificate and nothing else; a stored certificate is served
without asking again. Wildcards: ``*.example`` routes get a certificate through DNS-01.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import Any

import pytest
from acme_sites import acme_settings, curl_https, issued, served_certificate
from cryptography import x509
from http_backend import Backend
from pebble import Pebble
from support import LOOPBACK, async_test

from smartroute import ConfigError, SmartRoute
from smartroute.certs.dns import ChallTestSrvDns
from smartroute.certs.settings import validate_acme
from smartroute.helpers import create_https_terminate_route

ZONE = "ondemand.test"


class Permission:
    """The on_demand_permission callable: names starting with "ok" are allowed; "slow" hangs,
    "boom" raises; every question is recorded."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.down = False  # the permission service is unreachable: every call raises

    async def __call__(self, domain: str) -> bool:
        self.asked.append(domain)
        if self.down or domain.startswith("boom"):
            raise ConnectionError("permission service unreachable")
        if domain.startswith("slow"):
            await asyncio.sleep(3600)
        return domain.startswith("ok")


def on_demand_site(backend: Backend, port: int) -> dict[str, Any]:
    return create_https_terminate_route(
        f"*.{ZONE}",
        {"host": LOOPBACK, "port": backend.port},
        certificate="on-demand",
        ports=port,
        name="on-demand",
    )


def names_of(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName)


async def refused(port: int, name: str, root_pem: str) -> bool:
    """Whether a verifying client's handshake for ``name`` fails."""
    try:
        await asyncio.wait_for(served_certificate(port, name, root_pem), 20)
    except (ssl.SSLError, ConnectionError):
        return True
    return False


@async_test(180)
async def test_first_handshake_gets_a_certificate_once_and_bad_permissions_cost_only_their_name(
    pebble: Pebble, backend: Backend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    permission = Permission()
    https = pebble.tls_port
    settings = acme_settings(
        pebble, tmp_path / "certs", on_demand_permission=permission, on_demand_timeout=0.5
    )
    root = pebble.root_pem()
    async with SmartRoute(
        [on_demand_site(backend, https)], bind_address=LOOPBACK, acme=settings
    ) as proxy:
        assert proxy.certificate_status() == {}  # nothing is ordered before a handshake
        assert issued(pebble) == 0
        # Five concurrent handshakes for one new name: one question, one order, one certificate.
        name = f"ok-one.{ZONE}"
        certs = await asyncio.gather(*(served_certificate(https, name, root) for _ in range(5)))
        assert {c.serial_number for c in certs} == {certs[0].serial_number}
        assert names_of(certs[0]) == [name]
        assert permission.asked == [name] and issued(pebble) == 1
        # Served from memory afterwards: no question, no order.
        again = await served_certificate(https, name, root)
        assert again.serial_number == certs[0].serial_number
        assert permission.asked == [name] and issued(pebble) == 1
        assert proxy.certificate_status()[name]["state"] == "valid"

        caplog.set_level(logging.INFO, "smartroute.certs")
        bad = [f"no.{ZONE}", f"boom.{ZONE}", f"slow.{ZONE}"]
        outcomes = await asyncio.gather(
            *(refused(https, n, root) for n in bad),
            served_certificate(https, f"ok-two.{ZONE}", root),
        )
        assert outcomes[:3] == [True, True, True]
        second = outcomes[3]
        assert isinstance(second, x509.Certificate) and names_of(second) == [f"ok-two.{ZONE}"]
        assert issued(pebble) == 2  # nothing ordered for the refused names
        text = caplog.text
        assert f"on-demand certificate for no.{ZONE} refused by on_demand_permission" in text
        assert f"on_demand_permission('boom.{ZONE}') failed" in text
        assert f"on_demand_permission('slow.{ZONE}') did not answer within 0.5s" in text
        # A refusal is remembered for a while: asking again costs the permission nothing.
        asked = len(permission.asked)
        assert await refused(https, f"no.{ZONE}", root)
        assert len(permission.asked) == asked
        # The site behind it works for the name that got its certificate.
        (tmp_path / "root.pem").write_text(root)
        code, out, err = await curl_https(name, https, tmp_path / "root.pem")
        assert code == 0, err
        assert '"backend": "site"' in out


@async_test(180)
async def test_a_stored_certificate_is_served_while_the_permission_service_is_down(
    pebble: Pebble, backend: Backend, tmp_path: Path
) -> None:
    permission = Permission()
    https = pebble.tls_port
    settings = acme_settings(pebble, tmp_path / "certs", on_demand_permission=permission)
    routes = [on_demand_site(backend, https)]
    name = f"ok-kept.{ZONE}"
    async with SmartRoute(routes, bind_address=LOOPBACK, acme=settings):
        first = await served_certificate(https, name, pebble.root_pem())
    root = pebble.root_pem()
    permission.down = True
    pebble.stop()  # the CA is down too: only the store can serve it
    permission.asked.clear()
    async with SmartRoute(routes, bind_address=LOOPBACK, acme=settings) as proxy:
        again = await served_certificate(https, name, root)
        assert again.serial_number == first.serial_number
        assert permission.asked == []
        assert proxy.certificate_status()[name]["source"] == "store"
        assert await refused(https, f"ok-new.{ZONE}", root)  # a new name needs the service
        assert permission.asked == [f"ok-new.{ZONE}"]


@async_test(180)
async def test_new_orders_per_minute_are_limited(
    pebble: Pebble, backend: Backend, tmp_path: Path
) -> None:
    https = pebble.tls_port
    settings = acme_settings(
        pebble, tmp_path / "certs", on_demand_permission=Permission(), on_demand_per_minute=1
    )
    root = pebble.root_pem()
    async with SmartRoute([on_demand_site(backend, https)], bind_address=LOOPBACK, acme=settings):
        cert = await served_certificate(https, f"ok-a.{ZONE}", root)
        assert names_of(cert) == [f"ok-a.{ZONE}"]
        assert await refused(https, f"ok-b.{ZONE}", root)
        assert issued(pebble) == 1


def test_on_demand_routes_need_a_permission_callable(tmp_path: Path) -> None:
    route = {
        "match": {"ports": 8443, "domains": f"*.{ZONE}"},
        "action": {
            "type": "static",
            "static": {"content": "hi"},
            "tls": {"mode": "terminate", "certificate": "on-demand"},
        },
    }
    with pytest.raises(
        ConfigError, match='"on-demand" needs the acme setting with an on_demand_permission'
    ):
        SmartRoute([route], acme={"certificate_store": str(tmp_path)})
    with pytest.raises(ConfigError, match='"on-demand" needs the acme setting'):
        SmartRoute([route])


@async_test(180)
async def test_wildcard_routes_get_a_wildcard_certificate_through_dns01(
    pebble: Pebble, backend: Backend, tmp_path: Path
) -> None:
    https = pebble.tls_port
    settings = acme_settings(
        pebble,
        tmp_path / "certs",
        challenge="dns-01",
        dns_provider={"type": "pebble-challtestsrv", "url": pebble.challtestsrv_url},
    )
    route = create_https_terminate_route(
        ["*.wild.test", "wild.test"],
        {"host": LOOPBACK, "port": backend.port},
        certificate="auto",
        ports=https,
        name="wild",
    )
    async with SmartRoute([route], bind_address=LOOPBACK, acme=settings) as proxy:
        status = await proxy.wait_for_certificates()
        assert {d: s["state"] for d, s in status.items()} == {
            "*.wild.test": "valid",
            "wild.test": "valid",
        }
        assert proxy.listening_ports == {https: 1}  # DNS-01 binds no challenge port
        root = pebble.root_pem()
        for name, expected in (("a.wild.test", "*.wild.test"), ("wild.test", "wild.test")):
            cert = await served_certificate(https, name, root)
            assert names_of(cert) == [expected]
        (tmp_path / "root.pem").write_text(root)
        code, out, err = await curl_https("api.wild.test", https, tmp_path / "root.pem")
        assert code == 0, err
        assert '"backend": "site"' in out


class FailsFor:
    """A DNS provider that fails for one record name and publishes the others."""

    def __init__(self, url: str, broken: str) -> None:
        self.inner = ChallTestSrvDns(url)
        self.broken = broken

    async def set_txt(self, name: str, value: str) -> None:
        if name == self.broken:
            raise RuntimeError("the DNS host's API said no")
        await self.inner.set_txt(name, value)

    async def clear_txt(self, name: str) -> None:
        await self.inner.clear_txt(name)


@async_test(180)
async def test_a_failing_dns_provider_fails_its_name_only(
    pebble: Pebble, backend: Backend, tmp_path: Path
) -> None:
    https = pebble.tls_port
    provider = FailsFor(pebble.challtestsrv_url, "_acme-challenge.bad.dns.test")
    settings = acme_settings(
        pebble, tmp_path / "certs", challenge="dns-01", dns_provider=provider, retry_min=60
    )
    route = create_https_terminate_route(
        ["good.dns.test", "bad.dns.test"],
        {"host": LOOPBACK, "port": backend.port},
        certificate="auto",
        ports=https,
    )
    async with SmartRoute([route], bind_address=LOOPBACK, acme=settings) as proxy:
        status = await proxy.wait_for_certificates()
        assert status["good.dns.test"]["state"] == "valid"
        assert status["bad.dns.test"]["state"] == "failed"
        assert status["bad.dns.test"]["last_error"] == (
            "dns_provider.set_txt('_acme-challenge.bad.dns.test') failed: RuntimeError: the DNS "
            "host's API said no"
        )


async def allow_everything(domain: str) -> bool:
    return True


def test_the_permission_callable_may_be_an_import_path() -> None:
    acme = validate_acme({"on_demand_permission": "test_on_demand:allow_everything"})
    assert acme.on_demand_permission is allow_everything
