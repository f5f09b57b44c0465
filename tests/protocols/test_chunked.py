"""The chunked body decoder: a table replayed whole, byte by byte and with trailing data, limits,
and properties (any bytes; encode-then-decode with random split points)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smartroute.errors import HttpParseError
from smartroute.protocols.chunked import LAST_CHUNK, ChunkedDecoder, encode_chunk

# What follows the body must be left unconsumed: the next request, junk, more chunk-like bytes.
TRAILING = [b"", b"GET / HTTP/1.1\r\n\r\n", b"0\r\n\r\n", b"\r\n", b"\x00\xff\n"]

Trailers = list[tuple[str, str]]


def decode_whole(data: bytes | bytearray | memoryview) -> tuple[bytes, int, ChunkedDecoder]:
    decoder = ChunkedDecoder()
    pieces, used = decoder.feed(data)
    return b"".join(pieces), used, decoder


def decode_bytewise(data: bytes) -> tuple[bytes, int, ChunkedDecoder]:
    """Feed one byte at a time; before the end every byte is used, after it none is."""
    decoder = ChunkedDecoder()
    payload = bytearray()
    used = 0
    for index in range(len(data)):
        was_done = decoder.done
        pieces, n = decoder.feed(data[index : index + 1])
        assert n == (0 if was_done else 1), f"byte {index}"
        assert not (was_done and pieces)
        for piece in pieces:
            payload += piece
        used += n
    return bytes(payload), used, decoder


def replay(body: bytes) -> tuple[bytes, Trailers]:
    """The whole body, byte by byte, with trailing data and as bytearray or memoryview all give
    the same payload and trailers, use exactly the body and nothing after it."""
    payload, used, decoder = decode_whole(body)
    assert (used, decoder.done) == (len(body), True)
    trailers = decoder.trailers
    for trailing in TRAILING:
        for data in (body + trailing, bytearray(body + trailing), memoryview(body + trailing)):
            assert decode_whole(data)[:2] == (payload, len(body))
        got, used, decoder = decode_bytewise(body + trailing)
        assert (got, used, decoder.done, decoder.trailers) == (payload, len(body), True, trailers)
    for end in range(len(body)):  # every proper prefix is used whole and is not the end
        _, used, decoder = decode_whole(body[:end])
        assert (used, decoder.done) == (end, False)
    return payload, trailers


def replay_error(body: bytes) -> HttpParseError:
    """The whole raises, also with trailing data, and byte by byte before the body is done."""
    for trailing in TRAILING:
        with pytest.raises(HttpParseError):
            decode_whole(body + trailing)
        with pytest.raises(HttpParseError):
            decode_bytewise(body + trailing)
    decoder = ChunkedDecoder()
    with pytest.raises(HttpParseError) as info:
        decoder.feed(body)
    with pytest.raises(HttpParseError, match=re.escape(str(info.value))):
        decoder.feed(b"0\r\n\r\n")  # a failed decoder stays failed
    return info.value


GOOD: dict[str, tuple[bytes, bytes, Trailers]] = {  # body, payload, trailers
    "empty body": (b"0\r\n\r\n", b"", []),
    "one chunk": (b"5\r\nhello\r\n0\r\n\r\n", b"hello", []),
    "several chunks": (b"5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n", b"hello world", []),
    "hex digits in both cases": (
        b"a\r\n0123456789\r\nB\r\nabcdefghijk\r\n0\r\n\r\n",
        b"0123456789abcdefghijk",
        [],
    ),
    "leading zeros": (b"0005\r\nhello\r\n000\r\n\r\n", b"hello", []),
    "chunk data holding CRLF and digits": (b"5\r\n\r\n0\r\n\r\n0\r\n\r\n", b"\r\n0\r\n", []),
    "extension": (b"5;name=value\r\nhello\r\n0;last\r\n\r\n", b"hello", []),
    "extensions with spaces and quotes": (
        b'5 ; a = "q;x" ; b\r\nhello\r\n0\t;z\r\n\r\n',
        b"hello",
        [],
    ),
    "whitespace after the size": (b"5 \t\r\nhello\r\n0 \r\n\r\n", b"hello", []),
    "obs-text in an extension": (b"5;x=\xe9\r\nhello\r\n0\r\n\r\n", b"hello", []),
    "trailers": (
        b"5\r\nhello\r\n0\r\nExpires: never\r\nX-Sum:  \tabc \r\nX-Empty:\r\n\r\n",
        b"hello",
        [("Expires", "never"), ("X-Sum", "abc"), ("X-Empty", "")],
    ),
    "latin-1 trailer": (b"0\r\nX-Name: caf\xe9\r\n\r\n", b"", [("X-Name", "caf\xe9")]),
    "large chunk": (b"1000\r\n" + b"x" * 4096 + b"\r\n0\r\n\r\n", b"x" * 4096, []),
}


@pytest.mark.parametrize("case", list(GOOD), ids=list(GOOD))
def test_good(case: str) -> None:
    body, payload, trailers = GOOD[case]
    assert replay(body) == (payload, trailers)


BAD: dict[str, tuple[bytes, str]] = {  # body, a piece of the error message; always 400
    "empty size line": (b"\r\nhello\r\n0\r\n\r\n", "malformed chunk-size line"),
    "not hex": (b"x\r\n", "malformed chunk-size line"),
    "minus sign": (b"-5\r\nhello\r\n0\r\n\r\n", "malformed chunk-size line"),
    "plus sign": (b"+5\r\nhello\r\n0\r\n\r\n", "malformed chunk-size line"),
    "0x prefix": (b"0x5\r\nhello\r\n0\r\n\r\n", "malformed chunk-size line"),
    "underscore": (b"1_0\r\n", "malformed chunk-size line"),
    "space before the size": (b" 5\r\nhello\r\n0\r\n\r\n", "malformed chunk-size line"),
    "word after the size": (b"5 x\r\nhello\r\n0\r\n\r\n", "malformed chunk-size line"),
    "extension without size": (b";x\r\n", "malformed chunk-size line"),
    "control in an extension": (b"5;\x01\r\nhello\r\n0\r\n\r\n", "malformed chunk-size line"),
    "bare CR in size line": (b"5\rx\r\nhello\r\n0\r\n\r\n", "malformed chunk-size line"),
    "CR CR LF": (b"5\r\r\nhello\r\n0\r\n\r\n", "malformed chunk-size line"),
    "bare LF after size": (b"5\nhello\r\n0\r\n\r\n", "does not end in CRLF"),
    "bare LF after last size": (b"0\n\r\n", "does not end in CRLF"),
    "size of 2**63": (b"8000000000000000\r\n", "too large"),
    "size of 17 hex digits": (b"10000000000000000\r\n", "too large"),
    "data followed by LF": (b"5\r\nhello\n0\r\n\r\n", "not followed by CRLF"),
    "data followed by CR CR": (b"5\r\nhello\r\r\n0\r\n\r\n", "not followed by CRLF"),
    "data too long": (b"5\r\nhello!\r\n0\r\n\r\n", "not followed by CRLF"),
    "data too short": (b"5\r\nhell\r\n0\r\n\r\n", "not followed by CRLF"),
    "missing last chunk": (b"5\r\nhello\r\n\r\n", "malformed chunk-size line"),
    "trailer without colon": (b"0\r\nX-T 1\r\n\r\n", "malformed trailer line"),
    "trailer with space before colon": (b"0\r\nX-T : 1\r\n\r\n", "malformed trailer line"),
    "trailer obs-fold": (b"0\r\nX-T: 1\r\n folded\r\n\r\n", "obsolete line folding"),
    "trailer bare LF": (b"0\r\nX-T: 1\n\r\n", "does not end in CRLF"),
    "final bare LF": (b"0\r\n\n", "does not end in CRLF"),
    "trailer NUL": (b"0\r\nX-T: a\x00b\r\n\r\n", "invalid byte"),
    "trailer bare CR": (b"0\r\nX-T: a\rb\r\n\r\n", "invalid byte"),
    "trailer CR CR LF": (b"0\r\nX-T: a\r\r\n\r\n", "invalid byte"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad(case: str) -> None:
    body, message = BAD[case]
    error = replay_error(body)
    assert (error.status, message in str(error)) == (400, True), error


def test_largest_chunk_size_is_accepted() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(b"7fffffffffffffff\r\nabc") == ([b"abc"], 21)
    assert not decoder.done


def test_leading_zeros_do_not_count_towards_the_size() -> None:
    decoder = ChunkedDecoder()
    pieces, used = decoder.feed(b"0" * 100 + b"7fffffffffffffff\r\nabc")
    assert (pieces, used, decoder.done) == ([b"abc"], 121, False)


def test_error_status_is_configurable() -> None:
    decoder = ChunkedDecoder(error_status=502)
    with pytest.raises(HttpParseError) as info:
        decoder.feed(b"zz\r\n")
    assert info.value.status == 502
    with pytest.raises(HttpParseError) as info:
        decoder.feed(b"")
    assert info.value.status == 502


def test_feeding_after_the_end_uses_nothing() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(b"3\r\nabc\r\n0\r\n\r\nnext") == ([b"abc"], 13)
    assert decoder.done
    assert decoder.feed(b"4\r\nmore\r\n") == ([], 0)
    assert decoder.feed(b"") == ([], 0)


def test_empty_feed() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(b"") == ([], 0)
    assert not decoder.done


# --- memory stays bounded ------------------------------------------------------------------


@pytest.mark.parametrize("limit", [8, 100, 4096])
def test_chunk_size_line_limit_is_exact(limit: int) -> None:
    line = b"5;" + b"x" * (limit - 4) + b"\r\n"
    assert len(line) == limit
    ok = line + b"hello\r\n0\r\n\r\n"
    decoder = ChunkedDecoder(max_chunk_line=limit)
    assert decoder.feed(ok) == ([b"hello"], len(ok))
    bytewise = ChunkedDecoder(max_chunk_line=limit)
    for index in range(len(ok)):
        bytewise.feed(ok[index : index + 1])
        assert len(bytewise._line) < limit  # the internal buffer is what must stay bounded
    assert bytewise.done
    too_long = b"5;" + b"x" * (limit - 3) + b"\r\n"
    with pytest.raises(HttpParseError, match=f"chunk-size line exceeds {limit} bytes"):
        ChunkedDecoder(max_chunk_line=limit).feed(too_long)


def test_endless_size_line_fails_at_the_limit() -> None:
    decoder = ChunkedDecoder(max_chunk_line=100)
    assert decoder.feed(b"5;" + b"x" * 97) == ([], 99)
    with pytest.raises(HttpParseError, match="exceeds 100 bytes"):
        decoder.feed(b"x")


def test_trailer_limit_is_exact() -> None:
    section = b"X-A: " + b"a" * 20 + b"\r\nX-B: b\r\n\r\n"
    body = b"0\r\n" + section
    decoder = ChunkedDecoder(max_trailers=len(section))
    assert decoder.feed(body) == ([], len(body))
    assert decoder.trailers == [("X-A", "a" * 20), ("X-B", "b")]
    bytewise = ChunkedDecoder(max_trailers=len(section))
    for index in range(len(body)):
        bytewise.feed(body[index : index + 1])
    assert bytewise.done
    for feed_bytewise in (False, True):
        small = ChunkedDecoder(max_trailers=len(section) - 1)
        with pytest.raises(HttpParseError, match=f"trailer section exceeds {len(section) - 1}"):
            if feed_bytewise:
                for index in range(len(body)):
                    small.feed(body[index : index + 1])
            else:
                small.feed(body)


def test_many_small_trailers_count_towards_the_limit() -> None:
    decoder = ChunkedDecoder(max_trailers=1000)
    with pytest.raises(HttpParseError, match="trailer section exceeds 1000"):
        decoder.feed(b"0\r\n" + b"X: y\r\n" * 200)


def test_a_bad_size_line_fails_before_its_end() -> None:
    with pytest.raises(HttpParseError, match="malformed chunk-size line"):
        ChunkedDecoder().feed(b"zz")


# --- pieces are slices of the input --------------------------------------------------------


def test_pieces_of_a_memoryview_are_views_of_it() -> None:
    data = bytearray(b"5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n")
    view = memoryview(data)
    pieces, used = ChunkedDecoder().feed(view)
    assert used == len(data)
    assert all(isinstance(piece, memoryview) and piece.obj is data for piece in pieces)
    assert [bytes(piece) for piece in pieces] == [b"hello", b"abc"]
    for piece in pieces:
        assert isinstance(piece, memoryview)
        piece.release()
    view.release()


def test_pieces_of_a_bytearray_do_not_pin_it() -> None:
    buffer = bytearray(b"5\r\nhello\r\n0\r\n\r\nnext")
    pieces, used = ChunkedDecoder().feed(buffer)
    del buffer[:used]  # would raise BufferError if a piece were a view of it
    assert (pieces, buffer) == ([b"hello"], bytearray(b"next"))


def test_a_whole_bytes_chunk_is_not_copied() -> None:
    decoder = ChunkedDecoder()
    decoder.feed(b"a\r\n")
    data = b"0123456789"
    pieces, used = decoder.feed(data)
    assert used == 10
    assert pieces[0] is data


def test_encode_chunk() -> None:
    assert encode_chunk(b"hello") == b"5\r\nhello\r\n"
    assert encode_chunk(bytearray(b"x" * 255)) == b"ff\r\n" + b"x" * 255 + b"\r\n"
    assert encode_chunk(memoryview(b"abc")) == b"3\r\nabc\r\n"
    assert encode_chunk(b"") == b""  # a zero-size chunk would end the body
    assert LAST_CHUNK == b"0\r\n\r\n"


# --- properties ----------------------------------------------------------------------------


def feed_in_pieces(data: bytes, cuts: list[int]) -> tuple[bytes, int, ChunkedDecoder]:
    """Feed ``data`` split at ``cuts``, checking each feed uses all of it until the end."""
    decoder = ChunkedDecoder()
    payload = bytearray()
    used = 0
    bounds = [0, *sorted(cut % (len(data) + 1) for cut in cuts), len(data)]
    for start, end in zip(bounds, bounds[1:], strict=False):
        was_done = decoder.done
        pieces, n = decoder.feed(data[start:end])
        assert 0 <= n <= end - start
        if not decoder.done:
            assert n == end - start
        if was_done:
            assert (pieces, n) == ([], 0)
        for piece in pieces:
            payload += piece
        used += n
    return bytes(payload), used, decoder


trailer_names = st.sampled_from(["X-Sum", "Expires", "a", "X-Y-Z"])
trailer_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=10)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.binary(max_size=40), max_size=8),
    st.lists(st.tuples(trailer_names, trailer_values), max_size=3),
    st.sampled_from(TRAILING),
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=10),
)
def test_property_round_trip(
    chunks: list[bytes], trailers: Trailers, trailing: bytes, cuts: list[int]
) -> None:
    trailer_bytes = b"".join(f"{n}: {v}\r\n".encode() for n, v in trailers)
    body = b"".join(encode_chunk(chunk) for chunk in chunks) + LAST_CHUNK[:3] + trailer_bytes
    body += b"\r\n"
    payload, used, decoder = feed_in_pieces(body + trailing, cuts)
    assert (payload, used, decoder.done) == (b"".join(chunks), len(body), True)
    assert decoder.trailers == [(n, v.strip(" \t")) for n, v in trailers]


def check_outcome(data: bytes) -> None:
    """Any bytes give payload and a count or HttpParseError(400), and split feeding agrees with
    feeding whole."""
    try:
        whole = decode_whole(data)
    except HttpParseError as error:
        assert error.status == 400
        with pytest.raises(HttpParseError):
            decode_bytewise(data)
        return
    payload, used, decoder = whole
    assert used == len(data) or (decoder.done and used < len(data))
    got, used_bytewise, bytewise = decode_bytewise(data)
    assert (got, used_bytewise, bytewise.done) == (payload, used, decoder.done)
    assert bytewise.trailers == decoder.trailers


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_property_any_bytes(data: bytes) -> None:
    check_outcome(data)


PIECES = [
    b"0",
    b"5",
    b"a",
    b"F",
    b"1",
    b";",
    b"x=1",
    b"=",
    b" ",
    b"\t",
    b"\r\n",
    b"\r",
    b"\n",
    b"hello",
    b"X-T",
    b":",
    b"\x00",
    b"\xe9",
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=40))
def test_property_structured(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    check_outcome(data)
    check_outcome(b"5\r\nhello\r\n" + data)
    check_outcome(b"0\r\n" + data)
