//! Bounded MessagePack reading and writing for one frame.
//!
//! Why not decode frames into `rmpv::Value` or with serde? A request carries `data` of any shape.
//! Decoding it into a value tree would cost memory proportional to its element count (a 1 MiB
//! frame of one-byte `nil`s becomes tens of MiB of `Value`s) and a second encode when the event
//! is stored and delivered. Instead [`Fields`] indexes the top-level map of a frame: each key is
//! checked once, each value is kept as a byte range of the frame and only validated for
//! structure, so `data` travels from the publisher's frame into the stored event and into every
//! `deliver` frame as the same bytes. Serde's errors also do not say which field was wrong in a
//! form one can put in a reply without matching on strings; [`FieldError`] does.

use std::ops::Range;

use bytes::Bytes;
use rmp::Marker;
use rmp::encode::ByteBuf;

/// At most this many fields in one map read through [`Fields`].
pub const MAX_FIELDS: usize = 256;

/// Why a frame (or a nested map) could not be read as MessagePack.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes end inside a value.
    #[error("the MessagePack value is truncated")]
    Truncated,
    /// The marker byte 0xc1, which MessagePack never uses.
    #[error("the byte 0xc1 is not a MessagePack marker")]
    Reserved,
    /// Bytes left after the first complete value.
    #[error("{0} bytes follow the MessagePack value")]
    Trailing(usize),
    /// The value is not a map.
    #[error("expected a MessagePack map, found {0}")]
    NotAMap(&'static str),
    /// A map key is not a string.
    #[error("a map key is {0}, not a string")]
    KeyNotString(&'static str),
    /// A key or string value is not valid UTF-8.
    #[error("a string is not valid UTF-8")]
    Utf8,
    /// More than [`MAX_FIELDS`] keys.
    #[error("the map has more than {MAX_FIELDS} fields")]
    TooManyFields,
    /// The same key twice.
    #[error("the field `{0}` appears twice")]
    DuplicateField(String),
}

/// A field that is missing or does not have the expected type or range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct FieldError {
    /// The field's name (a dotted path for nested maps, e.g. `event.id`).
    pub field: String,
    /// What is wrong with it, for people.
    pub problem: String,
}

impl FieldError {
    /// A field error with the given name and problem.
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        FieldError { field: field.into(), problem: problem.into() }
    }

    fn missing(field: &str) -> Self {
        FieldError::new(field, "required")
    }

    fn wrong_type(field: &str, expected: &str, found: &'static str) -> Self {
        FieldError::new(field, format!("expected {expected}, found {found}"))
    }
}

/// A read cursor over a byte slice with bounds checks on every read.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(DecodeError::Truncated)?;
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn be(&mut self, n: usize) -> Result<u64, DecodeError> {
        Ok(self.take(n)?.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    fn marker(&mut self) -> Result<Marker, DecodeError> {
        match Marker::from_u8(self.u8()?) {
            Marker::Reserved => Err(DecodeError::Reserved),
            m => Ok(m),
        }
    }
}

/// The kind of value a marker starts, for error messages.
pub fn kind(m: Marker) -> &'static str {
    use Marker::*;
    match m {
        Null => "nil",
        True | False => "a boolean",
        FixPos(_) | FixNeg(_) | U8 | U16 | U32 | U64 | I8 | I16 | I32 | I64 => "an integer",
        F32 | F64 => "a float",
        FixStr(_) | Str8 | Str16 | Str32 => "a string",
        Bin8 | Bin16 | Bin32 => "binary",
        FixArray(_) | Array16 | Array32 => "an array",
        FixMap(_) | Map16 | Map32 => "a map",
        FixExt1 | FixExt2 | FixExt4 | FixExt8 | FixExt16 | Ext8 | Ext16 | Ext32 => "an extension",
        Reserved => "the reserved marker",
    }
}

