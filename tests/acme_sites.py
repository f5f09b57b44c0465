"""Sites with automatic certificates for the tests that run against Pebble: the acme setting,
an HTTPS route, what a verifying client is served, curl through it, and Pebble's own counts."""

from __future__ import annotations

import asyncio
import ssl
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from http_backend import Backend
from pebble import Pebble
from support import LOOPBACK, require_tool

from smartroute.helpers import create_https_terminate_route


def acme_settings(pebble: Pebble, store: Path, **extra: Any) -> dict[str, Any]:
    return {
        "email": "ops@smartroute.test",
        "directory_url": pebble.directory_url,
        "ca_bundle": pebble.ca_bundle,
        "port": pebble.http_port,
        "certificate_store": str(store),
        "retry_min": 0.2,
        "retry_max": 1,
        **extra,
    }


def site(domains: list[str], backend: Backend, port: int) -> dict[str, Any]:
    return create_https_terminate_route(
        domains,
        {"host": LOOPBACK, "port": backend.port},
        certificate="auto",
        ports=port,
        name="site",
    )


async def served_certificate(port: int, name: str, root_pem: str) -> x509.Certificate:
    """The certificate a verifying client gets for ``name`` (trusting only Pebble's root)."""
    context = ssl.create_default_context(cadata=root_pem)
    reader, writer = await asyncio.open_connection(
        LOOPBACK, port, ssl=context, server_hostname=name
    )
    ssl_object = writer.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True)
    writer.close()
    return x509.load_der_x509_certificate(der)


async def curl_https(name: str, port: int, root: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        require_tool("curl"), "-sS", "--max-time", "20", "--cacert", str(root),
        "--resolve", f"{name}:{port}:127.0.0.1", f"https://{name}:{port}/hello",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def certs_cli(config: Path, *args: str) -> tuple[int, str]:
    """``smartroute certs ARGS CONFIG``: its exit status and output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "smartroute", "certs", *args, str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def issued(pebble: Pebble) -> int:
    """How many certificates Pebble has issued so far."""
    return pebble.log_path.read_text().count("Issued certificate serial")


def accounts_made(pebble: Pebble) -> int:
    """How many ACME accounts Pebble has created so far."""
    return pebble.log_path.read_text().count("POST /sign-me-up")
