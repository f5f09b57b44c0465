"""A relay chain of two smartroute processes (``python -m smartroute run CONFIG``).

The edge terminates the client's TLS and re-encrypts to the core, presenting a client
certificate and sending a PROXY v2 header first; the core accepts PROXY headers from the edge
only (``proxy_ips``), demands a certificate from the edge's CA (``client_ca``), and routes on
the original SNI and Host: ``a`` and ``b`` to two HTTP backends, ``who`` to a socket handler
that says what the core knows of the connection. Clients connect from 127.0.0.5, so the
client's address is told apart from the edge's (127.0.0.1) at every hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from http_backend import http_backend
from support import LOOPBACK, CertPair, TestCA, async_test, curl, free_port

from smartroute.protocols.proxy_protocol import encode_v2

CLIENT_IP = "127.0.0.5"  # the original client
STRANGER_IP = "127.0.0.7"  # someone who skips the edge
DOMAINS = ("a.example.test", "b.example.test", "who.example.test")

CORE_CONFIG = '''
import asyncio
import json

async def who(reader, writer, ctx):
    """What the core knows of the connection, as an HTTP answer."""
    await reader.readuntil(b"\\r\\n\\r\\n")
    body = json.dumps({{
        "route": ctx.route_name, "domain": ctx.domain, "client": [ctx.client_ip, ctx.client_port],
        "client_cert": ctx.client_cert,
    }}).encode()
    writer.write(b"HTTP/1.1 200 OK\\r\\nConnection: close\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body))
    writer.write(body)
    await writer.drain()
    writer.close()

tls = {{
    "mode": "terminate",
    "certificate": {{"cert": {core_cert!r}, "key": {core_key!r}}},
    "client_ca": {edge_ca!r},
    "client_auth": "required",
}}

def backend(name, port):
    return {{
        "name": "core-" + name,
        "match": {{"ports": {port}, "domains": name + ".example.test"}},
        "action": {{"type": "forward", "protocol": "http", "tls": tls,
                    "targets": [{{"host": "127.0.0.1", "port": port}}]}},
    }}

routes = [
    backend("a", {a}),
    backend("b", {b}),
    {{"name": "core-who", "match": {{"ports": {port}, "domains": "who.example.test"}},
     "action": {{"type": "socket-handler", "socket_handler": who, "tls": tls}}}},
]
settings = {{
    "bind_address": "127.0.0.1",
    "accept_proxy_protocol": True,
    "proxy_ips": ["127.0.0.1"],
    "initial_data_timeout": 2,
}}
'''


def edge_config(folder: Path, http_port: int, raw_port: int, core: int) -> Path:
    """The edge's JSON config: one port re-encrypts HTTP requests, one pipes the bytes."""
    tls = {
        "mode": "terminate-and-reencrypt",
        "certificate": {"cert": str(folder / "edge.crt"), "key": str(folder / "edge.key")},
        "backend_ca": str(folder / "sites-ca.pem"),  # the core's certificate; SNI: the client's
        "backend_client_certificate": {
            "cert": str(folder / "edge-client.crt"),
            "key": str(folder / "edge-client.key"),
        },
    }
    target = {"host": LOOPBACK, "port": core, "send_proxy_protocol": "v2"}
    routes = [
        {
            "name": f"edge-{protocol}",
            "match": {"ports": port, "domains": ["*.example.test"]},
            "action": {"type": "forward", "protocol": protocol, "targets": [target], "tls": tls},
        }
        for protocol, port in (("http", http_port), ("tcp", raw_port))
    ]
    path = folder / "edge.json"
    path.write_text(json.dumps({"settings": {"bind_address": LOOPBACK}, "routes": routes}))
    return path


# -- the processes -----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def smartroute(config: Path, port: int, errors: list[bytes]) -> AsyncIterator[None]:
    """``python -m smartroute run CONFIG`` until the block ends (SIGTERM, exit code 0); its
    stderr (the access log) goes into ``errors``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "smartroute", "run", str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "SMARTROUTE_LOOP": loop_name()},
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        lines: list[bytes] = []
        while not any(f"listening on port {port}".encode() in line for line in lines):
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert line, f"smartroute ended before listening: {lines}"
            lines.append(line)
        yield
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        errors.append(err)
    assert proc.returncode == 0, err.decode(errors="replace")


def loop_name() -> str:
    """The processes run on the loop the tests run on (``SMARTROUTE_TEST_LOOP``)."""
    return "uvloop" if os.environ.get("SMARTROUTE_TEST_LOOP", "") == "uvloop" else "asyncio"


# -- clients -----------------------------------------------------------------------------------


async def fetch(port: int, name: str, folder: Path, *args: str) -> tuple[int, str, str]:
    """curl https://NAME:PORT/ from the client's address, trusting the sites' CA."""
    return await curl(
        "--interface", CLIENT_IP, "--cacert", str(folder / "sites-ca.pem"),
        "--resolve", f"{name}:{port}:{LOOPBACK}", *args, f"https://{name}:{port}/hello",
    )  # fmt: skip


