// The Client: connects with `hello`, publishes (pipelined), subscribes, makes the admin calls,
// reconnects with backoff after the connection breaks, and closes gracefully.

import type { Frame } from "./codec.js";
import { Connection, type ConnectionOwner, type OkHook } from "./connection.js";
import { ClientClosedError, TimeoutError } from "./errors.js";
import { Subscription, type Handler, type SubscriptionOwner } from "./subscription.js";
import type {
  ConnectOptions,
  Count,
  DlqEntries,
  DlqListArgs,
  DlqPurgeArgs,
  DlqRedriveArgs,
  Logger,
  PublishOptions,
  PublishResult,
  RegisterSchemaOptions,
  ReplayArgs,
  ReplayList,
  ReplayStarted,
  SchemaInfo,
  SchemaList,
  SchemaRegistered,
  ServerInfo,
  Stats,
  SubscribeOptions,
} from "./types.js";

/** The protocol version this client speaks. */
export const PROTOCOL_VERSION = 1;

/** The socket used when none is given: `$SIDEBUS_SOCKET`, else the daemon's default. */
export function defaultSocketPath(): string {
  return process.env.SIDEBUS_SOCKET || "/run/sidebus/sidebus.sock";
}

const DEFAULT_LOGGER: Logger = {
  debug: () => {},
  warn: (m) => console.warn(`sidebus: ${m}`),
  error: (m) => console.error(`sidebus: ${m}`),
};

type State = "open" | "closing" | "closed";

interface ConnWaiter {
  run(conn: Connection): void;
  fail(error: Error): void;
  timer: NodeJS.Timeout;
}

/** Fields of an `ok` reply without `op` and `id`. */
function fieldsOf<T>(reply: Frame): T {
  const { op: _op, id: _id, ...rest } = reply;
  return rest as T;
}

function publishResult(reply: Frame): PublishResult {
  return { eventId: reply.event_id as string, status: reply.status as PublishResult["status"], duplicate: reply.duplicate === true };
}

function rfc3339(t: string | Date | undefined): string | undefined {
  return t instanceof Date ? t.toISOString() : t;
}

/**
 * A connection to the sidebus daemon that heals itself. Create one with `Client.connect`.
 *
 * Requests are pipelined: every call writes its request at once and returns a promise of its
 * reply, so `Promise.all(events.map((e) => client.publish(type, e)))` keeps many in flight.
 * When the connection breaks, requests in flight fail with `ConnectionLostError`, the client
 * reconnects with backoff and subscribes again, and requests made meanwhile wait for it.
 */
export class Client {
  readonly logger: Logger;
  /** The socket path. */
  readonly socket: string;
  /** The name sent in `hello`. */
  readonly name: string | undefined;
  private conn: Connection | undefined;
  private state: State = "open";
  private idCounter = 0;
  private readonly subs = new Set<Subscription<unknown>>();
  private connWaiters: ConnWaiter[] = [];
  private readonly reconnectTimeoutMs: number;
  private readonly initialBackoffMs: number;
  private readonly maxBackoffMs: number;
  private readonly maxQueuedBytes: number;
  private reconnecting = false;
  private wakeReconnect: (() => void) | undefined;
  private closing: Promise<void> | undefined;
  private info: ServerInfo | undefined;
  /** What connections and subscriptions call back into; kept off the public surface. */
  private readonly owner: ConnectionOwner & SubscriptionOwner;

  private constructor(private readonly opts: ConnectOptions) {
    this.socket = opts.socket ?? defaultSocketPath();
    this.name = opts.name;
    this.logger = { ...DEFAULT_LOGGER, ...opts.logger };
    this.reconnectTimeoutMs = opts.reconnectTimeoutMs ?? 30_000;
    this.initialBackoffMs = opts.backoff?.initialMs ?? 50;
    this.maxBackoffMs = opts.backoff?.maxMs ?? 2_000;
    this.maxQueuedBytes = opts.maxQueuedBytes ?? 4 << 20;
    this.owner = {
      logger: this.logger,
      nextId: () => ++this.idCounter,
      onPush: (conn, frame) => this.onPush(conn, frame),
      onBroken: (conn, error) => this.onBroken(conn, error),
      forget: (sub) => this.subs.delete(sub),
      retryDelayMs: (attempt) => this.retryDelayMs(attempt),
    };
  }

