//! Delivery: from the groups' Redis streams to subscribers on this daemon, and back.
//!
//! - [`Group`]: one per (type, group) with subscribers here, with a worker task
//!   ([`worker`]) that reads what its subscribers have room for and hands it to them.
//! - [`Sub`]: one subscription, shared by its connection (which holds the leases) and its
//!   group's worker (which fills it up to `max_in_flight`).
//! - [`settler`]: batches the ends of deliveries (ack, failure, release, lease extension) into
//!   Redis.
//!
//! Flow control is by counting: a worker takes a slot of a subscription before it sends it a
//! delivery (`in_flight < max_in_flight`), and the connection gives the slot back when the
//! delivery ends. The connection's delivery queue is as long as the sum of its subscriptions'
//! `max_in_flight` may be, so a worker's `try_send` never finds it full.

pub mod settler;
mod worker;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::pg::{EventLog, LogError};
use crate::backend::redis::{Entry, Failure, GroupKeys, LaneKind, Streams, StreamsError};
use crate::config::Backoff;
use crate::lock::lock;
pub use settler::Settler;

/// Why a subscription could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Redis refused or is unreachable.
    #[error(transparent)]
    Streams(#[from] StreamsError),
    /// Postgres refused or is unreachable.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The daemon is shutting down.
    #[error("the daemon is shutting down")]
    ShuttingDown,
}

/// What a group's worker sends a connection.
#[derive(Debug)]
pub enum Push {
    /// A delivery.
    Deliver(Delivery),
    /// The subscription has ended on the daemon's side (its group was deleted): no delivery
    /// for it follows.
    Ended {
        /// The subscription.
        sub: u64,
        /// Why, for the client.
        reason: String,
    },
}

/// A delivery on its way to a connection.
#[derive(Debug)]
pub struct Delivery {
    /// The subscription it is for.
    pub sub: u64,
    /// What ends it (see [`Sub::ack`] and the others).
    pub ticket: Ticket,
    /// 1 on the first delivery of the event to its group.
    pub attempt: u64,
    /// The encoded event.
    pub event: bytes::Bytes,
}

/// Which delivery an end is for: its lane's stream and its entry there. Opaque to the front
/// layer, which hands it back to [`Sub`] to end the delivery.
#[derive(Debug, Clone)]
pub struct Ticket {
    keys: Arc<GroupKeys>,
    entry: String,
}

impl Ticket {
    /// True for a delivery from the group's replay lane (a replay, a recovery, a redrive).
    pub fn is_replay(&self) -> bool {
        self.keys.lane == LaneKind::Replay
    }

    /// The type, group and stream entry, for logs.
    pub fn describe(&self) -> (&str, &str, &str) {
        (&self.keys.event_type, &self.keys.group, &self.entry)
    }
}

/// How a delivery failed (see [`Sub::fail`]).
#[derive(Debug, Clone)]
pub enum Failed {
    /// The consumer said so (`nack`): its error, a delay instead of the backoff, straight to
    /// the dead letters.
    Nack {
        /// Why (kept with the event).
        error: Option<String>,
        /// Retry after this long instead of the backoff.
        delay: Option<Duration>,
        /// Straight to the dead-letter queue.
        dead: bool,
    },
    /// The lease ran out without an ack.
    Expired,
    /// The consumer's connection closed with the delivery open.
    Disconnected,
}

/// The settings of one subscription.
#[derive(Debug, Clone)]
pub struct SubParams {
    /// The event type.
    pub event_type: String,
    /// The group.
    pub group: String,
    /// Most unacknowledged deliveries.
    pub max_in_flight: u32,
    /// Failed attempts before dead-lettering.
    pub max_attempts: u32,
    /// The lease of one delivery.
    pub ack_timeout: Duration,
}

/// One subscription, shared by its connection and its group's worker.
pub struct Sub {
    /// The subscription's number on its connection.
    pub id: u64,
    /// Its settings.
    pub params: SubParams,
    /// Its group on this daemon.
    pub group: Arc<Group>,
    /// The engine it belongs to (for ending its deliveries).
    pub engine: Engine,
    in_flight: AtomicU32,
    tx: mpsc::Sender<Push>,
}

