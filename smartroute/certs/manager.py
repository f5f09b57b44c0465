"""Automatic certificates: which domains need one, getting them, keeping them renewed.

The manager serves stored certificates at once on start (the CA is not contacted for them),
then works through what is missing or due in batches: a ``certificate_provider`` is asked
first, then the ACME CA. For HTTP-01 the challenge answers come from an ordinary route on the
ACME port with the highest priority, added once per batch through the port manager and
removed after it; for TLS-ALPN-01 they come from the TLS port itself. A failure keeps the old
certificate in service and retries with exponential backoff and jitter.
"""

from __future__ import annotations

import asyncio
import datetime
import inspect
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from smartroute.certs.acme_client import AcmeClient, PendingOrder
from smartroute.certs.records import StoredCertificate
from smartroute.certs.settings import AcmeSettings
from smartroute.certs.store import CertificateStore
from smartroute.certs.tls_alpn import TlsAlpnResponder
from smartroute.context import RouteContext
from smartroute.errors import AcmeError
from smartroute.routing.model import CertificatePair, CompiledRoute
from smartroute.routing.schema import RouteInput

log = logging.getLogger("smartroute.certs")

CertificateProvider = Callable[[str], Awaitable[Any]]
HTTP01_ROUTE = "smartroute:acme-http-01"
HTTP01_PRIORITY = 2**31 - 1
HTTP01_PREFIX = "/.well-known/acme-challenge/"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(slots=True)
class DomainStatus:
    """Where one domain's certificate stands."""

    state: str = "pending"  # valid | pending | renewing | failed
    source: str | None = None  # acme | provider | store
    not_after: datetime.datetime | None = None
    last_error: str | None = None
    next_attempt: datetime.datetime | None = None
    failures: int = 0
    forced: bool = False
    fresh_since: datetime.datetime | None = None  # when a newly obtained one was installed
    suggested: datetime.datetime | None = None  # the CA's renewal time (ARI), when it offers one
    asked_ca_at: datetime.datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "source": self.source,
            "not_after": self.not_after.isoformat() if self.not_after else None,
            "last_error": self.last_error,
            "next_attempt": self.next_attempt.isoformat() if self.next_attempt else None,
        }


def auto_domains(routes: Iterable[CompiledRoute]) -> set[str]:
    """The exact domains of every enabled route that asks for ``"certificate": "auto"``."""
    wanted: set[str] = set()
    for route in routes:
        if route.enabled and route.tls is not None and route.tls.certificate == "auto":
            wanted.update(d.text for d in route.match.domains if d.exact)
    return wanted


def _provided_pair(domain: str, result: Any) -> CertificatePair:
    if isinstance(result, CertificatePair):
        return result
    if isinstance(result, Mapping) and "cert" in result and "key" in result:
        return CertificatePair(str(result["cert"]), str(result["key"]))
    if isinstance(result, tuple) and len(result) == 2:
        return CertificatePair(str(result[0]), str(result[1]))
    raise TypeError(
        f"certificate_provider({domain!r}) returned {type(result).__name__}; expected None, "
        "(cert_pem, key_pem) or {'cert': ..., 'key': ...}"
    )


def _provided_entry(domain: str, pair: CertificatePair) -> StoredCertificate:
    """Describe a provider's certificate like a stored one (it is kept in memory only)."""
    leaf = x509.load_pem_x509_certificate(pair.cert_pem.encode())
    key = serialization.load_pem_private_key(pair.key_pem.encode(), password=None)
    if key.public_key().public_numbers() != leaf.public_key().public_numbers():  # type: ignore[union-attr]
        raise ValueError(f"the provider's key for {domain} does not match its certificate")
    return StoredCertificate.describe(
        (domain,), pair.cert_pem, pair.key_pem, leaf, "provider", _now()
    )


class CertificateHost(Protocol):
    """What the manager needs of the proxy it keeps certificates for."""

    def serve_certificate(self, new: CertificatePair, old: CertificatePair | None) -> None:
        """Serve ``new`` to new handshakes; ``old`` stays with the connections that use it."""

    async def set_internal_route(self, name: str, route: RouteInput | None) -> None:
        """Add (or with None remove) a route of the proxy's own, kept across route updates."""


