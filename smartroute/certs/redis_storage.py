"""The certificate storage of a cluster: one Redis shared by every smartroute instance.

Keys, all under ``smartroute:certs:``::

    cert:<entry name>         hash: cert.pem, key.pem, meta.json (the folder store's contents)
    account:<sha256(url)[:16]> hash: account.key, account.json
    challenge:<token>         the HTTP-01 key authorization, expiring with its ttl
    lock:<name>               the holder's token, expiring with its lease

An entry is checked exactly as the folder store checks its files
(:func:`~smartroute.certs.store.check_entry`), so a corrupt one is reported, never served, and
written with DEL and HSET in one MULTI/EXEC, so a reader sees the old entry or the new one.
Locks are ``SET NX PX``; renewing and releasing compare the holder's token first, in Lua.

Every command is bounded by the socket timeouts (5 s by default): a Redis that hangs costs a
failed call, never a hung proxy. A failure is a CertificateStoreError naming the URL, with any
password in it shown as ``***``; the client reconnects by itself once Redis is back.
"""

from __future__ import annotations

import contextlib
import math
import re
import secrets
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from smartroute.certs.records import StoredCertificate, StoreProblem, normalize_domains
from smartroute.certs.store import (
    BrokenEntry,
    account_contents,
    account_id,
    check_account,
    check_challenge_token,
    check_entry,
    entry_name,
    prepare_entry,
)
from smartroute.errors import CertificateStoreError

try:
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.commands.core import AsyncScript
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError, ResponseError
    from redis.typing import EncodableT, FieldT
except ImportError:  # the redis extra is not installed: RedisStorage() says so
    _HAVE_REDIS = False
else:
    _HAVE_REDIS = True

__all__ = ["DEFAULT_TIMEOUT", "KEY_PREFIX", "RedisStorage", "public_url"]

KEY_PREFIX = "smartroute:certs:"
DEFAULT_TIMEOUT = 5.0  # seconds to connect, and to wait for any one reply
_CERT_PREFIX = KEY_PREFIX + "cert:"
_SCAN_BATCH = 200

