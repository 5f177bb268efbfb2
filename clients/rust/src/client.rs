//! The `Client`: connecting and its options, the connection it currently uses, reconnection with
//! backoff and resubscription after a break, requests that wait for the next connection, the
//! graceful `close`, and every request as a method.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use sidebus_protocol::dead_letters::{Count, DlqAction, DlqEntries, DlqList};
use sidebus_protocol::groups::{GroupDelete, GroupDeleted, GroupList, GroupMoved, GroupReset, ResetTo};
use sidebus_protocol::replay::{Replay, ReplayList, ReplayStarted};
use sidebus_protocol::reply::{Body, HelloOk, Published};
use sidebus_protocol::request::{Publish, Subscribe};
use sidebus_protocol::schema::{RegisterSchema, SchemaInfo, SchemaList, SchemaRegistered};
use sidebus_protocol::stats::Stats;
use sidebus_protocol::{ErrorCode, Fields, PROTOCOL_VERSION, Request};
use tokio::net::UnixStream;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::conn::{Action, Conn, Reply, StartError, wait_reply};
use crate::subscription::{SubShared, SubscribeOptions, Subscription};
use crate::{Error, encode};

/// The daemon's socket when `$SIDEBUS_SOCKET` is not set.
pub const DEFAULT_SOCKET: &str = "/run/sidebus/sidebus.sock";

/// The daemon's socket: `$SIDEBUS_SOCKET`, else [`DEFAULT_SOCKET`].
pub fn default_socket() -> PathBuf {
    std::env::var_os("SIDEBUS_SOCKET").filter(|s| !s.is_empty()).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// How long one reconnection attempt (connect and `hello`) may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// How a [`Client`] connects and reconnects.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The client's name, said in `hello` on every connection: the default `source` of its
    /// publishes. Without one, the first connection says no `hello` (as [`Client::connect`]).
    pub name: Option<String>,
    /// Reconnect after the connection breaks (default true). Without it, a break ends the
    /// client: subscriptions end and every later request fails with [`Error::Closed`].
    pub reconnect: bool,
    /// How long a request made while disconnected waits for the reconnection before it fails
    /// with [`Error::Timeout`] (default 30 s).
    pub reconnect_timeout: Duration,
    /// The first wait between reconnection attempts (default 50 ms); it doubles up to
    /// `max_backoff` (default 2 s), each wait ±20 % at random.
    pub min_backoff: Duration,
    /// The longest wait between reconnection attempts.
    pub max_backoff: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            name: None,
            reconnect: true,
            reconnect_timeout: Duration::from_secs(30),
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
        }
    }
}

/// The connection the client uses now.
#[derive(Clone)]
enum Link {
    Up(Arc<Conn>),
    /// Reconnecting.
    Down,
    /// Closed, or lost for good: no request will be sent any more.
    Closed,
}

pub(crate) struct Inner {
    path: Option<PathBuf>,
    opts: ClientOptions,
    /// The name of the latest `hello`, said again on every new connection.
    name: Mutex<Option<String>>,
    link: watch::Sender<Link>,
    /// The live subscriptions, subscribed again on every new connection.
    subs: Mutex<HashMap<u64, Arc<SubShared>>>,
    next_sub: AtomicU64,
    close_started: AtomicBool,
    /// Cancelled when `close` starts: no reconnection, no new subscription.
    closing: CancellationToken,
    /// Cancelled when the connection is to be closed: by `close`, or when the last handle of
    /// the client is dropped. The writer then sends what is queued and hangs up.
    shutdown: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The user's side of the client: when the last one is dropped, the connection is closed.
struct Handle {
    inner: Arc<Inner>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.inner.shutdown.cancel();
    }
}

/// A connection to the daemon that reconnects by itself. Cheap to clone; requests from every
/// clone are pipelined on the one connection. The connection closes when every clone (and every
/// subscription, delivery and pending publish, which hold one) is dropped, or at
/// [`Client::close`].
#[derive(Clone)]
pub struct Client {
    handle: Arc<Handle>,
}

