//! Subscriptions and deliveries: the queue a subscription's deliveries wait in, `next()` and the
//! handler loop (`consume`, handlers run concurrently up to `max_in_flight`), ack/nack/extend on
//! the delivery's own connection, and what a subscription keeps across reconnections (its
//! options, its queue) and gives up at its end.

use std::fmt::Display;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use serde::de::DeserializeOwned;
use sidebus_protocol::request::{Nack, Subscribe};
use sidebus_protocol::{Deliver, Event, Request};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::client::Client;
use crate::conn::{Action, Conn};

/// Options of a subscription; `None` takes the daemon's default.
#[derive(Debug, Clone, Default)]
pub struct SubscribeOptions {
    /// Unacknowledged deliveries at most (daemon default 64): with [`Subscription::consume`],
    /// also how many handlers run at once.
    pub max_in_flight: Option<u64>,
    /// Failed attempts before the dead-letter queue.
    pub max_attempts: Option<u64>,
    /// How long a delivery may go without ack, nack or extend.
    pub ack_timeout_ms: Option<u64>,
}

/// A delivery waiting in its subscription's queue, with the connection it came on (its tag
/// means something only there).
pub(crate) struct Queued {
    conn: Arc<Conn>,
    deliver: Deliver,
}

struct SubState {
    /// The connection the subscription is routed on, and its number there.
    conn: Option<Arc<Conn>>,
    wire: u64,
    /// The daemon was told to unsubscribe `wire` (or the subscription was never routed).
    unsubscribed: bool,
    /// Why the subscription ended, when the daemon refused to take it back.
    error: Option<String>,
}

/// What a subscription keeps across connections; shared by the [`Subscription`], the client's
/// registry (for resubscribing) and the reader of each connection it is routed on.
pub(crate) struct SubShared {
    pub(crate) key: u64,
    pub(crate) request: Subscribe,
    // Unbounded, because the daemon bounds it: it never has more than `max_in_flight`
    // deliveries of a subscription out per connection, and those of a broken connection are
    // dropped as they are read.
    tx: mpsc::UnboundedSender<Queued>,
    state: Mutex<SubState>,
    /// Cancelled when the subscription stops taking deliveries (unsubscribe, close, end).
    closing: CancellationToken,
    /// Deliveries handed out by `next()` and not yet dropped; `close` waits for them.
    outstanding: AtomicUsize,
    idle: Notify,
}

impl SubShared {
    pub(crate) fn new(key: u64, request: Subscribe) -> (Arc<SubShared>, mpsc::UnboundedReceiver<Queued>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = SubState { conn: None, wire: 0, unsubscribed: true, error: None };
        let shared = SubShared {
            key,
            request,
            tx,
            state: Mutex::new(state),
            closing: CancellationToken::new(),
            outstanding: AtomicUsize::new(0),
            idle: Notify::new(),
        };
        (Arc::new(shared), rx)
    }

