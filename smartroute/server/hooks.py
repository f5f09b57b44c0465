"""Running a route's hooks and reading what they answer.

A hook call is bounded by the route's hook timeout; a hook that raises, times out or answers
something that is not a verdict is logged (logger ``smartroute.hooks``) and, per the route's
``hooks_fail``, refuses the connection or request (``"closed"``, the default) or is skipped
(``"open"``). Only the connection or request at hand is affected. Verdicts are checked here,
once, so that nothing a hook says can break a request's framing or inject a header: a verdict
with an unknown key, a bad value or a framing header (``Content-Length``, ``Transfer-Encoding``,
``Connection``, ...) counts as a failing hook and the log line names what is wrong.

:mod:`smartroute.server.decision` runs ``on_connect`` and ``on_request`` (once per connection,
once per HTTP request); the reverse proxy runs ``on_response``; the end of a connection runs
``on_disconnect``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from smartroute.context import RouteContext
from smartroute.protocols.http import RequestHead, header_map
from smartroute.protocols.http_response import ResponseHead
from smartroute.routing.model import Hooks
from smartroute.server.bandwidth import SpeedLimit

log = logging.getLogger("smartroute.hooks")

# Headers a hook may not set or remove: they frame the message or manage the connection.
FRAMING_HEADERS = frozenset(
    {
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
    }
)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_PATH = re.compile(r"/[\x21-\x7e]*")

# The keys each kind of hook may answer with.
CONNECT_KEYS = frozenset(
    {"allow", "status", "body", "headers", "target", "speed_limit", "drop", "fallback"}
)
REQUEST_KEYS = CONNECT_KEYS | {"set_headers", "remove_headers", "rewrite_path"}
RESPONSE_KEYS = frozenset({"status", "set_headers", "remove_headers"})


@dataclass(frozen=True, slots=True)
class HookRequest:
    """What ``on_request`` and ``on_response`` see of a request."""

    method: str
    path: str
    query: str | None
    headers: Mapping[str, str]  # lower-cased names; repeated headers joined with ", "


@dataclass(frozen=True, slots=True)
class HookResponse:
    """What ``on_response`` sees of a backend's response."""

    status: int
    headers: Mapping[str, str]


@dataclass(slots=True)
class Verdict:
    """What the hooks of one call said, merged in their order."""

    allow: bool = True
    status: int | None = None  # of the local answer (a refusal), or the new response status
    body: bytes | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)  # of the local answer
    set_headers: dict[str, str] = field(default_factory=dict)
    remove_headers: list[str] = field(default_factory=list)
    rewrite_path: str | None = None
    target: tuple[str, int] | None = None
    speed_limit: SpeedLimit | None = None
    drop: bool = False
    fallback: bool = False
    failed: str | None = None  # a hook failed under "closed": why (the refusal's reason)

    def copy(self) -> Verdict:
        return dataclasses.replace(
            self,
            headers=list(self.headers),
            set_headers=dict(self.set_headers),
            remove_headers=list(self.remove_headers),
        )

    @property
    def stops(self) -> bool:
        """The connection or request goes no further (refused, dropped, failed)."""
        return not self.allow or self.drop or self.failed is not None


class HookRefused(Exception):
    """Raised by a hook whose own failure must refuse, whatever the route's ``hooks_fail``
    (a plugin with ``"fail": "closed"``)."""


class BadVerdict(ValueError):
    """A hook answered something that is not a verdict for it."""


async def run_hooks(
    hooks: Hooks, kind: str, allowed: frozenset[str], ctx: RouteContext, *args: object
) -> Verdict | None:
    """Call each hook of ``kind`` with ``ctx`` and ``args`` in order and merge their verdicts;
    None when none of them said anything. The first refusal (or drop, or failure under
    ``"closed"``) ends the run; a fallback also ends it."""
    verdict: Verdict | None = None
    for hook in getattr(hooks, kind):
        try:
            async with asyncio.timeout(hooks.timeout):
                answer = await hook(ctx, *args)
            if answer is None:
                continue
            # Into a copy: a verdict that turns out bad leaves the others' as they were.
            verdict = merge(Verdict() if verdict is None else verdict.copy(), answer, allowed)
        except BaseException as exc:  # a user hook must not take the proxy down
            if _ours(exc):
                raise
            if isinstance(exc, HookRefused):  # logged by the hook, which says why
                return Verdict(failed=str(exc))
            why = _failure(hook, kind, hooks.timeout, exc)
            if hooks.fail == "open":
                log.warning("%s; skipped (hooks_fail: open) for %s", why, ctx.connection_id)
                continue
            log.warning("%s; refusing %s (hooks_fail: closed)", why, ctx.connection_id)
            return Verdict(failed=why)
        if verdict.stops or verdict.fallback:
            return verdict
    return verdict


