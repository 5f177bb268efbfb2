// The wire codec: length-prefixed MessagePack frames (PROTOCOL.md, "Frames"), the conversions
// that let integers beyond 2^53 survive, and a request validator used by tests and fake daemons.

import { Decoder, Encoder, ExtData, ExtensionCodec } from "@msgpack/msgpack";
import { BadFrameError, BadRequestError, FrameTooLargeError, UnknownOpError } from "./errors.js";

/** A frame body: one MessagePack map with string keys. */
export type Frame = Record<string, unknown>;

/** The largest frame the daemon can be configured to send (64 MiB); larger means a broken stream. */
export const MAX_INCOMING_FRAME_BYTES = 64 << 20;

// Nesting in `data` is bounded by the frame size, not by the protocol (only schema validation
// caps it at 128), so the library's default depth limit of 100 would refuse legal events.
const MAX_DEPTH = 4096;

// `useBigInt64` makes the decoder return int64/uint64 values as bigint, so values beyond 2^53
// survive. `ignoreUndefined` drops map entries whose value is `undefined`, as JSON.stringify
// does, so optional request fields can be left `undefined`.
const encoder = new Encoder({ useBigInt64: true, ignoreUndefined: true, maxDepth: MAX_DEPTH });
const decoder = new Decoder({ useBigInt64: true });

const UINT32_MAX = 0xffffffff;
const INT32_MIN = -0x80000000;
const UINT64_MAX = (1n << 64n) - 1n;
const INT64_MIN = -(1n << 63n);

/**
 * Prepares a value for the encoder, which has two quirks with `useBigInt64`: a safe integer
 * beyond 32 bits is written as a float64 (so `2 ** 40` would reach the daemon as a float, and a
 * `delay_ms` of a month would be refused), and every bigint is written in 9 bytes. Integers
 * outside the 32-bit range become bigints (uint64/int64, their smallest encoding anyway) and
 * small bigints become numbers (smallest encoding). A `Map` becomes a plain object. Returns the
 * same object when nothing had to change, so the common case does not copy.
 */
export function toWire(value: unknown): unknown {
  switch (typeof value) {
    case "number":
      if (Number.isSafeInteger(value) && (value > UINT32_MAX || value < INT32_MIN)) {
        return BigInt(value);
      }
      return value;
    case "bigint":
      if (value > UINT64_MAX || value < INT64_MIN) {
        throw new RangeError(`the integer ${value} does not fit in 64 bits`);
      }
      return value <= BigInt(UINT32_MAX) && value >= BigInt(INT32_MIN) ? Number(value) : value;
    case "object": {
      if (value === null || ArrayBuffer.isView(value) || value instanceof Date || value instanceof ExtData) {
        return value;
      }
      if (Array.isArray(value)) {
        let out: unknown[] | undefined;
        for (let i = 0; i < value.length; i++) {
          const v = value[i];
          const w = toWire(v);
          if (w !== v) {
            out ??= value.slice();
            out[i] = w;
          }
        }
        return out ?? value;
      }
      if (value instanceof Map) {
        const obj: Record<string, unknown> = {};
        for (const [k, v] of value) {
          obj[String(k)] = toWire(v);
        }
        return obj;
      }
      const obj = value as Record<string, unknown>;
      let out: Record<string, unknown> | undefined;
      for (const k in obj) {
        if (!Object.prototype.hasOwnProperty.call(obj, k)) continue;
        const v = obj[k];
        const w = toWire(v);
        if (w !== v) {
          out ??= { ...obj };
          out[k] = w;
        }
      }
      return out ?? value;
    }
    default:
      return value;
  }
}

/**
 * Undoes the decoder's bigints where a number is exact: an int64/uint64 encoding of a small value
 * (PROTOCOL.md allows any integer encoding) becomes a number, and only values beyond 2^53 stay
 * bigints. Changes the freshly decoded tree in place.
 */
