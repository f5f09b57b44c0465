"""A sans-I/O, incremental decoder and an encoder for the chunked transfer coding.

The proxy streams chunked bodies through without holding them whole: :class:`ChunkedDecoder`
takes whatever bytes arrived and returns the payload found in them as slices of the input, and
how many bytes belong to the body. It never consumes past the body's end, so what follows (the
next pipelined message) stays with the caller. Internally it holds at most one chunk-size line
or one trailer line, both capped.

The framing is read strictly (RFC 9112 section 7.1): every line must end in CRLF, sizes are
plain hex. Bare LF and similar leniencies are exactly where two parsers of one body start to
disagree, which is how chunked request smuggling works.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import NoReturn

from smartroute.errors import HttpParseError
from smartroute.protocols.http import _BAD_BYTES, _HEADER_LINE, _OWS

__all__ = ["LAST_CHUNK", "ChunkedDecoder", "encode_chunk"]

LAST_CHUNK = b"0\r\n\r\n"  # the zero-size chunk and the empty trailer section that end a body

_CRLF = b"\r\n"
_LF = re.compile(rb"\n")
_EXTENSION = rb"(?:;[\t\x20-\x7e\x80-\xff]*)?"  # chunk extensions are skipped, not interpreted
_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]+)[ \t]*" + _EXTENSION + rb"\r\n")
# What a chunk-size line may be while its LF has not arrived.
_SIZE_LINE_PREFIX = re.compile(rb"(?:[0-9A-Fa-f]+[ \t]*" + _EXTENSION + rb"\r?)?")
_MAX_CHUNK_SIZE = 2**63 - 1


class _State(Enum):
    SIZE = "size"  # reading a chunk-size line
    DATA = "data"  # passing chunk data through
    DATA_END = "data end"  # reading the CRLF after chunk data
    TRAILERS = "trailers"  # reading trailer lines up to the empty one
    DONE = "done"


def encode_chunk(data: bytes | bytearray | memoryview) -> bytes:
    """One chunk carrying ``data``; empty data gives ``b""``, since a zero-size chunk would end
    the body (send :data:`LAST_CHUNK` for that)."""
    size = len(data)
    if size == 0:
        return b""
    return b"%x\r\n" % size + bytes(data) + _CRLF


class ChunkedDecoder:
    """Decode one chunked body fed in pieces of any size.

    ``max_chunk_line`` caps a chunk-size line and ``max_trailers`` the whole trailer section,
    both counted with their CRLFs. Malformed framing raises :class:`HttpParseError` with
    ``error_status`` (400; a proxy decoding a backend's body passes 502), and so does every
    later :meth:`feed`.
    """

    __slots__ = (
        "trailers",
        "_state",
        "_line",
        "_remaining",
        "_trailer_budget",
        "_max_chunk_line",
        "_max_trailers",
        "_error_status",
        "_failure",
    )

    def __init__(
        self, *, max_chunk_line: int = 4096, max_trailers: int = 16384, error_status: int = 400
    ) -> None:
        self.trailers: list[tuple[str, str]] = []  # in order, names as sent, values without OWS
        self._state = _State.SIZE
        self._line = bytearray()  # the line being read, never longer than its cap
        self._remaining = 0  # in DATA: chunk bytes still to come; in DATA_END: CRLF bytes seen
        self._trailer_budget = max_trailers
        self._max_chunk_line = max_chunk_line
        self._max_trailers = max_trailers
        self._error_status = error_status
        self._failure: str | None = None

    @property
    def done(self) -> bool:
        """True once the last chunk, the trailers and the final CRLF have been consumed."""
        return self._state is _State.DONE

    def feed(self, data: bytes | bytearray | memoryview) -> tuple[list[bytes | memoryview], int]:
        """Decode ``data``; return the payload pieces in it and how many bytes of it were used.

        Until the body is done every byte is used (payload, or framing held for the next call);
        the bytes after the body's end are left alone. Pieces of a ``memoryview`` are views of
        it (valid while its buffer is); pieces of ``bytes`` and ``bytearray`` are ``bytes``.
        """
        if self._failure is not None:
            raise HttpParseError(self._failure, status=self._error_status)
        try:
            return self._feed(data)
        except HttpParseError as error:
            self._failure = str(error)
            raise

    def _feed(self, data: bytes | bytearray | memoryview) -> tuple[list[bytes | memoryview], int]:
        pieces: list[bytes | memoryview] = []
        pos = 0
        size = len(data)
        while pos < size:
            state = self._state
            if state is _State.DATA:
                end = min(size, pos + self._remaining)
                pieces.append(_slice(data, pos, end))
                self._remaining -= end - pos
                pos = end
                if self._remaining == 0:
                    self._state = _State.DATA_END
            elif state is _State.DATA_END:
                got = bytes(data[pos : pos + 2 - self._remaining])
                if not _CRLF.startswith(got, self._remaining):
                    self._fail("chunk data not followed by CRLF")
                pos += len(got)
                self._remaining += len(got)
                if self._remaining == 2:
                    self._state = _State.SIZE
            elif state is _State.DONE:
                break
            else:
                limit = self._max_chunk_line if state is _State.SIZE else self._trailer_budget
                line, pos = self._read_line(data, pos, limit)
                if line is None:
                    break
                if state is _State.SIZE:
                    self._on_size_line(line)
                else:
                    self._on_trailer_line(line)
        return pieces, pos

    def _read_line(
        self, data: bytes | bytearray | memoryview, pos: int, limit: int
    ) -> tuple[bytes | None, int]:
        """Add ``data[pos:]`` to the current line up to its LF; return the line once complete
        and the position after what was used. The line, with its LF, is at most ``limit``."""
        start = len(self._line)
        end = min(len(data), pos + max(limit - start, 0))
        newline = _LF.search(data, pos, end)
        if newline is not None:
            end = newline.end()
        self._line += data[pos:end]
        if newline is not None:
            line = bytes(self._line)
            self._line.clear()
            return line, end
        if len(self._line) >= limit:
            if self._state is _State.SIZE:
                self._fail(f"chunk-size line exceeds {self._max_chunk_line} bytes")
            self._fail(f"trailer section exceeds {self._max_trailers} bytes")
        if self._state is _State.SIZE:
            if _SIZE_LINE_PREFIX.fullmatch(self._line) is None:
                self._fail(f"malformed chunk-size line {bytes(self._line[:64])!r}")
        elif _BAD_BYTES.search(self._line, max(start - 1, 0)) is not None:
            self._fail(f"invalid byte in trailer line {bytes(self._line[:64])!r}")
        return None, end

    def _on_size_line(self, line: bytes) -> None:
        match = _SIZE_LINE.fullmatch(line)
        if match is None:
            if not line.endswith(_CRLF):
                self._fail("chunk-size line does not end in CRLF")
            self._fail(f"malformed chunk-size line {line[:64]!r}")
        digits = match.group(1).lstrip(b"0")
        if len(digits) > 16 or int(digits or b"0", 16) > _MAX_CHUNK_SIZE:
            self._fail(f"chunk size {digits[:32].decode('ascii')}... is too large")
        size = int(digits or b"0", 16)
        if size == 0:
            self._state = _State.TRAILERS
        else:
            self._remaining = size
            self._state = _State.DATA

    def _on_trailer_line(self, line: bytes) -> None:
        self._trailer_budget -= len(line)
        if line == _CRLF:
            self._state = _State.DONE
            return
        if not line.endswith(_CRLF):
            self._fail("trailer line does not end in CRLF")
        content = line[:-2]
        if _BAD_BYTES.search(line) is not None:  # with the CRLF, so "\r\r\n" is caught
            self._fail(f"invalid byte in trailer line {content[:64]!r}")
        match = _HEADER_LINE.fullmatch(content)
        if match is None:
            if content[:1] in (b" ", b"\t"):
                self._fail("obsolete line folding in trailer")
            self._fail(f"malformed trailer line {content[:64]!r}")
        name = match.group(1).decode("ascii")
        self.trailers.append((name, match.group(2).decode("latin-1").strip(_OWS)))

    def _fail(self, message: str) -> NoReturn:
        raise HttpParseError(message, status=self._error_status)


def _slice(data: bytes | bytearray | memoryview, start: int, end: int) -> bytes | memoryview:
    """``data[start:end]`` without a copy where that is safe: the caller may resize a bytearray
    after feeding it, which a view would forbid."""
    if isinstance(data, bytearray):
        return bytes(memoryview(data)[start:end])
    return data[start:end]
