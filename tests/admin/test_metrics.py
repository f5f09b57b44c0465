"""``render_metrics``: the Prometheus text exposition format (0.0.4), checked line by line by a
parser written here, on the output of real proxies after real traffic (curl, a TCP client,
wrk), with one process and with ``workers=2``.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support import (
    LOOPBACK,
    async_test,
    curl,
    echo_handler,
    free_port,
    http_answer,
    require_tool,
    serve,
)

from smartroute import SmartRoute
from smartroute.admin.metrics import render_metrics

# -- the parser: every rule of the format, one line at a time ----------------------------------

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL_NAME = r"[a-zA-Z_][a-zA-Z0-9_]*"
LABEL_VALUE = r'"(?:[^"\\\n]|\\\\|\\"|\\n)*"'
SAMPLE = re.compile(
    rf"^(?P<name>{NAME})"
    rf"(?:\{{(?P<labels>(?:{LABEL_NAME}={LABEL_VALUE})(?:,{LABEL_NAME}={LABEL_VALUE})*)?\}})?"
    r" (?P<value>\S+)$"
)
LABEL = re.compile(rf"({LABEL_NAME})=({LABEL_VALUE})")
KINDS = {"counter", "gauge", "histogram", "summary", "untyped"}

Series = tuple[str, tuple[tuple[str, str], ...]]


@dataclass
class Family:
    kind: str
    help: str
    samples: dict[Series, float] = field(default_factory=dict)


def _unescape(quoted: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), quoted[1:-1])


def parse(text: str) -> dict[str, Family]:
    """Families by name; raises AssertionError at the first line that breaks a rule."""
    assert text.endswith("\n"), "the exposition ends with a line feed"
    families: dict[str, Family] = {}
    helps: dict[str, str] = {}
    current: str | None = None
    for number, line in enumerate(text[:-1].split("\n"), 1):
        where = f"line {number}: {line!r}"
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert re.fullmatch(NAME, name), where
            assert name not in helps, f"second HELP for {name}: {where}"
            helps[name] = help_text
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert re.fullmatch(NAME, name) and kind in KINDS, where
            assert name not in families, f"second TYPE for {name}: {where}"
            if kind == "counter":
                assert name.endswith("_total"), f"a counter's name ends with _total: {where}"
            families[name] = Family(kind, helps.get(name, ""))
            current = name
        elif line.startswith("#"):
            continue  # a comment
        else:
            match = SAMPLE.match(line)
            assert match, f"not a sample: {where}"
            name, value = match["name"], match["value"]
            assert current is not None, f"a sample before any TYPE: {where}"
            family = families[current]
            allowed = {current}
            if family.kind == "histogram":
                allowed = {current + s for s in ("_bucket", "_sum", "_count")}
            assert name in allowed, f"{name} outside its family {current}: {where}"
            labels = tuple(
                (key, _unescape(quoted)) for key, quoted in LABEL.findall(match["labels"] or "")
            )
            keys = [key for key, _ in labels]
            assert len(keys) == len(set(keys)), f"a label twice: {where}"
            assert "le" not in keys or name.endswith("_bucket"), where
            series = (name, tuple(sorted(labels)))
            assert series not in family.samples, f"duplicate series: {where}"
            number_value = float(value)  # raises on anything but a Go float
            assert not math.isnan(number_value) or family.kind == "gauge", where
            family.samples[series] = number_value
    for name, family in families.items():
        assert name in helps, f"{name} has no HELP"
        if family.kind == "histogram":
            check_histogram(name, family)
    return families


def check_histogram(name: str, family: Family) -> None:
    """Buckets cumulative and ordered by ``le``, ``+Inf`` present and equal to ``_count``."""
    groups: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    for (sample, labels), value in family.samples.items():
        if sample.endswith("_bucket"):
            rest = tuple(kv for kv in labels if kv[0] != "le")
            le = dict(labels)["le"]
            groups.setdefault(rest, []).append((float(le), value))
    for rest, buckets in groups.items():
        buckets.sort()
        assert buckets[-1][0] == math.inf, f"{name}{rest}: no +Inf bucket"
        counts = [count for _, count in buckets]
        assert counts == sorted(counts), f"{name}{rest}: buckets not cumulative"
        assert family.samples[(f"{name}_count", rest)] == counts[-1]
        assert (f"{name}_sum", rest) in family.samples


def value(families: dict[str, Family], name: str, /, **labels: str) -> float:
    family_name = re.sub(r"_(bucket|sum|count)$", "", name)
    family = families.get(name) or families[family_name]
    return family.samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(families: dict[str, Family], name: str, /, **labels: str) -> float:
    """The sum of every series of ``name`` whose labels include ``labels``."""
    family = families[name]
    return sum(
        v
        for (sample, series), v in family.samples.items()
        if sample == name and set(labels.items()) <= set(series)
    )


def test_the_parser_refuses_what_the_format_forbids() -> None:
    good = '# HELP a_total A.\n# TYPE a_total counter\na_total{route="x\\"y"} 1\n'
    assert value(parse(good), "a_total", route='x"y') == 1
    bad = [
        "# HELP a A.\n# TYPE a counter\na 1\n",  # counter without _total
        "# HELP a A.\n# TYPE a gauge\n# TYPE a gauge\na 1\n",  # TYPE twice
        '# HELP a A.\n# TYPE a gauge\na{x="1"} 1\na{x="1"} 2\n',  # duplicate series
        '# HELP a A.\n# TYPE a gauge\na{x="1\n"} 1\n',  # raw newline in a label
        "# HELP a A.\n# TYPE a gauge\nb 1\n",  # sample outside its family
        '# HELP h H.\n# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\n'
        "h_sum 1\nh_count 1\n",  # not cumulative
        "# HELP 1a A.\n# TYPE 1a gauge\n1a 1\n",  # bad name
    ]
    for text in bad:
        with pytest.raises((AssertionError, ValueError)):
            parse(text)


# -- backends ----------------------------------------------------------------------------------


_http_backend = http_answer(b"ok")


def http_route(name: str, port: int, backend: int, path: str = "/*") -> dict[str, Any]:
    return {
        "name": name,
        "match": {"ports": port, "path": path},
        "action": {
            "type": "forward",
            "protocol": "http",
            "targets": [{"host": LOOPBACK, "port": backend}],
        },
    }


async def settled(proxy: SmartRoute, check: Any, timeout: float = 10) -> dict[str, Any]:
    """``proxy.stats()`` once ``check(stats)`` holds (worker figures lag about a second)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        stats = proxy.stats()
        if check(stats):
            return stats
        assert asyncio.get_running_loop().time() < deadline, stats
        await asyncio.sleep(0.05)


