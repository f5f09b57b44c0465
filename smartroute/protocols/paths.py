"""The one normal form of a request path: what routes match and what backends receive.

A proxy that matches one spelling of a path while its backend resolves another can be walked
around: ``/public/../admin/x`` or ``/%61dmin/x`` would pass a rule on ``/admin/*`` and still
reach ``/admin/x`` behind it. :func:`normalize_path` therefore turns every path into a single
form, the router matches on that form, and the reverse proxy forwards exactly that form.

The policy, applied in this order (RFC 3986 sections 2.1, 2.3, 5.2.4 and 6.2.2):

- A ``%`` must start a percent-encoding of two hex digits, else the path is refused.
- Percent-encoded unreserved characters (letters, digits, ``-`` ``.`` ``_`` ``~``) are decoded;
  every other percent-encoding is kept with upper-case hex digits.
- Refused: an encoded slash (``%2F``) or backslash (``%5C``), a raw backslash, and encoded
  control characters (``%00``-``%1F``, ``%7F``), since backends disagree on what they mean.
- Empty segments are merged: ``//a///b`` is ``/a/b``.
- Dot segments are removed: ``/a/./b/../c`` is ``/a/c``; a ``..`` that would climb above the
  root is refused, and so is a dot segment carrying a path parameter (``/..;x/``), which some
  backends read as a plain ``..``.
- A trailing slash is kept (``/a/`` stays ``/a/``; ``/a/.`` and ``/a/b/..`` become ``/a/``).

The query is not part of the path and is never changed.
"""

from __future__ import annotations

import re

from smartroute.errors import HttpParseError

__all__ = ["normalize_path"]

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PERCENT = re.compile(r"%(?:([0-9A-Fa-f]{2})|(.{0,2}))", re.DOTALL)
_REFUSED_CODES = frozenset([*range(0x20), 0x7F, 0x2F, 0x5C])
_WHY = {0x2F: "an encoded slash (%2F)", 0x5C: "an encoded backslash (%5C)"}


def normalize_path(path: str) -> str:
    """The normal form of ``path`` (which starts with ``/``), or :class:`HttpParseError` 400.

    A path that is already normal is returned as it is, after four substring checks: that is
    the usual case, and it stays cheap.
    """
    if "%" not in path and "//" not in path and "/." not in path and "\\" not in path:
        return path
    if "\\" in path:
        raise _refused(path, "a backslash")
    if "%" in path:
        path = _PERCENT.sub(_recode, path)
    kept: list[str] = []
    trailing = False  # the path ends in "/" (after "/", "/." or "/..")
    for segment in path.split("/")[1:]:  # [0] is the empty string before the leading "/"
        if segment in ("", "."):
            trailing = True
        elif segment == "..":
            if not kept:
                raise _refused(path, "a '..' above the root")
            kept.pop()
            trailing = True
        elif segment.partition(";")[0] in (".", ".."):
            raise _refused(path, f"a dot segment with a parameter ({segment[:16]!r})")
        else:
            kept.append(segment)
            trailing = False
    if not kept:
        return "/"
    return "/" + "/".join(kept) + ("/" if trailing else "")


def _recode(found: re.Match[str]) -> str:
    digits = found.group(1)
    if digits is None:
        raise HttpParseError(
            f"invalid percent-encoding {found.group()!r} in the request path", status=400
        )
    code = int(digits, 16)
    if code in _UNRESERVED:
        return chr(code)
    if code in _REFUSED_CODES:
        why = _WHY.get(code, f"an encoded control character (%{code:02X})")
        raise HttpParseError(f"the request path holds {why}", status=400)
    return "%" + digits.upper()


def _refused(path: str, why: str) -> HttpParseError:
    return HttpParseError(f"the request path {path[:64]!r} holds {why}", status=400)
