"""The redirect action: template rendering, and no request can inject headers or change host."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smartroute.routing.model import RedirectAction
from smartroute.server.http.messages import RequestInfo, Response, response_head
from smartroute.server.http.redirect import render_redirect

HTTPS = "https://{domain}{path}{query}"


def request(
    path: str = "/",
    query: str | None = None,
    *,
    host: str | None = "example.com",
    port: int = 80,
    method: str = "GET",
) -> RequestInfo:
    return RequestInfo(
        method=method, path=path, query=query, headers={}, host=host, port=port, is_tls=False
    )


def location(response: Response) -> str:
    values = [v for n, v in response.headers if n.lower() == "location"]
    assert len(values) == 1
    return values[0]


def redirect(template: str, req: RequestInfo, status: int = 301) -> Response:
    return render_redirect(RedirectAction(to=template, status=status), req)


def assert_safe(value: str) -> None:
    """One header line: printable ASCII, no spaces or controls."""
    assert "\r" not in value and "\n" not in value
    assert all(0x21 <= ord(char) <= 0x7E for char in value), value


RENDERED: list[tuple[str, RequestInfo, str]] = [
    ("https://{domain}{path}", request("/a/b"), "https://example.com/a/b"),
    ("https://{domain}{path}", request("/a/b", "x=1"), "https://example.com/a/b"),
    (HTTPS, request("/a/b", "x=1&y=2"), "https://example.com/a/b?x=1&y=2"),
    (HTTPS, request("/a", ""), "https://example.com/a?"),
    (HTTPS, request("/a", None), "https://example.com/a"),
    (HTTPS, request("/"), "https://example.com/"),
    ("https://{domain}:8443{path}{query}", request("/x", "q"), "https://example.com:8443/x?q"),
    ("http://{domain}:{port}{path}", request("/x", port=8080), "http://example.com:8080/x"),
    ("https://new.example.org/", request("/old"), "https://new.example.org/"),
    ("https://new.example.org{path}", request("/old", host=None), "https://new.example.org/old"),
    ("{path}{query}", request("/rel", "a=b"), "/rel?a=b"),
    ("https://{domain}/from/{domain}", request(), "https://example.com/from/example.com"),
    ("https://{domain}/?port={port}", request(port=81), "https://example.com/?port=81"),
    (HTTPS, request("/x", host="::1"), "https://[::1]/x"),
    (HTTPS, request("/x", host="[2001:DB8::1]"), "https://[2001:db8::1]/x"),
    (HTTPS, request("/x", host="10.0.0.1"), "https://10.0.0.1/x"),
    (HTTPS, request("/x", host="Example.COM."), "https://example.com/x"),
    (HTTPS, request("/x", host="my_service"), "https://my_service/x"),
    # the percent-encoded form is kept; raw characters that need it get it
    (HTTPS, request("/caf%C3%A9"), "https://example.com/caf%C3%A9"),
    (HTTPS, request("/caf\u00e9"), "https://example.com/caf%C3%A9"),
    (HTTPS, request("/a%zz%4"), "https://example.com/a%25zz%254"),
    (HTTPS, request("/a b", "c d"), "https://example.com/a%20b?c%20d"),
    (HTTPS, request("/a", "x=/?:@!$'()*+,;"), "https://example.com/a?x=/?:@!$'()*+,;"),
    (HTTPS, request("/a#b", "c#d"), "https://example.com/a%23b?c%23d"),
    (HTTPS, request("/{x}|^`"), "https://example.com/%7Bx%7D%7C%5E%60"),
    ("https://{domain}/{other}", request(), "https://example.com/%7Bother%7D"),
    ("https://{domain}/{{path}}", request("/p"), "https://example.com/%7B/p%7D"),
    ("https://{domain}/a b", request(), "https://example.com/a%20b"),
]


@pytest.mark.parametrize(("template", "req", "expected"), RENDERED)
def test_template_rendering(template: str, req: RequestInfo, expected: str) -> None:
    response = redirect(template, req)
    assert response.status == 301
    assert location(response) == expected
    assert expected in response.body.decode()


INJECTIONS: list[tuple[str, str | None]] = [
    ("/%0d%0aSet-Cookie:%20a=b", None),
    ("/\r\nSet-Cookie: a=b", None),
    ("/\nLocation: https://evil.com", None),
    ("/", "a\r\nSet-Cookie: x=1"),
    ("/", "\r\n\r\n<html>"),
    ("//evil.com", None),
    ("///evil.com/x", "y"),
    ("/\\evil.com", None),
    ("\\\\evil.com", None),
    ("/\t/evil.com", None),
    ("@evil.com", None),  # would be userinfo after the host
    (":80@evil.com", None),
    ("evil.com", None),
    ("", None),
    ("*", None),
    ("/%2F%2Fevil.com", None),
    ("/x", "#@evil.com"),
    ("/\x00\x7f\x85\u2028", "\x0b\x0c\u0085"),
]


@pytest.mark.parametrize(("path", "query"), INJECTIONS)
@pytest.mark.parametrize("template", [HTTPS, "http://{domain}:{port}{path}{query}"])
def test_injection_keeps_one_header_and_the_host(
    template: str, path: str, query: str | None
) -> None:
    response = redirect(template, request(path, query))
    value = location(response)
    assert_safe(value)
    assert value.startswith(("https://example.com/", "http://example.com:80/"))
    assert urlsplit(value).hostname == "example.com"
    head = response_head(response, keep_alive=False)
    assert head.count(b"\r\n") == len(response.headers) + 4  # status, headers, 2 added, blank


@pytest.mark.parametrize(("path", "query"), INJECTIONS)
def test_relative_template_stays_on_this_host(path: str, query: str | None) -> None:
    value = location(redirect("{path}{query}", request(path, query)))
    assert_safe(value)
    assert value.startswith("/") and not value.startswith("//")
    assert urlsplit(value).netloc == ""


@pytest.mark.parametrize(
    "host",
    [
        "evil.com/",
        "a b",
        "user@evil.com",
        "evil.com:80",
        "evil.com\r\nX: y",
        "evil.com#",
        "evil.com?",
        "evil.com\\",
        "[::1]:80",
        "::1%eth0",
        "fe80::1%25eth0",
        "[not-ipv6]",
        "ex\u00e4mple.com",
        "",
        "a" * 254,
    ],
)
def test_bad_host_is_400(host: str) -> None:
    response = redirect(HTTPS, request("/x", host=host))
    assert response.status == 400
    assert not [v for n, v in response.headers if n.lower() == "location"]


def test_bad_host_does_not_matter_without_domain() -> None:
    response = redirect("https://fixed.example/{path}", request("/x", host="a b"))
    assert response.status == 301
    assert location(response) == "https://fixed.example//x"  # the template's own slash


def test_missing_host_is_400_only_when_domain_is_used() -> None:
    response = redirect(HTTPS, request("/x", host=None))
    assert response.status == 400
    assert b"Host" in response.body
    assert redirect("https://fixed.example{path}", request("/x", host=None)).status == 301


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_statuses(status: int) -> None:
    response = redirect(HTTPS, request("/p", "q=1", method="POST"), status=status)
    assert response.status == status
    assert location(response) == "https://example.com/p?q=1"
    assert response.body == b"redirecting to https://example.com/p?q=1\n"
    assert response.file is None


HOSTS = ["example.com", "a.b-c.example", "10.0.0.1", "::1", "2001:db8::2"]


@settings(max_examples=500, deadline=None)
@given(
    path=st.text() | st.sampled_from(["//evil.com", "/\\evil.com", "@evil.com", "\r\n"]),
    query=st.none() | st.text(),
    host=st.sampled_from(HOSTS),
    template=st.sampled_from([HTTPS, "http://{domain}:{port}{path}{query}", "{path}{query}"]),
)
def test_location_is_always_safe(path: str, query: str | None, host: str, template: str) -> None:
    response = redirect(template, request(path, query, host=host, port=8080))
    assert response.status == 301
    value = location(response)
    assert_safe(value)
    parts = urlsplit(value)
    if template.startswith("{path}"):
        assert value.startswith("/") and not value.startswith("//")
        assert parts.netloc == ""
    else:
        assert parts.hostname == host.lower()
        assert parts.username is None and parts.password is None
    # A WHATWG parser treats "\" like "/"; with none left, urlsplit's view is the browser's.
    assert "\\" not in value
    if query is None:
        assert "?" not in value  # a "?" in the path is quoted, so no query appears from nowhere
    response_head(response, keep_alive=True)  # encodes as latin-1 without error
