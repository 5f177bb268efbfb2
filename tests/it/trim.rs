//! Streams are trimmed only below what every group has acknowledged.

use std::time::Duration;

use redis::AsyncCommands;
use sidebus_client::SubscribeOptions;

use crate::harness::{TestEnv, next};

#[tokio::test]
async fn trimming_keeps_what_a_lagging_group_still_needs() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    let mut fast = c.subscribe("t.trim", "fast", SubscribeOptions { max_in_flight: Some(1024), ..Default::default() }).await.unwrap();
    let mut slow = c.subscribe("t.trim", "slow", SubscribeOptions { max_in_flight: Some(1), ..Default::default() }).await.unwrap();
    let mut ids = Vec::new();
    let mut pending = Vec::new();
    for i in 0..600 {
        pending.push(c.publish_start(sidebus_client::Publish::new("t.trim", sidebus_client::encode(&i).unwrap())).await.unwrap());
    }
    for p in pending {
        ids.push(p.wait().await.unwrap_or_else(|e| panic!("publish failed: {e}")).event_id);
    }
    for _ in 0..600 {
        next(&mut fast, Duration::from_secs(10)).await.ack_nowait().await.unwrap();
    }
    // The slow group has acked the first 300.
    for _ in 0..300 {
        next(&mut slow, Duration::from_secs(10)).await.ack().await.unwrap();
    }
    c.ping().await.unwrap();
    let streams = env.streams().await;
    let mut redis = env.redis().await;
    let key = format!("{}:s:t.trim", env.namespace);
    let groups = vec!["fast".to_owned(), "slow".to_owned()];
    crate::harness::eventually("fast's acks to land", Duration::from_secs(10), || async {
        (env.pending("t.trim", "fast").await == 0).then_some(())
    })
    .await;
    let trimmed = streams.trim("t.trim", &groups).await.unwrap().expect("both groups exist");
    let len: u64 = redis.xlen(&key).await.unwrap();
    assert!(trimmed > 0, "something below the slow group's position was trimmed");
    assert!(len >= 300, "the 300 entries the slow group has not acked are kept (len {len})");
    // Every event the slow group has yet to get is still delivered, in order.
    let held = next(&mut slow, Duration::from_secs(10)).await;
    assert_eq!(held.event.id, ids[300]);
    held.ack().await.unwrap();
    for id in &ids[301..] {
        let d = next(&mut slow, Duration::from_secs(10)).await;
        assert_eq!(&d.event.id, id);
        d.ack().await.unwrap();
    }
    streams.trim("t.trim", &groups).await.unwrap();
    let len: u64 = redis.xlen(&key).await.unwrap();
    // `MINID ~` removes whole stream nodes (100 entries by default): at most one partial node stays.
    assert!(len <= 100, "everything acknowledged by every group is trimmed (len {len})");
}

#[tokio::test]
async fn nothing_is_trimmed_while_a_known_group_is_missing_from_redis() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    drop(c.subscribe("t.trim", "present", SubscribeOptions::default()).await.unwrap());
    for i in 0..10 {
        // Committed: in the stream when the reply comes.
        let mut p = sidebus_client::Publish::new("t.trim", sidebus_client::encode(&i).unwrap());
        p.durability = sidebus_client::Durability::Committed;
        c.publish_with(p).await.unwrap();
    }
    let streams = env.streams().await;
    let known = vec!["present".to_owned(), "lost".to_owned()];
    assert_eq!(streams.trim("t.trim", &known).await.unwrap(), None);
    let mut redis = env.redis().await;
    let len: u64 = redis.xlen(format!("{}:s:t.trim", env.namespace)).await.unwrap();
    assert_eq!(len, 10);
}

#[tokio::test]
async fn a_long_stream_is_trimmed_in_bounded_steps() {
    let env = TestEnv::new();
    let streams = env.streams().await;
    let mut redis = env.redis().await;
    let key = format!("{}:s:t.long", env.namespace);
    for _ in 0..5 {
        let mut pipe = redis::pipe();
        for _ in 0..5000 {
            pipe.cmd("XADD").arg(&key).arg("*").arg("e").arg("x").ignore();
        }
        pipe.query_async::<()>(&mut redis).await.unwrap();
    }
    // No group: nothing needs these entries. One call removes at most one step.
    let first = streams.trim("t.long", &[]).await.unwrap().unwrap();
    assert!(first > 0 && first <= sidebus::backend::redis::TRIM_STEP, "first step trimmed {first}");
    let mut steps = 1;
    while streams.trim("t.long", &[]).await.unwrap().unwrap() > 0 {
        steps += 1;
        assert!(steps < 20, "trimming does not end");
    }
    assert!(steps >= 3, "25,000 entries take several steps ({steps})");
    let len: u64 = redis.xlen(&key).await.unwrap();
    assert!(len < 200, "left {len}");
}
