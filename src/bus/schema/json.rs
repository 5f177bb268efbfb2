//! MessagePack `data` as JSON, for validation. Written here rather than with serde because the
//! rules differ from any serde mapping: what JSON cannot represent (binary, extension types,
//! non-string map keys, NaN and infinities) is refused with the place it was found, not turned
//! into something else; and nesting is bounded, so a frame of nested arrays cannot exhaust the
//! stack.

use rmp::Marker;
use serde_json::{Map, Number, Value};

/// Deepest nesting of arrays and maps accepted in `data` or a schema.
pub const MAX_DEPTH: usize = 128;

/// Why a MessagePack value is not representable as JSON: a JSON pointer to the place, and what
/// was found there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotJson {
    /// A JSON pointer into the value.
    pub path: String,
    /// What is wrong there.
    pub problem: String,
}

/// Converts one MessagePack value (exactly the bytes of one value) to JSON.
pub fn to_json(buf: &[u8]) -> Result<Value, NotJson> {
    let mut r = Reader { buf, pos: 0, path: Vec::new() };
    let v = r.value(0)?;
    if r.pos != buf.len() {
        return Err(r.fail(format!("{} bytes follow the value", buf.len() - r.pos)));
    }
    Ok(v)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: Vec<String>,
}

impl<'a> Reader<'a> {
    fn fail(&self, problem: impl Into<String>) -> NotJson {
        let mut path = String::new();
        for p in &self.path {
            path.push('/');
            path.push_str(&p.replace('~', "~0").replace('/', "~1"));
        }
        NotJson { path, problem: problem.into() }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], NotJson> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len()).ok_or_else(|| self.fail("the value is truncated"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn be(&mut self, n: usize) -> Result<u64, NotJson> {
        Ok(self.take(n)?.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    fn str(&mut self, len: u64) -> Result<String, NotJson> {
        let b = self.take(len as usize)?;
        std::str::from_utf8(b).map(str::to_owned).map_err(|_| self.fail("a string is not valid UTF-8"))
    }

    fn float(&self, f: f64) -> Result<Value, NotJson> {
        Number::from_f64(f).map(Value::Number).ok_or_else(|| self.fail(format!("{f} is not representable in JSON")))
    }

    // Long because it is one arm per MessagePack marker.
    fn value(&mut self, depth: usize) -> Result<Value, NotJson> {
        let m = Marker::from_u8(self.take(1)?[0]);
        Ok(match m {
            Marker::Null => Value::Null,
            Marker::True => Value::Bool(true),
            Marker::False => Value::Bool(false),
            Marker::FixPos(n) => Value::from(n),
            Marker::FixNeg(n) => Value::from(n),
            Marker::U8 => Value::from(self.be(1)?),
            Marker::U16 => Value::from(self.be(2)?),
            Marker::U32 => Value::from(self.be(4)?),
            Marker::U64 => Value::from(self.be(8)?),
            Marker::I8 => Value::from(self.be(1)? as u8 as i8),
            Marker::I16 => Value::from(self.be(2)? as u16 as i16),
            Marker::I32 => Value::from(self.be(4)? as u32 as i32),
            Marker::I64 => Value::from(self.be(8)? as i64),
            Marker::F32 => {
                let bits = self.be(4)? as u32;
                self.float(f64::from(f32::from_bits(bits)))?
            }
            Marker::F64 => {
                let bits = self.be(8)?;
                self.float(f64::from_bits(bits))?
            }
            Marker::FixStr(n) => Value::String(self.str(u64::from(n))?),
            Marker::Str8 => {
                let n = self.be(1)?;
                Value::String(self.str(n)?)
            }
            Marker::Str16 => {
                let n = self.be(2)?;
                Value::String(self.str(n)?)
            }
            Marker::Str32 => {
                let n = self.be(4)?;
                Value::String(self.str(n)?)
            }
            Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => return Err(self.fail("MessagePack binary is not representable in JSON")),
            Marker::FixExt1
            | Marker::FixExt2
            | Marker::FixExt4
            | Marker::FixExt8
            | Marker::FixExt16
            | Marker::Ext8
            | Marker::Ext16
            | Marker::Ext32 => return Err(self.fail("a MessagePack extension type is not representable in JSON")),
            Marker::Reserved => return Err(self.fail("the byte 0xc1 is not a MessagePack marker")),
            Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => {
                let n = match m {
                    Marker::FixArray(n) => u64::from(n),
                    Marker::Array16 => self.be(2)?,
                    _ => self.be(4)?,
                };
                if depth >= MAX_DEPTH {
                    return Err(self.fail(format!("nested deeper than {MAX_DEPTH}")));
                }
                // Every element takes at least one byte: a bogus length cannot over-allocate.
                let mut items = Vec::with_capacity((n as usize).min(self.buf.len() - self.pos));
                for i in 0..n {
                    self.path.push(i.to_string());
                    items.push(self.value(depth + 1)?);
                    self.path.pop();
                }
                Value::Array(items)
            }
            Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => {
                let n = match m {
                    Marker::FixMap(n) => u64::from(n),
                    Marker::Map16 => self.be(2)?,
                    _ => self.be(4)?,
                };
                if depth >= MAX_DEPTH {
                    return Err(self.fail(format!("nested deeper than {MAX_DEPTH}")));
                }
                let mut map = Map::with_capacity((n as usize).min(self.buf.len() - self.pos));
                for _ in 0..n {
                    let key = match Marker::from_u8(self.take(1)?[0]) {
                        Marker::FixStr(k) => self.str(u64::from(k))?,
                        Marker::Str8 => {
                            let k = self.be(1)?;
                            self.str(k)?
                        }
                        Marker::Str16 => {
                            let k = self.be(2)?;
                            self.str(k)?
                        }
                        Marker::Str32 => {
                            let k = self.be(4)?;
                            self.str(k)?
                        }
                        _ => return Err(self.fail("a map key that is not a string is not representable in JSON")),
                    };
                    self.path.push(key);
                    let v = self.value(depth + 1)?;
                    let key = self.path.pop().unwrap_or_default();
                    if map.insert(key, v).is_some() {
                        return Err(self.fail("a map has the same key twice"));
                    }
                }
                Value::Object(map)
            }
        })
    }
}

/// A JSON value as MessagePack (for replies that carry a schema).
pub fn to_msgpack(v: &Value) -> Vec<u8> {
    // Serialising a serde_json::Value cannot fail: its maps have string keys.
    rmp_serde::to_vec(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mp(v: &rmpv::Value) -> Vec<u8> {
        let mut b = Vec::new();
        rmpv::encode::write_value(&mut b, v).unwrap();
        b
    }

    #[test]
    fn json_values_convert_and_round_trip() {
        let v = serde_json::json!({"a": [1, -2, 3.5, "x", null, true], "b": {"c": 18446744073709551615u64, "d": -9223372036854775808i64}});
        assert_eq!(to_json(&to_msgpack(&v)).unwrap(), v);
    }

    #[test]
    fn what_json_cannot_hold_is_refused_with_its_place() {
        let bin = rmpv::Value::Map(vec![("items".into(), rmpv::Value::Array(vec![1.into(), rmpv::Value::Binary(vec![1, 2])]))]);
        assert_eq!(
            to_json(&mp(&bin)).unwrap_err(),
            NotJson { path: "/items/1".into(), problem: "MessagePack binary is not representable in JSON".into() }
        );
        let key = rmpv::Value::Map(vec![(rmpv::Value::from(1), 1.into())]);
        assert!(to_json(&mp(&key)).unwrap_err().problem.contains("not a string"));
        let ext = rmpv::Value::Map(vec![("a/b".into(), rmpv::Value::Ext(1, vec![0]))]);
        assert_eq!(to_json(&mp(&ext)).unwrap_err().path, "/a~1b");
        assert!(to_json(&mp(&rmpv::Value::F64(f64::NAN))).is_err());
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        let mut b = vec![0x91u8; 100_000];
        b.push(0xc0);
        assert!(to_json(&b).unwrap_err().problem.contains("nested deeper"));
        let mut ok = vec![0x91u8; MAX_DEPTH];
        ok.push(0xc0);
        assert!(to_json(&ok).is_ok());
    }

    #[test]
    fn truncated_and_lying_lengths_are_errors() {
        assert!(to_json(&[0xdd, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(to_json(&[0xa5, b'a']).is_err());
        assert!(to_json(&[]).is_err());
    }
}
