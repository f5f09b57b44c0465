"""Hooks without sockets: reading verdicts (``merge``), running a chain (``run_hooks``,
``run_disconnect_hooks``), changing a response (``consult_response``) or a request
(``rewrite_request``), and the configuration checks with the path of the bad field.

The same behaviour through a real proxy is in ``tests/system/test_hooks_e2e.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from support import async_test

from smartroute.context import RouteContext
from smartroute.errors import ConfigError
from smartroute.protocols.http import RequestHead, parse_request_head
from smartroute.protocols.http_response import ResponseHead, parse_response_head
from smartroute.routing.model import Hooks
from smartroute.routing.validation import validate_route, validate_routes
from smartroute.server.hooks import (
    CONNECT_KEYS,
    FRAMING_HEADERS,
    REQUEST_KEYS,
    RESPONSE_KEYS,
    BadVerdict,
    HookFailed,
    HookRequest,
    HookResponse,
    Verdict,
    consult_response,
    merge,
    rewrite_request,
    run_disconnect_hooks,
    run_hooks,
)
from smartroute.settings import validate_settings

CTX = RouteContext(
    port=8080,
    client_ip="192.0.2.7",
    client_port=40000,
    server_ip="127.0.0.1",
    connection_id="c1",
    timestamp=0.0,
    route_name="web",
)
HookFn = Callable[..., Awaitable[Any]]

# -- merge: what a verdict may say ---------------------------------------------------------------

GOOD: list[tuple[str, frozenset[str], dict[str, Any], Verdict]] = [
    ("empty", CONNECT_KEYS, {}, Verdict()),
    ("allow", CONNECT_KEYS, {"allow": True}, Verdict()),
    ("refuse", CONNECT_KEYS, {"allow": False}, Verdict(allow=False)),
    (
        "refuse-with-answer",
        CONNECT_KEYS,
        {"allow": False, "status": 451, "body": "gone\n", "headers": {"X-Why": " policy "}},
        Verdict(allow=False, status=451, body=b"gone\n", headers=[("X-Why", "policy")]),
    ),
    ("body-bytes", CONNECT_KEYS, {"body": b"\x00\xff"}, Verdict(body=b"\x00\xff")),
    (
        "headers-as-pairs",
        CONNECT_KEYS,
        {"headers": [["Set-Cookie", "a=1"], ("Set-Cookie", "b=2")]},
        Verdict(headers=[("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]),
    ),
    (
        "latin-1-value",
        CONNECT_KEYS,
        {"headers": {"X-A": "caf\xe9"}},
        Verdict(headers=[("X-A", "caf\xe9")]),
    ),
    (
        "tab-in-value",
        CONNECT_KEYS,
        {"headers": {"X-A": "a\tb"}},
        Verdict(headers=[("X-A", "a\tb")]),
    ),
    ("status-200", CONNECT_KEYS, {"status": 200}, Verdict(status=200)),
    ("status-599", CONNECT_KEYS, {"status": 599}, Verdict(status=599)),
    ("drop", CONNECT_KEYS, {"drop": True}, Verdict(drop=True)),
    ("no-drop", CONNECT_KEYS, {"drop": False}, Verdict()),
    ("fallback", CONNECT_KEYS, {"fallback": True}, Verdict(fallback=True)),
    (
        "target",
        CONNECT_KEYS,
        {"target": {"host": "10.0.0.5", "port": 8443}},
        Verdict(target=("10.0.0.5", 8443)),
    ),
    (
        "target-name",
        CONNECT_KEYS,
        {"target": {"host": "db.internal", "port": 1}},
        Verdict(target=("db.internal", 1)),
    ),
    (
        "target-ipv6",
        CONNECT_KEYS,
        {"target": {"host": "::1", "port": 65535}},
        Verdict(target=("::1", 65535)),
    ),
    (
        "set-and-remove",
        REQUEST_KEYS,
        {"set_headers": {"X-User": "alice"}, "remove_headers": ["Cookie", "x-secret"]},
        Verdict(set_headers={"X-User": "alice"}, remove_headers=["Cookie", "x-secret"]),
    ),
    ("remove-tuple", REQUEST_KEYS, {"remove_headers": ("X-A",)}, Verdict(remove_headers=["X-A"])),
    ("rewrite", REQUEST_KEYS, {"rewrite_path": "/v2/items"}, Verdict(rewrite_path="/v2/items")),
    ("rewrite-query", REQUEST_KEYS, {"rewrite_path": "/a?b=c&d"}, Verdict(rewrite_path="/a?b=c&d")),
    (
        "request-refusal",
        REQUEST_KEYS,
        {"allow": False, "status": 401},
        Verdict(allow=False, status=401),
    ),
    (
        "response",
        RESPONSE_KEYS,
        {"status": 299, "set_headers": {"X-A": "1"}, "remove_headers": ["Server"]},
        Verdict(status=299, set_headers={"X-A": "1"}, remove_headers=["Server"]),
    ),
]


@pytest.mark.parametrize(
    "allowed, answer, expected", [case[1:] for case in GOOD], ids=[case[0] for case in GOOD]
)
def test_merge_reads_a_good_verdict(
    allowed: frozenset[str], answer: dict[str, Any], expected: Verdict
) -> None:
    assert merge(Verdict(), answer, allowed) == expected


def test_the_keys_of_each_kind_of_hook() -> None:
    connect = {"allow", "status", "body", "headers", "target", "drop", "fallback"}
    assert connect <= CONNECT_KEYS
    assert REQUEST_KEYS == CONNECT_KEYS | {"set_headers", "remove_headers", "rewrite_path"}
    assert RESPONSE_KEYS == {"status", "set_headers", "remove_headers"}
    assert {"content-length", "transfer-encoding", "connection"} <= FRAMING_HEADERS


BAD: list[tuple[str, frozenset[str], object, str]] = [
    ("not-a-dict", CONNECT_KEYS, "allow", "expected a dict or None, got str"),
    ("a-list", CONNECT_KEYS, [("allow", False)], "expected a dict or None, got list"),
    ("a-bool", CONNECT_KEYS, False, "expected a dict or None, got bool"),
    (
        "unknown",
        CONNECT_KEYS,
        {"alow": False},
        "unknown key 'alow' (this hook may answer allow, body",
    ),
    (
        "connect-set-headers",
        CONNECT_KEYS,
        {"set_headers": {"X-A": "1"}},
        "unknown key 'set_headers'",
    ),
    ("connect-rewrite", CONNECT_KEYS, {"rewrite_path": "/"}, "unknown key 'rewrite_path'"),
    ("response-allow", RESPONSE_KEYS, {"allow": False}, "unknown key 'allow'"),
    (
        "response-target",
        RESPONSE_KEYS,
        {"target": {"host": "h", "port": 1}},
        "unknown key 'target'",
    ),
    ("response-body", RESPONSE_KEYS, {"body": "x"}, "unknown key 'body'"),
    ("response-drop", RESPONSE_KEYS, {"drop": True}, "unknown key 'drop'"),
    ("allow-int", CONNECT_KEYS, {"allow": 0}, "allow: expected True or False, got 0"),
    ("allow-str", CONNECT_KEYS, {"allow": "no"}, "allow: expected True or False, got 'no'"),
    ("drop-int", CONNECT_KEYS, {"drop": 1}, "drop: expected True or False, got 1"),
    ("fallback-none", CONNECT_KEYS, {"fallback": None}, "fallback: expected True or False"),
    ("status-bool", CONNECT_KEYS, {"status": True}, "status: expected an int in 100-599, got True"),
    ("status-str", CONNECT_KEYS, {"status": "200"}, "status: expected an int in 100-599"),
    ("status-float", CONNECT_KEYS, {"status": 200.0}, "status: expected an int in 100-599"),
    ("status-99", CONNECT_KEYS, {"status": 99}, "status: expected an int in 100-599, got 99"),
    ("status-600", CONNECT_KEYS, {"status": 600}, "status: expected an int in 100-599, got 600"),
    ("status-interim", CONNECT_KEYS, {"status": 101}, "status: 101 is an interim status"),
    ("response-interim", RESPONSE_KEYS, {"status": 103}, "status: 103 is an interim status"),
    ("body-int", CONNECT_KEYS, {"body": 1}, "body: expected str or bytes, got int"),
    ("headers-str", CONNECT_KEYS, {"headers": "X-A: 1"}, "headers: expected a dict of name: value"),
    (
        "headers-triple",
        CONNECT_KEYS,
        {"headers": [("X-A", "1", "2")]},
        "headers: expected name: value pairs",
    ),
    ("value-int", REQUEST_KEYS, {"set_headers": {"X-A": 1}}, "must be text without line breaks"),
    (
        "value-crlf",
        REQUEST_KEYS,
        {"set_headers": {"X-A": "1\r\nX-B: 2"}},
        "must be text without line breaks",
    ),
    (
        "value-lf",
        REQUEST_KEYS,
        {"set_headers": {"X-A": "1\nX-B: 2"}},
        "must be text without line breaks",
    ),
    (
        "value-cr",
        REQUEST_KEYS,
        {"set_headers": {"X-A": "1\rX-B: 2"}},
        "must be text without line breaks",
    ),
    (
        "value-nul",
        REQUEST_KEYS,
        {"set_headers": {"X-A": "1\x00"}},
        "must be text without line breaks",
    ),
    (
        "value-del",
        REQUEST_KEYS,
        {"set_headers": {"X-A": "1\x7f"}},
        "must be text without line breaks",
    ),
    (
        "value-not-latin-1",
        REQUEST_KEYS,
        {"set_headers": {"X-A": "\u2603"}},
        "must be text without line breaks",
    ),
    (
        "answer-value-crlf",
        CONNECT_KEYS,
        {"headers": {"X-A": "1\r\nX-B: 2"}},
        "must be text without line breaks",
    ),
    (
        "response-value-crlf",
        RESPONSE_KEYS,
        {"set_headers": {"X-A": "1\r\n\r\n<html>"}},
        "must be text without line breaks",
    ),
    (
        "name-crlf",
        REQUEST_KEYS,
        {"set_headers": {"X-A\r\nX-B": "1"}},
        "set_headers: 'X-A\\r\\nX-B' is not a header name",
    ),
    (
        "name-space",
        REQUEST_KEYS,
        {"set_headers": {"X A": "1"}},
        "set_headers: 'X A' is not a header name",
    ),
    ("name-colon", REQUEST_KEYS, {"set_headers": {"X-A:": "1"}}, "is not a header name"),
    (
        "name-empty",
        REQUEST_KEYS,
        {"set_headers": {"": "1"}},
        "set_headers: '' is not a header name",
    ),
    ("name-int", CONNECT_KEYS, {"headers": [(1, "1")]}, "headers: 1 is not a header name"),
    (
        "remove-crlf",
        REQUEST_KEYS,
        {"remove_headers": ["X-A\r\nX-B"]},
        "remove_headers: 'X-A\\r\\nX-B' is not a header name",
    ),
    (
        "remove-str",
        REQUEST_KEYS,
        {"remove_headers": "X-A"},
        "remove_headers: expected a list of names, got 'X-A'",
    ),
    (
        "remove-dict",
        REQUEST_KEYS,
        {"remove_headers": {"X-A": 1}},
        "remove_headers: expected a list of names",
    ),
    (
        "rewrite-relative",
        REQUEST_KEYS,
        {"rewrite_path": "v2"},
        "rewrite_path: expected a path starting with /",
    ),
    (
        "rewrite-empty",
        REQUEST_KEYS,
        {"rewrite_path": ""},
        "rewrite_path: expected a path starting with /",
    ),
    ("rewrite-space", REQUEST_KEYS, {"rewrite_path": "/a b"}, "rewrite_path: expected a path"),
    (
        "rewrite-crlf",
        REQUEST_KEYS,
        {"rewrite_path": "/a\r\nX-B: 1"},
        "rewrite_path: expected a path",
    ),
    (
        "rewrite-absolute",
        REQUEST_KEYS,
        {"rewrite_path": "http://elsewhere/"},
        "rewrite_path: expected a path",
    ),
    ("rewrite-int", REQUEST_KEYS, {"rewrite_path": 1}, "rewrite_path: expected a path"),
    (
        "target-str",
        CONNECT_KEYS,
        {"target": "10.0.0.5:80"},
        'target: expected {"host": ..., "port": ...}',
    ),
    (
        "target-extra",
        CONNECT_KEYS,
        {"target": {"host": "h", "port": 1, "tls": True}},
        'target: expected {"host"',
    ),
    (
        "target-no-port",
        CONNECT_KEYS,
        {"target": {"host": "h"}},
        "target: port must be an int in 1-65535, got None",
    ),
    (
        "target-port-0",
        CONNECT_KEYS,
        {"target": {"host": "h", "port": 0}},
        "target: port must be an int in 1-65535",
    ),
    (
        "target-port-big",
        CONNECT_KEYS,
        {"target": {"host": "h", "port": 65536}},
        "target: port must be an int",
    ),
    (
        "target-port-str",
        CONNECT_KEYS,
        {"target": {"host": "h", "port": "80"}},
        "target: port must be an int",
    ),
    (
        "target-port-bool",
        CONNECT_KEYS,
        {"target": {"host": "h", "port": True}},
        "target: port must be an int",
    ),
    (
        "target-no-host",
        CONNECT_KEYS,
        {"target": {"port": 80}},
        "target: host must be a host name or address, got None",
    ),
    (
        "target-empty-host",
        CONNECT_KEYS,
        {"target": {"host": "", "port": 80}},
        "target: host must be a host name",
    ),
    (
        "target-host-space",
        CONNECT_KEYS,
        {"target": {"host": "a b", "port": 80}},
        "target: host must be a host name",
    ),
    (
        "target-host-slash",
        CONNECT_KEYS,
        {"target": {"host": "a/b", "port": 80}},
        "target: host must be a host name",
    ),
    (
        "target-host-crlf",
        CONNECT_KEYS,
        {"target": {"host": "a\r\nb", "port": 80}},
        "target: host must be a host name",
    ),
]


@pytest.mark.parametrize(
    "allowed, answer, message", [case[1:] for case in BAD], ids=[case[0] for case in BAD]
)
def test_merge_refuses_a_bad_verdict(allowed: frozenset[str], answer: object, message: str) -> None:
    with pytest.raises(BadVerdict) as raised:
        merge(Verdict(), answer, allowed)
    assert message in str(raised.value)


@pytest.mark.parametrize("name", sorted(FRAMING_HEADERS))
@pytest.mark.parametrize("key", ["set_headers", "remove_headers", "headers"])
def test_framing_headers_are_the_proxys_to_set(key: str, name: str) -> None:
    for spelled in (name, name.upper(), name.title()):
        answer: dict[str, Any] = {key: [spelled] if key == "remove_headers" else {spelled: "x"}}
        with pytest.raises(BadVerdict, match=f"{key}: {spelled} frames the message"):
            merge(Verdict(), answer, REQUEST_KEYS)


def test_merge_adds_each_answer_to_what_the_earlier_ones_said() -> None:
    verdict = merge(
        Verdict(), {"set_headers": {"X-A": "1", "X-B": "1"}, "headers": {"X-H": "1"}}, REQUEST_KEYS
    )
    verdict = merge(
        verdict,
        {"set_headers": {"X-B": "2"}, "remove_headers": ["X-C"], "headers": {"X-H": "2"}},
        REQUEST_KEYS,
    )
    assert verdict.set_headers == {"X-A": "1", "X-B": "2"}  # a later hook sets the same name
    assert verdict.remove_headers == ["X-C"]
    assert verdict.headers == [("X-H", "1"), ("X-H", "2")]
    verdict = merge(verdict, {"allow": False}, REQUEST_KEYS)
    verdict = merge(verdict, {"allow": True, "drop": False}, REQUEST_KEYS)
    assert not verdict.allow and not verdict.drop  # a refusal is not taken back
    assert verdict.stops


# -- run_hooks -----------------------------------------------------------------------------------


def chain(kind: str, *hooks: HookFn, fail: str = "closed", timeout: float = 1.0) -> Hooks:
    return Hooks(**{kind: hooks}, fail=fail, timeout=timeout)  # type: ignore[arg-type]


def answering(answer: object, calls: list[str], name: str) -> HookFn:
    async def hook(*args: Any) -> Any:
        calls.append(name)
        return answer

    hook.__qualname__ = name
    return hook


async def boom(*args: Any) -> Any:
    raise RuntimeError("boom")


async def sleepy(*args: Any) -> Any:
    await asyncio.sleep(10)


def hook_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "smartroute.hooks"]


@async_test()
async def test_hooks_that_say_nothing_give_no_verdict() -> None:
    calls: list[str] = []
    hooks = chain("on_connect", answering(None, calls, "a"), answering(None, calls, "b"))
    assert await run_hooks(hooks, "on_connect", CONNECT_KEYS, CTX) is None
    assert calls == ["a", "b"]


@async_test()
async def test_each_hook_gets_the_context_and_the_request() -> None:
    seen: list[tuple[Any, ...]] = []

    async def hook(*args: Any) -> None:
        seen.append(args)

    request = HookRequest("GET", "/", None, {"host": "x"})
    await run_hooks(chain("on_request", hook), "on_request", REQUEST_KEYS, CTX, request)
    assert seen == [(CTX, request)]


@pytest.mark.parametrize(
    "stopping",
    [{"allow": False}, {"drop": True}, {"fallback": True}],
    ids=["refusal", "drop", "fallback"],
)
@async_test()
async def test_the_first_stopping_verdict_ends_the_run(stopping: dict[str, Any]) -> None:
    calls: list[str] = []
    hooks = chain(
        "on_request",
        answering({"set_headers": {"X-A": "1"}}, calls, "a"),
        answering(stopping, calls, "b"),
        answering({"allow": False, "status": 402}, calls, "c"),
    )
    said = await run_hooks(hooks, "on_request", REQUEST_KEYS, CTX, None)
    assert calls == ["a", "b"]
    assert said is not None and said.status is None
    assert said == merge(Verdict(set_headers={"X-A": "1"}), stopping, REQUEST_KEYS)


@async_test()
async def test_verdicts_merge_in_hook_order() -> None:
    calls: list[str] = []
    hooks = chain(
        "on_request",
        answering({"set_headers": {"X-A": "1"}, "rewrite_path": "/one"}, calls, "a"),
        answering(None, calls, "b"),
        answering({"set_headers": {"X-A": "2"}, "target": {"host": "h", "port": 1}}, calls, "c"),
    )
    said = await run_hooks(hooks, "on_request", REQUEST_KEYS, CTX, None)
    assert said == Verdict(set_headers={"X-A": "2"}, rewrite_path="/one", target=("h", 1))


FAILING: list[tuple[str, HookFn, str]] = [
    ("raises", boom, "hook boom (on_request) raised RuntimeError: boom"),
    ("times-out", sleepy, "hook sleepy (on_request) did not answer within 0.05s"),
    (
        "bad-verdict",
        answering({"alow": False}, [], "typo"),
        "hook typo (on_request) answered a bad verdict: unknown key 'alow'",
    ),
    (
        "not-a-dict",
        answering(True, [], "yes"),
        "hook yes (on_request) answered a bad verdict: expected a dict or None, got bool",
    ),
]


@pytest.mark.parametrize("failing, why", [c[1:] for c in FAILING], ids=[c[0] for c in FAILING])
@async_test()
async def test_a_failing_hook_refuses_under_closed(
    failing: HookFn, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []
    hooks = chain(
        "on_request",
        answering(None, calls, "a"),
        failing,
        answering(None, calls, "c"),
        timeout=0.05,
    )
    said = await run_hooks(hooks, "on_request", REQUEST_KEYS, CTX, None)
    assert said is not None and said.failed is not None and said.stops
    assert said.failed.startswith(why)
    assert calls == ["a"]  # nothing after the failure runs
    (line,) = hook_lines(caplog)
    assert line.startswith(why) and line.endswith("; refusing c1 (hooks_fail: closed)")


@pytest.mark.parametrize("failing, why", [c[1:] for c in FAILING], ids=[c[0] for c in FAILING])
@async_test()
async def test_a_failing_hook_is_skipped_under_open(
    failing: HookFn, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []
    hooks = chain(
        "on_request",
        failing,
        answering({"set_headers": {"X-A": "1"}}, calls, "b"),
        fail="open",
        timeout=0.05,
    )
    said = await run_hooks(hooks, "on_request", REQUEST_KEYS, CTX, None)
    assert said == Verdict(set_headers={"X-A": "1"})
    assert calls == ["b"]
    (line,) = hook_lines(caplog)
    assert line.startswith(why) and line.endswith("; skipped (hooks_fail: open) for c1")


@async_test()
async def test_a_skipped_bad_verdict_changes_nothing() -> None:
    calls: list[str] = []
    hooks = chain(
        "on_request",
        answering({"set_headers": {"X-A": "1"}}, calls, "a"),
        answering({"allow": False, "set_headers": {"X-A": "2"}, "alow": True}, calls, "b"),
        fail="open",
    )
    said = await run_hooks(hooks, "on_request", REQUEST_KEYS, CTX, None)
    assert said == Verdict(set_headers={"X-A": "1"})


@async_test()
async def test_a_hook_method_is_named_by_its_qualified_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Auth:
        async def on_connect(self, ctx: RouteContext) -> None:
            raise ValueError("no token")

    hooks = chain("on_connect", Auth().on_connect)
    said = await run_hooks(hooks, "on_connect", CONNECT_KEYS, CTX)
    assert said is not None and said.failed is not None
    assert "Auth.on_connect (on_connect) raised ValueError: no token" in said.failed


@async_test()
async def test_each_disconnect_hook_is_told_and_a_failing_one_only_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    infos: list[dict[str, Any]] = []

    async def spoil(ctx: RouteContext, info: dict[str, Any]) -> None:
        info["bytes_in"] = -1
        raise RuntimeError("boom")

    async def keep(ctx: RouteContext, info: dict[str, Any]) -> None:
        infos.append(info)

    info = {"bytes_in": 3, "bytes_out": 4, "duration": 0.5, "target": "h:1", "error": None}
    hooks = Hooks(on_disconnect=(spoil, sleepy, keep), timeout=0.05)
    await run_disconnect_hooks(hooks, CTX, info)
    assert infos == [info] and info["bytes_in"] == 3  # each hook has its own copy
    lines = hook_lines(caplog)
    assert len(lines) == 2
    assert "spoil (on_disconnect) raised RuntimeError: boom (connection c1)" in lines[0]
    assert "sleepy (on_disconnect) did not answer within 0.05s" in lines[1]


# -- consult_response ----------------------------------------------------------------------------


def request_head(target: str = "/path?q=1", *headers: str) -> RequestHead:
    raw = "\r\n".join([f"GET {target} HTTP/1.1", "Host: example.test", *headers]) + "\r\n\r\n"
    head = parse_request_head(raw.encode())
    assert head is not None
    return head


def response_head(status: int = 200, *headers: str) -> ResponseHead:
    raw = "\r\n".join([f"HTTP/1.1 {status} Whatever", *headers]) + "\r\n\r\n"
    head = parse_response_head(raw.encode())
    assert head is not None
    return head


def on_response(answer: object, fail: str = "closed") -> tuple[Hooks, list[tuple[Any, ...]]]:
    seen: list[tuple[Any, ...]] = []

    async def hook(*args: Any) -> Any:
        seen.append(args)
        return answer

    return Hooks(on_response=(hook,), fail=fail), seen  # type: ignore[arg-type]


@async_test()
async def test_on_response_sees_the_request_and_the_response() -> None:
    hooks, seen = on_response(None)
    response = response_head(200, "Content-Type: text/plain", "Set-Cookie: a=1", "set-cookie: b=2")
    head = request_head("/path?q=1", "X-Req: 1")
    assert await consult_response(hooks, CTX, head, response) is response
    ((ctx, request, seen_response),) = seen
    assert ctx is CTX
    assert request == HookRequest("GET", "/path", "q=1", {"host": "example.test", "x-req": "1"})
    assert seen_response == HookResponse(
        200, {"content-type": "text/plain", "set-cookie": "a=1, b=2"}
    )


@async_test()
async def test_on_response_changes_the_status_and_headers() -> None:
    hooks, _ = on_response(
        {"status": 299, "set_headers": {"x-a": "new", "X-B": "b"}, "remove_headers": ["SERVER"]}
    )
    response = response_head(200, "Server: s", "X-A: old", "Content-Length: 2", "X-Kept: k")
    changed = await consult_response(hooks, CTX, request_head(), response)
    assert changed.status == 299
    assert changed.headers == (
        ("Content-Length", "2"),
        ("X-Kept", "k"),
        ("x-a", "new"),
        ("X-B", "b"),
    )


@async_test()
async def test_on_response_headers_alone_keep_the_status_and_reason() -> None:
    hooks, _ = on_response({"set_headers": {"X-A": "1"}})
    changed = await consult_response(hooks, CTX, request_head(), response_head(404))
    assert (changed.status, changed.reason) == (404, "Whatever")
    assert changed.headers == (("X-A", "1"),)


@pytest.mark.parametrize(
    "before, after", [(200, 204), (200, 304), (204, 200), (304, 200), (204, 304)]
)
@async_test()
async def test_on_response_cannot_change_whether_a_response_has_a_body(
    before: int, after: int, caplog: pytest.LogCaptureFixture
) -> None:
    verdict = {"status": after, "set_headers": {"X-A": "1"}}
    hooks, _ = on_response(verdict)
    with pytest.raises(HookFailed, match=f"may not turn a {before} into a {after}"):
        await consult_response(hooks, CTX, request_head(), response_head(before))
    hooks, _ = on_response(verdict, fail="open")
    changed = await consult_response(hooks, CTX, request_head(), response_head(before))
    assert changed.status == before and changed.headers == (("X-A", "1"),)
    lines = hook_lines(caplog)
    assert "refusing c1 (hooks_fail: closed)" in lines[0]
    assert "skipped (hooks_fail: open)" in lines[1]


@async_test()
async def test_on_response_may_keep_a_bodiless_status() -> None:
    hooks, _ = on_response({"status": 204})
    changed = await consult_response(hooks, CTX, request_head(), response_head(204))
    assert changed.status == 204


@async_test()
async def test_a_failing_on_response_hook_withholds_the_response_under_closed_only() -> None:
    hooks = Hooks(on_response=(boom,))
    with pytest.raises(HookFailed, match="raised RuntimeError: boom"):
        await consult_response(hooks, CTX, request_head(), response_head())
    hooks = Hooks(on_response=(boom,), fail="open")
    response = response_head()
    assert await consult_response(hooks, CTX, request_head(), response) is response


# -- rewrite_request -----------------------------------------------------------------------------


def test_a_verdict_without_changes_keeps_the_request() -> None:
    head = request_head()
    assert rewrite_request(head, Verdict(target=("h", 1))) is head


def test_rewrite_request_removes_then_sets_headers() -> None:
    head = request_head("/", "X-Secret: 1", "x-secret: 2", "X-User: mallory", "X-Kept: k")
    said = Verdict(set_headers={"X-User": "alice"}, remove_headers=["X-SECRET"])
    changed = rewrite_request(head, said)
    assert changed.headers == (("Host", "example.test"), ("X-Kept", "k"), ("X-User", "alice"))
    assert (changed.path, changed.query) == ("/", None)


@pytest.mark.parametrize(
    "target, rewrite, origin",
    [
        ("/old?x=1", "/new", "/new?x=1"),  # no query in the rewrite: the request's stays
        ("/old", "/new", "/new"),
        ("/old?x=1", "/new?y=2", "/new?y=2"),  # a query in the rewrite replaces it
        ("/old", "/new?y=2", "/new?y=2"),
        ("/old?x=1", "/new?", "/new?"),  # an empty query, as written
    ],
)
def test_rewrite_path(target: str, rewrite: str, origin: str) -> None:
    head = request_head(target, "X-A: 1")
    changed = rewrite_request(head, Verdict(rewrite_path=rewrite))
    assert changed.origin == origin
    assert changed.headers == head.headers and changed.method == "GET"


# -- configuration -------------------------------------------------------------------------------


class AllHooks:
    async def on_connect(self, ctx: RouteContext) -> None:
        return None

    async def on_request(self, ctx: RouteContext, request: HookRequest) -> None:
        return None

    async def on_response(
        self, ctx: RouteContext, request: HookRequest, response: HookResponse
    ) -> None:
        return None

    async def on_disconnect(self, ctx: RouteContext, info: dict[str, Any]) -> None:
        return None

    def on_data(self, ctx: RouteContext, direction: str, data: bytes) -> None:
        return None


class SyncRequest:
    def on_request(self, ctx: RouteContext, request: HookRequest) -> None:
        return None


class AsyncData:
    async def on_data(self, ctx: RouteContext, direction: str, data: bytes) -> None:
        return None


class NotAMethod:
    on_connect = 5


IMPORTED = AllHooks()  # found by an import path in the tests below


def route(**fields: Any) -> dict[str, Any]:
    return {"match": {"ports": 8080}, "action": {"type": "block"}, **fields}


def test_a_route_takes_hook_objects_and_import_paths() -> None:
    hook = AllHooks()
    compiled = validate_route(route(hooks=[hook, f"{__name__}:IMPORTED"], hooks_fail="open"), 0)
    assert compiled.hooks == (hook, IMPORTED)
    assert compiled.hooks_fail == "open"
    assert validate_route(route(), 0).hooks_fail == "closed"
    assert validate_route(route(hooks=hook), 0).hooks == (hook,)  # one hook, not in a list
    assert validate_route(route(hooks=[]), 0).hooks == ()


BAD_HOOKS: list[tuple[str, object, str, str]] = [
    (
        "no-hook-method",
        [object()],
        "route.hooks[0]",
        "object has none of the hook methods (on_connect, on_request, on_response, on_disconnect, on_data)",
    ),
    ("a-function", [boom], "route.hooks[0]", "has none of the hook methods"),
    ("one-object", object(), "route.hooks", "has none of the hook methods"),
    ("second-of-two", [AllHooks(), object()], "route.hooks[1]", "has none of the hook methods"),
    (
        "sync-on-request",
        [SyncRequest()],
        "route.hooks[0].on_request",
        "on_request must be a coroutine (async def)",
    ),
    (
        "async-on-data",
        [AsyncData()],
        "route.hooks[0].on_data",
        "on_data must be a plain function (def, not async def)",
    ),
    ("not-a-method", [NotAMethod()], "route.hooks[0].on_connect", "expected a method, got 5"),
    (
        "no-colon",
        ["smartroute.hooks"],
        "route.hooks[0]",
        "'smartroute.hooks' is not an import path",
    ),
    ("no-attribute", ["smartroute:"], "route.hooks[0]", "is not an import path"),
    (
        "no-module",
        ["no_such_module_for_hooks:hook"],
        "route.hooks[0]",
        "cannot import 'no_such_module_for_hooks:hook' (ModuleNotFoundError",
    ),
    (
        "missing-attribute",
        [f"{__name__}:MISSING"],
        "route.hooks[0]",
        f"cannot import '{__name__}:MISSING' (AttributeError",
    ),
    ("imports-no-hook", [f"{__name__}:CTX"], "route.hooks[0]", "has none of the hook methods"),
]


@pytest.mark.parametrize(
    "hooks, path, problem", [c[1:] for c in BAD_HOOKS], ids=[c[0] for c in BAD_HOOKS]
)
def test_bad_hooks_are_config_errors_at_their_path(hooks: object, path: str, problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        validate_route(route(hooks=hooks), 0)
    assert raised.value.path == path
    assert problem in raised.value.problem


def test_hooks_fail_is_closed_or_open() -> None:
    assert validate_route(route(hooks_fail=None), 0).hooks_fail == "closed"  # None: not given
    with pytest.raises(ConfigError) as raised:
        validate_route(route(hooks_fail="half"), 0)
    assert raised.value.path == "route.hooks_fail"
    assert raised.value.problem == 'unknown hooks_fail mode "half" (expected "closed" or "open")'


@pytest.mark.parametrize("value", ["CLOSED", "", True, 0, ["open"]])
def test_a_bad_hooks_fail_mode_is_a_config_error(value: object) -> None:
    with pytest.raises(ConfigError) as raised:
        validate_route(route(hooks_fail=value), 0)
    assert raised.value.path == "route.hooks_fail"
    assert raised.value.problem.startswith("unknown hooks_fail mode ")


def test_the_path_names_the_route_in_a_route_set() -> None:
    with pytest.raises(ConfigError) as raised:
        validate_routes([route(), route(hooks=[AllHooks(), SyncRequest()])])
    assert raised.value.path == "routes[1].hooks[1].on_request"
    with pytest.raises(ConfigError) as raised:
        validate_routes([route(hooks_fail="half")])
    assert raised.value.path == "routes[0].hooks_fail"


def test_proxy_wide_hooks_and_their_timeout_are_settings() -> None:
    hook = AllHooks()
    settings = validate_settings({"hooks": [hook, f"{__name__}:IMPORTED"], "hook_timeout": 0.25})
    assert settings.hooks == (hook, IMPORTED)
    assert settings.hook_timeout == 0.25
    assert validate_settings({}).hook_timeout == 1.0 and validate_settings({}).hooks == ()


@pytest.mark.parametrize(
    "raw, path, problem",
    [
        ({"hooks": [object()]}, "settings.hooks[0]", "has none of the hook methods"),
        ({"hooks": [AsyncData()]}, "settings.hooks[0].on_data", "on_data must be a plain function"),
        ({"hooks": ["nowhere"]}, "settings.hooks[0]", "'nowhere' is not an import path"),
        ({"hook_timeout": 0}, "settings.hook_timeout", "must be a finite number greater than 0"),
        ({"hook_timeout": -1}, "settings.hook_timeout", "must be a finite number greater than 0"),
        ({"hook_timeout": "1"}, "settings.hook_timeout", "expected a number of seconds"),
        ({"hooks_fail": "open"}, "settings.hooks_fail", "unknown setting"),
    ],
)
def test_bad_hook_settings_are_config_errors_at_their_path(
    raw: dict[str, object], path: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        validate_settings(raw)
    assert raised.value.path == path
    assert problem in raised.value.problem
