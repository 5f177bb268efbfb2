//! The sidebus wire contract (protocol version 1), shared by the daemon and the Rust client.
//!
//! A frame is a 4-byte big-endian length and then one MessagePack map with string keys
//! ([`codec`]). Requests ([`request`]) carry `op` and `id`; the daemon answers with an `ok` or
//! `error` reply echoing `id`, and pushes `deliver` frames ([`reply`]) carrying an [`event`].
//! `PROTOCOL.md` beside this crate is the same contract written for client authors.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod codec;
pub mod dead_letters;
pub mod error;
pub mod event;
pub mod groups;
pub mod id;
pub mod msgpack;
pub mod names;
pub mod replay;
pub mod reply;
pub mod request;
pub mod schema;
pub mod stats;

pub use error::{Detail, ErrorCode};
pub use event::Event;
pub use id::RequestId;
pub use msgpack::{DecodeError, FieldError, Fields, MapWriter};
pub use reply::{Deliver, ErrorReply, ServerFrame};
pub use request::{Request, RequestFrame};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u64 = 1;

/// The default largest frame body, in bytes (1 MiB).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1024 * 1024;
