"""Certificates and ACME account keys as PEM files on disk, written atomically.

Layout under the store folder (mode 0700)::

    <entry>/cert.pem, key.pem (0600), meta.json     one folder per certificate
    accounts/<sha256(directory url)[:16]>/account.key (0600), account.json
    challenges/, locks/                             FolderStorage's HTTP-01 answers and leases

Files are written with :func:`smartroute.certs.disk.commit` (staged, fsync'd, renamed).
``meta.json`` is renamed last and holds the sha256 of ``cert.pem`` and ``key.pem``, so a
half-written or tampered entry is reported, never served. Plain blocking file I/O: call it from
a worker thread. A lock file serialises writers against readers, across threads and processes,
so a reader never sees a save half done.

What an entry holds and how it is checked does not depend on files: :func:`prepare_entry` makes
the three contents of an entry and :func:`check_entry` checks them, for any storage that keeps
named byte strings (a folder here, a Redis hash in
:class:`~smartroute.certs.redis_storage.RedisStorage`); :func:`account_contents` and
:func:`check_account` do the same for account keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
    "BrokenEntry",
    "CertificateStore",
    "CertificateStoreError",
    "PreparedEntry",
    "StoreProblem",
    "StoredCertificate",
    "account_contents",
    "account_id",
    "check_account",
    "check_challenge_token",
    "check_entry",
    "entry_name",
    "prepare_entry",
]

CERT_FILE, KEY_FILE, META_FILE = "cert.pem", "key.pem", "meta.json"
ACCOUNT_KEY_FILE, ACCOUNT_META_FILE = "account.key", "account.json"
ACCOUNTS_FOLDER, CHALLENGES_FOLDER, LOCKS_FOLDER = "accounts", "challenges", "locks"
KEY_MODE, CERT_MODE, META_MODE = 0o600, 0o644, 0o644
_FILE_MODES = {
    KEY_FILE: KEY_MODE,
    CERT_FILE: CERT_MODE,
    META_FILE: META_MODE,
    ACCOUNT_KEY_FILE: KEY_MODE,
    ACCOUNT_META_FILE: META_MODE,
}
_META_FORMAT = 1
_MAX_PLAIN_NAME = 100
_PLAIN_DOMAIN = re.compile(
    r"(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*"
)
_RESERVED_NAMES = frozenset({ACCOUNTS_FOLDER, CHALLENGES_FOLDER, LOCKS_FOLDER})
_CHALLENGE_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,200}")
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
        prepared = prepare_entry(domains, cert_pem, key_pem, source=source)
        entry = self.folder / prepared.name
        with self.locked(exclusive=True):
            self._clean_temp_files()
            os.makedirs(entry, mode=FOLDER_MODE, exist_ok=True)
            private_folder(entry)
            # In prepare_entry's order: the key goes first, so a failure before the certificate
            # moves leaves the old entry intact, and meta.json last, as it vouches for the others.
            commit(entry, [(n, data, _FILE_MODES[n]) for n, data in prepared.contents.items()])
        cert_path, key_path = _files(entry)
        return dataclasses.replace(
            prepared.certificate, cert_path=str(cert_path), key_path=str(key_path)
        )

    def load(self) -> tuple[list[StoredCertificate], list[StoreProblem]]:
        """Every entry, sorted by folder name; broken ones come back as problems, not entries.

        Expired certificates are entries: whether to serve or renew them is the caller's call.
        """
        certificates: list[StoredCertificate] = []
        problems: list[StoreProblem] = []
        with self.locked(exclusive=False):
            for path in sorted(self.folder.iterdir()):
                if path.name.startswith(".") or path.name in _RESERVED_NAMES or not path.is_dir():
                    continue
                try:
                    certificates.append(_read_entry(path))
                except BrokenEntry as exc:
                    problems.append(StoreProblem(path.name, str(exc)))
        return certificates, problems

    def get(self, domains: Sequence[str]) -> StoredCertificate | None:
        """The intact entry for exactly this domain set (in any order), else None."""
        names = normalize_domains(domains)
        entry = self.folder / entry_name(names)
        with self.locked(exclusive=False):
            if not entry.is_dir():
                return None
            try:
                stored = _read_entry(entry)
            except BrokenEntry:
                return None
        return stored if stored.domains == names else None

    def remove(self, domains: Sequence[str]) -> None:
        """Delete the entry for this domain set; a missing entry is not an error."""
        entry = self.folder / entry_name(domains)
        with self.locked(exclusive=True):
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
        contents: dict[str, bytes] = {}
        with self.locked(exclusive=False):
            for name in (ACCOUNT_META_FILE, ACCOUNT_KEY_FILE):
                try:
                    contents[name] = (folder / name).read_bytes()
                except FileNotFoundError:
                    break  # check_account tells which one is missing and what that means
        return check_account(str(folder), directory_url, contents)

    def save_account(self, directory_url: str, key_pem: str, meta: Mapping[str, Any]) -> None:
        """Store the account key (0600) and its metadata (``uri``, ``email``, ...)."""
        contents = account_contents(directory_url, key_pem, meta)
        folder = self._account_folder(directory_url)
        with self.locked(exclusive=True):
            self._clean_temp_files()
            for path in (folder.parent, folder):
                os.makedirs(path, mode=FOLDER_MODE, exist_ok=True)
                private_folder(path)
            commit(folder, [(n, data, _FILE_MODES[n]) for n, data in contents.items()])

    # -- the store-wide lock --------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, *, exclusive: bool) -> Iterator[None]:
        """Hold the store's flock: shared to read, exclusive to write (across processes).

        Not re-entrant: a thread holding it must not take it again.
        """
        with file_lock(self.folder / ".lock", exclusive):
            yield

    # -- internals ------------------------------------------------------------------------------

    def _account_folder(self, directory_url: str) -> Path:
        return self.folder / ACCOUNTS_FOLDER / account_id(directory_url)

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
            if folder.name not in _RESERVED_NAMES and not any(folder.iterdir()):
                folder.rmdir()  # a first save that died before anything was renamed


def _subfolders(folder: Path) -> list[Path]:
    return [
        p
        for p in folder.iterdir()
        if not p.name.startswith(".") and p.is_dir() and not p.is_symlink()
    ]


class BrokenEntry(Exception):
    """Why one entry cannot be used; becomes a StoreProblem's reason."""