# Both compare the holder's token first: a holder whose lease ran out and was taken over must
# neither extend nor release the new holder's lock.
_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisStorage:
    """:class:`~smartroute.certs.storage.CertificateStorage` in Redis (``redis://``,
    ``rediss://`` for TLS, ``unix://``), shared by every instance that uses the same URL."""

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._url = url
        self._location, self._secrets = _hide_passwords(url)
        if not _HAVE_REDIS:
            raise CertificateStoreError(
                f"certificate store {self._location} needs the redis package:"
                " pip install 'smartroute[redis]'"
            )
        self._timeout = timeout
        self._client: Redis | None = None
        self._refresh_script: AsyncScript | None = None
        self._unlock_script: AsyncScript | None = None

    def __repr__(self) -> str:
        return f"RedisStorage({self._location!r})"

    @property
    def location(self) -> str:
        """The URL, any password in it replaced by ``***``."""
        return self._location

    @property
    def shared(self) -> bool:
        return True

    async def open(self) -> None:
        """Connect and PING; CertificateStoreError naming the URL when Redis does not answer
        (there is no local copy to fall back on)."""
        await self.close()
        with self._failures("cannot connect"):
            try:
                client = Redis.from_url(
                    self._url,
                    socket_connect_timeout=self._timeout,
                    socket_timeout=self._timeout,
                    # One immediate retry on a broken connection: a pooled connection that
                    # died with a restarted Redis is replaced. A timeout is not retried.
                    retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
                )
            except ValueError as exc:
                raise CertificateStoreError(
                    f"certificate store {self._location}: {self._scrub(str(exc))}"
                ) from None
            try:
                await client.ping()
            except BaseException:
                await client.aclose()
                raise
        self._client = client
        self._refresh_script = client.register_script(_REFRESH)
        self._unlock_script = client.register_script(_UNLOCK)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with self._failures("cannot close the connection"):
                await client.aclose()

    # -- certificates ----------------------------------------------------------------------------

    async def list(self) -> tuple[list[StoredCertificate], list[StoreProblem]]:
        """Every entry, sorted by name; broken ones (and keys that are no hash) as problems."""
        client = self._opened()
        certificates: list[StoredCertificate] = []
        problems: list[StoreProblem] = []
        with self._failures("cannot list the certificates"):
            keys = sorted(
                {key async for key in client.scan_iter(match=_CERT_PREFIX + "*", count=_SCAN_BATCH)}
            )
            for start in range(0, len(keys), _SCAN_BATCH):
                batch = keys[start : start + _SCAN_BATCH]
                async with client.pipeline(transaction=False) as pipe:
                    for key in batch:
                        pipe.hgetall(key)
                    replies = await pipe.execute(raise_on_error=False)
                for key, reply in zip(batch, replies, strict=True):
                    name = key[len(_CERT_PREFIX) :].decode(errors="backslashreplace")
                    if _wrong_type(reply):
                        problems.append(StoreProblem(name, f"not a hash: {reply}"))
                    elif isinstance(reply, Exception):
                        raise reply
                    elif reply:  # else removed since the scan
                        try:
                            certificates.append(check_entry(name, _fields(reply), kind="key"))
                        except BrokenEntry as exc:
                            problems.append(StoreProblem(name, str(exc)))
        return certificates, problems

    async def load(self, domains: Sequence[str]) -> StoredCertificate | None:
        names = normalize_domains(domains)
        name = entry_name(names)
        client = self._opened()
        with self._failures(f"cannot read the certificate {name}"):
            try:
                reply = await client.hgetall(_CERT_PREFIX + name)
            except ResponseError as exc:
                if _wrong_type(exc):
                    return None  # not a hash: list() reports it
                raise
        if not reply:
            return None
        try:
            stored = check_entry(name, _fields(reply), kind="key")
        except BrokenEntry:
            return None
        return stored if stored.domains == names else None

    async def save(
        self, domains: Sequence[str], cert_pem: str, key_pem: str, *, source: str
    ) -> StoredCertificate:
        prepared = prepare_entry(domains, cert_pem, key_pem, source=source)
        await self._replace_hash(
            _CERT_PREFIX + prepared.name, prepared.contents, f"the certificate {prepared.name}"
        )
        return prepared.certificate

    async def delete(self, domains: Sequence[str]) -> None:
        name = entry_name(domains)
        client = self._opened()
        with self._failures(f"cannot delete the certificate {name}"):
            await client.delete(_CERT_PREFIX + name)

    # -- ACME accounts ---------------------------------------------------------------------------

    async def load_account(self, directory_url: str) -> tuple[str, dict[str, Any]] | None:
        key = _account_key(directory_url)
        client = self._opened()
        with self._failures("cannot read the account"):
            reply = await client.hgetall(key)
        return check_account(
            f"certificate store {self._location}: {key}", directory_url, _fields(reply)
        )

    async def save_account(self, directory_url: str, key_pem: str, meta: Mapping[str, Any]) -> None:
        contents = account_contents(directory_url, key_pem, meta)
        await self._replace_hash(_account_key(directory_url), contents, "the account")

    # -- HTTP-01 answers -------------------------------------------------------------------------

    async def put_challenge(self, token: str, key_authorization: str, ttl: float) -> None:
        key = KEY_PREFIX + "challenge:" + check_challenge_token(token)
        client = self._opened()
        with self._failures("cannot publish a challenge answer"):
            await client.set(key, key_authorization, px=_milliseconds("ttl", ttl))

    async def get_challenge(self, token: str) -> str | None:
        key = KEY_PREFIX + "challenge:" + check_challenge_token(token)
        client = self._opened()
        with self._failures("cannot read a challenge answer"):
            value = await client.get(key)
        if not isinstance(value, bytes):
            return None
        return value.decode(errors="replace")

    async def delete_challenge(self, token: str) -> None:
        key = KEY_PREFIX + "challenge:" + check_challenge_token(token)
        client = self._opened()
        with self._failures("cannot withdraw a challenge answer"):
            await client.delete(key)

    # -- locks -----------------------------------------------------------------------------------

    async def lock(self, name: str, lease: float) -> str | None:
        lease_ms = _milliseconds("lease", lease)
        token = secrets.token_urlsafe(18)
        client = self._opened()
        with self._failures(f"cannot take the lock {name}"):
            taken = await client.set(_lock_key(name), token, nx=True, px=lease_ms)
        return token if taken else None

    async def refresh(self, name: str, token: str, lease: float) -> bool:
        lease_ms = _milliseconds("lease", lease)
        self._opened()
        assert self._refresh_script is not None
        with self._failures(f"cannot renew the lock {name}"):
            renewed = await self._refresh_script(keys=[_lock_key(name)], args=[token, lease_ms])
        return bool(renewed)

    async def unlock(self, name: str, token: str) -> None:
        self._opened()
        assert self._unlock_script is not None
        with self._failures(f"cannot release the lock {name}"):
            await self._unlock_script(keys=[_lock_key(name)], args=[token])

    # -- helpers ---------------------------------------------------------------------------------

    async def _replace_hash(self, key: str, contents: Mapping[str, bytes], what: str) -> None:
        """Replace the hash ``key`` by ``contents`` at once: DEL and HSET in one MULTI/EXEC."""
        client = self._opened()
        fields: dict[FieldT, EncodableT] = {name: data for name, data in contents.items()}
        with self._failures(f"cannot store {what}"):
            async with client.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                pipe.hset(key, mapping=fields)
                await pipe.execute()

    def _opened(self) -> Redis:
        if self._client is None:
            raise CertificateStoreError(f"certificate store {self._location} is not open")
        return self._client

    @contextlib.contextmanager
    def _failures(self, doing: str) -> Iterator[None]:
        """Turn the redis package's errors (and socket errors) into CertificateStoreError.

        The cause is not chained: the message is the one place the password is scrubbed from.
        """
        try:
            yield
        except (RedisError, OSError) as exc:
            reason = self._scrub(f"{type(exc).__name__}: {exc}")
            raise CertificateStoreError(
                f"certificate store {self._location}: {doing}: {reason}"
            ) from None

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def public_url(url: str) -> str:
    """``url`` with every password in it (``:PASSWORD@``, ``password=``) shown as ``***``."""
    return _hide_passwords(url)[0]


