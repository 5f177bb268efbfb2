// The TypeScript client's conformance runner: reads scenarios from clients/conformance/run.py as
// JSON lines on stdin, runs their steps through the client's public API (../dist/index.js), and
// writes what it observed as JSON lines on stdout. Logs go to stderr only.

import { createInterface } from "node:readline";
import { setTimeout as sleep } from "node:timers/promises";
import { Client, SidebusError } from "../dist/index.js";

const SOCKETS = { main: process.env.SIDEBUS_SOCKET, degraded: process.env.SIDEBUS_DEGRADED_SOCKET };

const logger = {
  debug: () => {},
  warn: (m) => process.stderr.write(`[client] ${m}\n`),
  error: (m) => process.stderr.write(`[client] ERROR ${m}\n`),
};

// ---- JSON lines in and out ----

const lines = [];
let lineWaiter = null;
let stdinEnded = false;
const rl = createInterface({ input: process.stdin, crlfDelay: Infinity });
rl.on("line", (line) => {
  if (line.trim() === "") return;
  lines.push(line);
  lineWaiter?.();
});
rl.on("close", () => {
  stdinEnded = true;
  lineWaiter?.();
});

async function nextLine() {
  while (lines.length === 0) {
    if (stdinEnded) return null;
    await new Promise((resolve) => (lineWaiter = resolve));
    lineWaiter = null;
  }
  return lines.shift();
}

function write(obj) {
  process.stdout.write(JSON.stringify(toJson(obj)) + "\n");
}

// ---- values: {"$bin"} and {"$int"} (the conformance README's forms) ----

function fromJson(v) {
  if (Array.isArray(v)) return v.map(fromJson);
  if (v !== null && typeof v === "object") {
    const keys = Object.keys(v);
    if (keys.length === 1 && keys[0] === "$bin") return new Uint8Array(Buffer.from(v.$bin, "base64"));
    if (keys.length === 1 && keys[0] === "$int") return BigInt(v.$int);
    return Object.fromEntries(keys.map((k) => [k, fromJson(v[k])]));
  }
  return v;
}

function toJson(v) {
  if (typeof v === "bigint") return { $int: v.toString() };
  if (typeof v === "number" && Number.isInteger(v) && !Number.isSafeInteger(v)) return { $int: BigInt(v).toString() };
  if (ArrayBuffer.isView(v)) return { $bin: Buffer.from(v.buffer, v.byteOffset, v.byteLength).toString("base64") };
  if (Array.isArray(v)) return v.map(toJson);
  if (v instanceof Date) return v.toISOString();
  if (v !== null && typeof v === "object") return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, toJson(x)]));
  return v;
}

function errorRecord(e) {
  if (e instanceof SidebusError) return { error: { code: e.code, message: e.message, details: e.details } };
  throw e;
}

// ---- one scenario ----

function publishOptions(o = {}) {
  return {
    eventId: o.event_id,
    durability: o.durability,
    delayMs: o.delay_ms,
    deliverAt: o.deliver_at,
    partitionKey: o.partitionkey,
    traceparent: o.traceparent,
    correlationId: o.correlationid,
    version: o.version,
    source: o.source,
  };
}

async function callAdmin(client, op, a) {
  switch (op) {
    case "stats":
      return client.stats();
    case "register_schema":
      return client.registerSchema(a.type, a.schema, { compatibility: a.compatibility, strict: a.strict, dryRun: a.dry_run });
    case "get_schema":
      return client.getSchema(a.type, a.version);
    case "list_schemas":
      return client.listSchemas();
    case "replay":
      return client.replay({ type: a.type, group: a.group, since: a.since, until: a.until });
    case "replay_cancel":
      await client.replayCancel(a.replay);
      return {};
    case "replays":
      return client.replays({ all: a.all });
    case "dlq_list":
      return client.dlqList(a);
    case "dlq_redrive":
      return client.dlqRedrive(a);
    case "dlq_purge":
      return client.dlqPurge(a);
    default:
      throw new Error(`unknown admin op ${op}`);
  }
}

function makeHandler(rec, h = {}) {
  const failAttempts = h.fail_attempts ?? 0;
  const error = h.error ?? "handler failed";
  return async (d) => {
    rec.deliveries.push({ attempt: d.attempt, event: d.event });
    rec.running++;
    rec.max_concurrent = Math.max(rec.max_concurrent, rec.running);
    try {
      if (h.sleep_ms) {
        const until = Date.now() + h.sleep_ms;
        if (h.extend_every_ms) {
          while (Date.now() < until) {
            await sleep(Math.min(h.extend_every_ms, until - Date.now()));
            if (Date.now() < until) await d.extend();
          }
        } else {
          await sleep(h.sleep_ms);
        }
      }
      if (d.attempt <= failAttempts) {
        if (h.dead) {
          await d.nack({ error, dead: true });
          return;
        }
        if (h.nack_delay_ms !== undefined) {
          await d.nack({ error, delayMs: h.nack_delay_ms });
          return;
        }
        throw new Error(error);
      }
    } finally {
      rec.running--;
    }
  };
}

