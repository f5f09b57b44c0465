"""Validated routes back into their dict form: what ``GET /api/routes`` answers.

:func:`export_route` is the inverse of validation where one exists: validating what it returns
gives the same route again (``validate(export(route)) == route``), with these exceptions, each
chosen so that the output never carries a secret and is always JSON:

- a private key given as PEM text is replaced by :data:`INLINE_KEY` (keys read from files are
  exported as their path), so such a route must be sent again with its key;
- a plain basic-auth password is exported hashed (``sha256:<hex>``), which checks the same
  passwords;
- a callable (socket handler, target host or port function, hook) is exported as its import
  path ``"module:qualname"`` when that path leads back to it, else as
  ``"<callable module.qualname>"``, which validation refuses (:func:`placeholder_problem`);
- binary inline ``static`` content that is not UTF-8 becomes :data:`BINARY_CONTENT`.

Fields left at their defaults are omitted, as are generated route names (``route-3``), so the
output reads like what a person would have written.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from smartroute.errors import ConfigError
from smartroute.routing.model import (
    Action,
    BandwidthPolicy,
    CertificatePair,
    CompiledRoute,
    ForwardAction,
    HealthCheck,
    MatchCriteria,
    Rate,
    RedirectAction,
    SecurityPolicy,
    SocketHandlerAction,
    StaticAction,
    TargetSpec,
    TlsSettings,
)
from smartroute.routing.validation._fields import import_object

__all__ = [
    "BINARY_CONTENT",
    "INLINE_KEY",
    "export_route",
    "export_routes",
    "import_target_callables",
    "placeholder_problem",
]

INLINE_KEY = "(inline key, not shown)"
BINARY_CONTENT = "(binary content, not shown)"
_CALLABLE_PREFIX = "<callable "
_HASHED = ("sha256:", "pbkdf2_sha256$")
# "package.module:attribute.path": how a target host or port function is named in the API.
_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def export_routes(routes: Iterable[CompiledRoute]) -> list[dict[str, Any]]:
    return [export_route(route) for route in routes]


def export_route(route: CompiledRoute) -> dict[str, Any]:
    """The dict form of a validated route (see the module docstring for what differs)."""
    out: dict[str, Any] = {}
    if route.named:
        out["name"] = route.name
    if route.priority:
        out["priority"] = route.priority
    if not route.enabled:
        out["enabled"] = False
    out["match"] = _match(route.match)
    action = _action(route.action)
    if route.tls is not None:
        action["tls"] = _tls(route.tls)
    out["action"] = action
    if route.security is not None:
        out["security"] = _security(route.security)
    if route.timeout_overrides:
        # None is "no limit", written 0 (only the optional limits can be off)
        out["timeouts"] = {
            name: 0 if seconds is None else seconds
            for name, seconds in route.timeout_overrides.items()
        }
    if route.hooks:
        out["hooks"] = [callable_name(hook) for hook in route.hooks]
    if route.hooks_fail != "closed":
        out["hooks_fail"] = route.hooks_fail
    if route.bandwidth is not None:
        out["bandwidth"] = _bandwidth(route.bandwidth)
    return out


# -- callables -----------------------------------------------------------------------------------


def callable_name(obj: object) -> str:
    """``"module:qualname"`` when importing that gives ``obj`` back, else a placeholder that
    names it (``"<callable module.qualname>"``) and that validation refuses."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str) and "<" not in qualname:
        if _resolves(module, qualname, obj):
            return f"{module}:{qualname}"
    # an instance (a hook object) reachable as a module-level name of its class's module
    kind = type(obj)
    loaded = sys.modules.get(kind.__module__)
    if loaded is not None and qualname is None:
        for name, value in list(vars(loaded).items()):
            if value is obj and not name.startswith("__"):
                return f"{kind.__module__}:{name}"
    shown_module = module if isinstance(module, str) else kind.__module__
    shown_name = qualname if isinstance(qualname, str) else kind.__qualname__
    return f"{_CALLABLE_PREFIX}{shown_module}.{shown_name}>"


def _resolves(module: str, qualname: str, obj: object) -> bool:
    found: object = sys.modules.get(module)  # only modules already loaded: nothing is run
    if found is None:
        return False
    for part in qualname.split("."):
        found = getattr(found, part, None)
        if found is None:
            return False
    try:
        return found is obj or bool(found == obj)  # bound methods are equal, not identical
    except Exception:  # an object whose __eq__ raises is not ours to judge
        return False


