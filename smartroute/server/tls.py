"""TLS termination: choosing a certificate by SNI, building contexts, and the handshake itself.

The proxy reads the ClientHello before it decides to terminate (it routes by SNI), so those
bytes are no longer on the socket. :func:`accept_tls` still uses the public
``loop.start_tls``, on asyncio's loop and on uvloop alike, and hands the consumed bytes to the
TLS protocol that ``start_tls`` installs before the socket is read again.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import os
import ssl
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

# TlsHandshakeError and CertificateLoadError live in smartroute.errors now; re-exported here.
from smartroute.errors import CertificateLoadError, TlsHandshakeError
from smartroute.routing.model import CertificatePair, TlsSettings
from smartroute.routing.patterns import normalize_host

__all__ = [
    "CertificateIndex",
    "CertificateLoadError",
    "TlsHandshakeError",
    "accept_tls",
    "backend_context",
    "backend_server_name",
    "build_server_context",
]

SHUTDOWN_TIMEOUT = 10.0
"""Seconds a closing TLS connection waits for the peer's close_notify before it is dropped."""
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
    Server contexts are built on first use and cached per (certificate, ALPN list).
    """

    def __init__(self, pairs: Iterable[CertificatePair] = ()) -> None:
        self._entries: dict[CertificatePair, _Entry] = {}  # insertion order: the first is default
        self._exact: dict[str, list[_Entry]] = {}
        self._wildcard: dict[str, list[_Entry]] = {}  # by the suffix after "*."
        self._loose: dict[CertificatePair, _Entry] = {}  # parsed `preferred` pairs not indexed
        self._contexts: dict[tuple[CertificatePair, tuple[str, ...]], ssl.SSLContext] = {}
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
        self, sni: str | None, preferred: CertificatePair | None = None
    ) -> CertificatePair | None:
        """The certificate to present for ``sni``.

        ``preferred`` (the route's own certificate) wins when it covers the name; then an exact
        name, then a one-label wildcard; then ``preferred`` anyway, then the default, else None.
        """
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
        if preferred is not None:
            return preferred
        return self.default

    def server_context(
        self, pair: CertificatePair, *, alpn: tuple[str, ...] = ()
    ) -> ssl.SSLContext:
        """The server context for ``pair`` offering ``alpn``, built once and reused."""
        key = (pair, alpn)
        context = self._contexts.get(key)
        if context is None:
            label = self._entry(pair).label
            context = self._contexts[key] = build_server_context(pair, alpn=alpn, label=label)
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


def build_server_context(
    pair: CertificatePair, *, alpn: tuple[str, ...] = (), label: str | None = None
) -> ssl.SSLContext:
    """A fresh TLS 1.2+ server context presenting ``pair`` (uncached; see the index)."""
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


def tls_reason(exc: BaseException) -> str:
    """A short reason that cannot carry key material (OpenSSL's reason code, or the type)."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def backend_server_name(
    tls: TlsSettings, client_sni: str | None, target_host: str | None
) -> str | None:
    """The name sent as SNI to a re-encrypted target and verified in its certificate."""
    return tls.backend_server_name or client_sni or target_host or None


def backend_context(tls: TlsSettings, *, alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
    """The client context for ``terminate-and-reencrypt`` targets, shared per settings.

    Verifies against the system store by default, against ``backend_ca`` alone when given, and
    not at all when ``backend_verify`` is False (an explicit opt-out).
    """
    return _backend_context(tls.backend_verify, tls.backend_ca, alpn)


@functools.lru_cache(maxsize=64)
def _backend_context(verify: bool, ca_pem: str | None, alpn: tuple[str, ...]) -> ssl.SSLContext:
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
    return context


AppProtocol = asyncio.Protocol | asyncio.BufferedProtocol


async def accept_tls(
    transport: asyncio.Transport,
    app_protocol: AppProtocol,
    context: ssl.SSLContext,
    initial: bytes,
    *,
    handshake_timeout: float,
    shutdown_timeout: float = SHUTDOWN_TIMEOUT,
) -> asyncio.Transport:
    """Run the server side of a TLS handshake whose first bytes were already read.

    ``transport`` must be paused (no byte may reach its current protocol any more). ``initial``
    (the ClientHello and anything after it) is replayed into the TLS layer, then the socket is
    read again. On success ``app_protocol.connection_made`` has been called with the returned
    transport, and decrypted data may follow at once. On failure the connection is closed and
    :class:`TlsHandshakeError` raised.

    How the replay works, the same on asyncio's loop and on uvloop: ``loop.start_tls`` sets its
    TLS protocol on the transport *before* its first ``await`` and only then queues (with
    ``call_soon``) the handshake start and ``resume_reading``. A callback queued before calling
    it therefore runs after the protocol is installed and before the socket is polled again,
    and gives that protocol the consumed bytes as if it had just read them.
    """
    loop = asyncio.get_running_loop()
    if transport.is_closing():
        raise TlsHandshakeError("connection closed before the TLS handshake")
    transport.pause_reading()  # the caller should have; nothing may reach the old protocol
    handover = _Handover()
    loop.call_soon(_replay, transport, transport.get_protocol(), initial)
    try:
        secure = await loop.start_tls(
            transport,
            handover,
            context,
            server_side=True,
            ssl_handshake_timeout=handshake_timeout,
            ssl_shutdown_timeout=shutdown_timeout,
        )
    except asyncio.CancelledError:
        transport.abort()
        raise
    except Exception as exc:
        transport.abort()  # usually closed by the TLS layer already; abort is idempotent
        raise TlsHandshakeError(handshake_reason(exc, handshake_timeout)) from None
    if secure is None or secure.get_extra_info("ssl_object") is None:
        # connection_lost(None) during the handshake wakes start_tls without an error (and
        # asyncio's then returns None).
        transport.abort()
        raise TlsHandshakeError("connection closed during the TLS handshake")
    secure.set_protocol(app_protocol)
    app_protocol.connection_made(secure)
    handover.hand_over(app_protocol)
    return secure


def _replay(transport: asyncio.Transport, peeking: asyncio.BaseProtocol, data: bytes) -> None:
    """Give ``data`` to the TLS protocol ``start_tls`` has just set on ``transport``."""
    if transport.is_closing():
        return  # start_tls failed or was cancelled; it has closed the transport
    protocol = transport.get_protocol()
    if protocol is peeking:
        # start_tls did not install its protocol synchronously (no asyncio or uvloop version
        # does this): the bytes have nowhere to go, so the handshake cannot succeed.
        transport.abort()
        return
    _deliver(protocol, data)


class _Handover(asyncio.Protocol):
    """The protocol given to ``start_tls``: keeps what arrives until the handover.

    ``start_tls`` never calls ``connection_made`` on its protocol, and asyncio's TLS layer
    passes the first decrypted bytes (and EOF, or the connection's loss) to it as soon as the
    handshake completes, before :func:`accept_tls` runs again. They wait here; ``hand_over``
    then passes them on, after ``connection_made``, in their order. Anything that still reaches
    this object after the handover (a ``connection_lost`` queued before it) is passed on.
    """

    def __init__(self) -> None:
        self._target: AppProtocol | None = None
        self._chunks: list[bytes] = []
        self._eof = False
        self._lost: tuple[Exception | None] | None = None

    def data_received(self, data: bytes) -> None:
        if self._target is not None:
            _deliver(self._target, data)
        else:
            self._chunks.append(data)

    def eof_received(self) -> bool | None:
        if self._target is not None:
            return self._target.eof_received()
        self._eof = True
        return None  # TLS closes after close_notify whatever the protocol answers

    def connection_lost(self, exc: Exception | None) -> None:
        if self._target is not None:
            self._target.connection_lost(exc)
        else:
            self._lost = (exc,)

    def hand_over(self, protocol: AppProtocol) -> None:
        """Make ``protocol`` the receiver and give it what arrived so far."""
        self._target = protocol
        chunks, self._chunks = self._chunks, []
        for chunk in chunks:
            _deliver(protocol, chunk)
        if self._eof:
            protocol.eof_received()
        if self._lost is not None:
            protocol.connection_lost(self._lost[0])


def _deliver(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Deliver ``data`` to ``protocol`` as a transport that had just read it would."""
    if isinstance(protocol, asyncio.Protocol):
        if data:
            protocol.data_received(data)
        return
    # A buffered protocol: asyncio's own, or uvloop's TLS protocol, which has the same methods
    # without being an asyncio class (the loops themselves recognise it by its methods).
    buffered = cast(asyncio.BufferedProtocol, protocol)
    view = memoryview(data)
    while view:
        buffer = memoryview(buffered.get_buffer(len(view)))
        size = min(len(buffer), len(view))
        if not size:
            raise RuntimeError(f"{protocol!r} offered an empty buffer")
        buffer[:size] = view[:size]
        buffered.buffer_updated(size)
        view = view[size:]


def handshake_reason(exc: BaseException, timeout: float) -> str:
    """Why a TLS handshake failed, for the connection's record (no key material)."""
    if isinstance(exc, ssl.SSLEOFError):
        return "connection closed during the TLS handshake"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {tls_reason(exc)}"
    if isinstance(exc, ConnectionAbortedError):  # SSLProtocol's handshake timer
        return f"TLS handshake timed out after {timeout:g}s"
    if isinstance(exc, OSError):
        return "connection closed during the TLS handshake"
    return f"TLS handshake failed: {type(exc).__name__}"
