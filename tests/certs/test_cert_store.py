"""The certificate store: round trips, permissions, atomic replacement and corrupt entries."""

from __future__ import annotations

import datetime
import json
import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import pytest
from cert_factory import DIRECTORY, account_key, issue
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st
from support import TestCA

from smartroute.certs.store import (
    CertificateStore,
    CertificateStoreError,
    StoredCertificate,
    StoreProblem,
    entry_name,
)
from smartroute.routing.model import CertificatePair

UTC = datetime.UTC


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def entry_files(entry: Path) -> set[str]:
    return {p.name for p in entry.iterdir()}


def edit_meta(entry: Path, **changes: object) -> None:
    meta = json.loads((entry / "meta.json").read_text())
    meta.update(changes)
    (entry / "meta.json").write_text(json.dumps(meta))


def rehash(entry: Path) -> None:
    """Make meta.json vouch for whatever cert.pem and key.pem now hold."""
    import hashlib

    edit_meta(
        entry,
        cert_sha256=hashlib.sha256((entry / "cert.pem").read_bytes()).hexdigest(),
        key_sha256=hashlib.sha256((entry / "key.pem").read_bytes()).hexdigest(),
    )


@pytest.fixture
def store(tmp_path: Path) -> CertificateStore:
    return CertificateStore(tmp_path / "certs")


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
@pytest.mark.parametrize(
    "names",
    [
        ("example.com",),
        ("www.example.com", "example.com"),
        ("*.example.com", "example.com"),
    ],
)
def test_save_then_load_round_trips(
    store: CertificateStore, ca: TestCA, key_type: Literal["ec", "rsa"], names: tuple[str, ...]
) -> None:
    pair = issue(ca, *names, key_type=key_type)
    saved = store.save(list(names), pair.cert_pem, pair.key_pem, source="acme")

    entries, problems = store.load()

    assert problems == []
    assert entries == [saved]
    [loaded] = entries
    assert loaded.domains == tuple(sorted(names))
    assert loaded.cert_pem == pair.cert_pem and loaded.key_pem == pair.key_pem
    assert loaded.issuer == "CN=smartroute test CA"
    assert loaded.source == "acme"
    assert loaded.not_before.tzinfo is not None and loaded.not_after.tzinfo is not None
    assert loaded.lifetime == datetime.timedelta(days=8)
    assert datetime.timedelta(days=6) < loaded.remaining() <= datetime.timedelta(days=7)
    assert loaded.remaining(loaded.not_after) == datetime.timedelta(0)
    assert abs(loaded.stored_at - datetime.datetime.now(UTC)) < datetime.timedelta(minutes=1)
    entry = store.folder / entry_name(names)
    assert loaded.pair == CertificatePair(
        pair.cert_pem, pair.key_pem, str(entry / "cert.pem"), str(entry / "key.pem")
    )
    assert Path(loaded.pair.cert_path or "").read_text() == pair.cert_pem
    assert entry_files(entry) == {"cert.pem", "key.pem", "meta.json"}


def test_wildcard_folder_name_and_meta(store: CertificateStore, ca: TestCA) -> None:
    pair = issue(ca, "*.example.com")
    store.save(["*.Example.COM"], pair.cert_pem, pair.key_pem, source="provider")
    entry = store.folder / "_wildcard_.example.com"
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["domains"] == ["*.example.com"]
    assert meta["source"] == "provider"
    assert set(meta) >= {
        "not_before",
        "not_after",
        "issuer",
        "stored_at",
        "cert_sha256",
        "key_sha256",
    }


def test_wildcard_san_covers_a_single_label(store: CertificateStore, ca: TestCA) -> None:
    pair = issue(ca, "*.example.com")
    store.save(["a.example.com"], pair.cert_pem, pair.key_pem, source="provider")
    assert store.get(["a.example.com"]) is not None
    with pytest.raises(CertificateStoreError, match="does not cover a.b.example.com"):
        store.save(["a.b.example.com"], pair.cert_pem, pair.key_pem, source="provider")


