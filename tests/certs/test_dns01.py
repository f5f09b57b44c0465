"""DNS-01 and wildcard certificates against a real Pebble, its TXT records in challtestsrv."""

from __future__ import annotations

import asyncio
import socket
import types
from collections.abc import Sequence

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from pebble import Pebble, dns_query_txt, free_port
from support import LOOPBACK, async_test

from smartroute.certs.acme_client import AcmeClient, PendingOrder, new_private_key_pem
from smartroute.certs.dns import ChallTestSrvDns, DnsProvider, dns_provider_from, txt_record_name
from smartroute.certs.settings import AcmeSettings
from smartroute.errors import AcmeError, ConfigError

PATH = "settings.acme.dns_provider"
BASE = "example.test"
WILDCARD = "*.example.test"
TXT_NAME = "_acme-challenge.example.test"


async def txt_values(pebble: Pebble, name: str) -> list[str]:
    return sorted(await asyncio.to_thread(dns_query_txt, pebble.dns_port, name))


# -- providers from settings -----------------------------------------------------------------


class RecordingDns:
    """Remembers what it was asked to publish."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}

    async def set_txt(self, name: str, value: str) -> None:
        self.records.setdefault(name, []).append(value)

    async def clear_txt(self, name: str) -> None:
        self.records.pop(name, None)


RECORDING = RecordingDns()


class SyncDns:
    def set_txt(self, name: str, value: str) -> None:
        pass

    def clear_txt(self, name: str) -> None:
        pass


class HalfDns:
    async def set_txt(self, name: str, value: str) -> None:
        pass


class NeedsToken(RecordingDns):
    def __init__(self, token: str) -> None:
        super().__init__()


async def _set(name: str, value: str) -> None:
    pass


async def _clear(name: str) -> None:
    pass


NOT_CALLABLE = types.SimpleNamespace(set_txt="POST /records", clear_txt=_clear)
MODULE = __name__  # pytest imports this file under its basename: import paths can name it


def test_an_object_with_async_set_txt_and_clear_txt_is_the_provider() -> None:
    assert dns_provider_from(RECORDING, PATH) is RECORDING
    functions = types.SimpleNamespace(set_txt=_set, clear_txt=_clear)
    assert dns_provider_from(functions, PATH) is functions


def test_a_pebble_challtestsrv_dict_makes_the_built_in_provider() -> None:
    made = dns_provider_from({"type": "pebble-challtestsrv", "url": "http://127.0.0.1:8055/"}, PATH)
    assert isinstance(made, ChallTestSrvDns) and made.url == "http://127.0.0.1:8055"


def test_an_import_path_names_a_provider_or_a_class_made_with_no_arguments() -> None:
    assert dns_provider_from(f"{MODULE}:RECORDING", PATH) is RECORDING
    made = dns_provider_from(f"{MODULE}:RecordingDns", PATH)
    assert isinstance(made, RecordingDns) and made is not RECORDING


BAD: list[tuple[object, str, str]] = [
    (None, PATH, "the dns-01 challenge needs a DNS provider: expected an object with async set_txt"),
    (42, PATH, "an object of type int has no set_txt method; expected"),
    (SyncDns(), PATH, "an object of type SyncDns has a set_txt that is not async"),
    (HalfDns(), PATH, "an object of type HalfDns has no clear_txt method"),
    (NOT_CALLABLE, PATH, "an object of type SimpleNamespace has no set_txt method"),
    (RecordingDns, PATH, "RecordingDns is a class: pass an instance of it"),
    ({"type": "pebble-challtestsrv", "url": "http://h:1", "urls": 1}, PATH + ".urls", 'unknown dns_provider key (did you mean "url"?)'),
    ({"url": "http://h:1"}, PATH + ".type", "missing; expected one of 'pebble-challtestsrv'"),
    ({"type": "route53", "url": "http://h:1"}, PATH + ".type", "'route53' is not a known provider type; expected one of 'pebble-challtestsrv'"),
    ({"type": "pebble-challtesrv", "url": "http://h:1"}, PATH + ".type", 'is not a known provider type (did you mean "pebble-challtestsrv"?)'),
    ({"type": "pebble-challtestsrv"}, PATH + ".url", "missing; expected challtestsrv's management URL"),
    ({"type": "pebble-challtestsrv", "url": "ftp://h:1"}, PATH + ".url", "'ftp://h:1' is not an http(s) URL"),
    ({"type": "pebble-challtestsrv", "url": 8055}, PATH + ".url", "8055 is not an http(s) URL"),
    ({"type": "pebble-challtestsrv", "url": "http://h:port"}, PATH + ".url", "is not an http(s) URL"),
    ({"type": "pebble-challtestsrv", "url": "http://[::1"}, PATH + ".url", "is not an http(s) URL"),
    ("RecordingDns", PATH, "'RecordingDns' is not an import path"),
    ("smartroute_no_such_module:dns", PATH, "cannot import 'smartroute_no_such_module:dns' (ModuleNotFoundError"),
    (f"{MODULE}:Missing", PATH, "cannot import"),
    (f"{MODULE}:PATH", PATH, f"'{MODULE}:PATH' names an object of type str, which has no set_txt method"),
    (f"{MODULE}:SyncDns", PATH, "names an object of type SyncDns, which has a set_txt that is not async"),
    (f"{MODULE}:NeedsToken", PATH, f"cannot create {MODULE}:NeedsToken with no arguments (TypeError"),
]  # fmt: skip


@pytest.mark.parametrize(("value", "path", "problem"), BAD)
def test_a_bad_provider_is_a_config_error_at_its_field(
    value: object, path: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as failure:
        dns_provider_from(value, PATH)
    assert failure.value.path == path
    assert problem in failure.value.problem


def test_the_txt_record_of_a_wildcard_is_the_one_of_its_base_name() -> None:
    assert txt_record_name(BASE) == TXT_NAME
    assert txt_record_name(WILDCARD) == TXT_NAME
    assert txt_record_name("*.a.example.test.") == "_acme-challenge.a.example.test"


# -- pebble-challtestsrv ----------------------------------------------------------------------


@async_test(30)
async def test_challtestsrv_publishes_every_value_and_clears_them_all(pebble: Pebble) -> None:
    dns = ChallTestSrvDns(pebble.challtestsrv_url)
    other = "_acme-challenge.other.example.test"
    assert await txt_values(pebble, TXT_NAME) == []
    await dns.set_txt(TXT_NAME, "first")
    assert await txt_values(pebble, TXT_NAME) == ["first"]
    await dns.set_txt(TXT_NAME, "second")  # added next to the first, as a wildcard order needs
    await dns.set_txt(other, "other")
    assert await txt_values(pebble, TXT_NAME) == ["first", "second"]
    await dns.clear_txt(TXT_NAME)
    assert await txt_values(pebble, TXT_NAME) == []
    assert await txt_values(pebble, other) == ["other"]


@async_test(30)
async def test_challtestsrv_failures_name_the_url_and_the_record(pebble: Pebble) -> None:
    refused = f"http://{LOOPBACK}:{free_port()}"
    with pytest.raises(AcmeError, match=f"set-txt {TXT_NAME} at {refused}/set-txt: .*refused"):
        await ChallTestSrvDns(refused).set_txt(TXT_NAME, "value")
    wrong_path = pebble.challtestsrv_url + "/nothing-here"
    with pytest.raises(
        AcmeError, match=f"clear-txt {TXT_NAME} at {wrong_path}/clear-txt: HTTP 404"
    ):
        await ChallTestSrvDns(wrong_path).clear_txt(TXT_NAME)
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind((LOOPBACK, 0))
        silent.listen()
        url = f"http://{LOOPBACK}:{silent.getsockname()[1]}"
        with pytest.raises(AcmeError, match=f"set-txt {TXT_NAME} at {url}/set-txt: .*timed out"):
            await ChallTestSrvDns(url, timeout=0.3).set_txt(TXT_NAME, "value")


# -- orders through AcmeClient ----------------------------------------------------------------


def dns01_client(pebble: Pebble, account_key_pem: str | None = None) -> AcmeClient:
    settings = AcmeSettings(
        directory_url=pebble.directory_url,
        ca_bundle=pebble.ca_bundle,
        email="ops@smartroute.test",
        challenge="dns-01",
        order_timeout=30,
    )
    return AcmeClient(settings, account_key_pem or new_private_key_pem())


async def order(client: AcmeClient, domains: Sequence[str]) -> PendingOrder:
    return await asyncio.to_thread(client.order, domains)


async def publish(dns: DnsProvider, pending: PendingOrder) -> None:
    for task in pending.challenges:
        await dns.set_txt(task.txt_name, task.key_authorization)


async def finish(client: AcmeClient, pending: PendingOrder) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(
        (await asyncio.to_thread(client.finish, pending)).encode()
    )


def dns_names(chain: list[x509.Certificate]) -> list[str]:
    san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return sorted(san.get_values_for_type(x509.DNSName))


def verify(chain: list[x509.Certificate], pebble: Pebble, name: str) -> None:
    root = x509.load_pem_x509_certificate(pebble.root_pem().encode())
    verifier = PolicyBuilder().store(Store([root])).build_server_verifier(x509.DNSName(name))
    verifier.verify(chain[0], chain[1:])


@async_test(60)
async def test_a_wildcard_certificate_through_dns01(pebble: Pebble) -> None:
    client, dns = dns01_client(pebble), ChallTestSrvDns(pebble.challtestsrv_url)
    pending = await order(client, [WILDCARD])
    [task] = pending.challenges
    assert (task.kind, task.domain, task.txt_name) == ("dns-01", WILDCARD, TXT_NAME)
    await publish(dns, pending)
    assert await txt_values(pebble, TXT_NAME) == [task.key_authorization]
    chain = await finish(client, pending)
    await dns.clear_txt(TXT_NAME)
    assert dns_names(chain) == [WILDCARD]
    verify(chain, pebble, "www.example.test")
    for uncovered in (BASE, "deeper.www.example.test"):
        with pytest.raises(VerificationError):
            verify(chain, pebble, uncovered)


@async_test(60)
async def test_the_base_name_alone_through_dns01(pebble: Pebble) -> None:
    client, dns = dns01_client(pebble), ChallTestSrvDns(pebble.challtestsrv_url)
    pending = await order(client, [BASE])
    [task] = pending.challenges
    assert (task.kind, task.domain, task.txt_name) == ("dns-01", BASE, TXT_NAME)
    await publish(dns, pending)
    assert dns_names(await finish(client, pending)) == [BASE]


@async_test(90)
async def test_base_and_wildcard_validated_at_once_through_one_txt_name(pebble: Pebble) -> None:
    client, dns = dns01_client(pebble), ChallTestSrvDns(pebble.challtestsrv_url)
    # Two orders pending together: both values must be served at the shared name.
    wildcard, base = await order(client, [WILDCARD]), await order(client, [BASE])
    await publish(dns, wildcard)
    await publish(dns, base)
    values = [wildcard.challenges[0].key_authorization, base.challenges[0].key_authorization]
    assert await txt_values(pebble, TXT_NAME) == sorted(values)
    chains = await asyncio.gather(finish(client, wildcard), finish(client, base))
    assert [dns_names(chain) for chain in chains] == [[WILDCARD], [BASE]]
    await dns.clear_txt(TXT_NAME)
    # One order for both names: two authorizations, two values, one record name. A new
    # account, because Pebble may reuse this one's valid authorizations (see pebble.py).
    client = dns01_client(pebble)
    both = await order(client, [BASE, WILDCARD])
    assert sorted(t.domain for t in both.challenges) == [WILDCARD, BASE]
    assert {t.txt_name for t in both.challenges} == {TXT_NAME}
    await publish(dns, both)
    chain = await finish(client, both)
    assert dns_names(chain) == [WILDCARD, BASE]
    verify(chain, pebble, BASE)
    verify(chain, pebble, "www.example.test")


@async_test(60)
async def test_a_wrong_txt_value_fails_validation(pebble: Pebble) -> None:
    client, dns = dns01_client(pebble), ChallTestSrvDns(pebble.challtestsrv_url)
    pending = await order(client, ["wrong.example.test"])
    await dns.set_txt(pending.challenges[0].txt_name, "not-the-key-authorization-digest")
    with pytest.raises(AcmeError, match="^validation failed: wrong.example.test: "):
        await finish(client, pending)


@async_test(60)
async def test_a_wildcard_with_another_challenge_says_dns01_is_needed(pebble: Pebble) -> None:
    settings = AcmeSettings(directory_url=pebble.directory_url, ca_bundle=pebble.ca_bundle)
    client = AcmeClient(settings, new_private_key_pem())
    with pytest.raises(
        AcmeError, match=r"^\*\.example\.test: the CA does not offer http-01 .*need dns-01"
    ):
        await order(client, [WILDCARD])


@async_test(60)
async def test_a_broken_account_key_is_an_acme_error(pebble: Pebble) -> None:
    with pytest.raises(AcmeError, match="^the ACME account key is not a usable PEM private key"):
        await order(dns01_client(pebble, "-----BEGIN PRIVATE KEY-----\nnot a key\n"), [BASE])


@async_test(60)
async def test_the_account_is_the_one_of_the_key_registered_once(pebble: Pebble) -> None:
    key = new_private_key_pem()
    first, again, other = dns01_client(pebble, key), dns01_client(pebble, key), dns01_client(pebble)
    assert first.account_uri is None
    for client in (first, again, other):
        await order(client, ["account.example.test"])  # connects
    assert first.account_uri and first.account_uri.startswith("https://")
    assert again.account_uri == first.account_uri  # found again (ConflictError), not a new one
    assert other.account_uri not in (None, first.account_uri)
