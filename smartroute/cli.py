"""The ``smartroute`` command: ``run [CONFIG]``, ``check CONFIG``, ``explain CONFIG``, ``certs``."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

from smartroute import __version__
from smartroute.certs.records import StoredCertificate, StoreProblem
from smartroute.certs.settings import validate_acme
from smartroute.certs.storage import CertificateStorage, open_storage
from smartroute.certs.wanted import auto_domains
from smartroute.config import load_config
from smartroute.demo import demo_routes, describe_demo
from smartroute.errors import CertificateStoreError, SmartRouteError
from smartroute.proxy import SmartRoute
from smartroute.routing.explain import can_decline, explain_connection
from smartroute.routing.matcher import RouteTable
from smartroute.routing.model import CompiledRoute, ForwardAction
from smartroute.routing.shadowing import shadowed
from smartroute.routing.validation import validate_routes
from smartroute.settings import Settings, validate_settings

log = logging.getLogger("smartroute")

LOOP_ENV = "SMARTROUTE_LOOP"
"""Environment variable choosing the event loop: ``asyncio``, ``uvloop``, or unset (automatic)."""

LoopFactory = Callable[[], asyncio.AbstractEventLoop]
_T = TypeVar("_T")


def choose_loop(environ: Mapping[str, str] = os.environ) -> tuple[str, LoopFactory | None]:
    """The event loop the command runs on: a name for the log, and a factory for the Runner.

    uvloop's loop when uvloop is installed (``pip install 'smartroute[uvloop]'``), else
    asyncio's (factory ``None``). ``SMARTROUTE_LOOP=asyncio`` forces asyncio's loop;
    ``SMARTROUTE_LOOP=uvloop`` insists on uvloop and is an error without it.
    """
    wanted = environ.get(LOOP_ENV, "").strip().lower()
    if wanted == "asyncio":
        return "asyncio", None
    if wanted not in ("", "uvloop"):
        raise SmartRouteError(f"{LOOP_ENV}={wanted!r}: expected 'asyncio' or 'uvloop'")
    try:
        import uvloop
    except ImportError:
        if wanted == "uvloop":
            raise SmartRouteError(
                f"{LOOP_ENV}=uvloop but uvloop is not installed (pip install 'smartroute[uvloop]')"
            ) from None
        return "asyncio", None
    return "uvloop", uvloop.new_event_loop


def _run_loop(main: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run ``main()`` on the loop :func:`choose_loop` picks.

    ``asyncio.run`` takes a loop factory only from Python 3.12; ``asyncio.Runner`` takes one on
    3.11 and, unlike ``uvloop.install()``, leaves the global event loop policy alone.
    """
    name, factory = choose_loop()
    log.info("event loop: %s", name)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smartroute", description=__doc__)
    parser.add_argument("--version", action="version", version=f"smartroute {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve a config, or the built-in demo without one")
    run.add_argument("config", nargs="?", help=".py, .toml or .json file with routes")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--demo-port", type=int, default=8081, help="first port of the demo")
    run.add_argument("--demo-host", default="127.0.0.1", help="address the demo binds")
    check = sub.add_parser(
        "check", help="validate a config, show its routes per port, warn about shadowed routes"
    )
    check.add_argument("config")
    check.add_argument("--strict", action="store_true", help="warnings are errors (exit 2)")
    explain = sub.add_parser(
        "explain", help="which route takes a connection or request, and why the others do not"
    )
    explain.add_argument("config")
    explain.add_argument("--port", type=int, required=True, help="the port connected to")
    explain.add_argument("--sni", help="the TLS SNI (makes it a TLS connection)")
    explain.add_argument("--host", help="the HTTP Host (makes it an HTTP request)")
    explain.add_argument("--path", help="the HTTP path (default / for a request)")
    explain.add_argument("--client-ip", default="203.0.113.1", help="the client address")
    explain.add_argument(
        "--header", action="append", default=[], metavar="NAME=VALUE", help="a request header"
    )
    explain.add_argument("--protocol", help="what the first bytes are (tls, http, ssh, ...)")
    explain.add_argument("--tls-version", help="highest TLS version offered (TLSv1.3)")
    explain.add_argument("--alpn", action="append", default=[], help="an ALPN protocol offered")
    explain.add_argument("--json", action="store_true", help="print the explanation as JSON")
    certs = sub.add_parser("certs", help="automatic certificates of a config")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True)
    listing = certs_sub.add_parser("list", help="stored certificates: domains, expiry, source")
    listing.add_argument("config")
    renew = certs_sub.add_parser("renew", help="renew auto certificates now (binds the ports)")
    renew.add_argument("config")
    renew.add_argument("domains", nargs="*", help="only these domains (default: all)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check":
            return _check(args.config, args.strict)
        if args.command == "explain":
            return _explain_command(args)
        if args.command == "certs":
            return _certs(args)
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
    _run_loop(lambda: _serve(proxy, banner, args.config))
    return 0


async def _reload(proxy: SmartRoute, path: str) -> None:
    """Apply the config file's routes again; a broken file leaves the running routes alone."""
    try:
        loaded = load_config(path)
        await proxy.update_routes(loaded.routes)
    except Exception as exc:  # any error in the file: report it, keep serving
        log.error("reload of %s rejected, the running routes stay: %s", path, exc)
        return
    if validate_settings(loaded.settings) != proxy.settings:
        log.warning("reload of %s: changed settings take effect on restart only", path)
    ports = ", ".join(str(p) for p in proxy.listening_ports)
    log.info("reloaded %s: %d routes, listening on %s", path, len(proxy.routes), ports)


async def _serve(proxy: SmartRoute, banner: list[str], config: str | None = None) -> None:
    """Run until SIGINT or SIGTERM, then stop gracefully; SIGHUP reloads ``config``."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()
    if config is not None:

        def reload() -> None:
            task = loop.create_task(_reload(proxy, config))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGUSR1, lambda: _reopen_access_logs(proxy))
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


def _reopen_access_logs(proxy: SmartRoute) -> None:
    """SIGUSR1: reopen the access-log files (after a log rotation renamed them), workers'
    included."""
    log.info("SIGUSR1: reopened %d access-log file(s)", proxy.reopen_logs())


def _hooked(settings: Settings) -> Callable[[CompiledRoute], bool]:
    """True for the routes that proxy-wide hooks or plugins apply to (they may decline)."""
    everywhere = can_decline(settings.hooks) or any(p.routes is None for p in settings.plugins)
    named = {name for p in settings.plugins for name in p.routes or ()}
    return lambda route: everywhere or route.name in named


def _explain_command(args: argparse.Namespace) -> int:
    loaded = load_config(args.config)
    settings = validate_settings(loaded.settings)
    routes = validate_routes(loaded.routes)
    headers = []
    for item in args.header:
        name, equals, value = item.partition("=")
        if not equals or not name:
            raise SmartRouteError(f"--header {item!r}: expected NAME=VALUE")
        headers.append((name.strip(), value.strip()))
    try:
        explanation = explain_connection(
            routes,
            args.port,
            sni=args.sni,
            host=args.host,
            path=args.path,
            client_ip=args.client_ip,
            headers=headers if args.header else None,
            protocol=args.protocol,
            tls_version=args.tls_version,
            alpn=args.alpn,
            hooked=_hooked(settings),
        )
    except ValueError as exc:
        raise SmartRouteError(str(exc)) from None
    if args.json:
        print(json.dumps(explanation.to_dict(), indent=2))
    else:
        print("\n".join(explanation.text()))
    return 0 if explanation.final is not None else 1


def _check(path: str, strict: bool = False) -> int:
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
    findings = shadowed(routes, _hooked(settings))
    warnings = [f for f in findings if f.proven]
    for finding in findings:
        kind = "note" if not finding.proven else "error" if strict else "warning"
        print(f"{kind}: {finding.text()}")
    if warnings and strict:
        print(f"{len(warnings)} shadowed route(s): errors with --strict", file=sys.stderr)
        return 2
    return 0


def _certs(args: argparse.Namespace) -> int:
    loaded = load_config(args.config)
    settings = validate_settings(loaded.settings)
    routes = validate_routes(loaded.routes)
    if settings.acme is None:
        print(f"{args.config}: no acme setting, so no automatic certificates", file=sys.stderr)
        return 2
    acme = validate_acme(settings.acme)
    wanted = auto_domains(routes, wildcards=acme.challenge == "dns-01")
    if args.certs_command == "list":
        return _list_certs(acme.certificate_store, wanted)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    results = _run_loop(lambda: _renew(loaded.routes, loaded.settings, args.domains or None))
    failed = False
    for domain, status in sorted(results.items()):
        failed |= status["state"] != "valid"
        error = f"  error: {status['last_error']}" if status["last_error"] else ""
        print(f"{domain}: {status['state']} until {status['not_after'] or '-'}{error}")
    return 1 if failed or not results else 0


def _list_certs(location: str, wanted: set[str]) -> int:
    now = datetime.datetime.now(datetime.UTC)
    storage = open_storage(location)
    try:
        entries, problems = _run_loop(lambda: _stored(storage))
    except CertificateStoreError as exc:
        print(f"certificate store: {exc}", file=sys.stderr)
        return 1
    print(f"certificate store {storage.location}: {len(entries)} certificates")
    covered: set[str] = set()
    for entry in sorted(entries, key=lambda e: e.domains):
        covered.update(entry.domains)
        left = entry.not_after - now
        if left.total_seconds() <= 0:
            state = "expired"
        elif left < datetime.timedelta(days=30):
            state = f"expires in {left.days} days"
        else:
            state = "valid"
        print(
            f"  {', '.join(entry.domains)}  until {entry.not_after:%Y-%m-%d %H:%M} UTC  "
            f"source={entry.source}  issuer={entry.issuer}  {state}"
        )
    for problem in problems:
        print(f"  {problem.name}  corrupt: {problem.reason} (it will be issued again)")
    for domain in sorted(wanted - covered):
        print(f"  {domain}  missing (it will be issued on start)")
    return 0


async def _stored(
    storage: CertificateStorage,
) -> tuple[list[StoredCertificate], list[StoreProblem]]:
    await storage.open()
    try:
        return await storage.list()
    finally:
        await storage.close()


async def _renew(
    routes: list[Any], settings: dict[str, Any], domains: list[str] | None
) -> dict[str, dict[str, Any]]:
    proxy = SmartRoute(routes, **settings)
    await proxy.start()
    try:
        return await proxy.renew_certificates(domains)
    finally:
        await proxy.stop()


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
        ("protocol", ",".join(sorted(match.protocols))),
    ]
    parts += [f"{key}={value}" for key, value in conditions if value]
    action = route.action
    target = ""
    if isinstance(action, ForwardAction):
        hosts = []
        for t in action.targets:
            host = ",".join(t.host) if isinstance(t.host, tuple) else "<callable>"
            port = t.port if isinstance(t.port, int | str) else "<callable>"
            extra = (f" weight={t.weight}" if t.weight != 1 else "") + (
                " backup" if t.backup else ""
            )
            hosts.append(f"{host}:{port}{extra}")
        target = f" {action.protocol} " + ", ".join(hosts)
        if len(hosts) > 1 or action.load_balancing != "round-robin":
            target += f" ({action.load_balancing})"
        check = action.health_check
        if check is not None:
            what = check.type if check.type == "tcp" else f"http {check.path}"
            target += f" health={what} every {check.interval:g}s"
    tls = f" tls={route.tls.mode}" if route.tls else ""
    return " ".join(parts) + f" -> {action.type}{target}{tls}"


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
