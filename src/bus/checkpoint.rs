//! The groups' checkpoints: what a recovery gives a group again after Redis lost its data (see
//! `bus::recovery` for the invariant they keep). The janitor records them every couple of
//! seconds: it reads the log's inputs ([`CheckpointInputs`]), then, per type, one atomic look at
//! Redis (`lua/checkpoint.lua`), resolves the event ids found there to log positions, and
//! [`plan`]s each group's two bounds.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::backend::pg::{CheckpointInputs, EventLog, GroupResume, LogError};
use crate::backend::redis::{CheckpointState, LaneBound, Streams, StreamsError};

/// The index name of the moves of due delayed events into a type's stream (`lua/move_due.lua`).
pub const DELAY_LANE: &str = "delay";
/// Prefix of a recovery replay's lane of events in log order.
pub const RECOVERY_LANE: &str = "rec:";
/// Prefix of a recovery replay's lane of delayed events that came due.
pub const RECOVERY_DUE_LANE: &str = "recd:";
/// Prefix of a requested replay's lane.
pub const REQUEST_LANE: &str = "req:";

/// Why checkpoints could not be recorded this round (the previous ones stand).
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Postgres failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// Redis failed.
    #[error(transparent)]
    Streams(#[from] StreamsError),
}

/// What one type's look at Redis means for its groups.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The checkpoints to record.
    pub resumes: Vec<GroupResume>,
    /// For replays on request: the last log position their group acknowledged everything up
    /// to.
    pub safe_cursors: Vec<(Uuid, i64)>,
    /// Groups left as they were (missing in Redis, or a bound that could not be read).
    pub skipped: Vec<String>,
}

