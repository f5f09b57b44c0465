"""The static action: path safety, index files, content types, conditional requests, ranges."""

from __future__ import annotations

import email.utils
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smartroute.routing.model import StaticAction
from smartroute.server.http.messages import FileBody, RequestInfo, Response
from smartroute.server.http.static import serve_static

MTIME = 1_700_000_000  # 2023-11-14 22:13:20 GMT
DIGITS = b"0123456789" * 10  # 100 bytes


@dataclass(frozen=True)
class Tree:
    base: Path  # holds the root and things outside it
    root: Path

    @property
    def action(self) -> StaticAction:
        return StaticAction(root=str(self.root), index=("index.html", "index.htm"))

    def real(self, relative: str) -> str:
        return os.path.realpath(self.root / relative)


def build_tree(base: Path) -> Tree:
    root = base / "public"
    files = {
        "index.html": b"<h1>home</h1>",
        "a.html": b"<p>a</p>",
        "style.css": b"body{}",
        "app.js": b"1;",
        "data.json": b"{}",
        "notes.txt": b"notes",
        "image.png": b"\x89PNG",
        "blob.zzunknown": b"?",
        "archive.tar.gz": b"gz",
        "digits.txt": DIGITS,
        "empty.txt": b"",
        "caf\u00e9.txt": b"unicode name",
        "%41.txt": b"literal percent",
        "dir/index.htm": b"dir index",
        "docs/readme.txt": b"no index here",
        "nested/deep/file.txt": b"deep",
        "evil.com/index.html": b"a directory named like a host",
    }
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (MTIME, MTIME))
    (base / "secret").write_bytes(b"TOP SECRET")
    (base / "outside").mkdir()
    (base / "outside" / "secret").write_bytes(b"TOP SECRET")
    (base / "outside" / "index.html").write_bytes(b"TOP SECRET")
    (root / "link-in").symlink_to(root / "nested")
    (root / "link-file.html").symlink_to("a.html")
    (root / "link-out").symlink_to(base / "outside")
    (root / "link-secret").symlink_to("../secret")
    (root / "loop").symlink_to("loop")
    return Tree(base, root)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    return build_tree(tmp_path_factory.mktemp("static"))


def request(
    path: str,
    *,
    method: str = "GET",
    query: str | None = None,
    headers: dict[str, str] | None = None,
) -> RequestInfo:
    return RequestInfo(
        method=method,
        path=path,
        query=query,
        headers=headers or {},
        host="example.com",
        port=80,
        is_tls=False,
    )


