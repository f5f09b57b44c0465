"""Where certificates live: the storage interface, and the lease that guards one issuance.

A :class:`CertificateStorage` keeps certificates, ACME account keys and pending HTTP-01
challenge answers, and hands out named locks with a lease. Processes that share one storage
(the workers of ``workers=N``, or smartroute instances on several machines sharing Redis) are a
cluster: whoever holds the lock of a certificate obtains it, the others wait and then serve
what the holder stored. A lock whose holder died expires with its lease, so a crashed instance
never blocks issuance for long.

Two implementations: :class:`~smartroute.certs.folder_storage.FolderStorage` (a folder, the
default; its locks are lease files, safe across the processes of one machine) and
:class:`~smartroute.certs.redis_storage.RedisStorage` (``redis://HOST:PORT/DB``, the ``redis``
extra). :func:`open_storage` picks one from the ``acme.certificate_store`` setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Protocol

from smartroute.certs.records import StoredCertificate, StoreProblem
from smartroute.certs.store import prepare_entry
from smartroute.errors import CertificateStoreError

log = logging.getLogger("smartroute.certs")

DEFAULT_LEASE = 60.0  # seconds a lock lives without being renewed
LOCK_POLL = 1.0  # seconds between two looks while another process holds a lock


class CertificateStorage(Protocol):
    """What the certificate manager needs of a store. Every method may raise
    :class:`~smartroute.errors.CertificateStoreError` (the store cannot be reached, an entry
    cannot be written); a broken entry is never returned as a certificate."""

    @property
    def location(self) -> str:
        """The folder or URL, as the user gave it but for a password, shown as ``***`` (for
        logs and errors)."""

    @property
    def shared(self) -> bool:
        """Whether other machines may use this store too (challenge answers must be looked
        up in it, not only in this process)."""

    async def open(self) -> None:
        """Connect and check the store is usable; raises CertificateStoreError naming it."""

    async def close(self) -> None:
        """Release connections (the stored data stays)."""

    # -- certificates ------------------------------------------------------------------------

    async def list(self) -> tuple[list[StoredCertificate], list[StoreProblem]]:
        """Every intact certificate, and every broken entry with the reason it is broken."""

    async def load(self, domains: Sequence[str]) -> StoredCertificate | None:
        """The intact certificate stored for exactly this domain set, else None."""

    async def save(
        self, domains: Sequence[str], cert_pem: str, key_pem: str, *, source: str
    ) -> StoredCertificate:
        """Check and store a certificate, replacing the previous one all at once (a reader
        sees the old entry or the new one, never a mix)."""

    async def delete(self, domains: Sequence[str]) -> None:
        """Remove the entry of this domain set; a missing entry is not an error."""

    # -- ACME accounts -----------------------------------------------------------------------

    async def load_account(self, directory_url: str) -> tuple[str, dict[str, Any]] | None:
        """The account key PEM and metadata stored for this CA directory, or None."""

    async def save_account(self, directory_url: str, key_pem: str, meta: Mapping[str, Any]) -> None:
        """Store the account key and its metadata."""

    # -- HTTP-01 answers ---------------------------------------------------------------------

    async def put_challenge(self, token: str, key_authorization: str, ttl: float) -> None:
        """Publish an HTTP-01 answer to every process sharing the store (for ``ttl`` s).

        A token is 1-200 base64url characters; anything else is a CertificateStoreError (in
        every challenge method), so a token can never name anything outside the answers."""

    async def get_challenge(self, token: str) -> str | None:
        """The published answer for ``token``, or None."""

    async def delete_challenge(self, token: str) -> None:
        """Withdraw an answer; a missing one is not an error."""

    # -- locks -------------------------------------------------------------------------------

    async def lock(self, name: str, lease: float) -> str | None:
        """Take the lock ``name`` (any non-empty string) for ``lease`` seconds: a holder token,
        or None when a holder's lease is still running (this caller's own too: locks are not
        re-entrant). An expired lease is taken over."""

    async def refresh(self, name: str, token: str, lease: float) -> bool:
        """Extend a held lock to ``lease`` seconds from now; False if it was lost meanwhile
        (its lease ran out, whether or not someone took it over since)."""

    async def unlock(self, name: str, token: str) -> None:
        """Release the lock if ``token`` still holds it."""


@contextlib.asynccontextmanager
async def holding(
    storage: CertificateStorage, name: str, lease: float = DEFAULT_LEASE
) -> AsyncIterator[str | None]:
    """Hold the lock ``name`` for the block, renewing its lease every third of it.

    Yields the holder token, or None (and holds nothing) when someone else holds the lock.
    A renewal that fails is logged; the block goes on (the store's own writes are atomic, so
    the worst case of a lost lease is a certificate obtained twice, never a broken one).
    """
    token = await storage.lock(name, lease)
    if token is None:
        yield None
        return

    async def keep() -> None:
        while True:
            await asyncio.sleep(lease / 3)
            try:
                if not await storage.refresh(name, token, lease):
                    log.warning("certificate store %s: lost the lock %s", storage.location, name)
                    return
            except Exception as exc:  # noqa: BLE001 - the store is down: try again later
                log.warning(
                    "certificate store %s: cannot renew the lock %s: %s",
                    storage.location,
                    name,
                    exc,
                )

    keeper = asyncio.get_running_loop().create_task(keep())
    try:
        yield token
    finally:
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)
        try:
            await storage.unlock(name, token)
        except Exception as exc:  # noqa: BLE001 - the lease runs out on its own
            log.warning(
                "certificate store %s: cannot release the lock %s (it expires in %gs): %s",
                storage.location,
                name,
                lease,
                exc,
            )


class HeldBack:
    """Certificates the CA issued while the store could not take them: served from memory and
    stored as soon as the store is back, so an issued certificate is never lost."""

    def __init__(self, storage: CertificateStorage) -> None:
        self.storage = storage
        self._waiting: dict[str, tuple[str, str]] = {}

    def __bool__(self) -> bool:
        return bool(self._waiting)

    async def save(self, domain: str, chain: str, key_pem: str) -> StoredCertificate:
        """Store the certificate of ``domain``, or hold it back when the store cannot be
        written; the entry to serve either way. A chain the store's checks refuse raises
        CertificateStoreError (it is never served)."""
        checked = prepare_entry([domain], chain, key_pem, source="acme").certificate
        try:
            return await self.storage.save([domain], chain, key_pem, source="acme")
        except (CertificateStoreError, OSError) as exc:
            self._waiting[domain] = (chain, key_pem)
            log.warning(
                "certificate for %s issued but not stored (%s): served from memory, stored "
                "when the store is back",
                domain,
                exc,
            )
        return checked

    async def retry(self) -> None:
        """Store what was held back, while the store takes it."""
        for domain, (chain, key_pem) in list(self._waiting.items()):
            try:
                await self.storage.save([domain], chain, key_pem, source="acme")
            except (CertificateStoreError, OSError) as exc:
                log.info("certificate for %s still not stored: %s", domain, exc)
                return
            del self._waiting[domain]
            log.info("certificate for %s stored (it was issued while the store was down)", domain)


async def account_key(
    storage: CertificateStorage,
    directory_url: str,
    meta: Mapping[str, Any],
    new_key: Callable[[], str],
    lease: float = DEFAULT_LEASE,
) -> str:
    """The ACME account key for ``directory_url``: the stored one, or a new one stored under
    the account's lock, so that every process sharing the store uses one account."""
    name = "account-" + hashlib.sha256(directory_url.encode()).hexdigest()[:16]
    for _ in range(int(lease / LOCK_POLL) + 2):
        stored = await storage.load_account(directory_url)
        if stored is not None:
            return stored[0]
        async with holding(storage, name, lease) as token:
            if token is not None:
                stored = await storage.load_account(directory_url)
                if stored is not None:
                    return stored[0]
                key_pem = new_key()
                await storage.save_account(directory_url, key_pem, meta)
                return key_pem
        await asyncio.sleep(LOCK_POLL)  # another process is creating it
    raise CertificateStoreError(
        f"certificate store {storage.location}: another process holds the lock of the ACME "
        "account but stores no account"
    )


def open_storage(location: str) -> CertificateStorage:
    """The storage for ``acme.certificate_store``: ``redis://...`` or a folder path."""
    if location.startswith(("redis://", "rediss://", "unix://")):
        from smartroute.certs.redis_storage import RedisStorage

        return RedisStorage(location)
    from smartroute.certs.folder_storage import FolderStorage

    return FolderStorage(location)
