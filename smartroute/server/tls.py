"""TLS termination: choosing a certificate by SNI and building the server and backend contexts.

The handshakes themselves run in :mod:`smartroute.server.tls_accept` (``loop.start_tls``) and
:mod:`smartroute.server.tls_transport` (routes that verify client certificates); their entry
points are re-exported here.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import os
import ssl
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

# TlsHandshakeError and CertificateLoadError live in smartroute.errors now; re-exported here.
from smartroute.errors import CertificateLoadError, TlsHandshakeError
from smartroute.routing.model import CertificatePair, ClientAuth, TlsSettings
from smartroute.routing.patterns import normalize_host
from smartroute.server.client_certs import ask_for_client_certificates
from smartroute.server.tls_accept import (
    SHUTDOWN_TIMEOUT,
    AppProtocol,
    Handover,
    accept_tls,
    handshake_reason,
    tls_reason,
)

__all__ = [
    "SHUTDOWN_TIMEOUT",
    "AppProtocol",
    "CertificateIndex",
    "CertificateLoadError",
    "TlsHandshakeError",
    "accept_tls",
    "backend_context",
    "backend_server_name",
    "build_server_context",
    "connect_target",
    "handshake_reason",
    "tls_reason",
]

# TLS 1.2 suites offered to clients: forward secrecy and AEAD only (no CBC, no RSA key
# exchange, no SHA-1), as in common "intermediate" server profiles.
MODERN_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL"


@dataclass(frozen=True, slots=True)
class _Entry:
    """What the index knows about one certificate, parsed once."""

    pair: CertificatePair
    names: frozenset[str]  # normalised DNS names, wildcards as "*.example.com"
    not_after: datetime.datetime
    label: str  # for messages: subject and paths, never key material

    def covers(self, host: str) -> bool:
        if host in self.names:
            return True
        parent = _parent(host)
        return parent is not None and "*." + parent in self.names


def _parent(host: str) -> str | None:
    """``a.b.c`` -> ``b.c``: what a one-label-deep wildcard must name (RFC 6125 6.4.3)."""
    head, dot, rest = host.partition(".")
    return rest if dot and head and rest else None


def _label(pair: CertificatePair, subject: str | None) -> str:
    parts = [f"subject {subject!r}" if subject else "certificate"]
    if pair.cert_path:
        parts.append(f"from {pair.cert_path}")
    if pair.key_path:
        parts.append(f"key {pair.key_path}")
    return " ".join(parts)


def _parse(pair: CertificatePair) -> _Entry:
    """Parse the leaf certificate and check that the key belongs to it."""
    where = _label(pair, None)
    try:
        cert = x509.load_pem_x509_certificate(pair.cert_pem.encode())
    except ValueError:
        raise CertificateLoadError(f"{where}: not a PEM certificate") from None
    subject_cn = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    where = _label(pair, cert.subject.rfc4514_string())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        raw_names: list[str] = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        raw_names = [str(cn) for cn in subject_cn]
    names = frozenset(n for n in (normalize_host(raw) for raw in raw_names) if _usable_name(n))
    try:
        key = serialization.load_pem_private_key(pair.key_pem.encode(), password=None)
    except (ValueError, TypeError):
        # The library's message may quote what it choked on: say only what went wrong.
        raise CertificateLoadError(
            f"{where}: the private key is not an unencrypted PEM key"
        ) from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, public) != cert.public_key().public_bytes(der, public):
        raise CertificateLoadError(f"{where}: the private key does not match the certificate")
    return _Entry(pair, names, cert.not_valid_after_utc, where)


def _usable_name(name: str) -> bool:
    """Exact names, and wildcards that are a whole leftmost label over at least two labels."""
    if not name:
        return False
    if name.startswith("*."):
        suffix = name[2:]
        return "*" not in suffix and "." in suffix and all(suffix.split("."))
    return "*" not in name


class CertificateIndex:
    """Every certificate the proxy can present, indexed by the names it covers.

    Each certificate is parsed once, when added. When several certificates cover one name the
    one that expires last wins, so adding a renewed certificate before removing the old one works.
    Server contexts are built on first use and cached per (certificate, ALPN list, client CA
    and mode).
    """

    def __init__(self, pairs: Iterable[CertificatePair] = ()) -> None:
        self._entries: dict[CertificatePair, _Entry] = {}  # insertion order: the first is default
        self._exact: dict[str, list[_Entry]] = {}
        self._wildcard: dict[str, list[_Entry]] = {}  # by the suffix after "*."
        self._loose: dict[CertificatePair, _Entry] = {}  # parsed `preferred` pairs not indexed
        self._contexts: dict[_ContextKey, ssl.SSLContext] = {}
        for pair in pairs:
            self.add(pair)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, pair: object) -> bool:
        return pair in self._entries

    def __iter__(self) -> Iterator[CertificatePair]:
        return iter(self._entries)

    @property
    def default(self) -> CertificatePair | None:
        """The first certificate added (and still present): served to clients without a match."""
        return next(iter(self._entries), None)

    def describe(self) -> list[dict[str, object]]:
        """Every certificate served, for operators: its names, subject, expiry (Unix time) and
        the files it came from (never key material)."""
        return [
            {
                "names": sorted(entry.names),
                "label": entry.label,
                "not_after": entry.not_after.timestamp(),
                "cert_path": entry.pair.cert_path,
            }
            for entry in self._entries.values()
        ]

    def names(self, pair: CertificatePair) -> frozenset[str]:
        """The normalised DNS names ``pair`` covers (wildcards as ``*.example.com``)."""
        return self._entry(pair).names

    def add(self, pair: CertificatePair) -> None:
        """Index one certificate; adding one that is already present does nothing.

        Raises :class:`CertificateLoadError` when the certificate or key is unusable.
        """
        if pair in self._entries:
            return
        self._insert(self._loose.pop(pair) if pair in self._loose else _parse(pair))

    def remove(self, pair: CertificatePair) -> None:
        """Forget one certificate and its cached contexts; unknown pairs are ignored."""
        entry = self._entries.pop(pair, None)
        if entry is None:
            return
        for table, key in self._keys(entry):
            bucket = table[key]
            bucket.remove(entry)
            if not bucket:
                del table[key]
        for cached in [k for k in self._contexts if k[0] == pair]:
            del self._contexts[cached]

    def replace(self, pairs: Iterable[CertificatePair]) -> None:
        """Swap in a new set of certificates, all or nothing; known ones are not parsed again."""
        wanted = list(dict.fromkeys(pairs))
        entries = [self._entries.get(p) or self._loose.get(p) or _parse(p) for p in wanted]
        self._entries.clear()
        self._exact.clear()
        self._wildcard.clear()
        self._loose.clear()
        for entry in entries:
            self._insert(entry)
        keep = set(wanted)
        self._contexts = {k: v for k, v in self._contexts.items() if k[0] in keep}

    def select(
        self, sni: str | None, certificate: CertificatePair | str | None = None
    ) -> CertificatePair | None:
        """The certificate to present for ``sni`` on a route whose ``tls.certificate`` is
        ``certificate`` (a pair, ``"auto"``, ``"on-demand"`` or None).

        The route's own pair wins when it covers the name; then an exact name, then a one-label
        wildcard; then the route's pair anyway, then the default, else None. An on-demand route
        gets only a certificate for the name itself (None until one is obtained).
        """
        preferred = certificate if not isinstance(certificate, str) else None
        host = normalize_host(sni) if sni else ""
        if host:
            if preferred is not None and self._entry(preferred).covers(host):
                return preferred
            found = self._exact.get(host)
            parent = _parent(host)
            if not found and parent is not None:
                found = self._wildcard.get(parent)
            if found:
                return max(found, key=_expiry).pair
            if certificate == "on-demand":
                return None
        if preferred is not None:
            return preferred
        return self.default

    def server_context(
        self,
        pair: CertificatePair,
        *,
        alpn: tuple[str, ...] = (),
        client_ca: str | None = None,
        client_auth: ClientAuth | None = None,
    ) -> ssl.SSLContext:
        """The server context for ``pair`` offering ``alpn`` (and asking for client
        certificates signed by ``client_ca``, see :func:`build_server_context`), built once and
        reused."""
        key = (pair, alpn, client_ca, client_auth)
        context = self._contexts.get(key)
        if context is None:
            label = self._entry(pair).label
            context = self._contexts[key] = build_server_context(
                pair, alpn=alpn, label=label, client_ca=client_ca, client_auth=client_auth
            )
        return context

    def _entry(self, pair: CertificatePair) -> _Entry:
        entry = self._entries.get(pair) or self._loose.get(pair)
        if entry is None:
            entry = self._loose[pair] = _parse(pair)
        return entry

    def _insert(self, entry: _Entry) -> None:
        self._entries[entry.pair] = entry
        for table, key in self._keys(entry):
            table.setdefault(key, []).append(entry)

    def _keys(self, entry: _Entry) -> Iterator[tuple[dict[str, list[_Entry]], str]]:
        for name in entry.names:
            if name.startswith("*."):
                yield self._wildcard, name[2:]
            else:
                yield self._exact, name


def _expiry(entry: _Entry) -> datetime.datetime:
    return entry.not_after


_ContextKey = tuple[CertificatePair, tuple[str, ...], str | None, ClientAuth | None]


def build_server_context(
    pair: CertificatePair,
    *,
    alpn: tuple[str, ...] = (),
    label: str | None = None,
    client_ca: str | None = None,
    client_auth: ClientAuth | None = None,
) -> ssl.SSLContext:
    """A fresh TLS 1.2+ server context presenting ``pair`` (uncached; see the index); with
    ``client_ca`` it asks clients for a certificate that CA signed (``client_auth``: required,
    the default, or optional)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(MODERN_TLS12_CIPHERS)  # TLS 1.3 suites are all modern already
    for name in ("OP_NO_COMPRESSION", "OP_CIPHER_SERVER_PREFERENCE", "OP_NO_RENEGOTIATION"):
        context.options |= getattr(ssl, name, 0)
    if alpn:
        context.set_alpn_protocols(list(alpn))
    try:
        _load_chain(context, pair.cert_pem.rstrip("\n") + "\n" + pair.key_pem)
    except (ssl.SSLError, OSError, ValueError) as exc:
        what = label or _label(pair, None)
        raise CertificateLoadError(f"{what}: cannot load into TLS ({tls_reason(exc)})") from None
    if client_ca is not None:
        try:
            ask_for_client_certificates(context, client_ca, client_auth or "required")
        except (ssl.SSLError, ValueError) as exc:
            raise CertificateLoadError(
                f"client_ca: not a PEM CA certificate ({tls_reason(exc)})"
            ) from None
    return context