def get(
    tree: Tree,
    path: str,
    *,
    method: str = "GET",
    query: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    return serve_static(tree.action, request(path, method=method, query=query, headers=headers))


def header(response: Response, name: str) -> str | None:
    values = [v for n, v in response.headers if n.lower() == name.lower()]
    assert len(values) <= 1, f"{name} appears {len(values)} times"
    return values[0] if values else None


def assert_inside(tree: Tree, body: FileBody | None) -> None:
    if body is not None:
        real = os.path.realpath(body.path)
        root = os.path.realpath(tree.root)
        assert real.startswith(root + os.sep), f"{real} is outside {root}"


# --- path safety ----------------------------------------------------------------------------

TRAVERSALS: list[tuple[str, int]] = [
    ("/../secret", 404),
    ("/a/../../secret", 404),
    ("/%2e%2e/secret", 404),
    ("/%2E%2E%2Fsecret", 404),
    ("/..%2fsecret", 404),
    ("/%252e%252e/secret", 404),  # double encoding: a literal "%2e%2e" directory, missing
    ("/a%00.html", 400),
    ("/a\x00", 400),
    ("/..\\secret", 404),
    ("/%5c..%5csecret", 404),
    ("//etc/passwd", 404),
    ("/link-out/secret", 404),
    ("/link-out/", 404),
    ("/link-out", 404),  # not a 301: the directory is outside the root
    ("/link-secret", 404),
    ("/./../secret", 404),
    ("/etc/passwd", 404),
    ("/nested/../../secret", 404),
    ("/%2e%2e%5csecret", 404),
    ("/%ff%fe", 400),  # not UTF-8
    ("/loop", 404),  # a symlink to itself
    ("/a.html/", 404),  # a file is not a directory
    ("/a.html/..", 404),
    ("*", 400),
]


@pytest.mark.parametrize(("path", "status"), TRAVERSALS)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_traversal_is_refused(tree: Tree, path: str, status: int, method: str) -> None:
    response = get(tree, path, method=method)
    assert response.status == status
    assert response.file is None
    assert b"SECRET" not in response.body


def test_symlinks_inside_root_are_served(tree: Tree) -> None:
    response = get(tree, "/link-in/deep/file.txt")
    assert response.status == 200
    assert response.file == FileBody(tree.real("nested/deep/file.txt"), 0, 4)
    response = get(tree, "/link-file.html")
    assert response.file == FileBody(tree.real("a.html"), 0, 8)
    assert header(response, "Content-Type") == "text/html; charset=utf-8"  # the name asked for


def test_encoded_names_are_decoded_once(tree: Tree) -> None:
    assert get(tree, "/%2541.txt").file == FileBody(tree.real("%41.txt"), 0, 15)
    assert get(tree, "/caf%C3%A9.txt").file == FileBody(tree.real("caf\u00e9.txt"), 0, 12)
    assert get(tree, "/nested%2Fdeep%2Ffile.txt").status == 200  # %2F is just a slash here
    assert get(tree, "/./nested//deep/./file.txt").status == 200


def test_missing_root_is_404(tmp_path: Path) -> None:
    action = StaticAction(root=str(tmp_path / "nope"))
    assert serve_static(action, request("/")).status == 404
    assert serve_static(action, request("/x")).status == 404


def test_unreadable_file_is_404_even_for_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = build_tree(tmp_path)
    unreadable = tree.real("a.html")
    real_access = os.access

    def access(path: str, mode: int) -> bool:
        return path != unreadable and real_access(path, mode)

    monkeypatch.setattr(os, "access", access)
    assert get(tree, "/a.html").status == 404
    assert get(tree, "/notes.txt").status == 200


def test_special_files_are_404(tmp_path: Path) -> None:
    tree = build_tree(tmp_path)
    os.mkfifo(tree.root / "pipe")
    response = get(tree, "/pipe")
    assert response.status == 404
    assert response.file is None


def test_root_may_be_given_through_a_symlink(tmp_path: Path) -> None:
    tree = build_tree(tmp_path)
    (tmp_path / "alias").symlink_to(tree.root)
    action = StaticAction(root=str(tmp_path / "alias"))
    response = serve_static(action, request("/a.html"))
    assert response.file == FileBody(tree.real("a.html"), 0, 8)
    assert serve_static(action, request("/link-out/secret")).status == 404


# --- index files and directory redirects ----------------------------------------------------


def test_root_serves_index(tree: Tree) -> None:
    response = get(tree, "/")
    assert response.status == 200
    assert response.file == FileBody(tree.real("index.html"), 0, 13)
    assert header(response, "Content-Type") == "text/html; charset=utf-8"


def test_first_existing_index_is_served(tree: Tree) -> None:
    response = get(tree, "/dir/")
    assert response.file == FileBody(tree.real("dir/index.htm"), 0, 9)
    assert header(response, "Content-Type") == "text/html; charset=utf-8"


def test_directory_without_index_is_404(tree: Tree) -> None:
    assert get(tree, "/docs/").status == 404
    assert get(tree, "/nested/").status == 404


def test_index_symlinked_outside_root_is_refused(tmp_path: Path) -> None:
    tree = build_tree(tmp_path)
    (tree.root / "docs" / "index.html").symlink_to(tmp_path / "secret")
    response = get(tree, "/docs/")
    assert response.status == 404
    assert response.file is None


@pytest.mark.parametrize(
    ("path", "query", "location"),
    [
        ("/dir", None, "/dir/"),
        ("/dir", "x=1&y=%20", "/dir/?x=1&y=%20"),
        ("/dir", "", "/dir/?"),
        ("/nested/deep", "a", "/nested/deep/?a"),
        ("//evil.com", None, "/evil.com/"),  # never a scheme-relative "//evil.com/"
        ("///evil.com", "q", "/evil.com/?q"),
        ("/caf%C3%A9", None, None),  # missing: 404, not a redirect
    ],
)
def test_directory_redirect_keeps_query(
    tree: Tree, path: str, query: str | None, location: str | None
) -> None:
    response = get(tree, path, query=query)
    if location is None:
        assert response.status == 404
        return
    assert response.status == 301
    assert header(response, "Location") == location
    assert response.file is None


# --- headers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/a.html", "text/html; charset=utf-8"),
        ("/style.css", "text/css; charset=utf-8"),
        ("/app.js", "text/javascript; charset=utf-8"),
        ("/data.json", "application/json; charset=utf-8"),
        ("/notes.txt", "text/plain; charset=utf-8"),
        ("/image.png", "image/png"),
        ("/blob.zzunknown", "application/octet-stream"),
        ("/archive.tar.gz", "application/gzip"),  # never "application/x-tar" for gzip bytes
    ],
)
def test_content_type(tree: Tree, path: str, content_type: str) -> None:
    response = get(tree, path)
    assert response.status == 200
    assert header(response, "Content-Type") == content_type