export function fromWire(value: unknown): unknown {
  if (typeof value === "bigint") {
    return value <= BigInt(Number.MAX_SAFE_INTEGER) && value >= BigInt(Number.MIN_SAFE_INTEGER) ? Number(value) : value;
  }
  if (typeof value === "object" && value !== null && !ArrayBuffer.isView(value) && !(value instanceof Date) && !(value instanceof ExtData)) {
    if (Array.isArray(value)) {
      for (let i = 0; i < value.length; i++) value[i] = fromWire(value[i]);
    } else {
      const obj = value as Record<string, unknown>;
      for (const k of Object.keys(obj)) obj[k] = fromWire(obj[k]);
    }
  }
  return value;
}

/** Encodes one value as MessagePack (no length prefix), with the conversions of `toWire`. */
export function encodeValue(value: unknown): Uint8Array {
  return encoder.encode(toWire(value));
}

/** Encodes a frame body map with its 4-byte big-endian length prefix, ready to write. */
export function encodeFrame(frame: Frame): Buffer {
  const body = encoder.encodeSharedRef(toWire(frame));
  const out = Buffer.allocUnsafe(4 + body.length);
  out.writeUInt32BE(body.length, 0);
  out.set(body, 4);
  return out;
}

/** Decodes one MessagePack value with no framing rules (and small bigints made numbers). */
export function decodeValue(bytes: Uint8Array): unknown {
  return fromWire(decoder.decode(bytes));
}

class Truncated extends Error {}

/**
 * Checks the frame rules that the MessagePack library does not: the body is one map whose keys
 * are distinct strings, no byte is the reserved marker 0xc1, nothing is truncated and nothing
 * follows the map. Walks the bytes without building values (a container adds its elements to a
 * counter instead of recursing). Returns whether an int64/uint64 encoding occurs, so that
 * `fromWire` runs only then.
 */
function checkFrame(b: Uint8Array): boolean {
  let pos = 0;
  let has64 = false;
  const need = (n: number): void => {
    if (pos + n > b.length) throw new Truncated();
  };
  const be = (n: number): number => {
    need(n);
    let v = 0;
    for (let i = 0; i < n; i++) v = v * 256 + b[pos++]!;
    return v;
  };
  // Skips `count` complete values.
  const skip = (count: number): void => {
    let pending = count;
    while (pending > 0) {
      pending--;
      need(1);
      const m = b[pos++]!;
      let len = 0;
      if (m <= 0x7f || m >= 0xe0 || m === 0xc0 || m === 0xc2 || m === 0xc3) len = 0;
      else if (m <= 0x8f) pending += 2 * (m & 0x0f);
      else if (m <= 0x9f) pending += m & 0x0f;
      else if (m <= 0xbf) len = m & 0x1f;
      else if (m === 0xc1) throw new BadFrameError("the byte 0xc1 is not a MessagePack marker");
      else if (m === 0xc4 || m === 0xd9) len = be(1);
      else if (m === 0xc5 || m === 0xda) len = be(2);
      else if (m === 0xc6 || m === 0xdb) len = be(4);
      else if (m === 0xc7) len = be(1) + 1;
      else if (m === 0xc8) len = be(2) + 1;
      else if (m === 0xc9) len = be(4) + 1;
      else if (m === 0xca) len = 4;
      else if (m === 0xcb) len = 8;
      else if (m === 0xcc || m === 0xd0) len = 1;
      else if (m === 0xcd || m === 0xd1) len = 2;
      else if (m === 0xce || m === 0xd2) len = 4;
      else if (m === 0xcf || m === 0xd3) {
        len = 8;
        has64 = true;
      } else if (m >= 0xd4 && m <= 0xd8) len = 1 + (1 << (m - 0xd4));
      else if (m === 0xdc) pending += be(2);
      else if (m === 0xdd) pending += be(4);
      else if (m === 0xde) pending += 2 * be(2);
      else if (m === 0xdf) pending += 2 * be(4);
      need(len);
      pos += len;
      // Every value takes at least one byte: more pending values than bytes left is truncated.
      if (pending > b.length - pos) throw new Truncated();
    }
  };
  try {
    need(1);
    const m = b[pos++]!;
    let size: number;
    if (m >= 0x80 && m <= 0x8f) size = m & 0x0f;
    else if (m === 0xde) size = be(2);
    else if (m === 0xdf) size = be(4);
    else {
      pos--;
      throw new BadFrameError(`expected a MessagePack map, found ${kindOf(m)}`);
    }
    // Where each key's bytes are, to find a repeated key without building strings.
    const keyAt: number[] = [];
    const keyLen: number[] = [];
    for (let i = 0; i < size; i++) {
      need(1);
      const k = b[pos++]!;
      let len: number;
      if (k >= 0xa0 && k <= 0xbf) len = k & 0x1f;
      else if (k === 0xd9) len = be(1);
      else if (k === 0xda) len = be(2);
      else if (k === 0xdb) len = be(4);
      else throw new BadFrameError(`a map key is ${kindOf(k)}, not a string`);
      need(len);
      for (let j = 0; j < keyAt.length; j++) {
        if (keyLen[j] === len && sameBytes(b, keyAt[j]!, pos, len)) {
          const key = Buffer.from(b.buffer, b.byteOffset + pos, len).toString("utf8");
          throw new BadFrameError(`the field \`${key}\` appears twice`);
        }
      }
      keyAt.push(pos);
      keyLen.push(len);
      pos += len;
      skip(1);
    }
    if (pos !== b.length) throw new BadFrameError(`${b.length - pos} bytes follow the MessagePack map`);
  } catch (e) {
    if (e instanceof Truncated) throw new BadFrameError("the MessagePack value is truncated");
    throw e;
  }
  return has64;
}

