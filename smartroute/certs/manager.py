"""Automatic certificates: which domains need one, getting them, keeping them renewed.

Stored certificates are served at once on start; what is missing or due is asked of the
``certificate_provider``, then ordered from the ACME CA under its lock in the store, so that
processes sharing the store order it once (see :mod:`.storage`). Challenges are answered by
:mod:`.challenges`; on-demand names pass :mod:`.on_demand` first. A failure keeps the old
certificate in service and retries with backoff (see :mod:`.schedule`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from smartroute.certs.acme_client import AcmeClient, PendingOrder, new_private_key_pem
from smartroute.certs.challenges import HTTP01_ROUTE, Challenges
from smartroute.certs.on_demand import OnDemandGate
from smartroute.certs.provided import CertificateProvider, ask_provider
from smartroute.certs.records import StoredCertificate
from smartroute.certs.schedule import DomainStatus, utc_now
from smartroute.certs.settings import AcmeSettings
from smartroute.certs.storage import (
    LOCK_POLL,
    CertificateStorage,
    HeldBack,
    account_key,
    holding,
    open_storage,
)
from smartroute.certs.wanted import auto_domains, on_demand_domains
from smartroute.errors import AcmeError, CertificateStoreError
from smartroute.routing.model import CertificatePair, CompiledRoute
from smartroute.routing.patterns import DomainPattern
from smartroute.routing.schema import RouteInput

log = logging.getLogger("smartroute.certs")


class CertificateHost(Protocol):
    """What the manager needs of the proxy it keeps certificates for."""

    def serve_certificate(self, new: CertificatePair, old: CertificatePair | None) -> None:
        """Serve ``new`` to new handshakes; ``old`` stays with the connections that use it."""

    async def set_internal_route(self, name: str, route: RouteInput | None) -> None:
        """Add (or with None remove) a route of the proxy's own, kept across route updates."""