async function runScenario(sc) {
  const clients = new Map();
  const subs = new Map();
  const records = {};
  const client = (name) => {
    const c = clients.get(name);
    if (c === undefined) throw new Error(`no client ${name}`);
    return c;
  };
  const subsOf = (names) => (Array.isArray(names) ? names : [names]).map((n) => {
    const s = subs.get(n);
    if (s === undefined) throw new Error(`no subscription ${n}`);
    return s;
  });

  let failure = null;
  try {
    for (const step of sc.steps) {
      switch (step.do) {
        case "connect": {
          const socket = SOCKETS[step.socket ?? "main"];
          clients.set(step.client, await Client.connect({ socket, name: step.name, logger }));
          break;
        }
        case "publish": {
          let r;
          try {
            r = await client(step.client).publish(step.type, fromJson(step.data), publishOptions(step.opts));
            r = { event_id: r.eventId, status: r.status, duplicate: r.duplicate };
          } catch (e) {
            r = errorRecord(e);
          }
          if (step.record) records[step.record] = r;
          break;
        }
        case "publish_many": {
          const c = client(step.client);
          const pad = step.pad_bytes ? "x".repeat(step.pad_bytes) : undefined;
          // Every publish is started before any is awaited; each promise gets its handler at
          // once (an error answered before its turn to be awaited is not an unhandled rejection).
          const promises = [];
          for (let i = 0; i < step.count; i++) {
            const data = pad === undefined ? { n: i } : { n: i, pad };
            promises.push(c.publish(step.type, data, { durability: step.durability }).then((r) => ({ r }), (e) => ({ e })));
          }
          const out = { ids: [], statuses: {}, errors: {} };
          for (const p of promises) {
            const { r, e } = await p;
            if (r !== undefined) {
              out.ids.push(r.eventId);
              out.statuses[r.status] = (out.statuses[r.status] ?? 0) + 1;
            } else {
              const code = errorRecord(e).error.code;
              out.errors[code] = (out.errors[code] ?? 0) + 1;
            }
          }
          if (step.record) records[step.record] = out;
          break;
        }
        case "subscribe": {
          const rec = { deliveries: [], max_concurrent: 0, running: 0 };
          const o = step.opts ?? {};
          const opts = { maxInFlight: o.max_in_flight, maxAttempts: o.max_attempts, ackTimeoutMs: o.ack_timeout_ms };
          rec.sub = await client(step.client).subscribe(step.type, step.group, opts, makeHandler(rec, step.handler));
          subs.set(step.sub, rec);
          break;
        }
        case "wait": {
          const recs = subsOf(step.sub);
          const deadline = Date.now() + (step.timeout_ms ?? 10000);
          const reached = () => {
            const all = recs.flatMap((r) => r.deliveries);
            return step.distinct !== undefined
              ? new Set(all.map((d) => d.event.id)).size >= step.distinct
              : all.length >= (step.deliveries ?? 0);
          };
          while (!reached() && Date.now() < deadline) await sleep(20);
          break;
        }
        case "count":
          records[step.record] = { deliveries: subsOf(step.sub)[0].deliveries.length };
          break;
        case "sleep":
          await sleep(step.ms);
          break;
        case "unsubscribe":
          await subsOf(step.sub)[0].sub.unsubscribe();
          break;
        case "call": {
          let r;
          try {
            r = await callAdmin(client(step.client), step.op, fromJson(step.args ?? {}));
          } catch (e) {
            r = errorRecord(e);
          }
          if (step.record) records[step.record] = r;
          break;
        }
        case "close":
          await client(step.client).close();
          break;
        case "restart_daemon": {
          write({ control: "restart_daemon" });
          for (;;) {
            const line = await nextLine();
            if (line === null) throw new Error("stdin ended during restart_daemon");
            if (JSON.parse(line).control === "done") break;
          }
          break;
        }
        default:
          throw new Error(`unknown step ${step.do}`);
      }
    }
  } catch (e) {
    failure = e;
  }
  for (const c of clients.values()) {
    await c.close().catch((e) => logger.warn(`close: ${e.message}`));
  }
  if (failure !== null) {
    process.stderr.write(`scenario ${sc.scenario} failed: ${failure.stack ?? failure}\n`);
    return { scenario: sc.scenario, error: String(failure.message ?? failure) };
  }
  const observed = { records, subs: {} };
  for (const [name, rec] of subs) observed.subs[name] = { deliveries: rec.deliveries, max_concurrent: rec.max_concurrent };
  return { scenario: sc.scenario, observed };
}

for (;;) {
  const line = await nextLine();
  if (line === null) break;
  const msg = JSON.parse(line);
  if (msg.scenario === undefined) continue;
  process.stderr.write(`---- ${msg.scenario}\n`);
  write(await runScenario(msg));
}
process.exit(0);