impl Sub {
    /// Takes a delivery slot if there is room.
    fn try_take_slot(&self) -> bool {
        self.in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.params.max_in_flight).then_some(n + 1)).is_ok()
    }

    /// Gives a delivery slot back (the delivery ended) and lets the worker fill it.
    pub fn release_slot(&self) {
        let _ = self.in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        self.group.wake.notify_one();
    }

    /// Ends a delivery that succeeded; `done` hears whether Redis took it.
    pub async fn ack(&self, ticket: Ticket, retried: bool, done: Option<oneshot::Sender<bool>>) {
        crate::bus::counters::add(&crate::bus::counters::COUNTERS.acked, 1);
        self.engine.settler().ack(ticket.keys, ticket.entry, retried, done).await;
    }

    /// Ends a delivery that failed: another attempt after the backoff (or its delay), or the
    /// dead letters after `max_attempts`. `done` hears whether Redis took it.
    pub async fn fail(&self, ticket: Ticket, how: Failed, done: Option<oneshot::Sender<bool>>) {
        let (error, delay, dead) = match how {
            Failed::Nack { error, delay, dead } => {
                crate::bus::counters::add(&crate::bus::counters::COUNTERS.nacked, 1);
                (error.unwrap_or_else(|| "nacked".to_owned()), delay, dead)
            }
            Failed::Expired => {
                crate::bus::counters::add(&crate::bus::counters::COUNTERS.expired_leases, 1);
                let (t, g, e) = ticket.describe();
                tracing::debug!(r#type = %t, group = %g, entry = %e, "lease expired");
                (format!("ack timeout: no ack within {} ms", self.params.ack_timeout.as_millis()), None, false)
            }
            Failed::Disconnected => ("consumer disconnected".to_owned(), Some(Duration::ZERO), false),
        };
        let failure = Failure { id: ticket.entry, count: true, dead, error, delay, max_attempts: self.params.max_attempts };
        self.engine.settler().fail(ticket.keys, failure, done).await;
    }

    /// Hands a delivery back to the group at once without counting an attempt (unsubscribe, a
    /// daemon shutting down, a delivery that never reached the client).
    pub async fn release(&self, ticket: Ticket) {
        self.engine.settler().fail(ticket.keys, Failure::release(ticket.entry), None).await;
    }

    /// Restarts the Redis idle time of a delivery whose lease was extended, so that no other
    /// daemon reclaims it.
    pub async fn extend(&self, ticket: &Ticket) {
        self.engine.settler().touch(ticket.keys.clone(), ticket.entry.clone()).await;
    }

    fn free(&self) -> u32 {
        self.params.max_in_flight.saturating_sub(self.in_flight.load(Ordering::Acquire))
    }
}

/// A (type, group) with subscribers on this daemon.
pub struct Group {
    /// The keys of its live lane (the type's stream).
    pub keys: Arc<GroupKeys>,
    /// The keys of its replay lane.
    pub replay: Arc<GroupKeys>,
    subs: Mutex<Vec<Arc<Sub>>>,
    wake: Notify,
    next: AtomicUsize,
    /// The blocked reader's Redis client id and when its block ends, while it is blocked.
    blocked: Mutex<Option<(i64, tokio::time::Instant)>>,
    stopping: AtomicBool,
    stop: CancellationToken,
    /// Names this group's lease record in Redis as this worker's (see `Streams::drop_lease`).
    token: String,
}

impl Group {
    /// Room for deliveries over all subscribers.
    fn free(&self) -> usize {
        lock(&self.subs).iter().map(|s| s.free() as usize).sum()
    }

    /// Hands entries to subscribers with room, round robin; returns those nobody could take.
    fn dispatch(&self, keys: &Arc<GroupKeys>, entries: Vec<Entry>) -> Vec<Entry> {
        let mut subs = lock(&self.subs);
        let mut left = Vec::new();
        for entry in entries {
            let mut entry = Some(entry);
            let n = subs.len();
            let start = self.next.fetch_add(1, Ordering::Relaxed);
            for k in 0..n {
                let s = &subs[(start + k) % n];
                let Some(e) = entry.take() else { break };
                if !s.try_take_slot() {
                    entry = Some(e);
                    continue;
                }
                let d = Delivery {
                    sub: s.id,
                    ticket: Ticket { keys: keys.clone(), entry: e.id.clone() },
                    attempt: u64::from(e.failed) + 1,
                    event: e.event.clone(),
                };
                if s.tx.try_send(Push::Deliver(d)).is_err() {
                    // Closed: the connection is gone (its cleanup will unsubscribe). Full
                    // cannot happen while the budget holds; either way, try the next one.
                    let _ = s.in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
                    entry = Some(e);
                }
            }
            left.extend(entry);
        }
        subs.retain(|s| !s.tx.is_closed());
        left
    }

