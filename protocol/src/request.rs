//! Requests: what a client sends. Each op is parsed from a frame with errors that name the field,
//! and encoded by clients with [`RequestFrame::encode`].

use bytes::Bytes;

use crate::dead_letters::{self, DlqAction, DlqList, MAX_DLQ_LIMIT};
use crate::error::{Detail, ErrorCode};
use crate::groups::{GroupDelete, GroupReset, ResetTo};
pub use crate::id::RequestId;
use crate::msgpack::{DecodeError, FieldError, Fields, MapWriter};
use crate::names;
use crate::replay::Replay;
use crate::schema::{Compatibility, RegisterSchema};

/// Largest `max_in_flight` of one subscription.
pub const MAX_IN_FLIGHT: u64 = 1024;
/// Largest `max_attempts`.
pub const MAX_ATTEMPTS: u64 = 1000;
/// Smallest and largest `ack_timeout_ms`.
pub const ACK_TIMEOUT_MS_RANGE: (u64, u64) = (100, 24 * 3600 * 1000);
/// Largest `delay_ms` of a `nack`.
pub const MAX_DELAY_MS: u64 = 24 * 3600 * 1000;
/// Furthest a publish may be delayed (`delay_ms`, `deliver_at`): 90 days.
pub const MAX_PUBLISH_DELAY_MS: u64 = 90 * 24 * 3600 * 1000;
/// Longest `error` text of a `nack`; longer texts are cut at a character boundary.
pub const MAX_ERROR_BYTES: usize = 4096;

/// When a publish is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// After the local spool's fsync or the backends' commit, whichever comes first.
    #[default]
    Local,
    /// After the event is in the Postgres log and in Redis.
    Committed,
}

impl Durability {
    /// The value on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Local => "local",
            Durability::Committed => "committed",
        }
    }
}

/// `publish`: store an event of `event_type` and deliver it to every group of that type.
#[derive(Debug, Clone, PartialEq)]
pub struct Publish {
    /// `type`.
    pub event_type: String,
    /// `data`: exactly one MessagePack value, kept as its bytes.
    pub data: Bytes,
    /// `version`: the schema version to validate against (default: the latest).
    pub version: Option<u64>,
    /// `source` (default: the client name given in `hello`).
    pub source: Option<String>,
    /// The event id and idempotency key: `event_id`, or a string `id`.
    pub event_id: Option<String>,
    /// `correlationid` (default: the event id).
    pub correlationid: Option<String>,
    /// `partitionkey`.
    pub partitionkey: Option<String>,
    /// `traceparent` (W3C trace context).
    pub traceparent: Option<String>,
    /// `durability`.
    pub durability: Durability,
    /// `deliver_at`: RFC 3339; deliver from then on (the daemon checks the time).
    pub deliver_at: Option<String>,
    /// `delay_ms`: deliver this long after the publish.
    pub delay_ms: Option<u64>,
}

impl Publish {
    /// A publish of `data` (one encoded MessagePack value) with every option at its default.
    pub fn new(event_type: impl Into<String>, data: Bytes) -> Publish {
        Publish {
            event_type: event_type.into(),
            data,
            version: None,
            source: None,
            event_id: None,
            correlationid: None,
            partitionkey: None,
            traceparent: None,
            durability: Durability::Local,
            deliver_at: None,
            delay_ms: None,
        }
    }
}

/// `subscribe`: receive `deliver` pushes for `event_type` as a consumer of `group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// `type`.
    pub event_type: String,
    /// `group`.
    pub group: String,
    /// `max_in_flight`: unacknowledged deliveries at most (default 64).
    pub max_in_flight: Option<u64>,
    /// `max_attempts` before dead-lettering (default: the daemon's).
    pub max_attempts: Option<u64>,
    /// `ack_timeout_ms`: the lease of one delivery (default: the daemon's).
    pub ack_timeout_ms: Option<u64>,
}

/// `nack`: the delivery failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    /// `tag` of the delivery.
    pub tag: u64,
    /// `error`: why, kept with the event (cut to [`MAX_ERROR_BYTES`]).
    pub error: Option<String>,
    /// `delay_ms`: when to retry, instead of the backoff.
    pub delay_ms: Option<u64>,
    /// `dead`: straight to the dead-letter queue.
    pub dead: bool,
}