def test_validators_and_accept_ranges(tree: Tree) -> None:
    response = get(tree, "/digits.txt")
    assert response.status == 200
    assert response.file == FileBody(tree.real("digits.txt"), 0, 100)
    assert header(response, "Last-Modified") == "Tue, 14 Nov 2023 22:13:20 GMT"
    assert header(response, "Accept-Ranges") == "bytes"
    etag = header(response, "ETag")
    assert etag is not None and etag.startswith('"') and etag.endswith('"')
    assert header(response, "Content-Length") is None  # response_head adds it
    assert header(response, "Connection") is None


def test_etag_changes_with_the_file(tmp_path: Path) -> None:
    tree = build_tree(tmp_path)
    before = header(get(tree, "/a.html"), "ETag")
    os.utime(tree.root / "a.html", ns=(MTIME * 10**9 + 1, MTIME * 10**9 + 1))
    assert header(get(tree, "/a.html"), "ETag") != before


def test_head_has_the_same_headers_as_get(tree: Tree) -> None:
    for path in ["/", "/a.html", "/digits.txt", "/empty.txt", "/dir", "/missing", "/../x"]:
        got, head = get(tree, path), get(tree, path, method="HEAD")
        assert (head.status, head.headers, head.file) == (got.status, got.headers, got.file)
        assert head.content_length == got.content_length


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "get"])
def test_other_methods_get_405(tree: Tree, method: str) -> None:
    for path in ["/a.html", "/missing", "/../secret"]:
        response = get(tree, path, method=method)
        assert response.status == 405
        assert header(response, "Allow") == "GET, HEAD"
        assert response.file is None


def test_action_without_root_or_content_is_500() -> None:
    assert serve_static(StaticAction(), request("/")).status == 500


def test_inline_content() -> None:
    action = StaticAction(content=b"ok\n", content_type="text/plain", status=203)
    for method in ["GET", "HEAD"]:
        response = serve_static(action, request("/anything", method=method))
        assert response.status == 203
        assert response.headers == [("Content-Type", "text/plain")]
        assert response.body == b"ok\n"
        assert response.file is None
    response = serve_static(action, request("/", method="POST"))
    assert response.status == 405
    assert header(response, "Allow") == "GET, HEAD"


