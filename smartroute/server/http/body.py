"""Moving message bodies between two streams with backpressure, never buffering them whole.

Each copy takes a ``prefix``: bytes for ``sink`` that go before the body (the message head).
It is sent in one write with the body bytes that are already buffered, so a small message
costs one ``send``; when no body byte is there yet, the prefix goes out alone before the wait,
so the peer never waits for a head because the body is slow.
"""

from __future__ import annotations

from smartroute.errors import BodyCut as BodyCut  # lives in smartroute.errors now
from smartroute.protocols.chunked import LAST_CHUNK, ChunkedDecoder, encode_chunk
from smartroute.protocols.http_response import BodyFraming
from smartroute.server.http.stream import Stream

CHUNK = 256 * 1024


async def _more(source: Stream, sink: Stream | None, prefix: bytes) -> None:
    """Wait for body bytes; ``prefix`` goes to ``sink`` before the wait."""
    if prefix and sink is not None:
        sink.write(prefix)
    if not await source.fill():
        raise BodyCut("the connection closed before the end of the body")


async def copy_length(
    source: Stream,
    sink: Stream | None,
    length: int,
    *,
    chunked: bool = False,
    prefix: bytes = b"",
) -> None:
    """Move exactly ``length`` bytes; ``sink`` None discards them; ``chunked`` re-frames them."""
    end = LAST_CHUNK if chunked and sink is not None else b""
    while length > 0:
        if not source.buffer:
            await _more(source, sink, prefix)
            prefix = b""
        count = min(length, len(source.buffer), CHUNK)
        length -= count
        if sink is None:
            source.skip(count)
            continue
        data = source.consume(count)
        if chunked:
            data = encode_chunk(data)
            if length == 0:
                data += end
                end = b""
        if prefix:
            data = prefix + data
            prefix = b""
        sink.write(data)
        if sink.blocked:
            await sink.drain()
    if sink is not None and (prefix or end):
        sink.write(prefix + end)


async def copy_chunked(
    source: Stream, sink: Stream | None, *, chunked: bool = True, prefix: bytes = b""
) -> None:
    """Decode a chunked body from ``source``; write it re-chunked (or plain) to ``sink``.

    Everything decoded from one read goes out in one write, the last chunk included.
    """
    decoder = ChunkedDecoder()
    while not decoder.done:
        if not source.buffer:
            await _more(source, sink, prefix)
            prefix = b""
        pieces, used = decoder.feed(source.buffer)
        source.skip(used)  # the pieces of a bytearray are copies
        if sink is None:
            continue
        parts = [prefix] if prefix else []
        prefix = b""
        parts += [encode_chunk(piece) if chunked else bytes(piece) for piece in pieces if piece]
        if chunked and decoder.done:
            parts.append(LAST_CHUNK)
        if parts:
            sink.write(parts[0] if len(parts) == 1 else b"".join(parts))
        if sink.blocked:
            await sink.drain()


async def copy_until_close(
    source: Stream, sink: Stream, *, chunked: bool, prefix: bytes = b""
) -> None:
    """Move everything until ``source`` closes (a response framed by closing the connection).

    Only an orderly close ends such a body: a connection lost with an error (a reset, a TLS
    connection closed without close_notify) may have cut it, so that is a :class:`BodyCut`.
    """
    while True:
        if not source.buffer:
            if prefix:
                sink.write(prefix)
                prefix = b""
            if not await source.fill():
                break
        data = source.consume(CHUNK)
        if not data:
            continue
        if chunked:
            data = encode_chunk(data)
        if prefix:
            data = prefix + data
            prefix = b""
        sink.write(data)
        if sink.blocked:
            await sink.drain()
    if source.error is not None:
        raise BodyCut(f"the connection was lost before the end of the body: {source.error}")
    if chunked:
        sink.write(LAST_CHUNK)


async def copy_body(
    source: Stream,
    sink: Stream | None,
    framing: BodyFraming,
    *,
    chunked_out: bool,
    prefix: bytes = b"",
) -> None:
    """Move a body framed as ``framing``; ``chunked_out`` sends it chunked to ``sink``, after
    ``prefix`` (see the module's docstring)."""
    kind = framing.kind
    if kind == "length":
        await copy_length(source, sink, framing.length, chunked=chunked_out, prefix=prefix)
    elif kind == "chunked":
        await copy_chunked(source, sink, chunked=chunked_out, prefix=prefix)
    elif kind == "close" and sink is not None:
        await copy_until_close(source, sink, chunked=chunked_out, prefix=prefix)
    elif prefix and sink is not None:
        sink.write(prefix)
