//! The worker of one (type, group) with subscribers on this daemon.
//!
//! While its subscribers have room, each round: takes due retries (claimed atomically, so no
//! two daemons take the same one), reclaims deliveries held by daemons that stopped answering
//! (now and then), and reads new entries with a blocking `XREADGROUP` on a connection of its
//! own. It never reads more than its subscribers can take at once, so an entry is pushed right
//! after it is read and Redis's idle time of an entry tracks the age of its lease. The block
//! ends early when a retry comes due (Redis clock) or on `CLIENT UNBLOCK` (a local retry sooner
//! than the block, a stop).
//!
//! The worker also keeps this daemon's lease on the group in Redis (`Streams::record_lease`):
//! the longest ack timeout of its subscribers, renewed every [`LEASE_HEARTBEAT`] and at once
//! when it changes, dropped when the worker stops. Reclaimers on every daemon wait for the
//! lease of the daemon holding a delivery plus a margin (a tenth of it, at least 250 ms: slack
//! for the time between the read and the push, and for clocks; see `lua/reclaim.lua`), never
//! for a default. When its read finds the group gone from Redis and the log no longer knows it
//! (it was deleted), the worker ends the group's subscriptions here.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::{Engine, Group, lock};
use crate::backend::redis::{BlockingReader, LEASE_HEARTBEAT, LaneKind, ReclaimScan, StreamsError};

/// Longest block of a read; also the longest a retry scheduled by another daemon waits to be
/// noticed.
const BLOCK_MAX: Duration = Duration::from_secs(2);
/// Shortest block, so a round never spins.
const BLOCK_MIN: Duration = Duration::from_millis(5);
/// Most deliveries reclaimed per round.
const RECLAIM_COUNT: usize = 100;

/// How often to look for deliveries to reclaim.
fn reclaim_interval(ack_timeout: Duration) -> Duration {
    (ack_timeout / 2).clamp(Duration::from_millis(250), Duration::from_secs(10))
}

struct State {
    group: Arc<Group>,
    engine: Engine,
    reader: Option<BlockingReader>,
    reclaim_at: Instant,
    /// Where the reclaim scan of each lane goes on (live, replay).
    cursors: [String; 2],
    /// The lease last recorded (ack timeout, subscribers) and when.
    lease_sent: Option<((Duration, usize), Instant)>,
}

