//! What the daemon sends: `ok` and `error` replies (which echo the request's `id`) and the
//! `deliver` push (which carries none).

use bytes::Bytes;

use crate::error::{Detail, ErrorCode};
use crate::id::RequestId;
use crate::msgpack::{DecodeError, FieldError, Fields, MapWriter};

/// The fields of an `ok` reply beside `op` and `id`.
pub trait Body: Sized {
    /// Writes the fields.
    fn write(&self, w: &mut MapWriter);
    /// Reads the fields back.
    fn read(f: &Fields) -> Result<Self, FieldError>;
}

/// An `ok` with no other field.
impl Body for () {
    fn write(&self, _: &mut MapWriter) {}
    fn read(_: &Fields) -> Result<(), FieldError> {
        Ok(())
    }
}

/// Encodes an `ok` reply.
pub fn encode_ok(id: Option<&RequestId>, body: &impl Body) -> Vec<u8> {
    let mut w = MapWriter::with_capacity(64);
    w.str("op", "ok");
    RequestId::write_into(id, &mut w);
    body.write(&mut w);
    w.finish()
}

/// The reply to `hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloOk {
    /// `protocol`: the version the daemon speaks.
    pub protocol: u64,
    /// `server`: `sidebus/VERSION`.
    pub server: String,
    /// `node`: the daemon's node name.
    pub node: String,
    /// `max_frame_bytes`: the largest frame body either side sends.
    pub max_frame_bytes: u64,
}

impl Body for HelloOk {
    fn write(&self, w: &mut MapWriter) {
        w.uint("protocol", self.protocol).str("server", &self.server).str("node", &self.node).uint("max_frame_bytes", self.max_frame_bytes);
    }
    fn read(f: &Fields) -> Result<Self, FieldError> {
        Ok(HelloOk {
            protocol: f.u64("protocol")?,
            server: f.str("server")?.to_owned(),
            node: f.str("node")?.to_owned(),
            max_frame_bytes: f.u64("max_frame_bytes")?,
        })
    }
}

/// How durable an acknowledged publish is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishStatus {
    /// In the Postgres log and in Redis.
    Committed,
    /// Fsynced in the local spool, to be flushed.
    Spooled,
}

impl PublishStatus {
    /// The value on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            PublishStatus::Committed => "committed",
            PublishStatus::Spooled => "spooled",
        }
    }
}

/// The reply to `publish`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// `event_id`.
    pub event_id: String,
    /// `status`.
    pub status: PublishStatus,
    /// `duplicate`: present and true when an event with this id was already stored, in which
    /// case nothing new was stored or delivered.
    pub duplicate: bool,
}

impl Body for Published {
    fn write(&self, w: &mut MapWriter) {
        w.str("event_id", &self.event_id).str("status", self.status.as_str());
        if self.duplicate {
            w.bool("duplicate", true);
        }
    }
    fn read(f: &Fields) -> Result<Self, FieldError> {
        let status = match f.str("status")? {
            "committed" => PublishStatus::Committed,
            "spooled" => PublishStatus::Spooled,
            _ => return Err(FieldError::new("status", "must be committed or spooled")),
        };
        Ok(Published { event_id: f.str("event_id")?.to_owned(), status, duplicate: f.flag("duplicate")? })
    }
}

/// The reply to `subscribe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribed {
    /// `sub`: the subscription's number on this connection.
    pub sub: u64,
}

impl Body for Subscribed {
    fn write(&self, w: &mut MapWriter) {
        w.uint("sub", self.sub);
    }
    fn read(f: &Fields) -> Result<Self, FieldError> {
        Ok(Subscribed { sub: f.u64("sub")? })
    }
}

/// An `error` reply (or, without `id`, an error push about a request that carried none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    /// The request's `id`, when it had one.
    pub id: Option<RequestId>,
    /// `code`.
    pub code: ErrorCode,
    /// `message`, for people.
    pub message: String,
    /// `details`.
    pub details: Vec<Detail>,
    /// `tag`: on `unknown_tag`, the tag the daemon does not know (an `ack`, `nack` or `extend`
    /// sent without `id` is answered with an error push: this says which one).
    pub tag: Option<u64>,
    /// `sub`: on an error push that ends a subscription (its group was deleted), the
    /// subscription it ended; no `deliver` for it follows.
    pub sub: Option<u64>,
}