/// Skips one complete value starting at `cur.pos`, without recursion and without allocating:
/// `pending` counts the values still to be skipped, and a container adds its elements to it.
/// Every value takes at least one byte, so a count larger than the bytes left is truncated.
fn skip_value(cur: &mut Cursor<'_>) -> Result<(), DecodeError> {
    let mut pending: u64 = 1;
    while pending > 0 {
        pending -= 1;
        let data_len: u64 = match cur.marker()? {
            Marker::Null | Marker::True | Marker::False | Marker::FixPos(_) | Marker::FixNeg(_) => 0,
            Marker::U8 | Marker::I8 => 1,
            Marker::U16 | Marker::I16 => 2,
            Marker::U32 | Marker::I32 | Marker::F32 => 4,
            Marker::U64 | Marker::I64 | Marker::F64 => 8,
            Marker::FixStr(n) => u64::from(n),
            Marker::Str8 | Marker::Bin8 => cur.be(1)?,
            Marker::Str16 | Marker::Bin16 => cur.be(2)?,
            Marker::Str32 | Marker::Bin32 => cur.be(4)?,
            Marker::FixArray(n) => {
                pending += u64::from(n);
                0
            }
            Marker::Array16 => {
                pending += cur.be(2)?;
                0
            }
            Marker::Array32 => {
                pending += cur.be(4)?;
                0
            }
            Marker::FixMap(n) => {
                pending += 2 * u64::from(n);
                0
            }
            Marker::Map16 => {
                pending += 2 * cur.be(2)?;
                0
            }
            Marker::Map32 => {
                pending += 2 * cur.be(4)?;
                0
            }
            Marker::FixExt1 => 2,
            Marker::FixExt2 => 3,
            Marker::FixExt4 => 5,
            Marker::FixExt8 => 9,
            Marker::FixExt16 => 17,
            Marker::Ext8 => cur.be(1)? + 1,
            Marker::Ext16 => cur.be(2)? + 1,
            Marker::Ext32 => cur.be(4)? + 1,
            Marker::Reserved => return Err(DecodeError::Reserved),
        };
        let left = (cur.buf.len() - cur.pos) as u64;
        if data_len > left || pending > left {
            return Err(DecodeError::Truncated);
        }
        cur.pos += data_len as usize;
    }
    Ok(())
}

/// Checks that `buf` holds exactly one well-formed MessagePack value.
pub fn check_value(buf: &[u8]) -> Result<(), DecodeError> {
    let mut cur = Cursor { buf, pos: 0 };
    skip_value(&mut cur)?;
    match buf.len() - cur.pos {
        0 => Ok(()),
        n => Err(DecodeError::Trailing(n)),
    }
}

/// One value of a [`Fields`] map: a well-formed MessagePack value kept as bytes of the frame.
#[derive(Clone)]
pub struct Val<'a> {
    name: &'a str,
    buf: &'a Bytes,
    range: Range<usize>,
    raw: &'a [u8],
}

impl<'a> Val<'a> {
    fn marker(&self) -> Marker {
        // A Val is only made from a value that `skip_value` accepted, so it has a first byte.
        Marker::from_u8(self.raw.first().copied().unwrap_or(0xc1))
    }

    /// The raw MessagePack bytes of this value.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// True when the value is `nil`.
    pub fn is_nil(&self) -> bool {
        self.marker() == Marker::Null
    }