impl Client {
    /// Connects to the daemon's socket (without `hello`). Only this first connection is not
    /// retried: no daemon there is an error at once.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Client, Error> {
        Client::connect_with(path, ClientOptions::default()).await
    }

    /// Connects and says `hello` as `name` (the default `source` of this client's publishes).
    pub async fn connect_as(path: impl AsRef<Path>, name: &str) -> Result<Client, Error> {
        Client::connect_with(path, ClientOptions { name: Some(name.to_owned()), ..ClientOptions::default() }).await
    }

    /// Connects with every option; says `hello` when `opts.name` is set.
    pub async fn connect_with(path: impl AsRef<Path>, opts: ClientOptions) -> Result<Client, Error> {
        let path = path.as_ref().to_owned();
        let stream = UnixStream::connect(&path).await?;
        let name = opts.name.clone();
        let client = Client::start(Some(path), opts, stream);
        if let Some(name) = name {
            client.hello(&name).await?;
        }
        Ok(client)
    }

    /// Wraps an already connected stream. Such a client cannot reconnect (it does not know
    /// where to): a break ends it.
    pub fn from_stream(stream: UnixStream) -> Client {
        Client::start(None, ClientOptions { reconnect: false, ..ClientOptions::default() }, stream)
    }

    fn start(path: Option<PathBuf>, opts: ClientOptions, stream: UnixStream) -> Client {
        let shutdown = CancellationToken::new();
        let conn = Conn::spawn(stream, shutdown.clone());
        let (link, _) = watch::channel(Link::Up(conn.clone()));
        let inner = Arc::new(Inner {
            path,
            name: Mutex::new(opts.name.clone()),
            opts,
            link,
            subs: Mutex::new(HashMap::new()),
            next_sub: AtomicU64::new(0),
            close_started: AtomicBool::new(false),
            closing: CancellationToken::new(),
            shutdown,
        });
        tokio::spawn(supervise(inner.clone(), conn));
        Client { handle: Arc::new(Handle { inner }) }
    }

    fn inner(&self) -> &Arc<Inner> {
        &self.handle.inner
    }

    /// True while the client has a live connection (false while it reconnects, or once closed).
    pub fn is_connected(&self) -> bool {
        matches!(&*self.inner().link.borrow(), Link::Up(c) if !c.is_dead())
    }

    pub(crate) fn forget(&self, key: u64) {
        lock(&self.inner().subs).remove(&key);
    }

    async fn call(&self, request: Request) -> Result<Fields, Error> {
        wait_reply(self.inner().start(request, false, Action::None).await?).await
    }

    /// Checks the protocol version and names this client; the name is said again on every
    /// reconnection.
    pub async fn hello(&self, name: &str) -> Result<HelloOk, Error> {
        *lock(&self.inner().name) = Some(name.to_owned());
        let conn = self.inner().live().await?;
        hello_on(&conn, Some(name.to_owned())).await
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
    /// (see [`encode`]). A publish in flight when the connection breaks fails with
    /// [`Error::ConnectionLost`] and is not sent again: publish it again yourself, with the
    /// same `event_id` if it must be stored once.
    pub async fn publish_with(&self, p: Publish) -> Result<Published, Error> {
        let f = self.call(Request::Publish(p)).await?;
        read(&f)
    }

    /// Sends a publish now and returns a handle to await its reply later: publishes started one
    /// after another are stored in that order while their replies are awaited together
    /// (pipelining). It waits only while the write queue is full or the client reconnects.
    pub async fn publish_start(&self, p: Publish) -> Result<PendingPublish, Error> {
        let rx = self.inner().start(Request::Publish(p), false, Action::None).await?;
        Ok(PendingPublish { rx, _client: self.clone() })
    }

    /// Subscribes to `event_type` as a consumer of `group`. The subscription is taken again,
    /// with the same options, on every new connection.
    pub async fn subscribe(&self, event_type: &str, group: &str, opts: SubscribeOptions) -> Result<Subscription, Error> {
        let inner = self.inner();
        if inner.closing.is_cancelled() {
            return Err(Error::Closed);
        }
        let request = Subscribe {
            event_type: event_type.to_owned(),
            group: group.to_owned(),
            max_in_flight: opts.max_in_flight,
            max_attempts: opts.max_attempts,
            ack_timeout_ms: opts.ack_timeout_ms,
        };
        let key = inner.next_sub.fetch_add(1, Ordering::Relaxed);
        let (shared, rx) = SubShared::new(key, request.clone());
        let sub = Subscription::new(shared.clone(), rx, self.clone());
        let reply = inner.start(Request::Subscribe(request), false, Action::Subscribed(shared.clone())).await?;
        wait_reply(reply).await?;
        lock(&inner.subs).insert(key, shared.clone());
        if inner.closing.is_cancelled() {
            // `close` began meanwhile and did not see it.
            drop(sub);
            return Err(Error::Closed);
        }
        // If the connection broke after the reply, a reconnection may already have taken the
        // registry without this subscription: take it to the new connection here (a second
        // subscribe there is refused by `attach` and unsubscribed).
        if shared.conn().is_some_and(|c| c.is_dead())
            && let Some(conn) = inner.current()
        {
            tokio::spawn(resubscribe(inner.clone(), shared, conn));
        }
        Ok(sub)
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
        read(&self.call(Request::RegisterSchema(r)).await?)
    }

    /// A version of `event_type`'s schema (default: the latest).
    pub async fn get_schema(&self, event_type: &str, version: Option<u64>) -> Result<SchemaInfo, Error> {
        read(&self.call(Request::GetSchema { event_type: event_type.to_owned(), version }).await?)
    }

    /// Every type with a schema.
    pub async fn list_schemas(&self) -> Result<SchemaList, Error> {
        read(&self.call(Request::ListSchemas).await?)
    }

    /// Replays the events of `event_type` logged in `[since, until)` (RFC 3339) to `group`.
    pub async fn replay(&self, event_type: &str, group: &str, since: &str, until: Option<&str>) -> Result<ReplayStarted, Error> {
        let r = Replay { event_type: event_type.into(), group: group.into(), since: since.into(), until: until.map(str::to_owned) };
        read(&self.call(Request::Replay(r)).await?)
    }

    /// Cancels a running replay.
    pub async fn replay_cancel(&self, replay: &str) -> Result<(), Error> {
        self.call(Request::ReplayCancel { replay: replay.into() }).await.map(|_| ())
    }

    /// Running replays (with `all`, also those that ended in the last day).
    pub async fn replays(&self, all: bool) -> Result<ReplayList, Error> {
        read(&self.call(Request::Replays { all }).await?)
    }

    /// A page of a group's dead letters.
    pub async fn dlq_list(&self, l: DlqList) -> Result<DlqEntries, Error> {
        read(&self.call(Request::DlqList(l)).await?)
    }

    /// Puts dead letters back in front of their group's consumers; how many.
    pub async fn dlq_redrive(&self, a: DlqAction) -> Result<u64, Error> {
        read::<Count>(&self.call(Request::DlqRedrive(a)).await?).map(|c| c.count)
    }

    /// Purges dead letters; how many.
    pub async fn dlq_purge(&self, a: DlqAction) -> Result<u64, Error> {
        read::<Count>(&self.call(Request::DlqPurge(a)).await?).map(|c| c.count)
    }

    /// Every group (of `event_type`, when given) with its state.
    pub async fn groups(&self, event_type: Option<&str>) -> Result<GroupList, Error> {
        read(&self.call(Request::Groups { event_type: event_type.map(str::to_owned) }).await?)
    }

    /// Deletes a group everywhere; refused (`bad_request`) while it has live subscriptions
    /// unless `force`. Returns how many subscriptions the daemon ended.
    pub async fn group_delete(&self, event_type: &str, group: &str, force: bool) -> Result<u64, Error> {
        let d = GroupDelete { event_type: event_type.into(), group: group.into(), force };
        read::<GroupDeleted>(&self.call(Request::GroupDelete(d)).await?).map(|d| d.ended)
    }

    /// Moves a group's read position to `"end"`, `"start"` or an RFC 3339 time; returns the
    /// stream entry id it now reads after.
    pub async fn group_reset(&self, event_type: &str, group: &str, to: &str) -> Result<String, Error> {
        let r = GroupReset { event_type: event_type.into(), group: group.into(), to: ResetTo::parse(to) };
        read::<GroupMoved>(&self.call(Request::GroupReset(r)).await?).map(|m| m.entry)
    }

    /// The daemon's counters, spool and groups.
    pub async fn stats(&self) -> Result<Stats, Error> {
        read(&self.call(Request::Stats).await?)
    }

    /// Sends a request and returns the fields of its `ok` reply (for ops this client has no
    /// method for yet). The fields include `op` and `id`.
    pub async fn request(&self, request: Request) -> Result<Fields, Error> {
        self.call(request).await
    }

    /// Publishes with the event id as the request's string `id`, the older form PROTOCOL.md describes under `publish`.
    #[doc(hidden)]
    pub async fn publish_keyed(&self, p: Publish) -> Result<Published, Error> {
        let rx = self.inner().start(Request::Publish(p), true, Action::None).await?;
        read(&wait_reply(rx).await?)
    }

    /// Closes the client gracefully, giving running handlers up to 30 seconds: see
    /// [`Client::close_within`].
    pub async fn close(&self) -> Result<(), Error> {
        self.close_within(Duration::from_secs(30)).await
    }

    /// Closes the client gracefully: its subscriptions stop taking deliveries (`next()` returns
    /// `None`, [`Subscription::consume`] stops), the running handlers finish and their
    /// deliveries are ended (every [`Delivery`](crate::Delivery) handed out counts until it is
    /// dropped), the daemon is told to unsubscribe (deliveries it pushed meanwhile go back to
    /// the group without counting an attempt), requests in flight get their answers; then the
    /// connection is closed and reconnection stops. Later requests fail with [`Error::Closed`].
    ///
    /// What is not done within `grace` is given up (the connection is closed all the same), and
    /// the result is [`Error::Timeout`]. Closing twice waits for the first close.
    pub async fn close_within(&self, grace: Duration) -> Result<(), Error> {
        let inner = self.inner();
        let deadline = Instant::now() + grace;
        if inner.close_started.swap(true, Ordering::AcqRel) {
            let mut link = inner.link.subscribe();
            return match tokio::time::timeout_at(deadline, link.wait_for(|l| matches!(l, Link::Closed))).await {
                Ok(_) => Ok(()),
                Err(_) => Err(Error::Timeout(grace)),
            };
        }
        inner.closing.cancel();
        let subs: Vec<Arc<SubShared>> = lock(&inner.subs).drain().map(|(_, s)| s).collect();
        for s in &subs {
            s.begin_close();
        }
        let mut in_time = true;
        for s in &subs {
            if tokio::time::timeout_at(deadline, s.wait_idle()).await.is_err() {
                in_time = false;
                break;
            }
        }
        // Even late, the daemon is told (briefly), so the deliveries go back at once.
        let unsubscribe_by = deadline.max(Instant::now() + Duration::from_secs(1));
        let unsubscribed =
            futures::future::join_all(subs.iter().map(|s| tokio::time::timeout_at(unsubscribe_by, s.unsubscribe_wire()))).await;
        for r in unsubscribed {
            if let Ok(Err(e)) = r {
                tracing::warn!(error = %e, "unsubscribing while closing");
            }
        }
        for s in &subs {
            s.end(None);
        }
        let conn = inner.current();
        if let Some(c) = &conn {
            // Requests in flight (publishes, acks of the handlers that just finished) get their
            // answers before the connection closes.
            while c.in_flight() > 0 && !c.is_dead() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if c.in_flight() > 0 && !c.is_dead() {
                in_time = false;
            }
        }
        inner.link.send_replace(Link::Closed);
        inner.shutdown.cancel();
        if let Some(c) = &conn {
            let _ = tokio::time::timeout(Duration::from_secs(3), c.reader_done()).await;
            c.fail("the client closed the connection".into(), true);
        }
        if in_time { Ok(()) } else { Err(Error::Timeout(grace)) }
    }
}

