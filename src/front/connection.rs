//! One client connection: reads request frames, runs each op (`src/ops/`), writes replies and
//! `deliver` pushes, and owns the connection's subscriptions and leases.
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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, SinkExt, StreamExt};
use sidebus_protocol::reply::Deliver;
use sidebus_protocol::request::Request;
use sidebus_protocol::{ErrorCode, RequestFrame, RequestId, codec};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::time::DelayQueue;
use tokio_util::time::delay_queue;

use crate::backend::Backends;
use crate::backend::ready::Ready;
use crate::backend::redis::Failure;
use crate::bus::deliver::{Delivery, Engine, Sub};
use crate::bus::publish::Publisher;
use crate::bus::schema::Registry;
use crate::config::Config;
use crate::front::error::WireError;

/// Unfinished requests (publishes, acks awaiting Redis) per connection, at most.
pub const MAX_PENDING: usize = 4096;
/// Bytes of unfinished publishes per connection, at most.
pub const MAX_PENDING_BYTES: usize = 16 << 20;
/// Most events handled before the frames they produced are written.
const DRAIN_MAX: usize = 1024;
/// Longest a client may take no bytes of what is written to it before it is disconnected.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of frames waiting to be written, past which the connection stops reading requests
/// until the writer catches up (deliveries are bounded by credit on their own).
pub const MAX_UNWRITTEN_BYTES: usize = 8 << 20;
/// How long a closing connection waits for its last frames (an error reply) to be written.
const LAST_WRITE: Duration = Duration::from_secs(1);

/// What every connection shares.
pub struct Shared {
    /// The daemon's configuration.
    pub config: Config,
    /// The publish queue.
    pub publisher: Publisher,
    /// The backends, once they answer.
    pub backends: Arc<Backends>,
    /// The schema registry.
    pub schemas: Arc<Registry>,
    /// Delivery, once both backends answer.
    pub engine: Arc<Ready<Engine>>,
    /// Cancelled when shutdown starts: no new publishes or subscriptions, no new deliveries.
    pub draining: CancellationToken,
    /// Cancelled when the grace period is over: release everything and close.
    pub closing: CancellationToken,
}

/// What woke the connection.
enum Event {
    Draining,
    Done(Done),
    Expired(u64),
    Delivery(Delivery),
    Frame(Option<Result<bytes::BytesMut, std::io::Error>>),
}

/// A delivery pushed to the client and not yet ended.
pub(crate) struct Lease {
    pub sub: Arc<Sub>,
    /// The lane (stream) the delivery comes from.
    pub keys: Arc<crate::backend::redis::GroupKeys>,
    pub entry_id: String,
    pub attempt: u64,
    pub timer: delay_queue::Key,
}

/// A finished request: the frame to write (if any) and the publish bytes it held.
pub(crate) struct Done {
    pub frame: Option<Vec<u8>>,
    pub bytes: usize,
}

/// The state of one connection.
pub(crate) struct Conn {
    pub shared: Arc<Shared>,
    /// This connection's number in the daemon (it picks the publish lane).
    pub id: u64,
    /// The client's name from `hello`.
    pub client: Option<String>,
    pub subs: HashMap<u64, Arc<Sub>>,
    pub next_sub: u64,
    /// Sum of the subscriptions' `max_in_flight`.
    pub budget_used: u32,
    pub leases: HashMap<u64, Lease>,
    pub timers: DelayQueue<u64>,
    pub next_tag: u64,
    pub deliveries_tx: mpsc::Sender<Delivery>,
    pub pending: FuturesUnordered<BoxFuture<'static, Done>>,
    pub pending_bytes: usize,
    pub outbox: Vec<Bytes>,
    pub draining: bool,
    writer: Writer,
}

/// The connection's side of its writer task.
struct Writer {
    tx: mpsc::UnboundedSender<Vec<Bytes>>,
    /// Bytes handed to the writer and not yet written.
    unwritten: Arc<AtomicUsize>,
    /// Signalled after each batch written, so that a loop waiting for room reads again.
    progress: Arc<tokio::sync::Notify>,
    /// Cancelled when a write failed or the client took nothing for [`WRITE_TIMEOUT`].
    broken: CancellationToken,
}

