//! A Rust client for sidebus: connect to the daemon's socket, publish, and subscribe with either
//! a handler (`Ok` acks, `Err` nacks) or a stream of deliveries you end yourself. The client
//! reconnects by itself when the daemon restarts and takes its subscriptions along.
//!
//! ```no_run
//! # async fn example() -> Result<(), sidebus_client::Error> {
//! use sidebus_client::{Client, SubscribeOptions};
//! let client = Client::connect_as("/run/sidebus/sidebus.sock", "orders").await?;
//! client.publish("order.created", &serde_json::json!({"orderId": "o-1", "amount": 10, "currency": "EUR"})).await?;
//! let sub = client.subscribe("order.created", "inventory", SubscribeOptions::default()).await?;
//! sub.consume(|event| async move {
//!     println!("{}", event.id);
//!     Ok::<(), String>(())
//! })
//! .await;
//! # Ok(()) }
//! ```
//!
//! Each connection is two background tasks: a writer that sends requests (pipelined, matched
//! to replies by `id`) and a reader that routes replies and deliveries, so reading never waits
//! for writing. A supervisor task reconnects after a break. See README.md for the behaviour at a
//! break and at [`Client::close`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
mod conn;
mod subscription;

use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;

pub use client::{Client, ClientOptions, DEFAULT_SOCKET, PendingPublish, default_socket};
pub use sidebus_protocol::dead_letters::{Attempt, Count, DeadLetterEntry, DlqAction, DlqEntries, DlqList};
pub use sidebus_protocol::groups::{GroupDelete, GroupDeleted, GroupInfo, GroupList, GroupMoved, GroupReset, ResetTo};
pub use sidebus_protocol::replay::{Replay, ReplayInfo, ReplayList, ReplayStarted};
pub use sidebus_protocol::reply::{HelloOk, PublishStatus, Published};
pub use sidebus_protocol::request::{Durability, Nack, Publish, Subscribe};
pub use sidebus_protocol::schema::{Compatibility, RegisterSchema, SchemaInfo, SchemaList, SchemaRegistered, SchemaSummary};
pub use sidebus_protocol::stats::{BackendStats, GroupStats, Stats};
pub use sidebus_protocol::{Detail, ErrorCode, Fields, Request};
pub use sidebus_protocol::{Event, PROTOCOL_VERSION};
pub use subscription::{Delivery, SubscribeOptions, Subscription, SubscriptionHandle};

/// What can go wrong talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Connecting or writing failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The client is closed ([`Client::close`], or its connection was lost and it does not
    /// reconnect): nothing was sent.
    #[error("the connection to the daemon is closed")]
    Closed,
    /// The daemon answered with an error: `code` is the wire code (one the client does not know
    /// is `internal`, with the code at the front of `message`).
    #[error("{code}: {message}")]
    Server {
        /// The error code.
        code: ErrorCode,
        /// The daemon's message.
        message: String,
        /// The offending fields or places.
        details: Vec<Detail>,
    },
    /// The daemon sent something this client does not understand.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The data could not be encoded as MessagePack.
    #[error("encode: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    /// The connection broke while the request was in flight: it may or may not have been
    /// carried out, and it is not sent again (re-publish with the same `event_id` to store an
    /// event once either way). For an ack, nack or extend: the delivery belonged to the lost
    /// connection, and the daemon delivers it again.
    #[error("the connection to the daemon was lost: {0}")]
    ConnectionLost(String),
    /// No connection to the daemon came back within the client's `reconnect_timeout` (or
    /// [`Client::close_within`] ran out of time).
    #[error("no connection to the daemon within {0:?}")]
    Timeout(Duration),
}

impl Error {
    /// The daemon's error code, if this is an error reply.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Encodes a serde value as MessagePack for `Publish::data` (structs as maps).
pub fn encode(data: &impl Serialize) -> Result<Bytes, Error> {
    Ok(Bytes::from(rmp_serde::to_vec_named(data)?))
}