/// Records the checkpoints of every group the log knows; returns how many were recorded.
pub async fn record(log: &EventLog, streams: &Streams) -> Result<u64, CheckpointError> {
    let inputs = log.checkpoint_inputs().await?;
    let Some(epoch) = inputs.epoch.clone() else { return Ok(0) };
    let mut recorded = 0;
    for (event_type, groups) in log.types_and_groups().await? {
        if groups.is_empty() {
            continue;
        }
        let state = streams.checkpoint_state(&event_type, &groups).await?;
        if state.epoch.as_deref() != Some(epoch.as_str()) {
            // Redis is not the data set the log last made ready: it lost its data, or is being
            // recovered. Nothing it says is a checkpoint.
            return Ok(recorded);
        }
        let ids = event_ids(&state);
        let positions = if ids.is_empty() { HashMap::new() } else { log.positions_of(&ids).await? };
        let plan = plan(&event_type, &state, &positions, &inputs);
        tracing::trace!(r#type = %event_type, ?state, cap = inputs.cap, lanes_floor = ?inputs.lanes_floor, recovering = ?inputs.recovering, "checkpoint inputs");
        for g in &plan.skipped {
            tracing::debug!(r#type = %event_type, group = %g, "checkpoint not recorded this round");
        }
        let n = log.set_checkpoints(&plan.resumes).await?;
        for r in &plan.resumes {
            tracing::trace!(r#type = %event_type, group = %r.group, seq = r.seq, due = %r.due, recorded = n > 0, "checkpoint");
        }
        recorded += n;
        log.set_replay_safe_cursors(&plan.safe_cursors).await?;
    }
    Ok(recorded)
}

/// The event ids whose log positions [`plan`] needs.
fn event_ids(state: &CheckpointState) -> Vec<String> {
    let mut ids: Vec<String> = state
        .groups
        .iter()
        .flat_map(|g| g.live.iter().flatten().chain(g.replay.iter().flatten()))
        .filter(|(lane, _)| lane != DELAY_LANE)
        .filter_map(|(_, b)| match b {
            LaneBound::At(id) | LaneBound::After(id) => Some(id.clone()),
            LaneBound::Unknown => None,
        })
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// Each group's checkpoint from one look at Redis (`state`), the log positions and due times of
/// the events named there, and the log's inputs (read before Redis).
///
/// `seq`, below which every event of the type that is not delayed was acknowledged by the
/// group, is the lowest of:
/// - `inputs.cap`: every event stored after the inputs were read is at or after it;
/// - `inputs.lanes_floor`: every event a publish lane that reports has not added to Redis yet
///   is at or after its bound;
/// - per publish lane with entries the group has not acknowledged in the type's stream, and
///   per recovery replay with such entries in the group's replay stream, the position of the
///   first entry of the index block where they can start (a lane adds in log order, so none of
///   them is before it);
/// - for a running recovery replay, the position after the last one it added.
///
/// `due`, below which every delayed event (by due time) was acknowledged, is the lowest of the
/// Redis clock (a delay zset only takes events due later), the earliest due time in the delay
/// zset, the due time where the group's unacknowledged moved events can start (moves are in due
/// order), the same for a recovery's delayed events in the replay stream, and a running
/// recovery's walk of delayed events.
///
/// A bound that cannot be read (an event id the log does not have, an index that is missing)
/// leaves the group's checkpoint as it was, as does a group missing in Redis.
pub fn plan(
    event_type: &str,
    state: &CheckpointState,
    positions: &HashMap<String, (i64, Option<DateTime<Utc>>)>,
    inputs: &CheckpointInputs,
) -> Plan {
    let mut out = Plan::default();
    'groups: for g in &state.groups {
        let key = (event_type.to_owned(), g.group.clone());
        let (Some(live), Some(replay), Some(&generation)) = (&g.live, &g.replay, inputs.generations.get(&key)) else {
            out.skipped.push(g.group.clone());
            continue;
        };
        let mut seq = inputs.cap;
        if let Some(f) = inputs.lanes_floor {
            seq = seq.min(f);
        }
        let mut due = state.now_ms;
        if let Some(d) = state.first_due_ms {
            due = due.min(d);
        }
        if let Some(r) = inputs.recovering.get(&key) {
            seq = seq.min(r.next);
            if let Some(d) = r.due {
                due = due.min(ms(d));
            }
        }
        for (lane, bound) in live {
            match (lane.as_str(), bound) {
                (_, LaneBound::After(_)) => {}
                (_, LaneBound::Unknown) => {
                    out.skipped.push(g.group.clone());
                    continue 'groups;
                }
                (DELAY_LANE, LaneBound::At(d)) => match d.parse::<i64>() {
                    Ok(d) => due = due.min(d),
                    Err(_) => {
                        out.skipped.push(g.group.clone());
                        continue 'groups;
                    }
                },
                (_, LaneBound::At(id)) => match positions.get(id) {
                    Some((s, _)) => seq = seq.min(*s),
                    None => {
                        out.skipped.push(g.group.clone());
                        continue 'groups;
                    }
                },
            }
        }
        let requested = inputs.requested.get(&key);
        for (lane, bound) in replay {
            let (id, at) = match bound {
                LaneBound::At(id) => (id, true),
                LaneBound::After(id) => (id, false),
                LaneBound::Unknown => {
                    // Only a recovery's lanes hold the group back; another lane's index being
                    // missing costs nothing but its own safe cursor.
                    if lane.starts_with(RECOVERY_LANE) || lane.starts_with(RECOVERY_DUE_LANE) {
                        out.skipped.push(g.group.clone());
                        continue 'groups;
                    }
                    continue;
                }
            };
            let Some(&(s, d)) = positions.get(id) else {
                if lane.starts_with(RECOVERY_LANE) || lane.starts_with(RECOVERY_DUE_LANE) {
                    out.skipped.push(g.group.clone());
                    continue 'groups;
                }
                continue;
            };
            if let Some(r) = lane.strip_prefix(REQUEST_LANE) {
                // Replays on request are extra deliveries: they hold back their own cursor, not
                // the group's checkpoint.
                if let Ok(r) = r.parse::<Uuid>()
                    && requested.is_some_and(|ids| ids.contains(&r))
                {
                    out.safe_cursors.push((r, if at { s - 1 } else { s }));
                }
            } else if !at {
                // Everything of a replay lane was acknowledged; what the replay still adds is
                // held back by its cursor.
            } else if lane.starts_with(RECOVERY_DUE_LANE) {
                match d {
                    Some(d) => due = due.min(ms(d)),
                    None => seq = seq.min(s),
                }
            } else if lane.starts_with(RECOVERY_LANE) {
                seq = seq.min(s);
            }
        }
        let Some(due) = DateTime::from_timestamp_millis(due) else {
            out.skipped.push(g.group.clone());
            continue;
        };
        out.resumes.push(GroupResume { event_type: event_type.to_owned(), group: g.group.clone(), seq, due, generation });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::pg::Recovering;
    use crate::backend::redis::GroupCheckpoint;

    fn inputs(cap: i64) -> CheckpointInputs {
        let mut i = CheckpointInputs { cap, epoch: Some("e".into()), ..Default::default() };
        i.generations.insert(("t".into(), "g".into()), 3);
        i
    }

    fn state(live: Vec<(&str, LaneBound)>, replay: Vec<(&str, LaneBound)>) -> CheckpointState {
        CheckpointState {
            epoch: Some("e".into()),
            now_ms: 1_000_000,
            first_due_ms: None,
            groups: vec![GroupCheckpoint {
                group: "g".into(),
                live: Some(live.into_iter().map(|(l, b)| (l.to_owned(), b)).collect()),
                replay: Some(replay.into_iter().map(|(l, b)| (l.to_owned(), b)).collect()),
            }],
        }
    }

    fn pos(entries: &[(&str, i64)]) -> HashMap<String, (i64, Option<DateTime<Utc>>)> {
        entries.iter().map(|(id, s)| ((*id).to_owned(), (*s, None))).collect()
    }

    #[test]
    fn the_lowest_unacknowledged_block_of_any_lane_bounds_the_checkpoint() {
        // Lane a's unacknowledged entries start at position 40 although lane b's, later in the
        // stream, start at 90: a checkpoint taken from stream order alone would say 90.
        let s =
            state(vec![("a", LaneBound::At("x".into())), ("b", LaneBound::At("y".into())), ("c", LaneBound::After("z".into()))], vec![]);
        let p = plan("t", &s, &pos(&[("x", 40), ("y", 90), ("z", 10)]), &inputs(100));
        assert_eq!(p.resumes.len(), 1);
        assert_eq!(p.resumes[0].seq, 40);
        assert_eq!(p.resumes[0].generation, 3);
    }

    #[test]
    fn lanes_that_report_and_running_recoveries_hold_it_back() {
        let s = state(vec![], vec![]);
        let mut i = inputs(100);
        i.lanes_floor = Some(70);
        assert_eq!(plan("t", &s, &pos(&[]), &i).resumes[0].seq, 70);
        i.recovering.insert(("t".into(), "g".into()), Recovering { next: 55, due: Some(DateTime::from_timestamp_millis(500).unwrap()) });
        let p = plan("t", &s, &pos(&[]), &i);
        assert_eq!(p.resumes[0].seq, 55);
        assert_eq!(p.resumes[0].due.timestamp_millis(), 500);
    }

    #[test]
    fn without_anything_unacknowledged_the_checkpoint_is_the_log_end_and_the_redis_clock() {
        let p = plan("t", &state(vec![], vec![]), &pos(&[]), &inputs(100));
        assert_eq!((p.resumes[0].seq, p.resumes[0].due.timestamp_millis()), (100, 1_000_000));
    }

    #[test]
    fn delayed_events_bound_the_due_time_not_the_position() {
        let mut s = state(vec![(DELAY_LANE, LaneBound::At("900".into()))], vec![]);
        s.first_due_ms = Some(950);
        let p = plan("t", &s, &pos(&[]), &inputs(100));
        assert_eq!((p.resumes[0].seq, p.resumes[0].due.timestamp_millis()), (100, 900));
    }

    #[test]
    fn recovery_lanes_count_requested_replays_only_move_their_own_cursor() {
        let r = Uuid::new_v4();
        let s = state(
            vec![],
            vec![
                ("rec:1", LaneBound::At("a".into())),
                ("rec:2", LaneBound::After("b".into())),
                (&format!("req:{r}"), LaneBound::At("c".into())),
                ("redrive", LaneBound::At("d".into())),
            ],
        );
        let mut i = inputs(100);
        i.requested.insert(("t".into(), "g".into()), vec![r]);
        let p = plan("t", &s, &pos(&[("a", 60), ("b", 5), ("c", 7), ("d", 1)]), &i);
        assert_eq!(p.resumes[0].seq, 60);
        assert_eq!(p.safe_cursors, vec![(r, 6)]);
    }

    #[test]
    fn an_unreadable_bound_or_a_missing_group_leaves_the_checkpoint_alone() {
        let p = plan("t", &state(vec![("a", LaneBound::At("gone".into()))], vec![]), &pos(&[]), &inputs(100));
        assert!(p.resumes.is_empty());
        assert_eq!(p.skipped, vec!["g".to_owned()]);
        let mut s = state(vec![], vec![]);
        s.groups[0].replay = None;
        assert!(plan("t", &s, &pos(&[]), &inputs(100)).resumes.is_empty());
        let p = plan("t", &state(vec![("a", LaneBound::Unknown)], vec![]), &pos(&[]), &inputs(100));
        assert!(p.resumes.is_empty());
    }
}