/// Serves one connection until the client leaves, the connection breaks or shutdown ends it.
pub async fn serve(stream: UnixStream, shared: Arc<Shared>, id: u64) {
    let (read, write) = stream.into_split();
    let max = shared.config.max_frame_bytes;
    let mut reader = FramedRead::new(read, codec::codec(max));
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = Writer {
        tx,
        unwritten: Arc::new(AtomicUsize::new(0)),
        progress: Arc::new(tokio::sync::Notify::new()),
        broken: CancellationToken::new(),
    };
    let write_task = tokio::spawn(write_frames(
        FramedWrite::new(write, codec::codec(max)),
        rx,
        writer.unwritten.clone(),
        writer.progress.clone(),
        writer.broken.clone(),
    ));
    let (deliveries_tx, mut deliveries_rx) = mpsc::channel(shared.config.max_in_flight_per_connection as usize);
    let mut conn = Conn {
        shared: shared.clone(),
        id,
        client: None,
        subs: HashMap::new(),
        next_sub: 1,
        budget_used: 0,
        leases: HashMap::new(),
        timers: DelayQueue::new(),
        next_tag: 1,
        deliveries_tx,
        pending: FuturesUnordered::new(),
        pending_bytes: 0,
        outbox: Vec::new(),
        draining: false,
        writer,
    };
    let why = conn.run(&mut reader, &mut deliveries_rx).await;
    tracing::debug!(client = conn.client.as_deref().unwrap_or(""), why, "connection closed");
    conn.close(&mut deliveries_rx).await;
    // What was queued (a last error reply) gets a moment to be written, then the socket closes.
    let Conn { writer, .. } = conn;
    drop(writer.tx);
    if tokio::time::timeout(LAST_WRITE, write_task).await.is_err() {
        tracing::debug!("the last frames were not written in time");
    }
}

/// The writer task of a connection: writes every batch it is handed with one flush, until the
/// connection drops its sender (then it returns once everything is written) or a write fails.
/// Each step of a write may wait at most [`WRITE_TIMEOUT`] for the client to take bytes.
async fn write_frames(
    mut sink: FramedWrite<OwnedWriteHalf, LengthDelimitedCodec>,
    mut rx: mpsc::UnboundedReceiver<Vec<Bytes>>,
    unwritten: Arc<AtomicUsize>,
    progress: Arc<tokio::sync::Notify>,
    broken: CancellationToken,
) {
    let mut batches = Vec::new();
    while rx.recv_many(&mut batches, 64).await > 0 {
        let mut bytes = 0;
        for frame in batches.drain(..).flatten() {
            bytes += frame.len();
            match tokio::time::timeout(WRITE_TIMEOUT, SinkExt::<Bytes>::feed(&mut sink, frame)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return write_failed(&broken, &e.to_string()),
                Err(_) => return write_failed(&broken, "timed out"),
            }
        }
        match tokio::time::timeout(WRITE_TIMEOUT, SinkExt::<Bytes>::flush(&mut sink)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return write_failed(&broken, &e.to_string()),
            Err(_) => return write_failed(&broken, "timed out"),
        }
        unwritten.fetch_sub(bytes, Ordering::AcqRel);
        progress.notify_one();
    }
}

fn write_failed(broken: &CancellationToken, why: &str) {
    if why == "timed out" {
        tracing::warn!(timeout_s = WRITE_TIMEOUT.as_secs(), "client stopped reading; disconnecting it");
    } else {
        tracing::debug!(error = why, "write failed");
    }
    broken.cancel();
}

impl Conn {
    async fn run(
        &mut self,
        reader: &mut FramedRead<OwnedReadHalf, LengthDelimitedCodec>,
        deliveries: &mut mpsc::Receiver<Delivery>,
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
                Some(expired) = self.timers.next(), if !self.timers.is_empty() => Event::Expired(expired.into_inner()),
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
        self.pending.len() < MAX_PENDING
            && self.pending_bytes < MAX_PENDING_BYTES
            && self.writer.unwritten.load(Ordering::Acquire) < MAX_UNWRITTEN_BYTES
    }

    /// Hands the frames queued this turn to the writer task (never waits for the socket).
    fn hand_over(&mut self) {
        if self.outbox.is_empty() {
            return;
        }
        let frames = std::mem::take(&mut self.outbox);
        let bytes: usize = frames.iter().map(Bytes::len).sum();
        self.writer.unwritten.fetch_add(bytes, Ordering::AcqRel);
        // The writer is gone only after a write failed, which ends this connection anyway.
        let _ = self.writer.tx.send(frames);
    }

