//! Dead letters: the `dlq_list`, `dlq_redrive` and `dlq_purge` requests and their replies.

use bytes::Bytes;

use crate::msgpack::{FieldError, Fields, MapWriter};
use crate::reply::Body;

/// Most entries one `dlq_list` returns.
pub const MAX_DLQ_LIMIT: u64 = 1000;
/// Most ids one `dlq_*` request names.
pub const MAX_IDS: usize = 10_000;

/// `dlq_list`: a group's dead letters, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DlqList {
    /// `type`.
    pub event_type: String,
    /// `group`.
    pub group: String,
    /// `limit`: at most this many (default 100, at most [`MAX_DLQ_LIMIT`]).
    pub limit: Option<u64>,
    /// `after`: the `next` of a previous page.
    pub after: Option<u64>,
    /// `ids`: only these event ids.
    pub ids: Vec<String>,
}

/// `dlq_redrive` and `dlq_purge`: a group's dead letters (all, or those with these event ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DlqAction {
    /// `type`.
    pub event_type: String,
    /// `group`.
    pub group: String,
    /// `ids`: only these event ids (every one must be a dead letter of the group).
    pub ids: Vec<String>,
    /// `rate`: redrive at most this many per second (redrive only).
    pub rate: Option<u64>,
}

/// One failed attempt of a dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// `attempt`: its number.
    pub attempt: u64,
    /// `error`: the consumer's error (empty for an expired lease or a closed connection).
    pub error: String,
    /// `at`: RFC 3339.
    pub at: String,
}

/// One dead letter.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterEntry {
    /// `id`: its number in the dead-letter record (the `after` of the next page).
    pub id: u64,
    /// `event`: the event as it was delivered.
    pub event: Bytes,
    /// `error`: the last error.
    pub error: String,
    /// `attempts`: failed attempts.
    pub attempts: u64,
    /// `failed_at`: when it was dead-lettered, RFC 3339.
    pub failed_at: String,
    /// `history`: the failed attempts, oldest first (the last 20).
    pub history: Vec<Attempt>,
}

/// The reply to `dlq_list`.
#[derive(Debug, Clone, PartialEq)]
pub struct DlqEntries {
    /// `entries`.
    pub entries: Vec<DeadLetterEntry>,
    /// `next`: the `after` for the next page, when there may be more.
    pub next: Option<u64>,
}

impl Body for DlqEntries {
    fn write(&self, w: &mut MapWriter) {
        let items: Vec<Vec<u8>> = self
            .entries
            .iter()
            .map(|e| {
                let history: Vec<Vec<u8>> = e
                    .history
                    .iter()
                    .map(|a| {
                        let mut m = MapWriter::new();
                        m.uint("attempt", a.attempt).str("error", &a.error).str("at", &a.at);
                        m.finish()
                    })
                    .collect();
                let mut m = MapWriter::with_capacity(128 + e.event.len());
                m.uint("id", e.id)
                    .raw("event", &e.event)
                    .str("error", &e.error)
                    .uint("attempts", e.attempts)
                    .str("failed_at", &e.failed_at)
                    .raw_array("history", history.iter().map(Vec::as_slice));
                m.finish()
            })
            .collect();
        w.raw_array("entries", items.iter().map(Vec::as_slice)).opt_uint("next", self.next);
    }
    fn read(f: &Fields) -> Result<Self, FieldError> {
        let mut entries = vec![];
        for item in f.req("entries")?.array()? {
            let m = Fields::parse(item).map_err(|e| FieldError::new("entries", e.to_string()))?;
            let mut history = vec![];
            if let Some(h) = m.get("history") {
                for a in h.array()? {
                    let a = Fields::parse(a).map_err(|e| FieldError::new("history", e.to_string()))?;
                    history.push(Attempt {
                        attempt: a.u64("attempt")?,
                        error: a.opt_string("error")?.unwrap_or_default(),
                        at: a.str("at")?.to_owned(),
                    });
                }
            }
            entries.push(DeadLetterEntry {
                id: m.u64("id")?,
                event: m.req("event")?.bytes(),
                error: m.opt_string("error")?.unwrap_or_default(),
                attempts: m.u64("attempts")?,
                failed_at: m.str("failed_at")?.to_owned(),
                history,
            });
        }
        Ok(DlqEntries { entries, next: f.opt_u64("next")? })
    }
}

/// The reply to `dlq_redrive` and `dlq_purge`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count {
    /// `count`.
    pub count: u64,
}

impl Body for Count {
    fn write(&self, w: &mut MapWriter) {
        w.uint("count", self.count);
    }
    fn read(f: &Fields) -> Result<Self, FieldError> {
        Ok(Count { count: f.u64("count")? })
    }
}

pub(crate) fn ids(f: &Fields) -> Result<Vec<String>, FieldError> {
    let Some(v) = f.get("ids") else { return Ok(vec![]) };
    let ids = v.str_array()?;
    if ids.len() > MAX_IDS {
        return Err(FieldError::new("ids", format!("at most {MAX_IDS} ids")));
    }
    for id in &ids {
        crate::names::check_event_id("ids", id)?;
    }
    Ok(ids)
}

pub(crate) fn write_ids(w: &mut MapWriter, ids: &[String]) {
    if ids.is_empty() {
        return;
    }
    let items: Vec<Vec<u8>> = ids
        .iter()
        .map(|id| {
            let mut b = Vec::with_capacity(id.len() + 5);
            // A string value on its own: writing to a Vec cannot fail.
            let _ = rmp::encode::write_str(&mut b, id);
            b
        })
        .collect();
    w.raw_array("ids", items.iter().map(Vec::as_slice));
}
