"""Client certificates (mTLS), seen from outside: real ``openssl s_client -cert`` and
``curl --cert`` runs against a real SmartRoute on loopback.

The proxy terminates TLS for ``site.test`` with a certificate from the session's test CA and
asks clients for one signed by a CA of their own (``clients``); ``intruders`` is a third CA,
whose certificates must be refused. Every refusal must be a TLS alert the client reads, on
TLS 1.2 and 1.3, on the fast lane (plain HTTP forwards to IP literals) and on the transport
path (socket handlers, hooks, raw forwards). Towards TLS targets the proxy presents
``backend_client_certificate``, to a backend (a Python ``ssl`` server in a thread) that
demands one, and may send a PROXY header before re-encrypting.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import ipaddress
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from http_backend import http_backend
from support import (
    LOOPBACK,
    MIB,
    CertPair,
    Finished,
    TestCA,
    async_test,
    curl,
    free_port,
    require_tool,
    serve,
)

from smartroute import RouteContext, SmartRoute
from smartroute.protocols.proxy_protocol import ProxyHeader, parse_proxy_header
from smartroute.protocols.tls import parse_client_hello
from smartroute.routing.model import CertificatePair, HealthCheck, TlsSettings
from smartroute.server.backends.health import HealthChecker
from smartroute.server.backends.state import TargetState
from smartroute.server.http.lane_tls import LaneTls
from smartroute.server.tls import CertificateIndex

SITE = "site.test"
GET = b"GET /who HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n"

# -- certificates ------------------------------------------------------------------------------


def named_ca(name: str) -> TestCA:
    """A test CA whose subject is ``name`` (TestCA's is fixed), so that OpenSSL cannot mistake
    one CA for another: a certificate it did not sign is an ``unknown_ca``."""
    ca = TestCA()
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    ca.key, ca.name = key, subject
    ca.cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    ca.pem = ca.cert.public_bytes(serialization.Encoding.PEM).decode()
    return ca


def client_certificate(ca: TestCA, name: str, *, email: str, uri: str, ip: str) -> CertPair:
    """A client certificate with a subject of two attributes and four kinds of SAN."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName(name),
            x509.RFC822Name(email),
            x509.UniformResourceIdentifier(uri),
            x509.IPAddress(ipaddress.ip_address(ip)),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example, Inc."),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .issuer_name(ca.name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(san, critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return CertPair(
        cert.public_bytes(serialization.Encoding.PEM).decode(),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
    )


class Files:
    """The PEM files the external clients read."""

    def __init__(self, folder: Path, ca: TestCA, clients: TestCA, intruders: TestCA) -> None:
        self.ca = folder / "ca.pem"
        self.ca.write_text(ca.pem)
        self.alice = client_certificate(
            clients,
            "alice.example.test",
            email="alice@example.test",
            uri="spiffe://example.test/alice",
            ip="10.1.2.3",
        )
        self.good = self.alice.write(folder, "alice")
        self.bad = intruders.issue("mallory.example.test").write(folder, "mallory")
        self.folder = folder


@pytest.fixture(scope="module")
def clients() -> TestCA:
    return named_ca("smartroute client CA")


@pytest.fixture(scope="module")
def intruders() -> TestCA:
    return named_ca("intruder CA")


@pytest.fixture(scope="module")
def site(ca: TestCA) -> CertPair:
    return ca.issue(SITE)


@pytest.fixture
def files(tmp_path: Path, ca: TestCA, clients: TestCA, intruders: TestCA) -> Files:
    return Files(tmp_path, ca, clients, intruders)


