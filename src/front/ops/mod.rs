//! One module per request kind, each a function that takes the parsed request and only what it
//! needs (the daemon's shared parts, or the connection's subscriptions or leases), does the
//! work, and says what to write back: a [`Reply`]. The connection runs them and writes.

pub(crate) mod dead_letters;
pub(crate) mod groups;
pub(crate) mod hello;
pub(crate) mod publish;
pub(crate) mod replay;
pub(crate) mod schema;
pub(crate) mod settle;
pub(crate) mod stats;
pub(crate) mod subscribe;

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use sidebus_protocol::RequestId;
use sidebus_protocol::reply::{Body, encode_ok};

use crate::bus::deliver::Sub;
use crate::front::error::WireError;

/// What an op gives its connection to write.
pub(crate) enum Reply {
    /// A frame to write now.
    Now(Bytes),
    /// A frame to write when this is done; it runs beside the connection's other work (a
    /// publish waiting to be durable, an op waiting on a backend).
    Later(BoxFuture<'static, Done>),
    /// Nothing (an `ack` or `nack` without `id`).
    Nothing,
}

/// A finished request: the frame to write (if any), the publish bytes it held, and what the
/// connection must record.
pub(crate) struct Done {
    pub(crate) frame: Option<Vec<u8>>,
    pub(crate) bytes: usize,
    pub(crate) then: Option<Then>,
}

/// What a finished request changes in its connection.
pub(crate) enum Then {
    /// A subscription now exists.
    Subscribed(Arc<Sub>),
    /// A subscription could not be set up: its reserved budget comes back.
    NotSubscribed {
        /// The `max_in_flight` it had reserved.
        max_in_flight: u32,
    },
}

/// `ok` with `body`, now.
pub(crate) fn ok<B: Body>(id: Option<&RequestId>, body: &B) -> Reply {
    Reply::Now(Bytes::from(encode_ok(id, body)))
}

/// An error reply (an error push without `id`), now.
pub(crate) fn error(id: Option<&RequestId>, e: impl Into<WireError>) -> Reply {
    Reply::Now(e.into().frame(id))
}

/// The reply of `work`, when it is done.
pub(crate) fn later<B, E>(id: Option<RequestId>, work: impl Future<Output = Result<B, E>> + Send + 'static) -> Reply
where
    B: Body,
    E: Into<WireError>,
{
    Reply::Later(Box::pin(async move {
        let frame = match work.await {
            Ok(body) => encode_ok(id.as_ref(), &body),
            Err(e) => e.into().frame(id.as_ref()).to_vec(),
        };
        Done { frame: Some(frame), bytes: 0, then: None }
    }))
}
