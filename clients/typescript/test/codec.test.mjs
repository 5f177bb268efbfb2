// The codec beyond the golden vectors: integers beyond 2^53 and beyond 32 bits, the frame rules
// the MessagePack library does not check, the stream splitter, and the error classes per code.

import assert from "node:assert/strict";
import { test } from "node:test";
import {
  BackpressureError,
  BadFrameError,
  decodeFrame,
  decodeRequest,
  decodeValue,
  encodeFrame,
  encodeValue,
  errorFromWire,
  FrameReader,
  FrameTooLargeError,
  InternalError,
  SidebusError,
  UnknownTagError,
  ValidationFailedError,
  WIRE_CODES,
} from "../dist/index.js";

const hex = (b) => Buffer.from(b).toString("hex");

test("integers beyond 2^53 survive a round trip exactly, as bigints", () => {
  for (const v of [2n ** 53n + 1n, 2n ** 64n - 1n, -(2n ** 63n), -(2n ** 53n) - 1n]) {
    assert.equal(decodeValue(encodeValue(v)), v);
  }
  const data = { big: 9007199254740993n, list: [18446744073709551615n] };
  assert.deepEqual(decodeFrame(encodeValue(data)), data);
});

test("integers beyond 32 bits are written as integers, not floats, in their smallest encoding", () => {
  assert.equal(hex(encodeValue(2 ** 40)), "cf0000010000000000");
  assert.equal(hex(encodeValue(-(2 ** 40))), "d3ffffff0000000000");
  assert.equal(hex(encodeValue(5n)), "05");
  assert.equal(hex(encodeValue(-5n)), "fb");
  assert.equal(hex(encodeValue(2n ** 32n - 1n)), "ceffffffff");
  assert.equal(hex(encodeValue(42.5)), "cb4045400000000000");
  assert.equal(decodeValue(encodeValue(2 ** 40)), 2 ** 40);
  assert.throws(() => encodeValue(2n ** 64n), RangeError);
});

test("a small value in a 64-bit encoding decodes as a number; a large one stays a bigint", () => {
  // {"a": int64 5, "b": uint64 2^60}
  const body = Buffer.from("82a161d30000000000000005a162cf1000000000000000", "hex");
  assert.deepEqual(decodeFrame(body), { a: 5, b: 2n ** 60n });
});

test("binary data, nil data and Maps are encoded as MessagePack bin, nil and map", () => {
  assert.equal(hex(encodeValue({ b: new Uint8Array([0, 1, 255]) })), "81a162c4030001ff");
  assert.equal(hex(encodeValue({ d: null })), "81a164c0");
  assert.equal(hex(encodeValue(new Map([["k", 1]]))), "81a16b01");
  // `undefined` fields are left out, as JSON.stringify does.
  assert.equal(hex(encodeValue({ a: 1, b: undefined })), "81a16101");
});

test("the frame decoder refuses what is not one map with distinct string keys", () => {
  const bad = {
    "a repeated key": "82a16101a16102",
    "a truncated map": "82a16101a162",
    "a truncated string": "81a161a5616263",
    "an array": "9101",
    "an integer key": "810101",
    "a trailing byte": "81a1610100",
    "the reserved marker inside data": "81a161c1",
    "an empty body": "",
    "a declared size larger than the body": "dfffffffff",
  };
  for (const [what, h] of Object.entries(bad)) {
    assert.throws(() => decodeFrame(Buffer.from(h, "hex")), BadFrameError, what);
  }
  // Keys inside data may be anything MessagePack allows.
  assert.deepEqual(decodeFrame(Buffer.from("81a1648101a178", "hex")), { d: { 1: "x" } });
});

