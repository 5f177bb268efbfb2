//! The event: CloudEvents 1.0 attribute names, then `data`. It is encoded once, when the daemon
//! accepts a publish, and stored and delivered as those bytes.

use bytes::Bytes;

use crate::msgpack::{FieldError, Fields, MapWriter};

/// The CloudEvents version of every event.
pub const SPECVERSION: &str = "1.0";

/// One event, as stored in the log and carried by `deliver`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// `id`: a UUIDv7 string assigned by the daemon, or the publisher's idempotency key.
    pub id: String,
    /// `type`.
    pub event_type: String,
    /// `source`.
    pub source: String,
    /// `time`: RFC 3339, UTC.
    pub time: String,
    /// `schemaversion`: the schema version `data` was validated against; absent without schema.
    pub schemaversion: Option<u64>,
    /// `correlationid`.
    pub correlationid: String,
    /// `partitionkey`, when given.
    pub partitionkey: Option<String>,
    /// `traceparent`, when given.
    pub traceparent: Option<String>,
    /// `deliverat`: RFC 3339, UTC; present on an event published with `deliver_at` or
    /// `delay_ms`, which is delivered from then on.
    pub deliverat: Option<String>,
    /// `replayed`: true on a delivery that comes from a replay.
    pub replayed: bool,
    /// `data`: one MessagePack value, as the publisher sent it.
    pub data: Bytes,
}

impl Event {
    /// The event as a MessagePack map.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = MapWriter::with_capacity(160 + self.data.len());
        w.str("specversion", SPECVERSION)
            .str("id", &self.id)
            .str("type", &self.event_type)
            .str("source", &self.source)
            .str("time", &self.time)
            .opt_uint("schemaversion", self.schemaversion)
            .str("correlationid", &self.correlationid)
            .opt_str("partitionkey", self.partitionkey.as_deref())
            .opt_str("traceparent", self.traceparent.as_deref())
            .opt_str("deliverat", self.deliverat.as_deref());
        if self.replayed {
            w.bool("replayed", true);
        }
        w.raw("data", &self.data);
        w.finish()
    }

    /// Reads an event from its map. Attributes it does not know are ignored.
    pub fn decode(buf: Bytes) -> Result<Event, FieldError> {
        let f = Fields::parse(buf).map_err(|e| FieldError::new("event", e.to_string()))?;
        Event::from_fields(&f)
    }

    /// Reads an event from an already indexed map.
    pub fn from_fields(f: &Fields) -> Result<Event, FieldError> {
        Ok(Event {
            id: f.str("id")?.to_owned(),
            event_type: f.str("type")?.to_owned(),
            source: f.opt_string("source")?.unwrap_or_default(),
            time: f.opt_string("time")?.unwrap_or_default(),
            schemaversion: f.opt_u64("schemaversion")?,
            correlationid: f.opt_string("correlationid")?.unwrap_or_default(),
            partitionkey: f.opt_string("partitionkey")?,
            traceparent: f.opt_string("traceparent")?,
            deliverat: f.opt_string("deliverat")?,
            replayed: f.flag("replayed")?,
            data: f.raw("data").ok_or_else(|| FieldError::new("data", "required"))?,
        })
    }

    /// The same event marked `replayed: true`, re-encoded.
    pub fn mark_replayed(buf: Bytes) -> Result<Vec<u8>, FieldError> {
        let mut e = Event::decode(buf)?;
        e.replayed = true;
        Ok(e.encode())
    }

    /// `data` as a MessagePack value tree.
    pub fn data_value(&self) -> Result<rmpv::Value, rmpv::decode::Error> {
        rmpv::decode::read_value(&mut self.data.as_ref())
    }
}
