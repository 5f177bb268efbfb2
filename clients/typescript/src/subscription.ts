// Subscriptions and deliveries: the handler form (resolve = ack, throw = nack), the async
// iterator form with explicit ack/nack/extend, and how both live through a reconnection.

import type { Frame } from "./codec.js";
import type { Connection } from "./connection.js";
import { ConnectionLostError, SidebusError } from "./errors.js";
import type { Logger, NackOptions, SidebusEvent, SubscribeOptions } from "./types.js";

/** A handler: resolving acks the delivery, throwing nacks it with the error's message. */
export type Handler<T = unknown> = (delivery: Delivery<T>) => unknown;

/** What a subscription asks of its client. */
export interface SubscriptionOwner {
  readonly logger: Logger;
  /** Forgets an ended subscription (it is no longer renewed after a reconnection). */
  forget(sub: Subscription<unknown>): void;
  /** A delay for renewing a subscription the daemon could not take yet. */
  retryDelayMs(attempt: number): number;
}

type State = "active" | "closing" | "closed";

function isThenable(v: unknown): v is PromiseLike<unknown> {
  return (typeof v === "object" || typeof v === "function") && v !== null && typeof (v as PromiseLike<unknown>).then === "function";
}

/** The text a nack carries for what a handler threw. */
function messageOf(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/**
 * One delivery of an event to this consumer. End it with `ack()` or `nack()`, or prolong its
 * lease with `extend()`; one left alone is delivered again after the subscription's ack timeout.
 */
export class Delivery<T = unknown> {
  /** The delivery's tag on its connection. */
  readonly tag: number;
  /** 1 on the first delivery of the event to this group; n+1 after n failed attempts. */
  readonly attempt: number;
  /** The event, with CloudEvents attribute names. */
  readonly event: SidebusEvent<T>;
  private ended: Promise<void> | undefined;

  /** @internal */
  constructor(
    readonly subscription: Subscription<T>,
    private readonly conn: Connection,
    frame: Frame,
  ) {
    this.tag = frame.tag as number;
    this.attempt = frame.attempt as number;
    this.event = frame.event as SidebusEvent<T>;
  }

  /** The event's `data`. */
  get data(): T {
    return this.event.data;
  }

  /** Whether `ack` or `nack` was called. */
  get settled(): boolean {
    return this.ended !== undefined;
  }

  /** Acknowledges the delivery; resolves once the daemon holds the outcome. */
  ack(): Promise<void> {
    this.ended ??= this.end("ack", { tag: this.tag });
    return this.ended;
  }

  /**
   * Reports a failure: the daemon retries after its backoff (or `delayMs`), or with `dead`
   * moves the event to the dead-letter queue at once.
   */
  nack(opts: NackOptions = {}): Promise<void> {
    this.ended ??= this.end("nack", { tag: this.tag, error: opts.error, delay_ms: opts.delayMs, dead: opts.dead || undefined });
    return this.ended;
  }

  /** Restarts the delivery's lease: still working on it. */
  extend(): Promise<void> {
    if (this.ended !== undefined) return Promise.resolve();
    return this.end("extend", { tag: this.tag });
  }

  // A delivery belongs to the connection it came on: after that connection broke, the daemon has
  // already released it (it comes again on a new connection), so its outcome is dropped silently.
  // (Promise callbacks rather than an async function: this runs once per event consumed.)
  private end(op: string, fields: Frame): Promise<void> {
    if (this.conn.broken) {
      this.subscription.logger.debug(`${op} of tag ${this.tag} dropped: its connection is gone`);
      if (op !== "extend") this.subscription.settledOne(this as Delivery<T>);
      return Promise.resolve();
    }
    return this.conn.request(op, fields).then(
      () => {
        if (op !== "extend") this.subscription.settledOne(this as Delivery<T>);
      },
      (e: unknown) => {
        if (op !== "extend") this.subscription.settledOne(this as Delivery<T>);
        if (e instanceof ConnectionLostError) {
          this.subscription.logger.debug(`${op} of tag ${this.tag} dropped: its connection is gone`);
          return;
        }
        throw e;
      },
    );
  }
}

/**
 * A subscription to one type as a consumer of one group. With a handler it runs the handler on
 * every delivery; without one, iterate it: `for await (const d of sub) { ...; await d.ack() }`.
 * It survives reconnections: the client subscribes again with the same options.
 */
export class Subscription<T = unknown> implements AsyncIterableIterator<Delivery<T>> {
  /** The subscription's number on its current connection (`undefined` while disconnected). */
  wireSub: number | undefined;
  private conn: Connection | undefined;
  private state: State = "active";
  /** Deliveries handed to the handler or the iterator and not yet acked or nacked. */
  private readonly outstanding = new Set<Delivery<T>>();
  private readonly running = new Set<Promise<void>>();
  private readonly queue: Delivery<T>[] = [];
  private waiter: { resolve(r: IteratorResult<Delivery<T>>): void; reject(e: Error): void } | undefined;
  private failure: Error | undefined;
  private readonly doneResolvers: { resolve(): void; reject(e: Error): void };
  /** Settles when the subscription has ended: resolves after unsubscribe or close, rejects if it failed. */
  readonly done: Promise<void>;
  private drainWaiters: Array<() => void> = [];

  /** @internal */
  constructor(
    private readonly owner: SubscriptionOwner,
    readonly type: string,
    readonly group: string,
    readonly options: Readonly<SubscribeOptions>,
    private readonly handler: Handler<T> | undefined,
  ) {
    let resolvers!: { resolve(): void; reject(e: Error): void };
    this.done = new Promise<void>((resolve, reject) => {
      resolvers = { resolve, reject };
    });
    // Nobody has to listen to `done`: a failure is also logged and thrown by the iterator.
    this.done.catch(() => {});
    this.doneResolvers = resolvers;
  }

  /** @internal */
  get logger(): Logger {
    return this.owner.logger;
  }

  /** Whether the subscription still takes deliveries. */
  get active(): boolean {
    return this.state === "active";
  }

  /** @internal The subscribe request's fields. */
  wireFields(): Frame {
    return {
      type: this.type,
      group: this.group,
      max_in_flight: this.options.maxInFlight,
      max_attempts: this.options.maxAttempts,
      ack_timeout_ms: this.options.ackTimeoutMs,
    };
  }

  /** @internal The daemon answered `subscribe` on `conn` with `sub`. */
  attach(conn: Connection, sub: number): void {
    this.conn = conn;
    this.wireSub = sub;
    if (this.state !== "active") {
      // Ended while the subscribe was on its way: end it on the daemon too.
      conn.request("unsubscribe", { sub }).catch(() => {});
    }
  }

  /** @internal Subscribes again on a new connection, retrying while the daemon cannot take it yet. */
  renew(conn: Connection, attempt = 0): void {
    if (this.state !== "active" || conn.broken) return;
    conn.request("subscribe", this.wireFields(), (reply, c) => this.attach(c, reply.sub as number)).catch((e: Error) => {
      if (e instanceof ConnectionLostError || this.state !== "active") return;
      const code = e instanceof SidebusError ? e.code : "internal";
      if (code === "unavailable" || code === "backpressure" || code === "internal") {
        // Right after a restart the daemon's backends may still be connecting.
        const delay = this.owner.retryDelayMs(attempt);
        this.logger.warn(`subscribing again to ${this.type}/${this.group} failed (${code}); retrying in ${delay} ms`);
        setTimeout(() => this.renew(conn, attempt + 1), delay);
        return;
      }
      this.logger.error(`subscribing again to ${this.type}/${this.group} failed: ${e.message}; the subscription has ended`);
      this.fail(e);
    });
  }

  /** @internal A `deliver` push for this subscription. */
  receive(conn: Connection, frame: Frame): void {
    // Not taking deliveries any more: the unsubscribe that follows hands them back.
    if (this.state !== "active" || conn !== this.conn) return;
    const d = new Delivery<T>(this, conn, frame);
    this.outstanding.add(d);
    if (this.handler !== undefined) {
      this.run(d, this.handler);
    } else if (this.waiter !== undefined) {
      const w = this.waiter;
      this.waiter = undefined;
      w.resolve({ value: d, done: false });
    } else {
      this.queue.push(d);
    }
  }

  // Runs once per event consumed, so it is written with as few promises as it takes: a handler
  // that returns a value (not a promise) is acked at once; one that returns a promise is acked
  // when it resolves. Either way the ack's promise is in `running` until its reply is in.
  private run(d: Delivery<T>, handler: Handler<T>): void {
    let result: unknown;
    try {
      result = handler(d);
    } catch (e) {
      this.track(this.afterHandler(d, true, e));
      return;
    }
    if (isThenable(result)) {
      this.track(
        Promise.resolve(result).then(
          () => this.afterHandler(d, false, undefined),
          (e: unknown) => this.afterHandler(d, true, e),
        ),
      );
    } else {
      this.track(this.afterHandler(d, false, undefined));
    }
  }

  /** Acks or nacks after the handler, unless it ended the delivery itself. */
  private afterHandler(d: Delivery<T>, failed: boolean, failure: unknown): Promise<void> | undefined {
    if (d.settled) {
      if (failed) this.logger.warn(`the handler of ${d.event.id} (tag ${d.tag}) threw after ending the delivery: ${messageOf(failure)}`);
      return undefined;
    }
    const ended = failed ? d.nack({ error: messageOf(failure) }) : d.ack();
    return ended.then(undefined, (e: unknown) => this.endFailed(failed ? "nack" : "ack", d, e as Error));
  }

  private track(p: Promise<void> | undefined): void {
    if (p === undefined) return;
    this.running.add(p);
    const forget = (): void => {
      this.running.delete(p);
    };
    p.then(forget, forget);
  }

  private endFailed(what: string, d: Delivery<T>, e: Error): void {
    // An ack the daemon could not take (unavailable, or unknown_tag after the lease expired)
    // means the delivery comes again after its lease; nothing else is to be done here.
    this.logger.warn(`${what} of ${d.event.id} (tag ${d.tag}) failed: ${e.message}; the daemon will deliver it again`);
  }

  /** @internal A delivery was acked or nacked. */
  settledOne(d: Delivery<T>): void {
    this.outstanding.delete(d);
    if (this.outstanding.size === 0) this.wakeDrain();
  }

  private wakeDrain(): void {
    const ws = this.drainWaiters;
    this.drainWaiters = [];
    for (const w of ws) w();
  }

  /**
   * @internal The connection broke: what it delivered is the daemon's again, so queued
   * deliveries are dropped and those handed out no longer hold up a close (their ack or nack
   * will be dropped silently). Running handlers are left to finish.
   */
  connectionLost(conn: Connection): void {
    if (this.conn !== conn) return;
    this.conn = undefined;
    this.wireSub = undefined;
    this.queue.length = 0;
    this.outstanding.clear();
    this.wakeDrain();
  }

  /** @internal Stops taking deliveries; ends the iterator. */
  stopTaking(): void {
    if (this.state !== "active") return;
    this.state = "closing";
    for (const d of this.queue.splice(0)) this.outstanding.delete(d);
    this.wakeDrain();
    if (this.waiter !== undefined) {
      const w = this.waiter;
      this.waiter = undefined;
      w.resolve({ value: undefined, done: true });
    }
  }

  /** @internal Resolves when every delivery handed out has been acked or nacked (or dropped). */
  async drained(includeIterator: boolean): Promise<void> {
    await Promise.allSettled([...this.running]);
    if (!includeIterator || this.handler !== undefined) return;
    while (this.outstanding.size > 0 && this.conn !== undefined && !this.conn.broken) {
      await new Promise<void>((resolve) => this.drainWaiters.push(resolve));
    }
  }

  /** @internal Ends the subscription on the daemon (if connected) and marks it ended. */
  async finish(): Promise<void> {
    const conn = this.conn;
    const sub = this.wireSub;
    this.owner.forget(this as Subscription<unknown>);
    if (conn !== undefined && sub !== undefined && !conn.broken) {
      try {
        await conn.request("unsubscribe", { sub });
      } catch (e) {
        if (!(e instanceof ConnectionLostError)) this.logger.warn(`unsubscribe from ${this.type}/${this.group} failed: ${(e as Error).message}`);
      }
    }
    this.state = "closed";
    this.conn = undefined;
    this.wireSub = undefined;
    this.doneResolvers.resolve();
  }

  /** @internal Ends the subscription with an error (a renewal the daemon refused). */
  fail(error: Error): void {
    if (this.state === "closed") return;
    this.state = "closed";
    this.failure = error;
    this.owner.forget(this as Subscription<unknown>);
    this.queue.splice(0);
    if (this.waiter !== undefined) {
      const w = this.waiter;
      this.waiter = undefined;
      w.reject(error);
    }
    this.doneResolvers.reject(error);
  }

  /**
   * Ends the subscription: stops taking deliveries, lets running handlers finish, then
   * unsubscribes (the daemon hands back deliveries not yet acked, without counting an attempt).
   * Deliveries an iterator handed out and that were not acked are handed back too.
   */
  async unsubscribe(): Promise<void> {
    if (this.state !== "active") return this.done.catch(() => {});
    this.stopTaking();
    await this.drained(false);
    await this.finish();
  }

  // ---- the async iterator ----

  [Symbol.asyncIterator](): AsyncIterableIterator<Delivery<T>> {
    return this;
  }

  /** The next delivery; done once the subscription has ended. */
  next(): Promise<IteratorResult<Delivery<T>>> {
    if (this.handler !== undefined) {
      return Promise.reject(new TypeError("a subscription with a handler cannot also be iterated"));
    }
    const d = this.queue.shift();
    if (d !== undefined) return Promise.resolve({ value: d, done: false });
    if (this.failure !== undefined) return Promise.reject(this.failure);
    if (this.state !== "active") return Promise.resolve({ value: undefined, done: true });
    if (this.waiter !== undefined) return Promise.reject(new TypeError("next() called again before the previous one settled"));
    return new Promise((resolve, reject) => {
      this.waiter = { resolve, reject };
    });
  }

  /** Leaving a `for await` loop (break, return, throw) unsubscribes. */
  async return(): Promise<IteratorResult<Delivery<T>>> {
    await this.unsubscribe();
    return { value: undefined, done: true };
  }
}
