//! `stats`: the daemon's counters, spool and groups (see `front::stats`).

use std::sync::Arc;
use std::time::Duration;

use sidebus_protocol::RequestId;

use super::{Reply, later};
use crate::front::Shared;
use crate::front::error::WireError;

/// How long the groups' state may take to read; past it, `stats` answers without them.
const GROUPS_WITHIN: Duration = Duration::from_secs(2);

/// `stats`.
pub(crate) fn apply(id: Option<RequestId>, shared: &Arc<Shared>) -> Reply {
    let shared = shared.clone();
    later(id, async move {
        let sources = crate::front::stats::Sources {
            node: &shared.config.node,
            publisher: &shared.publisher,
            backends: &shared.backends,
            engine: shared.engine.now(),
        };
        Ok::<_, WireError>(crate::front::stats::collect(sources, GROUPS_WITHIN).await)
    })
}