function sameBytes(b: Uint8Array, a: number, c: number, len: number): boolean {
  for (let i = 0; i < len; i++) if (b[a + i] !== b[c + i]) return false;
  return true;
}

function kindOf(m: number): string {
  if (m <= 0x7f || m >= 0xe0 || (m >= 0xcc && m <= 0xd3 && m !== 0xca && m !== 0xcb)) return "an integer";
  if (m === 0xca || m === 0xcb) return "a float";
  if (m <= 0x8f || m === 0xde || m === 0xdf) return "a map";
  if (m <= 0x9f || m === 0xdc || m === 0xdd) return "an array";
  if (m <= 0xbf || (m >= 0xd9 && m <= 0xdb)) return "a string";
  if (m === 0xc0) return "nil";
  if (m === 0xc2 || m === 0xc3) return "a boolean";
  if (m >= 0xc4 && m <= 0xc6) return "binary";
  if (m === 0xc1) return "the reserved marker 0xc1";
  return "an extension";
}

// ---- the fast way to decode a frame ----
//
// Decoding is most of what a consumer costs this client: a `deliver` and the replies to a
// publish and an ack per event. The library decodes every string of up to 200 bytes in
// JavaScript, a character at a time into an array (an event's id, type, source, time, and most
// strings in `data`), and `checkFrame` walks the frame once more before it. `FastReader` does
// both in one walk: strings through Buffer's native UTF-8 decoder, map keys from a cache,
// int64/uint64 made numbers when exact (what `fromWire` does). It takes only what it can decode
// as the checked way would (a string that is not valid UTF-8 gets U+FFFD for each bad sequence,
// as the library does with strings over 200 bytes); on anything else (a malformed frame, the marker 0xc1, a map
// key that is neither a string nor a 32-bit or float number, `__proto__`, nesting deeper than
// FAST_MAX_DEPTH, an extension that does not decode) it gives up and the frame is decoded the
// checked way, which keeps its results and its errors.

/** Thrown inside FastReader to give up on a frame. */
class NotFast {}
const NOT_FAST = new NotFast();
const FAST_MAX_DEPTH = 512;
const MAX_SAFE_BIG = BigInt(Number.MAX_SAFE_INTEGER);
const MIN_SAFE_BIG = BigInt(Number.MIN_SAFE_INTEGER);

