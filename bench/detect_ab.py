"""``detect()`` without probes, per call, on three real first flights: for A/B runs of two trees.

    python3 bench/detect_ab.py PATH_TO_A_SMARTROUTE_TREE

prints the best-of-7 ns per call on a curl ClientHello, a curl HTTP head and an SSH banner
(the fixtures of this tree, the code of the given one).
"""

from __future__ import annotations

import pathlib
import sys
import timeit

sys.path.insert(0, sys.argv[1])
from smartroute.protocols.detect import detect  # noqa: E402

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"
DATAS = [
    (FIXTURES / "clienthello" / "curl.bin").read_bytes(),
    (FIXTURES / "first_bytes" / "curl-http.bin").read_bytes(),
    (FIXTURES / "first_bytes" / "ssh.bin").read_bytes(),
]

for data in DATAS:
    best = min(timeit.repeat(lambda: detect(data), number=20000, repeat=7)) / 20000  # noqa: B023
    print(f"{best * 1e9:.0f}", end=" ")
print()