impl ErrorReply {
    /// An error without details.
    pub fn new(id: Option<RequestId>, code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorReply { id, code, message: message.into(), details: vec![], tag: None, sub: None }
    }

    /// Encodes the reply.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = MapWriter::with_capacity(64 + self.message.len());
        w.str("op", "error");
        RequestId::write_into(self.id.as_ref(), &mut w);
        w.str("code", self.code.as_str()).str("message", &self.message);
        let details: Vec<Vec<u8>> = self.details.iter().map(Detail::encode).collect();
        w.raw_array("details", details.iter().map(Vec::as_slice));
        if let Some(tag) = self.tag {
            w.uint("tag", tag);
        }
        if let Some(sub) = self.sub {
            w.uint("sub", sub);
        }
        w.finish()
    }

    fn read(f: &Fields) -> Result<Self, FieldError> {
        let code = f.str("code")?;
        // A code this client does not know (from a newer daemon) is kept in the message.
        let (code, message) = match ErrorCode::parse(code) {
            Some(c) => (c, f.opt_string("message")?.unwrap_or_default()),
            None => (ErrorCode::Internal, format!("{code}: {}", f.opt_string("message")?.unwrap_or_default())),
        };
        let mut details = vec![];
        if let Some(v) = f.get("details") {
            for item in v.array()? {
                let d = Fields::parse(item).map_err(|e| FieldError::new("details", e.to_string()))?;
                details.push(Detail::decode(&d)?);
            }
        }
        Ok(ErrorReply { id: RequestId::read(f)?, code, message, details, tag: f.opt_u64("tag")?, sub: f.opt_u64("sub")? })
    }
}

/// The `deliver` push.
#[derive(Debug, Clone, PartialEq)]
pub struct Deliver {
    /// `sub`.
    pub sub: u64,
    /// `tag`: unique on this connection; `ack`, `nack` and `extend` name it.
    pub tag: u64,
    /// `attempt`: 1 on the first delivery.
    pub attempt: u64,
    /// `event`: the encoded event map.
    pub event: Bytes,
}

impl Deliver {
    /// Bytes a `deliver` frame adds around its event, at most.
    pub const OVERHEAD: usize = 64;

    /// Encodes the push; the event's bytes are copied in unchanged.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = MapWriter::with_capacity(Self::OVERHEAD + self.event.len());
        w.str("op", "deliver").uint("sub", self.sub).uint("tag", self.tag).uint("attempt", self.attempt).raw("event", &self.event);
        w.finish()
    }
}

/// Any frame the daemon sends, as a client reads it.
#[derive(Debug, Clone)]
pub enum ServerFrame {
    /// `ok`: the fields are read with the [`Body`] the client expects for its request.
    Ok {
        /// The echoed `id`.
        id: Option<RequestId>,
        /// All fields of the reply.
        fields: Fields,
    },
    /// `error`.
    Error(ErrorReply),
    /// `deliver`.
    Deliver(Deliver),
    /// A push this client does not know (from a newer daemon); to be ignored.
    Other {
        /// Its `op`.
        op: String,
    },
}

/// Why a frame from the daemon could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not a MessagePack map.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A field is missing or wrong.
    #[error(transparent)]
    Field(#[from] FieldError),
}

impl ServerFrame {
    /// Parses one frame body from the daemon.
    pub fn parse(frame: Bytes) -> Result<ServerFrame, FrameError> {
        let f = Fields::parse(frame)?;
        Ok(match f.str("op")? {
            "ok" => ServerFrame::Ok { id: RequestId::read(&f)?, fields: f },
            "error" => ServerFrame::Error(ErrorReply::read(&f)?),
            "deliver" => ServerFrame::Deliver(Deliver {
                sub: f.u64("sub")?,
                tag: f.u64("tag")?,
                attempt: f.u64("attempt")?,
                event: f.req("event")?.bytes(),
            }),
            other => ServerFrame::Other { op: other.to_owned() },
        })
    }
}
