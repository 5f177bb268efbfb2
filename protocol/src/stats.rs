//! `stats`: what a daemon has done since it started, its spool, and the state of every type and
//! group it knows.

use crate::msgpack::{FieldError, Fields, MapWriter};
use crate::reply::Body;

/// One type and group in `stats`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStats {
    /// `type`.
    pub event_type: String,
    /// `group`.
    pub group: String,
    /// `lag`: entries of the stream not yet read by the group.
    pub lag: u64,
    /// `pending`: delivered and not acknowledged.
    pub pending: u64,
    /// `oldest_pending_ms`: how long the oldest pending delivery has waited for its ack.
    pub oldest_pending_ms: u64,
    /// `dead_letters`: dead letters not redriven or purged.
    pub dead_letters: u64,
    /// `consumers`: subscriptions to it on this daemon.
    pub consumers: u64,
    /// `scheduled`: entries waiting in the group's retry schedule (a failed attempt waiting for
    /// its backoff, or a delivery handed back, due at once); not counted in `pending`. Absent
    /// from daemons before it was added (read as 0).
    pub scheduled: u64,
}

/// One backend in `stats`: Redis or Postgres, as this daemon last found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendStats {
    /// `name`: `redis` or `postgres`.
    pub name: String,
    /// `address`: the URL the daemon uses, without its password.
    pub address: String,
    /// `up`: the last connection attempt or command succeeded.
    pub up: bool,
    /// `since`: when it last went up or down (RFC 3339, UTC).
    pub since: String,
    /// `error`: the last error, while it is down.
    pub error: Option<String>,
}

/// The reply to `stats`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// `node`.
    pub node: String,
    /// `uptime_s`.
    pub uptime_s: u64,
    /// `counters`: name → count since start (PROTOCOL.md lists them).
    pub counters: Vec<(String, u64)>,
    /// `spool`: `{events, bytes, oldest_age_ms}` not yet flushed.
    pub spool_events: u64,
    /// See `spool_events`.
    pub spool_bytes: u64,
    /// See `spool_events`.
    pub spool_oldest_age_ms: u64,
    /// `groups`: every type and group known, by type then group (at most 1,000).
    pub groups: Vec<GroupStats>,
    /// `truncated`: more groups exist than are listed.
    pub truncated: bool,
    /// `backends`: Redis and Postgres as this daemon last found them (empty from daemons before
    /// it was added).
    pub backends: Vec<BackendStats>,
}

impl Stats {
    /// A counter by name (0 when absent).
    pub fn counter(&self, name: &str) -> u64 {
        self.counters.iter().find(|(n, _)| n == name).map_or(0, |(_, v)| *v)
    }
}

impl Body for Stats {
    fn write(&self, w: &mut MapWriter) {
        let mut counters = MapWriter::new();
        for (k, v) in &self.counters {
            counters.uint(k, *v);
        }
        let mut spool = MapWriter::new();
        spool.uint("events", self.spool_events).uint("bytes", self.spool_bytes).uint("oldest_age_ms", self.spool_oldest_age_ms);
        let groups: Vec<Vec<u8>> = self
            .groups
            .iter()
            .map(|g| {
                let mut m = MapWriter::new();
                m.str("type", &g.event_type)
                    .str("group", &g.group)
                    .uint("lag", g.lag)
                    .uint("pending", g.pending)
                    .uint("oldest_pending_ms", g.oldest_pending_ms)
                    .uint("dead_letters", g.dead_letters)
                    .uint("consumers", g.consumers)
                    .uint("scheduled", g.scheduled);
                m.finish()
            })
            .collect();
        let backends: Vec<Vec<u8>> = self
            .backends
            .iter()
            .map(|b| {
                let mut m = MapWriter::new();
                m.str("name", &b.name).str("address", &b.address).bool("up", b.up).str("since", &b.since);
                if let Some(e) = &b.error {
                    m.str("error", e);
                }
                m.finish()
            })
            .collect();
        w.str("node", &self.node)
            .uint("uptime_s", self.uptime_s)
            .raw("counters", &counters.finish())
            .raw("spool", &spool.finish())
            .raw_array("groups", groups.iter().map(Vec::as_slice));
        if self.truncated {
            w.bool("truncated", true);
        }
        if !backends.is_empty() {
            w.raw_array("backends", backends.iter().map(Vec::as_slice));
        }
    }
    fn read(f: &Fields) -> Result<Self, FieldError> {
        let c = f.map("counters")?;
        let counters = c.keys().map(|k| Ok((k.to_owned(), c.u64(k)?))).collect::<Result<Vec<_>, FieldError>>()?;
        let s = f.map("spool")?;
        let mut groups = vec![];
        for item in f.req("groups")?.array()? {
            let m = Fields::parse(item).map_err(|e| FieldError::new("groups", e.to_string()))?;
            groups.push(GroupStats {
                event_type: m.str("type")?.to_owned(),
                group: m.str("group")?.to_owned(),
                lag: m.u64("lag")?,
                pending: m.u64("pending")?,
                oldest_pending_ms: m.u64("oldest_pending_ms")?,
                dead_letters: m.u64("dead_letters")?,
                consumers: m.u64("consumers")?,
                scheduled: m.opt_u64("scheduled")?.unwrap_or(0),
            });
        }
        let mut backends = vec![];
        if let Some(list) = f.get("backends") {
            for item in list.array()? {
                let m = Fields::parse(item).map_err(|e| FieldError::new("backends", e.to_string()))?;
                backends.push(BackendStats {
                    name: m.str("name")?.to_owned(),
                    address: m.str("address")?.to_owned(),
                    up: m.flag("up")?,
                    since: m.str("since")?.to_owned(),
                    error: m.opt_str("error")?.map(str::to_owned),
                });
            }
        }
        Ok(Stats {
            node: f.str("node")?.to_owned(),
            uptime_s: f.u64("uptime_s")?,
            counters,
            spool_events: s.u64("events")?,
            spool_bytes: s.u64("bytes")?,
            spool_oldest_age_ms: s.u64("oldest_age_ms")?,
            groups,
            truncated: f.flag("truncated")?,
            backends,
        })
    }
}
