"""The certificate storage contract, kept by the folder and by Redis (a real redis-server).

Every contract test runs against both :class:`FolderStorage` and :class:`RedisStorage`, most of
them with two storage objects on one location, as two processes (or machines) would share it.
The tests about one kind of storage come last: Redis going away and coming back, a folder that cannot be
used. Leases are short (a second or less), so every wait is bounded by a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from cert_factory import DIRECTORY, account_key, issue
from redis_server import RedisServer, run_redis
from support import LOOPBACK, REPO, TestCA, async_test, free_port, require_tool

from smartroute import certs
from smartroute.certs import redis_storage
from smartroute.certs.folder_storage import FolderStorage
from smartroute.certs.redis_storage import RedisStorage, public_url
from smartroute.certs.storage import CertificateStorage, holding, open_storage
from smartroute.certs.store import account_id, entry_name
from smartroute.errors import CertificateStoreError

CERT_KEY = "smartroute:certs:cert:"
ACCOUNT_KEY = "smartroute:certs:account:"


@dataclass
class Place:
    """One storage location under test, and a way to damage what it holds from outside."""

    kind: str  # "folder" or "redis"
    location: str
    server: RedisServer | None = None

    def make(self) -> CertificateStorage:
        """A new, unopened storage object on the location (another process would make one)."""
        return open_storage(self.location)

    def set_part(self, entry: str, part: str, data: bytes | None) -> None:
        """Overwrite (None: remove) one part of a stored entry, behind the storage's back."""
        if self.kind == "folder":
            path = Path(self.location) / entry / part
            if data is None:
                path.unlink()
            else:
                path.write_bytes(data)
            return
        with self._client() as client:
            if data is None:
                client.hdel(CERT_KEY + entry, part)
            else:
                client.hset(CERT_KEY + entry, part, data)

    def rename_entry(self, entry: str, new_name: str) -> None:
        if self.kind == "folder":
            os.rename(Path(self.location) / entry, Path(self.location) / new_name)
        else:
            with self._client() as client:
                client.rename(CERT_KEY + entry, CERT_KEY + new_name)

    def set_account_part(self, directory_url: str, part: str, data: bytes) -> None:
        if self.kind == "folder":
            (Path(self.location) / "accounts" / account_id(directory_url) / part).write_bytes(data)
        else:
            with self._client() as client:
                client.hset(ACCOUNT_KEY + account_id(directory_url), part, data)

    @contextlib.contextmanager
    def _client(self) -> Iterator[redis.Redis]:
        assert self.server is not None
        client = redis.Redis.from_url(self.server.url, socket_timeout=5)
        try:
            yield client
        finally:
            client.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    require_tool("redis-server")
    with run_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture(params=["folder", "redis"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Place]:
    if request.param == "folder":
        yield Place("folder", str(tmp_path / "certs"))
        return
    require_tool("redis-server")
    with run_redis(tmp_path / "redis") as server:
        yield Place("redis", server.url, server)


@contextlib.asynccontextmanager
async def opened(storage: CertificateStorage) -> AsyncIterator[CertificateStorage]:
    await storage.open()
    try:
        yield storage
    finally:
        await storage.close()


async def eventually(check: Callable[[], Awaitable[bool]], within: float) -> float:
    """Poll ``check`` until it is true; the seconds that took (fails after ``within``)."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > within:
            pytest.fail(f"not true within {within} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


# -- certificates ---------------------------------------------------------------------------------


@async_test()
async def test_save_load_list_delete(place: Place, ca: TestCA) -> None:
    pair, other = issue(ca, "example.com", "www.example.com"), issue(ca, "other.example")
    async with opened(place.make()) as storage, opened(place.make()) as reader:
        assert await storage.list() == ([], [])
        assert await storage.load(["example.com"]) is None
        saved = await storage.save(
            ["www.example.com", "example.com"], pair.cert_pem, pair.key_pem, source="acme"
        )
        assert saved.domains == ("example.com", "www.example.com")
        assert (saved.cert_pem, saved.key_pem, saved.source) == (
            pair.cert_pem,
            pair.key_pem,
            "acme",
        )
        second = await storage.save(["other.example"], other.cert_pem, other.key_pem, source="x")
        # What lives next to the entries (locks, answers) is never mistaken for one.
        assert await storage.lock("example.com", 5) is not None
        await storage.put_challenge("tok", "tok.thumb", 30)

        assert await reader.load(["EXAMPLE.com", "www.example.com"]) == saved
        assert await reader.load(["example.com"]) is None  # exactly this domain set
        assert await reader.list() == ([saved, second], [])

        await reader.delete(["www.example.com", "example.com"])
        await reader.delete(["www.example.com", "example.com"])  # gone already: fine
        assert await storage.load(["example.com", "www.example.com"]) is None
        assert await storage.list() == ([second], [])
    if place.kind == "redis":
        assert saved.cert_path is None and saved.key_path is None
    else:
        assert saved.cert_path == str(Path(place.location) / entry_name(saved.domains) / "cert.pem")


@async_test()
async def test_save_refuses_what_could_not_be_served(place: Place, ca: TestCA) -> None:
    pair, other = issue(ca, "example.com"), issue(ca, "other.example")
    async with opened(place.make()) as storage:
        with pytest.raises(CertificateStoreError, match="does not match the certificate"):
            await storage.save(["example.com"], pair.cert_pem, other.key_pem, source="acme")
        with pytest.raises(CertificateStoreError, match="does not cover other.example"):
            await storage.save(["other.example"], pair.cert_pem, pair.key_pem, source="acme")
        assert await storage.list() == ([], [])


@async_test()
async def test_reserved_names_are_ordinary_entries(place: Place, ca: TestCA) -> None:
    """Domain sets named like the folder's own subfolders get hashed names, not those folders."""
    async with opened(place.make()) as storage:
        for name in ("accounts", "challenges", "locks"):
            assert "~" in entry_name([name])
            pair = issue(ca, name)
            saved = await storage.save([name], pair.cert_pem, pair.key_pem, source="acme")
            assert await storage.load([name]) == saved
        entries, problems = await storage.list()
        assert (len(entries), problems) == (3, [])


@async_test(timeout=60)
async def test_replacement_is_all_or_nothing(place: Place, ca: TestCA) -> None:
    """While one instance replaces an entry over and over, another only ever reads a whole one:
    the old pair or the new, never a mix, never a gap, never a problem."""
    pairs = [issue(ca, "example.com"), issue(ca, "example.com", key_type="rsa")]
    whole = {(p.cert_pem, p.key_pem) for p in pairs}
    async with opened(place.make()) as writer, opened(place.make()) as reader:
        await writer.save(["example.com"], pairs[0].cert_pem, pairs[0].key_pem, source="acme")
        done = asyncio.Event()
        seen: list[tuple[str, str] | None] = []
        problems: list[object] = []

        async def read() -> None:
            while not done.is_set():
                loaded = await reader.load(["example.com"])
                seen.append(None if loaded is None else (loaded.cert_pem, loaded.key_pem))
                entries, broken = await reader.list()
                problems.extend(broken)
                seen.extend((e.cert_pem, e.key_pem) for e in entries)

        reading = asyncio.get_running_loop().create_task(read())
        try:
            for i in range(40):
                pair = pairs[i % 2]
                await writer.save(["example.com"], pair.cert_pem, pair.key_pem, source="acme")
        finally:
            done.set()
            await reading
    assert seen and problems == []
    assert set(seen) <= whole


# -- corrupt entries ------------------------------------------------------------------------------


GARBAGE_KEY = b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n"


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (
            lambda b: b.set_part("example.com", "key.pem", GARBAGE_KEY),
            "key.pem does not match its hash in meta.json (half-written or corrupt entry)",
        ),
        (
            lambda b: b.set_part("example.com", "cert.pem", b"half a cert"),
            "cert.pem does not match its hash in meta.json (half-written or corrupt entry)",
        ),
        (
            lambda b: b.set_part("example.com", "meta.json", None),
            "meta.json missing (half-written entry)",
        ),
        (
            lambda b: b.set_part("example.com", "meta.json", b"{not json"),
            "meta.json is not valid JSON",
        ),
    ],
    ids=["garbage key", "changed certificate", "no meta.json", "bad meta.json"],
)
@async_test()
async def test_a_corrupt_entry_is_reported_never_served(
    place: Place, ca: TestCA, damage: Callable[[Place], None], reason: str
) -> None:
    good, pair = issue(ca, "good.example"), issue(ca, "example.com")
    async with opened(place.make()) as storage:
        kept = await storage.save(["good.example"], good.cert_pem, good.key_pem, source="acme")
        await storage.save(["example.com"], pair.cert_pem, pair.key_pem, source="acme")
        damage(place)
        assert await storage.load(["example.com"]) is None
        entries, problems = await storage.list()
    assert entries == [kept]
    assert [(p.name, p.reason) for p in problems] == [("example.com", reason)]
    assert pair.key_pem not in repr(problems) and "PRIVATE KEY" not in repr(problems)