fn read<T: Body>(f: &Fields) -> Result<T, Error> {
    T::read(f).map_err(|e| Error::Protocol(e.to_string()))
}

async fn hello_on(conn: &Conn, name: Option<String>) -> Result<HelloOk, Error> {
    let f = conn.call(Request::Hello { protocol: PROTOCOL_VERSION, client: name }, Action::None).await?;
    let h: HelloOk = read(&f)?;
    conn.set_max_frame(h.max_frame_bytes);
    Ok(h)
}

/// A publish sent and not yet answered. It keeps the connection open until it is answered.
pub struct PendingPublish {
    rx: oneshot::Receiver<Reply>,
    _client: Client,
}

impl PendingPublish {
    /// Waits for the daemon's answer; [`Error::ConnectionLost`] if the connection broke first
    /// (the publish may or may not have been stored).
    pub async fn wait(self) -> Result<Published, Error> {
        read(&wait_reply(self.rx).await?)
    }
}

impl Inner {
    fn current(&self) -> Option<Arc<Conn>> {
        match &*self.link.borrow() {
            Link::Up(c) => Some(c.clone()),
            _ => None,
        }
    }

    /// The live connection; while there is none, waits for the reconnection up to
    /// `reconnect_timeout`.
    async fn live(&self) -> Result<Arc<Conn>, Error> {
        if let Link::Up(c) = &*self.link.borrow()
            && !c.is_dead()
        {
            return Ok(c.clone());
        }
        let mut link = self.link.subscribe();
        let deadline = Instant::now() + self.opts.reconnect_timeout;
        loop {
            match &*link.borrow_and_update() {
                Link::Up(c) if !c.is_dead() => return Ok(c.clone()),
                Link::Closed => return Err(Error::Closed),
                // Reconnecting, or broken and not yet noticed by the supervisor.
                _ => {}
            }
            if self.closing.is_cancelled() {
                // Closing: there will be no new connection.
                return Err(Error::Closed);
            }
            tokio::select! {
                changed = tokio::time::timeout_at(deadline, link.changed()) => match changed {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Err(Error::Closed),
                    Err(_) => return Err(Error::Timeout(self.opts.reconnect_timeout)),
                },
                _ = self.closing.cancelled() => return Err(Error::Closed),
            }
        }
    }