# -- values after real traffic -----------------------------------------------------------------


@async_test(60)
async def test_metrics_after_http_and_tcp_traffic() -> None:
    http_port, tcp_port = free_port(), free_port()
    async with serve(_http_backend) as backend, serve(echo_handler) as echo:
        routes = [
            http_route("api", http_port, backend, "/api/*"),
            http_route("web", http_port, backend, "/web/*"),
            http_route('odd "name"\\', http_port, backend, "/odd/*"),
            {
                "name": "tcp",
                "match": {"ports": tcp_port},
                "action": {"type": "forward", "targets": [{"host": LOOPBACK, "port": echo}]},
            },
        ]
        async with SmartRoute(routes, bind_address=LOOPBACK) as proxy:
            base = f"http://{LOOPBACK}:{http_port}"
            # One curl, one kept-alive connection, five requests on three routes and a 404.
            urls = [f"{base}/{path}" for path in ("api/a", "web/b", "api/c", "odd/d", "none")]
            code, out, err = await curl(
                "-w", "%{http_code} %{num_connects}\\n", "-X", "POST",
                *(arg for url in urls for arg in ("-o", "/dev/null", url)),
            )  # fmt: skip
            assert code == 0, err
            answers = out.split()
            assert answers[0::2] == ["200", "200", "200", "200", "404"], out
            assert sum(int(n) for n in answers[1::2]) == 1, f"one connection: {out}"
            reader, writer = await asyncio.open_connection(LOOPBACK, tcp_port)
            writer.write(b"y" * 3000)
            await writer.drain()
            await asyncio.wait_for(reader.readexactly(3000), 5)
            writer.close()
            stats = await settled(proxy, lambda s: s["connections"]["active"] == 0)
            families = parse(render_metrics(proxy))
    assert value(families, "smartroute_connections_total") == 2
    assert value(families, "smartroute_connections_active") == 0
    assert value(families, "smartroute_bytes_total", direction="in") == stats["bytes"]["in"]
    assert value(families, "smartroute_bytes_total", direction="out") == stats["bytes"]["out"]
    assert value(families, "smartroute_route_bytes_total", route="tcp", direction="in") == 3000
    assert value(families, "smartroute_route_bytes_total", route="tcp", direction="out") == 3000
    # Each route's own requests' bytes: the routes add up to everything that moved.
    for direction in ("in", "out"):
        assert total(families, "smartroute_route_bytes_total", direction=direction) == value(
            families, "smartroute_bytes_total", direction=direction
        )
        for name in ("api", "web", 'odd "name"\\'):
            assert (
                value(families, "smartroute_route_bytes_total", route=name, direction=direction) > 0
            ), name
    requests = "smartroute_http_requests_total"
    assert value(families, requests, route="api", method="POST", status="2xx") == 2
    assert value(families, requests, route="web", method="POST", status="2xx") == 1
    assert value(families, requests, route='odd "name"\\', method="POST", status="2xx") == 1
    assert value(families, requests, route="", method="POST", status="4xx") == 1
    assert total(families, requests) == 5
    duration = "smartroute_http_request_duration_seconds"
    assert value(families, f"{duration}_count", route="api") == 2
    assert value(families, f"{duration}_bucket", route="api", le="+Inf") == 2
    assert value(families, f"{duration}_bucket", route="api", le="10.0") == 2
    assert value(families, "smartroute_route_connections_total", route="api") == 1
    assert value(families, "smartroute_route_connections_total", route="tcp") == 1
    up = families["smartroute_target_up"].samples
    assert up[("smartroute_target_up", (("route", "api"), ("target", f"{LOOPBACK}:{backend}")))]
    assert families["smartroute_plugin_restarts_total"].samples == {}
    assert value(families, "smartroute_workers") == 1


