//! `register_schema`, `get_schema`, `list_schemas`: the registry's operations. They run beside
//! the connection's other work (a registration waits on Postgres) and answer when done.

use std::time::Duration;

use sidebus_protocol::RequestId;
use sidebus_protocol::schema::RegisterSchema;

use super::{Reply, later, ok};
use crate::bus::schema::SchemaError;
use crate::front::Shared;
use crate::front::error::{RequestError, WireError};

/// How long a schema operation waits for Postgres before `unavailable`.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// `register_schema`.
pub(crate) fn register(id: Option<RequestId>, r: RegisterSchema, shared: &Shared) -> Reply {
    let (schemas, backends, wait) = (shared.schemas.clone(), shared.backends.clone(), shared.config.publish_timeout);
    later(id, async move {
        let Some(log) = backends.log.get_within(wait).await else { return Err(RequestError::RegistryUnreachable.into()) };
        tokio::time::timeout(ADMIN_TIMEOUT, schemas.register(&log, &r)).await.unwrap_or(Err(SchemaError::Timeout)).map_err(WireError::from)
    })
}

/// `get_schema`.
pub(crate) fn get(id: Option<RequestId>, event_type: String, version: Option<u64>, shared: &Shared) -> Reply {
    let (schemas, backends) = (shared.schemas.clone(), shared.backends.clone());
    later(id, async move {
        let log = backends.log.now();
        tokio::time::timeout(ADMIN_TIMEOUT, schemas.get(log.as_ref(), &event_type, version)).await.unwrap_or(Err(SchemaError::Timeout))
    })
}

/// `list_schemas`: what this daemon holds in memory.
pub(crate) fn list(id: Option<&RequestId>, shared: &Shared) -> Reply {
    ok(id, &shared.schemas.list())
}