/** Map keys of up to 16 bytes, by length, as the library's decoder caches them. */
const KEY_CACHE_MAX_LEN = 16;
const KEY_CACHE_PER_LEN = 16;
const keyCache: Array<Array<{ bytes: Uint8Array; str: string }>> = Array.from({ length: KEY_CACHE_MAX_LEN }, () => []);

function exactNumber(v: bigint): number | bigint {
  return v <= MAX_SAFE_BIG && v >= MIN_SAFE_BIG ? Number(v) : v;
}

class FastReader {
  private pos = 0;
  private readonly buf: Buffer;
  private readonly end: number;

  constructor(private readonly body: Uint8Array) {
    this.buf = Buffer.isBuffer(body) ? body : Buffer.from(body.buffer, body.byteOffset, body.byteLength);
    this.end = body.length;
  }

  /** The frame's map, or undefined when it must be decoded the checked way. */
  frame(): Frame | undefined {
    const b = this.buf;
    if (this.end === 0) return undefined;
    const m = b[0]!;
    let size: number;
    if (m >= 0x80 && m <= 0x8f) {
      size = m & 0x0f;
      this.pos = 1;
    } else if (m === 0xde && this.end >= 3) {
      size = b.readUInt16BE(1);
      this.pos = 3;
    } else if (m === 0xdf && this.end >= 5) {
      size = b.readUInt32BE(1);
      this.pos = 5;
    } else {
      return undefined;
    }
    if (2 * size > this.end - this.pos) return undefined;
    const out: Frame = {};
    for (let i = 0; i < size; i++) {
      const k = b[this.pos++];
      let len: number;
      if (k === undefined) return undefined;
      if (k >= 0xa0 && k <= 0xbf) len = k & 0x1f;
      else if (k === 0xd9) len = this.u8();
      else if (k === 0xda) len = this.u16();
      else if (k === 0xdb) len = this.u32();
      else return undefined;
      const key = this.key(len);
      if (key === "__proto__" || Object.hasOwn(out, key)) return undefined;
      out[key] = this.value(0);
    }
    return this.pos === this.end ? out : undefined;
  }

  private need(n: number): void {
    if (this.pos + n > this.end) throw NOT_FAST;
  }

  private u8(): number {
    this.need(1);
    return this.buf[this.pos++]!;
  }

  private u16(): number {
    this.need(2);
    const v = this.buf.readUInt16BE(this.pos);
    this.pos += 2;
    return v;
  }

  private u32(): number {
    this.need(4);
    const v = this.buf.readUInt32BE(this.pos);
    this.pos += 4;
    return v;
  }

  private str(len: number): string {
    this.need(len);
    const start = this.pos;
    this.pos += len;
    return len === 0 ? "" : this.buf.toString("utf8", start, start + len);
  }

  private key(len: number): string {
    if (len === 0 || len > KEY_CACHE_MAX_LEN) return this.str(len);
    this.need(len);
    const b = this.buf;
    const at = this.pos;
    const records = keyCache[len - 1]!;
    find: for (const r of records) {
      const kb = r.bytes;
      for (let j = 0; j < len; j++) if (kb[j] !== b[at + j]) continue find;
      this.pos += len;
      return r.str;
    }
    const str = this.str(len);
    const record = { bytes: Uint8Array.prototype.slice.call(b, at, at + len), str };
    if (records.length < KEY_CACHE_PER_LEN) records.push(record);
    else records[(Math.random() * records.length) | 0] = record;
    return str;
  }

  private bin(len: number): Uint8Array {
    this.need(len);
    const start = this.pos;
    this.pos += len;
    // A view of the body, of its type, as the library returns it.
    return this.body.subarray(start, start + len);
  }

