//! One connection to the daemon: a writer task that sends queued frames (batched, flushed when
//! the queue is empty), a reader task that matches replies to requests by id and routes
//! deliveries to their subscription, and the failure of every request in flight when the
//! connection breaks. A connection is never reused after a break; the client opens a new one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use sidebus_protocol::reply::{Body, Subscribed};
use sidebus_protocol::{Deliver, ErrorCode, Fields, Request, RequestFrame, RequestId, ServerFrame, codec};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::subscription::SubShared;

/// Frames from the daemon may be up to its `max_frame_bytes`; 64 MiB is the most it allows.
const MAX_INBOUND_FRAME: usize = 64 << 20;
/// Frames waiting to be written, at most: a caller beyond it waits for room, so what waits in
/// memory stays bounded while the socket is slow.
const WRITE_QUEUE: usize = 1024;
/// How long the reader still waits for the daemon to hang up after the client shut its side
/// down; the daemon closes at once, so this only bounds a daemon that misbehaves.
const HANGUP_GRACE: Duration = Duration::from_secs(2);

/// What the reader does, before reading the next frame, when an `ok` reply arrives: routing a
/// subscription there means no delivery of it can come before its route exists.
#[derive(Clone)]
pub(crate) enum Action {
    None,
    /// Route the deliveries of the `sub` in the reply to this subscription.
    Subscribed(Arc<SubShared>),
    /// Stop routing the deliveries of this `sub` (the daemon hands them back).
    Unsubscribed(u64),
}

/// The answer to a request: the daemon's frame, or why there is none.
pub(crate) type Reply = Result<ServerFrame, Error>;

struct Pending {
    reply: oneshot::Sender<Reply>,
    action: Action,
}

struct State {
    pending: HashMap<RequestId, Pending>,
    /// Set once the connection is broken or closed: why, and whether the client closed it.
    broken: Option<(String, bool)>,
}

/// Why a request could not be queued.
pub(crate) enum StartError {
    /// Nothing was sent: the connection was already broken. The request may go on the next
    /// connection.
    NotSent(Box<Request>),
    /// The request cannot be sent at all.
    Failed(Error),
}

pub(crate) struct Conn {
    tx: mpsc::Sender<Bytes>,
    state: Mutex<State>,
    next_id: AtomicU64,
    /// Cancelled when the connection is broken or closed.
    dead: CancellationToken,
    /// Cancelled when the reader has stopped.
    reader_done: CancellationToken,
    /// The daemon's `max_frame_bytes`, from `hello`.
    max_frame: AtomicU64,
}

impl Conn {
    /// Starts the writer and reader tasks of `stream`. `shutdown` is the client's: once it is
    /// cancelled the writer sends what is queued, then closes its side.
    pub(crate) fn spawn(stream: UnixStream, shutdown: CancellationToken) -> Arc<Conn> {
        let (read, write) = stream.into_split();
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let conn = Arc::new(Conn {
            tx,
            state: Mutex::new(State { pending: HashMap::new(), broken: None }),
            next_id: AtomicU64::new(0),
            dead: CancellationToken::new(),
            reader_done: CancellationToken::new(),
            // Until `hello` says otherwise, the daemon's default (PROTOCOL.md).
            max_frame: AtomicU64::new(sidebus_protocol::DEFAULT_MAX_FRAME_BYTES as u64),
        });
        tokio::spawn(write_loop(write, rx, conn.clone(), shutdown.clone()));
        tokio::spawn(read_loop(read, conn.clone(), shutdown));
        conn
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.dead.is_cancelled()
    }

    pub(crate) async fn dead(&self) {
        self.dead.cancelled().await
    }

    pub(crate) async fn reader_done(&self) {
        self.reader_done.cancelled().await
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.lock().pending.len()
    }

    pub(crate) fn set_max_frame(&self, n: u64) {
        self.max_frame.store(n, Ordering::Relaxed);
    }

