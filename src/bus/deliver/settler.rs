//! Ends deliveries in Redis, in batches: everything queued while the previous batch was in
//! flight is settled together, with one XACK per group and one `fail.lua` call per group, all
//! pipelined on the shared connection.
//!
//! A batch that keeps failing (Redis away) is given up after a few tries: its acks and
//! failures stay undone in Redis, so those entries are reclaimed after the ack timeout and
//! delivered again (at least once), and a client that asked for a reply gets `unavailable`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use crate::backend::redis::{FailOutcome, Failure, GroupKeys, LaneKind, Streams, StreamsError};
use crate::config::Backoff;

/// Operations waiting to be settled, at most (then callers wait).
const QUEUE: usize = 8192;
/// Most operations per batch.
const BATCH_MAX: usize = 2048;
/// Tries per batch before giving up.
const TRIES: u32 = 4;

/// Called with the group and the delay of a retry just scheduled.
pub type Poke = Box<dyn Fn(&GroupKeys, Duration) + Send + Sync>;

enum Op {
    Ack { keys: Arc<GroupKeys>, id: String, clear: bool, done: Option<oneshot::Sender<bool>> },
    Fail { keys: Arc<GroupKeys>, failure: Failure, done: Option<oneshot::Sender<bool>> },
    Touch { keys: Arc<GroupKeys>, id: String },
}

impl Op {
    fn keys(&self) -> &Arc<GroupKeys> {
        match self {
            Op::Ack { keys, .. } | Op::Fail { keys, .. } | Op::Touch { keys, .. } => keys,
        }
    }
}

/// The queue into the settler. Cheap to clone.
#[derive(Clone)]
pub struct Settler {
    tx: mpsc::Sender<Op>,
}

impl Settler {
    /// Starts the settler on `tracker`; it ends when every handle is dropped and its queue is
    /// empty.
    pub fn start(streams: Streams, consumer: String, backoff: Backoff, tracker: &TaskTracker, poke: Poke) -> Settler {
        let (tx, rx) = mpsc::channel(QUEUE);
        tracker.spawn(run(streams, consumer, backoff, rx, poke));
        Settler { tx }
    }

    /// Acknowledges an entry; `clear` when it has attempt state (it was retried). `done` hears
    /// whether Redis took it.
    pub async fn ack(&self, keys: Arc<GroupKeys>, id: String, clear: bool, done: Option<oneshot::Sender<bool>>) {
        self.send(Op::Ack { keys, id, clear, done }).await;
    }

    /// Ends a delivery without success; `done` hears whether Redis took it.
    pub async fn fail(&self, keys: Arc<GroupKeys>, failure: Failure, done: Option<oneshot::Sender<bool>>) {
        self.send(Op::Fail { keys, failure, done }).await;
    }

    /// Restarts the Redis idle time of an entry (its lease was extended).
    pub async fn touch(&self, keys: Arc<GroupKeys>, id: String) {
        self.send(Op::Touch { keys, id }).await;
    }

    async fn send(&self, op: Op) {
        if self.tx.send(op).await.is_err() {
            // Only after shutdown's deadline; the entry stays pending and is reclaimed.
            tracing::debug!("settler stopped; a delivery end was not recorded");
        }
    }
}

async fn run(streams: Streams, consumer: String, backoff: Backoff, mut rx: mpsc::Receiver<Op>, poke: Poke) {
    let mut ops = Vec::with_capacity(BATCH_MAX);
    while rx.recv_many(&mut ops, BATCH_MAX).await > 0 {
        // By lane, not only by group: a group's live stream and its replay stream are settled
        // with their own keys (acks of one must never be sent to the other).
        let mut by_group: HashMap<(Arc<str>, Arc<str>, LaneKind), Vec<Op>> = HashMap::new();
        for op in ops.drain(..) {
            let k = op.keys();
            by_group.entry((k.event_type.clone(), k.group.clone(), k.lane)).or_default().push(op);
        }
        let work = by_group.into_values().map(|ops| settle_group(&streams, &consumer, &backoff, ops, &poke));
        futures::future::join_all(work).await;
    }
}

async fn with_tries<T, F: Future<Output = Result<T, StreamsError>>>(what: &'static str, mut f: impl FnMut() -> F) -> Option<T> {
    let mut pause = Duration::from_millis(50);
    for i in 1..=TRIES {
        match f().await {
            Ok(v) => return Some(v),
            Err(e) if i == TRIES => {
                tracing::warn!(step = what, error = %e, "could not record delivery ends in Redis; those entries will be reclaimed after the ack timeout");
            }
            Err(e) => tracing::debug!(step = what, error = %e, "retrying"),
        }
        tokio::time::sleep(pause).await;
        pause *= 4;
    }
    None
}

async fn settle_group(streams: &Streams, consumer: &str, backoff: &Backoff, ops: Vec<Op>, poke: &Poke) {
    let Some(keys) = ops.first().map(|op| op.keys().clone()) else {
        return;
    };
    let mut acks = Vec::new();
    let mut fails = Vec::new();
    let mut touches = Vec::new();
    for op in ops {
        match op {
            Op::Ack { id, clear, done, .. } => acks.push((id, clear, done)),
            Op::Fail { failure, done, .. } => fails.push((failure, done)),
            Op::Touch { id, .. } => touches.push(id),
        }
    }
    let ack_work = async {
        if acks.is_empty() {
            return;
        }
        let ids: Vec<&str> = acks.iter().map(|(id, _, _)| id.as_str()).collect();
        let clear: Vec<&str> = acks.iter().filter(|(_, c, _)| *c).map(|(id, _, _)| id.as_str()).collect();
        let ok = with_tries("ack", || streams.ack(&keys, &ids, &clear)).await.is_some();
        for (_, _, done) in acks.iter_mut() {
            if let Some(done) = done.take() {
                let _ = done.send(ok);
            }
        }
    };
    let fail_work = async {
        if fails.is_empty() {
            return;
        }
        let failures: Vec<Failure> = fails.iter().map(|(f, _)| f.clone()).collect();
        let outcomes = with_tries("fail", || streams.fail(&keys, backoff, &failures)).await;
        for (i, (failure, done)) in fails.into_iter().enumerate() {
            let outcome = outcomes.as_ref().and_then(|o| o.get(i).copied());
            match outcome {
                Some(FailOutcome::Dead { attempts }) => {
                    crate::bus::counters::add(&crate::bus::counters::COUNTERS.dead_lettered, 1);
                    tracing::info!(r#type = %keys.event_type, group = %keys.group, entry = %failure.id, attempts, "dead-lettered");
                }
                Some(FailOutcome::Retry { due_in, .. }) => poke(&keys, due_in),
                None => {}
            }
            if let Some(done) = done {
                let _ = done.send(outcome.is_some());
            }
        }
    };
    let touch_work = async {
        if touches.is_empty() {
            return;
        }
        let ids: Vec<&str> = touches.iter().map(String::as_str).collect();
        with_tries("extend", || streams.touch(&keys, consumer, &ids)).await;
    };
    tokio::join!(ack_work, fail_work, touch_work);
}