/// One request.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// `hello`: check the protocol version and name the client.
    Hello {
        /// `protocol`.
        protocol: u64,
        /// `client`: the service's name, the default `source` of its publishes.
        client: Option<String>,
    },
    /// `ping`.
    Ping,
    /// `publish`.
    Publish(Publish),
    /// `subscribe`.
    Subscribe(Subscribe),
    /// `ack`: the delivery `tag` is done.
    Ack {
        /// `tag`.
        tag: u64,
    },
    /// `nack`.
    Nack(Nack),
    /// `extend`: restart the lease of `tag`.
    Extend {
        /// `tag`.
        tag: u64,
    },
    /// `unsubscribe`: end subscription `sub`; its deliveries go back to the group.
    Unsubscribe {
        /// `sub`.
        sub: u64,
    },
    /// `register_schema`.
    RegisterSchema(RegisterSchema),
    /// `get_schema`: a version of a type's schema (default: the latest).
    GetSchema {
        /// `type`.
        event_type: String,
        /// `version`.
        version: Option<u64>,
    },
    /// `list_schemas`: every type with a schema.
    ListSchemas,
    /// `replay`.
    Replay(Replay),
    /// `replay_cancel`: stop a running replay.
    ReplayCancel {
        /// `replay`: its id.
        replay: String,
    },
    /// `replays`: running replays with their progress.
    Replays {
        /// `all`: also those that ended in the last day.
        all: bool,
    },
    /// `dlq_list`.
    DlqList(DlqList),
    /// `dlq_redrive`.
    DlqRedrive(DlqAction),
    /// `dlq_purge`.
    DlqPurge(DlqAction),
    /// `stats`: counters, the spool, and every type and group.
    Stats,
    /// `groups`: every group (of `type`, when given) with its state.
    Groups {
        /// `type`.
        event_type: Option<String>,
    },
    /// `group_delete`.
    GroupDelete(GroupDelete),
    /// `group_reset`.
    GroupReset(GroupReset),
}

impl Request {
    /// The op name on the wire.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Ping => "ping",
            Request::Publish(_) => "publish",
            Request::Subscribe(_) => "subscribe",
            Request::Ack { .. } => "ack",
            Request::Nack(_) => "nack",
            Request::Extend { .. } => "extend",
            Request::Unsubscribe { .. } => "unsubscribe",
            Request::RegisterSchema(_) => "register_schema",
            Request::GetSchema { .. } => "get_schema",
            Request::ListSchemas => "list_schemas",
            Request::Replay(_) => "replay",
            Request::ReplayCancel { .. } => "replay_cancel",
            Request::Replays { .. } => "replays",
            Request::DlqList(_) => "dlq_list",
            Request::DlqRedrive(_) => "dlq_redrive",
            Request::DlqPurge(_) => "dlq_purge",
            Request::Stats => "stats",
            Request::Groups { .. } => "groups",
            Request::GroupDelete(_) => "group_delete",
            Request::GroupReset(_) => "group_reset",
        }
    }

    /// True for the ops that are answered only when they carry an `id`.
    pub fn reply_only_with_id(&self) -> bool {
        matches!(self, Request::Ack { .. } | Request::Nack(_) | Request::Extend { .. })
    }
}

/// A request with its `id`.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestFrame {
    /// `id`; `None` only for `ack`, `nack` and `extend` sent without one.
    pub id: Option<RequestId>,
    /// The op and its fields.
    pub request: Request,
}

/// Why a frame is not a valid request, ready to become an `error` reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ParseError {
    /// The request's `id`, when it could be read.
    pub id: Option<RequestId>,
    /// The error code.
    pub code: ErrorCode,
    /// For people.
    pub message: String,
    /// The offending field, when there is one.
    pub details: Vec<Detail>,
}

impl ParseError {
    fn bad_frame(e: DecodeError) -> ParseError {
        ParseError {
            id: None,
            code: ErrorCode::BadFrame,
            message: format!("the frame is not a MessagePack map with string keys: {e}"),
            details: vec![],
        }
    }

    fn bad_request(id: Option<RequestId>, e: FieldError) -> ParseError {
        ParseError { id, code: ErrorCode::BadRequest, message: format!("bad field {}: {}", e.field, e.problem), details: vec![e.into()] }
    }
}

fn text(f: &Fields, key: &str) -> Result<Option<String>, FieldError> {
    let v = f.opt_string(key)?;
    if let Some(s) = &v {
        names::check_text(key, s)?;
    }
    Ok(v)
}

fn type_and_group(f: &Fields) -> Result<(String, String), FieldError> {
    let event_type = f.str("type")?.to_owned();
    names::check_type("type", &event_type)?;
    let group = f.str("group")?.to_owned();
    names::check_group("group", &group)?;
    Ok((event_type, group))
}

fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