    /// Queues a request on the live connection. One found broken before it was sent waits for
    /// the next connection: nothing was sent, so nothing can be duplicated.
    async fn start(&self, mut request: Request, keyed: bool, action: Action) -> Result<oneshot::Receiver<Reply>, Error> {
        loop {
            let conn = self.live().await?;
            match conn.start(request, keyed, action.clone()).await {
                Ok(rx) => return Ok(rx),
                Err(StartError::NotSent(r)) if conn.is_dead() => request = *r,
                // The writer stopped without a break: the client is shutting down.
                Err(StartError::NotSent(_)) => return Err(Error::Closed),
                Err(StartError::Failed(e)) => return Err(e),
            }
        }
    }

    /// Opens a connection, saying `hello` with the latest name.
    async fn open(&self) -> Result<Arc<Conn>, Error> {
        let path = self.path.as_ref().ok_or(Error::Closed)?;
        let stream = UnixStream::connect(path).await?;
        let conn = Conn::spawn(stream, self.shutdown.clone());
        // A connection given up half way (hello refused, attempt cancelled) is closed.
        struct Abandon(Option<Arc<Conn>>);
        impl Drop for Abandon {
            fn drop(&mut self) {
                if let Some(c) = self.0.take() {
                    c.fail("abandoned while connecting".into(), true);
                }
            }
        }
        let mut guard = Abandon(Some(conn.clone()));
        let name = lock(&self.name).clone();
        hello_on(&conn, name).await?;
        guard.0 = None;
        Ok(conn)
    }

