"""The ``smartroute`` command: ``run [CONFIG]`` and ``check CONFIG``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from smartroute import __version__
from smartroute.config import load_config
from smartroute.demo import demo_routes, describe_demo
from smartroute.errors import SmartRouteError
from smartroute.proxy import SmartRoute
from smartroute.routing.matcher import RouteTable
from smartroute.routing.model import CompiledRoute, ForwardAction
from smartroute.routing.validation import validate_routes
from smartroute.settings import validate_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smartroute", description=__doc__)
    parser.add_argument("--version", action="version", version=f"smartroute {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve a config, or the built-in demo without one")
    run.add_argument("config", nargs="?", help=".py, .toml or .json file with routes")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--demo-port", type=int, default=8081, help="first port of the demo")
    run.add_argument("--demo-host", default="127.0.0.1", help="address the demo binds")
    check = sub.add_parser("check", help="validate a config and show its routes per port")
    check.add_argument("config")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check":
            return _check(args.config)
        return _run(args)
    except SmartRouteError as exc:
        print(f"smartroute: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if args.config:
        loaded = load_config(args.config)
        routes, settings = loaded.routes, loaded.settings
        banner = [f"serving {args.config}"]
    else:
        routes = demo_routes(args.demo_port)
        settings = {"bind_address": args.demo_host}
        banner = [
            "smartroute demo (Ctrl-C to stop):",
            *describe_demo(args.demo_port, args.demo_host),
        ]
    proxy = SmartRoute(routes, **settings)
    asyncio.run(_serve(proxy, banner))
    return 0


async def _serve(proxy: SmartRoute, banner: list[str]) -> None:
    """Run until SIGINT or SIGTERM, then stop gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await proxy.start()
    for line in banner:
        print(line, flush=True)
    for port, count in proxy.listening_ports.items():
        print(f"listening on port {port} ({count} route{'s' * (count != 1)})", flush=True)
    try:
        await stop.wait()
    finally:
        print("stopping", flush=True)
        await proxy.stop()


def _check(path: str) -> int:
    loaded = load_config(path)
    settings = validate_settings(loaded.settings)
    routes = validate_routes(loaded.routes)
    table = RouteTable(routes)
    print(f"{path}: {len(routes)} routes, bind address {settings.bind_address}")
    disabled = [r.name for r in routes if not r.enabled]
    for port in sorted(table.port_counts):
        reads = "reads first bytes" if table.needs_data(port) else "dispatches at once"
        print(f"port {port} ({reads}):")
        for position, route in enumerate(table.ordered(port), 1):
            print(f"  {position}. {_explain(route)}")
    if disabled:
        print("disabled: " + ", ".join(disabled))
    return 0


def _explain(route: CompiledRoute) -> str:
    match = route.match
    parts = [route.name]
    if route.priority:
        parts.append(f"priority={route.priority}")
    conditions: list[tuple[str, Any]] = [
        ("domains", ",".join(d.text for d in match.domains)),
        ("path", match.path.text if match.path else ""),
        ("client_ip", ",".join(r.text for r in match.client_ip)),
        ("tls_version", ",".join(sorted(match.tls_version))),
        ("alpn", ",".join(sorted(match.alpn))),
        ("headers", ",".join(f"{h.name}={h.value}" for h in match.headers)),
    ]
    parts += [f"{key}={value}" for key, value in conditions if value]
    action = route.action
    target = ""
    if isinstance(action, ForwardAction):
        hosts = []
        for t in action.targets:
            host = ",".join(t.host) if isinstance(t.host, tuple) else "<callable>"
            port = t.port if isinstance(t.port, int | str) else "<callable>"
            hosts.append(f"{host}:{port}")
        target = f" {action.protocol} " + " ".join(hosts)
    tls = f" tls={route.tls.mode}" if route.tls else ""
    return " ".join(parts) + f" -> {action.type}{target}{tls}"


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
