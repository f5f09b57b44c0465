"""What the proxy shows its certificate manager and its worker pool: two narrow faces of
:class:`~smartroute.proxy.SmartRoute`, each with only the calls that side may make."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from smartroute.routing.model import CertificatePair, CompiledRoute
from smartroute.routing.schema import RouteInput
from smartroute.settings import Settings

if TYPE_CHECKING:
    from smartroute.proxy import SmartRoute


class CertificateSide:
    """What the certificate manager may do to its proxy (see ``CertificateHost``)."""

    __slots__ = ("_proxy",)

    def __init__(self, proxy: SmartRoute) -> None:
        self._proxy = proxy

    def serve_certificate(self, new: CertificatePair, old: CertificatePair | None) -> None:
        self._proxy._serve_certificate(new, old)

    async def set_internal_route(self, name: str, route: RouteInput | None) -> None:
        await self._proxy._set_internal_route(name, route)


class WorkerSide:
    """A worker process's proxy as the worker code drives it (see ``WorkerProxy``)."""

    __slots__ = ("_proxy",)

    def __init__(self, proxy: SmartRoute) -> None:
        self._proxy = proxy

    @property
    def routes(self) -> tuple[CompiledRoute, ...]:
        return self._proxy.routes

    async def start(self) -> None:
        await self._proxy.start()

    async def stop(self) -> None:
        await self._proxy.stop()

    def stats(self, top_clients: int) -> dict[str, Any]:
        return self._proxy.stats(top_clients)

    async def replace_routes(self, routes: tuple[CompiledRoute, ...]) -> None:
        await self._proxy._replace_routes(routes)


def worker_side(
    cls: type[SmartRoute],
) -> Callable[[tuple[CompiledRoute, ...], Settings, int], WorkerSide]:
    """What the worker pool calls in a forked process to make that process's proxy."""

    def build(routes: tuple[CompiledRoute, ...], settings: Settings, slot: int) -> WorkerSide:
        return WorkerSide(cls._worker(routes, settings, slot))

    return build
