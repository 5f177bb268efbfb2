# A scripted stand-in for the sidebus daemon, for the client's unit tests: it listens on a Unix
# socket in its own thread, records every frame it receives, answers with overridable defaults,
# and lets a test push frames, hold replies, drop connections and restart.
"""A fake sidebus daemon for unit tests."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any, Callable

from sidebus.protocol import FrameReader, encode_frame

Reply = dict[str, Any] | None


class FakeConn(asyncio.Protocol):
    def __init__(self, daemon: FakeDaemon) -> None:
        self.daemon = daemon
        self.reader = FrameReader()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.index = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        with self.daemon.lock:
            self.index = len(self.daemon.conns)
            self.daemon.conns.append(self)

    def data_received(self, data: bytes) -> None:
        for f in self.reader.feed(data):
            assert isinstance(f, dict), f
            self.daemon._received(self, f)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def send(self, frame: dict[str, Any]) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(encode_frame(frame))


class FakeDaemon:
    """Answers: hello, ping, publish (event_id given or e<N>, status spooled), subscribe (sub
    numbers 1, 2, ... per connection), ack/nack/extend with id, unsubscribe, and {} for the
    rest. ``handlers[op]`` overrides an op: it gets (conn, frame) and returns the reply's extra
    fields, an ``{"op": "error", ...}`` map, or None for no reply (the test answers later)."""

    def __init__(self, path: str, max_frame_bytes: int = 1 << 20) -> None:
        self.path = path
        self.max_frame_bytes = max_frame_bytes
        self.lock = threading.Lock()
        self.frames: list[tuple[int, dict[str, Any]]] = []
        self.conns: list[FakeConn] = []
        self.handlers: dict[str, Callable[[FakeConn, dict[str, Any]], Reply]] = {}
        self._subs: dict[int, int] = {}
        self._events = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: asyncio.AbstractServer | None = None
        self.start()

    # ---- thread plumbing ----

    def _call(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(5)

    def start(self) -> None:
        async def go() -> None:
            self.server = await self.loop.create_unix_server(lambda: FakeConn(self), self.path)

        asyncio.run_coroutine_threadsafe(go(), self.loop).result(5)

    def stop(self) -> None:
        """Stops listening and closes every connection (a daemon going away)."""

        async def go() -> None:
            if self.server is not None:
                self.server.close()
                self.server = None
            for c in self.conns:
                if c.transport is not None:
                    c.transport.close()
            await asyncio.sleep(0.01)
            if os.path.exists(self.path):
                os.unlink(self.path)

        asyncio.run_coroutine_threadsafe(go(), self.loop).result(5)

    def shutdown(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def drop_connections(self) -> None:
        """Closes every client connection but keeps listening."""
        self._call(lambda: [c.transport.close() for c in self.conns if c.transport is not None])

    # ---- frames ----

    def _received(self, conn: FakeConn, frame: dict[str, Any]) -> None:
        with self.lock:
            self.frames.append((conn.index, frame))
        op = frame.get("op")
        handler = self.handlers.get(op)  # type: ignore[arg-type]
        reply = handler(conn, frame) if handler is not None else self._default(conn, frame)
        if reply is None or (op in ("ack", "nack", "extend") and "id" not in frame):
            return
        self.answer(conn, frame, reply)

    def answer(self, conn: FakeConn, frame: dict[str, Any], reply: dict[str, Any]) -> None:
        """Replies to ``frame`` (from any thread)."""
        if reply.get("op") == "error":
            out = {"op": "error", "id": frame.get("id"), **{k: v for k, v in reply.items() if k != "op"}}
            out.setdefault("message", "")
            out.setdefault("details", [])
        else:
            out = {"op": "ok", "id": frame.get("id"), **reply}
        if threading.current_thread() is self.thread:
            conn.send(out)
        else:
            self.loop.call_soon_threadsafe(conn.send, out)

    def _default(self, conn: FakeConn, frame: dict[str, Any]) -> Reply:
        op = frame.get("op")
        if op == "hello":
            return {"protocol": 1, "server": "sidebus/fake", "node": "fake", "max_frame_bytes": self.max_frame_bytes}
        if op == "publish":
            self._events += 1
            return {"event_id": frame.get("event_id") or f"e{self._events}", "status": "spooled"}
        if op == "subscribe":
            n = self._subs.get(conn.index, 0) + 1
            self._subs[conn.index] = n
            return {"sub": n}
        return {}

    def push(self, frame: dict[str, Any], conn: int = -1) -> None:
        """Sends a push on connection ``conn`` (default: the newest)."""
        self.loop.call_soon_threadsafe(lambda: self.conns[conn].send(frame))

    def deliver(self, tag: int, event_id: str, data: Any = None, *, sub: int = 1, attempt: int = 1, conn: int = -1) -> None:
        self.push({"op": "deliver", "sub": sub, "tag": tag, "attempt": attempt,
                   "event": {"specversion": "1.0", "id": event_id, "type": "t", "source": "s",
                             "time": "2026-01-01T00:00:00.000000Z", "correlationid": event_id, "data": data}}, conn)

    def received(self, op: str | None = None, conn: int | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [f for i, f in self.frames if (op is None or f.get("op") == op) and (conn is None or i == conn)]

    def ops(self, conn: int | None = None) -> list[str]:
        with self.lock:
            return [f["op"] for i, f in self.frames if conn is None or i == conn]

    @property
    def connection_count(self) -> int:
        with self.lock:
            return len(self.conns)

    def wait_for(self, pred: Callable[[], bool], timeout: float = 5.0) -> None:
        """Blocks until ``pred()`` (for threads that are not on an event loop)."""
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for the fake daemon")
            time.sleep(0.005)