test("the fast frame decoder gives what the checked decoder gives, or leaves the frame to it", async () => {
  const { decodeChecked } = await import("../dist/codec.js");
  const ext = (type, hexData) => {
    const d = Buffer.from(hexData, "hex");
    const head = [1, 2, 4, 8, 16].includes(d.length) ? [0xd4 + Math.log2(d.length)] : [0xc7, d.length];
    return Buffer.concat([Buffer.from([...head, type & 0xff]), d]).toString("hex");
  };
  const values = [
    "00", "7f", "e0", "ff", "ccff", "cdffff", "ceffffffff", "cf0000000000000005", "cf001fffffffffffff",
    "cf0020000000000000", "cfffffffffffffffff", "d080", "d18000", "d280000000", "d3fffffffffffffffb",
    "d3ffe0000000000001", "d3ffe0000000000000", "d38000000000000000", "ca3fc00000", "cb4045400000000000",
    "c0", "c2", "c3", "a0", "c400", "c403000102", "c50003616263", "c600000001ff", "90", "80", "dc000101",
    "dd0000000101", "de0001a16101", "df00000001a16101",
    // strings: ASCII, 2-, 3- and 4-byte UTF-8, around the library's 200-byte threshold
    Buffer.from([0xa1, 0x78]).toString("hex"),
    "d9" + (200).toString(16) + "78".repeat(200), "d9" + (201).toString(16) + "78".repeat(201),
    "a2" + Buffer.from("é").toString("hex"), "a4" + Buffer.from("😀").toString("hex"),
    "da0100" + Buffer.from("ü".repeat(128)).toString("hex"),
    // extensions: timestamps 32, 64 and 96 bits, and an unknown type
    ext(-1, "5f5e1000"), ext(-1, "0000000c5f5e1000"), ext(-1, "000000010000000000005f5e1000"), ext(5, "0102"),
    // keys inside data: numbers (integers and floats), strings, repeated
    "83" + "01a178" + "cb3ff8000000000000a179" + "a16b01", "82a16b01a16b02",
  ];
  const frames = values.map((v) => Buffer.from("82a2696401a464617461" + v, "hex"));
  frames.push(
    encodeFrame({ op: "deliver", sub: 1, tag: 7, attempt: 1, event: { id: "e-1", data: { n: 1, pad: "x".repeat(200), l: [1, [2, { a: null }]] } } }).subarray(4),
    Buffer.from("81a464617461" + "91".repeat(600) + "01", "hex"), // nesting beyond the fast way's depth
    Buffer.from("81a464617461" + "81" + "d30000000000000001" + "01", "hex"), // an int64 key: refused by both
    Buffer.from("81a4646174618" + "1a95f5f70726f746f5f5f01", "hex"), // __proto__ inside data: refused by both
  );
  for (const f of frames) {
    let want;
    try {
      want = decodeChecked(f);
    } catch (e) {
      assert.throws(() => decodeFrame(f), (got) => got instanceof BadFrameError && got.message === e.message, hex(f));
      continue;
    }
    const got = decodeFrame(f);
    assert.deepStrictEqual(got, want, hex(f));
    assert.deepStrictEqual(Object.keys(got), Object.keys(want), hex(f));
  }
  // A plain Uint8Array body gives plain Uint8Array views for bin, as the library does.
  const u8 = new Uint8Array(Buffer.from("81a162c403000102", "hex"));
  assert.deepStrictEqual(decodeFrame(u8), decodeChecked(u8));
});

test("the frame reader splits a stream cut at any byte into the same frames", () => {
  const frames = [{ op: "ok", id: 1 }, { op: "deliver", sub: 1, tag: 2, attempt: 1, event: { data: "x".repeat(300) } }, { op: "ok", id: 3 }];
  const stream = Buffer.concat(frames.map(encodeFrame));
  for (const size of [1, 2, 3, 5, 7, 64, stream.length]) {
    const r = new FrameReader();
    const out = [];
    for (let i = 0; i < stream.length; i += size) out.push(...r.push(stream.subarray(i, i + size)));
    assert.deepEqual(out.map(decodeFrame), frames, `chunks of ${size}`);
  }
});

test("the frame reader refuses a length over its limit from the header alone", () => {
  const r = new FrameReader(1024);
  const head = Buffer.alloc(4);
  head.writeUInt32BE(1025);
  assert.throws(() => r.push(head), FrameTooLargeError);
});

test("every wire code has its error class, and an unknown code is internal", () => {
  for (const code of WIRE_CODES) {
    const e = errorFromWire({ op: "error", id: 4, code, message: "m", details: [{ field: "f" }] });
    assert.ok(e instanceof SidebusError);
    assert.equal(e.code, code);
    assert.equal(e.constructor.name.replace(/Error$/, "").toLowerCase(), code.replaceAll("_", ""));
    assert.deepEqual(e.details, [{ field: "f" }]);
    assert.equal(e.requestId, 4);
  }
  assert.ok(errorFromWire({ op: "error", code: "backpressure", message: "" }) instanceof BackpressureError);
  assert.ok(errorFromWire({ op: "error", code: "unknown_tag", message: "" }) instanceof UnknownTagError);
  assert.ok(errorFromWire({ op: "error", code: "validation_failed", message: "" }) instanceof ValidationFailedError);
  const unknown = errorFromWire({ op: "error", code: "solar_flare", message: "bits flipped" });
  assert.ok(unknown instanceof InternalError);
  assert.equal(unknown.code, "internal");
  assert.match(unknown.message, /solar_flare/);
});

test("the request validator names the field the daemon would name", () => {
  const cases = [
    [{ op: "publish", id: 1, type: "Order", data: 1 }, "type"],
    [{ op: "publish", id: 1, type: "o", data: 1, delay_ms: 1, deliver_at: "2026-01-01T00:00:00Z" }, "deliver_at"],
    [{ op: "subscribe", id: 1, type: "o", group: "g", max_in_flight: 0 }, "max_in_flight"],
    [{ op: "nack", tag: 1, dead: "yes" }, "dead"],
    [{ op: "stats", id: "s" }, "id"],
    [{ op: "register_schema", id: 1, type: "o", schema: [1] }, "schema"],
  ];
  for (const [frame, field] of cases) {
    assert.throws(() => decodeRequest(encodeValue(frame)), (e) => e.code === "bad_request" && e.details[0].field === field, field);
  }
  // nil counts as absent, except for data.
  assert.equal(decodeRequest(encodeValue({ op: "publish", id: 1, type: "o", data: null, source: null })).op, "publish");
  assert.equal(decodeRequest(encodeValue({ op: "ack", tag: 3 })).id, undefined);
});