@async_test()
async def test_an_entry_under_another_name_is_reported(place: Place, ca: TestCA) -> None:
    pair = issue(ca, "example.com", "other.example")
    async with opened(place.make()) as storage:
        await storage.save(["example.com"], pair.cert_pem, pair.key_pem, source="acme")
        place.rename_entry("example.com", "other.example")
        assert await storage.load(["other.example"]) is None
        entries, problems = await storage.list()
    kind = "folder" if place.kind == "folder" else "key"
    assert entries == []
    assert [(p.name, p.reason) for p in problems] == [
        ("other.example", f"the {kind} name does not match the domains in meta.json")
    ]


# -- accounts -------------------------------------------------------------------------------------


@async_test()
async def test_accounts_round_trip(place: Place) -> None:
    staging = "https://acme-staging.example/directory"
    key_a, key_b, key_c = account_key(), account_key(), account_key()
    async with opened(place.make()) as storage, opened(place.make()) as other:
        assert await storage.load_account(DIRECTORY) is None
        await storage.save_account(DIRECTORY, key_a, {"uri": "https://acme.example/acct/1"})
        await storage.save_account(staging, key_b, {"uri": "https://acme-staging.example/9"})
        assert await other.load_account(DIRECTORY) == (
            key_a,
            {"uri": "https://acme.example/acct/1"},
        )
        assert await other.load_account(staging) == (
            key_b,
            {"uri": "https://acme-staging.example/9"},
        )
        await other.save_account(DIRECTORY, key_c, {"uri": "two", "email": "ops@example.com"})
        assert await storage.load_account(DIRECTORY) == (
            key_c,
            {"uri": "two", "email": "ops@example.com"},
        )
        assert await storage.list() == ([], [])  # accounts are not certificates
        with pytest.raises(CertificateStoreError, match="JSON"):
            await storage.save_account(DIRECTORY, key_a, {"when": object()})
        with pytest.raises(CertificateStoreError, match="unencrypted PEM private key"):
            await storage.save_account(DIRECTORY, "not a key", {})
        assert (await storage.load_account(DIRECTORY) or ("",))[0] == key_c

        place.set_account_part(DIRECTORY, "account.key", key_a.encode())
        with pytest.raises(CertificateStoreError, match="does not match the hash") as raised:
            await storage.load_account(DIRECTORY)
    assert place.location in str(raised.value) and "PRIVATE KEY" not in str(raised.value)


