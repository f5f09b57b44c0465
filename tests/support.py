"""Test support: free ports, certificates made with cryptography, small loopback servers."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import itertools
import random
import socket
import ssl
import struct
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from smartroute.server.http.stream import Stream
from smartroute.server.stats import ConnectionRecord

MIB = 1 << 20
PARTIAL = b"partial:" + bytes(range(256)) * 100  # what a failing peer manages to send
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

LOOPBACK = "127.0.0.1"

# Paths that do not depend on where a test file sits in tests/.
REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
EXAMPLES = REPO / "examples"


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            return int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports handed to tests come from below the kernel's ephemeral range: a port picked there and
# released could be taken by any outgoing connection (a proxy's to its backend, curl's) before
# the test binds it. Each process starts at its own place, so parallel runs rarely meet.
_LOW = 20000
_SPAN = max(1000, _ephemeral_low() - _LOW)
_next_port = itertools.count(random.randrange(_SPAN))


def free_port(host: str = LOOPBACK) -> int:
    """A port free a moment ago, that no outgoing connection will take meanwhile."""
    for _ in range(_SPAN):
        port = _LOW + next(_next_port) % _SPAN
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port on {host} in {_LOW}-{_LOW + _SPAN - 1}")


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct free ports."""
    return [free_port(host) for _ in range(count)]


def free_port_range(length: int, *hosts: str) -> int:
    """The first port of ``length`` consecutive ports free on every one of ``hosts``."""
    hosts = hosts or (LOOPBACK,)
    for start in range(42000, 60000, length + 7):
        socks = []
        try:
            for host in hosts:
                for port in range(start, start + length):
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    socks.append(sock)
                    sock.bind((host, port))
            return start
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free port range")


@dataclass(frozen=True)
class CertPair:
    cert_pem: str
    key_pem: str

    def write(self, folder: Path, stem: str) -> tuple[Path, Path]:
        cert, key = folder / f"{stem}.crt", folder / f"{stem}.key"
        cert.write_text(self.cert_pem)
        key.write_text(self.key_pem)
        return cert, key


class TestCA:
    """A throwaway certificate authority that issues EC P-256 leaf certificates."""

    __test__ = False

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "smartroute test CA")])
        now = datetime.datetime.now(datetime.UTC)
        self.name = name
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def issue(self, *names: str) -> CertPair:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
            .sign(self.key, hashes.SHA256())
        )
        return CertPair(
            cert.public_bytes(serialization.Encoding.PEM).decode(),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode(),
        )

    def server_context(self, pair: CertPair, tmp: Path, stem: str) -> ssl.SSLContext:
        cert, key = pair.write(tmp, stem)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        return context

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        context.load_verify_locations(cadata=self.pem)
        return context


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF, then close."""
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


class Notes:
    """What a test backend's connections noted about how they ended, in order."""

    def __init__(self) -> None:
        self.ended: list[str] = []
        self._changed = asyncio.Event()

    def note(self, outcome: str) -> None:
        self.ended.append(outcome)
        self._changed.set()

    async def outcome(self, timeout: float = 10) -> str:
        """Wait for the next note of a scripted behaviour."""
        async with asyncio.timeout(timeout):
            while not self.ended:
                self._changed.clear()
                await self._changed.wait()
        return self.ended.pop(0)