@async_test(60)
async def test_certificates_and_plugins_are_exposed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Certificates and plugin processes come from the proxy's own reports."""
    async with serve(_http_backend) as backend:
        port = free_port()
        async with SmartRoute([http_route("api", port, backend)], bind_address=LOOPBACK) as proxy:
            monkeypatch.setattr(
                proxy,
                "certificates",
                lambda: [
                    {"names": ["a.test", "b.test"], "label": "CN=a", "not_after": 1.9e9,
                     "cert_path": "/x/a.pem"},
                    {"names": [], "label": "CN=bare", "not_after": 1.8e9, "cert_path": None},
                ],
            )  # fmt: skip
            monkeypatch.setattr(
                proxy,
                "plugin_status",
                lambda: {
                    "auth": {"ready": True, "starts": 3, "hooks": ["on_request"]},
                    "fresh": {"ready": False, "starts": 0, "hooks": []},
                },
            )
            families = parse(render_metrics(proxy))
    expiry = "smartroute_certificate_expiry_timestamp_seconds"
    assert value(families, expiry, name="a.test", label="CN=a") == 1.9e9
    assert value(families, expiry, name="CN=bare", label="CN=bare") == 1.8e9
    assert value(families, "smartroute_plugin_restarts_total", plugin="auth") == 2
    assert value(families, "smartroute_plugin_restarts_total", plugin="fresh") == 0
    assert value(families, "smartroute_plugin_ready", plugin="auth") == 1


# -- several processes -------------------------------------------------------------------------


