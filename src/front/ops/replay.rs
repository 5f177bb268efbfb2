//! `replay`, `replay_cancel`, `replays`: operators' replays from the log (see `bus::replay`).
//! Each runs beside the connection's other work and answers when done.

use chrono::{DateTime, SecondsFormat, Utc};
use sidebus_protocol::replay::{Replay, ReplayInfo, ReplayList, ReplayStarted};
use sidebus_protocol::{FieldError, RequestId};

use super::{Reply, error, later};
use crate::bus::replay;
use crate::front::Shared;
use crate::front::access::ReplayScope;
use crate::front::error::{RequestError, WireError};

fn time(field: &str, s: &str) -> Result<DateTime<Utc>, FieldError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| FieldError::new(field, format!("not an RFC 3339 time ({e}), e.g. 2026-11-27T09:30:00Z")))
}

/// `replay`: the range checked here, the group and the log by the bus.
pub(crate) fn start(id: Option<RequestId>, r: Replay, shared: &Shared) -> Reply {
    let parsed = time("since", &r.since).and_then(|since| {
        let until = r.until.as_deref().map(|u| time("until", u)).transpose()?.unwrap_or_else(Utc::now);
        if since >= until {
            return Err(FieldError::new("since", "must be before until"));
        }
        Ok((since, until))
    });
    let (since, until) = match parsed {
        Ok(p) => p,
        Err(e) => return error(id.as_ref(), RequestError::Field(e)),
    };
    let backends = shared.backends.clone();
    let wait = shared.config.publish_timeout;
    later(id, async move {
        let Some((log, _)) = backends.both_within(wait).await else { return Err(RequestError::BackendsUnreachable.into()) };
        let (count, replay) = replay::start(&log, &r.event_type, &r.group, since, until).await?;
        Ok::<_, WireError>(ReplayStarted { count, replay: replay.map(|u| u.to_string()) })
    })
}

/// `replay_cancel`; with an access list, only of a group in `scope`.
pub(crate) fn cancel(id: Option<RequestId>, replay: String, shared: &Shared, scope: Option<ReplayScope>) -> Reply {
    let Ok(uuid) = uuid::Uuid::parse_str(&replay) else {
        return error(id.as_ref(), RequestError::Field(FieldError::new("replay", "not a replay id")));
    };
    let (backends, wait) = (shared.backends.clone(), shared.config.publish_timeout);
    later(id, async move {
        let Some((log, _)) = backends.both_within(wait).await else { return Err(RequestError::BackendsUnreachable.into()) };
        if let Some(scope) = scope {
            let rows = log.list_replays(true).await.map_err(replay::ReplayRequestError::from)?;
            if let Some(r) = rows.iter().find(|r| r.id == uuid).filter(|r| !scope.allows(&r.event_type, &r.group_name)) {
                let what = format!("cancel replay {uuid} of {} as group {} (admin `replay`)", r.event_type, r.group_name);
                return Err(scope.refuse(what).into());
            }
        }
        replay::cancel(&log, uuid).await.map_err(WireError::from)
    })
}

/// `replays`; with an access list, those of the groups in `scope`.
pub(crate) fn list(id: Option<RequestId>, all: bool, shared: &Shared, scope: Option<ReplayScope>) -> Reply {
    let (backends, wait) = (shared.backends.clone(), shared.config.publish_timeout);
    later(id, async move {
        let Some((log, _)) = backends.both_within(wait).await else { return Err(RequestError::BackendsUnreachable.into()) };
        let rows = log.list_replays(all).await.map_err(replay::ReplayRequestError::from)?;
        let replays = rows
            .into_iter()
            .filter(|r| scope.as_ref().is_none_or(|s| s.allows(&r.event_type, &r.group_name)))
            .map(|r| ReplayInfo {
                replay: r.id.to_string(),
                event_type: r.event_type,
                group: r.group_name,
                status: r.status,
                reason: r.reason,
                added: r.added.max(0) as u64,
                total: r.total.map(|t| t.max(0) as u64),
                created_at: r.created_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            })
            .collect();
        Ok::<_, WireError>(ReplayList { replays })
    })
}
