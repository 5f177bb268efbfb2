// One socket connection to the daemon: pipelined requests matched to replies by id, a bounded
// write queue flushed in batches, and the reading side that never waits for the writing side.

import * as net from "node:net";
import { decodeFrame, encodeFrame, FrameReader, type Frame } from "./codec.js";
import { ClientClosedError, ConnectionLostError, errorFromWire, FrameTooLargeError, SidebusError } from "./errors.js";
import type { Logger } from "./types.js";

/** What the connection asks of its owner (the client). */
export interface ConnectionOwner {
  readonly logger: Logger;
  /** The next request id; ids increase over the client's life, across reconnections. */
  nextId(): number;
  /** A `deliver` push (or another push with an op the client may know). */
  onPush(conn: Connection, frame: Frame): void;
  /** The connection is gone; every request in flight has already been failed. */
  onBroken(conn: Connection, error: Error): void;
}

/** Called with the `ok` reply before any later frame is read (a subscription's deliveries follow it). */
export type OkHook = (reply: Frame, conn: Connection) => void;

/**
 * `head` (`op` and `id`) with the fields that are not `undefined` (an option left out is not
 * sent). An `op` or `id` among the fields is ignored: the reply is matched by the client's id.
 */
function withFields(head: Frame, fields: Frame): Frame {
  for (const k in fields) {
    const v = fields[k];
    if (v !== undefined && k !== "op" && k !== "id") head[k] = v;
  }
  return head;
}

interface Pending {
  resolve(reply: Frame): void;
  reject(error: Error): void;
  onOk: OkHook | undefined;
}

interface RoomWaiter {
  run(): void;
  fail(error: Error): void;
}

export class Connection {
  /** Requests sent and not yet answered, by id. */
  private readonly pending = new Map<number, Pending>();
  private readonly reader = new FrameReader();
  private out: Buffer[] = [];
  private outBytes = 0;
  private flushScheduled = false;
  private waitingDrain = false;
  private readonly roomWaiters: RoomWaiter[] = [];
  private idleWaiters: Array<() => void> = [];
  private brokenBy: Error | undefined;
  /** The daemon's `max_frame_bytes` once `hello` has said it. */
  maxFrameBytes = 1 << 20;

  constructor(
    private readonly socket: net.Socket,
    private readonly owner: ConnectionOwner,
    private readonly maxQueuedBytes: number,
    readonly path: string,
  ) {
    socket.on("data", (chunk: Buffer) => this.onData(chunk));
    socket.on("error", (e) => this.break(e));
    socket.on("close", () => this.break(new Error("the daemon closed the connection")));
    socket.on("drain", () => {
      this.waitingDrain = false;
      this.flush();
    });
  }

  /** Opens a connection to the socket at `path`. */
  static open(path: string, owner: ConnectionOwner, maxQueuedBytes: number): Promise<Connection> {
    return new Promise((resolve, reject) => {
      const socket = net.createConnection({ path });
      const onError = (e: Error): void => {
        socket.destroy();
        reject(new ConnectionLostError(`cannot connect to ${path}: ${e.message}`, { cause: e }));
      };
      socket.once("error", onError);
      socket.once("connect", () => {
        socket.off("error", onError);
        resolve(new Connection(socket, owner, maxQueuedBytes, path));
      });
    });
  }

  get broken(): boolean {
    return this.brokenBy !== undefined;
  }

  /** Requests in flight. */
  get inFlight(): number {
    return this.pending.size;
  }

  /**
   * Sends a request and resolves with its `ok` reply (rejects with the typed error of an `error`
   * reply, or `ConnectionLostError`). The frame is queued synchronously, so requests made one
   * after another are written in that order; when more than `maxQueuedBytes` wait to be written,
   * it waits its turn (first come, first written) instead.
   */
  request(op: string, fields: Frame, onOk?: OkHook): Promise<Frame> {
    return new Promise((resolve, reject) => {
      if (this.brokenBy !== undefined) {
        reject(this.lost());
        return;
      }
      if (this.roomWaiters.length === 0 && this.queuedBytes() < this.maxQueuedBytes) {
        // The usual case, without the waiter's closures: this runs once per publish and per ack.
        this.send(op, fields, { resolve, reject, onOk });
      } else {
        this.roomWaiters.push({ run: () => this.send(op, fields, { resolve, reject, onOk }), fail: reject });
      }
    });
  }

  private send(op: string, fields: Frame, p: Pending): void {
    const id = this.owner.nextId();
    let frame: Buffer;
    try {
      frame = this.encode(withFields({ op, id }, fields));
    } catch (e) {
      p.reject(e as Error);
      return;
    }
    this.pending.set(id, p);
    this.enqueue(frame);
  }