  private ext(len: number): unknown {
    this.need(1 + len);
    const type = this.buf.readInt8(this.pos);
    const start = this.pos + 1;
    this.pos = start + len;
    return ExtensionCodec.defaultCodec.decode(this.body.subarray(start, start + len), type, undefined);
  }

  private array(n: number, depth: number): unknown[] {
    if (depth >= FAST_MAX_DEPTH || n > this.end - this.pos) throw NOT_FAST;
    const out = new Array<unknown>(n);
    for (let i = 0; i < n; i++) out[i] = this.value(depth + 1);
    return out;
  }

  private map(n: number, depth: number): Record<string, unknown> {
    if (depth >= FAST_MAX_DEPTH || 2 * n > this.end - this.pos) throw NOT_FAST;
    const out: Record<string, unknown> = {};
    for (let i = 0; i < n; i++) {
      const k = this.mapKey();
      out[k] = this.value(depth + 1);
    }
    return out;
  }

  /** A key inside `data`: a string, or a number that the library takes as a key. */
  private mapKey(): string | number {
    const m = this.u8();
    let key: string | number;
    if (m >= 0xa0 && m <= 0xbf) key = this.key(m & 0x1f);
    else if (m === 0xd9) key = this.key(this.u8());
    else if (m === 0xda) key = this.key(this.u16());
    else if (m === 0xdb) key = this.key(this.u32());
    else if (m <= 0x7f || m >= 0xe0 || m === 0xca || m === 0xcb || (m >= 0xcc && m <= 0xce) || (m >= 0xd0 && m <= 0xd2)) {
      this.pos--;
      return this.value(0) as number;
    } else throw NOT_FAST;
    if (key === "__proto__") throw NOT_FAST;
    return key;
  }

  private value(depth: number): unknown {
    const b = this.buf;
    const m = this.u8();
    if (m <= 0x7f) return m;
    if (m >= 0xe0) return m - 0x100;
    if (m <= 0x8f) return this.map(m & 0x0f, depth);
    if (m <= 0x9f) return this.array(m & 0x0f, depth);
    if (m <= 0xbf) return this.str(m & 0x1f);
    let v: number | bigint;
    switch (m) {
      case 0xc0:
        return null;
      case 0xc2:
        return false;
      case 0xc3:
        return true;
      case 0xc4:
        return this.bin(this.u8());
      case 0xc5:
        return this.bin(this.u16());
      case 0xc6:
        return this.bin(this.u32());
      case 0xc7:
        return this.ext(this.u8());
      case 0xc8:
        return this.ext(this.u16());
      case 0xc9:
        return this.ext(this.u32());
      case 0xca:
        this.need(4);
        v = b.readFloatBE(this.pos);
        this.pos += 4;
        return v;
      case 0xcb:
        this.need(8);
        v = b.readDoubleBE(this.pos);
        this.pos += 8;
        return v;
      case 0xcc:
        return this.u8();
      case 0xcd:
        return this.u16();
      case 0xce:
        return this.u32();
      case 0xcf:
        this.need(8);
        v = b.readBigUInt64BE(this.pos);
        this.pos += 8;
        return exactNumber(v);
      case 0xd0:
        this.need(1);
        return b.readInt8(this.pos++);
      case 0xd1:
        this.need(2);
        v = b.readInt16BE(this.pos);
        this.pos += 2;
        return v;
      case 0xd2:
        this.need(4);
        v = b.readInt32BE(this.pos);
        this.pos += 4;
        return v;
      case 0xd3:
        this.need(8);
        v = b.readBigInt64BE(this.pos);
        this.pos += 8;
        return exactNumber(v);
      case 0xd4:
        return this.ext(1);
      case 0xd5:
        return this.ext(2);
      case 0xd6:
        return this.ext(4);
      case 0xd7:
        return this.ext(8);
      case 0xd8:
        return this.ext(16);
      case 0xd9:
        return this.str(this.u8());
      case 0xda:
        return this.str(this.u16());
      case 0xdb:
        return this.str(this.u32());
      case 0xdc:
        return this.array(this.u16(), depth);
      case 0xdd:
        return this.array(this.u32(), depth);
      case 0xde:
        return this.map(this.u16(), depth);
      case 0xdf:
        return this.map(this.u32(), depth);
      default:
        throw NOT_FAST; // 0xc1
    }
  }
}