pub(super) async fn run(group: Arc<Group>, engine: Engine) {
    let keys = group.keys.clone();
    tracing::debug!(r#type = %keys.event_type, group = %keys.group, "group worker started");
    let mut st =
        State { group, engine, reader: None, reclaim_at: Instant::now(), cursors: ["0-0".to_owned(), "0-0".to_owned()], lease_sent: None };
    let mut failures = 0u32;
    loop {
        if st.group.stopping.load(Ordering::Acquire) || st.group.stop.is_cancelled() {
            break;
        }
        st.renew_lease().await;
        if st.group.free() == 0 {
            tokio::select! {
                _ = st.group.wake.notified() => {}
                _ = st.group.stop.cancelled() => {}
                _ = tokio::time::sleep(BLOCK_MAX) => {}
            }
            continue;
        }
        match st.round().await {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(r#type = %keys.event_type, group = %keys.group, failures, "delivery recovered");
                }
                failures = 0;
            }
            Err(e) => {
                if failures == 0 {
                    tracing::warn!(r#type = %keys.event_type, group = %keys.group, error = %e, "delivery stalled; retrying");
                } else {
                    tracing::debug!(r#type = %keys.event_type, group = %keys.group, error = %e, failures, "delivery still stalled");
                }
                failures += 1;
                st.reader = None;
                let pause = (Duration::from_millis(100) * 2u32.saturating_pow(failures.min(5))).min(BLOCK_MAX);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = st.group.stop.cancelled() => {}
                }
            }
        }
    }
    let streams = st.engine.inner.streams.clone();
    if let Err(e) = streams.drop_lease(&keys, &st.engine.inner.consumer, &st.group.token).await {
        tracing::debug!(r#type = %keys.event_type, group = %keys.group, error = %e, "could not drop the lease; it lapses");
    }
    tracing::debug!(r#type = %keys.event_type, group = %keys.group, "group worker stopped");
}

impl State {
    /// Records this daemon's lease on the group when it changed or its heartbeat is due.
    async fn renew_lease(&mut self) {
        let lease = self.group.lease();
        if lease.1 == 0 || self.lease_sent.is_some_and(|(sent, at)| sent == lease && at.elapsed() < LEASE_HEARTBEAT) {
            return;
        }
        let (streams, consumer) = (&self.engine.inner.streams, &self.engine.inner.consumer);
        match streams.record_lease(&self.group.keys, consumer, lease.0, lease.1, &self.group.token).await {
            Ok(()) => self.lease_sent = Some((lease, Instant::now())),
            Err(e) => {
                tracing::debug!(r#type = %self.group.keys.event_type, group = %self.group.keys.group, error = %e, "lease not renewed")
            }
        }
    }

    /// The group is gone from Redis: when the log no longer knows it either, it was deleted, and
    /// its subscriptions here end; otherwise Redis lost it and the watcher recreates it.
    async fn on_nogroup(&self) {
        let keys = &self.group.keys;
        match self.engine.log().group_exists(&keys.event_type, &keys.group).await {
            Ok(false) => {
                let n = self.engine.end_group(
                    &keys.event_type,
                    &keys.group,
                    &format!("group {} of {} was deleted", keys.group, keys.event_type),
                );
                tracing::info!(r#type = %keys.event_type, group = %keys.group, ended = n, "the group was deleted; its subscriptions here ended");
            }
            Ok(true) => {
                tracing::warn!(r#type = %keys.event_type, group = %keys.group, "the consumer group is gone from Redis");
                self.engine.check_redis();
            }
            Err(e) => {
                tracing::debug!(r#type = %keys.event_type, group = %keys.group, error = %e, "could not ask the log about a missing group")
            }
        }
    }

    async fn round(&mut self) -> Result<(), StreamsError> {
        let streams = self.engine.inner.streams.clone();
        let consumer = self.engine.inner.consumer.clone();
        let lanes = [self.group.keys.clone(), self.group.replay.clone()];

        let mut next_due: Option<Duration> = None;
        for keys in &lanes {
            let due = streams.pop_due(keys, &consumer, self.group.free()).await?;
            next_due = match (next_due, due.next_in) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let left = self.group.dispatch(keys, due.entries);
            self.engine.release(keys, left).await;
        }

        let local_timeout = self.group.local_ack_timeout();
        if Instant::now() >= self.reclaim_at {
            let mut done = true;
            let mut shortest = local_timeout;
            for (keys, cursor) in lanes.iter().zip(self.cursors.iter_mut()) {
                let scan = ReclaimScan {
                    default_lease: local_timeout,
                    cursor,
                    count: RECLAIM_COUNT,
                    max_attempts: self.group.local_max_attempts(),
                };
                let r = match streams.reclaim(keys, &consumer, scan, &self.engine.inner.backoff).await {
                    Err(e) if e.is_nogroup() => {
                        self.on_nogroup().await;
                        return Err(e);
                    }
                    r => r?,
                };
                if r.reclaimed > 0 {
                    tracing::info!(r#type = %keys.event_type, group = %keys.group, lane = ?keys.lane, reclaimed = r.reclaimed, "reclaimed deliveries whose daemon stopped answering");
                }
                shortest = shortest.min(r.shortest_lease.unwrap_or(shortest));
                done &= r.cursor == "0-0";
                *cursor = r.cursor;
            }
            self.reclaim_at = if done { Instant::now() + reclaim_interval(shortest) } else { Instant::now() };
        }

        let free = self.group.free();
        if free == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut block = BLOCK_MAX.min(self.reclaim_at.saturating_duration_since(now));
        if let Some(next) = next_due {
            block = block.min(next);
        }
        let block = block.max(BLOCK_MIN);
        if self.reader.is_none() {
            self.reader = Some(streams.blocking_reader(BLOCK_MAX).await?);
        }
        let Some(reader) = self.reader.as_mut() else { return Ok(()) };
        *lock(&self.group.blocked) = Some((reader.client_id, now + block));
        // Checked after registering the block: a stop that came earlier did not see it.
        if self.group.stopping.load(Ordering::Acquire) {
            *lock(&self.group.blocked) = None;
            return Ok(());
        }
        let read = reader.read_new(&lanes[0], &lanes[1], &consumer, free, block).await;
        *lock(&self.group.blocked) = None;
        match read {
            Ok(entries) => {
                // Each lane is read up to `free`; what is more than the subscribers can take
                // goes back at once (rare: both lanes had entries within one block).
                let (live, replay): (Vec<_>, Vec<_>) = entries.into_iter().partition(|(lane, _)| *lane == LaneKind::Live);
                for (keys, entries) in [(&lanes[0], live), (&lanes[1], replay)] {
                    let left = self.group.dispatch(keys, entries.into_iter().map(|(_, e)| e).collect());
                    self.engine.release(keys, left).await;
                }
                Ok(())
            }
            Err(e) if e.is_nogroup() => {
                // Deleted: the subscriptions end. Lost with Redis's data: the Redis watcher
                // recreates it (with a replay) and this worker retries after its pause.
                self.on_nogroup().await;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }
}
