"""The certificate storage of one machine: a folder, shared by the processes that run there.

Certificates and accounts are :class:`~smartroute.certs.store.CertificateStore`'s files, read
and written in worker threads. Next to them::

    challenges/<token>          {"key_authorization": ..., "expires": unix time}
    locks/<lock name>.json      {"token": ..., "expires": unix time, "pid": ..., "host": ...}

A lock is taken, renewed and released under the store's exclusive flock, so two processes of
this machine never both hold it; a lease that ran out (its holder died) is taken over. Lease
times are wall-clock times, as the processes that compare them share no other clock.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from smartroute.certs.disk import FOLDER_MODE, commit, private_folder
from smartroute.certs.records import StoredCertificate, StoreProblem
from smartroute.certs.store import (
    CHALLENGES_FOLDER,
    LOCKS_FOLDER,
    CertificateStore,
    check_challenge_token,
)
from smartroute.errors import CertificateStoreError

__all__ = ["FolderStorage"]

_T = TypeVar("_T")
_P = ParamSpec("_P")
_RECORD_MODE = 0o600
_PLAIN_LOCK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


class FolderStorage:
    """:class:`~smartroute.certs.storage.CertificateStorage` in a folder of this machine."""

    def __init__(self, location: str) -> None:
        self._location = location
        self._store: CertificateStore | None = None

    def __repr__(self) -> str:
        return f"FolderStorage({self._location!r})"

    @property
    def location(self) -> str:
        return self._location

    @property
    def shared(self) -> bool:
        return False

    async def open(self) -> None:
        """Create the folder (mode 0700) or check the one there; CertificateStoreError if not."""
        self._store = await self._run(_open_store, self._location)

    async def close(self) -> None:
        """Nothing to release: every call opens and closes its own files."""

    # -- certificates ----------------------------------------------------------------------------

    async def list(self) -> tuple[list[StoredCertificate], list[StoreProblem]]:
        return await self._run(self._opened().load)

    async def load(self, domains: Sequence[str]) -> StoredCertificate | None:
        return await self._run(self._opened().get, domains)

    async def save(
        self, domains: Sequence[str], cert_pem: str, key_pem: str, *, source: str
    ) -> StoredCertificate:
        return await self._run(self._opened().save, domains, cert_pem, key_pem, source=source)

    async def delete(self, domains: Sequence[str]) -> None:
        await self._run(self._opened().remove, domains)

    # -- ACME accounts ---------------------------------------------------------------------------

    async def load_account(self, directory_url: str) -> tuple[str, dict[str, Any]] | None:
        return await self._run(self._opened().load_account, directory_url)

    async def save_account(self, directory_url: str, key_pem: str, meta: Mapping[str, Any]) -> None:
        await self._run(self._opened().save_account, directory_url, key_pem, meta)

    # -- HTTP-01 answers -------------------------------------------------------------------------

    async def put_challenge(self, token: str, key_authorization: str, ttl: float) -> None:
        check_challenge_token(token)
        _check_duration("ttl", ttl)
        record = {"key_authorization": key_authorization, "expires": time.time() + ttl}
        await self._run(self._write, CHALLENGES_FOLDER, token, record)

    async def get_challenge(self, token: str) -> str | None:
        check_challenge_token(token)
        return await self._run(self._read_challenge, token)

    async def delete_challenge(self, token: str) -> None:
        check_challenge_token(token)
        await self._run(self._remove, CHALLENGES_FOLDER, token, None)

    # -- locks -----------------------------------------------------------------------------------

    async def lock(self, name: str, lease: float) -> str | None:
        _check_duration("lease", lease)
        return await self._run(self._take_lock, _lock_file(name), lease)

    async def refresh(self, name: str, token: str, lease: float) -> bool:
        _check_duration("lease", lease)
        return await self._run(self._refresh_lock, _lock_file(name), token, lease)

    async def unlock(self, name: str, token: str) -> None:
        await self._run(self._remove, LOCKS_FOLDER, _lock_file(name), token)

    # -- blocking parts, run in worker threads ---------------------------------------------------

    def _read_challenge(self, token: str) -> str | None:
        record = _read_record(self._opened().folder / CHALLENGES_FOLDER / token)
        if record is None:
            return None
        answer, expires = record.get("key_authorization"), record.get("expires")
        if not isinstance(answer, str) or not isinstance(expires, int | float):
            return None  # not written by put_challenge: nothing to answer with
        if expires > time.time():
            return answer
        self._remove(CHALLENGES_FOLDER, token, None, expired_only=True)
        return None

    def _take_lock(self, file_name: str, lease: float) -> str | None:
        store = self._opened()
        with store.locked(exclusive=True):
            held = _read_record(store.folder / LOCKS_FOLDER / file_name)
            if held is not None and _running(held):
                return None
            token = secrets.token_urlsafe(18)
            self._write_unlocked(LOCKS_FOLDER, file_name, _lease_record(token, lease))
            return token

    def _refresh_lock(self, file_name: str, token: str, lease: float) -> bool:
        store = self._opened()
        with store.locked(exclusive=True):
            held = _read_record(store.folder / LOCKS_FOLDER / file_name)
            if held is None or held.get("token") != token or not _running(held):
                return False
            self._write_unlocked(LOCKS_FOLDER, file_name, _lease_record(token, lease))
            return True

    def _write(self, folder_name: str, file_name: str, record: Mapping[str, Any]) -> None:
        with self._opened().locked(exclusive=True):
            self._write_unlocked(folder_name, file_name, record)

    def _write_unlocked(self, folder_name: str, file_name: str, record: Mapping[str, Any]) -> None:
        # The store's exclusive lock is held: its clean-up of temp files cannot race the commit.
        folder = self._opened().folder / folder_name
        os.makedirs(folder, mode=FOLDER_MODE, exist_ok=True)
        private_folder(folder)
        commit(folder, [(file_name, json.dumps(record).encode(), _RECORD_MODE)])

    def _remove(
        self,
        folder_name: str,
        file_name: str,
        token: str | None,
        *,
        expired_only: bool = False,
    ) -> None:
        """Remove a record: only if it holds ``token`` (when given), only if its time is up
        (when ``expired_only``). Looked at again under the lock: it may have been replaced."""
        store = self._opened()
        path = store.folder / folder_name / file_name
        with store.locked(exclusive=True):
            if token is not None or expired_only:
                record = _read_record(path)
                if record is None:
                    return
                if token is not None and record.get("token") != token:
                    return
                if expired_only and _running(record):
                    return
            path.unlink(missing_ok=True)

    # -- helpers ---------------------------------------------------------------------------------

    def _opened(self) -> CertificateStore:
        if self._store is None:
            raise CertificateStoreError(f"certificate store {self._location} is not open")
        return self._store

    async def _run(self, call: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """``call`` in a worker thread, its OSError a CertificateStoreError naming the folder."""
        try:
            return await asyncio.to_thread(call, *args, **kwargs)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            where = f" ({exc.filename})" if exc.filename else ""
            raise CertificateStoreError(
                f"certificate store {self._location}: {reason}{where}"
            ) from exc


def _open_store(location: str) -> CertificateStore:
    store = CertificateStore(location)
    for name in (CHALLENGES_FOLDER, LOCKS_FOLDER):
        os.makedirs(store.folder / name, mode=FOLDER_MODE, exist_ok=True)
        private_folder(store.folder / name)
    return store


def _lock_file(name: str) -> str:
    """The file of the lock ``name`` in ``locks/``: the name itself when it is a safe file name,
    else a cleaned prefix and a hash (``~`` never occurs in the first form)."""
    if not name:
        raise CertificateStoreError("a lock needs a non-empty name")
    if _PLAIN_LOCK_NAME.fullmatch(name):
        return f"{name}.json"
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    prefix = re.sub(r"[^A-Za-z0-9._+-]", "-", name)[:60].lstrip(".-")
    return f"{prefix or 'lock'}~{digest}.json"


def _lease_record(token: str, lease: float) -> dict[str, Any]:
    return {
        "token": token,
        "expires": time.time() + lease,
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }


def _running(record: Mapping[str, Any]) -> bool:
    """Whether a lease or an answer is still valid (a record without a usable time is not)."""
    expires = record.get("expires")
    return isinstance(expires, int | float) and expires > time.time()


def _read_record(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when there is none (missing or not one)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(data)
    except ValueError:
        return None  # records are renamed into place whole: this one was not written by us
    return record if isinstance(record, dict) else None


def _check_duration(what: str, seconds: float) -> None:
    if not (seconds > 0 and math.isfinite(seconds)):
        raise CertificateStoreError(f"a {what} must be a positive number of seconds, got {seconds}")