    /// Ends every subscription (the client will not reconnect).
    fn end_subscriptions(&self, why: &str) {
        let subs: Vec<Arc<SubShared>> = lock(&self.subs).drain().map(|(_, s)| s).collect();
        for s in subs {
            s.end(Some(why.to_owned()));
        }
    }
}

/// Watches the connection and reconnects after every break, until the client closes.
async fn supervise(inner: Arc<Inner>, mut conn: Arc<Conn>) {
    loop {
        tokio::select! {
            _ = conn.dead() => {}
            _ = inner.shutdown.cancelled() => break,
        }
        if inner.shutdown.is_cancelled() || inner.closing.is_cancelled() {
            break;
        }
        if !inner.opts.reconnect || inner.path.is_none() {
            tracing::warn!("lost the connection to the daemon; this client does not reconnect");
            inner.link.send_replace(Link::Closed);
            inner.end_subscriptions("the connection to the daemon was lost");
            return;
        }
        inner.link.send_replace(Link::Down);
        tracing::warn!("lost the connection to the daemon; reconnecting");
        let Some(next) = reconnect(&inner).await else { break };
        inner.link.send_replace(Link::Up(next.clone()));
        tracing::info!("reconnected to the daemon");
        let subs: Vec<Arc<SubShared>> = lock(&inner.subs).values().cloned().collect();
        for s in subs {
            tokio::spawn(resubscribe(inner.clone(), s, next.clone()));
        }
        conn = next;
    }
    if inner.shutdown.is_cancelled() {
        inner.link.send_replace(Link::Closed);
        inner.end_subscriptions("the client was dropped");
    }
}

