//! The error codes of the contract, and the `details` entries an error reply carries.

use crate::msgpack::{FieldError, Fields, MapWriter};

/// An error code: the stable, machine-readable part of an `error` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The frame is not a MessagePack map with string keys.
    BadFrame,
    /// The frame's length is over `max_frame_bytes`; the connection is then closed.
    FrameTooLarge,
    /// A field is missing or has the wrong type or range; `details` names it.
    BadRequest,
    /// `op` names no operation.
    UnknownOp,
    /// `hello` asked for a protocol version the daemon does not speak.
    UnsupportedProtocol,
    /// `data` does not match the type's schema; `details` has one entry per violation.
    ValidationFailed,
    /// `version` names a schema version that does not exist.
    UnknownVersion,
    /// A schema would break compatibility with earlier versions.
    IncompatibleSchema,
    /// `ack`, `nack` or `extend` named a tag this connection does not hold.
    UnknownTag,
    /// The subscription, group or entry does not exist.
    NotFound,
    /// The spool is full; retry later.
    Backpressure,
    /// The daemon cannot do this now (backends unreachable past the wait, or shutting down).
    Unavailable,
    /// The peer may not do this.
    Unauthorized,
    /// A fault inside the daemon; the message says what to look for in its log.
    Internal,
}

impl ErrorCode {
    /// Every code, for tests and documentation.
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::BadFrame,
        ErrorCode::FrameTooLarge,
        ErrorCode::BadRequest,
        ErrorCode::UnknownOp,
        ErrorCode::UnsupportedProtocol,
        ErrorCode::ValidationFailed,
        ErrorCode::UnknownVersion,
        ErrorCode::IncompatibleSchema,
        ErrorCode::UnknownTag,
        ErrorCode::NotFound,
        ErrorCode::Backpressure,
        ErrorCode::Unavailable,
        ErrorCode::Unauthorized,
        ErrorCode::Internal,
    ];

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::UnsupportedProtocol => "unsupported_protocol",
            ErrorCode::ValidationFailed => "validation_failed",
            ErrorCode::UnknownVersion => "unknown_version",
            ErrorCode::IncompatibleSchema => "incompatible_schema",
            ErrorCode::UnknownTag => "unknown_tag",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Backpressure => "backpressure",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Internal => "internal",
        }
    }

    /// The code named by `s`, if it is one of the contract's.
    pub fn parse(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of an error's `details`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detail {
    /// A request field that is missing or wrong (`bad_request`): `{field, message}`.
    Field {
        /// The field's name.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// A place inside `data` (`validation_failed`): `{path, message}`, `path` a JSON pointer.
    Path {
        /// A JSON pointer into `data`.
        path: String,
        /// What is wrong there.
        message: String,
    },
    /// A reason without a place (e.g. one breaking change of a schema): `{message}`.
    Reason {
        /// The reason.
        message: String,
    },
}

impl From<FieldError> for Detail {
    fn from(e: FieldError) -> Self {
        Detail::Field { field: e.field, message: e.problem }
    }
}

impl Detail {
    /// The entry as a MessagePack map.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = MapWriter::new();
        match self {
            Detail::Field { field, message } => w.str("field", field).str("message", message),
            Detail::Path { path, message } => w.str("path", path).str("message", message),
            Detail::Reason { message } => w.str("message", message),
        };
        w.finish()
    }

    /// Reads an entry from its map.
    pub fn decode(f: &Fields) -> Result<Detail, FieldError> {
        let message = f.opt_string("message")?.unwrap_or_default();
        Ok(if let Some(path) = f.opt_string("path")? {
            Detail::Path { path, message }
        } else if let Some(field) = f.opt_string("field")? {
            Detail::Field { field, message }
        } else {
            Detail::Reason { message }
        })
    }
}
