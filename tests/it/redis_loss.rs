//! Redis loses its data, again and again, while publishes flow: a ledger of every acknowledged
//! publish and of every delivery shows that each acknowledged event reaches its group, that a
//! delayed event is not delivered before its time, and how many deliveries were repeated.
//!
//! The scenario: two daemons on one Redis and one Postgres; one connection publishes through
//! the first at 2,000 events a second (both durabilities mixed, a few events delayed by one to
//! four seconds); one group on the second daemon acknowledges every delivery. A schedule from a
//! fixed seed kills Redis and starts it again empty at random moments during the load; then the
//! load stops and the group drains.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sidebus_client::{Durability, Publish, SubscribeOptions};

use crate::harness::TestEnv;
use crate::harness::servers::RedisServer;

/// Events published per second.
const RATE: u64 = 2000;
/// Publishes started per tick of the pacer.
const PER_TICK: u64 = 20;

/// One acknowledged publish.
struct Acked {
    durability: Durability,
    delayed: bool,
}

/// One delivery to the group.
struct Seen {
    at: chrono::DateTime<chrono::Utc>,
    deliverat: Option<String>,
    replayed: bool,
    attempt: u64,
}

#[derive(Default)]
struct Ledger {
    acked: Mutex<HashMap<String, Acked>>,
    seen: Mutex<HashMap<String, Vec<Seen>>>,
    refused: Mutex<HashMap<String, u64>>,
}

