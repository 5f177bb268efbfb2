//! Replays: the `replay` request and its reply, and the reply of `replays` (`replay_cancel`
//! needs no type of its own).

use crate::msgpack::{FieldError, Fields, MapWriter};
use crate::reply::Body;

/// `replay`: the events of `event_type` logged in `[since, until)` delivered again to `group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    /// `type`.
    pub event_type: String,
    /// `group`.
    pub group: String,
    /// `since`: RFC 3339.
    pub since: String,
    /// `until`: RFC 3339 (default: now).
    pub until: Option<String>,
}

/// The reply to `replay`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayStarted {
    /// `count`: events in the range, all to be delivered.
    pub count: u64,
    /// `replay`: its id, for `replay_cancel` and `replays` (absent when `count` is 0).
    pub replay: Option<String>,
}

impl Body for ReplayStarted {
    fn write(&self, w: &mut MapWriter) {
        w.uint("count", self.count).opt_str("replay", self.replay.as_deref());
    }
    fn read(f: &Fields) -> Result<Self, FieldError> {
        Ok(ReplayStarted { count: f.u64("count")?, replay: f.opt_string("replay")? })
    }
}

/// One replay in the reply to `replays`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayInfo {
    /// `replay`: its id.
    pub replay: String,
    /// `type`.
    pub event_type: String,
    /// `group`.
    pub group: String,
    /// `status`: `running`, `done`, `cancelled`.
    pub status: String,
    /// `reason`: `request` (the `replay` op) or `recovery` (after Redis lost its data).
    pub reason: String,
    /// `added`: events given to the group's replay lane so far.
    pub added: u64,
    /// `total`: events in the range (absent for recoveries).
    pub total: Option<u64>,
    /// `created_at`: RFC 3339.
    pub created_at: String,
}

/// The reply to `replays`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayList {
    /// `replays`: running ones (and, with `all`, those that ended in the last day), oldest
    /// first.
    pub replays: Vec<ReplayInfo>,
}

impl Body for ReplayList {
    fn write(&self, w: &mut MapWriter) {
        let items: Vec<Vec<u8>> = self
            .replays
            .iter()
            .map(|r| {
                let mut m = MapWriter::new();
                m.str("replay", &r.replay)
                    .str("type", &r.event_type)
                    .str("group", &r.group)
                    .str("status", &r.status)
                    .str("reason", &r.reason)
                    .uint("added", r.added)
                    .opt_uint("total", r.total)
                    .str("created_at", &r.created_at);
                m.finish()
            })
            .collect();
        w.raw_array("replays", items.iter().map(Vec::as_slice));
    }
    fn read(f: &Fields) -> Result<Self, FieldError> {
        let mut replays = vec![];
        for item in f.req("replays")?.array()? {
            let m = Fields::parse(item).map_err(|e| FieldError::new("replays", e.to_string()))?;
            replays.push(ReplayInfo {
                replay: m.str("replay")?.to_owned(),
                event_type: m.str("type")?.to_owned(),
                group: m.str("group")?.to_owned(),
                status: m.str("status")?.to_owned(),
                reason: m.str("reason")?.to_owned(),
                added: m.u64("added")?,
                total: m.opt_u64("total")?,
                created_at: m.str("created_at")?.to_owned(),
            });
        }
        Ok(ReplayList { replays })
    }
}