    /// The error of a request on this connection once it is broken.
    fn failure(&self) -> Error {
        match &self.lock().broken {
            Some((_, true)) => Error::Closed,
            Some((reason, false)) => Error::ConnectionLost(reason.clone()),
            None => Error::ConnectionLost("the connection broke".into()),
        }
    }

    /// Breaks the connection once: every request in flight fails (with `Closed` when the
    /// client closed it, else `ConnectionLost`), and `dead` is cancelled.
    pub(crate) fn fail(&self, reason: String, closed: bool) {
        let pending = {
            let mut st = self.lock();
            if st.broken.is_some() {
                return;
            }
            st.broken = Some((reason.clone(), closed));
            std::mem::take(&mut st.pending)
        };
        self.dead.cancel();
        for (_, p) in pending {
            let err = if closed { Error::Closed } else { Error::ConnectionLost(reason.clone()) };
            let _ = p.reply.send(Err(err));
        }
    }

    /// Encodes a request with `id` (or none), refusing what the daemon would refuse for its
    /// size: it would close the connection, failing every request in flight, not only this one.
    fn encode(&self, id: Option<RequestId>, request: Request) -> Result<(Bytes, Request), Error> {
        let frame = RequestFrame { id, request };
        let bytes = frame.encode();
        let max = self.max_frame.load(Ordering::Relaxed);
        if max > 0 && bytes.len() as u64 > max {
            let message = format!("the {} request is {} bytes, over the daemon's max_frame_bytes {max}", frame.request.op(), bytes.len());
            return Err(Error::Server { code: ErrorCode::FrameTooLarge, message, details: vec![] });
        }
        Ok((Bytes::from(bytes), frame.request))
    }

    fn request_id(&self, request: &Request, keyed: bool) -> RequestId {
        match request {
            Request::Publish(p) if keyed && p.event_id.is_some() => RequestId::Key(p.event_id.clone().unwrap_or_default()),
            _ => RequestId::Num(self.next_id.fetch_add(1, Ordering::Relaxed) + 1),
        }
    }

    /// Registers a reply under a new id and queues the request (waiting while the write queue
    /// is full). With `keyed`, a publish with an event id uses it as its string `id`.
    pub(crate) async fn start(&self, request: Request, keyed: bool, action: Action) -> Result<oneshot::Receiver<Reply>, StartError> {
        let id = self.request_id(&request, keyed);
        let (bytes, request) = self.encode(Some(id.clone()), request).map_err(StartError::Failed)?;
        let (reply, rx) = oneshot::channel();
        {
            // Registered before it is queued, so the reply always finds it.
            let mut st = self.lock();
            if st.broken.is_some() {
                return Err(StartError::NotSent(Box::new(request)));
            }
            st.pending.insert(id.clone(), Pending { reply, action });
        }
        if self.tx.send(bytes).await.is_err() {
            // The writer has stopped: the connection is broken. If the failure has not taken
            // the entry yet, the request was never sent.
            if self.lock().pending.remove(&id).is_some() {
                return Err(StartError::NotSent(Box::new(request)));
            }
        }
        Ok(rx)
    }

    /// As [`Conn::start`] without waiting: false when the queue is full or the connection is
    /// broken. For `Drop`, which cannot wait.
    pub(crate) fn try_start(&self, request: Request, action: Action) -> bool {
        let id = self.request_id(&request, false);
        let Ok((bytes, _)) = self.encode(Some(id.clone()), request) else { return false };
        let (reply, _) = oneshot::channel();
        {
            let mut st = self.lock();
            if st.broken.is_some() {
                return false;
            }
            st.pending.insert(id.clone(), Pending { reply, action });
        }
        if self.tx.try_send(bytes).is_err() {
            self.lock().pending.remove(&id);
            return false;
        }
        true
    }