    /// The longest ack timeout of the local subscribers.
    fn local_ack_timeout(&self) -> Duration {
        lock(&self.subs).iter().map(|s| s.params.ack_timeout).max().unwrap_or(Duration::from_secs(30))
    }

    /// This daemon's lease on the group: the longest ack timeout of its subscribers, and how
    /// many there are.
    fn lease(&self) -> (Duration, usize) {
        let subs = lock(&self.subs);
        (subs.iter().map(|s| s.params.ack_timeout).max().unwrap_or(Duration::ZERO), subs.len())
    }

    /// The smallest `max_attempts` of the local subscribers (for reclaimed deliveries).
    fn local_max_attempts(&self) -> u32 {
        lock(&self.subs).iter().map(|s| s.params.max_attempts).min().unwrap_or(1)
    }
}

/// Daemon-wide delivery state. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    streams: Streams,
    log: EventLog,
    consumer: String,
    backoff: Backoff,
    groups: Mutex<HashMap<(String, String), Arc<Group>>>,
    settler: Settler,
    tracker: TaskTracker,
    stop: CancellationToken,
    check_redis: Notify,
}

impl Engine {
    /// Starts the settler; workers start with their first subscriber. Dispatching stops when
    /// `stop` is cancelled.
    pub fn start(
        streams: Streams,
        log: EventLog,
        consumer: String,
        backoff: Backoff,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) -> Engine {
        let inner = Arc::new_cyclic(|weak: &std::sync::Weak<Inner>| {
            let weak = weak.clone();
            // A retry scheduled sooner than a blocked worker would look again wakes it.
            let poke = Box::new(move |keys: &GroupKeys, due_in: Duration| {
                if let Some(inner) = weak.upgrade() {
                    Engine { inner }.poke(keys, due_in);
                }
            });
            let settler = Settler::start(streams.clone(), consumer.clone(), backoff, tracker, poke);
            Inner {
                streams,
                log,
                consumer,
                backoff,
                groups: Mutex::new(HashMap::new()),
                settler,
                tracker: tracker.clone(),
                stop,
                check_redis: Notify::new(),
            }
        });
        Engine { inner }
    }

    /// Subscriptions on this daemon per (type, group).
    pub fn local_consumers(&self) -> HashMap<(String, String), u64> {
        lock(&self.inner.groups).iter().map(|(k, g)| (k.clone(), lock(&g.subs).len() as u64)).collect()
    }

    /// The settler, for ending deliveries.
    pub fn settler(&self) -> &Settler {
        &self.inner.settler
    }

    /// This daemon's Redis consumer name.
    pub fn consumer(&self) -> &str {
        &self.inner.consumer
    }

    /// Creates the group where needed (Redis and the log) and starts pushing its entries to
    /// `tx` as subscription `id`.
    /// Its lease is recorded in Redis before the reply, so that every daemon counts it (and
    /// waits for its `ack_timeout` before taking over what it holds).
    pub async fn subscribe(&self, id: u64, params: SubParams, tx: mpsc::Sender<Push>) -> Result<Arc<Sub>, EngineError> {
        if self.inner.stop.is_cancelled() {
            return Err(EngineError::ShuttingDown);
        }
        let keys = self.inner.streams.group_keys(&params.event_type, &params.group);
        let known = self.inner.log.ensure_group(&params.event_type, &params.group).await?;
        self.inner.streams.ensure_group(&keys, known).await?;
        let sub = self.attach(id, params, keys, tx);
        let (ack, subs) = sub.group.lease();
        if let Err(e) = self.inner.streams.record_lease(&sub.group.keys, &self.inner.consumer, ack, subs, &sub.group.token).await {
            self.unsubscribe(&sub);
            return Err(e.into());
        }
        Ok(sub)
    }

    fn attach(&self, id: u64, params: SubParams, keys: GroupKeys, tx: mpsc::Sender<Push>) -> Arc<Sub> {
        let mut groups = lock(&self.inner.groups);
        let key = (params.event_type.clone(), params.group.clone());
        let group = match groups.get(&key) {
            Some(g) => g.clone(),
            None => {
                let g = Arc::new(Group {
                    replay: Arc::new(self.inner.streams.replay_keys(&params.event_type, &params.group)),
                    keys: Arc::new(keys),
                    subs: Mutex::new(Vec::new()),
                    wake: Notify::new(),
                    next: AtomicUsize::new(0),
                    blocked: Mutex::new(None),
                    stopping: AtomicBool::new(false),
                    stop: self.inner.stop.child_token(),
                    token: format!("{:016x}", rand::random::<u64>()),
                });
                groups.insert(key, g.clone());
                self.inner.tracker.spawn(worker::run(g.clone(), self.clone()));
                g
            }
        };
        let sub = Arc::new(Sub { id, params, group: group.clone(), engine: self.clone(), in_flight: AtomicU32::new(0), tx });
        lock(&group.subs).push(sub.clone());
        group.wake.notify_one();
        sub
    }

