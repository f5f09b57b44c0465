"""The head parsers' fast paths agree with the line-by-line parsers on every input.

The fast paths (one regular expression for a common, clean head) must give exactly the head,
or the error, that the long way gives; these tests compare both on generated and mutated heads.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable

from smartroute.errors import HttpParseError
from smartroute.protocols.http import _parse_request_head, parse_request_head
from smartroute.protocols.http_response import _parse_response_head, parse_response_head

REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n",
    b"GET /p?q=1&r HTTP/1.1\r\nHost: A.Example.:8080\r\nX-A:  v  \r\nX-B:\r\n\r\n",
    b"POST /u HTTP/1.1\r\nHost: [::1]:80\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /u HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET /x HTTP/1.0\nHost: h\nConnection: keep-alive\n\n",
    b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
    b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n",
    b"GET http://h.example/p?x HTTP/1.1\r\nHost: other\r\n\r\n",
    b"\r\nGET / HTTP/1.1\r\nHost: h\r\nHost: h\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nHost: i\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET /a#b HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: \xff\xfe\t tab\t\r\nHost: h\r\n\r\n",
]

RESPONSES = [
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok",
    b"HTTP/1.1 204\r\n\r\n",
    b'HTTP/1.0 304 Not Modified\nETag: "x"\n\n',
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    b"HTTP/1.1 599 \r\nX:  a b  \r\nY:\r\n\r\n",
    b"HTTP/1.1 200 Fine \xe9t\xe9\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/2.0 200 OK\r\n\r\n",
    b"HTTP/1.1 099 Low\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n folded\r\n\r\n",
]

# Bytes that mutations insert: separators, whitespace, controls and the head's own syntax.
ALPHABET = b' \t\r\n:/?#[]@,;"\\\x00\x01\x0b\x7f\x80\xffAaZz09-._~HTP'


def outcome(parse: Callable[[bytearray], object], data: bytes) -> object:
    try:
        return ("ok", parse(bytearray(data)))
    except HttpParseError as exc:
        return ("error", exc.status, str(exc))


def mutations(seed: bytes, rng: random.Random, count: int) -> list[bytes]:
    found = []
    for _ in range(count):
        data = bytearray(seed)
        for _ in range(rng.randint(1, 3)):
            where = rng.randrange(len(data) + 1)
            kind = rng.random()
            if kind < 0.4 and where < len(data):
                data[where] = rng.choice(ALPHABET)
            elif kind < 0.7:
                data[where:where] = bytes([rng.choice(ALPHABET)])
            elif where < len(data):
                del data[where]
        found.append(bytes(data))
    return found


def check(fast: Callable[..., object], slow: Callable[..., object], seeds: list[bytes]) -> None:
    rng = random.Random(1234)
    cases = list(seeds)
    cases += [seed[:cut] for seed in seeds for cut in range(len(seed))]  # every prefix
    for seed in seeds:
        cases += mutations(seed, rng, 400)
    for data in cases:
        assert outcome(fast, data) == outcome(slow, data), data
    # A small maximum size: heads just over and just under it.
    for data in seeds:
        for limit in (len(data) - 3, len(data) - 2, len(data), len(data) + 1):
            if limit > 0:
                got = outcome(functools.partial(fast, max_size=limit), data)
                assert got == outcome(functools.partial(slow, max_size=limit), data), (data, limit)


def test_request_fast_path_agrees_with_the_line_by_line_parser() -> None:
    check(parse_request_head, _parse_request_head, REQUESTS)


def test_response_fast_path_agrees_with_the_line_by_line_parser() -> None:
    check(parse_response_head, _parse_response_head, RESPONSES)


def test_the_fast_paths_take_the_common_heads() -> None:
    head = parse_request_head(bytearray(REQUESTS[1]))
    assert head is not None and head.headers[1:] == (("X-A", "v"), ("X-B", ""))
    assert (head.host, head.port, head.path, head.query) == ("a.example", 8080, "/p", "q=1&r")
    response = parse_response_head(bytearray(RESPONSES[4]))
    assert response is not None
    assert (response.status, response.reason, response.headers) == (
        599,
        "",
        (("X", "a b"), ("Y", "")),
    )
