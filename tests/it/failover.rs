//! Deliveries of a consumer that goes away: a closed socket hands them to another consumer at
//! once; an unsubscribe releases them without counting an attempt; a daemon killed with
//! SIGKILL has its deliveries reclaimed by another daemon after the ack timeout.

use std::collections::HashSet;
use std::time::Duration;

use sidebus_client::SubscribeOptions;

use crate::harness::{TestEnv, assert_quiet, get, map, msgpack, next, recv_raw, send_raw};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_closed_socket_hands_its_deliveries_to_another_consumer_at_once() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    // Consumer A speaks the raw protocol, so closing its socket is all it does (no unsubscribe).
    let mut a = daemon.raw().await;
    let subscribe = map(&[
        ("op", "subscribe".into()),
        ("id", 1.into()),
        ("type", "order.created".into()),
        ("group", "inventory".into()),
        ("max_in_flight", 5.into()),
        ("ack_timeout_ms", 60_000.into()),
    ]);
    send_raw(&mut a, &msgpack(&subscribe)).await;
    assert_eq!(get(&recv_raw(&mut a).await.unwrap(), "op").and_then(rmpv::Value::as_str), Some("ok"));
    let p = daemon.client().await;
    let mut ids = HashSet::new();
    for i in 0..5 {
        ids.insert(p.publish("order.created", &i).await.unwrap().event_id);
    }
    for _ in 0..5 {
        let d = recv_raw(&mut a).await.unwrap();
        assert_eq!(get(&d, "op").and_then(rmpv::Value::as_str), Some("deliver"));
    }
    // A long lease: only the closed socket can bring these back quickly.
    let opts = SubscribeOptions { ack_timeout_ms: Some(60_000), max_in_flight: Some(5), ..Default::default() };
    let b = daemon.client().await;
    let mut sb = b.subscribe("order.created", "inventory", opts).await.unwrap();
    assert_quiet(&mut sb, Duration::from_millis(300)).await;
    drop(a);
    let mut got = HashSet::new();
    for _ in 0..5 {
        let d = next(&mut sb, Duration::from_secs(3)).await;
        assert_eq!(d.attempt, 2, "a delivery lost with its socket counts as an attempt");
        got.insert(d.event.id.clone());
        d.ack().await.unwrap();
    }
    assert_eq!(got, ids);
}

#[tokio::test]
async fn unsubscribe_releases_deliveries_without_counting_an_attempt() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let c = daemon.client().await;
    let opts = SubscribeOptions { ack_timeout_ms: Some(60_000), ..Default::default() };
    let mut first = c.subscribe("order.created", "inventory", opts.clone()).await.unwrap();
    let id = c.publish("order.created", &1).await.unwrap().event_id;
    next(&mut first, WAIT).await;
    first.unsubscribe().await.unwrap();
    let mut again = c.subscribe("order.created", "inventory", opts).await.unwrap();
    let d = next(&mut again, Duration::from_secs(3)).await;
    assert_eq!((d.event.id.as_str(), d.attempt), (id.as_str(), 1));
}

#[tokio::test]
async fn deliveries_of_a_killed_daemon_are_reclaimed_by_another() {
    let env = TestEnv::new();
    let mut doomed = env.daemon().start().await;
    let survivor = env.daemon().start().await;
    let opts = SubscribeOptions { ack_timeout_ms: Some(1000), ..Default::default() };
    let c = doomed.client().await;
    let mut sub = c.subscribe("order.created", "inventory", opts.clone()).await.unwrap();
    let mut ids = HashSet::new();
    for i in 0..3 {
        ids.insert(c.publish("order.created", &i).await.unwrap().event_id);
    }
    for _ in 0..3 {
        next(&mut sub, WAIT).await;
    }
    doomed.kill();
    let c2 = survivor.client().await;
    let mut sub2 = c2.subscribe("order.created", "inventory", opts).await.unwrap();
    let mut got = HashSet::new();
    for _ in 0..3 {
        let d = next(&mut sub2, WAIT).await;
        assert_eq!(d.attempt, 2, "an expired lease is a failed attempt");
        got.insert(d.event.id.clone());
        d.ack().await.unwrap();
    }
    assert_eq!(got, ids);
}