impl RequestFrame {
    /// Parses one frame body.
    pub fn parse(frame: Bytes) -> Result<RequestFrame, ParseError> {
        let f = Fields::parse(frame).map_err(ParseError::bad_frame)?;
        let id = RequestId::read(&f).map_err(|e| ParseError::bad_request(None, e))?;
        let op = f.str("op").map_err(|e| ParseError::bad_request(id.clone(), e))?;
        let request = match Self::parse_op(op, &f, &id) {
            Ok(Some(r)) => r,
            Ok(None) => {
                return Err(ParseError {
                    id,
                    code: ErrorCode::UnknownOp,
                    message: format!("unknown op `{}`", cut(op.to_owned(), 64)),
                    details: vec![],
                });
            }
            Err(e) => return Err(ParseError::bad_request(id, e)),
        };
        match (&id, &request) {
            (None, r) if !r.reply_only_with_id() => Err(ParseError::bad_request(None, FieldError::new("id", "required"))),
            (Some(RequestId::Key(_)), r) if !matches!(r, Request::Publish(_)) => Err(ParseError::bad_request(
                None,
                FieldError::new("id", "must be an unsigned integer (a string id is only taken by publish)"),
            )),
            _ => Ok(RequestFrame { id, request }),
        }
    }

    // Long because it is one arm per op.
    fn parse_op(op: &str, f: &Fields, id: &Option<RequestId>) -> Result<Option<Request>, FieldError> {
        Ok(Some(match op {
            "hello" => Request::Hello { protocol: f.u64("protocol")?, client: text(f, "client")? },
            "ping" => Request::Ping,
            "publish" => {
                let event_type = f.str("type")?.to_owned();
                names::check_type("type", &event_type)?;
                let data = f.raw("data").ok_or_else(|| FieldError::new("data", "required"))?;
                let mut event_id = f.opt_string("event_id")?;
                if let Some(RequestId::Key(k)) = id {
                    match &event_id {
                        Some(e) if e != k => {
                            return Err(FieldError::new("event_id", "differs from the string `id`; give one of them"));
                        }
                        _ => event_id = Some(k.clone()),
                    }
                }
                if let Some(e) = &event_id {
                    names::check_event_id("event_id", e)?;
                }
                let durability = match f.opt_str("durability")? {
                    None | Some("local") => Durability::Local,
                    Some("committed") => Durability::Committed,
                    Some(_) => {
                        return Err(FieldError::new("durability", "must be \"local\" or \"committed\""));
                    }
                };
                Request::Publish(Publish {
                    event_type,
                    data,
                    version: f.opt_u64_in("version", 1, u64::from(u32::MAX))?,
                    source: text(f, "source")?,
                    event_id,
                    correlationid: text(f, "correlationid")?,
                    partitionkey: text(f, "partitionkey")?,
                    traceparent: text(f, "traceparent")?,
                    durability,
                    deliver_at: {
                        let at = text(f, "deliver_at")?;
                        if at.is_some() && f.get("delay_ms").is_some() {
                            return Err(FieldError::new("deliver_at", "give deliver_at or delay_ms, not both"));
                        }
                        at
                    },
                    delay_ms: f.opt_u64_in("delay_ms", 0, MAX_PUBLISH_DELAY_MS)?,
                })
            }
            "subscribe" => {
                let event_type = f.str("type")?.to_owned();
                names::check_type("type", &event_type)?;
                let group = f.str("group")?.to_owned();
                names::check_group("group", &group)?;
                Request::Subscribe(Subscribe {
                    event_type,
                    group,
                    max_in_flight: f.opt_u64_in("max_in_flight", 1, MAX_IN_FLIGHT)?,
                    max_attempts: f.opt_u64_in("max_attempts", 1, MAX_ATTEMPTS)?,
                    ack_timeout_ms: f.opt_u64_in("ack_timeout_ms", ACK_TIMEOUT_MS_RANGE.0, ACK_TIMEOUT_MS_RANGE.1)?,
                })
            }
            "ack" => Request::Ack { tag: f.u64("tag")? },
            "nack" => Request::Nack(Nack {
                tag: f.u64("tag")?,
                error: f.opt_string("error")?.map(|e| cut(e, MAX_ERROR_BYTES)),
                delay_ms: f.opt_u64_in("delay_ms", 0, MAX_DELAY_MS)?,
                dead: f.flag("dead")?,
            }),
            "extend" => Request::Extend { tag: f.u64("tag")? },
            "unsubscribe" => Request::Unsubscribe { sub: f.u64("sub")? },
            "register_schema" => {
                let event_type = f.str("type")?.to_owned();
                names::check_type("type", &event_type)?;
                let schema = f.req("schema")?;
                // A JSON Schema is an object or a boolean; the daemon checks the rest.
                let is_schema = schema.raw().first().is_some_and(|b| {
                    matches!(
                        rmp::Marker::from_u8(*b),
                        rmp::Marker::FixMap(_) | rmp::Marker::Map16 | rmp::Marker::Map32 | rmp::Marker::True | rmp::Marker::False
                    )
                });
                if !is_schema {
                    return Err(FieldError::new("schema", "must be a map (a JSON Schema object) or a boolean"));
                }
                Request::RegisterSchema(RegisterSchema {
                    event_type,
                    schema: schema.bytes(),
                    compatibility: Compatibility::read(f, "compatibility")?,
                    strict: f.get("strict").map(|v| v.bool()).transpose()?,
                    dry_run: f.flag("dry_run")?,
                })
            }
            "get_schema" => {
                let event_type = f.str("type")?.to_owned();
                names::check_type("type", &event_type)?;
                Request::GetSchema { event_type, version: f.opt_u64_in("version", 1, u64::from(u32::MAX))? }
            }
            "list_schemas" => Request::ListSchemas,
            "replay" => {
                let (event_type, group) = type_and_group(f)?;
                Request::Replay(Replay { event_type, group, since: f.str("since")?.to_owned(), until: f.opt_string("until")? })
            }
            "replay_cancel" => Request::ReplayCancel { replay: f.str("replay")?.to_owned() },
            "replays" => Request::Replays { all: f.flag("all")? },
            "dlq_list" => {
                let (event_type, group) = type_and_group(f)?;
                Request::DlqList(DlqList {
                    event_type,
                    group,
                    limit: f.opt_u64_in("limit", 1, MAX_DLQ_LIMIT)?,
                    after: f.opt_u64("after")?,
                    ids: dead_letters::ids(f)?,
                })
            }
            "dlq_redrive" | "dlq_purge" => {
                let (event_type, group) = type_and_group(f)?;
                let action = DlqAction {
                    event_type,
                    group,
                    ids: dead_letters::ids(f)?,
                    rate: if op == "dlq_redrive" { f.opt_u64_in("rate", 1, 1_000_000)? } else { None },
                };
                if op == "dlq_redrive" { Request::DlqRedrive(action) } else { Request::DlqPurge(action) }
            }
            "stats" => Request::Stats,
            "groups" => {
                let event_type = f.opt_string("type")?;
                if let Some(t) = &event_type {
                    names::check_type("type", t)?;
                }
                Request::Groups { event_type }
            }
            "group_delete" => {
                let (event_type, group) = type_and_group(f)?;
                Request::GroupDelete(GroupDelete { event_type, group, force: f.flag("force")? })
            }
            "group_reset" => {
                let (event_type, group) = type_and_group(f)?;
                let to = f.str("to")?;
                names::check_text("to", to)?;
                Request::GroupReset(GroupReset { event_type, group, to: ResetTo::parse(to) })
            }
            _ => return Ok(None),
        }))
    }

