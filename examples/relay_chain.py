"""A relay chain: an edge smartroute hands connections to a core smartroute over TLS, proving
who it is with a client certificate and saying who the client is with a PROXY v2 header.

    client --TLS, SNI a.localhost--> edge :9643 --PROXY v2, TLS + client cert--> core :9644
                                                                   |-- a.localhost: handler
                                                                   '-- b.localhost: app :9645

The core only takes connections that bring a certificate signed by the edge's CA
(``client_ca``), and only believes a PROXY header from the edge's address (``proxy_ips``). The
edge re-encrypts with the client's own SNI, so the core routes on the original SNI and Host,
and its handlers, logs and backends see the original client's address. Both proxies (and a
certificate authority made for the occasion) live in this one process; in production they
are two machines, each with its own config.

Run it: ``python examples/relay_chain.py``
"""

from __future__ import annotations

import asyncio
import datetime
import http.client
import json
import socket
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from smartroute import RouteContext, SmartRoute

EDGE_PORT, CORE_PORT, APP_PORT = 9643, 9644, 9645


class Authority:
    """A throwaway CA (real deployments use their own PKI for the edge's certificate)."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.pem = self._sign(self.name, self.key.public_key(), ca=True).decode()

    def issue(self, *names: str) -> dict[str, str]:
        """A certificate for ``names`` (the first is the subject) as a smartroute cert dict."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        cert = self._sign(subject, key.public_key(), names=names)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return {"cert": cert.decode(), "key": key_pem.decode()}

    def _sign(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        *,
        ca: bool = False,
        names: tuple[str, ...] = (),
    ) -> bytes:
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if names:
            san = x509.SubjectAlternativeName([x509.DNSName(n) for n in names])
            builder = builder.add_extension(san, critical=False)
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


sites = Authority("example sites CA")  # the certificates clients (and the edge) trust
edges = Authority("example edge CA")  # the certificates the core accepts from edges

# -- the core: client certificates required, PROXY headers only from the edge ------------------


async def app_a(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: RouteContext
) -> None:
    """The core's own handler for a.localhost: says what the core knows of the connection."""
    await reader.readuntil(b"\r\n\r\n")
    cert = ctx.client_cert or {}
    body = json.dumps(
        {"client": f"{ctx.client_ip}:{ctx.client_port}", "sni": ctx.domain,
         "peer": cert.get("subject")}
    ).encode()  # fmt: skip
    writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n")
    writer.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    writer.close()


core_tls = {
    "mode": "terminate",
    "certificate": sites.issue("a.localhost", "b.localhost"),
    "client_ca": edges.pem,  # "client_auth": "required" is the default
}
core = SmartRoute(
    [
        {"name": "a", "match": {"ports": CORE_PORT, "domains": "a.localhost"},
         "action": {"type": "socket-handler", "socket_handler": app_a, "tls": core_tls}},
        {"name": "b", "match": {"ports": CORE_PORT, "domains": "b.localhost"},
         "action": {"type": "forward", "protocol": "http", "tls": core_tls,
                    "targets": [{"host": "127.0.0.1", "port": APP_PORT}]}},
    ],
    bind_address="127.0.0.1",
    accept_proxy_protocol=True,
    proxy_ips=["127.0.0.1"],  # the edge's address: nobody else may name a client
)  # fmt: skip

# -- the edge: terminates the client's TLS, re-encrypts to the core ----------------------------

edge = SmartRoute(
    [
        {
            "name": "to-core",
            "match": {"ports": EDGE_PORT, "domains": ["a.localhost", "b.localhost"]},
            "action": {
                "type": "forward",
                "protocol": "http",
                "targets": [{"host": "127.0.0.1", "port": CORE_PORT, "send_proxy_protocol": "v2"}],
                "tls": {
                    "mode": "terminate-and-reencrypt",
                    "certificate": sites.issue("a.localhost", "b.localhost"),
                    "backend_ca": sites.pem,  # verify the core (SNI: the client's own)
                    "backend_client_certificate": edges.issue("edge-1.localhost"),
                },
            },
        }
    ],
    bind_address="127.0.0.1",
)


async def app_b(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A plain HTTP app behind the core: says which Host and X-Forwarded-For reached it."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    fields = dict(line.split(": ", 1) for line in head.split("\r\n")[1:] if ": " in line)
    body = json.dumps({"host": fields.get("Host"), "xff": fields.get("X-Forwarded-For")}).encode()
    writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n")
    writer.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    writer.close()


def visit(name: str) -> tuple[str, dict[str, str]]:
    """GET https://NAME:EDGE_PORT/ as a browser would; returns our address and the answer."""
    context = ssl.create_default_context(cadata=sites.pem)
    raw = socket.create_connection(("127.0.0.1", EDGE_PORT), timeout=10)
    host, port = raw.getsockname()[:2]
    conn = http.client.HTTPSConnection(name, EDGE_PORT, timeout=10, context=context)
    conn.sock = context.wrap_socket(raw, server_hostname=name)
    conn.request("GET", "/")
    answer: dict[str, str] = json.loads(conn.getresponse().read())
    conn.close()
    return f"{host}:{port}", answer


async def main() -> None:
    app = await asyncio.start_server(app_b, "127.0.0.1", APP_PORT)
    async with app, core, edge:
        me, seen = await asyncio.to_thread(visit, "a.localhost")
        print(f"a.localhost: the core saw client {seen['client']} (we are {me}),")
        print(f"             SNI {seen['sni']}, edge certificate {seen['peer']}")
        print(f"             same client address: {seen['client'] == me}")
        me, seen = await asyncio.to_thread(visit, "b.localhost")
        print(f"b.localhost: app b got Host {seen['host']}, X-Forwarded-For {seen['xff']}")


if __name__ == "__main__":
    asyncio.run(main())