/** The frame decoded the fast way, or undefined when it must go the checked way. */
function decodeFast(body: Uint8Array): Frame | undefined {
  try {
    return new FastReader(body).frame();
  } catch {
    // NOT_FAST, or an extension the library's codec refused: the checked way says why.
    return undefined;
  }
}

/**
 * Decodes a frame body (without its length prefix) into a map. Throws `BadFrameError` when the
 * body is not exactly one MessagePack map with distinct string keys.
 */
export function decodeFrame(body: Uint8Array): Frame {
  return decodeFast(body) ?? decodeChecked(body);
}

/** `decodeFrame` through the library, after `checkFrame`: the reference the fast way follows. */
export function decodeChecked(body: Uint8Array): Frame {
  const has64 = checkFrame(body);
  let value: unknown;
  try {
    value = decoder.decode(body);
  } catch (e) {
    throw new BadFrameError(`the frame is not valid MessagePack: ${(e as Error).message}`);
  }
  return (has64 ? fromWire(value) : value) as Frame;
}

/**
 * Splits a byte stream into frame bodies. Chunks are kept in a list until a whole frame is
 * there, so a large frame arriving in many chunks is copied once, not once per chunk.
 */
export class FrameReader {
  private chunks: Buffer[] = [];
  private have = 0;

  constructor(private readonly maxFrameBytes: number = MAX_INCOMING_FRAME_BYTES) {}

  /** Adds bytes read from the socket and returns the complete frame bodies they finish. */
  push(chunk: Buffer): Buffer[] {
    this.chunks.push(chunk);
    this.have += chunk.length;
    const frames: Buffer[] = [];
    for (;;) {
      if (this.have < 4) break;
      const head = this.chunks[0]!.length >= 4 ? this.chunks[0]! : this.flatten();
      const len = head.readUInt32BE(0);
      if (len > this.maxFrameBytes) {
        throw new FrameTooLargeError(`a frame of ${len} bytes is over the limit of ${this.maxFrameBytes}`);
      }
      if (this.have < 4 + len) break;
      const buf = this.chunks[0]!.length >= 4 + len ? this.chunks[0]! : this.flatten();
      frames.push(buf.subarray(4, 4 + len));
      const rest = buf.subarray(4 + len);
      this.have -= 4 + len;
      if (rest.length > 0) this.chunks[0] = rest;
      else this.chunks.shift();
    }
    return frames;
  }

  private flatten(): Buffer {
    const all = Buffer.concat(this.chunks, this.have);
    this.chunks = [all];
    return all;
  }
}

// ---- request validation ----

type Kind = "uint" | "string" | "bool" | "any" | "schema" | "strings";

interface FieldRule {
  kind: Kind;
  required?: boolean;
  min?: number;
  max?: number;
  check?: (s: string) => string | undefined;
}

const TYPE_RE = /^[a-z0-9._-]{1,128}$/;
const GROUP_RE = /^[A-Za-z0-9._-]{1,128}$/;
const EVENT_ID_RE = /^[\x21-\x7e]{1,128}$/;
// Free-text attributes: at most 256 bytes and no control characters (the daemon's rule, which
// PROTOCOL.md only states for `client`).
const checkText = (s: string): string | undefined =>
  Buffer.byteLength(s) > 256 || /[\u0000-\u001f\u007f-\u009f]/.test(s) ? "must be at most 256 bytes without control characters" : undefined;
const checkType = (s: string): string | undefined => (TYPE_RE.test(s) ? undefined : "must be 1 to 128 characters of a-z 0-9 . _ -");
const checkGroup = (s: string): string | undefined => (GROUP_RE.test(s) ? undefined : "must be 1 to 128 characters of A-Z a-z 0-9 . _ -");

