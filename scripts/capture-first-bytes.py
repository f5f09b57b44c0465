#!/usr/bin/env python3
"""Capture the first bytes real clients send, for tests/fixtures/first_bytes/.

For each client: listen on 127.0.0.1 with port 0, start the client against that port, accept
its connection, keep what it sends in its first second (the listener never answers, so these
are the bytes a client sends before any server byte), then end the client. Each capture is
written to ``NAME.bin``.

    python3 scripts/capture-first-bytes.py                 # every client
    python3 scripts/capture-first-bytes.py ssh psql        # some of them
    python3 scripts/capture-first-bytes.py --out /tmp/fb   # elsewhere

The clients come from scripts/install-test-tools.sh (openssh-client, postgresql-client,
redis-tools, mosquitto-clients, curl, openssl). Each runs in its own process group, which is
ended when the capture is over, whatever happened.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "fixtures" / "first_bytes"
LISTEN_FOR = 1.0  # seconds of client bytes kept after the connection is accepted
ACCEPT_WITHIN = 5.0  # a client that has not connected by then is reported as failed

# NAME -> command; {port} is the listener's port. Fixed client ids and user names keep the
# captures reproducible where the client allows it.
CLIENTS: dict[str, list[str]] = {
    "ssh": [
        "ssh", "-p", "{port}", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
        "x@127.0.0.1",
    ],
    "psql": ["psql", "host=127.0.0.1 port={port} user=u dbname=d connect_timeout=2"],
    "psql-nossl": [
        "psql",
        "host=127.0.0.1 port={port} user=u dbname=d connect_timeout=2 sslmode=disable"
        " gssencmode=disable",
    ],
    "redis-cli": ["redis-cli", "-h", "127.0.0.1", "-p", "{port}", "PING"],
    "mosquitto_pub": [
        "mosquitto_pub", "-h", "127.0.0.1", "-p", "{port}", "-i", "capture", "-t", "t", "-m", "m",
    ],
    "mosquitto_pub-v5": [
        "mosquitto_pub", "-h", "127.0.0.1", "-p", "{port}", "-V", "mqttv5", "-i", "capture",
        "-t", "t", "-m", "m",
    ],
    "curl-http": ["curl", "-sS", "-m", "2", "http://127.0.0.1:{port}/"],
    "curl-h2c": ["curl", "-sS", "-m", "2", "--http2-prior-knowledge", "http://127.0.0.1:{port}/"],
    "socks5-curl": [
        "curl", "-sS", "-m", "2", "--socks5", "127.0.0.1:{port}", "http://example.invalid/",
    ],
    "tls-openssl": [
        "openssl", "s_client", "-connect", "127.0.0.1:{port}", "-servername", "a.example",
    ],
}  # fmt: skip


def capture(command: list[str]) -> bytes:
    """What the client sends on its first connection in its first LISTEN_FOR seconds."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        argv = [part.replace("{port}", str(port)) for part in command]
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        client = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # its own process group, ended below
        )
        try:
            listener.settimeout(ACCEPT_WITHIN)
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                raise SystemExit(f"{argv[0]} did not connect within {ACCEPT_WITHIN} s") from None
            with conn:
                return _read_for(conn, LISTEN_FOR)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(client.pid, signal.SIGKILL)
            client.wait()


def _read_for(conn: socket.socket, seconds: float) -> bytes:
    """Everything the peer sends within ``seconds`` (less if it closes first)."""
    conn.setblocking(False)
    data = bytearray()
    deadline = time.monotonic() + seconds
    with selectors.DefaultSelector() as selector:
        selector.register(conn, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not selector.select(left):
                continue
            try:
                chunk = conn.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    return bytes(data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "names", nargs="*", help=f"clients to capture (default: all of {', '.join(CLIENTS)})"
    )
    parser.add_argument("--out", type=Path, default=OUT, help="folder for NAME.bin")
    args = parser.parse_args()
    names = args.names or list(CLIENTS)
    unknown = [name for name in names if name not in CLIENTS]
    if unknown:
        parser.error(f"unknown client(s) {unknown}; known: {sorted(CLIENTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        data = capture(CLIENTS[name])
        if not data:
            print(f"{name}: nothing arrived", file=sys.stderr)
            return 1
        (args.out / f"{name}.bin").write_bytes(data)
        print(f"{name}.bin: {len(data)} bytes  {data[:40]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
