"""HTTPS end to end: real TLS clients (curl, openssl s_client, Python ssl) -> SmartRoute -> backends.

Every proxy here terminates (or passes through) TLS on 127.0.0.1 with certificates from the
session's test CA; clients reach names like ``a.example.test`` through ``--resolve`` or SNI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from http_backend import http_backend
from support import (
    LOOPBACK,
    CertPair,
    TestCA,
    async_test,
    curl,
    free_port,
    named_handler,
    require_tool,
    serve,
)

from smartroute import RouteContext, SmartRoute

# -- helpers -----------------------------------------------------------------------------------


def proxy(routes: list[dict[str, Any]], **settings: Any) -> SmartRoute:
    settings.setdefault("bind_address", LOOPBACK)
    settings.setdefault("initial_data_timeout", 5)
    return SmartRoute(routes, **settings)


def certificate(pair: CertPair) -> dict[str, str]:
    return {"cert": pair.cert_pem, "key": pair.key_pem}


def tls_route(
    port: int,
    backend: int,
    *,
    name: str,
    cert: dict[str, str],
    mode: str = "terminate",
    tls: dict[str, Any] | None = None,
    **match: Any,
) -> dict[str, Any]:
    """A forward route that terminates TLS (or re-encrypts) with ``cert``."""
    return {
        "name": name,
        "match": {"ports": port, **match},
        "action": {
            "type": "forward",
            "targets": [{"host": LOOPBACK, "port": backend}],
            "protocol": "http",
            "tls": {"mode": mode, "certificate": cert, **(tls or {})},
        },
    }


def ca_file(ca: TestCA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    path.write_text(ca.pem)
    return path


async def s_client(port: int, *args: str, request: bytes | None = None) -> tuple[int, str]:
    """``openssl s_client`` against the proxy; returns its exit code and everything it printed.

    With ``request``, the bytes are sent after the handshake and the output is read until the
    server closes the connection (so the request should say ``Connection: close``); stdin stays
    open meanwhile, because s_client ends the session as soon as its stdin ends.
    """
    proc = await asyncio.create_subprocess_exec(
        require_tool("openssl"), "s_client", "-connect", f"{LOOPBACK}:{port}", *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        if request is not None:
            proc.stdin.write(request)
            await proc.stdin.drain()
            out = await asyncio.wait_for(proc.stdout.read(), 20)
            proc.stdin.close()
        else:
            proc.stdin.close()
            out = await asyncio.wait_for(proc.stdout.read(), 20)
        await asyncio.wait_for(proc.wait(), 10)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


def subject_cn(text: str) -> str | None:
    """The leaf subject's CN as s_client prints it (``subject=CN = x`` or ``subject=CN=x``)."""
    for line in text.splitlines():
        if line.startswith("subject="):
            value = line.removeprefix("subject=").replace(" = ", "=")
            for part in value.split(","):
                key, _, cn = part.strip().partition("=")
                if key == "CN":
                    return cn
    return None


def json_documents(text: str) -> list[dict[str, Any]]:
    """Several JSON bodies written one after another (curl with several URLs)."""
    decoder, found, at = json.JSONDecoder(), [], 0
    text = text.strip()
    while at < len(text):
        value, end = decoder.raw_decode(text, at)
        found.append(value)
        at = end
        while at < len(text) and text[at].isspace():
            at += 1
    return found


def header_map(info: dict[str, Any]) -> dict[str, str]:
    return {k.lower(): v for k, v in info["headers"]}


async def wait_idle(router: SmartRoute, timeout: float = 10) -> None:
    """Until the proxy counts no active connection (they end asynchronously after the client)."""
    async with asyncio.timeout(timeout):
        while router.stats()["connections"]["active"]:
            await asyncio.sleep(0.01)


# -- a small HTTPS backend ---------------------------------------------------------------------


