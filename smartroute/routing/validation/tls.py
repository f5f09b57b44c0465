"""The ``action.tls`` block of a route: PEM text or files, certificate and key checks."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Literal, cast

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from smartroute.errors import ConfigError
from smartroute.routing import schema
from smartroute.routing.model import Action, CertificatePair, ClientAuth, TlsMode, TlsSettings
from smartroute.routing.validation._fields import (
    CERT_KEYS,
    TLS_KEYS,
    Raw,
    check_keys,
    expect_bool,
    expect_choice,
    expect_text,
    got,
    mapping,
    require,
)

_TLS_MODES: tuple[TlsMode, ...] = ("passthrough", "terminate", "terminate-and-reencrypt")
_BACKEND_KEYS = (
    "backend_verify",
    "backend_ca",
    "backend_server_name",
    "backend_client_certificate",
)
_CLIENT_AUTH: tuple[ClientAuth, ...] = ("required", "optional")
_PEM_KEY = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")


_SECRET_LOOKING = re.compile(r"[A-Za-z0-9+/=_-]{40,}")


def _shown(value: str, path: str) -> str:
    """``value`` for an error message, unless it could be key material given by mistake."""
    if path.endswith(".key") and (len(value) > 200 or _SECRET_LOOKING.fullmatch(value.strip())):
        return "(value not shown: it may be a key)"
    return repr(value)


def _pem(value: object, path: str) -> tuple[str, str | None]:
    """PEM text as given, or read from a file path: (text, absolute path or None).

    Error messages never repeat what could be key material: bytes are named by type only and
    a long or base64-looking "path" given for a key is not shown.
    """
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bytes) and b"-----BEGIN" in value:
        value = value.decode("ascii", errors="replace")
    if not isinstance(value, str) or not value.strip():
        shown = type(value).__name__ if isinstance(value, bytes) else got(value)
        raise ConfigError(path, f"expected PEM text or a file path, got {shown}")
    if "-----BEGIN" in value or "\n" in value:
        return value, None
    try:
        text = Path(value).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, f"file {_shown(value, path)} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(
            path, f"{_shown(value, path)} is not a PEM file (binary; DER must be converted)"
        ) from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(path, f"cannot read {_shown(value, path)} ({reason})") from None
    return text, os.path.abspath(value)


def _cert_problem(pem: str, source: str | None) -> str | None:
    where = "" if source is None else f" in {source!r}"
    if "-----BEGIN CERTIFICATE-----" not in pem:
        return f'no PEM certificate found{where} (expected a "-----BEGIN CERTIFICATE-----" block)'
    try:
        x509.load_pem_x509_certificates(pem.encode())
    except ValueError:
        return f"the PEM certificate{where} is malformed"
    return None


@functools.lru_cache(maxsize=128)
def _pair_problem(
    cert_pem: str, key_pem: str, cert_path: str | None, key_path: str | None
) -> tuple[str, str] | None:
    """(field, problem) when the pair does not load or does not belong together; cached because
    many routes often share one certificate."""
    problem = _cert_problem(cert_pem, cert_path)
    if problem is not None:
        return "cert", problem
    where = "" if key_path is None else f" in {key_path!r}"
    if _PEM_KEY.search(key_pem) is None:
        block = '"-----BEGIN PRIVATE KEY-----"'
        return "key", f"no PEM private key found{where} (expected a {block} block)"
    try:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except TypeError:
        return "key", f"the private key{where} is encrypted (give an unencrypted key)"
    except (ValueError, UnsupportedAlgorithm):
        return "key", f"the PEM private key{where} is malformed"
    cert = x509.load_pem_x509_certificates(cert_pem.encode())[0]
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        return "", "the key does not match the certificate"
    return None


def _certificate(value: object, path: str, route: str, *, auto: bool = True) -> CertificatePair:
    if isinstance(value, str):
        wanted = (
            '"auto", "on-demand" or {"cert": ..., "key": ...}'
            if auto
            else '{"cert": ..., "key": ...}'
        )
        raise ConfigError(path, f"expected {wanted}, got {got(value)}")
    raw = mapping(value, path, schema.Certificate)
    check_keys(raw, CERT_KEYS, path, "action.tls.certificate", route)
    require(raw, path, "cert", "key")
    cert_pem, cert_path = _pem(raw["cert"], f"{path}.cert")
    key_pem, key_path = _pem(raw["key"], f"{path}.key")
    problem = _pair_problem(cert_pem, key_pem, cert_path, key_path)
    if problem is not None:
        field, message = problem
        raise ConfigError(f"{path}.{field}" if field else path, message)
    return CertificatePair(cert_pem, key_pem, cert_path, key_path)


def compile_tls(value: object, path: str, action: Action, route: str) -> TlsSettings:
    raw = mapping(value, path, schema.Tls)
    check_keys(raw, TLS_KEYS, path, "action.tls", route)
    require(raw, path, "mode")
    mode = cast(TlsMode, expect_choice(raw["mode"], f"{path}.mode", _TLS_MODES, "TLS mode"))
    if mode != "terminate" and action.type != "forward":
        raise ConfigError(
            f"{path}.mode",
            f'"{mode}" only works with forward actions, not "{action.type}" (use "terminate")',
        )
    certificate = raw.get("certificate")
    if mode == "passthrough" and certificate is not None:
        raise ConfigError(
            f"{path}.certificate", 'not allowed with mode "passthrough" (nothing is decrypted)'
        )
    for key in _BACKEND_KEYS:
        if mode != "terminate-and-reencrypt" and raw.get(key) is not None:
            raise ConfigError(f"{path}.{key}", 'only applies with mode "terminate-and-reencrypt"')
    if mode == "passthrough":
        for key in ("client_ca", "client_auth"):
            if raw.get(key) is not None:
                raise ConfigError(
                    f"{path}.{key}",
                    'not allowed with mode "passthrough" (the backend sees the client\'s '
                    "certificate; the proxy only checks what it terminates)",
                )
        return TlsSettings(mode)
    if certificate is None:
        raise ConfigError(
            path,
            f'mode "{mode}" needs a "certificate" ("auto", "on-demand" or'
            ' {"cert": ..., "key": ...})',
        )
    pair: CertificatePair | Literal["auto", "on-demand"]
    if certificate in ("auto", "on-demand"):
        pair = certificate
    else:
        pair = _certificate(certificate, f"{path}.certificate", route)
    verify, ca, server_name, client_pair = (raw.get(key) for key in _BACKEND_KEYS)
    client_ca, client_auth = _client_auth(raw, path)
    return TlsSettings(
        mode,
        pair,
        backend_verify=True if verify is None else expect_bool(verify, f"{path}.backend_verify"),
        backend_ca=None if ca is None else _ca(ca, f"{path}.backend_ca"),
        backend_server_name=None
        if server_name is None
        else expect_text(server_name, f"{path}.backend_server_name"),
        backend_client_certificate=None
        if client_pair is None
        else _certificate(client_pair, f"{path}.backend_client_certificate", route, auto=False),
        client_ca=client_ca,
        client_auth=client_auth,
    )


def _ca(value: object, path: str) -> str:
    """CA certificates (PEM text or a file): one or more, each well formed."""
    pem, source = _pem(value, path)
    problem = _cert_problem(pem, source)
    if problem is not None:
        raise ConfigError(path, problem)
    if _PEM_KEY.search(pem) is not None:
        raise ConfigError(path, "holds a private key: give the CA certificates only")
    return pem


def _client_auth(raw: Raw, path: str) -> tuple[str | None, ClientAuth | None]:
    """``client_ca`` and ``client_auth``: asking for client certificates needs a CA to check
    them against; with a CA, certificates are required unless ``client_auth`` says otherwise."""
    ca, auth = raw.get("client_ca"), raw.get("client_auth")
    if ca is None:
        if auth is not None:
            raise ConfigError(
                f"{path}.client_auth", 'needs "client_ca" (the CA that signs client certificates)'
            )
        return None, None
    pem = _ca(ca, f"{path}.client_ca")
    if auth is None:
        return pem, "required"
    return pem, cast(
        ClientAuth,
        expect_choice(auth, f"{path}.client_auth", _CLIENT_AUTH, "client_auth value"),
    )
