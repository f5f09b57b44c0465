"""The Pebble harness runs a real ACME CA that really validates challenges on loopback."""

from __future__ import annotations

import contextlib
import datetime
import http.server
import json
import socket
import ssl
import struct
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.verification import PolicyBuilder, Store
from josepy.b64 import b64encode
from josepy.jwa import ES256
from josepy.jwk import JWKEC
from pebble import Pebble, dns_query_a, free_port, run_pebble
from support import LOOPBACK, require_tool

# Pebble accepts any syntactically valid name; challtestsrv resolves every name to 127.0.0.1.
DOMAIN = "www.smartroute-harness.example"
OTHER_DOMAIN = "other.smartroute-harness.example"
ACME_TIMEOUT = datetime.timedelta(seconds=20)


class _ChallengeHandler(http.server.BaseHTTPRequestHandler):
    server: _ChallengeServer

    def do_GET(self) -> None:
        body = self.server.responses.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write((body or "not found").encode())

    def log_message(self, format: str, *args: object) -> None:
        pass


class _ChallengeServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int) -> None:
        super().__init__((LOOPBACK, port), _ChallengeHandler)
        self.responses: dict[str, str] = {}


@contextlib.contextmanager
def http01_responder(port: int) -> Iterator[dict[str, str]]:
    """Serve HTTP-01 key authorizations on ``port``; yields path -> body to fill in."""
    server = _ChallengeServer(port)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.responses
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def acme_client(pebble: Pebble, eab: tuple[str, str] | None = None) -> client.ClientV2:
    """A registered account on ``pebble`` (EC P-256 key, ES256); ``eab`` is (kid, HMAC key)."""
    key = JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    # requests takes a CA bundle path for verify; acme annotates verify_ssl as bool only.
    network = client.ClientNetwork(
        key,
        alg=ES256,
        verify_ssl=pebble.ca_bundle,  # type: ignore[arg-type]
        user_agent="smartroute-tests",
        timeout=10,
    )
    acme = client.ClientV2(client.ClientV2.get_directory(pebble.directory_url, network), network)
    binding = None
    if eab is not None:
        binding = messages.ExternalAccountBinding.from_data(
            key.public_key(), eab[0], eab[1], acme.directory
        )
    network.account = acme.new_account(
        messages.NewRegistration.from_data(
            terms_of_service_agreed=True, external_account_binding=binding
        )
    )
    return acme


def order_http01(
    acme: client.ClientV2,
    domain: str,
    responses: dict[str, str] | None,
    *,
    corrupt: bool = False,
) -> messages.OrderResource:
    """Order a certificate for ``domain``, serving HTTP-01 through ``responses`` if given.

    ``corrupt`` serves a wrong key authorization.
    """
    key_pem = rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    order = acme.new_order(crypto_util.make_csr(key_pem, [domain]))
    for authz in order.authorizations:
        challenge = next(c for c in authz.body.challenges if isinstance(c.chall, challenges.HTTP01))
        response, validation = challenge.response_and_validation(acme.net.key)
        if responses is not None:
            assert isinstance(challenge.chall, challenges.HTTP01)
            responses[challenge.chall.path] = validation + ("x" if corrupt else "")
        acme.answer_challenge(challenge, response)
    deadline = datetime.datetime.now() + ACME_TIMEOUT
    return acme.poll_and_finalize(order, deadline)


def split_pem_chain(pem: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem.encode())


def test_directory_answers_over_https_trusting_ca_bundle(pebble: Pebble) -> None:
    context = ssl.create_default_context(cafile=pebble.ca_bundle)
    with urllib.request.urlopen(pebble.directory_url, timeout=5, context=context) as response:
        directory = json.load(response)
    assert {"newNonce", "newAccount", "newOrder"} <= directory.keys()
    assert pebble.directory_url.startswith(f"https://{LOOPBACK}:")


def test_root_pem_is_a_ca_certificate(pebble: Pebble) -> None:
    root = x509.load_pem_x509_certificate(pebble.root_pem().encode())
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert root.issuer == root.subject
    intermediate = x509.load_pem_x509_certificate(pebble.intermediate_pem().encode())
    intermediate.verify_directly_issued_by(root)


