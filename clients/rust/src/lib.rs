//! A Rust client for sidebus: connect to the daemon's socket, publish, and subscribe with either
//! a handler (`Ok` acks, `Err` nacks) or a stream of deliveries you end yourself.
//!
//! ```no_run
//! # async fn example() -> Result<(), sidebus_client::Error> {
//! use sidebus_client::{Client, SubscribeOptions};
//! let client = Client::connect_as("/run/sidebus/sidebus.sock", "orders").await?;
//! client.publish("order.created", &serde_json::json!({"orderId": "o-1", "amount": 10, "currency": "EUR"})).await?;
//! let sub = client.subscribe("order.created", "inventory", SubscribeOptions::default()).await?;
//! sub.consume(|event| async move {
//!     println!("{}", event.id);
//!     Ok::<(), String>(())
//! })
//! .await;
//! # Ok(()) }
//! ```
//!
//! One background task owns the connection: requests are pipelined (matched to replies by
//! `id`), and deliveries are routed to their subscription's queue.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::collections::HashMap;
use std::fmt::Display;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
pub use sidebus_protocol::dead_letters::{Attempt, Count, DeadLetterEntry, DlqAction, DlqEntries, DlqList};
pub use sidebus_protocol::replay::{Replay, ReplayInfo, ReplayList, ReplayStarted};
use sidebus_protocol::reply::{Body, Subscribed};
pub use sidebus_protocol::reply::{HelloOk, PublishStatus, Published};
pub use sidebus_protocol::request::{Durability, Nack, Publish, Subscribe};
pub use sidebus_protocol::schema::{Compatibility, RegisterSchema, SchemaInfo, SchemaList, SchemaRegistered, SchemaSummary};
pub use sidebus_protocol::stats::{GroupStats, Stats};
use sidebus_protocol::{Detail, ErrorCode, Fields, Request, RequestFrame, RequestId, ServerFrame, codec};
pub use sidebus_protocol::{Event, PROTOCOL_VERSION};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};

/// What can go wrong talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Connecting or writing failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The connection is closed.
    #[error("the connection to the daemon is closed")]
    Closed,
    /// The daemon answered with an error.
    #[error("{code}: {message}")]
    Server {
        /// The error code.
        code: ErrorCode,
        /// The daemon's message.
        message: String,
        /// The offending fields or places.
        details: Vec<Detail>,
    },
    /// The daemon sent something this client does not understand.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The data could not be encoded as MessagePack.
    #[error("encode: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
}

impl Error {
    /// The daemon's error code, if this is an error reply.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

enum Command {
    Request { request: Request, event_id_key: bool, reply: oneshot::Sender<ServerFrame> },
    Subscribe { request: Request, deliveries: mpsc::Sender<sidebus_protocol::Deliver>, reply: oneshot::Sender<ServerFrame> },
    Send { request: Request },
}

/// A connection to the daemon. Cheap to clone; the connection closes when every clone (and
/// every subscription and delivery) is dropped.
#[derive(Clone)]
pub struct Client {
    tx: mpsc::Sender<Command>,
}

impl Client {
    /// Connects to the daemon's socket.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Client, Error> {
        let stream = UnixStream::connect(path).await?;
        Ok(Client::from_stream(stream))
    }

    /// Connects and says `hello` as `name` (the default `source` of this client's publishes).
    pub async fn connect_as(path: impl AsRef<Path>, name: &str) -> Result<Client, Error> {
        let c = Client::connect(path).await?;
        c.hello(name).await?;
        Ok(c)
    }

    /// Wraps an already connected stream.
    pub fn from_stream(stream: UnixStream) -> Client {
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(run(stream, rx));
        Client { tx }
    }

