//! `hello`: check the protocol version, learn the client's name.

use sidebus_protocol::reply::{HelloOk, encode_ok};
use sidebus_protocol::{ErrorCode, PROTOCOL_VERSION, RequestId};

use crate::front::connection::Conn;
use crate::front::error::WireError;

impl Conn {
    pub(crate) fn op_hello(&mut self, id: Option<RequestId>, protocol: u64, client: Option<String>) {
        if protocol != PROTOCOL_VERSION {
            let e =
                WireError::new(ErrorCode::UnsupportedProtocol, format!("this daemon speaks protocol {PROTOCOL_VERSION}, not {protocol}"));
            self.reply_err(id.as_ref(), e);
            return;
        }
        self.client = client;
        let config = &self.shared.config;
        let ok = HelloOk {
            protocol: PROTOCOL_VERSION,
            server: format!("sidebus/{}", env!("CARGO_PKG_VERSION")),
            node: config.node.clone(),
            max_frame_bytes: config.max_frame_bytes as u64,
        };
        self.outbox.push(encode_ok(id.as_ref(), &ok).into());
    }
}