  /**
   * Connects to the daemon and says `hello` (checking the protocol version and naming the
   * client). Rejects if the daemon cannot be reached now; once connected, the client
   * reconnects on its own.
   */
  static async connect(opts: ConnectOptions = {}): Promise<Client> {
    const client = new Client(opts);
    const conn = await client.open();
    client.adopt(conn);
    return client;
  }

  /** What the daemon said in its last `hello` reply (`server`, `node`, `max_frame_bytes`). */
  get server(): ServerInfo {
    return this.info!;
  }

  /** Whether the client has a live connection now. */
  get connected(): boolean {
    return this.conn !== undefined && !this.conn.broken;
  }

  // ---- callbacks of connections and subscriptions ----

  private onPush(conn: Connection, frame: Frame): void {
    if (frame.op !== "deliver") return; // PROTOCOL.md: ignore pushes whose op is unknown.
    for (const s of this.subs) {
      if (s.wireSub === frame.sub) {
        s.receive(conn, frame);
        return;
      }
    }
    this.logger.debug(`a delivery for subscription ${String(frame.sub)}, which has ended`);
  }

  private onBroken(conn: Connection, error: Error): void {
    if (conn !== this.conn) return;
    this.conn = undefined;
    for (const s of this.subs) s.connectionLost(conn);
    if (this.state !== "open") return;
    this.logger.warn(`lost the connection to ${this.socket} (${error.message}); reconnecting`);
    try {
      this.opts.onDisconnect?.(error);
    } catch (e) {
      this.logger.error(`onDisconnect threw: ${(e as Error).message}`);
    }
    void this.reconnect();
  }

  /** Exponential backoff with ±20 % jitter. */
  private retryDelayMs(attempt: number): number {
    const base = Math.min(this.maxBackoffMs, this.initialBackoffMs * 2 ** Math.min(attempt, 30));
    return Math.round(base * (0.8 + 0.4 * Math.random()));
  }

  // ---- connecting ----

  private async open(): Promise<Connection> {
    const conn = await Connection.open(this.socket, this.owner, this.maxQueuedBytes);
    try {
      const reply = await conn.request("hello", { protocol: PROTOCOL_VERSION, client: this.name });
      this.info = fieldsOf<ServerInfo>(reply);
      if (typeof this.info.max_frame_bytes === "number") conn.maxFrameBytes = this.info.max_frame_bytes;
      return conn;
    } catch (e) {
      conn.destroy(e as Error);
      throw e;
    }
  }

  private adopt(conn: Connection): void {
    this.conn = conn;
    for (const s of this.subs) s.renew(conn);
    const waiters = this.connWaiters;
    this.connWaiters = [];
    for (const w of waiters) {
      clearTimeout(w.timer);
      w.run(conn);
    }
  }

  private async reconnect(): Promise<void> {
    if (this.reconnecting) return;
    this.reconnecting = true;
    try {
      for (let attempt = 0; this.state === "open"; attempt++) {
        await new Promise<void>((resolve) => {
          const t = setTimeout(resolve, this.retryDelayMs(attempt));
          this.wakeReconnect = () => {
            clearTimeout(t);
            resolve();
          };
        });
        this.wakeReconnect = undefined;
        if (this.state !== "open") return;
        let conn: Connection;
        try {
          conn = await this.open();
        } catch (e) {
          this.logger.debug(`reconnecting to ${this.socket} failed: ${(e as Error).message}`);
          continue;
        }
        if (this.state !== "open") {
          conn.destroy(new ClientClosedError());
          return;
        }
        this.logger.warn(`reconnected to ${this.socket}`);
        this.adopt(conn);
        try {
          this.opts.onReconnect?.();
        } catch (e) {
          this.logger.error(`onReconnect threw: ${(e as Error).message}`);
        }
        return;
      }
    } finally {
      this.reconnecting = false;
    }
  }