    /// Ends every subscription of a group on this daemon (the group was deleted): each
    /// connection is told, hands back what it holds, and its worker stops. Returns how many
    /// ended.
    pub fn end_group(&self, event_type: &str, group: &str, reason: &str) -> usize {
        let Some(g) = lock(&self.inner.groups).remove(&(event_type.to_owned(), group.to_owned())) else { return 0 };
        g.stopping.store(true, Ordering::Release);
        self.wake_blocked(&g);
        g.stop.cancel();
        let subs: Vec<Arc<Sub>> = std::mem::take(&mut *lock(&g.subs));
        for s in &subs {
            let push = Push::Ended { sub: s.id, reason: format!("{reason}; subscription {} has ended", s.id) };
            if let Err(mpsc::error::TrySendError::Full(push)) = s.tx.try_send(push) {
                let tx = s.tx.clone();
                self.inner.tracker.spawn(async move {
                    let _ = tx.send(push).await;
                });
            }
        }
        subs.len()
    }

    /// The event log (for the workers).
    fn log(&self) -> &EventLog {
        &self.inner.log
    }

    /// Stops pushing to `sub`; the group's worker stops with its last subscriber.
    pub fn unsubscribe(&self, sub: &Sub) {
        let mut groups = lock(&self.inner.groups);
        let group = &sub.group;
        let empty = {
            let mut subs = lock(&group.subs);
            subs.retain(|s| !std::ptr::eq(Arc::as_ptr(s), sub));
            subs.is_empty()
        };
        if empty {
            groups.remove(&(group.keys.event_type.to_string(), group.keys.group.to_string()));
            group.stopping.store(true, Ordering::Release);
            self.wake_blocked(group);
            group.stop.cancel();
        }
    }

    /// Makes the group's worker look again now if it would otherwise sleep past `due_in`.
    pub fn poke(&self, keys: &GroupKeys, due_in: Duration) {
        let group = lock(&self.inner.groups).get(&(keys.event_type.to_string(), keys.group.to_string())).cloned();
        let Some(group) = group else { return };
        let blocked_past =
            lock(&group.blocked).is_some_and(|(_, until)| until > tokio::time::Instant::now() + due_in + Duration::from_millis(20));
        if blocked_past {
            self.wake_blocked(&group);
        } else {
            group.wake.notify_one();
        }
    }

    /// Ends a blocked read of the group's worker at once (CLIENT UNBLOCK on its connection).
    fn wake_blocked(&self, group: &Group) {
        group.wake.notify_one();
        if let Some((client_id, _)) = *lock(&group.blocked) {
            let streams = self.inner.streams.clone();
            self.inner.tracker.spawn(async move {
                if let Err(e) = streams.unblock(client_id).await {
                    tracing::debug!(error = %e, "could not unblock a reader; it wakes at its block timeout");
                }
            });
        }
    }

    /// Asks the Redis watcher to check now whether Redis lost its data (a worker met NOGROUP).
    pub fn check_redis(&self) {
        self.inner.check_redis.notify_one();
    }

    /// What [`Engine::check_redis`] wakes.
    pub fn redis_check_wanted(&self) -> &Notify {
        &self.inner.check_redis
    }

    /// Stops every worker (shutdown): blocked reads end at once and what they read goes back.
    pub fn stop(&self) {
        self.inner.stop.cancel();
        let groups: Vec<Arc<Group>> = lock(&self.inner.groups).values().cloned().collect();
        for g in groups {
            g.stopping.store(true, Ordering::Release);
            self.wake_blocked(&g);
        }
    }

    /// Puts entries a worker could not hand out back in front of the group, without counting
    /// an attempt.
    async fn release(&self, keys: &Arc<GroupKeys>, entries: Vec<Entry>) {
        for e in entries {
            self.inner.settler.fail(keys.clone(), Failure::release(e.id), None).await;
        }
    }
}
