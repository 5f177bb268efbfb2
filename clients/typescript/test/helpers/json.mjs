// A JSON reader for the golden vectors' `.json` files: integers beyond 2^53 become bigints (so a
// vector with such a value is compared exactly, which JSON.parse cannot do) and `{"$bin": ...}`
// becomes the bytes it stands for.

/** Parses JSON text, keeping integers outside the safe range exact as bigints. */
export function parseExactJson(text) {
  let pos = 0;
  const fail = (what) => {
    throw new SyntaxError(`${what} at offset ${pos}`);
  };
  const ws = () => {
    while (pos < text.length && " \t\n\r".includes(text[pos])) pos++;
  };
  const value = () => {
    ws();
    const c = text[pos];
    if (c === "{") {
      pos++;
      const obj = {};
      ws();
      if (text[pos] === "}") {
        pos++;
        return obj;
      }
      for (;;) {
        ws();
        if (text[pos] !== '"') fail("expected a key");
        const k = string();
        ws();
        if (text[pos++] !== ":") fail("expected ':'");
        obj[k] = value();
        ws();
        const d = text[pos++];
        if (d === "}") return obj;
        if (d !== ",") fail("expected ',' or '}'");
      }
    }
    if (c === "[") {
      pos++;
      const arr = [];
      ws();
      if (text[pos] === "]") {
        pos++;
        return arr;
      }
      for (;;) {
        arr.push(value());
        ws();
        const d = text[pos++];
        if (d === "]") return arr;
        if (d !== ",") fail("expected ',' or ']'");
      }
    }
    if (c === '"') return string();
    if (text.startsWith("true", pos)) return (pos += 4), true;
    if (text.startsWith("false", pos)) return (pos += 5), false;
    if (text.startsWith("null", pos)) return (pos += 4), null;
    const m = /^-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?/.exec(text.slice(pos));
    if (m === null) fail("unexpected character");
    pos += m[0].length;
    if (m[2] === undefined && m[3] === undefined) {
      const n = Number(m[0]);
      return Number.isSafeInteger(n) ? n : BigInt(m[0]);
    }
    return Number(m[0]);
  };
  const string = () => {
    // JSON strings are a subset of what JSON.parse reads, escapes included.
    const start = pos;
    pos++;
    while (pos < text.length && text[pos] !== '"') pos += text[pos] === "\\" ? 2 : 1;
    if (pos >= text.length) fail("unterminated string");
    pos++;
    return JSON.parse(text.slice(start, pos));
  };
  const v = value();
  ws();
  if (pos !== text.length) fail("trailing characters");
  return v;
}

/** Replaces every `{"$bin": "<base64>"}` by a Uint8Array of those bytes. */
export function withBinary(v) {
  if (Array.isArray(v)) return v.map(withBinary);
  if (v !== null && typeof v === "object") {
    const keys = Object.keys(v);
    if (keys.length === 1 && keys[0] === "$bin" && typeof v.$bin === "string") {
      return new Uint8Array(Buffer.from(v.$bin, "base64"));
    }
    return Object.fromEntries(keys.map((k) => [k, withBinary(v[k])]));
  }
  return v;
}
