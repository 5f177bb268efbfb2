//! `subscribe` and `unsubscribe`.

use sidebus_protocol::reply::{Subscribed, encode_ok};
use sidebus_protocol::request::Subscribe;
use sidebus_protocol::{FieldError, RequestId};

use super::{Done, Reply, Then, error, ok};
use crate::bus::deliver::SubParams;
use crate::front::Shared;
use crate::front::error::{RequestError, WireError};
use crate::front::session::{Leases, Subscriptions};

/// Reserves the subscription's number and budget now, and sets it up beside the connection's
/// other work (right after start-up the backends may still be connecting: it waits a little for
/// them); the connection records it when it is done, before any of its deliveries.
pub(crate) fn subscribe(id: Option<RequestId>, s: Subscribe, shared: &Shared, subs: &mut Subscriptions) -> Reply {
    if shared.draining.is_cancelled() {
        return error(id.as_ref(), RequestError::ShuttingDown);
    }
    let config = &shared.config;
    let max_in_flight = s.max_in_flight.map_or(config.max_in_flight, |n| n as u32);
    let budget = config.max_in_flight_per_connection;
    let sub_id = match subs.reserve(max_in_flight, budget) {
        Ok(n) => n,
        Err(used) => {
            let problem = format!("this connection's subscriptions may hold {budget} deliveries in flight together; {used} are taken");
            return error(id.as_ref(), RequestError::Field(FieldError::new("max_in_flight", problem)));
        }
    };
    let params = SubParams {
        event_type: s.event_type,
        group: s.group,
        max_in_flight,
        max_attempts: s.max_attempts.map_or(config.max_attempts, |n| n as u32),
        ack_timeout: s.ack_timeout_ms.map_or(config.ack_timeout, std::time::Duration::from_millis),
    };
    let (engine, wait, tx) = (shared.engine.clone(), config.publish_timeout, subs.tx.clone());
    Reply::Later(Box::pin(async move {
        let subscribed = match engine.get_within(wait).await {
            None => Err(WireError::from(RequestError::NotReady)),
            Some(engine) => engine.subscribe(sub_id, params, tx).await.map_err(|e| {
                tracing::warn!(error = %e, "subscribe failed");
                WireError::from(&e)
            }),
        };
        match subscribed {
            Ok(sub) => {
                tracing::debug!(r#type = %sub.params.event_type, group = %sub.params.group, sub = sub_id, "subscribed");
                let frame = encode_ok(id.as_ref(), &Subscribed { sub: sub_id });
                Done { frame: Some(frame), bytes: 0, then: Some(Then::Subscribed(sub)) }
            }
            Err(e) => Done { frame: Some(e.frame(id.as_ref()).to_vec()), bytes: 0, then: Some(Then::NotSubscribed { max_in_flight }) },
        }
    }))
}

/// Ends a subscription; its unacknowledged deliveries go back to the group at once, without
/// counting an attempt.
pub(crate) async fn unsubscribe(id: Option<&RequestId>, sub_id: u64, subs: &mut Subscriptions, leases: &mut Leases) -> Reply {
    let Some(sub) = subs.remove(sub_id) else {
        return error(id, RequestError::NoSubscription(sub_id));
    };
    sub.engine.unsubscribe(&sub);
    for lease in leases.end_all_of(sub_id) {
        sub.release(lease.ticket).await;
    }
    ok(id, &())
}