def _load_chain(context: ssl.SSLContext, text: str) -> None:
    """Load a PEM chain and key without leaving the key where anyone else could read it.

    ``load_cert_chain`` reads files. On Linux an anonymous memory file keeps the key off disk;
    elsewhere (or if /proc is not usable) a 0600 file in a fresh 0700 directory is removed as
    soon as it has been read.
    """
    if _load_from_memory(context, text):
        return
    with tempfile.TemporaryDirectory(prefix="smartroute-tls-") as folder:
        path = os.path.join(folder, "chain.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            context.load_cert_chain(path)
        finally:
            os.unlink(path)


def _load_from_memory(context: ssl.SSLContext, text: str) -> bool:
    """Load through a Linux memfd; False when that is not possible here (no memfd or /proc)."""
    if not hasattr(os, "memfd_create"):
        return False
    try:
        fd = os.memfd_create("smartroute-tls", os.MFD_CLOEXEC)
    except OSError:
        return False
    try:
        data = memoryview(text.encode())
        while data:
            data = data[os.write(fd, data) :]
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    except ssl.SSLError:
        raise
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def backend_server_name(
    tls: TlsSettings, client_sni: str | None, target_host: str | None
) -> str | None:
    """The name sent as SNI to a re-encrypted target and verified in its certificate."""
    return tls.backend_server_name or client_sni or target_host or None


def backend_context(tls: TlsSettings, *, alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
    """The client context for ``terminate-and-reencrypt`` targets, shared per settings.

    Verifies against the system store by default, against ``backend_ca`` alone when given, and
    not at all when ``backend_verify`` is False (an explicit opt-out); presents
    ``backend_client_certificate`` to targets that ask for one.
    """
    return _backend_context(
        tls.backend_verify, tls.backend_ca, alpn, tls.backend_client_certificate
    )


@functools.lru_cache(maxsize=64)
def _backend_context(
    verify: bool, ca_pem: str | None, alpn: tuple[str, ...], client: CertificatePair | None
) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem)
    except (ssl.SSLError, ValueError) as exc:
        raise CertificateLoadError(
            f"backend_ca: not a PEM CA certificate ({tls_reason(exc)})"
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(list(alpn))
    if client is not None:
        try:
            _load_chain(context, client.cert_pem.rstrip("\n") + "\n" + client.key_pem)
        except (ssl.SSLError, OSError, ValueError) as exc:
            what = _label(client, None)
            raise CertificateLoadError(
                f"backend_client_certificate ({what}): cannot load into TLS ({tls_reason(exc)})"
            ) from None
    return context


P = TypeVar("P", bound=AppProtocol)


async def connect_target(
    factory: Callable[[], P],
    host: str,
    port: int,
    *,
    context: ssl.SSLContext | None = None,
    sni: str | None = None,
    header: bytes = b"",
    handshake_timeout: float | None = None,
) -> tuple[asyncio.Transport, P]:
    """Connect to a target: plain, or TLS with ``context`` (naming ``sni``), the PROXY
    ``header`` (if any) first in both cases.

    Before TLS the header goes out on the plain connection, then the handshake starts on it
    (``loop.start_tls``), so the target reads the header, then the ClientHello: a smartroute
    (or HAProxy, nginx) in front of it learns the client's address before it terminates TLS.
    Raises OSError (``ssl.SSLError`` included) when the connection or the handshake fails;
    bound it with a timeout.
    """
    loop = asyncio.get_running_loop()
    if context is None or not header:
        transport, protocol = await loop.create_connection(
            factory,
            host,
            port,
            ssl=context,
            server_hostname=sni if context is not None else None,
            ssl_handshake_timeout=handshake_timeout if context is not None else None,
        )
        if header:
            transport.write(header)  # before any byte of the client's
        return transport, protocol
    plain, _ = await loop.create_connection(asyncio.Protocol, host, port)
    plain.write(header)
    handover = Handover()  # keeps what TLS delivers before the protocol is in place
    try:
        secure = await loop.start_tls(
            plain, handover, context, server_hostname=sni, ssl_handshake_timeout=handshake_timeout
        )
    except BaseException:
        plain.abort()
        raise
    if secure is None:  # the connection was lost during the handshake (asyncio's loop)
        plain.abort()
        raise ConnectionResetError("the target closed the connection during the TLS handshake")
    protocol = factory()
    secure.set_protocol(protocol)
    protocol.connection_made(secure)
    handover.hand_over(protocol)
    return secure, protocol