async def expected_fields(pem_file: Path) -> dict[str, Any]:
    """``client_cert`` as it must be for the certificate in ``pem_file``: serial and
    fingerprint as ``openssl x509`` reads them, names as written."""
    proc = await asyncio.create_subprocess_exec(
        require_tool("openssl"), "x509", "-in", str(pem_file), "-noout", "-serial",
        "-fingerprint", "-sha256",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    text = out.decode()
    serial = re.search(r"serial=([0-9A-F]+)", text)
    fingerprint = re.search(r"Fingerprint=([0-9A-F:]+)", text)
    assert serial and fingerprint, text
    return {
        "subject": "CN=alice.example.test,O=Example\\, Inc.",
        "issuer": "CN=smartroute client CA",
        "san": [
            "alice.example.test",
            "10.1.2.3",
            "alice@example.test",
            "spiffe://example.test/alice",
        ],
        "serial": int(serial.group(1), 16),
        "fingerprint_sha256": fingerprint.group(1).replace(":", "").lower(),
    }


# -- the proxy ---------------------------------------------------------------------------------


def terminate(site: CertPair, clients: TestCA, auth: str | None = None) -> dict[str, Any]:
    tls: dict[str, Any] = {
        "mode": "terminate",
        "certificate": {"cert": site.cert_pem, "key": site.key_pem},
        "client_ca": clients.pem,
    }
    if auth is not None:
        tls["client_auth"] = auth
    return tls


def proxy(routes: list[dict[str, Any]], **settings: Any) -> SmartRoute:
    settings.setdefault("bind_address", LOOPBACK)
    settings.setdefault("initial_data_timeout", 5)
    settings.setdefault("graceful_shutdown_timeout", 1)
    return SmartRoute(routes, **settings)


def handler_route(port: int, tls: dict[str, Any], seen: list[RouteContext]) -> dict[str, Any]:
    """A socket handler behind ``tls`` that answers with the ``client_cert`` it was given."""

    async def who(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: RouteContext
    ) -> None:
        seen.append(ctx)
        writer.write(b"client_cert=" + json.dumps(ctx.client_cert).encode() + b"\n")
        await writer.drain()
        writer.close()

    return {
        "name": "who",
        "match": {"ports": port, "domains": SITE},
        "action": {"type": "socket-handler", "socket_handler": who, "tls": tls},
    }


def lane_route(port: int, backend: int, tls: dict[str, Any]) -> dict[str, Any]:
    """Plain HTTP to an IP literal behind ``tls``: the fast lane terminates it."""
    return {
        "name": "lane",
        "match": {"ports": port, "domains": SITE},
        "action": {
            "type": "forward",
            "protocol": "http",
            "targets": [{"host": LOOPBACK, "port": backend}],
            "tls": tls,
        },
    }


def beside_an_open_route(
    path: str,
    port: int,
    secret: int,
    public: int,
    site_tls: dict[str, Any],
    open_tls: dict[str, Any],
) -> list[dict[str, Any]]:
    """The mTLS route of SITE (to ``secret``) and a route "open" for open.test (to
    ``public``) on one port. On the "transport" path the open route's target is a host name,
    which takes the port's TLS off the fast lane."""
    host = LOOPBACK if path == "lane" else "localhost"
    return [
        lane_route(port, secret, site_tls),
        {
            "name": "open",
            "match": {"ports": port, "domains": "open.test"},
            "action": {
                "type": "forward",
                "protocol": "http",
                "targets": [{"host": host, "port": public}],
                "tls": open_tls,
            },
        },
    ]


# -- the clients -------------------------------------------------------------------------------


async def s_client(port: int, *args: str, send: bytes = b"") -> str:
    """``openssl s_client`` against the proxy: sends ``send``, prints until the proxy closes
    (``-ign_eof``: the end of stdin does not end the session)."""
    proc = await asyncio.create_subprocess_exec(
        require_tool("openssl"), "s_client", "-connect", f"{LOOPBACK}:{port}", "-ign_eof",
        "-servername", SITE, *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(send), 20)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    return out.decode(errors="replace")


def cert_args(pair: tuple[Path, Path] | None) -> list[str]:
    return [] if pair is None else ["-cert", str(pair[0]), "-key", str(pair[1])]


VERSIONS = (("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3"))
# What OpenSSL's client prints for the alert of each refusal.
NO_CERTIFICATE = {"-tls1_2": "alert handshake failure", "-tls1_3": "alert certificate required"}
UNKNOWN_CA = "alert unknown ca"


def alert_of(text: str) -> str | None:
    found = re.search(r"(?:sslv3|tlsv1|tlsv13) (alert [a-z ]+?):", text)
    return found.group(1) if found else None


async def assert_refused(port: int, flag: str, pair: tuple[Path, Path] | None, alert: str) -> None:
    text = await s_client(port, flag, *cert_args(pair), send=GET)
    assert alert_of(text) == alert, text
    assert "client_cert=" not in text and "HTTP/1.1 200" not in text, text


async def curl_site(port: int, files: Files, *args: str) -> tuple[int, str, str]:
    return await curl(
        "--cacert", str(files.ca), "--resolve", f"{SITE}:{port}:{LOOPBACK}", *args,
        f"https://{SITE}:{port}/who",
    )  # fmt: skip


def curl_cert(pair: tuple[Path, Path]) -> list[str]:
    return ["--cert", str(pair[0]), "--key", str(pair[1])]


# -- 1. required: the transport path (a socket handler) ----------------------------------------


@async_test(90)
async def test_required_on_the_transport_path_alerts_refusals_and_gives_handlers_the_cert(
    site: CertPair, clients: TestCA, files: Files, finished: Finished
) -> None:
    port = free_port()
    seen: list[RouteContext] = []
    expected = await expected_fields(files.good[0])
    async with proxy([handler_route(port, terminate(site, clients), seen)]):
        for flag, version in VERSIONS:
            await assert_refused(port, flag, None, NO_CERTIFICATE[flag])
            record = await finished.next()
            assert record.outcome == "tls-handshake", record.error
            assert "peer did not return a certificate" in (record.error or "")
            await assert_refused(port, flag, files.bad, UNKNOWN_CA)
            record = await finished.next()
            assert record.outcome == "tls-handshake"
            assert "certificate verify failed" in (record.error or ""), record.error
            text = await s_client(port, flag, *cert_args(files.good))
            answer = re.search(r"client_cert=(.*)", text)
            assert answer is not None, text
            assert json.loads(answer.group(1)) == expected
            assert seen[-1].client_cert == expected and seen[-1].tls_version == version
            assert (await finished.next()).error is None
    assert len(seen) == 2  # refused clients never reached the handler


@async_test(60)
async def test_a_client_that_stalls_in_the_handshake_is_closed_in_time(
    site: CertPair, clients: TestCA, ca: TestCA, finished: Finished
) -> None:
    """The transport path's own TLS layer bounds the handshake as the loop's does."""
    port = free_port()
    seen: list[RouteContext] = []
    async with proxy(
        [handler_route(port, terminate(site, clients), seen)], initial_data_timeout=0.5
    ):
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        hello = ssl.MemoryBIO()
        tls = ca.client_context().wrap_bio(ssl.MemoryBIO(), hello, server_hostname=SITE)
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()
        writer.write(hello.read())  # the ClientHello, and then nothing
        started = time.monotonic()
        with contextlib.suppress(ConnectionError):
            while await asyncio.wait_for(reader.read(65536), 5):
                pass  # the server's flight, then the end
        assert time.monotonic() - started < 3
        writer.close()
        record = await finished.next()
        assert record.outcome == "tls-handshake" and "timed out" in (record.error or "")
    assert seen == []


# -- 2. optional ------------------------------------------------------------------------------


@async_test(90)
async def test_optional_serves_clients_without_a_certificate_but_never_a_bad_one(
    site: CertPair, clients: TestCA, files: Files
) -> None:
    port = free_port()
    seen: list[RouteContext] = []
    expected = await expected_fields(files.good[0])
    async with proxy([handler_route(port, terminate(site, clients, "optional"), seen)]):
        for flag, _ in VERSIONS:
            text = await s_client(port, flag)
            assert "client_cert=null" in text, text
            assert seen[-1].client_cert is None and seen[-1].is_tls
            # A certificate that does not verify is refused, never taken as no certificate.
            await assert_refused(port, flag, files.bad, UNKNOWN_CA)
            text = await s_client(port, flag, *cert_args(files.good))
            answer = re.search(r"client_cert=(.*)", text)
            assert answer is not None and json.loads(answer.group(1)) == expected, text
    assert len(seen) == 4


# -- 3. the fast lane ---------------------------------------------------------------------------


@async_test(90)
async def test_required_on_the_fast_lane_with_openssl_and_curl(
    site: CertPair, clients: TestCA, files: Files, lane_only: list[int]
) -> None:
    port = free_port()
    with http_backend("lane") as backend:
        async with proxy([lane_route(port, backend.port, terminate(site, clients))]):
            for flag, _ in VERSIONS:
                await assert_refused(port, flag, None, NO_CERTIFICATE[flag])
                await assert_refused(port, flag, files.bad, UNKNOWN_CA)
                text = await s_client(port, flag, *cert_args(files.good), send=GET)
                assert "HTTP/1.1 200" in text and '"backend": "lane"' in text, text
            for versions in (["--tls-max", "1.2"], ["--tlsv1.3"]):
                code, out, _ = await curl_site(port, files, *versions, *curl_cert(files.good))
                assert code == 0 and '"backend": "lane"' in out
                code, _, err = await curl_site(port, files, *versions)
                assert code != 0 and re.search(
                    r"alert (handshake failure|certificate required)", err
                ), err
                code, _, err = await curl_site(port, files, *versions, *curl_cert(files.bad))
                assert code != 0 and "alert unknown ca" in err, err
    assert lane_only == [], "handed to an asyncio transport, not kept on the fast lane"


@async_test(60)
async def test_optional_on_the_fast_lane(
    site: CertPair, clients: TestCA, files: Files, lane_only: list[int]
) -> None:
    port = free_port()
    with http_backend("lane") as backend:
        async with proxy([lane_route(port, backend.port, terminate(site, clients, "optional"))]):
            for versions in (["--tls-max", "1.2"], ["--tlsv1.3"]):
                code, out, _ = await curl_site(port, files, *versions)
                assert code == 0 and '"backend": "lane"' in out
                code, out, _ = await curl_site(port, files, *versions, *curl_cert(files.good))
                assert code == 0 and '"backend": "lane"' in out
                code, _, err = await curl_site(port, files, *versions, *curl_cert(files.bad))
                assert code != 0 and "alert unknown ca" in err, err
    assert lane_only == []


def test_the_lane_tls_session_carries_the_verified_certificate(
    site: CertPair, clients: TestCA, files: Files
) -> None:
    """What the lane's handshake settled (its TlsInfo) holds ``client_cert``, as the
    transport path's does."""
    index = CertificateIndex()
    pair = CertificatePair(site.cert_pem, site.key_pem)
    server = index.server_context(pair, alpn=("http/1.1",), client_ca=clients.pem)
    assert server is index.server_context(pair, alpn=("http/1.1",), client_ca=clients.pem)
    assert server is not index.server_context(pair, alpn=("http/1.1",))
    client = ssl.create_default_context(cafile=str(files.ca))
    client.load_cert_chain(*files.good)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client.wrap_bio(incoming, outgoing, server_hostname=SITE)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    parsed = parse_client_hello(hello)
    assert parsed is not None
    lane = LaneTls(server, parsed)
    data = hello
    for _ in range(10):  # the flights go back and forth in memory
        lane.feed(data)
        incoming.write(lane.pending())
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()
        data = outgoing.read()
        if lane.ready:
            break
    assert lane.ready
    info = lane.info()
    assert info.client_cert is not None
    assert info.client_cert["subject"] == "CN=alice.example.test,O=Example\\, Inc."
    der = x509.load_pem_x509_certificate(files.alice.cert_pem.encode()).public_bytes(
        serialization.Encoding.DER
    )
    assert info.client_cert["fingerprint_sha256"] == hashlib.sha256(der).hexdigest()


# -- 4. HTTP on the transport path: hooks and target callables see client_cert ----------------


@async_test(90)
async def test_http_hooks_and_target_callables_see_the_client_certificate(
    site: CertPair, clients: TestCA, files: Files, lane_only: list[int]
) -> None:
    port = free_port()
    expected = await expected_fields(files.good[0])
    requests: list[Any] = []
    ended: list[Any] = []
    picked: list[Any] = []

    class Recorder:
        async def on_request(self, ctx: RouteContext, request: Any) -> None:
            requests.append(ctx.client_cert)

        async def on_disconnect(self, ctx: RouteContext, info: Any) -> None:
            ended.append(ctx.client_cert)

    def pick(ctx: RouteContext) -> str:
        picked.append(ctx.client_cert)
        return LOOPBACK

    with http_backend("hooked") as backend:
        route = lane_route(port, backend.port, terminate(site, clients, "optional"))
        route["hooks"] = [Recorder()]
        route["action"]["targets"] = [{"host": pick, "port": backend.port}]
        async with proxy([route]):
            code, out, _ = await curl_site(port, files, *curl_cert(files.good))
            assert code == 0 and '"backend": "hooked"' in out
            code, out, _ = await curl_site(port, files, "--tls-max", "1.2")
            assert code == 0 and '"backend": "hooked"' in out
            code, _, err = await curl_site(port, files, *curl_cert(files.bad))
            assert code != 0 and "alert unknown ca" in err, err
            for _ in range(200):
                if len(ended) == 3:
                    break
                await asyncio.sleep(0.01)
    assert requests == picked == [expected, None]
    # on_disconnect hears of the refused connection too, which has no certificate to show.
    assert sorted(ended, key=lambda cert: cert is None) == [expected, None, None]
    assert lane_only == [port] * 3  # hooks and callables: the transport path


# -- 5. bytes both ways through the transport path's TLS layer --------------------------------


@async_test(60)
async def test_a_raw_forward_behind_mtls_carries_megabytes_both_ways(
    site: CertPair, clients: TestCA, files: Files, ca: TestCA
) -> None:
    """Backpressure through the transport path's own TLS layer: the relay pauses and resumes
    it, and every byte arrives, in order."""
    port = free_port()
    payload = bytes(range(256)) * (4 * MIB // 256)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async with serve(echo) as backend:
        route = lane_route(port, backend, terminate(site, clients))
        route["action"]["protocol"] = "tcp"
        async with proxy([route]):
            context = ca.client_context()
            context.load_cert_chain(*files.good)
            reader, writer = await asyncio.open_connection(
                LOOPBACK, port, ssl=context, server_hostname=SITE
            )

            async def upload() -> None:
                for i in range(0, len(payload), 256 * 1024):
                    writer.write(payload[i : i + 256 * 1024])
                    await writer.drain()

            sender = asyncio.create_task(upload())
            received = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
            await sender
            assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()


# -- 6. towards TLS targets: the proxy's client certificate, a PROXY header first ---------------


class TlsBackend:
    """A TLS backend in a thread (blocking sockets), independent of the proxy's code paths:
    with ``proxy`` it reads a PROXY header off the socket before its handshake; with
    ``client_ca`` it demands a client certificate. Every HTTP request is answered with what
    the connection showed, as JSON; connections it refused are in ``refused``."""

    def __init__(
        self, pair: CertPair, folder: Path, *, client_ca: str | None = None, proxy: bool = False
    ) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(*pair.write(folder, "backend"))
        if client_ca is not None:
            self.context.verify_mode = ssl.CERT_REQUIRED
            self.context.load_verify_locations(cadata=client_ca)
        self.context.sni_callback = self._named
        self.proxy = proxy
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port: int = self.listener.getsockname()[1]
        self.seen: list[dict[str, Any]] = []
        self.refused: list[str] = []
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    @staticmethod
    def _named(sock: Any, name: str | None, context: ssl.SSLContext) -> None:
        sock.sni = name

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _header(self, conn: socket.socket) -> ProxyHeader:
        while True:
            data = conn.recv(600, socket.MSG_PEEK)
            if not data:
                raise ConnectionError("closed before a PROXY header")
            header = parse_proxy_header(data)
            if header is not None:
                conn.recv(header.length, socket.MSG_WAITALL)  # only the header: TLS follows
                return header
            time.sleep(0.01)  # a header in pieces: wait for the rest

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            header = self._header(conn) if self.proxy else None
            try:
                tls = self.context.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                self.refused.append(str(exc))
                return
            with tls:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = tls.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                der = tls.getpeercert(binary_form=True)
                names = (
                    []
                    if der is None
                    else [
                        str(a.value)
                        for a in x509.load_der_x509_certificate(der).subject
                        if a.oid == NameOID.COMMON_NAME
                    ]
                )
                host = re.search(rb"\r\nhost: ([^\r]*)", head, re.I)
                seen = {
                    "client_cn": names[0] if names else None,
                    "sni": getattr(tls, "sni", None),
                    "proxy": None if header is None else list(header.source or ()),
                    "proxy_version": None if header is None else header.version,
                    "host": host.group(1).decode() if host else None,
                }
                self.seen.append(seen)
                body = json.dumps(seen).encode()
                tls.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.listener.close()
        for thread in self._threads:
            thread.join(5)


@contextlib.contextmanager
def tls_backend(
    pair: CertPair, folder: Path, *, client_ca: str | None = None, proxy: bool = False
) -> Iterator[TlsBackend]:
    backend = TlsBackend(pair, folder, client_ca=client_ca, proxy=proxy)
    try:
        yield backend
    finally:
        backend.close()


def reencrypt_route(
    port: int,
    target: dict[str, Any],
    site: CertPair,
    ca: TestCA,
    *,
    protocol: str = "http",
    edge: CertPair | None = None,
) -> dict[str, Any]:
    tls: dict[str, Any] = {
        "mode": "terminate-and-reencrypt",
        "certificate": {"cert": site.cert_pem, "key": site.key_pem},
        "backend_ca": ca.pem,
        "backend_server_name": "backend.test",
    }
    if edge is not None:
        tls["backend_client_certificate"] = {"cert": edge.cert_pem, "key": edge.key_pem}
    return {
        "name": f"reencrypt-{protocol}-{port}",
        "match": {"ports": port, "domains": SITE},
        "action": {"type": "forward", "protocol": protocol, "targets": [target], "tls": tls},
    }


async def ask(port: int, ca: TestCA) -> tuple[bytes, tuple[str, int]]:
    """One HTTPS request to the proxy (as plain bytes: the raw forward carries them too);
    the response and the client's own address."""
    reader, writer = await asyncio.open_connection(
        LOOPBACK, port, ssl=ca.client_context(), server_hostname=SITE
    )
    mine = writer.get_extra_info("sockname")
    writer.write(GET)
    try:
        data = await asyncio.wait_for(reader.read(), 10)
    except (ConnectionError, ssl.SSLError):
        data = b""
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()
    return data, (mine[0], mine[1])


def body_of(response: bytes) -> dict[str, Any]:
    assert response.startswith(b"HTTP/1.1 200"), response
    result: dict[str, Any] = json.loads(response.split(b"\r\n\r\n", 1)[1])
    return result


@pytest.mark.parametrize(
    ("protocol", "host"),
    [("tcp", LOOPBACK), ("http", LOOPBACK), ("http", "localhost")],
    ids=["raw-forward", "http-on-the-lane", "http-on-the-transport-path"],
)
@async_test(60)
async def test_the_backend_client_certificate_is_presented_to_an_mtls_backend(
    protocol: str,
    host: str,
    ca: TestCA,
    site: CertPair,
    clients: TestCA,
    tmp_path: Path,
    lane_only: list[int],
) -> None:
    edge = clients.issue("edge.example.test")
    port, plain_port = free_ports_pair()
    with tls_backend(ca.issue("backend.test"), tmp_path, client_ca=clients.pem) as backend:
        target = {"host": host, "port": backend.port}
        routes = [
            reencrypt_route(port, target, site, ca, protocol=protocol, edge=edge),
            reencrypt_route(plain_port, target, site, ca, protocol=protocol),
        ]
        async with proxy(routes):
            response, _ = await ask(port, ca)
            assert body_of(response)["client_cn"] == "edge.example.test"
            assert body_of(response)["sni"] == "backend.test"
            # Without one the backend refuses the proxy, whatever TLS version: no answer.
            refused = len(backend.refused)
            response, _ = await ask(plain_port, ca)
            assert not response.startswith(b"HTTP/1.1 200"), response
            if protocol == "http":
                assert response.startswith(b"HTTP/1.1 502"), response
            for _ in range(100):
                if len(backend.refused) > refused:
                    break
                await asyncio.sleep(0.02)
            assert "certificate" in backend.refused[-1].lower(), backend.refused
    on_the_lane = protocol == "http" and host == LOOPBACK
    assert (lane_only == []) is on_the_lane, lane_only


def free_ports_pair() -> tuple[int, int]:
    first = free_port()
    while (second := free_port()) == first:
        pass
    return first, second


@async_test(60)
async def test_health_checks_of_a_reencrypting_route_present_the_client_certificate(
    ca: TestCA, clients: TestCA, tmp_path: Path
) -> None:
    edge = clients.issue("edge.example.test")
    with tls_backend(ca.issue("backend.test"), tmp_path, client_ca=clients.pem) as backend:
        state = TargetState(LOOPBACK, backend.port)
        spec = HealthCheck(type="http", path="/health", host="backend.test", timeout=3, interval=3)
        with_cert = TlsSettings(
            "terminate-and-reencrypt",
            backend_ca=ca.pem,
            backend_client_certificate=CertificatePair(edge.cert_pem, edge.key_pem),
        )
        assert await HealthChecker(state, spec, initially_up=True, tls=with_cert).probe() is None
        assert backend.seen[-1]["client_cn"] == "edge.example.test"
        without = TlsSettings("terminate-and-reencrypt", backend_ca=ca.pem)
        why = await HealthChecker(state, spec, initially_up=True, tls=without).probe()
        assert why is not None and why.startswith("health check: "), why


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("protocol", ["tcp", "http"])
@async_test(60)
async def test_a_proxy_header_precedes_the_reencrypted_hop(
    version: str, protocol: str, ca: TestCA, site: CertPair, clients: TestCA, tmp_path: Path
) -> None:
    """The header goes first, then the ClientHello: a backend that reads the header off the
    socket before its handshake learns the client's address, for every client."""
    edge = clients.issue("edge.example.test")
    port = free_port()
    with tls_backend(
        ca.issue("backend.test"), tmp_path, client_ca=clients.pem, proxy=True
    ) as backend:
        target = {"host": LOOPBACK, "port": backend.port, "send_proxy_protocol": version}
        route = reencrypt_route(port, target, site, ca, protocol=protocol, edge=edge)
        async with proxy([route]):
            for _ in range(2):  # a second client gets a connection (and a header) of its own
                response, mine = await ask(port, ca)
                seen = body_of(response)
                assert seen["proxy"] == [mine[0], mine[1]], (seen, mine)
                assert seen["proxy_version"] == int(version[1])
                assert seen["client_cn"] == "edge.example.test" and seen["sni"] == "backend.test"
                assert seen["host"] == SITE
    assert len(backend.seen) == 2 and backend.refused == []


# -- 7. the transport path's TLS layer as a transport ------------------------------------------


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.changed = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.changed.set()

    def eof_received(self) -> bool:
        self.eof = True
        self.changed.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)

    async def wait_for(self, size: int) -> bytes:
        async with asyncio.timeout(5):
            while len(self.data) < size:
                self.changed.clear()
                await self.changed.wait()
        return bytes(self.data)


class Hello(asyncio.Protocol):
    """Holds a connection's first bytes until they are a whole ClientHello."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.hello: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        parsed = parse_client_hello(self.buffer)
        if parsed is not None and not self.hello.done():
            self.hello.set_result(parsed)


@async_test(30)
async def test_the_transport_paths_tls_layer_behaves_as_a_transport(
    site: CertPair, clients: TestCA, files: Files, ca: TestCA
) -> None:
    from smartroute.server.tls_transport import accept_tls_in_memory

    loop = asyncio.get_running_loop()
    index = CertificateIndex()
    pair = CertificatePair(site.cert_pem, site.key_pem)
    context = index.server_context(pair, client_ca=clients.pem, client_auth="optional")
    ours, theirs = socket.socketpair()
    raw, first = await loop.connect_accepted_socket(Hello, ours)
    client = ca.client_context()
    client.load_cert_chain(*files.good)
    opening = asyncio.create_task(
        asyncio.open_connection(sock=theirs, ssl=client, server_hostname=SITE)
    )
    hello = await asyncio.wait_for(first.hello, 5)
    raw.pause_reading()
    app = Recorder()
    secure = await accept_tls_in_memory(
        raw, app, context, hello, bytes(first.buffer), handshake_timeout=5
    )
    reader, writer = await opening
    try:
        assert secure.get_protocol() is app and secure.is_reading()
        assert secure.get_extra_info("sslcontext") is context
        assert secure.get_extra_info("peercert")["subject"][-1] == (
            ("commonName", "alice.example.test"),
        )
        assert secure.get_extra_info("cipher") is not None
        assert secure.get_extra_info("compression") is None
        assert secure.get_extra_info("socket") is raw.get_extra_info("socket")
        assert not secure.can_write_eof()
        with pytest.raises(NotImplementedError):
            secure.write_eof()
        secure.set_write_buffer_limits(high=1024)
        assert secure.get_write_buffer_limits()[1] == 1024
        # Both ways, in order; reading paused and resumed in between.
        secure.writelines([b"hel", b"lo\n"])
        assert await asyncio.wait_for(reader.readline(), 5) == b"hello\n"
        secure.pause_reading()
        assert not secure.is_reading()
        writer.write(b"ping\n")
        await writer.drain()
        secure.resume_reading()
        assert await app.wait_for(5) == b"ping\n"
        assert secure.get_write_buffer_size() == 0
        # close(): close_notify, then the end; writes after it go nowhere.
        secure.close()
        secure.write(b"too late\n")
        assert secure.is_closing()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert await asyncio.wait_for(app.lost, 5) is None
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


@async_test(30)
async def test_a_handler_behind_mtls_sees_the_clients_close_notify_as_its_end(
    site: CertPair, clients: TestCA, files: Files, ca: TestCA, finished: Finished
) -> None:
    port = free_port()

    async def echo(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: RouteContext
    ) -> None:
        while data := await reader.read(100):
            writer.write(data)
        writer.write(b"bye\n")
        writer.close()

    route = {
        "name": "echo",
        "match": {"ports": port, "domains": SITE},
        "action": {
            "type": "socket-handler",
            "socket_handler": echo,
            "tls": terminate(site, clients),
        },
    }
    async with proxy([route]):
        context = ca.client_context()
        context.load_cert_chain(*files.good)
        loop = asyncio.get_running_loop()
        sock = socket.create_connection((LOOPBACK, port))
        sock.setblocking(False)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname=SITE)

        async def pump() -> bool:
            """Send what TLS has to send, read what comes: False at the end."""
            if data := outgoing.read():
                await loop.sock_sendall(sock, data)
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
            if chunk:
                incoming.write(chunk)
            else:
                incoming.write_eof()
            return bool(chunk)

        try:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await pump()
            tls.write(b"ping\n")
            received = b""
            while b"ping\n" not in received:
                await pump()
                with contextlib.suppress(ssl.SSLWantReadError):
                    received += tls.read(100)
            with contextlib.suppress(ssl.SSLWantReadError):
                tls.unwrap()  # close_notify, our end of the stream
            answered = False  # the proxy's close_notify came back
            while await pump():
                try:
                    received += tls.read(100)
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:
                    answered = True
            # As with the loop's TLS layer, the client's close_notify ends the connection:
            # the handler saw its EOF, and what it wrote after that is not sent.
            assert received == b"ping\n" and answered
        finally:
            sock.close()
        record = await finished.next()
        assert record.outcome == "ok" and record.error is None, record.error


# -- 8. requests routed inside a session the handshake did not authenticate ---------------------


@pytest.mark.parametrize("path", ["lane", "transport"])
@async_test(60)
async def test_a_request_cannot_reach_an_mtls_route_through_another_routes_handshake(
    path: str, ca: TestCA, clients: TestCA, files: Files
) -> None:
    """SNI ``open.test`` (no client certificate asked), then ``Host: site.test`` (a route that
    requires one): each request is routed on its own inside the session, so the mTLS route
    must refuse it (421 Misdirected Request) rather than serve a client it never verified."""
    port = free_port()
    both = ca.issue(SITE, "open.test")
    cert = {"cert": both.cert_pem, "key": both.key_pem}
    with http_backend("secret") as secret, http_backend("open") as public:
        routes = beside_an_open_route(
            path,
            port,
            secret.port,
            public.port,
            {**terminate(both, clients), "certificate": cert},
            {"mode": "terminate", "certificate": cert},
        )
        async with proxy(routes):
            code, out, err = await curl(
                "--cacert", str(files.ca), "--resolve", f"open.test:{port}:{LOOPBACK}",
                "-H", f"Host: {SITE}", "-o", "/dev/null", "-w", "%{http_code}",
                f"https://open.test:{port}/who",
            )  # fmt: skip
    assert code == 0, err
    assert out == "421", out


@pytest.mark.parametrize("path", ["lane", "transport"])
@async_test(60)
async def test_requests_may_cross_routes_that_check_the_same_way(
    path: str, ca: TestCA, clients: TestCA, files: Files
) -> None:
    """SNI ``open.test`` asks for a certificate from the same CA but optionally: a request for
    the route that requires one is served when the client presented one, and refused (421)
    when it did not; ``Host`` of another route with the same CA, required, is served."""
    port = free_port()
    both = ca.issue(SITE, "open.test")
    cert = {"cert": both.cert_pem, "key": both.key_pem}
    with http_backend("secret") as secret, http_backend("open") as public:
        routes = beside_an_open_route(
            path,
            port,
            secret.port,
            public.port,
            {**terminate(both, clients), "certificate": cert},
            {**terminate(both, clients, "optional"), "certificate": cert},
        )
        async with proxy(routes):
            base = ["--cacert", str(files.ca), "--resolve", f"open.test:{port}:{LOOPBACK}"]
            base += ["--resolve", f"{SITE}:{port}:{LOOPBACK}", "-o", "/dev/null"]
            base += ["-w", "%{http_code}"]
            with_cert = ["--cert", str(files.good[0]), "--key", str(files.good[1])]
            # Optional handshake, no certificate: the required route refuses.
            code, out, err = await curl(*base, "-H", f"Host: {SITE}", f"https://open.test:{port}/")
            assert (code, out) == (0, "421"), err
            # Optional handshake with a certificate: served by the required route.
            code, out, err = await curl(
                *base, *with_cert, "-H", f"Host: {SITE}", f"https://open.test:{port}/"
            )
            assert (code, out) == (0, "200"), err
            # Required handshake, then the optional route by Host: served.
            code, out, err = await curl(
                *base, *with_cert, "-H", "Host: open.test", f"https://{SITE}:{port}/"
            )
            assert (code, out) == (0, "200"), err