class CertificateManager:
    """Keeps a certificate in service for every domain of every ``auto`` route, and for every
    name an ``on-demand`` route obtained one for.

    Certificates go to new handshakes, and the HTTP-01 challenge route comes and goes, through
    ``proxy`` (see :class:`CertificateHost`). ``cluster``: other processes share the store
    (the workers of ``workers=N``); a Redis store is always shared.
    """

    def __init__(
        self,
        proxy: CertificateHost,
        settings: AcmeSettings | None,
        provider: CertificateProvider | None = None,
        *,
        cluster: bool = False,
    ) -> None:
        self.proxy = proxy
        self.settings = settings
        self.provider = provider
        self.storage: CertificateStorage | None = (
            open_storage(settings.certificate_store) if settings else None
        )
        self.cluster = cluster or (self.storage is not None and self.storage.shared)
        self.client: AcmeClient | None = None
        known = settings or AcmeSettings()  # without acme: the defaults, never used to order
        self.challenges = Challenges(
            self.storage, known.dns_provider, shared=self.cluster, ttl=known.order_timeout + 60
        )
        self.gate = OnDemandGate(
            known.on_demand_permission, known.on_demand_timeout, known.on_demand_per_minute
        )
        self._routes_want: set[str] = set()
        self._on_demand: set[str] = set()  # names on-demand routes obtained certificates for
        self._on_demand_patterns: tuple[DomainPattern, ...] = ()
        self._serving: dict[str, CertificatePair] = {}
        self._stored: dict[str, StoredCertificate] = {}
        self._status: dict[str, DomainStatus] = {}
        self._held_back = HeldBack(self.storage) if self.storage else None
        self._outcome: dict[str, asyncio.Event] = {}  # on-demand names waiting for a result
        self._asking: dict[str, asyncio.Task[CertificatePair | None]] = {}
        self._wake = asyncio.Event()
        self._batch_done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._synced_at: datetime.datetime | None = None
        # Another process may order and the CA may ask this one: the HTTP-01 route stays.
        self._standing_route = (
            self.cluster and settings is not None and known.challenge == "http-01"
        )

    @property
    def _wanted(self) -> set[str]:
        return self._routes_want | self._on_demand

    def _on_demand_route(self, domain: str) -> bool:
        """Whether an on-demand route covers ``domain``."""
        return any(p.matches(domain) for p in self._on_demand_patterns)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, routes: Iterable[CompiledRoute]) -> None:
        """Serve what the store holds, then start issuing and renewing in the background.

        Raises :class:`~smartroute.errors.CertificateStoreError` (naming the store) when the
        store cannot be reached."""
        self.routes_changed(routes)
        if self.storage is not None:
            await self.storage.open()
            await self._sync(initial=True)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for task in list(self._asking.values()):
            task.cancel()
        await asyncio.gather(*self._asking.values(), return_exceptions=True)
        if not self._standing_route:
            await self.proxy.set_internal_route(HTTP01_ROUTE, None)
        if self.storage is not None:
            await self.storage.close()

    def standing_routes(self) -> dict[str, RouteInput]:
        """The routes the proxy keeps for the manager from its start on: the HTTP-01 answers
        when other processes share the store (any of them may be asked)."""
        if not self._standing_route or self.settings is None:
            return {}
        return {HTTP01_ROUTE: self.challenges.http01_route(self.settings.port, None)}

    def routes_changed(self, routes: Iterable[CompiledRoute]) -> None:
        """Take the names ``routes`` want certificates for (looked at soon)."""
        routes = tuple(routes)
        dns01 = self.settings is not None and self.settings.challenge == "dns-01"
        self._routes_want = auto_domains(routes, wildcards=dns01)
        self._on_demand_patterns = on_demand_domains(routes)
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
        self._wake.set()
        while any(self._status[d].state in ("pending", "renewing") for d in self._wanted):
            self._batch_done.clear()
            await self._batch_done.wait()
        return self.status()

    async def renew(self, domains: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """Renew ``domains`` (all auto domains by default) now; returns their status after."""
        chosen = sorted(self._wanted if domains is None else set(domains) & self._wanted)
        now = utc_now()
        for domain in chosen:
            status = self._status.setdefault(domain, DomainStatus())
            status.forced, status.forced_at, status.next_attempt = True, now, None
        self._wake.set()
        while any(self._status[d].forced for d in chosen):
            self._batch_done.clear()
            await self._batch_done.wait()
        return {d: self._status[d].as_dict() for d in chosen}

    # -- on demand -------------------------------------------------------------------------

    async def on_demand(self, name: str) -> CertificatePair | None:
        """The certificate for ``name`` on an on-demand route: served, stored, or obtained now
        when the permission callable allows it; None when there is none to present.

        Concurrent handshakes for one name share one attempt."""
        name = name.lower().rstrip(".")
        pair = self._serving.get(name)
        if pair is not None:
            return pair
        task = self._asking.get(name)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._obtain_on_demand(name))
            self._asking[name] = task
            task.add_done_callback(lambda _: self._asking.pop(name, None))
        return await asyncio.shield(task)

    async def _obtain_on_demand(self, name: str) -> CertificatePair | None:
        if self.storage is None or self.settings is None:
            return None
        try:
            stored = await self.storage.load([name])
        except CertificateStoreError as exc:
            log.warning("on-demand certificate for %s: %s", name, exc)
            return None
        if stored is not None and stored.remaining().total_seconds() > 0:
            # Stored (by this process earlier, or another one): no question asked.
            self._on_demand.add(name)
            self._install(name, stored, "store")
            return stored.pair
        if not await self.gate.allows(name) or not self.gate.take_order():
            return None
        outcome = self._outcome.setdefault(name, asyncio.Event())
        self._on_demand.add(name)
        self._status[name] = DomainStatus()
        self._wake.set()
        try:
            async with asyncio.timeout(self.settings.order_timeout + self.settings.lock_lease):
                await outcome.wait()
        except TimeoutError:
            log.warning("on-demand certificate for %s: not ready in time", name)
        finally:
            self._outcome.pop(name, None)
        if name not in self._serving:
            self._on_demand.discard(name)  # asked again at a later handshake, not renewed
            return None
        return self._serving[name]

    # -- planning --------------------------------------------------------------------------

    def _due(self, domain: str, at: datetime.datetime) -> datetime.datetime:
        """When ``domain`` needs a new certificate (``at`` or earlier means: now)."""
        return self._status[domain].due(self._stored.get(domain), self.settings, at)

    async def _run(self) -> None:
        """Look, order what is due, sleep until the next thing is due; never gives up."""
        while True:
            try:
                await self._look()
            except Exception as exc:  # a bug must not end renewals for good: log, go on
                log.error("certificate manager failed; trying again shortly", exc_info=exc)
                self._batch_done.set()
                await asyncio.sleep(self.settings.retry_min if self.settings else 60.0)

    async def _look(self) -> None:
        interval = self.settings.renew_check_interval if self.settings else 3600.0
        while True:
            if self._held_back:
                await self._held_back.retry()
            if self.cluster:
                await self._sync(initial=False)
            await self._ask_renewal_info(interval)
            now = utc_now()
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
            if self._held_back and self.settings is not None:
                wait = min(wait, self.settings.retry_min)
            self._wake.clear()
            # asyncio.timeout, not wait_for: wait_for can swallow a cancellation that arrives
            # just as the event is set, and stop() would then wait forever.
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _sync(self, *, initial: bool) -> None:
        """Serve what the store holds that is newer than what is served (another process
        renewed it); on start, everything stored for a wanted name. A cluster looks again once
        per check interval."""
        assert self.storage is not None
        now = utc_now()
        if not initial:
            interval = self.settings.renew_check_interval if self.settings else 3600.0
            if self._synced_at and (now - self._synced_at).total_seconds() < interval:
                return
        self._synced_at = now
        try:
            entries, problems = await self.storage.list()
        except CertificateStoreError as exc:
            if initial:
                raise
            log.warning("cannot look for renewed certificates: %s", exc)
            return
        for problem in problems:
            log.warning(
                "certificate store %s: %s: %s (not served; it will be issued again)",
                self.storage.location,
                problem.name,
                problem.reason,
            )
        wanted = self._wanted
        for entry in entries:
            for domain in entry.domains:
                if self._on_demand_route(domain):
                    self._on_demand.add(domain)  # obtained earlier: kept renewed
                elif wanted and domain not in wanted:
                    continue
                current = self._stored.get(domain)
                if current is None or entry.not_after > current.not_after:
                    self._install(domain, entry, "store")

    async def _ask_renewal_info(self, interval: float) -> None:
        """Ask the CA when to renew (ARI, RFC 9773), once per check interval per certificate.

        A CA without renewal information, or one that does not answer, leaves the schedule to
        the threshold; the question is asked again at the next interval. Nothing is asked
        before this process has an account (it never ordered).
        """
        if self.client is None:
            return
        now = utc_now()
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
        if self.storage is None or self.settings is None:
            for domain in remaining:
                self._failed(domain, "no certificate_provider answer and no acme setting")
            return
        for domain in remaining:
            self._status[domain].state = "renewing" if domain in self._stored else "pending"
        held: dict[str, contextlib.AsyncExitStack] = {}
        try:
            for domain in remaining:
                lock = await self._claim(domain)
                if lock is not None:
                    held[domain] = lock
            if held:
                await self._order(held)
        finally:
            for lock in held.values():
                await lock.aclose()

    async def _claim(self, domain: str) -> contextlib.AsyncExitStack | None:
        """``domain``'s lock in the store when an order is still needed; None when the store
        had a good one (now served) or another process is ordering it."""
        assert self.storage is not None and self.settings is not None
        status, current = self._status[domain], self._stored.get(domain)
        lock = contextlib.AsyncExitStack()
        try:
            stored = await self.storage.load([domain])
            if stored is None or not status.satisfied_by(stored, current, self.settings):
                name, lease = _lock_name(domain), self.settings.lock_lease
                if await lock.enter_async_context(holding(self.storage, name, lease)) is None:
                    # Another process orders it: look again soon, without counting a failure.
                    status.next_attempt = utc_now() + datetime.timedelta(
                        seconds=min(LOCK_POLL, lease / 4)
                    )
                    log.debug("certificate for %s is being ordered by another process", domain)
                    return None
                stored = await self.storage.load([domain])  # it may have finished meanwhile
                if stored is None or not status.satisfied_by(stored, current, self.settings):
                    return lock.pop_all()
        except CertificateStoreError as exc:
            self._failed(domain, str(exc))
            return None
        finally:
            await lock.aclose()  # a no-op once pop_all() handed the lock over
        self._install(domain, stored, "store")
        return None

    async def _order(self, held: dict[str, contextlib.AsyncExitStack]) -> None:
        """Order each domain of ``held`` (their locks) and store what the CA issues; each lock
        is released as soon as its domain has its outcome."""
        assert self.storage is not None and self.settings is not None
        domains = list(held)
        try:
            client = await self._account()
        except (AcmeError, CertificateStoreError) as exc:
            for domain in domains:
                self._failed(domain, str(exc))
            return
        batch_route = self.settings.challenge == "http-01" and not self._standing_route
        orders: list[PendingOrder] = []
        try:
            if batch_route:
                await self.proxy.set_internal_route(
                    HTTP01_ROUTE, self.challenges.http01_route(self.settings.port, domains)
                )
            for domain in domains:
                try:
                    pending = await asyncio.to_thread(client.order, [domain])
                    orders.append(pending)
                    await self.challenges.publish(pending)
                except (AcmeError, CertificateStoreError) as exc:
                    self._failed(domain, str(exc))
            for pending in orders:
                domain = pending.domains[0]
                if self._status[domain].state == "failed":
                    continue  # publishing failed: not worth asking the CA to validate
                try:
                    chain = await asyncio.to_thread(client.finish, pending)
                except AcmeError as exc:
                    self._failed(domain, str(exc))
                else:
                    await self._keep(domain, chain, pending.key_pem)
                await held.pop(domain).aclose()
        finally:
            for pending in orders:
                await self.challenges.withdraw(pending)
            if batch_route:
                await self.proxy.set_internal_route(HTTP01_ROUTE, None)

    async def _keep(self, domain: str, chain: str, key_pem: str) -> None:
        """Store and serve a certificate the CA just issued (if the store cannot take it now,
        it is served from memory and stored later)."""
        assert self._held_back is not None
        try:
            entry = await self._held_back.save(domain, chain, key_pem)
        except CertificateStoreError as exc:
            self._failed(domain, str(exc))
            return
        self._install(domain, entry, "acme")
        log.info("certificate for %s issued, valid until %s", domain, entry.not_after.isoformat())

    async def _account(self) -> AcmeClient:
        """The ACME client with this CA's account key: the stored one, or a new one stored
        under the account lock (so processes sharing the store use one account)."""
        if self.client is not None:
            return self.client
        assert self.storage is not None and self.settings is not None
        key_pem = await account_key(
            self.storage,
            self.settings.directory_url,
            {"email": self.settings.email},
            new_private_key_pem,
            self.settings.lock_lease,
        )
        self.client = AcmeClient(self.settings, key_pem)
        return self.client

    async def _from_provider(self, domain: str) -> bool:
        """Serve the provider's certificate for ``domain`` if it has one (asked again when it
        is due for renewal, like an ACME certificate)."""
        entry = await ask_provider(self.provider, domain) if self.provider else None
        if entry is not None:
            self._install(domain, entry, "provider")
        return entry is not None

    def _install(self, domain: str, entry: StoredCertificate, source: str) -> None:
        """Serve ``entry`` for ``domain`` to new handshakes; the previous one stops being used."""
        pair = entry.pair
        self.proxy.serve_certificate(pair, self._serving.get(domain))
        self._serving[domain] = pair
        self._stored[domain] = entry
        self._status.setdefault(domain, DomainStatus()).installed(source, entry.not_after)
        self._settle(domain)

    def _failed(self, domain: str, error: str) -> None:
        next_attempt = self._status[domain].failed(error, self.settings)
        kept = " (the current certificate stays in service)" if domain in self._serving else ""
        log.warning(
            "certificate for %s failed: %s; next attempt at %s%s",
            domain, error, next_attempt.isoformat(timespec="seconds"), kept,
        )  # fmt: skip
        self._settle(domain)

    def _settle(self, domain: str) -> None:
        """Tell an on-demand handshake waiting for ``domain`` that it has an outcome."""
        outcome = self._outcome.get(domain)
        if outcome is not None:
            outcome.set()


def _lock_name(domain: str) -> str:
    return "cert-" + domain.replace("*", "_wildcard_")
