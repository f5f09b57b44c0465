"""The backend pool follows the clients' concurrency: only idle connections are capped."""

from __future__ import annotations

from support import LOOPBACK, stream

from smartroute.server.http.pool import BackendPool


def test_more_connections_than_the_old_fixed_cap_are_all_kept_for_reuse() -> None:
    pool = BackendPool()
    key = pool.key(LOOPBACK, 9000, None, None)
    streams = [stream() for _ in range(50)]  # 50 requests in flight, then all answered
    for s, _ in streams:
        pool.release(key, s)
    assert not any(transport.closed for _, transport in streams)
    taken = {id(pool.take(key)) for _ in range(50)}
    assert taken == {id(s) for s, _ in streams}
    assert pool.take(key) is None


def test_idle_connections_beyond_the_cap_close_the_longest_idle_first() -> None:
    pool = BackendPool(max_idle=4)
    key = pool.key(LOOPBACK, 9000, None, None)
    streams = [stream() for _ in range(6)]
    for s, _ in streams:
        pool.release(key, s)
    assert [transport.closed for _, transport in streams] == [True, True] + [False] * 4
    assert pool.take(key) is streams[-1][0]  # the most recently used one first