    /// The value as a string.
    pub fn str(&self) -> Result<&'a str, FieldError> {
        let m = self.marker();
        let mut cur = Cursor { buf: self.raw, pos: 1 };
        let len = match m {
            Marker::FixStr(n) => u64::from(n),
            Marker::Str8 => cur.be(1).map_err(|e| self.bad(e))?,
            Marker::Str16 => cur.be(2).map_err(|e| self.bad(e))?,
            Marker::Str32 => cur.be(4).map_err(|e| self.bad(e))?,
            other => return Err(FieldError::wrong_type(self.name, "a string", kind(other))),
        };
        let bytes = cur.take(len as usize).map_err(|e| self.bad(e))?;
        std::str::from_utf8(bytes).map_err(|_| FieldError::new(self.name, "not valid UTF-8"))
    }

    /// The value as an unsigned integer (any integer encoding, if it is not negative).
    pub fn u64(&self) -> Result<u64, FieldError> {
        let m = self.marker();
        let mut cur = Cursor { buf: self.raw, pos: 1 };
        let neg = || FieldError::new(self.name, "must not be negative");
        let v = match m {
            Marker::FixPos(n) => u64::from(n),
            Marker::U8 => cur.be(1).map_err(|e| self.bad(e))?,
            Marker::U16 => cur.be(2).map_err(|e| self.bad(e))?,
            Marker::U32 => cur.be(4).map_err(|e| self.bad(e))?,
            Marker::U64 => cur.be(8).map_err(|e| self.bad(e))?,
            Marker::FixNeg(_) => return Err(neg()),
            Marker::I8 | Marker::I16 | Marker::I32 | Marker::I64 => {
                let n = match m {
                    Marker::I8 => 1,
                    Marker::I16 => 2,
                    Marker::I32 => 4,
                    _ => 8,
                };
                let bits = cur.be(n).map_err(|e| self.bad(e))?;
                let shift = 64 - 8 * n as u32;
                // Sign-extend the big-endian two's complement value of n bytes.
                let v = ((bits << shift) as i64) >> shift;
                u64::try_from(v).map_err(|_| neg())?
            }
            other => {
                return Err(FieldError::wrong_type(self.name, "an unsigned integer", kind(other)));
            }
        };
        Ok(v)
    }

    /// The value as an unsigned integer within `lo..=hi`.
    pub fn u64_in(&self, lo: u64, hi: u64) -> Result<u64, FieldError> {
        let v = self.u64()?;
        if v < lo || v > hi {
            return Err(FieldError::new(self.name, format!("must be between {lo} and {hi}, got {v}")));
        }
        Ok(v)
    }

    /// The value as a boolean.
    pub fn bool(&self) -> Result<bool, FieldError> {
        match self.marker() {
            Marker::True => Ok(true),
            Marker::False => Ok(false),
            other => Err(FieldError::wrong_type(self.name, "a boolean", kind(other))),
        }
    }

    /// The value as bytes sharing the frame's buffer.
    pub fn bytes(&self) -> Bytes {
        self.buf.slice(self.range.clone())
    }

    /// The elements of an array value, each as bytes sharing the frame's buffer.
    pub fn array(&self) -> Result<Vec<Bytes>, FieldError> {
        let mut cur = Cursor { buf: self.raw, pos: 0 };
        let len = match cur.marker().map_err(|e| self.bad(e))? {
            Marker::FixArray(n) => u64::from(n),
            Marker::Array16 => cur.be(2).map_err(|e| self.bad(e))?,
            Marker::Array32 => cur.be(4).map_err(|e| self.bad(e))?,
            other => return Err(FieldError::wrong_type(self.name, "an array", kind(other))),
        };
        let mut items = Vec::new();
        for _ in 0..len {
            let start = cur.pos;
            skip_value(&mut cur).map_err(|e| self.bad(e))?;
            items.push(self.buf.slice(self.range.start + start..self.range.start + cur.pos));
        }
        Ok(items)
    }

    /// The elements of an array of strings.
    pub fn str_array(&self) -> Result<Vec<String>, FieldError> {
        self.array()?
            .into_iter()
            .map(|item| {
                let range = self.range.start..self.range.start + item.len();
                let v = Val { name: self.name, buf: self.buf, range, raw: &item };
                v.str().map(str::to_owned)
            })
            .collect()
    }

    /// The value as a nested map.
    pub fn map(&self) -> Result<Fields, FieldError> {
        Fields::parse(self.bytes()).map_err(|e| FieldError::new(self.name, e.to_string()))
    }

    fn bad(&self, e: DecodeError) -> FieldError {
        FieldError::new(self.name, e.to_string())
    }
}

