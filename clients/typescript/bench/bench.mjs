// The TypeScript client's benchmark: subscribes a fresh group, publishes N events pipelined
// (up to 1,000 in flight, durability local) and consumes them with a handler that just returns.
// Usage: node bench/bench.mjs --socket PATH --count N [--max-in-flight M]
// Prints one JSON line: {"client", "count", "publish_per_s", "consume_per_s", ...}.

import { parseArgs } from "node:util";
import { randomBytes } from "node:crypto";
import { Client } from "../dist/index.js";

const { values: args } = parseArgs({
  options: {
    socket: { type: "string", default: process.env.SIDEBUS_SOCKET ?? "/run/sidebus/sidebus.sock" },
    count: { type: "string", default: "10000" },
    "max-in-flight": { type: "string", default: "1024" },
    window: { type: "string", default: "1000" },
  },
});
const count = Number(args.count);
const window = Number(args.window);
const maxInFlight = Number(args["max-in-flight"]);
const run = randomBytes(4).toString("hex");
const type = `bench.typescript.${run}`;
const pad = "x".repeat(200);

const consumer = await Client.connect({ socket: args.socket, name: "bench-consumer" });
const publisher = await Client.connect({ socket: args.socket, name: "bench-publisher" });

let consumed = 0;
let firstDelivery = 0;
let lastDelivery = 0;
let allConsumed;
const consumedAll = new Promise((resolve) => (allConsumed = resolve));
// The group is new, so it exists before the first publish and receives every event.
await consumer.subscribe(type, `bench-${run}`, { maxInFlight }, () => {
  const now = performance.now();
  if (consumed === 0) firstDelivery = now;
  lastDelivery = now;
  if (++consumed === count) allConsumed();
});

// Publishes with a window of `window` in flight: each reply starts the next publish.
const cpuStart = process.cpuUsage();
const started = performance.now();
let next = 0;
let failed = 0;
await new Promise((resolve, reject) => {
  let done = 0;
  const startOne = () => {
    const i = next++;
    publisher.publish(type, { n: i, pad }, { durability: "local" }).then(
      () => {
        if (++done === count) resolve();
        else if (next < count) startOne();
      },
      (e) => {
        failed++;
        reject(e);
      },
    );
  };
  for (let k = 0; k < Math.min(window, count); k++) startOne();
});
const published = performance.now();

const timeout = setTimeout(() => {
  console.error(`only ${consumed} of ${count} consumed after 120 s`);
  process.exit(1);
}, 120_000);
await consumedAll;
clearTimeout(timeout);
const consumedAt = performance.now();
// This process's CPU time per event (publish, its reply, the delivery, its ack and the ack's
// reply): what the client costs, apart from the daemon.
const cpu = process.cpuUsage(cpuStart);

const result = {
  client: "typescript",
  count,
  publish_per_s: Math.round(count / ((published - started) / 1000)),
  consume_per_s: Math.round(count / ((lastDelivery - firstDelivery) / 1000)),
  end_to_end_s: Number(((consumedAt - started) / 1000).toFixed(3)),
  client_cpu_us_per_event: Number(((cpu.user + cpu.system) / count).toFixed(1)),
  max_in_flight: maxInFlight,
  publish_window: window,
  failed,
};
await Promise.all([publisher.close(), consumer.close()]);
console.log(JSON.stringify(result));
