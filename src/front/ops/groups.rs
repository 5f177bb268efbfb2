//! `groups`, `group_delete`, `group_reset`: operators' requests on the lifecycle of consumer
//! groups (see `bus::groups`). Each runs beside the connection's other work and answers when
//! done.

use sidebus_protocol::RequestId;
use sidebus_protocol::groups::{GroupDelete, GroupDeleted, GroupMoved, GroupReset};

use super::{Reply, later};
use crate::bus::groups;
use crate::front::Shared;
use crate::front::access::ReplayScope;
use crate::front::error::{RequestError, WireError};

/// `groups`; with an access list, only the groups in `scope`.
pub(crate) fn list(id: Option<RequestId>, event_type: Option<String>, shared: &Shared, scope: Option<ReplayScope>) -> Reply {
    let (backends, wait) = (shared.backends.clone(), shared.config.publish_timeout);
    later(id, async move {
        let Some((log, streams)) = backends.both_within(wait).await else { return Err(RequestError::BackendsUnreachable.into()) };
        let mut list = groups::list(&log, &streams, event_type.as_deref()).await?;
        list.groups.retain(|g| scope.as_ref().is_none_or(|s| s.allows(&g.event_type, &g.group)));
        Ok::<_, WireError>(list)
    })
}

/// `group_delete`: with `force`, this daemon's subscriptions of the group end at once.
pub(crate) fn delete(id: Option<RequestId>, d: GroupDelete, shared: &Shared) -> Reply {
    let (backends, wait, engine) = (shared.backends.clone(), shared.config.publish_timeout, shared.engine.clone());
    later(id, async move {
        let Some((log, streams)) = backends.both_within(wait).await else { return Err(RequestError::BackendsUnreachable.into()) };
        let engine = engine.now();
        let ended = groups::delete(&log, &streams, engine.as_ref(), &d.event_type, &d.group, d.force).await?;
        Ok::<_, WireError>(GroupDeleted { ended })
    })
}

/// `group_reset`.
pub(crate) fn reset(id: Option<RequestId>, r: GroupReset, shared: &Shared) -> Reply {
    let (backends, wait) = (shared.backends.clone(), shared.config.publish_timeout);
    later(id, async move {
        let Some((log, streams)) = backends.both_within(wait).await else { return Err(RequestError::BackendsUnreachable.into()) };
        let entry = groups::reset(&log, &streams, &r.event_type, &r.group, &r.to).await?;
        Ok::<_, WireError>(GroupMoved { entry })
    })
}
