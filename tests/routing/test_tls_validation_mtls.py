"""Validation of the mTLS keys of a ``tls`` block: ``client_ca``, ``client_auth`` and
``backend_client_certificate`` (dict and dataclass forms, PEM text and files, and every bad
input named by its field)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, cast

import pytest
from support import TestCA

from smartroute.errors import ConfigError
from smartroute.routing.model import CertificatePair, CompiledRoute
from smartroute.routing.schema import Certificate, Forward, Match, Route, Target, Tls
from smartroute.routing.validation import validate_routes


@pytest.fixture(scope="module")
def pems(ca: TestCA) -> dict[str, str]:
    server, client = ca.issue("site.test"), ca.issue("edge.test")
    return {
        "cert": server.cert_pem,
        "key": server.key_pem,
        "client_cert": client.cert_pem,
        "client_key": client.key_pem,
        "ca": ca.pem,
    }


def route(tls: dict[str, Any], action: str = "forward") -> dict[str, Any]:
    if action == "forward":
        body: dict[str, Any] = {"type": "forward", "targets": [{"host": "10.0.0.5", "port": 80}]}
    else:
        body = {"type": "static", "static": {"content": "ok\n"}}
    return {"name": "r", "match": {"ports": 443}, "action": {**body, "tls": tls}}


def compiled(tls: dict[str, Any], action: str = "forward") -> CompiledRoute:
    return validate_routes([cast(Any, route(tls, action))])[0]


def error_of(tls: dict[str, Any], action: str = "forward") -> str:
    with pytest.raises(ConfigError) as caught:
        validate_routes([cast(Any, route(tls, action))])
    return str(caught.value)


def terminate(pems: dict[str, str], mode: str = "terminate", **keys: Any) -> dict[str, Any]:
    return {"mode": mode, "certificate": {"cert": pems["cert"], "key": pems["key"]}, **keys}


def test_client_ca_defaults_to_required_and_takes_optional(pems: dict[str, str]) -> None:
    plain = compiled(terminate(pems)).tls
    assert plain is not None and plain.client_ca is None and plain.client_auth is None
    required = compiled(terminate(pems, client_ca=pems["ca"]), action="static").tls
    assert required is not None
    assert (required.client_ca, required.client_auth) == (pems["ca"], "required")
    optional = compiled(
        terminate(pems, "terminate-and-reencrypt", client_ca=pems["ca"], client_auth="optional")
    ).tls
    assert optional is not None and optional.client_auth == "optional"


def test_client_ca_and_the_client_certificate_load_from_files(
    pems: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "ca.pem").write_text(pems["ca"])
    (tmp_path / "edge.crt").write_text(pems["client_cert"])
    (tmp_path / "edge.key").write_text(pems["client_key"])
    tls = compiled(
        terminate(
            pems,
            "terminate-and-reencrypt",
            client_ca=str(tmp_path / "ca.pem"),
            backend_client_certificate={
                "cert": str(tmp_path / "edge.crt"),
                "key": tmp_path / "edge.key",
            },
        )
    ).tls
    assert tls is not None and tls.client_ca == pems["ca"]
    pair = tls.backend_client_certificate
    assert isinstance(pair, CertificatePair)
    assert (pair.cert_pem, pair.key_pem) == (pems["client_cert"], pems["client_key"])
    assert pair.key_path == str(tmp_path / "edge.key")
    assert pems["client_key"] not in repr(tls)  # the key stays out of reprs and logs


def test_the_dataclass_form_compiles_to_the_same_settings(pems: dict[str, str]) -> None:
    as_dict = compiled(
        terminate(
            pems,
            "terminate-and-reencrypt",
            client_ca=pems["ca"],
            client_auth="optional",
            backend_client_certificate={"cert": pems["client_cert"], "key": pems["client_key"]},
        )
    )
    as_class = validate_routes(
        [
            Route(
                name="r",
                match=Match(ports=443),
                action=Forward(
                    targets=[Target(host="10.0.0.5", port=80)],
                    tls=Tls(
                        mode="terminate-and-reencrypt",
                        certificate=Certificate(cert=pems["cert"], key=pems["key"]),
                        client_ca=pems["ca"],
                        client_auth="optional",
                        backend_client_certificate=Certificate(
                            cert=pems["client_cert"], key=pems["client_key"]
                        ),
                    ),
                ),
            )
        ]
    )[0]
    assert as_class.tls == as_dict.tls
    assert dataclasses.replace(as_class, index=as_dict.index) == as_dict


@pytest.mark.parametrize(
    ("tls", "field", "says"),
    [
        ({"client_auth": "required"}, "client_auth", 'needs "client_ca"'),
        ({"client_ca": "CA", "client_auth": "sometimes"}, "client_auth", "sometimes"),
        ({"client_ca": "CA", "client_auth": True}, "client_auth", "True"),
        ({"client_ca": "not a certificate\n"}, "client_ca", "no PEM certificate found"),
        ({"client_ca": "/nowhere/ca.pem"}, "client_ca", "does not exist"),
        ({"client_ca": 42}, "client_ca", "expected PEM text or a file path"),
        (
            {"backend_client_certificate": {"cert": "CLIENT", "key": "KEY"}},
            "backend_client_certificate",
            'only applies with mode "terminate-and-reencrypt"',
        ),
    ],
)
def test_bad_mtls_keys_name_their_field(
    pems: dict[str, str], tls: dict[str, Any], field: str, says: str
) -> None:
    tls = {
        key: pems["ca"] if value == "CA" else value for key, value in tls.items()
    }  # placeholders
    if "backend_client_certificate" in tls:
        tls["backend_client_certificate"] = {
            "cert": pems["client_cert"],
            "key": pems["client_key"],
        }
    message = error_of(terminate(pems, **tls))
    assert message.startswith(f"routes[0].action.tls.{field}: "), message
    assert says in message, message


def test_a_broken_backend_client_certificate_names_its_field(pems: dict[str, str]) -> None:
    reencrypt = "terminate-and-reencrypt"
    mismatched = {"cert": pems["client_cert"], "key": pems["key"]}  # another certificate's key
    message = error_of(terminate(pems, reencrypt, backend_client_certificate=mismatched))
    assert message.startswith("routes[0].action.tls.backend_client_certificate: "), message
    assert "does not match" in message
    assert pems["key"].splitlines()[1] not in message  # never the key itself
    missing = error_of(terminate(pems, reencrypt, backend_client_certificate={"cert": "x\n"}))
    assert "routes[0].action.tls.backend_client_certificate" in missing
    assert "key" in missing
    unknown = error_of(
        terminate(
            pems,
            reencrypt,
            backend_client_certificate={
                "cert": pems["client_cert"],
                "key": pems["client_key"],
                "kye": "x",
            },
        )
    )
    assert "kye" in unknown and "did you mean" in unknown


def test_client_certificates_need_a_terminating_mode(pems: dict[str, str]) -> None:
    for key, value in (("client_ca", pems["ca"]), ("client_auth", "optional")):
        message = error_of({"mode": "passthrough", key: value})
        assert message.startswith(f"routes[0].action.tls.{key}: "), message
        assert "passthrough" in message


def test_misspelled_mtls_keys_get_a_suggestion(pems: dict[str, str]) -> None:
    message = error_of(terminate(pems, client_cas=pems["ca"]))
    assert "client_cas" in message and 'did you mean "client_ca"' in message


def test_a_client_ca_with_a_key_and_an_auto_client_certificate_are_refused(
    pems: dict[str, str],
) -> None:
    message = error_of(terminate(pems, client_ca=pems["ca"] + pems["client_key"]))
    assert (
        message
        == "routes[0].action.tls.client_ca: holds a private key: give the CA certificates only"
    )
    message = error_of(
        terminate(pems, "terminate-and-reencrypt", backend_client_certificate="auto")
    )
    assert message == (
        "routes[0].action.tls.backend_client_certificate: "
        'expected {"cert": ..., "key": ...}, got \'auto\''
    )
