"""Frames of the framed-protocol kit, as bytes and back, without any I/O.

A frame is one JSON object, ``{"header": {"type": str, "id"?: int, ...}, "body": any}``, sent
either as a JSON line (UTF-8, ending with ``\\n``; a ``\\r`` before it and blank lines are
ignored) or length-prefixed (a 4-byte big-endian length, then that many bytes of UTF-8 JSON).

:class:`FrameDecoder` is fed bytes as they arrive; ``next_frame()`` returns a :class:`Frame`,
``None`` for "need more bytes", or raises :class:`FrameError`, the only error
it raises. After a non-fatal error (not JSON, not a frame) the bad frame is consumed and the
stream goes on; after a fatal one (over ``max_frame``) it cannot, and the decoder says so again
on every later call.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

from smartroute.errors import ConfigError, FrameError

Framing = Literal["lines", "length"]
FRAMINGS: tuple[Framing, ...] = ("lines", "length")
DEFAULT_MAX_FRAME = 65536

_PREFIX = struct.Struct(">I")
_KEYS = frozenset(("header", "body"))


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame; ``header["type"]`` is a non-empty string, ``header["id"]`` an int."""

    header: dict[str, Any]
    body: Any = None

    @property
    def type(self) -> str:
        kind: str = self.header["type"]
        return kind

    @property
    def id(self) -> int | None:
        """The request id: a frame with one asks for exactly one reply."""
        value = self.header.get("id")
        return value if _is_int(value) else None

    @property
    def reply_to(self) -> int | None:
        """The id of the request this frame answers, if it answers one."""
        value = self.header.get("reply_to")
        return value if _is_int(value) else None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def check_framing(framing: object, max_frame: object, owner: str) -> None:
    """Raise ConfigError (naming ``owner.framing`` or ``owner.max_frame``) for bad settings."""
    if framing not in FRAMINGS:
        raise ConfigError(f"{owner}.framing", f'expected "lines" or "length", got {framing!r}')
    if not _is_int(max_frame) or not 16 <= max_frame <= 2**31:  # type: ignore[operator]
        raise ConfigError(f"{owner}.max_frame", f"expected bytes in 16-2**31, got {max_frame!r}")


def parse_frame(payload: bytes) -> Frame:
    """The frame in ``payload`` (one JSON document); raises a non-fatal FrameError."""
    try:
        value = json.loads(payload.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise FrameError("invalid-json", f"frame is not UTF-8 (bad byte at {exc.start})") from None
    except RecursionError:
        raise FrameError("invalid-json", "frame is not valid JSON: nested too deeply") from None
    except ValueError as exc:
        raise FrameError("invalid-json", f"frame is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise FrameError(
            "bad-frame",
            f'a frame is a JSON object {{"header": ..., "body": ...}}, got {_kind(value)}',
        )
    header = value.get("header")
    reply_to = None
    if isinstance(header, dict) and _is_int(header.get("id")):
        reply_to = header["id"]
    problem = _problem(value, header)
    if problem:
        raise FrameError("bad-frame", problem, reply_to=reply_to)
    assert isinstance(header, dict)
    return Frame(header, value.get("body"))


def _problem(value: dict[str, Any], header: object) -> str | None:
    unknown = sorted(value.keys() - _KEYS)
    if unknown:
        return f'unknown key "{unknown[0]}" in frame (a frame has "header" and "body")'
    if "header" not in value:
        return 'frame has no "header"'
    if not isinstance(header, dict):
        return f'"header" must be an object, got {_kind(header)}'
    if "type" not in header:
        return 'header has no "type"'
    kind = header["type"]
    if not isinstance(kind, str) or not kind:
        return f"header.type must be a non-empty string, got {_kind(kind)}"
    if "id" in header and not _is_int(header["id"]):
        return f"header.id must be an integer, got {_kind(header['id'])}"
    return None


def _kind(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


def encode_frame(
    header: Mapping[str, Any],
    body: Any = None,
    *,
    framing: Framing = "lines",
    max_frame: int | None = None,
) -> bytes:
    """The bytes of one frame; FrameError when ``body`` is not JSON or the frame is too large."""
    try:
        payload = json.dumps(
            {"header": dict(header), "body": body},
            ensure_ascii=False,
            allow_nan=False,
            separators=(",", ":"),
        ).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise FrameError(
            "bad-frame", f"cannot encode frame {header.get('type')!r} as JSON: {exc}"
        ) from None
    if max_frame is not None and len(payload) > max_frame:
        raise FrameError(
            "too-large",
            f"frame {header.get('type')!r} of {len(payload)} bytes is over the limit of "
            f"{max_frame} bytes",
        )
    if framing == "lines":
        return payload + b"\n"
    return _PREFIX.pack(len(payload)) + payload


def error_frame(
    code: str, message: str, *, reply_to: int | None = None, framing: Framing = "lines"
) -> bytes:
    """``{"header": {"type": "error", "reply_to"?: id}, "body": {"code", "message"}}``."""
    header: dict[str, Any] = {"type": "error"}
    if reply_to is not None:
        header["reply_to"] = reply_to
    return encode_frame(header, {"code": code, "message": message}, framing=framing)


class FrameDecoder:
    """Incremental decoder: ``feed(bytes)``, then ``next_frame()`` until it returns ``None``."""

    __slots__ = ("framing", "max_frame", "_buffer", "_scanned", "_broken")

    def __init__(self, framing: Framing = "lines", max_frame: int = DEFAULT_MAX_FRAME) -> None:
        check_framing(framing, max_frame, "FrameDecoder")
        self.framing: Framing = framing
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._scanned = 0  # lines: bytes already known to hold no newline
        self._broken: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for frames not complete yet (at most ``max_frame`` + 5 after a call)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_frame(self) -> Frame | None:
        """The next whole frame, ``None`` until more bytes come, or FrameError."""
        if self._broken is not None:
            raise self._broken
        if self.framing == "lines":
            return self._next_line()
        return self._next_prefixed()

    def _fail(self, message: str) -> NoReturn:
        self._broken = FrameError("too-large", message, fatal=True)
        self._buffer.clear()
        raise self._broken

    def _next_line(self) -> Frame | None:
        buffer = self._buffer
        while True:
            end = buffer.find(b"\n", self._scanned)
            if end < 0:
                if len(buffer) > self.max_frame + 1:  # + 1: room for a "\r"
                    self._fail(f"line longer than the limit of {self.max_frame} bytes")
                self._scanned = len(buffer)
                return None
            line = bytes(buffer[: end - 1 if end and buffer[end - 1] == 0x0D else end])
            del buffer[: end + 1]
            self._scanned = 0
            if len(line) > self.max_frame:
                self._fail(f"line longer than the limit of {self.max_frame} bytes")
            if line.strip():
                return parse_frame(line)

    def _next_prefixed(self) -> Frame | None:
        buffer = self._buffer
        if len(buffer) < _PREFIX.size:
            return None
        (size,) = _PREFIX.unpack_from(buffer)
        if size > self.max_frame:
            self._fail(f"frame of {size} bytes is over the limit of {self.max_frame} bytes")
        end = _PREFIX.size + size
        if len(buffer) < end:
            return None
        payload = bytes(buffer[_PREFIX.size : end])
        del buffer[:end]
        if not payload:
            raise FrameError("invalid-json", "empty frame (length 0)")
        return parse_frame(payload)
