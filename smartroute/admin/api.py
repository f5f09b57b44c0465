"""What the admin server answers, path by path; plain values in, :class:`Response` out.

=========================  ===================================================================
``GET /metrics``           Prometheus text (:func:`smartroute.admin.metrics.render_metrics`)
``GET /status``            the live status page (``status.html``), a person's view
``GET /api/routes``        ``{"routes": [...]}``: the routes in their dict form (export.py)
``PUT /api/routes``        the same shape: replaces every route at once, or nothing (400)
``GET /api/stats``         ``proxy.stats()``
``GET /api/certificates``  every served certificate and the ACME domains, with days left
=========================  ===================================================================

The status page keeps the token a person opened it with (``/status?token=...``) in its
``sessionStorage``, not in a cookie: storage is scoped to the admin server's origin (scheme,
host *and port*), whereas a cookie for 127.0.0.1 would also be sent to every route served on
that host's other ports. The page strips the token from its address bar, sends it as a
``Bearer`` header, and runs under a Content-Security-Policy that allows its own inline script
and style (by hash) and requests to its own origin only.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import importlib.resources
import json
import logging
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from smartroute.admin.metrics import CONTENT_TYPE, render_metrics
from smartroute.errors import ConfigError, PortInUseError, SmartRouteError
from smartroute.protocols.http import RequestHead
from smartroute.routing.export import export_routes, import_target_callables, placeholder_problem

if TYPE_CHECKING:
    from smartroute.proxy import SmartRoute

log = logging.getLogger("smartroute.admin")

JSON = "application/json"
METRICS_TYPE = CONTENT_TYPE
HTML = "text/html; charset=utf-8"
_DAY = 86400.0

# Shown instead of the page to a browser without the token: it brings back a token the page
# kept in this tab (after a reload, say), once, else it says how to open the page.
_LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>smartroute status: token needed</title>
<style>body{font:16px system-ui,sans-serif;margin:3em;color:#222}</style></head>
<body><h1>smartroute status</h1>
<p>This admin server needs its token: open <code>/status?token=TOKEN</code>.</p>
<script>
const key = "smartroute-admin-token";
const kept = sessionStorage.getItem(key);
sessionStorage.removeItem(key);
if (kept) location.replace("/status?token=" + encodeURIComponent(kept));
</script></body></html>
"""


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # normalised, without the query
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]  # lower-cased names
    body: bytes


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()


def json_response(
    status: int, value: object, headers: tuple[tuple[str, str], ...] = ()
) -> Response:
    body = json.dumps(value, default=str, separators=(",", ":")).encode()
    return Response(status, body, JSON, headers)


def error_response(status: int, message: str, path: str | None = None) -> Response:
    """``{"error": MESSAGE}``, with ``"path"`` (the bad field) for a refused route set."""
    value: dict[str, str] = {"error": message}
    if path is not None:
        value["path"] = path
    return json_response(status, value)


def _csp(page: str) -> str:
    """A policy allowing exactly the page's inline scripts and styles, and fetches to itself."""

    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.DOTALL)
        return " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'"
            for text in found
        )

    return (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )


def _page_headers(page: str) -> tuple[tuple[str, str], ...]:
    return (
        ("Content-Security-Policy", _csp(page)),
        ("Referrer-Policy", "no-referrer"),
        ("X-Frame-Options", "DENY"),
    )