def test_get_is_order_and_case_insensitive(store: CertificateStore, ca: TestCA) -> None:
    pair = issue(ca, "a.example.com", "b.example.com")
    saved = store.save(
        ["b.example.com", "a.example.com"], pair.cert_pem, pair.key_pem, source="acme"
    )

    assert store.get(["A.example.com", "b.example.com"]) == saved
    assert store.get(["b.example.com", "a.example.com", "a.example.com"]) == saved
    assert store.get(["a.example.com"]) is None
    assert store.get(["a.example.com", "b.example.com", "c.example.com"]) is None


def test_expired_certificates_are_entries_not_problems(store: CertificateStore, ca: TestCA) -> None:
    pair = issue(ca, "old.example", days=(-30, -1))
    store.save(["old.example"], pair.cert_pem, pair.key_pem, source="acme")
    entries, problems = store.load()
    assert problems == []
    assert [e.remaining() < datetime.timedelta(0) for e in entries] == [True]
    assert store.get(["old.example"]) is not None


def test_replace_second_save_wins_without_leftovers(store: CertificateStore, ca: TestCA) -> None:
    first, second = issue(ca, "example.com"), issue(ca, "example.com", key_type="rsa")
    store.save(["example.com"], first.cert_pem, first.key_pem, source="acme")
    saved = store.save(["example.com"], second.cert_pem, second.key_pem, source="provider")

    entries, problems = store.load()
    assert (entries, problems) == ([saved], [])
    assert entries[0].key_pem == second.key_pem and entries[0].source == "provider"
    assert entry_files(store.folder / "example.com") == {"cert.pem", "key.pem", "meta.json"}
    assert {p.name for p in store.folder.iterdir()} == {"example.com", ".lock"}


def test_remove(store: CertificateStore, ca: TestCA) -> None:
    pair = issue(ca, "a.example", "b.example")
    store.save(["a.example", "b.example"], pair.cert_pem, pair.key_pem, source="acme")
    store.remove(["b.example", "a.example"])
    assert store.get(["a.example", "b.example"]) is None
    assert store.load() == ([], [])
    assert not (store.folder / "a.example+b.example").exists()
    store.remove(["a.example", "b.example"])  # already gone: fine


# -- folder names -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("domains", "expected"),
    [
        (["example.com"], "example.com"),
        (["b.example", "A.example"], "a.example+b.example"),
        (["*.example.com", "example.com"], "_wildcard_.example.com+example.com"),
        (["xn--bcher-kva.example"], "xn--bcher-kva.example"),
    ],
)
def test_plain_folder_names(domains: list[str], expected: str) -> None:
    assert entry_name(domains) == expected


@pytest.mark.parametrize(
    "domains",
    [
        [f"host{i}.example.com" for i in range(12)],  # too long
        ["../../etc"],
        ["a/b.example"],
        ["_wildcard_.example.com"],  # would collide with "*.example.com"
        ["accounts"],  # the accounts folder
        [".hidden.example"],
        ["a+b.example"],
    ],
)
def test_odd_or_long_domain_sets_get_hashed_names(domains: list[str]) -> None:
    name = entry_name(domains)
    assert "~" in name and len(name) <= 100
    assert "/" not in name and not name.startswith(".")
    assert name not in {"accounts", ".", ".."}


def test_long_domain_sets_are_stored(store: CertificateStore, ca: TestCA) -> None:
    names = [f"host{i}.example.com" for i in range(12)]
    pair = issue(ca, *names)
    store.save(names, pair.cert_pem, pair.key_pem, source="acme")
    assert [p.name for p in store.folder.iterdir() if p.is_dir()] == [entry_name(names)]
    assert store.get(list(reversed(names))) is not None


def test_no_domains_is_an_error(store: CertificateStore, ca: TestCA) -> None:
    pair = issue(ca, "example.com")
    for domains in ([], [""]):
        with pytest.raises(CertificateStoreError, match="at least one"):
            store.save(domains, pair.cert_pem, pair.key_pem, source="acme")


_label = st.text(alphabet="abcz09-*_.+/~\\ \n", min_size=1, max_size=30)


@given(st.lists(_label, min_size=1, max_size=8))
def test_any_domain_set_gives_a_safe_folder_name(domains: list[str]) -> None:
    name = entry_name(domains)
    assert name and len(name.encode()) <= 100
    assert "/" not in name and "\\" not in name and "\n" not in name
    assert not name.startswith(".") and name != "accounts"
    assert entry_name(list(reversed(domains))) == name


