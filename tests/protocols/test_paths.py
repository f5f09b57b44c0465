"""The request path's normal form: a table of cases and properties over any input."""

from __future__ import annotations

import string

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from smartroute.errors import HttpParseError
from smartroute.protocols.paths import normalize_path

NORMAL = {
    "root": ("/", "/"),
    "plain": ("/a/b", "/a/b"),
    "trailing slash kept": ("/a/b/", "/a/b/"),
    "double slash at the start": ("//admin/x", "/admin/x"),
    "slashes merged": ("/a//b///c", "/a/b/c"),
    "only slashes": ("///", "/"),
    "dot segment": ("/./admin/x", "/admin/x"),
    "dot at the end": ("/a/.", "/a/"),
    "dot-dot": ("/public/../admin/x", "/admin/x"),
    "dot-dot at the end": ("/a/b/..", "/a/"),
    "dot-dot to the root": ("/a/..", "/"),
    "dot-dot after merged slashes": ("/a//b//../c", "/a/c"),
    "encoded letter": ("/%61dmin/x", "/admin/x"),
    "encoded dots": ("/a/%2e%2E/b", "/b"),
    "encoded dot segment": ("/a/%2e/b", "/a/b"),
    "encoded tilde": ("/%7e/x", "/~/x"),
    "encoded unreserved of every kind": ("/%41%5a%30%2D%5F", "/AZ0-_"),
    "reserved encodings kept, hex upper-cased": ("/a%3ab%3Fc%2b", "/a%3Ab%3Fc%2B"),
    "space and non-ASCII kept": ("/a%20b/%c3%a9", "/a%20b/%C3%A9"),
    "percent kept encoded, never decoded twice": ("/a%2561", "/a%2561"),
    "dots inside names are not segments": ("/a.b/..c/c../.d", "/a.b/..c/c../.d"),
    "a .well-known path": ("/.well-known/acme-challenge/t", "/.well-known/acme-challenge/t"),
    "semicolon in a name": ("/a;b/c", "/a;b/c"),
}

REFUSED = {
    "above the root": ("/..", "above the root"),
    "above the root later": ("/a/../..", "above the root"),
    "above the root, encoded": ("/%2e%2e/x", "above the root"),
    "encoded slash": ("/a%2fb", "encoded slash"),
    "encoded slash, upper case": ("/a%2Fb", "encoded slash"),
    "encoded backslash": ("/a%5cb", "encoded backslash"),
    "backslash": ("/a\\b", "backslash"),
    "encoded NUL": ("/a%00", "control character (%00)"),
    "encoded CR LF": ("/a%0d%0aSet-Cookie:x", "control character (%0D)"),
    "encoded DEL": ("/a%7F", "control character (%7F)"),
    "percent alone": ("/a%", "percent-encoding"),
    "percent and one digit": ("/a%4", "percent-encoding"),
    "percent and non-hex": ("/a%zz", "percent-encoding"),
    "dot-dot with a parameter": ("/a/..;/b", "parameter"),
    "dot with a parameter": ("/a/.;x/b", "parameter"),
}


@pytest.mark.parametrize("case", list(NORMAL), ids=list(NORMAL))
def test_normal_form(case: str) -> None:
    given_path, expected = NORMAL[case]
    assert normalize_path(given_path) == expected
    assert normalize_path(expected) == expected


@pytest.mark.parametrize("case", list(REFUSED), ids=list(REFUSED))
def test_refused(case: str) -> None:
    given_path, why = REFUSED[case]
    with pytest.raises(HttpParseError) as info:
        normalize_path(given_path)
    assert info.value.status == 400
    assert why in str(info.value)


# Paths built from the pieces that matter to the normaliser, and from any printable ASCII.
PIECES = ["/", "//", ".", "..", "a", "b", "%2e", "%2E", "%61", "%2f", "%5c", "%00", "%", "%4"]
PIECES += ["%25", "%3a", ";", "..;", "\\", "~", "%7e"]
pieced = st.lists(st.sampled_from(PIECES), max_size=12).map(lambda parts: "/" + "".join(parts))
printable = st.text(alphabet=string.printable[:94], max_size=40).map(lambda text: "/" + text)


@given(st.one_of(pieced, printable))
@example("/a/../../b")
@example("/%2e%2e")
@example("/%C0")  # not ASCII: stays encoded
def test_any_path_is_normal_or_refused(path: str) -> None:
    """Any input gives a normal path or a 400; the result is a fixed point; it never climbs
    above the root, holds no dot segment, no empty segment, no backslash and no encoding of
    an unreserved character, slash or backslash."""
    try:
        normal = normalize_path(path)
    except HttpParseError as exc:
        assert exc.status == 400
        return
    assert normal.startswith("/")
    assert normalize_path(normal) == normal
    segments = normal.split("/")[1:]
    assert all(segment not in (".", "..") for segment in segments)
    assert "" not in segments[:-1]  # only the last may be empty: a trailing slash
    assert "\\" not in normal
    lowered = normal.lower()
    assert "%2f" not in lowered and "%5c" not in lowered and "%2e" not in lowered
    for index in range(len(normal)):
        if normal[index] == "%":
            digits = normal[index + 1 : index + 3]
            assert len(digits) == 2 and digits == digits.upper()
            byte = chr(int(digits, 16))  # never an unreserved ASCII character (RFC 3986 2.3)
            assert not (byte.isascii() and (byte.isalnum() or byte in "-._~"))


@given(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=6))
def test_plain_paths_are_untouched(names: list[str]) -> None:
    path = "/" + "/".join(names)
    assert normalize_path(path) is path
