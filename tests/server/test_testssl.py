"""testssl.sh against the proxy's TLS termination: protocols, cipher categories, forward secrecy,
server preferences, server defaults and vulnerabilities, all over loopback.

The scan fails the test on any finding rated MEDIUM or worse and on any protocol below TLS 1.2
offered. Two routes are scanned at once, one with an EC and one with an RSA certificate: only
an RSA certificate lets RSA key exchange, DHE-RSA or ROBOT show up.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID
from support import LOOPBACK, TestCA, async_test, free_ports, require_tool

from smartroute import SmartRoute

# -p protocols, -s cipher categories, -f forward secrecy, -P server preferences,
# -S server defaults (certificate), -U every vulnerability check. Left out: -e/-E (each cipher,
# already seen through -s, -f and -P), -c (client simulations) and -h (HTTP headers: the
# static answer's, not the TLS configuration's). About 22 s a scan alone, 33 s for both at
# once (measured on 2 CPUs).
CHECKS = ("-p", "-s", "-f", "-P", "-S", "-U")
SCAN_TIMEOUT = 240.0
FAILING = {"MEDIUM", "HIGH", "CRITICAL", "FATAL"}  # FATAL: the scan itself broke off
BELOW_TLS12 = ("SSLv2", "SSLv3", "TLS1", "TLS1_1")
# One id per section the checks fill in: a scan that did not run one cannot pass.
RAN = {
    "protocols": "TLS1_2",
    "ciphers": "cipherlist_NULL",
    "pfs": "PFS",
    "serverPreferences": "cipher_order",
    "serverDefaults": "cert_chain_of_trust",
    "vulnerabilities": "heartbleed",
}
# Findings that would only blame the test CA or the certificate's test names. None is left:
# testssl trusts the test CA (--add-ca) and scans under the certificate's name, so the chain
# of trust and the name are checked for real (and asserted below). Add an id here only with
# the reason it is not the proxy's doing.
NOT_THE_PROXY: frozenset[str] = frozenset()


def leaf(ca: TestCA, name: str, key_type: str) -> dict[str, str]:
    """A certificate as a public CA issues one, so testssl's certificate ratings hold no
    surprise: 90 days of validity (testssl rates less than 60 days left MEDIUM or worse), and
    where to ask about revocation (none is HIGH: cert_revocation). testssl looks neither up."""
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        rsa.generate_private_key(65537, 2048)
        if key_type == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    now = datetime.datetime.now(datetime.UTC)
    ocsp = x509.AccessDescription(
        AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier("http://ocsp.ca.test/")
    )
    crl = x509.DistributionPoint(
        [x509.UniformResourceIdentifier("http://crl.ca.test/ca.crl")], None, None, None
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.AuthorityInformationAccess([ocsp]), critical=False)
        .add_extension(x509.CRLDistributionPoints([crl]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return {"cert": cert.public_bytes(serialization.Encoding.PEM).decode(), "key": key_pem.decode()}


def terminating(port: int, certificate: dict[str, str]) -> dict[str, Any]:
    return {
        "name": f"tls-{port}",
        "match": {"ports": port},
        "action": {
            "type": "static",
            "static": {"content": "hello over TLS\n"},
            "tls": {"mode": "terminate", "certificate": certificate},
        },
    }


async def scan(name: str, port: int, ca_file: Path, out: Path) -> list[dict[str, Any]]:
    """Run testssl against ``name`` at 127.0.0.1:``port``; its findings from the JSON file.

    Offline: no DNS (--nodns none, the address given), no OCSP or CRL fetch (no --phone-out).
    """
    report = out / f"{name}.json"
    proc = await asyncio.create_subprocess_exec(
        require_tool("testssl"),
        "--quiet", "--color", "0", "--warnings", "off",
        "--ip", LOOPBACK, "--nodns", "none", "--connect-timeout", "10",
        "--add-ca", str(ca_file),
        "--jsonfile-pretty", str(report),
        *CHECKS,
        f"{name}:{port}",
        cwd=out,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # its openssl children go with it on a timeout
    )  # fmt: skip
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), SCAN_TIMEOUT)
    finally:
        if proc.returncode is None:  # timed out or cancelled
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    text = output.decode(errors="replace")
    assert report.exists(), f"testssl wrote no report (exit {proc.returncode}):\n{text[-3000:]}"
    document = json.loads(report.read_text())
    findings: list[dict[str, Any]] = []
    for target in document.get("scanResult", []):
        for section, items in target.items():
            if isinstance(items, list):
                findings += [{"section": section, **item} for item in items]
    for key, items in document.items():
        if key.startswith(("clientProblem", "scanProblem")) and isinstance(items, list):
            findings += [{"section": key, **item} for item in items]
    return findings


def problems(label: str, findings: list[dict[str, Any]]) -> list[str]:
    """Everything wrong in one scan, each with the id and testssl's words."""
    found = {item["id"]: item for item in findings}
    wrong = [
        f"{label}: {item['severity']} {item['id']}: {item['finding']}"
        for item in findings
        if item["severity"] in FAILING and item["id"] not in NOT_THE_PROXY
    ]
    for old in BELOW_TLS12:
        if old not in found or not found[old]["finding"].startswith("not offered"):
            finding = found[old]["finding"] if old in found else "not tested"
            wrong.append(f"{label}: protocol below TLS 1.2: {old}: {finding}")
    for section, check in RAN.items():
        if not any(item["section"] == section and item["id"] == check for item in findings):
            wrong.append(f"{label}: testssl did not run {section} (no {check!r} in its report)")
    return wrong


@async_test(SCAN_TIMEOUT + 60)
async def test_testssl_finds_nothing_medium_or_worse(ca: TestCA, tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(ca.pem)
    scans = {"ec": "ec.testssl.test", "rsa": "rsa.testssl.test"}  # key type -> name
    ports = dict(zip(scans, free_ports(len(scans)), strict=True))
    routes = [terminating(ports[kind], leaf(ca, name, kind)) for kind, name in scans.items()]
    async with SmartRoute(routes, bind_address=LOOPBACK):
        started = time.monotonic()
        reports = await asyncio.gather(
            *(scan(name, ports[kind], ca_file, tmp_path) for kind, name in scans.items())
        )
        took = time.monotonic() - started
    print(f"testssl {' '.join(CHECKS)}: {len(scans)} scans at once in {took:.1f} s")
    for kind, findings in zip(scans, reports, strict=True):
        for item in findings:
            if item["severity"] not in ("OK", "INFO", "DEBUG"):
                print(f"  {kind}: {item['severity']} {item['id']}: {item['finding']}")

    wrong = [
        line for kind, found in zip(scans, reports, strict=True) for line in problems(kind, found)
    ]
    assert not wrong, "testssl found:\n" + "\n".join(wrong)
    for (kind, name), findings in zip(scans.items(), reports, strict=True):
        found = {item["id"]: item["finding"] for item in findings}
        # it connected, and saw this route's certificate and trusted it through the test CA
        assert any(found.get(version, "").startswith("offered") for version in ("TLS1_2", "TLS1_3"))
        assert found["cert_commonName"] == name
        assert found["cert_keySize"].startswith(kind.upper())
        assert found["cert_chain_of_trust"].startswith("passed"), found["cert_chain_of_trust"]
        assert found["cert_trust"].startswith("Ok via SAN"), found["cert_trust"]