# -- HTTP-01 answers ------------------------------------------------------------------------------


@async_test()
async def test_challenges_are_shared_and_expire(place: Place) -> None:
    async with opened(place.make()) as storage, opened(place.make()) as other:
        assert await storage.get_challenge("tok_1-A") is None
        await storage.put_challenge("tok_1-A", "tok_1-A.thumbprint", ttl=30)
        assert await other.get_challenge("tok_1-A") == "tok_1-A.thumbprint"
        assert await other.get_challenge("tok_2") is None
        await other.delete_challenge("tok_1-A")
        await other.delete_challenge("tok_1-A")  # gone already: fine
        assert await storage.get_challenge("tok_1-A") is None

        started = time.monotonic()
        await storage.put_challenge("short", "short.thumbprint", ttl=0.4)
        assert await other.get_challenge("short") == "short.thumbprint"

        async def gone() -> bool:
            return await other.get_challenge("short") is None

        await eventually(gone, within=5)
        assert time.monotonic() - started >= 0.35
    if place.kind == "folder":  # the expired answer was removed, not only ignored
        assert not (Path(place.location) / "challenges" / "short").exists()


@pytest.mark.parametrize("token", ["", "../etc/passwd", "a b", "tok.en", "é", "a" * 201])
@async_test()
async def test_challenge_tokens_are_checked(place: Place, token: str) -> None:
    async with opened(place.make()) as storage:
        for call in (
            storage.put_challenge(token, "answer", 30),
            storage.get_challenge(token),
            storage.delete_challenge(token),
        ):
            with pytest.raises(CertificateStoreError, match="not an HTTP-01 token"):
                await call
        await storage.put_challenge("a" * 200, "answer", 30)  # the longest allowed


