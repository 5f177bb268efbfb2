//! `subscribe` and `unsubscribe`.

use sidebus_protocol::reply::{Subscribed, encode_ok};
use sidebus_protocol::request::Subscribe;
use sidebus_protocol::{ErrorCode, FieldError, RequestId};

use crate::backend::redis::Failure;
use crate::bus::deliver::SubParams;
use crate::front::connection::Conn;
use crate::front::error::WireError;

impl Conn {
    pub(crate) async fn op_subscribe(&mut self, id: Option<RequestId>, s: Subscribe) {
        if self.draining {
            self.reply_err(id.as_ref(), WireError::new(ErrorCode::Unavailable, "the daemon is shutting down"));
            return;
        }
        let config = &self.shared.config;
        let max_in_flight = s.max_in_flight.map_or(config.max_in_flight, |n| n as u32);
        let budget = config.max_in_flight_per_connection;
        if self.budget_used + max_in_flight > budget {
            let problem =
                format!("this connection's subscriptions may hold {budget} deliveries in flight together; {} are taken", self.budget_used);
            self.reply_err(id.as_ref(), WireError::field(FieldError::new("max_in_flight", problem)));
            return;
        }
        let params = SubParams {
            event_type: s.event_type,
            group: s.group,
            max_in_flight,
            max_attempts: s.max_attempts.map_or(config.max_attempts, |n| n as u32),
            ack_timeout: s.ack_timeout_ms.map_or(config.ack_timeout, std::time::Duration::from_millis),
        };
        let sub_id = self.next_sub;
        // Right after start-up the backends may still be connecting: wait a little for them.
        let Some(engine) = self.shared.engine.get_within(config.publish_timeout).await else {
            self.reply_err(
                id.as_ref(),
                WireError::new(ErrorCode::Unavailable, "Redis or Postgres is not reachable yet; retry the subscription"),
            );
            return;
        };
        match engine.subscribe(sub_id, params, self.deliveries_tx.clone()).await {
            Ok(sub) => {
                tracing::debug!(r#type = %sub.params.event_type, group = %sub.params.group, sub = sub_id, "subscribed");
                self.next_sub += 1;
                self.budget_used += max_in_flight;
                self.subs.insert(sub_id, sub);
                self.outbox.push(encode_ok(id.as_ref(), &Subscribed { sub: sub_id }).into());
            }
            Err(e) => {
                tracing::warn!(error = %e, "subscribe failed");
                self.reply_err(id.as_ref(), WireError::from(&e));
            }
        }
    }

    pub(crate) async fn op_unsubscribe(&mut self, id: Option<RequestId>, sub_id: u64) {
        let Some(sub) = self.subs.remove(&sub_id) else {
            self.reply_err(id.as_ref(), WireError::new(ErrorCode::NotFound, format!("no subscription {sub_id} on this connection")));
            return;
        };
        sub.engine.unsubscribe(&sub);
        self.budget_used -= sub.params.max_in_flight;
        // Its deliveries go back to the group at once, without counting an attempt.
        let tags: Vec<u64> = self.leases.iter().filter(|(_, l)| l.sub.id == sub_id).map(|(t, _)| *t).collect();
        let settler = sub.engine.settler().clone();
        for tag in tags {
            if let Some(lease) = self.leases.remove(&tag) {
                self.timers.remove(&lease.timer);
                settler.fail(lease.keys.clone(), Failure::release(lease.entry_id), None).await;
            }
        }
        self.reply_ok(id.as_ref());
    }
}
