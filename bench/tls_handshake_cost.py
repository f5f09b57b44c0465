"""The CPU one server-side TLS handshake costs in this process, with no sockets and no loop.

    python bench/tls_handshake_cost.py [--handshakes N] [--rounds R]

Builds smartroute's own server context (``build_server_context``) for a fresh self-signed
ECDSA P-256 certificate, as the benchmark suite's TLS workloads use, and a client context, then
runs full TLS 1.3 handshakes between them over memory buffers (no tickets, so none resumes).
Only the server side's ``do_handshake`` calls are timed (process CPU time). The median over the
rounds is what OpenSSL's handshake alone costs here: the floor under any proxy's CPU per TLS
termination on this machine, whatever surrounds it.
"""

from __future__ import annotations

import argparse
import ssl
import statistics
import sys
import time
from collections.abc import Sequence

from bench_setup import SNI_NAME, self_signed

from smartroute.routing.model import CertificatePair
from smartroute.server.tls import build_server_context


def contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert_pem, key_pem = self_signed(SNI_NAME)
    server = build_server_context(CertificatePair(cert_pem.decode(), key_pem.decode()))
    server.num_tickets = 0
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    return server, client


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> float:
    """One full handshake; the server side's CPU seconds."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_side = client.wrap_bio(to_client, to_server, server_hostname=SNI_NAME)
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_side = server.wrap_bio(server_in, server_out, server_side=True)
    spent = 0.0
    done = False
    for _ in range(4):  # ClientHello, server flight, client Finished, (spare)
        try:
            client_side.do_handshake()
        except ssl.SSLWantReadError:
            pass
        server_in.write(to_server.read())
        started = time.process_time()
        try:
            server_side.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            pass
        spent += time.process_time() - started
        to_client.write(server_out.read())
        if done:
            return spent
    raise RuntimeError("the handshake did not complete")


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--handshakes", type=int, default=300, help="per round (default 300)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    options = parser.parse_args(argv)
    server, client = contexts()
    for _ in range(20):  # warm-up
        handshake(server, client)
    per_round = [
        sum(handshake(server, client) for _ in range(options.handshakes)) / options.handshakes
        for _ in range(options.rounds)
    ]
    print(f"OpenSSL {ssl.OPENSSL_VERSION}; ECDSA P-256, TLS 1.3, server side")
    print(f"rounds (µs per handshake): {', '.join(f'{r * 1e6:.0f}' for r in per_round)}")
    print(f"median: {statistics.median(per_round) * 1e6:.0f} µs of CPU per handshake")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