# -- locks ----------------------------------------------------------------------------------------


@async_test()
async def test_a_lock_has_one_holder(place: Place) -> None:
    async with opened(place.make()) as storage, opened(place.make()) as other:
        token = await storage.lock("cert:example.com", 5)
        assert token
        assert await other.lock("cert:example.com", 5) is None
        assert await storage.lock("cert:example.com", 5) is None  # not re-entrant either
        assert await other.lock("cert:other.example", 5)  # another name, another lock

        assert await other.refresh("cert:example.com", "not-the-token", 5) is False
        await other.unlock("cert:example.com", "not-the-token")
        assert await other.lock("cert:example.com", 5) is None  # still held

        assert await storage.refresh("cert:example.com", token, 5) is True
        await storage.unlock("cert:example.com", token)
        assert await storage.refresh("cert:example.com", token, 5) is False  # released
        assert await other.lock("cert:example.com", 5)


@async_test()
async def test_odd_lock_names(place: Place) -> None:
    names = ["../../escape", "a/b", "with space", "x" * 300, "é", ".hidden", "a~b"]
    async with opened(place.make()) as storage:
        tokens = [await storage.lock(name, 5) for name in names]
        assert all(tokens)
        assert [await storage.lock(name, 5) for name in names] == [None] * len(names)
    if place.kind == "folder":
        locks = Path(place.location) / "locks"
        assert len(list(locks.iterdir())) == len(names)
        assert {p.name for p in Path(place.location).parent.iterdir()} == {"certs"}


@async_test()
async def test_refresh_extends_the_lease(place: Place) -> None:
    async with opened(place.make()) as storage, opened(place.make()) as other:
        token = await storage.lock("renewed", 0.5)
        assert token
        assert await storage.refresh("renewed", token, 3) is True
        await asyncio.sleep(1.0)  # twice the first lease
        assert await other.lock("renewed", 5) is None
        assert await storage.refresh("renewed", token, 3) is True


@async_test()
async def test_an_expired_lease_is_taken_over(place: Place) -> None:
    async with opened(place.make()) as storage, opened(place.make()) as other:
        old = await storage.lock("expiring", 0.3)
        assert old
        taken: list[str] = []

        async def take() -> bool:
            token = await other.lock("expiring", 5)
            taken.extend([token] if token else [])
            return token is not None

        assert await eventually(take, within=5) >= 0.2
        [new] = taken
        assert new != old
        # The old holder can neither renew nor release what is no longer its lock.
        assert await storage.refresh("expiring", old, 5) is False
        await storage.unlock("expiring", old)
        assert await storage.lock("expiring", 5) is None
        await other.unlock("expiring", new)
        assert await storage.lock("expiring", 5)


@async_test()
async def test_holding_renews_the_lease_and_releases_it(place: Place) -> None:
    async with opened(place.make()) as storage, opened(place.make()) as other:
        async with holding(storage, "held", lease=0.6) as token:
            assert token
            async with holding(other, "held", lease=0.6) as second:
                assert second is None
            await asyncio.sleep(1.5)  # two and a half leases
            assert await other.lock("held", 5) is None
            assert await other.refresh("held", token, 0.6) is True  # still the same holder
        assert await other.lock("held", 5)  # released at once, not left to expire


HOLDER = """
import asyncio, sys
from smartroute.certs.storage import holding, open_storage

async def main() -> None:
    storage = open_storage(sys.argv[1])
    await storage.open()
    async with holding(storage, "issuing", lease=float(sys.argv[2])) as token:
        print("locked" if token else "busy", flush=True)
        await asyncio.sleep(60)

asyncio.run(main())
"""