async def https_responder(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An HTTP/1.1 keep-alive responder: answers every request head with what it saw."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *lines = head.decode("latin-1").split("\r\n")
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines if x)
            }
            method, target, _ = request_line.split(" ")
            body = json.dumps(
                {"backend": "secure", "method": method, "path": target, "headers": headers}
            ).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                % len(body)
                + body
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def https_backend(
    ca: TestCA, tmp_path: Path, *names: str
) -> AsyncIterator[tuple[int, list[str | None]]]:
    """An HTTPS backend whose certificate (from the test CA) covers ``names``.

    Yields its port and the list of SNI names its clients sent, in handshake order.
    """
    context = ca.server_context(ca.issue(*names), tmp_path, "https-backend")
    received: list[str | None] = []

    def remember(_: ssl.SSLObject, name: str | None, __: ssl.SSLContext) -> None:
        received.append(name)

    context.sni_callback = remember
    async with serve(https_responder, ssl_context=context) as port:
        yield port, received


# -- 1. curl over HTTPS ------------------------------------------------------------------------


@async_test(60)
async def test_curl_https_alpn_forwarded_proto_and_per_request_routing_on_one_tls_connection(
    ca: TestCA, tmp_path: Path
) -> None:
    cafile = ca_file(ca, tmp_path)
    cert = certificate(ca.issue("site.example.test"))
    with http_backend("A") as api, http_backend("B") as web:
        port = free_port()
        routes = [
            tls_route(
                port, api.port, name="api", cert=cert, domains="site.example.test", path="/api/*"
            ),
            tls_route(port, web.port, name="web", cert=cert, domains="site.example.test"),
        ]
        async with proxy(routes):
            base = f"https://site.example.test:{port}"
            code, out, err = await curl(
                "-v", "--resolve", f"site.example.test:{port}:{LOOPBACK}", "--cacert", str(cafile),
                f"{base}/api/users?x=1", f"{base}/index.html",
            )  # fmt: skip
    assert code == 0, err
    assert (
        "ALPN: server accepted http/1.1" in err or "ALPN, server accepted to use http/1.1" in err
    ), err
    assert "Re-using existing connection" in err or "Reusing existing" in err, err
    assert err.count("SSL connection using") == 1, err  # one handshake for both URLs
    first, second = json_documents(out)
    assert (first["backend"], first["path"]) == ("A", "/api/users?x=1")
    assert (second["backend"], second["path"]) == ("B", "/index.html")
    for info in (first, second):
        headers = header_map(info)
        assert headers["x-forwarded-proto"] == "https"
        assert headers["host"] == f"site.example.test:{port}"
        assert headers["x-forwarded-for"] == LOOPBACK


# -- 2. a certificate per SNI ------------------------------------------------------------------


@async_test(60)
async def test_openssl_gets_the_certificate_for_its_sni_exact_wildcard_or_default(
    ca: TestCA, tmp_path: Path
) -> None:
    cafile = str(ca_file(ca, tmp_path))
    exact, wildcard, default = (
        certificate(ca.issue("a.example.test")),
        certificate(ca.issue("*.example.test")),
        certificate(ca.issue("default.test")),
    )
    with (
        http_backend("exact") as one,
        http_backend("wild") as two,
        http_backend("default") as three,
    ):
        port = free_port()
        routes = [
            tls_route(port, three.port, name="default", cert=default),  # no domains: takes the rest
            tls_route(port, two.port, name="wild", cert=wildcard, domains="*.example.test"),
            tls_route(port, one.port, name="exact", cert=exact, domains="a.example.test"),
        ]
        async with proxy(routes):
            # (SNI sent, name the served certificate must be valid for, its CN, backend reached)
            for sni, valid_for, cn, backend in (
                ("a.example.test", "a.example.test", "a.example.test", "exact"),
                ("b.example.test", "b.example.test", "*.example.test", "wild"),
                ("other.test", "default.test", "default.test", "default"),  # nothing covers it
                (None, "default.test", "default.test", "default"),
            ):
                name_args = ["-servername", sni] if sni else ["-noservername"]
                host = sni or "no-sni.test"
                request = f"GET /who HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
                code, text = await s_client(
                    port,
                    *name_args,
                    "-CAfile",
                    cafile,
                    "-verify_hostname",
                    valid_for,
                    request=request,
                )
                assert "Verify return code: 0 (ok)" in text, text
                assert subject_cn(text) == cn, text
                assert f'"backend": "{backend}"' in text, text