/// Connects again with exponential backoff; `None` once the client closes.
async fn reconnect(inner: &Arc<Inner>) -> Option<Arc<Conn>> {
    let mut backoff = inner.opts.min_backoff;
    for attempt in 1u64.. {
        tokio::select! {
            _ = tokio::time::sleep(jitter(backoff)) => {}
            _ = inner.closing.cancelled() => return None,
            _ = inner.shutdown.cancelled() => return None,
        }
        let opened = tokio::select! {
            r = tokio::time::timeout(ATTEMPT_TIMEOUT, inner.open()) => r,
            _ = inner.closing.cancelled() => return None,
            _ = inner.shutdown.cancelled() => return None,
        };
        match opened {
            Ok(Ok(conn)) => return Some(conn),
            Ok(Err(e)) if attempt == 1 || attempt % 20 == 0 => tracing::warn!(attempt, error = %e, "reconnecting"),
            Err(_) if attempt == 1 || attempt % 20 == 0 => tracing::warn!(attempt, "reconnecting: no answer to hello"),
            _ => {}
        }
        backoff = (backoff * 2).min(inner.opts.max_backoff.max(inner.opts.min_backoff));
    }
    None
}

/// Subscribes `sub` again on `conn`, retrying while the daemon's backends are still connecting
/// (`unavailable`); a refusal for good ends the subscription.
async fn resubscribe(inner: Arc<Inner>, sub: Arc<SubShared>, conn: Arc<Conn>) {
    let mut backoff = inner.opts.min_backoff;
    loop {
        if sub.is_closing() || conn.is_dead() || sub.attached_to(&conn) {
            return;
        }
        match conn.call(Request::Subscribe(sub.request.clone()), Action::Subscribed(sub.clone())).await {
            Ok(_) => return,
            Err(Error::Server { code: ErrorCode::Unavailable, message, .. }) => {
                tracing::warn!(event_type = %sub.request.event_type, group = %sub.request.group, %message, "subscribing again: unavailable; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(jitter(backoff)) => {}
                    _ = conn.dead() => return,
                    _ = sub.closing() => return,
                }
                backoff = (backoff * 2).min(inner.opts.max_backoff.max(inner.opts.min_backoff));
            }
            // The next connection tries again.
            Err(Error::ConnectionLost(_) | Error::Closed) => return,
            Err(e) => {
                tracing::error!(event_type = %sub.request.event_type, group = %sub.request.group, error = %e,
                    "the daemon refused to take the subscription again; it has ended");
                lock(&inner.subs).remove(&sub.key);
                sub.end(Some(e.to_string()));
                return;
            }
        }
    }
}

/// `d` ±20 %, so that clients that lost the same daemon do not all come back at once.
fn jitter(d: Duration) -> Duration {
    static SEED: AtomicU64 = AtomicU64::new(0);
    let mut x = SEED.load(Ordering::Relaxed);
    if x == 0 {
        x = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|t| t.as_nanos() as u64).unwrap_or(1) | 1;
    }
    // xorshift64: plenty for spreading waits.
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    SEED.store(x, Ordering::Relaxed);
    let unit = (x >> 11) as f64 / (1u64 << 53) as f64;
    d.mul_f64(0.8 + 0.4 * unit)
}
