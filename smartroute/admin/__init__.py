"""The admin server: Prometheus metrics, a live status page and a JSON API over the routes.

Off unless the ``admin`` setting is given; :class:`~smartroute.SmartRoute` starts it once its
routes' ports are bound (in the parent process only with ``workers=N``) and stops it first.
See :mod:`smartroute.admin.server` (listener, limits, token) and :mod:`smartroute.admin.api`
(what each path answers).
"""

from __future__ import annotations

from smartroute.admin.server import AdminServer, check_admin_port

__all__ = ["AdminServer", "check_admin_port"]