/// The top-level map of a frame, indexed by key; values stay in the frame's bytes.
#[derive(Clone, Debug)]
pub struct Fields {
    buf: Bytes,
    entries: Vec<(Range<usize>, Range<usize>)>,
}

impl Fields {
    /// Indexes `buf`, which must hold exactly one MessagePack map with distinct string keys.
    pub fn parse(buf: Bytes) -> Result<Fields, DecodeError> {
        let mut cur = Cursor { buf: &buf, pos: 0 };
        let len = match cur.marker()? {
            Marker::FixMap(n) => u64::from(n),
            Marker::Map16 => cur.be(2)?,
            Marker::Map32 => cur.be(4)?,
            other => return Err(DecodeError::NotAMap(kind(other))),
        };
        if len as usize > MAX_FIELDS {
            return Err(DecodeError::TooManyFields);
        }
        let mut entries: Vec<(Range<usize>, Range<usize>)> = Vec::with_capacity(len as usize);
        for _ in 0..len {
            let key = match cur.marker()? {
                Marker::FixStr(n) => u64::from(n),
                Marker::Str8 => cur.be(1)?,
                Marker::Str16 => cur.be(2)?,
                Marker::Str32 => cur.be(4)?,
                other => return Err(DecodeError::KeyNotString(kind(other))),
            };
            let kstart = cur.pos;
            let k = cur.take(key as usize)?;
            let k = std::str::from_utf8(k).map_err(|_| DecodeError::Utf8)?;
            if entries.iter().any(|(r, _)| &buf[r.clone()] == k.as_bytes()) {
                return Err(DecodeError::DuplicateField(k.to_owned()));
            }
            let vstart = cur.pos;
            skip_value(&mut cur)?;
            entries.push((kstart..vstart, vstart..cur.pos));
        }
        if cur.pos != buf.len() {
            return Err(DecodeError::Trailing(buf.len() - cur.pos));
        }
        Ok(Fields { buf, entries })
    }

    /// The field `key`, if present (a `nil` value counts as absent).
    pub fn get<'a>(&'a self, key: &'a str) -> Option<Val<'a>> {
        self.entries.iter().find(|(k, _)| &self.buf[k.clone()] == key.as_bytes()).and_then(|(_, v)| {
            let val = Val { name: key, buf: &self.buf, range: v.clone(), raw: &self.buf[v.clone()] };
            (!val.is_nil()).then_some(val)
        })
    }

    /// The field `key`; an error naming it when absent.
    pub fn req<'a>(&'a self, key: &'a str) -> Result<Val<'a>, FieldError> {
        self.get(key).ok_or_else(|| FieldError::missing(key))
    }

    /// A required string field.
    pub fn str<'a>(&'a self, key: &'a str) -> Result<&'a str, FieldError> {
        self.req(key)?.str()
    }

    /// An optional string field.
    pub fn opt_str<'a>(&'a self, key: &'a str) -> Result<Option<&'a str>, FieldError> {
        self.get(key).map(|v| v.str()).transpose()
    }

    /// An optional string field, owned.
    pub fn opt_string(&self, key: &str) -> Result<Option<String>, FieldError> {
        Ok(self.opt_str(key)?.map(str::to_owned))
    }

    /// A required unsigned integer field.
    pub fn u64(&self, key: &str) -> Result<u64, FieldError> {
        self.req(key)?.u64()
    }