@dataclasses.dataclass(frozen=True, slots=True)
class PreparedEntry:
    """A checked certificate ready to be written: its entry name, the contents of its three
    parts in the order a folder writes them (key, certificate, then meta.json, which vouches
    for the other two), and the record it becomes once stored (without file paths)."""

    name: str
    contents: Mapping[str, bytes]
    certificate: StoredCertificate


def prepare_entry(
    domains: Sequence[str], cert_pem: str, key_pem: str, *, source: str
) -> PreparedEntry:
    """Check a chain and key for ``domains`` and make the contents of their entry.

    The one place that writes the ``meta.json`` format; raises CertificateStoreError for what
    :func:`check_entry` would refuse to read back.
    """
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
    return PreparedEntry(
        name=entry_name(names),
        contents={KEY_FILE: key_bytes, CERT_FILE: cert_bytes, META_FILE: _json_bytes(meta)},
        certificate=StoredCertificate.describe(names, cert_pem, key_pem, leaf, source, stored_at),
    )


def check_entry(
    name: str,
    contents: Mapping[str, bytes],
    *,
    files: tuple[Path, Path] | None = None,
    kind: str = "folder",
) -> StoredCertificate:
    """The certificate of the entry ``name`` whose parts (cert.pem, key.pem, meta.json) are
    ``contents``; raises BrokenEntry with the reason when it must not be served.

    ``files`` are where the entry keeps its certificate and key (None: not in files); ``kind``
    is what ``name`` names, for the reason ("folder", "key").
    """
    for part in (META_FILE, CERT_FILE, KEY_FILE):
        if part not in contents:
            suffix = " (half-written entry)" if part == META_FILE else ""
            raise BrokenEntry(f"{part} missing{suffix}")
    try:
        meta = json.loads(contents[META_FILE])
    except ValueError:
        raise BrokenEntry(f"{META_FILE} is not valid JSON") from None
    if not isinstance(meta, dict):
        raise BrokenEntry(f"{META_FILE} is not a JSON object")
    domains = _field(meta, "domains", list)
    if not domains or not all(isinstance(d, str) and d for d in domains):
        raise BrokenEntry(f"{META_FILE} field 'domains' is not a list of domain names")
    names = normalize_domains(domains)
    if entry_name(names) != name:
        raise BrokenEntry(f"the {kind} name does not match the domains in {META_FILE}")
    for part, hash_key in ((CERT_FILE, "cert_sha256"), (KEY_FILE, "key_sha256")):
        if _field(meta, hash_key, str) != _sha256(contents[part]):
            raise BrokenEntry(
                f"{part} does not match its hash in {META_FILE} (half-written or corrupt entry)"
            )
    source = _field(meta, "source", str)
    stored_at = _time_field(meta, "stored_at")
    not_after = _time_field(meta, "not_after")
    cert_pem = _decode(contents[CERT_FILE], CERT_FILE, BrokenEntry)
    key_pem = _decode(contents[KEY_FILE], KEY_FILE, BrokenEntry)
    try:
        leaf = parse_chain(cert_pem)
    except CertificateStoreError:
        raise BrokenEntry(f"{CERT_FILE} does not hold a valid PEM certificate") from None
    try:
        key = parse_key(key_pem, KEY_FILE)
    except CertificateStoreError:
        raise BrokenEntry(f"{KEY_FILE} does not hold an unencrypted PEM private key") from None
    if not same_public_key(key, leaf):
        raise BrokenEntry("key does not match the certificate")
    missing = uncovered(names, leaf)
    if missing:
        raise BrokenEntry(f"the certificate does not cover {', '.join(missing)}")
    if not_after != leaf.not_valid_after_utc:
        raise BrokenEntry(f"not_after in {META_FILE} differs from the certificate's")
    return StoredCertificate.describe(names, cert_pem, key_pem, leaf, source, stored_at, files)