# --- conditional requests -------------------------------------------------------------------


def etag_of(tree: Tree, path: str) -> str:
    etag = header(get(tree, path), "ETag")
    assert etag is not None
    return etag


def test_if_none_match(tree: Tree) -> None:
    etag = etag_of(tree, "/a.html")
    for value in [etag, f"W/{etag}", f'"nope", {etag}', "*", f' "x" ,W/{etag} ']:
        for method in ["GET", "HEAD"]:
            response = get(tree, "/a.html", method=method, headers={"if-none-match": value})
            assert response.status == 304, value
            assert response.file is None and response.body == b""
            assert header(response, "ETag") == etag
            assert header(response, "Last-Modified") == "Tue, 14 Nov 2023 22:13:20 GMT"
    for value in ['"nope"', 'W/"nope"', "", etag.strip('"')]:
        response = get(tree, "/a.html", headers={"if-none-match": value})
        assert response.status == 200, value


def test_if_modified_since(tree: Tree) -> None:
    cases = {
        "Tue, 14 Nov 2023 22:13:20 GMT": 304,
        "Tue, 14 Nov 2023 22:13:21 GMT": 304,
        "Wed, 15 Nov 2023 00:00:00 GMT": 304,
        "Tuesday, 14-Nov-23 22:13:20 GMT": 304,  # RFC 850 form
        "Tue, 14 Nov 2023 22:13:19 GMT": 200,
        "Tue, 14 Nov 2023 22:13:20 -0000": 304,  # no zone: taken as UTC
        "Tue, 14 Nov 2023 23:13:20 +0100": 304,
        "Tue, 14 Nov 2023 23:13:19 +0100": 200,
        "Fri, 31 Dec 9999 23:59:59 GMT": 304,
        "Mon, 01 Jan 2001 00:00:00 GMT": 200,
        "not a date": 200,
        "": 200,
        "Tue, 99 Nov 2023 22:13:20 GMT": 200,
    }
    for value, status in cases.items():
        response = get(tree, "/a.html", headers={"if-modified-since": value})
        assert response.status == status, value


def test_if_none_match_wins_over_if_modified_since(tree: Tree) -> None:
    headers = {"if-none-match": '"other"', "if-modified-since": "Wed, 15 Nov 2023 00:00:00 GMT"}
    assert get(tree, "/a.html", headers=headers).status == 200


# --- ranges ---------------------------------------------------------------------------------

RANGES: list[tuple[str, int, tuple[int, int] | None]] = [
    ("bytes=0-9", 206, (0, 9)),
    ("bytes=0-0", 206, (0, 0)),
    ("bytes=-10", 206, (90, 99)),
    ("bytes=90-", 206, (90, 99)),
    ("bytes=95-200", 206, (95, 99)),
    ("bytes=-200", 206, (0, 99)),
    ("bytes=99-99", 206, (99, 99)),
    ("BYTES = 10-19", 206, (10, 19)),
    ("bytes=0-99999999999999999999999999", 206, (0, 99)),
    ("bytes= 5-6 ,", 206, (5, 6)),
    ("bytes=100-", 416, None),
    ("bytes=100-200", 416, None),
    ("bytes=99999999999999999999999999-", 416, None),
    ("bytes=-0", 416, None),
    ("bytes=5-2", 200, None),  # invalid: ignored
    ("bytes=0-1,5-6", 200, None),  # several ranges: the whole file
    ("items=0-1", 200, None),
    ("bytes=abc", 200, None),
    ("bytes=-", 200, None),
    ("bytes=\u0661-\u0662", 200, None),  # Arabic-Indic digits are not digits here
    ("bytes 0-1", 200, None),
]