    /// An optional unsigned integer field.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>, FieldError> {
        self.get(key).map(|v| v.u64()).transpose()
    }

    /// An optional unsigned integer field within `lo..=hi`.
    pub fn opt_u64_in(&self, key: &str, lo: u64, hi: u64) -> Result<Option<u64>, FieldError> {
        self.get(key).map(|v| v.u64_in(lo, hi)).transpose()
    }

    /// An optional boolean field, false when absent.
    pub fn flag(&self, key: &str) -> Result<bool, FieldError> {
        Ok(self.get(key).map(|v| v.bool()).transpose()?.unwrap_or(false))
    }

    /// The raw bytes of a field's value, sharing the frame's buffer. Unlike [`Fields::get`],
    /// a present `nil` is returned (it is a legitimate `data`).
    pub fn raw(&self, key: &str) -> Option<Bytes> {
        self.entries.iter().find(|(k, _)| &self.buf[k.clone()] == key.as_bytes()).map(|(_, v)| self.buf.slice(v.clone()))
    }

    /// A nested map field.
    pub fn map(&self, key: &str) -> Result<Fields, FieldError> {
        self.req(key)?.map()
    }

    /// The keys present, in frame order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        // Keys were checked to be UTF-8 in `parse`.
        self.entries.iter().map(|(k, _)| std::str::from_utf8(&self.buf[k.clone()]).unwrap_or(""))
    }
}

/// Builds one MessagePack map with string keys; the map header is written when it is finished,
/// so the encoding is the canonical (smallest) one other MessagePack libraries produce.
#[derive(Default)]
pub struct MapWriter {
    body: ByteBuf,
    count: u32,
}

// Writing to a `ByteBuf` cannot fail: its error type is `Infallible`, so the `let Ok(..)`
// patterns below are irrefutable.
impl MapWriter {
    /// An empty map.
    pub fn new() -> Self {
        MapWriter::default()
    }

    /// An empty map with room for `n` bytes of fields.
    pub fn with_capacity(n: usize) -> Self {
        MapWriter { body: ByteBuf::with_capacity(n), count: 0 }
    }

    fn key(&mut self, k: &str) {
        self.count += 1;
        let Ok(()) = rmp::encode::write_str(&mut self.body, k);
    }

    /// A string field.
    pub fn str(&mut self, k: &str, v: &str) -> &mut Self {
        self.key(k);
        let Ok(()) = rmp::encode::write_str(&mut self.body, v);
        self
    }

    /// A string field, when `v` is present.
    pub fn opt_str(&mut self, k: &str, v: Option<&str>) -> &mut Self {
        if let Some(v) = v {
            self.str(k, v);
        }
        self
    }

    /// An unsigned integer field.
    pub fn uint(&mut self, k: &str, v: u64) -> &mut Self {
        self.key(k);
        let Ok(_) = rmp::encode::write_uint(&mut self.body, v);
        self
    }

    /// An unsigned integer field, when `v` is present.
    pub fn opt_uint(&mut self, k: &str, v: Option<u64>) -> &mut Self {
        if let Some(v) = v {
            self.uint(k, v);
        }
        self
    }

    /// A boolean field.
    pub fn bool(&mut self, k: &str, v: bool) -> &mut Self {
        self.key(k);
        let Ok(()) = rmp::encode::write_bool(&mut self.body, v);
        self
    }

    /// A field whose value is already MessagePack (one complete value).
    pub fn raw(&mut self, k: &str, v: &[u8]) -> &mut Self {
        self.key(k);
        let Ok(()) = rmp::encode::RmpWrite::write_bytes(&mut self.body, v);
        self
    }

