//! One client connection: reads request frames, runs each op (`front::ops`), writes replies and
//! `deliver` pushes, and owns the connection's subscriptions and leases (`front::session`).
//!
//! Two tasks per connection. The connection's loop handles one event at a time (a frame, a
//! finished publish or settle, a delivery, an expired lease) and queues the frames it produces
//! in `outbox`; after each turn it hands them to the connection's **writer** task, which writes
//! them with one flush. The loop never waits for the socket to take its writes, so it always
//! goes on reading `ack`, `nack`, `extend` and requests: a client that is busy writing acks
//! while the daemon has deliveries to write to it (most simple single-threaded clients) can
//! never deadlock with it.
//!
//! Memory per connection is bounded: frames by `max_frame_bytes`, unfinished requests by
//! [`MAX_PENDING`] and [`MAX_PENDING_BYTES`], deliveries waiting to be written by the
//! subscriptions' `max_in_flight` (a worker hands a subscription no delivery without a slot,
//! and a slot comes back only when the delivery ends), and replies waiting to be written by
//! [`MAX_UNWRITTEN_BYTES`]: past it, and past the pending limits, reading pauses until the
//! writer catches up. A client that takes nothing of what it is sent for [`WRITE_TIMEOUT`] is
//! disconnected.

mod writer;

pub use writer::WRITE_TIMEOUT;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use sidebus_protocol::reply::Deliver;
use sidebus_protocol::request::Request;
use sidebus_protocol::{RequestFrame, codec};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedReadHalf;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use self::writer::Writer;
use crate::bus::deliver::{Delivery, Failed, Push};
use crate::config::access::Peer;
use crate::front::Shared;
use crate::front::access::Guard;
use crate::front::error::{RequestError, WireError};
use crate::front::ops::{self, Done, Reply, Then};
use crate::front::session::{Leases, Subscriptions};

/// Unfinished requests (publishes, acks awaiting Redis) per connection, at most.
pub const MAX_PENDING: usize = 4096;
/// Bytes of unfinished publishes per connection, at most.
pub const MAX_PENDING_BYTES: usize = 16 << 20;
/// Most events handled before the frames they produced are written.
const DRAIN_MAX: usize = 1024;
/// Bytes of frames waiting to be written, past which the connection stops reading requests
/// until the writer catches up (deliveries are bounded by credit on their own).
pub const MAX_UNWRITTEN_BYTES: usize = 8 << 20;

/// What woke the connection.
enum Event {
    Draining,
    Done(Done),
    Expired(u64),
    Delivery(Push),
    Frame(Option<Result<bytes::BytesMut, std::io::Error>>),
}

/// The state of one connection.
struct Conn {
    shared: Arc<Shared>,
    /// This connection's number in the daemon (it picks the publish lane).
    id: u64,
    /// The client's name from `hello`.
    client: Option<String>,
    subs: Subscriptions,
    leases: Leases,
    pending: FuturesUnordered<BoxFuture<'static, Done>>,
    pending_bytes: usize,
    outbox: Vec<Bytes>,
    draining: bool,
    writer: Writer,
    /// What the peer may do (`front::access`).
    access: Guard,
}

/// Serves one connection of `peer` until the client leaves, the connection breaks or shutdown
/// ends it.
pub async fn serve(stream: UnixStream, shared: Arc<Shared>, id: u64, peer: Peer) {
    let (read, write) = stream.into_split();
    let max = shared.config.max_frame_bytes;
    let mut reader = FramedRead::new(read, codec::codec(max));
    let writer = Writer::start(FramedWrite::new(write, codec::codec(max)));
    let (deliveries_tx, mut deliveries_rx) = mpsc::channel(shared.config.max_in_flight_per_connection as usize);
    let mut conn = Conn {
        shared: shared.clone(),
        id,
        client: None,
        subs: Subscriptions::new(deliveries_tx),
        leases: Leases::new(),
        pending: FuturesUnordered::new(),
        pending_bytes: 0,
        outbox: Vec::new(),
        draining: false,
        writer,
        access: Guard::new(peer, shared.config.access.clone()),
    };
    let why = conn.run(&mut reader, &mut deliveries_rx).await;
    tracing::debug!(client = conn.client.as_deref().unwrap_or(""), uid = conn.access.peer().uid, why, "connection closed");
    conn.close(&mut deliveries_rx).await;
    // What was queued (a last error reply) gets a moment to be written, then the socket closes.
    conn.writer.finish().await;
}