    async fn call(&self, request: Request) -> Result<Fields, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Request { request, event_id_key: false, reply }).await.map_err(|_| Error::Closed)?;
        ok_fields(rx.await.map_err(|_| Error::Closed)?)
    }

    /// Checks the protocol version and names this client.
    pub async fn hello(&self, name: &str) -> Result<HelloOk, Error> {
        let f = self.call(Request::Hello { protocol: PROTOCOL_VERSION, client: Some(name.to_owned()) }).await?;
        HelloOk::read(&f).map_err(|e| Error::Protocol(e.to_string()))
    }

    /// A round trip.
    pub async fn ping(&self) -> Result<(), Error> {
        self.call(Request::Ping).await.map(|_| ())
    }

    /// Publishes `data` (any serde value, sent as MessagePack) as an event of `event_type`.
    pub async fn publish(&self, event_type: &str, data: &impl Serialize) -> Result<Published, Error> {
        self.publish_with(Publish::new(event_type, encode(data)?)).await
    }

    /// Publishes with every option of the protocol; `data` must hold one MessagePack value
    /// (see [`encode`]).
    pub async fn publish_with(&self, p: Publish) -> Result<Published, Error> {
        let f = self.call(Request::Publish(p)).await?;
        Published::read(&f).map_err(|e| Error::Protocol(e.to_string()))
    }

    /// Sends a publish now and returns a handle to await its reply later: publishes started one
    /// after another are stored in that order while their replies are awaited together
    /// (pipelining).
    pub async fn publish_start(&self, p: Publish) -> Result<PendingPublish, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Request { request: Request::Publish(p), event_id_key: false, reply }).await.map_err(|_| Error::Closed)?;
        Ok(PendingPublish { rx })
    }

    /// Subscribes to `event_type` as a consumer of `group`.
    pub async fn subscribe(&self, event_type: &str, group: &str, opts: SubscribeOptions) -> Result<Subscription, Error> {
        let request = Request::Subscribe(Subscribe {
            event_type: event_type.to_owned(),
            group: group.to_owned(),
            max_in_flight: opts.max_in_flight,
            max_attempts: opts.max_attempts,
            ack_timeout_ms: opts.ack_timeout_ms,
        });
        // Room for every delivery the daemon may have in flight to this subscription.
        let (deliveries, rx) = mpsc::channel(opts.max_in_flight.unwrap_or(64).clamp(1, 1024) as usize);
        let (reply, reply_rx) = oneshot::channel();
        self.tx.send(Command::Subscribe { request, deliveries, reply }).await.map_err(|_| Error::Closed)?;
        let f = ok_fields(reply_rx.await.map_err(|_| Error::Closed)?)?;
        let Subscribed { sub } = Subscribed::read(&f).map_err(|e| Error::Protocol(e.to_string()))?;
        Ok(Subscription { sub, rx, client: self.clone(), ended: false })
    }

    /// Registers `schema` (any serde value holding a JSON Schema) as the next version of
    /// `event_type`'s schema, with the type's current compatibility mode.
    pub async fn register_schema(&self, event_type: &str, schema: &impl Serialize) -> Result<SchemaRegistered, Error> {
        self.register_schema_with(RegisterSchema {
            event_type: event_type.to_owned(),
            schema: encode(schema)?,
            compatibility: None,
            strict: None,
            dry_run: false,
        })
        .await
    }

    /// `register_schema` with every option (compatibility mode, strictness, dry run).
    pub async fn register_schema_with(&self, r: RegisterSchema) -> Result<SchemaRegistered, Error> {
        let f = self.call(Request::RegisterSchema(r)).await?;
        SchemaRegistered::read(&f).map_err(|e| Error::Protocol(e.to_string()))
    }

    /// A version of `event_type`'s schema (default: the latest).
    pub async fn get_schema(&self, event_type: &str, version: Option<u64>) -> Result<SchemaInfo, Error> {
        let f = self.call(Request::GetSchema { event_type: event_type.to_owned(), version }).await?;
        SchemaInfo::read(&f).map_err(|e| Error::Protocol(e.to_string()))
    }

    /// Every type with a schema.
    pub async fn list_schemas(&self) -> Result<SchemaList, Error> {
        let f = self.call(Request::ListSchemas).await?;
        SchemaList::read(&f).map_err(|e| Error::Protocol(e.to_string()))
    }

    /// Replays the events of `event_type` logged in `[since, until)` (RFC 3339) to `group`.
    pub async fn replay(&self, event_type: &str, group: &str, since: &str, until: Option<&str>) -> Result<ReplayStarted, Error> {
        let r = Replay { event_type: event_type.into(), group: group.into(), since: since.into(), until: until.map(str::to_owned) };
        let f = self.call(Request::Replay(r)).await?;
        ReplayStarted::read(&f).map_err(|e| Error::Protocol(e.to_string()))
    }

    /// Cancels a running replay.
    pub async fn replay_cancel(&self, replay: &str) -> Result<(), Error> {
        self.call(Request::ReplayCancel { replay: replay.into() }).await.map(|_| ())
    }

    /// Running replays (with `all`, also those that ended in the last day).
    pub async fn replays(&self, all: bool) -> Result<ReplayList, Error> {
        let f = self.call(Request::Replays { all }).await?;
        ReplayList::read(&f).map_err(|e| Error::Protocol(e.to_string()))
    }

    /// A page of a group's dead letters.
    pub async fn dlq_list(&self, l: DlqList) -> Result<DlqEntries, Error> {
        let f = self.call(Request::DlqList(l)).await?;
        DlqEntries::read(&f).map_err(|e| Error::Protocol(e.to_string()))
    }

    /// Puts dead letters back in front of their group's consumers; how many.
    pub async fn dlq_redrive(&self, a: DlqAction) -> Result<u64, Error> {
        let f = self.call(Request::DlqRedrive(a)).await?;
        Count::read(&f).map(|c| c.count).map_err(|e| Error::Protocol(e.to_string()))
    }

    /// Purges dead letters; how many.
    pub async fn dlq_purge(&self, a: DlqAction) -> Result<u64, Error> {
        let f = self.call(Request::DlqPurge(a)).await?;
        Count::read(&f).map(|c| c.count).map_err(|e| Error::Protocol(e.to_string()))
    }

    /// The daemon's counters, spool and groups.
    pub async fn stats(&self) -> Result<Stats, Error> {
        let f = self.call(Request::Stats).await?;
        Stats::read(&f).map_err(|e| Error::Protocol(e.to_string()))
    }

    /// Sends a request and returns the fields of its `ok` reply (for ops this client has no
    /// method for yet).
    pub async fn request(&self, request: Request) -> Result<Fields, Error> {
        self.call(request).await
    }

    async fn send(&self, request: Request) -> Result<(), Error> {
        self.tx.send(Command::Send { request }).await.map_err(|_| Error::Closed)
    }

    /// Publishes with the event id as the request's string `id`, the form SPEC.md's table shows.
    #[doc(hidden)]
    pub async fn publish_keyed(&self, p: Publish) -> Result<Published, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Request { request: Request::Publish(p), event_id_key: true, reply }).await.map_err(|_| Error::Closed)?;
        let f = ok_fields(rx.await.map_err(|_| Error::Closed)?)?;
        Published::read(&f).map_err(|e| Error::Protocol(e.to_string()))
    }
}

