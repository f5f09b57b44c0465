"""TLS passthrough by SNI: one port, two TLS backends, chosen by the name the client asks for.

The proxy never decrypts anything: it reads the server name from the ClientHello and pipes
the encrypted stream to the backend that owns that name. The example makes its own throwaway
certificates, starts two TLS backends, routes to them and connects once to each.

Run it: ``python examples/sni_passthrough.py``
"""

from __future__ import annotations

import asyncio
import datetime
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from smartroute import SmartRoute
from smartroute.helpers import create_https_passthrough_route

PROXY_PORT = 9443
NAMES = {"alpha.localhost": 9444, "beta.localhost": 9445}


def self_signed(name: str, folder: Path) -> Path:
    """Write a self-signed certificate and key for ``name``; return the PEM file (both)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = folder / f"{name}.pem"
    path.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


routes = [
    create_https_passthrough_route(name, {"host": "127.0.0.1", "port": port}, ports=PROXY_PORT)
    for name, port in NAMES.items()
]


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        servers = []
        pems = {}
        for name, port in NAMES.items():
            pems[name] = self_signed(name, Path(tmp))
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(pems[name])

            async def greet(
                reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str = name
            ) -> None:
                writer.write(f"hello from the {name} backend\n".encode())
                await writer.drain()
                writer.close()

            servers.append(await asyncio.start_server(greet, "127.0.0.1", port, ssl=context))

        async with SmartRoute(routes, bind_address="127.0.0.1"):
            for name in NAMES:
                client = ssl.create_default_context(cafile=str(pems[name]))
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", PROXY_PORT, ssl=client, server_hostname=name
                )
                print(f"{name}: {(await reader.readline()).decode().strip()}")
                writer.close()
        for server in servers:
            server.close()


if __name__ == "__main__":
    asyncio.run(main())
