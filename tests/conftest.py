"""Shared fixtures, and the one place the test helpers are imported from.

The test folders mirror the package: tests/protocols, tests/routing, tests/server,
tests/server/http and tests/certs test the modules of the same folders (a subpackage with one
test file, such as routing/validation or server/workers, is tested from its parent's folder);
tests/system holds the whole-proxy suites (abuse, faults, churn, soak, lifecycle, ...), and
tests/ itself the tests of cli.py, settings.py and helpers/. The shared helpers (support,
http_backend, pebble, redis_server, acme_sites, cert_factory, held_dns, leaks, replay,
desync_peers) and fixtures/ stay in tests/, which this file
puts on sys.path, so every test file, at any depth, does ``from support import ...``. Paths to
fixtures/ and examples/ come from support (FIXTURES, EXAMPLES), never from a test file's own
location. Test file basenames must stay unique across folders (pytest's default import mode).
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from http_backend import Backend, http_backend  # noqa: E402
from pebble import Pebble, free_port, run_pebble  # noqa: E402
from support import Finished, TestCA, require_tool  # noqa: E402

from smartroute.server import accept  # noqa: E402
from smartroute.server.stats import ConnectionRecord, StatsBook  # noqa: E402


@pytest.fixture(scope="session")
def ca() -> TestCA:
    return TestCA()


@pytest.fixture
def finished(monkeypatch: pytest.MonkeyPatch) -> Finished:
    """Every record the stats book folds in (each once) while the test runs."""
    book = Finished()
    original = StatsBook.finished

    def spy(self: StatsBook, record: ConnectionRecord) -> None:
        first = record in self.active
        original(self, record)
        if first:
            book.add(record)

    monkeypatch.setattr(StatsBook, "finished", spy)
    return book


@pytest.fixture
def lane_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The ports of the connections the accept step handed to an asyncio transport while the
    test ran: empty when every connection stayed on the fast lane."""
    handed: list[int] = []
    original = accept.adopt

    def recording(runtime: Any, sock: socket.socket, record: ConnectionRecord, *rest: Any) -> None:
        handed.append(record.port)
        original(runtime, sock, record, *rest)

    monkeypatch.setattr(accept, "adopt", recording)
    yield handed


@pytest.fixture
def pebble(tmp_path: Path) -> Iterator[Pebble]:
    """A running Pebble with pebble-challtestsrv as its DNS (see tests/pebble.py)."""
    require_tool("pebble")
    require_tool("pebble-challtestsrv")
    (tmp_path / "pebble").mkdir()
    with run_pebble(tmp_path / "pebble", http_port=free_port(), tls_port=free_port()) as ca:
        yield ca


@pytest.fixture
def backend() -> Iterator[Backend]:
    with http_backend("site") as server:
        yield server
