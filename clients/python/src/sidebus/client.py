# The asyncio client: one connection to the daemon, pipelined requests matched by id, deliveries
# routed to subscriptions (an async iterator or a handler run per delivery), reconnection with
# backoff and resubscription, graceful close, and the admin ops as plain calls.
"""The asyncio API of the sidebus client."""

from __future__ import annotations

import asyncio
import collections
import datetime as _dt
import inspect
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Coroutine, Literal, TypedDict, Union, cast

import msgpack  # type: ignore[import-untyped]

from .errors import (
    ClientClosed,
    ConnectionLost,
    FrameTooLarge,
    Internal,
    NotFound,
    SidebusError,
    Timeout,
    UnknownTag,
    Unavailable,
    error_from_frame,
)
from .protocol import DEFAULT_MAX_FRAME_BYTES, PROTOCOL_VERSION, FrameReader

__all__ = [
    "DEFAULT_SOCKET",
    "default_socket",
    "connect",
    "Client",
    "Subscription",
    "Delivery",
    "Event",
    "Published",
    "Handler",
]

log = logging.getLogger("sidebus")

DEFAULT_SOCKET = "/run/sidebus/sidebus.sock"

# Reconnection backoff: start, factor 2, cap; each wait is drawn from [half, all] of the step so
# that many clients restarted together do not knock at the same instant.
_BACKOFF_START = 0.05
_BACKOFF_CAP = 2.0
# Bytes queued for writing above which a writer waits: this bounds what waits to be written
# while the reader keeps running (it never waits for the writer).
_WRITE_HIGH_WATER = 256 * 1024


def default_socket() -> str:
    """``$SIDEBUS_SOCKET``, else ``/run/sidebus/sidebus.sock``."""
    return os.environ.get("SIDEBUS_SOCKET") or DEFAULT_SOCKET


class Event(TypedDict, total=False):
    """A delivered event: its CloudEvents attributes and ``data``. At run time a plain ``dict``
    holding every attribute the daemon sent, including ones this client does not know."""

    specversion: str
    id: str
    type: str
    source: str
    time: str
    schemaversion: int
    correlationid: str
    partitionkey: str
    traceparent: str
    deliverat: str
    replayed: bool
    data: Any


@dataclass(frozen=True, slots=True)
class Published:
    """The daemon's answer to a publish."""

    event_id: str
    #: ``"spooled"`` (fsynced in the daemon's spool) or ``"committed"`` (in the log and Redis).
    status: str
    #: True when the event id was already stored: nothing new was stored or delivered.
    duplicate: bool = False


Durability = Literal["local", "committed"]
Handler = Callable[["Delivery"], Union[Awaitable[Any], Any]]


