"""The plugin the hooks benchmark runs: it serves ``on_request`` and answers every call with
``{}`` (nothing to say), so what is measured is the round trip to an external process."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
import sys
import tempfile

NOTHING = json.dumps({}).encode()
REPLY = struct.pack(">I", len(NOTHING)) + NOTHING


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            (size,) = struct.unpack(">I", await reader.readexactly(4))
            await reader.readexactly(size)
            writer.write(REPLY)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def main() -> None:
    sys.stdin.readline()  # configure
    folder = tempfile.mkdtemp(prefix="bench-plugin-")
    path = os.path.join(folder, "plugin.sock")
    server = await asyncio.start_unix_server(answer, path)
    ready = {"method": "ready", "params": {"socket": path, "hooks": ["on_request"]}}
    sys.stdout.write(json.dumps(ready) + "\n")
    sys.stdout.flush()
    try:
        async with server:
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
