"""The framed-protocol codecs: case tables replayed whole, byte by byte and with trailing data,
encoder round trips, and hypothesis: any bytes give frames, None or FrameError."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smartroute.errors import ConfigError, ProtocolError, SmartRouteError
from smartroute.helpers import Frame, FrameDecoder, FrameError, encode_frame
from smartroute.helpers.frames import Framing, error_frame, parse_frame

Outcome = tuple[Any, ...]
MAX = 64


def prefixed(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def wire(framing: Framing, payload: bytes) -> bytes:
    return payload + b"\n" if framing == "lines" else prefixed(payload)


def replay(framing: Framing, chunks: list[bytes], max_frame: int = MAX) -> list[Outcome]:
    """Feed ``chunks`` one by one; after each, take frames until None or a fatal error."""
    decoder = FrameDecoder(framing, max_frame)
    seen: list[Outcome] = []
    for chunk in chunks:
        decoder.feed(chunk)
        while True:
            try:
                frame = decoder.next_frame()
            except FrameError as exc:
                seen.append(("error", exc.code, exc.fatal, exc.reply_to))
                if exc.fatal:
                    return seen
                continue
            if frame is None:
                break
            seen.append(("frame", frame.header, frame.body))
    assert decoder.buffered <= max_frame + 5
    return seen


def frame(header: dict[str, Any], body: Any = None) -> Outcome:
    return ("frame", header, body)


def error(code: str, *, fatal: bool = False, reply_to: int | None = None) -> Outcome:
    return ("error", code, fatal, reply_to)


# Payloads that mean the same in both framings: (payload, outcomes).
PAYLOADS: list[tuple[bytes, list[Outcome]]] = [
    (b'{"header":{"type":"hi"},"body":1}', [frame({"type": "hi"}, 1)]),
    (b'{"header":{"type":"hi"}}', [frame({"type": "hi"})]),
    (b'{"header":{"type":"q","id":7},"body":[1,"x"]}', [frame({"type": "q", "id": 7}, [1, "x"])]),
    ('{"header":{"type":"é"},"body":"ü"}'.encode(), [frame({"type": "é"}, "ü")]),
    (
        b'{"header":{"type":"q","id":7,"extra":true},"body":null}',
        [frame({"type": "q", "id": 7, "extra": True})],
    ),
    (b"not json", [error("invalid-json")]),
    (b'{"header":{"type":"x"},"body":NaN}', [error("invalid-json")]),
    (b'{"header":', [error("invalid-json")]),
    (b"\xff\xfe", [error("invalid-json")]),
    (b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[", [error("invalid-json")]),
    (b"[1,2]", [error("bad-frame")]),
    (b'"text"', [error("bad-frame")]),
    (b"{}", [error("bad-frame")]),
    (b'{"header":null}', [error("bad-frame")]),
    (b'{"header":[]}', [error("bad-frame")]),
    (b'{"header":{}}', [error("bad-frame")]),
    (b'{"header":{"type":""}}', [error("bad-frame")]),
    (b'{"header":{"type":3}}', [error("bad-frame")]),
    (b'{"header":{"id":4}}', [error("bad-frame", reply_to=4)]),
    (b'{"header":{"type":"x","id":"4"}}', [error("bad-frame")]),
    (b'{"header":{"type":"x","id":true}}', [error("bad-frame")]),
    (b'{"header":{"type":"x"},"body":1,"more":2}', [error("bad-frame")]),
    (b"0", [error("bad-frame")]),
]

# Whole byte streams for one framing: (framing, data, outcomes).
STREAMS: list[tuple[Framing, bytes, list[Outcome]]] = [
    *[("lines", wire("lines", p), o) for p, o in PAYLOADS],
    *[("length", wire("length", p), o) for p, o in PAYLOADS],
    ("lines", b'{"header":{"type":"a"}}\r\n', [frame({"type": "a"})]),
    ("lines", b'\n\r\n   \n{"header":{"type":"a"}}\n', [frame({"type": "a"})]),
    (
        "lines",
        b'{"header":{"type":"a"}}\n{"header":{"type":"b"}}\n',
        [frame({"type": "a"}), frame({"type": "b"})],
    ),
    ("lines", b'oops\n{"header":{"type":"b"}}\n', [error("invalid-json"), frame({"type": "b"})]),
    ("lines", b"x" * (MAX + 1) + b"\n", [error("too-large", fatal=True)]),
    ("lines", b"x" * (MAX + 2), [error("too-large", fatal=True)]),
    (
        "lines",
        b'{"header":{"type":"a"}}\n' + b"x" * 500,
        [frame({"type": "a"}), error("too-large", fatal=True)],
    ),
    (
        "lines",
        b'{"header":{"type":"' + b"a" * (MAX - 22) + b'"}}\r\n',
        [frame({"type": "a" * (MAX - 22)})],
    ),  # exactly MAX
    ("length", b"\x00\x00\x00\x00", [error("invalid-json")]),
    ("length", struct.pack(">I", MAX + 1), [error("too-large", fatal=True)]),
    ("length", b"\xff\xff\xff\xff", [error("too-large", fatal=True)]),
    (
        "length",
        prefixed(b"[]") + prefixed(b'{"header":{"type":"b"}}'),
        [error("bad-frame"), frame({"type": "b"})],
    ),
]

NO_FRAME_YET: list[tuple[Framing, bytes]] = [
    ("lines", b""),
    ("lines", b'{"header":{"type":"a"}}'),
    ("lines", b"x" * (MAX + 1)),  # could still be a MAX-byte line and its "\r"
    ("length", b"\x00\x00\x00"),
    ("length", b"\x00\x00\x00\x05{}"),
]

TRAILER: dict[Framing, bytes] = {
    "lines": b'{"header":{"type":"next"},"body":0}\n',
    "length": prefixed(b'{"header":{"type":"next"},"body":0}'),
}


@pytest.mark.parametrize(("framing", "data", "expected"), STREAMS)
def test_whole(framing: Framing, data: bytes, expected: list[Outcome]) -> None:
    assert replay(framing, [data]) == expected


@pytest.mark.parametrize(("framing", "data", "expected"), STREAMS)
def test_byte_by_byte(framing: Framing, data: bytes, expected: list[Outcome]) -> None:
    assert replay(framing, [data[i : i + 1] for i in range(len(data))]) == expected


@pytest.mark.parametrize(("framing", "data", "expected"), STREAMS)
def test_with_trailing_data(framing: Framing, data: bytes, expected: list[Outcome]) -> None:
    fatal = bool(expected) and expected[-1][0] == "error" and expected[-1][2]
    tail = [] if fatal else [frame({"type": "next"}, 0)]
    assert replay(framing, [data + TRAILER[framing]]) == expected + tail


@pytest.mark.parametrize(("framing", "data"), NO_FRAME_YET)
def test_need_more_bytes(framing: Framing, data: bytes) -> None:
    decoder = FrameDecoder(framing, MAX)
    decoder.feed(data)
    assert decoder.next_frame() is None
    assert decoder.next_frame() is None


def test_a_fatal_error_is_raised_again_and_the_buffer_freed() -> None:
    decoder = FrameDecoder("lines", MAX)
    decoder.feed(b"y" * 1000)
    with pytest.raises(FrameError) as first:
        decoder.next_frame()
    assert first.value.fatal and "limit of 64 bytes" in str(first.value)
    assert decoder.buffered == 0
    decoder.feed(TRAILER["lines"])
    with pytest.raises(FrameError) as again:
        decoder.next_frame()
    assert again.value is first.value


def test_errors_are_one_type_in_the_tree() -> None:
    assert issubclass(FrameError, ProtocolError) and issubclass(FrameError, SmartRouteError)
    with pytest.raises(FrameError) as caught:
        parse_frame(b"{")
    assert str(caught.value).startswith("frame is not valid JSON: ")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"[]", 'a frame is a JSON object {"header": ..., "body": ...}, got an array'),
        (
            b'{"header":{"type":"a"},"x":1}',
            'unknown key "x" in frame (a frame has "header" and "body")',
        ),
        (b'{"body":1}', 'frame has no "header"'),
        (b'{"header":"a"}', '"header" must be an object, got a string'),
        (b'{"header":{}}', 'header has no "type"'),
        (b'{"header":{"type":null}}', "header.type must be a non-empty string, got null"),
        (b'{"header":{"type":"a","id":1.5}}', "header.id must be an integer, got a number"),
        (b'{"header":{"type":"a","id":false}}', "header.id must be an integer, got a boolean"),
        (b"\xc3", "frame is not UTF-8 (bad byte at 0)"),
        (b"[" * 100_000, "frame is not valid JSON: nested too deeply"),
        (b'{"a":Infinity}', "frame is not valid JSON: Infinity is not valid JSON"),
    ],
)
def test_error_messages_name_the_problem(payload: bytes, message: str) -> None:
    with pytest.raises(FrameError) as caught:
        parse_frame(payload)
    assert str(caught.value) == message


def test_frame_properties() -> None:
    request = parse_frame(b'{"header":{"type":"q","id":3},"body":{"a":1}}')
    assert (request.type, request.id, request.reply_to, request.body) == ("q", 3, None, {"a": 1})
    reply = Frame({"type": "q", "reply_to": 3, "id": True})
    assert (reply.id, reply.reply_to) == (None, 3)


@pytest.mark.parametrize("framing", ["lines", "length"])
def test_encoder_round_trip_and_limits(framing: Framing) -> None:
    data = encode_frame(
        {"type": "t", "id": 1}, {"text": "a\nb\u2028", "n": [1.5, None]}, framing=framing
    )
    assert replay(framing, [data], max_frame=1000) == [
        frame({"type": "t", "id": 1}, {"text": "a\nb\u2028", "n": [1.5, None]})
    ]
    assert data.count(b"\n") == (1 if framing == "lines" else 0)  # newlines in strings are escaped
    with pytest.raises(FrameError, match="over the limit of 20 bytes") as caught:
        encode_frame({"type": "t"}, "x" * 100, framing=framing, max_frame=20)
    assert caught.value.code == "too-large"
    for body in (object(), float("nan"), "\ud800"):
        with pytest.raises(FrameError, match="cannot encode frame 't' as JSON") as bad:
            encode_frame({"type": "t"}, body, framing=framing)
        assert bad.value.code == "bad-frame"


def test_error_frame_shape() -> None:
    assert (
        error_frame("x", "y") == b'{"header":{"type":"error"},"body":{"code":"x","message":"y"}}\n'
    )
    assert replay("length", [error_frame("x", "y", reply_to=2, framing="length")], 100) == [
        frame({"type": "error", "reply_to": 2}, {"code": "x", "message": "y"})
    ]


@pytest.mark.parametrize(
    ("framing", "max_frame", "message"),
    [
        ("json", 100, 'FrameDecoder.framing: expected "lines" or "length", got \'json\''),
        ("lines", 0, "FrameDecoder.max_frame: expected bytes in 16-2**31, got 0"),
        ("lines", True, "FrameDecoder.max_frame: expected bytes in 16-2**31, got True"),
    ],
)
def test_decoder_settings_are_checked(framing: Any, max_frame: Any, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        FrameDecoder(framing, max_frame)
    assert str(caught.value) == message


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(
    framing=st.sampled_from(["lines", "length"]),
    data=st.binary(max_size=400),
    cuts=st.lists(st.integers(0, 400), max_size=6),
)
def test_any_bytes_give_frames_none_or_frame_error(
    framing: Framing, data: bytes, cuts: list[int]
) -> None:
    decoder = FrameDecoder(framing, MAX)
    bounds = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    for start, end in zip(bounds, bounds[1:], strict=False):
        decoder.feed(data[start:end])
        while True:
            try:
                result = decoder.next_frame()
            except FrameError as exc:
                assert exc.code in {"too-large", "invalid-json", "bad-frame"}
                if exc.fatal:
                    return
                continue
            if result is None:
                break
            assert isinstance(result, Frame) and isinstance(result.type, str) and result.type


@settings(max_examples=200, deadline=None)
@given(
    framing=st.sampled_from(["lines", "length"]),
    frames=st.lists(st.tuples(st.text(min_size=1, max_size=10), JSON_VALUES), max_size=5),
    cut=st.integers(1, 50),
)
def test_encoded_frames_decode_back_in_any_pieces(
    framing: Framing, frames: list[tuple[str, Any]], cut: int
) -> None:
    data = b"".join(encode_frame({"type": kind}, body, framing=framing) for kind, body in frames)
    chunks = [data[i : i + cut] for i in range(0, len(data), cut)]
    assert replay(framing, chunks, max_frame=1 << 16) == [frame({"type": k}, b) for k, b in frames]