def _rfc3339(v: str | _dt.datetime) -> str:
    if isinstance(v, str):
        return v
    if v.tzinfo is None:
        raise ValueError("a datetime sent to the daemon must be timezone-aware")
    return v.astimezone(_dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _reply_fields(reply: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in reply.items() if k != "op" and k != "id"}


def _error_text(e: BaseException) -> str:
    return str(e) or type(e).__name__


# The daemon keeps at most this much of a nack's error text; cutting it here too keeps a huge
# exception message from making the frame too large.
_MAX_ERROR_BYTES = 4096


def _cut(text: str) -> str:
    b = text.encode("utf-8")
    if len(b) <= _MAX_ERROR_BYTES:
        return text
    return b[:_MAX_ERROR_BYTES].decode("utf-8", "ignore")


def _publish_fields(
    type: str,
    data: Any,
    event_id: str | None,
    durability: str | None,
    delay_ms: int | None,
    deliver_at: str | _dt.datetime | None,
    partitionkey: str | None,
    traceparent: str | None,
    version: int | None,
    source: str | None,
    correlationid: str | None,
) -> dict[str, Any]:
    fields: dict[str, Any] = {"type": type, "data": data}
    if event_id is not None:
        fields["event_id"] = event_id
    if durability is not None:
        fields["durability"] = durability
    if delay_ms is not None:
        fields["delay_ms"] = delay_ms
    if deliver_at is not None:
        fields["deliver_at"] = _rfc3339(deliver_at)
    if partitionkey is not None:
        fields["partitionkey"] = partitionkey
    if traceparent is not None:
        fields["traceparent"] = traceparent
    if version is not None:
        fields["version"] = version
    if source is not None:
        fields["source"] = source
    if correlationid is not None:
        fields["correlationid"] = correlationid
    return fields


async def connect(
    socket: str | os.PathLike[str] | None = None,
    name: str | None = None,
    *,
    reconnect_timeout: float = 30.0,
    request_timeout: float | None = None,
) -> Client:
    """Connects to the daemon's socket (default: :func:`default_socket`) and says ``hello`` as
    ``name`` (the default ``source`` of this client's publishes).

    The first connection is not retried: a missing daemon raises :class:`ConnectionLost` at
    once. Once connected, the client reconnects on its own (see :class:`Client`).
    """
    client = Client(socket, name, reconnect_timeout=reconnect_timeout, request_timeout=request_timeout)
    await client._connect_first()
    return client


class _Connection(asyncio.Protocol):
    """One socket to the daemon. Incoming bytes are split into frames and handed to the client
    as they arrive (the reader never waits for the writer). Outgoing frames written in one turn
    of the event loop are joined into one write."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.loop = client._loop
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader()
        self.closed = False
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self._out: list[bytes] = []
        self._out_size = 0
        self._flush_scheduled = False
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
        except FrameTooLarge as e:
            # The stream is out of step: nothing after this can be read reliably.
            log.error("sidebus: %s; dropping the connection", e)
            self.abort()
            return
        on_frame = self.client._on_frame
        for f in frames:
            if type(f) is dict:
                on_frame(self, f)
            else:
                log.warning("sidebus: ignoring an undecodable frame from the daemon: %s", f)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._out.clear()
        self._wake_drainers()
        if not self.lost.done():
            self.lost.set_result(None)
        self.client._on_connection_lost(self, exc)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drainers()

    # writing

    def write(self, frame: bytes) -> None:
        if self.closed:
            return
        self._out.append(frame)
        self._out_size += len(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if not out or self.closed or self.transport is None:
            out.clear()
            self._out_size = 0
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._out_size = 0
        self.transport.write(data)

    @property
    def congested(self) -> bool:
        return self._paused or self._out_size > _WRITE_HIGH_WATER

    async def drain(self) -> None:
        """Waits until what is queued for writing is below the high-water mark."""
        if self._out_size > _WRITE_HIGH_WATER:
            self._flush()
        while self._paused and not self.closed:
            fut = self.loop.create_future()
            self._drain_waiters.append(fut)
            await fut

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None:
            self._flush()
            self.transport.close()


class Client:
    """A connection to the sidebus daemon. Create it with :func:`connect`.

    Requests are pipelined: any number may be in flight, each reply is matched to its request by
    ``id``. When the connection breaks, every request in flight fails at once with
    :class:`ConnectionLost` (a publish is never re-sent by the client), and the client
    reconnects with backoff, says ``hello`` again and subscribes every live subscription again
    with the same options. A request made while disconnected waits for the reconnection, up to
    ``reconnect_timeout`` seconds, then raises :class:`Timeout`.
    """

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        name: str | None = None,
        *,
        reconnect_timeout: float = 30.0,
        request_timeout: float | None = None,
    ) -> None:
        self.socket = os.fspath(socket) if socket is not None else default_socket()
        self.name = name
        self.reconnect_timeout = reconnect_timeout
        self.request_timeout = request_timeout
        #: The fields of the daemon's last ``hello`` reply (``server``, ``node``, ...).
        self.server_info: dict[str, Any] = {}
        #: The largest frame the daemon takes; a larger request fails with FrameTooLarge before
        #: it is sent (the daemon would close the connection).
        self.max_frame_bytes = DEFAULT_MAX_FRAME_BYTES
        self._loop = asyncio.get_running_loop()
        self._conn: _Connection | None = None
        self._ready = asyncio.Event()
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._on_ok: dict[int, Callable[[_Connection, dict[str, Any]], None]] = {}
        # Requests answered through a callback instead of a future (the handler path's acks):
        # no task has to wake up for them.
        self._callbacks: dict[int, Callable[[dict[str, Any] | None, SidebusError | None], None]] = {}
        self._next_id = 1
        self._subs: dict[Subscription, None] = {}
        self._by_num: dict[int, Subscription] = {}
        self._closing = False
        self._closed = False
        self._closed_event = asyncio.Event()
        self._reconnect_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._packer = msgpack.Packer(use_bin_type=True)
        # Set by the first hello: only a client that has connected once reconnects on its own.
        self._established = False
        #: How many times the client has reconnected.
        self.reconnects = 0

    # ---- context manager ----

    async def __aenter__(self) -> Client:
        if self._conn is None and not self._closed and self._reconnect_task is None:
            await self._connect_first()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        """True while the client has a connection that said ``hello``."""
        return self._conn is not None and self._ready.is_set() and not self._closed

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- connection management ----

    async def _connect_first(self) -> None:
        try:
            await self._open()
        except OSError as e:
            raise ConnectionLost(f"cannot connect to the sidebus daemon at {self.socket}: {e}") from e

    async def _open(self) -> None:
        """Opens a connection and says hello; the client is ready when it returns."""
        _, conn = await self._loop.create_unix_connection(lambda: _Connection(self), self.socket)
        self._conn = conn
        fields: dict[str, Any] = {"protocol": PROTOCOL_VERSION}
        if self.name is not None:
            fields["client"] = self.name
        try:
            reply = await self._call("hello", fields, conn=conn)
        except BaseException:
            # A connection that did not say hello is dropped quietly: the caller (the first
            # connect, or the reconnect loop) decides what happens next.
            if self._conn is conn:
                self._conn = None
            conn.abort()
            raise
        self.server_info = _reply_fields(reply)
        mfb = reply.get("max_frame_bytes")
        if type(mfb) is int and mfb > 0:
            self.max_frame_bytes = mfb
        self._established = True
        self._ready.set()

    def _on_connection_lost(self, conn: _Connection, exc: Exception | None) -> None:
        if conn is not self._conn:
            return
        self._conn = None
        if not self._closed:
            self._ready.clear()
        pending, self._pending = self._pending, {}
        callbacks, self._callbacks = self._callbacks, {}
        self._on_ok.clear()
        if pending or callbacks:
            cls = ClientClosed if self._closed else ConnectionLost
            why = "the client was closed" if self._closed else f"the connection to the daemon broke ({exc or 'closed by the daemon'})"
            for fut in pending.values():
                if not fut.done():
                    fut.set_exception(cls(why))
            for cb in callbacks.values():
                cb(None, cls(why))
        self._by_num.clear()
        for sub in list(self._subs):
            sub._connection_broke()
        if self._established and not self._closing and self._reconnect_task is None:
            log.warning("sidebus: the connection to %s broke (%s); reconnecting", self.socket, exc or "closed by the daemon")
            self._reconnect_task = self._loop.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        step = _BACKOFF_START
        try:
            while not self._closing:
                await asyncio.sleep(step * random.uniform(0.5, 1.0))
                if self._closing:
                    return
                try:
                    await self._open()
                except (OSError, SidebusError) as e:
                    log.info("sidebus: reconnecting to %s failed (%s); retrying", self.socket, e)
                    step = min(step * 2, _BACKOFF_CAP)
                    continue
                self.reconnects += 1
                log.warning("sidebus: reconnected to %s", self.socket)
                conn = self._conn
                self._reconnect_task = None
                if conn is not None:
                    for sub in list(self._subs):
                        self._spawn(sub._resubscribe(conn))
                return
        finally:
            if self._reconnect_task is asyncio.current_task():
                self._reconnect_task = None

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = self._loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _wait_connected(self) -> _Connection:
        deadline = self._loop.time() + self.reconnect_timeout
        while True:
            if self._closed or (self._closing and self._conn is None):
                raise ClientClosed("the client is closed")
            conn = self._conn
            if conn is not None and self._ready.is_set():
                return conn
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                raise Timeout(f"no connection to the sidebus daemon at {self.socket} within {self.reconnect_timeout:g} s")
            try:
                await asyncio.wait_for(self._ready.wait(), remaining)
            except (asyncio.TimeoutError, TimeoutError):
                pass

    # ---- requests ----

    def _on_frame(self, conn: _Connection, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        if op == "deliver":
            sub = self._by_num.get(frame.get("sub"))  # type: ignore[arg-type]
            if sub is not None:
                sub._deliver(conn, frame)
            return
        rid = frame.get("id")
        if rid is None:
            if op == "error":
                log.warning("sidebus: error from the daemon: %s", error_from_frame(frame))
            # Pushes this client does not know are ignored, as the protocol asks.
            return
        fut = self._pending.pop(rid, None)
        if fut is None:
            cb = self._callbacks.pop(rid, None)
            if cb is not None:
                if op == "ok":
                    cb(frame, None)
                else:
                    cb(None, error_from_frame(frame) if op == "error" else Internal(f"unexpected reply op {op!r}"))
                return
        hook = self._on_ok.pop(rid, None) if self._on_ok else None
        if fut is None:
            log.debug("sidebus: a reply to no request in flight: %r", frame)
            return
        if op == "ok":
            if hook is not None:
                hook(conn, frame)
            if not fut.done():
                fut.set_result(frame)
        elif op == "error":
            if not fut.done():
                fut.set_exception(error_from_frame(frame))
        elif not fut.done():
            fut.set_exception(Internal(f"unexpected reply op {op!r}"))

    def _encode(self, frame: dict[str, Any]) -> bytes:
        body: bytes = self._packer.pack(frame)
        if len(body) > self.max_frame_bytes:
            raise FrameTooLarge(
                f"the {frame.get('op')} frame is {len(body)} bytes, over the daemon's max_frame_bytes {self.max_frame_bytes}"
            )
        return len(body).to_bytes(4, "big") + body

    async def _call(
        self,
        op: str,
        fields: dict[str, Any],
        *,
        conn: _Connection | None = None,
        on_ok: Callable[[_Connection, dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Sends a request and returns its ``ok`` reply; raises the typed error otherwise. With
        ``conn``, the request goes on that connection or fails (used for hello, resubscribe and
        the ends of deliveries, whose tags belong to one connection)."""
        if conn is None:
            conn = self._conn
            if conn is None or not self._ready.is_set() or self._closed:
                conn = await self._wait_connected()
        elif conn.closed or conn is not self._conn:
            raise ConnectionLost("the connection this request belongs to is gone")
        rid = self._next_id
        self._next_id = rid + 1
        frame = {"op": op, "id": rid}
        frame.update(fields)
        data = self._encode(frame)
        fut: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._pending[rid] = fut
        if on_ok is not None:
            self._on_ok[rid] = on_ok
        conn.write(data)
        if conn.congested:
            await conn.drain()
        if self.request_timeout is None:
            return await fut
        try:
            return await asyncio.wait_for(fut, self.request_timeout)
        except (asyncio.TimeoutError, TimeoutError):
            self._pending.pop(rid, None)
            self._on_ok.pop(rid, None)
            raise Timeout(f"no reply to {op} within {self.request_timeout:g} s") from None

    def _call_cb(
        self,
        conn: _Connection,
        op: str,
        fields: dict[str, Any],
        callback: Callable[[dict[str, Any] | None, SidebusError | None], None],
    ) -> None:
        """Sends a request on ``conn`` whose answer (or the connection's loss) is passed to
        ``callback`` as it arrives."""
        rid = self._next_id
        self._next_id = rid + 1
        frame = {"op": op, "id": rid}
        frame.update(fields)
        data = self._encode(frame)
        self._callbacks[rid] = callback
        conn.write(data)

    def _send_nowait(self, conn: _Connection, op: str, fields: dict[str, Any]) -> None:
        """Sends a request without ``id`` (no reply; a failure comes as an error push)."""
        frame = {"op": op}
        frame.update(fields)
        conn.write(self._encode(frame))

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Sends any op with these wire fields and returns the ``ok`` reply's fields (for ops
        this client has no method for yet)."""
        return _reply_fields(await self._call(op, fields))

    # ---- publish ----

    async def publish(
        self,
        type: str,
        data: Any,
        *,
        event_id: str | None = None,
        durability: Durability | None = None,
        delay_ms: int | None = None,
        deliver_at: str | _dt.datetime | None = None,
        partitionkey: str | None = None,
        traceparent: str | None = None,
        version: int | None = None,
        source: str | None = None,
        correlationid: str | None = None,
    ) -> Published:
        """Publishes ``data`` (any MessagePack-able value: dict, list, str, int, float, bool,
        None, bytes) as an event of ``type``.

        Publishes started together are pipelined (``asyncio.gather`` them, or create tasks) and
        stored in the order they were started. ``durability="committed"`` answers once the event
        is in the log and Redis. Raises the typed error of the daemon's answer
        (:class:`ValidationFailed`, :class:`Backpressure`, :class:`Unavailable`, ...), or
        :class:`ConnectionLost` when the connection broke before the answer: the event may or
        may not be stored, so re-publish it with the same ``event_id`` (always safe).
        """
        fields = _publish_fields(type, data, event_id, durability, delay_ms, deliver_at, partitionkey, traceparent,
                                 version, source, correlationid)
        reply = await self._call("publish", fields)
        return Published(reply.get("event_id", ""), reply.get("status", ""), reply.get("duplicate") is True)

    def publish_nowait(
        self,
        type: str,
        data: Any,
        *,
        event_id: str | None = None,
        durability: Durability | None = None,
        delay_ms: int | None = None,
        deliver_at: str | _dt.datetime | None = None,
        partitionkey: str | None = None,
        traceparent: str | None = None,
        version: int | None = None,
        source: str | None = None,
        correlationid: str | None = None,
    ) -> asyncio.Future[Published]:
        """Like :meth:`publish`, without a coroutine: writes the publish now and returns a
        future of its answer. Publishes started this way are stored in call order, and cost no
        task each, which suits a publisher sending many at once; it does not wait when the
        socket's write buffer is full, so keep the number in flight bounded (e.g. a window of
        1,000). While disconnected, the publish waits for the reconnection like any request."""
        fields = _publish_fields(type, data, event_id, durability, delay_ms, deliver_at, partitionkey, traceparent,
                                 version, source, correlationid)
        conn = self._conn
        if conn is None or not self._ready.is_set() or self._closed:
            return asyncio.ensure_future(self._publish_later(fields))
        fut: asyncio.Future[Published] = self._loop.create_future()

        def answered(reply: dict[str, Any] | None, err: SidebusError | None) -> None:
            if fut.done():
                return
            if err is not None:
                fut.set_exception(err)
            else:
                assert reply is not None
                fut.set_result(Published(reply.get("event_id", ""), reply.get("status", ""), reply.get("duplicate") is True))

        self._call_cb(conn, "publish", fields, answered)
        return fut

    async def _publish_later(self, fields: dict[str, Any]) -> Published:
        reply = await self._call("publish", fields)
        return Published(reply.get("event_id", ""), reply.get("status", ""), reply.get("duplicate") is True)

    # ---- subscribe ----

    def subscribe(
        self,
        type: str,
        group: str,
        handler: Handler | None = None,
        *,
        max_in_flight: int | None = None,
        max_attempts: int | None = None,
        ack_timeout_ms: int | None = None,
    ) -> Subscription:
        """A subscription to ``type`` as a consumer of ``group``.

        Without ``handler``, iterate it: ``async for delivery in client.subscribe(...)``, and end
        each delivery with ``ack()``/``nack()``. With ``handler``, ``await`` it: the handler runs
        on every delivery (concurrently, up to ``max_in_flight``); returning acks, raising nacks
        with ``str(exc)``. Either way ``await sub`` makes sure the daemon has subscribed.
        """
        if self._closing:
            raise ClientClosed("the client is closed")
        return Subscription(self, type, group, handler, max_in_flight, max_attempts, ack_timeout_ms)

    async def consume(
        self,
        type: str,
        group: str,
        handler: Handler,
        *,
        max_in_flight: int | None = None,
        max_attempts: int | None = None,
        ack_timeout_ms: int | None = None,
    ) -> None:
        """Subscribes with ``handler`` and runs it on every delivery until the subscription
        ends (:meth:`close`, or :meth:`Subscription.unsubscribe`). If the task running it is
        cancelled, the subscription is ended gracefully first."""
        sub = await self.subscribe(
            type, group, handler, max_in_flight=max_in_flight, max_attempts=max_attempts, ack_timeout_ms=ack_timeout_ms
        )
        try:
            await sub.wait()
        except asyncio.CancelledError:
            await sub.unsubscribe()
            raise

    # ---- admin ops ----

    async def ping(self) -> None:
        """A round trip to the daemon."""
        await self._call("ping", {})

    async def stats(self) -> dict[str, Any]:
        """The daemon's ``counters``, ``spool``, ``groups`` (and ``node``, ``uptime_s``)."""
        return _reply_fields(await self._call("stats", {}))

    async def register_schema(
        self,
        type: str,
        schema: dict[str, Any] | bool,
        *,
        compatibility: str | None = None,
        strict: bool | None = None,
        dry_run: bool | None = None,
    ) -> dict[str, Any]:
        """Registers ``schema`` (a JSON Schema) as the next version of ``type``'s schema:
        ``{"type", "version", "created"}``. :class:`IncompatibleSchema` lists what breaks."""
        fields: dict[str, Any] = {"type": type, "schema": schema}
        if compatibility is not None:
            fields["compatibility"] = compatibility
        if strict is not None:
            fields["strict"] = strict
        if dry_run is not None:
            fields["dry_run"] = dry_run
        return _reply_fields(await self._call("register_schema", fields))

    async def get_schema(self, type: str, version: int | None = None) -> dict[str, Any]:
        """A version of ``type``'s schema (default: the latest): ``{"type", "version",
        "schema", "compatibility", "strict"}``."""
        fields: dict[str, Any] = {"type": type}
        if version is not None:
            fields["version"] = version
        return _reply_fields(await self._call("get_schema", fields))

    async def list_schemas(self) -> dict[str, Any]:
        """``{"types": [{"type", "latest", "compatibility"}, ...]}``."""
        return _reply_fields(await self._call("list_schemas", {}))

    async def replay(
        self, type: str, group: str, since: str | _dt.datetime, until: str | _dt.datetime | None = None
    ) -> dict[str, Any]:
        """Replays the events of ``type`` logged in ``[since, until)`` to ``group`` alone:
        ``{"count", "replay"}`` (``replay`` absent when nothing was started)."""
        fields: dict[str, Any] = {"type": type, "group": group, "since": _rfc3339(since)}
        if until is not None:
            fields["until"] = _rfc3339(until)
        return _reply_fields(await self._call("replay", fields))

    async def replay_cancel(self, replay: str) -> None:
        """Stops a running replay (:class:`NotFound` when it is not running)."""
        await self._call("replay_cancel", {"replay": replay})

    async def replays(self, all: bool = False) -> dict[str, Any]:
        """``{"replays": [...]}``: the running replays (with ``all``, also those ended in the
        last day)."""
        return _reply_fields(await self._call("replays", {"all": True} if all else {}))

    async def dlq_list(
        self,
        type: str,
        group: str,
        *,
        limit: int | None = None,
        after: int | None = None,
        ids: list[str] | None = None,
    ) -> dict[str, Any]:
        """A page of the group's dead letters: ``{"entries": [...], "next": N}`` (``next``
        only when there may be more; pass it as ``after``)."""
        fields: dict[str, Any] = {"type": type, "group": group}
        if limit is not None:
            fields["limit"] = limit
        if after is not None:
            fields["after"] = after
        if ids is not None:
            fields["ids"] = list(ids)
        return _reply_fields(await self._call("dlq_list", fields))

    async def dlq_redrive(
        self, type: str, group: str, *, ids: list[str] | None = None, rate: int | None = None
    ) -> dict[str, Any]:
        """Puts dead letters (default: all of the group's) back in front of the group's
        consumers at attempt 1: ``{"count"}``."""
        fields: dict[str, Any] = {"type": type, "group": group}
        if ids is not None:
            fields["ids"] = list(ids)
        if rate is not None:
            fields["rate"] = rate
        return _reply_fields(await self._call("dlq_redrive", fields))

    async def dlq_purge(self, type: str, group: str, *, ids: list[str] | None = None) -> dict[str, Any]:
        """Discards dead letters (default: all of the group's): ``{"count"}``."""
        fields: dict[str, Any] = {"type": type, "group": group}
        if ids is not None:
            fields["ids"] = list(ids)
        return _reply_fields(await self._call("dlq_purge", fields))

    # ---- close ----

    async def close(self, timeout: float | None = 30.0) -> None:
        """Closes gracefully: stops taking deliveries, lets running handlers finish (and
        deliveries handed out by iterators be ended), unsubscribes, waits for the replies to
        requests in flight, closes the connection and stops reconnecting. After ``timeout``
        seconds, handlers still running are cancelled (their deliveries go back to the group)."""
        if self._closed:
            return
        if self._closing:
            await self._closed_event.wait()
            return
        self._closing = True
        started = self._loop.time()
        try:
            if self._reconnect_task is not None:
                self._reconnect_task.cancel()
                self._reconnect_task = None
            subs = list(self._subs)
            if subs:
                await asyncio.gather(*(s.unsubscribe(timeout) for s in subs), return_exceptions=True)
            pending = [f for f in self._pending.values() if not f.done()]
            if pending:
                left = None if timeout is None else max(0.0, timeout - (self._loop.time() - started))
                await asyncio.wait(pending, timeout=left)
        finally:
            self._closed = True
            conn = self._conn
            if conn is not None:
                conn.close()
                # Fail what is still in flight now rather than when the socket reports closing.
                self._on_connection_lost(conn, None)
                try:
                    await asyncio.wait_for(asyncio.shield(conn.lost), 1.0)
                except (asyncio.TimeoutError, TimeoutError):
                    conn.abort()
            for task in list(self._background):
                task.cancel()
            self._ready.set()  # wakes requests waiting for a connection: they see the client closed
            self._closed_event.set()


