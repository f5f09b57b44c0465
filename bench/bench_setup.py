"""What the benchmark serves: ports, a certificate, and equivalent nginx/HAProxy/smartroute
configurations.

Every proxy gets one port per workload, forwarding to the same backend:

- ``bulk``: iperf3 server (TCP, L4)
- ``relay``: nginx plain HTTP, ``return 200 "ok"`` (TCP, L4; also the new-connection workload)
- ``sni``: nginx HTTPS, chosen by SNI among ten names (TLS passthrough)
- ``tls``: TLS terminated by the proxy, HTTP to nginx ``return 200 "ok"``
- ``http``: HTTP reverse proxy to nginx, which serves a tiny static file
- ``idle``: an idle backend that accepts and holds (memory per idle connection)
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_procs import port_free
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SNI_NAME = "localhost"  # wrk sends the URL's host as SNI; this one resolves without a hosts file
STATIC_FILE = "hello.txt"
STATIC_BODY = b"hello, bench\n"
WORKLOAD_PORTS = ("bulk", "relay", "sni", "tls", "http", "idle")
ROUTE_COUNTS = (10, 10_000)  # routing cost: routes on the measured port

# Resumption is off everywhere so every connection is a full handshake: wrk keeps each slot's
# session and would otherwise resume. OpenSSL's system_default section reaches nginx, HAProxy,
# Python's ssl (smartroute) and wrk alike; NumTickets = 0 stops TLS 1.3 tickets.
OPENSSL_CNF = """\
openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
NumTickets = 0
"""


@dataclass
class Ports:
    """Free ports on 127.0.0.1, handed out from ``base`` upwards."""

    base: int
    taken: list[int] = field(default_factory=list)

    def take(self) -> int:
        port = max([self.base - 1, *self.taken]) + 1
        while not port_free(port):
            port += 1
        self.taken.append(port)
        return port

    def proxy(self) -> dict[str, int]:
        return {name: self.take() for name in WORKLOAD_PORTS}


@dataclass
class Layout:
    """Backend ports and each proxy's ports, plus the files they use."""

    root: Path
    nginx_http: int
    nginx_https: int
    iperf: int
    idle: int
    haproxy: dict[str, int]
    smartroute: dict[str, int]
    routing: dict[int, int]  # route count -> port of a smartroute with that many SNI routes

    @property
    def cert(self) -> Path:
        return self.root / "cert.pem"

    @property
    def key(self) -> Path:
        return self.root / "key.pem"

    @property
    def combined(self) -> Path:
        return self.root / "combined.pem"

    def direct(self) -> dict[str, int]:
        """Where each workload goes without a proxy (nothing for the idle backend)."""
        return {
            "bulk": self.iperf,
            "relay": self.nginx_http,
            "sni": self.nginx_https,
            "tls": self.nginx_https,
            "http": self.nginx_http,
        }


def make_layout(root: Path, base: int) -> Layout:
    ports = Ports(base)
    layout = Layout(
        root=root,
        nginx_http=ports.take(),
        nginx_https=ports.take(),
        iperf=ports.take(),
        idle=ports.take(),
        haproxy=ports.proxy(),
        smartroute=ports.proxy(),
        routing={count: ports.take() for count in ROUTE_COUNTS},
    )
    (root / "www").mkdir()
    (root / "www" / STATIC_FILE).write_bytes(STATIC_BODY)
    (root / "openssl.cnf").write_text(OPENSSL_CNF)
    write_certificate(layout)
    return layout


def write_certificate(layout: Layout) -> None:
    """A self-signed ECDSA P-256 certificate for ``localhost`` (and 127.0.0.1)."""
    cert_pem, key_pem = self_signed(SNI_NAME)
    layout.cert.write_bytes(cert_pem)
    layout.key.write_bytes(key_pem)
    layout.key.chmod(0o600)
    layout.combined.write_bytes(cert_pem + key_pem)
    layout.combined.chmod(0o600)


def self_signed(name: str) -> tuple[bytes, bytes]:
    """A self-signed ECDSA P-256 certificate for ``name`` and its key, as PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def decoy_names(count: int) -> list[str]:
    """Domains routed before the measured one; about one in twenty is a wildcard."""
    return [f"*.w{i}.example.test" if i % 20 == 19 else f"h{i}.example.test" for i in range(count)]


def nginx_main_conf(root: Path, servers: str) -> str:
    """A single-process nginx configuration around ``servers`` (its ``server`` blocks)."""
    temp = " ".join(
        f"{kind}_temp_path {root}/nginx-{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
daemon off;
user root;
worker_processes 1;
worker_rlimit_nofile 30000;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log warn;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    {temp}
    default_type text/plain;
    keepalive_requests 1000000;
{servers}}}
"""


