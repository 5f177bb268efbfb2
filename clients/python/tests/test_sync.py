# Unit tests of the blocking wrapper against the fake daemon: publish and admin calls block and
# return, consume runs plain-function handlers in worker threads (return acks, raise nacks,
# explicit nack), and close() from another thread ends the consume loop.
"""The blocking client."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import unittest

import sidebus
from tests.fake_daemon import FakeDaemon


class BlockingClientTest(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="sbpy-")
        self.path = os.path.join(self.dir, "d.sock")
        self.daemon = FakeDaemon(self.path)

    def tearDown(self) -> None:
        self.daemon.shutdown()
        shutil.rmtree(self.dir, ignore_errors=True)

    def test_publish_and_admin_calls_block_and_return(self) -> None:
        self.daemon.handlers["stats"] = lambda conn, f: {"node": "fake", "counters": {"published": 1}}
        with sidebus.sync.connect(self.path, "script") as client:
            p = client.publish("t", {"n": 1}, durability="committed")
            self.assertEqual(p, sidebus.Published("e1", "spooled", False))
            self.assertEqual(client.stats()["counters"], {"published": 1})
        self.assertEqual(self.daemon.ops(), ["hello", "publish", "stats"])
        self.daemon.wait_for(lambda: self.daemon.conns[0].closed)

    def test_errors_are_raised_in_the_calling_thread(self) -> None:
        self.daemon.handlers["publish"] = lambda conn, f: {"op": "error", "code": "unavailable", "message": "later"}
        with sidebus.BlockingClient(self.path) as client:
            with self.assertRaises(sidebus.Unavailable):
                client.publish("t", {})

    def test_consume_runs_plain_handlers_until_closed(self) -> None:
        client = sidebus.BlockingClient(self.path, "worker")
        seen: list[tuple[str, str]] = []

        def handle(d: sidebus.BlockingDelivery) -> None:
            seen.append((d.id, threading.current_thread().name))
            if d.data == "bad":
                raise RuntimeError("no @ in the address")
            if d.data == "later":
                d.nack("retry me", delay_ms=100)

        done = threading.Event()

        def run() -> None:
            client.consume("t", "g", handle, concurrency=2, max_attempts=3)
            done.set()

        t = threading.Thread(target=run)
        t.start()
        self.daemon.wait_for(lambda: len(self.daemon.received("subscribe")) == 1)
        [s] = self.daemon.received("subscribe")
        self.assertEqual((s["max_in_flight"], s["max_attempts"]), (2, 3))
        self.daemon.deliver(1, "a", "good")
        self.daemon.deliver(2, "b", "bad")
        self.daemon.deliver(3, "c", "later")
        self.daemon.wait_for(lambda: len(self.daemon.received("ack")) + len(self.daemon.received("nack")) == 3)
        self.assertEqual([f["tag"] for f in self.daemon.received("ack")], [1])
        nacks = {f["tag"]: f for f in self.daemon.received("nack")}
        self.assertEqual(nacks[2]["error"], "no @ in the address")
        self.assertEqual((nacks[3]["error"], nacks[3]["delay_ms"]), ("retry me", 100))
        self.assertTrue(all(name.startswith("sidebus-handler") for _, name in seen), seen)
        client.close()
        self.assertTrue(done.wait(5))
        t.join(5)
        self.assertEqual(self.daemon.received("unsubscribe")[0]["sub"], 1)


if __name__ == "__main__":
    unittest.main()
