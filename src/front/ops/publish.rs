//! `publish`: build the event (id, time, defaults), encode it once, and queue it for the
//! publisher; the reply is written when it is durable.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use sidebus_protocol::reply::{Deliver, encode_ok};
use sidebus_protocol::request::{MAX_PUBLISH_DELAY_MS, Publish};
use sidebus_protocol::{ErrorCode, Event, FieldError, RequestId};
use uuid::Uuid;

use crate::bus::publish::Submit;
use crate::bus::schema::Checked;
use crate::front::connection::{Conn, Done};
use crate::front::error::WireError;

impl Conn {
    pub(crate) async fn op_publish(&mut self, id: Option<RequestId>, p: Publish) {
        if self.draining {
            self.reply_err(id.as_ref(), WireError::new(ErrorCode::Unavailable, "the daemon is shutting down"));
            return;
        }
        let schemaversion = match self.shared.schemas.check(&p.event_type, p.version, &p.data) {
            Ok(Checked::Valid(v)) => v,
            Ok(Checked::Missing) => {
                // A version this daemon has not seen: ask Postgres (rare; bounded).
                let log = self.shared.backends.log.now();
                let load = self.shared.schemas.check_after_load(log.as_ref(), &p.event_type, p.version, &p.data);
                match tokio::time::timeout(Duration::from_secs(2), load).await {
                    Ok(Ok(v)) => v,
                    Ok(Err(e)) => {
                        if e.code == ErrorCode::ValidationFailed {
                            crate::bus::counters::add(&crate::bus::counters::COUNTERS.validation_failures, 1);
                        }
                        return self.reply_err(id.as_ref(), e);
                    }
                    Err(_) => {
                        let e = WireError::new(
                            ErrorCode::Unavailable,
                            "the schema version asked for is not known here and Postgres did not answer",
                        );
                        return self.reply_err(id.as_ref(), e);
                    }
                }
            }
            Err(e) => {
                if e.code == ErrorCode::ValidationFailed {
                    crate::bus::counters::add(&crate::bus::counters::COUNTERS.validation_failures, 1);
                }
                return self.reply_err(id.as_ref(), e);
            }
        };
        let now = Utc::now();
        let deliverat = match delivery_time(now, p.deliver_at.as_deref(), p.delay_ms) {
            Ok(t) => t,
            Err(e) => return self.reply_err(id.as_ref(), e),
        };
        let config = &self.shared.config;
        let event_id = p.event_id.unwrap_or_else(|| Uuid::now_v7().to_string());
        let source = p.source.or_else(|| self.client.clone()).unwrap_or_else(|| format!("sidebus/{}", config.node));
        let event = Event {
            correlationid: p.correlationid.unwrap_or_else(|| event_id.clone()),
            id: event_id,
            event_type: p.event_type,
            source,
            time: now.to_rfc3339_opts(SecondsFormat::Micros, true),
            schemaversion: schemaversion.map(u64::from),
            partitionkey: p.partitionkey,
            traceparent: p.traceparent,
            deliverat: deliverat.map(|t| t.to_rfc3339_opts(SecondsFormat::Micros, true)),
            replayed: false,
            data: p.data,
        };
        let payload = Bytes::from(event.encode());
        // Every delivery of this event must fit in a frame the subscriber accepts.
        if payload.len() + Deliver::OVERHEAD > config.max_frame_bytes {
            let problem = format!(
                "the event would be {} bytes with its attributes; a delivery must fit in max_frame_bytes ({})",
                payload.len(),
                config.max_frame_bytes
            );
            self.reply_err(id.as_ref(), WireError::field(FieldError::new("data", problem)));
            return;
        }
        let bytes = payload.len();
        let submit = Submit { event_id: event.id, time_us: now.timestamp_micros(), event: payload, durability: p.durability };
        match self.shared.publisher.submit(self.id, submit).await {
            Ok(waiter) => {
                crate::bus::counters::add(&crate::bus::counters::COUNTERS.published, 1);
                self.pending_bytes += bytes;
                let received = std::time::Instant::now();
                self.pending.push(Box::pin(async move {
                    let result = waiter.wait().await;
                    crate::front::telemetry::record_publish_ack(received.elapsed());
                    let frame = match result {
                        Ok(published) => encode_ok(id.as_ref(), &published),
                        Err(e) => WireError::from(e).frame(id.as_ref()).to_vec(),
                    };
                    Done { frame: Some(frame), bytes }
                }));
            }
            Err(e) => self.reply_err(id.as_ref(), e.into()),
        }
    }
}

/// When a delayed publish is to be delivered: None for now (no delay, or a time already past).
fn delivery_time(now: DateTime<Utc>, deliver_at: Option<&str>, delay_ms: Option<u64>) -> Result<Option<DateTime<Utc>>, WireError> {
    let max = chrono::Duration::milliseconds(MAX_PUBLISH_DELAY_MS as i64);
    let at = match (deliver_at, delay_ms) {
        (Some(s), _) => {
            let t = DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc)).map_err(|e| {
                WireError::field(FieldError::new("deliver_at", format!("not an RFC 3339 time ({e}), e.g. 2026-11-27T09:30:00Z")))
            })?;
            if t - now > max {
                return Err(WireError::field(FieldError::new("deliver_at", "at most 90 days ahead")));
            }
            t
        }
        (None, Some(ms)) => now + chrono::Duration::milliseconds(ms as i64),
        (None, None) => return Ok(None),
    };
    Ok((at > now).then_some(at))
}
