"""A message head goes out in one write with the body bytes already buffered, and alone
before any wait for body bytes that have not arrived (a slow body never holds back a head)."""

from __future__ import annotations

import asyncio
from typing import Any

from support import async_test

from smartroute.protocols.http_response import BodyFraming
from smartroute.server.http.body import copy_body
from smartroute.server.http.stream import Stream


class Recorder(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def resume_reading(self) -> None:
        pass


def pair() -> tuple[Stream, Stream, Recorder]:
    source, sink, transport = Stream(), Stream(), Recorder()
    source.connection_made(Recorder())
    sink.connection_made(transport)
    return source, sink, transport


@async_test()
async def test_head_and_buffered_body_are_one_write() -> None:
    for framing, body, sent in [
        (BodyFraming("length", 5), b"hello", b"hello"),
        (BodyFraming("length", 0), b"", b""),
        (BodyFraming("chunked"), b"5\r\nhello\r\n0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
        (BodyFraming("none"), b"", b""),
    ]:
        source, sink, transport = pair()
        source.data_received(body + b"NEXT")  # the next message stays buffered
        await copy_body(
            source, sink, framing, chunked_out=framing.kind == "chunked", prefix=b"HEAD"
        )
        assert transport.writes == [b"HEAD" + sent], framing
        assert source.buffer == b"NEXT"


@async_test()
async def test_the_head_is_not_held_back_by_a_body_still_to_come() -> None:
    for framing in (BodyFraming("length", 5), BodyFraming("chunked")):
        source, sink, transport = pair()
        copying = asyncio.ensure_future(
            copy_body(source, sink, framing, chunked_out=framing.kind == "chunked", prefix=b"H")
        )
        await asyncio.sleep(0.01)
        assert transport.writes == [b"H"], framing
        source.data_received(b"hello" if framing.kind == "length" else b"5\r\nhello\r\n0\r\n\r\n")
        await asyncio.wait_for(copying, 5)
        assert b"".join(transport.writes[1:]) in (b"hello", b"5\r\nhello\r\n0\r\n\r\n")
    source, sink, transport = pair()
    source.data_received(b"abc")
    closing = asyncio.ensure_future(
        copy_body(source, sink, BodyFraming("close"), chunked_out=True, prefix=b"H")
    )
    await asyncio.sleep(0.01)
    assert transport.writes == [b"H3\r\nabc\r\n"]
    source.eof_received()
    source.connection_lost(None)
    await asyncio.wait_for(closing, 5)
    assert transport.writes[-1] == b"0\r\n\r\n"