/// A publish sent and not yet answered.
pub struct PendingPublish {
    rx: oneshot::Receiver<ServerFrame>,
}

impl PendingPublish {
    /// Waits for the daemon's answer.
    pub async fn wait(self) -> Result<Published, Error> {
        let f = ok_fields(self.rx.await.map_err(|_| Error::Closed)?)?;
        Published::read(&f).map_err(|e| Error::Protocol(e.to_string()))
    }
}

/// Encodes a serde value as MessagePack for `Publish::data` (structs as maps).
pub fn encode(data: &impl Serialize) -> Result<Bytes, Error> {
    Ok(Bytes::from(rmp_serde::to_vec_named(data)?))
}

fn ok_fields(frame: ServerFrame) -> Result<Fields, Error> {
    match frame {
        ServerFrame::Ok { fields, .. } => Ok(fields),
        ServerFrame::Error(e) => Err(Error::Server { code: e.code, message: e.message, details: e.details }),
        other => Err(Error::Protocol(format!("unexpected reply {other:?}"))),
    }
}

/// Options of a subscription; `None` takes the daemon's default.
#[derive(Debug, Clone, Default)]
pub struct SubscribeOptions {
    /// Unacknowledged deliveries at most (daemon default 64).
    pub max_in_flight: Option<u64>,
    /// Failed attempts before the dead-letter queue.
    pub max_attempts: Option<u64>,
    /// How long a delivery may go without ack, nack or extend.
    pub ack_timeout_ms: Option<u64>,
}

/// A subscription: deliveries arrive in [`Subscription::next`]. Dropping it unsubscribes (its
/// unacknowledged deliveries go back to the group).
pub struct Subscription {
    sub: u64,
    rx: mpsc::Receiver<sidebus_protocol::Deliver>,
    client: Client,
    ended: bool,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if !self.ended {
            // Best effort: when the queue is full or the connection gone, closing the
            // connection ends the subscription anyway.
            let (reply, _) = oneshot::channel();
            let _ =
                self.client.tx.try_send(Command::Request { request: Request::Unsubscribe { sub: self.sub }, event_id_key: false, reply });
        }
    }
}

