//! The worker of one (type, group) with subscribers on this daemon.
//!
//! While its subscribers have room, each round: takes due retries (claimed atomically, so no
//! two daemons take the same one), reclaims deliveries held by daemons that stopped answering
//! (now and then), and reads new entries with a blocking `XREADGROUP` on a connection of its
//! own. It never reads more than its subscribers can take at once, so an entry is pushed right
//! after it is read and Redis's idle time of an entry tracks the age of its lease. The block
//! ends early when a retry comes due (Redis clock) or on `CLIENT UNBLOCK` (a local retry sooner
//! than the block, a stop).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::{Engine, Group, lock};
use crate::backend::redis::{BlockingReader, LaneKind, ReclaimScan, StreamsError};

/// Longest block of a read; also the longest a retry scheduled by another daemon waits to be
/// noticed.
const BLOCK_MAX: Duration = Duration::from_secs(2);
/// Shortest block, so a round never spins.
const BLOCK_MIN: Duration = Duration::from_millis(5);
/// Most deliveries reclaimed per round.
const RECLAIM_COUNT: usize = 100;

/// How much longer than the ack timeout an entry must be idle before another daemon reclaims
/// it: slack for the time between the read and the push, and for clocks.
fn reclaim_margin(ack_timeout: Duration) -> Duration {
    (ack_timeout / 10).max(Duration::from_millis(250))
}

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
}

pub(super) async fn run(group: Arc<Group>, engine: Engine) {
    let keys = group.keys.clone();
    tracing::debug!(r#type = %keys.event_type, group = %keys.group, "group worker started");
    let mut st = State { group, engine, reader: None, reclaim_at: Instant::now(), cursors: ["0-0".to_owned(), "0-0".to_owned()] };
    let mut failures = 0u32;
    loop {
        if st.group.stopping.load(Ordering::Acquire) || st.group.stop.is_cancelled() {
            break;
        }
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
    tracing::debug!(r#type = %keys.event_type, group = %keys.group, "group worker stopped");
}

impl State {
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
            let ack_timeout = streams.group_ack_timeout(&lanes[0]).await?.unwrap_or(local_timeout).max(local_timeout);
            let min_idle = ack_timeout + reclaim_margin(ack_timeout);
            let mut done = true;
            for (keys, cursor) in lanes.iter().zip(self.cursors.iter_mut()) {
                let scan = ReclaimScan { min_idle, cursor, count: RECLAIM_COUNT, max_attempts: self.group.local_max_attempts() };
                let (next, n) = streams.reclaim(keys, &consumer, scan, &self.engine.inner.backoff).await?;
                if n > 0 {
                    tracing::info!(r#type = %keys.event_type, group = %keys.group, lane = ?keys.lane, reclaimed = n, "reclaimed deliveries whose daemon stopped answering");
                }
                done &= next == "0-0";
                *cursor = next;
            }
            self.reclaim_at = if done { Instant::now() + reclaim_interval(ack_timeout) } else { Instant::now() };
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
                // The Redis watcher recreates it (with a replay if Redis lost its data); this
                // worker retries after its pause.
                tracing::warn!(r#type = %lanes[0].event_type, group = %lanes[0].group, "the consumer group is gone from Redis");
                self.engine.check_redis();
                Err(e)
            }
            Err(e) => Err(e),
        }
    }
}
