//! The one place where failures become wire errors: a code from the contract and a message for
//! people. Every layer below has its own error type saying what went wrong; this file decides
//! what the client is told. Rust error strings never become codes, and messages say what to do
//! rather than repeat a library's wording. (The `tidy` test keeps `ErrorCode` out of every
//! other layer.)

use bytes::Bytes;
use sidebus_protocol::reply::ErrorReply;
use sidebus_protocol::request::ParseError;
use sidebus_protocol::{Detail, ErrorCode, FieldError, PROTOCOL_VERSION, RequestId};

use crate::bus::NoGroup;
use crate::bus::dead_letters::DeadLetterError;
use crate::bus::deliver::EngineError;
use crate::bus::groups::GroupError;
use crate::bus::publish::PublishError;
use crate::bus::replay::ReplayRequestError;
use crate::bus::schema::SchemaError;

/// An error reply before its `id` is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError {
    /// The code.
    pub code: ErrorCode,
    /// For people.
    pub message: String,
    /// The offending fields or places.
    pub details: Vec<Detail>,
    /// The delivery tag an `unknown_tag` is about.
    pub tag: Option<u64>,
    /// The subscription an error push ended.
    pub sub: Option<u64>,
}

impl WireError {
    fn new(code: ErrorCode, message: impl Into<String>) -> WireError {
        WireError { code, message: message.into(), details: vec![], tag: None, sub: None }
    }

    fn with_details(code: ErrorCode, message: impl Into<String>, details: Vec<Detail>) -> WireError {
        WireError { code, message: message.into(), details, tag: None, sub: None }
    }

    /// The error frame, replying to `id` (or, without one, as an error push).
    pub fn frame(&self, id: Option<&RequestId>) -> Bytes {
        Bytes::from(
            ErrorReply {
                id: id.cloned(),
                code: self.code,
                message: self.message.clone(),
                details: self.details.clone(),
                tag: self.tag,
                sub: self.sub,
            }
            .encode(),
        )
    }
}

/// Refusals the front layer decides itself, about the request or the connection.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// `hello` asked for another protocol version.
    #[error("this daemon speaks protocol {PROTOCOL_VERSION}, not {0}")]
    UnsupportedProtocol(u64),
    /// A field is wrong in a way the parser could not see (a limit of the connection, a time).
    #[error("bad field {}: {}", .0.field, .0.problem)]
    Field(FieldError),
    /// The daemon is draining.
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// The connection does not hold that delivery.
    #[error("tag {0} is not a delivery this connection holds (already ended, expired, or never sent)")]
    UnknownTag(u64),
    /// The connection has no such subscription.
    #[error("no subscription {0} on this connection")]
    NoSubscription(u64),
    /// A subscribe right after start-up, before the backends answered.
    #[error("Redis or Postgres is not reachable yet; retry the subscription")]
    NotReady,
    /// An operator's request while a backend is away.
    #[error("Postgres or Redis is unreachable; try again")]
    BackendsUnreachable,
    /// A schema registration while Postgres is away.
    #[error("Postgres, which holds the schema registry, is unreachable; try again")]
    RegistryUnreachable,
    /// An `ack` with `id` that Redis did not take.
    #[error("Redis did not take the ack; the event may be delivered again")]
    AckNotTaken,
    /// A `nack` with `id` that Redis did not take.
    #[error("Redis did not take the nack; the event is delivered again after the ack timeout")]
    NackNotTaken,
    /// A frame declared more than `max_frame_bytes` (the connection closes).
    #[error("a frame is larger than max_frame_bytes ({0} bytes); closing the connection")]
    FrameTooLarge(usize),
    /// Over `max_connections` (the connection closes).
    #[error("too many connections (max_connections = {0}); try again later")]
    TooManyConnections(usize),
    /// Over `max_connections_per_uid` (the connection closes).
    #[error("too many connections of uid {uid} (max_connections_per_uid = {max}); close some, or ask for a higher limit")]
    TooManyOfUid {
        /// The peer's uid.
        uid: u32,
        /// The limit.
        max: usize,
    },
    /// The daemon ended a subscription (its group was deleted); said with an error push.
    #[error("{reason}")]
    SubscriptionEnded {
        /// The subscription.
        sub: u64,
        /// Why.
        reason: String,
    },
    /// The access list does not allow this peer the request.
    #[error("uid {uid} may not {what}: {}", if *.named { "no [[access]] entry of its user or groups allows it" } else { "no [[access]] entry names this user or its groups" })]
    Unauthorized {
        /// The peer's uid.
        uid: u32,
        /// What was refused (`publish order.created`).
        what: String,
        /// Whether some entry names the peer at all.
        named: bool,
    },
}