@given(
    st.lists(_label, min_size=1, max_size=4),
    st.lists(_label, min_size=1, max_size=4),
)
def test_different_domain_sets_get_different_names(first: list[str], second: list[str]) -> None:
    if {d.lower() for d in first} != {d.lower() for d in second}:
        assert entry_name(first) != entry_name(second)


# -- permissions ------------------------------------------------------------------------------


def test_store_folder_must_be_a_folder(tmp_path: Path) -> None:
    (tmp_path / "certs").write_text("")
    with pytest.raises(FileExistsError):
        CertificateStore(tmp_path / "certs")


def test_folder_is_created_private(tmp_path: Path) -> None:
    store = CertificateStore(tmp_path / "a" / "certs")
    assert store.folder == tmp_path / "a" / "certs"
    assert mode_of(store.folder) == 0o700


def test_existing_wide_folder_is_tightened(tmp_path: Path) -> None:
    folder = tmp_path / "certs"
    folder.mkdir()
    os.chmod(folder, 0o755)
    CertificateStore(folder)
    assert mode_of(folder) == 0o700


@pytest.mark.usefixtures("umask_zero")
def test_modes_with_umask_zero(tmp_path: Path, ca: TestCA) -> None:
    store = CertificateStore(tmp_path / "certs")
    pair = issue(ca, "example.com")
    store.save(["example.com"], pair.cert_pem, pair.key_pem, source="acme")
    store.save_account(DIRECTORY, pair.key_pem, {"uri": "https://acme.example/acct/1"})
    entry = store.folder / "example.com"
    assert mode_of(store.folder) == 0o700
    assert mode_of(entry) == 0o700
    assert mode_of(entry / "key.pem") == 0o600
    assert mode_of(entry / "cert.pem") & 0o022 == 0
    assert mode_of(entry / "meta.json") & 0o022 == 0
    account = next((store.folder / "accounts").iterdir())
    assert mode_of(store.folder / "accounts") == 0o700
    assert mode_of(account) == 0o700
    assert mode_of(account / "account.key") == 0o600