@pytest.mark.parametrize(("value", "status", "span"), RANGES)
def test_range(tree: Tree, value: str, status: int, span: tuple[int, int] | None) -> None:
    response = get(tree, "/digits.txt", headers={"range": value})
    assert response.status == status
    if status == 206:
        assert span is not None
        first, last = span
        assert header(response, "Content-Range") == f"bytes {first}-{last}/100"
        assert response.file == FileBody(tree.real("digits.txt"), first, last - first + 1)
        assert header(response, "ETag") == etag_of(tree, "/digits.txt")
    elif status == 416:
        assert header(response, "Content-Range") == "bytes */100"
        assert response.file is None
    else:
        assert header(response, "Content-Range") is None
        assert response.file == FileBody(tree.real("digits.txt"), 0, 100)


def test_range_on_empty_file(tree: Tree) -> None:
    # RFC 9110 14.1.1: on an empty representation only a non-zero suffix range is satisfiable,
    # and no 206 can describe zero bytes, so that one gets the full (empty) 200.
    response = get(tree, "/empty.txt", headers={"range": "bytes=0-"})
    assert response.status == 416
    assert header(response, "Content-Range") == "bytes */0"
    response = get(tree, "/empty.txt", headers={"range": "bytes=-5"})
    assert response.status == 200
    assert response.file == FileBody(tree.real("empty.txt"), 0, 0)


def test_range_is_for_get_only(tree: Tree) -> None:
    # RFC 9110 14.2: a server MUST ignore Range on methods other than GET.
    response = get(tree, "/digits.txt", method="HEAD", headers={"range": "bytes=0-9"})
    assert response.status == 200
    assert response.file == FileBody(tree.real("digits.txt"), 0, 100)


def test_if_range(tree: Tree) -> None:
    etag = etag_of(tree, "/digits.txt")
    cases = {
        etag: 206,
        f"W/{etag}": 200,  # weak tags never match If-Range
        '"other"': 200,
        "Tue, 14 Nov 2023 22:13:20 GMT": 206,
        "Tue, 14 Nov 2023 22:13:21 GMT": 200,  # exact match only
        "Tue, 14 Nov 2023 22:13:19 GMT": 200,
        "garbage": 200,
    }
    for value, status in cases.items():
        headers = {"range": "bytes=0-9", "if-range": value}
        response = get(tree, "/digits.txt", headers=headers)
        assert response.status == status, value
        expected = (0, 10) if status == 206 else (0, 100)
        assert response.file is not None
        assert (response.file.offset, response.file.length) == expected


def test_not_modified_comes_before_range(tree: Tree) -> None:
    etag = etag_of(tree, "/digits.txt")
    response = get(tree, "/digits.txt", headers={"range": "bytes=0-9", "if-none-match": etag})
    assert response.status == 304


# --- property -------------------------------------------------------------------------------

PIECES = [
    "/", "..", ".", "%2e", "%2E", "%2f", "%2F", "%5c", "\\", "%00", "%25", "%", "secret",
    "link-out", "link-in", "link-secret", "loop", "a.html", "dir", "nested", "deep",
    "file.txt", "outside", "index.html", "evil.com", "%ff", "\u00e9",
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(PIECES) | st.text(max_size=4), max_size=12),
    method=st.sampled_from(["GET", "HEAD"]),
)
def test_never_serves_outside_root(tree: Tree, pieces: list[str], method: str) -> None:
    path = "/" + "".join(pieces)
    response = get(tree, path, method=method)
    assert response.status in {200, 301, 400, 404}
    assert_inside(tree, response.file)
    if response.status == 301:
        location = header(response, "Location")
        assert location is not None
        assert location.startswith("/") and not location.startswith("//")
        assert location.isascii() and location.isprintable() and " " not in location


def test_serves_file_for_plain_names(tree: Tree) -> None:
    # Sanity for the property above: the tree is reachable at all.
    assert get(tree, "/nested/deep/file.txt").file == FileBody(
        tree.real("nested/deep/file.txt"), 0, 4
    )
    assert email.utils.parsedate_to_datetime("Tue, 14 Nov 2023 22:13:20 GMT").timestamp() == MTIME
