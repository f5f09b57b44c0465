"""Answering the CA's challenges: HTTP-01 tokens, TLS-ALPN-01 certificates, DNS-01 records.

:class:`Challenges` publishes what the CA checks before an order is valid, and withdraws it
after. HTTP-01 answers are kept in this process and, when the store is shared with other
processes (``workers=N`` or a Redis store), in the store too: the CA may reach any of them,
and each answers from the store what it does not know itself. TLS-ALPN-01 answers live in this
process only (the challenge type is refused for shared stores); DNS-01 records go to the DNS
provider.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from smartroute.certs.acme_client import ChallengeTask, PendingOrder
from smartroute.certs.dns import DnsProvider
from smartroute.certs.storage import CertificateStorage
from smartroute.certs.store import check_challenge_token
from smartroute.certs.tls_alpn import TlsAlpnResponder
from smartroute.context import RouteContext
from smartroute.errors import AcmeError, CertificateStoreError

log = logging.getLogger("smartroute.certs")

HTTP01_ROUTE = "smartroute:acme-http-01"
HTTP01_PRIORITY = 2**31 - 1
HTTP01_PREFIX = "/.well-known/acme-challenge/"


class Challenges:
    """The challenges of the orders under way, published where the CA looks for them."""

    def __init__(
        self,
        storage: CertificateStorage | None,
        dns: DnsProvider | None,
        *,
        shared: bool,
        ttl: float,
    ) -> None:
        self.storage = storage
        self.dns = dns
        self.shared = shared  # answers go to the store too, for the other processes
        self.ttl = ttl  # how long a stored answer lives if nobody withdraws it
        self.alpn = TlsAlpnResponder()
        self._tokens: dict[str, str] = {}
        self._txt: dict[str, int] = {}  # record name -> orders using it (example.com, *.)

    async def publish(self, pending: PendingOrder) -> None:
        """Make every challenge of ``pending`` answerable; raises when one cannot be."""
        for task in pending.challenges:
            if task.kind == "http-01":
                self._tokens[task.token] = task.key_authorization
                if self.shared and self.storage is not None:
                    await self.storage.put_challenge(task.token, task.key_authorization, self.ttl)
            elif task.kind == "dns-01":
                assert self.dns is not None
                await self._dns_call(self.dns.set_txt, task.txt_name, task.key_authorization)
                self._txt[task.txt_name] = self._txt.get(task.txt_name, 0) + 1
            else:
                self.alpn.add(task.domain, task.key_authorization)

    async def withdraw(self, pending: PendingOrder) -> None:
        """Withdraw what :meth:`publish` put out; failures are logged, never raised."""
        for task in pending.challenges:
            try:
                await self._withdraw(task)
            except Exception as exc:  # noqa: BLE001 - the CA is done with it either way
                log.warning(
                    "cannot withdraw the %s challenge of %s: %s", task.kind, task.domain, exc
                )

    async def _withdraw(self, task: ChallengeTask) -> None:
        if task.kind == "http-01":
            self._tokens.pop(task.token, None)
            if self.shared and self.storage is not None:
                await self.storage.delete_challenge(task.token)
        elif task.kind == "dns-01":
            users = self._txt.get(task.txt_name, 0) - 1
            if users > 0:  # another order still needs the record: it holds both values
                self._txt[task.txt_name] = users
                return
            self._txt.pop(task.txt_name, None)
            assert self.dns is not None
            await self._dns_call(self.dns.clear_txt, task.txt_name)
        else:
            self.alpn.remove(task.domain)

    async def _dns_call(self, method: Callable[..., Awaitable[object]], *args: str) -> None:
        """Call the DNS provider, bounded in time; whatever it raises becomes an AcmeError
        (the order of that name fails, the others go on)."""
        what = f"dns_provider.{getattr(method, '__name__', 'call')}({args[0]!r})"
        try:
            async with asyncio.timeout(self.ttl):
                await method(*args)
        except TimeoutError:
            raise AcmeError(f"{what} did not return within {self.ttl:g}s") from None
        except AcmeError:
            raise
        except Exception as exc:  # the user's provider: its failure is this order's
            raise AcmeError(f"{what} failed: {type(exc).__name__}: {exc}") from exc

    async def answer(self, token: str) -> str | None:
        """The key authorization for an HTTP-01 token: this process's, else the store's."""
        answer = self._tokens.get(token)
        if answer is not None or not self.shared or self.storage is None:
            return answer
        try:
            check_challenge_token(token)  # anyone may ask: a made-up token is a plain 404
        except CertificateStoreError:
            return None
        try:
            return await self.storage.get_challenge(token)
        except CertificateStoreError as exc:
            log.warning("cannot look up an ACME challenge answer: %s", exc)
            return None

    def http01_route(self, port: int, domains: list[str] | None) -> dict[str, Any]:
        """The route answering HTTP-01 on ``port``, for ``domains`` (None: any name)."""
        match: dict[str, Any] = {"ports": port, "path": HTTP01_PREFIX + "*"}
        if domains is not None:
            match["domains"] = domains
        return {
            "name": HTTP01_ROUTE,
            "priority": HTTP01_PRIORITY,
            "match": match,
            "action": {"type": "socket-handler", "socket_handler": self._answer_http01},
        }

    async def _answer_http01(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: RouteContext
    ) -> None:
        token = (ctx.path or "")[len(HTTP01_PREFIX) :]
        answer = await self.answer(token) if token else None
        status, body = ("200 OK", answer) if answer else ("404 Not Found", "unknown token")
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n{body}".encode()
        )
        await writer.drain()
        writer.close()