const DAY_MS = 24 * 3600 * 1000;
const TYPE: FieldRule = { kind: "string", required: true, check: checkType };
const GROUP: FieldRule = { kind: "string", required: true, check: checkGroup };
const TEXT: FieldRule = { kind: "string", check: checkText };

/** Every op of protocol version 1 with its fields, in the order the daemon checks them. */
const OPS: Record<string, Record<string, FieldRule>> = {
  hello: { protocol: { kind: "uint", required: true }, client: TEXT },
  ping: {},
  publish: {
    type: TYPE,
    data: { kind: "any", required: true },
    event_id: { kind: "string", check: (s) => (EVENT_ID_RE.test(s) ? undefined : "must be 1 to 128 characters of printable ASCII without spaces") },
    durability: { kind: "string", check: (s) => (s === "local" || s === "committed" ? undefined : 'must be "local" or "committed"') },
    version: { kind: "uint", min: 1, max: UINT32_MAX },
    source: TEXT,
    correlationid: TEXT,
    partitionkey: TEXT,
    traceparent: TEXT,
    deliver_at: TEXT,
    delay_ms: { kind: "uint", min: 0, max: 90 * DAY_MS },
  },
  subscribe: {
    type: TYPE,
    group: GROUP,
    max_in_flight: { kind: "uint", min: 1, max: 1024 },
    max_attempts: { kind: "uint", min: 1, max: 1000 },
    ack_timeout_ms: { kind: "uint", min: 100, max: DAY_MS },
  },
  ack: { tag: { kind: "uint", required: true } },
  nack: { tag: { kind: "uint", required: true }, error: { kind: "string" }, delay_ms: { kind: "uint", min: 0, max: DAY_MS }, dead: { kind: "bool" } },
  extend: { tag: { kind: "uint", required: true } },
  unsubscribe: { sub: { kind: "uint", required: true } },
  register_schema: {
    type: TYPE,
    schema: { kind: "schema", required: true },
    compatibility: {
      kind: "string",
      check: (s) =>
        ["backward", "backward_transitive", "forward", "forward_transitive", "full", "full_transitive", "none"].includes(s)
          ? undefined
          : "must be a compatibility mode",
    },
    strict: { kind: "bool" },
    dry_run: { kind: "bool" },
  },
  get_schema: { type: TYPE, version: { kind: "uint", min: 1, max: UINT32_MAX } },
  list_schemas: {},
  replay: { type: TYPE, group: GROUP, since: { kind: "string", required: true }, until: { kind: "string" } },
  replay_cancel: { replay: { kind: "string", required: true } },
  replays: { all: { kind: "bool" } },
  dlq_list: { type: TYPE, group: GROUP, limit: { kind: "uint", min: 1, max: 1000 }, after: { kind: "uint" }, ids: { kind: "strings" } },
  dlq_redrive: { type: TYPE, group: GROUP, ids: { kind: "strings" }, rate: { kind: "uint", min: 1, max: 1_000_000 } },
  dlq_purge: { type: TYPE, group: GROUP, ids: { kind: "strings" } },
  stats: {},
  // Group lifecycle: the client has no methods for these yet; decoding them keeps the vectors honest.
  groups: { type: { kind: "string", check: checkType } },
  group_delete: { type: TYPE, group: GROUP, force: { kind: "bool" } },
  group_reset: { type: TYPE, group: GROUP, to: { kind: "string", required: true, check: checkText } },
};

/** The ops that may be sent without `id` (then they get no `ok`). */
export const OPS_WITHOUT_ID: ReadonlySet<string> = new Set(["ack", "nack", "extend"]);

/** Whether `v` is an unsigned integer as the protocol reads one (any integer encoding). */
function isUint(v: unknown): boolean {
  return (typeof v === "number" && Number.isInteger(v) && v >= 0) || (typeof v === "bigint" && v >= 0n);
}