    /// Encodes the request as a frame body.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = MapWriter::with_capacity(64);
        w.str("op", self.request.op());
        RequestId::write_into(self.id.as_ref(), &mut w);
        match &self.request {
            Request::Hello { protocol, client } => {
                w.uint("protocol", *protocol).opt_str("client", client.as_deref());
            }
            Request::Ping => {}
            Request::Publish(p) => {
                w.str("type", &p.event_type).raw("data", &p.data).opt_uint("version", p.version);
                w.opt_str("source", p.source.as_deref());
                // A string request id already carries the event id.
                if !matches!(&self.id, Some(RequestId::Key(_))) {
                    w.opt_str("event_id", p.event_id.as_deref());
                }
                w.opt_str("correlationid", p.correlationid.as_deref())
                    .opt_str("partitionkey", p.partitionkey.as_deref())
                    .opt_str("traceparent", p.traceparent.as_deref());
                if p.durability != Durability::Local {
                    w.str("durability", p.durability.as_str());
                }
                w.opt_str("deliver_at", p.deliver_at.as_deref()).opt_uint("delay_ms", p.delay_ms);
            }
            Request::Subscribe(s) => {
                w.str("type", &s.event_type)
                    .str("group", &s.group)
                    .opt_uint("max_in_flight", s.max_in_flight)
                    .opt_uint("max_attempts", s.max_attempts)
                    .opt_uint("ack_timeout_ms", s.ack_timeout_ms);
            }
            Request::Ack { tag } | Request::Extend { tag } => {
                w.uint("tag", *tag);
            }
            Request::Nack(n) => {
                w.uint("tag", n.tag).opt_str("error", n.error.as_deref()).opt_uint("delay_ms", n.delay_ms);
                if n.dead {
                    w.bool("dead", true);
                }
            }
            Request::Unsubscribe { sub } => {
                w.uint("sub", *sub);
            }
            Request::RegisterSchema(r) => {
                w.str("type", &r.event_type).raw("schema", &r.schema);
                if let Some(c) = r.compatibility {
                    w.str("compatibility", c.as_str());
                }
                if let Some(strict) = r.strict {
                    w.bool("strict", strict);
                }
                if r.dry_run {
                    w.bool("dry_run", true);
                }
            }
            Request::GetSchema { event_type, version } => {
                w.str("type", event_type).opt_uint("version", *version);
            }
            Request::ListSchemas => {}
            Request::Replay(r) => {
                w.str("type", &r.event_type).str("group", &r.group).str("since", &r.since).opt_str("until", r.until.as_deref());
            }
            Request::ReplayCancel { replay } => {
                w.str("replay", replay);
            }
            Request::Replays { all } => {
                if *all {
                    w.bool("all", true);
                }
            }
            Request::DlqList(l) => {
                w.str("type", &l.event_type).str("group", &l.group).opt_uint("limit", l.limit).opt_uint("after", l.after);
                dead_letters::write_ids(&mut w, &l.ids);
            }
            Request::Stats => {}
            Request::Groups { event_type } => {
                w.opt_str("type", event_type.as_deref());
            }
            Request::GroupDelete(d) => {
                w.str("type", &d.event_type).str("group", &d.group);
                if d.force {
                    w.bool("force", true);
                }
            }
            Request::GroupReset(r) => {
                w.str("type", &r.event_type).str("group", &r.group).str("to", r.to.as_str());
            }
            Request::DlqRedrive(a) | Request::DlqPurge(a) => {
                w.str("type", &a.event_type).str("group", &a.group);
                dead_letters::write_ids(&mut w, &a.ids);
                w.opt_uint("rate", a.rate);
            }
        }
        w.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(v: rmpv::Value) -> Bytes {
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, &v).unwrap();
        Bytes::from(buf)
    }

    fn map(pairs: &[(&str, rmpv::Value)]) -> rmpv::Value {
        rmpv::Value::Map(pairs.iter().map(|(k, v)| (rmpv::Value::from(*k), v.clone())).collect())
    }

    #[test]
    fn a_publish_missing_its_type_names_the_field() {
        let e = RequestFrame::parse(frame(map(&[("op", "publish".into()), ("id", 4.into()), ("data", 1.into())]))).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert_eq!(e.id, Some(RequestId::Num(4)));
        assert_eq!(e.details, vec![Detail::Field { field: "type".into(), message: "required".into() }]);
    }

    #[test]
    fn a_string_id_on_publish_is_the_event_id() {
        let r = RequestFrame::parse(frame(map(&[
            ("op", "publish".into()),
            ("id", "order-1".into()),
            ("type", "a".into()),
            ("data", rmpv::Value::Nil),
        ])))
        .unwrap();
        assert_eq!(r.id, Some(RequestId::Key("order-1".into())));
        let Request::Publish(p) = r.request else { panic!("not a publish") };
        assert_eq!(p.event_id.as_deref(), Some("order-1"));
        assert_eq!(p.data.as_ref(), &[0xc0]);
    }

    #[test]
    fn a_string_id_elsewhere_is_refused() {
        let e = RequestFrame::parse(frame(map(&[("op", "ping".into()), ("id", "x".into())]))).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
    }

    #[test]
    fn ack_without_id_is_valid_but_ping_is_not() {
        assert!(RequestFrame::parse(frame(map(&[("op", "ack".into()), ("tag", 1.into())]))).is_ok());
        let e = RequestFrame::parse(frame(map(&[("op", "ping".into())]))).unwrap_err();
        assert_eq!(e.details, vec![Detail::Field { field: "id".into(), message: "required".into() }]);
    }

    #[test]
    fn unknown_ops_keep_their_id() {
        let e = RequestFrame::parse(frame(map(&[("op", "fly".into()), ("id", 9.into())]))).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::UnknownOp, Some(RequestId::Num(9))));
    }

    #[test]
    fn long_nack_errors_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_ERROR_BYTES);
        let r = RequestFrame::parse(frame(map(&[("op", "nack".into()), ("tag", 1.into()), ("error", long.as_str().into())]))).unwrap();
        let Request::Nack(n) = r.request else { panic!("not a nack") };
        let e = n.error.unwrap();
        assert!(e.len() <= MAX_ERROR_BYTES && e.len() >= MAX_ERROR_BYTES - 1);
    }
}
