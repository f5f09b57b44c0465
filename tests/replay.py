"""The replay discipline for sans-I/O parsers: whole, byte by byte, with trailing data."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

import pytest

Buffer = bytes | bytearray | memoryview


class Parsed(Protocol):
    @property
    def length(self) -> int: ...


R = TypeVar("R", bound=Parsed)
E = TypeVar("E", bound=Exception)


def replay_ok(parse: Callable[[Buffer], R | None], data: bytes, trailing: Sequence[bytes]) -> R:
    """Every proper prefix needs more bytes; the whole gives the result, also with trailing data
    and as bytearray or memoryview."""
    for end in range(len(data)):
        assert parse(data[:end]) is None, f"prefix of {end} bytes"
    result = parse(data)
    assert result is not None
    assert result.length == len(data)
    for extra in trailing:
        assert parse(data + extra) == result
    assert parse(bytearray(data)) == result
    assert parse(memoryview(data)) == result
    return result


def replay_error(
    parse: Callable[[Buffer], object], data: bytes, trailing: Sequence[bytes], error: type[E]
) -> E:
    """No prefix gives a result, and the whole raises ``error`` (also with trailing data)."""
    for end in range(len(data)):
        try:
            assert parse(data[:end]) is None, f"prefix of {end} bytes"
        except error:
            pass
    for extra in trailing:
        with pytest.raises(error):
            parse(data + extra)
    with pytest.raises(error) as info:
        parse(data)
    return info.value
