"""Certificates and ACME account keys as PEM files on disk, written atomically.

Layout under the store folder (mode 0700)::

    <entry>/cert.pem, key.pem (0600), meta.json     one folder per certificate
    accounts/<sha256(directory url)[:16]>/account.key (0600), account.json

Files are written with :func:`smartroute.certs.disk.commit` (staged, fsync'd, renamed).
``meta.json`` is renamed last and holds the sha256 of ``cert.pem`` and ``key.pem``, so a
half-written or tampered entry is reported, never served. Plain blocking file I/O: call it from
a worker thread. A lock file serialises writers against readers, across threads and processes,
so a reader never sees a save half done.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from smartroute.certs.disk import (
    FOLDER_MODE,
    TEMP_SUFFIX,
    commit,
    file_lock,
    fsync_folder,
    private_folder,
)
from smartroute.certs.records import (
    StoredCertificate,
    StoreProblem,
    dns_names,
    normalize_domains,
    parse_chain,
    parse_key,
    same_public_key,
    uncovered,
)
from smartroute.errors import CertificateStoreError

__all__ = [
    "CertificateStore",
    "CertificateStoreError",
    "StoreProblem",
    "StoredCertificate",
    "entry_name",
]

CERT_FILE, KEY_FILE, META_FILE = "cert.pem", "key.pem", "meta.json"
ACCOUNT_KEY_FILE, ACCOUNT_META_FILE = "account.key", "account.json"
ACCOUNTS_FOLDER = "accounts"
KEY_MODE, CERT_MODE, META_MODE = 0o600, 0o644, 0o644
_META_FORMAT = 1
_MAX_PLAIN_NAME = 100
_PLAIN_DOMAIN = re.compile(
    r"(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*"
)
_RESERVED_NAMES = frozenset({ACCOUNTS_FOLDER})
_UTC = datetime.UTC


def entry_name(domains: Sequence[str]) -> str:
    """The folder name of a domain set: readable when it can be, hashed when it must be.

    Plain names join hostname-shaped domains with ``+`` (``*`` spelled ``_wildcard_``). Long
    sets, odd characters and reserved names become ``<first domain>~<16 hex of sha256>``;
    ``~`` never occurs in a plain name, so the two forms cannot collide.
    """
    names = normalize_domains(domains)
    plain = "+".join(d.replace("*", "_wildcard_", 1) for d in names)
    if (
        all(_PLAIN_DOMAIN.fullmatch(d) for d in names)
        and len(plain) <= _MAX_PLAIN_NAME
        and plain not in _RESERVED_NAMES
    ):
        return plain
    digest = hashlib.sha256(json.dumps(list(names)).encode()).hexdigest()[:16]
    first = re.sub(r"[^a-z0-9._-]", "-", names[0].replace("*", "_wildcard_"))[:60].lstrip(".")
    return f"{first or 'cert'}~{digest}"


class CertificateStore:
    """Certificates (one folder per domain set) and ACME account keys under ``folder``."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder).absolute()
        os.makedirs(self.folder, mode=FOLDER_MODE, exist_ok=True)
        private_folder(self.folder)

    def __repr__(self) -> str:
        return f"CertificateStore({str(self.folder)!r})"

    # -- certificates ---------------------------------------------------------------------------

    def save(
        self, domains: Sequence[str], cert_pem: str, key_pem: str, *, source: str
    ) -> StoredCertificate:
        """Validate and store a certificate for ``domains``, replacing any previous one."""
        names = normalize_domains(domains)
        leaf = parse_chain(cert_pem)
        key = parse_key(key_pem, "the private key")
        if not same_public_key(key, leaf):
            raise CertificateStoreError("the private key does not match the certificate")
        missing = uncovered(names, leaf)
        if missing:
            raise CertificateStoreError(
                f"the certificate does not cover {', '.join(missing)}"
                f" (its DNS names: {', '.join(sorted(dns_names(leaf))) or 'none'})"
            )
        cert_bytes, key_bytes = cert_pem.encode(), key_pem.encode()
        stored_at = datetime.datetime.now(_UTC)
        meta = {
            "format": _META_FORMAT,
            "domains": list(names),
            "not_before": leaf.not_valid_before_utc.isoformat(),
            "not_after": leaf.not_valid_after_utc.isoformat(),
            "issuer": leaf.issuer.rfc4514_string(),
            "source": source,
            "stored_at": stored_at.isoformat(),
            "cert_sha256": _sha256(cert_bytes),
            "key_sha256": _sha256(key_bytes),
        }
        entry = self.folder / entry_name(names)
        with self._lock(exclusive=True):
            self._clean_temp_files()
            os.makedirs(entry, mode=FOLDER_MODE, exist_ok=True)
            private_folder(entry)
            # The key goes first: a failure before the certificate moves leaves the old entry
            # intact, and meta.json goes last because it is what vouches for the other two.
            commit(
                entry,
                [
                    (KEY_FILE, key_bytes, KEY_MODE),
                    (CERT_FILE, cert_bytes, CERT_MODE),
                    (META_FILE, _json_bytes(meta), META_MODE),
                ],
            )
        return StoredCertificate.describe(
            names, cert_pem, key_pem, leaf, source, stored_at, _files(entry)
        )

    def load(self) -> tuple[list[StoredCertificate], list[StoreProblem]]:
        """Every entry, sorted by folder name; broken ones come back as problems, not entries.

        Expired certificates are entries: whether to serve or renew them is the caller's call.
        """
        certificates: list[StoredCertificate] = []
        problems: list[StoreProblem] = []
        with self._lock(exclusive=False):
            for path in sorted(self.folder.iterdir()):
                if path.name.startswith(".") or path.name in _RESERVED_NAMES or not path.is_dir():
                    continue
                try:
                    certificates.append(_read_entry(path))
                except _Broken as exc:
                    problems.append(StoreProblem(path.name, str(exc)))
        return certificates, problems

    def get(self, domains: Sequence[str]) -> StoredCertificate | None:
        """The intact entry for exactly this domain set (in any order), else None."""
        names = normalize_domains(domains)
        entry = self.folder / entry_name(names)
        with self._lock(exclusive=False):
            if not entry.is_dir():
                return None
            try:
                stored = _read_entry(entry)
            except _Broken:
                return None
        return stored if stored.domains == names else None

    def remove(self, domains: Sequence[str]) -> None:
        """Delete the entry for this domain set; a missing entry is not an error."""
        entry = self.folder / entry_name(domains)
        with self._lock(exclusive=True):
            if not entry.is_dir():
                return
            # meta.json first: an interrupted removal is a half-written entry, never a bad pair.
            (entry / META_FILE).unlink(missing_ok=True)
            fsync_folder(entry)
            shutil.rmtree(entry)
            fsync_folder(self.folder)

    # -- ACME accounts --------------------------------------------------------------------------

    def load_account(self, directory_url: str) -> tuple[str, dict[str, Any]] | None:
        """The account key PEM and metadata stored for this directory, or None if there is none.

        Raises CertificateStoreError when an account is stored but unusable.
        """
        folder = self._account_folder(directory_url)
        with self._lock(exclusive=False):
            try:
                raw_meta = (folder / ACCOUNT_META_FILE).read_bytes()
            except FileNotFoundError:
                return None  # nothing stored, or a save that never finished
            try:
                key_bytes = (folder / ACCOUNT_KEY_FILE).read_bytes()
            except FileNotFoundError:
                raise CertificateStoreError(f"{folder}: {ACCOUNT_KEY_FILE} is missing") from None
        try:
            record = json.loads(raw_meta)
        except ValueError:
            raise CertificateStoreError(f"{folder}: {ACCOUNT_META_FILE} is not JSON") from None
        if not (isinstance(record, dict) and isinstance(record.get("meta"), dict)):
            raise CertificateStoreError(f"{folder}: {ACCOUNT_META_FILE} lacks 'meta'")
        if record.get("directory_url") != directory_url:
            return None  # a different directory whose hash prefix collides
        if record.get("key_sha256") != _sha256(key_bytes):
            raise CertificateStoreError(
                f"{folder}: {ACCOUNT_KEY_FILE} does not match the hash in {ACCOUNT_META_FILE}"
            )
        key_pem = _decode(key_bytes, ACCOUNT_KEY_FILE, CertificateStoreError)
        parse_key(key_pem, f"{folder / ACCOUNT_KEY_FILE}")
        meta: dict[str, Any] = record["meta"]
        return key_pem, meta

    def save_account(self, directory_url: str, key_pem: str, meta: Mapping[str, Any]) -> None:
        """Store the account key (0600) and its metadata (``uri``, ``email``, ...)."""
        parse_key(key_pem, "the account key")
        key_bytes = key_pem.encode()
        record = {
            "format": _META_FORMAT,
            "directory_url": directory_url,
            "key_sha256": _sha256(key_bytes),
            "saved_at": datetime.datetime.now(_UTC).isoformat(),
            "meta": dict(meta),
        }
        try:
            record_bytes = _json_bytes(record)
        except (TypeError, ValueError) as exc:
            raise CertificateStoreError(
                f"account metadata is not JSON-serialisable: {exc}"
            ) from None
        folder = self._account_folder(directory_url)
        with self._lock(exclusive=True):
            self._clean_temp_files()
            for path in (folder.parent, folder):
                os.makedirs(path, mode=FOLDER_MODE, exist_ok=True)
                private_folder(path)
            commit(
                folder,
                [
                    (ACCOUNT_KEY_FILE, key_bytes, KEY_MODE),
                    (ACCOUNT_META_FILE, record_bytes, META_MODE),
                ],
            )

    # -- internals ------------------------------------------------------------------------------

    def _account_folder(self, directory_url: str) -> Path:
        return self.folder / ACCOUNTS_FOLDER / _sha256(directory_url.encode())[:16]

    def _clean_temp_files(self) -> None:
        """Remove temp files a crashed save left behind (called with the write lock held)."""
        folders = _subfolders(self.folder)
        accounts = self.folder / ACCOUNTS_FOLDER
        if accounts.is_dir():
            folders += _subfolders(accounts)
        for folder in folders:
            for path in folder.iterdir():
                if path.name.endswith(TEMP_SUFFIX) and path.is_file():
                    path.unlink(missing_ok=True)
            if not any(folder.iterdir()):
                folder.rmdir()  # a first save that died before anything was renamed

    @contextlib.contextmanager
    def _lock(self, *, exclusive: bool) -> Iterator[None]:
        with file_lock(self.folder / ".lock", exclusive):
            yield


