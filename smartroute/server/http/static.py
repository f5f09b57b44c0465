"""The ``static`` action: inline content, or files under a root directory.

:func:`serve_static` only looks at file metadata; a file's bytes are returned as a
:class:`FileBody` (real path, offset, length) for the session to stream. It handles GET and HEAD
alike (the session drops the body of a HEAD answer), conditional requests (``If-None-Match``,
``If-Modified-Since``) and single byte ranges (``Range``, ``If-Range``) as RFC 9110 describes.

Paths never leave the root: the decoded path may not hold NUL (400), backslashes or ``..``
segments (404), and the real path of what is served, symlinks resolved, must lie inside the
real path of the root (404 otherwise).
"""

from __future__ import annotations

import datetime
import email.utils
import mimetypes
import os
import re
import stat
from typing import Literal
from urllib.parse import unquote_to_bytes

from smartroute.routing.model import StaticAction
from smartroute.server.http.messages import FileBody, RequestInfo, Response, text_response
from smartroute.server.http.redirect import quote_path, quote_query

__all__ = ["serve_static"]

_METHODS = ("GET", "HEAD")
_ALLOW = [("Allow", "GET, HEAD")]

# Built-in table only, so answers do not depend on the machine's /etc/mime.types.
_MIME = mimetypes.MimeTypes()
_MIME.add_type("text/javascript", ".js")  # RFC 9239
_MIME.add_type("text/javascript", ".mjs")
_ENCODED_TYPES = {
    "gzip": "application/gzip",
    "bzip2": "application/x-bzip2",
    "xz": "application/x-xz",
    "br": "application/x-brotli",
    "compress": "application/x-compress",
}
_UTF8_TYPES = frozenset({"application/json", "application/xml", "application/javascript"})
_DEFAULT_TYPE = "application/octet-stream"

_ENTITY_TAG = re.compile(r'(?:W/)?"[^"]*"')
_RANGE_SPEC = re.compile(r"([0-9]*)-([0-9]*)", re.ASCII)
# Longer numbers cannot name a real offset; capping them also avoids int()'s digit limit.
_MAX_DIGITS = 18
_HUGE = 10**_MAX_DIGITS


def serve_static(action: StaticAction, request: RequestInfo) -> Response:
    """Answer ``request`` from ``action``: its inline content or a file under its root."""
    if request.method not in _METHODS:
        return text_response(405, f"method {request.method} not allowed here", _ALLOW)
    if action.content is not None:
        return Response(action.status, [("Content-Type", action.content_type)], action.content)
    if action.root is None:
        return text_response(500, "static action has neither root nor content")
    return _serve_file(action.root, action.index, request)


def _serve_file(root: str, index: tuple[str, ...], request: RequestInfo) -> Response:
    if not request.path.startswith("/"):
        return text_response(400, "static files need a path starting with /")
    try:
        decoded = unquote_to_bytes(request.path).decode("utf-8")
    except UnicodeDecodeError:
        return text_response(400, "path is not valid UTF-8")
    if "\x00" in decoded:
        return text_response(400, "NUL byte in path")
    segments = decoded.split("/")
    if "\\" in decoded or ".." in segments:
        return _not_found()
    root_real = os.path.realpath(root)
    wanted = os.path.join(root_real, *(s for s in segments if s not in ("", ".")))
    found = _lookup(root_real, wanted)
    if found is None:
        return _not_found()
    real, info = found
    if stat.S_ISDIR(info.st_mode):
        if not decoded.endswith("/"):
            location = quote_path(request.path) + "/" + quote_query(request.query)
            return text_response(301, f"moved to {location}", [("Location", location)])
        for name in index:
            found = _lookup(root_real, os.path.join(real, name))
            if found is not None and stat.S_ISREG(found[1].st_mode):
                return _file_response(found[0], name, found[1], request)
        return _not_found()
    if decoded.endswith("/") or not stat.S_ISREG(info.st_mode):
        return _not_found()
    return _file_response(real, wanted, info, request)


def _not_found() -> Response:
    return text_response(404, "file not found")


def _inside(root_real: str, path: str) -> bool:
    prefix = root_real if root_real.endswith(os.sep) else root_real + os.sep
    return path == root_real or path.startswith(prefix)


