// The client against a fake daemon: hello, pipelined publishes, typed errors, the handler and
// iterator forms, reconnection (in-flight requests failed, resubscription, waiting requests),
// the write side not blocking the read side, and graceful close.

import assert from "node:assert/strict";
import { afterEach, beforeEach, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import {
  ClientClosedError,
  Client,
  ConnectionLostError,
  FrameTooLargeError,
  InternalError,
  SidebusError,
  TimeoutError,
  UnknownTagError,
  ValidationFailedError,
} from "../dist/index.js";
import { FakeDaemon, makeEvent, memoryLogger } from "./helpers/fake-daemon.mjs";

let daemon;
let log;
const clients = [];

beforeEach(async () => {
  daemon = await new FakeDaemon().start();
  log = memoryLogger();
});

afterEach(async () => {
  for (const c of clients.splice(0)) await c.close({ timeoutMs: 2000 }).catch(() => {});
  await daemon.dispose();
});

async function connect(opts = {}) {
  const c = await Client.connect({ socket: daemon.path, name: "orders", logger: log, backoff: { initialMs: 10, maxMs: 50 }, ...opts });
  clients.push(c);
  return c;
}

/** Resolves once `pred()` holds, checking every few milliseconds. */
async function waitFor(pred, what, timeoutMs = 3000) {
  const deadline = Date.now() + timeoutMs;
  while (!pred()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

/** A promise and its resolve function, for holding a handler until the test lets it go. */
function gate() {
  let open;
  const p = new Promise((resolve) => (open = resolve));
  return { p, open };
}

test("connect says hello with the protocol version and the client's name", async () => {
  const c = await connect();
  assert.deepEqual(daemon.conn.hello, { op: "hello", id: 1, protocol: 1, client: "orders" });
  assert.equal(c.server.node, "fake-node");
  assert.equal(c.server.max_frame_bytes, 1 << 20);
});

test("connecting to a socket where no daemon listens fails with ConnectionLostError", async () => {
  await assert.rejects(Client.connect({ socket: `${daemon.path}.missing` }), ConnectionLostError);
});

test("publish sends every option under its wire name and maps the reply", async () => {
  const c = await connect();
  daemon.handlers.publish = (req, conn) => conn.ok(req.id, { event_id: req.fields.event_id, status: "committed", duplicate: true });
  const r = await c.publish(
    "order.created",
    { orderId: "o-1", big: 2n ** 63n + 5n, month: 31 * 24 * 3600 * 1000 },
    {
      eventId: "evt-1",
      durability: "committed",
      delayMs: 2 ** 32 + 1,
      partitionKey: "customer-17",
      traceparent: "00-abc-01",
      version: 2,
      source: "billing",
      correlationId: "checkout-77",
    },
  );
  assert.deepEqual(r, { eventId: "evt-1", status: "committed", duplicate: true });
  const [req] = daemon.ops("publish");
  assert.deepEqual(req.fields, {
    op: "publish",
    id: req.id,
    type: "order.created",
    data: { orderId: "o-1", big: 2n ** 63n + 5n, month: 31 * 24 * 3600 * 1000 },
    event_id: "evt-1",
    version: 2,
    source: "billing",
    correlationid: "checkout-77",
    partitionkey: "customer-17",
    traceparent: "00-abc-01",
    durability: "committed",
    delay_ms: 2 ** 32 + 1,
  });
  // deliver_at takes a Date as RFC 3339; duplicate is false when the daemon leaves it out.
  const at = new Date("2026-11-27T09:30:00Z");
  daemon.handlers.publish = undefined;
  const r2 = await c.publish("order.created", null, { deliverAt: at });
  assert.deepEqual(r2, { eventId: `gen-${daemon.ops("publish")[1].id}`, status: "spooled", duplicate: false });
  assert.equal(daemon.ops("publish")[1].fields.deliver_at, "2026-11-27T09:30:00.000Z");
  assert.equal(daemon.ops("publish")[1].fields.data, null);
});

test("publishes are pipelined: all are written before any reply, and replies match by id in any order", async () => {
  const c = await connect();
  const held = [];
  daemon.handlers.publish = (req, conn) => {
    held.push({ ...req, conn });
    return true;
  };
  const n = 200;
  const promises = Array.from({ length: n }, (_, i) => c.publish("t.x", { n: i }));
  await daemon.until((rs) => rs.filter((r) => r.op === "publish").length === n, "all publishes");
  // Written in call order, with increasing ids.
  assert.deepEqual(held.map((r) => r.fields.data.n), Array.from({ length: n }, (_, i) => i));
  for (let i = 1; i < n; i++) assert.ok(held[i].id > held[i - 1].id);
  // Answered backwards: each caller still gets its own reply.
  for (const req of [...held].reverse()) req.conn.ok(req.id, { event_id: `e-${req.fields.data.n}`, status: "spooled" });
  const results = await Promise.all(promises);
  assert.deepEqual(results.map((r) => r.eventId), Array.from({ length: n }, (_, i) => `e-${i}`));
});

test("error replies become typed errors carrying code, message and details", async () => {
  const c = await connect();
  daemon.handlers.publish = (req, conn) =>
    conn.error(req.id, "validation_failed", "data does not match", [{ path: "", message: '"currency" is a required property' }]);
  await assert.rejects(c.publish("t.x", {}), (e) => {
    assert.ok(e instanceof ValidationFailedError && e instanceof SidebusError);
    assert.equal(e.code, "validation_failed");
    assert.equal(e.message, "data does not match");
    assert.deepEqual(e.details, [{ path: "", message: '"currency" is a required property' }]);
    return true;
  });
  daemon.handlers.stats = (req, conn) => conn.error(req.id, "quota_exceeded", "a code from the future");
  await assert.rejects(c.stats(), (e) => e instanceof InternalError && e.code === "internal" && e.message.includes("quota_exceeded"));
});

test("error pushes and pushes of unknown ops are logged or ignored, and the client goes on", async () => {
  const c = await connect();
  daemon.conn.error(undefined, "unknown_tag", "tag 18 is not a delivery this connection holds");
  daemon.conn.write({ op: "weather", forecast: "sunny" });
  await c.ping();
  assert.ok(log.lines.some((l) => l.startsWith("warn") && l.includes("unknown_tag")));
});

test("a frame over the daemon's max_frame_bytes fails alone, without breaking the connection", async () => {
  const c = await connect();
  await assert.rejects(c.publish("t.x", { pad: "x".repeat(1 << 20) }), FrameTooLargeError);
  await c.ping();
  assert.equal(daemon.conns.length, 1);
});

test("a handler that resolves acks, one that throws nacks with its message, explicit nack and extend are sent as asked", async () => {
  const c = await connect();
  const seen = [];
  const sub = await c.subscribe("t.x", "g", { maxInFlight: 8, maxAttempts: 3, ackTimeoutMs: 1000 }, async (d) => {
    seen.push(d.data.k);
    if (d.data.k === "fail") throw new Error("malformed email");
    if (d.data.k === "dead") {
      await d.extend();
      await d.nack({ error: "poison", dead: true });
    }
    if (d.data.k === "later") await d.nack({ error: "later", delayMs: 300 });
  });
  const [subReq] = daemon.ops("subscribe");
  assert.deepEqual(subReq.fields, { op: "subscribe", id: subReq.id, type: "t.x", group: "g", max_in_flight: 8, max_attempts: 3, ack_timeout_ms: 1000 });
  daemon.conn.deliver(1, 10, makeEvent("t.x", { k: "ok" }));
  daemon.conn.deliver(1, 11, makeEvent("t.x", { k: "fail" }));
  daemon.conn.deliver(1, 12, makeEvent("t.x", { k: "dead" }));
  daemon.conn.deliver(1, 13, makeEvent("t.x", { k: "later" }));
  await daemon.until((rs) => rs.filter((r) => ["ack", "nack"].includes(r.op)).length === 4, "four outcomes");
  await sleep(50);
  const ends = Object.fromEntries(daemon.requests.filter((r) => ["ack", "nack"].includes(r.op)).map((r) => [r.fields.tag, r.fields]));
  assert.equal(ends[10].op, "ack");
  assert.equal(typeof ends[10].id, "number", "the handler path acks with an id, to see the answer");
  assert.deepEqual([ends[11].op, ends[11].error, ends[11].dead, ends[11].delay_ms], ["nack", "malformed email", undefined, undefined]);
  assert.deepEqual([ends[12].op, ends[12].error, ends[12].dead], ["nack", "poison", true]);
  assert.deepEqual([ends[13].op, ends[13].error, ends[13].delay_ms], ["nack", "later", 300]);
  assert.equal(daemon.ops("ack").length + daemon.ops("nack").length, 4, "an explicitly ended delivery is not acked again");
  assert.deepEqual(daemon.ops("extend").map((r) => r.fields.tag), [12]);
  assert.deepEqual(seen.sort(), ["dead", "fail", "later", "ok"]);
  assert.equal(sub.active, true);
});

test("handlers of one subscription run concurrently", async () => {
  const c = await connect();
  const first = gate();
  let running = 0;
  let most = 0;
  await c.subscribe("t.x", "g", async (d) => {
    running++;
    most = Math.max(most, running);
    if (d.tag === 1) await first.p;
    running--;
  });
  daemon.conn.deliver(1, 1, makeEvent("t.x", 1));
  daemon.conn.deliver(1, 2, makeEvent("t.x", 2));
  // The second handler runs and is acked while the first still waits.
  await daemon.until((rs) => rs.some((r) => r.op === "ack" && r.fields.tag === 2), "the second ack");
  assert.equal(daemon.ops("ack").length, 1);
  first.open();
  await daemon.until((rs) => rs.some((r) => r.op === "ack" && r.fields.tag === 1), "the first ack");
  assert.equal(most, 2);
});

test("an ack the daemon refuses is logged, not thrown at anyone", async () => {
  const c = await connect();
  daemon.handlers.ack = (req, conn) => conn.error(req.id, "unknown_tag", "tag 5 is not a delivery this connection holds");
  await c.subscribe("t.x", "g", async () => {});
  daemon.conn.deliver(1, 5, makeEvent("t.x", 1));
  await daemon.until((rs) => rs.some((r) => r.op === "ack"), "the ack");
  await sleep(30);
  assert.ok(log.lines.some((l) => l.startsWith("warn ack of") && l.includes("deliver it again")), log.lines.join("\n"));
});

test("the iterator form hands out deliveries in order with explicit ack, and leaving the loop unsubscribes", async () => {
  const c = await connect();
  const sub = await c.subscribe("t.x", "g", { maxInFlight: 4 });
  for (let i = 1; i <= 3; i++) daemon.conn.deliver(1, i, makeEvent("t.x", { i }));
  const got = [];
  for await (const d of sub) {
    got.push(d.data.i);
    if (d.data.i === 2) await d.nack({ error: "no" });
    else await d.ack();
    if (got.length === 3) break;
  }
  assert.deepEqual(got, [1, 2, 3]);
  assert.deepEqual(daemon.requests.filter((r) => ["ack", "nack", "unsubscribe"].includes(r.op)).map((r) => r.op), ["ack", "nack", "ack", "unsubscribe"]);
  assert.equal(daemon.ops("unsubscribe")[0].fields.sub, 1);
  await sub.done;
  await assert.rejects(c.subscribe("t.x", "g", () => {}).then((s) => s.next()), TypeError);
});

test("when the connection breaks, requests in flight fail with ConnectionLostError and are not sent again", async () => {
  const c = await connect();
  daemon.handlers.publish = () => true; // never answered
  const p = c.publish("t.x", { n: 1 }, { eventId: "e-1" });
  await daemon.until((rs) => rs.some((r) => r.op === "publish"), "the publish");
  daemon.conn.destroy();
  await assert.rejects(p, ConnectionLostError);
  await daemon.until((rs) => rs.filter((r) => r.op === "hello").length === 2, "the second hello");
  daemon.handlers.publish = undefined;
  await c.ping();
  assert.equal(daemon.ops("publish").length, 1, "the publish in flight was not re-sent");
});

test("after the daemon restarts the client reconnects, says hello, resubscribes with the same options and keeps delivering", async () => {
  let disconnects = 0;
  let reconnects = 0;
  const c = await connect({ onDisconnect: () => disconnects++, onReconnect: () => reconnects++ });
  const seen = [];
  const held = gate();
  await c.subscribe("t.x", "inventory", { maxInFlight: 8, maxAttempts: 2, ackTimeoutMs: 500 }, async (d) => {
    seen.push(d.data);
    if (d.data === "held") await held.p;
  });
  daemon.conn.deliver(1, 1, makeEvent("t.x", "before"));
  daemon.conn.deliver(1, 2, makeEvent("t.x", "held"));
  await daemon.until((rs) => rs.some((r) => r.op === "ack" && r.fields.tag === 1), "the first ack");
  await daemon.stop();
  await waitFor(() => !c.connected, "the client to notice");
  // A request made while the daemon is away waits for the reconnection instead of failing.
  const waiting = c.publish("t.x", "while away");
  await sleep(100);
  held.open(); // this handler's ack belongs to the dead connection: dropped silently
  await daemon.start();
  await daemon.until((rs) => rs.filter((r) => r.op === "subscribe").length === 2, "the resubscription");
  const r = await waiting;
  assert.equal(r.status, "spooled");
  const [first, second] = daemon.ops("subscribe");
  const strip = ({ id: _id, ...f }) => f;
  assert.deepEqual(strip(second.fields), strip(first.fields));
  assert.equal(daemon.ops("hello").length, 2);
  assert.equal(daemon.ops("hello")[1].fields.client, "orders");
  daemon.conn.deliver(1, 1, makeEvent("t.x", "after"));
  await daemon.until((rs) => rs.some((r) => r.conn === daemon.conn && r.op === "ack" && r.fields.tag === 1), "the ack after");
  assert.deepEqual(seen, ["before", "held", "after"]);
  assert.equal(daemon.conn.requests.filter((r) => r.op === "ack").length, 1, "the held delivery's ack was not sent on the new connection");
  assert.deepEqual([disconnects, reconnects], [1, 1]);
});

test("a subscription the restarted daemon cannot take yet is renewed after a backoff", async () => {
  const c = await connect();
  const got = [];
  const gotIt = gate();
  const sub = await c.subscribe("t.x", "g", (d) => {
    got.push(d.data);
    gotIt.open();
  });
  let refusals = 2;
  daemon.handlers.subscribe = (req, conn) => {
    if (refusals-- > 0) {
      conn.error(req.id, "unavailable", "the backends are not reachable yet");
      return true;
    }
    return false;
  };
  daemon.conn.destroy();
  await daemon.until((rs) => rs.filter((r) => r.op === "subscribe").length === 4, "three renewals");
  await sleep(20);
  assert.equal(sub.wireSub, 1);
  daemon.conn.deliver(1, 1, makeEvent("t.x", "again"));
  await gotIt.p;
  assert.deepEqual(got, ["again"]);
  assert.equal(log.lines.filter((l) => l.includes("failed (unavailable); retrying")).length, 2);
});

test("a request made while disconnected fails with TimeoutError when the daemon stays away", async () => {
  const c = await connect({ reconnectTimeoutMs: 200 });
  await daemon.stop();
  await waitFor(() => !c.connected, "the client to notice");
  const started = Date.now();
  await assert.rejects(c.ping(), TimeoutError);
  assert.ok(Date.now() - started >= 190);
});

test("reading goes on while writes are blocked: a delivery is handled while the daemon is not reading", async () => {
  const c = await connect({ maxQueuedBytes: 64 << 10 });
  const handled = gate();
  await c.subscribe("t.x", "g", () => handled.open());
  daemon.conn.socket.pause();
  const pad = "x".repeat(16 << 10);
  const promises = Array.from({ length: 200 }, (_, i) => c.publish("t.x", { i, pad }));
  await sleep(100);
  daemon.conn.deliver(1, 7, makeEvent("t.x", "pushed"));
  await handled.p; // would hang if the client stopped reading while its writes wait
  daemon.conn.socket.resume();
  const results = await Promise.all(promises);
  assert.equal(results.length, 200);
  assert.deepEqual(daemon.ops("publish").map((r) => r.fields.data.i), Array.from({ length: 200 }, (_, i) => i));
});

test("close waits for running handlers, then acks, unsubscribes and closes; later calls fail with ClientClosedError", async () => {
  const c = await connect();
  const held = gate();
  let started = 0;
  const sub = await c.subscribe("t.x", "g", async () => {
    started++;
    await held.p;
  });
  daemon.conn.deliver(1, 1, makeEvent("t.x", 1));
  await waitFor(() => started === 1, "the handler to start");
  const closing = c.close();
  // Deliveries that arrive after close began are not handled (unsubscribe hands them back).
  daemon.conn.deliver(1, 2, makeEvent("t.x", 2));
  await sleep(50);
  assert.equal(started, 1);
  assert.equal(daemon.ops("unsubscribe").length, 0, "not unsubscribed while a handler runs");
  held.open();
  await closing;
  assert.deepEqual(daemon.requests.slice(-2).map((r) => [r.op, r.fields.tag ?? r.fields.sub]), [["ack", 1], ["unsubscribe", 1]]);
  await sub.done;
  await assert.rejects(c.publish("t.x", 1), ClientClosedError);
  await assert.rejects(c.subscribe("t.x", "g", () => {}), ClientClosedError);
  assert.equal(c.connected, false);
  await sleep(100);
  assert.equal(daemon.conns.length, 1, "no reconnection after close");
});

test("close waits for the replies still due, and a stuck handler makes it time out", async () => {
  const c = await connect();
  daemon.handlers.publish = (req, conn) => {
    setTimeout(() => conn.ok(req.id, { event_id: "late", status: "spooled" }), 100);
    return true;
  };
  const p = c.publish("t.x", 1);
  await daemon.until((rs) => rs.some((r) => r.op === "publish"), "the publish");
  await c.close();
  assert.equal((await p).eventId, "late");

  const c2 = await connect();
  await c2.subscribe("t.x", "g", () => new Promise(() => {}));
  daemon.conn.deliver(1, 1, makeEvent("t.x", 1));
  await sleep(20);
  await assert.rejects(c2.close({ timeoutMs: 100 }), TimeoutError);
  assert.equal(c2.connected, false);
});

test("close waits for deliveries an iterator handed out to be acked", async () => {
  const c = await connect();
  const sub = await c.subscribe("t.x", "g");
  daemon.conn.deliver(1, 1, makeEvent("t.x", 1));
  const loop = (async () => {
    for await (const d of sub) {
      await sleep(80);
      await d.ack();
    }
  })();
  await sleep(20);
  await c.close();
  await loop;
  assert.deepEqual(daemon.requests.slice(-2).map((r) => r.op), ["ack", "unsubscribe"]);
});

test("an explicit ack the daemon refuses rejects with the typed error", async () => {
  const c = await connect();
  daemon.handlers.ack = (req, conn) => conn.error(req.id, "unknown_tag", "expired");
  const sub = await c.subscribe("t.x", "g");
  daemon.conn.deliver(1, 3, makeEvent("t.x", 1));
  const { value: d } = await sub.next();
  await assert.rejects(d.ack(), UnknownTagError);
});