def _subfolders(folder: Path) -> list[Path]:
    return [
        p
        for p in folder.iterdir()
        if not p.name.startswith(".") and p.is_dir() and not p.is_symlink()
    ]


class _Broken(Exception):
    """Why one entry cannot be used; becomes a StoreProblem's reason."""


def _read_entry(entry: Path) -> StoredCertificate:
    """Read and check one entry folder; raises _Broken with the reason."""
    contents: dict[str, bytes] = {}
    for name in (META_FILE, CERT_FILE, KEY_FILE):
        try:
            contents[name] = (entry / name).read_bytes()
        except FileNotFoundError:
            suffix = " (half-written entry)" if name == META_FILE else ""
            raise _Broken(f"{name} missing{suffix}") from None
        except OSError as exc:
            raise _Broken(f"{name} cannot be read: {exc.strerror}") from None
    try:
        meta = json.loads(contents[META_FILE])
    except ValueError:
        raise _Broken(f"{META_FILE} is not valid JSON") from None
    if not isinstance(meta, dict):
        raise _Broken(f"{META_FILE} is not a JSON object")
    domains = _field(meta, "domains", list)
    if not domains or not all(isinstance(d, str) and d for d in domains):
        raise _Broken(f"{META_FILE} field 'domains' is not a list of domain names")
    names = normalize_domains(domains)
    if entry_name(names) != entry.name:
        raise _Broken(f"the folder name does not match the domains in {META_FILE}")
    for name, hash_key in ((CERT_FILE, "cert_sha256"), (KEY_FILE, "key_sha256")):
        if _field(meta, hash_key, str) != _sha256(contents[name]):
            raise _Broken(
                f"{name} does not match its hash in {META_FILE} (half-written or corrupt entry)"
            )
    source = _field(meta, "source", str)
    stored_at = _time_field(meta, "stored_at")
    not_after = _time_field(meta, "not_after")
    cert_pem = _decode(contents[CERT_FILE], CERT_FILE, _Broken)
    key_pem = _decode(contents[KEY_FILE], KEY_FILE, _Broken)
    try:
        leaf = parse_chain(cert_pem)
    except CertificateStoreError:
        raise _Broken(f"{CERT_FILE} does not hold a valid PEM certificate") from None
    try:
        key = parse_key(key_pem, KEY_FILE)
    except CertificateStoreError:
        raise _Broken(f"{KEY_FILE} does not hold an unencrypted PEM private key") from None
    if not same_public_key(key, leaf):
        raise _Broken("key does not match the certificate")
    missing = uncovered(names, leaf)
    if missing:
        raise _Broken(f"the certificate does not cover {', '.join(missing)}")
    if not_after != leaf.not_valid_after_utc:
        raise _Broken(f"not_after in {META_FILE} differs from the certificate's")
    return StoredCertificate.describe(
        names, cert_pem, key_pem, leaf, source, stored_at, _files(entry)
    )


def _files(entry: Path) -> tuple[Path, Path]:
    """Where an entry keeps its certificate chain and its key."""
    return entry / CERT_FILE, entry / KEY_FILE


def _field(meta: dict[str, Any], key: str, kind: type) -> Any:
    if key not in meta:
        raise _Broken(f"{META_FILE} lacks {key!r}")
    value = meta[key]
    if not isinstance(value, kind):
        raise _Broken(f"{META_FILE} field {key!r} is not a {kind.__name__}")
    return value


def _time_field(meta: dict[str, Any], key: str) -> datetime.datetime:
    try:
        value = datetime.datetime.fromisoformat(_field(meta, key, str))
    except ValueError:
        raise _Broken(f"{META_FILE} field {key!r} is not an ISO 8601 time") from None
    if value.tzinfo is None:
        raise _Broken(f"{META_FILE} field {key!r} has no time zone")
    return value.astimezone(_UTC)


def _decode(data: bytes, name: str, error: type[Exception]) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise error(f"{name} is not PEM text") from None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_bytes(value: Mapping[str, Any]) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
