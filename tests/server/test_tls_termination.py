"""TLS termination: the certificate index, contexts, and accept_tls over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ssl
import tempfile
import traceback
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from support import LOOPBACK, TestCA, async_test, echo_handler, read_exactly, require_tool, serve

from smartroute.errors import ProtocolError, SmartRouteError, TlsParseError
from smartroute.protocols.tls import parse_client_hello
from smartroute.routing.model import CertificatePair, TlsSettings
from smartroute.server.tls import (
    CertificateIndex,
    CertificateLoadError,
    TlsHandshakeError,
    accept_tls,
    backend_context,
    backend_server_name,
    build_server_context,
)

# -- certificates ------------------------------------------------------------------------------


def issue(
    ca: TestCA, *names: str, common_name: str | None = None, days: int = 7, san: bool = True
) -> CertificatePair:
    """A leaf certificate from the test CA, with control over CN, SAN and lifetime."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name or names[0])])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
    )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
    cert = builder.sign(ca.key, hashes.SHA256())
    return CertificatePair(
        cert.public_bytes(serialization.Encoding.PEM).decode(),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
    )


@dataclass(frozen=True)
class Certs:
    a: CertificatePair  # a.example.test
    wild: CertificatePair  # *.example.test
    other: CertificatePair  # other.test


@pytest.fixture(scope="module")
def certs(ca: TestCA) -> Certs:
    return Certs(issue(ca, "a.example.test"), issue(ca, "*.example.test"), issue(ca, "other.test"))


# -- CertificateIndex --------------------------------------------------------------------------


def test_exact_name_beats_wildcard(certs: Certs) -> None:
    index = CertificateIndex([certs.wild, certs.a])
    assert index.select("a.example.test") == certs.a
    assert index.select("b.example.test") == certs.wild


def test_wildcard_covers_one_label_only(certs: Certs) -> None:
    index = CertificateIndex([certs.other, certs.wild])
    assert index.select("x.example.test") == certs.wild
    assert index.select("x.y.example.test") == certs.other  # the default
    assert index.select("example.test") == certs.other
    assert index.names(certs.wild) == {"*.example.test"}


def test_preferred_wins_when_it_covers_the_name(certs: Certs) -> None:
    index = CertificateIndex([certs.a, certs.wild, certs.other])
    assert index.select("a.example.test", certificate=certs.wild) == certs.wild
    assert index.select("other.test", certificate=certs.wild) == certs.other
    assert index.select("unknown.test", certificate=certs.wild) == certs.wild
    assert index.select(None, certificate=certs.wild) == certs.wild


def test_an_on_demand_route_gets_only_a_certificate_for_the_name(certs: Certs) -> None:
    index = CertificateIndex([certs.other, certs.wild])
    assert index.select("x.example.test", "on-demand") == certs.wild
    assert index.select("unknown.test", "on-demand") is None  # not the default: obtain one
    assert index.select("unknown.test", "auto") == certs.other
    assert index.select(None, "on-demand") == certs.other  # no SNI: nothing to obtain


def test_preferred_need_not_be_indexed(ca: TestCA, certs: Certs) -> None:
    loose = issue(ca, "loose.test")
    index = CertificateIndex([certs.a])
    assert index.select("loose.test", certificate=loose) == loose
    assert index.select("a.example.test", certificate=loose) == certs.a
    assert loose not in index
    index.add(loose)  # parsed once, for select; now indexed
    assert index.select("loose.test") == loose


def test_default_is_the_first_added(certs: Certs) -> None:
    assert CertificateIndex().select("a.example.test") is None
    assert CertificateIndex().default is None
    index = CertificateIndex([certs.other, certs.a])
    assert index.default == certs.other
    assert index.select(None) == certs.other
    assert index.select("") == certs.other
    assert index.select("nothing.test") == certs.other


def test_names_compare_case_insensitively_without_trailing_dot(ca: TestCA, certs: Certs) -> None:
    upper = issue(ca, "Upper.Example.TEST.")
    index = CertificateIndex([certs.other, certs.a, upper, certs.wild])
    assert index.select("A.EXAMPLE.test.") == certs.a
    assert index.select("upper.example.test") == upper
    assert index.select("Z.Example.Test.") == certs.wild


