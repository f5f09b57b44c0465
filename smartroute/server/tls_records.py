"""Decrypting TLS records held in memory (``ssl.MemoryBIO``): shared by the fast lane's
terminated clients and its re-encrypted backends, which own no asyncio transport."""

from __future__ import annotations

import ssl

READ = 256 * 1024  # the most plaintext taken from an SSL object at a time


def decrypt(obj: ssl.SSLObject, incoming: ssl.MemoryBIO) -> tuple[bytes, bool]:
    """The plaintext of the whole records ``incoming`` holds, and whether the peer ended the
    connection (``close_notify``, or its end without one); a broken record raises
    ``ssl.SSLError``. Shared by the fast lane's terminated clients and re-encrypted backends."""
    parts: list[bytes] = []
    # Read while a record may be complete: a read that finds none raises, which costs more
    # than asking the BIO whether bytes are left.
    while incoming.pending or obj.pending() or incoming.eof:
        try:
            chunk = obj.read(READ)
        except ssl.SSLWantReadError:
            break
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b"".join(parts), True
        if not chunk:
            return b"".join(parts), True
        parts.append(chunk)
    return (parts[0] if len(parts) == 1 else b"".join(parts)), False