    fn lock(&self) -> MutexGuard<'_, SubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Routes the subscription on `conn` as number `wire` (called by the reader when the
    /// subscribe reply arrives). False when it must not be: it is closing, or it is already
    /// routed on that connection (a second subscribe raced the first); the reader then
    /// unsubscribes `wire`.
    pub(crate) fn attach(&self, conn: &Arc<Conn>, wire: u64) -> bool {
        let mut st = self.lock();
        if self.closing.is_cancelled() || st.conn.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            return false;
        }
        st.conn = Some(conn.clone());
        st.wire = wire;
        st.unsubscribed = false;
        true
    }

    /// True when the subscription is routed on `conn`.
    pub(crate) fn attached_to(&self, conn: &Arc<Conn>) -> bool {
        self.lock().conn.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn))
    }

    /// The connection the subscription was last routed on.
    pub(crate) fn conn(&self) -> Option<Arc<Conn>> {
        self.lock().conn.clone()
    }

    /// Queues a delivery (called by the reader); false when the subscription no longer takes
    /// deliveries.
    pub(crate) fn push(&self, conn: &Arc<Conn>, deliver: Deliver) -> bool {
        !self.closing.is_cancelled() && self.tx.send(Queued { conn: conn.clone(), deliver }).is_ok()
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.closing.is_cancelled()
    }

    pub(crate) async fn closing(&self) {
        self.closing.cancelled().await
    }

    /// Stops taking deliveries: `next()` returns `None` from now on.
    pub(crate) fn begin_close(&self) {
        self.closing.cancel();
    }

    /// Ends the subscription, saying why when it was not on purpose.
    pub(crate) fn end(&self, error: Option<String>) {
        if let Some(e) = error {
            self.lock().error.get_or_insert(e);
        }
        self.closing.cancel();
    }

    /// Waits until every delivery handed out has been dropped (ended or abandoned).
    pub(crate) async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.outstanding.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Takes the subscription's number on a live connection, once: the caller unsubscribes it.
    fn take_wire(&self) -> Option<(Arc<Conn>, u64)> {
        let mut st = self.lock();
        if st.unsubscribed {
            return None;
        }
        st.unsubscribed = true;
        match &st.conn {
            Some(c) if !c.is_dead() => Some((c.clone(), st.wire)),
            // The daemon dropped the subscription with its connection.
            _ => None,
        }
    }

    /// Tells the daemon to unsubscribe and waits for its answer. A connection that broke
    /// meanwhile is no error: the daemon dropped the subscription with it.
    pub(crate) async fn unsubscribe_wire(&self) -> Result<(), Error> {
        let Some((conn, wire)) = self.take_wire() else { return Ok(()) };
        match conn.call(Request::Unsubscribe { sub: wire }, Action::Unsubscribed(wire)).await {
            Ok(_) | Err(Error::ConnectionLost(_) | Error::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// [`SubShared::unsubscribe_wire`] without waiting, best effort (for `Drop`): when the write
    /// queue is full, the deliveries go back after their ack timeout or when the connection
    /// closes.
    fn unsubscribe_nowait(&self) {
        if let Some((conn, wire)) = self.take_wire() {
            conn.try_start(Request::Unsubscribe { sub: wire }, Action::Unsubscribed(wire));
        }
    }
}

/// A subscription: deliveries arrive in [`Subscription::next`], or are handed to a handler by
/// [`Subscription::consume`]. It survives reconnections: the client subscribes again with the
/// same options on every new connection, and `next()` goes on yielding. Dropping it
/// unsubscribes (its unacknowledged deliveries go back to the group).
pub struct Subscription {
    shared: Arc<SubShared>,
    rx: mpsc::UnboundedReceiver<Queued>,
    client: Client,
    ended: bool,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if !self.ended {
            self.shared.end(None);
            self.client.forget(self.shared.key);
            self.shared.unsubscribe_nowait();
        }
    }
}

impl Subscription {
    pub(crate) fn new(shared: Arc<SubShared>, rx: mpsc::UnboundedReceiver<Queued>, client: Client) -> Subscription {
        Subscription { shared, rx, client, ended: false }
    }

    /// The subscription's number on its current connection (it changes when the client
    /// reconnects).
    pub fn id(&self) -> u64 {
        self.shared.lock().wire
    }

    /// A handle that can end the subscription from elsewhere, e.g. while
    /// [`Subscription::consume`] runs it.
    pub fn handle(&self) -> SubscriptionHandle {
        SubscriptionHandle { shared: self.shared.clone(), client: self.client.clone() }
    }

    /// The event type subscribed to.
    pub fn event_type(&self) -> &str {
        &self.shared.request.event_type
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.shared.request.group
    }

    /// Why the subscription ended on its own: the daemon refused to take it back after a
    /// reconnection, or the connection was lost for good (a client that does not reconnect).
    /// `None` while it runs, or when it was ended on purpose.
    pub fn end_reason(&self) -> Option<String> {
        self.shared.lock().error.clone()
    }

    /// The next delivery; `None` once the subscription has ended: unsubscribed, its client
    /// closed (or closing), or its connection lost for good. Across a reconnection it simply
    /// goes on: deliveries of the broken connection still queued are dropped (the daemon has
    /// released them and delivers them again). Cancel-safe: a delivery is never lost in a
    /// `select!`.
    pub async fn next(&mut self) -> Option<Delivery> {
        loop {
            let q = tokio::select! {
                biased;
                _ = self.shared.closing.cancelled() => return None,
                q = self.rx.recv() => q?,
            };
            if q.conn.is_dead() {
                continue;
            }
            match Event::decode(q.deliver.event.clone()) {
                Ok(event) => {
                    self.shared.outstanding.fetch_add(1, Ordering::AcqRel);
                    let track = Arc::new(Track { sub: self.shared.clone(), ended: AtomicBool::new(false) });
                    return Some(Delivery {
                        tag: q.deliver.tag,
                        attempt: q.deliver.attempt,
                        event,
                        _client: self.client.clone(),
                        conn: q.conn,
                        track,
                    });
                }
                Err(e) => {
                    // The daemon only sends events it encoded; this would be a bug there.
                    tracing::error!(error = %e, tag = q.deliver.tag, "undecodable event; nacking it");
                    q.conn.try_send_nowait(Request::Nack(Nack {
                        tag: q.deliver.tag,
                        error: Some(format!("client could not decode the event: {e}")),
                        delay_ms: None,
                        dead: true,
                    }));
                }
            }
        }
    }

    /// Ends the subscription: no delivery is taken any more, and the daemon is told to
    /// unsubscribe (its unacknowledged deliveries go back to the group at once, without counting
    /// an attempt). A connection that is lost is no error: the daemon dropped the subscription
    /// with it.
    pub async fn unsubscribe(mut self) -> Result<(), Error> {
        self.ended = true;
        self.shared.end(None);
        self.client.forget(self.shared.key);
        self.shared.unsubscribe_wire().await
    }

    /// Runs `handler` on every delivery until the subscription ends (see [`Subscription::next`]):
    /// `Ok` acks it, `Err` nacks it with the error's text (the daemon retries with backoff, then
    /// dead-letters), a panic nacks it too. Handlers run concurrently, up to the subscription's
    /// `max_in_flight` (default 64), within this future; a handler awaiting does not hold up the
    /// others.
    pub async fn consume<F, Fut, E>(self, handler: F)
    where
        F: Fn(Event) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: Display,
    {
        self.consume_deliveries(|d: Delivery| handler(d.event.clone())).await
    }

    /// As [`Subscription::consume`], with the whole [`Delivery`]: the handler may end it itself
    /// ([`Delivery::nack_with`] with a delay or `dead`, [`Delivery::ack`]), and then its return
    /// value is ignored, or [`Delivery::extend`] it while it works.
    pub async fn consume_deliveries<F, Fut, E>(mut self, handler: F)
    where
        F: Fn(Delivery) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: Display,
    {
        let limit = self.shared.request.max_in_flight.unwrap_or(64).clamp(1, 1024) as usize;
        let mut running = FuturesUnordered::new();
        loop {
            tokio::select! {
                biased;
                Some(()) = running.next(), if !running.is_empty() => {}
                d = self.next(), if running.len() < limit => match d {
                    Some(d) => {
                        let work = handler(d.clone());
                        running.push(finish(d, work));
                    }
                    None => break,
                },
            }
        }
        // Stopped taking deliveries: the running handlers finish and their deliveries are
        // ended before the subscription is dropped.
        while running.next().await.is_some() {}
    }
}

/// Ends a [`Subscription`] from outside it; see [`Subscription::handle`].
#[derive(Clone)]
pub struct SubscriptionHandle {
    shared: Arc<SubShared>,
    client: Client,
}

impl SubscriptionHandle {
    /// Ends the subscription gracefully: no delivery is taken any more (`next()` returns `None`,
    /// `consume` stops), the deliveries handed out are waited for (running handlers finish and
    /// end theirs), then the daemon is told to unsubscribe (what it pushed meanwhile goes back
    /// to the group without counting an attempt).
    pub async fn unsubscribe(&self) -> Result<(), Error> {
        self.shared.begin_close();
        self.client.forget(self.shared.key);
        self.shared.wait_idle().await;
        self.shared.unsubscribe_wire().await
    }

    /// True once the subscription has stopped taking deliveries.
    pub fn is_ended(&self) -> bool {
        self.shared.is_closing()
    }
}

/// Awaits a handler and ends its delivery by its outcome, unless the handler ended it.
async fn finish<Fut, E>(d: Delivery, work: Fut)
where
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let outcome = AssertUnwindSafe(work).catch_unwind().await;
    if d.is_ended() {
        return;
    }
    let ended = match outcome {
        Ok(Ok(())) => d.ack().await,
        Ok(Err(e)) => d.nack(&e.to_string()).await,
        Err(panic) => {
            let what = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
            d.nack(&format!("handler panicked: {}", what.unwrap_or_default())).await
        }
    };
    match ended {
        // The delivery belonged to a connection that is gone; the daemon has released it and
        // delivers it again.
        Ok(()) | Err(Error::ConnectionLost(_) | Error::Closed) => {}
        Err(e) => tracing::warn!(error = %e, event = %d.event.id, "could not end a delivery; it will be delivered again"),
    }
}