def test_common_name_is_used_without_subject_alt_names(ca: TestCA, certs: Certs) -> None:
    legacy = issue(ca, "legacy.test", san=False)
    with_san = issue(ca, "san.test", common_name="cn.test")
    index = CertificateIndex([certs.other, legacy, with_san])
    assert index.select("legacy.test") == legacy
    assert index.select("san.test") == with_san
    assert index.select("cn.test") == certs.other  # CN is ignored when SANs exist


def test_unusable_wildcards_are_not_indexed(ca: TestCA, certs: Certs) -> None:
    odd = issue(ca, "*.test", "f*.example.test", "ok.test")
    index = CertificateIndex([certs.other, odd])
    assert index.names(odd) == {"ok.test"}
    assert index.select("x.test") == certs.other
    assert index.select("foo.example.test") == certs.other


def test_add_remove_and_replace(ca: TestCA, certs: Certs) -> None:
    index = CertificateIndex([certs.a])
    index.add(certs.wild)
    index.add(certs.wild)  # again: no duplicate
    assert len(index) == 2 and list(index) == [certs.a, certs.wild]
    assert index.select("a.example.test") == certs.a
    index.remove(certs.a)
    index.remove(certs.a)  # unknown: ignored
    assert index.select("a.example.test") == certs.wild
    assert index.default == certs.wild
    index.replace([certs.other, certs.a, certs.other])
    assert list(index) == [certs.other, certs.a]
    assert index.select("b.example.test") == certs.other
    broken = CertificatePair(certs.a.cert_pem, certs.other.key_pem)
    with pytest.raises(CertificateLoadError):
        index.replace([certs.wild, broken])
    assert list(index) == [certs.other, certs.a]  # all or nothing


def test_the_certificate_that_expires_last_wins(ca: TestCA, certs: Certs) -> None:
    old, renewed = issue(ca, "a.example.test", days=3), issue(ca, "a.example.test", days=20)
    for order in ([old, renewed], [renewed, old]):
        index = CertificateIndex(order)
        assert index.select("a.example.test") == renewed
        index.remove(renewed)
        assert index.select("a.example.test") == old


def test_server_contexts_are_cached_per_pair_and_alpn(certs: Certs) -> None:
    index = CertificateIndex([certs.a, certs.wild])
    context = index.server_context(certs.a, alpn=("http/1.1",))
    assert index.server_context(certs.a, alpn=("http/1.1",)) is context
    assert index.server_context(certs.a) is not context
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_COMPRESSION
    index.remove(certs.a)
    assert index.server_context(certs.a, alpn=("http/1.1",)) is not context
    wild = index.server_context(certs.wild)
    index.replace([certs.wild, certs.other])
    assert index.server_context(certs.wild) is wild


def test_chains_load_and_the_leaf_is_indexed(ca: TestCA) -> None:
    leaf = issue(ca, "chain.test")
    chained = CertificatePair(leaf.cert_pem + ca.pem, leaf.key_pem)
    index = CertificateIndex([chained])
    assert index.names(chained) == {"chain.test"}
    assert isinstance(index.server_context(chained), ssl.SSLContext)


