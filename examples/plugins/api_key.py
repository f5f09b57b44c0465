"""A smartroute plugin in Python: requests need an API key; every answer says who checked it.

smartroute starts it (``"command": ["python3", "examples/plugins/api_key.py"]``), tells it the
routes on stdin, and asks it as an ``on_request`` hook over the Unix socket it names in its
``ready`` line. Frames are a 4-byte big-endian length and a JSON object. It reads the key from
the ``API_KEY`` environment variable (default ``"secret"``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
import sys
import tempfile
from typing import Any

KEY = os.environ.get("API_KEY", "secret")


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            (size,) = struct.unpack(">I", await reader.readexactly(4))
            call = json.loads(await reader.readexactly(size))
            verdict = decide(call)
            if call["hook"] == "on_disconnect":
                continue  # no reply expected
            data = json.dumps(verdict).encode()
            writer.write(struct.pack(">I", len(data)) + data)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


def decide(call: dict[str, Any]) -> dict[str, Any]:
    if call["hook"] != "on_request":
        return {}
    headers = {name.lower(): value for name, value in call["data"]["request"]["headers"]}
    if headers.get("x-api-key") != KEY:
        return {"allow": False, "status": 401, "body": "an API key is needed\n"}
    return {"set_headers": {"X-Checked-By": "api-key-plugin"}, "remove_headers": ["X-Api-Key"]}


def say(method: str, **params: object) -> None:
    sys.stdout.write(json.dumps({"method": method, "params": params}) + "\n")
    sys.stdout.flush()


async def main() -> None:
    configure = json.loads(sys.stdin.readline())
    routes = [route["name"] for route in configure["params"]["routes"]]
    folder = tempfile.mkdtemp(prefix="api-key-plugin-")
    path = os.path.join(folder, "plugin.sock")
    server = await asyncio.start_unix_server(answer, path)
    say("log", level="info", message=f"checking API keys for {', '.join(routes) or 'no route'}")
    say("ready", socket=path, hooks=["on_request"])
    try:
        async with server:
            # stdin closes when smartroute goes: then so does the plugin.
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