    /// Handles one event; `Some(why)` ends the connection.
    async fn on(&mut self, event: Event) -> Option<&'static str> {
        match event {
            Event::Draining => self.draining = true,
            Event::Done(done) => {
                self.pending_bytes -= done.bytes;
                if let Some(frame) = done.frame {
                    self.outbox.push(Bytes::from(frame));
                }
            }
            Event::Expired(tag) => self.expire(tag).await,
            Event::Delivery(d) => self.deliver(d).await,
            Event::Frame(None) => return Some("client closed"),
            Event::Frame(Some(Ok(bytes))) => self.handle(bytes.freeze()).await,
            Event::Frame(Some(Err(e))) if codec::is_frame_too_large(&e) => {
                let message = format!(
                    "a frame is larger than max_frame_bytes ({} bytes); closing the connection",
                    self.shared.config.max_frame_bytes
                );
                self.outbox.push(WireError::new(ErrorCode::FrameTooLarge, message).frame(None));
                return Some("frame too large");
            }
            Event::Frame(Some(Err(e))) => {
                tracing::debug!(error = %e, "read failed");
                return Some("read failed");
            }
        }
        None
    }

    /// Parses and runs one request.
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
        match request {
            Request::Hello { protocol, client } => self.op_hello(id, protocol, client),
            Request::Ping => self.reply_ok(id.as_ref()),
            Request::Publish(p) => self.op_publish(id, p).await,
            Request::Subscribe(s) => self.op_subscribe(id, s).await,
            Request::Ack { tag } => self.op_ack(id, tag).await,
            Request::Nack(n) => self.op_nack(id, n).await,
            Request::Extend { tag } => self.op_extend(id, tag).await,
            Request::Unsubscribe { sub } => self.op_unsubscribe(id, sub).await,
            Request::RegisterSchema(r) => self.op_register_schema(id, r),
            Request::GetSchema { event_type, version } => self.op_get_schema(id, event_type, version),
            Request::ListSchemas => self.op_list_schemas(id),
            Request::Replay(r) => self.op_replay(id, r),
            Request::ReplayCancel { replay } => self.op_replay_cancel(id, replay),
            Request::Replays { all } => self.op_replays(id, all),
            Request::DlqList(l) => self.op_dlq_list(id, l),
            Request::DlqRedrive(a) => self.op_dlq_redrive(id, a),
            Request::DlqPurge(a) => self.op_dlq_purge(id, a),
            Request::Stats => self.op_stats(id),
        }
    }

    /// Queues an empty `ok`.
    pub(crate) fn reply_ok(&mut self, id: Option<&RequestId>) {
        self.outbox.push(Bytes::from(sidebus_protocol::reply::encode_ok(id, &())));
    }

    /// Queues an error reply (or, without an id, an error push).
    pub(crate) fn reply_err(&mut self, id: Option<&RequestId>, e: WireError) {
        self.outbox.push(e.frame(id));
    }

    /// Pushes a delivery and starts its lease.
    async fn deliver(&mut self, d: Delivery) {
        let sub = match self.subs.get(&d.sub) {
            Some(sub) if !self.draining => sub.clone(),
            other => {
                // Unsubscribed (or shutting down) while it was queued: back to the group.
                if let Some(sub) = other {
                    sub.release_slot();
                    sub.engine.settler().fail(d.keys.clone(), Failure::release(d.entry.id), None).await;
                }
                return;
            }
        };
        let tag = self.next_tag;
        self.next_tag += 1;
        let attempt = u64::from(d.entry.failed) + 1;
        let timer = self.timers.insert(tag, sub.params.ack_timeout);
        crate::bus::counters::add(&crate::bus::counters::COUNTERS.delivered, 1);
        if attempt > 1 {
            crate::bus::counters::add(&crate::bus::counters::COUNTERS.retried, 1);
        }
        if d.keys.lane == crate::backend::redis::LaneKind::Replay {
            crate::bus::counters::add(&crate::bus::counters::COUNTERS.replayed, 1);
        }
        crate::front::telemetry::record_delivery_latency(&d.entry.event);
        self.outbox.push(Bytes::from(Deliver { sub: sub.id, tag, attempt, event: d.entry.event }.encode()));
        self.leases.insert(tag, Lease { sub, keys: d.keys, entry_id: d.entry.id, attempt, timer });
    }

    /// A lease ran out: a failed attempt.
    async fn expire(&mut self, tag: u64) {
        let Some(lease) = self.leases.remove(&tag) else {
            return;
        };
        lease.sub.release_slot();
        crate::bus::counters::add(&crate::bus::counters::COUNTERS.expired_leases, 1);
        let ms = lease.sub.params.ack_timeout.as_millis();
        tracing::debug!(r#type = %lease.keys.event_type, group = %lease.keys.group, entry = %lease.entry_id, "lease expired");
        let failure = Failure {
            id: lease.entry_id,
            count: true,
            dead: false,
            error: format!("ack timeout: no ack within {ms} ms"),
            delay: None,
            max_attempts: lease.sub.params.max_attempts,
        };
        lease.sub.engine.settler().fail(lease.keys.clone(), failure, None).await;
    }

    /// Ends the connection: its subscriptions stop and its deliveries go back to the group at
    /// once, counted as failed attempts unless the daemon is the one closing.
    async fn close(&mut self, deliveries: &mut mpsc::Receiver<Delivery>) {
        // Deliveries queued but never pushed go back without counting an attempt.
        deliveries.close();
        while let Some(d) = deliveries.recv().await {
            if let Some(sub) = self.subs.get(&d.sub) {
                sub.release_slot();
                sub.engine.settler().fail(d.keys.clone(), Failure::release(d.entry.id), None).await;
            }
        }
        for sub in std::mem::take(&mut self.subs).into_values() {
            sub.engine.unsubscribe(&sub);
        }
        let by_daemon = self.shared.draining.is_cancelled();
        for (_, lease) in self.leases.drain() {
            let failure = if by_daemon {
                Failure::release(lease.entry_id)
            } else {
                Failure {
                    id: lease.entry_id,
                    count: true,
                    dead: false,
                    error: "consumer disconnected".to_owned(),
                    delay: Some(Duration::ZERO),
                    max_attempts: lease.sub.params.max_attempts,
                }
            };
            lease.sub.engine.settler().fail(lease.keys.clone(), failure, None).await;
        }
    }
}
