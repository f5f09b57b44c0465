"""What choosing the certificate for one TLS termination costs (``CertificateIndex.select``),
for a tree given by ``PYTHONPATH``: run it on two trees to compare them.

    git worktree add /tmp/before <commit>
    PYTHONPATH=/tmp/before python3 bench/cert_select_cost.py
    PYTHONPATH=. python3 bench/cert_select_cost.py

Timed is what a terminating route's connection does to get its certificate, for a route
with ``"certificate": "auto"`` and one with its own pair: trees before on-demand routes passed
``select`` the route's pair or None (``c if not isinstance(c, str) else None``), later ones
pass ``tls.certificate`` as it is, and ``"on-demand"`` is timed too. One certificate in the
index, an SNI it covers; nanoseconds per call, the median of five best-of-five timings.
"""

from __future__ import annotations

import inspect
import statistics
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_setup import SNI_NAME, self_signed  # noqa: E402

from smartroute.routing.model import CertificatePair  # noqa: E402
from smartroute.server.tls import CertificateIndex  # noqa: E402

CALLS = 200_000


def nanoseconds(stmt: str, names: dict[str, object]) -> float:
    """Median over five rounds of the best of five timings of ``CALLS`` calls."""
    rounds = [
        min(timeit.repeat(stmt, globals=names, number=CALLS, repeat=5)) / CALLS * 1e9
        for _ in range(5)
    ]
    return statistics.median(rounds)


def main() -> None:
    cert_pem, key_pem = self_signed(SNI_NAME)
    pair = CertificatePair(cert_pem.decode(), key_pem.decode())
    index = CertificateIndex([pair])
    takes_route_value = "certificate" in inspect.signature(index.select).parameters
    call = (
        "index.select(sni, c)"
        if takes_route_value
        else "index.select(sni, c if not isinstance(c, str) else None)"
    )
    routes: list[tuple[str, object]] = [("auto", "auto"), ("own pair", pair)]
    if takes_route_value:
        routes.append(("on-demand", "on-demand"))
    for label, certificate in routes:
        names = {
            "index": index,
            "c": certificate,
            "sni": SNI_NAME,
            "CertificatePair": CertificatePair,
        }
        print(f"{label:10} {call:58} {nanoseconds(call, names):6.0f} ns")


if __name__ == "__main__":
    main()