@pytest.mark.usefixtures("umask_zero")
def test_keys_are_never_on_disk_with_a_wider_mode(
    store: CertificateStore, ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every temp file is already in its final mode when it is written and renamed."""
    seen: dict[str, int] = {}
    real_replace, real_write = os.replace, os.write

    def spy_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen[Path(dst).name] = mode_of(Path(src))
        real_replace(src, dst)

    def spy_write(fd: int, data: bytes | memoryview) -> int:
        assert stat.S_IMODE(os.fstat(fd).st_mode) & 0o077 in (0, 0o044)
        return real_write(fd, data)

    monkeypatch.setattr(os, "replace", spy_replace)
    monkeypatch.setattr(os, "write", spy_write)
    pair = issue(ca, "example.com")
    store.save(["example.com"], pair.cert_pem, pair.key_pem, source="acme")
    store.save_account(DIRECTORY, pair.key_pem, {})
    assert seen["key.pem"] == 0o600
    assert seen["account.key"] == 0o600


# -- atomicity --------------------------------------------------------------------------------


def failing_replace(
    victim: str,
) -> Callable[[str | os.PathLike[str], str | os.PathLike[str]], None]:
    """os.replace that fails when ``victim`` is the target (once), like a crash mid-save."""
    real_replace = os.replace
    failed = False

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        nonlocal failed
        if Path(dst).name == victim and not failed:
            failed = True
            raise OSError(28, "No space left on device (simulated)")
        real_replace(src, dst)

    return replace


@pytest.mark.parametrize("victim", ["key.pem", "cert.pem", "meta.json"])
def test_failed_replacement_keeps_the_first_entry(
    store: CertificateStore, ca: TestCA, monkeypatch: pytest.MonkeyPatch, victim: str
) -> None:
    first, second = issue(ca, "example.com"), issue(ca, "example.com")
    saved = store.save(["example.com"], first.cert_pem, first.key_pem, source="acme")

    monkeypatch.setattr(os, "replace", failing_replace(victim))
    with pytest.raises(OSError, match="simulated"):
        store.save(["example.com"], second.cert_pem, second.key_pem, source="acme")
    monkeypatch.undo()

    assert store.load() == ([saved], [])
    assert store.get(["example.com"]) == saved
    assert entry_files(store.folder / "example.com") == {"cert.pem", "key.pem", "meta.json"}


def test_failed_first_save_leaves_no_usable_entry(
    store: CertificateStore, ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    pair = issue(ca, "example.com")
    monkeypatch.setattr(os, "replace", failing_replace("meta.json"))
    with pytest.raises(OSError, match="simulated"):
        store.save(["example.com"], pair.cert_pem, pair.key_pem, source="acme")
    monkeypatch.undo()

    assert store.get(["example.com"]) is None
    entries, problems = store.load()
    assert entries == []
    assert [p.name for p in problems] == ["example.com"]
    store.save(["example.com"], pair.cert_pem, pair.key_pem, source="acme")
    assert store.get(["example.com"]) is not None


def test_stray_temp_files_are_ignored_then_cleaned(store: CertificateStore, ca: TestCA) -> None:
    pair, other = issue(ca, "example.com"), issue(ca, "other.example")
    store.save(["example.com"], pair.cert_pem, pair.key_pem, source="acme")
    entry = store.folder / "example.com"
    (entry / ".key.pem.abc123.tmp").write_text(other.key_pem)
    (entry / "cert.pem.tmp").write_text("half a certif")
    crashed = store.folder / "crashed.example"
    crashed.mkdir()
    (crashed / ".cert.pem.0000.tmp").write_text("x")

    entries, problems = store.load()
    assert [e.domains for e in entries] == [("example.com",)]
    assert problems == [StoreProblem("crashed.example", "meta.json missing (half-written entry)")]

    store.save(["other.example"], other.cert_pem, other.key_pem, source="acme")
    assert entry_files(entry) == {"cert.pem", "key.pem", "meta.json"}
    assert not crashed.exists()
    assert store.load()[1] == []


def test_readers_never_see_a_half_done_save(store: CertificateStore, ca: TestCA) -> None:
    pairs = [issue(ca, "example.com", key_type=t) for t in ("ec", "rsa")]
    store.save(["example.com"], pairs[0].cert_pem, pairs[0].key_pem, source="acme")
    stop = threading.Event()
    seen: list[tuple[list[StoredCertificate], list[StoreProblem]]] = []

    def read() -> None:
        while not stop.is_set():
            seen.append(store.load())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(30):
            pair = pairs[i % 2]
            store.save(["example.com"], pair.cert_pem, pair.key_pem, source="acme")
    finally:
        stop.set()
        reader.join()
    assert seen
    assert all(len(entries) == 1 and problems == [] for entries, problems in seen)


# -- corrupt entries --------------------------------------------------------------------------


def _truncate_cert(entry: Path, ca: TestCA) -> None:
    text = (entry / "cert.pem").read_text()
    (entry / "cert.pem").write_text(text[: len(text) // 3])
    rehash(entry)


def _garbage_key(entry: Path, ca: TestCA) -> None:
    (entry / "key.pem").write_text(
        "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n"
    )
    rehash(entry)


def _foreign_key(entry: Path, ca: TestCA) -> None:
    (entry / "key.pem").write_text(issue(ca, "example.com").key_pem)
    rehash(entry)


def _unhashed_change(entry: Path, ca: TestCA) -> None:
    (entry / "key.pem").write_text(issue(ca, "example.com").key_pem)


def _other_certificate(entry: Path, ca: TestCA) -> None:
    other = issue(ca, "other.example")
    (entry / "cert.pem").write_text(other.cert_pem)
    (entry / "key.pem").write_text(other.key_pem)
    rehash(entry)
    not_after = x509.load_pem_x509_certificate(other.cert_pem.encode()).not_valid_after_utc
    edit_meta(entry, not_after=not_after.isoformat())


def _wrong_not_after(entry: Path, ca: TestCA) -> None:
    edit_meta(entry, not_after="2099-01-01T00:00:00+00:00")


def _missing_meta(entry: Path, ca: TestCA) -> None:
    (entry / "meta.json").unlink()


def _missing_cert(entry: Path, ca: TestCA) -> None:
    (entry / "cert.pem").unlink()


def _garbage_meta(entry: Path, ca: TestCA) -> None:
    (entry / "meta.json").write_text("{not json")


def _meta_without_hashes(entry: Path, ca: TestCA) -> None:
    meta = json.loads((entry / "meta.json").read_text())
    del meta["key_sha256"]
    (entry / "meta.json").write_text(json.dumps(meta))


def _meta_not_an_object(entry: Path, ca: TestCA) -> None:
    (entry / "meta.json").write_text("[1, 2]")


def _meta_bad_time(entry: Path, ca: TestCA) -> None:
    edit_meta(entry, stored_at="yesterday")


def _meta_other_domains(entry: Path, ca: TestCA) -> None:
    edit_meta(entry, domains=["other.example"])


def _meta_domains_not_a_list(entry: Path, ca: TestCA) -> None:
    edit_meta(entry, domains="example.com")


def _meta_naive_time(entry: Path, ca: TestCA) -> None:
    edit_meta(entry, stored_at="2024-01-01T00:00:00")


def _binary_cert(entry: Path, ca: TestCA) -> None:
    (entry / "cert.pem").write_bytes(b"\xff\xfe\x00")
    rehash(entry)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_truncate_cert, "cert.pem does not hold a valid PEM certificate"),
        (_garbage_key, "key.pem does not hold an unencrypted PEM private key"),
        (_foreign_key, "key does not match the certificate"),
        (
            _unhashed_change,
            "key.pem does not match its hash in meta.json (half-written or corrupt entry)",
        ),
        (_other_certificate, "the certificate does not cover example.com"),
        (_wrong_not_after, "not_after in meta.json differs from the certificate's"),
        (_missing_meta, "meta.json missing (half-written entry)"),
        (_missing_cert, "cert.pem missing"),
        (_garbage_meta, "meta.json is not valid JSON"),
        (_meta_without_hashes, "meta.json lacks 'key_sha256'"),
        (_meta_not_an_object, "meta.json is not a JSON object"),
        (_meta_bad_time, "meta.json field 'stored_at' is not an ISO 8601 time"),
        (_meta_other_domains, "the folder name does not match the domains in meta.json"),
        (_meta_domains_not_a_list, "meta.json field 'domains' is not a list"),
        (_meta_naive_time, "meta.json field 'stored_at' has no time zone"),
        (_binary_cert, "cert.pem is not PEM text"),
    ],
)
def test_corrupt_entries_are_reported_not_returned(
    store: CertificateStore, ca: TestCA, damage: Callable[[Path, TestCA], None], reason: str
) -> None:
    good = issue(ca, "good.example")
    store.save(["good.example"], good.cert_pem, good.key_pem, source="acme")
    pair = issue(ca, "example.com")
    store.save(["example.com"], pair.cert_pem, pair.key_pem, source="acme")
    entry = store.folder / "example.com"
    key_pem = (entry / "key.pem").read_text()

    damage(entry, ca)

    entries, problems = store.load()
    assert [e.domains for e in entries] == [("good.example",)]
    assert problems == [StoreProblem("example.com", reason)]
    assert store.get(["example.com"]) is None
    for text in (reason, repr(problems)):
        assert "PRIVATE KEY" not in text and key_pem not in text


# -- validation on save -----------------------------------------------------------------------


def test_save_refuses_what_load_would_reject(store: CertificateStore, ca: TestCA) -> None:
    pair, other = issue(ca, "example.com"), issue(ca, "other.example")
    cases: list[tuple[list[str], str, str, str]] = [
        (["example.com"], pair.cert_pem, other.key_pem, "does not match the certificate"),
        (["other.example"], pair.cert_pem, pair.key_pem, "does not cover other.example"),
        (["example.com"], pair.cert_pem[:200], pair.key_pem, "not a valid PEM certificate"),
        (["example.com"], pair.cert_pem, pair.key_pem[:100], "not an unencrypted PEM private key"),
        (["example.com"], pair.cert_pem + pair.key_pem, pair.key_pem, "contains a private key"),
    ]
    for domains, cert_pem, key_pem, message in cases:
        with pytest.raises(CertificateStoreError, match=message) as raised:
            store.save(domains, cert_pem, key_pem, source="acme")
        assert "PRIVATE KEY" not in str(raised.value)
        assert raised.value.__cause__ is None
        assert raised.value.__context__ is None or raised.value.__suppress_context__
    assert store.load() == ([], [])


def test_encrypted_keys_are_refused(store: CertificateStore) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    ).decode()
    with pytest.raises(CertificateStoreError, match="unencrypted"):
        store.save_account(DIRECTORY, encrypted, {})


def test_reprs_never_show_the_key(store: CertificateStore, ca: TestCA) -> None:
    pair = issue(ca, "example.com")
    saved = store.save(["example.com"], pair.cert_pem, pair.key_pem, source="acme")
    for text in (repr(saved), str(saved), repr(saved.pair), repr(store), repr(store.load())):
        assert "PRIVATE KEY" not in text
        assert pair.key_pem.splitlines()[1] not in text


# -- accounts ---------------------------------------------------------------------------------


def test_accounts_round_trip_per_directory(store: CertificateStore) -> None:
    staging = "https://acme-staging.example/directory"
    key_a, key_b = account_key(), account_key()
    assert store.load_account(DIRECTORY) is None

    store.save_account(
        DIRECTORY, key_a, {"uri": "https://acme.example/acct/1", "email": "ops@example.com"}
    )
    store.save_account(staging, key_b, {"uri": "https://acme-staging.example/acct/9"})

    assert store.load_account(DIRECTORY) == (
        key_a,
        {"uri": "https://acme.example/acct/1", "email": "ops@example.com"},
    )
    assert store.load_account(staging) == (key_b, {"uri": "https://acme-staging.example/acct/9"})
    folders = sorted(p.name for p in (store.folder / "accounts").iterdir())
    assert len(folders) == 2 and all(len(n) == 16 and int(n, 16) >= 0 for n in folders)
    # accounts are not certificates
    assert store.load() == ([], [])


def test_account_is_replaced(store: CertificateStore) -> None:
    store.save_account(DIRECTORY, account_key(), {"uri": "one"})
    key = account_key()
    store.save_account(DIRECTORY, key, {"uri": "two"})
    assert store.load_account(DIRECTORY) == (key, {"uri": "two"})
    [folder] = (store.folder / "accounts").iterdir()
    assert entry_files(folder) == {"account.key", "account.json"}


def test_half_written_account_is_absent(
    store: CertificateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "replace", failing_replace("account.json"))
    with pytest.raises(OSError, match="simulated"):
        store.save_account(DIRECTORY, account_key(), {"uri": "one"})
    monkeypatch.undo()
    assert store.load_account(DIRECTORY) is None


def test_corrupt_account_is_an_error(store: CertificateStore) -> None:
    key = account_key()
    store.save_account(DIRECTORY, key, {"uri": "one"})
    [folder] = (store.folder / "accounts").iterdir()
    (folder / "account.key").write_text(account_key())
    with pytest.raises(CertificateStoreError, match="does not match the hash") as raised:
        store.load_account(DIRECTORY)
    assert "PRIVATE KEY" not in str(raised.value)
    (folder / "account.json").write_text("nope")
    with pytest.raises(CertificateStoreError, match="not JSON"):
        store.load_account(DIRECTORY)
    (folder / "account.json").write_text("[]")
    with pytest.raises(CertificateStoreError, match="lacks 'meta'"):
        store.load_account(DIRECTORY)
    (folder / "account.key").unlink()
    with pytest.raises(CertificateStoreError, match="account.key is missing"):
        store.load_account(DIRECTORY)


def test_account_of_another_directory_is_not_returned(store: CertificateStore) -> None:
    store.save_account(DIRECTORY, account_key(), {"uri": "one"})
    [folder] = (store.folder / "accounts").iterdir()
    record = json.loads((folder / "account.json").read_text())
    record["directory_url"] = "https://elsewhere.example/directory"
    (folder / "account.json").write_text(json.dumps(record))
    assert store.load_account(DIRECTORY) is None


def test_account_meta_must_be_json(store: CertificateStore) -> None:
    with pytest.raises(CertificateStoreError, match="JSON"):
        store.save_account(DIRECTORY, account_key(), {"when": datetime.datetime.now(UTC)})
    assert store.load_account(DIRECTORY) is None
