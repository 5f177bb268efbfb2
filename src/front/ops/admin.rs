//! Operators' requests: `replay`, `replay_cancel`, `replays`, `dlq_list`, `dlq_redrive`,
//! `dlq_purge`. Each runs beside the connection's other work and answers when done; a redrive
//! at a `rate` runs as long as it takes (closing the connection stops it between batches, with
//! what is left still dead).

use chrono::{DateTime, SecondsFormat, Utc};
use sidebus_protocol::admin::{Count, DlqAction, DlqList, Replay, ReplayInfo, ReplayList, ReplayStarted};
use sidebus_protocol::reply::Body;
use sidebus_protocol::{ErrorCode, FieldError, RequestId};

use crate::backend::pg::EventLog;
use crate::backend::redis::Streams;
use crate::front::connection::Conn;
use crate::front::error::WireError;

fn unreachable() -> WireError {
    WireError::new(ErrorCode::Unavailable, "Postgres or Redis is unreachable; try again")
}

fn failed(e: impl std::fmt::Display) -> WireError {
    WireError::new(ErrorCode::Unavailable, format!("the log is unreachable now: {e}"))
}

fn time(field: &str, s: &str) -> Result<DateTime<Utc>, WireError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| WireError::field(FieldError::new(field, format!("not an RFC 3339 time ({e}), e.g. 2026-11-27T09:30:00Z"))))
}

impl Conn {
    /// Runs `work` with both backends (waiting for them up to the publish timeout) beside the
    /// connection's other work, and queues its reply.
    fn admin<B, F>(&mut self, id: Option<RequestId>, work: impl FnOnce(EventLog, Streams) -> F + Send + 'static)
    where
        B: Body,
        F: Future<Output = Result<B, WireError>> + Send + 'static,
    {
        let backends = self.shared.backends.clone();
        let wait = self.shared.config.publish_timeout;
        self.reply_later(id, async move {
            let both = async { (backends.log.get().await, backends.streams.get().await) };
            let (log, streams) = tokio::time::timeout(wait, both).await.map_err(|_| unreachable())?;
            work(log, streams).await
        });
    }

    pub(crate) fn op_replay(&mut self, id: Option<RequestId>, r: Replay) {
        let parsed = time("since", &r.since).and_then(|since| {
            let until = r.until.as_deref().map(|u| time("until", u)).transpose()?.unwrap_or_else(Utc::now);
            if since >= until {
                return Err(WireError::field(FieldError::new("since", "must be before until")));
            }
            Ok((since, until))
        });
        let (since, until) = match parsed {
            Ok(p) => p,
            Err(e) => return self.reply_err(id.as_ref(), e),
        };
        self.admin(id, move |log, _| async move {
            if !log.group_exists(&r.event_type, &r.group).await.map_err(failed)? {
                return Err(WireError::new(ErrorCode::NotFound, format!("`{}` has no consumer group `{}`", r.event_type, r.group)));
            }
            let (count, replay) = log.start_replay(&r.event_type, &r.group, since, until).await.map_err(failed)?;
            if let Some(replay) = replay {
                tracing::info!(r#type = %r.event_type, group = %r.group, count, %replay, "replay requested");
                crate::bus::replay::wake().notify_one();
            }
            Ok(ReplayStarted { count: count as u64, replay: replay.map(|u| u.to_string()) })
        });
    }

    pub(crate) fn op_replay_cancel(&mut self, id: Option<RequestId>, replay: String) {
        let Ok(uuid) = uuid::Uuid::parse_str(&replay) else {
            return self.reply_err(id.as_ref(), WireError::field(FieldError::new("replay", "not a replay id")));
        };
        self.admin(id, move |log, _| async move {
            if log.cancel_replay(uuid).await.map_err(failed)? {
                tracing::info!(%replay, "replay cancelled");
                return Ok(());
            }
            let why = if log.replay_exists(uuid).await.map_err(failed)? { "has ended" } else { "does not exist" };
            Err(WireError::new(ErrorCode::NotFound, format!("replay {replay} {why}")))
        });
    }

    pub(crate) fn op_replays(&mut self, id: Option<RequestId>, all: bool) {
        self.admin(id, move |log, _| async move {
            let rows = log.list_replays(all).await.map_err(failed)?;
            let replays = rows
                .into_iter()
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
            Ok(ReplayList { replays })
        });
    }

    pub(crate) fn op_stats(&mut self, id: Option<RequestId>) {
        let shared = self.shared.clone();
        self.reply_later(id, async move {
            let sources = crate::front::stats::Sources {
                node: &shared.config.node,
                publisher: &shared.publisher,
                log: shared.backends.log.now(),
                streams: shared.backends.streams.now(),
                engine: shared.engine.now(),
            };
            Ok::<_, WireError>(crate::front::stats::collect(sources, std::time::Duration::from_secs(2)).await)
        });
    }

    pub(crate) fn op_dlq_list(&mut self, id: Option<RequestId>, l: DlqList) {
        // The page ends early (with `next`) rather than make a reply larger than a frame.
        let budget = self.shared.config.max_frame_bytes.saturating_sub(4096);
        self.admin(id, move |log, streams| async move {
            crate::bus::dead_letters::list(&log, &streams, &l.event_type, &l.group, l.limit, l.after, &l.ids, budget).await
        });
    }

    pub(crate) fn op_dlq_redrive(&mut self, id: Option<RequestId>, a: DlqAction) {
        self.admin(id, move |log, streams| async move {
            let count = crate::bus::dead_letters::redrive(&log, &streams, &a.event_type, &a.group, &a.ids, a.rate).await?;
            Ok(Count { count })
        });
    }

    pub(crate) fn op_dlq_purge(&mut self, id: Option<RequestId>, a: DlqAction) {
        self.admin(id, move |log, streams| async move {
            let count = crate::bus::dead_letters::purge(&log, &streams, &a.event_type, &a.group, &a.ids).await?;
            Ok(Count { count })
        });
    }
}