def _read_entry(entry: Path) -> StoredCertificate:
    """Read and check one entry folder; raises BrokenEntry with the reason."""
    contents: dict[str, bytes] = {}
    for name in (META_FILE, CERT_FILE, KEY_FILE):
        try:
            contents[name] = (entry / name).read_bytes()
        except FileNotFoundError:
            break  # check_entry reports the first missing part
        except OSError as exc:
            raise BrokenEntry(f"{name} cannot be read: {exc.strerror}") from None
    return check_entry(entry.name, contents, files=_files(entry))


# -- ACME accounts ------------------------------------------------------------------------------


def account_id(directory_url: str) -> str:
    """The short name under which the account of a CA directory is stored."""
    return _sha256(directory_url.encode())[:16]


def account_contents(directory_url: str, key_pem: str, meta: Mapping[str, Any]) -> dict[str, bytes]:
    """The parts of a stored account (account.key, then account.json), after checking them."""
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
        raise CertificateStoreError(f"account metadata is not JSON-serialisable: {exc}") from None
    return {ACCOUNT_KEY_FILE: key_bytes, ACCOUNT_META_FILE: record_bytes}


def check_account(
    where: str, directory_url: str, contents: Mapping[str, bytes]
) -> tuple[str, dict[str, Any]] | None:
    """The key PEM and metadata of a stored account, None when none is stored for
    ``directory_url``; raises CertificateStoreError (prefixed with ``where``) when it is
    stored but unusable."""
    if ACCOUNT_META_FILE not in contents:
        return None  # nothing stored, or a save that never finished
    if ACCOUNT_KEY_FILE not in contents:
        raise CertificateStoreError(f"{where}: {ACCOUNT_KEY_FILE} is missing")
    key_bytes = contents[ACCOUNT_KEY_FILE]
    try:
        record = json.loads(contents[ACCOUNT_META_FILE])
    except ValueError:
        raise CertificateStoreError(f"{where}: {ACCOUNT_META_FILE} is not JSON") from None
    if not (isinstance(record, dict) and isinstance(record.get("meta"), dict)):
        raise CertificateStoreError(f"{where}: {ACCOUNT_META_FILE} lacks 'meta'")
    if record.get("directory_url") != directory_url:
        return None  # a different directory whose hash prefix collides
    if record.get("key_sha256") != _sha256(key_bytes):
        raise CertificateStoreError(
            f"{where}: {ACCOUNT_KEY_FILE} does not match the hash in {ACCOUNT_META_FILE}"
        )
    key_pem = _decode(key_bytes, ACCOUNT_KEY_FILE, CertificateStoreError)
    parse_key(key_pem, f"{where}: {ACCOUNT_KEY_FILE}")
    meta: dict[str, Any] = record["meta"]
    return key_pem, meta


def check_challenge_token(token: str) -> str:
    """``token`` if it can be an HTTP-01 token (1-200 base64url characters), else an error."""
    if not _CHALLENGE_TOKEN.fullmatch(token):
        raise CertificateStoreError(
            f"{token[:40]!r} is not an HTTP-01 token (1-200 base64url characters)"
        )
    return token


def _files(entry: Path) -> tuple[Path, Path]:
    """Where an entry keeps its certificate chain and its key."""
    return entry / CERT_FILE, entry / KEY_FILE


def _field(meta: dict[str, Any], key: str, kind: type) -> Any:
    if key not in meta:
        raise BrokenEntry(f"{META_FILE} lacks {key!r}")
    value = meta[key]
    if not isinstance(value, kind):
        raise BrokenEntry(f"{META_FILE} field {key!r} is not a {kind.__name__}")
    return value


def _time_field(meta: dict[str, Any], key: str) -> datetime.datetime:
    try:
        value = datetime.datetime.fromisoformat(_field(meta, key, str))
    except ValueError:
        raise BrokenEntry(f"{META_FILE} field {key!r} is not an ISO 8601 time") from None
    if value.tzinfo is None:
        raise BrokenEntry(f"{META_FILE} field {key!r} has no time zone")
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