    /// Sends a request and waits for its `ok` reply's fields. A connection that was already
    /// broken gives its failure.
    pub(crate) async fn call(&self, request: Request, action: Action) -> Result<Fields, Error> {
        let rx = match self.start(request, false, action).await {
            Ok(rx) => rx,
            Err(StartError::NotSent(_)) => return Err(self.failure()),
            Err(StartError::Failed(e)) => return Err(e),
        };
        wait_reply(rx).await
    }

    /// Sends a request without `id` (no reply; only `ack`, `nack` and `extend` take this).
    pub(crate) async fn send_nowait(&self, request: Request) -> Result<(), Error> {
        let (bytes, _) = self.encode(None, request)?;
        if self.is_dead() || self.tx.send(bytes).await.is_err() {
            return Err(self.failure());
        }
        Ok(())
    }

    /// [`Conn::send_nowait`] without waiting for room in the queue.
    pub(crate) fn try_send_nowait(&self, request: Request) {
        if let Ok((bytes, _)) = self.encode(None, request) {
            let _ = self.tx.try_send(bytes);
        }
    }

    /// Takes the reply of `id` (and its action) out of the pending requests.
    fn take(&self, id: &RequestId) -> Option<Pending> {
        self.lock().pending.remove(id)
    }
}

/// Waits for a reply and turns it into the fields of an `ok` or the error.
pub(crate) async fn wait_reply(rx: oneshot::Receiver<Reply>) -> Result<Fields, Error> {
    let frame = rx.await.unwrap_or_else(|_| Err(Error::ConnectionLost("the connection broke".into())))?;
    ok_fields(frame)
}

pub(crate) fn ok_fields(frame: ServerFrame) -> Result<Fields, Error> {
    match frame {
        ServerFrame::Ok { fields, .. } => Ok(fields),
        ServerFrame::Error(e) => Err(Error::Server { code: e.code, message: e.message, details: e.details }),
        other => Err(Error::Protocol(format!("unexpected reply {other:?}"))),
    }
}

/// Writes queued frames; a burst of pipelined requests is written with one flush. Once the
/// client shuts down it writes what is still queued and closes its side of the socket.
async fn write_loop(write: OwnedWriteHalf, mut rx: mpsc::Receiver<Bytes>, conn: Arc<Conn>, shutdown: CancellationToken) {
    let mut writer = FramedWrite::new(write, codec::codec(MAX_INBOUND_FRAME));
    let mut batch = Vec::with_capacity(256);
    loop {
        tokio::select! {
            biased;
            _ = conn.dead.cancelled() => return,
            n = rx.recv_many(&mut batch, 256) => {
                if n == 0 {
                    return;
                }
                for frame in batch.drain(..) {
                    if let Err(e) = writer.feed(frame).await {
                        conn.fail(format!("writing to the daemon: {e}"), false);
                        return;
                    }
                }
                if let Err(e) = SinkExt::<Bytes>::flush(&mut writer).await {
                    conn.fail(format!("writing to the daemon: {e}"), false);
                    return;
                }
            }
            _ = shutdown.cancelled() => {
                while let Ok(frame) = rx.try_recv() {
                    if writer.feed(frame).await.is_err() {
                        return;
                    }
                }
                if SinkExt::<Bytes>::flush(&mut writer).await.is_ok() {
                    let _ = writer.get_mut().shutdown().await;
                }
                return;
            }
        }
    }
}