  /**
   * Sends a request on the live connection, or once the client has reconnected (waiting up to
   * `reconnectTimeoutMs`). Synchronous when connected, so calls are written in call order.
   */
  private call(op: string, fields: Frame, onOk?: OkHook): Promise<Frame> {
    if (this.state === "closed") return Promise.reject(new ClientClosedError());
    const conn = this.conn;
    if (conn !== undefined && !conn.broken) return conn.request(op, fields, onOk);
    if (this.state !== "open") return Promise.reject(new ClientClosedError());
    return new Promise((resolve, reject) => {
      const w: ConnWaiter = {
        run: (c) => c.request(op, fields, onOk).then(resolve, reject),
        fail: reject,
        timer: setTimeout(() => {
          this.connWaiters = this.connWaiters.filter((x) => x !== w);
          reject(new TimeoutError(`no connection to the daemon at ${this.socket} for ${this.reconnectTimeoutMs} ms`));
        }, this.reconnectTimeoutMs),
      };
      this.connWaiters.push(w);
    });
  }

  // ---- publishing ----

  /**
   * Publishes `data` as an event of `type`. Resolves with the event id and status once the
   * daemon has it (`spooled` by default; `committed` with `durability: "committed"`).
   */
  publish(type: string, data: unknown, opts: PublishOptions = {}): Promise<PublishResult> {
    // Promise callbacks rather than an async function: many publishes are in flight at once.
    let fields: Frame;
    try {
      fields = {
        type,
        data: data === undefined ? null : data,
        event_id: opts.eventId,
        version: opts.version,
        source: opts.source,
        correlationid: opts.correlationId,
        partitionkey: opts.partitionKey,
        traceparent: opts.traceparent,
        durability: opts.durability,
        deliver_at: rfc3339(opts.deliverAt),
        delay_ms: opts.delayMs,
      };
    } catch (e) {
      return Promise.reject(e);
    }
    return this.call("publish", fields).then(publishResult);
  }

  /** A round trip to the daemon. */
  async ping(): Promise<void> {
    await this.call("ping", {});
  }

  // ---- subscribing ----

  /** Subscribes and runs `handler` on every delivery (resolve = ack, throw = nack). */
  subscribe<T = unknown>(type: string, group: string, handler: Handler<T>): Promise<Subscription<T>>;
  /** Subscribes with options and runs `handler` on every delivery (resolve = ack, throw = nack). */
  subscribe<T = unknown>(type: string, group: string, opts: SubscribeOptions, handler: Handler<T>): Promise<Subscription<T>>;
  /** Subscribes; iterate the subscription and end each delivery yourself. */
  subscribe<T = unknown>(type: string, group: string, opts?: SubscribeOptions): Promise<Subscription<T>>;
  async subscribe<T = unknown>(
    type: string,
    group: string,
    optsOrHandler?: SubscribeOptions | Handler<T>,
    maybeHandler?: Handler<T>,
  ): Promise<Subscription<T>> {
    const opts = typeof optsOrHandler === "function" ? {} : (optsOrHandler ?? {});
    const handler = typeof optsOrHandler === "function" ? optsOrHandler : maybeHandler;
    if (this.state !== "open") throw new ClientClosedError();
    const sub = new Subscription<T>(this.owner, type, group, { ...opts }, handler);
    const anySub = sub as Subscription<unknown>;
    // Registered from the reply itself, before any later frame (its first deliveries) is read.
    await this.call("subscribe", sub.wireFields(), (reply, conn) => {
      sub.attach(conn, reply.sub as number);
      this.subs.add(anySub);
    });
    if (this.state !== "open") {
      // Closed while subscribing: end it at once.
      await sub.unsubscribe();
      throw new ClientClosedError();
    }
    return sub;
  }

  // ---- admin ----

  /** The daemon's counters, spool and groups. */
  async stats(): Promise<Stats> {
    return fieldsOf<Stats>(await this.call("stats", {}));
  }

  /** Registers `schema` (a JSON Schema) as the next version of `type`'s schema. */
  async registerSchema(type: string, schema: Record<string, unknown> | boolean, opts: RegisterSchemaOptions = {}): Promise<SchemaRegistered> {
    const reply = await this.call("register_schema", {
      type,
      schema,
      compatibility: opts.compatibility,
      strict: opts.strict,
      dry_run: opts.dryRun,
    });
    return fieldsOf<SchemaRegistered>(reply);
  }

