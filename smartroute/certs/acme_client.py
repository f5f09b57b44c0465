"""The ACME client: a thin, synchronous wrapper around the ``acme`` library.

The library blocks (it uses requests), so every public method here is meant to run in a
worker thread; a lock makes sure one account talks to the CA one operation at a time. Errors
of the library, of requests and of the CA are wrapped into :class:`~smartroute.AcmeError`
here, at the boundary.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from acme import challenges, client, crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from josepy.b64 import b64encode
from josepy.jwa import ES256, RS256, JWASignature
from josepy.jwk import JWK, JWKEC, JWKRSA

from smartroute import __version__
from smartroute.certs.dns import txt_record_name
from smartroute.certs.settings import AcmeSettings
from smartroute.certs.tls_alpn import TLSALPN01
from smartroute.errors import AcmeError

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ChallengeTask:
    """One challenge the proxy must answer before the CA validates ``domain``.

    For dns-01, ``key_authorization`` is the TXT value to publish at ``txt_name``; ``domain``
    is the name as ordered, so a wildcard keeps its ``*.``.
    """

    kind: str  # "http-01" | "tls-alpn-01" | "dns-01"
    domain: str
    token: str
    key_authorization: str
    body: messages.ChallengeBody = field(repr=False)
    txt_name: str = ""  # dns-01 only: the TXT record name, _acme-challenge.<base name>


@dataclass(slots=True)
class PendingOrder:
    domains: tuple[str, ...]
    key_pem: str = field(repr=False)
    order: messages.OrderResource = field(repr=False)
    challenges: list[ChallengeTask]


def new_private_key_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _jwk(key_pem: str) -> tuple[JWK, JWASignature]:
    try:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except (ValueError, TypeError) as exc:  # not PEM, encrypted, or an unsupported key type
        raise AcmeError(f"the ACME account key is not a usable PEM private key ({exc})") from exc
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return JWKEC(key=key), ES256
    if isinstance(key, rsa.RSAPrivateKey):
        return JWKRSA(key=key), RS256
    raise AcmeError("the ACME account key is neither EC nor RSA")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, messages.Error):
        return f"{exc.typ}: {exc.detail}" if exc.detail else str(exc.typ)
    if isinstance(exc, errors.ValidationError):
        problems = []
        for authzr in exc.failed_authzrs:
            for challb in authzr.body.challenges:
                if challb.error is not None:
                    problems.append(f"{authzr.body.identifier.value}: {challb.error.detail}")
        return "validation failed: " + ("; ".join(problems) or "no detail from the CA")
    if isinstance(exc, errors.TimeoutError):
        return "the CA did not finish the order in time"
    return f"{type(exc).__name__}: {exc}"


class AcmeClient:
    """One ACME account at one CA, used from worker threads.

    The account is the one of ``account_key_pem`` (PEM, EC or RSA): registered at first use,
    found again when the CA already knows the key. Keeping the key is the caller's business.
    """

    def __init__(self, settings: AcmeSettings, account_key_pem: str) -> None:
        self.settings = settings
        self.account_uri: str | None = None  # set once connected
        self._account_key_pem = account_key_pem
        self._lock = threading.Lock()
        self._client: client.ClientV2 | None = None
        self._key: JWK | None = None

    # -- the boundary ----------------------------------------------------------------------

    def _call(self, work: Callable[[], _T]) -> _T:
        with self._lock:
            try:
                return work()
            except AcmeError:
                raise
            except Exception as exc:  # requests, josepy, acme, the CA: one error type out
                raise AcmeError(_describe(exc)) from exc

    # -- account ---------------------------------------------------------------------------

    def _connect(self) -> client.ClientV2:
        """The library client with the account of the key (registered on first use)."""
        if self._client is not None:
            return self._client
        settings = self.settings
        key, alg = _jwk(self._account_key_pem)
        verify: Any = settings.ca_bundle or True
        net = client.ClientNetwork(
            key, alg=alg, verify_ssl=verify, user_agent=f"smartroute/{__version__}"
        )
        directory = client.ClientV2.get_directory(settings.directory_url, net)
        acme = client.ClientV2(directory, net)
        eab = None
        if settings.eab_kid and settings.eab_hmac_key:
            eab = messages.ExternalAccountBinding.from_data(
                account_public_key=key.public_key(),
                kid=settings.eab_kid,
                hmac_key=settings.eab_hmac_key,
                directory=directory,
            )
        elif acme.external_account_required():
            raise AcmeError(
                "the CA requires external account binding: set eab_kid and eab_hmac_key"
            )
        registration = messages.NewRegistration.from_data(
            email=settings.email, terms_of_service_agreed=True, external_account_binding=eab
        )
        try:
            regr = acme.new_account(registration)
        except errors.ConflictError as existing:  # the key already has an account: use it
            regr = messages.RegistrationResource(
                uri=existing.location, body=messages.Registration()
            )
            net.account = regr
            regr = acme.query_registration(regr)
        self.account_uri = regr.uri
        self._client, self._key = acme, key
        return acme

    # -- orders ----------------------------------------------------------------------------

    def order(self, domains: Sequence[str]) -> PendingOrder:
        """Open an order for ``domains`` and return the challenges to publish."""

        def work() -> PendingOrder:
            acme = self._connect()
            assert self._key is not None
            key_pem = new_private_key_pem()
            csr = crypto_util.make_csr(key_pem.encode(), list(domains))
            orderr = acme.new_order(csr)
            tasks = []
            for authzr in orderr.authorizations:
                if authzr.body.status == messages.STATUS_VALID:
                    continue  # validated recently: the CA reuses the authorization
                # A wildcard's authorization names the base domain and says "wildcard".
                domain = authzr.body.identifier.value
                if authzr.body.wildcard:
                    domain = "*." + domain
                kind = self.settings.challenge
                wanted = [c for c in authzr.body.challenges if c.chall.typ == kind]
                if not wanted:
                    offered = ", ".join(str(c.chall.typ) for c in authzr.body.challenges)
                    needs = " (wildcard names need dns-01)" if authzr.body.wildcard else ""
                    raise AcmeError(
                        f"{domain}: the CA does not offer {kind} (offers {offered}){needs}"
                    )
                challb = wanted[0]
                chall = challb.chall
                assert isinstance(chall, challenges.HTTP01 | TLSALPN01 | challenges.DNS01)
                tasks.append(
                    ChallengeTask(
                        kind=kind,
                        domain=domain,
                        token=b64encode(chall.token).decode(),
                        key_authorization=chall.validation(self._key),
                        body=challb,
                        txt_name=txt_record_name(domain) if kind == "dns-01" else "",
                    )
                )
            return PendingOrder(tuple(domains), key_pem, orderr, tasks)

        return self._call(work)

    def finish(self, pending: PendingOrder) -> str:
        """Tell the CA the challenges are ready, wait for validation, return the chain PEM."""

        def work() -> str:
            acme = self._connect()
            assert self._key is not None
            for task in pending.challenges:
                chall = task.body.chall
                assert isinstance(chall, challenges.HTTP01 | TLSALPN01 | challenges.DNS01)
                acme.answer_challenge(task.body, chall.response(self._key))
            deadline = datetime.datetime.now() + datetime.timedelta(
                seconds=self.settings.order_timeout
            )
            finished = acme.poll_and_finalize(pending.order, deadline)
            if not finished.fullchain_pem:
                raise AcmeError("the CA finalized the order without a certificate")
            return str(finished.fullchain_pem)

        return self._call(work)

    def renewal_window(self, cert_pem: str) -> datetime.datetime | None:
        """When the CA suggests renewing (ARI), or None when it offers no renewal info."""

        def work() -> datetime.datetime | None:
            acme = self._connect()
            when, _ = acme.renewal_time(cert_pem.encode())
            if when is not None and when.tzinfo is None:
                when = when.replace(tzinfo=datetime.UTC)
            return when

        return self._call(work)