def test_challtestsrv_answers_loopback_for_any_name(pebble: Pebble) -> None:
    # A hand-built A query for an arbitrary name: header, question, QTYPE=A, QCLASS=IN.
    query_id = 0x5EB1
    name = b"".join(bytes([len(p)]) + p for p in b"any-name.anywhere.example".split(b"."))
    query = (
        struct.pack("!6H", query_id, 0x0100, 1, 0, 0, 0) + name + b"\0" + struct.pack("!HH", 1, 1)
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.sendto(query, (LOOPBACK, pebble.dns_port))
        reply = sock.recv(4096)
    reply_id, flags, qdcount, ancount = struct.unpack_from("!4H", reply)
    assert (reply_id, flags & 0x800F, qdcount, ancount) == (query_id, 0x8000, 1, 1)
    # The answer follows the echoed question: its owner name (labels or a 2-byte pointer),
    # then TYPE, CLASS, TTL, RDLENGTH and the address.
    offset = 12 + len(name) + 1 + 4
    while reply[offset] != 0 and reply[offset] & 0xC0 != 0xC0:
        offset += 1 + reply[offset]
    offset += 1 if reply[offset] == 0 else 2
    rtype, rclass, _ttl, length = struct.unpack_from("!HHIH", reply, offset)
    assert (rtype, rclass, length) == (1, 1, 4)
    address = socket.inet_ntoa(reply[offset + 10 : offset + 14])
    assert address == LOOPBACK
    # The harness's own resolver agrees, for another name.
    assert dns_query_a(pebble.dns_port, "elsewhere.test") == [LOOPBACK]


def test_issuance_really_validates_http01(pebble: Pebble) -> None:
    acme = acme_client(pebble)
    with http01_responder(pebble.http_port) as responses:
        order = order_http01(acme, DOMAIN, responses)
    assert order.body.status == messages.STATUS_VALID

    leaf, *chain = split_pem_chain(order.fullchain_pem)
    root = x509.load_pem_x509_certificate(pebble.root_pem().encode())
    intermediate = x509.load_pem_x509_certificate(pebble.intermediate_pem().encode())
    assert chain == [intermediate]
    verifier = PolicyBuilder().store(Store([root])).build_server_verifier(x509.DNSName(DOMAIN))
    verified = verifier.verify(leaf, chain)
    assert verified[-1] == root
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [DOMAIN]

    # Nothing answers on http_port now: Pebble's validation must fail, promptly.
    with pytest.raises(errors.ValidationError) as failure:
        order_http01(acme, OTHER_DOMAIN, None)
    [authz] = failure.value.failed_authzrs
    assert authz.body.status == messages.STATUS_INVALID
    [challenge] = [c for c in authz.body.challenges if c.error is not None]
    assert challenge.error is not None and challenge.error.typ.endswith(":connection")


def test_validation_fails_on_a_wrong_key_authorization(pebble: Pebble) -> None:
    acme = acme_client(pebble)
    with (
        http01_responder(pebble.http_port) as responses,
        pytest.raises(errors.ValidationError) as failure,
    ):
        order_http01(acme, DOMAIN, responses, corrupt=True)
    [authz] = failure.value.failed_authzrs
    [challenge] = [c for c in authz.body.challenges if c.error is not None]
    assert challenge.error is not None and challenge.error.typ.endswith(":unauthorized")
    assert "key authorization" in str(challenge.error.detail)


def test_stop_and_start(pebble: Pebble) -> None:
    root = pebble.root_pem()
    assert pebble.running
    pebble.stop()
    assert not pebble.running
    acme_port = urllib.parse.urlsplit(pebble.directory_url).port
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOOPBACK, acme_port), 2)
    pebble.stop()  # stopping twice is harmless
    pebble.start()
    assert pebble.running
    assert pebble.root_pem() != root  # a new issuing root at every start
    assert dns_query_a(pebble.dns_port, DOMAIN) == [LOOPBACK]  # DNS stayed up
    acme = acme_client(pebble)  # accounts did not survive; a new one works
    with http01_responder(pebble.http_port) as responses:
        assert order_http01(acme, DOMAIN, responses).body.status == messages.STATUS_VALID


def test_certificate_validity_is_configurable(tmp_path: Path) -> None:
    require_tool("pebble")
    with run_pebble(
        tmp_path, http_port=free_port(), tls_port=free_port(), cert_validity_seconds=3600
    ) as pebble:
        acme = acme_client(pebble)
        with http01_responder(pebble.http_port) as responses:
            order = order_http01(acme, DOMAIN, responses)
    leaf = split_pem_chain(order.fullchain_pem)[0]
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert abs(lifetime - datetime.timedelta(hours=1)) <= datetime.timedelta(seconds=2)


def test_external_account_binding_required(tmp_path: Path) -> None:
    require_tool("pebble")
    hmac_key = b64encode(b"k" * 32).decode()
    with run_pebble(
        tmp_path, http_port=free_port(), tls_port=free_port(), eab={"kid-1": hmac_key}
    ) as pebble:
        with pytest.raises(messages.Error) as refused:
            acme_client(pebble)
        assert refused.value.typ.endswith(":externalAccountRequired")
        acme_client(pebble, eab=("kid-1", hmac_key))
