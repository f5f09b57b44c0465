"""Hardening defaults: private keys never show up in errors, reprs or logs; no route, no relay."""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
from typing import Any

import pytest
from support import LOOPBACK, TestCA, async_test, echo_handler, free_port, serve

from smartroute import ConfigError, SmartRoute
from smartroute.routing.validation import validate_routes


def terminate(port: int, cert: object, key: object) -> dict[str, Any]:
    return {
        "match": {"ports": port, "domains": "site.test"},
        "action": {
            "type": "forward",
            "targets": [{"host": LOOPBACK, "port": 1}],
            "tls": {"mode": "terminate", "certificate": {"cert": cert, "key": key}},
        },
    }


def key_body(pem: str) -> str:
    """The base64 of a PEM key on one line: what a careless copy and paste produces."""
    return "".join(line for line in pem.splitlines() if not line.startswith("-----"))


def error_of(route: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        validate_routes([route])
    return str(caught.value)


def test_key_material_never_appears_in_validation_errors(ca: TestCA) -> None:
    pair = ca.issue("site.test")
    body = key_body(pair.key_pem)
    der = base64.b64decode(body)
    broken = pair.key_pem.replace(body[10:30], "A" * 20)  # a PEM key that does not load
    other = ca.issue("other.test")
    cases = {
        "base64 body as a path": body,
        "DER bytes": der,
        "malformed PEM": broken,
        "key of another certificate": other.key_pem,
    }
    for what, key in cases.items():
        message = error_of(terminate(443, pair.cert_pem, key))
        for secret in (body[:24], body[-24:], repr(der)[:24], other.key_pem[40:64]):
            assert secret not in message, f"{what}: {message}"
        assert message.startswith("routes[0].action.tls.certificate"), message


def test_key_paths_are_still_named_in_errors(ca: TestCA) -> None:
    pair = ca.issue("site.test")
    message = error_of(terminate(443, pair.cert_pem, "/etc/smartroute/site.key"))
    assert "'/etc/smartroute/site.key' does not exist" in message


def test_compiled_routes_and_settings_do_not_print_keys(ca: TestCA) -> None:
    pair = ca.issue("site.test")
    route = validate_routes([terminate(443, pair.cert_pem, pair.key_pem)])[0]
    body = key_body(pair.key_pem)
    for text in (repr(route), str(route), repr(route.tls)):
        assert body[:24] not in text and "PRIVATE KEY" not in text
    secured = {
        "match": {"ports": 80},
        "action": {"type": "forward", "protocol": "http", "targets": [{"host": "h", "port": 1}]},
        "security": {"basic_auth": {"users": {"alice": "hunter2-secret"}}},
    }
    assert "hunter2-secret" not in repr(validate_routes([secured])[0])
    proxy = SmartRoute([secured], security={"basic_auth": {"users": {"bob": "s3cret-pw"}}})
    assert "s3cret-pw" not in repr(proxy.settings)


@async_test()
async def test_traffic_logs_never_carry_keys_or_passwords(
    ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    pair = ca.issue("site.test")
    port = free_port()
    route = terminate(port, pair.cert_pem, pair.key_pem)
    caplog.set_level(logging.DEBUG, logger="smartroute")
    async with SmartRoute([route], bind_address=LOOPBACK, initial_data_timeout=1):
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(b"\x16\x03\x01\x00\x05garbage")  # a broken hello: logged as an error
        await asyncio.wait_for(reader.read(), 5)
        writer.close()
    body = key_body(pair.key_pem)
    assert caplog.records, "the proxy logs its start, stop and the refused connection"
    assert body[:24] not in caplog.text and "PRIVATE KEY" not in caplog.text


@async_test()
async def test_no_matching_route_is_a_closed_connection_never_a_relay() -> None:
    contacted: list[bool] = []

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        contacted.append(True)
        await echo_handler(reader, writer)

    async with serve(backend) as target:
        port = free_port()
        routes = [
            {
                "match": {"ports": port, "client_ip": "10.0.0.0/8"},
                "action": {"type": "forward", "targets": [{"host": LOOPBACK, "port": target}]},
            }
        ]
        async with SmartRoute(routes, bind_address=LOOPBACK):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
            try:
                answer = await asyncio.wait_for(reader.read(), 5)
            except ConnectionError:
                answer = b""
            writer.close()
    assert answer == b"" and not contacted


@async_test()
async def test_terminated_tls_offers_only_modern_tls12_suites(ca: TestCA) -> None:
    pair = ca.issue("site.test")
    port = free_port()
    route = terminate(port, pair.cert_pem, pair.key_pem)
    route["action"] = {
        "type": "socket-handler",
        "socket_handler": echo_handler,
        "tls": route["action"]["tls"],
    }

    async def handshake(cipher: str) -> str | None:
        context = ca.client_context()
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(cipher)
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(LOOPBACK, port, ssl=context, server_hostname="site.test"), 5
            )
        except (ssl.SSLError, ConnectionError):
            return None
        ssl_object = writer.get_extra_info("ssl_object")
        writer.close()
        return str(ssl_object.cipher()[0])

    async with SmartRoute([route], bind_address=LOOPBACK):
        assert await handshake("ECDHE-ECDSA-AES128-GCM-SHA256") == "ECDHE-ECDSA-AES128-GCM-SHA256"
        assert await handshake("ECDHE-ECDSA-CHACHA20-POLY1305") == "ECDHE-ECDSA-CHACHA20-POLY1305"
        for legacy in ("ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA"):
            assert await handshake(legacy) is None, legacy
