"""When a certificate needs renewing: each domain's status and the arithmetic of its schedule.

A certificate is due when less than ``renew_threshold_days`` or a third of its lifetime is
left, whichever comes first, or earlier when the CA suggests so (ARI). A failure is retried
after ``retry_min``, doubling up to ``retry_max``, with jitter.
"""

from __future__ import annotations

import datetime
import random
from dataclasses import dataclass
from typing import Any

from smartroute.certs.records import StoredCertificate
from smartroute.certs.settings import AcmeSettings


def utc_now() -> datetime.datetime:
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
    forced_at: datetime.datetime | None = None  # a stored one older than this is not enough
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

    def due(
        self, stored: StoredCertificate | None, settings: AcmeSettings | None, at: datetime.datetime
    ) -> datetime.datetime:
        """When a new certificate is needed (``at`` or earlier means: now); ``stored`` is the
        one served."""
        if self.next_attempt is not None:
            return self.next_attempt
        if self.forced or stored is None:
            return at
        return self.renew_at(stored, settings)

    def renew_at(
        self, stored: StoredCertificate, settings: AcmeSettings | None
    ) -> datetime.datetime:
        """When ``stored`` should be replaced."""
        threshold = datetime.timedelta(days=settings.renew_threshold_days if settings else 30)
        due = stored.not_after - max(threshold, stored.lifetime / 3)
        if self.fresh_since is not None:
            # A certificate just obtained that is already "due" (a threshold longer than the
            # CA's lifetimes) is renewed once per check interval, not in a tight loop.
            interval = settings.renew_check_interval if settings else 3600.0
            due = max(due, self.fresh_since + datetime.timedelta(seconds=interval))
        if self.suggested is not None:
            due = min(due, self.suggested)
        return due

    def satisfied_by(
        self,
        stored: StoredCertificate,
        current: StoredCertificate | None,
        settings: AcmeSettings | None,
    ) -> bool:
        """Whether ``stored`` (found in the store, another process's maybe) makes an order
        needless, ``current`` being the one served now."""
        if self.forced:
            return self.forced_at is not None and stored.stored_at > self.forced_at
        if current is not None and current.not_after >= stored.not_after:
            return False  # the one served, or an older one: it was found due
        return DomainStatus().renew_at(stored, settings) > utc_now()

    def installed(self, source: str, not_after: datetime.datetime) -> None:
        """A certificate from ``source`` is served now."""
        self.state, self.source, self.not_after = "valid", source, not_after
        self.last_error, self.failures, self.next_attempt = None, 0, None
        self.forced, self.forced_at = False, None
        self.fresh_since = None if source == "store" else utc_now()
        self.suggested, self.asked_ca_at = None, None

    def failed(self, error: str, settings: AcmeSettings | None) -> datetime.datetime:
        """An attempt failed: the next one is after an exponential, jittered backoff."""
        self.failures += 1
        base = settings.retry_min if settings else 60.0
        ceiling = settings.retry_max if settings else 6 * 3600.0
        delay = min(ceiling, base * 2 ** (self.failures - 1)) * random.uniform(0.8, 1.2)
        self.state, self.last_error, self.forced = "failed", error, False
        self.next_attempt = utc_now() + datetime.timedelta(seconds=delay)
        return self.next_attempt
