"""Which names need a certificate: the domains of ``auto`` and ``on-demand`` routes."""

from __future__ import annotations

from collections.abc import Iterable

from smartroute.routing.model import CompiledRoute
from smartroute.routing.patterns import DomainPattern, compile_domain


def auto_domains(routes: Iterable[CompiledRoute], *, wildcards: bool = False) -> set[str]:
    """The domains of every enabled route that asks for ``"certificate": "auto"``: the exact
    ones, and with ``wildcards`` (DNS-01) the ``*.example.com`` ones too."""
    wanted: set[str] = set()
    for route in routes:
        if route.enabled and route.tls is not None and route.tls.certificate == "auto":
            wanted.update(
                d.text for d in route.match.domains if d.exact or (wildcards and d.suffix)
            )
    return wanted


def on_demand_domains(routes: Iterable[CompiledRoute]) -> tuple[DomainPattern, ...]:
    """The domain patterns of every enabled on-demand route (``*`` when one has none)."""
    found: list[DomainPattern] = []
    for route in routes:
        if route.enabled and route.tls is not None and route.tls.certificate == "on-demand":
            found.extend(route.match.domains or (compile_domain("*"),))
    return tuple(dict.fromkeys(found))