def test_keys_go_through_a_private_file_that_is_removed(
    certs: Certs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import smartroute.server.tls as tls_module

    monkeypatch.setattr(tls_module, "_load_from_memory", lambda context, text: False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert isinstance(build_server_context(certs.a), ssl.SSLContext)
    with pytest.raises(CertificateLoadError):
        build_server_context(CertificatePair(certs.a.cert_pem, certs.other.key_pem))
    assert list(tmp_path.iterdir()) == []


# -- key material never leaks into errors --------------------------------------------------------


def key_body_lines(pair: CertificatePair) -> list[str]:
    return [line for line in pair.key_pem.splitlines() if line and "-----" not in line]


def assert_no_key_text(exc: BaseException, *pairs: CertificatePair) -> None:
    shown = str(exc) + repr(exc) + "".join(traceback.format_exception(exc))
    for pair in pairs:
        for line in key_body_lines(pair):
            assert line not in shown


def test_errors_for_broken_certificates_never_show_the_key(ca: TestCA, certs: Certs) -> None:
    mismatched = CertificatePair(
        certs.a.cert_pem, certs.other.key_pem, cert_path="/etc/a.crt", key_path="/etc/a.key"
    )
    with pytest.raises(CertificateLoadError) as caught:
        CertificateIndex([mismatched])
    assert "does not match" in str(caught.value) and "/etc/a.key" in str(caught.value)
    assert "a.example.test" in str(caught.value)
    assert_no_key_text(caught.value, certs.other)

    # A key pasted where the certificate belongs, and a damaged key.
    swapped = CertificatePair(certs.a.key_pem, certs.a.cert_pem)
    damaged_text = certs.a.key_pem.replace("\n", "\nZZ", 2)
    damaged = CertificatePair(certs.a.cert_pem, damaged_text)
    for pair, problem in ((swapped, "not a PEM certificate"), (damaged, "private key")):
        with pytest.raises(CertificateLoadError) as caught:
            CertificateIndex([pair])
        assert problem in str(caught.value)
        assert_no_key_text(caught.value, certs.a)
        for line in damaged_text.splitlines()[1:-1]:
            assert line not in str(caught.value)

    # OpenSSL's own refusal is reworded too (the index checks first; this skips it).
    with pytest.raises(CertificateLoadError) as caught:
        build_server_context(mismatched)
    assert isinstance(caught.value, SmartRouteError)
    assert "key values mismatch" in str(caught.value)
    assert_no_key_text(caught.value, certs.other)


# -- a TLS-terminating echo server -------------------------------------------------------------


@dataclass
class Session:
    sni: str | None
    alpn: str | None
    version: str | None


@dataclass
class EchoServer:
    """Reads the ClientHello, picks a certificate by SNI, terminates TLS and echoes."""

    index: CertificateIndex
    alpn: tuple[str, ...] = ()
    handshake_timeout: float = 5.0
    port: int = 0
    reads: int = 0
    read_event: asyncio.Event = field(default_factory=asyncio.Event)
    sessions: list[Session] = field(default_factory=list)
    failures: asyncio.Queue[tuple[TlsHandshakeError, asyncio.Transport]] = field(
        default_factory=asyncio.Queue
    )
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def start(self, transport: asyncio.Transport, initial: bytes, sni: str | None) -> None:
        task = asyncio.get_running_loop().create_task(self.terminate(transport, initial, sni))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def terminate(
        self, transport: asyncio.Transport, initial: bytes, sni: str | None
    ) -> None:
        pair = self.index.select(sni)
        assert pair is not None
        context = self.index.server_context(pair, alpn=self.alpn)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            tls = await accept_tls(
                transport, protocol, context, initial, handshake_timeout=self.handshake_timeout
            )
        except TlsHandshakeError as exc:
            self.failures.put_nowait((exc, transport))
            return
        ssl_object = tls.get_extra_info("ssl_object")
        self.sessions.append(
            Session(sni, ssl_object.selected_alpn_protocol(), ssl_object.version())
        )
        writer = asyncio.StreamWriter(tls, protocol, reader, loop)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()


class PeekProtocol(asyncio.Protocol):
    """Buffers the first bytes until they hold a whole ClientHello, as the proxy does."""

    def __init__(self, server: EchoServer) -> None:
        self.server = server
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.server.reads += 1
        self.server.read_event.set()
        self.buffer += data
        try:
            hello = parse_client_hello(self.buffer)
        except TlsParseError:
            self.transport.close()
            return
        if hello is not None:
            self.transport.pause_reading()  # before any await: no byte may reach us again
            self.server.start(self.transport, bytes(self.buffer), hello.sni)


@contextlib.asynccontextmanager
async def echo_server(index: CertificateIndex, **options: Any) -> AsyncIterator[EchoServer]:
    state = EchoServer(index, **options)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: PeekProtocol(state), LOOPBACK, 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        if state.tasks:
            await asyncio.wait(state.tasks, timeout=5)
        for task in state.tasks:
            task.cancel()
        await server.wait_closed()


async def tls_echo(
    port: int, name: str, context: ssl.SSLContext, payload: bytes = b"ping\n"
) -> tuple[dict[str, Any], str | None]:
    """Connect with Python's TLS, check the echo, return the peer certificate and ALPN."""
    reader, writer = await asyncio.open_connection(
        LOOPBACK, port, ssl=context, server_hostname=name
    )
    try:
        peercert = writer.get_extra_info("peercert")
        alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
        writer.write(payload)
        await writer.drain()
        assert await read_exactly(reader, len(payload)) == payload
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await asyncio.wait_for(writer.wait_closed(), 5)
    return peercert, alpn


def common_name(peercert: dict[str, Any]) -> str:
    return str(dict(item[0] for item in peercert["subject"])["commonName"])


class BioClient:
    """A TLS client over a plain connection, so the test decides how its bytes are written."""

    def __init__(self, context: ssl.SSLContext, name: str) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=name)
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.do_handshake()
        self.hello = self.outgoing.read()

    async def finish(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Complete the handshake once the ClientHello has been sent."""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                writer.write(self.outgoing.read())
                data = await asyncio.wait_for(reader.read(65536), 5)
                if not data:
                    raise ConnectionResetError("server closed during the handshake") from None
                self.incoming.write(data)
        writer.write(self.outgoing.read())

    async def echo(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes
    ) -> bytes:
        self.tls.write(payload)
        writer.write(self.outgoing.read())
        got = b""
        while len(got) < len(payload):
            try:
                got += self.tls.read(65536)
            except ssl.SSLWantReadError:
                data = await asyncio.wait_for(reader.read(65536), 5)
                if not data:
                    break
                self.incoming.write(data)
        return got


async def closed(transport: asyncio.Transport) -> bool:
    """True once the transport's socket has been closed (connection_lost runs via call_soon).

    asyncio's transport keeps its socket object, whose file descriptor becomes -1; uvloop's
    has no socket to give any more.
    """
    for _ in range(100):
        sock = transport.get_extra_info("socket")
        if sock is None or sock.fileno() == -1:
            return True
        await asyncio.sleep(0)
    return False


# -- accept_tls end to end ---------------------------------------------------------------------


@async_test()
async def test_python_clients_get_the_certificate_for_their_sni(ca: TestCA, certs: Certs) -> None:
    async with echo_server(CertificateIndex([certs.a, certs.wild])) as server:
        client = ca.client_context()
        for name, expected in (
            ("a.example.test", "a.example.test"),
            ("b.example.test", "*.example.test"),
            ("A.Example.Test", "a.example.test"),
        ):
            peercert, _ = await tls_echo(server.port, name, client, name.encode() * 1000)
            assert common_name(peercert) == expected
        assert [s.sni for s in server.sessions] == [
            "a.example.test",
            "b.example.test",
            "a.example.test",
        ]
        assert server.failures.empty()


@async_test()
async def test_openssl_s_client_verifies_the_chain(
    ca: TestCA, certs: Certs, tmp_path: Path
) -> None:
    openssl = require_tool("openssl")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(ca.pem)
    async with echo_server(CertificateIndex([certs.a, certs.wild])) as server:
        for name in ("a.example.test", "b.example.test"):
            process = await asyncio.create_subprocess_exec(
                openssl, "s_client", "-connect", f"{LOOPBACK}:{server.port}",
                "-servername", name, "-CAfile", str(ca_file), "-verify_hostname", name,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write(b"hello from openssl\n")
            await process.stdin.drain()
            seen = b""
            while b"hello from openssl\n" not in seen:  # s_client prints only what it receives
                line = await asyncio.wait_for(process.stdout.readline(), 10)
                assert line, seen.decode(errors="replace")
                seen += line
            process.stdin.close()
            seen += await asyncio.wait_for(process.stdout.read(), 10)
            await asyncio.wait_for(process.wait(), 10)
            text = seen.decode(errors="replace")
            assert "Verify return code: 0 (ok)" in text, text
            expected = "a.example.test" if name.startswith("a.") else "*.example.test"
            assert f"subject=CN = {expected}" in text or f"subject=CN={expected}" in text, text
        assert [s.sni for s in server.sessions] == ["a.example.test", "b.example.test"]


@async_test()
async def test_a_tls_1_1_client_fails_and_the_connection_is_closed(
    ca: TestCA, certs: Certs
) -> None:
    client = ca.client_context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1_1 is deprecated: the point
        client.minimum_version = ssl.TLSVersion.TLSv1_1
        client.maximum_version = ssl.TLSVersion.TLSv1_1
    client.set_ciphers("DEFAULT:@SECLEVEL=0")
    async with echo_server(CertificateIndex([certs.a])) as server:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await tls_echo(server.port, "a.example.test", client)
        error, transport = await asyncio.wait_for(server.failures.get(), 5)
        assert isinstance(error, ProtocolError)
        assert "unsupported protocol" in str(error) or "version" in str(error), str(error)
        assert transport.is_closing() and await closed(transport)
        assert server.sessions == []
        # The server still serves the next client.
        peercert, _ = await tls_echo(server.port, "a.example.test", ca.client_context())
        assert common_name(peercert) == "a.example.test"


@async_test()
async def test_alpn_is_negotiated_from_the_context(ca: TestCA, certs: Certs) -> None:
    client = ca.client_context()
    client.set_alpn_protocols(["h2", "http/1.1"])
    async with echo_server(CertificateIndex([certs.a]), alpn=("http/1.1",)) as server:
        _, alpn = await tls_echo(server.port, "a.example.test", client)
        assert alpn == "http/1.1"
        assert server.sessions[0].alpn == "http/1.1"
    async with echo_server(CertificateIndex([certs.a])) as server:
        _, alpn = await tls_echo(server.port, "a.example.test", client)
        assert alpn is None


@async_test()
async def test_a_client_hello_split_over_several_writes(ca: TestCA, certs: Certs) -> None:
    async with echo_server(CertificateIndex([certs.a, certs.wild])) as server:
        client = BioClient(ca.client_context(), "b.example.test")
        reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
        try:
            hello = client.hello
            pieces = [hello[:3], hello[3:40], hello[40:90], hello[90:]]
            for piece in pieces:
                server.read_event.clear()
                writer.write(piece)
                await writer.drain()
                await server.read_event.wait()  # the server has read this piece on its own
            assert server.reads >= len(pieces)
            await client.finish(reader, writer)
            cert = x509.load_der_x509_certificate(client.tls.getpeercert(binary_form=True) or b"")
            assert cert.subject.rfc4514_string() == "CN=*.example.test"
            payload = b"split hello\n" * 3000
            assert await client.echo(reader, writer, payload) == payload
        finally:
            writer.close()
            await writer.wait_closed()
        assert server.sessions[0].sni == "b.example.test"


@async_test()
async def test_a_stalled_handshake_times_out(ca: TestCA, certs: Certs) -> None:
    async with echo_server(CertificateIndex([certs.a]), handshake_timeout=0.2) as server:
        client = BioClient(ca.client_context(), "a.example.test")
        reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
        writer.write(client.hello)  # then never answer the ServerHello
        error, transport = await asyncio.wait_for(server.failures.get(), 5)
        assert "timed out" in str(error)
        assert await closed(transport)
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(reader.read(), 5)  # ServerHello..., then the close
        writer.close()
        await writer.wait_closed()


@async_test()
async def test_a_client_that_leaves_mid_handshake(ca: TestCA, certs: Certs) -> None:
    async with echo_server(CertificateIndex([certs.a])) as server:
        client = BioClient(ca.client_context(), "a.example.test")
        reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
        writer.write(client.hello)
        await reader.read(1)  # the server has started answering
        writer.close()
        await writer.wait_closed()
        error, transport = await asyncio.wait_for(server.failures.get(), 5)
        assert "closed" in str(error)
        assert await closed(transport)


@async_test()
async def test_garbage_after_the_hello_fails_the_handshake(ca: TestCA, certs: Certs) -> None:
    async with echo_server(CertificateIndex([certs.a])) as server:
        client = BioClient(ca.client_context(), "a.example.test")
        reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
        writer.write(client.hello + b"\x17\x03\x03\x00\x05hello" + b"GET / HTTP/1.1\r\n\r\n")
        error, transport = await asyncio.wait_for(server.failures.get(), 5)
        assert str(error).startswith("TLS handshake failed: ")
        assert await closed(transport)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@async_test()
async def test_accept_tls_refuses_a_closed_transport(certs: Certs) -> None:
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[asyncio.Transport] = loop.create_future()

    class Grab(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.set_result(cast(asyncio.Transport, transport))

    server = await loop.create_server(Grab, LOOPBACK, 0)
    _, writer = await asyncio.open_connection(LOOPBACK, server.sockets[0].getsockname()[1])
    transport = await accepted
    transport.close()
    context = build_server_context(certs.a)
    with pytest.raises(TlsHandshakeError, match="before the TLS handshake"):
        await accept_tls(transport, asyncio.Protocol(), context, b"", handshake_timeout=1)
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()


# -- backend (re-encryption) contexts ----------------------------------------------------------


@async_test()
async def test_backend_verification_is_on_by_default(ca: TestCA, tmp_path: Path) -> None:
    backend = ca.issue("backend.example.test")
    server_context = ca.server_context(backend, tmp_path, "backend")
    reencrypt = TlsSettings("terminate-and-reencrypt")
    name = backend_server_name(reencrypt, "backend.example.test", LOOPBACK)
    async with serve(echo_handler, ssl_context=server_context) as port:

        async def talk(context: ssl.SSLContext, server_name: str | None = name) -> bytes:
            reader, writer = await asyncio.open_connection(
                LOOPBACK, port, ssl=context, server_hostname=server_name
            )
            writer.write(b"backend\n")
            try:
                return await read_exactly(reader, 8)
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError, ssl.SSLError):
                    await writer.wait_closed()

        with pytest.raises(ssl.SSLCertVerificationError):
            await talk(backend_context(reencrypt))
        trusting = TlsSettings("terminate-and-reencrypt", backend_ca=ca.pem)
        assert await talk(backend_context(trusting)) == b"backend\n"
        with pytest.raises(ssl.SSLCertVerificationError):
            await talk(backend_context(trusting), "elsewhere.example.test")
        trusting_all = TlsSettings("terminate-and-reencrypt", backend_verify=False)
        assert await talk(backend_context(trusting_all), "elsewhere.example.test") == b"backend\n"


def test_backend_contexts_are_shared_and_explicit(ca: TestCA) -> None:
    default = backend_context(TlsSettings("terminate-and-reencrypt"))
    assert default is backend_context(
        TlsSettings("terminate-and-reencrypt", backend_server_name="x")
    )
    assert default.verify_mode == ssl.CERT_REQUIRED and default.check_hostname
    assert default.minimum_version == ssl.TLSVersion.TLSv1_2
    off = backend_context(TlsSettings("terminate-and-reencrypt", backend_verify=False))
    assert off.verify_mode == ssl.CERT_NONE and not off.check_hostname
    custom = backend_context(TlsSettings("terminate-and-reencrypt", backend_ca=ca.pem))
    assert custom is not default and len(custom.get_ca_certs()) == 1
    with pytest.raises(CertificateLoadError, match="backend_ca"):
        backend_context(TlsSettings("terminate-and-reencrypt", backend_ca="not a certificate"))


def test_backend_server_name_precedence() -> None:
    plain = TlsSettings("terminate-and-reencrypt")
    named = TlsSettings("terminate-and-reencrypt", backend_server_name="internal.test")
    assert backend_server_name(named, "client.test", "10.0.0.5") == "internal.test"
    assert backend_server_name(plain, "client.test", "10.0.0.5") == "client.test"
    assert backend_server_name(plain, None, "10.0.0.5") == "10.0.0.5"
    assert backend_server_name(plain, None, "") is None
