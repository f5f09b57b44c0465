"""What choosing the certificate for one TLS termination costs: ``select`` (how a route with a
certificate or ``auto`` chose before on-demand routes existed) against ``for_route`` (what
every terminating route calls now).

    PYTHONPATH=. python3 bench/cert_select_cost.py

One certificate in the index; nanoseconds per call, the median of five best-of-five timings.
"""

from __future__ import annotations

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
    names: dict[str, object] = {"index": CertificateIndex([pair]), "pair": pair, "sni": SNI_NAME}
    before = nanoseconds("index.select(sni, None)", names)
    auto = nanoseconds("index.for_route('auto', sni)", names)
    given = nanoseconds("index.for_route(pair, sni)", names)
    on_demand = nanoseconds("index.for_route('on-demand', sni)", names)
    print(f"select(sni, None)           {before:6.0f} ns")
    print(f"for_route('auto', sni)      {auto:6.0f} ns  ({auto / before:.2f}x)")
    print(f"for_route(pair, sni)        {given:6.0f} ns")
    print(f"for_route('on-demand', sni) {on_demand:6.0f} ns")


if __name__ == "__main__":
    main()
