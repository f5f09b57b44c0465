"""The ``static`` and ``redirect`` actions end to end: curl and raw sockets -> SmartRoute on HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from http_backend import http_backend
from support import LOOPBACK, TestCA, async_test, curl, free_port

from smartroute import SmartRoute
from smartroute.protocols.http_response import ResponseHead, parse_response_head

SECRET = "TOP-SECRET-7f3a9c-never-served"
PNG = (
    bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489")
    + b"\x00" * 64
)
INDEX = b"<!doctype html><title>home</title><p>hello from the static root</p>\n"
CSS = b"body { color: #123456; margin: 0 auto; }\n"

# -- helpers -----------------------------------------------------------------------------------


def proxy(routes: list[dict[str, Any]], **settings: Any) -> SmartRoute:
    settings.setdefault("bind_address", LOOPBACK)
    settings.setdefault("initial_data_timeout", 5)
    return SmartRoute(routes, **settings)


def static_route(port: int, root: Path, *, name: str = "static", **match: Any) -> dict[str, Any]:
    return {
        "name": name,
        "match": {"ports": port, **match},
        "action": {"type": "static", "static": {"root": str(root), "index": ["index.html"]}},
    }


def redirect_route(
    port: int, to: str, *, status: int = 301, name: str = "redirect", **match: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "match": {"ports": port, **match},
        "action": {"type": "redirect", "redirect": {"to": to, "status": status}},
    }


@dataclass(frozen=True)
class Site:
    root: Path  # served
    secret: Path  # next to the root, never served


def build_site(base: Path) -> Site:
    root = base / "www"
    (root / "assets").mkdir(parents=True)
    (root / "a").mkdir()
    (root / "index.html").write_bytes(INDEX)
    (root / "style.css").write_bytes(CSS)
    (root / "logo.png").write_bytes(PNG)
    (root / "assets" / "app.css").write_bytes(CSS)
    secret = base / "secret.txt"
    secret.write_text(SECRET + "\n")
    (root / "link-out").symlink_to(base, target_is_directory=True)  # a way out of the root
    (root / "secret-link.txt").symlink_to(secret)
    return Site(root, secret)


async def read_response(
    reader: asyncio.StreamReader, *, head_only: bool = False
) -> tuple[ResponseHead, bytes]:
    """One response framed by Content-Length (or by closing); later responses stay in ``reader``."""
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    head = parse_response_head(raw)
    assert head is not None and head.length == len(raw), raw  # nothing left of an earlier body
    if head_only or head.status in (204, 304):
        return head, b""
    length = head.header("content-length")
    if length is not None:
        return head, await asyncio.wait_for(reader.readexactly(int(length)), 10)
    return head, await asyncio.wait_for(reader.read(), 10)


async def raw_exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` on a fresh connection and return every byte until the proxy closes it."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(request)
        data = b""
        while chunk := await asyncio.wait_for(reader.read(65536), 10):
            data += chunk
        return data
    finally:
        writer.close()


def headers_of(text: str) -> dict[str, str]:
    """The header block of ``curl -I`` / ``curl -D -`` output, names lower-cased."""
    found = {}
    for line in text.split("\r\n\r\n")[0].split("\r\n")[1:]:
        name, _, value = line.partition(":")
        found[name.strip().lower()] = value.strip()
    return found


# -- 1. files with the right headers, HEAD, ranges, conditional requests, keep-alive -----------


@async_test(60)
async def test_curl_gets_files_types_head_range_etag_and_reuses_the_connection(
    tmp_path: Path,
) -> None:
    site = build_site(tmp_path)
    port = free_port()
    base = f"http://{LOOPBACK}:{port}"
    async with proxy([static_route(port, site.root)]):
        for path, content_type, body in (
            ("/", "text/html; charset=utf-8", INDEX),
            ("/index.html", "text/html; charset=utf-8", INDEX),
            ("/style.css", "text/css; charset=utf-8", CSS),
            ("/logo.png", "image/png", PNG),
        ):
            out_file = tmp_path / "out.bin"
            code, out, err = await curl(
                "-o", str(out_file), "-w", "%{http_code} %{content_type}", base + path
            )
            assert code == 0, err
            assert out == f"200 {content_type}", (path, out)
            assert out_file.read_bytes() == body, path

        code, out, err = await curl("-I", base + "/style.css")
        assert code == 0, err
        assert out.startswith("HTTP/1.1 200"), out
        headers = headers_of(out)
        assert headers["content-length"] == str(len(CSS))
        assert headers["content-type"] == "text/css; charset=utf-8"
        assert headers["last-modified"].endswith(" GMT")
        etag = headers["etag"]
        assert re.fullmatch(r'"[0-9a-f]+-[0-9a-f]+"', etag), etag
        # On the wire: HEAD has the headers of GET and no body; the next answer follows at once.
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(
            b"HEAD /logo.png HTTP/1.1\r\nHost: x\r\n\r\nGET /style.css HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        head, _ = await read_response(reader, head_only=True)
        assert head.status == 200 and head.header("content-length") == str(len(PNG))
        assert head.header("content-type") == "image/png"
        head, body = await read_response(reader)  # asserts no body bytes came before it
        assert head.status == 200 and body == CSS
        writer.close()

        code, out, err = await curl("--range", "0-9", "-D", "-", base + "/style.css")
        assert code == 0, err
        assert out.startswith("HTTP/1.1 206"), out
        assert out.partition("\r\n\r\n")[2] == CSS[:10].decode()
        assert headers_of(out)["content-range"] == f"bytes 0-9/{len(CSS)}"

        code, out, err = await curl("-H", f"If-None-Match: {etag}", "-D", "-", base + "/style.css")
        assert code == 0, err
        assert out.startswith("HTTP/1.1 304") and out.endswith("\r\n\r\n"), out
        assert headers_of(out)["etag"] == etag
        code, out, err = await curl(
            "-H",
            'If-None-Match: "other"',
            "-w",
            "%{http_code}",
            "-o",
            os.devnull,
            base + "/style.css",
        )
        assert out == "200"

        code, out, err = await curl("-v", base + "/style.css", base + "/index.html")
        assert code == 0, err
        assert "Re-using existing connection" in err or "Reusing existing" in err, err
        assert err.count("Connected to") == 1, err
        assert out.encode() == CSS + INDEX

        code, out, err = await curl("-w", "%{http_code}", "-o", os.devnull, base + "/missing.txt")
        assert out == "404"
        code, out, err = await curl(
            "-w", "%{http_code} %{redirect_url}", "-o", os.devnull, base + "/a?x=1"
        )
        assert out == f"301 {base}/a/?x=1"  # a directory without its slash


# -- 2. traversal attempts, end to end ---------------------------------------------------------

TRAVERSALS = [
    "/../secret.txt",
    "/%2e%2e/secret.txt",
    "/%2e%2e%2fsecret.txt",
    "/..%2fsecret.txt",
    "/%2E%2E%2Fsecret.txt",
    "/a/../../secret.txt",
    "/a/%2e%2e/%2e%2e/secret.txt",
    "/./../secret.txt",
    "/..%5csecret.txt",
    "/%00",
    "/index.html%00.png",
    "/link-out/secret.txt",
    "/link-out/www/../secret.txt",
    "/secret-link.txt",
    "//../secret.txt",
    "/%252e%252e/secret.txt",
]


@async_test(60)
async def test_traversal_attempts_never_leave_the_root(tmp_path: Path) -> None:
    site = build_site(tmp_path)
    port = free_port()
    async with proxy([static_route(port, site.root)]):
        for path in TRAVERSALS:
            for method in ("GET", "HEAD"):
                answer = await raw_exchange(
                    port,
                    f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
                )
                head = parse_response_head(answer)
                assert head is not None, (path, answer)
                assert head.status in (400, 404), (method, path, answer)
                assert SECRET.encode() not in answer, (method, path)
        # Targets that are not origin-form at all.
        for target in ("../secret.txt", "secret.txt", f"http://x{site.secret}", "*"):
            answer = await raw_exchange(
                port, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
            )
            assert SECRET.encode() not in answer, target
            head = parse_response_head(answer)
            assert head is not None and head.status in (400, 404), (target, answer)
        for path in TRAVERSALS[:8] + ["/link-out/secret.txt"]:
            code, out, err = await curl(
                "--path-as-is", "-w", "\n%{http_code}", f"http://{LOOPBACK}:{port}{path}"
            )
            assert code == 0, err
            assert SECRET not in out, path
            assert out.rsplit("\n", 1)[1] in ("400", "404"), (path, out)
        # The files next to the traversal targets are still served.
        code, out, err = await curl(f"http://{LOOPBACK}:{port}/a/../style.css")
        assert out.encode() == CSS  # curl itself squashes the dots: a normal request


# -- 3. inline content -------------------------------------------------------------------------


@async_test(60)
async def test_inline_content_answers_status_type_and_body_and_head_has_no_body() -> None:
    port = free_port()
    routes = [
        {
            "name": "health",
            "match": {"ports": port, "path": "/health"},
            "action": {
                "type": "static",
                "static": {"content": "ok\n", "content_type": "text/plain", "status": 200},
            },
        },
        {
            "name": "maintenance",
            "match": {"ports": port},
            "action": {
                "type": "static",
                "static": {
                    "content": "<h1>back soon</h1>\n",
                    "content_type": "text/html; charset=utf-8",
                    "status": 503,
                },
            },
        },
    ]
    async with proxy(routes):
        code, out, err = await curl("-D", "-", f"http://{LOOPBACK}:{port}/health")
        assert code == 0, err
        head, _, body = out.partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 200") and body == "ok\n"
        assert (
            headers_of(out)["content-type"] == "text/plain"
            and headers_of(out)["content-length"] == "3"
        )
        code, out, err = await curl("-D", "-", f"http://{LOOPBACK}:{port}/anything/else")
        assert out.startswith("HTTP/1.1 503") and out.endswith("\r\n\r\n<h1>back soon</h1>\n"), out
        assert headers_of(out)["content-type"] == "text/html; charset=utf-8"

        # HEAD on a kept-alive connection: the same headers, no body, and the next answer is intact.
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
        head_response, _ = await read_response(reader, head_only=True)
        assert head_response.status == 200 and head_response.header("content-length") == "3"
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        get_response, body_bytes = await read_response(reader)
        assert get_response.status == 200 and body_bytes == b"ok\n"
        writer.write(b"HEAD /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        rest = await asyncio.wait_for(reader.read(), 10)
        assert rest.startswith(b"HTTP/1.1 503") and rest.endswith(b"\r\n\r\n"), rest
        writer.close()
        code, out, err = await curl("-I", f"http://{LOOPBACK}:{port}/health")
        assert out.startswith("HTTP/1.1 200") and out.endswith("\r\n\r\n"), out


# -- 4. HTTP -> HTTPS redirects ----------------------------------------------------------------


def assert_clean_location(answer: bytes, host: str | None) -> str | None:
    """The answer's Location, checked: one header line, no CR/LF inside, pointing at ``host``.

    ``host=None`` asserts that there is no Location at all.
    """
    lines = answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    names = [line.split(b":", 1)[0].strip().lower() for line in lines[1:]]
    assert b"set-cookie" not in names and all(b"\n" not in line for line in lines), answer
    locations = [line for line in lines if line.lower().startswith(b"location:")]
    assert len(locations) <= 1, answer
    if not locations:
        return None
    assert host is not None, answer
    location = locations[0].split(b":", 1)[1].strip().decode("ascii")
    assert "\r" not in location and "\n" not in location and " " not in location, location
    assert urlsplit(location).hostname == host, location
    return location


@async_test(60)
async def test_http_to_https_redirect_keeps_host_path_and_query_and_cannot_be_injected(
    ca: TestCA, tmp_path: Path
) -> None:
    http_port, https_port = free_port(), free_port()
    cafile = tmp_path / "ca.pem"
    cafile.write_text(ca.pem)
    pair = ca.issue("shop.test")
    with http_backend("secure-site") as backend:
        routes = [
            redirect_route(
                http_port, f"https://{{domain}}:{https_port}{{path}}{{query}}", name="to-https"
            ),
            {
                "name": "site",
                "match": {"ports": https_port, "domains": "shop.test"},
                "action": {
                    "type": "forward",
                    "targets": [{"host": LOOPBACK, "port": backend.port}],
                    "protocol": "http",
                    "tls": {
                        "mode": "terminate",
                        "certificate": {"cert": pair.cert_pem, "key": pair.key_pem},
                    },
                },
            },
        ]
        async with proxy(routes):
            url = f"http://shop.test:{http_port}/cart/items?id=7&sort=price%20asc"
            resolve = [
                "--resolve",
                f"shop.test:{http_port}:{LOOPBACK}",
                "--resolve",
                f"shop.test:{https_port}:{LOOPBACK}",
            ]
            code, out, err = await curl("-I", *resolve, url)
            assert code == 0, err
            assert out.startswith("HTTP/1.1 301"), out
            assert (
                headers_of(out)["location"]
                == f"https://shop.test:{https_port}/cart/items?id=7&sort=price%20asc"
            )
            assert headers_of(out)["content-length"] and out.endswith("\r\n\r\n")

            # Followed all the way: curl verifies the proxy's certificate and reaches the backend.
            code, out, err = await curl("-L", "--cacert", str(cafile), *resolve, url)
            assert code == 0, err
            info = json.loads(out)
            assert info["path"] == "/cart/items?id=7&sort=price%20asc"
            assert {k.lower(): v for k, v in info["headers"]}["x-forwarded-proto"] == "https"

            # The Host's port is dropped, its case folded; no Host, no redirect.
            answer = await raw_exchange(
                http_port, b"GET /p?q HTTP/1.1\r\nHost: Shop.TEST:8080\r\nConnection: close\r\n\r\n"
            )
            assert (
                assert_clean_location(answer, "shop.test") == f"https://shop.test:{https_port}/p?q"
            )
            answer = await raw_exchange(http_port, b"GET /p HTTP/1.0\r\n\r\n")
            assert (
                answer.startswith(b"HTTP/1.1 400") and assert_clean_location(answer, None) is None
            )

            # Injection attempts: never a second header, never another host.
            for target in (
                "/x%0d%0aSet-Cookie:x=1",
                "/x%0D%0ASet-Cookie:%20x=1?y=%0d%0aSet-Cookie:z",
                "/x?%0d%0aLocation:%20https://evil.test/",
                "//evil.test/x",
                "/%2f%2fevil.test/x",
                "/\\evil.test",
                "/x#frag",
                "/@evil.test",
            ):
                request = f"GET {target} HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n".encode()
                answer = await raw_exchange(http_port, request)
                location = assert_clean_location(answer, "shop.test")
                assert answer.startswith((b"HTTP/1.1 301", b"HTTP/1.1 400")), (target, answer)
                assert location is None or location.startswith(
                    f"https://shop.test:{https_port}/"
                ), (target, location)
            code, out, err = await curl(
                "-I", "--path-as-is", *resolve, f"http://shop.test:{http_port}/a%0d%0aSet-Cookie:x"
            )
            # Encoded control characters in a path are refused before any route sees them.
            assert out.startswith("HTTP/1.1 400"), out
            assert "set-cookie" not in headers_of(out) and "location" not in headers_of(out)
            for host in (
                "evil.test/x",
                "evil.test@shop.test",
                "shop.test\\@evil.test",
                "evil.test?x",
                "evil.test#x",
                "a b",
            ):
                request = f"GET /p HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
                answer = await raw_exchange(http_port, request)
                assert answer.startswith(b"HTTP/1.1 400"), (host, answer)
                assert assert_clean_location(answer, None) is None, (host, answer)


@async_test(60)
async def test_each_redirect_status_is_honoured() -> None:
    port = free_port()
    statuses = (301, 302, 303, 307, 308)
    routes = [
        redirect_route(
            port,
            "https://{domain}:{port}/moved{path}{query}",
            status=status,
            name=f"s{status}",
            path=f"/{status}/*",
        )
        for status in statuses
    ]
    async with proxy(routes):
        for status in statuses:
            code, out, err = await curl(
                "-I", "-H", "Host: www.test", f"http://{LOOPBACK}:{port}/{status}/x?k=v"
            )
            assert code == 0, err
            assert out.startswith(f"HTTP/1.1 {status} "), out
            assert headers_of(out)["location"] == f"https://www.test:{port}/moved/{status}/x?k=v"
        # A small request body is read and dropped: the connection carries the next request.
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(b"POST /307/form HTTP/1.1\r\nHost: www.test\r\nContent-Length: 3\r\n\r\na=1")
        head, _ = await read_response(reader)
        assert (
            head.status == 307
            and head.header("location") == f"https://www.test:{port}/moved/307/form"
        )
        writer.write(b"GET /302/next HTTP/1.1\r\nHost: www.test\r\n\r\n")
        head, _ = await read_response(reader)
        assert (
            head.status == 302
            and head.header("location") == f"https://www.test:{port}/moved/302/next"
        )
        writer.close()


# -- 5. redirect, static and forward on one port and one connection ----------------------------


@async_test(60)
async def test_redirect_static_and_forward_share_one_port_and_one_connection(
    tmp_path: Path,
) -> None:
    site = build_site(tmp_path)
    port = free_port()
    with http_backend("app") as backend:
        routes = [
            redirect_route(port, "/new{path}{query}", status=308, name="old", path="/old/*"),
            static_route(port, site.root, name="assets", path="/assets/*"),
            {
                "name": "app",
                "match": {"ports": port},
                "action": {
                    "type": "forward",
                    "targets": [{"host": LOOPBACK, "port": backend.port}],
                    "protocol": "http",
                },
            },
        ]
        async with proxy(routes) as router:
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write(b"GET /old/page?x=1 HTTP/1.1\r\nHost: one.test\r\n\r\n")
            head, body = await read_response(reader)
            assert head.status == 308 and head.header("location") == "/new/old/page?x=1"
            writer.write(b"GET /assets/app.css HTTP/1.1\r\nHost: one.test\r\n\r\n")
            head, body = await read_response(reader)
            assert head.status == 200 and body == CSS
            assert head.header("content-type") == "text/css; charset=utf-8"
            writer.write(b"GET /anything?y=2 HTTP/1.1\r\nHost: one.test\r\n\r\n")
            head, body = await read_response(reader)
            info = json.loads(body)
            assert head.status == 200 and (info["backend"], info["path"]) == (
                "app",
                "/anything?y=2",
            )
            # And again in one write (pipelined), answered in order.
            writer.write(
                b"GET /assets/missing.css HTTP/1.1\r\nHost: one.test\r\n\r\n"
                b"GET /old HTTP/1.1\r\nHost: one.test\r\n\r\n"
                b"GET /last HTTP/1.1\r\nHost: one.test\r\nConnection: close\r\n\r\n"
            )
            statuses = []
            for _ in range(3):
                head, body = await read_response(reader)
                statuses.append(head.status)
            assert statuses == [404, 308, 200] and json.loads(body)["path"] == "/last"
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            assert router.stats()["connections"]["total"] == 1  # all six on one connection