impl From<RequestError> for WireError {
    fn from(e: RequestError) -> WireError {
        let code = match &e {
            RequestError::UnsupportedProtocol(_) => ErrorCode::UnsupportedProtocol,
            RequestError::Field(f) => {
                return WireError::with_details(ErrorCode::BadRequest, e.to_string(), vec![f.clone().into()]);
            }
            RequestError::UnknownTag(tag) => return WireError { tag: Some(*tag), ..WireError::new(ErrorCode::UnknownTag, e.to_string()) },
            RequestError::NoSubscription(_) => ErrorCode::NotFound,
            RequestError::SubscriptionEnded { sub, .. } => {
                return WireError { sub: Some(*sub), ..WireError::new(ErrorCode::NotFound, e.to_string()) };
            }
            RequestError::FrameTooLarge(_) => ErrorCode::FrameTooLarge,
            RequestError::ShuttingDown
            | RequestError::NotReady
            | RequestError::BackendsUnreachable
            | RequestError::RegistryUnreachable
            | RequestError::AckNotTaken
            | RequestError::NackNotTaken
            | RequestError::TooManyConnections(_)
            | RequestError::TooManyOfUid { .. } => ErrorCode::Unavailable,
            RequestError::Unauthorized { .. } => ErrorCode::Unauthorized,
        };
        WireError::new(code, e.to_string())
    }
}

impl From<ParseError> for WireError {
    fn from(e: ParseError) -> WireError {
        WireError { code: e.code, message: e.message, details: e.details, tag: None, sub: None }
    }
}

impl From<PublishError> for WireError {
    fn from(e: PublishError) -> WireError {
        match e {
            PublishError::Unavailable => WireError::new(
                ErrorCode::Unavailable,
                "the event log and Redis did not confirm the publish in time; it is in the daemon's spool and will be stored: a retry with the same event id is stored once",
            ),
            PublishError::Backpressure => WireError::new(
                ErrorCode::Backpressure,
                "the daemon's spool is full (spool_max_bytes) while the backends are away; retry later",
            ),
            PublishError::Spool => WireError::new(
                ErrorCode::Unavailable,
                "the daemon could not write its spool (see its log: disk full?); the publish was not stored",
            ),
            PublishError::ShuttingDown => {
                WireError::new(ErrorCode::Unavailable, "the daemon is shutting down; publish again once it (or another) is up")
            }
        }
    }
}

impl From<&EngineError> for WireError {
    fn from(e: &EngineError) -> WireError {
        match e {
            EngineError::ShuttingDown => {
                WireError::new(ErrorCode::Unavailable, "the daemon is shutting down; subscribe again once it (or another) is up")
            }
            EngineError::Streams(_) => WireError::new(ErrorCode::Unavailable, "Redis is unreachable; retry the subscription"),
            EngineError::Log(_) => {
                WireError::new(ErrorCode::Unavailable, "the event log (Postgres) is unreachable; retry the subscription")
            }
        }
    }
}

impl From<SchemaError> for WireError {
    fn from(e: SchemaError) -> WireError {
        let message = e.to_string();
        match e {
            SchemaError::UnknownType(_) | SchemaError::NoSchema(_) => WireError::new(ErrorCode::NotFound, message),
            SchemaError::Invalid { violations, .. } => WireError::with_details(
                ErrorCode::ValidationFailed,
                message,
                violations.into_iter().map(|v| Detail::Path { path: v.path, message: v.message }).collect(),
            ),
            SchemaError::UnknownVersion { .. } => WireError::new(ErrorCode::UnknownVersion, message),
            SchemaError::BadSchema(why) => {
                WireError::with_details(ErrorCode::BadRequest, message, vec![Detail::Field { field: "schema".into(), message: why }])
            }
            SchemaError::Incompatible { reasons, .. } => WireError::with_details(
                ErrorCode::IncompatibleSchema,
                message,
                reasons.into_iter().map(|message| Detail::Reason { message }).collect(),
            ),
            SchemaError::Unreachable(_) | SchemaError::Timeout => WireError::new(ErrorCode::Unavailable, message),
        }
    }
}

impl From<NoGroup> for WireError {
    fn from(e: NoGroup) -> WireError {
        WireError::new(ErrorCode::NotFound, e.to_string())
    }
}

impl From<ReplayRequestError> for WireError {
    fn from(e: ReplayRequestError) -> WireError {
        match e {
            ReplayRequestError::NoGroup(g) => g.into(),
            ReplayRequestError::Ended(_) | ReplayRequestError::Unknown(_) => WireError::new(ErrorCode::NotFound, e.to_string()),
            ReplayRequestError::Log(_) => WireError::new(ErrorCode::Unavailable, e.to_string()),
        }
    }
}

impl From<DeadLetterError> for WireError {
    fn from(e: DeadLetterError) -> WireError {
        match e {
            DeadLetterError::NoGroup(g) => g.into(),
            DeadLetterError::NotDead { .. } => WireError::new(ErrorCode::NotFound, e.to_string()),
            DeadLetterError::Log(_) | DeadLetterError::Streams(_) => WireError::new(ErrorCode::Unavailable, e.to_string()),
        }
    }
}

impl From<GroupError> for WireError {
    fn from(e: GroupError) -> WireError {
        match e {
            GroupError::NoGroup(g) => g.into(),
            GroupError::HasConsumers { .. } => WireError::with_details(
                ErrorCode::BadRequest,
                e.to_string(),
                vec![Detail::Field { field: "force".into(), message: "the group has live subscriptions".into() }],
            ),
            GroupError::BadPosition(_) => WireError::with_details(
                ErrorCode::BadRequest,
                e.to_string(),
                vec![Detail::Field { field: "to".into(), message: e.to_string() }],
            ),
            GroupError::Log(_) | GroupError::Streams(_) => WireError::new(ErrorCode::Unavailable, e.to_string()),
        }
    }
}
