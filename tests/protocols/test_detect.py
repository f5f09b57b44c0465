"""First-bytes classification: TLS ClientHello, HTTP head, or other."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import FIXTURES

from smartroute.protocols.detect import OTHER, Detection, detect, settle
from smartroute.protocols.probes import Probes

HELLOS = FIXTURES / "clienthello"
EXPECTED = json.loads((HELLOS / "expected.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_client_hellos_are_tls_with_their_sni(name: str) -> None:
    data = (HELLOS / name).read_bytes()
    for cut in range(1, len(data)):
        assert detect(data[:cut]) is None
    found = detect(data + b"\x17\x03\x03\x00\x01x")  # trailing early data is left alone
    assert found is not None and found.kind == "tls" and found.hello is not None
    assert found.hello.sni == EXPECTED[name]["sni"]


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", "http"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "other"),
        (b"\x00\x01\x02", "other"),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", "other"),  # malformed HTTP: error kept
        (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", "other"),  # a ServerHello, not a client's
    ],
)
def test_kinds(data: bytes, kind: str) -> None:
    found = detect(data)
    assert found is not None and found.kind == kind
    if data.startswith((b"GET / HTTP/1.1\r\nHost: a b", b"\x16")):
        assert found.error is not None


@pytest.mark.parametrize("data", [b"", b"G", b"GET", b"GET / HTTP/1.1\r\n", b"\x16", b"\x16\x03"])
def test_need_more(data: bytes) -> None:
    assert detect(data) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_give_a_detection_or_none(data: bytes) -> None:
    found = detect(data)
    assert found is None or isinstance(found, Detection)


def test_probes_name_other_protocols_and_keep_parse_errors() -> None:
    probes = Probes()
    h2 = detect(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", probes=probes)
    assert h2 == Detection("other", protocol="http2")  # the parse error is dropped
    bad = detect(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", probes=probes)
    assert bad is not None and bad.protocol == "http" and bad.error is not None
    assert detect(b"SSH-2.0-", probes=probes) is None  # the ssh probe waits for a version
    ssh = detect(b"SSH-2.0-OpenSSH_9.2\r\n", probes=probes)
    assert ssh == Detection("other", protocol="ssh")
    assert detect(b"\x00\x00", probes=probes) is None  # postgres may still come
    assert settle(b"\x00\x00", probes) == OTHER
    assert settle(b"GET / HTTP/1.1\r\n", probes).protocol == "http"  # cut short: still http
    assert detect(b"SSH-2.0-OpenSSH_9.2\r\n") == OTHER  # without probes: not asked