def _ours(exc: BaseException) -> bool:
    """True for what must go on up: the task running the hook being cancelled (a proxy
    stopping, a connection closed), or the process ending. A hook that raises
    ``CancelledError`` of its own, like any other exception, is a failing hook."""
    if isinstance(exc, asyncio.CancelledError):
        task = asyncio.current_task()
        return task is not None and task.cancelling() > 0
    return not isinstance(exc, Exception)


async def run_disconnect_hooks(hooks: Hooks, ctx: RouteContext, info: dict[str, Any]) -> None:
    """Tell each ``on_disconnect`` hook that the connection ended (``info``: bytes each way,
    duration, target, error); their answers are not read, their failures only logged."""
    for hook in hooks.on_disconnect:
        try:
            async with asyncio.timeout(hooks.timeout):
                await hook(ctx, dict(info))
        except Exception as exc:  # a user hook must not take the proxy down
            log.warning(
                "%s (connection %s)",
                _failure(hook, "on_disconnect", hooks.timeout, exc),
                ctx.connection_id,
            )


def _failure(hook: object, kind: str, timeout: float, exc: BaseException) -> str:
    owner = getattr(hook, "__self__", None)
    name = getattr(owner, "hook_name", None) or getattr(hook, "__qualname__", None)
    name = name or type(hook).__name__
    if isinstance(exc, TimeoutError):
        return f"hook {name} ({kind}) did not answer within {timeout:g}s"
    if isinstance(exc, BadVerdict):
        return f"hook {name} ({kind}) answered a bad verdict: {exc}"
    return f"hook {name} ({kind}) raised {type(exc).__name__}: {exc}"


def merge(verdict: Verdict, answer: object, allowed: frozenset[str]) -> Verdict:
    """``verdict`` with ``answer`` (one hook's dict) checked and added to it."""
    if not isinstance(answer, Mapping):
        raise BadVerdict(f"expected a dict or None, got {type(answer).__name__}")
    for key, value in answer.items():
        if key not in allowed:
            known = ", ".join(sorted(allowed))
            raise BadVerdict(f"unknown key {key!r} (this hook may answer {known})")
        if key == "allow":
            verdict.allow = verdict.allow and _bool(key, value)
        elif key in ("drop", "fallback"):
            setattr(verdict, key, getattr(verdict, key) or _bool(key, value))
        elif key == "status":
            if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 599:
                raise BadVerdict(f"status: expected an int in 100-599, got {value!r}")
            if value < 200:
                raise BadVerdict(f"status: {value} is an interim status, not an answer")
            verdict.status = value
        elif key == "body":
            if isinstance(value, str):
                value = value.encode()
            if not isinstance(value, bytes):
                raise BadVerdict(f"body: expected str or bytes, got {type(value).__name__}")
            verdict.body = value
        elif key in ("headers", "set_headers"):
            pairs = _headers(key, value)
            if key == "headers":
                verdict.headers += pairs
            else:
                verdict.set_headers.update(pairs)
        elif key == "remove_headers":
            if isinstance(value, str) or not isinstance(value, list | tuple):
                raise BadVerdict(f"remove_headers: expected a list of names, got {value!r}")
            names = [_name(key, name) for name in value]
            if any(name.lower() == "host" for name in names):
                raise BadVerdict("remove_headers: Host may be replaced (set_headers), not removed")
            verdict.remove_headers += names
        elif key == "rewrite_path":
            if not isinstance(value, str) or not _PATH.fullmatch(value):
                raise BadVerdict(
                    f"rewrite_path: expected a path starting with / (no spaces), got {value!r}"
                )
            verdict.rewrite_path = value
        elif key == "target":
            verdict.target = _target(value)
        else:  # "speed_limit"
            verdict.speed_limit = _speed_limit(value)
    return verdict


class HookFailed(Exception):
    """An ``on_response`` hook failed under ``hooks_fail: "closed"`` (the response is not
    passed on)."""


_BODILESS = frozenset({204, 304})  # statuses whose framing says "no body", whatever follows