    /// An array field whose elements are already MessagePack values.
    pub fn raw_array<'a>(&mut self, k: &str, items: impl ExactSizeIterator<Item = &'a [u8]>) -> &mut Self {
        self.key(k);
        let Ok(_) = rmp::encode::write_array_len(&mut self.body, items.len() as u32);
        for item in items {
            let Ok(()) = rmp::encode::RmpWrite::write_bytes(&mut self.body, item);
        }
        self
    }

    /// The encoded map.
    pub fn finish(self) -> Vec<u8> {
        let body = self.body.into_vec();
        let mut out = ByteBuf::with_capacity(body.len() + 5);
        let Ok(_) = rmp::encode::write_map_len(&mut out, self.count);
        let mut out = out.into_vec();
        out.extend_from_slice(&body);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: &rmpv::Value) -> Vec<u8> {
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, v).expect("encode to a Vec");
        buf
    }

    #[test]
    fn fields_index_keys_and_keep_values_as_bytes() {
        let data = rmpv::Value::Array(vec![1.into(), "x".into(), rmpv::Value::Nil]);
        let v = rmpv::Value::Map(vec![("op".into(), "publish".into()), ("data".into(), data.clone()), ("id".into(), 7.into())]);
        let f = Fields::parse(Bytes::from(enc(&v))).expect("a map");
        assert_eq!(f.str("op").unwrap(), "publish");
        assert_eq!(f.u64("id").unwrap(), 7);
        assert_eq!(f.raw("data").unwrap().as_ref(), enc(&data).as_slice());
        assert_eq!(f.keys().collect::<Vec<_>>(), vec!["op", "data", "id"]);
    }

    #[test]
    fn errors_name_the_field_and_the_types() {
        let v = rmpv::Value::Map(vec![("id".into(), "seven".into()), ("n".into(), (-1).into())]);
        let f = Fields::parse(Bytes::from(enc(&v))).unwrap();
        let e = f.u64("id").unwrap_err();
        assert_eq!((e.field.as_str(), e.problem.as_str()), ("id", "expected an unsigned integer, found a string"));
        assert_eq!(f.u64("n").unwrap_err().problem, "must not be negative");
        assert_eq!(f.str("op").unwrap_err().problem, "required");
    }

    #[test]
    fn negative_encodings_of_positive_numbers_are_accepted() {
        // Some encoders write small positive numbers with a signed marker.
        let f = Fields::parse(Bytes::from(vec![0x81, 0xa1, b'n', 0xd0, 0x05])).unwrap();
        assert_eq!(f.u64("n").unwrap(), 5);
        let f = Fields::parse(Bytes::from(vec![0x81, 0xa1, b'n', 0xd0, 0xfb])).unwrap();
        assert!(f.u64("n").is_err());
    }

    #[test]
    fn malformed_maps_are_refused() {
        assert_eq!(Fields::parse(Bytes::from(enc(&rmpv::Value::from(3)))).unwrap_err(), DecodeError::NotAMap("an integer"));
        assert_eq!(Fields::parse(Bytes::from_static(&[0x81, 0x01, 0x02])).unwrap_err(), DecodeError::KeyNotString("an integer"));
        assert_eq!(Fields::parse(Bytes::from_static(&[0x81, 0xa1, b'a'])).unwrap_err(), DecodeError::Truncated);
        assert_eq!(Fields::parse(Bytes::from_static(&[0x80, 0x00])).unwrap_err(), DecodeError::Trailing(1));
        assert_eq!(
            Fields::parse(Bytes::from_static(&[0x82, 0xa1, b'a', 1, 0xa1, b'a', 2])).unwrap_err(),
            DecodeError::DuplicateField("a".into())
        );
        // An array header that claims four billion elements in a few bytes.
        assert_eq!(
            Fields::parse(Bytes::from_static(&[0x81, 0xa1, b'a', 0xdd, 0xff, 0xff, 0xff, 0xff])).unwrap_err(),
            DecodeError::Truncated
        );
    }

    #[test]
    fn writer_output_decodes_as_the_same_map() {
        let mut w = MapWriter::new();
        w.str("op", "ok").uint("id", 300).bool("dead", true).raw("data", &enc(&rmpv::Value::from("x")));
        let v = rmpv::decode::read_value(&mut w.finish().as_slice()).unwrap();
        let want = rmpv::Value::Map(vec![
            ("op".into(), "ok".into()),
            ("id".into(), 300.into()),
            ("dead".into(), true.into()),
            ("data".into(), "x".into()),
        ]);
        assert_eq!(v, want);
    }
}