_QUERY_PASSWORD = re.compile(r"(?<=[?&;])(password=)([^&;#]*)", re.IGNORECASE)


def _hide_passwords(url: str) -> tuple[str, tuple[str, ...]]:
    """The URL with its passwords hidden, and the passwords (as written and decoded).

    Errs on the side of hiding: user information that cannot be told apart from a path
    (``redis://pass/word@host``) is hidden whole.
    """
    found: list[str] = []
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    query = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    at = rest.rfind("@", 0, query)
    if at >= 0:
        user, colon, password = rest[:at].partition(":")
        if colon and password:
            found.append(password)
            rest = f"{user}:***{rest[at:]}"
        elif "/" in user:
            found.append(user)
            rest = "***" + rest[at:]

    def hide(match: re.Match[str]) -> str:
        found.append(match.group(2))
        return match.group(1) + "***"

    rest = _QUERY_PASSWORD.sub(hide, rest)
    every = {s for s in found + [urllib.parse.unquote(p) for p in found] if s}
    # Longest first, so a password that contains another is replaced whole.
    return f"{scheme}{sep}{rest}", tuple(sorted(every, key=len, reverse=True))


def _fields(reply: Mapping[Any, Any]) -> dict[str, bytes]:
    """A HGETALL reply as field name -> value."""
    return {
        (k.decode(errors="replace") if isinstance(k, bytes) else str(k)): (
            v if isinstance(v, bytes) else str(v).encode()
        )
        for k, v in reply.items()
    }


def _wrong_type(reply: object) -> bool:
    """Whether a reply is Redis's error for a key holding another type than the command's."""
    return isinstance(reply, ResponseError) and str(reply).startswith("WRONGTYPE")


def _account_key(directory_url: str) -> str:
    return KEY_PREFIX + "account:" + account_id(directory_url)


def _lock_key(name: str) -> str:
    if not name:
        raise CertificateStoreError("a lock needs a non-empty name")
    return KEY_PREFIX + "lock:" + name


def _milliseconds(what: str, seconds: float) -> int:
    if not (seconds > 0 and math.isfinite(seconds)):
        raise CertificateStoreError(f"a {what} must be a positive number of seconds, got {seconds}")
    return max(1, math.ceil(seconds * 1000))