async def consult_response(
    hooks: Hooks, ctx: RouteContext, head: RequestHead, response: ResponseHead
) -> ResponseHead:
    """Run the ``on_response`` hooks and return the response head as they changed it (its
    status, its headers). A status change may not change whether the response has a body
    (to or from 204 or 304): that would desynchronise the connection."""
    request = HookRequest(head.method, head.path, head.query, head.header_map())
    seen = HookResponse(response.status, header_map(response.headers))
    said = await run_hooks(hooks, "on_response", RESPONSE_KEYS, ctx, request, seen)
    if said is None:
        return response
    if said.failed is not None:
        raise HookFailed(said.failed)
    status = said.status
    if status is not None and status != response.status:
        if status in _BODILESS or response.status in _BODILESS:
            why = f"on_response may not turn a {response.status} into a {status}"
            if hooks.fail == "closed":
                log.warning("%s; refusing %s (hooks_fail: closed)", why, ctx.connection_id)
                raise HookFailed(why)
            log.warning("%s; skipped (hooks_fail: open) for %s", why, ctx.connection_id)
            status = None
    headers = _rewritten(response.headers, said)
    if status is None or status == response.status:
        return dataclasses.replace(response, headers=headers)
    return dataclasses.replace(response, status=status, reason="", headers=headers)


def _rewritten(headers: tuple[tuple[str, str], ...], said: Verdict) -> tuple[tuple[str, str], ...]:
    """``headers`` with the verdict's removals, then its settings (replacing any of the same
    name), applied."""
    if not (said.set_headers or said.remove_headers):
        return headers
    dropped = {name.lower() for name in (*said.remove_headers, *said.set_headers)}
    kept = tuple(pair for pair in headers if pair[0].lower() not in dropped)
    return kept + tuple(said.set_headers.items())


def rewrite_request(head: RequestHead, said: Verdict) -> RequestHead:
    """``head`` as ``on_request`` hooks changed it: headers removed, then set (replacing any
    of the same name), and the path (with a query, if the new one has one) rewritten."""
    if not (said.set_headers or said.remove_headers or said.rewrite_path):
        return head
    headers = _rewritten(head.headers, said)
    path, query = head.path, head.query
    if said.rewrite_path is not None:
        path, mark, rest = said.rewrite_path.partition("?")
        query = rest if mark else query
    return dataclasses.replace(head, headers=headers, path=path, query=query)


def _bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise BadVerdict(f"{key}: expected True or False, got {value!r}")
    return value


def _name(key: str, name: object) -> str:
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        raise BadVerdict(f"{key}: {name!r} is not a header name")
    if name.lower() in FRAMING_HEADERS:
        raise BadVerdict(f"{key}: {name} frames the message and is the proxy's to set")
    return name


def _headers(key: str, value: object) -> list[tuple[str, str]]:
    items: list[Any]
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise BadVerdict(f"{key}: expected a dict of name: value, got {value!r}")
    pairs = []
    for item in items:
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise BadVerdict(f"{key}: expected name: value pairs, got {item!r}")
        name, text = item
        if not isinstance(text, str) or not _FIELD_VALUE.fullmatch(text):
            raise BadVerdict(f"{key}: the value of {name!r} must be text without line breaks")
        pairs.append((_name(key, name), text.strip()))
    return pairs


def _speed_limit(value: object) -> SpeedLimit:
    if not isinstance(value, Mapping) or set(value) - {"download", "upload", "group"}:
        raise BadVerdict(
            f'speed_limit: expected {{"download": bps, "upload": bps, "group": key}}, got {value!r}'
        )
    rates = []
    for way in ("download", "upload"):
        rate = value.get(way)
        if rate is not None and (
            isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate < 1e15
        ):
            raise BadVerdict(f"speed_limit: {way} must be bytes per second (> 0), got {rate!r}")
        rates.append(None if rate is None else float(rate))
    group = value.get("group")
    if group is not None and (not isinstance(group, str) or not group):
        raise BadVerdict(f"speed_limit: group must be a non-empty str, got {group!r}")
    if rates == [None, None]:
        raise BadVerdict("speed_limit: give download, upload or both")
    return SpeedLimit(rates[0], rates[1], group)


def _target(value: object) -> tuple[str, int]:
    if not isinstance(value, Mapping) or set(value) - {"host", "port"}:
        raise BadVerdict(f'target: expected {{"host": ..., "port": ...}}, got {value!r}')
    host, port = value.get("host"), value.get("port")
    if not isinstance(host, str) or not host or any(c in host for c in " /\r\n"):
        raise BadVerdict(f"target: host must be a host name or address, got {host!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise BadVerdict(f"target: port must be an int in 1-65535, got {port!r}")
    return host, port
