"""TLS-ALPN-01 (RFC 8737): the validation certificate, the acme challenge type, and the responder
answering real TLS clients (Python's ssl, openssl s_client) over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import json
import os
import re
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import cast

import pytest
from acme import challenges, messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.b64 import b64encode
from josepy.jwk import JWKEC
from support import LOOPBACK, async_test, require_tool

from smartroute.certs.tls_alpn import (
    ACME_IDENTIFIER_OID,
    ACME_TLS_ALPN,
    TLSALPN01,
    VALIDITY,
    TLSALPN01Response,
    TlsAlpnResponder,
    as_tls_alpn01,
    validation_certificate,
)
from smartroute.errors import TlsParseError
from smartroute.protocols.tls import ClientHello, parse_client_hello
from smartroute.server.tls import TlsHandshakeError, accept_tls

DOMAIN = "acme.example.test"
KEY_AUTHORIZATION = (
    "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA.9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
)
TIMEOUT = 10.0

# -- helpers -----------------------------------------------------------------------------------


def thumbprint(key: ec.EllipticCurvePrivateKey) -> str:
    """RFC 7638 by hand (not josepy's), so the key authorization is checked independently."""
    numbers = key.public_key().public_numbers()
    members = {
        "crv": "P-256",
        "kty": "EC",
        "x": b64encode(numbers.x.to_bytes(32, "big")).decode(),
        "y": b64encode(numbers.y.to_bytes(32, "big")).decode(),
    }
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":")).encode()
    return b64encode(hashlib.sha256(canonical).digest()).decode()


def new_token() -> str:
    return b64encode(os.urandom(32)).decode()


def challenge_json(token: str) -> dict[str, str]:
    return {
        "type": "tls-alpn-01",
        "url": "https://ca.example.test/acme/chall/abc",
        "token": token,
        "status": "pending",
    }


def acme_extension(cert: x509.Certificate) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)


def expected_value(key_authorization: str) -> bytes:
    return b"\x04\x20" + hashlib.sha256(key_authorization.encode()).digest()


def assert_validation_certificate(der_or_pem: bytes, domain: str, key_authorization: str) -> None:
    """What a CA validator checks (RFC 8737 §3) in the certificate it was shown."""
    if der_or_pem.startswith(b"-----"):
        cert = x509.load_pem_x509_certificate(der_or_pem)
    else:
        cert = x509.load_der_x509_certificate(der_or_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.DNSName(domain)]
    extension = acme_extension(cert)
    assert extension.critical
    assert isinstance(extension.value, x509.UnrecognizedExtension)
    assert extension.value.value == expected_value(key_authorization)


# -- the validation certificate ----------------------------------------------------------------


def test_the_certificate_carries_the_key_authorization_digest() -> None:
    cert_pem, key_pem = validation_certificate(DOMAIN, KEY_AUTHORIZATION)
    cert = x509.load_pem_x509_certificate(cert_pem.encode())

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == [DOMAIN]
    assert len(list(san.value)) == 1  # no other name of any type

    extension = acme_extension(cert)
    assert extension.oid.dotted_string == "1.3.6.1.5.5.7.1.31"
    assert extension.critical
    value = cast(x509.UnrecognizedExtension, extension.value).value
    assert len(value) == 34 and value[:2] == b"\x04\x20"
    assert value[2:] == hashlib.sha256(KEY_AUTHORIZATION.encode("ascii")).digest()
    # The whole extnValue as it sits in the certificate: an OCTET STRING wrapping that DER.
    assert b"\x04\x22" + value in cert.public_bytes(serialization.Encoding.DER)


def test_the_certificate_is_self_signed_short_lived_and_matches_its_key() -> None:
    cert_pem, key_pem = validation_certificate(DOMAIN, KEY_AUTHORIZATION)
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert key.public_key().public_numbers() == public.public_numbers()
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    now = datetime.datetime.now(datetime.UTC)
    assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
    assert cert.not_valid_after_utc - now <= VALIDITY
    assert key_pem.startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted


def test_each_certificate_has_its_own_key() -> None:
    first, _ = validation_certificate(DOMAIN, KEY_AUTHORIZATION)
    second, _ = validation_certificate(DOMAIN, KEY_AUTHORIZATION)
    public = [x509.load_pem_x509_certificate(pem.encode()).public_key() for pem in (first, second)]
    assert public[0] != public[1]