/// The three runs share the machine with the rest of the suite; one at a time keeps their
/// load what the scenario says.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn run(losses: usize, spacing: Duration, seed: u64) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut rng = StdRng::seed_from_u64(seed);
    let redis = RedisServer::start();
    let port = redis.port;
    let env = TestEnv::on(redis.url());
    let publisher = env.daemon().start().await;
    let consumer = env.daemon().start().await;
    let ledger = Arc::new(Ledger::default());

    let mut sub = consumer
        .client()
        .await
        .subscribe("load.tick", "ledger", SubscribeOptions { max_in_flight: Some(512), ..Default::default() })
        .await
        .expect("subscribe");
    let l = ledger.clone();
    tokio::spawn(async move {
        while let Some(d) = sub.next().await {
            let seen =
                Seen { at: chrono::Utc::now(), deliverat: d.event.deliverat.clone(), replayed: d.event.replayed, attempt: d.attempt };
            l.seen.lock().unwrap().entry(d.event.id.clone()).or_default().push(seen);
            let _ = d.ack_nowait().await;
        }
    });

    // The load: PER_TICK publishes every tick, awaited by a task of their own so that the pace
    // holds while Redis is away (local publishes are spooled; committed ones wait).
    let load_for = spacing * (losses as u32 + 1);
    let c = publisher.client().await;
    // Held until every publish is answered: the connection closes with its last handle.
    let _keep = c.clone();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(sidebus_client::PendingPublish, Durability, bool)>();
    let l = ledger.clone();
    let awaiter = tokio::spawn(async move {
        while let Some((p, durability, delayed)) = rx.recv().await {
            match p.wait().await {
                Ok(r) => {
                    l.acked.lock().unwrap().insert(r.event_id, Acked { durability, delayed });
                }
                Err(e) => *l.refused.lock().unwrap().entry(e.code().map_or_else(|| e.to_string(), |c| c.to_string())).or_default() += 1,
            }
        }
    });
    let mut plan_rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let pacer = tokio::spawn(async move {
        let start = Instant::now();
        let tick = Duration::from_micros(1_000_000 * PER_TICK / RATE);
        let mut n: u64 = 0;
        while start.elapsed() < load_for {
            for _ in 0..PER_TICK {
                let mut p = Publish::new("load.tick", sidebus_client::encode(&n).unwrap());
                let durability = if plan_rng.random_bool(0.5) { Durability::Committed } else { Durability::Local };
                p.durability = durability;
                let delayed = plan_rng.random_bool(0.02);
                if delayed {
                    p.delay_ms = Some(plan_rng.random_range(1000..4000));
                }
                match c.publish_start(p).await {
                    Ok(pending) => {
                        let _ = tx.send((pending, durability, delayed));
                    }
                    Err(e) => panic!("the publishing connection broke: {e}"),
                }
                n += 1;
            }
            tokio::time::sleep_until(tokio::time::Instant::from_std(start + tick * ((n / PER_TICK) as u32))).await;
        }
        n
    });

    // The faults: Redis killed and started again empty, at random moments of the load.
    let mut redis = Some(redis);
    let begun = Instant::now();
    for i in 0..losses {
        let at = spacing.mul_f64(i as f64 + 0.5 + rng.random_range(-0.3..0.3));
        tokio::time::sleep(at.saturating_sub(begun.elapsed())).await;
        drop(redis.take());
        redis = Some(RedisServer::start_on(port));
    }
    let published = pacer.await.expect("the load ran");
    awaiter.await.expect("every publish answered");

    // The drain: every acknowledged event reaches the group, or the deadline says which did not.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let missing = {
            let seen = ledger.seen.lock().unwrap();
            ledger.acked.lock().unwrap().keys().filter(|id| !seen.contains_key(*id)).count()
        };
        if missing == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Deliveries still coming (recovery replays, retries of acks Redis lost) are counted too.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut recovered = 0;
    for d in [&publisher, &consumer] {
        if let Ok(s) = d.client().await.stats().await {
            recovered += s.counters.iter().find(|(k, _)| k == "recovered").map_or(0, |(_, v)| *v);
        }
    }

    let acked = ledger.acked.lock().unwrap();
    let seen = ledger.seen.lock().unwrap();
    let never: Vec<&String> = acked.keys().filter(|id| !seen.contains_key(*id)).collect();
    let deliveries: usize = seen.values().map(Vec::len).sum();
    let duplicates = deliveries - seen.len();
    // Of the repeated deliveries: given again by a recovery (marked replayed), or retried
    // because an ack was lost with Redis (attempt > 1), or neither.
    let repeats: Vec<&Seen> = seen.values().flat_map(|s| s.iter().skip(1)).collect();
    let (by_recovery, retried) =
        (repeats.iter().filter(|s| s.replayed).count(), repeats.iter().filter(|s| !s.replayed && s.attempt > 1).count());
    let committed = acked.values().filter(|a| a.durability == Durability::Committed).count();
    let delayed: Vec<&String> = acked.iter().filter(|(_, a)| a.delayed).map(|(id, _)| id).collect();
    let early: Vec<&String> = delayed
        .iter()
        .copied()
        .filter(|id| {
            seen.get(*id).is_some_and(|s| {
                s.iter().any(|d| {
                    let due = d.deliverat.as_deref().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
                    due.is_some_and(|due| d.at < due - chrono::Duration::milliseconds(150))
                })
            })
        })
        .collect();
    eprintln!(
        "redis losses {losses} ({spacing:?} apart, seed {seed}): published {published}, acknowledged {} ({committed} committed, {} delayed), \
         refused {:?}; never delivered {}; deliveries {deliveries}, duplicates {duplicates} ({by_recovery} replayed, {retried} retried); delayed delivered early {}; recovery gave again {recovered}",
        acked.len(),
        delayed.len(),
        ledger.refused.lock().unwrap(),
        never.len(),
        early.len(),
    );
    assert!(acked.len() as u64 > published / 2, "most publishes were acknowledged ({} of {published})", acked.len());
    assert!(never.is_empty(), "{} acknowledged events never reached the group, e.g. {:?}", never.len(), &never[..never.len().min(5)]);
    assert!(early.is_empty(), "{} delayed events were delivered before their time, e.g. {:?}", early.len(), &early[..early.len().min(5)]);
}

#[tokio::test]
async fn one_redis_loss_under_load_loses_no_acknowledged_event() {
    run(1, Duration::from_secs(6), 1).await;
}

#[tokio::test]
async fn five_redis_losses_under_load_lose_no_acknowledged_event() {
    run(5, Duration::from_secs(10), 5).await;
}

#[tokio::test]
async fn thirteen_redis_losses_under_load_lose_no_acknowledged_event() {
    run(13, Duration::from_millis(2300), 13).await;
}