function describe(v: unknown): string {
  if (typeof v === "number") return Number.isInteger(v) ? "an integer" : "a float";
  if (typeof v === "bigint") return "an integer";
  if (typeof v === "string") return "a string";
  if (typeof v === "boolean") return "a boolean";
  if (ArrayBuffer.isView(v)) return "binary";
  if (Array.isArray(v)) return "an array";
  return "a map";
}

function fieldError(field: string, message: string, id?: number | string): BadRequestError {
  return new BadRequestError(`bad field ${field}: ${message}`, [{ field, message }], id);
}

/** A request as `decodeRequest` returns it. */
export interface DecodedRequest {
  op: string;
  /** Absent only on `ack`, `nack` and `extend` sent without one; a string only on `publish`. */
  id: number | string | undefined;
  fields: Frame;
}

/**
 * Decodes and validates a request frame body the way the daemon does, throwing the error the
 * daemon would answer (`BadFrameError`, `BadRequestError` naming the field in `details`, or
 * `UnknownOpError`; the error's `requestId` is the id the reply would echo). The client does not
 * need this to talk to a daemon; it is for tests and fake daemons.
 */
export function decodeRequest(body: Uint8Array): DecodedRequest {
  const f = decodeFrame(body);
  const present = (k: string): boolean => f[k] !== undefined && (f[k] !== null || k === "data");
  let id: number | string | undefined;
  if (present("id")) {
    const raw = f.id;
    if (typeof raw === "string") id = raw;
    else if (isUint(raw)) id = typeof raw === "bigint" ? raw.toString() : (raw as number);
    else throw fieldError("id", "must be an unsigned integer");
  }
  if (!present("op")) throw fieldError("op", "required", id);
  if (typeof f.op !== "string") throw fieldError("op", `expected a string, found ${describe(f.op)}`, id);
  const op = f.op;
  const rules = OPS[op];
  if (rules === undefined) throw new UnknownOpError(`unknown op \`${op.slice(0, 64)}\``, [], id);
  for (const [name, rule] of Object.entries(rules)) {
    if (!present(name)) {
      if (rule.required) throw fieldError(name, "required", id);
      continue;
    }
    const v = f[name];
    let problem: string | undefined;
    switch (rule.kind) {
      case "any":
        break;
      case "uint":
        if (!isUint(v)) problem = `expected an unsigned integer, found ${describe(v)}`;
        else if ((rule.min !== undefined && Number(v) < rule.min) || (rule.max !== undefined && Number(v) > rule.max)) {
          problem = `must be ${rule.min ?? 0} to ${rule.max}`;
        }
        break;
      case "string":
        if (typeof v !== "string") problem = `expected a string, found ${describe(v)}`;
        else problem = rule.check?.(v);
        break;
      case "bool":
        if (typeof v !== "boolean") problem = `expected a boolean, found ${describe(v)}`;
        break;
      case "schema":
        if (typeof v !== "boolean" && (typeof v !== "object" || v === null || Array.isArray(v) || ArrayBuffer.isView(v))) {
          problem = "must be a map (a JSON Schema object) or a boolean";
        }
        break;
      case "strings":
        if (!Array.isArray(v) || !v.every((s) => typeof s === "string")) problem = "expected an array of strings";
        break;
    }
    if (problem !== undefined) throw fieldError(name, problem, id);
  }
  if (op === "publish" && present("deliver_at") && present("delay_ms")) {
    throw fieldError("deliver_at", "give deliver_at or delay_ms, not both", id);
  }
  if (op === "publish" && typeof id === "string" && present("event_id") && f.event_id !== id) {
    throw fieldError("event_id", "differs from the string `id`; give one of them", id);
  }
  if (id === undefined && !OPS_WITHOUT_ID.has(op)) throw fieldError("id", "required");
  if (typeof id === "string" && op !== "publish") {
    throw fieldError("id", "must be an unsigned integer (a string id is only taken by publish)");
  }
  return { op, id, fields: f };
}