async def raw_who(port: int, folder: Path) -> tuple[dict[str, Any], int]:
    """Ask ``who`` through the edge's raw port from the client's address: what the core knows,
    and the client's own port."""
    context = ssl.create_default_context(cafile=str(folder / "sites-ca.pem"))
    reader, writer = await asyncio.open_connection(
        LOOPBACK, port, ssl=context, server_hostname="who.example.test", local_addr=(CLIENT_IP, 0)
    )
    mine: int = writer.get_extra_info("sockname")[1]
    writer.write(b"GET / HTTP/1.1\r\nHost: who.example.test\r\nConnection: close\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), data
    answer: dict[str, Any] = json.loads(body)
    return answer, mine


async def forged(port: int, folder: Path, ca: TestCA) -> bytes:
    """A stranger's PROXY v2 header naming someone else, then a ClientHello: what comes back."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port, local_addr=(STRANGER_IP, 0))
    outgoing = ssl.MemoryBIO()
    tls = ca.client_context().wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=DOMAINS[0])
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    writer.write(encode_v2(("203.0.113.9", 4242), (LOOPBACK, port)) + outgoing.read())
    try:
        data = await asyncio.wait_for(reader.read(), 10)
    except ConnectionError:
        data = b""
    writer.close()
    return data


def headers_of(answer: dict[str, Any]) -> dict[str, str]:
    return {name.lower(): value for name, value in answer["headers"]}


# -- the test ----------------------------------------------------------------------------------


@async_test(120)
async def test_the_core_routes_on_the_original_names_and_sees_the_original_client(
    ca: TestCA, tmp_path: Path
) -> None:
    edges = TestCA()  # the CA the core trusts for client certificates (not the sites' CA)
    (tmp_path / "sites-ca.pem").write_text(ca.pem)
    (tmp_path / "edge-ca.pem").write_text(edges.pem)
    core_pair = ca.issue(*DOMAINS)
    core_pair.write(tmp_path, "core")
    ca.issue(*DOMAINS).write(tmp_path, "edge")
    edge_client: CertPair = edges.issue("edge-1.example.test")
    edge_client.write(tmp_path, "edge-client")
    core_port, http_port, raw_port = free_port(), free_port(), free_port()
    errors: list[bytes] = []
    with http_backend("a") as a, http_backend("b") as b:
        core_config = tmp_path / "core.py"
        core_config.write_text(
            CORE_CONFIG.format(
                core_cert=str(tmp_path / "core.crt"),
                core_key=str(tmp_path / "core.key"),
                edge_ca=str(tmp_path / "edge-ca.pem"),
                a=a.port,
                b=b.port,
                port=core_port,
            )
        )
        edge = edge_config(tmp_path, http_port, raw_port, core_port)
        async with smartroute(core_config, core_port, errors), smartroute(edge, http_port, errors):
            # HTTP through the edge: the core routes by SNI and Host; the backends see the
            # client's address (the edge's own never appears).
            for name, backend in (("a.example.test", "a"), ("b.example.test", "b")):
                code, out, err = await fetch(http_port, name, tmp_path)
                assert code == 0, err
                answer = json.loads(out)
                assert answer["backend"] == backend
                headers = headers_of(answer)
                assert headers["host"] == f"{name}:{http_port}"
                assert headers["x-forwarded-for"].split(", ") == [CLIENT_IP, CLIENT_IP]
            # Raw bytes through the edge: the core's handler sees the client's address and
            # port, the original SNI, and the edge's certificate.
            who, mine = await raw_who(raw_port, tmp_path)
            assert who["route"] == "core-who" and who["domain"] == "who.example.test"
            assert who["client"] == [CLIENT_IP, mine]
            assert who["client_cert"]["subject"] == "CN=edge-1.example.test"
            assert who["client_cert"]["issuer"] == "CN=smartroute test CA"
            # Straight to the core without the edge's certificate: a TLS alert.
            code, _, err = await fetch(
                core_port, "a.example.test", tmp_path, "--interface", STRANGER_IP
            )
            assert code != 0 and "alert certificate required" in err, err
            code, _, err = await fetch(
                core_port,
                "a.example.test",
                tmp_path,
                "--interface",
                STRANGER_IP,
                "--tls-max",
                "1.2",
            )
            assert code != 0 and "alert handshake failure" in err, err
            # A PROXY header from anyone but the edge is refused before any TLS answer.
            assert await forged(core_port, tmp_path, ca) == b""
    core_log, edge_log = (e.decode(errors="replace") for e in errors[::-1])
    assert f"{STRANGER_IP}:" in core_log and "untrusted-proxy-header" in core_log, core_log
    assert "203.0.113.9" not in core_log  # the forged client was never believed
    assert f"event loop: {loop_name()}" in core_log and f"event loop: {loop_name()}" in edge_log
    # Each connection the edge carried is logged by the core under the same client address.
    carried = re.findall(rf"{CLIENT_IP}:(\d+) -> :\d+ route=edge-", edge_log)
    assert len(carried) == 3, edge_log
    for client_port in carried:
        assert f"{CLIENT_IP}:{client_port} -> :{core_port} route=core-" in core_log, core_log
