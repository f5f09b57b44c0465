"""Route security: who may connect (IP lists), how much (connection limits, rate limits),
and who may see an HTTP route (basic auth).

The gate keeps live counters per route and per (route, client IP); they are released when a
connection ends and pruned as they empty, so memory follows the clients that are active now,
not every client ever seen.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from smartroute.routing.model import BasicAuthPolicy, CompiledRoute, SecurityPolicy
from smartroute.routing.patterns import IPAddress, ip_allowed

_K = TypeVar("_K")

WINDOW = 60.0  # seconds: rate limits count connections per minute


def ip_refusal(policy: SecurityPolicy, address: IPAddress) -> str | None:
    """Why ``address`` may not use the route, or None. The block list wins."""
    if policy.ip_block_list and ip_allowed(policy.ip_block_list, address):
        return "client IP is blocked"
    if policy.ip_allow_list and not ip_allowed(policy.ip_allow_list, address):
        return "client IP is not allowed"
    return None


class SecurityGate:
    """Admits connections to routes under their limits and counts them until they end."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._active: dict[str, int] = {}
        self._active_ip: dict[tuple[str, str], int] = {}
        self._recent: dict[tuple[str, str], deque[float]] = {}
        self._admits = 0

    def admit(self, route: CompiledRoute, address: IPAddress) -> tuple[int, str] | None:
        """Count a new connection of ``address`` on ``route``; or (HTTP status, reason) to refuse.

        An admitted connection must be given back with :meth:`release`.
        """
        policy = route.security
        if policy is None:
            return None
        if (reason := ip_refusal(policy, address)) is not None:
            return 403, reason
        name, ip = route.name, str(address)
        key = (name, ip)
        if (
            policy.max_connections is not None
            and self._active.get(name, 0) >= policy.max_connections
        ):
            return 503, f"route {name!r} is at its limit of {policy.max_connections} connections"
        per_ip = policy.max_connections_per_ip
        if per_ip is not None and self._active_ip.get(key, 0) >= per_ip:
            return 429, f"at most {per_ip} connections per client on route {name!r}"
        if policy.rate_limit is not None:
            now = self._clock()
            recent = self._recent.get(key)
            if recent is None:
                recent = self._recent[key] = deque()
            while recent and recent[0] <= now - WINDOW:
                recent.popleft()
            limit = policy.rate_limit.connections_per_minute
            if len(recent) >= limit:
                return 429, f"more than {limit} connections per minute on route {name!r}"
            recent.append(now)
            self._prune(now)
        self._active[name] = self._active.get(name, 0) + 1
        self._active_ip[key] = self._active_ip.get(key, 0) + 1
        return None

    def release(self, route_name: str, ip: str) -> None:
        _decrement(self._active, route_name)
        _decrement(self._active_ip, (route_name, ip))

    def _prune(self, now: float) -> None:
        """Drop rate windows whose last connection left the window (every 1,000 admits)."""
        self._admits += 1
        if self._admits % 1000:
            return
        stale = [
            key for key, recent in self._recent.items() if not recent or recent[-1] <= now - WINDOW
        ]
        for key in stale:
            del self._recent[key]

    @property
    def tracked(self) -> int:
        """How many per-client entries are held (for tests of the pruning)."""
        return len(self._active_ip) + len(self._recent)


def _decrement(table: dict[_K, int], key: _K) -> None:
    left = table.get(key, 0) - 1
    if left > 0:
        table[key] = left
    else:
        table.pop(key, None)


def _password_matches(stored: str, given: str) -> bool:
    """Constant-time check against a plain or hashed password.

    Hashed forms: ``sha256:<hex>`` and ``pbkdf2_sha256$<iterations>$<salt>$<hex>``.
    """
    if stored.startswith("sha256:"):
        digest = hashlib.sha256(given.encode()).hexdigest()
        return hmac.compare_digest(digest, stored[len("sha256:") :].lower())
    if stored.startswith("pbkdf2_sha256$"):
        try:
            _, iterations, salt, expected = stored.split("$", 3)
            derived = hashlib.pbkdf2_hmac("sha256", given.encode(), salt.encode(), int(iterations))
        except ValueError:
            return False
        return hmac.compare_digest(derived.hex(), expected.lower())
    return hmac.compare_digest(stored.encode(), given.encode())


def basic_auth_refusal(policy: BasicAuthPolicy, authorization: str | None) -> str | None:
    """Why the request's ``Authorization`` header does not let it in, or None."""
    if not authorization or not authorization[:6].lower() == "basic ":
        return "credentials required"
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return "malformed credentials"
    user, sep, password = decoded.partition(":")
    stored = policy.users.get(user) if sep else None
    # Compare even for unknown users, so timing does not tell which names exist.
    matches = _password_matches(stored if stored is not None else "\0", password)
    return None if stored is not None and matches else "wrong user name or password"


def challenge_header(policy: BasicAuthPolicy) -> tuple[str, str]:
    return ("WWW-Authenticate", f'Basic realm="{policy.realm}", charset="UTF-8"')