async def get_once(port: int, path: str) -> bytes:
    """One request on a new connection (the kernel picks the process that serves it)."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


@async_test(90)
async def test_one_scrape_counts_the_requests_of_every_worker() -> None:
    port = free_port()
    async with serve(_http_backend) as backend:
        proxy = SmartRoute([http_route("api", port, backend)], bind_address=LOOPBACK, workers=2)
        await proxy.start()
        try:
            made = 0
            own = proxy._runtime.stats  # this process's own book
            # New connections until the worker served some too (the kernel spreads them).
            while made < 40 or own_count(own) == made:
                assert made < 2000, "the worker never served a request"
                answer = await get_once(port, f"/{made}")
                assert answer.startswith(b"HTTP/1.1 200"), answer
                made += 1
            assert 0 < own_count(own) < made  # both processes served requests
            await settled(
                proxy,
                lambda s: s["routes"].get("api", {}).get("requests", {}).get("2xx") == made,
            )
            families = parse(render_metrics(proxy))
        finally:
            await proxy.stop()
    assert value(families, "smartroute_workers") == 2
    requests = "smartroute_http_requests_total"
    assert value(families, requests, route="api", method="GET", status="2xx") == made
    duration = "smartroute_http_request_duration_seconds"
    assert value(families, f"{duration}_count", route="api") == made
    assert value(families, "smartroute_connections_total") == made


def own_count(book: Any) -> int:
    counters = book.requests.get("api")
    return 0 if counters is None else sum(counters.counts)


# -- scraped while wrk runs --------------------------------------------------------------------

# Each wrk thread has one connection and stops itself after PER_THREAD answers (well within
# -d6s), so no request is left in flight: the proxy answered exactly what wrk counted.
PER_THREAD = 1000
STOP_AFTER = f"""
local count = 0
function response(status, headers, body)
  count = count + 1
  if count == {PER_THREAD} then wrk.thread:stop() end
end
"""


@async_test(90)
async def test_counters_only_grow_while_wrk_runs(tmp_path: Path) -> None:
    wrk = require_tool("wrk")
    script = tmp_path / "stop.lua"
    script.write_text(STOP_AFTER)
    port = free_port()
    async with serve(_http_backend) as backend:
        async with SmartRoute([http_route("api", port, backend)], bind_address=LOOPBACK) as proxy:
            run = await asyncio.create_subprocess_exec(
                wrk, "-t2", "-c2", "-d6s", "-s", str(script), f"http://{LOOPBACK}:{port}/",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            communicate = asyncio.ensure_future(run.communicate())
            scrapes = []
            try:
                while not communicate.done():
                    scrapes.append(parse(render_metrics(proxy)))
                    await asyncio.sleep(0.05)
                out, err = await asyncio.wait_for(communicate, 60)
            finally:
                if run.returncode is None:
                    run.kill()
                    await run.wait()
            assert run.returncode == 0, err.decode()
            await settled(proxy, lambda s: s["connections"]["active"] == 0)
            scrapes.append(parse(render_metrics(proxy)))
    report = out.decode()
    counted = int(re.search(r"(\d+) requests in", report)[1])  # type: ignore[index]
    assert counted == 2 * PER_THREAD, report
    assert len(scrapes) >= 3, "scraped during the run"
    for earlier, later in zip(scrapes, scrapes[1:], strict=False):
        for name, family in earlier.items():
            if family.kind not in ("counter", "histogram"):
                continue
            for series, before in family.samples.items():
                after = later[name].samples.get(series)
                assert after is not None, f"{series} vanished"
                assert after >= before, f"{series} went from {before} to {after}"
    final = scrapes[-1]
    requests = "smartroute_http_requests_total"
    assert value(final, requests, route="api", method="GET", status="2xx") == counted
    assert total(final, requests) == counted
    duration = "smartroute_http_request_duration_seconds"
    assert value(final, f"{duration}_count", route="api") == counted
    assert any(0 < total(s, requests) < counted for s in scrapes), "a scrape mid-run"
    assert os.environ.get("SMARTROUTE_TEST_LOOP", "asyncio") in ("asyncio", "uvloop")
