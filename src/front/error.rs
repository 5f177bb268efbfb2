//! The one place where failures become wire errors: a code from the contract and a message for
//! people. Rust error strings never become codes, and messages say what to do rather than
//! repeat a library's wording.

use bytes::Bytes;
use sidebus_protocol::reply::ErrorReply;
use sidebus_protocol::request::ParseError;
use sidebus_protocol::{Detail, ErrorCode, FieldError, RequestId};

use crate::bus::deliver::EngineError;
use crate::bus::publish::PublishError;

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
}

impl WireError {
    /// An error without details.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> WireError {
        WireError { code, message: message.into(), details: vec![], tag: None }
    }

    /// An error with details.
    pub fn with_details(code: ErrorCode, message: impl Into<String>, details: Vec<Detail>) -> WireError {
        WireError { code, message: message.into(), details, tag: None }
    }

    /// A `bad_request` naming the field.
    pub fn field(e: FieldError) -> WireError {
        WireError {
            code: ErrorCode::BadRequest,
            message: format!("bad field {}: {}", e.field, e.problem),
            details: vec![e.into()],
            tag: None,
        }
    }

    /// The error frame, replying to `id` (or, without one, as an error push).
    pub fn frame(&self, id: Option<&RequestId>) -> Bytes {
        Bytes::from(
            ErrorReply { id: id.cloned(), code: self.code, message: self.message.clone(), details: self.details.clone(), tag: self.tag }
                .encode(),
        )
    }
}

impl From<ParseError> for WireError {
    fn from(e: ParseError) -> WireError {
        WireError { code: e.code, message: e.message, details: e.details, tag: None }
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
