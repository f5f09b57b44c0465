"""One port serving many protocols at once, each told apart by its first bytes (match.protocol).

Real clients against one proxy port: curl (HTTPS by SNI, HTTP by Host, HTTP/2 with prior
knowledge, through SOCKS5), ssh, psql, redis-cli, mosquitto_pub/mosquitto_sub. Behind it real
servers where they are cheap to run (nginx, redis-server, mosquitto) and small scripted ones
where they are not (an SSH banner, a Postgres server that answers every login with an error
message, a SOCKS5 server that connects to nginx). A connection no probe names goes to the route
without ``protocol``; a server-speaks-first client does so once the initial-data wait is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from support import (
    LOOPBACK,
    TestCA,
    async_test,
    curl,
    free_port,
    read_to_end,
    require_tool,
    serve,
    start_nginx,
    start_server_process,
    stop_process,
)

from smartroute import ConfigError, RouteContext, SmartRoute
from smartroute.protocols.probes import Probes

SSH_BANNER = b"SSH-2.0-smartroute_test_backend\r\n"
PG_MESSAGE = "hello from the test postgres"


async def run(*argv: str, timeout: float = 20) -> tuple[int, str]:
    """Run a client program (bounded); its exit code and its output, stderr included."""
    proc = await asyncio.create_subprocess_exec(
        require_tool(argv[0]),
        *argv[1:],
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


# -- scripted backends -------------------------------------------------------------------------


async def ssh_backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Says its SSH version, reads the client's, and ends (the client reports who it met)."""
    writer.write(SSH_BANNER)
    with contextlib.suppress(ConnectionError, TimeoutError):
        await asyncio.wait_for(reader.readline(), 5)
    writer.close()


async def postgres_backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Declines TLS (SSLRequest -> "N"), then answers the startup message with a FATAL error."""
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, TimeoutError):
        while True:
            length = struct.unpack("!I", await asyncio.wait_for(reader.readexactly(4), 5))[0]
            body = await reader.readexactly(length - 4)
            code = struct.unpack("!I", body[:4])[0]
            if code in (80877103, 80877104):  # SSLRequest, GSSENCRequest
                writer.write(b"N")
                continue
            fields = b"SFATAL\0C28000\0M" + PG_MESSAGE.encode() + b"\0\0"
            writer.write(b"E" + struct.pack("!I", len(fields) + 4) + fields)
            await writer.drain()
            break
    writer.close()


def socks5_backend(web_port: int) -> Any:
    """A SOCKS5 server (no auth, CONNECT only) that connects every request to ``web_port``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            _, count = await reader.readexactly(2)
            await reader.readexactly(count)
            writer.write(b"\x05\x00")
            _, command, _, kind = await reader.readexactly(4)
            if kind == 1:
                await reader.readexactly(4)
            elif kind == 3:
                await reader.readexactly((await reader.readexactly(1))[0])
            else:
                await reader.readexactly(16)
            await reader.readexactly(2)
            assert command == 1
            up_reader, up_writer = await asyncio.open_connection(LOOPBACK, web_port)
            writer.write(b"\x05\x00\x00\x01" + bytes(4) + b"\x00\x00")

            async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
                sink.close()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        writer.close()

    return handle


async def fallback(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: RouteContext
) -> None:
    """The route without ``protocol``: says what it was given."""
    first = b""
    with contextlib.suppress(TimeoutError):
        first = await asyncio.wait_for(reader.read(100), 0.05)
    writer.write(f"fallback protocol={ctx.protocol} first={first!r}\n".encode())
    await writer.drain()
    writer.close()


# -- real servers ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def process(argv: list[str], port: int) -> AsyncIterator[None]:
    """Run a server until the block ends, once ``port`` accepts."""
    proc = await start_server_process(argv, port)
    try:
        yield
    finally:
        await stop_process(proc)


