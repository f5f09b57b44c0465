"""Sessions of a :class:`~smartroute.helpers.FramedService`, and their bounded outboxes.

A session outlives its connection by ``session_lifespan`` seconds: a client that reconnects
and presents the session id (with the same identity) gets back its identity, groups, data and
the frames queued for it meanwhile. Every frame for a session goes through its outbox, which
is bounded in frames and bytes; the connection's writer empties it as fast as the peer reads.
When a frame does not fit, it is dropped (and counted); if the session is connected, that
connection is closed with a ``too-slow`` error frame, so no reader can make memory grow.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from collections.abc import Iterator
from typing import Any, Protocol

from smartroute.context import RouteContext
from smartroute.helpers.frames import Framing, encode_frame


class Link(Protocol):
    """The connection a session is attached to, as the session sees it."""

    @property
    def ctx(self) -> RouteContext | None: ...

    def end(self, code: str | None = None, message: str = "", *, flush: bool = False) -> None: ...


class Session:
    """One client's session: ``id``, ``identity`` (what ``authenticate`` returned), ``data`` (a
    dict of yours, kept across reconnections) and the groups it joined."""

    def __init__(self, book: SessionBook, session_id: str, identity: Any) -> None:
        self.id = session_id
        self.identity = identity
        self.data: dict[str, Any] = {}
        self.dropped = 0  # frames that did not fit in the outbox, since the last welcome
        self.link: Link | None = None
        self.expired = False
        self._book = book
        self._groups: set[str] = set()
        self._outbox: deque[bytes] = deque()
        self._queued = 0  # bytes in the outbox
        self._ready = asyncio.Event()
        self._expiry: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        state = "connected" if self.connected else "expired" if self.expired else "detached"
        return f"<Session {self.id[:8]}… {self.identity!r} {state}>"

    @property
    def connected(self) -> bool:
        """True while a connection is attached."""
        return self.link is not None

    @property
    def ctx(self) -> RouteContext | None:
        """The route context of the attached connection (``None`` while detached)."""
        return self.link.ctx if self.link is not None else None

    @property
    def groups(self) -> frozenset[str]:
        return frozenset(self._groups)

    @property
    def queued(self) -> tuple[int, int]:
        """Frames and bytes waiting in the outbox."""
        return len(self._outbox), self._queued

    def join(self, group: str) -> None:
        """Receive the broadcasts to ``group`` from now on."""
        if not self.expired:
            self._groups.add(group)
            self._book.groups.setdefault(group, set()).add(self)

    def leave(self, group: str) -> None:
        self._groups.discard(group)
        members = self._book.groups.get(group)
        if members is not None:
            members.discard(self)
            if not members:
                del self._book.groups[group]

    async def send(self, type: str, body: Any = None) -> bool:
        """Queue a frame for this session; never waits for the peer.

        True when queued (sent now, or after the client resumes); False when dropped: the
        session expired, or its outbox is full (the connection, if any, is then closed).
        """
        book = self._book
        frame = encode_frame({"type": type}, body, framing=book.framing, max_frame=book.max_frame)
        return self.enqueue(frame)

    # -- the service's side ----------------------------------------------------------------

    def enqueue(self, frame: bytes, *, first: bool = False) -> bool:
        """Add ``frame`` to the outbox (``first``: before the rest, for the welcome frame)."""
        if self.expired:
            return False
        book = self._book
        if not first and (
            len(self._outbox) >= book.queue_frames or self._queued + len(frame) > book.queue_bytes
        ):
            self.dropped += 1
            if self.link is not None:
                self.link.end(
                    "too-slow",
                    f"outbound queue full ({len(self._outbox)} frames, {self._queued} bytes; "
                    f"limits {book.queue_frames} frames, {book.queue_bytes} bytes): this "
                    "connection reads too slowly; resume the session to go on",
                )
            return False
        if first:
            self._outbox.appendleft(frame)
        else:
            self._outbox.append(frame)
        self._queued += len(frame)
        self._ready.set()
        return True

    def take(self, limit: int) -> bytes:
        """Up to about ``limit`` bytes of whole frames from the outbox (at least one frame)."""
        batch: list[bytes] = []
        size = 0
        outbox = self._outbox
        while outbox and (not batch or size + len(outbox[0]) <= limit):
            frame = outbox.popleft()
            batch.append(frame)
            size += len(frame)
        self._queued -= size
        return b"".join(batch)

    async def wait(self) -> None:
        """Return when the outbox holds a frame."""
        while not self._outbox:
            self._ready.clear()
            await self._ready.wait()


class SessionBook:
    """Every live session of one service, its groups, and the timers that expire sessions."""

    def __init__(
        self,
        *,
        framing: Framing,
        max_frame: int,
        lifespan: float,
        queue_frames: int,
        queue_bytes: int,
    ) -> None:
        self.framing: Framing = framing
        self.max_frame = max_frame
        self.lifespan = lifespan
        self.queue_frames = queue_frames
        self.queue_bytes = queue_bytes
        self.sessions: dict[str, Session] = {}
        self.groups: dict[str, set[Session]] = {}

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self.sessions.values()))

    def __len__(self) -> int:
        return len(self.sessions)

    def get(self, session_id: str) -> Session | None:
        return self.sessions.get(session_id)

    def members(self, group: str) -> list[Session]:
        return list(self.groups.get(group, ()))

    def create(self, identity: Any) -> Session:
        session = Session(self, secrets.token_urlsafe(16), identity)
        self.sessions[session.id] = session
        return session

    def find(self, session_id: str, identity: Any) -> Session | None:
        """The live session ``session_id`` if it belongs to ``identity``."""
        session = self.sessions.get(session_id)
        if session is None or session.identity != identity:
            return None
        return session

    def attach(self, session: Session, link: Link) -> Link | None:
        """Attach ``link``; returns the connection it replaces, if one was attached."""
        previous = session.link
        session.link = link
        if session._expiry is not None:
            session._expiry.cancel()
            session._expiry = None
        return previous if previous is not link else None

    def detach(self, session: Session, link: Link) -> None:
        """``link`` ended: the session waits ``lifespan`` seconds for a client to resume it."""
        if session.link is not link:
            return  # another connection took the session over meanwhile
        session.link = None
        if session.expired:
            return
        if self.lifespan <= 0:
            self.expire(session)
        else:
            loop = asyncio.get_running_loop()
            session._expiry = loop.call_later(self.lifespan, self.expire, session)

    def expire(self, session: Session) -> None:
        """Forget ``session``: its id can no longer be resumed, its frames are dropped."""
        if session._expiry is not None:
            session._expiry.cancel()
            session._expiry = None
        for group in list(session._groups):
            session.leave(group)
        session.expired = True
        session._outbox.clear()
        session._queued = 0
        self.sessions.pop(session.id, None)