@async_test(timeout=60)
async def test_the_lock_of_a_killed_process_is_taken_over(place: Place) -> None:
    lease = 1.0
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    async with opened(place.make()) as storage:
        holder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HOLDER, place.location, str(lease),
            stdout=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        try:
            assert holder.stdout is not None
            line = await asyncio.wait_for(holder.stdout.readline(), 20)
            assert line == b"locked\n"
            await asyncio.sleep(2 * lease)  # the holder renews its lease while it lives
            assert await storage.lock("issuing", lease) is None
            holder.kill()  # SIGKILL: no clean-up, the lock stays until its lease runs out
            await asyncio.wait_for(holder.wait(), 10)

            async def free() -> bool:
                return await storage.lock("issuing", 5) is not None

            waited = await eventually(free, within=lease + 3)
        finally:
            if holder.returncode is None:
                holder.kill()
                await holder.wait()
    assert 0.2 <= waited <= lease + 0.5


# -- either kind, before open ---------------------------------------------------------------------


@async_test()
async def test_a_storage_that_is_not_open_says_so(place: Place) -> None:
    storage = place.make()
    with pytest.raises(CertificateStoreError, match="is not open"):
        await storage.list()
    await storage.close()  # closing what is not open is fine


# -- the folder -----------------------------------------------------------------------------------


@async_test()
async def test_a_folder_that_cannot_be_used_is_named(tmp_path: Path) -> None:
    (tmp_path / "certs").write_text("a file, not a folder")
    storage = FolderStorage(str(tmp_path / "certs"))
    assert (storage.location, storage.shared) == (str(tmp_path / "certs"), False)
    with pytest.raises(CertificateStoreError, match=re.escape(f"certificate store {tmp_path}")):
        await storage.open()


# -- Redis ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("rediss://user:s3cret@cache.example:6380/2", "rediss://user:***@cache.example:6380/2"),
        ("redis://user@127.0.0.1:6379", "redis://user@127.0.0.1:6379"),
        ("redis://:p@ss/w@rd@host:1/0", "redis://:***@host:1/0"),
        ("redis://pass/word@host:1/0", "redis://***@host:1/0"),
        ("unix://:s3cret@/run/redis.sock?db=1", "unix://:***@/run/redis.sock?db=1"),
        ("unix:///run/redis.sock?db=1&password=s3cret", "unix:///run/redis.sock?db=1&password=***"),
    ],
)
def test_public_url_hides_passwords(url: str, shown: str) -> None:
    assert public_url(url) == shown


@async_test()
async def test_an_unreachable_redis_is_named_without_its_password() -> None:
    port = free_port()  # nothing listens there
    url = f"redis://:hunter2-s3cret@{LOOPBACK}:{port}/0"
    storage = RedisStorage(url)
    shown = f"redis://:***@{LOOPBACK}:{port}/0"
    assert (storage.location, storage.shared) == (shown, True)
    started = time.monotonic()
    with pytest.raises(CertificateStoreError) as raised:
        await storage.open()
    assert time.monotonic() - started < 5
    message = str(raised.value)
    assert message.startswith(f"certificate store {shown}: cannot connect: ")
    assert "hunter2" not in message and "hunter2" not in repr(storage)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


@async_test()
async def test_a_wrong_password_is_named_without_it(tmp_path: Path) -> None:
    require_tool("redis-server")
    with run_redis(tmp_path, password="right-pw") as server:
        async with opened(RedisStorage(server.url)) as storage:
            assert await storage.list() == ([], [])
        wrong = server.url.replace("right-pw", "wrong-pw")
        with pytest.raises(CertificateStoreError, match="cannot connect") as raised:
            await RedisStorage(wrong).open()
    assert "wrong-pw" not in str(raised.value) and ":***@" in str(raised.value)


