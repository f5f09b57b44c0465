"""The status page in real headless Chromium: it loads with the token from its URL, shows the
proxy's routes, and its numbers change after traffic went through the proxy."""

from __future__ import annotations

import asyncio
import re
import tempfile
from pathlib import Path

from support import LOOPBACK, async_test, curl, free_port, require_tool

from smartroute import SmartRoute

TOKEN = "status-page-token-0123"
BROWSER_TIMEOUT = 60.0


async def chromium(*args: str, profile: Path) -> str:
    """Run headless Chromium once (bounded in time); returns what it printed."""
    proc = await asyncio.create_subprocess_exec(
        require_tool("chromium"),
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={profile}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), BROWSER_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return out.decode(errors="replace")


async def page_dom(url: str, profile: Path) -> str:
    # The virtual time budget lets the page poll a few times (every 1.5 s) before the dump.
    return await chromium("--virtual-time-budget=4000", "--dump-dom", url, profile=profile)


async def screenshot(url: str, profile: Path, folder: Path) -> Path:
    path = folder / "status-page.png"
    await chromium(
        "--virtual-time-budget=4000", f"--screenshot={path}", "--window-size=1280,900", url,
        profile=profile,
    )  # fmt: skip
    return path


def route_figure(dom: str, route: str, field: str) -> int:
    row = re.search(rf'<tr data-route="{re.escape(route)}">(.*?)</tr>', dom, re.DOTALL)
    assert row is not None, f"no row for route {route!r}"
    cell = re.search(rf'data-value="(-?\d+)" data-field="{field}"', row.group(1))
    assert cell is not None, f"no {field} in the row of {route!r}: {row.group(1)[:300]}"
    return int(cell.group(1))


def card(dom: str, name: str) -> int:
    found = re.search(rf'id="{name}" data-value="(\d+)"', dom)
    assert found is not None, f"no card {name}"
    return int(found.group(1))


@async_test(timeout=240)
async def test_status_page_shows_routes_and_live_numbers() -> None:
    require_tool("chromium")
    web, echo = free_port(), free_port()
    routes = [
        {
            "name": "web",
            "match": {"ports": web},
            "action": {"type": "static", "static": {"content": "hello\n" * 100}},
        },
        {
            "name": "echo",
            "match": {"ports": echo},
            "action": {
                "type": "socket-handler",
                "socket_handler": "smartroute.helpers:SocketHandlers.echo",
            },
        },
    ]
    proxy = SmartRoute(
        routes,
        bind_address=LOOPBACK,
        graceful_shutdown_timeout=1,
        admin={"port": 0, "token": TOKEN},
    )
    folder = Path(tempfile.mkdtemp(prefix="smartroute-status-"))
    async with proxy:
        url = f"http://{LOOPBACK}:{proxy.admin_port}/status?token={TOKEN}"
        dom = ""
        try:
            dom = await page_dom(url, folder / "profile-1")
            assert 'id="state" class="">live, updated' in dom
            assert route_figure(dom, "web", "total") == 0
            assert route_figure(dom, "echo", "total") == 0
            assert f'<tr data-port="{web}">' in dom and f'<tr data-port="{echo}">' in dom
            assert "socket-handler smartroute.helpers" in dom
            assert card(dom, "connections-total") == 0

            for _ in range(3):
                code, out, err = await curl(f"http://{LOOPBACK}:{web}/")
                assert code == 0 and out.startswith("hello"), err
            reader, writer = await asyncio.open_connection(LOOPBACK, echo)
            writer.write(b"ping\n")
            assert await asyncio.wait_for(reader.readline(), 5) == b"ping\n"
            writer.close()
            await writer.wait_closed()

            dom = await page_dom(url, folder / "profile-2")
            assert route_figure(dom, "web", "total") == 3
            assert route_figure(dom, "web", "bytes_out") >= 3 * 600
            assert route_figure(dom, "echo", "total") == 1
            assert card(dom, "connections-total") >= 4
            assert card(dom, "bytes-out") >= 3 * 600
        except AssertionError as exc:
            shot = await screenshot(url, folder / "profile-shot", folder)
            raise AssertionError(f"{exc}\nscreenshot: {shot}\nDOM: {dom[-3000:]}") from exc
