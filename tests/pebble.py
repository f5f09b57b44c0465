"""A real ACME CA on loopback for end-to-end tests: Pebble, with pebble-challtestsrv as its DNS.

``run_pebble`` starts Debian's ``pebble`` (2.4) with a listener certificate made here, and
``pebble-challtestsrv`` as a DNS server that answers 127.0.0.1 for every name, so Pebble's
validation authority really connects to ``http_port`` (HTTP-01) and ``tls_port`` (TLS-ALPN-01)
on loopback: the proxy under test answers the challenges. For DNS-01, TXT records are published
through challtestsrv's management API at ``challtestsrv_url``. ``PEBBLE_VA_ALWAYS_VALID`` is
never set (and removed if inherited).

Facts about Pebble 2.4 this relies on:

- Config keys (``pebble`` section): listenAddress, managementListenAddress, certificate,
  privateKey, httpPort, tlsPort, ocspResponderURL, externalAccountBindingRequired,
  externalAccountMACKeys (kid -> base64url HMAC key), domainBlocklist and
  certificateValidityPeriod (seconds; the default is five years).
- Its issuing root and intermediate are generated at every start: after ``stop()`` and
  ``start()`` fetch ``root_pem()`` again.
- Its directory has no ``renewalInfo`` (no ARI).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import secrets
import socket
import ssl
import struct
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK = "127.0.0.1"
PEBBLE = "pebble"
CHALLTESTSRV = "pebble-challtestsrv"
READY_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0

# Fast and deterministic: no random validation sleeps, no random badNonce rejections, and
# orders almost always need a fresh validation (Pebble reuses valid authorizations 50% of the
# time by default). Almost: Pebble 2.4 makes a new authorization when rand.Intn(100) > the
# percentage, so at 0 it still reuses an account's valid one for the same name 1 time in 100
# (and a negative value falls back to 50). A test that needs a fresh validation of a name it
# already validated uses a new account.
DEFAULT_ENV = {
    "PEBBLE_VA_NOSLEEP": "1",
    "PEBBLE_WFE_NONCEREJECT": "0",
    "PEBBLE_AUTHZREUSE": "0",
}


class PebbleError(RuntimeError):
    """Pebble or pebble-challtestsrv did not start or answer as expected."""


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM, host: str = LOOPBACK) -> int:
    """A TCP (or UDP) port that was free a moment ago: bound with port 0, then released."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Pebble:
    """A running Pebble. ``stop()``/``start()`` simulate a CA outage; the DNS server stays up."""

    directory_url: str
    ca_bundle: str  # PEM that signs Pebble's HTTPS listener: what an ACME client must trust
    http_port: int  # where Pebble's VA connects for HTTP-01
    tls_port: int  # where Pebble's VA connects for TLS-ALPN-01
    management_url: str
    dns_port: int  # UDP port of pebble-challtestsrv's DNS server
    challtestsrv_url: str  # pebble-challtestsrv's management API (set-txt, clear-txt), plain HTTP
    log_path: Path  # Pebble's stdout and stderr, appended to across restarts
    _command: list[str] = field(repr=False)
    _env: dict[str, str] = field(repr=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start Pebble on the same ports with the same config; return once it answers.

        Pebble keeps no state across restarts: accounts, orders and its issuing root and
        intermediate are all new.
        """
        if self.running:
            raise PebbleError("pebble is already running")
        with self.log_path.open("ab") as log:
            offset = log.tell()
            self._process = subprocess.Popen(
                self._command, env=self._env, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            _wait_until(
                lambda: _https_ok(self.directory_url, self.ca_bundle),
                self._process,
                f"pebble did not answer {self.directory_url}",
                self.log_path,
                offset,
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop Pebble (not the DNS server) and wait for it to exit."""
        if self._process is not None:
            _terminate(self._process)
            self._process = None

    def root_pem(self) -> str:
        """The root that signs issued certificates (changes at every start)."""
        return self._management_get("/roots/0")

    def intermediate_pem(self) -> str:
        """The intermediate that signs issued certificates (changes at every start)."""
        return self._management_get("/intermediates/0")

    def _management_get(self, path: str) -> str:
        with urllib.request.urlopen(
            self.management_url + path, timeout=5, context=_client_context(self.ca_bundle)
        ) as response:
            body: bytes = response.read()
            return body.decode()


@contextlib.contextmanager
def run_pebble(
    tmp: Path,
    *,
    http_port: int,
    tls_port: int,
    eab: dict[str, str] | None = None,
    cert_validity_seconds: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[Pebble]:
    """Run pebble-challtestsrv and Pebble for the block; files (config, logs) go in ``tmp``.

    ``eab`` maps key ids to base64url HMAC keys and makes External Account Binding required.
    ``env`` adds to or overrides the ``PEBBLE_*`` variables in ``DEFAULT_ENV``.
    """
    ca_bundle, cert_path, key_path = _write_listener_certs(tmp)
    acme_port, management_port = free_port(), free_port()
    dns_port = free_port(socket.SOCK_DGRAM)
    settings: dict[str, object] = {
        "listenAddress": f"{LOOPBACK}:{acme_port}",
        "managementListenAddress": f"{LOOPBACK}:{management_port}",
        "certificate": str(cert_path),
        "privateKey": str(key_path),
        "httpPort": http_port,
        "tlsPort": tls_port,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": eab is not None,
    }
    if eab is not None:
        settings["externalAccountMACKeys"] = eab
    if cert_validity_seconds is not None:
        settings["certificateValidityPeriod"] = cert_validity_seconds
    config = tmp / "pebble.json"
    config.write_text(json.dumps({"pebble": settings}, indent=2))

    process_env = {k: v for k, v in os.environ.items() if not k.startswith("PEBBLE_")}
    process_env.update(DEFAULT_ENV)
    process_env.update(env or {})
    if "PEBBLE_VA_ALWAYS_VALID" in process_env:
        raise ValueError("PEBBLE_VA_ALWAYS_VALID defeats the purpose: validation must happen")

    challtestsrv_log = tmp / "challtestsrv.log"
    challtestsrv_port = free_port()
    dns = _start_challtestsrv(dns_port, challtestsrv_port, challtestsrv_log)
    try:
        pebble = Pebble(
            directory_url=f"https://{LOOPBACK}:{acme_port}/dir",
            ca_bundle=str(ca_bundle),
            http_port=http_port,
            tls_port=tls_port,
            management_url=f"https://{LOOPBACK}:{management_port}",
            dns_port=dns_port,
            challtestsrv_url=f"http://{LOOPBACK}:{challtestsrv_port}",
            log_path=tmp / "pebble.log",
            _command=[PEBBLE, "-config", str(config), "-dnsserver", f"{LOOPBACK}:{dns_port}"],
            _env=process_env,
        )
        try:
            pebble.start()
            yield pebble
        finally:
            pebble.stop()
    finally:
        _terminate(dns)


_TYPE_A, _TYPE_TXT = 1, 16


def dns_query_a(port: int, name: str, host: str = LOOPBACK, timeout: float = 2.0) -> list[str]:
    """Ask the DNS server at ``host:port`` over UDP for ``name``'s A records."""
    return [
        str(ipaddress.IPv4Address(data))
        for data in _dns_query(port, name, _TYPE_A, host, timeout)
        if len(data) == 4
    ]


def dns_query_txt(port: int, name: str, host: str = LOOPBACK, timeout: float = 2.0) -> list[str]:
    """Ask the DNS server at ``host:port`` over UDP for ``name``'s TXT records.

    Each record's character-strings are joined into one value, as ACME validation reads them.
    """
    values = []
    for data in _dns_query(port, name, _TYPE_TXT, host, timeout):
        parts, offset = [], 0
        while offset < len(data):  # each character-string: a length byte, then the bytes
            length = data[offset]
            parts.append(data[offset + 1 : offset + 1 + length])
            offset += 1 + length
        values.append(b"".join(parts).decode())
    return values


def _dns_query(port: int, name: str, qtype: int, host: str, timeout: float) -> list[bytes]:
    """The RDATA of every ``qtype`` record in the answer to one UDP question (class IN)."""
    query_id = secrets.randbits(16)
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".") if label)
    # Header: id, flags (RD), 1 question, no answer/authority/additional; then QTYPE, QCLASS IN.
    query = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + question + b"\0"
    query += struct.pack("!HH", qtype, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(query, (host, port))
        reply = sock.recv(4096)
    answer_id, flags, qdcount, ancount = struct.unpack_from("!HHHH", reply)
    if answer_id != query_id or flags & 0x000F:
        raise PebbleError(f"bad DNS reply for {name}: id {answer_id:#x}, flags {flags:#06x}")
    offset = 12
    for _ in range(qdcount):
        offset = _skip_name(reply, offset) + 4  # QTYPE, QCLASS
    found = []
    for _ in range(ancount):
        offset = _skip_name(reply, offset)
        rtype, _class, _ttl, length = struct.unpack_from("!HHIH", reply, offset)
        offset += 10
        if rtype == qtype:
            found.append(reply[offset : offset + length])
        offset += length
    return found


def _skip_name(message: bytes, offset: int) -> int:
    """The offset just past the (possibly compressed) domain name at ``offset``."""
    while True:
        length = message[offset]
        if length == 0:
            return offset + 1
        if length & 0xC0 == 0xC0:  # a pointer ends the name
            return offset + 2
        offset += 1 + length


def _start_challtestsrv(
    dns_port: int, management_port: int, log_path: Path
) -> subprocess.Popen[bytes]:
    # Only the DNS server and its management API: the HTTP-01, HTTPS and TLS-ALPN-01 responders
    # are disabled so the proxy under test owns http_port and tls_port.
    command = [
        CHALLTESTSRV,
        "-defaultIPv4", LOOPBACK,
        "-defaultIPv6", "",
        "-dns01", f"{LOOPBACK}:{dns_port}",
        "-http01", "",
        "-https01", "",
        "-tlsalpn01", "",
        "-management", f"{LOOPBACK}:{management_port}",
    ]  # fmt: skip
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_until(
            lambda: _dns_ok(dns_port) and _tcp_ok(management_port),
            process,
            f"pebble-challtestsrv did not answer DNS on {LOOPBACK}:{dns_port}"
            f" and its management API on {LOOPBACK}:{management_port}",
            log_path,
            0,
        )
    except BaseException:
        _terminate(process)
        raise
    return process


def _wait_until(
    ready: Callable[[], bool],
    process: subprocess.Popen[bytes],
    what: str,
    log_path: Path,
    log_offset: int,
) -> None:
    """Poll ``ready`` at short intervals for up to READY_TIMEOUT seconds."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if ready():
            return
        code = process.poll()
        if code is not None or time.monotonic() > deadline:
            status = f"exited with {code}" if code is not None else f"within {READY_TIMEOUT} s"
            with log_path.open("rb") as log:
                log.seek(log_offset)
                output = log.read().decode(errors="replace")
            raise PebbleError(f"{what} ({status}); its output:\n{output}")
        time.sleep(0.05)


def _https_ok(url: str, ca_bundle: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1, context=_client_context(ca_bundle)) as r:
            status: int = r.status
            return status == 200
    except (urllib.error.URLError, OSError):
        return False


def _dns_ok(port: int) -> bool:
    try:
        return dns_query_a(port, "ready.pebble.test", timeout=0.5) == [LOOPBACK]
    except OSError:
        return False


def _tcp_ok(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


def _client_context(ca_bundle: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_bundle)


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
            return
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


def _write_listener_certs(tmp: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost: (ca, cert, key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "smartroute Pebble listener CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.IPv4Address(LOOPBACK)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = (
        tmp / "pebble-listener-ca.pem",
        tmp / "pebble-listener.crt",
        tmp / "pebble-listener.key",
    )
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_path, cert_path, key_path
