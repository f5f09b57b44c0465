"""First-bytes classification: TLS ClientHello, HTTP head, or other."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import FIXTURES

from smartroute.protocols.detect import Detection, detect

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