class CertificateManager:
    """Keeps a certificate in service for every domain of every ``auto`` route.

    Certificates go to new handshakes, and the HTTP-01 challenge route comes and goes, through
    ``proxy`` (see :class:`CertificateHost`).
    """

    def __init__(
        self,
        proxy: CertificateHost,
        settings: AcmeSettings | None,
        provider: CertificateProvider | None = None,
    ) -> None:
        self.proxy = proxy
        self.settings = settings
        self.provider = provider
        self.store = CertificateStore(settings.certificate_store) if settings else None
        self.client = AcmeClient(settings, self.store) if settings and self.store else None
        self.alpn = TlsAlpnResponder()
        self._wanted: set[str] = set()
        self._serving: dict[str, CertificatePair] = {}
        self._stored: dict[str, StoredCertificate] = {}
        self._status: dict[str, DomainStatus] = {}
        self._tokens: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._batch_done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, routes: Iterable[CompiledRoute]) -> None:
        """Serve what the store holds, then start issuing and renewing in the background."""
        self._wanted = auto_domains(routes)
        if self.store is not None:
            entries, problems = await asyncio.to_thread(self.store.load)
            for problem in problems:
                log.warning(
                    "certificate store: %s: %s (it will be issued again)",
                    problem.name,
                    problem.reason,
                )
            for entry in entries:
                for domain in entry.domains:
                    if domain in self._wanted or not self._wanted:
                        self._install(domain, entry, "store")
        for domain in self._wanted:
            self._status.setdefault(domain, DomainStatus())
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._close_http01()

    def routes_changed(self, routes: Iterable[CompiledRoute]) -> None:
        self._wanted = auto_domains(routes)
        for domain in self._wanted:
            self._status.setdefault(domain, DomainStatus())
        self._wake.set()

    def pairs(self) -> list[CertificatePair]:
        """The certificates this manager keeps in service."""
        return list(dict.fromkeys(self._serving.values()))

    def status(self) -> dict[str, dict[str, Any]]:
        return {d: self._status[d].as_dict() for d in sorted(self._wanted) if d in self._status}

    async def settled(self) -> dict[str, dict[str, Any]]:
        """Wait until no domain is pending or renewing (each is valid or failed)."""
        while any(self._status[d].state in ("pending", "renewing") for d in self._wanted):
            self._batch_done.clear()
            self._wake.set()
            await self._batch_done.wait()
        return self.status()

    async def renew(self, domains: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """Renew ``domains`` (all auto domains by default) now; returns their status after."""
        chosen = sorted(self._wanted if domains is None else set(domains) & self._wanted)
        for domain in chosen:
            status = self._status.setdefault(domain, DomainStatus())
            status.forced, status.next_attempt = True, None
        while any(self._status[d].forced for d in chosen):
            self._batch_done.clear()
            self._wake.set()
            await self._batch_done.wait()
        return {d: self._status[d].as_dict() for d in chosen}

    # -- planning --------------------------------------------------------------------------

    def _due(self, domain: str, now: datetime.datetime) -> datetime.datetime | None:
        """When ``domain`` needs a new certificate (``now`` or earlier means: now)."""
        status = self._status[domain]
        if status.forced:
            return now
        if status.next_attempt is not None:
            return status.next_attempt
        stored = self._stored.get(domain)
        if stored is None:
            return now
        threshold = datetime.timedelta(
            days=self.settings.renew_threshold_days if self.settings else 30
        )
        margin = max(threshold, stored.lifetime / 3)
        due = stored.not_after - margin
        if status.fresh_since is not None:
            # A certificate just obtained that is already "due" (a threshold longer than the
            # CA's lifetimes) is renewed once per check interval, not in a tight loop.
            interval = self.settings.renew_check_interval if self.settings else 3600.0
            due = max(due, status.fresh_since + datetime.timedelta(seconds=interval))
        if status.suggested is not None:
            due = min(due, status.suggested)
        return due

    async def _run(self) -> None:
        interval = self.settings.renew_check_interval if self.settings else 3600.0
        while True:
            await self._ask_renewal_info(interval)
            now = _now()
            due = sorted(
                d for d in self._wanted if (when := self._due(d, now)) is not None and when <= now
            )
            if due:
                await self._batch(due)
                self._batch_done.set()
                await asyncio.sleep(0)  # let waiters run before the next look
                continue
            self._batch_done.set()
            upcoming = [w for d in self._wanted if (w := self._due(d, now)) is not None]
            wait = interval
            if upcoming:
                wait = min(wait, max(0.01, (min(upcoming) - now).total_seconds()))
            self._wake.clear()
            # asyncio.timeout, not wait_for: wait_for can swallow a cancellation that arrives
            # just as the event is set, and stop() would then wait forever.
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _ask_renewal_info(self, interval: float) -> None:
        """Ask the CA when to renew (ARI, RFC 9773), once per check interval per certificate.

        A CA without renewal information, or one that does not answer, leaves the schedule to
        the threshold; the question is asked again at the next interval.
        """
        if self.client is None:
            return
        now = _now()
        for domain in sorted(self._wanted):
            status, stored = self._status[domain], self._stored.get(domain)
            if stored is None or stored.source == "provider" or status.source == "provider":
                continue
            if status.asked_ca_at and (now - status.asked_ca_at).total_seconds() < interval:
                continue
            status.asked_ca_at = now
            try:
                status.suggested = await asyncio.to_thread(
                    self.client.renewal_window, stored.cert_pem
                )
            except AcmeError as exc:
                log.info("renewal information for %s unavailable: %s", domain, exc)

    # -- one batch -------------------------------------------------------------------------

    async def _batch(self, domains: Sequence[str]) -> None:
        remaining = [d for d in domains if not await self._from_provider(d)]
        if not remaining:
            return
        if self.client is None or self.store is None or self.settings is None:
            for domain in remaining:
                self._failed(domain, "no certificate_provider answer and no acme setting")
            return
        for domain in remaining:
            self._status[domain].state = "renewing" if domain in self._stored else "pending"
        http01 = self.settings.challenge == "http-01"
        orders: list[PendingOrder] = []
        try:
            if http01:
                await self._open_http01(remaining)
            for domain in remaining:
                try:
                    pending = await asyncio.to_thread(self.client.order, [domain])
                except AcmeError as exc:
                    self._failed(domain, str(exc))
                    continue
                self._publish(pending)
                orders.append(pending)
            for pending in orders:
                domain = pending.domains[0]
                try:
                    chain = await asyncio.to_thread(self.client.finish, pending)
                    entry = await asyncio.to_thread(
                        self.store.save, pending.domains, chain, pending.key_pem, source="acme"
                    )
                except (AcmeError, OSError, ValueError) as exc:
                    self._failed(domain, str(exc))
                    continue
                finally:
                    self._unpublish(pending)
                self._install(domain, entry, "acme")
                log.info(
                    "certificate for %s issued, valid until %s", domain, entry.not_after.isoformat()
                )
        finally:
            if http01:
                await self._close_http01()

    async def _from_provider(self, domain: str) -> bool:
        if self.provider is None:
            return False
        try:
            result = self.provider(domain)
            if inspect.isawaitable(result):
                result = await result
            if result is None:
                return False
            entry = _provided_entry(domain, _provided_pair(domain, result))
        except Exception as exc:  # a user hook must not stop issuance for other domains
            log.error("certificate_provider failed for %s", domain, exc_info=exc)
            return False
        # Asked again when it is due for renewal, like an ACME certificate.
        self._install(domain, entry, "provider")
        return True

    def _install(self, domain: str, entry: StoredCertificate, source: str) -> None:
        """Serve ``entry`` for ``domain`` to new handshakes; the previous one stops being used."""
        pair = entry.pair
        self.proxy.serve_certificate(pair, self._serving.get(domain))
        self._serving[domain] = pair
        self._stored[domain] = entry
        status = self._status.setdefault(domain, DomainStatus())
        status.state, status.source, status.not_after = "valid", source, entry.not_after
        status.last_error, status.failures, status.next_attempt = None, 0, None
        status.forced = False
        status.fresh_since = None if source == "store" else _now()
        status.suggested, status.asked_ca_at = None, None

    def _failed(self, domain: str, error: str) -> None:
        settings = self.settings
        status = self._status[domain]
        status.failures += 1
        base = settings.retry_min if settings else 60.0
        ceiling = settings.retry_max if settings else 6 * 3600.0
        delay = min(ceiling, base * 2 ** (status.failures - 1)) * random.uniform(0.8, 1.2)
        status.state, status.last_error, status.forced = "failed", error, False
        status.next_attempt = _now() + datetime.timedelta(seconds=delay)
        kept = " (the current certificate stays in service)" if domain in self._serving else ""
        log.warning(
            "certificate for %s failed: %s; next attempt at %s%s",
            domain, error, status.next_attempt.isoformat(timespec="seconds"), kept,
        )  # fmt: skip

    # -- challenges ------------------------------------------------------------------------

    def _publish(self, pending: PendingOrder) -> None:
        for task in pending.challenges:
            if task.kind == "http-01":
                self._tokens[task.token] = task.key_authorization
            else:
                self.alpn.add(task.domain, task.key_authorization)

    def _unpublish(self, pending: PendingOrder) -> None:
        for task in pending.challenges:
            self._tokens.pop(task.token, None)
            if task.kind != "http-01":
                self.alpn.remove(task.domain)

    async def _open_http01(self, domains: Sequence[str]) -> None:
        """Add the challenge route for this batch; returns once its port is listening."""
        assert self.settings is not None
        route = {
            "name": HTTP01_ROUTE,
            "priority": HTTP01_PRIORITY,
            "match": {
                "ports": self.settings.port,
                "domains": list(domains),
                "path": HTTP01_PREFIX + "*",
            },
            "action": {"type": "socket-handler", "socket_handler": self._answer_http01},
        }
        await self.proxy.set_internal_route(HTTP01_ROUTE, route)

    async def _close_http01(self) -> None:
        await self.proxy.set_internal_route(HTTP01_ROUTE, None)

    async def _answer_http01(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: RouteContext
    ) -> None:
        token = (ctx.path or "")[len(HTTP01_PREFIX) :]
        answer = self._tokens.get(token)
        status, body = ("200 OK", answer) if answer else ("404 Not Found", "unknown token")
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n{body}".encode()
        )
        await writer.drain()
        writer.close()