  /** A version of `type`'s schema (default: the latest). */
  async getSchema(type: string, version?: number): Promise<SchemaInfo> {
    return fieldsOf<SchemaInfo>(await this.call("get_schema", { type, version }));
  }

  /** Every type with a schema. */
  async listSchemas(): Promise<SchemaList> {
    return fieldsOf<SchemaList>(await this.call("list_schemas", {}));
  }

  /** Replays the events of a type logged in `[since, until)` to one group. */
  async replay(args: ReplayArgs): Promise<ReplayStarted> {
    const reply = await this.call("replay", { type: args.type, group: args.group, since: rfc3339(args.since), until: rfc3339(args.until) });
    return fieldsOf<ReplayStarted>(reply);
  }

  /** Stops a running replay. */
  async replayCancel(replay: string): Promise<void> {
    await this.call("replay_cancel", { replay });
  }

  /** Running replays (with `all`, also those that ended in the last day). */
  async replays(opts: { all?: boolean } = {}): Promise<ReplayList> {
    return fieldsOf<ReplayList>(await this.call("replays", { all: opts.all }));
  }

  /** A page of a group's dead letters, oldest first; pass `next` as `after` for the next page. */
  async dlqList(args: DlqListArgs): Promise<DlqEntries> {
    const reply = await this.call("dlq_list", { type: args.type, group: args.group, limit: args.limit, after: args.after, ids: args.ids });
    return fieldsOf<DlqEntries>(reply);
  }

  /** Puts dead letters back in front of the group's consumers (attempt 1); how many. */
  async dlqRedrive(args: DlqRedriveArgs): Promise<Count> {
    return fieldsOf<Count>(await this.call("dlq_redrive", { type: args.type, group: args.group, ids: args.ids, rate: args.rate }));
  }

  /** Discards dead letters; how many. */
  async dlqPurge(args: DlqPurgeArgs): Promise<Count> {
    return fieldsOf<Count>(await this.call("dlq_purge", { type: args.type, group: args.group, ids: args.ids }));
  }

  /**
   * Sends any request and resolves with the fields of its `ok` reply: for ops newer than this
   * client. `fields` use the protocol's names.
   */
  async request(op: string, fields: Record<string, unknown> = {}): Promise<Record<string, unknown>> {
    return fieldsOf<Record<string, unknown>>(await this.call(op, fields));
  }

  // ---- closing ----

  /**
   * Closes gracefully: stops taking deliveries, lets running handlers finish (and deliveries an
   * iterator handed out be acked or nacked), unsubscribes, waits for the replies still due,
   * then closes the connection. Stops reconnecting. After `timeoutMs` (default 30000) it closes
   * the connection anyway and rejects with `TimeoutError`. Calling it again returns the same
   * promise.
   */
  close(opts: { timeoutMs?: number } = {}): Promise<void> {
    this.closing ??= this.shutdown(opts.timeoutMs ?? 30_000);
    return this.closing;
  }

  private async shutdown(timeoutMs: number): Promise<void> {
    this.state = "closing";
    this.wakeReconnect?.();
    for (const w of this.connWaiters.splice(0)) {
      clearTimeout(w.timer);
      w.fail(new ClientClosedError());
    }
    const subs = [...this.subs];
    for (const s of subs) s.stopTaking();
    let timer: NodeJS.Timeout | undefined;
    const expired = new Promise<"timeout">((resolve) => {
      timer = setTimeout(() => resolve("timeout"), timeoutMs);
    });
    const graceful = async (): Promise<void> => {
      await Promise.all(subs.map((s) => s.drained(true)));
      await Promise.all(subs.map((s) => s.finish()));
      const conn = this.conn;
      if (conn !== undefined && !conn.broken) {
        await conn.idle();
        await conn.end();
      }
    };
    const outcome = await Promise.race([graceful().then(() => "done" as const), expired]);
    clearTimeout(timer);
    this.state = "closed";
    const conn = this.conn;
    this.conn = undefined;
    conn?.destroy(new ClientClosedError());
    for (const s of subs) s.fail(new ClientClosedError());
    if (outcome === "timeout") {
      throw new TimeoutError(`close() took longer than ${timeoutMs} ms; the connection was closed anyway`);
    }
  }
}