  /** Resolves when no request is in flight. */
  idle(): Promise<void> {
    if (this.pending.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** Ends the connection after what is queued is written; the daemon then closes its side. */
  end(): Promise<void> {
    return new Promise((resolve) => {
      if (this.socket.destroyed) {
        resolve();
        return;
      }
      this.socket.once("close", () => resolve());
      this.flush();
      this.socket.end();
    });
  }

  /** Closes the connection now and fails what is in flight with `error`. */
  destroy(error: Error): void {
    this.break(error);
  }

  private encode(frame: Frame): Buffer {
    const out = encodeFrame(frame);
    if (out.length - 4 > this.maxFrameBytes) {
      // The daemon would answer frame_too_large and close the connection, failing every other
      // request in flight; refusing it here fails only this one.
      throw new FrameTooLargeError(`the ${frame.op} frame is ${out.length - 4} bytes, over the daemon's max_frame_bytes of ${this.maxFrameBytes}`);
    }
    return out;
  }

  private queuedBytes(): number {
    return this.outBytes + this.socket.writableLength;
  }

  private releaseRoom(): void {
    while (this.roomWaiters.length > 0 && this.queuedBytes() < this.maxQueuedBytes && this.brokenBy === undefined) {
      this.roomWaiters.shift()!.run();
    }
  }

  // Frames queued in one turn of the event loop are written with one write call: a burst of
  // pipelined publishes then costs one system call, not one each.
  private enqueue(frame: Buffer): void {
    this.out.push(frame);
    this.outBytes += frame.length;
    if (!this.flushScheduled && !this.waitingDrain) {
      this.flushScheduled = true;
      setImmediate(() => this.flush());
    }
  }

  private flush(): void {
    this.flushScheduled = false;
    if (this.brokenBy !== undefined || this.out.length === 0 || this.waitingDrain) {
      this.releaseRoom();
      return;
    }
    const data = this.out.length === 1 ? this.out[0]! : Buffer.concat(this.out, this.outBytes);
    this.out = [];
    this.outBytes = 0;
    if (!this.socket.write(data)) {
      this.waitingDrain = true;
    }
    this.releaseRoom();
  }

  private onData(chunk: Buffer): void {
    let bodies: Buffer[];
    try {
      bodies = this.reader.push(chunk);
    } catch (e) {
      // A length over the limit means the stream cannot be followed any more.
      this.break(e as Error);
      return;
    }
    for (const body of bodies) {
      if (this.brokenBy !== undefined) return;
      let frame: Frame;
      try {
        frame = decodeFrame(body);
      } catch (e) {
        this.owner.logger.warn(`ignoring an undecodable frame from the daemon: ${(e as Error).message}`);
        continue;
      }
      this.dispatch(frame);
    }
  }

  private dispatch(frame: Frame): void {
    const op = frame.op;
    if (op === "ok" || op === "error") {
      const id = frame.id;
      if (id === undefined || id === null) {
        if (op === "error") {
          const e = errorFromWire(frame);
          this.owner.logger.warn(`the daemon reported ${e.code}: ${e.message}`);
        }
        return;
      }
      const p = typeof id === "number" ? this.pending.get(id) : undefined;
      if (p === undefined) {
        this.owner.logger.debug(`a reply to no request in flight (id ${String(id)})`);
        return;
      }
      this.pending.delete(id as number);
      if (op === "ok") {
        if (p.onOk !== undefined) {
          try {
            p.onOk(frame, this);
          } catch (e) {
            this.owner.logger.error(`a reply hook failed: ${(e as Error).message}`);
          }
        }
        p.resolve(frame);
      } else {
        p.reject(errorFromWire(frame));
      }
      if (this.pending.size === 0) this.wakeIdle();
      return;
    }
    this.owner.onPush(this, frame);
  }

  private wakeIdle(): void {
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const w of waiters) w();
  }

  private lost(): SidebusError {
    const cause = this.brokenBy;
    if (cause instanceof ClientClosedError) return cause;
    return new ConnectionLostError(`the connection to the daemon at ${this.path} was lost${cause ? `: ${cause.message}` : ""}`, { cause });
  }

  private break(error: Error): void {
    if (this.brokenBy !== undefined) return;
    this.brokenBy = error;
    this.socket.destroy();
    this.out = [];
    this.outBytes = 0;
    const lost = this.lost();
    // Every request in flight fails at once: none is re-sent, since it may have reached the
    // daemon (a publish retried without its event id could be stored twice).
    const pending = [...this.pending.values()];
    this.pending.clear();
    const waiters = this.roomWaiters.splice(0);
    for (const p of pending) p.reject(lost);
    for (const w of waiters) w.fail(lost);
    this.wakeIdle();
    this.owner.onBroken(this, error);
  }
}