def test_the_name_is_normalised_and_long_names_still_fit() -> None:
    cert_pem, _ = validation_certificate("Acme.Example.TEST.", KEY_AUTHORIZATION)
    assert_validation_certificate(cert_pem.encode(), DOMAIN, KEY_AUTHORIZATION)
    long_name = ".".join(["a" * 60] * 4) + ".test"  # longer than a 64-character CN
    cert_pem, _ = validation_certificate(long_name, KEY_AUTHORIZATION)
    assert_validation_certificate(cert_pem.encode(), long_name, KEY_AUTHORIZATION)


@pytest.mark.parametrize(
    ("domain", "reason"),
    [
        ("", "empty"),
        ("192.0.2.1", "IP address"),
        ("2001:db8::1", "IP address"),
        ("*.example.test", "wildcard"),
        ("exämple.test", "A-label"),
    ],
)
def test_names_that_cannot_be_validated_this_way(domain: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        validation_certificate(domain, KEY_AUTHORIZATION)
    with pytest.raises(ValueError, match=reason):
        TlsAlpnResponder().add(domain, KEY_AUTHORIZATION)


# -- the acme challenge type -------------------------------------------------------------------


def test_the_challenge_type_is_registered_with_the_acme_library() -> None:
    assert challenges.Challenge.TYPES["tls-alpn-01"] is TLSALPN01
    assert challenges.ChallengeResponse.TYPES["tls-alpn-01"] is TLSALPN01Response
    assert TLSALPN01.typ == TLSALPN01Response.typ == "tls-alpn-01"


def test_a_challenge_parses_answers_and_validates() -> None:
    token, private = new_token(), ec.generate_private_key(ec.SECP256R1())
    key = JWKEC(key=private)
    chall = challenges.Challenge.from_json(challenge_json(token))
    assert isinstance(chall, TLSALPN01)
    assert chall.encode("token") == token
    assert chall.to_partial_json() == {"type": "tls-alpn-01", "token": token}

    key_authorization = f"{token}.{thumbprint(private)}"
    assert chall.validation(key) == key_authorization

    response = chall.response(key)
    assert isinstance(response, TLSALPN01Response)
    assert response.key_authorization == key_authorization
    assert response.verify(chall, key.public_key())
    assert response.to_json() == {}  # RFC 8737 §3: the client POSTs an empty object
    assert json.loads(response.json_dumps()) == {}


def test_authorizations_from_the_ca_carry_the_challenge() -> None:
    token = new_token()
    authorization = messages.Authorization.from_json(
        {
            "identifier": {"type": "dns", "value": DOMAIN},
            "status": "pending",
            "challenges": [
                {"type": "http-01", "url": "https://ca.example.test/c/1", "token": new_token()},
                challenge_json(token),
                {"type": "future-01", "url": "https://ca.example.test/c/3", "token": token},
            ],
        }
    )
    kinds = [type(body.chall) for body in authorization.challenges]
    assert kinds == [challenges.HTTP01, TLSALPN01, challenges.UnrecognizedChallenge]
    body = authorization.challenges[1]
    assert body.uri == "https://ca.example.test/acme/chall/abc"
    assert body.status == messages.STATUS_PENDING


def test_challenges_decoded_before_registration_can_be_recovered() -> None:
    token = new_token()
    unrecognized = challenges.UnrecognizedChallenge.from_json(challenge_json(token))
    recovered = as_tls_alpn01(unrecognized)
    assert isinstance(recovered, TLSALPN01)
    assert recovered.encode("token") == token
    registered = challenges.Challenge.from_json(challenge_json(token))
    assert isinstance(registered, TLSALPN01)
    assert as_tls_alpn01(registered) is registered
    http = challenges.Challenge.from_json({"type": "http-01", "token": token})
    assert as_tls_alpn01(http) is None
    other = challenges.UnrecognizedChallenge.from_json({"type": "future-01", "token": token})
    assert as_tls_alpn01(other) is None


# -- the responder -----------------------------------------------------------------------------


def test_the_responder_answers_only_acme_clients_for_pending_domains() -> None:
    responder = TlsAlpnResponder()
    assert not responder and len(responder) == 0
    assert responder.context_for(DOMAIN, (ACME_TLS_ALPN,)) is None

    responder.add("Acme.Example.Test.", KEY_AUTHORIZATION)
    assert responder and len(responder) == 1
    assert DOMAIN in responder and "ACME.example.test." in responder
    context = responder.context_for(DOMAIN, (ACME_TLS_ALPN,))
    assert isinstance(context, ssl.SSLContext)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    for sni in ("ACME.EXAMPLE.TEST", "acme.example.test."):
        assert responder.context_for(sni, (ACME_TLS_ALPN,)) is context
    assert responder.context_for(DOMAIN, ("h2", ACME_TLS_ALPN)) is context

    assert responder.context_for(DOMAIN, ("http/1.1",)) is None
    assert responder.context_for(DOMAIN, ()) is None
    assert responder.context_for(None, (ACME_TLS_ALPN,)) is None
    assert responder.context_for("other.example.test", (ACME_TLS_ALPN,)) is None
    assert responder.context_for("x." + DOMAIN, (ACME_TLS_ALPN,)) is None

    responder.add(DOMAIN, KEY_AUTHORIZATION + "x")  # a new order for the same name replaces
    assert len(responder) == 1
    assert responder.context_for(DOMAIN, (ACME_TLS_ALPN,)) is not context

    responder.remove("ACME.example.test.")
    responder.remove("never.added.test")
    assert not responder
    assert responder.context_for(DOMAIN, (ACME_TLS_ALPN,)) is None


# -- end to end over loopback ------------------------------------------------------------------


@dataclass
class Seen:
    hello: ClientHello
    answered: bool
    alpn: str | None = None  # what the server side negotiated


class Lost(asyncio.Protocol):
    """The application protocol of a validation connection: nothing is read or written."""

    def __init__(self) -> None:
        self.lost = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


@dataclass
class Validator443:
    """Plays the proxy's port 443: read the ClientHello, ask the responder, answer or close."""

    responder: TlsAlpnResponder
    port: int = 0
    seen: asyncio.Queue[Seen] = field(default_factory=asyncio.Queue)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def hello(self, transport: asyncio.Transport, initial: bytes, hello: ClientHello) -> None:
        context = self.responder.context_for(hello.sni, hello.alpn)
        if context is None:
            self.seen.put_nowait(Seen(hello, answered=False))
            transport.close()  # the proxy would route it as usual; here there is nowhere to go
            return
        task = asyncio.get_running_loop().create_task(
            self.answer(transport, initial, hello, context)
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def answer(
        self,
        transport: asyncio.Transport,
        initial: bytes,
        hello: ClientHello,
        context: ssl.SSLContext,
    ) -> None:
        protocol = Lost()
        try:
            tls = await accept_tls(transport, protocol, context, initial, handshake_timeout=5)
        except TlsHandshakeError:
            self.seen.put_nowait(Seen(hello, answered=True))
            return
        alpn = tls.get_extra_info("ssl_object").selected_alpn_protocol()
        self.seen.put_nowait(Seen(hello, answered=True, alpn=alpn))
        tls.close()  # RFC 8737 §3: no application data; the validator hangs up anyway
        try:
            await asyncio.wait_for(protocol.lost, TIMEOUT)
        except TimeoutError:
            transport.abort()


class PeekHello(asyncio.Protocol):
    """Buffers bytes until they hold a whole ClientHello, as the proxy's TLS port does."""

    def __init__(self, server: Validator443) -> None:
        self.server = server
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        try:
            hello = parse_client_hello(self.buffer)
        except TlsParseError:
            self.transport.close()
            return
        if hello is not None:
            self.transport.pause_reading()  # nothing more may reach this protocol
            self.server.hello(self.transport, bytes(self.buffer), hello)


@contextlib.asynccontextmanager
async def port_443(responder: TlsAlpnResponder) -> AsyncIterator[Validator443]:
    state = Validator443(responder)
    server = await asyncio.get_running_loop().create_server(lambda: PeekHello(state), LOOPBACK, 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        if state.tasks:
            await asyncio.wait(state.tasks, timeout=TIMEOUT)
        for task in state.tasks:
            task.cancel()
        await server.wait_closed()


def validator_context(alpn: list[str]) -> ssl.SSLContext:
    """Like a CA's validator: no chain verification, the certificate is inspected instead."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(alpn)
    return context


async def validate(port: int, sni: str, alpn: list[str]) -> tuple[bytes, str | None]:
    """Handshake, then return the peer certificate (DER) and the negotiated ALPN protocol."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(LOOPBACK, port, ssl=validator_context(alpn), server_hostname=sni),
        TIMEOUT,
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        assert der is not None
        return der, ssl_object.selected_alpn_protocol()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await asyncio.wait_for(writer.wait_closed(), TIMEOUT)


@async_test()
async def test_a_validator_gets_acme_tls_1_and_the_validation_certificate() -> None:
    responder = TlsAlpnResponder()
    responder.add(DOMAIN, KEY_AUTHORIZATION)
    async with port_443(responder) as server:
        for sni in (DOMAIN, "ACME.Example.Test"):
            der, alpn = await validate(server.port, sni, [ACME_TLS_ALPN])
            assert alpn == ACME_TLS_ALPN
            assert_validation_certificate(der, DOMAIN, KEY_AUTHORIZATION)
            seen = await asyncio.wait_for(server.seen.get(), TIMEOUT)
            assert seen.answered and seen.alpn == ACME_TLS_ALPN
            assert seen.hello.sni == DOMAIN and seen.hello.alpn == (ACME_TLS_ALPN,)


@async_test()
async def test_the_answer_follows_the_pending_challenges() -> None:
    responder = TlsAlpnResponder()
    responder.add(DOMAIN, KEY_AUTHORIZATION)
    responder.add("other.example.test", "other.authorization")
    async with port_443(responder) as server:
        der, _ = await validate(server.port, "other.example.test", [ACME_TLS_ALPN])
        assert_validation_certificate(der, "other.example.test", "other.authorization")
        assert (await asyncio.wait_for(server.seen.get(), TIMEOUT)).answered

        responder.add(DOMAIN, "renewed.authorization")
        der, _ = await validate(server.port, DOMAIN, [ACME_TLS_ALPN])
        assert_validation_certificate(der, DOMAIN, "renewed.authorization")
        assert (await asyncio.wait_for(server.seen.get(), TIMEOUT)).answered

        responder.remove(DOMAIN)
        with pytest.raises(OSError):  # ssl.SSLError or a reset: the handshake never completes
            await validate(server.port, DOMAIN, [ACME_TLS_ALPN])
        seen = await asyncio.wait_for(server.seen.get(), TIMEOUT)
        assert not seen.answered and seen.hello.sni == DOMAIN


@async_test()
async def test_clients_that_are_not_validators_are_not_answered() -> None:
    responder = TlsAlpnResponder()
    responder.add(DOMAIN, KEY_AUTHORIZATION)
    async with port_443(responder) as server:
        for sni, alpn in (
            (DOMAIN, ["http/1.1"]),  # an ordinary browser for the same name
            ("unknown.example.test", [ACME_TLS_ALPN]),  # a validator for another name
        ):
            with pytest.raises(OSError):
                await validate(server.port, sni, alpn)
            seen = await asyncio.wait_for(server.seen.get(), TIMEOUT)
            assert not seen.answered
            assert seen.hello.sni == sni and seen.hello.alpn == tuple(alpn)
            assert responder.context_for(seen.hello.sni, seen.hello.alpn) is None


@async_test()
async def test_openssl_s_client_negotiates_acme_tls_1() -> None:
    openssl = require_tool("openssl")
    responder = TlsAlpnResponder()
    responder.add(DOMAIN, KEY_AUTHORIZATION)
    async with port_443(responder) as server:
        process = await asyncio.create_subprocess_exec(
            openssl, "s_client", "-connect", f"{LOOPBACK}:{server.port}",
            "-servername", DOMAIN, "-alpn", ACME_TLS_ALPN,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            output, _ = await asyncio.wait_for(process.communicate(), TIMEOUT)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        text = output.decode(errors="replace")
        assert "ALPN protocol: acme-tls/1" in text, text
        pem = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", text, re.S)
        assert pem is not None, text
        assert_validation_certificate(pem.group().encode(), DOMAIN, KEY_AUTHORIZATION)
        seen = await asyncio.wait_for(server.seen.get(), TIMEOUT)
        assert seen.answered and seen.alpn == ACME_TLS_ALPN