/// Counts a delivery as handed out until its last clone is dropped.
struct Track {
    sub: Arc<SubShared>,
    ended: AtomicBool,
}

impl Drop for Track {
    fn drop(&mut self) {
        if self.sub.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.sub.idle.notify_waiters();
        }
    }
}

/// One delivery. End it with [`ack`](Delivery::ack) or [`nack`](Delivery::nack); one left
/// alone is retried after its ack timeout. Clones are the same delivery.
///
/// Its tag belongs to the connection it came on: once that connection is lost, ending it fails
/// with [`Error::ConnectionLost`] (the daemon has already released it and delivers it again).
#[derive(Clone)]
pub struct Delivery {
    /// The delivery's tag on its connection.
    pub tag: u64,
    /// 1 on the first delivery of the event to this group.
    pub attempt: u64,
    /// The event.
    pub event: Event,
    // Keeps the client (and so the connection) alive while the delivery is held.
    _client: Client,
    conn: Arc<Conn>,
    track: Arc<Track>,
}

impl Delivery {
    /// `data` decoded into `T`.
    pub fn data<T: DeserializeOwned>(&self) -> Result<T, rmp_serde::decode::Error> {
        rmp_serde::from_slice(&self.event.data)
    }

    /// True once [`ack`](Delivery::ack), [`ack_nowait`](Delivery::ack_nowait) or a nack was
    /// called on it (or a clone of it).
    pub fn is_ended(&self) -> bool {
        self.track.ended.load(Ordering::Acquire)
    }

