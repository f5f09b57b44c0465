"""Running plugins: one supervised process each, asked as hooks over its Unix socket.

Each plugin (:class:`PluginProcess`) is started from its ``command`` with pipes on stdin and
stdout, told ``configure`` (one JSON object per line) and must answer ``ready`` with its socket
and the hooks it serves within ``READY_TIMEOUT``; from then on it may push ``set_targets``,
``set_speed`` and ``log`` lines at any time (a line that is no message is logged and
ignored). Hook calls go over the socket, one call per connection at a time, on a small pool of
connections: a frame is a 4-byte big-endian length and a UTF-8 JSON object of at most
``MAX_FRAME`` bytes. A plugin that exits, never says ``ready`` or writes a line over
``MAX_FRAME`` is stopped and started again after a growing pause (``BACKOFF`` doubling up
to ``MAX_BACKOFF``); meanwhile the hooks it serves fail, which refuses (``"fail": "closed"``,
503) or lets the connection go on (``"open"``).
Nothing a plugin does can take the proxy down or make it hold unbounded memory.

:class:`PluginHook` is what a route's hook chain holds for a plugin (see
:mod:`smartroute.server.hooks`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict
from typing import Any

from smartroute.context import RouteContext
from smartroute.plugins.spec import PluginSpec
from smartroute.routing.model import CompiledRoute
from smartroute.server.bandwidth import SpeedLimit
from smartroute.server.hooks import HookRefused

log = logging.getLogger("smartroute.plugins")

READY_TIMEOUT = 10.0  # seconds from start to "ready"
MAX_FRAME = 1024 * 1024  # bytes of one frame or stdout line, at most
BACKOFF = 0.1  # seconds before the first restart, doubled after each quick failure
MAX_BACKOFF = 30.0
STEADY = 60.0  # seconds up after which a plugin that exits is restarted at once again
POOL_SIZE = 8  # idle socket connections kept per plugin
MAX_PUSHES = 1000  # set_targets pushes waiting to be carried out, at most
STOP_GRACE = 2.0  # seconds between SIGTERM and SIGKILL on stop
HOOKS = ("on_connect", "on_request", "on_response", "on_disconnect")
_LENGTH = struct.Struct(">I")

Pusher = Callable[[str, Any], Awaitable[None]]  # set_targets(route, targets)


class PluginError(Exception):
    """A plugin call that did not get an answer (down, timed out, broken frame)."""


def encode_frame(message: Mapping[str, Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_FRAME:
        raise PluginError(f"frame of {len(data)} bytes, over {MAX_FRAME}")
    return _LENGTH.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader) -> Any:
    head = await reader.readexactly(4)
    (size,) = _LENGTH.unpack(head)
    if size > MAX_FRAME:
        raise PluginError(f"the plugin sent a frame of {size} bytes, over {MAX_FRAME}")
    try:
        return json.loads(await reader.readexactly(size))
    except ValueError as exc:
        raise PluginError(f"the plugin sent a frame that is not JSON: {exc}") from None


def route_summaries(routes: Iterable[CompiledRoute]) -> list[dict[str, Any]]:
    """What a plugin is told of the routes when it starts (``configure``)."""
    return [
        {
            "name": route.name,
            "ports": sorted(route.match.ports),
            "domains": [pattern.text for pattern in route.match.domains],
            "path": None if route.match.path is None else route.match.path.text,
            "protocol": sorted(route.match.protocols),
            "action": route.action.type,
        }
        for route in routes
    ]


def context_data(ctx: RouteContext) -> dict[str, Any]:
    data = asdict(ctx)
    if ctx.headers is not None:
        data["headers"] = [[name, value] for name, value in ctx.headers.items()]
    if ctx.params is not None:
        data["params"] = dict(ctx.params)
    if ctx.alpn is not None:
        data["alpn"] = list(ctx.alpn)
    return data


class PluginProcess:
    """One plugin: its process, its state, its socket pool and what it pushed."""

    def __init__(
        self, spec: PluginSpec, routes: Callable[[], list[dict[str, Any]]], push: Pusher
    ) -> None:
        self.spec = spec
        self._routes = routes
        self._push = push
        self.ready = False
        self.hooks: frozenset[str] = frozenset()
        self.socket: str | None = None
        self.speeds: dict[str, SpeedLimit] = {}  # route -> set_speed
        self.starts = 0  # processes started (restarts included)
        self.pid: int | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._ready_event = asyncio.Event()
        self.hooks_known = False  # "ready" was said once: ``hooks`` holds what it serves
        self._outbox: collections.deque[tuple[str, Any]] = collections.deque()
        self._pushing = asyncio.Event()
        self._pusher: asyncio.Task[None] | None = None

    # -- supervision -------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._supervise())
            self._pusher = loop.create_task(self._deliver_pushes())

    async def _deliver_pushes(self) -> None:
        while True:
            await self._pushing.wait()
            self._pushing.clear()
            while self._outbox:
                route, targets = self._outbox.popleft()
                try:
                    await self._push(route, targets)
                except Exception as exc:  # a bad push is the plugin's problem, logged
                    log.warning("plugin %s: set_targets refused: %s", self.spec.name, exc)

    async def wait_ready(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._ready_event.wait()
        return self.ready

    async def _supervise(self) -> None:
        backoff = BACKOFF
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # whatever went wrong, the plugin is restarted
                log.warning("plugin %s: %s", self.spec.name, exc)
            self._down()
            if self._stopping:
                break
            if time.monotonic() - started > STEADY:
                backoff = BACKOFF
            log.warning("plugin %s: restarting in %.1fs", self.spec.name, backoff)
            await asyncio.sleep(backoff)
            backoff = min(MAX_BACKOFF, backoff * 2)

    async def _run_once(self) -> None:
        spec = self.spec
        env = None if spec.env is None else {**os.environ, **spec.env}
        proc = self._proc = await asyncio.create_subprocess_exec(
            *spec.command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            cwd=spec.cwd,
            limit=MAX_FRAME,
            start_new_session=True,
        )
        self.starts += 1
        self.pid = proc.pid
        assert proc.stdin is not None and proc.stdout is not None
        try:
            configure = {"method": "configure", "params": {"routes": self._routes()}}
            proc.stdin.write(json.dumps(configure).encode() + b"\n")
            await proc.stdin.drain()
            async with asyncio.timeout(READY_TIMEOUT):
                while not self.ready:
                    await self._line(proc.stdout)
            log.info("plugin %s ready (pid %d): %s", spec.name, proc.pid, sorted(self.hooks))
            while True:
                await self._line(proc.stdout)
        except TimeoutError:
            raise PluginError(f"no 'ready' within {READY_TIMEOUT:g}s") from None
        finally:
            await self._end(proc)

    async def _line(self, stdout: asyncio.StreamReader) -> None:
        try:
            line = await stdout.readline()
        except ValueError:  # over the limit
            raise PluginError(f"a line over {MAX_FRAME} bytes on stdout") from None
        if not line:
            code = await self._proc.wait() if self._proc is not None else None
            raise PluginError(f"exited (code {code})")
        try:
            message = json.loads(line)
            method, params = message["method"], message.get("params") or {}
            if not isinstance(params, dict):
                raise TypeError("params is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            text = line[:200].decode(errors="replace").rstrip()
            log.warning("plugin %s: not a message on stdout (%s): %r", self.spec.name, exc, text)
            return
        await self._message(str(method), params)

    async def _message(self, method: str, params: dict[str, Any]) -> None:
        name = self.spec.name
        if method == "ready":
            hooks = params.get("hooks") or []
            socket_path = params.get("socket")
            if not isinstance(socket_path, str) or not isinstance(hooks, list):
                log.warning("plugin %s: 'ready' without a socket path and a hook list", name)
                return
            self.socket = socket_path
            self.hooks = frozenset(h for h in hooks if h in HOOKS)
            self.hooks_known = True
            self.ready = True
            self._ready_event.set()
        elif method == "log":
            level = logging.getLevelName(str(params.get("level", "info")).upper())
            log.log(
                level if isinstance(level, int) else logging.INFO,
                "plugin %s: %s",
                name,
                params.get("message"),
            )
        elif method == "set_targets":
            # Carried out in order by its own task: a push may come before "ready", while the
            # proxy that would carry it out waits for that very "ready".
            if len(self._outbox) >= MAX_PUSHES:
                log.warning("plugin %s: set_targets dropped (%d waiting)", name, MAX_PUSHES)
                return
            self._outbox.append((str(params.get("route")), params.get("targets")))
            self._pushing.set()
        elif method == "set_speed":
            route = params.get("route")
            try:
                speed = SpeedLimit(
                    _rate(params.get("download")), _rate(params.get("upload")), params.get("group")
                )
            except ValueError as exc:
                log.warning("plugin %s: set_speed refused: %s", name, exc)
                return
            if isinstance(route, str):
                if speed.download is None and speed.upload is None:
                    self.speeds.pop(route, None)
                else:
                    self.speeds[route] = speed
        else:
            log.warning("plugin %s: unknown method %r", name, method)

    def _down(self) -> None:
        self.ready = False
        self._ready_event.clear()
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()

    async def _end(self, proc: asyncio.subprocess.Process) -> None:
        if proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.close()  # its end of file: a plugin may leave on it by itself
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                async with asyncio.timeout(STOP_GRACE):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    async def stop(self) -> None:
        self._stopping = True
        for task in (self._task, self._pusher):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._task = self._pusher = None
        proc = self._proc
        if proc is not None and proc.returncode is None:
            await self._end(proc)  # the cancel may have cut the supervisor's own ending short
        self._down()

    # -- calls -------------------------------------------------------------------------------

    async def call(self, message: Mapping[str, Any], *, reply: bool = True) -> Any:
        """Send one frame (and read its reply) on a pooled connection to the socket."""
        if not self.ready or self.socket is None:
            raise PluginError("not running")
        frame = encode_frame(message)
        if self._idle:
            reader, writer = self._idle.pop()
        else:
            try:
                reader, writer = await asyncio.open_unix_connection(self.socket, limit=MAX_FRAME)
            except OSError as exc:
                raise PluginError(f"cannot reach its socket: {exc}") from None
        try:
            writer.write(frame)
            await writer.drain()
            answer = await read_frame(reader) if reply else None
        except (OSError, asyncio.IncompleteReadError, PluginError) as exc:
            writer.close()
            raise PluginError(str(exc) or type(exc).__name__) from None
        except BaseException:
            writer.close()  # cancelled (a timeout): the connection's next reply is not ours
            raise
        if len(self._idle) < POOL_SIZE and self.ready:
            self._idle.append((reader, writer))
        else:
            writer.close()
        return answer


def _rate(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e15:
        raise ValueError(f"a rate must be bytes per second (> 0), got {value!r}")
    return float(value)


class PluginHook:
    """A plugin as a hook: each hook method asks the plugin (when it serves that hook) and
    returns its verdict; a plugin that cannot answer refuses (``fail: "closed"``: 503) or says
    nothing (``"open"``). ``on_connect`` also carries the speed the plugin set for the route."""

    def __init__(self, process: PluginProcess) -> None:
        self.process = process
        self.hook_name = f"plugin {process.spec.name}"  # in the hook runner's log lines

    async def on_connect(self, ctx: RouteContext) -> dict[str, Any] | None:
        verdict = await self._ask("on_connect", ctx, {})
        speed = self.process.speeds.get(ctx.route_name or "")
        if speed is not None and (verdict is None or "speed_limit" not in verdict):
            limit = {"download": speed.download, "upload": speed.upload, "group": speed.group}
            verdict = {**(verdict or {}), "speed_limit": {k: v for k, v in limit.items() if v}}
        return verdict

    async def on_request(self, ctx: RouteContext, request: Any) -> dict[str, Any] | None:
        return await self._ask("on_request", ctx, {"request": _request(request)})

    async def on_response(
        self, ctx: RouteContext, request: Any, response: Any
    ) -> dict[str, Any] | None:
        data = {
            "request": _request(request),
            "response": {"status": response.status, "headers": _pairs(response.headers)},
        }
        return await self._ask("on_response", ctx, data)

    async def on_disconnect(self, ctx: RouteContext, info: dict[str, Any]) -> None:
        process = self.process
        if "on_disconnect" not in process.hooks:
            return
        message = _call("on_disconnect", ctx, {"info": info})
        try:
            async with asyncio.timeout(process.spec.timeout):
                await process.call(message, reply=False)
        except (PluginError, TimeoutError) as exc:
            log.warning("plugin %s: on_disconnect not delivered: %s", process.spec.name, exc)

    async def _ask(
        self, hook: str, ctx: RouteContext, data: dict[str, Any]
    ) -> dict[str, Any] | None:
        process = self.process
        spec = process.spec
        if process.hooks_known and hook not in process.hooks:
            return None  # it does not serve this hook (down or not)
        try:
            async with asyncio.timeout(spec.timeout):
                answer = await process.call(_call(hook, ctx, data))
            if answer is not None and not isinstance(answer, dict):
                raise PluginError(f"replied {type(answer).__name__}, not an object (a verdict)")
        except (PluginError, TimeoutError) as exc:
            why = "no answer in time" if isinstance(exc, TimeoutError) else str(exc)
            if spec.fail == "open":
                log.warning("plugin %s (%s) failed: %s; skipped", spec.name, hook, why)
                return None
            # Refuses whatever the route's hooks_fail says: the plugin's own "fail" decides.
            log.warning("plugin %s (%s) failed: %s; refusing", spec.name, hook, why)
            raise HookRefused(f"plugin {spec.name} ({hook}) failed: {why}") from None
        return answer or None


def _call(hook: str, ctx: RouteContext, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "hook": hook,
        "route": ctx.route_name,
        "data": {"context": context_data(ctx), **data},
    }


def _pairs(headers: Mapping[str, str]) -> list[list[str]]:
    return [[name, value] for name, value in headers.items()]


def _request(request: Any) -> dict[str, Any]:
    return {
        "method": request.method,
        "path": request.path,
        "query": request.query,
        "headers": _pairs(request.headers),
    }


class PluginHost:
    """Every plugin of one proxy."""

    def __init__(
        self,
        specs: Iterable[PluginSpec],
        routes: Callable[[], list[dict[str, Any]]],
        push: Pusher,
    ) -> None:
        self.processes = [PluginProcess(spec, routes, push) for spec in specs]
        self._hooks = [(p.spec.routes, PluginHook(p)) for p in self.processes]

    def hooks_for(self, route: str) -> tuple[object, ...]:
        """The plugin hooks of ``route``: plugins listing it, and those for every route."""
        return tuple(hook for routes, hook in self._hooks if routes is None or route in routes)

    def start(self) -> None:
        for process in self.processes:
            process.start()

    async def stop(self) -> None:
        await asyncio.gather(*(process.stop() for process in self.processes))
