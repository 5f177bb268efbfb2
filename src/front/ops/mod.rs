//! One module per request kind. Each adds its handler to the connection (`Conn::op_*`): it
//! checks what the parser could not (state of the connection, limits), does the work, and
//! queues the reply.

mod admin;
mod hello;
mod publish;
mod schema;
mod settle;
mod subscribe;

use sidebus_protocol::RequestId;
use sidebus_protocol::reply::{Body, encode_ok};

use crate::front::connection::{Conn, Done};
use crate::front::error::WireError;

impl Conn {
    /// Runs `work` beside the connection's other requests and queues its `ok` (or error) reply
    /// when it is done: for operations that wait on a backend.
    pub(crate) fn reply_later<B: Body>(
        &mut self,
        id: Option<RequestId>,
        work: impl Future<Output = Result<B, WireError>> + Send + 'static,
    ) {
        self.pending.push(Box::pin(async move {
            let frame = match work.await {
                Ok(ok) => encode_ok(id.as_ref(), &ok),
                Err(e) => e.frame(id.as_ref()).to_vec(),
            };
            Done { frame: Some(frame), bytes: 0 }
        }));
    }
}
