"""Active health checks: one task per checked target and check, however many routes share it.

A check is a TCP connect, or an HTTP/1.1 ``GET`` whose status must fall in the
``expect_status`` range (over TLS when the route re-encrypts: verified as the route verifies
its targets, presenting its ``backend_client_certificate`` to targets that ask for one);
either must finish within ``timeout``. ``fall`` failures in a row take
the target out of rotation, ``rise`` passes in a row bring it back. A check is a few
non-blocking socket operations per ``interval``: it never holds the event loop, and it never
touches the hot path (traffic reads the target's ``up`` flag).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import ssl

from smartroute.errors import CertificateLoadError
from smartroute.routing.model import HealthCheck, TlsSettings
from smartroute.server.backends.state import TargetState, connect_reason
from smartroute.server.tls import backend_context, backend_server_name

log = logging.getLogger("smartroute")

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})[ \r]")
_MOST = 8192  # bytes of a health response read for its status line


class HealthChecker:
    """Checks one target by one :class:`HealthCheck` until stopped."""

    def __init__(
        self,
        state: TargetState,
        spec: HealthCheck,
        *,
        initially_up: bool,
        tls: TlsSettings | None = None,
    ) -> None:
        self.state = state
        self.spec = spec
        self.tls = tls  # the target speaks TLS (a re-encrypting route): so does the check
        self.ok = initially_up
        self.streak = 0  # results in a row that disagree with ``ok``
        self.checks = 0  # checks run (for tests and status)
        self._task: asyncio.Task[None] | None = None
        state.checked(self, initially_up, "" if initially_up else "not checked yet")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self, *, quiet: bool = False) -> None:
        """Stop checking; the verdict is forgotten (``quiet``: without a log line)."""
        task, self._task = self._task, None
        self.state.forget(self, quiet=quiet)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        spec = self.spec
        # Checkers that start together (a route with many targets) spread over the interval.
        await asyncio.sleep(random.random() * min(spec.interval, 1.0) * 0.1)
        while True:
            error = await self.probe()
            self.checks += 1
            self._record(error)
            await asyncio.sleep(spec.interval)

    async def probe(self) -> str | None:
        """One check: None when it passed, else why it failed."""
        spec, state = self.spec, self.state
        try:
            async with asyncio.timeout(spec.timeout):
                tls = self.tls
                reader, writer = await asyncio.open_connection(
                    state.host,
                    state.port,
                    ssl=None if tls is None else backend_context(tls, alpn=("http/1.1",)),
                    server_hostname=None
                    if tls is None
                    else backend_server_name(tls, self.spec.host, state.host),
                )
                try:
                    if spec.type == "tcp":
                        return None
                    return await self._http(reader, writer)
                finally:
                    writer.close()
        except TimeoutError:
            return f"health check timed out after {spec.timeout:g}s"
        except (OSError, ssl.SSLError) as exc:  # SSLError: an OSError, said as TLS
            return f"health check: {connect_reason(exc)}"
        except CertificateLoadError as exc:  # a backend_ca that does not load
            return f"health check: {exc}"

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str | None:
        spec, state = self.spec, self.state
        host = spec.host
        if host is None:
            host = f"[{state.host}]" if ":" in state.host else state.host
            if state.port != (80 if self.tls is None else 443):
                host += f":{state.port}"
        writer.write(
            f"GET {spec.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: smartroute-health-check\r\n"
            "Connection: close\r\n\r\n".encode("latin-1")
        )
        data = b""
        while b"\r\n" not in data and len(data) < _MOST:
            chunk = await reader.read(_MOST)
            if not chunk:
                break
            data += chunk
        found = _STATUS_LINE.match(data)
        if found is None:
            return "health check: not an HTTP response" if data else "health check: no answer"
        status = int(found.group(1))
        low, high = spec.expect_status
        if low <= status <= high:
            return None
        return f"health check: status {status} (expected {low}-{high})"

    def _record(self, error: str | None) -> None:
        passed = error is None
        if passed == self.ok:
            self.streak = 0
            return
        self.streak += 1
        if self.streak >= (self.spec.rise if passed else self.spec.fall):
            self.ok, self.streak = passed, 0
            why = f"{self.spec.rise} health check(s) passed" if passed else (error or "")
            self.state.checked(self, passed, why)