class Subscription:
    """A subscription to one type as one consumer group, made by :meth:`Client.subscribe`.

    It survives reconnections: the client subscribes again with the same options and the
    iterator (or handler) goes on. Deliveries handed out before a break are stale afterwards:
    their tags belonged to the old connection (the daemon has released them and delivers them
    again), so ending them is silently skipped.
    """

    def __init__(
        self,
        client: Client,
        type: str,
        group: str,
        handler: Handler | None,
        max_in_flight: int | None,
        max_attempts: int | None,
        ack_timeout_ms: int | None,
    ) -> None:
        self.client = client
        self.type = type
        self.group = group
        self.options: dict[str, int] = {}
        if max_in_flight is not None:
            self.options["max_in_flight"] = max_in_flight
        if max_attempts is not None:
            self.options["max_attempts"] = max_attempts
        if ack_timeout_ms is not None:
            self.options["ack_timeout_ms"] = ack_timeout_ms
        self._handler = handler
        loop = client._loop
        # new -> active -> stopping -> ended
        self._state = "new"
        self._starting: asyncio.Future[None] | None = None
        self._num: int | None = None
        self._conn: _Connection | None = None
        self._queue: collections.deque[Delivery] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._outstanding: set[Delivery] = set()
        # Acks and nacks of the handler path sent and not yet confirmed.
        self._ends_in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._done: asyncio.Future[None] = loop.create_future()
        self._error: BaseException | None = None
        #: Deliveries handed to the handler or the iterator so far.
        self.delivered = 0

    def __repr__(self) -> str:
        return f"<Subscription {self.type} group={self.group} state={self._state} sub={self._num}>"

    @property
    def number(self) -> int | None:
        """The subscription's number on the current connection (None while disconnected)."""
        return self._num

    @property
    def active(self) -> bool:
        return self._state == "active"

    # ---- starting ----

    def __await__(self):  # type: ignore[no-untyped-def]
        return self._start().__await__()

    async def _start(self) -> Subscription:
        if self._state == "new" and self._starting is None:
            self._starting = asyncio.ensure_future(self._subscribe_first())
        if self._starting is not None:
            await asyncio.shield(self._starting)
        return self

    def _fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"type": self.type, "group": self.group}
        fields.update(self.options)
        return fields

    async def _subscribe_first(self) -> None:
        try:
            await self.client._call("subscribe", self._fields(), on_ok=self._bind)
        except BaseException as e:
            if self._state == "new":
                self._state = "ended"
                self._error = e if isinstance(e, Exception) else None
                if not self._done.done():
                    self._done.set_result(None)
            raise

    def _bind(self, conn: _Connection, reply: dict[str, Any]) -> None:
        """Runs in the reader as the subscribe reply arrives, before any later frame is read:
        the daemon writes the reply before the subscription's first delivery."""
        num = reply.get("sub")
        if type(num) is not int:
            log.error("sidebus: a subscribe reply without sub: %r", reply)
            return
        if self._state == "new":
            self._state = "active"
        self._num = num
        self._conn = conn
        self.client._by_num[num] = self
        self.client._subs[self] = None

    async def _resubscribe(self, conn: _Connection) -> None:
        """Subscribes again on a new connection, retrying while the daemon says it cannot yet
        (right after a restart its backends may still be connecting)."""
        step = _BACKOFF_START
        while self._state == "active" and self._num is None and not conn.closed and conn is self.client._conn:
            try:
                await self.client._call("subscribe", self._fields(), conn=conn, on_ok=self._bind)
                log.info("sidebus: subscribed again to %s as %s", self.type, self.group)
                return
            except ConnectionLost:
                return  # the next connection subscribes again
            except (Unavailable, Internal) as e:
                log.warning("sidebus: subscribing again to %s as %s failed (%s); retrying", self.type, self.group, e)
                await asyncio.sleep(step * random.uniform(0.5, 1.0))
                step = min(step * 2, _BACKOFF_CAP)
            except SidebusError as e:
                log.error("sidebus: subscribing again to %s as %s failed: %s; the subscription ends", self.type, self.group, e)
                self._error = e
                self._stop_taking()
                self._end()
                return

    # ---- deliveries ----

    def _deliver(self, conn: _Connection, frame: dict[str, Any]) -> None:
        if self._state != "active":
            # Not taken: the daemon gets it back when the subscription or connection ends.
            return
        tag = frame.get("tag")
        if type(tag) is not int:
            log.warning("sidebus: a deliver without tag: %r", frame)
            return
        event = frame.get("event")
        d = Delivery(self, conn, tag, frame.get("attempt", 1), cast(Event, event if type(event) is dict else {}))
        self.delivered += 1
        if self._handler is not None:
            self._idle.clear()
            task = self.client._loop.create_task(self._run(d))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
        else:
            self._queue.append(d)
            while self._waiters:
                w = self._waiters.popleft()
                if not w.done():
                    w.set_result(None)
                    break

    async def _run(self, d: Delivery) -> None:
        try:
            r = self._handler(d)  # type: ignore[misc]
            if inspect.isawaitable(r):
                await r
        except asyncio.CancelledError:
            raise
        except Exception as e:
            text = _error_text(e)
            log.info("sidebus: the handler failed on %s (attempt %s): %s", d.event.get("id"), d.attempt, text,
                     exc_info=log.isEnabledFor(logging.DEBUG))
            if not d._ended:
                self._end_for_handler(d, "nack", {"error": _cut(text)})
            return
        if not d._ended:
            self._end_for_handler(d, "ack", {})

    def _end_for_handler(self, d: Delivery, op: str, fields: dict[str, Any]) -> None:
        """Ends a delivery after its handler: with an id, so that a refusal (``unknown_tag``
        after an expired lease, ``unavailable``) is seen and logged. The confirmation is awaited
        by the subscription (close and unsubscribe wait for it), not by the handler's task."""
        d._ended = True
        conn = d._conn
        client = self.client
        if conn.closed or conn is not client._conn:
            return  # stale: the daemon has released it and delivers it again
        fields["tag"] = d.tag
        self._ends_in_flight += 1
        self._idle.clear()

        def confirmed(reply: dict[str, Any] | None, err: SidebusError | None) -> None:
            self._ends_in_flight -= 1
            self._check_idle()
            if err is not None and not isinstance(err, ConnectionLost):
                log.warning("sidebus: %s of %s failed: %s; it will be delivered again", op, d.event.get("id"), err)

        try:
            client._call_cb(conn, op, fields, confirmed)
        except SidebusError as e:
            confirmed(None, e)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("sidebus: a handler task failed", exc_info=task.exception())
        self._check_idle()

    def _delivery_ended(self, d: Delivery) -> None:
        if self._outstanding:
            self._outstanding.discard(d)
            self._check_idle()

    def _check_idle(self) -> None:
        if not self._tasks and not self._outstanding and not self._ends_in_flight:
            self._idle.set()

    def _connection_broke(self) -> None:
        self._num = None
        self._conn = None
        # Deliveries of the old connection: their tags are void, the daemon delivers them again.
        self._queue.clear()
        self._outstanding.clear()
        self._check_idle()

    # ---- iterating ----

    def __aiter__(self) -> Subscription:
        if self._handler is not None:
            raise TypeError("a subscription with a handler cannot be iterated")
        return self

    async def __anext__(self) -> Delivery:
        if self._state == "new":
            await self._start()
        while True:
            while self._queue:
                d = self._queue.popleft()
                if d.stale:
                    continue
                self._outstanding.add(d)
                self._idle.clear()
                return d
            if self._state != "active":
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            w = self.client._loop.create_future()
            self._waiters.append(w)
            await w

    # ---- ending ----

    def _stop_taking(self) -> None:
        if self._state in ("new", "active"):
            self._state = "stopping"
        self._queue.clear()
        waiters, self._waiters = self._waiters, collections.deque()
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def _end(self) -> None:
        self._state = "ended"
        self.client._subs.pop(self, None)
        if self._num is not None and self.client._by_num.get(self._num) is self:
            del self.client._by_num[self._num]
        if not self._done.done():
            self._done.set_result(None)

    async def unsubscribe(self, timeout: float | None = 30.0) -> None:
        """Ends the subscription gracefully: stops taking deliveries, lets running handlers
        finish (and handed-out deliveries be ended) for up to ``timeout`` seconds (then cancels
        the handlers), and unsubscribes; unacknowledged deliveries go back to the group without
        counting an attempt."""
        if self._state == "ended":
            return
        if self._starting is not None and not self._starting.done():
            try:
                await asyncio.shield(self._starting)
            except Exception:
                return
        if self._state == "ended":
            return
        self._stop_taking()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            log.warning("sidebus: %d handlers of %s/%s still running after %s s; cancelling them",
                        len(self._tasks), self.type, self.group, timeout)
            for t in list(self._tasks):
                t.cancel()
            self._outstanding.clear()
        conn, num = self._conn, self._num
        try:
            if num is not None and conn is not None and not conn.closed and conn is self.client._conn:
                try:
                    await self.client._call("unsubscribe", {"sub": num}, conn=conn)
                except (ConnectionLost, NotFound):
                    pass  # the connection's end releases the deliveries just the same
        finally:
            self._end()

    async def wait(self) -> None:
        """Waits until the subscription ends; raises what ended it, if it failed."""
        await asyncio.shield(self._done)
        if self._error is not None:
            raise self._error

    async def __aenter__(self) -> Subscription:
        return await self._start()

    async def __aexit__(self, *exc: object) -> None:
        await self.unsubscribe()


