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

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::pg::{EventLog, LogError};
use crate::backend::redis::{Entry, Failure, GroupKeys, Streams, StreamsError};
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

/// A delivery on its way to a connection.
#[derive(Debug)]
pub struct Delivery {
    /// The subscription it is for.
    pub sub: u64,
    /// The lane (stream) it comes from.
    pub keys: Arc<GroupKeys>,
    /// The stream entry.
    pub entry: Entry,
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
    tx: mpsc::Sender<Delivery>,
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
                if let Err(err) = s.tx.try_send(Delivery { sub: s.id, keys: keys.clone(), entry: e }) {
                    // Closed: the connection is gone (its cleanup will unsubscribe). Full
                    // cannot happen while the budget holds; either way, try the next one.
                    let _ = s.in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
                    entry = Some(err.into_inner().entry);
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
    pub async fn subscribe(&self, id: u64, params: SubParams, tx: mpsc::Sender<Delivery>) -> Result<Arc<Sub>, EngineError> {
        if self.inner.stop.is_cancelled() {
            return Err(EngineError::ShuttingDown);
        }
        let keys = self.inner.streams.group_keys(&params.event_type, &params.group);
        let known = self.inner.log.ensure_group(&params.event_type, &params.group).await?;
        self.inner.streams.ensure_group(&keys, params.ack_timeout, known).await?;
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
                });
                groups.insert(key, g.clone());
                self.inner.tracker.spawn(worker::run(g.clone(), self.clone()));
                g
            }
        };
        let sub = Arc::new(Sub { id, params, group: group.clone(), engine: self.clone(), in_flight: AtomicU32::new(0), tx });
        lock(&group.subs).push(sub.clone());
        group.wake.notify_one();
        Ok(sub)
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