impl Conn {
    async fn run(
        &mut self,
        reader: &mut FramedRead<OwnedReadHalf, LengthDelimitedCodec>,
        deliveries: &mut mpsc::Receiver<Push>,
    ) -> &'static str {
        let shared = self.shared.clone();
        let broken = self.writer.broken.clone();
        let progress = self.writer.progress.clone();
        loop {
            if self.draining && self.pending.is_empty() && self.leases.is_empty() {
                return "shutdown";
            }
            let can_read = self.can_read();
            let event = tokio::select! {
                biased;
                _ = shared.closing.cancelled() => return "shutdown deadline",
                _ = broken.cancelled() => return "write failed or timed out",
                _ = shared.draining.cancelled(), if !self.draining => Event::Draining,
                Some(done) = self.pending.next(), if !self.pending.is_empty() => Event::Done(done),
                Some(expired) = self.leases.timers.next(), if !self.leases.timers.is_empty() => Event::Expired(expired.into_inner()),
                Some(d) = deliveries.recv() => Event::Delivery(d),
                frame = reader.next(), if can_read => Event::Frame(frame),
                // Reading waits for the writer to catch up; its progress wakes the loop.
                _ = progress.notified(), if !can_read => continue,
            };
            if let Some(why) = self.on(event).await {
                self.hand_over();
                return why;
            }
            // Take what else is ready now, so that one write carries many frames: a batch of
            // publishes completes at once, and a client pipelines many requests.
            for _ in 0..DRAIN_MAX {
                let event = if let Some(Some(done)) = self.pending.next().now_or_never() {
                    Event::Done(done)
                } else if let Ok(d) = deliveries.try_recv() {
                    Event::Delivery(d)
                } else if let Some(frame) = self.can_read().then(|| reader.next().now_or_never()).flatten() {
                    Event::Frame(frame)
                } else {
                    break;
                };
                if let Some(why) = self.on(event).await {
                    self.hand_over();
                    return why;
                }
            }
            self.hand_over();
        }
    }

    /// Reading goes on while draining (acks end the leases shutdown waits for), and pauses while
    /// too much is unfinished or waits to be written.
    fn can_read(&self) -> bool {
        self.pending.len() < MAX_PENDING && self.pending_bytes < MAX_PENDING_BYTES && self.writer.unwritten() < MAX_UNWRITTEN_BYTES
    }

    /// Hands the frames queued this turn to the writer task (never waits for the socket).
    fn hand_over(&mut self) {
        if !self.outbox.is_empty() {
            self.writer.send(std::mem::take(&mut self.outbox));
        }
    }

    /// Handles one event; `Some(why)` ends the connection.
    async fn on(&mut self, event: Event) -> Option<&'static str> {
        match event {
            Event::Draining => self.draining = true,
            Event::Done(done) => self.done(done),
            Event::Expired(tag) => {
                if let Some(lease) = self.leases.expired(tag) {
                    lease.sub.fail(lease.ticket, Failed::Expired, None).await;
                }
            }
            Event::Delivery(Push::Deliver(d)) => self.deliver(d).await,
            Event::Delivery(Push::Ended { sub, reason }) => self.ended(sub, reason).await,
            Event::Frame(None) => return Some("client closed"),
            Event::Frame(Some(Ok(bytes))) => self.handle(bytes.freeze()).await,
            Event::Frame(Some(Err(e))) if codec::is_frame_too_large(&e) => {
                self.outbox.push(WireError::from(RequestError::FrameTooLarge(self.shared.config.max_frame_bytes)).frame(None));
                return Some("frame too large");
            }
            Event::Frame(Some(Err(e))) => {
                tracing::debug!(error = %e, "read failed");
                return Some("read failed");
            }
        }
        None
    }

    /// A request finished: its reply, the bytes it held, what it changed.
    fn done(&mut self, done: Done) {
        self.pending_bytes -= done.bytes;
        if let Some(frame) = done.frame {
            self.outbox.push(Bytes::from(frame));
        }
        match done.then {
            Some(Then::Subscribed(sub)) => self.subs.insert(sub),
            Some(Then::NotSubscribed { max_in_flight }) => self.subs.unreserve(max_in_flight),
            None => {}
        }
    }

    /// Parses one request and runs its op.
    async fn handle(&mut self, frame: Bytes) {
        let RequestFrame { id, request } = match RequestFrame::parse(frame) {
            Ok(r) => r,
            Err(e) => {
                crate::bus::counters::add(&crate::bus::counters::COUNTERS.protocol_errors, 1);
                tracing::debug!(code = %e.code, message = %e.message, "bad request");
                let id = e.id.clone();
                self.outbox.push(WireError::from(e).frame(id.as_ref()));
                return;
            }
        };
        tracing::trace!(op = request.op(), "request");
        let scope = match self.access.check(&request) {
            Ok(scope) => scope,
            Err(refused) => {
                self.outbox.push(WireError::from(refused).frame(id.as_ref()));
                return;
            }
        };
        let shared = &self.shared;
        let reply = match request {
            Request::Hello { protocol, client } => {
                let (reply, name) = ops::hello::apply(id.as_ref(), protocol, client, &shared.config);
                if let Some(name) = name {
                    self.client = name;
                }
                reply
            }
            Request::Ping => ops::ok(id.as_ref(), &()),
            Request::Publish(p) => {
                let (reply, bytes) = ops::publish::apply(id, p, shared, self.id, self.client.as_deref()).await;
                self.pending_bytes += bytes;
                reply
            }
            Request::Subscribe(s) => ops::subscribe::subscribe(id, s, shared, &mut self.subs),
            Request::Unsubscribe { sub } => ops::subscribe::unsubscribe(id.as_ref(), sub, &mut self.subs, &mut self.leases).await,
            Request::Ack { tag } => ops::settle::ack(id, tag, &mut self.leases).await,
            Request::Nack(n) => ops::settle::nack(id, n, &mut self.leases).await,
            Request::Extend { tag } => ops::settle::extend(id.as_ref(), tag, &mut self.leases).await,
            Request::RegisterSchema(r) => ops::schema::register(id, r, shared),
            Request::GetSchema { event_type, version } => ops::schema::get(id, event_type, version, shared),
            Request::ListSchemas => ops::schema::list(id.as_ref(), shared),
            Request::Replay(r) => ops::replay::start(id, r, shared),
            Request::ReplayCancel { replay } => ops::replay::cancel(id, replay, shared, scope),
            Request::Replays { all } => ops::replay::list(id, all, shared, scope),
            Request::DlqList(l) => ops::dead_letters::list(id, l, shared),
            Request::DlqRedrive(a) => ops::dead_letters::redrive(id, a, shared),
            Request::DlqPurge(a) => ops::dead_letters::purge(id, a, shared),
            Request::Stats => ops::stats::apply(id, shared),
            Request::Groups { event_type } => ops::groups::list(id, event_type, shared, scope),
            Request::GroupDelete(d) => ops::groups::delete(id, d, shared),
            Request::GroupReset(r) => ops::groups::reset(id, r, shared),
        };
        match reply {
            Reply::Now(frame) => self.outbox.push(frame),
            Reply::Later(work) => self.pending.push(work),
            Reply::Nothing => {}
        }
    }

    /// Pushes a delivery and starts its lease.
    async fn deliver(&mut self, d: Delivery) {
        let sub = match self.subs.get(d.sub) {
            Some(sub) if !self.draining => sub.clone(),
            other => {
                // Unsubscribed (or shutting down) while it was queued: back to the group.
                if let Some(sub) = other.cloned() {
                    sub.release_slot();
                    sub.release(d.ticket).await;
                }
                return;
            }
        };
        crate::bus::counters::add(&crate::bus::counters::COUNTERS.delivered, 1);
        if d.attempt > 1 {
            crate::bus::counters::add(&crate::bus::counters::COUNTERS.retried, 1);
        }
        if d.ticket.is_replay() {
            crate::bus::counters::add(&crate::bus::counters::COUNTERS.replayed, 1);
        }
        crate::front::telemetry::record_delivery_latency(&d.event);
        let sub_id = sub.id;
        let tag = self.leases.start(sub, d.ticket, d.attempt);
        self.outbox.push(Bytes::from(Deliver { sub: sub_id, tag, attempt: d.attempt, event: d.event }.encode()));
    }

    /// The daemon ended a subscription (its group was deleted): what it holds goes back (to a
    /// group that is gone, so nothing is kept), and the client is told with an error push
    /// naming the subscription.
    async fn ended(&mut self, sub_id: u64, reason: String) {
        let Some(sub) = self.subs.remove(sub_id) else { return };
        for lease in self.leases.end_all_of(sub_id) {
            sub.release(lease.ticket).await;
        }
        tracing::debug!(sub = sub_id, %reason, "subscription ended by the daemon");
        self.outbox.push(WireError::from(RequestError::SubscriptionEnded { sub: sub_id, reason }).frame(None));
    }

    /// Ends the connection: its subscriptions stop and its deliveries go back to the group at
    /// once, counted as failed attempts unless the daemon is the one closing.
    async fn close(&mut self, deliveries: &mut mpsc::Receiver<Push>) {
        // Deliveries queued but never pushed go back without counting an attempt.
        deliveries.close();
        while let Some(push) = deliveries.recv().await {
            let Push::Deliver(d) = push else { continue };
            if let Some(sub) = self.subs.get(d.sub).cloned() {
                sub.release_slot();
                sub.release(d.ticket).await;
            }
        }
        for sub in self.subs.take_all() {
            sub.engine.unsubscribe(&sub);
        }
        let by_daemon = self.shared.draining.is_cancelled();
        for lease in self.leases.end_all() {
            if by_daemon {
                lease.sub.release(lease.ticket).await;
            } else {
                lease.sub.fail(lease.ticket, Failed::Disconnected, None).await;
            }
        }
    }
}

/// How long a connection may go without answering a write, for the docs of the limits.
pub const fn write_timeout() -> Duration {
    WRITE_TIMEOUT
}