@async_test(timeout=60)
async def test_redis_stopped_mid_use_then_back(redis_server: RedisServer, ca: TestCA) -> None:
    """An outage is an error naming the URL, quickly; the same object works once Redis is back,
    and what was stored is still there (after a clean stop, and after a crash)."""
    pair = issue(ca, "example.com")
    async with opened(RedisStorage(redis_server.url)) as storage:
        saved = await storage.save(["example.com"], pair.cert_pem, pair.key_pem, source="acme")
        for outage in (redis_server.stop, redis_server.kill):
            outage()
            calls: list[Awaitable[object]] = [
                storage.load(["example.com"]),
                storage.list(),
                storage.save(["example.com"], pair.cert_pem, pair.key_pem, source="acme"),
                storage.lock("issuing", 5),
                storage.refresh("issuing", "token", 5),
                storage.get_challenge("tok"),
                storage.load_account(DIRECTORY),
            ]
            for call in calls:
                started = time.monotonic()
                with pytest.raises(CertificateStoreError) as raised:
                    await call
                assert time.monotonic() - started < 5
                assert str(raised.value).startswith(f"certificate store {storage.location}: ")
            redis_server.start()
            assert await storage.load(["example.com"]) == saved
            assert await storage.list() == ([saved], [])
            token = await storage.lock(f"after-{outage.__name__}", 5)
            assert token and await storage.refresh(f"after-{outage.__name__}", token, 5)


@async_test()
async def test_a_hung_redis_costs_a_timeout_not_a_hang(redis_server: RedisServer) -> None:
    """A Redis that accepts connections and never answers fails each call after the timeout
    (not retried), at open and mid-use; the same object works once Redis answers again."""
    timeout = 0.5
    storage = RedisStorage(redis_server.url, timeout=timeout)
    redis_server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(CertificateStoreError, match="cannot connect: TimeoutError"):
            await storage.open()
        assert time.monotonic() - started < 3 * timeout
    finally:
        redis_server.resume()
    async with opened(storage):
        token = await storage.lock("issuing", 5)
        redis_server.pause()
        try:
            for call in (storage.load(["example.com"]), storage.refresh("issuing", "x", 5)):
                started = time.monotonic()
                with pytest.raises(CertificateStoreError, match="TimeoutError"):
                    await call
                assert time.monotonic() - started < 3 * timeout
        finally:
            redis_server.resume()
        assert token and await storage.refresh("issuing", token, 5)
        assert await storage.load(["example.com"]) is None


@async_test()
async def test_a_key_that_is_not_a_hash_is_a_problem(redis_server: RedisServer, ca: TestCA) -> None:
    pair = issue(ca, "good.example")
    with redis.Redis.from_url(redis_server.url) as client:
        client.set(CERT_KEY + "example.com", "a string")
    async with opened(RedisStorage(redis_server.url)) as storage:
        kept = await storage.save(["good.example"], pair.cert_pem, pair.key_pem, source="acme")
        assert await storage.load(["example.com"]) is None
        entries, problems = await storage.list()
    assert entries == [kept]
    assert [p.name for p in problems] == ["example.com"]
    assert problems[0].reason.startswith("not a hash: WRONGTYPE")


@async_test()
async def test_many_entries_are_listed(redis_server: RedisServer, ca: TestCA) -> None:
    """SCAN walks every entry, over several batches."""
    pair = issue(ca, *[f"h{i}.example" for i in range(250)])
    contents = [(f"h{i}.example",) for i in range(250)]
    async with opened(RedisStorage(redis_server.url)) as storage:
        for domains in contents:
            await storage.save(domains, pair.cert_pem, pair.key_pem, source="acme")
        entries, problems = await storage.list()
    assert problems == []
    assert sorted(e.domains for e in entries) == sorted(contents)


def test_without_the_redis_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """The module imports without the redis package; making a RedisStorage says what to do."""
    for name in [n for n in sys.modules if n == "redis" or n.startswith("redis.")]:
        monkeypatch.setitem(sys.modules, name, None)  # importing it raises ImportError
    monkeypatch.delitem(sys.modules, redis_storage.__name__)
    monkeypatch.setattr(certs, "redis_storage", redis_storage)  # put back after the test
    without = importlib.import_module(redis_storage.__name__)
    assert without is not redis_storage

    with pytest.raises(CertificateStoreError, match=r"pip install 'smartroute\[redis\]'") as raised:
        without.RedisStorage("redis://:pw@127.0.0.1:6379/0")
    assert "redis://:***@127.0.0.1:6379/0" in str(raised.value)