class AdminApi:
    """The endpoints of one proxy."""

    def __init__(self, proxy: SmartRoute, token: str | None) -> None:
        self.proxy = proxy
        self.token = token
        self._page = (
            importlib.resources.files(__package__).joinpath("status.html").read_text("utf-8")
        )
        self._page_headers = _page_headers(self._page)
        self._login_headers = _page_headers(_LOGIN_PAGE)
        self._routes = {
            "/metrics": {"GET": self._metrics},
            "/status": {"GET": self._status},
            "/api/routes": {"GET": self._get_routes, "PUT": self._put_routes},
            "/api/stats": {"GET": self._stats},
            "/api/certificates": {"GET": self._certificates},
        }

    async def handle(self, request: Request) -> Response:
        methods = self._routes.get(request.path.rstrip("/") or "/")
        if methods is None:
            known = ", ".join(self._routes)
            return error_response(404, f"no such path {request.path!r} (known: {known})")
        answer = methods.get(request.method)
        if answer is None:
            allowed = ", ".join(methods)
            response = error_response(405, f"{request.method} is not allowed here ({allowed})")
            return Response(response.status, response.body, JSON, (("Allow", allowed),))
        try:
            return await answer(request)
        except Exception:
            log.exception("admin API: %s %s failed", request.method, request.path)
            return error_response(500, "internal error (logged on the smartroute.admin logger)")

    def unauthorized(self, head: RequestHead) -> Response:
        challenge = (("WWW-Authenticate", 'Bearer realm="smartroute admin"'),)
        if head.method == "GET" and head.path == "/status":
            return Response(401, _LOGIN_PAGE.encode(), HTML, challenge + self._login_headers)
        response = error_response(401, "missing or wrong token (Authorization: Bearer TOKEN)")
        return Response(401, response.body, JSON, challenge)

    # -- endpoints -------------------------------------------------------------------------------

    async def _metrics(self, request: Request) -> Response:
        return Response(200, render_metrics(self.proxy).encode(), METRICS_TYPE)

    async def _status(self, request: Request) -> Response:
        return Response(200, self._page.encode(), HTML, self._page_headers)

    async def _get_routes(self, request: Request) -> Response:
        return json_response(200, {"routes": export_routes(self.proxy.routes)})

    async def _put_routes(self, request: Request) -> Response:
        try:
            data = json.loads(request.body)
        except (ValueError, UnicodeDecodeError) as exc:
            return error_response(400, f"the body is not JSON ({exc})", "")
        if not isinstance(data, dict) or "routes" not in data:
            return error_response(400, 'expected {"routes": [...]}', "")
        extra = sorted(set(data) - {"routes"})
        if extra:
            return error_response(400, f'unknown key "{extra[0]}" (expected "routes")', extra[0])
        try:
            problem = placeholder_problem(data["routes"])
            if problem is not None:
                raise problem
            routes = import_target_callables(data["routes"])
            await self.proxy.update_routes(cast(Iterable[Any], routes))  # validation checks
        except ConfigError as exc:
            return error_response(400, str(exc), exc.path)
        except PortInUseError as exc:
            return error_response(409, str(exc))
        except SmartRouteError as exc:
            return error_response(500, str(exc))
        log.info("admin API: routes replaced (%d routes)", len(self.proxy.routes))
        return json_response(200, {"routes": export_routes(self.proxy.routes)})

    async def _stats(self, request: Request) -> Response:
        return json_response(200, self.proxy.stats())

    async def _certificates(self, request: Request) -> Response:
        now = time.time()
        served = [
            {**entry, "days_left": _days_left(entry.get("not_after"), now)}
            for entry in self.proxy.certificates()
        ]
        served.sort(key=lambda entry: (entry["not_after"] or 0, entry["label"] or ""))
        acme: dict[str, dict[str, Any]] = {}
        for domain, status in self.proxy.certificate_status().items():
            expiry = status.get("not_after")
            timestamp = None
            if isinstance(expiry, str):
                timestamp = datetime.datetime.fromisoformat(expiry).timestamp()
            acme[domain] = {**status, "days_left": _days_left(timestamp, now)}
        return json_response(200, {"certificates": served, "acme": acme})


def _days_left(not_after: object, now: float) -> int | None:
    """Whole days until ``not_after`` (Unix time); negative once expired."""
    if not isinstance(not_after, int | float):
        return None
    return math.floor((not_after - now) / _DAY)