class Delivery:
    """One delivery of an event to a subscription. End it with :meth:`ack` or :meth:`nack`; one
    left alone is retried after the subscription's ``ack_timeout_ms``."""

    __slots__ = ("subscription", "tag", "attempt", "event", "_conn", "_ended")

    def __init__(self, subscription: Subscription, conn: _Connection, tag: int, attempt: int, event: Event) -> None:
        self.subscription = subscription
        #: The delivery's tag on its connection.
        self.tag = tag
        #: 1 on the first delivery of the event to this group, n+1 after n failed attempts.
        self.attempt = attempt
        #: The event: its CloudEvents attributes and ``data``.
        self.event = event
        self._conn = conn
        self._ended = False

    def __repr__(self) -> str:
        return f"<Delivery tag={self.tag} attempt={self.attempt} id={self.event.get('id')!r} type={self.event.get('type')!r}>"

    @property
    def data(self) -> Any:
        """The event's ``data``."""
        return self.event.get("data")

    @property
    def id(self) -> str:
        """The event's id."""
        return self.event.get("id", "")

    @property
    def type(self) -> str:
        return self.event.get("type", "")

    @property
    def ended(self) -> bool:
        """True once acked or nacked."""
        return self._ended

    @property
    def stale(self) -> bool:
        """True when the connection it came on is gone: it can no longer be ended (the daemon
        has released it and delivers it again)."""
        conn = self._conn
        return conn.closed or conn is not self.subscription.client._conn

    async def ack(self, *, wait: bool = True) -> None:
        """The delivery succeeded. With ``wait`` (the default), waits for the daemon to confirm
        (it has then recorded the outcome) and raises its error, e.g. :class:`UnknownTag` when
        the lease had expired; without, nothing is awaited and an error comes as a logged push."""
        await self._end("ack", {}, wait)

    async def nack(
        self, error: str | None = None, *, delay_ms: int | None = None, dead: bool = False, wait: bool = True
    ) -> None:
        """The delivery failed: retried after the daemon's backoff, or after ``delay_ms``; with
        ``dead``, straight to the dead-letter queue. ``error`` is kept with the event."""
        fields: dict[str, Any] = {}
        if error is not None:
            fields["error"] = _cut(error)
        if delay_ms is not None:
            fields["delay_ms"] = delay_ms
        if dead:
            fields["dead"] = True
        await self._end("nack", fields, wait)

    async def extend(self, *, wait: bool = True) -> None:
        """Restarts the delivery's lease: still working on it."""
        if self._ended:
            raise UnknownTag(f"delivery {self.tag} was already ended")
        await self._send("extend", {}, wait)

    async def _end(self, op: str, fields: dict[str, Any], wait: bool) -> None:
        if self._ended:
            raise UnknownTag(f"delivery {self.tag} was already ended")
        self._ended = True
        try:
            await self._send(op, fields, wait)
        finally:
            self.subscription._delivery_ended(self)

    async def _send(self, op: str, fields: dict[str, Any], wait: bool) -> None:
        conn = self._conn
        client = self.subscription.client
        if conn.closed or conn is not client._conn:
            # Its tag belonged to a connection that is gone; the daemon redelivers it.
            log.debug("sidebus: %s of a stale delivery skipped", op)
            return
        fields["tag"] = self.tag
        if not wait:
            client._send_nowait(conn, op, fields)
            return
        try:
            await client._call(op, fields, conn=conn)
        except ConnectionLost:
            log.debug("sidebus: the connection broke before the %s of tag %d was confirmed", op, self.tag)
