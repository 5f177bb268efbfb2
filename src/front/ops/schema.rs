//! `register_schema`, `get_schema`, `list_schemas`: the registry's operations. They run beside
//! the connection's other work (a registration waits on Postgres) and answer when done.

use std::time::Duration;

use sidebus_protocol::reply::encode_ok;
use sidebus_protocol::schema::RegisterSchema;
use sidebus_protocol::{ErrorCode, RequestId};

use crate::front::connection::Conn;
use crate::front::error::WireError;

/// How long an admin operation waits for Postgres before `unavailable`.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

impl Conn {
    pub(crate) fn op_register_schema(&mut self, id: Option<RequestId>, r: RegisterSchema) {
        let (schemas, backends) = (self.shared.schemas.clone(), self.shared.backends.clone());
        let wait = self.shared.config.publish_timeout;
        self.reply_later(id, async move {
            let log = backends.log.get_within(wait).await.ok_or_else(unreachable)?;
            tokio::time::timeout(ADMIN_TIMEOUT, schemas.register(&log, &r)).await.map_err(|_| unreachable())?
        });
    }

    pub(crate) fn op_get_schema(&mut self, id: Option<RequestId>, event_type: String, version: Option<u64>) {
        let (schemas, backends) = (self.shared.schemas.clone(), self.shared.backends.clone());
        self.reply_later(id, async move {
            let log = backends.log.now();
            tokio::time::timeout(ADMIN_TIMEOUT, schemas.get(log.as_ref(), &event_type, version)).await.map_err(|_| unreachable())?
        });
    }

    pub(crate) fn op_list_schemas(&mut self, id: Option<RequestId>) {
        let list = self.shared.schemas.list();
        self.outbox.push(encode_ok(id.as_ref(), &list).into());
    }
}

fn unreachable() -> WireError {
    WireError::new(ErrorCode::Unavailable, "Postgres, which holds the schema registry, is unreachable; try again")
}
