//! `dlq_list`, `dlq_redrive`, `dlq_purge`: operators' requests on a group's dead letters (see
//! `bus::dead_letters`). Each runs beside the connection's other work and answers when done; a
//! redrive at a `rate` runs as long as it takes (closing the connection stops it between
//! batches, with what is left still dead).

use sidebus_protocol::RequestId;
use sidebus_protocol::dead_letters::{Count, DlqAction, DlqList};

use super::{Reply, later};
use crate::bus::dead_letters;
use crate::front::Shared;
use crate::front::error::{RequestError, WireError};

/// `dlq_list`: a page ends early (with `next`) rather than make a reply larger than a frame.
pub(crate) fn list(id: Option<RequestId>, l: DlqList, shared: &Shared) -> Reply {
    let budget = shared.config.max_frame_bytes.saturating_sub(4096);
    let (backends, wait) = (shared.backends.clone(), shared.config.publish_timeout);
    later(id, async move {
        let Some((log, streams)) = backends.both_within(wait).await else { return Err(RequestError::BackendsUnreachable.into()) };
        dead_letters::list(&log, &streams, &l.event_type, &l.group, l.limit, l.after, &l.ids, budget).await.map_err(WireError::from)
    })
}

/// `dlq_redrive`.
pub(crate) fn redrive(id: Option<RequestId>, a: DlqAction, shared: &Shared) -> Reply {
    let (backends, wait) = (shared.backends.clone(), shared.config.publish_timeout);
    later(id, async move {
        let Some((log, streams)) = backends.both_within(wait).await else { return Err(RequestError::BackendsUnreachable.into()) };
        let count = dead_letters::redrive(&log, &streams, &a.event_type, &a.group, &a.ids, a.rate).await?;
        Ok::<_, WireError>(Count { count })
    })
}

/// `dlq_purge`.
pub(crate) fn purge(id: Option<RequestId>, a: DlqAction, shared: &Shared) -> Reply {
    let (backends, wait) = (shared.backends.clone(), shared.config.publish_timeout);
    later(id, async move {
        let Some((log, streams)) = backends.both_within(wait).await else { return Err(RequestError::BackendsUnreachable.into()) };
        let count = dead_letters::purge(&log, &streams, &a.event_type, &a.group, &a.ids).await?;
        Ok::<_, WireError>(Count { count })
    })
}
