# Unit tests of the asyncio client against the fake daemon: the frames it sends, pipelining,
# typed errors, handlers (ack on return, nack on raise, explicit nack/extend, concurrency), the
# iterator, reconnection and resubscription, waiting while disconnected, and graceful close.
"""The asyncio client."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import tempfile
import unittest
from typing import Any, Callable

import sidebus
from tests.fake_daemon import FakeConn, FakeDaemon


async def until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError("timed out waiting for a condition")
        await asyncio.sleep(0.005)


class ClientTest(unittest.IsolatedAsyncioTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="sbpy-")
        self.path = os.path.join(self.dir, "d.sock")
        self.daemon = FakeDaemon(self.path)
        self.clients: list[sidebus.Client] = []

    async def asyncTearDown(self) -> None:
        for c in self.clients:
            await c.close(timeout=1)

    def tearDown(self) -> None:
        self.daemon.shutdown()
        shutil.rmtree(self.dir, ignore_errors=True)

    async def connect(self, name: str | None = "svc", **kw: Any) -> sidebus.Client:
        c = await sidebus.connect(socket=self.path, name=name, **kw)
        self.clients.append(c)
        return c

    # ---- connecting and publishing ----

    async def test_hello_names_the_client_and_reads_the_server(self) -> None:
        c = await self.connect("orders")
        [hello] = self.daemon.received("hello")
        self.assertEqual((hello["protocol"], hello["client"]), (1, "orders"))
        self.assertEqual(c.server_info["node"], "fake")
        self.assertTrue(c.connected)

    async def test_the_socket_defaults_to_the_environment(self) -> None:
        old = os.environ.get("SIDEBUS_SOCKET")
        os.environ["SIDEBUS_SOCKET"] = self.path
        try:
            c = await sidebus.connect(name="env")
            self.clients.append(c)
            self.assertEqual(c.socket, self.path)
            del os.environ["SIDEBUS_SOCKET"]
            self.assertEqual(sidebus.default_socket(), "/run/sidebus/sidebus.sock")
        finally:
            if old is not None:
                os.environ["SIDEBUS_SOCKET"] = old
            else:
                os.environ.pop("SIDEBUS_SOCKET", None)

    async def test_the_first_connect_fails_at_once_without_a_daemon(self) -> None:
        with self.assertRaises(sidebus.ConnectionLost):
            await asyncio.wait_for(sidebus.connect(socket=os.path.join(self.dir, "none.sock")), 2)

    async def test_publish_sends_every_field(self) -> None:
        c = await self.connect()
        at = dt.datetime(2026, 11, 27, 10, 30, tzinfo=dt.timezone(dt.timedelta(hours=1)))
        p = await c.publish(
            "order.created", {"orderId": "o-1", "blob": b"\x00\xff"}, event_id="evt-1", durability="committed",
            deliver_at=at, partitionkey="pk", traceparent="00-aa-bb-01", version=2, source="src", correlationid="corr",
        )
        self.assertEqual(p, sidebus.Published("evt-1", "spooled", False))
        [f] = self.daemon.received("publish")
        self.assertEqual(f["type"], "order.created")
        self.assertEqual(f["data"], {"orderId": "o-1", "blob": b"\x00\xff"})
        self.assertEqual(f["deliver_at"], "2026-11-27T09:30:00Z")
        for k, v in {"event_id": "evt-1", "durability": "committed", "partitionkey": "pk", "traceparent": "00-aa-bb-01",
                     "version": 2, "source": "src", "correlationid": "corr"}.items():
            self.assertEqual(f[k], v, k)
        await c.publish("t", None, delay_ms=1500)
        f2 = self.daemon.received("publish")[1]
        self.assertIn("data", f2)
        self.assertIsNone(f2["data"])
        self.assertEqual(f2["delay_ms"], 1500)
        self.assertNotIn("event_id", f2)

    async def test_big_integers_survive(self) -> None:
        c = await self.connect()
        values = [2**53 + 1, 2**64 - 1, -(2**63), -(2**53) - 1]
        await c.publish("t", {"v": values})
        self.assertEqual(self.daemon.received("publish")[0]["data"], {"v": values})

    async def test_publishes_are_pipelined_and_matched_by_id(self) -> None:
        held: list[tuple[FakeConn, dict[str, Any]]] = []
        self.daemon.handlers["publish"] = lambda conn, f: held.append((conn, f))  # type: ignore[func-returns-value]
        c = await self.connect()
        tasks = [asyncio.ensure_future(c.publish("t", {"n": i}, event_id=f"id-{i}")) for i in range(50)]
        # All 50 are on the wire before any reply.
        await until(lambda: len(held) == 50)
        self.assertEqual([f["data"]["n"] for _, f in held], list(range(50)))
        ids = [f["id"] for _, f in held]
        self.assertEqual(len(set(ids)), 50)
        self.assertEqual(ids, sorted(ids))
        for conn, f in reversed(held):
            self.daemon.answer(conn, f, {"event_id": f["event_id"], "status": "committed"})
        results = await asyncio.gather(*tasks)
        self.assertEqual([r.event_id for r in results], [f"id-{i}" for i in range(50)])

    async def test_publish_nowait_writes_at_once_and_returns_a_future(self) -> None:
        c = await self.connect()
        futures = [c.publish_nowait("t", {"n": i}, event_id=f"n-{i}") for i in range(20)]
        results = await asyncio.gather(*futures)
        self.assertEqual([r.event_id for r in results], [f"n-{i}" for i in range(20)])
        self.assertEqual([f["data"]["n"] for f in self.daemon.received("publish")], list(range(20)))
        # While disconnected it waits for the reconnection like any request.
        self.daemon.stop()
        await until(lambda: not c.connected)
        later = c.publish_nowait("t", {"n": 20})
        self.daemon.start()
        self.assertEqual((await asyncio.wait_for(later, 5)).status, "spooled")
        # An error answer is raised by the future.
        self.daemon.handlers["publish"] = lambda conn, f: {"op": "error", "code": "backpressure", "message": "full"}
        with self.assertRaises(sidebus.Backpressure):
            await c.publish_nowait("t", {})

    async def test_daemon_errors_are_typed(self) -> None:
        answers = iter([
            {"op": "error", "code": "validation_failed", "message": "bad", "details": [{"path": "/amount", "message": "not a number"}]},
            {"op": "error", "code": "backpressure", "message": "spool full"},
            {"op": "error", "code": "something_new", "message": "?"},
        ])
        self.daemon.handlers["publish"] = lambda conn, f: next(answers)
        c = await self.connect()
        with self.assertRaises(sidebus.ValidationFailed) as e1:
            await c.publish("t", {})
        self.assertEqual(e1.exception.code, "validation_failed")
        self.assertEqual(e1.exception.details, [{"path": "/amount", "message": "not a number"}])
        self.assertEqual(e1.exception.message, "bad")
        with self.assertRaises(sidebus.Backpressure) as e2:
            await c.publish("t", {})
        self.assertIsInstance(e2.exception, sidebus.SidebusError)
        with self.assertRaises(sidebus.Internal) as e3:
            await c.publish("t", {})
        self.assertEqual((e3.exception.code, e3.exception.wire_code), ("internal", "something_new"))

    async def test_error_pushes_and_unknown_pushes_are_ignored(self) -> None:
        c = await self.connect()
        self.daemon.push({"op": "error", "code": "unknown_tag", "message": "tag 9", "details": []})
        self.daemon.push({"op": "surprise", "x": 1})
        with self.assertLogs("sidebus", "WARNING") as logs:
            await c.ping()
            await c.ping()
        self.assertIn("unknown_tag", "\n".join(logs.output))
        self.assertTrue(c.connected)

    async def test_a_frame_over_max_frame_bytes_is_refused_before_sending(self) -> None:
        self.daemon.max_frame_bytes = 1000
        c = await self.connect()
        with self.assertRaises(sidebus.FrameTooLarge):
            await c.publish("t", "x" * 2000)
        await c.ping()
        self.assertEqual(self.daemon.received("publish"), [])

    async def test_admin_calls_send_wire_fields_and_return_reply_fields(self) -> None:
        self.daemon.handlers["dlq_list"] = lambda conn, f: {"entries": [{"id": 1}], "next": 1}
        c = await self.connect()
        r = await c.dlq_list("t", "g", limit=5, ids=["a"])
        self.assertEqual(r, {"entries": [{"id": 1}], "next": 1})
        await c.dlq_redrive("t", "g", rate=10)
        await c.replay("t", "g", "2026-01-01T00:00:00Z")
        await c.replays(all=True)
        await c.register_schema("t", {"type": "object"}, compatibility="none", dry_run=True)
        await c.get_schema("t", 2)
        await c.stats()
        got = {f["op"]: f for f in self.daemon.received()}
        self.assertEqual((got["dlq_list"]["limit"], got["dlq_list"]["ids"]), (5, ["a"]))
        self.assertEqual(got["dlq_redrive"]["rate"], 10)
        self.assertEqual(got["replay"]["since"], "2026-01-01T00:00:00Z")
        self.assertIs(got["replays"]["all"], True)
        self.assertEqual((got["register_schema"]["compatibility"], got["register_schema"]["dry_run"]), ("none", True))
        self.assertEqual(got["get_schema"]["version"], 2)
        for f in got.values():
            sidebus.protocol.check_request(f)

    # ---- subscriptions ----

    async def test_handler_return_acks_and_raise_nacks_with_the_text(self) -> None:
        c = await self.connect()

        async def handler(d: sidebus.Delivery) -> None:
            if d.data == "bad":
                raise ValueError("malformed email")

        sub = await c.subscribe("t", "g", handler, max_in_flight=8, max_attempts=3, ack_timeout_ms=5000)
        [s] = self.daemon.received("subscribe")
        self.assertEqual((s["type"], s["group"], s["max_in_flight"], s["max_attempts"], s["ack_timeout_ms"]),
                         ("t", "g", 8, 3, 5000))
        self.assertEqual(sub.number, 1)
        self.daemon.deliver(1, "a", "good")
        self.daemon.deliver(2, "b", "bad")
        await until(lambda: len(self.daemon.received("ack")) + len(self.daemon.received("nack")) == 2)
        [ack] = self.daemon.received("ack")
        [nack] = self.daemon.received("nack")
        self.assertEqual(ack["tag"], 1)
        self.assertIn("id", ack)  # the handler path waits for the daemon's confirmation
        self.assertEqual((nack["tag"], nack["error"]), (2, "malformed email"))

    async def test_explicit_nack_and_extend_are_sent_and_not_followed_by_an_ack(self) -> None:
        c = await self.connect()

        async def handler(d: sidebus.Delivery) -> None:
            await d.extend()
            if d.tag == 1:
                await d.nack("later", delay_ms=300)
            else:
                await d.nack("poison", dead=True)

        await c.subscribe("t", "g", handler)
        self.daemon.deliver(1, "a")
        self.daemon.deliver(2, "b")
        await until(lambda: len(self.daemon.received("nack")) == 2)
        await asyncio.sleep(0.05)
        nacks = {f["tag"]: f for f in self.daemon.received("nack")}
        self.assertEqual((nacks[1]["error"], nacks[1]["delay_ms"]), ("later", 300))
        self.assertNotIn("dead", nacks[1])
        self.assertEqual((nacks[2]["error"], nacks[2]["dead"]), ("poison", True))
        self.assertEqual(sorted(f["tag"] for f in self.daemon.received("extend")), [1, 2])
        self.assertEqual(self.daemon.received("ack"), [])

    async def test_a_long_error_text_is_cut_to_what_the_daemon_keeps(self) -> None:
        c = await self.connect()

        async def handler(d: sidebus.Delivery) -> None:
            raise RuntimeError("é" * 5000)

        await c.subscribe("t", "g", handler)
        self.daemon.deliver(1, "a")
        await until(lambda: len(self.daemon.received("nack")) == 1)
        error = self.daemon.received("nack")[0]["error"]
        self.assertEqual(error, "é" * 2048)  # 4096 bytes, cut on a character boundary

    async def test_a_second_end_of_a_delivery_is_refused(self) -> None:
        c = await self.connect()
        errors: list[BaseException] = []

        async def handler(d: sidebus.Delivery) -> None:
            await d.ack()
            try:
                await d.nack("again")
            except sidebus.UnknownTag as e:
                errors.append(e)

        await c.subscribe("t", "g", handler)
        self.daemon.deliver(1, "a")
        await until(lambda: len(errors) == 1)
        self.assertEqual(len(self.daemon.received("ack")), 1)
        self.assertEqual(self.daemon.received("nack"), [])

    async def test_handlers_of_one_subscription_run_concurrently(self) -> None:
        c = await self.connect()
        release = asyncio.Event()
        running = 0
        peak = 0

        async def handler(d: sidebus.Delivery) -> None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await release.wait()
            running -= 1

        await c.subscribe("t", "g", handler)
        for tag in range(1, 6):
            self.daemon.deliver(tag, f"e{tag}")
        await until(lambda: peak == 5)
        release.set()
        await until(lambda: len(self.daemon.received("ack")) == 5)

    async def test_the_iterator_yields_deliveries_to_end_explicitly(self) -> None:
        c = await self.connect()
        seen: list[tuple[str, int]] = []

        async def consume() -> None:
            async for d in c.subscribe("t", "g"):
                seen.append((d.id, d.attempt))
                await d.ack(wait=False) if d.tag == 1 else await d.nack("no")

        task = asyncio.ensure_future(consume())
        await until(lambda: len(self.daemon.received("subscribe")) == 1)
        self.daemon.deliver(1, "a")
        self.daemon.deliver(2, "b", attempt=3)
        await until(lambda: len(seen) == 2)
        await until(lambda: len(self.daemon.received("nack")) == 1)
        [ack] = self.daemon.received("ack")
        self.assertNotIn("id", ack)  # wait=False: fire and forget
        self.assertEqual(seen, [("a", 1), ("b", 3)])
        await c.close()
        await asyncio.wait_for(task, 2)  # the iterator ends when the client closes

    async def test_a_refused_subscribe_raises_its_error(self) -> None:
        self.daemon.handlers["subscribe"] = lambda conn, f: {"op": "error", "code": "bad_request", "message": "max_in_flight",
                                                             "details": [{"field": "max_in_flight", "message": "1 to 1024"}]}
        c = await self.connect()
        with self.assertRaises(sidebus.BadRequest) as e:
            await c.subscribe("t", "g", lambda d: None, max_in_flight=5000)
        self.assertEqual(e.exception.details[0]["field"], "max_in_flight")

    # ---- reconnection ----

    async def test_reconnect_fails_requests_in_flight_and_resubscribes(self) -> None:
        held: list[dict[str, Any]] = []
        self.daemon.handlers["publish"] = lambda conn, f: held.append(f)  # type: ignore[func-returns-value]
        c = await self.connect("inv")
        started = asyncio.Event()
        release = asyncio.Event()
        seen: list[str] = []

        async def handler(d: sidebus.Delivery) -> None:
            seen.append(d.id)
            if d.id == "old":
                started.set()
                await release.wait()

        sub = await c.subscribe("t", "g", handler, max_in_flight=4, max_attempts=2)
        self.daemon.deliver(1, "old")
        await started.wait()
        pub = asyncio.ensure_future(c.publish("t", {}, event_id="k-1"))
        await until(lambda: len(held) == 1)
        self.daemon.drop_connections()
        with self.assertRaises(sidebus.ConnectionLost):
            await pub
        # Back: hello, then the same subscribe on the new connection.
        await until(lambda: len(self.daemon.received("subscribe", conn=1)) == 1)
        self.assertEqual(self.daemon.ops(conn=1)[0], "hello")
        self.assertEqual(self.daemon.received("hello", conn=1)[0]["client"], "inv")
        [again] = self.daemon.received("subscribe", conn=1)
        [first] = self.daemon.received("subscribe", conn=0)
        self.assertEqual({k: v for k, v in again.items() if k != "id"}, {k: v for k, v in first.items() if k != "id"})
        await until(lambda: sub.number == 1 and c.connected)
        # The publish in flight was not re-sent.
        self.assertEqual(len(held), 1)
        # The handler that was running at the break ends without an ack on the new connection.
        release.set()
        self.daemon.deliver(1, "new")
        await until(lambda: len(self.daemon.received("ack", conn=1)) == 1)
        await asyncio.sleep(0.05)
        self.assertEqual([f["tag"] for f in self.daemon.received("ack", conn=1)], [1])
        self.assertEqual(self.daemon.received("ack", conn=0), [])
        self.assertEqual(seen, ["old", "new"])
        self.assertEqual(c.reconnects, 1)
        # Nothing is left waiting on the old connection: close does not wait for its timeout.
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await c.close(timeout=3)
        self.assertLess(loop.time() - t0, 1.0)

    async def test_resubscribing_retries_while_the_daemon_is_unavailable(self) -> None:
        c = await self.connect()
        seen: list[str] = []
        await c.subscribe("t", "g", lambda d: seen.append(d.id))
        refusals = iter([{"op": "error", "code": "unavailable", "message": "backends connecting"}])
        self.daemon.handlers["subscribe"] = lambda conn, f: next(refusals, {"sub": 7})
        self.daemon.drop_connections()
        await until(lambda: len(self.daemon.received("subscribe", conn=1)) == 2)
        self.daemon.deliver(3, "x", sub=7)
        await until(lambda: seen == ["x"])

    async def test_a_request_while_disconnected_waits_for_the_reconnection(self) -> None:
        c = await self.connect()
        self.daemon.stop()
        await until(lambda: not c.connected)
        pub = asyncio.ensure_future(c.publish("t", {"n": 1}))
        await asyncio.sleep(0.3)
        self.assertFalse(pub.done())
        self.daemon.start()
        p = await asyncio.wait_for(pub, 5)
        self.assertEqual(p.status, "spooled")
        self.assertEqual(self.daemon.ops(conn=1), ["hello", "publish"])

    async def test_a_request_while_disconnected_times_out(self) -> None:
        c = await self.connect(reconnect_timeout=0.3)
        self.daemon.stop()
        await until(lambda: not c.connected)
        with self.assertRaises(sidebus.Timeout) as e:
            await c.publish("t", {})
        self.assertIsInstance(e.exception, TimeoutError)
        self.assertEqual(e.exception.code, "timeout")

    async def test_request_timeout(self) -> None:
        self.daemon.handlers["stats"] = lambda conn, f: None
        c = await self.connect(request_timeout=0.2)
        with self.assertRaises(sidebus.Timeout):
            await c.stats()
        await c.ping()

    # ---- closing ----

    async def test_close_finishes_running_handlers_then_unsubscribes(self) -> None:
        c = await self.connect()
        started = asyncio.Event()
        release = asyncio.Event()
        seen: list[str] = []

        async def handler(d: sidebus.Delivery) -> None:
            seen.append(d.id)
            started.set()
            await release.wait()

        await c.subscribe("t", "g", handler)
        self.daemon.deliver(1, "a")
        await started.wait()
        closing = asyncio.ensure_future(c.close())
        await asyncio.sleep(0.05)
        self.assertFalse(closing.done())
        # Stopped taking deliveries: this one is not handled (the daemon gets it back).
        self.daemon.deliver(2, "b")
        await asyncio.sleep(0.05)
        self.assertEqual(self.daemon.received("unsubscribe"), [])
        release.set()
        await asyncio.wait_for(closing, 2)
        self.assertEqual(seen, ["a"])
        self.assertEqual([op for op in self.daemon.ops() if op in ("ack", "unsubscribe")], ["ack", "unsubscribe"])
        await until(lambda: self.daemon.conns[0].closed)
        self.assertTrue(c.closed)
        with self.assertRaises(sidebus.ClientClosed):
            await c.publish("t", {})
        # Closed means closed: no reconnection.
        await asyncio.sleep(0.2)
        self.assertEqual(self.daemon.connection_count, 1)

    async def test_close_cancels_handlers_after_its_timeout(self) -> None:
        c = await self.connect()
        cancelled = asyncio.Event()

        async def handler(d: sidebus.Delivery) -> None:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        await c.subscribe("t", "g", handler)
        self.daemon.deliver(1, "a")
        await until(lambda: c.connected and len(self.daemon.received("subscribe")) == 1)
        await asyncio.sleep(0.05)
        with self.assertLogs("sidebus", "WARNING"):
            await asyncio.wait_for(c.close(timeout=0.2), 2)
        self.assertTrue(cancelled.is_set())
        self.assertEqual(self.daemon.received("ack") + self.daemon.received("nack"), [])
        self.assertEqual(len(self.daemon.received("unsubscribe")), 1)

    async def test_unsubscribe_ends_consume(self) -> None:
        c = await self.connect()
        sub = await c.subscribe("t", "g", lambda d: None)
        waiter = asyncio.ensure_future(sub.wait())
        await sub.unsubscribe()
        await asyncio.wait_for(waiter, 1)
        [u] = self.daemon.received("unsubscribe")
        self.assertEqual(u["sub"], 1)
        self.daemon.deliver(1, "late")
        await c.ping()
        self.assertEqual(self.daemon.received("ack"), [])

    async def test_async_with_closes(self) -> None:
        async with await sidebus.connect(socket=self.path, name="w") as c:
            async with c.subscribe("t", "g") as sub:
                self.assertEqual(sub.number, 1)
            self.assertEqual(len(self.daemon.received("unsubscribe")), 1)
        self.assertTrue(c.closed)


if __name__ == "__main__":
    unittest.main()