impl Subscription {
    /// The subscription's number on its connection.
    pub fn id(&self) -> u64 {
        self.sub
    }

    /// The next delivery; `None` once the connection is closed.
    pub async fn next(&mut self) -> Option<Delivery> {
        loop {
            let d = self.rx.recv().await?;
            match Event::decode(d.event.clone()) {
                Ok(event) => {
                    return Some(Delivery { tag: d.tag, attempt: d.attempt, event, client: self.client.clone() });
                }
                Err(e) => {
                    // The daemon only sends events it encoded; this would be a bug there.
                    tracing::error!(error = %e, tag = d.tag, "undecodable event; nacking it");
                    let _ = self
                        .client
                        .send(Request::Nack(Nack {
                            tag: d.tag,
                            error: Some(format!("client could not decode the event: {e}")),
                            delay_ms: None,
                            dead: true,
                        }))
                        .await;
                }
            }
        }
    }

    /// Ends the subscription; its unacknowledged deliveries go back to the group.
    pub async fn unsubscribe(mut self) -> Result<(), Error> {
        self.ended = true;
        self.client.call(Request::Unsubscribe { sub: self.sub }).await.map(|_| ())
    }

    /// Runs `handler` on every delivery until the connection closes: `Ok` acks it, `Err` nacks
    /// it with the error's text (the daemon retries with backoff, then dead-letters).
    pub async fn consume<F, Fut, E>(mut self, handler: F)
    where
        F: Fn(Event) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: Display,
    {
        while let Some(d) = self.next().await {
            let result = handler(d.event.clone()).await;
            let ended = match result {
                Ok(()) => d.ack().await,
                Err(e) => d.nack(&e.to_string()).await,
            };
            if let Err(e) = ended {
                tracing::warn!(error = %e, "could not end a delivery; it will be delivered again");
            }
        }
    }
}

/// One delivery. End it with [`ack`](Delivery::ack) or [`nack`](Delivery::nack); one left
/// alone is retried after its ack timeout.
pub struct Delivery {
    /// The delivery's tag on this connection.
    pub tag: u64,
    /// 1 on the first delivery of the event to this group.
    pub attempt: u64,
    /// The event.
    pub event: Event,
    client: Client,
}

impl Delivery {
    /// `data` decoded into `T`.
    pub fn data<T: DeserializeOwned>(&self) -> Result<T, rmp_serde::decode::Error> {
        rmp_serde::from_slice(&self.event.data)
    }

    /// Acknowledges the delivery and waits for the daemon to confirm.
    pub async fn ack(&self) -> Result<(), Error> {
        self.client.call(Request::Ack { tag: self.tag }).await.map(|_| ())
    }

    /// Acknowledges without waiting for a reply.
    pub async fn ack_nowait(&self) -> Result<(), Error> {
        self.client.send(Request::Ack { tag: self.tag }).await
    }

    /// Reports a failure; the daemon retries after its backoff.
    pub async fn nack(&self, error: &str) -> Result<(), Error> {
        self.nack_with(Some(error), None, false).await
    }

    /// Reports a failure with every option: a retry delay instead of the backoff, or straight
    /// to the dead-letter queue.
    pub async fn nack_with(&self, error: Option<&str>, delay_ms: Option<u64>, dead: bool) -> Result<(), Error> {
        self.client.call(Request::Nack(Nack { tag: self.tag, error: error.map(str::to_owned), delay_ms, dead })).await.map(|_| ())
    }

    /// Restarts the delivery's ack timeout: still working on it.
    pub async fn extend(&self) -> Result<(), Error> {
        self.client.call(Request::Extend { tag: self.tag }).await.map(|_| ())
    }
}

struct Pending {
    reply: oneshot::Sender<ServerFrame>,
    deliveries: Option<mpsc::Sender<sidebus_protocol::Deliver>>,
}

/// Replies awaited, by request id; shared by the writer (which adds) and the reader (which
/// takes). A std mutex: it is never held across an await.
type PendingMap = Arc<Mutex<HashMap<RequestId, Pending>>>;

