"""Several smartroute processes sharing one certificate store: real Redis, real Pebble.

Three ``smartroute run`` processes (separate working folders, one Redis) obtain a certificate
once and all serve it; the CA's HTTP-01 request reaches a process that did not order, which
answers from the store; a process that starts later serves the stored certificate with the CA
down; the lock holder killed with ``kill -9`` in the middle of its order is taken over after
its lease. In one process: Redis stopped during a renewal, a certificate issued while Redis
is down, a corrupt entry, an unreachable Redis at start; ``workers=N`` with ACME.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_client
from acme_sites import (
    accounts_made,
    acme_settings,
    certs_cli,
    issued,
    served_certificate,
    site,
)
from cryptography import x509
from http_backend import Backend
from pebble import Pebble, free_port, run_pebble
from redis_server import RedisServer, run_redis
from support import LOOPBACK, async_test, require_tool, until_listening

from smartroute import ConfigError, SmartRoute
from smartroute.certs.dns import ChallTestSrvDns
from smartroute.certs.redis_storage import RedisStorage
from smartroute.errors import CertificateStoreError

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    require_tool("redis-server")
    with run_redis(tmp_path / "redis") as server:
        yield server


class Instance:
    """One ``smartroute run`` process with a working folder and a log of its own."""

    def __init__(self, folder: Path, config: dict[str, Any], env: dict[str, str]) -> None:
        self.folder = folder
        folder.mkdir(parents=True)
        self.config_path = folder / "config.json"
        self.write(config)
        self.log_path = folder / "smartroute.log"
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def write(self, config: dict[str, Any]) -> None:
        self.config_path.write_text(json.dumps(config))

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "smartroute", "run", "config.json"],
                cwd=self.folder,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def listening(self, port: int, timeout: float = 30.0) -> None:
        process = self.process
        assert process is not None
        try:
            up = await until_listening(port, lambda: process.poll() is None, timeout)
        except TimeoutError:
            raise AssertionError(f"never listened on {port}:\n{self.log()[-3000:]}") from None
        assert up, f"instance exited:\n{self.log()[-3000:]}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COV_CORE")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS)])
    return {**env, **extra}


def instance_config(
    pebble: Pebble, redis: RedisServer, acme_port: int, routes: list[dict[str, Any]], **acme: Any
) -> dict[str, Any]:
    settings = acme_settings(pebble, Path("unused"), **acme)
    settings.update(certificate_store=redis.url, port=acme_port, lock_lease=3)
    return {"routes": routes, "settings": {"bind_address": LOOPBACK, "acme": settings}}


async def certificate_when_served(
    port: int, name: str, root: str, timeout: float = 60
) -> x509.Certificate:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await asyncio.wait_for(served_certificate(port, name, root), 10)
        except (ssl.SSLError, OSError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def serial_in_redis(redis: RedisServer, name: str, timeout: float = 30) -> int:
    """The serial of the certificate Redis stores for ``name``, waiting until there is one."""
    store = RedisStorage(redis.url)
    await store.open()
    try:
        deadline = time.monotonic() + timeout
        while (stored := await store.load([name])) is None:
            assert time.monotonic() < deadline, f"no certificate for {name} in Redis"
            await asyncio.sleep(0.2)
    finally:
        await store.close()
    return x509.load_pem_x509_certificate(stored.cert_pem.encode()).serial_number


@async_test(240)
async def test_three_processes_order_once_all_serve_and_a_later_one_needs_no_ca(
    pebble: Pebble, redis: RedisServer, backend: Backend, tmp_path: Path
) -> None:
    name = "shared.cluster.test"
    front_port, b_port, c_port = free_port(), free_port(), free_port()
    front_routes = [
        {
            "name": "front",
            "match": {"ports": front_port},
            "action": {"type": "static", "static": {"content": "front"}},
        }
    ]
    # Only the front process holds the port the CA validates on, and it has no auto route:
    # whoever of B and C orders, the CA's HTTP-01 request is answered from Redis by the front.
    front = Instance(
        tmp_path / "front",
        instance_config(pebble, redis, pebble.http_port, front_routes),
        environment(),
    )
    others = [
        Instance(
            tmp_path / label,
            instance_config(pebble, redis, free_port(), [site([name], backend, port)]),
            environment(),
        )
        for label, port in (("b", b_port), ("c", c_port))
    ]
    everyone = [front, *others]
    try:
        front.start()
        await front.listening(pebble.http_port)
        for other in others:
            other.start()
        root = pebble.root_pem()
        certs = [await certificate_when_served(port, name, root) for port in (b_port, c_port)]
        assert certs[0].serial_number == certs[1].serial_number
        assert issued(pebble) == 1 and accounts_made(pebble) == 1
        orderers = [o for o in others if f"certificate for {name} issued" in o.log()]
        assert len(orderers) == 1, [o.log()[-2000:] for o in others]

        # The front gets the auto route too, with the CA down: it serves the stored one.
        pebble.stop()
        https = free_port()
        front.write(
            instance_config(
                pebble, redis, pebble.http_port, [*front_routes, site([name], backend, https)]
            )
        )
        assert front.process is not None
        front.process.send_signal(signal.SIGHUP)
        await front.listening(https)
        again = await certificate_when_served(https, name, root, timeout=20)
        assert again.serial_number == certs[0].serial_number
        assert f"certificate for {name} issued" not in front.log()
    finally:
        for instance in everyone:
            instance.stop()


@async_test(240)
async def test_a_lock_holder_killed_mid_order_is_taken_over_after_its_lease(
    pebble: Pebble, redis: RedisServer, backend: Backend, tmp_path: Path
) -> None:
    name = "*.held.cluster.test"
    gate = tmp_path / "gate" / "go"
    gate.parent.mkdir()
    env = environment(HELD_DNS_URL=pebble.challtestsrv_url, HELD_DNS_GATE=str(gate))
    ports = free_port(), free_port()
    instances = [
        Instance(
            tmp_path / f"i{index}",
            instance_config(
                pebble,
                redis,
                free_port(),
                [site([name], backend, port)],
                challenge="dns-01",
                dns_provider="held_dns:HeldDns",
            ),
            env,
        )
        for index, port in enumerate(ports)
    ]
    try:
        for instance in instances:
            instance.start()
        deadline = time.monotonic() + 30
        while not list(gate.parent.glob("publishing-*")):
            assert time.monotonic() < deadline, [i.log()[-2000:] for i in instances]
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the other one is waiting for the lock, not publishing
        marks = list(gate.parent.glob("publishing-*"))
        assert len(marks) == 1
        holder_pid = int(marks[0].name.split("-")[1])
        holder = next(i for i in instances if i.pid == holder_pid)
        survivor = next(i for i in instances if i is not holder)
        os.kill(holder_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        gate.write_text("go")
        port = ports[instances.index(survivor)]
        cert = await certificate_when_served(port, "www.held.cluster.test", pebble.root_pem())
        # The lease (3 s) ran out, then the survivor ordered: not the retry backoff's hours.
        assert time.monotonic() - killed_at < 30
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [name]
        assert (gate.parent / f"publishing-{survivor.pid}").exists()
        assert issued(pebble) == 1
    finally:
        for instance in instances:
            instance.stop()


@async_test(240)
async def test_redis_down_during_renewal_keeps_serving_and_renews_once_redis_is_back(
    pebble: Pebble,
    redis: RedisServer,
    backend: Backend,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "smartroute.certs")
    https = pebble.tls_port
    name = "renew.cluster.test"
    settings = acme_settings(pebble, tmp_path, certificate_store=redis.url)
    async with SmartRoute(
        [site([name], backend, https)], bind_address=LOOPBACK, acme=settings
    ) as proxy:
        assert (await proxy.wait_for_certificates())[name]["state"] == "valid"
        root = pebble.root_pem()
        first = await served_certificate(https, name, root)
        # The standing HTTP-01 route answers anyone: made-up tokens are a plain 404.
        for token in ("made-up-token", "a" * 300, "bad$token", "%2e%2e%2fcerts"):
            reader, writer = await asyncio.open_connection(LOOPBACK, pebble.http_port)
            writer.write(
                f"GET /.well-known/acme-challenge/{token} HTTP/1.1\r\nHost: {name}\r\n\r\n".encode()
            )
            head = await asyncio.wait_for(reader.read(200), 5)
            writer.close()
            assert head.startswith((b"HTTP/1.1 404", b"HTTP/1.1 400")), (token, head)
        assert "cannot look up" not in caplog.text

        await asyncio.to_thread(redis.stop)
        status = (await proxy.renew_certificates([name]))[name]
        assert status["state"] == "failed" and redis.url in status["last_error"]
        assert (await served_certificate(https, name, root)).serial_number == first.serial_number
        assert f"certificate for {name} failed" in caplog.text

        await asyncio.to_thread(redis.start)
        deadline = time.monotonic() + 30
        while (
            cert := await served_certificate(https, name, root)
        ).serial_number == first.serial_number:
            assert time.monotonic() < deadline, proxy.certificate_status()
            await asyncio.sleep(0.2)
        assert await serial_in_redis(redis, name) == cert.serial_number


class StopsRedisWhilePublishing:
    """A DNS-01 provider that stops Redis as it publishes: the CA issues while the store is
    down."""

    def __init__(self, url: str, redis: RedisServer) -> None:
        self.inner = ChallTestSrvDns(url)
        self.redis = redis

    async def set_txt(self, name: str, value: str) -> None:
        if self.redis.running:
            await asyncio.to_thread(self.redis.stop)
        await self.inner.set_txt(name, value)

    async def clear_txt(self, name: str) -> None:
        await self.inner.clear_txt(name)


@async_test(240)
async def test_a_certificate_issued_while_redis_is_down_is_served_then_stored(
    pebble: Pebble,
    redis: RedisServer,
    backend: Backend,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "smartroute.certs")
    https = pebble.tls_port
    name = "kept.cluster.test"
    settings = acme_settings(
        pebble,
        tmp_path,
        certificate_store=redis.url,
        challenge="dns-01",
        dns_provider=StopsRedisWhilePublishing(pebble.challtestsrv_url, redis),
    )
    async with SmartRoute(
        [site([name], backend, https)], bind_address=LOOPBACK, acme=settings
    ) as proxy:
        status = (await proxy.wait_for_certificates())[name]
        assert status["state"] == "valid" and status["source"] == "acme", status
        assert not redis.running
        served = await served_certificate(https, name, pebble.root_pem())
        assert f"certificate for {name} issued but not stored" in caplog.text
        await asyncio.to_thread(redis.start)
        assert await serial_in_redis(redis, name) == served.serial_number
        assert issued(pebble) == 1


@async_test(120)
async def test_an_unreachable_redis_at_start_is_an_error_naming_it(
    pebble: Pebble, backend: Backend, tmp_path: Path
) -> None:
    url = f"redis://:secret@{LOOPBACK}:{free_port()}/0"
    settings = acme_settings(pebble, tmp_path, certificate_store=url)
    proxy = SmartRoute(
        [site(["x.cluster.test"], backend, free_port())], bind_address=LOOPBACK, acme=settings
    )
    with pytest.raises(CertificateStoreError) as caught:
        await proxy.start()
    message = str(caught.value)
    assert f"{LOOPBACK}:" in message and "redis://" in message and "secret" not in message
    assert not proxy.is_running


@async_test(180)
async def test_a_corrupt_entry_in_redis_is_reported_and_issued_again(
    pebble: Pebble,
    redis: RedisServer,
    backend: Backend,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    https = pebble.tls_port
    name = "corrupt.cluster.test"
    settings = acme_settings(pebble, tmp_path, certificate_store=redis.url)
    routes = [site([name], backend, https)]
    async with SmartRoute(routes, bind_address=LOOPBACK, acme=settings) as proxy:
        assert (await proxy.wait_for_certificates())[name]["state"] == "valid"
        first = await served_certificate(https, name, pebble.root_pem())
    config = tmp_path / "proxy.json"
    config.write_text(json.dumps({"settings": {"acme": settings}, "routes": routes}))
    code, out = await certs_cli(config, "list")
    assert code == 0 and f"certificate store {redis.url}: 1 certificates" in out, out
    assert f"{name}  until" in out

    client = redis_client.Redis(host=LOOPBACK, port=redis.port)
    keys = [k for k in client.scan_iter("smartroute:certs:cert:*")]
    assert len(keys) == 1
    client.hset(keys[0], "key.pem", b"garbage")
    client.close()
    caplog.set_level(logging.WARNING, "smartroute.certs")
    async with SmartRoute(routes, bind_address=LOOPBACK, acme=settings) as proxy:
        assert (await proxy.wait_for_certificates())[name]["state"] == "valid"
        again = await served_certificate(https, name, pebble.root_pem())
    assert again.serial_number != first.serial_number
    assert "key.pem" in caplog.text and "not served" in caplog.text
    redis.stop()
    code, out = await certs_cli(config, "list")
    assert code == 1 and f"{LOOPBACK}:{redis.port}" in out, out


@async_test(240)
async def test_workers_share_one_order_and_every_process_serves_it(
    pebble: Pebble, backend: Backend, tmp_path: Path
) -> None:
    https = pebble.tls_port
    name = "workers.cluster.test"
    settings = acme_settings(pebble, tmp_path / "certs", lock_lease=3)
    async with SmartRoute(
        [site([name], backend, https)], bind_address=LOOPBACK, acme=settings, workers=3
    ) as proxy:
        root = pebble.root_pem()
        first = await certificate_when_served(https, name, root)
        # Every process serves it: many new connections, spread by the kernel, all succeed.
        deadline = time.monotonic() + 30
        serials: list[int] = []
        while len(serials) < 30:
            try:
                serials.append((await served_certificate(https, name, root)).serial_number)
            except (ssl.SSLError, OSError):
                # a process still waiting for the store
                assert time.monotonic() < deadline, proxy.certificate_status()
                serials.clear()
                await asyncio.sleep(0.2)
        assert set(serials) == {first.serial_number}
        assert issued(pebble) == 1
        assert proxy.stats()["workers"] == 3


def test_tls_alpn01_is_refused_when_processes_share_the_store(tmp_path: Path) -> None:
    acme = {"challenge": "tls-alpn-01", "certificate_store": str(tmp_path)}
    with pytest.raises(ConfigError, match='settings.acme.challenge: "tls-alpn-01" cannot be used'):
        SmartRoute([], acme=acme, workers=2)
    with pytest.raises(ConfigError, match='settings.acme.challenge: "tls-alpn-01" cannot be used'):
        SmartRoute([], acme={**acme, "certificate_store": "redis://127.0.0.1:6379/0"})


async def serials_served(port: int, name: str, root: str, count: int) -> set[int]:
    """The serials ``count`` new connections are served (failed handshakes count as 0)."""
    serials: set[int] = set()
    for _ in range(count):
        try:
            serials.add((await served_certificate(port, name, root)).serial_number)
        except (ssl.SSLError, OSError):
            serials.add(0)
    return serials


@async_test(240)
async def test_workers_renew_once_when_due_and_every_process_serves_the_renewed_one(
    backend: Backend, tmp_path: Path
) -> None:
    require_tool("pebble")
    (tmp_path / "pebble").mkdir()
    with run_pebble(
        tmp_path / "pebble", http_port=free_port(), tls_port=free_port(), cert_validity_seconds=24
    ) as pebble:
        https = pebble.tls_port
        name = "renewed.cluster.test"
        settings = acme_settings(
            pebble,
            tmp_path / "certs",
            lock_lease=3,
            renew_threshold_days=0,  # due when a third of the 24 s lifetime is left
            renew_check_interval=1,
        )
        async with SmartRoute(
            [site([name], backend, https)], bind_address=LOOPBACK, acme=settings, workers=3
        ):
            root = pebble.root_pem()
            first = await certificate_when_served(https, name, root)
            deadline = time.monotonic() + 15
            while await serials_served(https, name, root, 12) != {first.serial_number}:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
            assert issued(pebble) == 1
            # About 16 s after issuance every process finds it due; one orders, all serve it.
            deadline = time.monotonic() + 40
            while True:
                serials = await serials_served(https, name, root, 12)
                if len(serials) == 1 and first.serial_number not in serials and 0 not in serials:
                    break
                assert time.monotonic() < deadline, serials
                await asyncio.sleep(0.3)
            assert issued(pebble) == 2
