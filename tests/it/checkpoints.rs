//! The checkpoint a group gets (`checkpoint.lua` read by `checkpoint::plan`) never passes an
//! event the group has not acknowledged, whatever the interleaving of the lanes' adds, the
//! group's reads and acks, and the trims: random cases against a real Redis, each checked
//! against the brute-force answer (the lowest log position of an entry not acknowledged).

use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sidebus::backend::pg::CheckpointInputs;
use sidebus::backend::redis::LaneEvent;
use sidebus::bus::checkpoint::plan;

use crate::harness::TestEnv;

const TYPE: &str = "cp.t";
const GROUP: &str = "g";
const CASES: u64 = 120;

/// One event of the model: its lane, its log position, its id.
#[derive(Clone)]
struct Ev {
    lane: usize,
    seq: i64,
    id: String,
}

#[tokio::test]
async fn a_checkpoint_never_passes_an_unacknowledged_event() {
    let only: Option<u64> = std::env::var("CHECKPOINT_CASE").ok().and_then(|c| c.parse().ok());
    for case in 0..CASES {
        if only.is_none_or(|o| o == case) {
            check_case(case).await;
        }
    }
}

async fn check_case(case: u64) {
    let mut rng = StdRng::seed_from_u64(case);
    let env = TestEnv::new();
    // A block per add: the finest index, where a wrong bound would show.
    let streams = env.streams().await.with_index_block(if rng.random_bool(0.7) { 0 } else { 100 });
    assert!(streams.claim_epoch("e").await.unwrap());
    let mut redis = env.redis().await;
    let stream = streams.stream_key(TYPE);
    for s in [stream.clone(), streams.replay_keys(TYPE, GROUP).stream] {
        let _: () = redis::cmd("XGROUP").arg("CREATE").arg(&s).arg(GROUP).arg("0").arg("MKSTREAM").query_async(&mut redis).await.unwrap();
    }

    // Stores: log positions handed out in store order, to lanes at random; each lane adds in its
    // own order, interleaved at random with the other lanes and with the group's reads and acks.
    let lanes: Vec<uuid::Uuid> = (0..rng.random_range(1..4)).map(|_| uuid::Uuid::new_v4()).collect();
    let n = rng.random_range(5..120);
    let events: Vec<Ev> =
        (0..n).map(|i| Ev { lane: rng.random_range(0..lanes.len()), seq: i as i64 + 1, id: format!("c{case}-e{i}") }).collect();
    let mut queues: Vec<Vec<Ev>> = vec![Vec::new(); lanes.len()];
    for e in &events {
        queues[e.lane].push(e.clone());
    }
    let mut next = vec![0usize; lanes.len()];
    let mut entry_of: HashMap<String, String> = HashMap::new();
    let mut delivered: Vec<String> = Vec::new();
    let mut acked: HashSet<String> = HashSet::new();
    loop {
        let open: Vec<usize> = (0..lanes.len()).filter(|l| next[*l] < queues[*l].len()).collect();
        let action = rng.random_range(0..10);
        if action < 5 && !open.is_empty() {
            let l = open[rng.random_range(0..open.len())];
            let k = rng.random_range(1..=4).min(queues[l].len() - next[l]);
            let chunk: Vec<Ev> = queues[l][next[l]..next[l] + k].to_vec();
            next[l] += k;
            let batch: Vec<LaneEvent<'_>> =
                chunk.iter().map(|e| LaneEvent { seq: e.seq, event_type: TYPE, due_ms: 0, id: &e.id, event: e.id.as_bytes() }).collect();
            streams.add_batch(&lanes[l], &batch, None).await.unwrap();
        } else if action < 8 {
            // The group reads a few entries.
            let v: redis::Value = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(GROUP)
                .arg("c")
                .arg("COUNT")
                .arg(rng.random_range(1..6))
                .arg("STREAMS")
                .arg(&stream)
                .arg(">")
                .query_async(&mut redis)
                .await
                .unwrap();
            for (entry, event) in entries(v) {
                entry_of.insert(event.clone(), entry);
                delivered.push(event);
            }
        } else if !delivered.is_empty() {
            // It acknowledges some of what it holds, mostly the oldest.
            let pending: Vec<&String> = delivered.iter().filter(|e| !acked.contains(*e)).collect();
            if let Some(e) = pending.get(if rng.random_bool(0.7) { 0 } else { rng.random_range(0..pending.len().max(1)) }).copied() {
                let e = e.clone();
                let _: () = redis::cmd("XACK").arg(&stream).arg(GROUP).arg(&entry_of[&e]).query_async(&mut redis).await.unwrap();
                acked.insert(e);
            }
        }
        if open.is_empty() && rng.random_bool(0.05) {
            break;
        }
    }
    if rng.random_bool(0.5) {
        streams.trim(TYPE, &[GROUP.to_owned()]).await.unwrap();
    }

    let state = streams.checkpoint_state(TYPE, &[GROUP.to_owned()]).await.unwrap();
    let unacknowledged = events.iter().filter(|e| !acked.contains(&e.id)).map(|e| e.seq).min();
    let positions = events.iter().map(|e| (e.id.clone(), (e.seq, None))).collect();
    let mut inputs = CheckpointInputs { cap: n as i64 + 1, epoch: Some("e".into()), ..Default::default() };
    inputs.generations.insert((TYPE.to_owned(), GROUP.to_owned()), 0);
    let p = plan(TYPE, &state, &positions, &inputs);
    assert_eq!(p.resumes.len(), 1, "case {case}: a checkpoint is planned ({:?})", p.skipped);
    let got = p.resumes[0].seq;
    match unacknowledged {
        Some(min) if got > min => {
            let order: Vec<(usize, i64, bool, bool)> =
                events.iter().map(|e| (e.lane, e.seq, entry_of.contains_key(&e.id), acked.contains(&e.id))).collect();
            let v: redis::Value = redis::cmd("XRANGE").arg(&stream).arg("-").arg("+").query_async(&mut redis).await.unwrap();
            let mut ix = Vec::new();
            for l in &lanes {
                let z: Vec<(String, f64)> = redis::cmd("ZRANGE")
                    .arg(format!("{stream}:ix:{}", l.simple()))
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query_async(&mut redis)
                    .await
                    .unwrap();
                ix.push((l.simple().to_string(), z));
            }
            let info: redis::Value = redis::cmd("XINFO").arg("GROUPS").arg(&stream).query_async(&mut redis).await.unwrap();
            panic!(
                "case {case}: checkpoint {got} passes the unacknowledged event at {min}\nevents (lane, seq, delivered, acked): {order:?}\n\
                 state: {state:?}\nstream: {:?}\nindex: {ix:?}\ngroups: {info:?}",
                entries_of_range(v)
            );
        }
        Some(_) => {}
        None => assert_eq!(got, n as i64 + 1, "case {case}: with everything acknowledged the checkpoint is the log's end"),
    }
}

/// (entry id, event) pairs of an XREADGROUP reply.
fn entries(v: redis::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let redis::Value::Array(streams) = v else { return out };
    for s in streams {
        let redis::Value::Array(parts) = s else { continue };
        let Some(redis::Value::Array(list)) = parts.into_iter().nth(1) else { continue };
        for e in list {
            let redis::Value::Array(p) = e else { continue };
            let mut p = p.into_iter();
            let (Some(id), Some(redis::Value::Array(fields))) = (p.next(), p.next()) else { continue };
            let text = |v: &redis::Value| match v {
                redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                _ => String::new(),
            };
            out.push((text(&id), text(&fields[1])));
        }
    }
    out
}

fn entries_of_range(v: redis::Value) -> Vec<(String, String)> {
    entries(redis::Value::Array(vec![redis::Value::Array(vec![redis::Value::Nil, v])]))
}
