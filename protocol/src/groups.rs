//! Group lifecycle: the `groups`, `group_delete` and `group_reset` requests and their replies.

use crate::msgpack::{FieldError, Fields, MapWriter};
use crate::reply::Body;

/// `group_delete`: removes a group everywhere (Redis and the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDelete {
    /// `type`.
    pub event_type: String,
    /// `group`.
    pub group: String,
    /// `force`: delete even while the group has live subscriptions (those on the deleting
    /// daemon end at once with an error push; those elsewhere at their next read).
    pub force: bool,
}

/// Where `group_reset` moves a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResetTo {
    /// `"end"`: past everything the stream holds; only new events follow.
    End,
    /// `"start"`: the oldest entry Redis still holds (older events come through `replay`).
    Start,
    /// An RFC 3339 time: the first entry added at or after it (the daemon checks the time).
    Time(String),
}

impl ResetTo {
    /// The value on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            ResetTo::End => "end",
            ResetTo::Start => "start",
            ResetTo::Time(t) => t,
        }
    }

    /// Reads the wire value (`end`, `start`, or a time the daemon checks).
    pub fn parse(s: &str) -> ResetTo {
        match s {
            "end" => ResetTo::End,
            "start" => ResetTo::Start,
            t => ResetTo::Time(t.to_owned()),
        }
    }
}

/// `group_reset`: moves a group's read position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupReset {
    /// `type`.
    pub event_type: String,
    /// `group`.
    pub group: String,
    /// `to`.
    pub to: ResetTo,
}

/// One group in the reply to `groups`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    /// `type`.
    pub event_type: String,
    /// `group`.
    pub group: String,
    /// `created_at`: RFC 3339.
    pub created_at: String,
    /// `lag`: entries of the type's stream the group has not read.
    pub lag: u64,
    /// `pending`: delivered and not acknowledged, held by a consumer.
    pub pending: u64,
    /// `dead_letters`: not redriven or purged.
    pub dead_letters: u64,
    /// `consumers`: live subscriptions to it on every daemon.
    pub consumers: u64,
    /// `last_active`: RFC 3339; the last time it had a subscription (or was created, reset).
    pub last_active: String,
}

/// The reply to `groups`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupList {
    /// `groups`: by type, then group.
    pub groups: Vec<GroupInfo>,
    /// `truncated`: more groups exist than are listed.
    pub truncated: bool,
}

impl Body for GroupList {
    fn write(&self, w: &mut MapWriter) {
        let items: Vec<Vec<u8>> = self
            .groups
            .iter()
            .map(|g| {
                let mut m = MapWriter::new();
                m.str("type", &g.event_type)
                    .str("group", &g.group)
                    .str("created_at", &g.created_at)
                    .uint("lag", g.lag)
                    .uint("pending", g.pending)
                    .uint("dead_letters", g.dead_letters)
                    .uint("consumers", g.consumers)
                    .str("last_active", &g.last_active);
                m.finish()
            })
            .collect();
        w.raw_array("groups", items.iter().map(Vec::as_slice));
        if self.truncated {
            w.bool("truncated", true);
        }
    }
    fn read(f: &Fields) -> Result<Self, FieldError> {
        let mut groups = vec![];
        for item in f.req("groups")?.array()? {
            let m = Fields::parse(item).map_err(|e| FieldError::new("groups", e.to_string()))?;
            groups.push(GroupInfo {
                event_type: m.str("type")?.to_owned(),
                group: m.str("group")?.to_owned(),
                created_at: m.str("created_at")?.to_owned(),
                lag: m.u64("lag")?,
                pending: m.u64("pending")?,
                dead_letters: m.u64("dead_letters")?,
                consumers: m.u64("consumers")?,
                last_active: m.str("last_active")?.to_owned(),
            });
        }
        Ok(GroupList { groups, truncated: f.flag("truncated")? })
    }
}

/// The reply to `group_delete`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDeleted {
    /// `ended`: subscriptions of the group this daemon ended (with `force`).
    pub ended: u64,
}

impl Body for GroupDeleted {
    fn write(&self, w: &mut MapWriter) {
        w.uint("ended", self.ended);
    }
    fn read(f: &Fields) -> Result<Self, FieldError> {
        Ok(GroupDeleted { ended: f.opt_u64("ended")?.unwrap_or(0) })
    }
}

/// The reply to `group_reset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMoved {
    /// `entry`: the stream entry id the group now reads after (`0-0`: from the start).
    pub entry: String,
}

impl Body for GroupMoved {
    fn write(&self, w: &mut MapWriter) {
        w.str("entry", &self.entry);
    }
    fn read(f: &Fields) -> Result<Self, FieldError> {
        Ok(GroupMoved { entry: f.str("entry")?.to_owned() })
    }
}
