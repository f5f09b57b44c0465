"""The one decision point: what is known of a connection or a request -> route -> admission.

Every path that routes asks here and nowhere else: the accept step (by port, or by a
ClientHello peeked at), the transport pipeline (by the first bytes, when routes need them) and
each HTTP request of a session. The facts are built here from what was seen, the route table
is matched once, the route's security answers once, and the connection's record is told; the
caller then carries the verdict out (relay, hand over, answer). Hooks that look at or change a
connection or a request belong here too, between the match and the verdict.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from smartroute.context import RouteContext
from smartroute.errors import HttpParseError
from smartroute.protocols.detect import Detection
from smartroute.protocols.http import RequestHead
from smartroute.protocols.tls import ClientHello
from smartroute.routing.facts import ConnectionFacts, RouteMatch
from smartroute.routing.model import CompiledRoute, TlsSettings, speaks_http
from smartroute.routing.patterns import IPAddress
from smartroute.server.hooks import CONNECT_KEYS, REQUEST_KEYS, HookRequest, run_hooks
from smartroute.server.hooks import Verdict as HookVerdict
from smartroute.server.http.messages import Response, text_response
from smartroute.server.security import basic_auth_refusal, challenge_header, ip_refusal
from smartroute.server.stats import ConnectionRecord

if TYPE_CHECKING:
    from smartroute.server.runtime import Runtime


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """What the ClientHello said, for connections that arrived over TLS."""

    sni: str | None
    version: str | None
    alpn: tuple[str, ...]
    terminated: bool
    client_cert: Mapping[str, Any] | None = None  # see RouteContext.client_cert
    client_ca: str | None = None  # the CA the handshake checked client certificates against


@dataclass(frozen=True, slots=True)
class Refusal:
    """A connection or request that goes no further: answer ``status`` with ``reason`` (and
    extra response ``headers``; ``body`` instead of the reason when a hook gave one).
    ``found`` is the route that refused it, None for a malformed request."""

    found: RouteMatch | None
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None

    def response(self) -> Response:
        """The answer to send (an HTTP client's)."""
        if self.body is None:
            return text_response(self.status, self.reason, list(self.headers))
        headers = list(self.headers)
        if not any(name.lower() == "content-type" for name, _ in headers):
            headers.append(("Content-Type", "text/plain; charset=utf-8"))
        return Response(self.status, [*headers, ("Cache-Control", "no-store")], self.body)


# What a decision says: the route to act on (the matcher's own object: a connection that goes
# on costs no allocation here), a refusal to answer, or None when no route matches.
Verdict: TypeAlias = RouteMatch | Refusal | None


@dataclass(frozen=True, slots=True)
class Peeked:
    """What the accept step learned of a connection before handing it to a transport: what
    its first ``length`` bytes are (peeked at, still in the socket, to be read) and, when it
    ``decided`` the connection but the fast lane cannot carry the route out, the verdict and
    the facts it was made from."""

    detection: Detection | None
    length: int = 0
    decided: bool = False
    verdict: Verdict = None
    facts: ConnectionFacts | None = None


@dataclass(frozen=True, slots=True)
class FirstRequest:
    """An HTTP request parsed and matched before the transport session got its connection:
    the connection's first (by the pipeline or the accept step) or one the fast lane hands
    over. ``found`` is its match; when ``decided``, :func:`decide_request` already ran too and
    ``verdict`` is what it said."""

    head: RequestHead
    facts: ConnectionFacts
    found: RouteMatch | None
    decided: bool = False
    verdict: Verdict = None


# -- facts -------------------------------------------------------------------------------------


def hello_facts(port: int, client_ip: IPAddress, hello: ClientHello) -> ConnectionFacts:
    """A TLS connection, known by its ClientHello."""
    return ConnectionFacts(
        port,
        client_ip,
        domain=hello.sni,
        is_tls=True,
        tls_version=hello.highest_version,
        alpn=hello.alpn,
        protocol="tls",
    )


def detected_facts(port: int, client_ip: IPAddress, detection: Detection | None) -> ConnectionFacts:
    """A connection known by its first bytes (None or "other": by its port and client)."""
    if detection is None:
        return ConnectionFacts(port, client_ip)
    if detection.kind == "other":
        return ConnectionFacts(port, client_ip, protocol=detection.protocol)
    if detection.hello is not None:
        return hello_facts(port, client_ip, detection.hello)
    assert detection.head is not None
    return request_facts(port, client_ip, detection.head, None)


def request_facts(
    port: int, client_ip: IPAddress, head: RequestHead, tls: TlsInfo | None
) -> ConnectionFacts:
    """One HTTP request, on a plain connection or inside TLS (``tls``)."""
    if tls is None:
        return ConnectionFacts(
            port,
            client_ip,
            domain=head.host,
            path=head.path,
            headers=head.header_map(),
            protocol="http",
        )
    return ConnectionFacts(
        port=port,
        client_ip=client_ip,
        domain=head.host or tls.sni,
        is_tls=True,
        tls_version=tls.version,
        alpn=tls.alpn,
        path=head.path,
        headers=head.header_map(),
        terminated=tls.terminated,
        protocol="tls",
        client_ca=tls.client_ca,
        client_cert=tls.client_cert is not None,
    )


# -- decisions ---------------------------------------------------------------------------------


def decide_connection(
    runtime: Runtime,
    record: ConnectionRecord,
    facts: ConnectionFacts,
    error: HttpParseError | None = None,
) -> Verdict:
    """Route a connection and admit it (connection and rate limits count it from here on).

    ``error``: the first bytes were a malformed HTTP request. A route that would serve HTTP
    then does not take the connection: the verdict is that error's answer, with no route
    (nor is there one when no route matches; the record says which).
    """
    record.domain = facts.domain
    found = runtime.table.match(facts)
    if error is not None and (found is None or speaks_http(found.route.action)):
        record.fail("bad-request", str(error))
        return Refusal(None, error.status, str(error))
    return _admit(runtime, record, facts, found)


def _admit(
    runtime: Runtime, record: ConnectionRecord, facts: ConnectionFacts, found: RouteMatch | None
) -> Verdict:
    """The connection goes to ``found``'s route if its targets and its security allow."""
    if found is None:
        record.fail("no-route", "no route matches")
        return None
    route = found.route
    runtime.stats.routed(record, route.name, route.timeouts)
    down = runtime.backends.down
    if down and id(route.action) in down:
        return _no_target(record, found, down[id(route.action)].retry_after)
    if route.security is not None:
        refusal = runtime.gate.admit(route, facts.client_ip)
        if refusal is not None:
            record.fail("refused", refusal[1])
            return Refusal(found, refusal[0], refusal[1])
        record.admitted = route.name
    return found


def decide_request(
    runtime: Runtime,
    record: ConnectionRecord,
    facts: ConnectionFacts,
    head: RequestHead,
    found: RouteMatch | None = None,
) -> Verdict:
    """Route one HTTP request (``found``: the connection's match of this very request, made
    from the same facts) and check the route's IP lists and basic auth. Connection and rate
    limits counted the connection once, under its first route; each request's route sets the
    time limits that follow it."""
    if found is None:
        found = runtime.table.match(facts)
        if found is None:
            return None
    route = found.route
    if record.route is None:
        runtime.stats.routed(record, route.name, route.timeouts)
    elif route.timeouts is not None:
        record.timeouts = route.timeouts
    tls = route.tls
    if tls is not None and tls.client_ca is not None and not _verified(tls, facts):
        # Requests are routed by Host inside a handshake another route (by SNI) set up: one
        # that did not check client certificates against this route's CA cannot reach it.
        misdirected = f"route {route.name!r} needs a client certificate: connect with its name"
        record.fail("refused", misdirected)
        return Refusal(found, 421, misdirected)
    down = runtime.backends.down
    if down and id(route.action) in down:
        return _no_target(record, found, down[id(route.action)].retry_after)
    policy = route.security
    if policy is None:
        return found
    if (reason := ip_refusal(policy, facts.client_ip)) is not None:
        record.fail("refused", reason)
        return Refusal(found, 403, reason)
    auth = policy.basic_auth
    if auth is not None:
        reason = basic_auth_refusal(auth, head.header("authorization"))
        if reason is not None:
            return Refusal(found, 401, reason, (challenge_header(auth),))
    return found


def _verified(tls: TlsSettings, facts: ConnectionFacts) -> bool:
    """The connection's handshake checked client certificates as ``tls`` asks."""
    if facts.client_ca != tls.client_ca:
        return False
    return facts.client_cert or tls.client_auth == "optional"


def _no_target(record: ConnectionRecord, found: RouteMatch, retry_after: int) -> Refusal:
    """No target of the route is up and no other route matches: HTTP clients get 503 and a
    hint when to come back, other connections are closed."""
    reason = f"no target of route {found.route.name!r} is up"
    record.fail("no-target", reason)
    return Refusal(found, 503, reason, (("Retry-After", str(retry_after)),))


# -- hooks -------------------------------------------------------------------------------------

# A connection or request a hook dropped: closed without an answer.
DROP: Literal["drop"] = "drop"
Consulted: TypeAlias = "tuple[Verdict | Literal['drop'], RouteContext | None, HookVerdict | None]"


@dataclass(slots=True)
class Heard:
    """What a connection's ``on_connect`` hooks said so far, route by route: an HTTP
    connection may reach several routes, and each route's hooks hear of it once."""

    routes: set[int] = field(default_factory=set)  # ids of the routes whose hooks ran
    declined: list[CompiledRoute] = field(default_factory=list)  # routes that fell back
    targets: dict[int, tuple[str, int]] = field(default_factory=dict)  # by route id
    refused: dict[int, Refusal] = field(default_factory=dict)  # by route id: for good


async def consult_connection(
    runtime: Runtime,
    record: ConnectionRecord,
    facts: ConnectionFacts,
    found: RouteMatch,
    context: Callable[[RouteMatch], RouteContext],
    heard: Heard,
    decide: Callable[[RouteMatch | None], Verdict] | None = None,
) -> Consulted:
    """Run the ``on_connect`` hooks of ``found``'s route unless they heard of this connection
    already (a route that declines passes it to the next matching route, ``decide`` says
    whether that one takes it, and its hooks run in turn). Returns the verdict (or ``DROP``),
    the context the hooks saw (None when none ran), and what they said."""

    def admit(match: RouteMatch | None) -> Verdict:
        if record.admitted is not None:  # the declining route let it in: it no longer holds it
            runtime.gate.release(record.admitted, record.client_ip)
            record.admitted = None
        return _admit(runtime, record, facts, match)

    while True:
        route = found.route
        chain = route.chain
        refused = heard.refused.get(id(route))
        if refused is not None:  # its hooks refused the connection: every request of it too
            record.fail("refused", "refused by a hook")
            return refused, None, None
        if chain is None or not chain.on_connect or id(route) in heard.routes:
            return found, None, None  # nothing to ask (the caller builds a context if needed)
        heard.routes.add(id(route))
        ctx = context(found)
        said = await run_hooks(chain, "on_connect", CONNECT_KEYS, ctx)
        if said is None:
            return found, ctx, None
        if not said.fallback or said.stops:
            if said.target is not None:
                heard.targets[id(route)] = said.target
            verdict = _heard(record, found, said)
            if isinstance(verdict, Refusal):
                heard.refused[id(route)] = verdict
            return verdict, ctx, said
        heard.declined.append(route)
        verdict = (decide or admit)(runtime.table.match_without(facts, heard.declined))
        if not isinstance(verdict, RouteMatch):
            return verdict, None, None
        found = verdict


async def consult_request(
    runtime: Runtime,
    record: ConnectionRecord,
    facts: ConnectionFacts,
    head: RequestHead,
    found: RouteMatch,
    context: Callable[[RouteMatch], RouteContext],
    heard: Heard,
) -> Consulted:
    """Run the hooks a request meets: the ``on_connect`` hooks of a route the connection
    reaches for the first time (and none of a route it declined), then the request's route's
    ``on_request`` hooks (declining routes pass it on, as for :func:`consult_connection`).
    The same three answers; a target chosen by the route's ``on_connect`` hooks comes back
    as the verdict's ``target`` when ``on_request`` chose none."""

    def decide(match: RouteMatch | None) -> Verdict:
        return None if match is None else decide_request(runtime, record, facts, head, match)

    if heard.declined and any(found.route is route for route in heard.declined):
        verdict = decide(runtime.table.match_without(facts, heard.declined))
        if not isinstance(verdict, RouteMatch):
            return verdict, None, None
        found = verdict
    declined = list(heard.declined)
    request: HookRequest | None = None
    while True:
        consulted, ctx, said = await consult_connection(
            runtime, record, facts, found, context, heard, decide
        )
        if not isinstance(consulted, RouteMatch):
            return consulted, ctx, said
        found = consulted
        chain = found.route.chain
        if chain is not None and chain.on_request:
            ctx = context(found)
            if request is None:
                request = HookRequest(head.method, head.path, head.query, head.header_map())
            said = await run_hooks(chain, "on_request", REQUEST_KEYS, ctx, request)
        if said is None or not said.fallback or said.stops:
            target = heard.targets.get(id(found.route))
            if target is not None and (said is None or said.target is None):
                said = HookVerdict(target=target) if said is None else said.copy()
                said.target = target
            if said is None:
                return found, ctx, None
            return _heard(record, found, said), ctx, said
        declined.append(found.route)
        verdict = decide(runtime.table.match_without(facts, declined))
        if not isinstance(verdict, RouteMatch):
            return verdict, None, None
        found = verdict


def _heard(
    record: ConnectionRecord, found: RouteMatch, said: HookVerdict
) -> Verdict | Literal["drop"]:
    """What a stopping verdict means for the connection or request, else ``found``."""
    if said.drop:
        record.fail("refused", "dropped by a hook")
        return DROP
    if said.failed is not None:
        record.fail("refused", said.failed)
        return Refusal(found, 503, "refused: a hook failed")
    if not said.allow:
        record.fail("refused", "refused by a hook")
        status = said.status or 403
        return Refusal(found, status, "refused", tuple(said.headers), said.body)
    return found


def route_context(
    record: ConnectionRecord,
    server_ip: str,
    facts: ConnectionFacts,
    found: RouteMatch,
    head: RequestHead | None,
    client_cert: Mapping[str, Any] | None = None,
) -> RouteContext:
    """What the action, hooks and handlers of ``found`` are told of the connection (and of its
    request ``head``, when there is one)."""
    return RouteContext(
        port=facts.port,
        client_ip=record.client_ip,
        client_port=record.client_port,
        server_ip=server_ip,
        connection_id=record.id,
        timestamp=time.time(),
        domain=facts.domain,
        path=facts.path,
        query=head.query if head is not None else None,
        method=head.method if head is not None else None,
        headers=facts.headers,
        is_tls=facts.is_tls,
        tls_version=facts.tls_version,
        alpn=facts.alpn if facts.is_tls else None,
        route_name=found.route.name,
        params=dict(found.params) if facts.path is not None else None,
        protocol=facts.protocol,
        client_cert=client_cert,
    )
