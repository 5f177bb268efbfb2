//! `ack`, `nack` and `extend`: end or prolong a lease. Each is answered only when it carries an
//! `id`; a tag this connection does not hold is an `unknown_tag` error either way (as an error
//! push when there is no `id`).

use sidebus_protocol::RequestId;
use sidebus_protocol::reply::encode_ok;
use sidebus_protocol::request::Nack;
use tokio::sync::oneshot;

use super::{Done, Reply, error, ok};
use crate::bus::deliver::Failed;
use crate::front::error::RequestError;
use crate::front::session::Leases;

/// With an `id`: a channel for whether Redis took the outcome, and the reply written once it
/// is in (`ok`, or `unavailable` saying `failed`).
fn when_settled(id: Option<RequestId>, failed: RequestError) -> (Option<oneshot::Sender<bool>>, Reply) {
    let Some(id) = id else { return (None, Reply::Nothing) };
    let (tx, rx) = oneshot::channel::<bool>();
    let reply = Reply::Later(Box::pin(async move {
        let frame = match rx.await {
            Ok(true) => encode_ok(Some(&id), &()),
            _ => crate::front::error::WireError::from(failed).frame(Some(&id)).to_vec(),
        };
        Done { frame: Some(frame), bytes: 0, then: None }
    }));
    (Some(tx), reply)
}

/// `ack`: the delivery succeeded.
pub(crate) async fn ack(id: Option<RequestId>, tag: u64, leases: &mut Leases) -> Reply {
    let Some(lease) = leases.end(tag) else { return error(id.as_ref(), RequestError::UnknownTag(tag)) };
    let (done, reply) = when_settled(id, RequestError::AckNotTaken);
    lease.sub.ack(lease.ticket, lease.attempt > 1, done).await;
    reply
}

/// `nack`: the delivery failed; retried after the backoff (or its delay), or dead-lettered.
pub(crate) async fn nack(id: Option<RequestId>, n: Nack, leases: &mut Leases) -> Reply {
    let Some(lease) = leases.end(n.tag) else { return error(id.as_ref(), RequestError::UnknownTag(n.tag)) };
    let (done, reply) = when_settled(id, RequestError::NackNotTaken);
    let how = Failed::Nack { error: n.error, delay: n.delay_ms.map(std::time::Duration::from_millis), dead: n.dead };
    lease.sub.fail(lease.ticket, how, done).await;
    reply
}

/// `extend`: the consumer is still working on it; the lease starts again.
pub(crate) async fn extend(id: Option<&RequestId>, tag: u64, leases: &mut Leases) -> Reply {
    let Some(lease) = leases.extend(tag) else { return error(id, RequestError::UnknownTag(tag)) };
    let (sub, ticket) = (lease.sub.clone(), lease.ticket.clone());
    sub.extend(&ticket).await;
    if id.is_some() { ok(id, &()) } else { Reply::Nothing }
}