def placeholder_problem(routes: object, path: str = "routes") -> ConfigError | None:
    """The first placeholder of an export (a callable without an import path, a key or
    content not shown) left in ``routes``, as the error a PUT of them gets; None if none."""
    found = _find_placeholder(routes, path)
    if found is None:
        return None
    where, text = found
    if text == INLINE_KEY:
        return ConfigError(
            where,
            "the key of this route is not shown by GET /api/routes: send it again with its"
            " key (PEM text or a file path)",
        )
    if text == BINARY_CONTENT:
        return ConfigError(
            where, "binary content is not shown by GET /api/routes: send it again with it"
        )
    return ConfigError(
        where,
        f"{text} has no import path: give a module-level function as "
        '"package.module:function" (or set the route from Python)',
    )


def _find_placeholder(value: object, path: str) -> tuple[str, str] | None:
    if isinstance(value, str):
        if value.startswith(_CALLABLE_PREFIX) or value in (INLINE_KEY, BINARY_CONTENT):
            return path, value
        return None
    if isinstance(value, Mapping):
        for key, item in value.items():
            found = _find_placeholder(item, f"{path}.{key}")
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = _find_placeholder(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def import_target_callables(routes: object, path: str = "routes") -> object:
    """``routes`` (JSON input) with every target ``host`` or ``port`` written as
    ``"package.module:function"`` replaced by that function, as :func:`export_route` names
    them; everything else is left for validation to judge. A host name never has that form
    (no colon outside an IPv6 literal, which cannot have it either)."""
    if not isinstance(routes, list):
        return routes
    result: list[object] = []
    for i, route in enumerate(routes):
        action = route.get("action") if isinstance(route, Mapping) else None
        targets = action.get("targets") if isinstance(action, Mapping) else None
        if not (isinstance(route, Mapping) and isinstance(action, Mapping)) or not isinstance(
            targets, list
        ):
            result.append(route)  # not a forward with a list of targets: validation judges it
            continue
        where = f"{path}[{i}].action.targets"
        resolved = [_import_target(t, f"{where}[{j}]") for j, t in enumerate(targets)]
        result.append({**route, "action": {**action, "targets": resolved}})
    return result


def _import_target(target: object, path: str) -> object:
    if not isinstance(target, Mapping):
        return target
    changed = dict(target)
    for key in ("host", "port"):
        value = target.get(key)
        if isinstance(value, str) and _IMPORT_PATH.fullmatch(value):
            changed[key] = import_object(value, f"{path}.{key}")
    return changed


# -- parts ---------------------------------------------------------------------------------------


def _ports(ports: frozenset[int]) -> int | list[int | dict[str, int]]:
    """One int, or ints and ``{"from", "to"}`` runs (three ports or more) in order."""
    ordered = sorted(ports)
    if len(ordered) == 1:
        return ordered[0]
    out: list[int | dict[str, int]] = []
    start = prev = ordered[0]
    for port in [*ordered[1:], -1]:
        if port == prev + 1:
            prev = port
            continue
        if prev - start >= 2:
            out.append({"from": start, "to": prev})
        else:
            out.extend(range(start, prev + 1))
        start = prev = port
    return out


def _one_or_list(items: list[str]) -> str | list[str]:
    return items[0] if len(items) == 1 else items


def _match(match: MatchCriteria) -> dict[str, Any]:
    out: dict[str, Any] = {"ports": _ports(match.ports)}
    if match.domains:
        out["domains"] = _one_or_list([d.text for d in match.domains])
    if match.path is not None:
        out["path"] = match.path.text
    if match.client_ip:
        out["client_ip"] = _one_or_list([rule.text for rule in match.client_ip])
    if match.tls_version:
        out["tls_version"] = sorted(match.tls_version)
    if match.alpn:
        out["alpn"] = sorted(match.alpn)
    if match.headers:
        out["headers"] = {rule.name: rule.value for rule in match.headers}
    if match.protocols:
        out["protocol"] = _one_or_list(sorted(match.protocols))
    return out


def _action(action: Action) -> dict[str, Any]:
    if isinstance(action, ForwardAction):
        return _forward(action)
    if isinstance(action, RedirectAction):
        return {"type": "redirect", "redirect": {"to": action.to, "status": action.status}}
    if isinstance(action, StaticAction):
        return {"type": "static", "static": _static(action)}
    if isinstance(action, SocketHandlerAction):
        return {"type": "socket-handler", "socket_handler": callable_name(action.handler)}
    return {"type": "block"}


def _forward(action: ForwardAction) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "forward", "targets": [_target(t) for t in action.targets]}
    if action.protocol != "auto":
        out["protocol"] = action.protocol
    if action.load_balancing != "round-robin":
        out["load_balancing"] = action.load_balancing
    if action.health_check is not None:
        out["health_check"] = _health_check(action.health_check)
    if action.passive_health is not None:
        passive = action.passive_health
        out["passive_health"] = {
            "max_fails": passive.max_fails,
            "fail_timeout": passive.fail_timeout,
        }
    if action.retry is not None:
        retry = action.retry
        out["retry"] = {
            "attempts": retry.attempts,
            "backoff": retry.backoff,
            "max_backoff": retry.max_backoff,
            "jitter": retry.jitter,
            "any_method": retry.any_method,
        }
    return out