fn lock(p: &PendingMap) -> std::sync::MutexGuard<'_, HashMap<RequestId, Pending>> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the connection as two tasks: a writer that sends requests and a reader that routes
/// what the daemon sends. Reading never waits for writing: a client that stopped reading while
/// its writes block would deadlock with a daemon blocked writing replies to it.
async fn run(stream: UnixStream, commands: mpsc::Receiver<Command>) {
    let (read, write) = stream.into_split();
    let pending: PendingMap = Arc::new(Mutex::new(HashMap::new()));
    let writer = tokio::spawn(write_requests(write, commands, pending.clone()));
    read_frames(read, pending.clone()).await;
    writer.abort();
    // Dropping the pending replies tells their callers the connection is closed.
    lock(&pending).clear();
}

async fn write_requests(write: tokio::net::unix::OwnedWriteHalf, mut commands: mpsc::Receiver<Command>, pending: PendingMap) {
    let mut writer = FramedWrite::new(write, codec::codec(64 << 20));
    let mut next_id: u64 = 1;
    let mut batch = Vec::with_capacity(64);
    while commands.recv_many(&mut batch, 64).await > 0 {
        for cmd in batch.drain(..) {
            let (request, id, entry) = match cmd {
                Command::Request { request, event_id_key, reply } => {
                    let id = match (&request, event_id_key) {
                        (Request::Publish(p), true) if p.event_id.is_some() => RequestId::Key(p.event_id.clone().unwrap_or_default()),
                        _ => {
                            next_id += 1;
                            RequestId::Num(next_id)
                        }
                    };
                    (request, Some(id), Some(Pending { reply, deliveries: None }))
                }
                Command::Subscribe { request, deliveries, reply } => {
                    next_id += 1;
                    (request, Some(RequestId::Num(next_id)), Some(Pending { reply, deliveries: Some(deliveries) }))
                }
                Command::Send { request } => (request, None, None),
            };
            // Registered before it is sent, so the reply always finds it.
            if let (Some(id), Some(entry)) = (&id, entry) {
                lock(&pending).insert(id.clone(), entry);
            }
            if writer.feed(Bytes::from(RequestFrame { id, request }.encode())).await.is_err() {
                return;
            }
        }
        if SinkExt::<Bytes>::flush(&mut writer).await.is_err() {
            return;
        }
    }
}

async fn read_frames(read: tokio::net::unix::OwnedReadHalf, pending: PendingMap) {
    // Frames from the daemon may be up to its max_frame_bytes; 64 MiB is the largest it allows.
    let mut reader = FramedRead::new(read, codec::codec(64 << 20));
    let mut subs: HashMap<u64, mpsc::Sender<sidebus_protocol::Deliver>> = HashMap::new();
    while let Some(Ok(frame)) = reader.next().await {
        match ServerFrame::parse(frame.freeze()) {
            Ok(ServerFrame::Deliver(d)) => {
                if let Some(tx) = subs.get(&d.sub) {
                    match tx.try_send(d) {
                        Ok(()) => {}
                        // The subscription was dropped: the delivery is retried after its ack
                        // timeout (or at once when the connection closes).
                        Err(mpsc::error::TrySendError::Closed(d)) => {
                            subs.remove(&d.sub);
                        }
                        // The daemon never has more than max_in_flight deliveries out, the
                        // queue's size: this would be a daemon bug.
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            tracing::warn!("a delivery arrived for a full subscription queue; it is retried after its ack timeout");
                        }
                    }
                }
            }
            Ok(ServerFrame::Ok { id: Some(id), fields }) => {
                let entry = lock(&pending).remove(&id);
                if let Some(p) = entry {
                    // The subscription's queue is in place before any later frame is read.
                    if let (Some(tx), Ok(s)) = (p.deliveries, Subscribed::read(&fields)) {
                        subs.insert(s.sub, tx);
                    }
                    let _ = p.reply.send(ServerFrame::Ok { id: Some(id), fields });
                }
            }
            Ok(ServerFrame::Error(e)) => {
                let entry = e.id.clone().and_then(|id| lock(&pending).remove(&id));
                match entry {
                    Some(p) => {
                        let _ = p.reply.send(ServerFrame::Error(e));
                    }
                    None => tracing::warn!(code = %e.code, message = %e.message, "error from the daemon"),
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "undecodable frame from the daemon"),
        }
    }
}