def nginx_conf(layout: Layout) -> str:
    root = layout.root
    return nginx_main_conf(
        root,
        f"""\
    server {{
        listen 127.0.0.1:{layout.nginx_http} backlog=4096;
        location = /ok {{ return 200 "ok"; }}
        location = /nginx-status {{ stub_status; }}
        location / {{ root {root}/www; }}
    }}
    server {{
        listen 127.0.0.1:{layout.nginx_https} ssl backlog=4096;
        ssl_certificate {layout.cert};
        ssl_certificate_key {layout.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache off;
        ssl_session_tickets off;
        location = /ok {{ return 200 "ok"; }}
    }}
""",
    )


def haproxy_cfg(layout: Layout) -> str:
    p = layout.haproxy
    decoys = "\n".join(
        f"    use_backend decoy if {{ req_ssl_sni -i {name.removeprefix('*.')} }}"
        if not name.startswith("*.")
        else f"    use_backend decoy if {{ req_ssl_sni -m end .{name.removeprefix('*.')} }}"
        for name in decoy_names(9)
    )
    return f"""\
global
    nbthread 1
    maxconn 8000
    tune.ssl.cachesize 0

defaults
    timeout connect 10s
    timeout client 3600s
    timeout server 3600s
    maxconn 8000

frontend bulk
    mode tcp
    bind 127.0.0.1:{p["bulk"]}
    default_backend iperf

frontend relay
    mode tcp
    bind 127.0.0.1:{p["relay"]}
    default_backend nginx_tcp

frontend sni
    mode tcp
    bind 127.0.0.1:{p["sni"]}
    tcp-request inspect-delay 10s
    tcp-request content accept if {{ req_ssl_hello_type 1 }}
{decoys}
    use_backend nginx_tls if {{ req_ssl_sni -i {SNI_NAME} }}

frontend tls
    mode http
    bind 127.0.0.1:{p["tls"]} ssl crt {layout.combined} no-tls-tickets
    option forwardfor
    default_backend nginx_http

frontend http
    mode http
    bind 127.0.0.1:{p["http"]}
    option forwardfor
    default_backend nginx_http

backend iperf
    mode tcp
    server s1 127.0.0.1:{layout.iperf}

backend nginx_tcp
    mode tcp
    server s1 127.0.0.1:{layout.nginx_http}

backend nginx_tls
    mode tcp
    server s1 127.0.0.1:{layout.nginx_https}

backend decoy
    mode tcp
    server s1 127.0.0.1:9

backend nginx_http
    mode http
    server s1 127.0.0.1:{layout.nginx_http}
"""


def haproxy_idle_cfg(layout: Layout) -> str:
    """A fresh HAProxy with only the idle service (memory per idle connection)."""
    return f"""\
global
    nbthread 1
    maxconn 8000

defaults
    mode tcp
    timeout connect 10s
    timeout client 3600s
    timeout server 3600s
    maxconn 8000

frontend idle
    bind 127.0.0.1:{layout.haproxy["idle"]}
    default_backend idle

backend idle
    server s1 127.0.0.1:{layout.idle}
"""


def _forward(name: str, port: int, target: int, **extra: Any) -> dict[str, Any]:
    action: dict[str, Any] = {"type": "forward", "targets": [{"host": "127.0.0.1", "port": target}]}
    match: dict[str, Any] = {"ports": port}
    if "domains" in extra:
        match["domains"] = extra.pop("domains")
    action.update(extra)
    return {"name": name, "match": match, "action": action}


def sni_routes(port: int, target: int, count: int) -> list[dict[str, Any]]:
    """``count`` passthrough routes on ``port``; the one for :data:`SNI_NAME` comes last."""
    passthrough = {"mode": "passthrough"}
    routes = [
        _forward(f"decoy{i}", port, 9, domains=[name], tls=passthrough)
        for i, name in enumerate(decoy_names(count - 1))
    ]
    routes.append(_forward("sni", port, target, domains=[SNI_NAME], tls=passthrough))
    return routes


def smartroute_routes(layout: Layout) -> list[dict[str, Any]]:
    """The same services as :func:`haproxy_cfg`, as smartroute route dicts."""
    p = layout.smartroute
    certificate = {"cert": str(layout.cert), "key": str(layout.key)}
    return [
        _forward("bulk", p["bulk"], layout.iperf),
        _forward("relay", p["relay"], layout.nginx_http),
        *sni_routes(p["sni"], layout.nginx_https, 10),
        # With domains: a port-only terminate route is dispatched before the ClientHello is
        # read and then never matches (see bench/README.md).
        _forward(
            "tls",
            p["tls"],
            layout.nginx_http,
            domains=[SNI_NAME],
            protocol="http",
            tls={"mode": "terminate", "certificate": certificate},
        ),
        _forward("http", p["http"], layout.nginx_http, protocol="http"),
    ]


def smartroute_idle_routes(layout: Layout) -> list[dict[str, Any]]:
    """A fresh smartroute with only the idle service (memory per idle connection)."""
    return [_forward("idle", layout.smartroute["idle"], layout.idle)]


def write_json(path: Path, routes: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(routes))
    return path
