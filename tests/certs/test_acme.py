"""Automatic certificates against a real ACME CA (Pebble) on loopback; validation really runs."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
from collections.abc import Awaitable
from pathlib import Path

import pytest
from acme_sites import acme_settings, certs_cli, curl_https, served_certificate, site
from cryptography import x509
from http_backend import Backend
from pebble import Pebble, free_port, run_pebble
from support import LOOPBACK, TestCA, async_test, require_tool

from smartroute import SmartRoute
from smartroute.helpers import create_http_to_https_redirect, create_https_terminate_route
from smartroute.server.port_manager import Listener, PortManager


class BindLog:
    """Every port the proxy's port managers bind, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ports: list[int] = []
        original = PortManager._bind  # noqa: SLF001

        async def bind(manager: PortManager, port: int) -> Listener:
            self.ports.append(port)
            return await original(manager, port)

        monkeypatch.setattr(PortManager, "_bind", bind)


@async_test(120)
async def test_http01_through_the_shared_port_while_the_redirect_keeps_working(
    pebble: Pebble, backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binds = BindLog(monkeypatch)
    https = pebble.tls_port
    routes = [
        create_http_to_https_redirect(
            None, ports=pebble.http_port, https_port=https, name="redirect"
        ),
        site(["www.acme.test"], backend, https),
    ]
    settings = acme_settings(pebble, tmp_path / "certs")
    async with SmartRoute(routes, bind_address=LOOPBACK, acme=settings) as proxy:
        redirects: list[int] = []

        async def use_redirect() -> None:  # a visitor on the ACME port during issuance
            while proxy.certificate_status()["www.acme.test"]["state"] != "valid":
                reader, writer = await asyncio.open_connection(LOOPBACK, pebble.http_port)
                writer.write(
                    b"GET /page HTTP/1.1\r\nHost: www.acme.test\r\nConnection: close\r\n\r\n"
                )
                answer = await asyncio.wait_for(reader.read(), 10)
                writer.close()
                redirects.append(int(answer.split(b" ", 2)[1]))
                await asyncio.sleep(0.01)

        visitor = asyncio.create_task(use_redirect())
        status = await proxy.wait_for_certificates()
        await visitor
        assert status["www.acme.test"]["state"] == "valid", status
        assert status["www.acme.test"]["source"] == "acme"
        assert redirects and set(redirects) == {301}
        assert proxy.listening_ports == {pebble.http_port: 1, https: 1}  # challenge route gone
        root = tmp_path / "root.pem"
        root.write_text(pebble.root_pem())
        code, out, err = await curl_https("www.acme.test", https, root)
        assert code == 0, err
        assert '"backend": "site"' in out
        cert = await served_certificate(https, "www.acme.test", pebble.root_pem())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == ["www.acme.test"]
    assert binds.ports.count(pebble.http_port) == 1  # the ACME port was never bound twice
    assert (tmp_path / "certs").stat().st_mode & 0o777 == 0o700


@async_test(120)
async def test_tls_alpn01_on_the_site_port_without_binding_the_acme_port(
    pebble: Pebble, backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binds = BindLog(monkeypatch)
    https = pebble.tls_port
    settings = acme_settings(pebble, tmp_path / "certs", challenge="tls-alpn-01")
    async with SmartRoute(
        [site(["alpn.acme.test"], backend, https)], bind_address=LOOPBACK, acme=settings
    ) as proxy:
        status = await proxy.wait_for_certificates()
        assert status["alpn.acme.test"]["state"] == "valid", status
        root = tmp_path / "root.pem"
        root.write_text(pebble.root_pem())
        code, out, err = await curl_https("alpn.acme.test", https, root)
        assert code == 0, err
        assert '"backend": "site"' in out
    assert binds.ports == [https]


@async_test(150)
async def test_three_domains_share_one_bind_of_the_acme_port_which_is_released_after(
    pebble: Pebble, backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binds = BindLog(monkeypatch)
    https = pebble.tls_port
    domains = ["one.acme.test", "two.acme.test", "three.acme.test"]
    settings = acme_settings(pebble, tmp_path / "certs")
    async with SmartRoute(
        [site(domains, backend, https)], bind_address=LOOPBACK, acme=settings
    ) as proxy:
        status = await proxy.wait_for_certificates()
        assert {d: s["state"] for d, s in status.items()} == dict.fromkeys(domains, "valid")
        assert proxy.listening_ports == {https: 1}  # no user route on the ACME port: released
        for name in domains:
            cert = await served_certificate(https, name, pebble.root_pem())
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert san.get_values_for_type(x509.DNSName) == [name]
    assert binds.ports.count(pebble.http_port) == 1


@async_test(150)
async def test_restart_serves_the_stored_certificate_with_the_ca_down(
    pebble: Pebble, backend: Backend, tmp_path: Path
) -> None:
    https = pebble.tls_port
    settings = acme_settings(pebble, tmp_path / "certs")
    routes = [site(["stored.acme.test"], backend, https)]
    async with SmartRoute(routes, bind_address=LOOPBACK, acme=settings) as proxy:
        assert (await proxy.wait_for_certificates())["stored.acme.test"]["state"] == "valid"
        first = await served_certificate(https, "stored.acme.test", pebble.root_pem())
    root = pebble.root_pem()
    pebble.stop()
    async with SmartRoute(routes, bind_address=LOOPBACK, acme=settings) as proxy:
        status = proxy.certificate_status()["stored.acme.test"]
        assert status["state"] == "valid" and status["source"] == "store"
        again = await served_certificate(https, "stored.acme.test", root)
        assert again.serial_number == first.serial_number


@async_test(150)
async def test_forced_renewal_swaps_the_certificate_and_a_ca_outage_keeps_the_old_one(
    pebble: Pebble, backend: Backend, tmp_path: Path
) -> None:
    https = pebble.tls_port
    # A threshold longer than Pebble's 5-year certificates: every check finds it due.
    settings = acme_settings(
        pebble, tmp_path / "certs", renew_threshold_days=100_000, renew_check_interval=3600
    )
    routes = [site(["renew.acme.test"], backend, https)]
    root = pebble.root_pem()
    async with SmartRoute(routes, bind_address=LOOPBACK, acme=settings) as proxy:
        await proxy.wait_for_certificates()
        first = await served_certificate(https, "renew.acme.test", root)
        context = ssl.create_default_context(cadata=root)
        reader, writer = await asyncio.open_connection(
            LOOPBACK, https, ssl=context, server_hostname="renew.acme.test"
        )
        status = await proxy.renew_certificates(["renew.acme.test"])
        assert status["renew.acme.test"]["state"] == "valid"
        second = await served_certificate(https, "renew.acme.test", root)
        assert second.serial_number != first.serial_number  # new handshakes get the new one
        writer.write(b"GET /open HTTP/1.1\r\nHost: renew.acme.test\r\n\r\n")  # old connection
        assert b"200 OK" in await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.close()
        pebble.stop()
        status = await proxy.renew_certificates(["renew.acme.test"])
        assert status["renew.acme.test"]["state"] == "failed"
        assert status["renew.acme.test"]["last_error"] and status["renew.acme.test"]["next_attempt"]
        still = await served_certificate(https, "renew.acme.test", root)
        assert still.serial_number == second.serial_number  # the old one stays in service


@async_test(60)
async def test_provider_certificates_come_first_and_provided_routes_never_order(
    ca: TestCA, backend: Backend, tmp_path: Path
) -> None:
    https = free_port()
    asked: list[str] = []
    pair = ca.issue("hook.test")

    async def provider(domain: str) -> tuple[str, str] | None:
        asked.append(domain)
        return (pair.cert_pem, pair.key_pem) if domain == "hook.test" else None

    provided = ca.issue("given.test")
    routes = [
        site(["hook.test"], backend, https),
        create_https_terminate_route(
            "given.test", {"host": LOOPBACK, "port": backend.port},
            certificate={"cert": provided.cert_pem, "key": provided.key_pem}, ports=https, name="given",
        ),
    ]  # fmt: skip
    async with SmartRoute(routes, bind_address=LOOPBACK, certificate_provider=provider) as proxy:
        status = await proxy.wait_for_certificates()
        assert (
            status == {"hook.test": status["hook.test"]}
            and status["hook.test"]["source"] == "provider"
        )
        cert = await served_certificate(https, "hook.test", ca.pem)
        assert cert.subject.rfc4514_string() == "CN=hook.test"
        cert = await served_certificate(https, "given.test", ca.pem)
        assert cert.subject.rfc4514_string() == "CN=given.test"
    assert asked == ["hook.test"]


@async_test(120)
async def test_certs_cli_renews_and_lists_against_a_config(
    pebble: Pebble, backend: Backend, tmp_path: Path
) -> None:
    store = tmp_path / "certs"
    config = tmp_path / "proxy.json"
    config.write_text(
        json.dumps(
            {
                "settings": {"bind_address": LOOPBACK, "acme": acme_settings(pebble, store)},
                "routes": [site(["cli.acme.test"], backend, pebble.tls_port)],
            }
        )
    )

    def cli(*args: str) -> Awaitable[tuple[int, str]]:
        return certs_cli(config, *args)

    code, out = await cli("list")
    assert code == 0 and "cli.acme.test  missing" in out
    code, out = await cli("renew")
    assert code == 0, out
    assert "cli.acme.test: valid until" in out
    code, out = await cli("list")
    assert code == 0 and "1 certificates" in out
    assert "cli.acme.test  until" in out and "source=acme" in out and "valid" in out
    (
        store / next(p.name for p in store.iterdir() if p.name.startswith("cli")) / "key.pem"
    ).write_text("broken")
    code, out = await cli("list")
    assert "corrupt" in out and "cli.acme.test  missing" in out


@async_test(120)
async def test_external_account_binding_when_the_ca_requires_it(
    backend: Backend, tmp_path: Path
) -> None:
    require_tool("pebble")
    hmac_key = base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
    (tmp_path / "pebble").mkdir()
    with run_pebble(
        tmp_path / "pebble", http_port=free_port(), tls_port=free_port(), eab={"kid-7": hmac_key}
    ) as ca:
        https = ca.tls_port
        routes = [site(["eab.acme.test"], backend, https)]
        missing = acme_settings(ca, tmp_path / "no-eab")
        async with SmartRoute(routes, bind_address=LOOPBACK, acme=missing) as proxy:
            status = (await proxy.wait_for_certificates())["eab.acme.test"]
            assert (
                status["state"] == "failed" and "external account binding" in status["last_error"]
            )
        bound = acme_settings(ca, tmp_path / "eab", eab_kid="kid-7", eab_hmac_key=hmac_key)
        async with SmartRoute(routes, bind_address=LOOPBACK, acme=bound) as proxy:
            status = (await proxy.wait_for_certificates())["eab.acme.test"]
            assert status["state"] == "valid", status