class ScriptedBackend(Notes):
    """A backend whose next connections follow ``script``; the ones after that echo.

    A behaviour may ``note`` how its connection ended; ``outcome`` waits for the next note.
    """

    def __init__(self, *script: Handler) -> None:
        super().__init__()
        self.script = list(script)
        self.accepted = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        behaviour = self.script.pop(0) if self.script else echo_handler
        try:
            await behaviour(reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()


def http_answer(body: bytes) -> Handler:
    """Answer every request (heads only, kept alive) with ``200`` and ``body``."""
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(head + body)
                await writer.drain()
        writer.close()

    return handler


def named_handler(name: str) -> Handler:
    """Answer every connection with ``name`` and a newline, then echo."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(name.encode() + b"\n")
        await echo_handler(reader, writer)

    return handler


@contextlib.asynccontextmanager
async def serve(
    handler: Handler,
    host: str = LOOPBACK,
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[int]:
    """Run a backend on loopback for the block; yields its port."""
    server = await asyncio.start_server(handler, host, port, ssl=ssl_context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1)


async def read_line(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    return await asyncio.wait_for(reader.readline(), timeout)


async def read_exactly(reader: asyncio.StreamReader, n: int, timeout: float = 5.0) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), timeout)


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop the tests run on: uvloop's when ``SMARTROUTE_TEST_LOOP=uvloop``, else asyncio's.

    ``None`` means asyncio's default loop. Asking for uvloop without it installed is an error,
    so a CI job meant to run under uvloop cannot quietly run under asyncio instead.
    """
    import os

    wanted = os.environ.get("SMARTROUTE_TEST_LOOP", "asyncio").strip().lower()
    if wanted in ("", "asyncio"):
        return None
    if wanted != "uvloop":
        raise RuntimeError(f"SMARTROUTE_TEST_LOOP={wanted!r}: expected 'uvloop' or 'asyncio'")
    try:
        import uvloop
    except ImportError:
        raise RuntimeError(
            "SMARTROUTE_TEST_LOOP=uvloop but uvloop is not installed "
            "(pip install -e '.[test]' installs it)"
        ) from None
    return uvloop.new_event_loop


def async_test(
    timeout: float = 30.0,
) -> Callable[[Callable[..., Awaitable[None]]], Callable[..., None]]:
    """Run an async test function in a fresh event loop, failing it after ``timeout`` seconds.

    The loop is asyncio's, or uvloop's when ``SMARTROUTE_TEST_LOOP=uvloop`` (see
    :func:`event_loop_factory`).
    """

    def decorate(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
        @functools.wraps(fn)
        def run(*args: object, **kwargs: object) -> None:
            async def bounded() -> None:
                await asyncio.wait_for(fn(*args, **kwargs), timeout)

            run_on_loop(bounded(), event_loop_factory())

        return run

    return decorate


def run_on_loop(
    main: Coroutine[Any, Any, None], loop_factory: Callable[[], asyncio.AbstractEventLoop] | None
) -> None:
    """Run ``main`` on a new loop made by ``loop_factory`` (asyncio's when None), then close it."""

    async def prepared() -> None:
        await _open_lasting_descriptors()
        await main

    runner = asyncio.Runner(loop_factory=loop_factory)
    try:
        runner.run(prepared())
    except BaseException:
        _close_runner(runner, report=False)  # the failure matters, not what it left open
        raise
    _close_runner(runner, report=True)


async def _open_lasting_descriptors() -> None:
    """Have the loop open the descriptors it keeps until it closes, before a test counts them.

    asyncio's loop opens its own when it is created. uvloop's (libuv) opens one more, a reserve
    for running out of descriptors (``/dev/null``), with the first stream it makes: without this
    a test comparing its open descriptors before and after would report it as a leak.
    """
    loop = asyncio.get_running_loop()
    if type(loop).__module__.startswith("asyncio"):
        return
    lost = loop.create_future()

    class Closing(asyncio.Protocol):
        def connection_lost(self, exc: Exception | None) -> None:
            lost.set_result(None)

    ours, theirs = socket.socketpair()
    with theirs:
        transport, _ = await loop.connect_accepted_socket(Closing, ours)
        transport.close()
        await lost
    await asyncio.sleep(0)  # uvloop closes the handle after connection_lost


def _close_runner(runner: asyncio.Runner, *, report: bool) -> None:
    """Close the loop, then emit its ResourceWarnings (transports left open) if ``report``.

    uvloop warns while it closes each handle still open, and when pytest turns that warning
    into an exception the handle is never closed and ``loop.close()`` waits forever. So the
    warnings are collected while closing and emitted (as errors, under pytest) once it is closed.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        runner.close()
    for warning in caught if report else ():
        warnings.warn_explicit(
            warning.message,
            warning.category,
            warning.filename,
            warning.lineno,
            source=warning.source,
        )


def require_tool(name: str) -> str:
    """The path of an external program; missing is a failure in CI and a skip elsewhere."""
    import os
    import shutil

    import pytest

    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (scripts/install-test-tools.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


async def curl(*args: str, timeout: float = 20) -> tuple[int, str, str]:
    """Run curl (silent, errors shown, bounded); returns exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        require_tool("curl"),
        "-sS",
        "--max-time",
        str(timeout),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout + 10)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


# -- client-side socket helpers ----------------------------------------------------------------


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def flushed(writer: asyncio.StreamWriter) -> None:
    """Wait until the transport handed every written byte to the kernel."""
    await writer.drain()
    while writer.transport.get_write_buffer_size():
        await asyncio.sleep(0.005)


async def read_to_end(reader: asyncio.StreamReader, timeout: float = 10) -> tuple[bytes, bool]:
    """Everything until EOF; the flag is True when the connection was reset instead."""
    data = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                data += chunk
    except ConnectionError:
        return bytes(data), True
    return bytes(data), False


async def start_nginx(
    folder: Path, server_block: str, port: int, http_block: str = ""
) -> asyncio.subprocess.Process:
    """Start a real nginx on loopback ``port``, configured with ``server_block`` (the lines
    inside ``server { }`` after ``listen``) and ``http_block`` (lines of the ``http { }``
    block, such as a ``limit_req_zone``), and return it once the port accepts.

    nginx runs as one process (``master_process off``): killing it takes the server down at
    once, and it may be started again on the same port. ``folder`` holds its files: one folder
    per nginx running at the same time.
    """
    nginx = require_tool("nginx")
    conf = folder / "nginx.conf"
    conf.write_text(
        f"""
daemon off;
master_process off;
user root;
pid {folder}/nginx.pid;
error_log {folder}/error.log;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {folder}/body;
  proxy_temp_path {folder}/proxy;
  fastcgi_temp_path {folder}/fastcgi;
  uwsgi_temp_path {folder}/uwsgi;
  scgi_temp_path {folder}/scgi;
  {http_block}
  server {{
    listen {LOOPBACK}:{port};
    {server_block}
  }}
}}
"""
    )
    return await start_server_process([nginx, "-c", str(conf), "-p", str(folder)], port)


async def until_listening(port: int, running: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Wait until loopback ``port`` accepts: True; False as soon as ``running()`` says the
    server exited first; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not running():
            return False
        try:
            _, writer = await asyncio.open_connection(LOOPBACK, port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return True
    raise TimeoutError(f"nothing listens on port {port} after {timeout:g}s")


async def start_server_process(argv: list[str], port: int) -> asyncio.subprocess.Process:
    """Start a server program and return it once loopback ``port`` accepts (bounded); its
    stderr is reported if it exits first."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        if await until_listening(port, lambda: proc.returncode is None):
            return proc
        assert proc.stderr is not None
        error = (await proc.stderr.read()).decode()
        raise RuntimeError(f"{Path(argv[0]).name} exited: {error}")
    except BaseException:
        await stop_process(proc)
        raise


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    """Terminate ``proc`` (if it still runs) and reap it."""
    if proc.returncode is None:
        proc.terminate()
    await proc.wait()


@contextlib.asynccontextmanager
async def nginx_server(
    folder: Path, server_block: str, port: int | None = None
) -> AsyncIterator[int]:
    """A real nginx (see :func:`start_nginx`) on ``port`` (a free one if None) for the block;
    yields its port."""
    port = free_port() if port is None else port
    proc = await start_nginx(folder, server_block, port)
    try:
        yield port
    finally:
        await stop_process(proc)


class Finished:
    """The records of connections the proxy finished, in order (see the ``finished`` fixture
    in conftest.py)."""

    def __init__(self) -> None:
        self.records: list[ConnectionRecord] = []
        self._taken = 0
        self._changed = asyncio.Event()

    def add(self, record: ConnectionRecord) -> None:
        self.records.append(record)
        self._changed.set()

    async def next(self, timeout: float = 5) -> ConnectionRecord:
        """The next finished connection's record, waiting for it if needed."""
        async with asyncio.timeout(timeout):
            while self._taken >= len(self.records):
                self._changed.clear()
                await self._changed.wait()
        self._taken += 1
        return self.records[self._taken - 1]


class FakeTransport(asyncio.Transport):
    """A transport that only remembers whether it was closed."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def stream() -> tuple[Stream, FakeTransport]:
    """A :class:`Stream` connected to a :class:`FakeTransport` (for the backend pool tests)."""
    s, transport = Stream(), FakeTransport()
    s.connection_made(transport)
    return s, transport
