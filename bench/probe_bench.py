"""What naming a connection's protocol costs: the probes of smartroute/protocols/probes.py.

On the first bytes real clients send (tests/fixtures/first_bytes/, one capture per protocol):

- each built-in probe on its own protocol's capture (it says True) and on every other capture
  (it says False: the cost of saying no; the median and the dearest of them are shown);
- ``Probes().identify()`` on each whole capture, against asking every built-in probe in order
  without the first-byte table (the loop ``identify`` would be without it);
- the floor: calling a function that returns False at once.

    python bench/probe_bench.py [--number N] [--repeat N]

Each figure is the median of ``--repeat`` runs of ``--number`` calls (``timeit``, garbage
collector off), in nanoseconds per call, the timing loop included. The cases take turns within
each run, in an order rotated from one run to the next, so that other load on the machine falls
on all of them alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

from smartroute.protocols.probes import BUILTIN_PROBES, Probes

REPO = Path(__file__).resolve().parent.parent
FIRST_BYTES = REPO / "tests" / "fixtures" / "first_bytes"

# protocol -> its capture
OWN = {
    "tls": "tls-openssl.bin",
    "http2": "curl-h2c.bin",
    "http": "curl-http.bin",
    "ssh": "ssh.bin",
    "socks5": "socks5-curl.bin",
    "postgres": "psql-nossl.bin",
    "redis": "redis-cli.bin",
    "mqtt": "mosquitto_pub.bin",
}
# Every capture, for identify(), and the protocol it is.
CAPTURES = {
    **{name: protocol for protocol, name in OWN.items()},
    "psql.bin": "postgres",
    "mosquitto_pub-v5.bin": "mqtt",
}


def _never(data: bytes) -> bool | None:
    return False


def _ask_all(data: bytes) -> str | bool | None:
    """identify() without the first-byte table: every built-in probe, in order."""
    for name, probe in BUILTIN_PROBES.items():
        try:
            answer = probe(data)
        except Exception:
            continue
        if answer is True:
            return name
        if answer is None:
            return None
    return False


def measure(
    cases: dict[str, tuple[Callable[[bytes], object], bytes]], number: int, repeat: int
) -> dict[str, float]:
    """Median ns per call of each case over ``repeat`` runs of ``number`` calls."""
    timers = {
        key: timeit.Timer("call(data)", globals={"call": call, "data": data})
        for key, (call, data) in cases.items()
    }
    runs: dict[str, list[float]] = {key: [] for key in cases}
    keys = list(cases)
    for run in range(repeat):
        shift = run * 7 % len(keys)
        for key in keys[shift:] + keys[:shift]:
            runs[key].append(timers[key].timeit(number) / number * 1e9)
    return {key: statistics.median(values) for key, values in runs.items()}


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    return (
        f"nproc {os.cpu_count()}; {cpu}; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}; load average (1/5/15 min) {load}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=100_000, help="calls per run")
    parser.add_argument("--repeat", type=int, default=9, help="runs; the median is shown")
    args = parser.parse_args()
    data = {name: (FIRST_BYTES / name).read_bytes() for name in CAPTURES}
    probes = Probes()
    for name, protocol in CAPTURES.items():  # the captures are what they should be
        assert probes.identify(data[name], final=True) == protocol, name
        assert _ask_all(data[name]) == protocol, name

    cases: dict[str, tuple[Callable[[bytes], object], bytes]] = {"floor": (_never, data["ssh.bin"])}
    for protocol, probe in BUILTIN_PROBES.items():
        for name in OWN.values():
            cases[f"{protocol} {name}"] = (probe, data[name])
    for name in CAPTURES:
        cases[f"identify {name}"] = (probes.identify, data[name])
        cases[f"ask all {name}"] = (_ask_all, data[name])

    print(f"Machine: {machine()}.", file=sys.stderr)
    ns = measure(cases, args.number, args.repeat)
    print(f"Machine after: {machine()}.", file=sys.stderr)

    floor = ns["floor"]
    print(f"Median of {args.repeat} runs of {args.number:,} calls, ns per call; floor (a")
    print(f"function that returns False at once, and the timing loop): {floor:.0f} ns.\n")
    print("| probe | own capture | ns, True | ns, False: median of the 7 others | dearest False |")
    print("|---|---|--:|--:|---|")
    for protocol, probe in BUILTIN_PROBES.items():
        own = OWN[protocol]
        others = {name: ns[f"{protocol} {name}"] for name in OWN.values() if name != own}
        dearest = max(others, key=others.__getitem__)
        assert probe(data[own]) is True and not any(probe(data[name]) for name in others)
        print(
            f"| `{probe.__name__}` | `{own}` | {ns[f'{protocol} {own}']:.0f} "
            f"| {statistics.median(others.values()):.0f} "
            f"| {others[dearest]:.0f} (`{dearest}`) |"
        )
    print("\n`Probes().identify(whole capture)` against asking every built-in probe in order:\n")
    print("| capture | names | identify, ns | ask all, ns | identify / ask all |")
    print("|---|---|--:|--:|--:|")
    for name, protocol in CAPTURES.items():
        fast, slow = ns[f"identify {name}"], ns[f"ask all {name}"]
        print(f"| `{name}` | {protocol} | {fast:.0f} | {slow:.0f} | {fast / slow:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