/// Reads frames and dispatches them until the daemon hangs up (or, once the client shut down,
/// until the grace for that runs out); then fails the connection.
async fn read_loop(read: OwnedReadHalf, conn: Arc<Conn>, shutdown: CancellationToken) {
    let mut reader = FramedRead::new(read, codec::codec(MAX_INBOUND_FRAME));
    // The reader alone routes deliveries, so this map needs no lock.
    let mut routes: HashMap<u64, Arc<SubShared>> = HashMap::new();
    let mut hangup: Option<tokio::time::Instant> = None;
    let reason = loop {
        let next = match hangup {
            Some(deadline) => match tokio::time::timeout_at(deadline, reader.next()).await {
                Ok(next) => next,
                Err(_) => break "the client closed the connection".to_owned(),
            },
            None => tokio::select! {
                biased;
                next = reader.next() => next,
                _ = shutdown.cancelled() => {
                    hangup = Some(tokio::time::Instant::now() + HANGUP_GRACE);
                    continue;
                }
            },
        };
        match next {
            Some(Ok(frame)) => dispatch(&conn, &mut routes, frame.freeze()),
            Some(Err(e)) => break format!("reading from the daemon: {e}"),
            None => break "the daemon closed the connection".to_owned(),
        }
    };
    conn.fail(reason, shutdown.is_cancelled());
    conn.reader_done.cancel();
}

fn dispatch(conn: &Arc<Conn>, routes: &mut HashMap<u64, Arc<SubShared>>, frame: Bytes) {
    // A cheap clone (a reference count), kept to find the id of a reply that does not parse.
    let frame_copy = frame.clone();
    match ServerFrame::parse(frame) {
        Ok(ServerFrame::Deliver(d)) => route(conn, routes, d),
        Ok(ServerFrame::Ok { id: Some(id), fields }) => {
            let Some(p) = conn.take(&id) else { return };
            match p.action {
                Action::None => {}
                Action::Subscribed(sub) => {
                    if let Ok(s) = Subscribed::read(&fields) {
                        if sub.attach(conn, s.sub) {
                            routes.insert(s.sub, sub);
                        } else {
                            // Given up meanwhile (unsubscribed or closing): the daemon keeps
                            // nothing for it.
                            conn.try_start(Request::Unsubscribe { sub: s.sub }, Action::Unsubscribed(s.sub));
                        }
                    }
                }
                Action::Unsubscribed(sub) => {
                    routes.remove(&sub);
                }
            }
            let _ = p.reply.send(Ok(ServerFrame::Ok { id: Some(id), fields }));
        }
        Ok(ServerFrame::Error(e)) => match e.id.as_ref().and_then(|id| conn.take(id)) {
            Some(p) => {
                let _ = p.reply.send(Ok(ServerFrame::Error(e)));
            }
            None => match e.sub.and_then(|n| routes.remove(&n)) {
                // The daemon ended the subscription (its group was deleted): it takes no more
                // deliveries, and `end_reason` says why.
                Some(sub) => {
                    tracing::warn!(code = %e.code, message = %e.message, "the daemon ended a subscription");
                    sub.end(Some(e.message));
                }
                None => tracing::warn!(code = %e.code, message = %e.message, tag = ?e.tag, "error push from the daemon"),
            },
        },
        // An ok without id, or a push this client does not know (from a newer daemon).
        Ok(_) => {}
        Err(e) => {
            // A reply that cannot be read still ends its request, so that it does not wait
            // for ever.
            let id = Fields::parse(frame_copy).ok().and_then(|f| match f.get("id") {
                Some(v) => v.u64().ok().map(RequestId::Num).or_else(|| v.str().ok().map(|s| RequestId::Key(s.to_owned()))),
                None => None,
            });
            match id.and_then(|id| conn.take(&id)) {
                Some(p) => {
                    let _ = p.reply.send(Err(Error::Protocol(format!("unreadable reply: {e}"))));
                }
                None => tracing::warn!(error = %e, "undecodable frame from the daemon"),
            }
        }
    }
}

fn route(conn: &Arc<Conn>, routes: &mut HashMap<u64, Arc<SubShared>>, d: Deliver) {
    let Some(sub) = routes.get(&d.sub) else {
        // Unsubscribed meanwhile: the daemon hands the delivery back itself.
        return;
    };
    // A subscription that has ended or is closing drops it: the unsubscribe hands it back.
    sub.push(conn, d);
}
