// A scriptable stand-in for the sidebus daemon on a Unix socket, for the client's unit tests:
// it decodes and validates every request like the daemon, records it, answers with defaults,
// and lets a test override any op, push deliveries, drop connections and restart.

import { mkdtempSync, rmSync } from "node:fs";
import * as net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { decodeRequest, encodeFrame, FrameReader } from "../../dist/index.js";

export class FakeConn {
  constructor(socket, daemon) {
    this.socket = socket;
    this.daemon = daemon;
    this.requests = [];
    this.nextSub = 1;
    this.hello = null;
  }

  write(frame) {
    if (!this.socket.destroyed) this.socket.write(encodeFrame(frame));
  }

  ok(id, fields = {}) {
    this.write({ op: "ok", id, ...fields });
  }

  error(id, code, message = code, details = []) {
    this.write(id === undefined ? { op: "error", code, message, details } : { op: "error", id, code, message, details });
  }

  deliver(sub, tag, event, attempt = 1) {
    this.write({ op: "deliver", sub, tag, attempt, event });
  }

  destroy() {
    this.socket.destroy();
  }
}

let eventCounter = 0;

/** An event map as the daemon delivers it. */
export function makeEvent(type, data, extra = {}) {
  eventCounter++;
  return {
    specversion: "1.0",
    id: `evt-${eventCounter}`,
    type,
    source: "test",
    time: "2026-11-27T09:30:00.123456Z",
    correlationid: `evt-${eventCounter}`,
    ...extra,
    data,
  };
}

export class FakeDaemon {
  /** Ops whose answer the test decides: `handlers.publish = (req, conn) => ...`; return true when answered. */
  handlers = {};
  conns = [];
  /** Every request of every connection, in arrival order: `{conn, op, id, fields}`. */
  requests = [];
  waiters = [];

  constructor() {
    this.dir = mkdtempSync(join(tmpdir(), "sidebus-fake-"));
    this.path = join(this.dir, "sidebus.sock");
  }

  async start() {
    this.server = net.createServer((socket) => this.accept(socket));
    await new Promise((resolve, reject) => {
      this.server.once("error", reject);
      this.server.listen(this.path, resolve);
    });
    return this;
  }

  /** Stops listening and drops every connection, as a daemon that exits. */
  async stop() {
    for (const c of this.conns) c.destroy();
    this.conns = [];
    await new Promise((resolve) => this.server.close(() => resolve()));
  }

  async dispose() {
    await this.stop().catch(() => {});
    rmSync(this.dir, { recursive: true, force: true });
  }

  get conn() {
    return this.conns[this.conns.length - 1];
  }

  accept(socket) {
    const conn = new FakeConn(socket, this);
    this.conns.push(conn);
    const reader = new FrameReader();
    socket.on("error", () => {});
    socket.on("data", (chunk) => {
      for (const body of reader.push(chunk)) {
        let req;
        try {
          req = decodeRequest(body);
        } catch (e) {
          conn.error(e.requestId, e.code, e.message, e.details);
          continue;
        }
        const entry = { conn, op: req.op, id: req.id, fields: req.fields };
        conn.requests.push(entry);
        this.requests.push(entry);
        this.answer(conn, req);
        this.check();
      }
    });
  }

  answer(conn, req) {
    const h = this.handlers[req.op];
    if (h !== undefined && h(req, conn) !== false) return;
    const f = req.fields;
    switch (req.op) {
      case "hello":
        conn.hello = f;
        conn.ok(req.id, { protocol: 1, server: "sidebus/fake", node: "fake-node", max_frame_bytes: 1 << 20 });
        break;
      case "publish":
        conn.ok(req.id, { event_id: f.event_id ?? `gen-${req.id}`, status: f.durability === "committed" ? "committed" : "spooled" });
        break;
      case "subscribe":
        conn.ok(req.id, { sub: conn.nextSub++ });
        break;
      default:
        if (req.id !== undefined) conn.ok(req.id);
    }
  }

  /** Resolves once `pred(requests)` holds. */
  until(pred, what = "the expected requests", timeoutMs = 3000) {
    if (pred(this.requests)) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const w = { pred, resolve };
      w.timer = setTimeout(() => {
        this.waiters = this.waiters.filter((x) => x !== w);
        reject(new Error(`timed out waiting for ${what}; got ${this.requests.map((r) => r.op).join(",")}`));
      }, timeoutMs);
      this.waiters.push(w);
    });
  }

  check() {
    for (const w of [...this.waiters]) {
      if (w.pred(this.requests)) {
        clearTimeout(w.timer);
        this.waiters = this.waiters.filter((x) => x !== w);
        w.resolve();
      }
    }
  }

  ops(op) {
    return this.requests.filter((r) => r.op === op);
  }
}

/** A logger that keeps what the client logged, for assertions. */
export function memoryLogger() {
  const lines = [];
  return {
    lines,
    debug: (m) => lines.push(`debug ${m}`),
    warn: (m) => lines.push(`warn ${m}`),
    error: (m) => lines.push(`error ${m}`),
  };
}