    async fn send(&self, request: Request) -> Result<(), Error> {
        self.conn.call(request, Action::None).await.map(|_| ())
    }

    /// Acknowledges the delivery and waits for the daemon to confirm.
    pub async fn ack(&self) -> Result<(), Error> {
        self.track.ended.store(true, Ordering::Release);
        self.send(Request::Ack { tag: self.tag }).await
    }

    /// Acknowledges without waiting for a reply (a failure comes back as an error push, which
    /// the client logs).
    pub async fn ack_nowait(&self) -> Result<(), Error> {
        self.track.ended.store(true, Ordering::Release);
        self.conn.send_nowait(Request::Ack { tag: self.tag }).await
    }

    /// Reports a failure; the daemon retries after its backoff.
    pub async fn nack(&self, error: &str) -> Result<(), Error> {
        self.nack_with(Some(error), None, false).await
    }

    /// Reports a failure with every option: a retry delay instead of the backoff, or straight
    /// to the dead-letter queue.
    pub async fn nack_with(&self, error: Option<&str>, delay_ms: Option<u64>, dead: bool) -> Result<(), Error> {
        self.track.ended.store(true, Ordering::Release);
        self.send(Request::Nack(Nack { tag: self.tag, error: error.map(str::to_owned), delay_ms, dead })).await
    }

    /// Restarts the delivery's ack timeout: still working on it.
    pub async fn extend(&self) -> Result<(), Error> {
        self.send(Request::Extend { tag: self.tag }).await
    }
}
