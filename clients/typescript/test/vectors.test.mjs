// The golden vectors of protocol/vectors/: every valid frame decodes to what its .json says and
// re-encodes to the same bytes; every frame in invalid/ is refused with the error its .json names.
// The directory is walked, so vectors added later are checked without changing this file.

import assert from "node:assert/strict";
import { readdirSync, readFileSync, statSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { decodeFrame, decodeRequest, encodeValue, SidebusError } from "../dist/index.js";
import { parseExactJson, withBinary } from "./helpers/json.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const root = process.env.SIDEBUS_VECTORS ?? join(here, "..", "..", "..", "protocol", "vectors");

function walk(dir) {
  return readdirSync(dir)
    .sort()
    .flatMap((name) => {
      const p = join(dir, name);
      return statSync(p).isDirectory() ? walk(p) : [p];
    });
}

const files = walk(root);
const vectors = files.filter((f) => f.endsWith(".msgpack")).map((f) => f.slice(0, -".msgpack".length));

test("the vectors directory holds vectors, each with its .json", () => {
  assert.ok(vectors.length >= 40, `only ${vectors.length} vectors under ${root}`);
  for (const f of files.filter((f) => f.endsWith(".json"))) {
    assert.ok(vectors.includes(f.slice(0, -".json".length)), `${f} has no .msgpack`);
  }
});

for (const base of vectors) {
  const name = relative(root, base);
  const bytes = new Uint8Array(readFileSync(`${base}.msgpack`));
  const meaning = withBinary(parseExactJson(readFileSync(`${base}.json`, "utf8")));

  if (name.split(/[\\/]/)[0] === "invalid") {
    test(`${name} is refused with ${meaning.error}`, () => {
      assert.throws(
        () => decodeRequest(bytes),
        (e) => {
          assert.ok(e instanceof SidebusError, `not a SidebusError: ${e}`);
          assert.equal(e.code, meaning.error);
          if (meaning.field !== undefined) assert.equal(e.details[0]?.field, meaning.field);
          if (meaning.id !== undefined) assert.equal(e.requestId, meaning.id);
          return true;
        },
      );
      if (meaning.error === "bad_frame") {
        // A frame that is not a map with string keys is refused by the plain frame decoder,
        // which is what the client runs on every frame the daemon sends.
        assert.throws(() => decodeFrame(bytes), (e) => e instanceof SidebusError && e.code === "bad_frame");
      }
    });
    continue;
  }

  test(`${name} decodes to its .json and re-encodes to the same bytes`, () => {
    const decoded = decodeFrame(bytes);
    assert.deepEqual(decoded, meaning);
    assert.deepEqual(Object.keys(decoded), Object.keys(meaning), "field order");
    assert.equal(Buffer.from(encodeValue(meaning)).toString("hex"), Buffer.from(bytes).toString("hex"));
    assert.equal(Buffer.from(encodeValue(decoded)).toString("hex"), Buffer.from(bytes).toString("hex"));
    if (name.startsWith("requests")) {
      const r = decodeRequest(bytes);
      assert.equal(r.op, meaning.op);
      assert.equal(r.id, meaning.id);
    }
  });
}
