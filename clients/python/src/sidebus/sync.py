# The blocking wrapper for scripts: runs the asyncio client on an event loop in a background
# thread and exposes publish, a consume loop with plain-function handlers, and the admin ops as
# ordinary blocking calls.
"""A blocking sidebus client for scripts that do not use asyncio.

```python
import sidebus

with sidebus.BlockingClient(name="orders") as client:
    client.publish("order.created", {"orderId": "o-1"})

    def handle(delivery: sidebus.BlockingDelivery) -> None:   # return = ack, raise = nack
        print(delivery.data)

    client.consume("order.created", "inventory", handle)      # until Ctrl-C or close()
```
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as _dt
import os
import threading
from typing import Any, Callable, Coroutine, TypeVar

from .client import Client, Delivery, Durability, Event, Published
from .client import connect as _connect_async

__all__ = ["BlockingClient", "BlockingDelivery", "connect_blocking", "connect"]

T = TypeVar("T")


class BlockingDelivery:
    """A delivery handed to a blocking handler (which runs in a worker thread). Returning from
    the handler acks it and raising nacks it; these methods end it explicitly instead."""

    __slots__ = ("_d", "_bc")

    def __init__(self, delivery: Delivery, client: BlockingClient) -> None:
        self._d = delivery
        self._bc = client

    def __repr__(self) -> str:
        return repr(self._d).replace("<Delivery", "<BlockingDelivery", 1)

    @property
    def event(self) -> Event:
        return self._d.event

    @property
    def data(self) -> Any:
        return self._d.data

    @property
    def id(self) -> str:
        return self._d.id

    @property
    def attempt(self) -> int:
        return self._d.attempt

    @property
    def tag(self) -> int:
        return self._d.tag

    def ack(self) -> None:
        self._bc._run(self._d.ack())

    def nack(self, error: str | None = None, *, delay_ms: int | None = None, dead: bool = False) -> None:
        self._bc._run(self._d.nack(error, delay_ms=delay_ms, dead=dead))

    def extend(self) -> None:
        self._bc._run(self._d.extend())


class BlockingClient:
    """The client for scripts: every method blocks until the daemon answered. It owns a
    background thread running an event loop with an asyncio :class:`~sidebus.Client`, so it
    reconnects the same way. Use it as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        name: str | None = None,
        *,
        reconnect_timeout: float = 30.0,
        request_timeout: float | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sidebus-loop", daemon=True)
        self._thread.start()
        self._closed = False
        try:
            self._client: Client = self._run(
                _connect_async(socket, name, reconnect_timeout=reconnect_timeout, request_timeout=request_timeout)
            )
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a BlockingClient method was called on its own event loop thread")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result()
        except KeyboardInterrupt:
            fut.cancel()
            raise

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            # Tasks still running (a consume loop's wait, say) are cancelled rather than left
            # pending forever, so that threads blocked on them return.
            asyncio.run_coroutine_threadsafe(_cancel_other_tasks(), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def client(self) -> Client:
        """The asyncio client underneath (its methods must run on :attr:`loop`)."""
        return self._client

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def publish(
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
        """Publishes one event and waits for the daemon's answer (see :meth:`Client.publish`)."""
        return self._run(
            self._client.publish(
                type,
                data,
                event_id=event_id,
                durability=durability,
                delay_ms=delay_ms,
                deliver_at=deliver_at,
                partitionkey=partitionkey,
                traceparent=traceparent,
                version=version,
                source=source,
                correlationid=correlationid,
            )
        )

    def consume(
        self,
        type: str,
        group: str,
        handler: Callable[[BlockingDelivery], Any],
        *,
        concurrency: int = 1,
        max_in_flight: int | None = None,
        max_attempts: int | None = None,
        ack_timeout_ms: int | None = None,
    ) -> None:
        """Runs ``handler`` (a plain function) on every delivery in ``concurrency`` worker
        threads until :meth:`close` is called (from another thread) or Ctrl-C, which ends the
        subscription gracefully and is raised again. Returning acks, raising nacks with
        ``str(exc)``. ``max_in_flight`` defaults to ``concurrency``, so that deliveries do not
        wait in the client while their lease runs."""
        pool = concurrent.futures.ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="sidebus-handler")

        async def run(d: Delivery) -> None:
            await asyncio.get_running_loop().run_in_executor(pool, handler, BlockingDelivery(d, self))

        try:
            sub = self._run(
                self._start_subscription(
                    type,
                    group,
                    run,
                    max_in_flight=max_in_flight if max_in_flight is not None else max(1, concurrency),
                    max_attempts=max_attempts,
                    ack_timeout_ms=ack_timeout_ms,
                )
            )
            try:
                self._run(sub.wait())
            except concurrent.futures.CancelledError:
                return  # the client was closed under it
            except KeyboardInterrupt:
                self._run(sub.unsubscribe())
                raise
        finally:
            pool.shutdown(wait=True)

    async def _start_subscription(self, type: str, group: str, handler: Any, **opts: Any) -> Any:
        return await self._client.subscribe(type, group, handler, **opts)

    # ---- admin ops (see the asyncio Client for what each returns) ----

    def ping(self) -> None:
        self._run(self._client.ping())

    def stats(self) -> dict[str, Any]:
        return self._run(self._client.stats())

    def register_schema(self, type: str, schema: dict[str, Any] | bool, **opts: Any) -> dict[str, Any]:
        return self._run(self._client.register_schema(type, schema, **opts))

    def get_schema(self, type: str, version: int | None = None) -> dict[str, Any]:
        return self._run(self._client.get_schema(type, version))

    def list_schemas(self) -> dict[str, Any]:
        return self._run(self._client.list_schemas())

    def replay(self, type: str, group: str, since: str | _dt.datetime, until: str | _dt.datetime | None = None) -> dict[str, Any]:
        return self._run(self._client.replay(type, group, since, until))

    def replay_cancel(self, replay: str) -> None:
        self._run(self._client.replay_cancel(replay))

    def replays(self, all: bool = False) -> dict[str, Any]:
        return self._run(self._client.replays(all))

    def dlq_list(self, type: str, group: str, **opts: Any) -> dict[str, Any]:
        return self._run(self._client.dlq_list(type, group, **opts))

    def dlq_redrive(self, type: str, group: str, **opts: Any) -> dict[str, Any]:
        return self._run(self._client.dlq_redrive(type, group, **opts))

    def dlq_purge(self, type: str, group: str, **opts: Any) -> dict[str, Any]:
        return self._run(self._client.dlq_purge(type, group, **opts))

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        return self._run(self._client.request(op, **fields))

    def close(self, timeout: float | None = 30.0) -> None:
        """Closes gracefully (see :meth:`Client.close`) and stops the background thread. Any
        thread may call it, except a handler's own (it waits for handlers to finish)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self._client.close(timeout))
        finally:
            self._stop_loop()


async def _cancel_other_tasks() -> None:
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def connect(
    socket: str | os.PathLike[str] | None = None,
    name: str | None = None,
    *,
    reconnect_timeout: float = 30.0,
    request_timeout: float | None = None,
) -> BlockingClient:
    """``sidebus.sync.connect(...)``: a connected :class:`BlockingClient`."""
    return BlockingClient(socket, name, reconnect_timeout=reconnect_timeout, request_timeout=request_timeout)


connect_blocking = connect