def _target(target: TargetSpec) -> dict[str, Any]:
    host = target.host
    port = target.port
    out: dict[str, Any] = {
        "host": callable_name(host) if callable(host) else _one_or_list(list(host)),
        "port": callable_name(port) if callable(port) else port,
    }
    if target.send_proxy_protocol is not None:
        out["send_proxy_protocol"] = target.send_proxy_protocol
    if target.weight != 1:
        out["weight"] = target.weight
    if target.backup:
        out["backup"] = True
    if target.initial != "up":
        out["initial"] = target.initial
    return out


def _health_check(check: HealthCheck) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": check.type,
        "interval": check.interval,
        "timeout": check.timeout,
        "rise": check.rise,
        "fall": check.fall,
    }
    if check.type == "http":  # the other keys are refused on a "tcp" check
        out["path"] = check.path
        out["expect_status"] = list(check.expect_status)
        if check.host is not None:
            out["host"] = check.host
    return out


def _static(action: StaticAction) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if action.root is not None:
        out["root"] = action.root
        if action.index != ("index.html",):
            out["index"] = list(action.index)
    elif action.content is not None:
        try:
            out["content"] = action.content.decode("utf-8")
        except UnicodeDecodeError:
            out["content"] = BINARY_CONTENT
    if action.content_type != "text/plain; charset=utf-8":
        out["content_type"] = action.content_type
    if action.status != 200:
        out["status"] = action.status
    return out


def _certificate(pair: CertificatePair) -> dict[str, str]:
    return {
        "cert": pair.cert_path if pair.cert_path is not None else pair.cert_pem,
        "key": pair.key_path if pair.key_path is not None else INLINE_KEY,
    }


def _tls(tls: TlsSettings) -> dict[str, Any]:
    out: dict[str, Any] = {"mode": tls.mode}
    if isinstance(tls.certificate, str):  # "auto" or "on-demand"
        out["certificate"] = tls.certificate
    elif tls.certificate is not None:
        out["certificate"] = _certificate(tls.certificate)
    if not tls.backend_verify:
        out["backend_verify"] = False
    if tls.backend_ca is not None:
        out["backend_ca"] = tls.backend_ca  # CA certificates: public
    if tls.backend_server_name is not None:
        out["backend_server_name"] = tls.backend_server_name
    if tls.backend_client_certificate is not None:
        out["backend_client_certificate"] = _certificate(tls.backend_client_certificate)
    if tls.client_ca is not None:
        out["client_ca"] = tls.client_ca
        out["client_auth"] = tls.client_auth
    return out


def _password(stored: str) -> str:
    """A hashed password as it is; a plain one as ``sha256:<hex>``, which accepts the same."""
    if stored.startswith(_HASHED):
        return stored
    return "sha256:" + hashlib.sha256(stored.encode()).hexdigest()


def _security(policy: SecurityPolicy) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if policy.ip_allow_list:
        out["ip_allow_list"] = [rule.text for rule in policy.ip_allow_list]
    if policy.ip_block_list:
        out["ip_block_list"] = [rule.text for rule in policy.ip_block_list]
    if policy.max_connections is not None:
        out["max_connections"] = policy.max_connections
    if policy.max_connections_per_ip is not None:
        out["max_connections_per_ip"] = policy.max_connections_per_ip
    if policy.rate_limit is not None:
        out["rate_limit"] = {"connections_per_minute": policy.rate_limit.connections_per_minute}
    if policy.basic_auth is not None:
        auth = policy.basic_auth
        block: dict[str, Any] = {
            "users": {name: _password(password) for name, password in auth.users.items()}
        }
        if auth.realm != "smartroute":
            block["realm"] = auth.realm
        out["basic_auth"] = block
    return out


def _rate(rate: Rate) -> dict[str, float]:
    out: dict[str, float] = {}
    if rate.download is not None:
        out["download"] = rate.download
    if rate.upload is not None:
        out["upload"] = rate.upload
    return out


def _bandwidth(policy: BandwidthPolicy) -> dict[str, Any]:
    scopes = (
        ("per_connection", policy.per_connection),
        ("per_ip", policy.per_ip),
        ("per_route", policy.per_route),
    )
    return {name: _rate(rate) for name, rate in scopes if rate is not None}