def _lookup(root_real: str, path: str) -> tuple[str, os.stat_result] | None:
    """The real path and metadata of ``path`` when it resolves inside the root and is readable."""
    try:
        real = os.path.realpath(path)
        if not _inside(root_real, real):
            return None
        info = os.stat(real)
    except (OSError, ValueError):
        return None
    if not os.access(real, os.R_OK):
        return None
    return real, info


def _content_type(name: str) -> str:
    kind, encoding = _MIME.guess_type(name, strict=False)
    if encoding is not None:
        return _ENCODED_TYPES.get(encoding, _DEFAULT_TYPE)
    if kind is None:
        return _DEFAULT_TYPE
    if kind.startswith("text/") or kind in _UTF8_TYPES:
        return f"{kind}; charset=utf-8"
    return kind


def _file_response(real: str, name: str, info: os.stat_result, request: RequestInfo) -> Response:
    size = info.st_size
    mtime = int(info.st_mtime)
    etag = f'"{size:x}-{info.st_mtime_ns:x}"'
    validators = [("ETag", etag), ("Last-Modified", email.utils.formatdate(mtime, usegmt=True))]
    headers = [("Content-Type", _content_type(name)), ("Accept-Ranges", "bytes"), *validators]
    if _not_modified(request.headers, etag, mtime):
        return Response(304, validators)

    range_header = request.headers.get("range")
    if range_header is not None and request.method == "GET":  # RFC 9110 14.2: GET only
        if_range = request.headers.get("if-range")
        if if_range is None or _if_range_matches(if_range, etag, mtime):
            wanted = _parse_range(range_header, size)
            if wanted == "unsatisfiable":
                return text_response(
                    416, "range not satisfiable", [("Content-Range", f"bytes */{size}")]
                )
            if isinstance(wanted, tuple):
                first, last = wanted
                headers.append(("Content-Range", f"bytes {first}-{last}/{size}"))
                return Response(206, headers, file=FileBody(real, first, last - first + 1))
    return Response(200, headers, file=FileBody(real, 0, size))


def _strip_weak(tag: str) -> str:
    return tag[2:] if tag.startswith("W/") else tag


def _not_modified(headers: dict[str, str], etag: str, mtime: int) -> bool:
    """RFC 9110 13.2.2: If-None-Match (weak comparison) wins over If-Modified-Since."""
    if_none_match = headers.get("if-none-match")
    if if_none_match is not None:
        if if_none_match.strip() == "*":
            return True
        return any(_strip_weak(tag) == etag for tag in _ENTITY_TAG.findall(if_none_match))
    since = _parse_date(headers.get("if-modified-since"))
    return since is not None and mtime <= since


def _parse_date(value: str | None) -> int | None:
    """An HTTP date as whole seconds since the epoch, or ``None`` when absent or invalid."""
    if value is None:
        return None
    try:
        moment = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp())


def _if_range_matches(value: str, etag: str, mtime: int) -> bool:
    """RFC 9110 13.1.5: a strong entity tag match, or exactly the Last-Modified date."""
    value = value.strip()
    if value.startswith(('"', "W/")):
        return value == etag  # a weak tag never matches
    return _parse_date(value) == mtime


def _number(digits: str) -> int:
    return _HUGE if len(digits.lstrip("0")) > _MAX_DIGITS else int(digits)


def _parse_range(value: str, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """``(first, last)`` of a single byte range, ``"unsatisfiable"``, or ``None`` to send all.

    Invalid headers, other units and several ranges are ignored (a full 200 is always allowed).
    """
    unit, equals, spec = value.partition("=")
    if not equals or unit.strip().lower() != "bytes":
        return None
    specs = [part.strip() for part in spec.split(",") if part.strip()]
    if len(specs) != 1:
        return None
    found = _RANGE_SPEC.fullmatch(specs[0])
    if found is None:
        return None
    first_text, last_text = found.groups()
    if not first_text:
        if not last_text:
            return None
        suffix = _number(last_text)
        if suffix == 0:
            return "unsatisfiable"
        if size == 0:
            return None  # satisfiable, but a 206 cannot describe zero bytes: send the empty 200
        return max(size - suffix, 0), size - 1
    first = _number(first_text)
    last = _number(last_text) if last_text else None
    if last is not None and last < first:
        return None  # invalid range-spec: ignore the header
    if first >= size:
        return "unsatisfiable"
    return first, size - 1 if last is None else min(last, size - 1)
