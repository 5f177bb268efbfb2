//! `hello`: check the protocol version, learn the client's name.

use sidebus_protocol::reply::HelloOk;
use sidebus_protocol::{PROTOCOL_VERSION, RequestId};

use super::{Reply, error, ok};
use crate::config::Config;
use crate::front::error::RequestError;

/// The reply, and the client's name when the hello is accepted.
pub(crate) fn apply(id: Option<&RequestId>, protocol: u64, client: Option<String>, config: &Config) -> (Reply, Option<Option<String>>) {
    if protocol != PROTOCOL_VERSION {
        return (error(id, RequestError::UnsupportedProtocol(protocol)), None);
    }
    let hello = HelloOk {
        protocol: PROTOCOL_VERSION,
        server: format!("sidebus/{}", env!("CARGO_PKG_VERSION")),
        node: config.node.clone(),
        max_frame_bytes: config.max_frame_bytes as u64,
    };
    (ok(id, &hello), Some(client))
}
