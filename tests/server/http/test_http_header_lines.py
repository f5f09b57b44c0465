"""The one-pass header rewriting agrees with the rules it implements (end_to_end and
forwarding_headers), on random header lists."""

from __future__ import annotations

import random

from smartroute.server.http.headers import (
    connection_tokens,
    end_to_end,
    forwarding_headers,
    render_lines,
    request_lines,
    response_lines,
)

NAMES = [
    "Host",
    "host",
    "X-Forwarded-For",
    "Forwarded",
    "X-Forwarded-Proto",
    "x-forwarded-host",
    "Connection",
    "connection",
    "Keep-Alive",
    "Expect",
    "Content-Length",
    "TE",
    "Upgrade",
    "Transfer-Encoding",
    "X-A",
    "x-a",
    "Accept",
]
VALUES = ["v", "w, x", "X-A", "close, x-forwarded-for", "a.b:80", 'q"x', "", "forwarded, x-a"]


def test_request_and_response_lines_follow_the_rewriting_rules() -> None:
    rng = random.Random(7)
    for _ in range(5000):
        headers = [(rng.choice(NAMES), rng.choice(VALUES)) for _ in range(rng.randint(0, 8))]
        tokens = connection_tokens(headers)
        client_ip = rng.choice(["192.0.2.7", "2001:db8::1"])
        proto = rng.choice(["http", "https"])
        host = next((value for name, value in headers if name.lower() == "host"), None)
        kept = end_to_end(headers, drop=frozenset({"expect", "content-length"}))
        expected = forwarding_headers(kept, client_ip=client_ip, proto=proto, host=host)
        for _ in range(2):  # the second time from the remembered forwarding lines
            got = request_lines(headers, tokens, client_ip=client_ip, proto=proto)
            assert got == render_lines(expected), headers
        for keep_length in (False, True):
            drop = frozenset() if keep_length else frozenset({"content-length"})
            expected_response = render_lines(end_to_end(headers, drop=drop))
            got = response_lines(headers, tokens, keep_length=keep_length)
            assert got == expected_response, headers
