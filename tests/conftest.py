from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from support import Finished, TestCA  # noqa: E402

from smartroute.server.stats import ConnectionRecord, StatsBook  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


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