@contextlib.asynccontextmanager
async def servers(tmp_path: Path) -> AsyncIterator[dict[str, int]]:
    """nginx (HTTP/1.1 and h2c), redis-server, mosquitto and the scripted backends."""
    web, h2c, redis, mqtt = free_port(), free_port(), free_port(), free_port()
    (tmp_path / "nginx").mkdir()
    nginx = await start_nginx(
        tmp_path / "nginx",
        f"listen {LOOPBACK}:{h2c} http2;\n"
        'location / { return 200 "nginx $server_protocol host=$host\\n"; }',
        web,
    )
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {mqtt} {LOOPBACK}\nallow_anonymous true\npersistence false\n")
    redis_argv = [require_tool("redis-server"), "--port", str(redis), "--bind", LOOPBACK]
    redis_argv += ["--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    mosquitto = "/usr/sbin/mosquitto"
    try:
        async with (
            process(redis_argv, redis),
            process([mosquitto, "-c", str(conf)], mqtt),
            serve(ssh_backend) as ssh,
            serve(postgres_backend) as postgres,
            serve(socks5_backend(web)) as socks5,
        ):
            yield {
                "web": web,
                "h2c": h2c,
                "redis": redis,
                "mqtt": mqtt,
                "ssh": ssh,
                "postgres": postgres,
                "socks5": socks5,
            }
    finally:
        await stop_process(nginx)


def forward(port: int, **extra: Any) -> dict[str, Any]:
    return {"type": "forward", "targets": [{"host": LOOPBACK, "port": port}], **extra}


def routes(port: int, backends: dict[str, int], ca: TestCA) -> list[dict[str, Any]]:
    pair = ca.issue("secure.example")
    tls = {"mode": "terminate", "certificate": {"cert": pair.cert_pem, "key": pair.key_pem}}
    found = [
        # Definition order is not match order: the route without protocol comes first here and
        # still only takes what no other route names.
        {"name": "fallback", "match": {"ports": port}, "action": {
            "type": "socket-handler", "socket_handler": fallback}},
        {"name": "https", "match": {"ports": port, "domains": "secure.example"},
         "action": forward(backends["web"], tls=tls)},
        {"name": "web", "match": {"ports": port, "domains": "web.example", "protocol": "http"},
         "action": forward(backends["web"], protocol="http")},
        {"name": "h2c", "match": {"ports": port, "protocol": "http2"},
         "action": forward(backends["h2c"])},
    ]  # fmt: skip
    for name in ("ssh", "postgres", "redis", "mqtt", "socks5"):
        found.append(
            {
                "name": name,
                "match": {"ports": port, "protocol": name},
                "action": forward(backends[name]),
            }
        )
    return found


async def mqtt_roundtrip(port: int) -> str:
    """mosquitto_sub through the proxy receives what mosquitto_pub publishes through it."""
    sub = asyncio.create_task(
        run(
            "mosquitto_sub",
            "-h",
            LOOPBACK,
            "-p",
            str(port),
            "-t",
            "mux/test",
            "-C",
            "1",
            "-W",
            "15",
        )
    )
    for _ in range(100):  # publish until the subscriber (subscribing meanwhile) gets one
        code, out = await run(
            "mosquitto_pub", "-h", LOOPBACK, "-p", str(port), "-t", "mux/test", "-m", "hello mqtt"
        )
        assert code == 0, out
        done, _ = await asyncio.wait({sub}, timeout=0.2)
        if done:
            break
    code, out = await sub
    assert code == 0, out
    return out.strip()


@async_test(timeout=90)
async def test_one_port_serves_every_protocol_at_once(tmp_path: Path, ca: TestCA) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(ca.pem)
    async with servers(tmp_path) as backends:
        port = free_port()
        proxy = SmartRoute(routes(port, backends, ca), bind_address=LOOPBACK)
        async with proxy:
            p = str(port)
            curls, clients, mqtt = await asyncio.gather(
                asyncio.gather(
                    curl("--resolve", f"secure.example:{p}:{LOOPBACK}", "--cacert", str(ca_file),
                         f"https://secure.example:{p}/"),
                    curl("-H", "Host: web.example", f"http://{LOOPBACK}:{p}/"),
                    curl("--http2-prior-knowledge", f"http://{LOOPBACK}:{p}/"),
                    curl("--socks5-hostname", f"{LOOPBACK}:{p}", "http://socks.example/"),
                ),
                asyncio.gather(
                    run("ssh", "-v", "-p", p, "-o", "BatchMode=yes", "-o",
                        "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                        "-o", "ConnectTimeout=10", f"x@{LOOPBACK}"),
                    run("psql", f"host={LOOPBACK} port={p} user=u dbname=d connect_timeout=10",
                        "-c", "select 1"),
                    run("redis-cli", "-h", LOOPBACK, "-p", p, "SET", "mux", "it works"),
                ),
                mqtt_roundtrip(port),
            )  # fmt: skip
            https, web, h2c, socks = curls
            ssh, psql, redis_set = clients
            assert https[:2] == (0, "nginx HTTP/1.1 host=secure.example\n"), https
            assert web[:2] == (0, "nginx HTTP/1.1 host=web.example\n"), web
            assert h2c[:2] == (0, "nginx HTTP/2.0 host=127.0.0.1\n"), h2c
            assert socks[:2] == (0, "nginx HTTP/1.1 host=socks.example\n"), socks
            assert "remote software version smartroute_test_backend" in ssh[1], ssh[1]
            assert psql[0] != 0 and PG_MESSAGE in psql[1], psql
            assert redis_set == (0, "OK\n"), redis_set
            assert await run("redis-cli", "-h", LOOPBACK, "-p", p, "GET", "mux") == (
                0,
                "it works\n",
            )
            assert mqtt == "hello mqtt"
            by_route = proxy.stats()["routes"]
            for name in ("https", "web", "h2c", "socks5", "ssh", "postgres", "redis", "mqtt"):
                assert by_route[name]["total"] >= 1, (name, by_route)
            assert "fallback" not in by_route, by_route


@async_test(timeout=30)
async def test_unnamed_bytes_and_silent_clients_fall_to_the_route_without_protocol() -> None:
    port = free_port()
    proxy = SmartRoute(
        [
            {"name": "fallback", "match": {"ports": port},
             "action": {"type": "socket-handler", "socket_handler": fallback}},
            {"name": "ssh", "match": {"ports": port, "protocol": ["ssh", "redis"]},
             "action": {"type": "socket-handler", "socket_handler": fallback}},
        ],
        bind_address=LOOPBACK,
        initial_data_timeout=0.3,
    )  # fmt: skip
    async with proxy:
        # Bytes no probe names: routed as soon as every probe has said no.
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(b"\x00\x01garbage\r\n")
        loop = asyncio.get_running_loop()
        began = loop.time()
        answer, _ = await read_to_end(reader)
        assert answer.startswith(b"fallback protocol=None"), answer
        assert loop.time() - began < 0.25  # not after the initial-data wait
        writer.close()
        # A client that waits for the server: routed once the initial-data wait is over.
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        began = loop.time()
        answer, _ = await read_to_end(reader)
        assert answer == b"fallback protocol=None first=b''\n"
        assert loop.time() - began >= 0.25
        writer.close()
        # A protocol in the route's list: its name reaches the handler.
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(b"*1\r\n$4\r\nPING\r\n")
        answer, _ = await read_to_end(reader)
        assert answer.startswith(b"fallback protocol=redis"), answer
        writer.close()


@async_test(timeout=30)
async def test_without_a_fallback_unnamed_connections_are_closed() -> None:
    port = free_port()
    proxy = SmartRoute(
        [{"match": {"ports": port, "protocol": "ssh"}, "action": {"type": "block"}}],
        bind_address=LOOPBACK,
        initial_data_timeout=0.3,
    )
    async with proxy:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        loop = asyncio.get_running_loop()
        began = loop.time()
        assert await read_to_end(reader) == (b"", False)
        assert 0.25 <= loop.time() - began < 5
        writer.close()
        # Bytes that look like HTTP but no route names: the same as any port without a route
        # for them (an HTTP answer, since they were HTTP).
        code, out, _ = await curl(f"http://{LOOPBACK}:{port}/")
        assert code == 0 and "no route" in out


@async_test(timeout=30)
async def test_user_probes_come_after_the_built_in_ones_and_a_raising_probe_is_no_match(
    caplog: pytest.LogCaptureFixture,
) -> None:
    asked: list[bytes] = []

    def hello(data: bytes) -> bool | None:
        asked.append(data)
        if len(data) < 6:
            return None
        return data.startswith(b"GREET ")

    def broken(data: bytes) -> bool | None:
        raise RuntimeError("a bug in the probe")

    port = free_port()
    handler = {"type": "socket-handler", "socket_handler": fallback}
    proxy = SmartRoute(
        [
            {"name": "fallback", "match": {"ports": port}, "action": handler},
            {"name": "hello", "match": {"ports": port, "protocol": "hello"}, "action": handler},
            {"name": "broken", "match": {"ports": port, "protocol": "broken"}, "action": handler},
        ],
        bind_address=LOOPBACK,
        protocols={"broken": broken, "hello": hello},
    )
    caplog.set_level(logging.ERROR, logger="smartroute")
    async with proxy:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        for piece in (b"GRE", b"ET ", b"world\n"):  # the probe waits for enough bytes
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)
        answer, _ = await read_to_end(reader)
        assert answer.startswith(b"fallback protocol=hello first=b'GREET "), answer
        writer.close()
        assert any(b.startswith(b"GREET") for b in asked)
        # An SSH banner is named by the built-in probe: the user probes are not asked.
        asked.clear()
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(b"SSH-2.0-x\r\n")
        answer, _ = await read_to_end(reader)
        assert answer.startswith(b"fallback protocol=ssh"), answer
        assert asked == []
        writer.close()
    assert "broken" in caplog.text and "a bug in the probe" in caplog.text


def test_match_protocol_must_name_a_probe() -> None:
    with pytest.raises(ConfigError) as caught:
        SmartRoute([{"match": {"ports": 9, "protocol": "shh"}, "action": {"type": "block"}}])
    assert caught.value.path == "routes[0].match.protocol"
    assert 'did you mean "ssh"' in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        SmartRoute(
            [{"match": {"ports": 9, "protocol": "mine"}, "action": {"type": "block"}}],
            protocols={"mine": "no.such.module:probe"},
        )
    assert caught.value.path == "settings.protocols.mine"
    SmartRoute(
        [{"match": {"ports": 9, "protocol": ["mine", "ssh"]}, "action": {"type": "block"}}],
        protocols={"mine": lambda data: False},
    )


@async_test(timeout=30)
async def test_ports_without_protocol_routes_never_run_the_probes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[bytes] = []
    original = Probes.identify

    def counting(self: Probes, data: bytes, final: bool = False) -> Any:
        calls.append(data)
        return original(self, data, final)

    monkeypatch.setattr(Probes, "identify", counting)
    plain, probing = free_port(), free_port()
    handler = {"type": "socket-handler", "socket_handler": fallback}
    proxy = SmartRoute(
        [
            {"match": {"ports": plain, "domains": "a.example"}, "action": handler},
            {"match": {"ports": plain}, "action": handler},
            {"match": {"ports": probing, "protocol": "ssh"}, "action": handler},
            {"match": {"ports": probing}, "action": handler},
        ],
        bind_address=LOOPBACK,
    )
    async with proxy:
        for port in (plain, probing):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write(b"\x00 not a protocol anyone knows\r\n")
            await read_to_end(reader)
            writer.close()
            if port == plain:
                assert calls == []
    assert calls  # asked on the port that has a protocol route
