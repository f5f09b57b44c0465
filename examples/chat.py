"""A chat service over TLS with the framed-protocol kit: rooms, broadcasts, resumed sessions.

The proxy terminates TLS (a throwaway self-signed certificate) and hands each connection to
a :class:`FramedService`. Users authenticate with a password, join a room and talk; every
message is broadcast to the room. Carol leaves for a while and comes back with her session id:
the server kept her session (her room, and the message sent while she was away).

Run it: ``python examples/chat.py`` (serves on a free port, chats with itself, and exits).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

from _selfsigned import self_signed

from smartroute import RouteContext, SmartRoute
from smartroute.helpers import FramedClient, FramedService, ServiceError, Session

DOMAIN = "chat.localhost"
CERT, KEY = self_signed(DOMAIN)
PASSWORDS = {"alice": "wonderland", "bob": "builder", "carol": "singer"}


def authenticate(credentials: Any, ctx: RouteContext) -> str | None:
    """The user name for good credentials, None (refused) for anything else."""
    if not isinstance(credentials, dict):
        return None
    user = credentials.get("user")
    ok = isinstance(user, str) and PASSWORDS.get(user) == credentials.get("password")
    return user if ok else None


chat = FramedService(authenticate=authenticate, session_lifespan=60.0)


@chat.on("join")
async def join(session: Session, body: Any) -> dict[str, Any]:
    room = body.get("room") if isinstance(body, dict) else None
    if not isinstance(room, str) or not room:
        raise ServiceError("bad-room", 'expected {"room": "name"}')
    session.join(room)
    session.data["room"] = room
    await chat.broadcast("joined", {"room": room, "user": session.identity}, group=room)
    members = sorted(s.identity for s in chat.sessions.members(room))
    return {"room": room, "members": members}


@chat.on("say")
async def say(session: Session, body: Any) -> dict[str, Any]:
    room = session.data.get("room")
    if room is None:
        raise ServiceError("no-room", "join a room first")
    text = str(body.get("text", "")) if isinstance(body, dict) else str(body)
    message = {"room": room, "from": session.identity, "text": text}
    delivered = await chat.broadcast("message", message, group=room)
    return {"delivered": delivered}


@chat.on("whoami")
async def whoami(session: Session, body: Any) -> dict[str, Any]:
    return {"user": session.identity, "session": session.id, "rooms": sorted(session.groups)}


def routes(port: int) -> list[dict[str, Any]]:
    return [
        {
            "name": "chat",
            "match": {"ports": port, "domains": DOMAIN},
            "action": {
                "type": "socket-handler",
                "socket_handler": chat.handler,
                "tls": {"mode": "terminate", "certificate": {"cert": CERT, "key": KEY}},
            },
        }
    ]


class User:
    """A chat client that writes down what it is told."""

    def __init__(self, name: str, port: int, *, password: str | None = None) -> None:
        self.name = name
        self.port = port
        self.password = PASSWORDS.get(name) if password is None else password
        self.heard: list[str] = []
        self.changed = asyncio.Event()
        self.client = self.connect()

    def connect(self, session_id: str | None = None) -> FramedClient:
        self.client = FramedClient(
            [("127.0.0.1", self.port)],
            ssl=ssl.create_default_context(cadata=CERT),
            server_hostname=DOMAIN,
            credentials={"user": self.name, "password": self.password},
            session_id=session_id,
            max_attempts=3,
            on_broadcast=self.on_broadcast,
        )
        return self.client

    def on_broadcast(self, kind: str, body: Any) -> None:
        if kind == "joined":
            self.heard.append(f"{body['user']} joined {body['room']}")
        elif kind == "message":
            self.heard.append(f"{body['from']}: {body['text']}")
        self.changed.set()

    async def hears(self, line: str) -> None:
        async with asyncio.timeout(10):
            while line not in self.heard:
                self.changed.clear()
                await self.changed.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def main() -> None:
    port = free_port()
    async with SmartRoute(routes(port), bind_address="127.0.0.1"):
        print(f"chat: TLS on 127.0.0.1:{port} ({DOMAIN})")
        alice, bob, carol = (User(name, port) for name in ("alice", "bob", "carol"))
        for user in (alice, bob, carol):
            await user.client.connect()
            joined = await user.client.request("join", {"room": "lobby"})
            print(f"{user.name}: joined {joined['room']}, members {joined['members']}")

        mallory = User("mallory", port, password="guess")
        try:
            await mallory.client.connect()
        except ServiceError as exc:
            print(f"mallory: refused ({exc})")
        await mallory.client.close()

        await alice.client.request("say", {"text": "hello everyone"})
        await bob.client.request("say", {"text": "hi alice"})
        await carol.hears("bob: hi alice")

        session = carol.client.session_id
        await carol.client.close()
        print("carol: away")
        await alice.client.request("say", {"text": "carol, are you there?"})

        carol.connect(session_id=session)  # a new connection presenting the old session id
        await carol.client.connect()
        me = await carol.client.request("whoami")
        same, resumed = me["session"] == session, carol.client.resumed
        print(f"carol: back, resumed={resumed}, same session={same}, rooms {me['rooms']}")
        await carol.hears("alice: carol, are you there?")  # queued while she was away
        await carol.client.request("say", {"text": "back!"})
        for user in (alice, bob, carol):
            await user.hears("carol: back!")
        try:
            await bob.client.request("dance")
        except ServiceError as exc:
            print(f"bob: dance -> {exc}")

        print("--- transcript ---")
        for user in (alice, bob, carol):
            for line in user.heard:
                print(f"[{user.name}] {line}")
            await user.client.close()
        await chat.close()


if __name__ == "__main__":
    asyncio.run(main())
