//! `ack`, `nack` and `extend`: end or prolong a lease. Each is answered only when it carries an
//! `id`; a tag this connection does not hold is an `unknown_tag` error either way (as an error
//! push when there is no `id`).

use sidebus_protocol::request::Nack;
use sidebus_protocol::{ErrorCode, RequestId};
use tokio::sync::oneshot;

use crate::backend::redis::Failure;
use crate::front::connection::{Conn, Done, Lease};
use crate::front::error::WireError;

impl Conn {
    /// Ends the lease of `tag` and gives its slot back, or answers `unknown_tag`.
    fn take_lease(&mut self, id: Option<&RequestId>, tag: u64) -> Option<Lease> {
        match self.leases.remove(&tag) {
            Some(lease) => {
                self.timers.remove(&lease.timer);
                lease.sub.release_slot();
                Some(lease)
            }
            None => {
                self.reply_err(id, unknown_tag(tag));
                None
            }
        }
    }

    /// A channel for the settler's outcome when the request wants a reply (it has an `id`),
    /// and the reply, written once the outcome is in: `ok` when `took` says Redis took it.
    fn reply_when_settled<T: Send + 'static>(
        &mut self,
        id: Option<RequestId>,
        took: fn(&T) -> bool,
        failed: &'static str,
    ) -> Option<oneshot::Sender<T>> {
        let id = id?;
        let (tx, rx) = oneshot::channel::<T>();
        self.pending.push(Box::pin(async move {
            let frame = match rx.await {
                Ok(outcome) if took(&outcome) => sidebus_protocol::reply::encode_ok(Some(&id), &()),
                _ => WireError::new(ErrorCode::Unavailable, failed).frame(Some(&id)).to_vec(),
            };
            Done { frame: Some(frame), bytes: 0 }
        }));
        Some(tx)
    }

    pub(crate) async fn op_ack(&mut self, id: Option<RequestId>, tag: u64) {
        let Some(lease) = self.take_lease(id.as_ref(), tag) else { return };
        crate::bus::counters::add(&crate::bus::counters::COUNTERS.acked, 1);
        let done = self.reply_when_settled(id, |ok: &bool| *ok, "Redis did not take the ack; the event may be delivered again");
        lease.sub.engine.settler().ack(lease.keys.clone(), lease.entry_id, lease.attempt > 1, done).await;
    }

    pub(crate) async fn op_nack(&mut self, id: Option<RequestId>, n: Nack) {
        let Some(lease) = self.take_lease(id.as_ref(), n.tag) else { return };
        crate::bus::counters::add(&crate::bus::counters::COUNTERS.nacked, 1);
        let failure = Failure {
            id: lease.entry_id,
            count: true,
            dead: n.dead,
            error: n.error.unwrap_or_else(|| "nacked".to_owned()),
            delay: n.delay_ms.map(std::time::Duration::from_millis),
            max_attempts: lease.sub.params.max_attempts,
        };
        let done =
            self.reply_when_settled(id, Option::is_some, "Redis did not take the nack; the event is delivered again after the ack timeout");
        lease.sub.engine.settler().fail(lease.keys.clone(), failure, done).await;
    }

    pub(crate) async fn op_extend(&mut self, id: Option<RequestId>, tag: u64) {
        let Some(lease) = self.leases.get(&tag) else {
            self.reply_err(id.as_ref(), unknown_tag(tag));
            return;
        };
        self.timers.reset(&lease.timer, lease.sub.params.ack_timeout);
        let (keys, entry, settler) = (lease.keys.clone(), lease.entry_id.clone(), lease.sub.engine.settler().clone());
        settler.touch(keys, entry).await;
        if id.is_some() {
            self.reply_ok(id.as_ref());
        }
    }
}

fn unknown_tag(tag: u64) -> WireError {
    WireError {
        tag: Some(tag),
        ..WireError::new(
            ErrorCode::UnknownTag,
            format!("tag {tag} is not a delivery this connection holds (already ended, expired, or never sent)"),
        )
    }
}
