"""A DNS provider for the certificate cluster tests, given by import path in their configs.

It publishes TXT records through pebble-challtestsrv (``HELD_DNS_URL``), but first marks
which process is about to publish (a file ``publishing-<pid>`` next to ``HELD_DNS_GATE``) and
waits until the gate file exists: the test can then kill the process that holds a
certificate's lock in the middle of its order.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from smartroute.certs.dns import ChallTestSrvDns


class HeldDns:
    def __init__(self) -> None:
        self.inner = ChallTestSrvDns(os.environ["HELD_DNS_URL"])
        self.gate = Path(os.environ["HELD_DNS_GATE"])

    async def set_txt(self, name: str, value: str) -> None:
        (self.gate.parent / f"publishing-{os.getpid()}").write_text(name)
        while not self.gate.exists():
            await asyncio.sleep(0.05)
        await self.inner.set_txt(name, value)

    async def clear_txt(self, name: str) -> None:
        await self.inner.clear_txt(name)
