//! `publish`: validate `data`, build the event (id, time, defaults), encode it once, and queue it
//! for the publisher; the reply is written when it is durable.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use sidebus_protocol::reply::{Deliver, encode_ok};
use sidebus_protocol::request::{MAX_PUBLISH_DELAY_MS, Publish};
use sidebus_protocol::{Event, FieldError, RequestId};
use uuid::Uuid;

use super::{Done, Reply, error};
use crate::bus::publish::Submit;
use crate::bus::schema::{Checked, SchemaError};
use crate::front::Shared;
use crate::front::error::{RequestError, WireError};

/// How long a publish naming a schema version this daemon has not seen waits for Postgres.
const LOAD_VERSION: Duration = Duration::from_secs(2);

/// Queues the publish on the lane of connection `conn`; the reply and the bytes it holds until
/// it is answered. `client` is the connection's `hello` name (the default `source`).
pub(crate) async fn apply(id: Option<RequestId>, p: Publish, shared: &Shared, conn: u64, client: Option<&str>) -> (Reply, usize) {
    if shared.draining.is_cancelled() {
        return (error(id.as_ref(), RequestError::ShuttingDown), 0);
    }
    let schemaversion = match validate(&p, shared).await {
        Ok(v) => v,
        Err(e) => return (error(id.as_ref(), e), 0),
    };
    let now = Utc::now();
    let deliverat = match delivery_time(now, p.deliver_at.as_deref(), p.delay_ms) {
        Ok(t) => t,
        Err(e) => return (error(id.as_ref(), RequestError::Field(e)), 0),
    };
    let config = &shared.config;
    let event_id = p.event_id.unwrap_or_else(|| Uuid::now_v7().to_string());
    let source = p.source.or_else(|| client.map(str::to_owned)).unwrap_or_else(|| format!("sidebus/{}", config.node));
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
        return (error(id.as_ref(), RequestError::Field(FieldError::new("data", problem))), 0);
    }
    let bytes = payload.len();
    let submit = Submit { event_id: event.id, time_us: now.timestamp_micros(), event: payload, durability: p.durability };
    match shared.publisher.submit(conn, submit).await {
        Ok(waiter) => {
            crate::bus::counters::add(&crate::bus::counters::COUNTERS.published, 1);
            let received = std::time::Instant::now();
            let reply = Reply::Later(Box::pin(async move {
                let result = waiter.wait().await;
                crate::front::telemetry::record_publish_ack(received.elapsed());
                let frame = match result {
                    Ok(published) => encode_ok(id.as_ref(), &published),
                    Err(e) => WireError::from(e).frame(id.as_ref()).to_vec(),
                };
                Done { frame: Some(frame), bytes, then: None }
            }));
            (reply, bytes)
        }
        Err(e) => (error(id.as_ref(), e), 0),
    }
}

/// Checks `data` against the type's schema; the version it was checked against, if any.
async fn validate(p: &Publish, shared: &Shared) -> Result<Option<u32>, SchemaError> {
    let checked = match shared.schemas.check(&p.event_type, p.version, &p.data) {
        Ok(Checked::Valid(v)) => Ok(v),
        Ok(Checked::Missing) => {
            // A version this daemon has not seen: ask Postgres (rare; bounded).
            let log = shared.backends.log.now();
            let load = shared.schemas.check_after_load(log.as_ref(), &p.event_type, p.version, &p.data);
            tokio::time::timeout(LOAD_VERSION, load).await.unwrap_or(Err(SchemaError::Timeout))
        }
        Err(e) => Err(e),
    };
    if matches!(checked, Err(SchemaError::Invalid { .. })) {
        crate::bus::counters::add(&crate::bus::counters::COUNTERS.validation_failures, 1);
    }
    checked
}

/// When a delayed publish is to be delivered: None for now (no delay, or a time already past).
fn delivery_time(now: DateTime<Utc>, deliver_at: Option<&str>, delay_ms: Option<u64>) -> Result<Option<DateTime<Utc>>, FieldError> {
    let max = chrono::Duration::milliseconds(MAX_PUBLISH_DELAY_MS as i64);
    let at = match (deliver_at, delay_ms) {
        (Some(s), _) => {
            let t = DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| FieldError::new("deliver_at", format!("not an RFC 3339 time ({e}), e.g. 2026-11-27T09:30:00Z")))?;
            if t - now > max {
                return Err(FieldError::new("deliver_at", "at most 90 days ahead"));
            }
            t
        }
        (None, Some(ms)) => now + chrono::Duration::milliseconds(ms as i64),
        (None, None) => return Ok(None),
    };
    Ok((at > now).then_some(at))
}
