"""The ``redirect`` action: render the ``to`` template into a ``Location`` answer.

Template variables (anything else in braces is left as written):

- ``{domain}``: the request's Host without its port (IPv6 addresses in brackets). A template that
  uses it answers 400 when the request has no Host or the Host is not a plain host name.
- ``{port}``: the local port the client connected to.
- ``{path}``: the request path as sent (still percent-encoded), always starting with one ``/``.
- ``{query}``: ``?`` and the query when the request target had a ``?``, else ``""``.

No request can inject a header or move the redirect to another host: the domain must be a host
name or an IP literal; path and query are re-quoted so CR, LF, spaces, controls, non-ASCII,
``\\`` and stray ``%`` are percent-encoded; leading slashes of the path collapse to one, so
``//evil.com`` cannot become a scheme-relative URL. The rendered location as a whole gets the
same treatment, so even a template with odd characters yields a clean header value.
"""

from __future__ import annotations

import ipaddress
import re
import string

from smartroute.routing.model import RedirectAction
from smartroute.routing.patterns import normalize_host
from smartroute.server.http.messages import RequestInfo, Response, text_response

__all__ = ["quote_path", "quote_query", "render_redirect"]

_VARIABLE = re.compile(r"\{(domain|port|path|query)\}")
# Host names as the HTTP parser accepts them, lower-cased; "_" is harmless in an authority.
_HOST_NAME = re.compile(r"[a-z0-9_.-]{1,253}", re.ASCII)

# Characters kept as they are; everything else is percent-encoded from its UTF-8 bytes.
# RFC 3986 unreserved + sub-delims + ":" "@" "/"; the query also keeps "?".
_PATH_SAFE = frozenset(string.ascii_letters + string.digits + "-._~" + "!$&'()*+,;=" + ":@/")
_QUERY_SAFE = _PATH_SAFE | {"?"}
# A whole URL also keeps the gen-delims; it is only cleaned so the header stays one safe line.
_URL_SAFE = _QUERY_SAFE | set("#[]")
_HEX = frozenset("0123456789abcdefABCDEF")


def _is_escape(digits: str) -> bool:
    return len(digits) == 2 and digits[0] in _HEX and digits[1] in _HEX


def _quote(text: str, safe: frozenset[str]) -> str:
    """Percent-encode every character outside ``safe``; well-formed ``%XX`` escapes stay."""
    out: list[str] = []
    for index, char in enumerate(text):
        if char in safe:
            out.append(char)
        elif char == "%" and _is_escape(text[index + 1 : index + 3]):
            out.append(char)
        else:
            # surrogatepass: lone surrogates still become bytes instead of raising.
            out.extend(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
    return "".join(out)


def quote_path(path: str) -> str:
    """A request path made safe for a ``Location``: quoted, one leading ``/``, never ``//``."""
    quoted = _quote(path, _PATH_SAFE)
    return "/" + quoted.lstrip("/")


def quote_query(query: str | None) -> str:
    """``?query`` quoted for a ``Location``, or ``""`` when the target had no ``?``."""
    return "" if query is None else "?" + _quote(query, _QUERY_SAFE)


def _url_host(host: str) -> str | None:
    """The host as it appears in a URL, or ``None`` when it is not a plain host or IP."""
    name = normalize_host(host)
    bracketed = name.startswith("[") and name.endswith("]")
    if bracketed:
        name = name[1:-1]
    if bracketed or ":" in name:
        try:
            address = ipaddress.IPv6Address(name)
        except ValueError:
            return None
        if address.scope_id is not None:  # "%zone" has no safe place in a Location
            return None
        return f"[{address.compressed}]"
    if _HOST_NAME.fullmatch(name) is None:
        return None
    return name


def render_redirect(action: RedirectAction, request: RequestInfo) -> Response:
    """Answer ``request`` with ``action.status`` and the rendered ``Location``."""
    template = action.to
    used = set(_VARIABLE.findall(template))
    values = {
        "domain": "",
        "port": str(request.port),
        "path": quote_path(request.path),
        "query": quote_query(request.query),
    }
    if "domain" in used:
        if request.host is None:
            return text_response(400, "redirect needs a Host header")
        domain = _url_host(request.host)
        if domain is None:
            return text_response(400, "bad Host header for a redirect")
        values["domain"] = domain
    rendered = _VARIABLE.sub(lambda found: values[found.group(1)], template)
    location = _quote(rendered, _URL_SAFE)
    return text_response(action.status, f"redirecting to {location}", [("Location", location)])