# -- 3. TLS 1.2 is the minimum -----------------------------------------------------------------


@async_test(60)
async def test_tls_1_1_is_refused_while_tls_1_2_and_1_3_work(ca: TestCA, tmp_path: Path) -> None:
    cafile = str(ca_file(ca, tmp_path))
    cert = certificate(ca.issue("v.example.test"))
    with http_backend("v") as backend:
        port = free_port()
        async with proxy(
            [tls_route(port, backend.port, name="v", cert=cert, domains="v.example.test")]
        ):
            common = [
                "-servername",
                "v.example.test",
                "-CAfile",
                cafile,
                "-verify_hostname",
                "v.example.test",
            ]
            # SECLEVEL=0: some OpenSSL builds refuse to offer TLS 1.1 at all, and the refusal
            # must be the proxy's (the client did send its ClientHello): a protocol_version
            # alert, as the TLS layer on the fast lane sends before it closes.
            code, text = await s_client(port, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0", *common)
            assert re.search(r"SSL handshake has read \d+ bytes and written [1-9]\d* bytes", text)
            assert "alert protocol version" in text, text
            # s_client prints "Verify return code: 0" even without a certificate: look at the cipher.
            assert (
                code != 0 and "Cipher is (NONE)" in text and "no peer certificate available" in text
            ), text
            for flag, version in (("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")):
                request = b"GET /v HTTP/1.1\r\nHost: v.example.test\r\nConnection: close\r\n\r\n"
                code, text = await s_client(port, flag, *common, request=request)
                assert "Verify return code: 0 (ok)" in text, text
                assert f"Protocol  : {version}" in text or f"New, {version}," in text, text
                assert '"backend": "v"' in text, text


# -- 4. passthrough and terminate on one port --------------------------------------------------


@async_test(60)
async def test_one_port_mixes_passthrough_and_terminate_by_sni(ca: TestCA, tmp_path: Path) -> None:
    cafile = ca_file(ca, tmp_path)
    backend_context = ca.server_context(ca.issue("pass.example.test"), tmp_path, "pass")
    async with serve(named_handler("tls-backend"), ssl_context=backend_context) as tls_port:
        with http_backend("plain") as plain:
            port = free_port()
            routes = [
                {
                    "name": "pass",
                    "match": {"ports": port, "domains": "pass.example.test"},
                    "action": {
                        "type": "forward",
                        "targets": [{"host": LOOPBACK, "port": tls_port}],
                        "tls": {"mode": "passthrough"},
                    },
                },
                tls_route(
                    port,
                    plain.port,
                    name="term",
                    cert=certificate(ca.issue("term.example.test")),
                    domains="term.example.test",
                ),
            ]
            async with proxy(routes) as router:
                # Passthrough: the client talks TLS with the backend itself (its certificate).
                reader, writer = await asyncio.open_connection(
                    LOOPBACK, port, ssl=ca.client_context(), server_hostname="pass.example.test"
                )
                peer = writer.get_extra_info("peercert")
                assert dict(x[0] for x in peer["subject"])["commonName"] == "pass.example.test"
                assert await asyncio.wait_for(reader.readline(), 10) == b"tls-backend\n"
                writer.write(b"through the pipe\n")
                assert await asyncio.wait_for(reader.readline(), 10) == b"through the pipe\n"
                writer.close()
                with contextlib.suppress(ConnectionError, ssl.SSLError):
                    await asyncio.wait_for(writer.wait_closed(), 5)
                # Terminate: the proxy's certificate, then plain HTTP to the backend.
                code, out, err = await curl(
                    "-v", "--resolve", f"term.example.test:{port}:{LOOPBACK}", "--cacert", str(cafile),
                    f"https://term.example.test:{port}/t",
                )  # fmt: skip
                assert code == 0, err
                assert "CN=term.example.test" in err.replace(" = ", "="), err
                info = json.loads(out)
                assert (
                    info["backend"] == "plain" and header_map(info)["x-forwarded-proto"] == "https"
                )
                await wait_idle(router)
                routes_stats = router.stats()["routes"]
                assert routes_stats["pass"]["total"] == 1 and routes_stats["term"]["total"] == 1


# -- 5. terminate-and-reencrypt ----------------------------------------------------------------


@async_test(60)
async def test_reencrypt_verifies_the_backend_with_backend_ca_by_default_or_not_at_all(
    ca: TestCA, tmp_path: Path, lane_only: list[int]
) -> None:
    cafile = ca_file(ca, tmp_path)
    cert = certificate(ca.issue("*.example.test"))
    names = ("with-ca.example.test", "default.example.test", "no-verify.example.test")
    async with https_backend(ca, tmp_path, *names) as (backend, received):
        port = free_port()
        reencrypt = "terminate-and-reencrypt"
        routes = [
            tls_route(
                port,
                backend,
                name="ca",
                cert=cert,
                mode=reencrypt,
                tls={"backend_ca": str(cafile)},
                domains=names[0],
            ),
            tls_route(port, backend, name="default", cert=cert, mode=reencrypt, domains=names[1]),
            tls_route(
                port,
                backend,
                name="off",
                cert=cert,
                mode=reencrypt,
                tls={"backend_verify": False},
                domains=names[2],
            ),
        ]
        async with proxy(routes, connect_timeout=5):
            results = {}
            for name in names:
                code, out, err = await curl(
                    "--resolve", f"{name}:{port}:{LOOPBACK}", "--cacert", str(cafile),
                    "-w", "\n%{http_code}", f"https://{name}:{port}/secure?q=1",
                )  # fmt: skip
                assert code == 0, err
                text, _, code_text = out.rpartition("\n")
                results[name] = (int(code_text), text)
    status, body = results["with-ca.example.test"]
    assert status == 200, body
    info = json.loads(body)
    assert info["path"] == "/secure?q=1"
    assert info["headers"]["x-forwarded-proto"] == "https"
    status, body = results["default.example.test"]
    assert status == 502, body  # the test CA is not in the system store
    assert "certificate verify failed" in body, body
    status, body = results["no-verify.example.test"]
    assert status == 200, body
    assert json.loads(body)["path"] == "/secure?q=1"
    # The client's SNI is passed on to the backend (and verified there when verifying).
    assert received == list(names)
    assert lane_only == []  # both TLS legs ran on the fast lane


@async_test(60)
async def test_reencrypted_backend_connections_are_kept_for_the_next_request(
    ca: TestCA, tmp_path: Path, lane_only: list[int]
) -> None:
    cafile = ca_file(ca, tmp_path)
    cert = certificate(ca.issue("keep.example.test"))
    async with https_backend(ca, tmp_path, "keep.example.test") as (backend, received):
        port = free_port()
        route = tls_route(
            port,
            backend,
            name="keep",
            cert=cert,
            mode="terminate-and-reencrypt",
            tls={"backend_ca": str(cafile)},
            domains="keep.example.test",
        )
        async with proxy([route]):
            base = f"https://keep.example.test:{port}"
            urls = [f"{base}/n{i}" for i in range(5)]
            code, out, err = await curl(
                "-s", "--resolve", f"keep.example.test:{port}:{LOOPBACK}", "--cacert", str(cafile),
                "-w", "\n%{http_code}\n", *urls,
            )  # fmt: skip
            assert code == 0, err
            # A second client: the backend connection the first one left is pooled, not redone.
            code, out2, err = await curl(
                "-s", "--resolve", f"keep.example.test:{port}:{LOOPBACK}", "--cacert", str(cafile),
                "-w", "\n%{http_code}\n", f"{base}/again",
            )  # fmt: skip
            assert code == 0, err
    statuses = [line for line in (out + out2).splitlines() if line in ("200", "502")]
    assert statuses == ["200"] * 6, out + out2
    assert received == ["keep.example.test"]  # one backend handshake for six requests
    assert lane_only == []


# -- 6. a socket handler behind terminate ------------------------------------------------------


@async_test(60)
async def test_socket_handler_gets_the_decrypted_stream(ca: TestCA) -> None:
    seen: list[RouteContext] = []

    async def shout(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: RouteContext
    ) -> None:
        seen.append(ctx)
        line = await reader.readline()
        writer.write(line.upper())
        await writer.drain()
        writer.close()

    port = free_port()
    route = {
        "name": "shout",
        "match": {"ports": port, "domains": "shout.example.test"},
        "action": {
            "type": "socket-handler",
            "socket_handler": shout,
            "tls": {
                "mode": "terminate",
                "certificate": certificate(ca.issue("shout.example.test")),
            },
        },
    }
    async with proxy([route]) as router:
        reader, writer = await asyncio.open_connection(
            LOOPBACK, port, ssl=ca.client_context(), server_hostname="shout.example.test"
        )
        writer.write(b"hello over tls\n")
        assert await asyncio.wait_for(reader.readline(), 10) == b"HELLO OVER TLS\n"
        assert await asyncio.wait_for(reader.read(), 10) == b""  # the handler closed
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await asyncio.wait_for(writer.wait_closed(), 5)
        await wait_idle(router)
    [ctx] = seen
    assert ctx.is_tls is True
    assert ctx.domain == "shout.example.test"
    assert ctx.tls_version in ("TLSv1.2", "TLSv1.3")
    assert ctx.route_name == "shout" and ctx.port == port


# -- 7. certificates from files ----------------------------------------------------------------


@async_test(60)
async def test_certificate_and_key_given_as_file_paths(ca: TestCA, tmp_path: Path) -> None:
    cafile = ca_file(ca, tmp_path)
    cert_path, key_path = ca.issue("files.example.test").write(tmp_path, "files")
    with http_backend("files") as backend:
        port = free_port()
        cert = {"cert": str(cert_path), "key": str(key_path)}
        async with proxy(
            [tls_route(port, backend.port, name="files", cert=cert, domains="files.example.test")]
        ):
            code, out, err = await curl(
                "-v", "--resolve", f"files.example.test:{port}:{LOOPBACK}", "--cacert", str(cafile),
                f"https://files.example.test:{port}/from-files",
            )  # fmt: skip
    assert code == 0, err
    assert "CN=files.example.test" in err.replace(" = ", "="), err
    info = json.loads(out)
    assert (info["backend"], info["path"]) == ("files", "/from-files")


# -- 8. a failed handshake leaves nothing behind -----------------------------------------------


@async_test(60)
async def test_a_failed_handshake_is_cleaned_up_and_the_proxy_keeps_serving(
    ca: TestCA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "smartroute.access")
    cafile = ca_file(ca, tmp_path)
    cert = certificate(ca.issue("keep.example.test"))
    with http_backend("keep") as backend:
        port = free_port()
        async with proxy(
            [tls_route(port, backend.port, name="keep", cert=cert, domains="keep.example.test")]
        ) as router:
            for _ in range(3):
                code, text = await s_client(
                    port,
                    "-tls1_1",
                    "-cipher",
                    "DEFAULT:@SECLEVEL=0",
                    "-servername",
                    "keep.example.test",
                )
                assert code != 0 and "Cipher is (NONE)" in text, text
            await wait_idle(router)
            stats = router.stats()
            assert stats["connections"]["active"] == 0 and stats["connections"]["total"] == 3
            failures = [
                r.getMessage() for r in caplog.records if " tls-handshake " in r.getMessage()
            ]
            assert len(failures) == 3, caplog.text
            assert all("unsupported protocol" in line for line in failures), failures
            code, out, err = await curl(
                "--resolve", f"keep.example.test:{port}:{LOOPBACK}", "--cacert", str(cafile),
                f"https://keep.example.test:{port}/still-here",
            )  # fmt: skip
            assert code == 0, err
            assert json.loads(out)["path"] == "/still-here"
            await wait_idle(router)
            assert router.stats()["connections"]["total"] == 4


@async_test()
async def test_a_terminate_route_without_domains_takes_every_tls_client(
    ca: TestCA, tmp_path: Path
) -> None:
    pair = ca.issue("any.example.test")
    with http_backend("plain") as backend:
        port = free_port()
        route = tls_route(port, backend.port, name="any", cert=certificate(pair))
        async with proxy([route]):
            code, out, err = await curl(
                "--cacert", str(ca_file(ca, tmp_path)),
                "--resolve", f"any.example.test:{port}:127.0.0.1", f"https://any.example.test:{port}/x",
            )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["backend"] == "plain"
