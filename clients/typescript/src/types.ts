// The public shapes of the client's options, events and replies. Reply types keep the protocol's
// field names (PROTOCOL.md) so that what a call returns reads exactly like the documentation.

/** Where the client logs what it cannot throw at anyone (error pushes, failed acks, reconnects). */
export interface Logger {
  debug(message: string): void;
  warn(message: string): void;
  error(message: string): void;
}

/** Options of `Client.connect`. */
export interface ConnectOptions {
  /** The daemon's socket. Default: `$SIDEBUS_SOCKET`, else `/run/sidebus/sidebus.sock`. */
  socket?: string;
  /** The service's name, sent in `hello`; the default `source` of its publishes. */
  name?: string;
  /** How long a request made while disconnected waits for the reconnection (default 30000). */
  reconnectTimeoutMs?: number;
  /** The reconnection backoff: first delay (default 50) and cap (default 2000), with jitter. */
  backoff?: { initialMs?: number; maxMs?: number };
  /** Bytes that may wait to be written before further requests wait their turn (default 4 MiB). */
  maxQueuedBytes?: number;
  /** Where to log (default: warnings and errors to stderr, no debug). */
  logger?: Partial<Logger>;
  /** Called when the connection breaks (the client then reconnects on its own). */
  onDisconnect?: (error: Error) => void;
  /** Called when the client has reconnected and said `hello` (subscriptions are being renewed). */
  onReconnect?: () => void;
}

/** Options of `publish`; each maps to the protocol field named in its comment. */
export interface PublishOptions {
  /** `event_id`: the event id and idempotency key (default: a UUIDv7 chosen by the daemon). */
  eventId?: string;
  /** `durability`: `local` (default, answered `spooled`) or `committed`. */
  durability?: "local" | "committed";
  /** `delay_ms`: deliver this long after the publish. */
  delayMs?: number;
  /** `deliver_at`: deliver from then on (RFC 3339 string or a Date). */
  deliverAt?: string | Date;
  /** `partitionkey`. */
  partitionKey?: string;
  /** `traceparent`: W3C trace context. */
  traceparent?: string;
  /** `version`: the schema version to validate against (default: the latest). */
  version?: number;
  /** `source` (default: the client's name). */
  source?: string;
  /** `correlationid` (default: the event id). */
  correlationId?: string;
}

/** The answer to a publish. */
export interface PublishResult {
  eventId: string;
  /** `spooled` (in the daemon's local spool) or `committed` (in the log and Redis). */
  status: "spooled" | "committed";
  /** True when the event id was already stored (nothing new was stored or delivered). */
  duplicate: boolean;
}

/** Options of `subscribe`; absent ones take the daemon's defaults. */
export interface SubscribeOptions {
  /** `max_in_flight`: deliveries pushed and not yet ended, 1 to 1024 (default 64). */
  maxInFlight?: number;
  /** `max_attempts`: failed attempts before the dead-letter queue, 1 to 1000 (default 5). */
  maxAttempts?: number;
  /** `ack_timeout_ms`: the lease of a delivery, 100 to 86400000 (default 30000). */
  ackTimeoutMs?: number;
}

/** Options of `Delivery.nack`. */
export interface NackOptions {
  /** The error text kept with the event (cut to 4096 bytes by the daemon). */
  error?: string;
  /** Retry after this long instead of the daemon's backoff (up to 86400000). */
  delayMs?: number;
  /** Straight to the dead-letter queue. */
  dead?: boolean;
}

/** An event as delivered: CloudEvents 1.0 attribute names (PROTOCOL.md, "Events"). */
export interface SidebusEvent<T = unknown> {
  specversion: string;
  id: string;
  type: string;
  source: string;
  time: string;
  schemaversion?: number;
  correlationid?: string;
  partitionkey?: string;
  traceparent?: string;
  deliverat?: string;
  replayed?: boolean;
  data: T;
  /** Attributes a newer daemon adds. */
  [attribute: string]: unknown;
}

/** The daemon's answer to `hello`. */
export interface ServerInfo {
  protocol: number;
  server: string;
  node: string;
  max_frame_bytes: number;
}

export interface SchemaRegistered {
  type: string;
  version: number;
  created: boolean;
}

export type Compatibility = "backward" | "backward_transitive" | "forward" | "forward_transitive" | "full" | "full_transitive" | "none";

export interface RegisterSchemaOptions {
  compatibility?: Compatibility;
  strict?: boolean;
  dryRun?: boolean;
}

export interface SchemaInfo {
  type: string;
  version: number;
  schema: Record<string, unknown> | boolean;
  compatibility: Compatibility;
  strict: boolean;
}

export interface SchemaList {
  types: Array<{ type: string; latest: number; compatibility: Compatibility }>;
}

export interface ReplayArgs {
  type: string;
  group: string;
  /** RFC 3339 string or a Date. */
  since: string | Date;
  /** Exclusive; default: now. */
  until?: string | Date;
}

export interface ReplayStarted {
  count: number;
  /** The replay's id; absent when nothing was started (`count` 0). */
  replay?: string;
}

export interface ReplayInfo {
  replay: string;
  type: string;
  group: string;
  status: "running" | "done" | "cancelled";
  reason: "request" | "recovery";
  added: number;
  total?: number;
  created_at: string;
}

export interface ReplayList {
  replays: ReplayInfo[];
}

export interface DlqListArgs {
  type: string;
  group: string;
  limit?: number;
  after?: number;
  ids?: string[];
}

export interface DeadLetter {
  id: number;
  event: SidebusEvent;
  error: string;
  attempts: number;
  failed_at: string;
  history: Array<{ attempt: number; error: string; at: string }>;
}

export interface DlqEntries {
  entries: DeadLetter[];
  next?: number;
}

export interface DlqRedriveArgs {
  type: string;
  group: string;
  ids?: string[];
  /** Per second; the reply then comes when all are back. */
  rate?: number;
}

export interface DlqPurgeArgs {
  type: string;
  group: string;
  ids?: string[];
}

export interface Count {
  count: number;
}

export interface GroupStats {
  type: string;
  group: string;
  lag: number;
  pending: number;
  oldest_pending_ms: number;
  dead_letters: number;
  consumers: number;
  /** Entries waiting in the retry schedule, not counted in `pending` (absent from older daemons). */
  scheduled?: number;
}

/** A backend as the daemon last found it. */
export interface BackendStats {
  name: "redis" | "postgres";
  /** The URL the daemon uses, without its password. */
  address: string;
  up: boolean;
  /** RFC 3339: when `up` last changed. */
  since: string;
  /** The last error while down. */
  error?: string;
}

export interface Stats {
  node: string;
  uptime_s: number;
  counters: Record<string, number>;
  spool: { events: number; bytes: number; oldest_age_ms: number };
  groups: GroupStats[];
  truncated?: boolean;
  /** Redis and Postgres as the daemon last found them (absent from older daemons). */
  backends?: BackendStats[];
}
