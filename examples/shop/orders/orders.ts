// The shop's orders service: publishes a handful of `order.created` events, one of them with an
// email that is not an address (the notifications service dead-letters it), and exits.
import { Client, SidebusError } from "@sidebus/client";

interface OrderCreated {
  orderId: string;
  amount: number;
  currency: string;
  email: string;
}

const orders: OrderCreated[] = [
  { orderId: "o-1", amount: 42.5, currency: "EUR", email: "ada@example.com" },
  { orderId: "o-2", amount: 19.99, currency: "EUR", email: "grace@example.com" },
  { orderId: "o-3", amount: 7, currency: "USD", email: "not-an-email" },
  { orderId: "o-4", amount: 120, currency: "GBP", email: "alan@example.com" },
  { orderId: "o-5", amount: 3.5, currency: "EUR", email: "edsger@example.com" },
];

// The socket comes from SIDEBUS_SOCKET (else the daemon's default path); the name becomes the
// events' `source`.
const client = await Client.connect({ name: "orders" });
try {
  // All five publishes are in flight at once; `committed` resolves once the daemon's log and
  // Redis hold the event, so nothing is lost when this process exits right after.
  const published = await Promise.all(
    orders.map((order) => client.publish("order.created", order, { durability: "committed" })),
  );
  published.forEach((r, i) => {
    const o = orders[i]!;
    console.log(`orders: published order.created ${o.orderId} (${o.amount} ${o.currency}, ${o.email}) as ${r.eventId}, ${r.status}`);
  });
} catch (e) {
  if (!(e instanceof SidebusError)) throw e;
  // The code is the contract: e.g. `unavailable` means the backends did not confirm in time
  // (the event is spooled and will be stored), `validation_failed` lists each violation.
  console.error(`orders: publishing failed with ${e.code}: ${e.message}`, e.details);
  process.exitCode = 1;
} finally {
  await client.close();
}
