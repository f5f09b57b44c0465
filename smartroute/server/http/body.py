"""Moving message bodies between two streams with backpressure, never buffering them whole."""

from __future__ import annotations

from smartroute.protocols.chunked import LAST_CHUNK, ChunkedDecoder, encode_chunk
from smartroute.protocols.http_response import BodyFraming
from smartroute.server.http.stream import Stream

CHUNK = 256 * 1024


class BodyCut(ConnectionError):
    """The sender closed its connection before the body's end."""


async def _more(source: Stream) -> None:
    if not source.buffer and not await source.fill():
        raise BodyCut("the connection closed before the end of the body")


async def copy_length(
    source: Stream, sink: Stream | None, length: int, *, chunked: bool = False
) -> None:
    """Move exactly ``length`` bytes; ``sink`` None discards them; ``chunked`` re-frames them."""
    while length > 0:
        await _more(source)
        data = source.consume(min(length, len(source.buffer), CHUNK))
        length -= len(data)
        if sink is not None:
            sink.write(encode_chunk(data) if chunked else data)
            await sink.drain()
    if sink is not None and chunked:
        sink.write(LAST_CHUNK)


async def copy_chunked(source: Stream, sink: Stream | None, *, chunked: bool = True) -> None:
    """Decode a chunked body from ``source``; write it re-chunked (or plain) to ``sink``."""
    decoder = ChunkedDecoder()
    while not decoder.done:
        await _more(source)
        pieces, used = decoder.feed(source.buffer)
        source.consume(used)
        if sink is not None:
            for piece in pieces:
                if piece:
                    sink.write(encode_chunk(piece) if chunked else bytes(piece))
            await sink.drain()
    if sink is not None and chunked:
        sink.write(LAST_CHUNK)


async def copy_until_close(source: Stream, sink: Stream, *, chunked: bool) -> None:
    """Move everything until ``source`` closes (a response framed by closing the connection).

    Only an orderly close ends such a body: a connection lost with an error (a reset, a TLS
    connection closed without close_notify) may have cut it, so that is a :class:`BodyCut`.
    """
    while source.buffer or await source.fill():
        data = source.consume(CHUNK)
        if data:
            sink.write(encode_chunk(data) if chunked else data)
            await sink.drain()
    if source.error is not None:
        raise BodyCut(f"the connection was lost before the end of the body: {source.error}")
    if chunked:
        sink.write(LAST_CHUNK)


async def copy_body(
    source: Stream, sink: Stream | None, framing: BodyFraming, *, chunked_out: bool
) -> None:
    """Move a body framed as ``framing``; ``chunked_out`` sends it chunked to ``sink``."""
    if framing.kind == "length":
        await copy_length(source, sink, framing.length, chunked=chunked_out)
    elif framing.kind == "chunked":
        await copy_chunked(source, sink, chunked=chunked_out)
    elif framing.kind == "close" and sink is not None:
        await copy_until_close(source, sink, chunked=chunked_out)
