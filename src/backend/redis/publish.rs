//! Adding events: a publish lane's batches (`lua/publish.lua`: each event at most once, by the
//! lane's high-water mark; due later, into the type's delay zset), a replay's pages, delayed
//! events moved when due and put back on their schedule after a loss, and the epoch that says
//! which Redis data set this is.

use redis::Value;

use super::{ADD_CHUNK, GroupKeys, LANE_MARK_TTL_SECS, Streams, StreamsError, err};

/// One event a publish lane adds (see [`Streams::add_batch`]).
#[derive(Debug, Clone, Copy)]
pub struct LaneEvent<'a> {
    /// Its sequence number in the lane.
    pub seq: i64,
    /// Its type.
    pub event_type: &'a str,
    /// When it is due (ms since the epoch), 0 for now.
    pub due_ms: i64,
    /// Its event id.
    pub id: &'a str,
    /// The encoded event.
    pub event: &'a [u8],
}

impl Streams {
    /// Adds events of one publish lane to their streams, each at most once: `events` are
    /// (lane sequence number, type, due time in ms or 0, event id, encoded event) in sequence
    /// order, and what is at or below the lane's high-water mark was added before (a batch run
    /// again after a failure or a crash). They go in chunks of [`ADD_CHUNK`], so no single
    /// script holds Redis (single-threaded) for long.
    /// `expected` is the epoch the lane last added to (none: any): when Redis has another, it
    /// fails with [`StreamsError::epoch_changed`] before adding anything. Returns the number
    /// added and the epoch they went to.
    pub async fn add_batch(
        &self,
        lane: &uuid::Uuid,
        events: &[LaneEvent<'_>],
        expected: Option<&str>,
    ) -> Result<(u64, String), StreamsError> {
        let mut added = 0;
        let mut epoch = expected.unwrap_or_default().to_owned();
        let name = lane.simple().to_string();
        // A batch is mostly one type or a few: build each type's keys once.
        let mut keys: std::collections::HashMap<&str, (String, String)> = std::collections::HashMap::new();
        for chunk in events.chunks(ADD_CHUNK) {
            let mut inv = self.scripts.publish.prepare_invoke();
            inv.key(self.epoch_key()).key(format!("{}:hw:{name}", self.ns)).key(self.delayed_key());
            for ev in chunk {
                let (stream, delay) =
                    keys.entry(ev.event_type).or_insert_with(|| (self.stream_key(ev.event_type), self.delay_key(ev.event_type)));
                inv.key(stream.as_str()).key(delay.as_str());
            }
            inv.arg(LANE_MARK_TTL_SECS).arg(&name).arg(self.index_block_ms).arg(&epoch);
            for ev in chunk {
                inv.arg(ev.seq).arg(ev.due_ms).arg(ev.id).arg(ev.event);
            }
            let (n, e): (u64, String) = inv.invoke_async(&mut self.conn.clone()).await.map_err(err("publish batch"))?;
            added += n;
            // Later chunks must go to the same data set.
            epoch = e;
        }
        Ok((added, epoch))
    }

    /// Adds replayed events (number, event id, encoded event) to a group's replay stream, each
    /// at most once: `mark` names the replay's high-water mark, the last number added (numbers
    /// rise with each call). `lane` names the replay in the stream's index (see
    /// `lua/publish.lua`).
    pub async fn add_replayed(&self, mark: &str, lane: &str, keys: &GroupKeys, events: &[(i64, &str, &[u8])]) -> Result<u64, StreamsError> {
        let mut inv = self.scripts.publish.prepare_invoke();
        inv.key(self.epoch_key()).key(format!("{}:hw:{mark}", self.ns)).key(self.delayed_key());
        let delay = self.delay_key(&keys.event_type);
        for _ in events {
            inv.key(&keys.stream).key(&delay);
        }
        // A block per call (a page of the replay): a replay adds thousands of entries within
        // milliseconds, and its group's checkpoint should move on page by page as they are
        // acknowledged, not only once the whole replay is.
        inv.arg(LANE_MARK_TTL_SECS).arg(lane).arg(0).arg("");
        for (seq, id, e) in events {
            // Replayed events are due now.
            inv.arg(*seq).arg(0).arg(*id).arg(*e);
        }
        let (n, _): (u64, String) = inv.invoke_async(&mut self.conn.clone()).await.map_err(err("add replayed"))?;
        Ok(n)
    }

    /// Puts delayed events back on their type's schedule (a recovery: Redis lost them): each
    /// (due time in ms, encoded event) exactly as the flusher added it, so one already there
    /// is not added twice. Refused like a publish while Redis has no epoch.
    pub async fn restore_delayed(&self, event_type: &str, events: &[(i64, &[u8])]) -> Result<(), StreamsError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut inv = self.scripts.restore.prepare_invoke();
        inv.key(self.epoch_key()).key(self.delay_key(event_type)).key(self.delayed_key());
        for (due, e) in events {
            inv.arg(*due).arg(*e);
        }
        inv.invoke_async::<()>(&mut self.conn.clone()).await.map_err(err("restore delayed"))
    }

    /// Moves due delayed events into their streams, up to `max` per type; returns how many
    /// moved and how many types were looked at.
    pub async fn move_due(&self, max: usize) -> Result<(u64, usize), StreamsError> {
        let zsets: Vec<String> =
            redis::cmd("SMEMBERS").arg(self.delayed_key()).query_async(&mut self.conn.clone()).await.map_err(err("delayed"))?;
        let prefix = format!("{}:z:", self.ns);
        let mut moved = 0;
        for z in &zsets {
            let Some(t) = z.strip_prefix(&prefix) else { continue };
            let n: u64 = self
                .scripts
                .move_due
                .key(z)
                .key(self.stream_key(t))
                .key(self.delayed_key())
                .arg(max)
                .arg(self.index_block_ms)
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(err("move due"))?;
            moved += n;
        }
        Ok((moved, zsets.len()))
    }

    /// The epoch: a value the first daemon sets in a Redis and that only a loss of Redis's
    /// data removes.
    pub async fn epoch(&self) -> Result<Option<String>, StreamsError> {
        redis::cmd("GET").arg(self.epoch_key()).query_async(&mut self.conn.clone()).await.map_err(err("epoch"))
    }

    /// Sets the epoch unless it is set; true when this call set it.
    pub async fn claim_epoch(&self, value: &str) -> Result<bool, StreamsError> {
        let v: Value =
            redis::cmd("SET").arg(self.epoch_key()).arg(value).arg("NX").query_async(&mut self.conn.clone()).await.map_err(err("epoch"))?;
        Ok(v != Value::Nil)
    }
}
